"""Data standard errors (eigsh/trace ``data_error=True``) against brute force over data subsets."""

import os
import sys
import warnings

import numpy as np
import pytest

import specops as so
from specops.data_error import eigenvalue_stderr, trace_stderr

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_eigenvalue_jackknife_of_one_vector_is_the_delta_method():
    # k = 1: the Rayleigh quotients v^T H_b v of equal batches; the jackknife of their mean
    # is their standard error of the mean (closed form)
    q = np.random.default_rng(0).normal(3.0, 0.5, 8)
    se = eigenvalue_stderr(q[:, None, None], np.full(8, 1 / 8), np.full(8, 16.0), "LA")
    np.testing.assert_allclose(se, np.std(q, ddof=1) / np.sqrt(8), rtol=1e-12)


def test_trace_analysis_of_variance_separates_batches_from_probes():
    # X[j, b] = a_b + c_j + e_jb with var(a) = 1 and much larger probe noise: the batch
    # variance comes out unbiased (mean over repeats), the probes' noise removed
    rng = np.random.default_rng(1)
    p, B, sd_a = 20, 8, 1.0
    est = []
    for _ in range(2000):
        X = sd_a * rng.standard_normal(B)[None, :] + 5 * rng.standard_normal((p, 1)) + 3 * rng.standard_normal((p, B))
        est.append(trace_stderr(X, np.full(B, 1 / B)) ** 2)
    truth = sd_a ** 2 / B  # var(mean of the batch effects)
    assert abs(np.mean(est) / truth - 1) < 0.1, np.mean(est) / truth


def test_probes_pin_the_data_error_once_their_noise_is_small_beside_the_batches_spread():
    """From 10 probes on; pinned where the batches' spread dominates the probes' noise, not where it does not."""
    from specops.data_error import probes_pin_data_error

    rng = np.random.default_rng(2)
    a, c = rng.standard_normal(8)[None, :], 5 * rng.standard_normal((10, 1))  # batch and probe effects
    quiet, noisy = a + c + 0.3 * rng.standard_normal((10, 8)), a + c + 10 * rng.standard_normal((10, 8))
    assert probes_pin_data_error(quiet) and not probes_pin_data_error(quiet[:9])
    assert not probes_pin_data_error(noisy)
    # the probe effect c (a probe's form on every batch alike) is no noise in the batches' means
    assert probes_pin_data_error(a + 100 * c + 0.3 * rng.standard_normal((10, 8)))


@pytest.fixture(scope="module")
def digits_study():
    data_error = pytest.importorskip("data_error")
    pytest.importorskip("sklearn")
    return data_error.study(subsets=12, samples=128, batches=8, hidden=4, k=1, trace_products=40, timing=False,
                            steps=50)


def test_reported_data_stderr_matches_the_spread_over_subsets(digits_study):
    """The brute force: exact top eigenvalues and traces on 12 random subsets of 128 digits; the
    RMS of the stderrs each single run reports is within a factor 2 of their spread."""
    out = digits_study
    for ratio in out["top_ratio"] + [out["trace_ratio"]]:
        assert 0.5 <= ratio <= 2.0, out


def _digits_hessian(batches, per_batch, hidden=3):
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)).double()
    X, y = torch.randn(batches * per_batch, 4, dtype=torch.float64), torch.randint(0, 2, (batches * per_batch,))
    data = [(X[i:i + per_batch], y[i:i + per_batch]) for i in range(0, len(X), per_batch)]
    return st.hessian(model, torch.nn.CrossEntropyLoss(), data[0] if batches == 1 else data)


def test_bad_input_says_what_is_needed():
    with pytest.raises(ValueError, match="model-backed"):
        so.eigsh(np.eye(4), data_error=True)
    with pytest.raises(ValueError, match="model-backed"):
        so.trace(np.eye(4), data_error=True)
    with pytest.raises(ValueError, match="one sample"):
        so.eigsh(_digits_hessian(1, 1), data_error=True)
    with pytest.raises(ValueError, match="one sample"):
        so.trace(_digits_hessian(1, 1), data_error=True)


