"""Shared timing machinery for the minivit benchmarks.

One rule for every backend: run the case ``warmup`` times untimed, then ``repeats`` timed runs,
and report the median (min and mean are kept beside it).

- CPU (numpy, torch on CPU): ``time.perf_counter`` around each call. NumPy and torch CPU calls
  are synchronous, so no synchronize is needed.
- CuPy: ``cupyx.profiler.benchmark``, which brackets every run with CUDA events and also reports
  the host time; the GPU time is the one used.
- torch on CUDA: a ``torch.cuda.Event`` pair per run, synchronized before reading.

A host clock is never read around GPU work without a synchronize.

Precision: fp32 with TF32 off unless ``configure(tf32=True)``; ``torch.backends.cuda.matmul.
allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` are set accordingly and ``CUPY_TF32`` is
set in the environment before CuPy's first float32 matmul, where CuPy reads it.

Memory: one extra, untimed run per case measures the peak working memory above what was in use
before it: ``tracemalloc`` for NumPy (NumPy reports its buffers to it), a sampled RSS delta for
torch on CPU (approximate, labelled so), the CuPy memory pool's used bytes sampled at every
allocation for CuPy, and ``torch.cuda.max_memory_allocated`` for torch on CUDA. With batch
shards in processes (``MINIVIT_SHARD=processes`` or ``sharding.set_mode``) the memory run puts
them on threads, where tracemalloc sees them all (a worker process's allocations are not this
process's).

FLOP/s are reported against a measured sgemm ceiling of the same device (see
:func:`sgemm_ceiling`).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

__all__ = [
    "BenchConfig",
    "Timing",
    "summarize",
    "result_row",
    "time_host",
    "time_callable",
    "time_interleaved",
    "peak_memory",
    "release_memory",
    "sgemm_ceiling",
    "configure",
    "environment_info",
    "impl_available",
    "torch_device",
]


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class BenchConfig:
    """How a benchmark run is done. ``backends`` names the minivit backends to run."""

    backends: list = field(default_factory=lambda: ["numpy"])
    repeats: int = 5
    warmup: int = 2
    quick: bool = False
    tf32: bool = False
    threads: int | None = None  # None: leave the libraries' defaults
    torch: bool = True  # run the PyTorch twins when torch imports
    memory: bool = True  # one extra untimed run per case for peak memory
    ops: list | None = None  # op names to run (None: all)
    models: list | None = None  # model names to run (None: all)
    sgemm_n: int | None = None  # size of the sgemm ceiling's GEMM (None: 1024 CPU, 4096 GPU)
    # Idle seconds before each timed CPU run, so that the thread pools of the previous run
    # (OpenBLAS workers spin ~0.1 s after a GEMM by default, OpenMP ~5 ms) have gone to sleep
    # and do not take a core from the next implementation. None: models.GAP_S
    # (0.12 s) for models, ops.GAP_S (0.01 s) for ops.
    gap_s: float | None = None


_STATE = {"configured": False, "tf32": False, "threads": None, "limiter": None}


def configure(cfg: BenchConfig) -> dict:
    """Apply precision and thread settings before anything is timed; returns what was applied.

    Must run before CuPy's first float32 matmul (CuPy reads ``CUPY_TF32`` then).
    """
    os.environ["CUPY_TF32"] = "1" if cfg.tf32 else "0"
    from minivit.heap import keep_freed_memory

    # both sides of every comparison run in this process, under the same malloc settings
    applied = {"tf32": bool(cfg.tf32), "threads": cfg.threads, "malloc": keep_freed_memory()}
    if cfg.threads:
        try:  # a dependency of minivit, but the device run installs it with --no-deps
            from threadpoolctl import threadpool_limits
        except ImportError:  # (gpu_run.sh): environment_info records it as missing
            pass
        else:
            _STATE["limiter"] = threadpool_limits(limits=int(cfg.threads))
        from minivit import _parallel

        _parallel.set_num_threads(int(cfg.threads))
    torch = _import_torch() if cfg.torch else None
    if torch is not None:
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    _STATE.update(configured=True, tf32=bool(cfg.tf32), threads=cfg.threads)
    return applied


def _import_torch():
    try:
        import torch
    except Exception:
        return None
    return torch


def impl_available(backend: str) -> bool:
    """Whether a minivit backend ("numpy"/"cupy") or "torch" can run here."""
    if backend == "torch":
        return _import_torch() is not None
    from minivit.backend import BackendUnavailable, get_backend

    try:
        get_backend(backend)
    except BackendUnavailable:
        return False
    return True


def torch_cuda() -> bool:
    """Whether torch is installed and sees a CUDA device (for the GPU twins)."""
    torch = _import_torch()
    try:
        return torch is not None and bool(torch.cuda.is_available())
    except Exception:
        return False


def torch_device(backend: str) -> str:
    """The torch device that is the fair twin of a minivit backend."""
    return "cuda" if backend == "cupy" else "cpu"


# ----------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Seconds per call: the median of ``repeats`` timed runs after ``warmup`` untimed ones."""

    median_s: float
    min_s: float
    mean_s: float
    stdev_s: float
    repeats: int
    warmup: int
    method: str
    times_s: list

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(times: list, warmup: int, method: str) -> Timing:
    """The statistics of a list of per-run times (seconds)."""
    if not times:
        raise ValueError("summarize needs at least one timed run")
    times = [float(t) for t in times]
    return Timing(
        median_s=statistics.median(times),
        min_s=min(times),
        mean_s=statistics.fmean(times),
        stdev_s=statistics.stdev(times) if len(times) > 1 else 0.0,
        repeats=len(times),
        warmup=int(warmup),
        method=method,
        times_s=times,
    )


