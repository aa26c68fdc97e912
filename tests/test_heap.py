"""minivit.heap: glibc malloc keeps the memory a step frees, so the next step does not fault it
in again page by page. The settings are process wide, so each check runs in a fresh process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from minivit import heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's: elsewhere heap does nothing"
)

# Eight 4 MiB arrays made, touched and freed twice; prints the minor page faults of the second
# round. Without the settings glibc hands the freed 32 MiB back and faults every page in again.
_SCRIPT = r"""
import os, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from minivit.heap import keep_freed_memory
print(keep_freed_memory())

def round_():
    arrays = [np.ones(1 << 20, dtype=np.float32) for _ in range(8)]
    del arrays

round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env_extra):
    env = dict(os.environ, **env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, ROOT], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return out[0], int(out[1])


@glibc
def test_freed_memory_is_kept_for_the_next_round():
    applied, faults = _run({"MINIVIT_KEEP_MEMORY": "1"})
    assert all(k in applied for k in ("M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD", "M_TOP_PAD"))
    assert faults < 800, faults  # the round touches 8192 pages; kept memory faults on none


@glibc
def test_minivit_keep_memory_0_leaves_malloc_alone():
    applied, _ = _run({"MINIVIT_KEEP_MEMORY": "0"})
    assert applied == "None"


def test_off_glibc_or_switched_off_it_does_nothing(monkeypatch):
    monkeypatch.setenv("MINIVIT_KEEP_MEMORY", "0")
    assert heap.keep_freed_memory() is None
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(heap, "_APPLIED", None)
    assert heap.keep_freed_memory(env=False) is None
