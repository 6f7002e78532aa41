"""Random layers (dropout in training mode, torch.rand in forward) never pass silently."""
# Its Keras model sets float64 per layer: keras.config.set_floatx here once leaked into
# test_cli.py's float32 Keras run through the cached global dtype policy.

import numpy as np
import pytest

import specops

torch = pytest.importorskip("torch")
nn = torch.nn
from backends import torch as torch_backend  # noqa: E402

ENGINES = ["auto", "cached_graph", "double_backward", "forward_over_reverse"]


def _model(p=0.3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(p), nn.Linear(4, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    return [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.mark.parametrize("hvp", ENGINES)
def test_dropout_in_training_mode_raises_for_every_engine(hvp):
    with pytest.raises(specops.NonDeterministicError) as err:
        torch_backend.hessian(_model(), nn.MSELoss(), _data(), engine=hvp)
    message = str(err.value)
    assert "2 (Dropout, p=0.3)" in message
    assert "model.eval()" in message and "random_layers='fixed'" in message


@pytest.mark.parametrize("hvp", ENGINES)
def test_dropout_in_eval_mode_passes(hvp):
    model = _model().eval()
    H = torch_backend.hessian(model, nn.MSELoss(), _data(), engine=hvp)
    assert H.shape == (21, 21)


def test_zero_rate_dropout_passes():
    H = torch_backend.hessian(_model(p=0.0), nn.MSELoss(), _data())
    assert H.shape == (21, 21)


class _Jitter(nn.Module):
    """Random without any Dropout module: found only by the generator-state check."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x):
        return self.lin(x * (1 + 0.1 * torch.rand_like(x)))


def test_random_forward_without_dropout_module_is_detected():
    model = _Jitter()
    state = torch.random.get_rng_state()
    with pytest.raises(specops.NonDeterministicError, match="draws random numbers") as err:
        torch_backend.hessian(model, nn.MSELoss(), _data(), check_deterministic=False)
    assert "model.eval()" in str(err.value)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's generator is kept


def test_bad_random_layers_value():
    with pytest.raises(ValueError, match="random_layers"):
        torch_backend.hessian(_model().eval(), nn.MSELoss(), _data(), random_layers="ignore")


class _FixedMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, x):
        return x * self.mask


def _capture_masks(H, model, data):
    """The mask the operator uses for each batch, read by a hook on the dropout layer."""
    seen = []
    hook = model[2].register_forward_hook(lambda m, inp, out: seen.append(out / inp[0]))
    try:
        masks = []
        for batch in data:
            H.adapter.loss(batch)
            H.adapter.loss(batch)
            assert torch.equal(seen[-1], seen[-2])
            masks.append(seen[-1])
    finally:
        hook.remove()
    return masks


@pytest.mark.parametrize("hvp", ENGINES)
def test_fixed_masks_give_the_hessian_of_one_sub_network(hvp):
    model, data = _model(), _data()
    H = torch_backend.hessian(model, nn.MSELoss(), data, engine=hvp, random_layers="fixed")
    g = torch.Generator().manual_seed(2)
    V = torch.randn(H.shape[0], 3, generator=g, dtype=torch.float64)
    A, B = H @ V, H @ V
    assert torch.equal(A, B)
    torch.testing.assert_close(H @ V[:, 1], A[:, 1], rtol=1e-12, atol=1e-12)

    # dense reference: dropout replaced by multiplication with the captured masks
    masks = _capture_masks(H, model, data)
    assert not torch.equal(masks[0], torch.ones_like(masks[0]))
    ref = nn.Sequential(model[0], model[1], _FixedMask(), model[3])
    names = [n for n, _ in ref.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    shapes = [p.shape for p in ref.parameters()]

    def loss(flat, batch):
        parts = torch.split(flat, [int(np.prod(s)) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        x, y = batch
        return nn.functional.mse_loss(torch.func.functional_call(ref, params, (x,)), y)

    dense = 0
    for batch, mask in zip(data, masks):
        ref[2].mask = mask
        dense = dense + 0.5 * torch.autograd.functional.hessian(lambda t: loss(t, batch), theta)
    torch.testing.assert_close(A, dense @ V, rtol=1e-10, atol=1e-12)


def test_fixed_masks_agree_between_engines():
    data = _data()
    V = torch.randn(21, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    products = [torch_backend.hessian(_model(), nn.MSELoss(), data, engine=e, random_layers="fixed") @ V
                for e in ENGINES]
    for P in products[1:]:
        torch.testing.assert_close(P, products[0], rtol=1e-10, atol=1e-12)


# --- Keras -----------------------------------------------------------------------------
def _keras_setup():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from backends import tensorflow as tf_backend

    # float64 per layer, not keras.config.set_floatx: the first layer built caches the global dtype
    # policy from floatx, which then outlives restoring floatx and leaks into later test modules
    keras.utils.set_random_seed(0)
    f64 = "float64"
    model = keras.Sequential([keras.Input((3,), dtype=f64), keras.layers.Dense(4, activation="tanh", dtype=f64),
                              keras.layers.Dropout(0.3, name="drop", dtype=f64), keras.layers.Dense(1, dtype=f64)])
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 1))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]

    def train_loss(model, batch):
        x, t = batch
        return tf.reduce_mean((model(x, training=True) - t) ** 2)

    def eval_loss(model, batch):
        x, t = batch
        return tf.reduce_mean((model(x) - t) ** 2)

    return tf, tf_backend, model, data, train_loss, eval_loss


def test_keras_dropout_called_with_training_raises():
    _, tf_backend, model, data, train_loss, eval_loss = _keras_setup()
    with pytest.raises(specops.NonDeterministicError) as err:
        tf_backend.hessian(model, train_loss, data, check_deterministic=False)
    assert "drop (Dropout" in str(err.value) and "training=False" in str(err.value)
    H = tf_backend.hessian(model, eval_loss, data)  # inference mode: no randomness
    assert H.shape == (21, 21)
    with pytest.raises(ValueError, match="random_layers"):
        tf_backend.hessian(model, eval_loss, data, random_layers="maybe")


def test_keras_fixed_mask_gives_consistent_products():
    tf, tf_backend, model, data, train_loss, eval_loss = _keras_setup()
    H = tf_backend.hessian(model, train_loss, data, random_layers="fixed", chunk_size=2)
    V = tf.constant(np.random.default_rng(1).standard_normal((21, 5)))
    A, B = H @ V, H @ V
    np.testing.assert_array_equal(A.numpy(), B.numpy())
    np.testing.assert_allclose(A.numpy()[:, 3], (H @ V[:, 3]).numpy(), rtol=1e-12, atol=1e-12)
    # a fixed mask, not inference mode
    E = tf_backend.hessian(model, eval_loss, data)
    assert np.abs((E @ V).numpy() - A.numpy()).max() > 1e-6
