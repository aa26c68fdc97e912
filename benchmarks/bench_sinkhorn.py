"""Batched Sinkhorn at ViLT sizes against a Python loop of POT calls.

ViLT's word-patch alignment transports, for each image-caption pair of a batch, 40 text tokens
onto 145 image tokens (144 patches + [CLS] at 384x384 / 32). Here: 64 pairs, 50 and 100
iterations, epsilon 0.05, the cost 1 - cosine similarity of random features (values in [0, 2]).

- ``minivit``: one call of ``ops.sinkhorn_forward`` on the whole (64, 40, 145) batch, and the
  same followed by ``ops.sinkhorn_backward`` (forward + backward);
- ``POT loop``: 64 calls of ``ot.sinkhorn(..., method="sinkhorn_log", stopThr=0)`` (exactly the
  same iterations, no early stop), the way one would use POT for a batch;
- ``torch batched`` (when torch imports): the same log-domain iterations in torch, for scale.

Every case runs once untimed (warm-up), then ``repeats`` timed rounds in which the cases take
turns; the median is reported. CuPy runs are bracketed by ``synchronize``. Usage::

    python benchmarks/bench_sinkhorn.py [--quick] [--backend numpy cupy] [--out PATH]

or from Python: ``run(quick, backends) -> list[dict]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

B, N_TEXT, N_IMAGE, D = 64, 40, 145, 64
EPSILON = 0.05


def _time_interleaved(cases, repeats, sync=lambda: None):
    """Median and min seconds per case. Each case runs once untimed, then the cases take turns
    for ``repeats`` rounds, so that a machine whose load changes (shared CI runners) slows every
    case alike and the ratios stay fair."""
    for fn in cases.values():
        fn()
        sync()
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def _cost(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, N_TEXT, D))
    y = rng.standard_normal((B, N_IMAGE, D))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    return 1.0 - x @ np.swapaxes(y, -1, -2)  # (B, 40, 145)


def _pot_loop(ot, cost, n_iters, xp):
    a = xp.full(N_TEXT, 1.0 / N_TEXT, dtype=cost.dtype)
    b = xp.full(N_IMAGE, 1.0 / N_IMAGE, dtype=cost.dtype)

    def fn():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in range(cost.shape[0]):
                ot.sinkhorn(
                    a,
                    b,
                    cost[k],
                    EPSILON,
                    method="sinkhorn_log",
                    numItermax=n_iters,
                    stopThr=0.0,
                    warn=False,
                )

    return fn


def _torch_batched(torch, cost, n_iters):
    C = torch.from_numpy(cost)

    def fn():
        logK = C * (-1.0 / EPSILON)
        la = torch.full(C.shape[:-1], -np.log(N_TEXT), dtype=C.dtype)
        lb = torch.full(C.shape[:-2] + C.shape[-1:], -np.log(N_IMAGE), dtype=C.dtype)
        f = torch.zeros_like(la)
        for _ in range(n_iters):
            g = lb - torch.logsumexp(logK + f[..., :, None], dim=-2)
            f = la - torch.logsumexp(logK + g[..., None, :], dim=-1)
        return torch.exp(logK + f[..., :, None] + g[..., None, :])

    return fn


def run(quick: bool = False, backends: list[str] | None = None) -> list[dict]:
    """Time every case; returns one dict per (backend, implementation, dtype, n_iters)."""
    from minivit import ops
    from minivit.backend import BackendUnavailable, get_backend

    try:
        import ot
    except ImportError:  # POT is a test/bench dependency only
        ot = None
    try:
        import torch
    except ImportError:
        torch = None

    backends = list(backends or ["numpy"])
    repeats = 3 if quick else 7
    iter_list = [50] if quick else [50, 100]
    host_cost = _cost()
    rows: list[dict] = []
    for name in backends:
        try:
            be = get_backend(name)
        except BackendUnavailable as exc:
            print(f"skipping backend {name}: {exc}", file=sys.stderr)
            continue
        for n_iters in iter_list:
            base = dict(
                op="sinkhorn",
                backend=name,
                batch=B,
                n=N_TEXT,
                m=N_IMAGE,
                n_iters=n_iters,
                epsilon=EPSILON,
                repeats=repeats,
            )
            cases = {}  # (impl, dtype) -> callable
            if ot is not None:
                cost64 = be.asarray(host_cost, dtype=be.xp.float64)
                cases[("POT loop", "float64")] = _pot_loop(ot, cost64, n_iters, be.xp)
            for dtype in ("float64", "float32"):
                cost = be.asarray(host_cost, dtype=getattr(be.xp, dtype))
                dplan = be.asarray(np.ones(host_cost.shape), dtype=getattr(be.xp, dtype))

                def fwd(cost=cost, n_iters=n_iters):
                    return ops.sinkhorn_forward(cost, epsilon=EPSILON, n_iters=n_iters)

                def fwd_bwd(cost=cost, dplan=dplan, fwd=fwd):
                    _, cache = fwd(cost)
                    return ops.sinkhorn_backward(dplan, cache)

                cases[("minivit", dtype)] = fwd
                cases[("minivit fwd+bwd", dtype)] = fwd_bwd
            if torch is not None and name == "numpy" and not quick:
                cases[("torch batched", "float64")] = _torch_batched(torch, host_cost, n_iters)
            timed = _time_interleaved(cases, repeats, be.synchronize)
            pot = timed.get(("POT loop", "float64"))
            for (impl, dtype), (med, best) in timed.items():
                row = dict(base, impl=impl, dtype=dtype, median_s=med, min_s=best)
                if pot is not None and impl in ("minivit", "torch batched"):
                    row["speedup_vs_pot_loop"] = pot[0] / med
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backend | implementation | dtype | pairs x n x m | iters | median (ms) | vs POT loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.get("speedup_vs_pot_loop")
        lines.append(
            f"| {r['backend']} | {r['impl']} | {r['dtype']} | {r['batch']} x {r['n']} x {r['m']} "
            f"| {r['n_iters']} | {1e3 * r['median_s']:.1f} | "
            + (f"{ratio:.1f}x |" if ratio is not None else " |")
        )
    return "\n".join(lines)


def _environment() -> dict:
    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if hasattr(os, "getloadavg"):  # a shared machine slows both sides; say how loaded it was
        env["loadavg_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import ot

        env["pot"] = ot.__version__
    except ImportError:
        pass
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, 50 iterations only")
    p.add_argument("--backend", nargs="+", default=["numpy"], choices=["numpy", "cupy"])
    p.add_argument(
        "--out",
        default=os.path.join("runs", f"sinkhorn-{time.strftime('%Y%m%d-%H%M%S')}.json"),
        help="where to write the JSON results (default runs/sinkhorn-<date>-<time>.json)",
    )
    args = p.parse_args(argv)
    rows = run(args.quick, args.backend)
    print(markdown(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"environment": _environment(), "results": rows}, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
