"""FSDP2 (``fully_shard`` on a gloo DeviceMesh, 2 processes) against one process with the whole model.

One ``torchrun --nproc_per_node 2 fsdp_worker.py all`` launch serves most tests; a second
checks that a raising rank ends the job. The truth is the unsharded backend's exact
products on all the data in one process (same seeds), and its dense Hessian; the sharded
products are finite differences, so the comparison is within their error bound (about
1e-10 relative in float64, 1e-4 in float32; the tolerances below leave a factor 10-100).
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
WORKER = os.path.join(HERE, "fsdp_worker.py")
FAULT_SECONDS = 10.0
TOLERANCE = {"torch.float64": 1e-9, "torch.float32": 1e-3}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run = torchrun([WORKER, "all", out], timeout=600)  # about a minute on an idle machine
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stderr[-4000:]}"
    return [json.loads((out / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_fsdp2_matches_one_process(ranks, dtype):
    one, got = ranks[0][f"one-{dtype}"], ranks[0][f"sharded-{dtype}"]
    for key in ("eigenvalues", "hutchinson", "xtrace", "nodes", "weights", "product", "loss", "gradient"):
        a, b = np.asarray(got[key]), np.asarray(one[key])
        assert np.abs(a - b).max() <= TOLERANCE[dtype] * np.abs(b).max(), key
    assert got["converged"] == one["converged"]
    np.testing.assert_allclose(one["eigenvalues"], ranks[0][f"dense-{dtype}"], rtol=TOLERANCE[dtype])
    for key in ("eigenvalues", "xtrace", "nodes", "weights"):  # every rank holds the same host results
        assert ranks[1][f"sharded-{dtype}"][key] == got[key]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_wrt_and_restrict_give_the_block_of_one_process(ranks, dtype):
    for rank in ranks:
        got = rank[f"wrt-{dtype}"]
        one = got["one"]
        assert one["n"] == 63  # the first layer's 9 x 6 weight and 9 biases
        for key in ("sharded", "restrict"):
            assert got[key]["n"] == 63
            a, b = np.asarray(got[key]["product"]), np.asarray(one["product"])
            assert np.abs(a - b).max() <= TOLERANCE[dtype] * np.abs(b).max(), key
            assert abs(got[key]["eigenvalue"] - one["eigenvalue"]) <= TOLERANCE[dtype] * abs(one["eigenvalue"]), key


CURVATURES = {"torch.float64": ("ggn-ce", "empirical-ce", "mc-ce", "ggn-mse", "mc-mse", "ggn-ce3d"),
              "torch.float32": ("ggn-ce", "empirical-ce", "mc-ce")}


def close(a, b, dtype):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() <= TOLERANCE[dtype] * np.abs(b).max()


@pytest.mark.parametrize("dtype,case", [(dtype, case) for dtype, cases in CURVATURES.items() for case in cases])
def test_ggn_and_fishers_match_one_process(ranks, dtype, case):
    """Products, top eigenvalue and trace of the FSDP2 GGN / Fishers against the unsharded backend's exact ones."""
    one = ranks[0][f"curvatures-{dtype}"][case]["one"]
    for rank in ranks:
        got = rank[f"curvatures-{dtype}"][case]["sharded"]
        for key in ("product", "eigenvalue", "trace"):
            assert close(got[key], one[key], dtype), (key, got[key], one[key])
        assert got["converged"] and one["converged"]
        assert got["engine"].split(":")[0] == case.split("-")[0]
        assert "central differences of FSDP2 forwards" in got["engine"]
    assert ranks[1][f"curvatures-{dtype}"][case]["sharded"]["eigenvalue"] == \
        ranks[0][f"curvatures-{dtype}"][case]["sharded"]["eigenvalue"]  # the same host results on every rank


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_ggn_matches_a_dense_jacobian_product(ranks, dtype):
    """The FSDP2 GGN of the cross-entropy against J^T M J from the unsharded model's Jacobian (all data)."""
    dense, got = ranks[0][f"curvatures-{dtype}"]["dense"], ranks[0][f"curvatures-{dtype}"]["ggn-ce"]["sharded"]
    assert close(got["product"], dense["product"], dtype)
    assert close(got["eigenvalue"], dense["eigenvalue"], dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_ggn_blocks_and_as_params_are_those_of_the_hessian(ranks, dtype):
    for rank in ranks:
        got = rank[f"curvatures-{dtype}"]
        for key in ("restrict", "wrt", "like"):  # G.restrict, ggn(wrt=), curvature_like(H_fsdp).restrict
            assert len(got["blocks"][key]) == 63 and close(got["blocks"][key], got["blocks"]["one"], dtype), key
        assert got["as_params"] == got["params"]
    assert ranks[0]["curvatures-torch.float64"]["as_params_block"]["0.weight"] == \
        ["(Shard(dim=1),)", [2, 9, 6], [2, 5, 6]]


def test_docs_example_runs(ranks):
    assert ranks[0]["caught"]  # the launch ran the torchrun example of docs/distributed.md first, asserts and all


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_richardson_products_are_extrapolated(ranks, dtype):
    """richardson=True: (4 D(h) - D(2h)) / 3 at a larger step, closer to the exact product than plain steps."""
    exact = np.asarray(ranks[0][f"one-{dtype}"]["product"])
    for rank in ranks:
        got = rank[f"sharded-{dtype}"]
        assert got["richardson"]["engine"].endswith("Richardson-extrapolated over the steps h and 2h")
        richardson, plain = np.asarray(got["richardson"]["product"]), np.asarray(got["product"])
        # measured: 3e-13 against 4e-11 in float64, 3e-6 against 1e-5 in float32
        assert np.abs(richardson - exact).max() < 0.5 * np.abs(plain - exact).max()


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_data_errors_are_those_of_one_process(ranks, dtype):
    """The ranks' i-th batches are one batch: one process with them concatenated has the same data errors."""
    got = ranks[0][f"data_error-{dtype}"]
    for key in ("eigsh", "trace"):
        a, b = np.asarray(got["sharded"][key]), np.asarray(got["one"][key])
        assert np.all(b > 0) and np.abs(a - b).max() <= TOLERANCE[dtype] * np.abs(b).max(), key
    assert ranks[1][f"data_error-{dtype}"]["sharded"] == got["sharded"]


def test_a_float32_part_of_a_float64_model_sets_the_step(ranks):
    """The step follows the lowest precision a forward computes in: float32 rounding, not float64's step."""
    got = ranks[0]["low_precision"]
    a, b = np.asarray(got["product"]), np.asarray(got["one"])
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()  # 5e-6; float64's step (6e-6) gave 5e-3
    assert any("computes parts in lower precision: Float32Tanh (float32)" in w for w in got["warnings"])


def test_step_check_estimates_the_step_error(ranks):
    """Where truncation dominates (ratio near 4), q(h) - exact is the estimate (measured within 5 %)."""
    got = ranks[0]["step_check"]
    q, exact = np.asarray(got["quotients"]), np.asarray(got["exact"])
    true = q[1] - exact  # measured -1.8e-4 and 4.1e-5 against estimates -1.8e-4 and 4.3e-5
    assert all(got["truncation"]) and np.all(np.abs(np.asarray(got["ratio"]) - 4) < 1.5)
    assert np.all(np.abs(np.asarray(got["error"]) - true) <= 0.25 * np.abs(true))
    assert np.all(np.abs(np.asarray(got["extrapolated"]) - exact) <= 0.25 * np.abs(true))  # far better than q(h)
    assert ranks[1]["step_check"]["error"] == got["error"]


def test_vectors_are_sharded_like_the_parameters(ranks):
    for r, rank in enumerate(ranks):
        got = rank["sharded-torch.float64"]
        assert got["n"] == 93 and got["local_rows"] == (55, 38)[r]  # rows 9 and 3 split 5/4 and 2/1
        assert got["as_params"] == got["params"]  # DTensors with the parameters' placements and shards
        assert got["engine"].startswith("finite_difference")


@pytest.mark.parametrize("case,message", [
    ("partly", "partly sharded: 2.weight, 2.bias are plain tensors"),
    ("bf16", "MixedPrecisionPolicy computes in torch.bfloat16"),
    ("comm", "comm= holds other ranks"),
    ("batches", "ranks disagree on the number of batches"),
    ("option", "chunk_size do not apply to an FSDP2 model"),
    ("exact", "engine='double_backward' does not apply to an FSDP2 model: FSDP2 offers no exact second derivative"),
    ("progress", "progress= (a bar of the batches each product evaluates) does not apply to an FSDP2 model"),
    ("ggn_progress", "progress= (a bar of the batches each product evaluates) does not apply to an FSDP2 model"),
    ("tensor_parallel", "with tensor parallelism every rank computes on the same batches"),
    ("ggn_model_form", "ggn(...) needs a loss of the model's outputs alone"),
    ("ggn_reduction", "sums over a batch's samples"),
    ("mc_likelihood", "fisher(estimator='mc') samples labels from the model's predictive distribution"),
    ("ggn_option", "random_layers do not apply to an FSDP2 model"),
    ("ggn_bf16", "MixedPrecisionPolicy computes in torch.bfloat16"),
    ("ggn_moved", "moved, re-sharded or replaced after the operator was built"),
    ("moved", "moved, re-sharded or replaced after the operator was built"),
])
def test_bad_input_is_named_on_every_rank(ranks, case, message):
    for rank in ranks:
        assert message in rank["caught"][case]


def test_older_fsdp_is_refused_naming_fully_shard():
    from torch import nn

    from specops.backends import torch as st

    class FullyShardedDataParallel(nn.Module):  # the class FSDP1 wraps a model in (it needs a group to build)
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 1)

    with pytest.raises(TypeError, match="fully_shard"):
        st.hessian(FullyShardedDataParallel(), torch.nn.functional.mse_loss, (torch.ones(3, 2), torch.ones(3, 1)))


def test_exception_on_one_rank_ends_the_job():
    run = torchrun([WORKER, "raise", os.devnull], timeout=120)
    assert run.returncode != 0, "the job succeeded although rank 1 raised"
    seconds = run.seconds_after("rank 1 raises at ")
    assert seconds < FAULT_SECONDS, f"the job took {seconds:.1f} s to end after the failure"
    assert "RuntimeError: deliberate failure on rank 1" in run.stderr, run.stderr[-3000:]
    assert "rank 0 finished" not in run.stdout
