"""The core's construction check of a product engine (specops.checks), on NumPy models.

Truths: closed-form Hessians of softmax regression (tests/numpy_models.py) and of a cubic;
the policy's verdicts on planted wrong, asymmetric and noisy products.
"""

import gc
import warnings

import numpy as np
import pytest

from numpy_models import SoftmaxRegression, digits
from specops import NonFiniteError, checks
from specops.backends import numpy as snp
from specops.backends.numpy import NumpyOps


@pytest.fixture(scope="module")
def problem():
    X, y = digits(60)
    X = X[:, 3::8]  # the 4th pixel of each row: 8 features -> 80 parameters
    model = SoftmaxRegression(X.shape[1], 10)
    theta = np.random.default_rng(0).normal(0, 0.3, X.shape[1] * 10)
    return model, theta, X, y


def dense(model, theta, batch):
    return model.hvp(theta, batch, np.eye(theta.size))


@pytest.mark.parametrize("richardson", [False, True])
def test_finite_differences_match_a_cubic_closed_form(richardson):
    # f(x) = sum(a x^3) / 6 + x^T B x / 2: H(x) = diag(a x) + B
    rng = np.random.default_rng(1)
    n = 7
    a, B, x = rng.normal(size=n), rng.normal(size=(n, n)), rng.normal(size=n)
    B = B + B.T
    V = rng.normal(size=(n, 3))
    HV, spreads = checks.finite_difference_products(lambda d: a * (x + d) ** 2 / 2 + B @ (x + d), V,
                                                    NumpyOps(np.float64), eps=2.0 ** -52, scale=1.0,
                                                    richardson=richardson)
    truth = (np.diag(a * x) + B) @ V
    # a cubic: central differences are exact up to rounding (its third derivative is constant)
    assert np.linalg.norm(HV - truth) / np.linalg.norm(truth) < 1e-8
    assert (spreads is None) == (not richardson)
    if richardson:
        assert np.all(spreads < 1e-6 * np.linalg.norm(truth, axis=0))


def test_symmetry_error_separates_symmetric_from_not():
    rng = np.random.default_rng(2)
    ops = NumpyOps(np.float64)
    A = rng.normal(size=(50, 50))
    V = ops.random(50, [0, 1], 0, distribution="normal", stream="engine_check")
    assert checks.symmetry_error(ops, V, (A + A.T) @ V) < 1e-13
    assert checks.symmetry_error(ops, V, A @ V) > 0.1


def test_policy_verdicts():
    policy = checks.EnginePolicy(checks.rounding("float32"))
    assert policy.rounding == 2e-3 and policy.symmetry_threshold == 2e-2
    ok = policy.decide("auto", "e", disagreement=1e-3, spread=1e-3, symmetry=0.0)
    assert (ok.verdict, ok.engine, ok.threshold) == ("agree", "e", pytest.approx(1e-2))
    # a referee that disagrees with itself (kinks) cannot convict: kept, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kinked = policy.decide("auto", "e", disagreement=0.7, spread=0.3, symmetry=0.0)
    assert (kinked.verdict, kinked.engine) == ("inconclusive", "e")
    # the case: 0.69 off a consistent referee in float32 is wrong, whatever the engine
    with pytest.warns(RuntimeWarning, match="using engine='finite_difference'"):
        wrong = policy.decide("auto", "e", disagreement=0.69, spread=1e-3, symmetry=0.0)
    assert (wrong.verdict, wrong.engine) == ("wrong", checks.FINITE_DIFFERENCE)
    with pytest.raises(ValueError, match="engine='finite_difference'"):
        policy.decide("e", "e", disagreement=0.69, spread=1e-3, symmetry=0.0)
    # an asymmetric engine is wrong even where the referee cannot tell
    with pytest.raises(ValueError, match="not symmetric"):
        policy.decide("e", "e", disagreement=0.7, spread=0.3, symmetry=1.39)


def test_a_right_hvp_agrees_and_a_wrong_one_is_replaced_by_finite_differences(problem):
    model, theta, X, y = problem
    truth = dense(model, theta, (X, y))
    H = snp.hessian(model.loss, model.grad, model.hvp, theta, (X, y))
    assert H.engine_check.verdict == "agree" and H.engine_check.disagreement < 1e-6
    assert H.engine_check.symmetry < 1e-12

    def dropped_term(th, batch, V):  # the Gauss-Newton part only's cousin: a wrong, symmetric product
        return 0.5 * model.hvp(th, batch, V)

    with pytest.warns(RuntimeWarning, match="wrong"):
        H = snp.hessian(model.loss, model.grad, dropped_term, theta, (X, y))
    assert H.engine == "finite_difference" and H.engine_check.verdict == "wrong"
    assert "wrong" in repr(H) and H.settings()["engine_check"]["verdict"] == "wrong"
    got = H.to_dense()
    assert np.linalg.norm(got - truth) / np.linalg.norm(truth) < 1e-6  # the finite differences are right


