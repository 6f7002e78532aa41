"""Tasks on models people use, random init, CPU: a GPT-2-style transformer (29.5 M parameters,
``transformers``' GPT2LMHeadModel) and ResNet-50 (25.6 M, the torchvision layout built in
``torch_models.py``), with specops and the peers hessian-eigenthings and curvlinops on the same
model, weights and batch.

Per model:

1. **products**: one gradient of the loss (``torch.autograd.grad`` on the model's own
   parameters), then one Hessian-vector product of each library, as a ratio to it (rounds of all
   candidates in turn, medians of per-round ratios), and each product's relative difference from
   specops' ``double_backward`` product of the same vector (an exact reverse-over-reverse
   reference). Also each operator's construction time (specops: its defaults, i.e. with the
   engine cross-check and the determinism check).
2. **tasks**, each timed once and given in seconds and in gradients (the task's time over the
   median gradient, so a changing machine load cancels in part): the top-5 eigenvalues
   (specops ``eigsh(k=5, tol)``; hessian-eigenthings ``lanczos`` with as many steps as specops
   used; curvlinops SciPy ARPACK on ``to_scipy()`` with ``tol``), their relative residuals
   ``||Hv - lambda v|| / |lambda|`` (peers' measured here with specops' products), a trace to a
   relative standard error (Hutchinson samples pooled until ``stderr <= rtol |estimate|`` or a
   product cap), and an SLQ density (probes x steps), each with its products and the peak
   resident memory of the process during the task.

A peer that fails on a model is recorded with its error. Hessian-eigenthings and curvlinops
cannot differentiate the CPU flash-attention kernel of ``attn_implementation="sdpa"`` (the
transformers default) twice, so after recording that error they run on the same weights with
``attn_implementation="eager"`` (the same function; specops switches SDPA to its math kernel
itself).

Run (about 20 min per model on a loaded 2-core machine; one process per model may run side by
side): ``python benchmarks/large_models.py --models gpt2 --threads 1``. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_models as tm  # noqa: E402
from _common import peak_rss_kib, reset_peak_rss  # noqa: E402

import specops  # noqa: E402
from specops.backends import torch as st  # noqa: E402

VOCAB = 8192


def gpt2(attn="sdpa"):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=512, n_layer=8, n_head=8,
                                  attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg)


class LMLogits(nn.Module):
    """``input_ids -> shifted logits (tokens, vocab)``: a causal LM for a tensor-to-tensor API."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits[:, :-1].flatten(0, 1)


def problem(name, args, attn="sdpa"):
    """(model, specops loss_fn, batch, loss(model, batch), curvlinops (module, X, y), sizes)."""
    torch.manual_seed(0)
    if name == "gpt2":
        model = gpt2(attn).eval()
        ids = torch.randint(0, VOCAB, (args.seqs, args.seq_len))
        batch = {"input_ids": ids, "labels": ids}

        def loss(m, b):
            return tm.causal_lm(m(input_ids=b["input_ids"]).logits, b["labels"])

        return (model, tm.causal_lm, batch, loss, (LMLogits(model), ids, ids[:, 1:].flatten()),
                f"{args.seqs} x {args.seq_len} tokens")
    model = tm.resnet50().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    X = torch.randn(args.images, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.images,))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    return model, nn.CrossEntropyLoss(), (X, y), loss, (model, X, y), f"{args.images} x 3 x {args.size}^2 images"


class Peer:
    """One library's operator on a model: ``mv(v)`` (flat torch vector), a product counter."""

    def __init__(self, label, mv):
        self.label, self._mv, self.count = label, mv, 0

    def mv(self, v):
        self.count += 1
        return self._mv(v)


def eigenthings(model, batch, loss):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [batch], loss)
    peer = Peer("hessian-eigenthings", op.matvec)
    op.matvec = peer.mv  # count the algorithms' products too
    peer.op = op
    return peer


def curvlinops_op(module, X, y):
    from curvlinops import HessianLinearOperator

    A = HessianLinearOperator(module, nn.CrossEntropyLoss(), [p for p in module.parameters() if p.requires_grad],
                              [(X, y)], check_deterministic=False)
    peer = Peer("curvlinops", lambda v: (A @ v[:, None])[:, 0])
    orig = A._matmat

    def matmat(M):  # count every column the algorithms multiply
        peer.count += int(M[0].shape[-1])
        if peer.limit is not None and peer.count > peer.limit:
            raise RuntimeError(f"product cap of {peer.limit} reached")
        return orig(M)

    A._matmat = matmat
    peer.A, peer.limit = A, None
    return peer


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measured(fn):
    """``fn()``, its seconds and the process's peak resident memory meanwhile (GB)."""
    reset_peak_rss()
    out, t = timed(fn)
    peak = peak_rss_kib()
    return out, t, (peak / 2**20 if peak else float("nan"))


