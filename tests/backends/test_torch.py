"""The PyTorch backend against dense truth: ``torch.func.hessian`` on the concatenated full batch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn

import specops
from specops.backends import torch as st

ENGINES = ["cached_graph", "double_backward", "forward_over_reverse"]
RTOL = 1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def dense_hessian(model, loss_fn, batches, names=None):
    """The Hessian of ``loss_fn(model(X), y)`` on all batches concatenated, by ``torch.func.hessian``."""
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if p.requires_grad]
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        pieces = flat.split([int(np.prod(s)) for s in shapes])
        state = {n: p.detach() for n, p in params.items()}
        state.update({n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)})
        state.update(dict(model.named_buffers()))
        return loss_fn(torch.func.functional_call(model, state, (X,)), y)

    return torch.func.hessian(f)(theta).numpy(), f, theta


def mlp(inputs=5, hidden=6, outputs=3):
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).double()


def classification_batches(sizes=(7, 4), inputs=5, classes=3):
    return [(torch.randn(s, inputs, dtype=torch.float64), torch.randint(0, classes, (s,))) for s in sizes]


def regression_batches(sizes=(7, 4), inputs=5, outputs=3):
    return [(torch.randn(s, inputs, dtype=torch.float64), torch.randn(s, outputs, dtype=torch.float64))
            for s in sizes]


def check_products(H, dense, k=3):
    n = dense.shape[0]
    V = torch.randn(n, k, dtype=torch.float64)
    HV = H @ V
    assert isinstance(HV, torch.Tensor) and HV.dtype == torch.float64 and HV.shape == (n, k)
    assert rel_err(HV, dense @ V.numpy()) < RTOL
    hv = H @ V[:, 0]
    assert hv.shape == (n,)
    assert rel_err(hv, dense @ V[:, 0].numpy()) < RTOL


# --- products against dense truth ---------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("task", ["cross_entropy", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_products_match_dense_hessian(engine, task, reduction):
    model = mlp()
    if task == "cross_entropy":
        loss_fn, batches = nn.CrossEntropyLoss(reduction=reduction), classification_batches()
    else:
        loss_fn, batches = nn.MSELoss(reduction=reduction), regression_batches()
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, batches, reduction=reduction, engine=engine)
    assert H.engine == engine and H.num_samples == 11 and H.batch_sizes == [7, 4]
    check_products(H, dense)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def trained_bn_cnn():
    """A small CNN in eval mode whose batch-norm statistics are not the defaults."""
    model = SmallCNN().double()
    with torch.no_grad():
        model(torch.randn(32, 1, 4, 4, dtype=torch.float64) * 2 + 1)  # moves the running statistics
    return model.eval()


@pytest.mark.parametrize("engine", ENGINES)
def test_cnn_with_batch_norm_in_eval_mode(engine):
    model = trained_bn_cnn()
    batches = [(torch.randn(s, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (s,))) for s in (5, 3)]
    loss_fn = nn.CrossEntropyLoss()
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, batches, engine=engine)
    check_products(H, dense)


class ConvZoo(nn.Module):
    """Strided, dilated, grouped, 1-d and "same"-padded convolutions, each with eval-mode batch norm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.conv3 = nn.Conv1d(4, 3, 3, padding="same")
        self.bn3 = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3 * 9, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.tanh(self.bn2(self.conv2(x))).flatten(2)
        return self.fc(torch.relu(self.bn3(self.conv3(x))).flatten(1))


