"""specops study: the variants' architecture, the paper's schedule, the study end to end, resume, MPI, bad input."""

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn

import specops
from specops.cli import study
from specops.zoo.torch_resnet import VARIANTS, BasicBlock, resnet
from specops.zoo.train import fit, step_lr


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_remove_what_they_name(variant):
    _, bn, res = VARIANTS[variant]
    model = resnet(14, in_channels=1, width=4, variant=variant)
    assert isinstance(model.stem[1], nn.BatchNorm2d) == any(bn)
    for s in (1, 2, 3):
        stage = getattr(model, f"stage{s}")
        for i, block in enumerate(stage):
            assert isinstance(block, BasicBlock) and block.residual == res[s - 1]
            assert isinstance(block.bn1, nn.BatchNorm2d) == bn[s - 1]
            assert isinstance(block.bn2, nn.BatchNorm2d) == bn[s - 1]
            assert (block.conv1.bias is None) == bn[s - 1]
            projection = s > 1 and i == 0 and res[s - 1]
            assert isinstance(block.shortcut, nn.Sequential) == projection
            if projection:
                assert isinstance(block.shortcut[1], nn.BatchNorm2d) == bn[s - 1]
    names = [n for n, _ in model.named_parameters()]
    for s in (1, 2, 3):  # batch-norm parameters exist exactly in the stages that keep it
        assert any(n.startswith(f"stage{s}.") and ".bn1." in n for n in names) == bn[s - 1]


def test_block_without_residual_computes_the_plain_stack():
    torch.manual_seed(0)
    model = resnet(8, in_channels=1, width=4, variant="no-res-s2").eval()
    x = torch.randn(2, 4, 8, 8)
    plain, kept = model.stage2[0], model.stage1[0]
    relu = torch.relu
    expected = relu(plain.bn2(plain.conv2(relu(plain.bn1(plain.conv1(x))))))
    torch.testing.assert_close(plain(x), expected)
    with_skip = relu(kept.bn2(kept.conv2(relu(kept.bn1(kept.conv1(x))))) + x)
    torch.testing.assert_close(kept(x), with_skip)


def test_bad_variant_and_flags():
    with pytest.raises(ValueError, match="unknown variant"):
        resnet(8, variant="no-bn-s4")
    with pytest.raises(ValueError, match="three"):
        resnet(8, batch_norm=(True, False))


def test_step_schedule_and_exact_resume():
    assert [step_lr(0.1, e, 180) for e in (0, 79, 80, 119, 120, 179)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 40)

    def model():
        torch.manual_seed(0)
        return resnet(8, in_channels=1, width=2, num_classes=3)

    whole = model()
    fit(whole, X, y, epochs=4, lr=0.05, batch_size=16)
    import copy

    states = {}
    first = model()
    fit(first, X, y, epochs=4, lr=0.05, batch_size=16, on_epoch=lambda e, st: states.setdefault(e, copy.deepcopy(st)))
    resumed = model()
    fit(resumed, X, y, epochs=4, lr=0.05, batch_size=16, state=states[2])
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


