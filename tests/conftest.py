"""Shared test machinery: the ``backend`` fixture, the ``--backend`` and ``--cupy-stand-in``
options, hypothesis profiles.

Every op and model test takes the ``backend`` fixture, so the whole suite runs once per backend:
on NumPy always, and on CuPy where a CUDA device exists (skipped, with the reason, elsewhere).
``pytest --backend numpy`` or ``--backend cupy`` restricts the run to one backend; ``--backend
cupy`` alone also leaves out the tests that do not run on cupy.

``pytest --cupy-stand-in`` runs the CuPy half on the CPU instead: ``import cupy`` gives the strict
stand-in of ``tests/_cupy_stand_in.py`` (NumPy inside, CuPy's rules outside; kernels in the SIMT
emulator), and only the tests that run on the ``cupy`` backend are collected: those taking the
``backend`` fixture, and those marked ``cupy``. It checks every CuPy code path of minivit and of
the tests, not a GPU: no speed, no GPU rounding.
"""

from __future__ import annotations

import os
import sys

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
    parser.addoption(
        "--cupy-stand-in",
        action="store_true",
        help="run the cupy half of the suite on the CPU stand-in for CuPy "
        "(tests/_cupy_stand_in.py) instead of a GPU",
    )


def _stand_in(config) -> bool:
    return bool(config.getoption("--cupy-stand-in"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cupy: needs the cupy backend, without the fixture")
    if _stand_in(config):
        import _cupy_stand_in

        from minivit import kernels_cupy

        _cupy_stand_in.install()
        if not config.getoption("--backend"):  # the stand-in run is a --backend cupy run
            config.option.backend = ["cupy"]
        if "MINIVIT_KERNELS" not in os.environ:
            # The emulated kernels take a forked process per launch: a model test would launch
            # hundreds. test_kernels_cupy.py turns them on for itself; test_kernels_emulated.py
            # drives them through whole models. MINIVIT_KERNELS=1 keeps them on everywhere.
            kernels_cupy.set_enabled(False)


def pytest_report_header(config):
    if _stand_in(config):
        from minivit import kernels_cupy

        where = "everywhere" if kernels_cupy.enabled() else "in test_kernels_cupy.py only"
        return (
            "cupy: the CPU stand-in of tests/_cupy_stand_in.py (not a GPU); "
            f"fused kernels (SIMT emulator) {where}"
        )
    return None


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names = metafunc.config.getoption("--backend") or list(BACKEND_NAMES)
        metafunc.parametrize("backend", names, indirect=True)


def pytest_collection_modifyitems(config, items):
    """With --backend cupy alone (which --cupy-stand-in implies), keep only the tests that run
    on the cupy backend (the others are NumPy-only: on a GPU machine they would spend its time
    for nothing)."""
    if config.getoption("--backend") != ["cupy"]:
        return
    keep, drop = [], []
    for item in items:
        on_cupy = getattr(getattr(item, "callspec", None), "params", {}).get("backend") == "cupy"
        (keep if on_cupy or item.get_closest_marker("cupy") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _skip_for_missing_packages():
    """Under MINIVIT_MISSING_PACKAGES=skip (the device run, tests/_requires.py), a test that
    needs an outside package that is not installed, in its body or in a fixture, is skipped,
    naming it; everywhere else it fails."""
    from _requires import skip_missing

    try:
        return (yield)
    except ModuleNotFoundError as exc:
        skip_missing(exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    return (yield from _skip_for_missing_packages())


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    return (yield from _skip_for_missing_packages())


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
    """Restore the pool's thread count and the batch-shard setting (on or off, threads or
    processes) after a test changes them, and stop any shard worker processes it started."""
    from minivit import _parallel
    from minivit.models import shard_workers, sharding

    prev_threads = _parallel.get_num_threads()
    with sharding.using(sharding.mode()):  # restores both parts of the setting exactly
        yield
    shard_workers.stop_all()
    _parallel.set_num_threads(prev_threads)


@pytest.fixture
def cupy_stand_in(monkeypatch):
    """For one test, ``import cupy`` gives the CPU stand-in (whatever the run's backends) and
    minivit's cupy backend is built on it; kernels compile afresh for it. Yields the Backend.
    Everything is restored after."""
    import _cupy_stand_in

    from minivit import backend, kernels_cupy

    for name, mod in _cupy_stand_in.MODULES.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(backend._CACHE, "cupy", raising=False)
    monkeypatch.setattr(kernels_cupy, "_CACHE", {})
    yield get_backend("cupy")
    backend._CACHE.pop("cupy", None)