@pytest.mark.parametrize("engine", ["cached_graph", "double_backward"])
@pytest.mark.parametrize("params", [None, ["bn1.*", "conv2.weight", "bn3.bias"]])
def test_cheaper_double_backward_of_convolutions_and_batch_norm_is_exact(engine, params, monkeypatch):
    """The graphs of these engines route convolutions and eval-mode batch norm through
    formulas of their own; products, including the blocks of batch norm's weight and bias,
    must still be those of torch.func.hessian on the untouched model."""
    model = ConvZoo().double()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        for bn in (model.bn1, model.bn3):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    model.eval()
    calls = []
    for func, override in list(st._OVERRIDES.items()):
        def counted(*args, _override=override, **kwargs):
            out = _override(*args, **kwargs)
            calls.append((_override.__name__, out is not None))
            return out

        monkeypatch.setitem(st._OVERRIDES, func, counted)
    batches = [(torch.randn(s, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (s,))) for s in (5, 3)]
    loss_fn = nn.CrossEntropyLoss()
    names = None if params is None else [n for n, _ in model.named_parameters()
                                         if n.startswith("bn1.") or n in params]
    dense, _, _ = dense_hessian(model, loss_fn, batches, names=names)
    H = st.hessian(model, loss_fn, batches, engine=engine, wrt=params)
    check_products(H, dense)
    # both convolutions with numeric padding and all three batch norms took the cheaper route;
    # the "same"-padded one was left to PyTorch
    assert {("_conv", True), ("_conv", False), ("_batch_norm", True)} == set(calls)
    assert calls.count(("_conv", False)) * 2 == calls.count(("_conv", True))


def test_single_batch_tuple_and_auto_engine():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    batch = classification_batches((9,))[0]
    dense, _, _ = dense_hessian(model, loss_fn, [batch])
    H = st.hessian(model, loss_fn, batch)
    assert H.engine == "cached_graph" and H.batch_sizes == [9]
    check_products(H, dense)


def test_auto_engine_falls_back_when_graphs_exceed_the_budget():
    model, loss_fn, batches = mlp(), nn.CrossEntropyLoss(), classification_batches()
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, batches, memory_budget=1)
    assert H.engine == "double_backward"
    check_products(H, dense)


def test_forward_over_reverse_in_chunks():
    model, loss_fn, batches = mlp(), nn.CrossEntropyLoss(), classification_batches()
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, batches, engine="forward_over_reverse", chunk_size=2)
    check_products(H, dense, k=5)


# --- parameter selection -------------------------------------------------------------
def test_parameter_subset_by_glob_and_module_is_the_dense_submatrix():
    model, loss_fn, batches = mlp(), nn.CrossEntropyLoss(), classification_batches()
    names = ["2.weight", "2.bias"]
    dense, _, _ = dense_hessian(model, loss_fn, batches, names=names)
    for params in ("2.*", model[2], [model[2].weight, "2.bias"]):
        H = st.hessian(model, loss_fn, batches, wrt=params)
        assert list(H.param_blocks) == names
        check_products(H, dense)


def test_restrict_to_a_block_by_name():
    model, loss_fn, batches = mlp(), nn.CrossEntropyLoss(), classification_batches()
    full, _, _ = dense_hessian(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, batches)
    block = H.param_blocks["0.weight"]
    H0 = H.restrict("0.weight")
    assert isinstance(H0, specops.ModelOperator) and list(H0.param_blocks) == ["0.weight"]
    check_products(H0, full[block, block])
    # a coordinate restriction gives the same block
    assert rel_err(H.restrict(block).to_dense(), full[block, block]) < RTOL


class FrozenUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 5)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(5, 2)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.out(torch.tanh(self.frozen(x)))


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_parameters_left_out_and_unused_ones_give_zero_rows(engine):
    model = FrozenUnused().double()
    batches = regression_batches((6, 5), inputs=4, outputs=2)
    loss_fn = nn.MSELoss()
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, batches, engine=engine)
    assert list(H.param_blocks) == ["unused", "out.weight", "out.bias"]  # model order
    check_products(H, dense)
    assert np.all(H.to_dense()[H.param_blocks["unused"]] == 0)


def test_selecting_only_frozen_parameters_is_an_error():
    model = FrozenUnused().double()
    with pytest.raises(ValueError, match="frozen"):
        st.hessian(model, nn.MSELoss(), regression_batches((3,), 4, 2)[0], wrt="frozen")


def test_unknown_parameter_name_lists_the_parameters():
    with pytest.raises(ValueError, match="0.weight"):
        st.hessian(mlp(), nn.CrossEntropyLoss(), classification_batches((3,))[0], wrt="encoder.*")


