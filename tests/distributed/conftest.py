"""Fixtures of the MPI tests."""

import pytest
from mpi_launch import launch


@pytest.fixture
def mpirun():
    """``mpirun(args, ranks=2, timeout=120)``: launch ``mpiexec`` and return its ``Launch``."""
    return launch
