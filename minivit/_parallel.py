"""A small thread pool for the CPU: batch shards, GEMM row blocks and large elementwise work.

NumPy runs one ufunc on one core, but it releases the GIL inside every ufunc loop. Splitting a
large elementwise computation into row blocks and running the blocks on a few threads therefore
uses every core, and working block by block keeps the temporaries of a chain of ufuncs in the
cache instead of streaming whole arrays through memory once per ufunc.

The NumPy fast paths in ``minivit.ops`` use it op by op, and ``minivit.models.sharding`` runs
whole batch shards of a model's forward and backward on it (:func:`run_tasks`; the ops inside a
shard then run inline). CuPy work is already parallel on the device. The generic ``xp`` code
in each op stays the reference that these fast paths are tested against.

The thread count is ``MINIVIT_NUM_THREADS`` when set, else the number of cores this process may
use; :func:`set_num_threads` changes it (the benchmarks record it). One thread means "run inline".

Three rules, each measured on a 2-core machine (benchmarks/README.md has the figures):

- the pool pays only for work that runs long between Python calls: whole GEMM blocks, and
  elementwise blocks of 256K elements on arrays above 512K; smaller work runs inline, since the
  threads hand the GIL to each other at every NumPy call;
- one block per thread for GEMMs: a late worker costs nothing (the calling thread takes its
  block), and smaller blocks only repack the weights more often;
- one source of threads: inside a model's forward or backward (:func:`pool_only`) BLAS runs on
  one thread per pool thread, so OpenBLAS's spinning workers never compete with the pool's.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

__all__ = [
    "get_num_threads",
    "set_num_threads",
    "for_each_block",
    "blas_single_threaded",
    "pool_only",
    "run_tasks",
    "in_block",
    "available_threads",
    "BLOCK_ELEMS",
    "for_each_group",
    "inline",
]

# Elements per block: small enough that a few float32 temporaries of this size stay in the
# cache (256K floats = 1 MiB), large enough that each ufunc call runs long with the GIL released.
# Two threads trade the GIL at every NumPy call; with 64K-element blocks (a few microseconds per
# call) that handoff cost more than the second core gave, and two threads were slower than one.
BLOCK_ELEMS = 1 << 18

# Below this many elements in total the work runs inline: threads cost more than they save
# (measured: layernorm on 1576 x 192 was no faster on two threads at any block size).
MIN_PARALLEL_ELEMS = 1 << 19


def _default_threads() -> int:
    env = os.environ.get("MINIVIT_NUM_THREADS")
    if env:
        try:
            return max(int(env), 1)
        except ValueError:
            from .backend import setting_problem

            setting_problem(
                "MINIVIT_NUM_THREADS",
                f"$MINIVIT_NUM_THREADS={env!r} is not a whole number",
                "the pool takes one thread per core",
            )
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


_lock = threading.Lock()
_num_threads = _default_threads()
# Set while a thread runs a block (the caller's and the workers'): work started inside a block
# runs inline, since every thread of the pool is already busy with a block of its own.
_local = threading.local()


def in_block() -> bool:
    """True while this thread runs a block of :func:`for_each_block` (or a task of
    :func:`run_tasks`): nested parallel work then runs inline."""
    return getattr(_local, "in_block", False)


@contextmanager
def inline():
    """Run the body as a block runs: parallel work started inside it (the fast paths' blocks,
    a nested sharded forward) runs inline on this thread. For a batch shard that runs here
    while worker processes hold the other cores (``minivit/models/shard_workers.py``)."""
    prev = in_block()
    _local.in_block = True
    try:
        yield
    finally:
        _local.in_block = prev


def available_threads() -> int:
    """The threads a call made here may split its work over: the pool's thread count, or 1
    inside a block (where any split would run inline, one piece after the other)."""
    return 1 if in_block() else _num_threads


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


def for_each_block(
    fn, n_rows: int, row_elems: int, block_elems: int | None = None, min_elems: int | None = None
) -> None:
    """Call ``fn(start, stop)`` over row ranges that cover ``range(n_rows)`` exactly once.

    Each range holds about ``block_elems`` elements (``row_elems`` per row, at least one row).
    The calling thread and the pool's workers take blocks in turn from one shared counter, so a
    worker that is slow to be scheduled (a busy machine) never makes the call slower than
    running alone: the calling thread simply takes the blocks it has not started. ``fn`` must
    only write rows ``start:stop`` of its outputs, so the calls never overlap. The first
    exception raised by a block is raised here, after every started block has finished.
    Below ``min_elems`` elements in all (default ``MIN_PARALLEL_ELEMS``) it runs inline, and so
    does a call made from inside a block (the pool is busy; see :func:`run_tasks`).
    """
    if n_rows <= 0:
        return
    if block_elems is None:
        block_elems = BLOCK_ELEMS
    rows_per_block = max(block_elems // max(row_elems, 1), 1)
    starts = range(0, n_rows, rows_per_block)
    n_blocks = len(starts)
    n_threads = min(_num_threads, n_blocks)
    if min_elems is None:
        min_elems = MIN_PARALLEL_ELEMS
    if n_threads <= 1 or n_rows * row_elems < min_elems or in_block():
        for s in starts:
            fn(s, min(s + rows_per_block, n_rows))
        return

    counter = itertools.count()  # next() on it is atomic under the GIL
    lock = threading.Lock()
    finished = threading.Event()
    state = {"done": 0, "error": None}

    def take_blocks():
        while True:
            i = next(counter)
            if i >= n_blocks:
                return
            s = starts[i]
            try:
                with inline():
                    fn(s, min(s + rows_per_block, n_rows))
            except BaseException as exc:  # kept, raised by the caller
                state["error"] = state["error"] or exc
            with lock:
                state["done"] += 1
                if state["done"] == n_blocks:
                    finished.set()

    pool = _get_pool()
    for _ in range(n_threads - 1):
        pool.submit(take_blocks)
    take_blocks()
    finished.wait()  # only the blocks a worker has started remain; they are short
    if state["error"] is not None:
        raise state["error"]


def run_tasks(tasks) -> None:
    """Run the callables ``tasks`` (no arguments) concurrently on the pool and the calling
    thread; returns when all have finished, raising the first exception one raised.

    Each task runs as one block of :func:`for_each_block`, so the parallel work it starts runs
    inline on its own thread: this is for coarse, independent pieces of work (the batch shards
    of a model's forward and backward, see ``minivit.models.sharding``). With one thread, or
    from inside a block, the tasks run one after the other on the calling thread.
    """
    tasks = list(tasks)
    for_each_block(lambda i, _: tasks[i](), len(tasks), 1, block_elems=1, min_elems=0)


def for_each_group(fn, sizes: dict, min_elems: int | None = None) -> None:
    """Call ``fn(key)`` once for every key of ``sizes`` ({key: elements of work}), the keys split
    over the pool's threads in groups of about equal total size (largest first, each to the
    lightest group so far): for work that comes in many arrays of uneven sizes, such as a model's
    parameters (copied to shard workers, or their gradients summed over shards). Below
    ``min_elems`` elements in all (default ``MIN_PARALLEL_ELEMS``) it runs inline, in the keys'
    order: for a small model's parameters (the main job's 136K) handing them to the pool costs
    more than the copy itself (timed once, not saved: about a third of the time inline)."""
    if min_elems is None:
        min_elems = MIN_PARALLEL_ELEMS
    if sum(sizes.values()) < min_elems:
        with inline():  # as a group on the pool runs (in a block)
            for k in sizes:
                fn(k)
        return
    n = max(min(_num_threads, len(sizes)), 1)
    groups = [[] for _ in range(n)]
    totals = [0] * n
    for k in sorted(sizes, key=lambda k: -sizes[k]):
        i = totals.index(min(totals))
        groups[i].append(k)
        totals[i] += sizes[k]

    def task(group):
        def run():
            for k in group:
                fn(k)

        return run

    run_tasks(task(g) for g in groups)


# ----------------------------------------------------------------------------------------------
# BLAS threads

_blas_libs = None  # threadpoolctl controllers of the loaded BLAS libraries; () without it


def _blas_controllers():
    global _blas_libs
    if _blas_libs is None:
        import sys

        if "numpy" not in sys.modules:  # BLAS is not loaded yet: look again next time
            return ()
        try:
            from threadpoolctl import ThreadpoolController

            _blas_libs = tuple(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # threadpoolctl unable to read the loaded libraries
            _blas_libs = ()
    return _blas_libs


def limit_blas_threads(n):
    """A context that holds the BLAS libraries to ``n`` threads each and restores their counts
    at its end; ``n`` = 0 or None leaves them alone.

    threadpoolctl does the work. It is a dependency, so it is missing only where minivit was
    installed with ``--no-deps`` (benchmarks/gpu_run.sh, on the device machine's image): there
    nothing is limited, with a warning that says so.
    """
    if not n:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        warnings.warn(
            "threadpoolctl is not installed: the BLAS thread count is not limited",
            RuntimeWarning,
            stacklevel=2,
        )
        return nullcontext()
    return threadpool_limits(limits=int(n), user_api="blas")


# Open blas_single_threaded() contexts, in every thread together: the first to open sets the
# BLAS libraries to one thread, the last to close restores the counts saved by the first.
_blas_depth = 0
_blas_saved: list = []
_blas_lock = threading.Lock()


@contextmanager
def blas_single_threaded():
    """Run the body with the BLAS libraries on one thread each, then restore their counts.

    For many small GEMMs (attention's per-head products) that this pool spreads over its own
    threads: OpenBLAS splits each small product over all its threads, which then wait on each
    other at every call (and spin or stall when the machine is busy); one BLAS thread per pool
    thread has no such barrier. Nested and concurrent uses cost nothing: only the first to open
    sets the counts, and only the last to close restores them. Open the outermost one from the
    main thread: OpenBLAS ignores a raise of its thread count made from another thread. Without
    threadpoolctl this does nothing.
    """
    global _blas_depth, _blas_saved
    with _blas_lock:  # the counts are process-wide: one count of open contexts, all threads
        _blas_depth += 1
        if _blas_depth == 1:
            libs = _blas_controllers()
            _blas_saved = [(lib, lib.num_threads) for lib in libs]
            for lib, n in _blas_saved:
                if n != 1:
                    lib.set_num_threads(1)
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for lib, n in _blas_saved:
                    if n != 1:
                        lib.set_num_threads(n)
                _blas_saved = []


@contextmanager
def pool_only():
    """The threading rule for a whole forward or backward pass on NumPy.

    With more than one pool thread, the pool is the only source of threads and every BLAS call
    inside runs on one thread (nested :func:`blas_single_threaded`). Why: OpenBLAS's own
    workers spin for about 0.1 s after each multi-threaded call, waiting for the next one, and a
    spinning worker takes a core from this pool's worker; mixing the two pools made a ViT-Ti
    train step about 15% slower here than either pool alone. With one pool thread, BLAS keeps
    its own threads (the pool then runs everything inline and has nothing to collide with).
    """
    if _num_threads <= 1:
        yield
        return
    with blas_single_threaded():
        yield
