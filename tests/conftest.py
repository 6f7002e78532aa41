"""Test configuration: one thread per BLAS, so timings and CI are reproducible."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
