"""The outside oracles (torch, transformers, POT, timm): required, except on the device machine.

The README's test command installs every oracle, and a missing one is an error there: a check
that quietly skipped would pass for one that ran. The GPU machine's image has torch but not
transformers, POT or timm, and cannot install them (no network). ``benchmarks/gpu_run.sh`` sets
``MINIVIT_ORACLES=optional``; then a test that needs a missing oracle is skipped, naming it,
instead of failing, so the device's minutes go to everything else the suite checks on CuPy.

- :func:`oracle_import` is for a test module's own imports (a module-level skip);
- conftest's ``pytest_pyfunc_call`` does the same for imports inside a test.
"""

from __future__ import annotations

import importlib
import os

import pytest

__all__ = ["ORACLES", "oracles_optional", "missing_oracle", "oracle_import"]

ORACLES = ("torch", "transformers", "tokenizers", "ot", "timm", "torchvision")


def oracles_optional() -> bool:
    return os.environ.get("MINIVIT_ORACLES", "required") == "optional"


def missing_oracle(exc: BaseException) -> str | None:
    """The oracle package whose absence ``exc`` reports, or None (any other error)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name in ORACLES:
        return exc.name
    return None


def skip_for(name: str):
    pytest.skip(
        f"oracle {name!r} is not installed and MINIVIT_ORACLES=optional (the device run)",
        allow_module_level=True,
    )


def oracle_import(name: str, importer=importlib.import_module):
    """``importer(name)``; if an oracle is missing and oracles are optional, skip instead."""
    try:
        return importer(name)
    except ModuleNotFoundError as exc:
        missing = missing_oracle(exc)
        if missing is None or not oracles_optional():
            raise
        skip_for(missing)
