"""What running a train step's batch shards on threads costs, against processes and against one
shard alone (Linux: it forks).

    python benchmarks/shard_contention.py [--model vit_tiny_patch16_224] [--batch 8]
                                          [--repeats 12] [--gap 0.12]

On the CPU, minivit cuts a train step's batch into one shard per thread
(``minivit/models/sharding.py``): two threads, two halves, the same ops on each. Ideally the
step then takes what one half takes alone on one thread. Three things keep it from that:

- the GIL: each NumPy call gives it up for its loop and takes it back afterwards, and taking
  it back waits whenever the other thread is running Python (``gil_cost.py`` times that);
- the shared memory system: both shards reach their memory-bound phases (GELU, layernorm,
  softmax) at the same moment, so they compete for the shared cache and memory;
- what runs once, outside the shards (the loss, the sum of the shards' gradients).

This script separates them by timing, in turn (A B C A B C ... after a warm-up, ``--gap``
idle seconds before each step), three ways of making the same step with two workers:

``threads``
    the library's thread shards (``sharding.using("threads")``): the two halves on two
    threads;
``processes``
    the library's process shards (``sharding.using("processes")``,
    ``minivit/models/shard_workers.py``): the second half in a forked worker process with its
    own interpreter (no GIL shared);
``one half alone``
    half the batch on one thread, nothing else running: the time each shard would take if the
    two did not disturb each other.

``threads`` minus ``processes`` is what the GIL costs; ``processes`` minus ``one half alone``
is mostly the shared memory system (the halves still run the same phases at the same time),
plus the gradient sum, the copy of the parameters to the worker and the hand-overs. The
gradients of ``processes`` are checked against ``threads`` first (the same sums, so they agree
to float32 rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before NumPy loads: the OpenBLAS kernels the benchmarks use
    from minivit.blas_kernels import apply_for_command

    apply_for_command()

import numpy as np  # noqa: E402

WAYS = ("threads", "processes", "one half alone")


def measure(name="vit_tiny_patch16_224", batch=8, repeats=12, gap=0.12, log=print, **overrides):
    """Time the three ways (:data:`WAYS`); returns dict(way -> list of seconds) and the largest
    gradient difference between ``processes`` and ``threads``."""
    from threadpoolctl import threadpool_limits

    from benchmarks import models
    from minivit import _parallel
    from minivit.models import shard_workers, sharding

    if not shard_workers.available():
        raise RuntimeError("shard_contention.py forks worker processes: it needs os.fork")
    if batch < 2 or batch % 2:
        raise ValueError(f"--batch must be even and at least 2, got {batch}")
    # the benchmark's own train step (forward, cross-entropy, backward), on the whole batch and
    # on half of it (a model of the same seed)
    whole = models.build(name, "numpy", batch, False, **overrides)
    half = models.build(name, "numpy", batch // 2, False, **overrides)

    def step(mode, built, threads):
        def run():
            _parallel.set_num_threads(threads)
            with sharding.using(mode), threadpool_limits(threads):
                built["train_step"]()
            return built["model"].grads

        return run

    ways = {
        "threads": step("threads", whole, 2),
        "processes": step("processes", whole, 2),
        "one half alone": step("off", half, 1),
    }
    threads_before = _parallel.get_num_threads()
    try:
        ref = {k: v.copy() for k, v in ways["threads"]().items()}
        got = ways["processes"]()
        diff = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
        for fn in ways.values():  # warm-up
            fn()
            fn()
        times = {w: [] for w in WAYS}
        for r in range(repeats):
            for w, fn in ways.items():
                time.sleep(gap)
                t = time.perf_counter()
                fn()
                times[w].append(time.perf_counter() - t)
            log(f"  round {r + 1}/{repeats}")
    finally:
        _parallel.set_num_threads(threads_before)
        shard_workers.stop_all()
    return times, diff


def table(times, diff, name, batch) -> str:
    lines = [
        f"{name}, batch {batch}, train step (forward, loss, backward); gradients of processes "
        f"against threads: max abs difference {diff:.3g}",
        "",
        "| way | median ms | min ms | all, ms |",
        "|---|---|---|---|",
    ]
    for w, ts in times.items():
        ms = sorted(1e3 * t for t in ts)
        listed = " ".join(f"{v:.0f}" for v in ms)
        lines.append(f"| {w} | {statistics.median(ms):.1f} | {ms[0]:.1f} | {listed} |")
    return "\n".join(lines)


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=8, help="the whole batch (even)")
    p.add_argument("--repeats", type=int, default=12, help="timed rounds (median)")
    p.add_argument("--gap", type=float, default=0.12, help="idle seconds before each step")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    from minivit import heap

    heap.keep_freed_memory()  # as every benchmark (and minivit's command line) does
    times, diff = measure(args.model, args.batch, args.repeats, args.gap, log=log)
    log(table(times, diff, args.model, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
