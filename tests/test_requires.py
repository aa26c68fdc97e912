"""tests/_requires.py: a missing outside package fails the suite, except in the device run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from _pytest.outcomes import Skipped
from _requires import missing_package, require, skip_missing


def test_a_missing_package_fails_unless_the_run_skips_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # (imported already by other tests)
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


def test_the_hooks_skip_a_test_or_a_fixture_only_in_the_device_run(tmp_path):
    """conftest's hooks, in a pytest of their own: an import of a missing package in a test's
    body and in a fixture fails a normal run and is skipped, named, under
    MINIVIT_MISSING_PACKAGES=skip. A plain failure stays a failure in both."""
    (tmp_path / "test_x.py").write_text(
        textwrap.dedent(
            """
            import sys
            import pytest

            @pytest.fixture
            def needs_tqdm(monkeypatch):
                monkeypatch.setitem(sys.modules, "tqdm", None)
                monkeypatch.setitem(sys.modules, "tqdm.auto", None)
                import tqdm.auto

            def test_body(monkeypatch):
                monkeypatch.setitem(sys.modules, "tqdm", None)
                monkeypatch.setitem(sys.modules, "tqdm.auto", None)
                import tqdm.auto

            def test_fixture(needs_tqdm):
                pass

            def test_plain():
                assert False
            """
        )
    )
    here = os.path.dirname(os.path.abspath(__file__))

    def run(skip):
        env = {k: v for k, v in os.environ.items() if k != "MINIVIT_MISSING_PACKAGES"}
        env.update(PYTHONPATH=here, **({"MINIVIT_MISSING_PACKAGES": "skip"} if skip else {}))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
               "-rs", str(tmp_path / "test_x.py")]  # fmt: skip
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        return out.stdout

    normal = run(skip=False)
    assert "2 failed, 1 error" in normal, normal  # (a fixture's failure is an error)
    device = run(skip=True)
    assert "1 failed, 2 skipped" in device, device
    assert re.search(r"SKIPPED \[2\].*'tqdm' is not installed and MINIVIT_MISSING_PACKAGES=skip",
                     device), device  # fmt: skip
