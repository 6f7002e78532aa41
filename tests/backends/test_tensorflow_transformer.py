"""Dict batches of token ids and dict model outputs: a tiny Keras transformer against dense Hessians.

The dense truth is TensorFlow's tape Hessian with ``tf.nn.moments`` made twice differentiable
(Keras' LayerNormalization takes its variance around ``stop_gradient(mean)``, which makes the
plain tape Hessian wrong); the fixture checks it against central differences of gradients."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from specops.backends import tensorflow as stf

F64 = "float64"
VOCAB, DIM, LENGTH = 7, 4, 5


class TinyLM(keras.Model):
    """Embeddings, one pre-norm block (causal multi-head attention with a padding mask,
    LayerNorm, an MLP) and a vocabulary head; ``{"logits": ...}`` out, plus ``"loss"``
    when the inputs carry ``"labels"`` (the model shifts them, as Hugging Face's do)."""

    def __init__(self):
        super().__init__(dtype=F64)
        self.embed = keras.layers.Embedding(VOCAB, DIM, dtype=F64)
        self.position = self.add_weight(shape=(LENGTH, DIM), initializer="random_normal", dtype=F64,
                                        name="position")
        self.norm1 = keras.layers.LayerNormalization(dtype=F64)
        self.attention = keras.layers.MultiHeadAttention(2, DIM // 2, dtype=F64)
        self.norm2 = keras.layers.LayerNormalization(dtype=F64)
        self.mlp = keras.layers.Dense(DIM, activation="tanh", dtype=F64)
        self.head = keras.layers.Dense(VOCAB, dtype=F64)

    def call(self, inputs):
        x = self.embed(inputs["input_ids"]) + self.position
        keys = tf.cast(inputs["attention_mask"], tf.bool)[:, None, :]
        h = self.norm1(x)
        x = x + self.attention(h, h, attention_mask=keys, use_causal_mask=True)
        logits = self.head(x + self.mlp(self.norm2(x)))
        if "labels" not in inputs:
            return {"logits": logits}
        return {"logits": logits, "loss": lm_loss(inputs["labels"], logits)}


def lm_loss(labels, logits):
    """Causal-LM cross-entropy: token t predicts t+1; labels -100 (padding) left out."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(keep, labels, 0), logits)
    return tf.reduce_sum(tf.where(keep, ce, 0.0)) / tf.reduce_sum(tf.cast(keep, logits.dtype))


def batch(rng, n, pad):
    ids = rng.integers(0, VOCAB, size=(n, LENGTH))
    mask = np.ones((n, LENGTH), dtype=np.int32)
    mask[:pad, -2:] = 0  # the first `pad` sequences end in two padding tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def dense_hessian(loss, variables):
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = loss()
        g = tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in inner.gradient(value, variables)], 0)
    J = outer.jacobian(g, variables)
    return np.concatenate([np.reshape(j, (g.shape[0], -1)) for j in J], axis=1)


@pytest.fixture(scope="module")
def problem():
    keras.utils.set_random_seed(0)
    model = TinyLM()
    rng = np.random.default_rng(0)
    data = [batch(rng, 3, 2), batch(rng, 2, 1)]  # unequal batches, padded sequences in both
    model({k: v for k, v in data[0].items() if k != "labels"})  # builds the variables
    variables = model.trainable_variables

    def batch_loss(b):
        return lm_loss(tf.constant(b["labels"]), model({"input_ids": b["input_ids"],
                                                        "attention_mask": b["attention_mask"]})["logits"])

    # batches are weighted by their sample count (reduction="mean")
    def loss():
        return sum(len(b["labels"]) / 5 * batch_loss(b) for b in data)

    with stf._twice_differentiable():
        truth = dense_hessian(loss, variables)
    # independent of second-order autodiff: central differences of the gradient along v
    theta = [tf.identity(x) for x in variables]
    v = [tf.constant(rng.normal(size=x.shape) / 14) for x in variables]  # of norm about 1 (199 entries)

    def gradient_at(t):
        for x, tx, vx in zip(variables, theta, v):
            x.assign(tx + t * vx)
        with tf.GradientTape() as tape:
            value = loss()
        return np.concatenate([np.ravel(tf.convert_to_tensor(g)) for g in tape.gradient(value, variables)])

    h = 1e-5
    fd = (gradient_at(h) - gradient_at(-h)) / (2 * h)
    gradient_at(0.0)
    assert rel(truth @ np.concatenate([np.ravel(x) for x in v]), fd) < 1e-7
    return {"model": model, "data": data, "truth": truth}


@pytest.mark.parametrize("engine", ["double_backward", "forward_over_reverse"])
def test_dict_batches_and_dict_outputs_match_dense_hessian(problem, engine):
    """Both engines on single vectors; blocks on the default engine (the vectorized
    forward-over-reverse block is minutes to trace here, and is tested in test_tensorflow.py)."""
    H = stf.hessian(problem["model"], lm_loss, problem["data"], engine=engine)
    assert H.batch_sizes == [3, 2]
    V = np.random.default_rng(1).normal(size=(H.shape[0], 3))
    assert rel(H @ tf.constant(V[:, 0]), problem["truth"] @ V[:, 0]) < 1e-10
    if engine == "double_backward":
        assert rel(H @ tf.constant(V), problem["truth"] @ V) < 1e-10


def test_the_models_own_loss(problem):
    """loss_fn=None: the model gets the whole batch, labels included, and its 'loss' is used."""
    H = stf.hessian(problem["model"], None, problem["data"])
    V = np.random.default_rng(2).normal(size=(H.shape[0], 3))
    assert rel(H @ tf.constant(V), problem["truth"] @ V) < 1e-10


def test_errors_name_the_fix(problem):
    model, data = problem["model"], problem["data"]
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in data]
    with pytest.raises(TypeError, match="dict batch needs 'labels'"):
        stf.hessian(model, lm_loss, unlabeled)
    with pytest.raises(TypeError, match="without 'loss'"):
        stf.hessian(model, None, unlabeled)
    with pytest.raises(TypeError, match="returned the model's outputs.*outputs\\['logits'\\]"):
        stf.hessian(model, lambda model, batch: model(batch), data)
    no_logits = keras.Sequential([keras.layers.Lambda(lambda d: {"scores": tf.cast(d["input_ids"], F64)})])
    with pytest.raises(TypeError, match="'logits', which it has not.*loss_fn\\(model, batch\\)"):
        stf.hessian(no_logits, lm_loss, data, wrt=[tf.Variable(1.0, dtype=tf.float64)])
    with pytest.raises(TypeError, match="loss_fn\\(targets, outputs\\) failed.*name its first parameter `model`"):
        stf.hessian(model, lambda m, batch, extra: 0.0, data)