# --- data and loss conventions ------------------------------------------------------
class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) * self.b(z)


def test_dict_inputs_and_the_general_loss_form_agree_with_dense():
    model = DictModel().double()
    sizes = (5, 2)
    xs = [torch.randn(s, 3, dtype=torch.float64) for s in sizes]
    zs = [torch.randn(s, 2, dtype=torch.float64) for s in sizes]
    ys = [torch.randn(s, 2, dtype=torch.float64) for s in sizes]
    mse = nn.MSELoss()

    def loss_model(model, batch):
        return mse(model(batch["x"], batch["z"]), batch["y"])

    X, Z, Y = torch.cat(xs), torch.cat(zs), torch.cat(ys)
    params = dict(model.named_parameters())
    names = list(params)
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def f(flat):
        state = {n: t.reshape(params[n].shape) for n, t in zip(names, flat.split([p.numel() for p in params.values()]))}
        return mse(torch.func.functional_call(model, state, (X, Z)), Y)

    dense = torch.func.hessian(f)(theta).numpy()
    paired = [({"x": x, "z": z}, y) for x, z, y in zip(xs, zs, ys)]
    check_products(st.hessian(model, mse, paired), dense)
    dicts = [{"x": x, "z": z, "y": y} for x, z, y in zip(xs, zs, ys)]
    H = st.hessian(model, loss_model, dicts)
    assert H.adapter.loss_form == "model" and H.batch_sizes == [5, 2]
    check_products(H, dense)