def rel(a, b):
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def first_line(e):
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) < 160 else text[:157] + "..."


def hutchinson(sample, n_cap, rtol, minimum=10):
    """Pool single-probe samples until ``stderr <= rtol |mean|`` (after ``minimum``) or ``n_cap``."""
    samples = []
    while len(samples) < n_cap:
        samples.append(float(sample(len(samples))))
        if len(samples) >= minimum:
            mean, err = np.mean(samples), np.std(samples, ddof=1) / np.sqrt(len(samples))
            if err <= rtol * abs(mean):
                break
    mean, err = float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(len(samples)))
    return mean, err


def residuals(H, values, vectors):
    """Relative residuals ``||H v - lambda v|| / |lambda|`` of unit columns, with specops' products."""
    V = torch.as_tensor(np.asarray(vectors), dtype=torch.float32) if not torch.is_tensor(vectors) else vectors.float()
    V = V / torch.linalg.vector_norm(V, dim=0)
    lam = torch.as_tensor(np.asarray(values, dtype=np.float32))
    R = H @ V - V * lam
    return (torch.linalg.vector_norm(R, dim=0) / lam.abs()).numpy()


def fmt_vals(vals):
    return ", ".join(f"{float(x):.4g}" for x in vals)


def run_model(name, args, out):
    model, loss_fn, batch, loss, (cl_module, cl_X, cl_y), sizes = problem(name, args)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    out(f"\n### {name}: {n / 1e6:.1f} M parameters, {sizes}, float32\n")

    def gradient():
        return torch.autograd.grad(loss(model, batch), params)

    H, t_build = timed(lambda: st.hessian(model, loss_fn, batch))  # the defaults a user gets
    ref = st.hessian(model, loss_fn, batch, engine="double_backward", cross_check=False, check_deterministic=False)
    construct = {"specops": f"{t_build:.1f} s (engine {H.engine}; cross-check difference "
                            f"{H.adapter.cross_check_error:.1g}; determinism check)"}
    peers, failures = {}, {}
    for label, make in (("hessian-eigenthings", lambda m, b, L, c: eigenthings(m, b, L)),
                        ("curvlinops", lambda m, b, L, c: curvlinops_op(*c))):
        if label not in args.libs:
            continue
        try:
            p, t = timed(lambda: make(model, batch, loss, (cl_module, cl_X, cl_y)))
            p.mv(torch.randn(n))  # the first product shows whether it can differentiate twice at all
            p.count = 0
            peers[label] = p
            construct[label] = f"{t:.1f} s"
        except Exception as e:  # noqa: BLE001 - recorded in the table
            failures[label] = first_line(e)
            if name != "gpt2":
                construct[label] = f"failed: {failures[label]}"
                continue
            # the documented fix for them: eager attention, the same weights
            eager = gpt2("eager").eval()
            eager.load_state_dict(model.state_dict())
            em = LMLogits(eager)
            try:
                p, t = timed(lambda: make(eager, batch, loss, (em, cl_X, cl_y)))
                p.mv(torch.randn(n))
                p.count = 0
                p.label += " (eager attention)"
                peers[label] = p
                construct[label] = f"{t:.1f} s, eager attention (sdpa: {failures[label]})"
            except Exception as e2:  # noqa: BLE001
                construct[label] = f"failed with sdpa ({failures[label]}) and eager ({first_line(e2)})"
    for label, text in construct.items():
        out(f"- construction, {label}: {text}")

    # --- 1. products against gradients, side by side ------------------------------------------
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    V = torch.randn(n, 4, generator=torch.Generator().manual_seed(2))
    H @ v  # builds the cached graph (the first pass)
    truth = ref @ v
    cands = {"specops H @ v": lambda: H @ v, "specops H @ V (4), per column": lambda: H @ V}
    cands.update({f"{p.label} matvec": (lambda p=p: p.mv(v)) for p in peers.values()})
    errors = {"specops H @ v": rel(H @ v, truth)}
    for p in peers.values():
        errors[f"{p.label} matvec"] = rel(p.mv(v).detach(), truth)
    ratios = {k: [] for k in cands}
    grads = []
    for _ in range(args.repeats):
        _, g = timed(gradient)
        grads.append(g)
        for k, f in cands.items():
            _, t = timed(f)
            ratios[k].append(t / (4 if "V (4)" in k else 1) / g)
    g_med = statistics.median(grads)
    out(f"\nGradient: median {g_med:.2f} s over {args.repeats} rounds.\n")
    out("| product | / gradient (median of rounds) | relative difference from reverse-over-reverse |")
    out("| --- | ---: | ---: |")
    for k in cands:
        err = errors.get(k)
        out(f"| {k} | {statistics.median(ratios[k]):.2f} | {'-' if err is None else f'{err:.1g}'} |")
    for p in peers.values():
        p.count = 0

    # --- 2. tasks -------------------------------------------------------------------------------
    out("\n| task | library | how | products | seconds | gradients | peak RSS (GB) | result |")
    out("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")

    def row(task, lib, how, products, t, peak, result):
        out(f"| {task} | {lib} | {how} | {products} | {t:.0f} | {t / g_med:.0f} | {peak:.1f} | {result} |")

    def attempt(task, lib, how, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded in the table
            traceback.print_exc(file=sys.stderr)
            out(f"| {task} | {lib} | {how} | - | - | - | - | **failed**: {first_line(e)} |")

    k, tol = 5, args.eig_tol
    budget = {"m": args.eig_cap}
    if "eig" in args.tasks:
        found = {}

        def sp_eig(stop_on):
            how = f"eigsh(k={k}, tol={tol:g}, max_matvecs={args.eig_cap}, stop_on={stop_on!r})"
            r, t, peak = measured(lambda: specops.eigsh(H, k=k, tol=tol, max_matvecs=args.eig_cap, stop_on=stop_on))
            rr = r.residuals / np.abs(r.eigenvalues)
            found[stop_on] = r
            if stop_on == "residual":
                budget["m"] = min(int(r.num_matvecs), args.eig_cap)
            row("top-5", "specops", how, r.num_matvecs, t, peak,
                f"λ {fmt_vals(r.eigenvalues)}; max rel. residual {rr.max():.1g}; max rel. eigenvalue error "
                f"estimate {np.max(r.error_estimates / np.abs(r.eigenvalues)):.1g}; "
                f"{int(r.converged.sum())}/{k} converged")

        for stop_on in args.stop_on:
            attempt("top-5", "specops", f"eigsh, stop_on={stop_on!r}", lambda: sp_eig(stop_on))
        if len(found) == 2:  # the eigenvalue rule's eigenvalues against the residual rule's (more products)
            a, b = found["eigenvalue"].eigenvalues, found["residual"].eigenvalues
            out(f"\nTop-{k}: the eigenvalue rule's eigenvalues differ from the residual rule's by at most "
                f"{np.max(np.abs(a - b) / np.abs(b)):.1g} (relative), with "
                f"{found['eigenvalue'].num_matvecs / found['residual'].num_matvecs:.2f} x its products.\n")
        if "hessian-eigenthings" in peers:
            p = peers["hessian-eigenthings"]

            def he_eig():
                import hessian_eigenthings as he

                m = max(budget["m"], 2 * k)
                p.count = 0
                r, t, peak = measured(lambda: he.lanczos(p.op, k=k, max_iter=m, which="LA", tol=tol, seed=0))
                vals = r.eigenvalues.numpy()
                rr = residuals(H, vals, r.eigenvectors.T.detach())
                row("top-5", p.label, f"lanczos(k={k}, max_iter={m}, tol={tol:g}) (specops' products)", p.count, t,
                    peak, f"λ {fmt_vals(vals)}; max rel. residual {rr.max():.1g} (specops products)")

            attempt("top-5", p.label, "lanczos", he_eig)
        if "curvlinops" in peers:
            p = peers["curvlinops"]

            def cl_eig():
                from scipy.sparse.linalg import eigsh as arpack

                p.count, p.limit = 0, args.eig_cap
                v0 = np.random.default_rng(0).standard_normal(n)
                how = f"scipy eigsh(to_scipy(), k={k}, tol={tol:g}) (ARPACK), cap {args.eig_cap}"
                try:
                    (vals, vecs), t, peak = measured(lambda: arpack(p.A.to_scipy(), k=k, which="LA", tol=tol, v0=v0))
                finally:
                    p.limit = None
                order = np.argsort(vals)[::-1]
                rr = residuals(H, vals[order], vecs[:, order])
                row("top-5", p.label, how, p.count, t, peak,
                    f"λ {fmt_vals(vals[order])}; max rel. residual {rr.max():.1g} (specops products)")

            attempt("top-5", p.label, "ARPACK", cl_eig)

    if "trace" in args.tasks:
        rtol, cap = args.trace_rtol, args.trace_cap

        def tr_row(lib, how, est, err, products, t, peak):
            reached = err <= rtol * abs(est)
            row("trace", lib, how, products, t, peak,
                f"{est:.5g} ± {err / abs(est):.1%}" + ("" if reached else f" — **{rtol:.0%} NOT reached**"))

        def sp_trace():
            r, t, peak = measured(lambda: specops.trace(H, max_matvecs=cap, rtol=rtol, seed=0))
            tr_row("specops", f"trace(rtol={rtol:g}, max_matvecs={cap}) ({r.settings.get('estimator')})",
                   r.estimate, r.stderr, r.num_matvecs, t, peak)

        attempt("trace", "specops", "trace", sp_trace)
        if "hessian-eigenthings" in peers:
            p = peers["hessian-eigenthings"]

            def he_trace():
                import hessian_eigenthings as he

                p.count = 0
                (est, err), t, peak = measured(lambda: hutchinson(
                    lambda i: he.hutchinson(p.op, num_samples=1, seed=i).samples[0], cap, rtol))
                tr_row(p.label, f"hutchinson() one probe at a time until stderr <= {rtol:.0%}, cap {cap}", est, err,
                       p.count, t, peak)

            attempt("trace", p.label, "hutchinson", he_trace)
        if "curvlinops" in peers:
            p = peers["curvlinops"]

            def cl_trace():
                from curvlinops import hutchinson_trace

                def sample(i):
                    torch.manual_seed(i)
                    return hutchinson_trace(p.A, 1)

                p.count = 0
                (est, err), t, peak = measured(lambda: hutchinson(sample, cap, rtol))
                tr_row(p.label, f"hutchinson_trace(A, 1) pooled until stderr <= {rtol:.0%}, cap {cap}", est, err,
                       p.count, t, peak)

            attempt("trace", p.label, "hutchinson_trace", cl_trace)

    if "density" in args.tasks:
        P, S = args.probes, args.steps

        def summary(nodes, weights):
            nodes, weights = np.nan_to_num(np.asarray(nodes, float)), np.asarray(weights, float)
            return (f"nodes in [{nodes.min():.3g}, {nodes.max():.3g}]; SLQ trace "
                    f"{float((nodes * weights).sum(1).mean()) * n:.4g}")

        def sp_density():
            r, t, peak = measured(lambda: specops.spectral_density(H, num_probes=P, num_steps=S, seed=0))
            s = r.settings
            row("density", "specops", f"spectral_density({P} x {S}), {s.get('probes_at_once')} probes at once",
                r.num_matvecs, t, peak, summary(r.nodes, r.weights))

        attempt("density", "specops", "spectral_density", sp_density)
        if "hessian-eigenthings" in peers:
            p = peers["hessian-eigenthings"]

            def he_density():
                import hessian_eigenthings as he

                p.count = 0
                r, t, peak = measured(lambda: he.spectral_density(p.op, num_runs=P, lanczos_steps=S, seed=0))
                row("density", p.label, f"spectral_density(num_runs={P}, lanczos_steps={S})", p.count, t, peak,
                    summary(r.raw_eigenvalues.numpy(), r.raw_weights.numpy()))

            attempt("density", p.label, "spectral_density", he_density)
        if "curvlinops" in peers:
            p = peers["curvlinops"]

            def cl_density():
                from curvlinops.papyan2020traces.spectrum import fast_lanczos

                def go():
                    torch.manual_seed(0)
                    nodes, weights = [], []
                    for _ in range(P):
                        evals, evecs = fast_lanczos(p.A, S)
                        nodes.append(evals.numpy())
                        weights.append(evecs[0].numpy() ** 2)
                    return nodes, weights

                p.count = 0
                (nodes, weights), t, peak = measured(go)
                row("density", p.label, f"fast_lanczos(A, {S}) x {P} (no reorthogonalization)", p.count, t, peak,
                    summary(nodes, weights))

            attempt("density", p.label, "fast_lanczos", cl_density)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "resnet50"], choices=["gpt2", "resnet50"])
    ap.add_argument("--libs", nargs="+", default=["specops", "hessian-eigenthings", "curvlinops"])
    ap.add_argument("--tasks", nargs="+", default=["eig", "trace", "density"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, loaded machine 2 threads were 7x slower)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--eig-tol", type=float, default=1e-3)
    ap.add_argument("--eig-cap", type=int, default=60, help="product cap of the eigenvalue task")
    ap.add_argument("--stop-on", nargs="+", default=["residual"], choices=["residual", "eigenvalue"],
                    help="eigsh's stopping rules to run (both: products to the same eigenvalue accuracy)")
    ap.add_argument("--trace-rtol", type=float, default=0.05)
    ap.add_argument("--trace-cap", type=int, default=30)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    def out(line):
        print(line, flush=True)

    out(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
        f"{args.repeats} rounds; eig tol {args.eig_tol:g} (cap {args.eig_cap} products), trace to "
        f"{args.trace_rtol:.0%} (cap {args.trace_cap}), SLQ {args.probes} x {args.steps}")
    for name in args.models:
        run_model(name, args, out)


if __name__ == "__main__":
    main()
