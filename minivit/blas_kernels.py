"""Which of OpenBLAS's kernel sets NumPy's GEMMs use, chosen by measuring them on this CPU.

OpenBLAS ships one set of hand-tuned kernels per CPU family and picks one from the CPU's
features when it is loaded (when NumPy is first imported). The pick is not always the fastest:
on the AMD EPYC of this project's machines it takes its AVX-512 kernels ("SkylakeX"), while
its AVX2 kernels ("Haswell"; "Zen" loads the same) measured 4-7% faster on a ViT's GEMM
shapes (97 against 103-104 GFLOP/s on one thread). The environment variable
``OPENBLAS_CORETYPE`` overrides the pick, but only before OpenBLAS is loaded.

:func:`best_kernels` times a float32 GEMM mix (a ViT-Ti block's linear layers at 4 images:
forward, input gradient and weight gradient) on one thread in a fresh interpreter for the
detected set and each candidate, twice in turn, and keeps the fastest if it beats the
detected one by at least 3%. A candidate whose process fails (a set this CPU cannot run)
drops out, and so does one that loads the same kernels as another (OpenBLAS maps some names
onto others: here "Zen" loads the "Haswell" kernels and "Cooperlake" the "SkylakeX" ones). The
result is cached per CPU (model name and feature flags), NumPy version and Python in
``$XDG_CACHE_HOME/minivit/openblas-kernels.json`` (``~/.cache`` by default), so the
measurement (about 3 s) runs once; ``MINIVIT_OPENBLAS_KERNELS=measure`` measures again.

Only ``minivit bench`` and ``benchmarks/run.py`` apply it (:func:`apply_best_kernels`), so the
benchmark shows each library at its best on the CPU; the kernel set in use is recorded with the
results. Training keeps OpenBLAS's own pick, so that its figures do not move with a GEMM's
rounding; ``OPENBLAS_CORETYPE=Haswell minivit train vit`` (say) gives it the faster set by hand.
``MINIVIT_OPENBLAS_KERNELS=default`` turns the choice off, ``=NAME`` forces one (threadpoolctl,
recorded with the results, shows the kernels that really loaded).

This module never imports NumPy itself: it must run before NumPy is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time

__all__ = [
    "CANDIDATES",
    "best_kernels",
    "apply_best_kernels",
    "apply_for_command",
    "last_applied",
    "decide",
    "cache_path",
    "cpu_name",
]

CANDIDATES = ("Haswell", "SkylakeX", "Zen", "Cooperlake")
MIN_GAIN = 0.03  # a candidate must beat the detected set by 3% (the machines are noisy)
_LAST: dict = {}

# Runs in a fresh interpreter: GFLOP/s of the GEMM mix on one thread, and the kernel set loaded.
_PROBE = r"""
import json, time
import numpy as np
rng = np.random.default_rng(0)
M = 788  # 4 images x 197 tokens
cases = []
for din, dout in ((192, 576), (192, 192), (192, 768), (768, 192)):  # qkv, proj, fc1, fc2
    x = rng.standard_normal((M, din), dtype=np.float32)
    w = rng.standard_normal((dout, din), dtype=np.float32)
    d = rng.standard_normal((M, dout), dtype=np.float32)
    cases += [(x, w.T), (d, w), (d.T, x)]  # forward, input gradient, weight gradient
flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in cases)
def mix():
    for a, b in cases:
        a @ b
for _ in range(3):
    mix()
times = []
for _ in range(9):
    t = time.perf_counter(); mix(); times.append(time.perf_counter() - t)
arch = None
try:
    from threadpoolctl import threadpool_info
    pools = [p for p in threadpool_info() if p.get("internal_api") == "openblas"]
    arch = pools[0].get("architecture") if pools else "not-openblas"
except ImportError:
    pass
