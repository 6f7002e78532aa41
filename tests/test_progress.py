"""Progress bars (specops.progress, tqdm): drawn when asked, with the products and the current
estimate; silent when not asked and on MPI ranks other than 0; the numbers never change."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import specops as so
from specops import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def matrix(n=120, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[40.0, 30.0, 20.0], rng.uniform(-1, 1, n - 3)])
    return (Q * lam) @ Q.T


def last_state(err: str, label: str) -> str:
    """The last redraw of the bar labelled ``label`` (tqdm redraws with carriage returns)."""
    lines = [s for s in re.split(r"[\r\n]", err) if s.startswith(label + ":")]
    assert lines, f"no bar {label!r} in {err!r}"
    return lines[-1]


def test_eigsh_bar_shows_products_and_the_ritz_values(capsys):
    M = matrix()
    quiet = so.eigsh(M, k=2, tol=1e-8, max_matvecs=300)
    assert capsys.readouterr().err == ""
    r = so.eigsh(M, k=2, tol=1e-8, max_matvecs=300, progress=True)
    line = last_state(capsys.readouterr().err, "eigsh")
    np.testing.assert_array_equal(r.eigenvalues, quiet.eigenvalues)
    assert r.num_matvecs == quiet.num_matvecs
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(M)[::-1][:2], rtol=1e-8)
    # converged under its budget: a full bar at the products used, the eigenvalues and the residual
    assert "100%" in line and f"{r.num_matvecs}/{r.num_matvecs}" in line, line
    assert f"eigenvalues=[{r.eigenvalues[0]:.4g}, {r.eigenvalues[1]:.4g}]" in line, line
    assert f"residual={r.residuals.max():.4g}" in line, line


def test_trace_bar_shows_the_running_estimate_and_its_error(capsys, monkeypatch):
    M = matrix()
    shown = []
    show = progress.Bar.show
    monkeypatch.setattr(progress.Bar, "show", lambda self, **v: (shown.append(v), show(self, **v)))
    for method in ("hutchinson", "xtrace", "hutch++"):   # xtrace with rtol: it grows its sketch in rounds
        shown.clear()
        kw = dict(method=method, max_matvecs=60, seed=1, rtol=1e-9 if method == "xtrace" else None)
        quiet = so.trace(M, **kw)
        r = so.trace(M, **kw, progress=f"tr {method}")
        err = capsys.readouterr().err
        assert (r.estimate, r.stderr, r.num_matvecs) == (quiet.estimate, quiet.stderr, quiet.num_matvecs)
        line = last_state(err, f"tr {method}")
        assert f"trace={r.estimate:.4g}, stderr={r.stderr:.4g}" in line, line
        assert f"{r.num_matvecs}/{r.num_matvecs}" in line
        # the running estimate was shown as it changed (a log file redraws every 5 s only)
        assert len({v["trace"] for v in shown}) > 1 and shown[-1]["trace"] == r.estimate, shown


def test_density_and_landscape_bars(capsys):
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    M = matrix()
    d = so.spectral_density(M, num_probes=3, num_steps=10, seed=0, progress=True)
    line = last_state(capsys.readouterr().err, "spectral_density")
    assert "30/30" in line and f"trace={d.trace()[0]:.4g}" in line, line

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    H = st.hessian(model, torch.nn.CrossEntropyLoss(), (X, y))
    quiet = so.landscape(H, "random-1d", steps=5, seed=0)
    assert capsys.readouterr().err == ""
    ls = so.landscape(H, "random-1d", steps=5, seed=0, progress=True)
    line = last_state(capsys.readouterr().err, "landscape")
    np.testing.assert_array_equal(ls.losses, quiet.losses)
    assert "6/6" in line and "losses" in line and f"max={ls.losses.max():.4g}" in line, line


def test_torch_hessian_bar_counts_batches_not_raw_lines(capsys):
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in range(3)]
    loss = torch.nn.CrossEntropyLoss()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    quiet = st.hessian(model, loss, data) @ V
    assert capsys.readouterr().err == ""
    H = st.hessian(model, loss, data, progress="H of the MLP")
    capsys.readouterr()  # construction checks evaluate batches too
    done = H.adapter._bar.count
    torch.testing.assert_close(H @ V, quiet, rtol=0, atol=0)  # the numbers never change
    err = capsys.readouterr().err
    assert "specops: product" not in err  # no raw lines: a specops.progress bar (tqdm)
    assert H.adapter._bar.count == done + 3, H.adapter._bar.count  # one product block: three batches
    H.adapter._bar.close()
    line = last_state(err + capsys.readouterr().err, "H of the MLP")
    assert f"{done + 3} batches" in line and "batch=3" in line, line


def test_silent_on_other_ranks_and_bad_values(capsys, monkeypatch):
    M = matrix(40)

    class Rank1:
        rank = 1

    assert not progress.bar(True, 10, "x", comm=Rank1()).enabled
    with progress.bar(True, 10, "x", comm=type("Rank0", (), {"rank": 0})()) as b:
        assert b.enabled
    capsys.readouterr()
    monkeypatch.setenv("PMI_RANK", "1")
    so.eigsh(M, k=1, progress=True)
    so.trace(M, max_matvecs=20, progress=True)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("PMI_RANK", "0")
    so.trace(M, max_matvecs=20, progress=True)
    assert "trace" in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress must be True, False or a label"):
        so.trace(M, max_matvecs=20, progress=3)


@pytest.mark.mpi
def test_mpiexec_two_ranks_draw_one_bar(tmp_path):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    script = tmp_path / "bars.py"
    script.write_text("import numpy as np, specops as so\n"
                      "M = np.diag(np.arange(1.0, 51.0))\n"
                      "r = so.trace(M, method='hutchinson', max_matvecs=20, progress=True)\n")
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, check=False, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    finals = [s for s in re.split(r"[\r\n]", p.stderr) if s.startswith("trace: 100%")]
    assert len(finals) == 1, p.stderr      # rank 0's bar alone, closed once
