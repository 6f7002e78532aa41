"""``specops analyze --data-error``: the data's part of the uncertainty beside the algorithm's,
against independent calls of ``eigsh``/``trace(..., data_error=True)`` on the same operator and a
jackknife over dense per-batch Hessians, in every output; data as one batch split as the same data
given as 8 batches; and the refusals of data that cannot be split."""

import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from specops.backends import torch as st

import specops as so
from specops import cli

MODEL = ["--model", "test_cli_data_error:tiny_model", "--data", "test_cli_data_error:four_batches"]
BUDGETS = ["--top-k", "2", "--eig-matvecs", "120", "--trace-matvecs", "40", "--trace-rtol", "0.02",
           "--stages", "eigen,trace", "--no-progress"]


def tiny_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(64, 5), torch.nn.Tanh(), torch.nn.Linear(5, 10)).double()


def four_batches():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return [(X[i:i + 24], y[i:i + 24]) for i in range(0, 96, 24)]


def one_batch():
    return four_batches()[0]


def one_sample():
    x, y = four_batches()[0]
    return (x[:1], y[:1])


def results(out):
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def arr(x):
    return np.asarray(x["__ndarray__"]) if isinstance(x, dict) else np.asarray(x)


def needed(stderr, value, samples, fraction):
    """Samples for a data stderr under ``fraction |value|``, written out here (1/sqrt(N) scaling)."""
    return max(samples, math.ceil(samples * (stderr / (fraction * abs(value))) ** 2))


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-9), ("float32", 1e-4)])
def test_data_error_matches_the_library_and_a_dense_jackknife(tmp_path, capsys, dtype, rtol):
    out = str(tmp_path / dtype)
    assert cli.main(["analyze", *MODEL, *BUDGETS, "--dtype", dtype, "--data-error", "0.01", "--out", out]) == 0
    printed = capsys.readouterr().out
    r = results(out)
    eig, tr = r["stages"]["eigen"], r["stages"]["trace"]
    assert eig["settings"]["data_error"] is True and tr["settings"]["data_error"] is True
    # the same calls, made here on the same operator with the same seed
    model = tiny_model().to(getattr(torch, dtype)).eval()
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in four_batches()]
    H = st.hessian(model, torch.nn.CrossEntropyLoss(), data)
    e = so.eigsh(H, k=2, tol=1e-3, max_matvecs=120, seed=0, data_error=True)
    t = so.trace(H, method="auto", max_matvecs=40, rtol=0.02, seed=0, data_error=True)
    np.testing.assert_allclose(arr(eig["result"]["eigenvalues"]), e.eigenvalues, rtol=rtol)
    np.testing.assert_allclose(arr(eig["result"]["data_stderr"]), e.data_stderr, rtol=10 * rtol)
    assert tr["result"]["stderr"] == pytest.approx(t.stderr, rel=10 * rtol)
    assert tr["result"]["data_stderr"] == pytest.approx(t.data_stderr, rel=10 * rtol)
    # independent truth: the delete-a-batch jackknife of the eigenvalues of the dense batches'
    # Hessians in the span of the saved eigenvectors, written out here
    V = np.load(os.path.join(out, "eigenvectors.npy")).astype(np.float64)
    forms = [V.T @ st.hessian(tiny_model().eval(), torch.nn.CrossEntropyLoss(), b).to_dense() @ V for b in data]
    loo = np.array([np.linalg.eigvalsh(sum(forms[c] for c in range(4) if c != b) / 3)[::-1] for b in range(4)])
    jack = np.sqrt(3 / 4 * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))
    np.testing.assert_allclose(arr(eig["result"]["data_stderr"]), jack, rtol=1e-3 if dtype == "float32" else 1e-7)
    # the samples for a 1 % data error: stored, and in the reading
    lam, se = float(arr(eig["result"]["eigenvalues"])[0]), float(arr(eig["result"]["data_stderr"])[0])
    n_eig = needed(se, lam, 96, 0.01)
    n_tr = needed(tr["result"]["data_stderr"], tr["result"]["estimate"], 96, 0.01)
    assert eig["data_target"]["samples_needed"][0] == n_eig and tr["data_target"]["samples_needed"] == [n_tr]
    assert eig["data_target"]["relative"][0] == pytest.approx(se / lam)
    assert n_tr > 96, "the trace's data error on 96 samples should exceed 1 % here (see the reading)"
    from specops.cli import report

    rows = {row[0]: row for row in report.summary_rows(r)}
    assert f"data stderr {se:.2g}" in rows["eigenvalue 1"][2] and f"residual " in rows["eigenvalue 1"][2]
    assert (f"probes stderr {tr['result']['stderr']:.2g}" in rows["trace"][2]
            and f"data stderr {tr['result']['data_stderr']:.2g}" in rows["trace"][2])
    sentence = "Samples for a data error under 1 % of the estimate"
    with open(os.path.join(out, "summary.md")) as fh:
        md = fh.read()
    with open(os.path.join(out, "report.html")) as fh:
        page = fh.read()
    for text in (printed, md, page):
        assert sentence in text and f"about {n_tr:,}" in text and "1/sqrt(samples)" in text
        assert f"data stderr {tr['result']['data_stderr']:.2g}" in text and "96 samples in 4 batches" in text


