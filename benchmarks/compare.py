"""specops against PyHessian, hessian-eigenthings, curvlinops and matfree: one command, one table.

Workloads (issue 7):

(a) accuracy: an MLP (64-40-10, tanh) trained briefly on scikit-learn's digits, float64, all
    1797 images as one batch; the dense Hessian (3010 x 3010) is the truth. For every library
    and a ladder of product budgets: relative error of the top-5 eigenvalues (max over the
    five), of the trace, and the Wasserstein-1 distance between the estimated spectral measure
    (SLQ quadrature nodes/weights) and the exact eigenvalue distribution, divided by the
    spectral width. Stochastic errors are medians over seeds. matfree runs on a JAX twin of
    the same MLP (same weights, so the same Hessian).
(b) speed: the ResNet-20 of ``specops.zoo`` on 3x32x32 inputs (scikit-learn digits upsampled
    to 32x32, grey copied to 3 channels), float32, batch norm in eval mode. Per library: wall
    and processor time, products and peak memory to reach (1) the top eigenvalue(s) at 1e-4
    relative residual, (2) the trace at 1% relative standard error, (3) an SLQ spectral
    density at a fixed budget. Every library runs in its own fresh subprocess per round, the
    libraries interleaved round by round; peak memory is the growth of the process's peak
    resident set (``VmHWM`` after ``echo 5 > /proc/self/clear_refs``) during the task.
    Ratios to specops are taken pair by pair within a round, then the median.

Peers are used, never installed: absent ones are reported and skipped. PyHessian 0.1's
``density()`` calls ``torch.eig`` (removed from PyTorch): it is shimmed with
``torch.linalg.eigh``. PyHessian makes its random vectors in the default dtype, so its
float64 runs are made with ``torch.set_default_dtype(torch.float64)``.

Layout: ``compare_problems.py`` (the two problems, the targets, the product counters),
``compare_peer_<library>.py`` (one runner module per library: ``accuracy(model, X, y)`` for
(a) and ``TASKS`` for (b)), ``compare_report.py`` (tables, verdicts, plots, results.md/json),
and this file (the command line, the two workloads' loops, the per-round subprocesses).

Run: ``python benchmarks/compare.py`` (about 10 minutes on 2 cores), ``--quick`` (about 2),
``--full``; results (Markdown, JSON, plots) go to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import compare_report  # noqa: E402
from compare_problems import eig_error, mlp_problem, relative_residuals, resnet_problem  # noqa: E402
from compare_report import LABEL  # noqa: E402

PRESETS = {
    # budgets (products) for (a), seeds for (a); ResNet images, rounds, top-k, caps, SLQ shape for (b)
    # trace_cap: the same-estimator (Hutchinson) protocol; auto_cap: specops' default estimator
    "quick": {"budgets": [20, 40, 80], "seeds": 5, "images": 8, "rounds": 1, "top_k": 1, "eig_cap": 100,
                  "trace_cap": 40, "auto_cap": 200, "slq": (1, 10)},
    "default": {"budgets": [10, 20, 40, 80, 160], "seeds": 20, "images": 16, "rounds": 3, "top_k": 5, "eig_cap": 400,
                    "trace_cap": 300, "auto_cap": 2000, "slq": (2, 20)},
    "full": {"budgets": [10, 20, 40, 80, 160, 320], "seeds": 40, "images": 128, "rounds": 5, "top_k": 5, "eig_cap": 2000,
                 "trace_cap": 2000, "auto_cap": 6000, "slq": (4, 40)},
}

#: The libraries of workload (b), specops first.
LIBRARIES = ("specops", "pyhessian", "hessian_eigenthings", "curvlinops")
#: Import name -> its runner module (matfree runs workload (a) only).
RUNNERS = {"specops": "compare_peer_specops", "pyhessian": "compare_peer_pyhessian",
           "hessian_eigenthings": "compare_peer_eigenthings", "curvlinops": "compare_peer_curvlinops",
           "matfree": "compare_peer_matfree"}


def runner(lib):
    """The runner module of a library (its peer is imported only when a runner runs)."""
    return importlib.import_module(RUNNERS[lib])


#: Workload (b): library -> task -> runner.
TASKS = {lib: runner(lib).TASKS for lib in LIBRARIES}


# ---------------------------------------------------------------------------- workload (a)
def accuracy_runners(model, X, y, peers):
    """``{name: {"eig"|"trace"|"density": fn}}`` of specops and every peer found (see the
    ``accuracy`` function of each runner module)."""
    runners = {}
    for lib in (*(["specops"] if "specops" in peers else []), *(p for p in _common.PEERS if p in peers)):
        runners.update(runner(lib).accuracy(model, X, y))
    return runners


def run_accuracy(cfg, peers, log):
    import torch

    torch.set_num_threads(cfg["threads"])
    t0 = time.perf_counter()
    model, X, y, info = mlp_problem()
    import hashlib

    from torch import nn

    from specops.backends import torch as st

    key = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]
    cache = os.path.join(cfg["out"], f"mlp_spectrum_{key}.npy")
    if os.path.exists(cache):  # the dense eigenvalues of these exact weights, from an earlier run
        lam = np.load(cache)
    else:
        D = st.hessian(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
        lam = np.linalg.eigvalsh((D + D.T) / 2)
        np.save(cache, lam)
    truth = {"top5": lam[::-1][:5], "trace": float(lam.sum()), "width": float(lam[-1] - lam[0])}
    n = len(lam)
    log(f"(a) MLP: {n} parameters, train accuracy {info['train_accuracy']:.3f}, "
        f"top-5 {np.round(truth['top5'], 4).tolist()}, lambda_min {lam[0]:.4g}, trace {truth['trace']:.5g} "
        f"({time.perf_counter() - t0:.1f} s)")
    runners = accuracy_runners(model, X, y, peers)
    seeds = range(cfg["seeds"])
    rows = []  # (task, library, budget, products, error)
    for task in ("eig", "trace", "density"):
        for name, fns in runners.items():
            if task not in fns:
                continue
            t1 = time.perf_counter()
            for m in cfg["budgets"]:
                t2 = time.perf_counter()
                errs, used = [], []
                for seed in seeds if task != "eig" else [0]:
                    if task == "density":
                        s = min(m, 20)
                        nodes, weights, count = fns[task](max(1, m // s), s, seed)
                        errs.append(_common.wasserstein1(nodes, weights, lam) / truth["width"])
                        used.append(count)
                    elif task == "trace":
                        est, count = fns[task](m, seed)
                        errs.append(abs(est - truth["trace"]) / abs(truth["trace"]))
                        used.append(count)
                    else:
                        out = fns[task](m, seed)
                        if isinstance(out, list):  # a ladder of (values, products), independent of m
                            for vals, count in out:
                                rows.append((task, name, None, count, eig_error(vals, truth["top5"])))
                            break
                        errs.append(eig_error(out[0], truth["top5"]))
                        used.append(out[1])
                if errs:  # eigenvalues: one deterministic run; trace and density: RMS over the seeds
                    rows.append((task, name, m, int(np.median(used)), float(np.sqrt(np.mean(np.square(errs))))))
                    log(f"    {task} {name} m={m}: error {rows[-1][-1]:.2g} ({time.perf_counter() - t2:.1f} s)")
                elif task == "eig":
                    break  # the ladder ran once
            log(f"  {task:7s} {name:28s} {time.perf_counter() - t1:6.1f} s")
    return {"truth": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in truth.items()},
                "n": n, "train": info, "rows": rows, "budgets": cfg["budgets"], "seeds": cfg["seeds"],
                "spectrum": lam.tolist()}



# ---------------------------------------------------------------------------- workload (b)
def worker(args):
    """One library, one round: eigenvalues, trace, density on the ResNet; prints one JSON line."""
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    _common.shim_torch_eig()
    model, X, y = resnet_problem(args.images)
    loss_fn = nn.CrossEntropyLoss()
    lib, seed, k = args.worker, args.round, args.top_k
    p, s = args.slq
    tasks = TASKS[lib]
    out = {"library": lib, "round": seed}
    for task in tasks:
        gc.collect()
        rss0 = _common.reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        res = tasks[task](model, loss_fn, X, y, seed=seed, k=k, p=p, s=s, eig_cap=args.eig_cap,
                          trace_cap=args.trace_cap, auto_cap=args.auto_cap)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _common.peak_rss_kib()
        vectors = res.pop("vectors", None)
        model.zero_grad(set_to_none=True)
        gc.collect()
        res.update(wall=wall, cpu=cpu, peak_mib=(peak - rss0) / 1024 if rss0 and peak else None)
        if task == "eig" and vectors is not None:
            res["residuals"] = relative_residuals(model, loss_fn, X, y, vectors, res["eigenvalues"])
        out[task] = res
    print("RESULT " + json.dumps(out), flush=True)



def run_speed(cfg, peers, log):
    libs = ["specops"] + [lib for lib in LIBRARIES[1:] if lib in peers]
    results = {lib: [] for lib in libs}
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    for r in range(cfg["rounds"]):
        order = libs if r % 2 == 0 else libs[::-1]  # interleaved, alternating order
        for lib in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--round", str(r),
                   "--images", str(cfg["images"]), "--threads", str(cfg["threads"]), "--top-k", str(cfg["top_k"]),
                   "--eig-cap", str(cfg["eig_cap"]), "--trace-cap", str(cfg["trace_cap"]),
                   "--auto-cap", str(cfg["auto_cap"]),
                   "--slq", str(cfg["slq"][0]), str(cfg["slq"][1])]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                log(f"  round {r} {lib}: FAILED\n{proc.stderr[-2000:]}")
                results[lib].append(None)
                continue
            res = json.loads(lines[-1][len("RESULT "):])
            results[lib].append(res)
            log(f"  round {r} {LABEL[lib]:20s} " + ", ".join(
                f"{task} {res[task]['wall']:6.1f} s ({res[task]['matvecs']})" for task in TASKS[lib])
                + f" [{time.perf_counter() - t0:.0f} s]")
    return results



# ---------------------------------------------------------------------------- command line
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 2 minutes")
    mode.add_argument("--full", action="store_true", help="larger budgets, 128 images, top-5, more rounds")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    # worker mode (internal) and overrides
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--eig-cap", type=int)
    parser.add_argument("--trace-cap", type=int)
    parser.add_argument("--auto-cap", type=int, help="budget of specops' default trace estimator")
    parser.add_argument("--slq", type=int, nargs=2, metavar=("PROBES", "STEPS"))
    parser.add_argument("--seeds", type=int, help="seeds of workload (a)")
    parser.add_argument("--budgets", type=int, nargs="+", help="product budgets of workload (a)")
    parser.add_argument("--libs", nargs="+", help="workload (a) for these libraries only (import names, "
                        "e.g. specops pyhessian): a piece of the table")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    cfg = dict(PRESETS["quick" if args.quick else "full" if args.full else "default"])
    for key in ("images", "rounds", "top_k", "eig_cap", "trace_cap", "auto_cap", "slq", "seeds", "budgets"):
        if getattr(args, key) is not None:
            cfg[key] = tuple(args.slq) if key == "slq" else getattr(args, key)
    cfg["threads"] = args.threads
    cfg["out"] = args.out
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    import torch

    shimmed = _common.shim_torch_eig()
    peers = _common.found_peers()
    missing = [_common.PEERS[m] for m in _common.PEERS if m not in peers]
    if args.libs:  # a piece of workload (a): only these libraries
        peers = {m: v for m, v in peers.items() if m in args.libs}
    import specops

    versions = dict(specops=specops.__version__, torch=torch.__version__, numpy=np.__version__,
                    **{_common.PEERS[m]: v for m, v in peers.items()})
    with contextlib.suppress(ImportError):
        import jax

        versions["jax"] = jax.__version__
    mach = _common.machine()
    preset = "quick" if args.quick else "full" if args.full else "default"
    log(f"machine: {mach['cpu']}, {mach['cores']} logical cores, Python {mach['python']}; threads {args.threads}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    log("peers found: " + (", ".join(f"{_common.PEERS[m]} {v}" for m, v in peers.items()) or "none")
        + ("; missing: " + ", ".join(missing) if missing else ""))
    if "pyhessian" in peers:
        log("PyHessian: torch.eig " + ("shimmed with torch.linalg.eigh (removed from this PyTorch)" if shimmed
                                       else "present, not shimmed"))
    t_start = time.perf_counter()
    acc = speed = None
    summary = {}
    if not args.skip_accuracy:
        log(f"\n(a) accuracy against the dense Hessian (budgets {cfg['budgets']}, {cfg['seeds']} seeds)")
        acc = run_accuracy(cfg, {**peers, **({"specops": specops.__version__}
                                             if not args.libs or "specops" in args.libs else {})}, log)
        table_a, goals_a = compare_report.report_accuracy(acc)
        compare_report.plot_accuracy(acc, os.path.join(args.out, "benchmark_accuracy.png"))
        summary["accuracy_goal"] = {t: all(v) for t, v in goals_a.items()}
    if not args.skip_speed:
        log(f"\n(b) ResNet-20 speed: {cfg['images']} images, {cfg['rounds']} rounds, top-{cfg['top_k']}, "
            f"trace cap {cfg['trace_cap']}, SLQ {cfg['slq'][0]}x{cfg['slq'][1]}")
        speed = run_speed(cfg, peers, log)
        table_b, suite = compare_report.report_speed(speed, cfg, {lib: list(TASKS[lib]) for lib in speed})
        compare_report.plot_speed(speed, os.path.join(args.out, "benchmark_resnet.png"))
        summary["suite_ratio_to_specops"] = suite
    elapsed = time.perf_counter() - t_start

    text = compare_report.write_results(
        args.out, preset=preset, cfg=cfg, mach=mach, versions=versions, missing=missing, shimmed=shimmed,
        threads=args.threads, elapsed=elapsed, acc=acc, speed=speed, summary=summary,
        table_a=table_a if acc else None, table_b=table_b if speed else None)
    print("\n" + text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
