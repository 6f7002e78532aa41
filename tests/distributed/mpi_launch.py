"""Launching ``mpiexec`` and ``torchrun`` from pytest, with a hard time limit and a clear skip where
MPI or torch.distributed is missing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
TORCH_WORKER = os.path.join(HERE, "torch_worker.py")


def find_mpiexec() -> str | None:
    """``$SPECOPS_MPIEXEC``, else the ``mpiexec`` beside this Python (the mpich wheel's), else PATH."""
    if os.environ.get("SPECOPS_MPIEXEC"):
        return os.environ["SPECOPS_MPIEXEC"]
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    ended: float  # time.time() when the launcher had exited

    def seconds_after(self, marker: str) -> float:
        """Seconds from the ``time.time()`` a worker printed after ``marker`` to the launcher's end."""
        for line in self.stdout.splitlines():
            if line.startswith(marker):
                return self.ended - float(line[len(marker):].split()[0])
        raise AssertionError(f"no line {marker!r} in the output:\n{self.stdout[-2000:]}")


def launch(args, ranks: int = 2, timeout: float = 120.0, env: dict | None = None) -> Launch:
    """``mpiexec -n ranks python args...``, killed (with every rank) after ``timeout`` seconds.

    ``env`` adds environment variables; threads are limited to one per rank.
    """
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed: pip install 'specops[mpi]' (mpi4py and the mpich wheel)")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec found: pip install mpich, or set SPECOPS_MPIEXEC to your MPI's launcher")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, *map(str, args)]
    return _run(cmd, timeout, dict(env or {}, MPIEXEC_TIMEOUT=str(int(timeout) + 5)))


def torchrun(args, nproc: int = 2, timeout: float = 120.0, env: dict | None = None) -> Launch:
    """``torchrun --standalone --nproc_per_node nproc args...`` (gloo on the CPU), killed after ``timeout``."""
    try:
        import torch.distributed as dist
    except ImportError:
        pytest.skip("PyTorch is not installed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this PyTorch has no torch.distributed with gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *map(str, args)]
    return _run(cmd, timeout, dict(env or {}, CUDA_VISIBLE_DEVICES=""))


def _run(cmd, timeout, env) -> Launch:
    env = dict(os.environ, **env, OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout:.0f} s (a hang?)\n"
                    f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return Launch(proc.returncode, out, err, time.perf_counter() - t0, time.time())