def test_data_error_is_off_by_default(tmp_path):
    out = str(tmp_path / "off")
    assert cli.main(["analyze", *MODEL, *BUDGETS, "--out", out]) == 0
    r = results(out)
    for stage in ("eigen", "trace"):
        assert "data_error" not in r["stages"][stage]["settings"] and "data_target" not in r["stages"][stage]
        assert r["stages"][stage]["result"]["data_stderr"] is None
    from specops.cli import report

    assert not any("data stderr" in row[2] for row in report.summary_rows(r))
    assert not any("Data error" in n for n in report.reading(r))


def eight_parts_of_one_batch():
    x, y = one_batch()
    return [(x[i:i + 3], y[i:i + 3]) for i in range(0, 24, 3)]


def squared_mean_loss(outputs, targets):
    """Not a mean over samples: one batch of it cannot be split."""
    return torch.nn.functional.cross_entropy(outputs, targets) ** 2


def test_one_batch_is_split_as_the_same_data_given_as_8_batches(tmp_path):
    """One batch of 24 gives the data errors of its 8 sub-batches of 3 passed as batches."""
    found = {}
    for name in ("one_batch", "eight_parts_of_one_batch"):
        out = str(tmp_path / name)
        args = ["--model", "test_cli_data_error:tiny_model", "--data", f"test_cli_data_error:{name}"]
        assert cli.main(["analyze", *args, *BUDGETS, "--data-error", "0.05", "--out", out]) == 0
        found[name] = results(out)["stages"]
    for stage, key in (("eigen", "data_stderr"), ("trace", "estimate")):
        a, b = (arr(found[name][stage]["result"][key]) for name in found)
        np.testing.assert_allclose(a, b, rtol=1e-8)
        assert np.all(a > 0)
    # the trace records the sub-batches' forms of its first 10 probes only (a quarter of 40 products), the
    # batches' of all: the same data error from fewer probes
    one, parts = (found[name]["trace"]["result"] for name in found)
    assert one["settings"]["data_error"]["probes"] == 10 < parts["settings"]["data_error"]["probes"]
    assert 0.5 < one["data_stderr"] / parts["data_stderr"] < 2


@pytest.mark.parametrize("args, message", [
    (["--model", "test_cli_data_error:tiny_model", "--data", "test_cli_data_error:one_sample"],
     "1 batch of 1 sample(s): let --data return more samples"),
    (["--samples", "1"], "1 batch of 1 sample(s): pass more samples"),
    (["--model", "test_cli_data_error:tiny_model", "--data", "test_cli_data_error:one_batch",
      "--loss", "test_cli_data_error:squared_mean_loss"],
     "cannot be split into sub-batches"),
])
def test_single_batch_is_refused_with_what_to_change(tmp_path, capsys, args, message):
    out = str(tmp_path / "bad")
    code = cli.main(["analyze", *args, "--data-error", "--epochs", "0", "--no-progress", "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not os.path.exists(out) or not os.listdir(out)


@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_bad_fraction(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--data-error", value, "--out", str(tmp_path / "n")])
    assert "--data-error" in capsys.readouterr().err


@pytest.mark.mpi
def test_two_mpi_ranks_give_one_process_data_errors(tmp_path):
    import shutil
    import subprocess
    import sys

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    pytest.importorskip("mpi4py")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    outs = {}
    for ranks in (1, 2):
        outs[ranks] = str(tmp_path / f"ranks{ranks}")
        p = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m", "specops", "analyze", *MODEL, *BUDGETS,
                            "--data-error", "--out", outs[ranks]], capture_output=True, text=True, timeout=180,
                           check=False, env=env)
        assert p.returncode == 0, p.stderr
    one, two = results(outs[1])["stages"], results(outs[2])["stages"]
    assert results(outs[2])["model"]["ranks"] == 2
    np.testing.assert_allclose(arr(two["eigen"]["result"]["data_stderr"]), arr(one["eigen"]["result"]["data_stderr"]),
                               rtol=1e-10)
    assert two["trace"]["result"]["data_stderr"] == pytest.approx(one["trace"]["result"]["data_stderr"], rel=1e-10)
    for stage in ("eigen", "trace"):
        assert two[stage]["data_target"]["samples_needed"] == one[stage]["data_target"]["samples_needed"]
        np.testing.assert_allclose(two[stage]["data_target"]["relative"], one[stage]["data_target"]["relative"],
                                   rtol=1e-10)
