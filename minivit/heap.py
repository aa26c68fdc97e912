"""Keep the memory a train step frees for the next step, instead of handing it back to the system.

A train step frees its activations as backward consumes them (docs/vit.md, "What a train step
holds"), so by the step's end nearly all of its memory is free at once. glibc's ``malloc`` then
returns that memory to the system: it trims the free space at the top of each heap and unmaps
every block that had a mapping of its own. The next forward takes it back a page at a time, and
the first touch of each page is a page fault in which the kernel hands over a zeroed page. On the
2-core development host a ViT-Ti/16 batch-8 train step on NumPy took 28K-42K such faults, about
100 ms of system CPU time per step (5-15% of the step), where the step before backward consumed
its cache took almost none (benchmarks/README.md, "A train step's memory").

:func:`keep_freed_memory` sets three of ``malloc``'s parameters (``mallopt``) so that freed memory
stays in the process for the next step:

- ``M_TRIM_THRESHOLD``, the free space a heap's top may keep before ``malloc`` gives it back:
  2 GiB, the largest value ``mallopt`` takes (glibc's default starts at 128 KiB);
- ``M_MMAP_THRESHOLD``, the size from which a block gets a mapping of its own, unmapped on
  ``free``: 32 MiB, glibc's largest on 64-bit systems (by default it starts at 128 KiB and rises
  with the sizes freed). Larger blocks are still mapped and unmapped.
- ``M_TOP_PAD``, the extra space asked of the system whenever a heap grows: 64 MiB, the size of
  the heaps that glibc gives each thread (the batch shards run on the pool's threads). A
  thread's heap that falls wholly free is unmapped unless its neighbour keeps that much spare
  room, whatever the trim threshold says; the pad makes sure it does. The pad is address
  space: a page of it costs memory only once it is touched.

With the first two set, the same step still took about 5K faults (the pool threads' heaps);
with all three, none, and 8-11 ms of system time. The price is that the process keeps the
memory of its largest step until it exits, as PyTorch's caching allocator keeps a GPU's. It
applies to the whole process (to PyTorch's CPU tensors too, and in the benchmarks to both
sides alike), so the library never sets it by itself: the ``minivit`` command line and the
benchmarks do, before any work, and a training loop of one's own can call it.
``MINIVIT_KEEP_MEMORY=0`` leaves ``malloc`` as it is. On a C library other than glibc (macOS,
musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["keep_freed_memory", "applied"]

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TOP_PAD = 64 * 2**20  # glibc's HEAP_MAX_SIZE on 64-bit systems: one thread heap

_APPLIED: dict | None = None


def keep_freed_memory(*, env: bool = True) -> dict | None:
    """Set glibc ``malloc`` to keep freed memory (see the module's text); returns what was set,
    or None where nothing was (not glibc, ``mallopt`` refused, or ``MINIVIT_KEEP_MEMORY=0`` when
    ``env`` is true). Calling it again changes nothing."""
    global _APPLIED
    if env and os.environ.get("MINIVIT_KEEP_MEMORY", "1").strip() == "0":
        return None
    if _APPLIED is not None:
        return _APPLIED
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = {}
    for name, number, value in (
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("M_TOP_PAD", _M_TOP_PAD, TOP_PAD),
    ):
        if mallopt(number, value):  # 1 on success, 0 on an error (a value out of range)
            done[name] = value
    _APPLIED = done or None
    return _APPLIED


def applied() -> dict | None:
    """What :func:`keep_freed_memory` set in this process, or None."""
    return _APPLIED
