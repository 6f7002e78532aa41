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
    shard1 = "(Replicate(), Shard(dim=1))"  # a block of 2 eigenvectors: a leading axis, the shards one axis on
    assert got[0]["as_params_block"] == [[shard1, [2, 3]], [shard1, [2, 3, 9]], [shard1, [2, 9]], [shard1, [2, 9, 6]]]
    assert all(g["as_params_full"] == got[0]["as_params_full"] for g in got)  # every rank: the same block


TP = [("tp", "torch.float64"), ("tp", "torch.float32"), ("tp-plain", "torch.float64")]
FSDP_TP = [(f"fsdp-{name}", dtype) for name, dtype in TP]  # tensor parallel x fully_shard on a (dp, tp) mesh
# n = 123: with tensor parallelism rank 0 also holds the replicated rows; on the (2, 2) mesh ranks 0 and 2
# (tp coordinate 0) hold the dp shards of the tp-replicated rows
TP_ROWS = {"tp": [33, 30, 30, 30], "tp-plain": [60, 21, 21, 21], "fsdp-tp": [35, 33, 28, 27],
           "fsdp-tp-plain": [47, 21, 34, 21]}


@pytest.mark.parametrize("name,dtype", TP + FSDP_TP)
def test_tensor_parallel_matches_one_process(ranks, name, dtype):
    """parallelize_module on 4 ranks (Shard(0), Shard(1), a replicated bias; or plain parameters) = one process.

    And the same plans on a (2, 2) (dp, tp) mesh with fully_shard over dp, each dp rank with
    its own data: one process holds the dp ranks' i-th batches as one batch (the data errors
    resample those collective batches).
    """
    one, got = ranks[0][f"one-{name}-{dtype}"], ranks[0][f"{name}-{dtype}"]
    for key in ("eigenvalues", "hutchinson", "xtrace", "nodes", "weights", "product", "loss", "gradient",
                "data_stderr", "ggn"):
        a, b = np.asarray(got[key]), np.asarray(one[key])
        assert np.abs(a - b).max() <= TOLERANCE[dtype] * np.abs(b).max(), key
    assert got["engine"].startswith("finite_difference: central differences of tensor-parallel " +
                                    ("FSDP2 gradients" if name.startswith("fsdp") else "gradients"))
    assert got["converged"] == one["converged"] and got["num_samples"] == one["num_samples"] == 68  # counted once
    assert [rank[f"{name}-{dtype}"]["local_rows"] for rank in ranks] == TP_ROWS[name]
    for rank in ranks[1:]:  # every rank holds the same host results
        for key in ("eigenvalues", "hutchinson", "xtrace", "nodes", "weights", "loss", "data_stderr"):
            assert rank[f"{name}-{dtype}"][key] == got[key], key


def test_tensor_parallel_vectors_have_the_parameters_placements(ranks):
    got = ranks[1]["tp-torch.float64"]
    assert got["placements"] == {"0.weight": ["(Shard(dim=0),)", [12, 6]], "0.bias": ["(Shard(dim=0),)", [12]],
                                 "2.weight": ["(Shard(dim=1),)", [3, 12]], "2.bias": ["(Replicate(),)", [3]]}
    assert got["as_params"] == {"0.weight": "(Shard(dim=1),)", "0.bias": "(Shard(dim=1),)",  # a block: +1 axis
                                "2.weight": "(Shard(dim=2),)", "2.bias": "(Replicate(),)"}
    assert ranks[2]["tp-plain-torch.float64"]["as_params"]["2.weight"] == "plain"


@pytest.mark.parametrize("key", ["mc", "block"])
def test_fsdp_tp_fisher_and_blocks_match_one_process(ranks, key):
    """On the (dp, tp) mesh: the MC Fisher (labels drawn per dp rank's batches, the same along tp) and a block."""
    a, b = np.asarray(ranks[0]["fsdp-tp-torch.float64"][key]), np.asarray(ranks[0][f"one-{key}"])
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-9 * np.abs(b).max()


def test_fsdp_tp_vectors_have_the_parameters_placements(ranks):
    """fully_shard over tensor parallelism: _StridedShard rows; a block's placements one axis on, its values right."""
    got, one = ranks[1]["fsdp-tp-torch.float64"], ranks[0]["one-fsdp-tp-torch.float64"]
    strided = "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert got["placements"] == {"0.weight": [strided, [12, 6]], "0.bias": [strided, [12]],
                                 "2.weight": ["(Shard(dim=0), Shard(dim=1))", [3, 12]],
                                 "2.bias": ["(Shard(dim=0), Replicate())", [3]]}
    strided = "(_StridedShard(dim=1, sf=2), Shard(dim=1))"
    assert got["as_params_block"] == {"0.weight": strided, "0.bias": strided,
                                      "2.weight": "(Shard(dim=1), Shard(dim=2))", "2.bias": "(Shard(dim=1), Replicate())"}
    assert ranks[3]["fsdp-tp-plain-torch.float64"]["as_params_block"]["2.weight"] == "(Shard(dim=1),)"
    for name in ("fsdp-tp-torch.float64", "fsdp-tp-plain-torch.float64"):
        full = ranks[0][name]["as_params_full"]  # the gathered top-2 eigenvectors, by parameter
        assert all(rank[name]["as_params_full"] == full for rank in ranks[1:])
        a = np.concatenate([np.reshape(full[k], (2, -1)) for k in one["eigenvectors"]], axis=1)
        b = np.concatenate([np.reshape(v, (2, -1)) for v in ranks[0]["one-" + name]["eigenvectors"].values()], axis=1)
        assert np.abs(a - np.sign(np.sum(a * b, axis=1))[:, None] * b).max() < 1e-8
    assert len(one["eigenvectors"]) == 4


@pytest.mark.parametrize("case,message", [
    ("fsdp_tp_root", "call fully_shard on the root module too (fully_shard(model, mesh=dp_mesh))"),
    ("fsdp_tp_data", "pass every rank the same data (the same along the mesh's tensor-parallel axis)"),
    ("tp_data", "with tensor parallelism every rank computes on the same batches: pass every rank the same data"),
    ("tp_exact", "double backward through its DTensors misses the second derivative through the collectives"),
    ("tp_seed", "initialize the model with the same seed on every rank"),
])
def test_bad_tensor_parallel_inputs_name_the_fix(ranks, case, message):
    for rank in ranks:
        assert message in rank["caught"][case]


def test_fsdp_tp_llama_matches_one_process(ranks):
    """A Hugging Face Llama, tensor parallel over tp and fully_shard over dp (4 ranks), against one process's exact values.

    Loss and gradient to rounding; products to the float32 of the model's RMS norm, for which
    the step is set (5e-5 measured).
    """
    if "llama" not in ranks[0]:
        pytest.skip("transformers is not installed")
    got, one = ranks[0]["llama"]["fsdp_tp"], ranks[0]["llama"]["one"]
    for key, tolerance in (("loss", 1e-12), ("gradient", 1e-12), ("product", 5e-4)):
        a, b = np.asarray(got[key]), np.asarray(one[key])
        assert np.abs(a - b).max() <= tolerance * np.abs(b).max(), key
    assert [rank["llama"]["fsdp_tp"]["rows"] for rank in ranks] == [7248, 5120, 7248, 5120]  # n = 24,736
