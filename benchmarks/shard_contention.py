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
    the library's own: ``model.forward`` and ``model.backward`` on the whole batch, the two
    shards on two threads;
``processes``
    the same two halves, but the second one in a forked worker process with its own
    interpreter (no GIL shared), the parameters in memory both processes map, and the
    worker's gradients added to the parent's; the loss runs in the parent, as above;
``one half alone``
    half the batch on one thread, nothing else running: the time each shard would take if the
    two did not disturb each other.

``threads`` minus ``processes`` is what the GIL costs; ``processes`` minus ``one half alone``
is mostly the shared memory system (the halves still run the same phases at the same time),
plus the gradient sum and the hand-overs. The gradients of ``processes`` are checked against
``threads`` first (they are the same sums, so they agree to float32 rounding).

This is a measurement, not a feature: the worker is a bare fork that holds a replica of the
model, built for this script and shut down at its end.
"""

from __future__ import annotations

import argparse
import mmap
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


def shared_array(shape, dtype):
    """A zeroed array in an anonymous shared mapping: after a fork, parent and child see the
    same memory (a write by one is read by the other)."""
    count = int(np.prod(shape))
    nbytes = max(count * np.dtype(dtype).itemsize, 1)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count).reshape(shape)


class ForkedShard:
    """A child process holding a replica of ``model`` (forked: it shares the parameters, which
    are moved into shared memory first, and copies everything else) that runs the forward and
    backward of the last ``half`` samples of a batch when told to over a pipe."""

    def __init__(self, model, x_half_shape, out_shape):
        import multiprocessing

        for k, v in list(model.params.items()):  # the parent's updates reach the child
            s = shared_array(v.shape, v.dtype)
            s[...] = v
            model.params[k] = s
        self.grads = {k: shared_array(v.shape, v.dtype) for k, v in model.params.items()}
        self.x = shared_array(x_half_shape, model.dtype)
        self.out = shared_array(out_shape, model.dtype)
        self.dout = shared_array(out_shape, model.dtype)
        self.conn, child = multiprocessing.Pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: serve until told to stop, never return
            code = 0
            try:
                self._serve(model, child)
            except BaseException:  # noqa: BLE001 (report anything, then leave)
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)

    def _serve(self, model, conn):
        from threadpoolctl import threadpool_limits

        from minivit import _parallel
        from minivit.models import sharding

        _parallel.set_num_threads(1)
        sharding.set_enabled(False)
        with threadpool_limits(1):
            while True:
                cmd = conn.recv()
                if cmd == "forward":
                    self.out[...] = model.forward(self.x, train=True)
                elif cmd == "backward":
                    model.zero_grads()
                    model.backward(self.dout.copy(), input_grad=False)
                    for k, g in model.grads.items():
                        self.grads[k][...] = g
                else:
                    return
                conn.send("done")

    def start(self, cmd):
        self.conn.send(cmd)

    def wait(self):
        if self.conn.recv() != "done":
            raise RuntimeError("the worker process failed")

    def close(self):
        self.conn.send("stop")
        os.waitpid(self.pid, 0)


def measure(name="vit_tiny_patch16_224", batch=8, repeats=12, gap=0.12, log=print, **overrides):
    """Time the three ways (:data:`WAYS`); returns dict(way -> list of seconds) and the largest
    gradient difference between ``processes`` and ``threads``."""
    from threadpoolctl import threadpool_limits

    from benchmarks import models
    from minivit import _parallel, ops
    from minivit.backend import get_backend
    from minivit.models import sharding

    if not hasattr(os, "fork"):
        raise RuntimeError("shard_contention.py forks a worker process: Linux or macOS only")
    if batch < 2 or batch % 2:
        raise ValueError(f"--batch must be even and at least 2, got {batch}")
    be = get_backend("numpy")
    half = batch // 2
    full = models.build(name, "numpy", batch, False, **overrides)
    model = full["model"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, model.in_chans, model.img_size, model.img_size))
    x = x.astype(model.dtype)
    labels = rng.integers(0, model.num_classes, batch)
    one = be.xp.asarray(1.0, dtype=model.dtype)
    worker = ForkedShard(model, x[half:].shape, (half, model.num_classes))

    def loss_grad(logits, y):
        _, cache = ops.cross_entropy_forward(logits, y)
        return ops.cross_entropy_backward(one, cache)[0]

    def threads():
        _parallel.set_num_threads(2)
        sharding.set_enabled(True)
        with threadpool_limits(2):
            model.zero_grads()
            model.backward(loss_grad(model.forward(x, train=True), labels), input_grad=False)
        return model.grads

    def processes():
        _parallel.set_num_threads(1)
        sharding.set_enabled(False)
        with threadpool_limits(1):
            worker.x[...] = x[half:]
            worker.start("forward")
            model.zero_grads()
            mine = model.forward(x[:half], train=True)
            worker.wait()
            dl = loss_grad(np.concatenate([mine, worker.out]), labels)
            worker.dout[...] = dl[half:]
            worker.start("backward")
            model.backward(dl[:half].copy(), input_grad=False)
            worker.wait()
            for k, g in model.grads.items():
                g += worker.grads[k]
        return model.grads

    def one_half_alone():
        _parallel.set_num_threads(1)
        sharding.set_enabled(False)
        with threadpool_limits(1):
            model.zero_grads()
            logits = model.forward(x[:half], train=True)
            model.backward(loss_grad(logits, labels[:half]), input_grad=False)

    ways = dict(zip(WAYS, (threads, processes, one_half_alone)))
    saved = (_parallel.get_num_threads(), sharding.enabled())
    try:
        ref = {k: v.copy() for k, v in threads().items()}
        got = processes()
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
        worker.close()
        _parallel.set_num_threads(saved[0])
        sharding.set_enabled(saved[1])
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