print(json.dumps({"gflops": flops / sorted(times)[len(times) // 2] / 1e9, "arch": arch}))
"""


def cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "minivit", "openblas-kernels.json")


def _cpuinfo(field: str):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def _machine_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        numpy_version = version("numpy")
    except PackageNotFoundError:
        numpy_version = "?"
    # a VM may show one model name for CPUs of several generations: the feature flags tell them
    # apart (AVX-512 or not, ...)
    flags = hashlib.sha1((_cpuinfo("flags") or "").encode()).hexdigest()[:12]
    return (
        f"{cpu_name()} | flags {flags} | {platform.machine()} | numpy {numpy_version} | "
        f"{sys.executable}"
    )


def _probe(coretype, timeout=60):
    """{"gflops", "arch"} for one kernel set (None: OpenBLAS's own pick), or None if the
    process failed (e.g. an illegal instruction: this CPU cannot run that set)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("OPENBLAS_CORETYPE", None)
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def decide(measured: dict, min_gain: float = MIN_GAIN):
    """The kernel set to use from ``measured`` {name or "default": GFLOP/s}: the fastest, if it
    beats "default" (OpenBLAS's own pick) by ``min_gain``; None means keep OpenBLAS's pick."""
    base = measured.get("default")
    if not base:
        return None
    name, best = max(((k, v) for k, v in measured.items() if v), key=lambda kv: kv[1])
    if name == "default" or best < base * (1.0 + min_gain):
        return None
    return name


def _measure(rounds=2) -> dict:
    """Time OpenBLAS's own pick ("default") and each candidate, ``rounds`` times in turn."""
    first = _probe(None)
    if first is None or first.get("arch") in (None, "not-openblas"):
        why = "the probe failed" if first is None else "NumPy's BLAS is not OpenBLAS"
        if first is not None and first.get("arch") is None:
            why = "threadpoolctl is missing (it tells which kernels loaded)"
        return {"choice": None, "reason": why, "failed": first is None or first["arch"] is None}
    detected = first["arch"]
    gflops = {"default": first["gflops"]}
    sets = {"default": detected}  # name -> the kernels it loads
    for name in CANDIDATES:  # round 1: which kernels each name loads, and a first timing
        got = _probe(name)
        if got is None or got["arch"] in sets.values():
            continue  # this CPU cannot run the set, or it loads kernels already timed
        sets[name], gflops[name] = got["arch"], got["gflops"]
    for _ in range(rounds - 1):  # in turn; each set keeps its best round (noise only slows)
        for name in sets:
            got = _probe(None if name == "default" else name)
            if got is not None:
                gflops[name] = max(gflops[name], got["gflops"])
    gflops = {k: round(v, 1) for k, v in gflops.items()}
    return {"choice": decide(gflops), "detected": detected, "kernels": sets,
            "gflops_1thread": gflops}  # fmt: skip


def best_kernels(refresh: bool = False, log=None) -> dict:
    """{"choice": a kernel set name or None (keep OpenBLAS's), "detected", "gflops_1thread"},
    from the cache or measured now (then cached, unless the measurement failed)."""
    path, key = cache_path(), _machine_key()
    cache = {}
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        pass
    if not refresh and isinstance(cache.get(key), dict):
        return cache[key]
    if log is not None:
        log(f"minivit: timing OpenBLAS's kernel sets on this CPU (once; cached in {path})")
    result = _measure()
    result["measured"] = time.strftime("%Y-%m-%d %H:%M")
    if result.pop("failed", False):
        return result  # a probe that failed (a busy machine, a missing module): try next time
    cache[key] = result
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)  # whole or not at all, even with two runs at once
    except OSError as exc:
        if log is not None:
            log(f"minivit: could not cache the choice ({exc}); it will be measured again")
    return result


def apply_best_kernels(log=None) -> dict:
    """Set ``OPENBLAS_CORETYPE`` to the fastest kernel set, before NumPy is loaded.

    Returns what was done: {"applied": name or None, "why": ...}. Does nothing when the user
    set ``OPENBLAS_CORETYPE``, when ``MINIVIT_OPENBLAS_KERNELS=default``, when NumPy is already
    loaded (too late), or off Linux on x86-64."""
    _LAST.clear()
    _LAST.update(_apply(log))
    return dict(_LAST)


def apply_for_command() -> None:
    """:func:`apply_best_kernels` at the start of a command (``minivit bench``,
    ``benchmarks/run.py``): notes go to stderr, and a bad ``MINIVIT_OPENBLAS_KERNELS`` ends
    the command with exit status 2 and the reason."""
    try:
        apply_best_kernels(log=lambda msg: print(msg, file=sys.stderr))
    except ValueError as exc:
        print(f"minivit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def last_applied() -> dict:
    """What the last :func:`apply_best_kernels` in this process did ({} if none ran)."""
    return dict(_LAST)


def _apply(log):
    forced = os.environ.get("MINIVIT_OPENBLAS_KERNELS", "auto")
    if forced not in ("auto", "measure", "default") and not forced.isidentifier():
        raise ValueError(f"MINIVIT_OPENBLAS_KERNELS must be auto, measure, default or a "
                         f"kernel set name, got {forced!r}")  # fmt: skip
    if os.environ.get("OPENBLAS_CORETYPE"):
        return {"applied": os.environ["OPENBLAS_CORETYPE"], "why": "set by the user"}
    if forced == "default":
        return {"applied": None, "why": "MINIVIT_OPENBLAS_KERNELS=default"}
    if "numpy" in sys.modules:
        return {"applied": None, "why": "NumPy was already loaded"}
    if forced not in ("auto", "measure"):
        os.environ["OPENBLAS_CORETYPE"] = forced
        return {"applied": forced, "why": "MINIVIT_OPENBLAS_KERNELS"}
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return {"applied": None, "why": "chosen only on Linux x86-64"}
    found = best_kernels(refresh=forced == "measure", log=log)
    if found.get("choice"):
        os.environ["OPENBLAS_CORETYPE"] = found["choice"]
    return {"applied": found.get("choice"), "why": "measured", **found}
