"""HSDP with tensor parallelism: a (replicate, shard, tp) = (2, 2, 2) gloo mesh of 8 processes, against one process.

One ``torchrun --nproc_per_node 8 hsdp_tp_worker.py`` launch. The second replica's ranks
hold copies of the first's rows (not owners), the first rank along ``tp`` the rows of the
parameters the plan leaves whole; the truth is the unsharded backend's exact products on
the four data groups' collective batches.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mpi_launch import torchrun

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.tensor.parallel")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp_tp")
    run = torchrun([os.path.join(HERE, "hsdp_tp_worker.py"), out], nproc=8, timeout=400)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stderr[-4000:]}"
    return [json.loads((out / f"hsdp-tp-rank{r}.json").read_text()) for r in range(8)]


def test_hsdp_with_tensor_parallelism_matches_one_process(ranks):
    got, one = ranks[0]["hsdp_tp"], ranks[0]["one"]
    for key in ("eigenvalues", "hutchinson", "xtrace", "nodes", "weights", "product", "loss", "gradient"):
        a, b = np.asarray(got[key]), np.asarray(one[key])
        assert np.abs(a - b).max() <= 1e-9 * np.abs(b).max(), key
    assert got["converged"] == one["converged"]
    for rank in ranks[1:]:  # every rank, replica or not, holds the same host results
        for key in ("eigenvalues", "hutchinson", "xtrace", "nodes", "weights", "loss"):
            assert rank["hsdp_tp"][key] == got[key], key


def test_the_second_replica_copies_the_first(ranks):
    """n = 123 over the 4 ranks of a replica (the tp-replicated rows with tp coordinate 0), again on the next 4."""
    assert [rank["hsdp_tp"]["rows"] for rank in ranks] == [35, 33, 28, 27] * 2
    assert [rank["hsdp_tp"]["owner"] for rank in ranks] == [True] * 4 + [False] * 4
    assert "(Replicate(), _StridedShard(dim=0, sf=2), Shard(dim=0))" in ranks[0]["hsdp_tp"]["placements"]