def _one_batch_and_its_parts(dtype, loss_fn, samples=20, parts=8, **kwargs):
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)
    X, y = torch.randn(samples, 4, dtype=dtype), torch.randint(0, 2, (samples,))
    whole = st.hessian(model, loss_fn, (X, y), **kwargs)
    parts = st.hessian(model, loss_fn, list(zip(X.tensor_split(parts), y.tensor_split(parts))), **kwargs)
    return whole, parts


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_batch_is_split_into_sub_batches_as_the_data_given_in_batches(dtype, reduction):
    """Data as one batch of 20 samples gives the numbers of the same data as 8 batches (sizes 3 and 2)."""
    torch = pytest.importorskip("torch")
    whole, parts = _one_batch_and_its_parts(getattr(torch, dtype), torch.nn.CrossEntropyLoss(reduction=reduction))
    rtol = 1e-4 if dtype == "float32" else 1e-10
    a, b = (so.eigsh(H, k=2, tol=1e-6, data_error=True) for H in (whole, parts))
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=rtol)
    np.testing.assert_allclose(a.data_stderr, b.data_stderr, rtol=100 * rtol)
    assert a.settings["data_error"]["batches"] == 8 and a.settings["data_error"]["samples"] == 20
    assert np.all(a.data_stderr > 0) and len(whole.batch_sizes) == 1  # the caller's operator is left as it was
    s, t = (so.trace(H, method="hutchinson", max_matvecs=12, data_error=True) for H in (whole, parts))
    np.testing.assert_allclose([s.estimate, s.stderr], [t.estimate, t.stderr], rtol=100 * rtol)
    q = s.settings["data_error"]["probes"]  # over sub-batches only the first probes' forms are recorded
    first = so.trace(parts, method="hutchinson", max_matvecs=q, data_error=True)
    np.testing.assert_allclose(s.data_stderr, first.data_stderr, rtol=100 * rtol)
    assert q == 10 and first.settings["data_error"]["probes"] == q  # 10 probes at least, a quarter of 12 less


def test_a_batch_whose_loss_is_no_mean_over_samples_is_not_split():
    torch = pytest.importorskip("torch")

    def batch_loss(model, batch):  # the squared mean loss: not the sample-weighted mean of its sub-batches'
        inputs, targets = batch
        return torch.nn.functional.cross_entropy(model(inputs), targets) ** 2

    with pytest.warns(UserWarning, match="not separable"):
        whole, _ = _one_batch_and_its_parts(torch.float64, batch_loss)
    for call in (lambda: so.eigsh(whole, data_error=True), lambda: so.trace(whole, data_error=True)):
        with pytest.raises(ValueError, match="cannot be split into sub-batches.*pass the data as several batches"):
            call()


def test_a_split_batch_multiplies_over_sub_batches_only_where_forms_are_used(monkeypatch):
    """Lanczos' products and Hutch++'s sketch run over the whole batch, the forms' products over sub-batches."""
    torch = pytest.importorskip("torch")
    from specops.model import ModelOperator

    whole, parts = _one_batch_and_its_parts(torch.float64, torch.nn.CrossEntropyLoss(), samples=40)
    over_sub_batches = []
    product = ModelOperator._product

    def counted(self, fn, shape, V=None):
        if self._whole is not None:
            over_sub_batches.append(int(shape[1]) if len(shape) == 2 else 1)
        return product(self, fn, shape, V)

    monkeypatch.setattr(ModelOperator, "_product", counted)
    a, b = (so.eigsh(H, k=2, tol=1e-8, data_error=True) for H in (whole, parts))
    assert a.num_matvecs > 10 and sum(over_sub_batches) == 2  # the verification product only
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(a.data_stderr, b.data_stderr, rtol=1e-8)
    over_sub_batches.clear()
    for method in ("hutch++", "krylov-hutch++"):  # the sketch (the pilots): 10 columns over the whole batch
        over_sub_batches.clear()
        s, t = (so.trace(H, method=method, max_matvecs=30, data_error=True) for H in (whole, parts))
        assert s.num_matvecs == 30 and sum(over_sub_batches) == 20
        np.testing.assert_allclose([s.estimate, s.stderr, s.data_stderr], [t.estimate, t.stderr, t.data_stderr],
                                   rtol=1e-8)
    for method in ("hutchinson", "xtrace"):  # the first 10 probes over sub-batches (a quarter of 40 products)
        over_sub_batches.clear()
        s, t = (so.trace(H, method=method, max_matvecs=40, data_error=True) for H in (whole, parts))
        assert s.num_matvecs == 40 and sum(over_sub_batches) == 10 == s.settings["data_error"]["probes"]
        np.testing.assert_allclose([s.estimate, s.stderr], [t.estimate, t.stderr], rtol=1e-8)
        first = so.trace(parts, method="hutchinson", max_matvecs=10, data_error=True)  # XTrace's probes: the same
        np.testing.assert_allclose(s.data_stderr, first.data_stderr, rtol=1e-8)
    # "auto" with rtol does not hand over to Krylov Hutch++ here: XTrace's plain probes pin the data
    # error as they go, where Krylov Hutch++'s few plain ones (its pilots) would not
    whole, parts = _digits_hessian(1, 60, hidden=24), _digits_hessian(6, 10, hidden=24)
    over_sub_batches.clear()
    s = so.trace(whole, max_matvecs=400, rtol=1e-3, data_error=True)
    assert s.settings["estimator"] == "xtrace" and sum(over_sub_batches) == s.settings["data_error"]["probes"] <= 100
    assert so.trace(parts, max_matvecs=400, rtol=1e-3, data_error=True).settings["estimator"] == "krylov-hutch++"


