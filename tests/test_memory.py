"""The memory model of docs/scale.md against measured peaks of NumPy allocations."""

import importlib.util
import pathlib
import tracemalloc

import numpy as np
import pytest

import specops as so

_spec = importlib.util.spec_from_file_location(
    "memory_model", pathlib.Path(__file__).parents[1] / "benchmarks" / "memory_model.py")
memory_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_model)

N = 6000


@pytest.fixture(scope="module")
def A():
    return memory_model.Diagonal(np.random.default_rng(0).uniform(0.0, 1.0, N))


@pytest.mark.parametrize("fn, kw", [
    ("spectral_density", dict(num_probes=6, num_steps=30)),
    ("spectral_density", dict(num_probes=6, num_steps=30, probes_at_once=2)),
    ("spectral_density", dict(num_probes=6, num_steps=30, reorth_window=4)),
    ("eigsh", dict(k=1)),
    ("eigsh", dict(k=4, block_size=2)),
    ("eigsh", dict(k=3)),
    ("trace", dict(method="hutchinson", max_matvecs=40)),
    ("trace", dict(method="xtrace", max_matvecs=40)),
    ("diagonal", dict(max_matvecs=40)),
])
def test_peak_within_the_model(A, fn, kw):
    measured = memory_model.peak_vectors(A, fn, kw)
    model = memory_model.model_vectors(fn, kw)
    assert measured <= model
    if fn == "spectral_density":  # the bases alone: the model is tight here
        g, w = kw.get("probes_at_once", 6), kw.get("reorth_window", 30)
        assert measured >= g * w
        assert measured >= 0.9 * model


def test_slq_bases_bytes_are_what_settings_say(A):
    tracemalloc.start()
    d = so.spectral_density(A, num_probes=4, num_steps=20, probes_at_once=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert d.settings["basis_bytes"] == 20 * N * 8
    assert d.settings["basis_bytes"] <= peak <= d.settings["basis_bytes"] + 8 * N * 8


def test_krylov_hutchpp_within_the_model():
    """On a decaying diagonal with Gaussian probes the basis takes most of the budget: its buffer
    (twice the basis at most) and the pilots are at most the model, and at least the basis."""
    decaying = memory_model.Diagonal(0.97 ** np.arange(N))
    kw = dict(method="krylov-hutch++", max_matvecs=200, distribution="normal")
    r = so.trace(decaying, **kw)
    measured = memory_model.peak_vectors(decaying, "trace", kw)
    assert r.settings["krylov_basis"] >= 100
    assert r.settings["krylov_basis"] + 2 * r.settings["pilots"] <= measured <= memory_model.model_vectors("trace", kw)
