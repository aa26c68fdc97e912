"""Outside packages the tests need: required, except on the device machine.

The README's test command installs every one of them: the oracles (torch, transformers, POT,
timm) and the extras the tools use (safetensors, scikit-learn, tqdm, matplotlib, Pillow). A
missing one is an error there, since a check that quietly skipped would pass for one that ran.

The GPU machine has no network to install them, and its image lacks some (POT, as listed on
2026-11-17; ``benchmarks/fetch_wheels.sh`` prepares it as a wheel to carry there).
``benchmarks/gpu_run.sh`` sets ``MINIVIT_MISSING_PACKAGES=skip``: then a test that needs one of
these packages, and finds it missing, is skipped with the package's name instead of failing, so
the device's minutes go to everything else the suite checks on CuPy.

- :func:`require` is for a test's own imports (at the top of a module it skips the module);
- conftest's ``pytest_pyfunc_call`` treats an import inside a test, or inside minivit's code
  that the test runs, the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

__all__ = ["OUTSIDE", "missing_package", "require", "skip_missing", "skipping_missing"]

OUTSIDE = ("torch", "transformers", "tokenizers", "ot", "timm", "torchvision",
           "safetensors", "sklearn", "tqdm", "matplotlib", "PIL", "threadpoolctl")  # fmt: skip


def skipping_missing() -> bool:
    """Whether this run skips (rather than fails) a test whose outside package is missing."""
    return os.environ.get("MINIVIT_MISSING_PACKAGES", "fail") == "skip"


def _absent(top: str) -> bool:
    if top in sys.modules:
        return sys.modules[top] is None  # (None: an import of it is refused)
    return importlib.util.find_spec(top) is None


def missing_package(exc: BaseException) -> str | None:
    """The outside package whose absence ``exc`` reports, or None: any other error, including
    a missing part of a package that is installed."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.partition(".")[0]
    return top if top in OUTSIDE and _absent(top) else None


def skip_missing(exc: BaseException) -> None:
    """Skip for ``exc`` if it reports a missing outside package and the run skips those;
    otherwise return (the caller re-raises)."""
    name = missing_package(exc)
    if name is not None and skipping_missing():
        pytest.skip(
            f"{name!r} is not installed and MINIVIT_MISSING_PACKAGES=skip (the device run)",
            allow_module_level=True,
        )


def require(name: str, importer=importlib.import_module):
    """``importer(name)``; if an outside package is missing and the run skips those, skip."""
    try:
        return importer(name)
    except ModuleNotFoundError as exc:
        skip_missing(exc)
        raise