def ceiling_key(row: dict) -> tuple:
    """The key of a result row's sgemm ceiling: (its backend, or "torch"; its device)."""
    return (row["backend"] if row["impl"] == "minivit" else "torch", row["device"])


def result_row(base: dict, timing: Timing, flops, ceiling, mem) -> dict:
    """One result: ``base`` (what was timed) with the timing in ms, the GEMM FLOP/s and their
    fraction of the sgemm ceiling (when ``flops`` and ``ceiling`` are known), and the peak
    memory ``mem`` = (bytes, method) or None."""
    row = dict(base)
    row.update(
        median_ms=1e3 * timing.median_s,
        min_ms=1e3 * timing.min_s,
        mean_ms=1e3 * timing.mean_s,
        stdev_ms=1e3 * timing.stdev_s,
        repeats=timing.repeats,
        warmup=timing.warmup,
        timing_method=timing.method,
        times_ms=[1e3 * t for t in timing.times_s],
        flops=flops,
    )
    if flops:
        row["gflops_per_s"] = flops / timing.median_s / 1e9
        if ceiling:
            row["frac_of_sgemm"] = flops / timing.median_s / ceiling
    if mem is not None:
        row["peak_mem_bytes"], row["mem_method"] = mem
    return row


def time_host(
    fn: Callable[[], object],
    repeats: int,
    warmup: int,
    *,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Warm up, then time each of ``repeats`` calls with a host clock (CPU work).

    ``sync`` (if given) runs after every call, inside the timed region, so that asynchronous
    work is finished before the clock is read.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(int(warmup), 0)):
        fn()
        if sync is not None:
            sync()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        times.append(clock() - t0)
    return summarize(times, warmup, "perf_counter" + ("+sync" if sync else ""))


def _time_cupy(fn, repeats, warmup) -> Timing:
    import cupy
    from cupyx.profiler import benchmark

    for _ in range(max(int(warmup), 0)):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    res = benchmark(fn, n_repeat=int(repeats), n_warmup=0)
    gpu = [float(t) for t in res.gpu_times[0]]  # CUDA-event times of device 0, seconds
    return summarize(gpu, warmup, "cupyx.profiler.benchmark (CUDA events)")


def _time_torch_cuda(fn, repeats, warmup) -> Timing:
    import torch

    for _ in range(max(int(warmup), 0)):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]  # ms -> s
    return summarize(times, warmup, "torch.cuda.Event")


def _event_timer(impl: str):
    """A function fn -> seconds that brackets one call of fn with CUDA events."""
    if impl == "torch":
        import torch

        def run(fn):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run
    import cupy

    def run(fn):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3

    return run


