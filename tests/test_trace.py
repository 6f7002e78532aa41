"""Trace estimators: unbiased, honest standard errors, Hutch++/XTrace beat Hutchinson."""

import numpy as np
import pytest

import specops as so
from spectra import symmetric_with_spectrum
from specops.trace import AUTO_KRYLOV_FROM

SEEDS = range(300)


@pytest.fixture(scope="module")
def decaying():
    A, lam = symmetric_with_spectrum(10.0 / np.arange(1, 151) ** 2, seed=7)
    return A, lam.sum()


@pytest.fixture(scope="module")
def indefinite():
    A, lam = symmetric_with_spectrum(np.random.default_rng(3).uniform(-1, 2, 80), seed=3)
    return A, lam.sum()


def runs(A, method, m, distribution="rademacher"):
    res = [so.trace(A, method=method, max_matvecs=m, seed=s, distribution=distribution) for s in SEEDS]
    return np.array([r.estimate for r in res]), np.array([r.stderr for r in res]), res[0]


@pytest.mark.parametrize("method", ["auto", "hutchinson", "hutch++", "xtrace", "krylov-hutch++"])
@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_unbiased_with_honest_stderr(indefinite, method, distribution):
    A, truth = indefinite
    est, err, first = runs(A, method, 24, distribution)
    assert first.num_matvecs == 24
    spread = est.std(ddof=1)
    assert abs(est.mean() - truth) <= 4 * spread / np.sqrt(len(est))
    # the reported standard error describes the observed spread
    ratio = np.sqrt(np.mean(err**2)) / spread
    assert 0.6 <= ratio <= 1.5, ratio


def test_hutchpp_and_xtrace_beat_hutchinson_on_decaying_spectrum(decaying):
    A, truth = decaying
    errors = {m: np.mean(np.abs(runs(A, m, 30)[0] - truth)) for m in ("hutchinson", "hutch++", "xtrace", "krylov-hutch++")}
    assert errors["hutch++"] < errors["hutchinson"] / 5
    assert errors["xtrace"] < errors["hutchinson"] / 5
    assert errors["krylov-hutch++"] < errors["hutchinson"] / 5


def test_exact_when_the_sketch_captures_the_range():
    rng = np.random.default_rng(0)
    B = rng.standard_normal((60, 4))
    A = B @ B.T
    for method in ("hutch++", "xtrace", "krylov-hutch++", "auto"):
        r = so.trace(A, method=method, max_matvecs=30)
        assert r.estimate == pytest.approx(np.trace(A), rel=1e-10)
        assert r.stderr <= 1e-8 * np.trace(A)


def test_rtol_stops_early_and_meets_the_target(indefinite):
    A, truth = indefinite
    r = so.trace(A, method="hutchinson", max_matvecs=5000, rtol=0.05, seed=1)
    assert 10 <= r.num_matvecs < 5000
    assert r.stderr <= 0.05 * abs(r.estimate)
    assert abs(r.estimate - truth) <= 5 * r.stderr
    for method in ("hutch++", "krylov-hutch++"):
        rp = so.trace(A, method=method, max_matvecs=3000, rtol=0.05, seed=1)
        assert rp.num_matvecs < 3000 and rp.stderr <= 0.05 * abs(rp.estimate)
        assert abs(rp.estimate - truth) <= 5 * rp.stderr


def test_same_seed_same_estimate_json_round_trip(indefinite):
    A, _ = indefinite
    a, b = so.trace(A, seed=5), so.trace(A, seed=5)
    assert a.estimate == b.estimate
    back = so.TraceResult.from_json(a.to_json())
    assert back == a and back.settings["seed"] == 5 and back.settings["method"] == "auto"


def test_bad_arguments():
    A = np.eye(10)
    with pytest.raises(ValueError, match="auto, hutchinson, hutch\\+\\+, xtrace"):
        so.trace(A, method="girard")
    with pytest.raises(ValueError, match="max_matvecs >= 4"):
        so.trace(A, method="xtrace", max_matvecs=3)
    with pytest.raises(ValueError, match="max_matvecs >= 3"):
        so.trace(A, method="hutch++", max_matvecs=2)
    with pytest.raises(ValueError, match="krylov-hutch\\+\\+ needs max_matvecs >= 6"):
        so.trace(A, method="krylov-hutch++", max_matvecs=5)
    with pytest.raises(ValueError, match="rademacher, normal"):
        so.trace(A, distribution="uniform")
    with pytest.raises(ValueError, match="max_matvecs"):
        so.trace(A, max_matvecs=0)


@pytest.fixture(scope="module")
def flat():
    A, lam = symmetric_with_spectrum(1 + 0.1 * np.random.default_rng(1).standard_normal(200), seed=2)
    return A, lam.sum()


