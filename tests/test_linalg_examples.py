"""The worked applications of docs/linalg.md, run as the user runs them, against dense truth:
influence functions (examples/influence.py: iHVPs against the dense Hessian from torch.func)
and the Laplace evidence (examples/laplace_evidence.py: SLQ log-determinants against slogdet
of the dense GGN)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(name, **kwargs):
    pytest.importorskip("torch")
    return runpy.run_path(str(EXAMPLES / name))["main"](verbose=False, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_influence_example_matches_the_dense_inverse(dtype):
    torch = pytest.importorskip("torch")
    out = run("influence.py", dtype=getattr(torch, dtype))
    # float32: tol 1e-4 on a system of condition number ~900 (damping 1e-2)
    assert out["converged"] and out["error"] < (1e-6 if dtype == "float64" else 5e-3)
    assert out["num_matvecs"] < 3 * out["n"]  # fewer products than forming the Hessian for 3 test points


def test_laplace_evidence_example_matches_slogdet_and_chooses_the_same_prior():
    pytest.importorskip("sklearn")
    out = run("laplace_evidence.py")
    assert out["best"] == out["best_dense"]
    assert out["max_error_in_stderrs"] < 4  # the dense evidence within the reported uncertainty
    assert out["products"] < out["P"] / 2  # far fewer products than forming the GGN


def test_linalg_page_runs():
    """docs/linalg.md's python blocks, in order, as one script: they assert against dense truth."""
    from test_docs import page_script, run_script

    script, _ = page_script(ROOT / "docs" / "linalg.md")
    assert script.count("assert") >= 4
    run_script("linalg.md", script)
