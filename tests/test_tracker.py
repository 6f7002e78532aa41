"""specops.Tracker: records against independent calls and dense truth, warm starts, resume, callbacks."""

import json
import os

import numpy as np
import pytest

import specops
from specops.tracker import TrackerLog


def _spectrum_matrix(n, top, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    d = np.concatenate([top, rng.uniform(-1, 1, size=n - len(top))])
    return (Q * d) @ Q.T


class Drifting:
    """A matrix that moves by ``scale * t * E`` at step ``t``, counting its constructions."""

    def __init__(self, n=1500, scale=1e-2, seed=0):
        self.A0 = _spectrum_matrix(n, [50.0, 40.0, 30.0, 20.0], seed)
        E = np.random.default_rng(seed + 1).normal(size=(n, n))
        self.E = (E + E.T) / (2 * np.sqrt(n))
        self.scale, self.t, self.calls = scale, 0, 0

    def dense(self):
        return self.A0 + self.scale * self.t * self.E

    def __call__(self):
        self.calls += 1
        return specops.aslinearoperator(self.dense())


OPTS = dict(trace_options=dict(max_matvecs=40), density_options=dict(num_probes=3, num_steps=20))


def test_records_equal_independent_calls(tmp_path):
    op = Drifting(n=300)
    tracker = specops.Tracker(op, tmp_path / "c.jsonl", k=3, seed=7, warm_start=False, **OPTS)
    for t in range(2):
        op.t = t
        rec = tracker.update(t)
        A = op()
        eig = specops.eigsh(A, k=3, seed=7)
        tr = specops.trace(A, max_matvecs=40, seed=7)
        esd = specops.spectral_density(A, num_probes=3, num_steps=20, seed=7)
        np.testing.assert_array_equal(rec["eigenvalues"], eig.eigenvalues)
        np.testing.assert_array_equal(rec["residuals"], eig.residuals)
        assert rec["trace"]["estimate"] == tr.estimate and rec["trace"]["stderr"] == tr.stderr
        np.testing.assert_array_equal(rec["density"]["nodes"], esd.nodes)
        np.testing.assert_array_equal(rec["density"]["weights"], esd.weights)
        assert rec["num_matvecs"] == eig.num_matvecs + tr.num_matvecs + esd.num_matvecs
        truth = np.linalg.eigvalsh(op.dense())
        np.testing.assert_allclose(rec["eigenvalues"], truth[::-1][:3], rtol=1e-6)
    # the log holds the same records, in plain JSON
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == tracker.records
    assert set(tracker.records[0]) >= {"step", "eigenvalues", "residuals", "trace", "density", "num_matvecs",
                                       "seconds"}


def test_warm_start_saves_products():
    """Weights that moved little: the warm start takes >= 30% fewer eigenvalue products."""
    cold_op, warm_op = Drifting(), Drifting()
    cold = specops.Tracker(cold_op, k=3, metrics=("eigenvalues",), warm_start=False)
    warm = specops.Tracker(warm_op, k=3, metrics=("eigenvalues",))
    for t in range(3):
        cold_op.t = warm_op.t = t
        c, w = cold.update(t), warm.update(t)
        truth = np.linalg.eigvalsh(warm_op.dense())[::-1][:3]
        np.testing.assert_allclose(w["eigenvalues"], truth, rtol=1e-6)
        assert all(w["converged"])
        if t > 0:
            assert w["warm_start"] == {"operator": True}
            assert w["num_matvecs"] <= 0.7 * c["num_matvecs"], (w["num_matvecs"], c["num_matvecs"])


def test_resume_after_interrupted_run(tmp_path):
    path = tmp_path / "c.jsonl"
    op = Drifting(n=1200, scale=1e-3)
    tracker = specops.Tracker(op, path, k=2, **OPTS)
    for t in range(2):
        op.t = t
        tracker.update(t)
    with open(path, "ab") as fh:  # a crash while writing step 2's line
        fh.write(b'{"step": 2, "eigenv')
    assert [r["step"] for r in TrackerLog.read(path).records] == [0, 1]
    with pytest.raises(FileExistsError, match="resume=True"):
        specops.Tracker(op, path, k=2)
    op2 = Drifting(n=1200, scale=1e-3)
    resumed = specops.Tracker(op2, path, k=2, resume=True, **OPTS)
    assert resumed.steps == [0, 1] and resumed.done(1)
    assert resumed.update(1) == tracker.records[1] and op2.calls == 0   # finished steps are not recomputed
    op2.t = 2
    rec = resumed.update(2)
    assert rec["warm_start"] == {"operator": True}    # from <path>.vectors.npz
    np.testing.assert_allclose(rec["eigenvalues"], np.linalg.eigvalsh(op2.dense())[::-1][:2], rtol=1e-6)
    log = specops.Tracker.load(path)
    assert list(log.steps) == [0, 1, 2]
    steps, est, err = log.traces()
    assert list(steps) == [0, 1, 2] and np.all(err > 0)
    assert est[2] == rec["trace"]["estimate"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown metric"):
        specops.Tracker(lambda: None, metrics=("eigenvalue",))
    with pytest.raises(ValueError, match="seed"):
        specops.Tracker(lambda: None, trace_options=dict(seed=1))
    with pytest.raises(TypeError, match="callable"):
        specops.Tracker(np.eye(3))


torch = pytest.importorskip("torch")


def _torch_problem():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    return model, nn.CrossEntropyLoss(), (X, y)


def _dense_hessian(model, loss_fn, batch, names):
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        pieces = flat.split([params[n].numel() for n in names])
        state = {n: p.detach() for n, p in params.items()}
        state.update({n: t.reshape(params[n].shape) for n, t in zip(names, pieces)})
        return loss_fn(torch.func.functional_call(model, state, (batch[0],)), batch[1])

    return torch.func.hessian(f)(theta).numpy()


def test_blocks_against_dense_truth(tmp_path):
    from specops.backends import torch as st

    model, loss_fn, batch = _torch_problem()
    tracker = specops.Tracker(lambda: st.hessian(model, loss_fn, batch), tmp_path / "c.jsonl", k=2,
                              blocks={"first": "0.*", "last": "2.*"}, metrics=("eigenvalues", "trace"),
                              trace_options=dict(max_matvecs=100), progress=True)
    rec = tracker.update(0)
    for name, prefix in (("first", "0."), ("last", "2.")):
        names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        dense = _dense_hessian(model, loss_fn, batch, names)
        b = rec["blocks"][name]
        np.testing.assert_allclose(b["trace"]["estimate"], np.trace(dense), rtol=1e-8)  # XTrace exact: 2n <= 100
        np.testing.assert_allclose(b["eigenvalues"], np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-6)
    full = _dense_hessian(model, loss_fn, batch, [n for n, _ in model.named_parameters()])
    np.testing.assert_allclose(rec["eigenvalues"], np.linalg.eigvalsh(full)[::-1][:2], rtol=1e-6)
    log = specops.Tracker.load(tmp_path / "c.jsonl")
    assert log.blocks == ["first", "last"]
    assert log.traces("last")[1][0] == rec["blocks"]["last"]["trace"]["estimate"]


def test_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    op = Drifting(n=300)
    tracker = specops.Tracker(op, tmp_path / "c.jsonl", k=2, **OPTS)
    for t in range(3):
        op.t = t
        tracker.update(t, info={"loss": 1.0 / (t + 1)})
    log = specops.Tracker.load(tmp_path / "c.jsonl")
    fig = log.plot(tmp_path / "log.png")
    assert len(fig.axes) == 3 and os.path.getsize(tmp_path / "log.png") > 0
    ax = fig.axes[0]
    assert ax.get_ylabel().startswith("trace")
    np.testing.assert_allclose(log.top_eigenvalues()[1][:, 0], [r["eigenvalues"][0] for r in tracker.records])
    assert log.records[2]["info"] == {"loss": 1.0 / 3}


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torch import nn

    from specops.backends import torch as st
    from specops.callbacks.lightning import TrackerCallback

    model, loss_fn, batch = _torch_problem()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, b, i):
            loss = loss_fn(self.net(b[0]), b[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=10)
    tracker = specops.Tracker(lambda: st.hessian(model, loss_fn, batch), tmp_path / "c.jsonl", k=2,
                              metrics=("eigenvalues",))
    cb = TrackerCallback(tracker, every=2)
    trainer = pl.Trainer(max_epochs=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), loader)
    assert [r["step"] for r in cb.records] == [2, 4]
    assert "train_loss" in cb.records[-1]["info"]
    dense = _dense_hessian(model, loss_fn, batch, [n for n, _ in model.named_parameters()])
    np.testing.assert_allclose(cb.records[-1]["eigenvalues"], np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-6)
    assert isinstance(model, nn.Module)


def test_keras_callback(tmp_path):
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    from specops.backends import tensorflow as stf
    from specops.callbacks.keras import TrackerCallback

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 4))
    y = rng.integers(0, 3, size=32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh", dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    tracker = specops.Tracker(lambda: stf.hessian(model, loss, (X, y)), tmp_path / "c.jsonl", k=2,
                              metrics=("eigenvalues", "trace"), trace_options=dict(max_matvecs=100))
    cb = TrackerCallback(tracker, every=2, at_start=True)
    model.fit(X, y, epochs=4, batch_size=32, verbose=0, shuffle=False, callbacks=[cb])
    assert [r["step"] for r in cb.records] == [0, 2, 4]
    assert cb.records[-1]["info"]["loss"] > 0
    # truth: the dense Hessian of the trained model's loss, by TensorFlow's own autodiff
    weights = model.trainable_variables
    n = sum(int(np.prod(w.shape)) for w in weights)
    flat = tf.Variable(tf.concat([tf.reshape(w, [-1]) for w in weights], 0))

    def f(v):
        out, i = tf.constant(X), 0
        pieces = []
        for w in weights:
            size = int(np.prod(w.shape))
            pieces.append(tf.reshape(v[i:i + size], w.shape))
            i += size
        h = tf.tanh(out @ pieces[0] + pieces[1])
        return loss(y, h @ pieces[2] + pieces[3])

    with tf.GradientTape() as t2:
        with tf.GradientTape() as t1:
            value = f(flat)
        g = t1.gradient(value, flat)
    dense = t2.jacobian(g, flat).numpy()
    assert dense.shape == (n, n)
    np.testing.assert_allclose(cb.records[-1]["eigenvalues"], np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-6)
    np.testing.assert_allclose(cb.records[-1]["trace"]["estimate"], np.trace(dense), rtol=1e-8)


