"""The sharded demonstration: a GPT-2-style transformer wrapped with FSDP2 over gloo processes.

Run ``python benchmarks/sharded_gpt2.py`` (CPU, gloo): it launches ``torchrun
--nproc_per_node P`` (``--ranks``, default 4) on a GPT-2 of random weights built from
``transformers.GPT2Config`` (default the 124 M one: 12 layers, width 768, 12 heads, the
50,257-token vocabulary; no download), dropout off, every block and the root wrapped with
``fully_shard`` on a 1-D mesh, ``--seqs`` random sequences of ``--seq`` tokens per rank
(next-token cross-entropy). Through ``st.hessian`` every rank computes

- the top eigenvalue by ``eigsh(k=1, block_size=1, tol=--tol, stop_on=--stop-on)`` (default:
  converged when its estimated error is below ``1e-4`` of it), with its verified residual;
- an SLQ density ``spectral_density(--probes x --steps, probes_at_once=--probes-at-once,
  reorth_window=--reorth-window)`` (defaults 3 x 20, one probe at a time, a window of 8: the
  Krylov vectors of 124 M parameters are 0.5 GB each, 124 MB per rank on 4 processes;
  ``--probes 0`` skips it);

and records its peak resident memory (``VmHWM``, Linux) before and during each, the bytes
of the Krylov vectors it held (``max_basis`` vectors for ``eigsh``, SLQ's ``basis_bytes``)
at its ``n/P`` rows and at the replicated design's ``n`` rows, the time per product, the
median of ``--reps`` FSDP2 forward+backward passes of the same data, and the seconds the
algorithms spent in their own collectives. A small config (``--layers 2 --embd 128
--heads 2 --vocab 1000 --ranks 2``) checks the script in a minute. One line per rank is
printed; ``--json FILE`` keeps everything.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def worker(out: str, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from _common import peak_rss_kib, reset_peak_rss, timed_collectives
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    import specops as so
    from specops.backends import torch as st

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (size,))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=max(args.seq, 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, args.vocab, (args.seqs, args.seq), generator=g)
    batch = (ids, ids)

    def next_token_loss(model, batch):
        logits = model(batch[0]).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[1][:, 1:].reshape(-1))

    def say(what: str) -> None:  # rank 0's phases, for a long run (no collective: progress= bars hang here)
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] {what}, RSS {(peak_rss_kib() or 0) / 1024:.0f} MiB peak",
                  file=sys.stderr, flush=True)

    gc.collect()
    rss_model = reset_peak_rss()
    say(f"model sharded over {size} ranks; building the operator")
    t0 = time.perf_counter()
    H = st.hessian(model, next_token_loss, batch, richardson=args.richardson)
    build_s = time.perf_counter() - t0
    n, local = H.shape[0], H.ops.count
    spent = timed_collectives(H.ops.comm)
    result = dict(ranks=size, rank=rank, n=n, local_rows=local, build_s=build_s,
                  rss_model_mib=None if rss_model is None else rss_model / 1024,
                  peak_build_mib=None if peak_rss_kib() is None else peak_rss_kib() / 1024, runs={})

    def run(name, fn, vectors_of):
        gc.collect()
        dist.barrier()
        say(f"starting {name}")
        before = reset_peak_rss()
        products0, seconds0 = H.num_matvecs, H.matvec_seconds
        spent.update(seconds=0.0, calls=0)
        t0 = time.perf_counter()
        res = fn()
        seconds = time.perf_counter() - t0
        peak = peak_rss_kib()
        vectors = vectors_of(res)
        products = H.num_matvecs - products0
        result["runs"][name] = dict(
            rss_before_mib=None if before is None else before / 1024,
            peak_mib=None if peak is None else peak / 1024,
            added_mib=None if before is None or peak is None else (peak - before) / 1024,
            krylov_vectors=vectors, krylov_mib=vectors * local * 4 / 2**20,
            replicated_krylov_mib=vectors * n * 4 / 2**20, seconds=seconds, products=products,
            product_s=(H.matvec_seconds - seconds0) / max(products, 1),
            collective_s=spent["seconds"], collectives=spent["calls"])
        return res

    basis = args.max_basis
    eig = run("eigsh", lambda: so.eigsh(H, k=1, block_size=1, tol=args.tol, max_basis=basis, seed=0,
                                        max_matvecs=args.max_matvecs, stop_on=args.stop_on), lambda r: basis + 2)
    result["runs"]["eigsh"].update(eigenvalue=float(eig.eigenvalues[0]), residual=float(eig.residuals[0]),
                                   error_estimate=float(eig.error_estimates[0]),
                                   converged=bool(eig.converged[0]))
    say("eigsh: top eigenvalue {eigenvalue:.6g}, error estimate {error_estimate:.3g}, residual {residual:.3g}, "
        "converged {converged}, {products} products".format(**result["runs"]["eigsh"]))
    if args.fd_check:
        check = H.step_check(eig.eigenvectors[:, :1])
        result["fd_check"] = {k: np.asarray(v).ravel().tolist() for k, v in check.items()}
        say("the step's error (H.step_check): Rayleigh quotients of the eigenvector at h/2, h, 2h: {quotients}, "
            "ratio {ratio} (4: truncation), extrapolated {extrapolated}, error at h {error}".format(**result["fd_check"]))
    if args.probes:  # --probes 0: the eigenvalue alone
        dens = run("spectral_density", lambda: so.spectral_density(H, num_probes=args.probes, num_steps=args.steps,
                                                                   seed=0, probes_at_once=args.probes_at_once,
                                                                   reorth_window=args.reorth_window),
                   lambda r: r.settings["basis_bytes"] // (4 * local) + 1)
        result["runs"]["spectral_density"].update(
            nodes=[[float(x) for x in row] for row in dens.nodes], weights=[[float(x) for x in row] for row in dens.weights],
            settings={k: v for k, v in dens.settings.items() if isinstance(v, (int, float, str, type(None)))})
    say("timing products against forward+backward")
    v = eig.eigenvectors[:, 0]
    fd, fb = [], []
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        H @ v
        fd.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        next_token_loss(model, batch).backward()
        fb.append(time.perf_counter() - t0)
        for p in model.parameters():
            p.grad = None
    result.update(product_s=statistics.median(fd), forward_backward_s=statistics.median(fb),
                  ratio=statistics.median(fd) / statistics.median(fb))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--seqs", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--stop-on", default="eigenvalue", choices=("eigenvalue", "residual"))
    parser.add_argument("--max-basis", type=int, default=8)
    parser.add_argument("--max-matvecs", type=int, default=100)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reorth-window", type=int, default=8)
    parser.add_argument("--probes-at-once", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--richardson", action="store_true",
                        help="Richardson-extrapolated products (four gradients each instead of two)")
    parser.add_argument("--fd-check", action="store_true",
                        help="after eigsh, the step's error along the eigenvector (H.step_check: its Rayleigh "
                             "quotient at steps h/2, h and 2h)")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    with tempfile.TemporaryDirectory() as out:
        forward = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
                   if k not in ("json", "worker") and v is not None and v is not False]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               __file__, "--worker", out, *forward]
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        subprocess.run(cmd, check=True, env=env)
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(args.ranks)]
    r0 = ranks[0]
    e = r0["runs"]["eigsh"]
    print(f"n = {r0['n']:,} parameters over {args.ranks} processes; top eigenvalue {e['eigenvalue']:.6g}, "
          f"residual {e['residual']:.3g}, error estimate {e['error_estimate']:.3g} (converged {e['converged']}), {e['products']} products")
    print(f"product {r0['product_s']:.2f} s = {r0['ratio']:.2f} x FSDP2 forward+backward ({r0['forward_backward_s']:.2f} s)")
    print("rank  rows      model MiB  algorithm          peak MiB  added MiB  Krylov MiB  replicated Krylov MiB  "
          "collectives/products")
    for r in ranks:
        for name, m in r["runs"].items():
            share = m["collective_s"] / max(m["product_s"] * m["products"], 1e-12)
            print(f"{r['rank']:4d}  {r['local_rows']:9d} {r['rss_model_mib'] or 0:9.0f}  {name:17s} "
                  f"{m['peak_mib'] or 0:9.0f} {m['added_mib'] or 0:10.0f} {m['krylov_mib']:11.0f} "
                  f"{m['replicated_krylov_mib']:22.0f}  {share:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ranks, f, indent=1)


if __name__ == "__main__":
    main()
