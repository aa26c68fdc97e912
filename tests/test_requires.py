"""tests/_requires.py: a missing outside package fails the suite, except in the device run."""

from __future__ import annotations

import sys

import pytest
from _pytest.outcomes import Skipped
from _requires import missing_package, require, skip_missing


def test_a_missing_package_fails_unless_the_run_skips_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed
    monkeypatch.delenv("MINIVIT_MISSING_PACKAGES", raising=False)
    with pytest.raises(ModuleNotFoundError):
        require("tqdm.auto")
    monkeypatch.setenv("MINIVIT_MISSING_PACKAGES", "skip")
    with pytest.raises(Skipped, match="'tqdm' is not installed"):
        require("tqdm.auto")


def test_only_an_absent_outside_package_is_skipped(monkeypatch):
    monkeypatch.setenv("MINIVIT_MISSING_PACKAGES", "skip")
    # a missing part of an installed package is a real error, skipped nowhere
    assert missing_package(ModuleNotFoundError("x", name="numpy.nope")) is None
    assert missing_package(ModuleNotFoundError("x", name="torch.nope")) is None
    # not a package of the list (minivit's own modules, say)
    monkeypatch.setitem(sys.modules, "minivit_nope", None)
    assert missing_package(ModuleNotFoundError("x", name="minivit_nope")) is None
    skip_missing(ValueError("not an import error"))  # returns: the caller re-raises
    monkeypatch.setitem(sys.modules, "ot", None)
    assert missing_package(ModuleNotFoundError("x", name="ot")) == "ot"