def time_interleaved(
    cases: dict,
    repeats: int,
    warmup: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    gap_s: float = 0.0,
) -> dict:
    """Time several implementations of one case in turns; returns key -> :class:`Timing`.

    ``cases`` maps a key to ``(fn, impl, device)``. Every case is warmed up ``warmup`` times,
    then the cases take turns for ``repeats`` rounds (A B A B ...), so that a change in machine
    load during the run slows every implementation alike and their ratio stays fair (the CPU
    here is shared). GPU runs are bracketed by CUDA events of their own library (the host clock
    is not used); CPU runs by ``clock``, each after ``gap_s`` idle seconds (untimed).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timers = {}
    for key, (fn, impl, device) in cases.items():
        if device == "cuda":
            timers[key] = (_event_timer(impl), "CUDA events")
        else:

            def host(fn):
                t0 = clock()
                fn()
                return clock() - t0

            timers[key] = (host, "perf_counter")
    for key, (fn, _impl, _device) in cases.items():
        for _ in range(max(int(warmup), 0)):
            timers[key][0](fn)
    times = {key: [] for key in cases}
    for _ in range(repeats):
        for key, (fn, _impl, device) in cases.items():
            if gap_s > 0 and device != "cuda":
                time.sleep(gap_s)
            times[key].append(timers[key][0](fn))
    return {key: summarize(times[key], warmup, timers[key][1] + ", interleaved") for key in cases}


def time_callable(fn, impl: str, device: str, repeats: int, warmup: int) -> Timing:
    """Time ``fn`` with the right clock for ``impl`` ("minivit"/"torch") on ``device``."""
    if device == "cuda":
        if impl == "torch":
            return _time_torch_cuda(fn, repeats, warmup)
        return _time_cupy(fn, repeats, warmup)
    return time_host(fn, repeats, warmup)


# ----------------------------------------------------------------------------------------------
# peak memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _malloc_trim() -> None:
    # Give freed heap pages back to the OS first, so that memory the allocator kept from earlier
    # runs does not hide this run's allocations from RSS (glibc only; a no-op elsewhere).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss_delta(fn) -> int:
    """Peak RSS above the starting RSS while ``fn`` runs, sampled every ~0.5 ms (approximate)."""
    _malloc_trim()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return max(peak[0] - base, 0)


def _peak_cupy(fn) -> int:
    import cupy

    pool = cupy.get_default_memory_pool()
    cupy.cuda.get_current_stream().synchronize()
    base = pool.used_bytes()
    peak = [base]

    def alloc(size):
        mem = pool.malloc(size)
        used = pool.used_bytes()
        if used > peak[0]:
            peak[0] = used
        return mem

    cupy.cuda.set_allocator(alloc)
    try:
        fn()
        cupy.cuda.get_current_stream().synchronize()
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    return peak[0] - base


def _peak_torch_cuda(fn) -> int:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def release_memory(device: str) -> None:
    """After a case that failed (out of memory, say): collect its garbage and give the GPU
    pools' cached blocks back, so that the next case starts clean."""
    gc.collect()
    if device != "cuda":
        return
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    except Exception:
        pass
    if torch_cuda():
        _import_torch().cuda.empty_cache()


def peak_memory(fn, impl: str, device: str) -> tuple[int | None, str]:
    """(bytes above the starting level at the peak of one call of ``fn``, how it was measured)."""
    gc.collect()
    try:
        if device == "cuda":
            if impl == "torch":
                return _peak_torch_cuda(fn), "torch.cuda.max_memory_allocated"
            return _peak_cupy(fn), "cupy memory pool used_bytes"
        if impl == "torch":
            return _peak_rss_delta(fn), "RSS delta (sampled, approximate)"
        from minivit.models import sharding

        if sharding.mode() == "processes":
            # tracemalloc sees this process only, and a forked worker's shard would go unseen
            # (half the batch's activations): the shards run on threads here, same memory.
            with sharding.using("threads"):
                return _peak_traced(fn), "tracemalloc (batch shards on threads)"
        return _peak_traced(fn), "tracemalloc"
    except Exception as exc:  # memory is a side figure; never lose the timing for it
        return None, f"unavailable ({type(exc).__name__}: {exc})"