def test_auto_chooses_xtrace_or_hutchinson_and_matches_the_better(decaying, flat):
    for (A, truth), chosen in ((decaying, "xtrace"), (flat, "hutchinson")):
        picks = {so.trace(A, max_matvecs=30, seed=s).settings["estimator"] for s in range(20)}
        assert picks == {chosen}
        rms = {m: np.sqrt(np.mean((runs(A, m, 30)[0] - truth) ** 2)) for m in ("auto", "hutchinson", "xtrace")}
        assert rms["auto"] <= 1.05 * min(rms["hutchinson"], rms["xtrace"]), rms
    # on a flat spectrum the sketch's probes are Hutchinson's first probes: nothing is wasted
    A, _ = flat
    assert so.trace(A, max_matvecs=30, seed=4).estimate == pytest.approx(
        so.trace(A, method="hutchinson", max_matvecs=30, seed=4).estimate, rel=1e-12)


@pytest.mark.parametrize("method", ["xtrace", "auto"])
def test_xtrace_grown_in_rounds_equals_one_shot_and_meets_rtol(decaying, method):
    A, truth = decaying
    budget = 4000 if method == "xtrace" else AUTO_KRYLOV_FROM - 1  # auto: XTrace below AUTO_KRYLOV_FROM
    r = so.trace(A, method=method, max_matvecs=budget, rtol=5e-4, seed=3)
    assert r.settings.get("estimator", "xtrace") == "xtrace"
    assert 40 < r.num_matvecs < 300 and r.num_matvecs % 2 == 0  # several rounds, stopped before n probes
    assert r.stderr <= 5e-4 * abs(r.estimate)
    assert abs(r.estimate - truth) <= 5 * r.stderr
    # the same probes at once: the incremental QR and H give the same estimate
    one = so.trace(A, method="xtrace", max_matvecs=r.num_matvecs, seed=3)
    assert one.estimate == pytest.approx(r.estimate, rel=1e-10)
    assert one.stderr == pytest.approx(r.stderr, rel=1e-6)


def test_more_probes_than_dimensions_is_exact():
    A, lam = symmetric_with_spectrum(np.linspace(-1, 3, 12), seed=0)
    for method in ("auto", "xtrace", "krylov-hutch++"):
        r = so.trace(A, method=method, max_matvecs=40)
        assert r.estimate == pytest.approx(lam.sum(), rel=1e-10) and r.stderr == 0.0 and r.num_matvecs <= 24
    tiny = so.trace(np.diag([1.0, 2.0, 3.0]), method="krylov-hutch++", max_matvecs=10)  # a budget of 10 spans it
    assert tiny.estimate == pytest.approx(6.0, rel=1e-12) and tiny.stderr == 0.0 and tiny.num_matvecs == 6


def test_auto_with_rtol_goes_on_with_krylov_hutchpp(decaying, flat):
    """``"auto"`` with ``rtol``: an XTrace first round that meets it stands, and so does XTrace where
    its rounds are to grow the sketch less than four times; further off, the round hands its basis
    and products to Krylov Hutch++, which meets ``rtol`` with calibrated errors; a flat spectrum
    stays with Hutchinson."""
    A, truth = decaying
    runs = [so.trace(A, max_matvecs=4000, rtol=2e-4, seed=s) for s in range(40)]
    assert {r.settings["estimator"] for r in runs} == {"krylov-hutch++"}
    assert all(r.stderr <= 2e-4 * abs(r.estimate) and r.num_matvecs < 300 for r in runs)
    z = np.array([(r.estimate - truth) / r.stderr for r in runs])
    assert 0.6 < np.sqrt(np.mean(z**2)) < 1.4, z
    # the hand-off spends fewer products than the same run started afresh (the first round's
    # 20 basis vectors and their products are its first block)
    afresh = [so.trace(A, method="krylov-hutch++", max_matvecs=4000, rtol=2e-4, seed=s).num_matvecs for s in range(40)]
    assert np.median([r.num_matvecs for r in runs]) < np.median(afresh) + 20, (sorted(afresh),)
    for rtol in (0.05, 1e-3):  # met by the first round, or by XTrace's rounds: XTrace's own result
        easy = so.trace(A, max_matvecs=4000, rtol=rtol, seed=3)
        alone = so.trace(A, method="xtrace", max_matvecs=4000, rtol=rtol, seed=3)
        assert easy.settings["estimator"] == "xtrace" and (easy.estimate, easy.stderr) == (alone.estimate, alone.stderr)
    A, truth = flat
    assert so.trace(A, max_matvecs=4000, rtol=1e-3, seed=3).settings["estimator"] == "hutchinson"


