"""Helpers shared by the benchmarks: peer discovery, the PyHessian shims, machine facts,
peak-memory probes and the Wasserstein-1 distance between spectral measures."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time

import numpy as np

#: Distribution names of the peer libraries (import name -> PyPI name).
PEERS = {
    "pyhessian": "PyHessian",
    "hessian_eigenthings": "hessian-eigenthings",
    "curvlinops": "curvlinops-for-pytorch",
    "matfree": "matfree",
}


def version(dist: str) -> str | None:
    """The installed version of a distribution, or ``None``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def found_peers() -> dict:
    """``{import name: version}`` for every peer that imports (absent ones are left out)."""
    found = {}
    for module, dist in PEERS.items():
        try:
            __import__(module)
        except Exception:  # noqa: BLE001, S112 - a broken install counts as absent, and is reported so
            continue
        found[module] = version(dist) or "?"
    return found


def shim_torch_eig() -> bool:
    """PyHessian 0.1's ``density()`` calls ``torch.eig(T, eigenvectors=True)``, removed from
    PyTorch; ``torch.linalg.eigh`` of the symmetric ``T`` gives the same eigenpairs.
    Returns whether the shim was installed."""
    import torch

    if hasattr(torch, "eig"):
        try:  # torch 2.x keeps a stub that raises "deprecated since version 1.9 and is now removed"
            torch.eig(torch.eye(1), eigenvectors=True)
            return False
        except RuntimeError:
            pass

    def eig(a, eigenvectors=False):
        w, v = torch.linalg.eigh(a)
        return torch.stack([w, torch.zeros_like(w)], dim=1), v

    torch.eig = eig
    return True


class PyHessianCounter:
    """Counts PyHessian's Hessian-vector products (both its single-batch and its data-loader
    product) and lets ``observe(v, Hv)`` watch every product, e.g. to stop on a residual."""

    def __init__(self, ph, observe=None):
        import sys

        import pyhessian.hessian  # noqa: F401 - the package re-exports the class under the module's name

        module = sys.modules["pyhessian.hessian"]
        self.count, self.module, self.ph, self.observe = 0, module, ph, observe
        self.orig_single, self.orig_loader = module.hessian_vector_product, ph.dataloader_hv_product

    def __enter__(self):
        def single(gradsH, params, v):
            self.count += 1
            hv = self.orig_single(gradsH, params, v)
            if self.observe is not None:
                self.observe(v, hv)
            return hv

        def loader(v):
            self.count += 1
            out = self.orig_loader(v)
            if self.observe is not None:
                self.observe(v, out[1])
            return out

        self.module.hessian_vector_product, self.ph.dataloader_hv_product = single, loader
        return self

    def __exit__(self, *exc):
        self.module.hessian_vector_product = self.orig_single
        del self.ph.dataloader_hv_product


def machine() -> dict:
    """CPU model, logical cores and the Python/platform strings."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> int | None:
    """Reset the process's peak resident set (Linux: ``echo 5 > /proc/self/clear_refs``)
    and return the current resident set in KiB (``None`` where this is not available)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_rss_kib() -> int | None:
    """The peak resident set (``VmHWM``) since the last :func:`reset_peak_rss`, in KiB."""
    return _status_kib("VmHWM")


def wasserstein1(nodes, weights, eigenvalues) -> float:
    """Wasserstein-1 distance between the discrete measure ``sum w_j delta(x - nodes_j)``
    (weights normalized to sum 1) and the uniform measure on ``eigenvalues``:
    ``int |F(x) - G(x)| dx`` over the merged breakpoints of both step CDFs."""
    nodes = np.asarray(nodes, dtype=np.float64).ravel()
    weights = np.asarray(weights, dtype=np.float64).ravel()
    keep = np.isfinite(nodes) & np.isfinite(weights)
    nodes, weights = nodes[keep], np.clip(weights[keep], 0.0, None)
    if weights.sum() <= 0:
        return float("inf")
    weights = weights / weights.sum()
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    xs = np.union1d(nodes, lam)
    order = np.argsort(nodes, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(weights[order])])
    F = cum[np.searchsorted(nodes[order], xs, side="right")]
    G = np.searchsorted(lam, xs, side="right") / len(lam)
    return float(np.sum(np.abs(F[:-1] - G[:-1]) * np.diff(xs)))


def timed_collectives(comm) -> dict:
    """Wrap ``comm``'s collectives to add their seconds and calls to the returned dict."""
    spent = {"seconds": 0.0, "calls": 0}

    def timed(fn):
        def run(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent["seconds"] += time.perf_counter() - t0
                spent["calls"] += 1
        return run

    for name in ("allreduce", "allreduce_host", "allgather", "bcast"):
        setattr(comm, name, timed(getattr(comm, name)))
    return spent