def test_outputs_loss_form_rejects_a_dict_batch_with_advice():
    with pytest.raises(TypeError, match=r"a dict batch needs 'labels'.*got keys \['x'\]; or write loss_fn\(model, batch\)"):
        st.hessian(DictModel().double(), nn.MSELoss(), {"x": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="loss_form='model'"):
        st.hessian(DictModel().double(), nn.MSELoss(), [(torch.zeros(2, 3),) * 3])


def test_float32_inputs_are_cast_to_the_model_dtype_and_moved():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    batches = classification_batches()
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    as32 = [(x.float(), y) for x, y in batches]
    check_products(st.hessian(model, loss_fn, as32), dense)


def test_float32_model_gives_float32_vectors():
    model = mlp().float()
    batch = (torch.randn(6, 5), torch.randint(0, 3, (6,)))
    H = st.hessian(model, nn.CrossEntropyLoss(), batch)
    assert H.dtype == np.float32
    assert (H @ torch.ones(H.shape[0])).dtype == torch.float32
    with pytest.raises(TypeError, match="float32"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


# --- model-backed extras ---------------------------------------------------------------
def test_loss_at_gradient_and_params_vector_match_direct_computation():
    model, loss_fn, batches = mlp(), nn.CrossEntropyLoss(), classification_batches()
    _, f, theta = dense_hessian(model, loss_fn, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    H = st.hessian(model, loss_fn, batches)
    assert torch.equal(H.params_vector(), theta)
    delta = torch.randn(theta.numel(), dtype=torch.float64) * 0.1
    assert H.loss_at(delta) == pytest.approx(float(f(theta + delta)), rel=1e-12)
    assert H.loss_at() == pytest.approx(float(f(theta)), rel=1e-12)
    g = torch.func.grad(f)(theta)
    assert rel_err(H.gradient(), g) < 1e-12
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    pieces = H.adapter.unflatten(delta)
    assert pieces["0.weight"].shape == (6, 5)
    assert torch.equal(H.adapter.flatten(pieces), delta)


def test_model_state_is_never_changed():
    model = SmallCNN().double().train()  # batch norm in training mode
    stats = {n: b.clone() for n, b in model.named_buffers()}
    batch = (torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (6,)))
    for engine in ENGINES:
        H = st.hessian(model, nn.CrossEntropyLoss(), batch, engine=engine)
        H @ torch.randn(H.shape[0], 2, dtype=torch.float64)
        H.loss_at(torch.ones(H.shape[0], dtype=torch.float64))
    assert model.training and all(m.training for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n


# --- checks ---------------------------------------------------------------------------
def test_dropout_in_training_mode_is_detected_and_named():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    batch = classification_batches((16,))[0]
    with pytest.raises(specops.NonDeterministicError, match=r"random layers in training mode: 2 \(Dropout, p=0.5\).*model.eval\(\)"):
        st.hessian(model, nn.CrossEntropyLoss(), batch, engine="double_backward")
    model.eval()
    st.hessian(model, nn.CrossEntropyLoss(), batch)  # deterministic now


class Augmenting:
    """A loader whose batches change every pass, like random augmentation."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter([(x + 0.1 * torch.randn_like(x), y) for x, y in self.batches])


@pytest.mark.parametrize("engine", ENGINES)
def test_data_that_changes_between_passes_is_detected(engine):
    with pytest.raises(specops.NonDeterministicError):
        st.hessian(mlp(), nn.CrossEntropyLoss(), Augmenting(classification_batches()), engine=engine)


def test_dataloader_without_shuffling_works_and_a_shuffling_one_is_refused():
    from torch.utils.data import DataLoader, TensorDataset

    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    batches = classification_batches((8, 8, 4))
    dataset = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, DataLoader(dataset, batch_size=8))
    assert H.batch_sizes == [8, 8, 4]
    check_products(H, dense)
    with pytest.raises(specops.NonDeterministicError, match="shuffle=True"):
        st.hessian(model, loss_fn, DataLoader(dataset, batch_size=8, shuffle=True))


def test_non_finite_loss_names_the_batch():
    batches = classification_batches((4, 4, 4))
    batches[1][0][2, 0] = float("nan")
    with pytest.raises(specops.NonFiniteError, match="batch 1"):
        st.hessian(mlp(), nn.CrossEntropyLoss(), batches)


def test_mixed_dtypes_are_a_clear_error():
    model = mlp()
    model[2].float()
    with pytest.raises(ValueError, match="mixed dtypes or devices.*model.to"):
        st.hessian(model, nn.CrossEntropyLoss(), classification_batches((3,))[0])


def test_non_scalar_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="scalar"):
        st.hessian(mlp(), nn.CrossEntropyLoss(reduction="none"), classification_batches((3,))[0])


# --- dense matrices and vector operations -------------------------------------------------
def test_dense_torch_matrix_operator():
    A = torch.randn(6, 6, dtype=torch.float64)
    S = A + A.T
    op = specops.aslinearoperator(S)
    v = torch.randn(6, dtype=torch.float64)
    assert isinstance(op @ v, torch.Tensor) and torch.allclose(op @ v, S @ v)
    with pytest.raises(ValueError, match="not symmetric"):
        specops.aslinearoperator(A)
    assert specops.aslinearoperator(A, symmetric=False).symmetric is False
    assert specops.aslinearoperator(S.float()).dtype == np.float32
    with pytest.raises(ValueError, match="square"):
        st.matrix_operator(torch.zeros(2, 3))


def test_torch_ops_match_numpy():
    ops = st.TorchOps(torch.float64)
    rng = np.random.default_rng(0)
    X, Y, C = rng.standard_normal((7, 3)), rng.standard_normal((7, 2)), rng.standard_normal((3, 2))
    tX, tY = ops.from_numpy(X), ops.from_numpy(Y)
    assert np.allclose(ops.to_numpy(ops.inner(tX, tY)), X.T @ Y)
    assert np.allclose(ops.to_numpy(ops.combine(tX, C)), X @ C)
    assert np.allclose(ops.column_norms(tX), np.linalg.norm(X, axis=0))
    Q, R = ops.qr(tX)
    assert np.allclose(ops.to_numpy(Q) @ ops.to_numpy(R), X)
    W, _ = ops.orthogonalize(tY, Q)
    assert np.abs(ops.to_numpy(ops.inner(Q, W))).max() < 1e-12
    assert np.array_equal(ops.to_numpy(ops.random(7, [1, 2], seed=3)),
                          specops.random.probes(7, [1, 2], seed=3))
    assert not ops.all_finite(ops.from_numpy([1.0, np.inf]))


# --- a real model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_model():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:600] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[:600])
    model = nn.Sequential(nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    batches = [(X[i:i + 256], y[i:i + 256]) for i in range(0, 600, 256)]  # 256, 256, 88
    return model, batches


@pytest.fixture(scope="module")
def digits_hessian(digits_model):
    model, batches = digits_model
    loss_fn = nn.CrossEntropyLoss()
    dense, _, _ = dense_hessian(model, loss_fn, batches)
    return st.hessian(model, loss_fn, batches), (dense + dense.T) / 2


def test_digits_model_products_and_scipy_interop(digits_hessian):
    H, dense = digits_hessian
    check_products(H, dense, k=4)
    import scipy.sparse.linalg as sla

    top = np.sort(sla.eigsh(H.to_scipy(), k=3, which="LA", tol=1e-10)[0])[::-1]
    assert np.allclose(top, np.linalg.eigvalsh(dense)[::-1][:3], rtol=1e-6)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_digits_eigsh_matches_eigh(digits_hessian, which):
    H, dense = digits_hessian
    exact = np.linalg.eigvalsh(dense)
    res = specops.eigsh(H, k=3, which=which, tol=1e-8)
    assert res.converged.all()
    want = exact[::-1][:3] if which == "LA" else exact[:3]
    assert np.allclose(res.eigenvalues, want, rtol=1e-6, atol=1e-9 * abs(exact).max())
    V = res.eigenvectors
    assert isinstance(V, torch.Tensor) and V.shape == (H.shape[0], 3)
    R = dense @ V.numpy() - V.numpy() * res.eigenvalues
    assert np.linalg.norm(R, axis=0).max() < 1e-6 * abs(exact).max()


def test_digits_trace_and_density_agree_with_dense_and_numpy_backend(digits_hessian):
    H, dense = digits_hessian
    D = specops.aslinearoperator(dense)  # the same algorithms on the NumPy backend
    exact = float(np.trace(dense))
    for method in ("hutchinson", "hutch++", "xtrace"):
        t = specops.trace(H, method=method, max_matvecs=120, seed=1)
        assert abs(t.estimate - exact) <= 5 * t.stderr + 1e-9 * abs(exact), method
        same = specops.trace(D, method=method, max_matvecs=120, seed=1)
        assert t.estimate == pytest.approx(same.estimate, rel=1e-8), method
    sd = specops.spectral_density(H, num_probes=4, num_steps=40, seed=2)
    ref = specops.spectral_density(D, num_probes=4, num_steps=40, seed=2)
    assert np.allclose(sd.nodes, ref.nodes, rtol=1e-6, atol=1e-8 * abs(dense).max())
    assert np.allclose(sd.weights, ref.weights, atol=1e-6)
    est, err = sd.trace()
    assert abs(est - exact) <= 5 * err
    eig = np.linalg.eigvalsh(dense)
    assert sd.nodes.max() == pytest.approx(eig[-1], rel=1e-6)
    assert sd.nodes.min() >= eig[0] - 1e-8 * abs(eig).max()


def test_parameters_enter_the_graph_through_one_split():
    """The flat vector reaches the model through one ``split``, not a slice per parameter (the
    backward of each slice would write a zero-filled copy of the whole vector: a gradient of a
    23 M-parameter GPT-2 took 12.9 s instead of 0.87 s); the gradient is the model's own."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    model = model.double()
    loss_fn = nn.MSELoss()
    adapter = st.hessian(model, loss_fn, (X, y), cross_check=False, check_deterministic=False).adapter
    theta = adapter.params_vector().requires_grad_(True)
    loss = adapter._loss(theta, adapter._prepare((X, y)))
    consumers, seen, stack = [], set(), [loss.grad_fn]
    while stack:  # the nodes of the backward graph that read theta's gradient directly
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is theta:
                consumers.append(node.name())
            stack.append(child)
    assert consumers == ["SplitWithSizesBackward0"]
    (g,) = torch.autograd.grad(loss, theta)
    truth = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    assert rel_err(g, torch.cat([t.reshape(-1) for t in truth])) < 1e-14
