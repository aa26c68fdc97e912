"""Where a model's train step spends its time: minivit op by op, beside torch's operators.

    python benchmarks/profile_step.py [--models NAME ...] [--backend numpy|cupy] [--batch B]
                                      [--steps 3] [--warmup 1] [--threads N] [--top 15]
                                      [--no-torch] [--out DIR]
    minivit bench --profile [--models NAME ...] [--backend ...] [--repeats STEPS] [--out DIR]

The step is the one the model benchmark times (benchmarks/models.py): forward, loss and the full
backward, on the same inputs, with torch's eager twin loaded with the same weights.

**minivit.** While the profile runs, every ``*_forward`` and ``*_backward`` function of
``minivit.ops`` is wrapped (the models call each op through that module). A call's time, less
the time of the op calls made inside it, adds up under the op's name: its *self* time, as a
profiler reports it, so the ops' times add up to the time spent inside ops. The rest of the
step is the model's own code between ops (residual sums, reshapes, gradient sums, the
optimizer-free bookkeeping), shown as "(between ops)".

- NumPy: the host clock. The batch runs in one piece: batch shards (models/sharding.py) run on
  threads at once, where one op's time would overlap another's; ops keep their own threads.
- CuPy: a pair of CUDA events per call on the current stream, read after the step. An op's time
  is the GPU's time from its first launch to its last, gaps included, so where the host
  launches slower than the GPU computes, the gaps show it. The events cost the host a few
  microseconds per call.

**torch.** ``torch.profiler`` around the twin's steps: the self time of each ATen operator (CPU
time on a CPU; on CUDA, the device time of the kernels each operator launched). The profiler
adds host time per operator.

Each implementation's step is also timed without any profiling (the median of the steps), for
reference. Output: ``profile.json`` and ``profile.md`` in ``--out`` (default
``runs/bench-<device-tag>-profile-<date>-<time>/``), and the tables on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before NumPy loads: the OpenBLAS kernels the benchmarks use
    from minivit.blas_kernels import apply_for_command

    apply_for_command()

from benchmarks import harness, models, report  # noqa: E402

BETWEEN = "(between ops)"


# ----------------------------------------------------------------------------------------------
# minivit: self time per op


class OpTimer:
    """Self time and calls per op name, from the calls made while :func:`instrument` is on.

    Each call is one record [name, start, end, parent record or None]; the start and end are
    host clock readings on NumPy and recorded CUDA events on CuPy, turned into seconds by
    :meth:`collect` after the work is done."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.records: list[list] = []
        self._open: list[int] = []  # the records of the calls in progress, innermost last
        self._last = None  # the latest mark: on a GPU, the event every earlier one precedes
        if gpu:
            import cupy

            self._cupy = cupy

    def mark(self):
        """A point in time: a host clock reading, or a CUDA event recorded on the stream."""
        if not self.gpu:
            return time.perf_counter()
        ev = self._cupy.cuda.Event()
        ev.record()
        self._last = ev
        return ev

    def seconds(self, start, end) -> float:
        if not self.gpu:
            return end - start
        return self._cupy.cuda.get_elapsed_time(start, end) / 1e3

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            rec = [name, self.mark(), None, self._open[-1] if self._open else None]
            self.records.append(rec)
            self._open.append(len(self.records) - 1)
            try:
                return fn(*args, **kwargs)
            finally:
                self._open.pop()
                rec[2] = self.mark()

        return timed

    def collect(self) -> dict:
        """{name: [calls, self seconds]} over the records so far; clears them. On a GPU it
        first waits for the latest mark (events on one stream complete in order), so every
        event read here or afterwards, up to that mark, has completed."""
        if self.gpu and self._last is not None:
            self._last.synchronize()
        spans = [self.seconds(start, end) for _, start, end, _ in self.records]
        own = list(spans)
        for i, (_, _, _, parent) in enumerate(self.records):
            if parent is not None:
                own[parent] -= spans[i]
        stats: dict = {}
        for (name, *_), t in zip(self.records, own):
            s = stats.setdefault(name, [0, 0.0])
            s[0] += 1
            s[1] += t
        self.records.clear()
        return stats


def op_functions() -> dict:
    """The forward and backward functions of ``minivit.ops``, by name."""
    from minivit import ops

    return {
        name: fn
        for name, fn in vars(ops).items()
        if callable(fn) and (name.endswith("_forward") or name.endswith("_backward"))
    }


@contextlib.contextmanager
def instrument(timer: OpTimer):
    """Route every op call through ``timer`` (module attributes of ``minivit.ops``), and put
    the original functions back afterwards."""
    from minivit import ops

    originals = op_functions()
    try:
        for name, fn in originals.items():
            setattr(ops, name, timer.wrap(name, fn))
        yield timer
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)