def test_a_monte_carlo_fisher_is_not_split():
    """Its labels are drawn per batch: sub-batches would be another operator (0.63 against 0.68 here)."""
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    F = st.fisher(model, torch.nn.CrossEntropyLoss(), (X, y), estimator="mc")
    for call in (lambda: so.eigsh(F, k=2, data_error=True), lambda: so.trace(F, max_matvecs=10, data_error=True)):
        with pytest.raises(ValueError, match="Monte-Carlo labels.*pass the data as several batches"):
            call()
    batches = st.fisher(model, torch.nn.CrossEntropyLoss(), list(zip(X.tensor_split(8), y.tensor_split(8))),
                        estimator="mc")
    assert np.all(so.eigsh(batches, k=2, data_error=True).data_stderr > 0)  # as batches it is measured


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "krylov-hutch++"])
def test_every_trace_method_reports_both_parts(method):
    H = _digits_hessian(6, 10)
    r = so.trace(H, method=method, max_matvecs=30, data_error=True)
    assert r.data_stderr > 0 and r.settings["data_error"]["batches"] == 6
    assert so.TraceResult.from_json(r.to_json()).data_stderr == r.data_stderr
    assert "data stderr" in repr(r)


def test_auto_handing_over_to_krylov_hutchpp_keeps_the_first_blocks_data_error():
    """The hand-off's first basis block is XTrace's (its products labelled as a basis): its per-batch
    forms are in the data error, which agrees with Krylov Hutch++'s alone and with Hutchinson's."""
    H = _digits_hessian(6, 10, hidden=24)
    auto = [so.trace(H, max_matvecs=400, rtol=2e-3, seed=s, data_error=True) for s in range(3)]
    assert {r.settings["estimator"] for r in auto} == {"krylov-hutch++"}
    alone = so.trace(H, method="krylov-hutch++", max_matvecs=400, seed=0, data_error=True).data_stderr
    plain = so.trace(H, method="hutchinson", max_matvecs=400, seed=0, data_error=True).data_stderr
    for r in auto:
        assert 0.8 < r.data_stderr / alone < 1.25 and 0.7 < r.data_stderr / plain < 1.4, (r.data_stderr, alone, plain)


def test_a_data_error_the_probes_cannot_measure_is_not_reported_silently_as_zero():
    """With too few probes for the batches' spread to show above their noise the data stderr is 0
    (the analysis of variance's estimate is clipped), and a warning says it is not measured."""
    H = _digits_hessian(8, 10)
    with pytest.warns(RuntimeWarning, match="data_stderr is 0 because .* 10 probes.*larger max_matvecs"):
        r = so.trace(H, method="hutchinson", max_matvecs=10, seed=0, data_error=True)
    assert r.data_stderr == 0 and not r.settings["data_error"]["pinned"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = so.trace(H, method="hutchinson", max_matvecs=10, seed=5, data_error=True)  # pinned here
    assert r.data_stderr > 0 and r.settings["data_error"]["pinned"]


def test_data_error_leaves_the_eigenvalues_and_reserves_the_verification():
    H = _digits_hessian(6, 10)
    a = so.eigsh(H, k=2, tol=1e-10)
    b = so.eigsh(H, k=2, tol=1e-10, data_error=True)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)
    assert b.data_stderr.shape == (2,) and np.all(b.data_stderr > 0)
    small = so.eigsh(H, k=2, tol=1e-12, max_matvecs=8, data_error=True)  # verified within the budget
    assert small.num_matvecs <= 8 and not small.residuals_estimated.any() and np.all(small.data_stderr > 0)


def test_tracker_records_both_parts(tmp_path):
    H = _digits_hessian(6, 10)
    tracker = so.Tracker(lambda: H, tmp_path / "log.jsonl", metrics=("eigenvalues", "trace"), k=2,
                         eigsh_options={"data_error": True}, trace_options={"data_error": True, "max_matvecs": 30})
    record = tracker.update(0)
    assert len(record["data_stderr"]) == 2 and record["trace"]["data_stderr"] > 0
    assert record["trace"]["stderr"] > 0


def test_samples_needed_follows_the_square_root_law():
    from specops.data_error import samples_needed

    # 0.2 stderr on 2.0 with 128 samples: 5 % needs (0.2 / 0.1)^2 = 4 times the samples
    assert samples_needed(0.2, 2.0, 128, 0.05) == 512
    assert samples_needed(0.01, 2.0, 128, 0.05) == 128  # already met
    with pytest.raises(ValueError, match="fraction"):
        samples_needed(0.2, 2.0, 128, 0.0)
