"""Mixed precision: products, top eigenvalues and traces of bfloat16/float16 models against float32.

The same random-init models in float64 (the truth), float32, bfloat16 and float16 parameters
(products in the model's dtype, float32 vectors, float64 host work), and float32 parameters
under ``torch.autocast`` (bfloat16). Reported: the products' relative error against float64
on 4 random columns, the top eigenvalue (``eigsh``, ``tol=1e-3``) with its reported residual,
and a Hutch++ trace (60 products) with its standard error, against float64.

Models: a 2-layer GPT-2 (64 dimensions, transformers) on 4 x 16 tokens, and a ResNet-8 with
batch norm in eval mode on 16 3x16x16 inputs.

Run: ``python benchmarks/torch_mixed_precision.py`` (prints a Markdown table; a few minutes).
"""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import specops
from specops.backends import torch as st
from specops.zoo.torch_resnet import resnet


def upcast(x):
    """Half-precision logits to float32 for the loss (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def models():
    torch.manual_seed(0)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=64, n_layer=2, n_head=4)
        ids = torch.randint(0, 50, (4, 16))

        def causal(logits, labels):
            return F.cross_entropy(upcast(logits[:, :-1].flatten(0, 1)), labels[:, 1:].flatten())

        yield "GPT-2 (2 layers)", transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": ids, "labels": ids}, causal
    except ImportError:
        pass
    net = resnet(8, width=8, in_channels=3).eval()

    def ce(outputs, targets):
        return F.cross_entropy(upcast(outputs), targets)

    yield "ResNet-8", net, (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))), ce


SETTINGS = [("float64", torch.float64, None), ("float32", torch.float32, None),
            ("bfloat16 model", torch.bfloat16, None), ("float16 model", torch.float16, None),
            ("float32 + autocast(bfloat16)", torch.float32, torch.bfloat16)]


def main():
    print("| model | setting | product rel. error | top eigenvalue rel. error | its residual (reported) "
          "| trace rel. error | trace stderr / |trace| | seconds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, model, batch, loss_fn in models():
        truth = {}
        for label, dtype, autocast in SETTINGS:
            m = copy.deepcopy(model).to(dtype)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                H = st.hessian(m, loss_fn, batch, autocast=autocast, check_deterministic=False)
            n = H.shape[0]
            g = torch.Generator().manual_seed(1)
            V = torch.randn(n, 4, generator=g, dtype=torch.float64)
            HV = (H @ V.to(H.adapter.ops.torch_dtype)).double()
            try:
                top = specops.eigsh(H, k=1, tol=1e-3, max_matvecs=300)
                tr = specops.trace(H, method="hutch++", max_matvecs=60)
            except specops.NonFiniteError as e:
                print(f"| {name} | {label} | {float(torch.linalg.norm(HV - truth['HV']) / torch.linalg.norm(truth['HV'])):.1e}"
                      f" | {type(e).__name__}: {str(e)[:60]}... | | | | |")
                continue
            secs = time.perf_counter() - t0
            if label == "float64":
                truth = {"HV": HV, "top": float(top.eigenvalues[0]), "trace": float(tr.estimate)}
                print(f"| {name} (n={n:,}) | {label} | - | - ({truth['top']:.4g}) | {float(top.residuals[0]):.1e} "
                      f"| - ({truth['trace']:.4g}) | {tr.stderr / abs(tr.estimate):.1e} | {secs:.1f} |")
                continue
            err = float(torch.linalg.norm(HV - truth["HV"]) / torch.linalg.norm(truth["HV"]))
            top_err = abs(float(top.eigenvalues[0]) - truth["top"]) / abs(truth["top"])
            tr_err = abs(float(tr.estimate) - truth["trace"]) / abs(truth["trace"])
            print(f"| {name} | {label} | {err:.1e} | {top_err:.1e} | {float(top.residuals[0]):.1e} | {tr_err:.1e} "
                  f"| {tr.stderr / abs(tr.estimate):.1e} | {secs:.1f} |")


if __name__ == "__main__":
    main()
