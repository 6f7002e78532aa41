"""Two processes of one ``jax.distributed`` job (CPU, gloo) against one process: JaxComm."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import scenarios
from scenarios import assert_close

pytest.importorskip("jax")

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, timeout=300.0):
    """Two processes of ``jax_process_worker.py`` on a free port; their return codes, output and end time."""
    port = str(free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "jax_process_worker.py"), str(i), port, *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for i in (0, 1)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"the two JAX processes did not finish in {timeout:.0f} s (a hang?)")
    return [p.returncode for p in procs], logs, time.time()


def test_two_jax_processes_match_one_process(tmp_path):
    codes, logs, _ = launch([str(tmp_path)])
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for r in (0, 1):
        got = json.loads((tmp_path / f"basics-rank{r}.json").read_text())
        assert (got["rank"], got["size"], got["local_rank"], got["local_size"]) == (r, 2, r, 2)
        assert (got["int_sum"], got["int_type"], got["float_sum"], got["array_sum"]) == (3, "int", 1.5, [0.0, 3.0, 6.0])
        assert (got["allgather"], got["bcast"], got["agree"]) == ([0, 10], "from 1", ["same", 3])
    ranks = [json.loads((tmp_path / f"jax-unequal-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["transport"] == "device"  # JAX blocks summed by a compiled all-reduce, not on the host
    _, sizes = scenarios.PLAN["jax"]
    assert_close(ranks[0], scenarios.spectra(scenarios.build_jax(range(scenarios.NUM_SAMPLES)), **sizes),
                 "jax.distributed unequal")


def test_jax_comm_needs_jax_distributed():
    from specops.distributed import as_comm

    with pytest.raises(RuntimeError, match=r"jax.distributed is not initialized: call jax.distributed.initialize"):
        as_comm("jax")


def test_exception_on_one_process_ends_the_job(tmp_path):
    codes, logs, ended = launch([str(tmp_path), "raise"], timeout=120)
    assert codes[0] != 0 and codes[1] != 0, "a process succeeded although process 1 raised"
    raised = float(logs[1].split("rank 1 raises at ")[1].split()[0])
    assert ended - raised < 10.0, f"the job took {ended - raised:.1f} s to end after the failure"
    assert "uncaught exception on rank 1 of 2" in logs[1] and "deliberate failure on rank 1" in logs[1]
    assert "rank 0 finished" not in logs[0]
