"""FSDP2 on 2-D meshes (HSDP: ``fully_shard`` on a (replicate, shard) gloo mesh, 4 processes) against one process.

One ``torchrun --nproc_per_node 4 fsdp_mesh_worker.py`` launch serves every test: meshes
(2, 2), (1, 4) (a rank holds no rows: FSDP2 cuts 9 rows 3/3/3/0) and (4, 1) (every rank a
replica). The truth is the unsharded backend's exact products on all four ranks' data in
one process, same seeds; the sharded products are finite differences, so the comparison is
within their error bound (about 1e-10 relative in float64, 1e-4 in float32; the
tolerances leave a factor 10-100). The replicas hold copies of the shards' rows, counted
once in every reduction, so every rank holds bit-identical host results.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mpi_launch import torchrun

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fsdp_mesh_worker.py")
TOLERANCE = {"torch.float64": 1e-9, "torch.float32": 1e-3}
CASES = [("2x2", "torch.float64"), ("2x2", "torch.float32"), ("1x4", "torch.float64"), ("4x1", "torch.float64")]
ROWS = {"2x2": [55, 38, 55, 38], "1x4": [31, 31, 31, 0], "4x1": [93] * 4}  # n = 93
OWNERS = {"2x2": [True, True, False, False], "1x4": [True] * 4, "4x1": [True, False, False, False]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    run = torchrun([WORKER, out], nproc=4, timeout=400)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stderr[-4000:]}"
    return [json.loads((out / f"mesh-rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("mesh,dtype", CASES)
def test_hsdp_matches_one_process(ranks, mesh, dtype):
    one, got = ranks[0][f"one-{dtype}"], ranks[0][f"{mesh}-{dtype}"]
    for key in ("eigenvalues", "hutchinson", "xtrace", "nodes", "weights", "product", "loss", "gradient"):
        a, b = np.asarray(got[key]), np.asarray(one[key])
        assert np.abs(a - b).max() <= TOLERANCE[dtype] * np.abs(b).max(), key
    assert got["converged"] == one["converged"]
    for rank in ranks[1:]:  # every rank, replica or not, holds the same host results
        for key in ("eigenvalues", "hutchinson", "xtrace", "nodes", "weights", "loss"):
            assert rank[f"{mesh}-{dtype}"][key] == got[key], key


@pytest.mark.parametrize("mesh", list(ROWS))
def test_replicas_hold_copies_of_the_shards(ranks, mesh):
    got = [rank[f"{mesh}-torch.float64"] for rank in ranks]
    assert [g["local_rows"] for g in got] == ROWS[mesh]
    assert [g["owner"] for g in got] == OWNERS[mesh]
    assert got[0]["placements"] == ["(Replicate(), Shard(dim=0))"]


@pytest.mark.parametrize("case,message", [
    ("tensor_parallel", "are DTensors that fully_shard does not manage (tensor parallel"),
    ("fsdp_tp", "tensor parallel placements (parallelize_module, Shard(1), FSDP x TP meshes) are not supported"),
])
def test_tensor_parallel_is_refused_naming_what_is_supported(ranks, case, message):
    for rank in ranks:
        assert message in rank["caught"][case]
        assert "(replicate, shard) mesh (HSDP)" in rank["caught"][case]