def test_krylov_basis_grows_while_it_pays():
    """Krylov Hutch++ sizes its basis from the pilots: it captures a fast-decaying spectrum
    whole, stops after three blocks (the first judged) on a flat one, and
    keeps a few blocks for outliers over a flat bulk, where it is at least as accurate as XTrace."""
    rng = np.random.default_rng(7)
    spectra = {"fast": 0.8 ** np.arange(300), "flat": rng.uniform(0, 1, 300),
               "outliers": np.concatenate([[40, 25, 20, 12], rng.normal(0, 0.05, 296)])}
    basis = {}
    for name, lam in spectra.items():
        A, lam = symmetric_with_spectrum(lam, seed=8)
        runs = [so.trace(A, method="krylov-hutch++", max_matvecs=120, seed=s) for s in range(30)]
        assert all(r.num_matvecs == 120 and 10 <= r.settings["pilots"] <= 15 and r.settings["block"] == 10 for r in runs)
        basis[name] = np.median([r.settings["krylov_basis"] for r in runs])
        stops = {r.settings["krylov_stop"] for r in runs}  # why it stopped growing
        assert stops <= {"judged", "budget", "invariant"} and (name != "flat" or stops == {"judged"}), stops
        if name == "outliers":
            mine = np.sqrt(np.mean([(r.estimate - lam.sum()) ** 2 for r in runs]))
            theirs = np.sqrt(np.mean([(so.trace(A, method="xtrace", max_matvecs=120, seed=s).estimate - lam.sum()) ** 2
                                      for s in range(30)]))
            assert mine <= 1.1 * theirs, (mine, theirs)
    assert basis["fast"] >= 80 and basis["flat"] == 30 and 30 <= basis["outliers"] <= 70, basis  # measured: 100, 30, 60


def test_float32_sketch_at_working_precision_still_reports_an_honest_error():
    """In float32 a decaying spectrum looks rank deficient to the QR; the tail the sketch
    cannot resolve is estimated (Hutchinson on the rest), not declared exact."""
    A, lam = symmetric_with_spectrum(1.0 / np.arange(1, 201) ** 3, seed=5)
    A32 = so.aslinearoperator(A.astype(np.float32))
    r = so.trace(A32, method="xtrace", max_matvecs=300, rtol=1e-6, seed=0)
    assert r.stderr > 0 and r.num_matvecs > 100
    assert abs(r.estimate - lam.sum()) <= 5 * r.stderr + 1e-6 * lam.sum()


def _room_for(monkeypatch, n, vectors):
    """Make every backend report free memory for ``vectors`` float64 vectors of length n (twice: half is used)."""
    from specops.ops import VectorOps

    monkeypatch.setattr(VectorOps, "free_memory", lambda self: 2 * vectors * n * 8)


def test_a_sketch_too_large_for_memory(monkeypatch, decaying):
    """XTrace's and Hutch++'s sketches are sized to half the free memory: auto stops growing the
    sketch there and estimates the rest by Hutchinson (still unbiased, honest stderr); an explicit
    sketch that cannot fit is an error naming the budget that fits; no room at all: Hutchinson."""
    from specops.trace import SKETCH_VECTORS

    A, truth = decaying
    n = A.shape[0]
    _room_for(monkeypatch, n, SKETCH_VECTORS["xtrace"] * 12 + 2 * 10)  # 12 probes, chunk 10
    estimates, stderrs = [], []
    for seed in range(60):
        with pytest.warns(RuntimeWarning, match="stops growing at 12 probes"):
            r = so.trace(A, max_matvecs=70, rtol=1e-6, seed=seed)
        assert r.settings["estimator"] == "xtrace, then hutch++" and r.settings["sketch_capacity"] == 12
        assert r.num_matvecs <= 70
        estimates.append(r.estimate)
        stderrs.append(r.stderr)
    z = (np.mean(estimates) - truth) / (np.std(estimates) / np.sqrt(len(estimates)))
    assert abs(z) < 4  # unbiased
    assert 0.6 < np.median(stderrs) / np.std(estimates) < 1.6  # honest
    with pytest.raises(ValueError, match=r"max_matvecs <= 24 .*method='hutchinson'"):
        so.trace(A, method="xtrace", max_matvecs=70)
    with pytest.raises(ValueError, match=r"hutch\+\+ sketch of 23 probes.*max_matvecs <= "):
        so.trace(A, method="hutch++", max_matvecs=70)
    _room_for(monkeypatch, n, 2 * 10)  # two chunks, no room for a sketch
    with pytest.warns(RuntimeWarning, match="using Hutchinson's estimator"):
        r = so.trace(A, max_matvecs=40, seed=0)
    assert r.settings["estimator"] == "hutchinson"
    assert abs(r.estimate - truth) < 5 * r.stderr