TINY = ["--depths", "8", "--variants", "baseline,no-bn-s3", "--epochs", "2", "--lrs", "0.2,0.05",
        "--checkpoints", "0,2", "--width", "4", "--batch-size", "50", "--train-samples", "300",
        "--hessian-samples", "64", "--trace-matvecs", "8", "--stage-trace-matvecs", "6", "--esd-probes", "2",
        "--esd-steps", "8", "--landscape-steps", "3", "--threads", "1", "--no-progress", "--curvature", "hessian,ggn"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    assert study.main(TINY + ["--out", out]) == 0
    with open(os.path.join(out, "study.json")) as fh:
        return out, json.load(fh)


def test_study_end_to_end(tiny_study):
    out, data = tiny_study
    for name in ("summary.md", "trace.png", "top_eigenvalue.png", "stage_trace.png", "esd_d8.png",
                 "landscape_d8.png", "settings.json", "curvature.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert set(data["runs"]) == {"baseline_d8", "no-bn-s3_d8"}
    summary = open(os.path.join(out, "summary.md")).read()
    for name, r in data["runs"].items():
        sweep = {float(lr): v["test_accuracy"] for lr, v in r["sweep"].items()}
        assert r["test_accuracy"] == max(sweep.values()) and sweep[r["best_lr"]] == r["test_accuracy"]
        assert [c["step"] for c in r["checkpoints"]] == [0, 2]
        assert set(r["checkpoints"][-1]["blocks"]) == {"stage1", "stage2", "stage3"}
        for c in r["checkpoints"]:
            assert set(c["curvatures"]["ggn"]) >= {"eigenvalues", "residuals", "trace", "density"}
            assert c["residual"]["trace"]["stderr"] > 0
        log = specops.Tracker.load(os.path.join(out, "runs", name, "curvature.jsonl"))
        assert log.records == r["checkpoints"]
        assert f"{100 * r['test_accuracy']:.1f}" in summary
        res = r["checkpoints"][-1]["residual"]["trace"]
        assert f"{res['estimate']:.4g} +- {res['stderr']:.2g}" in summary
        last = r["checkpoints"][-1]  # the data's error beside the algorithm's (64 images split into 8 sub-batches)
        assert len(last["data_stderr"]) == 2 and all(x > 0 for x in last["data_stderr"])
        assert last["trace"]["data_stderr"] >= 0 and "data_stderr" not in res  # 0: the sub-batches spread less than 8 probes tell; H - G: no parts
        assert (f"{last['eigenvalues'][0]:.4g} +- {last['data_stderr'][0]:.2g} | {last['trace']['estimate']:.4g} +- "
                f"{last['trace']['stderr']:.2g} +- {last['trace']['data_stderr']:.2g}") in summary
        assert r["landscape"]["losses"]["__ndarray__"] and len(r["landscape"]["alphas"]["__ndarray__"]) == 3


def test_study_records_equal_independent_calls(tiny_study):
    """The final checkpoint's numbers, recomputed from its saved weights by the public API."""
    from specops.backends import torch as st
    from specops.zoo.data import digits

    out, data = tiny_study
    r = data["runs"]["no-bn-s3_d8"]
    model = resnet(8, in_channels=1, width=4, variant="no-bn-s3")
    ckpt = torch.load(os.path.join(out, "runs", "no-bn-s3_d8", f"lr{r['best_lr']:g}", "epoch0002.pt"),
                      weights_only=False)
    model.load_state_dict(ckpt["model"])
    model.eval()
    X, y = digits(seed=0)
    H = st.hessian(model, nn.CrossEntropyLoss(), (torch.from_numpy(X[:64]), torch.from_numpy(y[:64])))
    last = r["checkpoints"][-1]
    tr = specops.trace(H, max_matvecs=8, seed=0)
    assert last["trace"]["estimate"] == pytest.approx(tr.estimate, rel=1e-5)
    stage3 = specops.trace(H.restrict("stage3.*"), max_matvecs=6, seed=0)
    assert last["blocks"]["stage3"]["trace"]["estimate"] == pytest.approx(stage3.estimate, rel=1e-5)
    eig = specops.eigsh(H, k=2, tol=1e-3, seed=0, data_error=True)
    np.testing.assert_allclose(last["eigenvalues"], eig.eigenvalues, rtol=2e-3)
    # the tracker's eigenvectors are warm-started, these cold: the same to the tolerance, and so their spread
    np.testing.assert_allclose(last["data_stderr"], eig.data_stderr, rtol=0.05)
    data = specops.trace(H, max_matvecs=8, seed=0, data_error=True)
    assert last["trace"]["data_stderr"] == pytest.approx(data.data_stderr, rel=1e-4)
    G = st.ggn(model, nn.CrossEntropyLoss(), (torch.from_numpy(X[:64]), torch.from_numpy(y[:64])))
    ggn = last["curvatures"]["ggn"]
    np.testing.assert_allclose(ggn["eigenvalues"], specops.eigsh(G, k=2, tol=1e-3, seed=0).eigenvalues, rtol=2e-3)
    assert ggn["trace"]["estimate"] == pytest.approx(specops.trace(G, max_matvecs=8, seed=0).estimate, rel=1e-5)
    assert last["residual"]["trace"]["estimate"] == pytest.approx(
        specops.trace(H - G, max_matvecs=8, seed=0).estimate, rel=1e-4, abs=1e-6)
    assert ckpt["test_accuracy"] == r["test_accuracy"]


def test_study_resume(tiny_study, tmp_path):
    import shutil

    out, data = tiny_study
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    assert study.main(TINY + ["--out", copy]) == 2  # refuses to overwrite
    # a kill during the second run's training and the first run's tracking
    run = os.path.join(copy, "runs", "no-bn-s3_d8", "lr0.05")
    os.remove(os.path.join(run, "train.json"))
    os.remove(os.path.join(run, "epoch0002.pt"))
    log = os.path.join(copy, "runs", "baseline_d8", "curvature.jsonl")
    lines = open(log).read().splitlines(keepends=True)
    open(log, "w").write(lines[0] + lines[1][:20])
    os.remove(os.path.join(copy, "runs", "baseline_d8", "landscape.json"))
    os.remove(os.path.join(copy, "study.json"))
    assert study.main(TINY + ["--out", copy, "--resume"]) == 0
    again = json.load(open(os.path.join(copy, "study.json")))
    for name, r in data["runs"].items():
        r2 = again["runs"][name]
        assert r2["sweep"] == r["sweep"] and r2["best_lr"] == r["best_lr"]
        assert [c["step"] for c in r2["checkpoints"]] == [0, 2]
        for c, c2 in zip(r["checkpoints"], r2["checkpoints"]):
            assert c2["trace"]["estimate"] == pytest.approx(c["trace"]["estimate"], rel=1e-5)
    assert study.main(TINY + ["--out", copy, "--resume", "--epochs", "3"]) == 2  # other settings


@pytest.mark.parametrize("args, message", [
    (["--variants", "baseline,no-bn-s4"], "unknown variant"),
    (["--depths", "8,10"], "6n\\+2"),
    (["--data", "cifar10", "--data-dir", "{tmp}"], "data_batch_1.*test_batch|test_batch"),
    (["--data", "cifar100"], "needs --data-dir"),
    (["--data", "imagenet"], "choose one of"),
    (["--checkpoints", "5", "--epochs", "2"], "choose 1..2"),
    (["--lrs", "0.1,-1"], "positive"),
    (["--k", "1"], "top two eigenvectors"),
    (["--curvature", "hessian,gnn"], "unknown curvature 'gnn'; choose from hessian, ggn, empirical_fisher, mc_fisher"),
    (["--comm", "torch"], "--comm torch: no torch.distributed launch found.*torchrun"),
])
def test_bad_arguments_fail_before_training(args, message, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert study.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "specops study: error:" in err
    import re

    assert re.search(message, err), err
    assert not out.exists()  # nothing was written, nothing trained


def test_missing_cifar_names_the_files(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"")
    assert study.main(["--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    for f in ("data_batch_2", "data_batch_5"):
        assert f in err
    assert "data_batch_1," not in err


def test_cifar_pickles_are_read(tmp_path):
    """A fake CIFAR-10 folder in the python-pickle format: the study's loader reads it."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
    args = study.build_parser().parse_args(["--data", "cifar10", "--data-dir", str(tmp_path)])
    cfg = study.config_from_args(args)
    Xtr, ytr, Xte, yte, classes, channels = study.load_data(cfg)
    assert Xtr.shape == (20, 3, 32, 32) and Xte.shape == (4, 3, 32, 32) and classes == 10 and channels == 3


@pytest.mark.mpi
@pytest.mark.parametrize("split", ["runs", "data"])
def test_study_over_mpi_ranks_matches_one_process(tiny_study, tmp_path, split):
    """Runs spread over 2 ranks, or every run's Hessian samples split over them: one process's numbers."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
    from mpi_launch import launch

    out, data = tiny_study
    mpi_out = str(tmp_path / "mpi")
    run = launch(["-m", "specops.cli.study", *TINY, "--out", mpi_out, "--split", split], ranks=2, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    mpi = json.load(open(os.path.join(mpi_out, "study.json")))
    assert mpi["ranks"] == 2 and mpi["split"] == split
    for name, r in data["runs"].items():
        assert mpi["runs"][name]["sweep"] == r["sweep"]
        for c, c2 in zip(r["checkpoints"], mpi["runs"][name]["checkpoints"]):
            assert c2["trace"]["estimate"] == pytest.approx(c["trace"]["estimate"], rel=1e-5)
            np.testing.assert_allclose(c2["eigenvalues"], c["eigenvalues"], rtol=1e-4)
            for stage, b in c["blocks"].items():
                assert c2["blocks"][stage]["trace"]["estimate"] == pytest.approx(b["trace"]["estimate"], rel=1e-5)
        np.testing.assert_allclose(mpi["runs"][name]["landscape"]["losses"]["__ndarray__"],
                                   r["landscape"]["losses"]["__ndarray__"], rtol=1e-3)


def test_data_errors_are_on_unless_asked_off():
    on = study.config_from_args(study.build_parser().parse_args(TINY))
    off = study.config_from_args(study.build_parser().parse_args([*TINY, "--no-data-error"]))
    assert on.data_error and not off.data_error and off.to_dict()["data_error"] is False
