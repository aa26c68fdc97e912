"""Shared test machinery: the ``backend`` fixture, the ``--backend`` option, hypothesis profiles.

Every op and model test takes the ``backend`` fixture, so the whole suite runs once per backend:
on NumPy always, and on CuPy where a CUDA device exists (skipped, with the reason, elsewhere).
``pytest --backend numpy`` or ``--backend cupy`` restricts the run to one backend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minivit.backend import BACKEND_NAMES, BackendUnavailable, get_backend

# "ci" keeps the whole suite well under 10 minutes on 2 cores; "thorough" is for a long local run.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.register_profile("ci", max_examples=15, **_COMMON)
settings.register_profile("dev", max_examples=40, **_COMMON)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        action="append",
        choices=list(BACKEND_NAMES),
        default=None,
        help="run the suite on this backend only (repeatable); default: numpy and cupy",
    )


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names = metafunc.config.getoption("--backend") or list(BACKEND_NAMES)
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request):
    """The Backend under test; CuPy is skipped with the reason where it cannot run."""
    try:
        return get_backend(request.param)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def rng():
    """A seeded host generator for test data (moved to the backend with backend.asarray)."""
    return np.random.default_rng(0)


@pytest.fixture
def keep_parallel_settings():
    """Restore the pool's thread count and the batch-shard switch after a test changes them."""
    from minivit import _parallel
    from minivit.models import sharding

    prev_on, prev_threads = sharding.enabled(), _parallel.get_num_threads()
    yield
    sharding.set_enabled(prev_on)
    _parallel.set_num_threads(prev_threads)
