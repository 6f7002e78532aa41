"""Hugging Face models out of the box: tiny random-init GPT-2, Llama, BERT and ViT configs.

Dict batches with attention masks and labels, ``ModelOutput`` outputs, the models' default
``"sdpa"`` attention (a fused kernel without double backward), against dense Hessians
(``torch_truth.dense_truth``) and across engines. No downloads: models come from configs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F
from torch_truth import dense_truth, rel

import specops
from specops.backends import torch as st

VOCAB = 11
transformers.logging.set_verbosity_error()


def causal_lm(logits, labels):
    """Next-token cross-entropy: the shift is the loss's, as the user writes it."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def classify(logits, labels):
    return F.cross_entropy(logits, labels)


def token_batch(rows=3, length=5, labels=None):
    ids = torch.randint(0, VOCAB, (rows, length))
    mask = torch.ones_like(ids)
    mask[0, length - 2:] = 0  # a padded sequence
    return {"input_ids": ids, "attention_mask": mask, "labels": ids if labels is None else labels}


def tiny(name, **kwargs):
    torch.manual_seed(0)
    tf = transformers
    if name == "gpt2":
        cfg = tf.GPT2Config(**{"vocab_size": VOCAB, "n_positions": 8, "n_embd": 6, "n_layer": 1, "n_head": 2,
                               **kwargs})
        return tf.GPT2LMHeadModel(cfg), token_batch(), causal_lm
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, **kwargs)
        return tf.LlamaForCausalLM(cfg), token_batch(), causal_lm
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=6, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8, max_position_embeddings=8, num_labels=2, **kwargs)
        return tf.BertForSequenceClassification(cfg), token_batch(labels=torch.tensor([0, 1, 1])), classify
    cfg = tf.ViTConfig(image_size=4, patch_size=2, num_channels=2, hidden_size=6, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=8, num_labels=3, **kwargs)
    return (tf.ViTForImageClassification(cfg),
            {"pixel_values": torch.randn(3, 2, 4, 4), "labels": torch.tensor([0, 2, 1])}, classify)


def logits_loss(loss_fn, batch):
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.items() if k != "labels"}
    return lambda call: loss_fn(call(**inputs).logits, batch["labels"])


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit"])
def test_products_match_the_dense_hessian_with_sdpa_attention(name):
    model, batch, loss_fn = tiny(name)
    model = model.double().eval()
    assert model.config._attn_implementation == "sdpa"  # the fused kernel path
    # Llama computes RMS norm and rotary embeddings in float32 even in a float64 model
    low = name == "llama"
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    HV = dense_truth(model, logits_loss(loss_fn, batch), fd_rtol=1e-3 if low else 1e-6, V=V)
    for engine in ("auto", "forward_over_reverse"):
        if low:
            with pytest.warns(RuntimeWarning, match=r"LlamaRMSNorm \(float32\).*float32 rounding only"):
                H = st.hessian(model, loss_fn, batch, engine=engine)
        else:
            H = st.hessian(model, loss_fn, batch, engine=engine)
        assert H.adapter.cross_check_error < (1e-6 if low else 1e-12)
        assert rel(H @ V, HV) < (1e-6 if low else 1e-12), engine


def test_eager_and_sdpa_attention_give_the_same_hessian_over_several_dict_batches():
    sdpa, batch, _ = tiny("gpt2", n_embd=4)
    eager, _, _ = tiny("gpt2", n_embd=4, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    batches = [batch, token_batch(rows=2)]
    ops = [st.hessian(m.double().eval(), causal_lm, batches) for m in (sdpa, eager)]
    # several batches: the mean over samples, weighted by rows
    f = [logits_loss(causal_lm, b) for b in batches]
    D = dense_truth(sdpa, lambda call: (3 * f[0](call) + 2 * f[1](call)) / 5)
    V = torch.randn(D.shape[0], 2, dtype=torch.float64)
    for H in ops:
        assert rel(H @ V, D @ V.numpy()) < 1e-12
    top = specops.eigsh(ops[0], k=2, tol=1e-8)
    assert np.allclose(top.eigenvalues, np.linalg.eigvalsh(D)[::-1][:2], rtol=1e-7)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_the_models_own_loss_when_the_batch_has_labels(name):
    """loss_fn=None: outputs.loss (float32, as Hugging Face computes it) against float64 truth."""
    model, batch, loss_fn = tiny(name)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    HV = dense_truth(model.double().eval(), logits_loss(loss_fn, batch), V=V)
    H = st.hessian(model.float(), None, batch)
    assert str(H.dtype) == "float32" and H.adapter.cross_check_error < 1e-5
    assert rel(H @ V.float(), HV) < 1e-5


def test_clear_errors_for_hugging_face_models():
    model, batch, _ = tiny("gpt2")
    model = model.double().eval()
    with pytest.raises(ValueError, match=r"computed in torch.float32 while the parameters are torch.float64"):
        st.hessian(model, None, batch)  # Hugging Face's loss casts the logits to float32
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(TypeError, match=r"without 'loss'; .*'labels'"):
        st.hessian(model.float(), None, unlabeled)
    with pytest.raises(TypeError, match=r"dict batch needs 'labels'"):
        st.hessian(model, causal_lm, unlabeled)

    def two_arguments(m, b):  # loss_fn(model, batch) with its first parameter not named model
        return m(**b).loss

    with pytest.raises(TypeError, match=r"name its first parameter `model` or pass loss_form='model'"):
        st.hessian(model, two_arguments, batch)

    def whole_outputs(model, batch):
        return model(**batch)

    with pytest.raises(TypeError, match=r"returned the model's outputs \(a CausalLMOutput.*return outputs.loss"):
        st.hessian(model, whole_outputs, batch)
    base = transformers.GPT2Model(model.config).double().eval()  # outputs without logits
    with pytest.raises(TypeError, match=r"last_hidden_state.*loss_fn\(model, batch\)"):
        st.hessian(base, causal_lm, batch)
    with torch.device("meta"):
        empty = transformers.GPT2LMHeadModel(model.config)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        st.hessian(empty, causal_lm, batch)
