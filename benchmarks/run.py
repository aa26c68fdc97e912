"""Run the minivit benchmarks and write JSON, markdown and PNG plots to one folder.

    python benchmarks/run.py --out DIR [--quick] [--backend numpy cupy] [--ops linear gelu]
                             [--models vit_tiny_patch16_224] [--repeats 5] [--warmup 2]
                             [--threads 2] [--tf32] [--no-torch] [--no-memory] [--profile]

``minivit bench`` is the same command (it calls :func:`execute`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before NumPy loads: the fastest OpenBLAS kernels for this CPU
    from minivit.blas_kernels import apply_for_command

    apply_for_command()

from benchmarks import harness, models, ops, report  # noqa: E402
from minivit.backend import env_backend_name  # noqa: E402
from minivit.train.common import (  # noqa: E402
    non_negative_float,
    non_negative_int,
    positive_int,
)

# Timed and untimed runs per case, by default: a full run and --quick.
REPEATS = {"full": 5, "quick": 3}
WARMUP = {"full": 2, "quick": 1}


def add_arguments(p: argparse.ArgumentParser, with_backend: bool = True) -> None:
    if with_backend:
        p.add_argument(
            "--backend",
            nargs="+",
            choices=["numpy", "cupy"],
            default=None,
            help="backends to run (default: $MINIVIT_BACKEND, else numpy, plus cupy when a "
            "device is present)",
        )
    p.add_argument("--quick", action="store_true", help="a small subset (< 2 min on 2 cores)")
    p.add_argument(
        "--ops",
        nargs="*",
        default=None,
        metavar="OP",
        help=f"ops to run (default all; give none to skip ops): {ops.known_ops()}",
    )
    p.add_argument(
        "--models",
        nargs="*",
        default=None,
        metavar="MODEL",
        help="models to run, by name or report label (default all; give none to skip "
        f"models): {models.known_models()}",
    )
    p.add_argument(
        "--out", default=None, help="results folder (default runs/bench-<device-tag>-<date>-<time>)"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"timed runs (default {REPEATS['full']}, quick {REPEATS['quick']})",
    )
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=None,
        help=f"untimed runs first (default {WARMUP['full']}, quick {WARMUP['quick']})",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default: fp32)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="threads for BLAS, torch and minivit's thread pool",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch twins")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: where a train step's time goes, op by op, beside torch's "
        "operators (benchmarks/profile_step.py; --models, default ViT-Ti/16; --repeats steps)",
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="instead of timing: CPU time by kind of work, minivit beside torch, sampled with "
        "Linux perf (benchmarks/perf_breakdown.py; --models, --repeats steps, --threads)",
    )
    p.add_argument(
        "--gap",
        type=non_negative_float,
        default=None,
        help=f"idle seconds before each timed CPU run (default {models.GAP_S} models, "
        f"{ops.GAP_S} ops)",
    )


def config_from_args(args) -> harness.BenchConfig:
    backends = args.backend
    if isinstance(backends, str):
        backends = [backends]
    if not backends:
        env = env_backend_name()  # as every minivit command does
        if env:
            backends = [env]
        else:
            backends = ["numpy"] + (["cupy"] if harness.impl_available("cupy") else [])
    kind = "quick" if args.quick else "full"
    return harness.BenchConfig(
        backends=list(backends),
        repeats=args.repeats or REPEATS[kind],
        warmup=args.warmup if args.warmup is not None else WARMUP[kind],
        quick=bool(args.quick),
        tf32=bool(args.tf32),
        threads=args.threads,
        torch=not args.no_torch,
        memory=not args.no_memory,
        ops=args.ops,
        models=args.models,
        gap_s=getattr(args, "gap", None),
    )


def execute(cfg: harness.BenchConfig, out: str | None = None, log=print) -> dict:
    """Run everything selected by ``cfg``; write the report; return its paths."""
    t0 = time.perf_counter()
    # a misspelt name fails before anything runs; labels become names once, here
    models_, ops_ = check_names(cfg.models, cfg.ops)
    cfg = dataclasses.replace(cfg, models=models_, ops=ops_)
    harness.configure(cfg)  # first: CUPY_TF32 is read at CuPy's first float32 matmul
    missing = [b for b in cfg.backends if not harness.impl_available(b)]
    if len(missing) == len(cfg.backends):
        raise SystemExit(f"benchmarks: no requested backend can run here ({', '.join(missing)})")
    env = harness.environment_info(cfg)
    if out is None:
        out = harness.default_out(env)
    rows = []  # the groups append to it as each case finishes
    # Models first (the headline figures), and the JSON written after them. However the run
    # ends, the report of what it measured is written: stopped by SIGINT (Ctrl-C, or
    # gpu_run.sh's time limit: timeout -s INT) it says "interrupted"; an error escaping a group
    # is recorded. Either is raised again after the report is written, so the command's exit
    # status is not a success's (130 for Ctrl-C, as minivit's CLI gives it).
    os.makedirs(out, exist_ok=True)
    failure = None
    try:
        ceilings, env["sgemm"], env["sgemm_median"] = _sgemm_ceilings(cfg, log)
        if cfg.models is None or cfg.models:
            log("models:")
            models.run(cfg, ceilings, log, rows=rows)
            report.write_json(rows, env, os.path.join(out, "results.json"))
        if cfg.ops is None or cfg.ops:
            log("ops:")
            ops.run(cfg, ceilings, log, rows=rows)
        _remeasure_ceilings(cfg, ceilings, env, rows, log)
    except KeyboardInterrupt as exc:
        env["interrupted"] = True
        failure = exc  # raised again once the report is written: the exit status says so
        log(f"interrupted: writing the {len(rows)} results measured so far")
    except Exception as exc:
        failure = exc
        env["error"] = f"{type(exc).__name__}: {exc}"
        log(f"failed ({env['error']}): writing the {len(rows)} results measured so far")
    env["elapsed_s"] = time.perf_counter() - t0
    paths = report.write_all(rows, env, out)
    log(
        f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plots "
        f"in {env['elapsed_s']:.0f} s"
    )
    if failure is not None:
        raise failure
    return paths


def _sgemm_ceilings(cfg: harness.BenchConfig, log) -> tuple[dict, dict, dict]:
    """The measured sgemm FLOP/s of every device in use, for the FLOP/s fractions:
    ({(backend or "torch", device): FLOP/s}, {label: FLOP/s}, {label: median FLOP/s}) for the
    report. The ceiling is each GEMM's fastest run; its median is kept beside it."""
    ceilings, sg, sg_median = {}, {}, {}
    for b in cfg.backends:
        if not harness.impl_available(b):
            continue
        dev = harness.torch_device(b)
        impls = [("minivit", b, b)]
        if cfg.torch and harness.impl_available("torch") and (dev == "cpu" or harness.torch_cuda()):
            impls.append(("torch", "torch", f"torch-{dev}"))
        for impl, key, name in impls:
            c = harness.sgemm_ceiling(b, impl, n=cfg.sgemm_n)
            ceilings[(key, dev)] = c["flops_per_s"]
            sg[f"{name} (n={c['n']})"] = c["flops_per_s"]
            sg_median[f"{name} (n={c['n']})"] = c["median_flops_per_s"]
    log("sgemm ceilings: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in sg.items()))
    return ceilings, sg, sg_median


def _remeasure_ceilings(cfg, ceilings, env, rows, log) -> None:
    """Measure the sgemm ceilings again at the end and keep each one's best of the two, then
    recompute every row's fraction of it. One measurement taken while the machine was busy
    (another process, a thermal dip) made a ceiling below what the cases then reached: a
    fraction above 100%. Both measurements stay in the report (``sgemm_first``)."""
    again, sg, sg_median = _sgemm_ceilings(cfg, log)
    env["sgemm_first"] = dict(env["sgemm"])
    for k, v in again.items():
        ceilings[k] = max(v, ceilings.get(k, 0.0))
    for label, v in sg.items():
        env["sgemm"][label] = max(v, env["sgemm"].get(label, 0.0))
        env["sgemm_median"][label] = max(sg_median[label], env["sgemm_median"].get(label, 0.0))
    for r in rows:
        if r.get("gflops_per_s") and ceilings.get(harness.ceiling_key(r)):
            r["frac_of_sgemm"] = r["gflops_per_s"] * 1e9 / ceilings[harness.ceiling_key(r)]


def check_names(
    model_names, op_names, any_registered=False
) -> tuple[list[str] | None, list[str] | None]:
    """``--models`` and ``--ops`` as the benchmark's names (a model's report label, such as
    ``ViT-Ti/16``, is accepted for its name); None stays None (all). ``any_registered``: any
    name of ``minivit.list_models()`` is a model too (--profile and --perf build any registered
    model). Unknown names raise one ``ValueError`` that names them and lists the known models
    and ops."""
    errors, out = [], []

    def resolve_models(names):
        return models.resolve_models(names, any_registered=any_registered)

    for names, resolve in ((model_names, resolve_models), (op_names, ops.resolve_ops)):
        try:
            out.append(None if names is None else resolve(names))
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        raise ValueError("; ".join(errors))
    return out[0], out[1]


def dispatch(args) -> int:
    """Run what the parsed options ask for (this script's and ``minivit bench``'s): the op
    profile (--profile), the perf breakdown (--perf), or the timed benchmark. Exit status.
    Unknown ``--models`` or ``--ops`` names raise ``ValueError`` before anything runs."""
    args.models, args.ops = check_names(args.models, args.ops, args.profile or args.perf)
    if args.profile:
        from benchmarks import profile_step

        profile_step.execute(profile_step.args_from_bench(args))
        return 0
    if args.perf:
        from benchmarks import perf_breakdown

        return perf_breakdown.main(perf_breakdown.argv_from_bench(args))
    execute(config_from_args(args), args.out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        args.models, args.ops = check_names(args.models, args.ops, args.profile or args.perf)
        if not args.backend:
            env_backend_name()  # a wrong $MINIVIT_BACKEND is a usage error, before any work
    except ValueError as exc:
        p.error(str(exc))
    try:
        return dispatch(args)
    except KeyboardInterrupt:  # the report of what finished is written by then
        print("benchmarks: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