def profile_minivit(step, backend: str, steps: int, warmup: int) -> dict:
    """Per-op self time of ``step`` (a no-argument callable), averaged over ``steps`` runs."""
    from minivit.models import sharding

    device = harness.torch_device(backend)
    was_sharded = sharding.set_enabled(False)  # one piece: op times must not overlap
    try:
        plain = harness.time_callable(step, "minivit", device, steps, warmup)
        timer = OpTimer(gpu=device == "cuda")
        totals: dict = {}
        step_s = 0.0
        with instrument(timer):
            for _ in range(steps):
                start = timer.mark()
                step()
                end = timer.mark()
                for name, (calls, t) in timer.collect().items():  # syncs on a GPU
                    tot = totals.setdefault(name, [0, 0.0])
                    tot[0] += calls
                    tot[1] += t
                step_s += timer.seconds(start, end)
    finally:
        sharding.set_enabled(was_sharded)
    method = "CUDA events per op call" if device == "cuda" else "host clock per op call"
    return _profile_dict(totals, steps, step_s / steps, plain, method)


# ----------------------------------------------------------------------------------------------
# torch: self time per ATen operator


def profile_torch(step, device: str, steps: int, warmup: int) -> dict:
    """Per-operator self time of the twin's ``step`` under ``torch.profiler``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    plain = harness.time_callable(step, "torch", device, steps, warmup)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    cuda = device == "cuda"
    with profile(activities=acts) as prof:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    totals = {}
    for e in prof.key_averages():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CPU:
                continue  # the kernels themselves: counted under the operators that launched them
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = e.self_cuda_time_total
        else:
            t = e.self_cpu_time_total
        if t > 0:
            totals[e.key] = [e.count, t / 1e6]  # microseconds -> seconds
    method = "torch.profiler, self " + ("device time" if cuda else "CPU time")
    return _profile_dict(totals, steps, wall / steps, plain, method)


def _profile_dict(totals: dict, steps: int, step_s: float, plain, method: str) -> dict:
    ops_ = [
        {"name": name, "calls": calls / steps, "ms": 1e3 * t / steps}
        for name, (calls, t) in totals.items()
    ]
    ops_.sort(key=lambda o: -o["ms"])
    in_ops = sum(o["ms"] for o in ops_)
    return dict(
        ops=ops_,
        step_ms_profiled=1e3 * step_s,
        between_ms=1e3 * step_s - in_ops,
        step_ms_plain=1e3 * plain.median_s,
        steps=steps,
        method=method,
    )


# ----------------------------------------------------------------------------------------------
# running and reporting


def profile_model(name: str, backend: str, B: int, steps: int, warmup: int, torch_ok: bool, **kw):
    """Both profiles of one model's train step (torch's when ``torch_ok`` and a twin exists)."""
    built = models.build(name, backend, B, torch_ok, **kw)
    device = harness.torch_device(backend)
    out = dict(
        model=name,
        label=models.SHORT.get(name, name),
        batch=B,
        backend=backend,
        device=device,
        minivit=profile_minivit(built["train_step"], backend, steps, warmup),
    )
    if "torch_train_step" in built:
        out["torch"] = profile_torch(built["torch_train_step"], device, steps, warmup)
    return out


def table(prof: dict, top: int) -> list[str]:
    """A markdown table: minivit's ops and torch's operators side by side, by self time."""
    m, t = prof["minivit"], prof.get("torch")
    sides = [m] + ([t] if t else [])
    head = "| # | minivit op | calls | ms | % |"
    rule = "|---|---|---|---|---|"
    if t:
        head += " torch operator | calls | ms | % |"
        rule += "---|---|---|---|"
    lines = [head, rule]

    def cells(side, i):
        ops_ = side["ops"]
        if i >= len(ops_):
            return " | | | |"
        o = ops_[i]
        share = 100 * o["ms"] / side["step_ms_profiled"]
        return f" `{o['name']}` | {o['calls']:g} | {o['ms']:.2f} | {share:.1f} |"

    for i in range(max(min(top, len(s["ops"])) for s in sides)):
        lines.append(f"| {i + 1} |" + "".join(cells(s, i) for s in sides))

    def summary(label, values):
        row = f"| | {label} | | {values[0]:.2f} | |"
        if t:
            row += f" | | {values[1]:.2f} | |"
        return row

    rest = [sum(o["ms"] for o in s["ops"][top:]) for s in sides]
    if any(rest):
        lines.append(summary("(other ops)", rest))
    for label, key in (
        (BETWEEN, "between_ms"),
        ("**step, profiled**", "step_ms_profiled"),
        ("step, not profiled (median)", "step_ms_plain"),
    ):
        lines.append(summary(label, [s[key] for s in sides]))
    return lines


def markdown(profiles: list, env: dict, top: int) -> str:
    out = ["# Where a train step's time goes", ""]
    # the benchmark's environment lines, but this run's own method line (report.py's speaks of
    # interleaved repeats)
    out += [ln for ln in report.environment_lines(env) if not ln.startswith("- fp32")]
    out.append(
        f"- fp32, TF32 {'on' if env.get('tf32') else 'off'}; {env.get('repeats')} profiled steps "
        f"per implementation after {env.get('warmup')} warm-up, minivit's then torch's, each "
        "also timed unprofiled; minivit without batch shards"
    )
    if env.get("interrupted"):
        out.append("- **interrupted** (a time limit): only the models that finished are listed")
    for p in profiles:
        out += ["", f"## {p['label']}, batch {p['batch']}, {p['backend']} ({p['device']})", ""]
        out.append(
            f"minivit: {p['minivit']['method']}; "
            + (f"torch: {p['torch']['method']}." if "torch" in p else "no torch twin.")
        )
        out += ["", *table(p, top)]
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        nargs="+",
        choices=["numpy", "cupy"],
        default=None,
        help="backends to profile (default: numpy, plus cupy when a device is present)",
    )
    p.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224"], metavar="MODEL")
    p.add_argument("--batch", type=int, default=None, help="default 8 on a CPU, 64 on a GPU")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (and unprofiled ones)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default: a new one in runs/)")


def args_from_bench(args) -> argparse.Namespace:
    """This script's options from ``minivit bench --profile``'s (benchmarks/run.py's): its
    backends, models, --repeats (the steps), --warmup, --threads, --tf32, --no-torch and --out;
    the benchmark's other options do not apply to a profile."""
    backend = args.backend
    return argparse.Namespace(
        backend=[backend] if isinstance(backend, str) else backend,
        models=args.models or ["vit_tiny_patch16_224"],
        batch=None,
        steps=args.repeats or 3,
        warmup=1 if args.warmup is None else args.warmup,
        threads=args.threads,
        top=15,
        tf32=args.tf32,
        no_torch=args.no_torch,
        out=args.out,
    )


def execute(args, log=print) -> dict:
    """Profile every model in ``args.models`` on every backend in ``args.backend``; write
    profile.json and profile.md; return their paths. ``args`` has the fields of
    :func:`add_arguments`. A model that raises is logged and skipped; Ctrl-C (SIGINT) writes
    the profiles that finished, marked as interrupted."""
    cfg = harness.BenchConfig(
        backends=list(args.backend or []),
        repeats=args.steps,
        warmup=args.warmup,
        tf32=args.tf32,
        threads=args.threads,
        torch=not args.no_torch,
    )
    harness.configure(cfg)  # first: CUPY_TF32 is read at CuPy's first float32 matmul
    if not cfg.backends:
        cfg.backends = ["numpy"] + (["cupy"] if harness.impl_available("cupy") else [])
    missing = [b for b in cfg.backends if not harness.impl_available(b)]
    if missing:
        raise SystemExit(f"profile: backend {', '.join(missing)} cannot run here")
    env = harness.environment_info(cfg)
    env["minivit_batch_shards"] = False  # profile_minivit turns them off
    out = args.out or harness.default_out(env, "profile")
    profiles = []
    try:
        for backend in cfg.backends:
            device = harness.torch_device(backend)
            torch_ok = cfg.torch and harness.impl_available("torch")
            torch_ok = torch_ok and (device == "cpu" or harness.torch_cuda())
            for name in args.models:
                B = args.batch or models.batch_size(name, device, quick=False)
                log(f"profiling {name} batch {B} on {backend} ...")
                try:
                    prof = profile_model(name, backend, B, args.steps, args.warmup, torch_ok)
                except Exception as exc:  # one failure must not cost the other profiles
                    log(f"profile: {name} on {backend} failed: {type(exc).__name__}: {exc}")
                    harness.release_memory(device)
                    continue
                profiles.append(prof)
                log("\n".join(table(prof, args.top)))
    except KeyboardInterrupt:
        env["interrupted"] = True
        log(f"interrupted: writing the {len(profiles)} profiles that finished")
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "profile.json"), "markdown": os.path.join(out, "profile.md")}
    report.write_json(profiles, env, paths["json"])
    with open(paths["markdown"], "w") as f:
        f.write(markdown(profiles, env, args.top))
    log(f"wrote {paths['json']} and {paths['markdown']}")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    execute(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
