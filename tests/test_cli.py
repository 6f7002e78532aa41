"""``specops analyze`` end to end: the report's files, its numbers against the library's own
calls, resuming an interrupted run, and arguments that must fail before any computation."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from specops.backends import torch as st

import specops as so
from specops import cli

#: The default ResNet on digits with budgets small enough for a test.
TINY = ["--epochs", "1", "--samples", "64", "--top-k", "2", "--eig-matvecs", "80", "--trace-matvecs", "24",
        "--block-trace-matvecs", "9", "--esd-probes", "2", "--esd-steps", "8", "--blocks", "stem,head",
        "--landscape", "2d", "--landscape-steps", "3", "--threads", "1", "--no-progress"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, capsys=None):
    code = cli.main(["analyze", *args])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


def results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as fh:
        return json.load(fh)


def arr(x):
    return np.asarray(x["__ndarray__"]) if isinstance(x, dict) else np.asarray(x)


# --- a user model given as callables -----------------------------------------------------------
def tiny_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10)).double()


def tiny_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return [(X[:40] / 16.0, y[:40]), (X[40:70] / 16.0, y[40:70])]   # NumPy batches of unequal size


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "out")
    assert cli.main(["analyze", *TINY, "--out", out]) == 0
    return out


def _default_operator(out):
    model = cli.default_model(0)
    model.load_state_dict(torch.load(os.path.join(out, "model.pt"), weights_only=True))
    model.eval()
    Xtr, ytr, _, _ = cli.default_data(64, 0)
    return st.hessian(model, torch.nn.CrossEntropyLoss(), (torch.from_numpy(Xtr[:64]), torch.from_numpy(ytr[:64])))


def test_default_run_writes_the_report(default_run):
    for name in ("results.json", "esd.png", "landscape.png", "blocks.png", "summary.md", "report.html",
                 "model.pt"):
        path = os.path.join(default_run, name)
        assert os.path.getsize(path) > 0, name
    r = results(default_run)
    assert set(r["stages"]) == {"train", "eigen", "trace", "esd", "blocks", "landscape"}
    assert r["settings"]["seed"] == 0 and r["versions"]["torch"] == torch.__version__
    assert r["model"]["num_params"] == sum(p.numel() for p in cli.default_model().parameters())
    assert set(r["stages"]["blocks"]["result"]) == {"stem", "head"}
    for stage in ("eigen", "trace", "esd"):
        assert r["stages"][stage]["num_matvecs"] > 0 and r["stages"][stage]["seconds"] > 0
    eig = r["stages"]["eigen"]["result"]
    assert len(arr(eig["residuals"])) == 2 and "converged" in eig
    assert r["stages"]["trace"]["result"]["stderr"] >= 0
    with open(os.path.join(default_run, "summary.md")) as fh:
        md = fh.read()
    assert "![esd.png](esd.png)" in md and "eigenvalue 1" in md


def test_numbers_match_the_library_on_the_same_operator(default_run):
    r = results(default_run)
    H = _default_operator(default_run)
    assert H.loss_at() == pytest.approx(r["model"]["loss"], rel=1e-6)
    eig = so.eigsh(H, k=2, tol=1e-3, max_matvecs=80, seed=0)
    np.testing.assert_allclose(arr(r["stages"]["eigen"]["result"]["eigenvalues"]), eig.eigenvalues, rtol=1e-5)
    # and against an independent, much tighter solve: the reported eigenvalue is within its residual
    tight = so.eigsh(H, k=1, tol=1e-7, max_matvecs=400, seed=5)
    top = arr(r["stages"]["eigen"]["result"]["eigenvalues"])[0]
    assert abs(top - tight.eigenvalues[0]) <= arr(r["stages"]["eigen"]["result"]["residuals"])[0] + 1e-4 * top
    tr = so.trace(H, method="auto", max_matvecs=24, rtol=0.02, seed=0)
    assert r["stages"]["trace"]["result"]["estimate"] == pytest.approx(tr.estimate, rel=1e-5)
    d = so.spectral_density(H, num_probes=2, num_steps=8, seed=0)
    np.testing.assert_allclose(arr(r["stages"]["esd"]["result"]["nodes"]), d.nodes, rtol=1e-4, atol=1e-4)
    head = so.eigsh(H.restrict("head"), k=1, tol=1e-3, max_matvecs=80, seed=0)
    assert arr(r["stages"]["blocks"]["result"]["head"]["eigen"]["eigenvalues"])[0] == pytest.approx(
        head.eigenvalues[0], rel=1e-5)
    # one landscape point, recomputed from the saved eigenvectors
    ls = r["stages"]["landscape"]["result"]
    V = np.load(os.path.join(default_run, "eigenvectors.npy"))
    a, b = arr(ls["alphas"])[0], arr(ls["betas"])[2]
    delta = torch.from_numpy(V[:, 0] * a + V[:, 1] * b).float()
    assert arr(ls["losses"])[0, 2] == pytest.approx(H.loss_at(delta), rel=1e-5)


def test_resume_after_a_killed_run_skips_finished_stages(default_run, tmp_path):
    out = str(tmp_path / "killed")
    slow = [*TINY, "--landscape-steps", "151", "--out", out]      # a landscape of 22801 losses
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "specops", "analyze", *slow], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(os.path.join(out, "results.json")) and "blocks" in results(out)["stages"]:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("the run did not reach the landscape stage")
    finally:
        proc.kill()
        proc.wait()
    before = results(out)
    assert "landscape" not in before["stages"]
    code = cli.main(["analyze", *TINY, "--out", out, "--resume"])
    assert code == 0
    after = results(out)
    for stage in ("train", "eigen", "trace", "esd", "blocks"):
        assert after["stages"][stage]["finished"] == before["stages"][stage]["finished"], stage
    assert arr(after["stages"]["landscape"]["result"]["losses"]).shape == (3, 3)
    # the resumed run reproduces the uninterrupted one
    ref = results(default_run)
    np.testing.assert_array_equal(arr(after["stages"]["eigen"]["result"]["eigenvalues"]),
                                  arr(ref["stages"]["eigen"]["result"]["eigenvalues"]))
    np.testing.assert_allclose(arr(after["stages"]["landscape"]["result"]["losses"]),
                               arr(ref["stages"]["landscape"]["result"]["losses"]), rtol=1e-6)


def test_partial_stages_then_resume_and_refusals(tmp_path, capsys):
    out = str(tmp_path / "partial")
    user = ["--model", "test_cli:tiny_model", "--data", "test_cli:tiny_data", "--top-k", "2", "--esd-steps", "6",
            "--esd-probes", "2", "--landscape", "1d", "--landscape-directions", "filter", "--landscape-steps", "5",
            "--trace-matvecs", "30", "--block-trace-matvecs", "9", "--no-progress", "--out", out]
    assert run([*user, "--stages", "eigen,trace"])[0] == 0
    first = results(out)
    assert set(first["stages"]) == {"eigen", "trace"}
    # the same --out without --resume is refused rather than overwritten
    code, io = run(user, capsys)
    assert code == 2 and "--resume" in io.err
    assert run([*user, "--resume"])[0] == 0
    second = results(out)
    assert second["stages"]["eigen"]["finished"] == first["stages"]["eigen"]["finished"]
    assert {"esd", "blocks", "landscape"} <= set(second["stages"])
    assert set(second["stages"]["blocks"]["result"]) == {"0", "2"}       # auto: top-level modules
    # the user model's Hessian (float64, two unequal NumPy batches) against the library directly
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in tiny_data()]
    H = st.hessian(tiny_model(), torch.nn.CrossEntropyLoss(), data)
    dense = np.linalg.eigvalsh(H.to_dense())[::-1][:2]
    np.testing.assert_allclose(arr(second["stages"]["eigen"]["result"]["eigenvalues"]), dense, rtol=1e-6)
    # resuming with another model or data is refused
    code, io = run([*user, "--resume", "--loss", "mse"], capsys)
    assert code == 2 and "another model or data" in io.err


def test_checkpoint_of_the_user_model(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    model = tiny_model()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    torch.save({"state_dict": model.state_dict()}, path)
    out = str(tmp_path / "ck")
    assert cli.main(["analyze", "--model", "test_cli:tiny_model", "--data", "test_cli:tiny_data", "--checkpoint",
                     path, "--stages", "eigen", "--top-k", "1", "--no-progress", "--out", out]) == 0
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in tiny_data()]
    dense = np.linalg.eigvalsh(st.hessian(model, torch.nn.CrossEntropyLoss(), data).to_dense())[-1]
    assert arr(results(out)["stages"]["eigen"]["result"]["eigenvalues"])[0] == pytest.approx(dense, rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--blocks", "stage9"], "unknown block 'stage9'"),
    (["--blocks", "stages", "--model", "test_cli:tiny_model", "--data", "test_cli:tiny_data"], "needs a ResNet"),
    (["--landscape", "2d", "--top-k", "1"], "--top-k >= 2"),
    (["--model", "no_such_module:f", "--data", "test_cli:tiny_data"], "cannot import module"),
    (["--model", "test_cli:tiny_model"], "--model needs --data"),
    (["--stages", "eigen,spectrum"], "unknown stage 'spectrum'"),
    (["--backend", "jax"], "--backend jax needs"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bad_arguments_fail_before_any_computation(tmp_path, capsys, extra, message):
    out = str(tmp_path / "bad")
    t0 = time.perf_counter()
    code, io = run([*extra, "--out", out, "--no-progress"], capsys)
    assert code == 2
    assert message in io.err, io.err
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert not os.path.exists(os.path.join(out, "model.pt"))        # no training happened
    assert not os.path.exists(out)                                  # nor an empty folder left behind
    assert time.perf_counter() - t0 < 20


def test_checkpoint_that_does_not_match_the_model(tmp_path, capsys):
    path = str(tmp_path / "other.pt")
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    code, io = run(["--checkpoint", path, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not match the model" in io.err and "Missing key" in io.err
    code, io = run(["--checkpoint", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in io.err


def test_unwritable_out_and_bad_numbers(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, io = run(["--out", str(blocker / "sub")], capsys)
    assert code == 2 and "not writable" in io.err
    for bad, message in ((["--top-k", "0"], "must be >= 1"), (["--trace-rtol", "-0.1"], "must be > 0"),
                         (["--esd-steps", "many"], "expected an integer"), (["--landscape-span", "nan"], "finite"),
                         (["--landscape", "3d"], "invalid choice")):
        with pytest.raises(SystemExit) as e:
            cli.main(["analyze", *bad, "--out", str(tmp_path / "n")])
        assert e.value.code == 2
        assert message in capsys.readouterr().err, bad


def test_console_script_and_module_entry_point():
    exe = shutil.which("specops", path=os.path.dirname(sys.executable))
    assert exe is not None, "the console script is missing: pip install -e ."
    for cmd in ([exe, "analyze", "--help"], [sys.executable, "-m", "specops", "analyze", "--help"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
        assert p.returncode == 0 and "--trace-rtol" in p.stdout and "--landscape" in p.stdout


def test_mpi_detection_keeps_single_process_runs_free_of_mpi4py():
    assert cli.launched_size({}) == 1
    assert cli.launched_size({"PMI_SIZE": "4"}) == 4
    assert cli.launched_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    code = ("import sys; from specops import cli; c = cli.detect_comm(); "
            "assert c.size == 1 and 'mpi4py' not in sys.modules, sys.modules.keys()")
    env = {k: v for k, v in os.environ.items() if k not in cli.MPI_SIZE_VARS}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


@pytest.mark.mpi
def test_mpiexec_two_ranks_shard_the_data_and_rank0_writes(tmp_path, default_run):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    pytest.importorskip("mpi4py")
    out = str(tmp_path / "mpi")
    args = [a for a in TINY]
    args[args.index("--epochs") + 1] = "1"
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "specops", "analyze", *args, "--stages",
                        "eigen,trace", "--out", out], capture_output=True, text=True, timeout=180, check=False,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("eigenvalue 1") == 1                  # rank 0 alone prints the table
    r = results(out)
    assert r["model"]["ranks"] == 2 and r["model"]["num_samples"] == 64
    ref = results(default_run)
    assert r["model"]["loss"] == pytest.approx(ref["model"]["loss"], rel=1e-5)
    np.testing.assert_allclose(arr(r["stages"]["eigen"]["result"]["eigenvalues"]),
                               arr(ref["stages"]["eigen"]["result"]["eigenvalues"]), rtol=1e-3)


# --- other frameworks: the same report from a JAX or Keras model ---------------------------------
def jax_model():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    params = {"dense": {"w": jnp.asarray(rng.standard_normal((64, 10)) * 0.1, dtype=jnp.float32)},
              "bias": jnp.zeros(10, dtype=jnp.float32)}
    return (lambda p, x: x @ p["dense"]["w"] + p["bias"]), params


def float_data():
    return [(x.astype(np.float32), y) for x, y in tiny_data()]


def keras_model():
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(10)])
    return model


@pytest.mark.parametrize("backend, model", [("jax", "test_cli:jax_model"), ("tensorflow", "test_cli:keras_model")])
def test_other_backends_match_a_dense_softmax_hessian(tmp_path, backend, model):
    pytest.importorskip(backend)
    from numpy_models import SoftmaxRegression

    out = str(tmp_path / backend)
    assert cli.main(["analyze", "--backend", backend, "--model", model, "--data", "test_cli:float_data",
                     "--stages", "eigen,trace,landscape", "--top-k", "2", "--eig-tol", "1e-5",
                     "--landscape", "1d", "--landscape-steps", "3", "--trace-matvecs", "30",
                     "--no-progress", "--out", out]) == 0
    r = results(out)
    # independent truth: softmax regression's closed-form Hessian, with the bias as a constant feature
    if backend == "jax":
        _, params = jax_model()
        W, b = np.asarray(params["dense"]["w"], np.float64), np.asarray(params["bias"], np.float64)
    else:
        k = keras_model()
        W, b = (np.asarray(v, np.float64) for v in k.layers[-1].get_weights())
    X = np.vstack([x for x, _ in tiny_data()])
    X1 = np.hstack([X, np.ones((len(X), 1))])
    theta = np.vstack([W, b[None]]).ravel()
    dense = np.linalg.eigvalsh(SoftmaxRegression(65, 10).dense_hessian(theta, X1))
    np.testing.assert_allclose(arr(r["stages"]["eigen"]["result"]["eigenvalues"]), dense[::-1][:2], rtol=1e-3)
    assert r["stages"]["trace"]["result"]["estimate"] == pytest.approx(dense.sum(), rel=0.05)
    assert r["model"]["num_params"] == 650


def test_progress_bars_on_stderr_unless_no_progress(tmp_path, capsys):
    user = ["--model", "test_cli:tiny_model", "--data", "test_cli:tiny_data", "--stages", "eigen,trace,esd,blocks",
            "--top-k", "1", "--trace-matvecs", "12", "--esd-probes", "1", "--esd-steps", "4",
            "--block-trace-matvecs", "6"]
    code, io = run([*user, "--out", str(tmp_path / "bars")], capsys)
    assert code == 0
    r = results(str(tmp_path / "bars"))
    for label, stage in (("top eigenvalues", "eigen"), ("trace", "trace"), ("spectral density", "esd")):
        n = r["stages"][stage]["num_matvecs"]
        final = [s for s in io.err.replace("\r", "\n").splitlines() if s.startswith(label + ": 100%")]
        assert final and f"{n}/{n}" in final[-1], (label, io.err)
    trace = r["stages"]["trace"]["result"]
    assert f"trace={trace['estimate']:.4g}, stderr={trace['stderr']:.4g}" in io.err
    assert "block 0: top: 100%" in io.err and "block 2: trace: 100%" in io.err
    code, io = run([*user, "--no-progress", "--out", str(tmp_path / "quiet")], capsys)
    assert code == 0 and io.err == ""


# --- user errors: exit status 2, the message alone, nothing left that blocks a rerun ---------------
class TupleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10).double()

    def forward(self, x):
        return self.layer(x), x


def tuple_model():
    return TupleModel()


def bare_tensor_data():
    return torch.from_numpy(tiny_data()[0][0])


def nan_data():
    (X, y), rest = tiny_data()[0], tiny_data()[1:]
    X = X.copy()
    X[3, 5] = np.nan
    return [(X, y), *rest]


def one_argument_loss(outputs):
    return outputs.sum()


USER = ["--model", "test_cli:tiny_model", "--data", "test_cli:tiny_data"]


@pytest.mark.parametrize("args, message", [
    (["--model", "test_cli:tuple_model", "--data", "test_cli:tiny_data"], "the model's outputs (a tuple)"),
    (["--model", "test_cli:tiny_model", "--data", "test_cli:bare_tensor_data"], "must be a pair (inputs, targets)"),
    ([*USER, "--loss", "test_cli:one_argument_loss"], "takes 1 positional argument but 2 were given"),
    ([*USER, "--top-k", "461"], "--top-k 461: the model has only 460 parameters"),
    (["--model", "test_cli:tiny_model", "--data", "test_cli:nan_data"], "loss is not finite for batch 0"),
])
def test_user_errors_end_with_status_2_and_the_message_alone(tmp_path, capsys, args, message):
    out = str(tmp_path / "bad")
    code, io = run([*args, "--no-progress", "--out", out], capsys)
    assert code == 2, io.err
    assert message in io.err and "Traceback" not in io.err, io.err
    errors = [line for line in io.err.splitlines() if line.startswith("specops analyze: error:")]
    assert len(errors) == 1, io.err
    assert not os.path.exists(out), os.listdir(out)        # nothing that blocks the rerun
    code, io = run([*args, "--no-progress", "--out", out, "--debug"], capsys)
    assert code == 2 and "Traceback" in io.err and message in io.err


def test_a_failed_run_does_not_block_its_rerun(tmp_path, capsys):
    out = tmp_path / "rerun"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    code, io = run([*USER, "--top-k", "1000", "--stages", "eigen", "--no-progress", "--out", str(out)], capsys)
    assert code == 2 and "--top-k 1000" in io.err
    assert sorted(os.listdir(out)) == ["notes.txt"]             # the folder it did not create is kept
    code, io = run([*USER, "--top-k", "1", "--stages", "eigen", "--no-progress", "--out", str(out)], capsys)
    assert code == 0, io.err


def test_trace_short_of_its_target_is_flagged_everywhere(tmp_path, capsys):
    out = str(tmp_path / "short")
    code, io = run([*USER, "--stages", "trace", "--trace-matvecs", "12", "--trace-rtol", "1e-4", "--out", out,
                    "--no-progress"], capsys)
    assert code == 0
    st_ = results(out)["stages"]["trace"]
    reached = st_["result"]["stderr"] / abs(st_["result"]["estimate"])          # recomputed here
    assert st_["target"] == {"target_rtol": 1e-4, "reached_rtol": pytest.approx(reached), "met": False}
    assert reached > 1e-4
    from specops.cli import report

    row = next(r for r in report.summary_rows(results(out)) if r[0] == "trace")
    flag = f"{100 * reached:.3g} % relative; target 0.01 %"
    assert row[3] == "NO" and flag in row[2]
    assert "short of --trace-rtol 0.0001" in io.out and flag in io.out
    for name in ("summary.md", "report.html"):
        with open(os.path.join(out, name)) as fh:
            text = fh.read()
        assert flag in text and "Stopped at the product budget" in text, name
    # a target that is reached says so
    out = str(tmp_path / "met")
    assert run([*USER, "--stages", "trace", "--trace-matvecs", "12", "--trace-rtol", "0.9", "--out", out,
                "--no-progress"], capsys)[0] == 0
    st_ = results(out)["stages"]["trace"]
    assert st_["target"]["met"] is True
    assert next(r for r in report.summary_rows(results(out)) if r[0] == "trace")[3] == "yes"


def test_reading_of_the_numbers_against_dense_eigenvalues(tmp_path, capsys):
    out = str(tmp_path / "reading")
    code, io = run([*USER, "--stages", "eigen,esd", "--top-k", "1", "--esd-probes", "4", "--esd-steps", "30",
                    "--learning-rate", "0.5", "--momentum", "0.5", "--out", out, "--no-progress"], capsys)
    assert code == 0
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in tiny_data()]
    lam = np.linalg.eigvalsh(st.hessian(tiny_model(), torch.nn.CrossEntropyLoss(), data).to_dense())
    from specops.cli import report

    r = results(out)
    notes = report.reading(r)
    negative, lowest, stability = notes[:3]
    # the fraction and its bracket, from the nodes and weights directly; the dense truth inside the bracket
    nodes, weights = arr(r["stages"]["esd"]["result"]["nodes"]), arr(r["stages"]["esd"]["result"]["weights"])
    per_probe = np.sum(weights * (nodes <= 0), axis=1)
    assert f"{100 * per_probe.mean():.3g} % ± {100 * per_probe.std(ddof=1) / 2:.3g} %" in negative
    f = so.SpectralDensity.from_dict(r["stages"]["esd"]["result"]).negative_fraction()
    truth = np.mean(lam <= 0)
    assert f.lower - 3 * f.stderr <= truth <= f.upper + 3 * f.stderr
    # the smallest Ritz value bounds the most negative eigenvalue from above
    assert lam.min() < 0 and lam.min() <= nodes[weights > 0].min() + 1e-8
    assert f"at most {nodes[weights > 0].min():.4g}" in lowest
    top = lam.max()
    assert "2 (1 + momentum) / learning rate = 6 " in stability and f"{top:.4g}" in stability
    assert ("below" if top < 6 else "above") in stability
    assert negative in io.out


def test_report_files_follow_the_umask(tmp_path):
    from specops import io as report  # the atomic writes of every file specops writes

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            path = tmp_path / f"f{mask:o}.html"
            report.atomic_write(str(path), "x")
        finally:
            os.umask(old)
        assert (os.stat(path).st_mode & 0o777) == mode, (oct(mask), oct(os.stat(path).st_mode))


def test_version_and_help():
    p = subprocess.run([sys.executable, "-m", "specops", "--version"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, check=False)
    assert p.returncode == 0 and p.stdout.strip() == f"specops {so.__version__}"
    analyze = cli.build_parser()._subparsers._group_actions[0].choices["analyze"]
    flat = " ".join(analyze.format_help().split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "(default: 0.02)" in flat and "(default: 512)" in flat
    formatter = cli.HelpFormatter("specops")
    for action in analyze._actions:            # each option states its default once at most
        assert formatter._get_help_string(action).count("default:") <= 1, action.option_strings
    backend = flat.split("--backend {torch,jax,tensorflow}")[2]
    assert backend.lstrip().startswith("the framework of --model")
    assert "--debug" in flat


def test_settings_and_stages_that_did_not_run(default_run):
    with open(os.path.join(default_run, "report.html")) as fh:
        text = fh.read()
    assert "<td>model</td><td>the default: ResNet-8 trained on digits</td>" in text
    assert ">None<" not in text
    r = results(default_run)
    assert "curvature" not in r["settings"]["stages"].split(",")
    for row in __import__("specops.cli.report").cli.report.summary_rows(r):
        assert row[5] != "", row


def test_a_run_failing_after_finished_stages_keeps_them_for_resume(tmp_path, capsys, monkeypatch):
    from specops.cli.analyze import trace as trace_stage
    from specops.operator import NonFiniteError

    def fail(ctx):
        raise NonFiniteError("a product returned NaN (planted)")

    monkeypatch.setattr(trace_stage, "run", fail)
    out = str(tmp_path / "kept")
    code, io = run([*USER, "--stages", "eigen,trace", "--top-k", "1", "--no-progress", "--out", out], capsys)
    assert code == 2 and "Traceback" not in io.err
    assert "a product returned NaN (planted)" in io.err and "rerun with --resume" in io.err
    assert set(results(out)["stages"]) == {"eigen"}
    monkeypatch.undo()
    code, io = run([*USER, "--stages", "eigen,trace", "--top-k", "1", "--no-progress", "--out", out, "--resume"],
                   capsys)
    assert code == 0 and "eigen: finished earlier, skipped" in io.out
    assert set(results(out)["stages"]) == {"eigen", "trace"}