def _peak_traced(fn) -> int:
    """Peak bytes above the starting level that tracemalloc sees while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


# ----------------------------------------------------------------------------------------------
# the sgemm ceiling


def sgemm_ceiling(backend: str, impl: str = "minivit", n: int | None = None, repeats: int = 9):
    """Measured float32 GEMM FLOP/s for an n x n x n product on this device (the roofline lid).

    ``impl="minivit"`` uses the backend's own matmul (numpy/cupy); ``"torch"`` uses torch on the
    twin device. Returns a dict with ``n``, ``seconds`` and ``flops_per_s`` from the fastest of
    ``repeats`` runs (a ceiling is what the device can do; a slower run only says that something
    else had the machine, and on a shared 2-core host a median of 5 once put the ceiling below
    what a whole model step then reached), and ``median_flops_per_s``.
    """
    device = torch_device(backend)
    if n is None:
        n = 4096 if device == "cuda" else 1024
    if impl == "torch":
        import torch

        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        t = time_callable(lambda: a @ b, "torch", device, repeats, 2)
    else:
        from minivit.backend import get_backend

        be = get_backend(backend)
        rng = be.rng(0)
        a = rng.standard_normal((n, n), dtype="float32")
        b = rng.standard_normal((n, n), dtype="float32")
        t = time_callable(lambda: a @ b, "minivit", device, repeats, 2)
    flop = 2.0 * n**3
    return {
        "n": n,
        "seconds": t.min_s,
        "flops_per_s": flop / t.min_s,
        "median_flops_per_s": flop / t.median_s,
    }


# ----------------------------------------------------------------------------------------------
# what machine this is


def environment_info(cfg: BenchConfig) -> dict:
    """Versions, devices, thread counts and BLAS settings, saved beside every result set."""
    import numpy

    from minivit.blas_kernels import cpu_name, last_applied

    info = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "tf32": bool(cfg.tf32),
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "quick": cfg.quick,
        "env": {
            k: os.environ.get(k)
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OPENBLAS_THREAD_TIMEOUT",
                "MINIVIT_NUM_THREADS",
                "MINIVIT_FAST",
                "MINIVIT_SHARD",
                "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "CUPY_TF32",
                "MINIVIT_KEEP_MEMORY",
            )
        },
    }
    from minivit.heap import applied

    info["malloc"] = applied() or "glibc's defaults (minivit/heap.py not applied)"
    info["openblas_kernels"] = last_applied() or "not chosen (OpenBLAS's own pick)"
    try:  # missing on a device image without it (see configure)
        from threadpoolctl import threadpool_info
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    else:
        info["threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
            for p in threadpool_info()
        ]
    from minivit import _parallel
    from minivit.models import sharding

    info["minivit_threads"] = _parallel.get_num_threads()
    info["minivit_batch_shards"] = sharding.enabled()
    info["minivit_shard_mode"] = sharding.mode()  # threads, processes or off
    torch = _import_torch() if cfg.torch else None
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_cuda_device"] = torch.cuda.get_device_name(0)
            info["torch_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    if "cupy" in cfg.backends:
        try:
            import cupy

            info["cupy"] = cupy.__version__
            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as exc:
            info["cupy"] = f"unavailable: {exc}"
    return info


def default_out(info: dict, kind: str = "") -> str:
    """Where a run writes when ``--out`` is not given: a new folder under ``runs/`` (ignored by
    git, as the training jobs' are), ``runs/bench-<device-tag>[-<kind>]-<date>-<time>``. Never
    ``benchmarks/results/``: a user's run would overwrite the figures kept there (pass
    ``--out benchmarks/results/...`` to record a result set)."""
    name = "-".join(x for x in ("bench", device_tag(info), kind) if x)
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def device_tag(info: dict) -> str:
    """A short folder name for a result set: ``cpu-<n>c`` or ``gpu-<name>``."""
    gpu = info.get("gpu")
    if gpu:
        return "gpu-" + "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    return f"cpu-{info.get('cpu_count')}c-" + "".join(
        c if c.isalnum() else "-" for c in str(info.get("cpu", "x")).lower()
    ).strip("-")