def test_an_asymmetric_hvp_is_caught(problem):
    model, theta, X, y = problem
    E = np.random.default_rng(3).normal(size=(theta.size, theta.size)) * 1e-6  # 2e-4 relative asymmetry

    def skewed(th, batch, V):
        return model.hvp(th, batch, V) + (E - E.T) @ V

    with pytest.warns(RuntimeWarning, match="not symmetric"):
        H = snp.hessian(model.loss, model.grad, skewed, theta, (X, y))
    assert H.engine_check.symmetry > H.engine_check.symmetry_threshold


def test_nan_data_is_reported_as_nan_data_before_any_engine_check(problem):
    model, theta, X, y = problem
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about the engine first
        with pytest.raises(NonFiniteError, match="loss is not finite for batch 0"):
            snp.hessian(model.loss, model.grad, model.hvp, theta, (Xn, y))


def test_a_non_finite_gradient_is_reported(problem):
    model, theta, X, y = problem

    def grad(th, batch):
        return model.grad(th, batch) * np.nan

    with pytest.raises(NonFiniteError, match="gradient is not finite"):
        snp.hessian(model.loss, grad, model.hvp, theta, (X, y), check_deterministic=False)


def test_verdicts_carry_over_to_rebuilds_and_are_reverified():
    cache = checks.VerdictCache(every=3)

    class Model:
        pass

    model, check = Model(), checks.EngineCheck("auto", "e", "agree", "fine")
    assert cache.get(model, "k") is None
    cache.put(model, "k", check)
    first = cache.get(model, "k")
    assert first is not None and first.carried_over and not check.carried_over
    assert cache.get(model, "other") is None
    assert cache.get(model, "k") is not None
    assert cache.get(model, "k") is None  # the third rebuild runs every check again
    del model
    gc.collect()
    assert len(cache._entries) == 0  # held weakly


def test_a_rebuild_for_the_same_model_and_data_skips_the_products(problem):
    model, theta, X, y = problem
    calls = []

    def counted(th, batch, V):
        calls.append(V.shape[1])
        return model.hvp(th, batch, V)

    batch = (X, y)
    H = snp.hessian(model.loss, model.grad, counted, theta, batch)
    first = sum(calls)
    assert first == 4 and not H.engine_check.carried_over  # determinism 2, engine check 2
    calls.clear()
    H = snp.hessian(model.loss, model.grad, counted, theta, batch)
    assert sum(calls) == 0 and H.engine_check.carried_over
    calls.clear()
    H = snp.hessian(model.loss, model.grad, counted, theta, (X[:30], y[:30]))  # other data: checked
    assert sum(calls) == first and not H.engine_check.carried_over


def test_results_carry_the_engine_and_its_check(problem):
    import specops as so

    model, theta, X, y = problem
    H = snp.hessian(model.loss, model.grad, model.hvp, theta, (X, y))
    for result in (so.eigsh(H, k=1), so.trace(H, max_matvecs=8), so.spectral_density(H, num_probes=1, num_steps=8)):
        assert result.settings["engine"] == "numpy-callables"
        assert result.settings["engine_check"]["verdict"] == "agree"
        again = type(result).from_json(result.to_json())
        assert again.settings["engine_check"] == result.settings["engine_check"]
    assert "engine_check" not in so.eigsh(np.diag([1.0, 2.0, 3.0]), k=1).settings


def test_a_gradient_that_is_no_gradient_field_is_refused(problem):
    """``grad + K theta`` with ``K`` not symmetric is no function's gradient: a symmetric engine is off
    the referee, and the referee (central differences of that gradient) is itself not symmetric."""
    model, theta, X, y = problem
    K = np.tril(np.random.default_rng(4).normal(size=(theta.size, theta.size)), -1) * 0.05

    def leaky(th, batch):  # a parameter read through a stop_gradient does this
        return model.grad(th, batch) + K @ th

    with pytest.raises(ValueError, match="not the gradient of any function.*wrt="):
        snp.hessian(model.loss, leaky, model.hvp, theta, (X, y))
    # the same gradient with a symmetric K is a gradient: a symmetric engine off it is only wrong
    S = (K + K.T) / 2

    def shifted(th, batch):
        return model.grad(th, batch) + S @ th

    with pytest.warns(RuntimeWarning, match="wrong"):
        H = snp.hessian(model.loss, shifted, model.hvp, theta, (X, y))
    assert H.engine == "finite_difference"