def _dense_ggn(model, batch):
    """``J^T H_out J`` of the mean cross-entropy, from ``torch.func.jacrev`` of the outputs."""
    params = dict(model.named_parameters())
    names = list(params)
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def outputs(flat):
        pieces = flat.split([params[n].numel() for n in names])
        state = {n: t.reshape(params[n].shape) for n, t in zip(names, pieces)}
        return torch.func.functional_call(model, state, (batch[0],))

    J = torch.func.jacrev(outputs)(theta).numpy()          # (N, C, n)
    p = torch.softmax(outputs(theta), -1).detach().numpy()  # (N, C)
    H_out = (np.einsum("ic,cd->icd", p, np.eye(p.shape[1])) - np.einsum("ic,id->icd", p, p)) / len(p)
    return np.einsum("icn,icd,idm->nm", J, H_out, J)


def test_ggn_and_residual_against_dense_truth(tmp_path):
    from specops.backends import torch as st

    model, loss_fn, batch = _torch_problem()
    opts = dict(trace_options=dict(max_matvecs=30), density_options=dict(num_probes=2, num_steps=12))
    tracker = specops.Tracker(lambda: st.hessian(model, loss_fn, batch), tmp_path / "c.jsonl", k=3, seed=3,
                              curvatures=("hessian", "ggn"), **opts)
    rec = tracker.update(0)
    G = st.ggn(model, loss_fn, batch)
    g = rec["curvatures"]["ggn"]
    # equal to independent calls on specops' GGN with the same seed
    eig = specops.eigsh(G, k=3, seed=3)
    np.testing.assert_array_equal(g["eigenvalues"], eig.eigenvalues)
    tr = specops.trace(G, max_matvecs=30, seed=3)
    assert g["trace"]["estimate"] == tr.estimate and g["trace"]["stderr"] == tr.stderr
    np.testing.assert_array_equal(g["density"]["weights"],
                                  specops.spectral_density(G, num_probes=2, num_steps=12, seed=3).weights)
    # and to the dense J^T H_out J, float64
    dense_g = _dense_ggn(model, batch)
    dense_h = _dense_hessian(model, loss_fn, batch, [n for n, _ in model.named_parameters()])
    np.testing.assert_allclose(g["eigenvalues"], np.linalg.eigvalsh(dense_g)[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(rec["eigenvalues"], np.linalg.eigvalsh(dense_h)[::-1][:3], rtol=1e-6)
    assert abs(g["trace"]["estimate"] - np.trace(dense_g)) <= 3 * g["trace"]["stderr"]
    # the residual term: 30 products < 2n, an estimate, within three standard errors of tr(H - G)
    res = rec["residual"]["trace"]
    assert 0 < res["stderr"] and abs(res["estimate"] - np.trace(dense_h - dense_g)) <= 3 * res["stderr"]
    H = st.hessian(model, loss_fn, batch)
    assert res["estimate"] == specops.trace(H - G, max_matvecs=30, seed=3).estimate   # the same seed
    assert rec["products"]["residual/trace"] == 30 and "ggn/eigenvalues" in rec["products"]
    # warm start per curvature, and the log reads back by curvature
    model[0].weight.data += 1e-3
    rec1 = tracker.update(1)
    assert rec1["warm_start"] == {"operator": True, "ggn": True}
    np.testing.assert_allclose(rec1["curvatures"]["ggn"]["eigenvalues"],
                               np.linalg.eigvalsh(_dense_ggn(model, batch))[::-1][:3], rtol=1e-6)
    log = specops.Tracker.load(tmp_path / "c.jsonl")
    assert log.curvatures == ["hessian", "ggn"]
    np.testing.assert_array_equal(log.top_eigenvalues(curvature="ggn")[1][:, 0],
                                  [g["eigenvalues"][0], rec1["curvatures"]["ggn"]["eigenvalues"][0]])
    assert log.traces(curvature="residual")[1][0] == res["estimate"]
    assert log.traces()[1][0] == rec["trace"]["estimate"]          # the Hessian's keys, as without curvatures
    assert len(log.densities(curvature="ggn")) == 2


def test_curvatures_from_a_dict_and_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    H, G = Drifting(n=200), Drifting(n=200, seed=5)
    make = lambda: {"ggn": G(), "hessian": H()}  # noqa: E731
    tracker = specops.Tracker(make, tmp_path / "c.jsonl", k=2, curvatures=("ggn", "hessian"), **OPTS)
    for t in range(2):
        H.t = G.t = t
        rec = tracker.update(t)
        np.testing.assert_allclose(rec["eigenvalues"], np.linalg.eigvalsh(G.dense())[::-1][:2], rtol=1e-6)
        np.testing.assert_allclose(rec["curvatures"]["hessian"]["eigenvalues"],
                                   np.linalg.eigvalsh(H.dense())[::-1][:2], rtol=1e-6)
    assert rec["curvature"] == "ggn"
    log = specops.Tracker.load(tmp_path / "c.jsonl")
    assert log.curvatures == ["ggn", "hessian"]
    np.testing.assert_array_equal(log.top_eigenvalues(curvature="ggn")[1], log.top_eigenvalues()[1])
    fig = log.plot_curvatures(tmp_path / "curv.png")
    assert len(fig.axes) == 3 and os.path.getsize(tmp_path / "curv.png") > 0
    assert {t.get_text() for t in fig.axes[1].get_legend().get_texts()} == {"ggn", "hessian", "H - G"}
    with pytest.raises(ValueError, match="one curvature"):
        TrackerLog(log.records[:0]).plot_curvatures()
    with pytest.raises(ValueError, match="unknown curvature"):
        specops.Tracker(make, curvatures=("hessian", "gnn"))
    with pytest.raises(ValueError, match=r"\['fisher'\]; choose from \['hessian', 'ggn', 'empirical_fisher', 'mc_fisher'\]"):
        specops.Tracker(make, curvatures=("hessian", "fisher"))  # vocab: keep (the former name, refused)
    with pytest.raises(ValueError, match="without \\['empirical_fisher'\\]"):
        specops.Tracker(make, curvatures=("hessian", "empirical_fisher")).update(0)
    with pytest.raises(TypeError, match="dict"):
        specops.Tracker(H, curvatures=("hessian", "ggn")).update(0)


def _strict(text):
    """JSON text parsed with ``Infinity``/``NaN`` refused (strict JSON, as other languages read it)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_encodes_an_infinite_stderr_once_and_reads_older_logs(tmp_path, dtype):
    # one probe: the trace's stderr is infinite; the log writes it as specops.io does, {"__float__": "inf"}
    A = specops.aslinearoperator(np.diag(np.arange(1.0, 31.0)).astype(dtype))
    path = tmp_path / "c.jsonl"
    tracker = specops.Tracker(lambda: A, path, k=1, metrics=("trace",), trace_options=dict(max_matvecs=1), seed=0)
    rec = tracker.update(0)
    truth = specops.trace(A, max_matvecs=1, seed=0)            # an independent call with the same seed
    assert rec["trace"]["estimate"] == float(truth.estimate) and truth.stderr == np.inf
    assert rec["trace"]["stderr"] == np.inf
    with open(path) as fh:
        line = fh.read()
    assert _strict(line)["trace"]["stderr"] == {"__float__": "inf"}
    assert _strict(truth.to_json())["stderr"] == {"__float__": "inf"}  # the same encoding as results
    steps, est, err = TrackerLog.read(path).traces()
    assert list(steps) == [0] and est[0] == rec["trace"]["estimate"] and err[0] == np.inf
    assert TrackerLog.read(path).records == [rec]              # bit for bit through the file
    # a log written before specops.io (a stderr of None meant infinity) reads the same
    old = tmp_path / "old.jsonl"
    old_line = line.replace('{"__float__": "inf"}', "null")
    assert old_line != line and _strict(old_line)["trace"]["stderr"] is None
    old.write_text(old_line)
    steps, est2, err2 = specops.Tracker.load(old).traces()
    assert list(steps) == [0] and est2[0] == est[0] and err2[0] == np.inf


def test_fisher_datum_term_reaches_the_empirical_fisher(tmp_path):
    """MSE with "mean" over C = 3 outputs: a term's weight is 1/(N C), so the per-term Fisher
    is C times the per-sample one (dense truth: per-sample gradients, ``G^T G / N``)."""
    from torch import nn

    from specops.backends import torch as st

    model, _, (X, _) = _torch_problem()
    Y = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss_fn = nn.MSELoss()
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss_fn(model(X[i:i + 1]), Y[i:i + 1]), list(model.parameters()))]) for i in range(20)]).numpy()
    truth = np.linalg.eigvalsh(3 * G.T @ G / 20)[::-1][:2]
    tracker = specops.Tracker(lambda: st.hessian(model, loss_fn, (X, Y)), tmp_path / "f.jsonl", metrics="eigenvalues",
                              k=2, curvatures=("hessian", "empirical_fisher"), fisher_datum="term")
    rec = tracker.update(0)
    np.testing.assert_allclose(rec["curvatures"]["empirical_fisher"]["eigenvalues"], truth, rtol=1e-6)
    with pytest.raises(ValueError, match="datum must be 'sample'"):
        specops.Tracker(lambda: None, curvatures=("empirical_fisher",), fisher_datum="position")
