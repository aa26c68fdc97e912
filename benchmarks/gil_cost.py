"""What a NumPy call costs when two threads share the GIL.

    python benchmarks/gil_cost.py [--sizes 600 8192 65536] [--calls 20000] [--threads 2]
                                  [--repeats 3]

minivit runs a train step's batch shards on threads (``minivit/models/sharding.py``). NumPy
gives up the GIL for each call's loop (on arrays of more than a few hundred elements) and takes
it back afterwards; with two threads, taking it back often means waiting while the other
thread runs Python. This script measures that cost directly: each thread makes ``--calls``
calls of ``np.multiply(a, c, out=o)`` on a float32 array of each size, first one thread alone,
then ``--threads`` threads at once, and prints the time per call per thread (the median of
``--repeats`` runs, after one warm-up). The difference is what a call pays for sharing the GIL;
times the calls a shard makes in a step, it is part of what the step's wall time loses against
a library that drives its threads from C (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np


def per_call_us(size: int, calls: int, threads: int) -> float:
    """Wall time per call per thread, in microseconds, with ``threads`` threads at once."""

    def work():
        a = np.ones(size, dtype=np.float32)
        out = np.empty_like(a)
        for _ in range(calls):
            np.multiply(a, 1.0001, out=out)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return (time.perf_counter() - start) / calls * 1e6


def measure(sizes, calls: int, threads: int, repeats: int) -> list[dict]:
    """One row per size: dict(size, one_thread_us, shared_us, extra_us)."""
    rows = []
    for size in sizes:
        per_call_us(size, calls // 10 or 1, 1)  # warm-up
        one, shared = [], []
        for _ in range(repeats):  # alternated, so drifts of the host's speed hit both
            one.append(per_call_us(size, calls, 1))
            shared.append(per_call_us(size, calls, threads))
        a, b = statistics.median(one), statistics.median(shared)
        rows.append(dict(size=size, one_thread_us=a, shared_us=b, extra_us=b - a))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[600, 8192, 65536])
    p.add_argument("--calls", type=int, default=20000, help="calls per thread per run")
    p.add_argument("--threads", type=int, default=2, help="threads sharing the GIL")
    p.add_argument("--repeats", type=int, default=3, help="runs per case (median)")
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.calls < 1 or args.threads < 2 or args.repeats < 1:
        p.error("sizes and calls must be positive, --threads at least 2, --repeats at least 1")
    rows = measure(args.sizes, args.calls, args.threads, args.repeats)
    print(f"| float32 elements | 1 thread, us a call | {args.threads} threads | extra |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['one_thread_us']:.2f} | {r['shared_us']:.2f} "
            f"| {r['extra_us']:+.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
