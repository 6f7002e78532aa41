"""sj.model_loss: dict batches of token ids and dict outputs, a tiny Flax transformer against jax.hessian."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from specops.backends import jax as sj  # noqa: E402

VOCAB, DIM, LENGTH = 7, 4, 5


class TinyLM(nn.Module):
    """Embeddings, one pre-norm block (causal attention with a padding mask, LayerNorm,
    an MLP) and a vocabulary head; ``{"logits": ...}`` out, plus ``"loss"`` given labels."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, labels=None):
        x = nn.Embed(VOCAB, DIM, param_dtype=jnp.float64)(input_ids)
        x = x + self.param("position", nn.initializers.normal(0.1), (LENGTH, DIM), jnp.float64)
        mask = nn.combine_masks(nn.make_attention_mask(attention_mask, attention_mask),
                                nn.make_causal_mask(input_ids))
        h = nn.LayerNorm(param_dtype=jnp.float64)(x)
        x = x + nn.MultiHeadDotProductAttention(2, param_dtype=jnp.float64)(h, h, mask=mask)
        x = x + nn.tanh(nn.Dense(DIM, param_dtype=jnp.float64)(nn.LayerNorm(param_dtype=jnp.float64)(x)))
        logits = nn.Dense(VOCAB, param_dtype=jnp.float64)(x)
        return {"logits": logits} if labels is None else {"logits": logits, "loss": lm_loss(logits, labels)}


def lm_loss(logits, labels):
    """Causal-LM cross-entropy: token t predicts t+1; labels -100 (padding) left out."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.sum(keep)


def batch(rng, n, pad):
    ids = rng.integers(0, VOCAB, size=(n, LENGTH))
    mask = np.ones((n, LENGTH), dtype=np.int32)
    mask[:pad, -2:] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(np.where(mask == 1, ids, -100))}


@pytest.fixture(scope="module")
def problem():
    model = TinyLM()
    rng = np.random.default_rng(0)
    data = [batch(rng, 3, 2), batch(rng, 2, 1)]
    params = model.init(jax.random.PRNGKey(0), data[0]["input_ids"], data[0]["attention_mask"])["params"]
    flat, unravel = ravel_pytree(params)

    def apply(p, **inputs):
        return model.apply({"params": p}, **inputs)

    def batch_loss(x, b):
        logits = apply(unravel(x), input_ids=b["input_ids"], attention_mask=b["attention_mask"])["logits"]
        return lm_loss(logits, b["labels"])

    truth = sum(len(b["labels"]) / 5 * np.asarray(jax.jit(jax.hessian(batch_loss))(flat, b)) for b in data)
    return {"apply": apply, "params": params, "data": data, "truth": truth}


def rel(a, b):
    return np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)


def test_dict_batches_and_dict_outputs_match_jax_hessian(problem):
    H = sj.hessian(sj.model_loss(problem["apply"], lm_loss), problem["params"], problem["data"])
    assert H.batch_sizes == [3, 2]
    V = np.random.default_rng(1).normal(size=(H.shape[0], 3))
    assert rel(H @ jnp.asarray(V), problem["truth"] @ V) < 1e-12
    assert rel(H @ jnp.asarray(V[:, 0]), problem["truth"] @ V[:, 0]) < 1e-12


def test_the_models_own_loss(problem):
    H = sj.hessian(sj.model_loss(problem["apply"]), problem["params"], problem["data"])
    v = np.random.default_rng(2).normal(size=H.shape[0])
    assert rel(H @ jnp.asarray(v), problem["truth"] @ v) < 1e-12


def test_errors_name_the_fix(problem):
    apply, params, data = problem["apply"], problem["params"], problem["data"]
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in data]
    with pytest.raises(TypeError, match=r"dict batch needs 'labels'.*or write loss_fn\(params, batch\)"):
        sj.hessian(sj.model_loss(apply, lm_loss), params, unlabeled)
    with pytest.raises(TypeError, match="without 'loss'"):
        sj.hessian(sj.model_loss(apply), params, unlabeled)
    with pytest.raises(TypeError, match=r"'logits', which it has not: write the loss as loss_fn\(params, batch\)"):
        sj.hessian(sj.model_loss(lambda p, **kw: {"scores": apply(p, **kw)["logits"]}, lm_loss), params, data)
    with pytest.raises(TypeError, match="returned the model's outputs"):
        sj.hessian(sj.model_loss(lambda p, **kw: {"logits": apply(p, **kw)}, lambda out, y: out), params, data)
