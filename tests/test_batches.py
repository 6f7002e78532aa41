"""The batch conventions of specops.batches, and the backends that use them, on hand-made batches."""

from __future__ import annotations

import collections
import types

import numpy as np
import pytest

from specops import batches

CALL = "loss_fn(outputs, targets)"


def test_pairs_and_dicts_with_labels_split_into_inputs_and_targets():
    x, y = np.zeros((3, 2)), np.arange(3)
    for pair in ((x, y), [x, y]):
        inputs, targets = batches.split(pair, CALL)
        assert inputs is x and targets is y
    inputs, targets = batches.split({"input_ids": x, "mask": x, "labels": y}, CALL)
    assert list(inputs) == ["input_ids", "mask"] and targets is y
    with pytest.raises(TypeError, match=r"a dict batch needs 'labels'.*got keys \['x'\]; or write loss_fn\(model, batch\)"):
        batches.split({"x": x}, CALL)
    with pytest.raises(TypeError, match=r"with loss_fn\(outputs, targets\) every batch must be a pair.*got tuple.*"
                                        r"loss_form='model'"):
        batches.split((x, y, y), CALL)
    # a backend names its own general form (JAX: loss_fn(params, batch))
    general = "loss_fn(params, batch) and pass it to hessian directly"
    with pytest.raises(TypeError, match=r"or write loss_fn\(params, batch\) and pass it to hessian directly$"):
        batches.split({"x": x}, CALL, general)
    with pytest.raises(TypeError, match=r"write the loss as loss_fn\(params, batch\) and pass it to hessian directly$"):
        batches.split((x, y, y), CALL, general)
    with pytest.raises(TypeError, match=r"write the loss as loss_fn\(params, batch\) and pass it to hessian directly$"):
        batches.logits({"hidden": x}, CALL, general)


def test_dict_outputs_give_their_logits_and_the_model_its_own_loss():
    logits = np.ones((3, 4))
    assert batches.logits(logits, CALL) is logits
    assert batches.logits({"logits": logits, "loss": 1.0}, CALL) is logits
    assert batches.logits(types.SimpleNamespace(logits=logits), CALL) is logits
    with pytest.raises(TypeError, match=r"returns a dict with keys hidden; specops applies loss_fn\(outputs, "
                                        r"targets\) to its 'logits', which it has not"):
        batches.logits({"hidden": logits}, CALL)
    assert batches.own_loss({"loss": 2.0}, CALL) == 2.0
    assert batches.own_loss(types.SimpleNamespace(loss=3.0), CALL) == 3.0
    with pytest.raises(TypeError, match=r"returned a OrderedDict with keys logits without 'loss'; .*'labels'"):
        batches.own_loss(collections.OrderedDict(logits=logits), CALL)


def test_a_loss_that_returns_the_outputs_or_fails_is_explained():
    batches.check_not_outputs(np.float64(1.0))
    with pytest.raises(TypeError, match=r"returned the model's outputs \(a dict with keys logits\), not a scalar"):
        batches.check_not_outputs({"logits": 1})
    error = batches.loss_call_error("loss_fn(targets, outputs)", np.zeros((2, 3)), TypeError("bad operand"))
    assert isinstance(error, TypeError)
    assert "loss_fn(targets, outputs) failed: bad operand" in str(error)
    assert "a tensor of shape (2, 3)" in str(error) and "loss_form='model'" in str(error)


def test_the_batch_size_is_the_common_leading_dimension():
    assert batches.batch_size([np.zeros((5, 2)), np.zeros(5), np.float64(1.0), "text"]) == 5
    with pytest.raises(ValueError, match=r"leading dimensions \[4, 5\]"):
        batches.batch_size([np.zeros((5, 2)), np.zeros(4)])
    with pytest.raises(ValueError, match="no array with a leading dimension.*batch_size="):
        batches.batch_size([np.float64(1.0)])


def test_backends_count_samples_by_the_one_rule():
    """PyTorch and TensorFlow adapters give the rule's count, and refuse what it refuses."""
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    model = torch.nn.Linear(2, 3).double()
    adapter = st.TorchAdapter(model, torch.nn.CrossEntropyLoss())
    x, y = torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    assert adapter.batch_size((x, y)) == 4
    assert adapter.batch_size({"x": x, "labels": y, "scale": torch.tensor(2.0)}) == 4
    with pytest.raises(ValueError, match=r"leading dimensions \[3, 4\]"):
        adapter.batch_size((x, y[:3]))
    counted = st.TorchAdapter(model, torch.nn.CrossEntropyLoss(), batch_size=lambda b: 7)
    assert counted.batch_size((x, y[:3])) == 7
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from specops.backends import tensorflow as stf

    km = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    tf_adapter = stf.TFAdapter(km, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert tf_adapter.batch_size((tf.zeros((4, 2)), tf.zeros(4))) == 4
    with pytest.raises(ValueError, match=r"leading dimensions \[3, 4\]"):
        tf_adapter.batch_size((tf.zeros((4, 2)), tf.zeros(3)))