def test_krylov_basis_stops_where_memory_ends(monkeypatch, decaying):
    """Krylov Hutch++'s basis (two vectors per basis vector, and the pilots) stops growing at half
    the free memory; the estimate stays unbiased with an honest stderr."""
    from specops.trace import MAX_PILOTS, SKETCH_VECTORS

    A, truth = decaying
    _room_for(monkeypatch, A.shape[0], SKETCH_VECTORS["krylov-hutch++"] * (20 + MAX_PILOTS) + 2 * 10)  # room for 20
    runs = [so.trace(A, method="krylov-hutch++", max_matvecs=100, seed=s) for s in range(40)]
    assert max(r.settings["krylov_basis"] for r in runs) == 20
    errors = np.array([r.estimate - truth for r in runs])
    assert abs(errors.mean()) < 4 * errors.std() / np.sqrt(len(errors))
    assert 0.6 < np.median([r.stderr for r in runs]) / errors.std() < 1.6


CALIBRATION = {  # small dense operators of the calibration table's kinds (docs/algorithms.md)
    "i^-2": 1.0 / np.arange(1, 121) ** 2,
    "1/i": 1.0 / np.arange(1, 121),
    "uniform [0, 1]": np.random.default_rng(4).uniform(0, 1, 120),
    "1 + 1e-3 noise": 1 + 1e-3 * np.random.default_rng(5).standard_normal(120),
}


def _rms_z(A, truth, method, m, seeds, dtype=np.float64):
    z = []
    for s in seeds:
        r = so.trace(so.aslinearoperator(A.astype(dtype)), method=method, max_matvecs=m, seed=s)
        z.append((r.estimate - truth) / r.stderr)
    return float(np.sqrt(np.mean(np.square(z))))


@pytest.mark.parametrize("name", list(CALIBRATION))
def test_stderrs_are_calibrated(name):
    """RMS of error / stderr over 100 seeds near 1 for XTrace, Hutch++ and Hutchinson (the issue's
    band is 0.8-1.2 at 200 seeds; 100 seeds leave the RMS uncertain by about 10%)."""
    A, lam = symmetric_with_spectrum(CALIBRATION[name], seed=6)
    for method in ("xtrace", "hutch++", "hutchinson", "krylov-hutch++"):
        rms = _rms_z(A, lam.sum(), method, 48, range(100))
        assert 0.7 <= rms <= 1.3, (method, rms)


def test_xtrace_stderr_calibrated_in_float32():
    A, lam = symmetric_with_spectrum(CALIBRATION["1/i"], seed=6)
    assert 0.7 <= _rms_z(A, lam.sum(), "xtrace", 48, range(100), np.float32) <= 1.3


@pytest.mark.parametrize("name, lam, m", [
    ("fast decay", 0.9 ** np.arange(1, 121), 48),          # the sketch captures nearly all of it
    ("near-constant", CALIBRATION["1 + 1e-3 noise"], 48),   # the t_i's correlation dominates
    ("i^-2, larger budget", CALIBRATION["i^-2"], 120),     # the paper's shortfall grows with m
])
def test_xtrace_stderr_in_the_band_where_earlier_estimates_left_it(name, lam, m):
    """XTrace's RMS error / stderr in the issue's band 0.8-1.2, over 100 seeds, on the kinds of
    cells the earlier estimates missed (the rate-corrected jackknife: 0.71 and 1.25 on the first
    two). For honest stderrs the RMS over 100 Gaussian z-scores has a standard deviation of about
    1/sqrt(200) = 0.07; the measured values (0.96, 1.08, 1.00) are at least 1.7 of those inside."""
    A, lam = symmetric_with_spectrum(lam, seed=6)
    assert 0.8 <= _rms_z(A, lam.sum(), "xtrace", m, range(100)) <= 1.2, name


@pytest.mark.parametrize("planted", ["jackknife", "paper"])
def test_a_miscalibrated_xtrace_stderr_is_caught(monkeypatch, planted):
    """The calibration check fails on the plain jackknife (overstates) and on the paper's
    ``std(t_i) / sqrt(m)`` (understates)."""
    import importlib

    trace_module = importlib.import_module("specops.trace")

    def jackknife(H, R, W):
        return np.sqrt(trace_module._jackknife(H, R, W, np.arange(R.shape[1])))

    def paper(H, R, W):
        t = trace_module._leave_one_out(H, R, W)
        return np.std(t, ddof=1) / np.sqrt(len(t))

    monkeypatch.setattr(trace_module, "_calibrated_stderr", {"jackknife": jackknife, "paper": paper}[planted])
    A, lam = symmetric_with_spectrum(CALIBRATION["1/i"], seed=6)
    rms = _rms_z(A, lam.sum(), "xtrace", 48, range(100))
    assert not 0.7 <= rms <= 1.3, rms  # measured: 0.56 (jackknife), 1.62 (paper)
