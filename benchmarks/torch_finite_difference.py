"""Accuracy of the finite-difference engine against exact products, float32 and float64.

For each model, ``engine="finite_difference"`` with and without Richardson extrapolation is
compared with exact products (double backward of the same model in float64) on 4 random
columns: the relative error ``||HV_fd - HV|| / ||HV||`` (median over columns), and, with
Richardson, how the engine's own error estimate compares with the error it makes. Also the
step rule against steps 10x smaller and larger, to show where it sits.

Models (random init, no downloads): an MLP (tanh) on 64 inputs, a ResNet-8 with batch norm
in eval mode on 16 3x16x16 inputs, and, when ``transformers`` is installed, a 2-layer GPT-2
(64 dimensions) on 4 sequences of 16 tokens.

Run: ``python benchmarks/torch_finite_difference.py`` (prints a Markdown table; ~2 minutes).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from specops.backends import torch as st
from specops.zoo.torch_resnet import resnet


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    yield "MLP", mlp, (torch.randn(64, 64), torch.randint(0, 10, (64,))), nn.CrossEntropyLoss()
    net = resnet(8, width=8, in_channels=3).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    yield "ResNet-8", net, (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))), nn.CrossEntropyLoss()
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=64, n_layer=2, n_head=4)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (4, 16))

    def causal(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    yield "GPT-2 (2 layers)", gpt, {"input_ids": ids, "labels": ids}, causal


def rel_cols(A, B):
    return np.median(np.linalg.norm(A - B, axis=0) / np.linalg.norm(B, axis=0))


def main():
    rows = []
    for name, model, batch, loss_fn in models():
        m64 = copy.deepcopy(model).double()
        exact_op = st.hessian(m64, loss_fn, batch, engine="double_backward", check_deterministic=False)
        n = exact_op.shape[0]
        V = torch.randn(n, 4, dtype=torch.float64)
        exact = (exact_op @ V).numpy()
        for dtype in (torch.float32, torch.float64):
            m = copy.deepcopy(model).to(dtype)
            for richardson in (False, True):
                H = st.hessian(m, loss_fn, batch, engine="finite_difference", richardson=richardson,
                               check_deterministic=False)
                adapter = H.adapter
                batch_p = adapter._prepare(batch)
                Vd = V.to(dtype)
                errs = {}
                for factor in (0.1, 1.0, 10.0):
                    HV, est = adapter._finite_difference(batch_p, Vd, richardson, step_factor=factor)
                    errs[factor] = rel_cols(HV.double().numpy(), exact)
                    if factor == 1.0:
                        measured = np.linalg.norm(HV.double().numpy() - exact, axis=0)
                        ratio = np.median(est / measured) if est is not None else None
                rows.append((name, n, str(dtype).replace("torch.", ""), richardson, errs, ratio))
    print("| model | n | dtype | Richardson | rel. error (step rule) | step / 10 | step x 10 | estimate / error |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for name, n, dtype, rich, errs, ratio in rows:
        r = "-" if ratio is None else f"{ratio:.2g}"
        print(f"| {name} | {n} | {dtype} | {'yes' if rich else 'no'} | {errs[1.0]:.1e} | {errs[0.1]:.1e} | "
              f"{errs[10.0]:.1e} | {r} |")


if __name__ == "__main__":
    main()
