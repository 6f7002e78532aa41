"""Test configuration: one thread per BLAS, so timings and CI are reproducible."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


@pytest.fixture(autouse=True)
def _fresh_construction_verdicts():
    """Each test builds its operators with every construction check (no verdicts carried over)."""
    from specops.checks import VERDICTS

    VERDICTS.clear()
    yield
