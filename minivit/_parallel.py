"""A small thread pool for large elementwise work on the CPU.

NumPy runs one ufunc on one core, but it releases the GIL inside every ufunc loop. Splitting a
large elementwise computation into row blocks and running the blocks on a few threads therefore
uses every core, and working block by block keeps the temporaries of a chain of ufuncs in the
cache instead of streaming whole arrays through memory once per ufunc.

Only the NumPy fast paths in ``minivit.ops`` use this; CuPy work is already parallel on the
device. The generic ``xp`` code in each op stays the reference that these fast paths are
tested against.

The thread count is ``MINIVIT_NUM_THREADS`` when set, else the number of cores this process may
use; :func:`set_num_threads` changes it (the benchmarks record it). One thread means "run inline".
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["get_num_threads", "set_num_threads", "for_each_block", "BLOCK_ELEMS"]

# Elements per block: small enough that a few float32 temporaries of this size stay in the L2
# cache (64K floats = 256 KiB), large enough that NumPy's per-call overhead (~1 us) is amortised.
BLOCK_ELEMS = 1 << 16

# Below this many elements in total, threads cost more than they save.
MIN_PARALLEL_ELEMS = 1 << 16


def _default_threads() -> int:
    env = os.environ.get("MINIVIT_NUM_THREADS")
    if env:
        try:
            return max(int(env), 1)
        except ValueError:
            pass
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


_lock = threading.Lock()
_num_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None


def get_num_threads() -> int:
    """How many threads the elementwise fast paths use."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (1 = no pool) from now on."""
    global _num_threads, _pool
    n = max(int(n), 1)
    with _lock:
        if n != _num_threads and _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            # The calling thread does one share itself, so the pool needs n - 1 workers.
            _pool = ThreadPoolExecutor(
                max_workers=max(_num_threads - 1, 1), thread_name_prefix="minivit"
            )
        return _pool


def for_each_block(fn, n_rows: int, row_elems: int, block_elems: int | None = None) -> None:
    """Call ``fn(start, stop)`` over row ranges that cover ``range(n_rows)`` exactly once.

    Each range holds about ``block_elems`` elements (``row_elems`` per row, at least one row).
    The ranges are shared out over the threads in contiguous runs; ``fn`` must only write rows
    ``start:stop`` of its outputs, so the calls never overlap. Exceptions in a worker are raised
    here.
    """
    if n_rows <= 0:
        return
    if block_elems is None:
        block_elems = BLOCK_ELEMS
    rows_per_block = max(block_elems // max(row_elems, 1), 1)
    n_threads = _num_threads
    total = n_rows * row_elems
    if n_threads <= 1 or total < MIN_PARALLEL_ELEMS or n_rows < 2:
        for s in range(0, n_rows, rows_per_block):
            fn(s, min(s + rows_per_block, n_rows))
        return
    n_threads = min(n_threads, n_rows)
    # Contiguous share per thread, cut at block boundaries where possible.
    bounds = [n_rows * i // n_threads for i in range(n_threads + 1)]

    def run_share(lo, hi):
        for s in range(lo, hi, rows_per_block):
            fn(s, min(s + rows_per_block, hi))

    pool = _get_pool()
    futures = [pool.submit(run_share, bounds[i], bounds[i + 1]) for i in range(1, n_threads)]
    error = None
    try:
        run_share(bounds[0], bounds[1])
    except BaseException as exc:  # still wait for the workers before raising
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
