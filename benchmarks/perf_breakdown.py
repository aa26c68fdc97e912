"""Where a train step's CPU time goes, by kind of work, for minivit and torch alike (Linux perf).

    python benchmarks/perf_breakdown.py [--models NAME ...] [--batch 4] [--threads 1]
                                        [--steps 20] [--warmup 3] [--freq 999] [--gap 0.15]
                                        [--top 12] [--no-torch] [--out DIR]
    minivit bench --perf [--models NAME ...] [--threads N] [--repeats STEPS] [--out DIR]

``profile_step.py`` splits a step by minivit op, and torch's by ATen operator, so the two sides
use different units. This script splits both the same way, by the code the CPU was executing:
the GEMM kernels, GEMM packing, the zeroing of a GEMM's output before it accumulates (beta = 0),
``exp``, the other elementwise and reduction loops, the Python interpreter, each library's own
machinery, the operating system's kernel, and so on (:data:`CATEGORIES`). Then the rows of the two
columns are directly comparable.

How it is measured:

- Each implementation runs in a child process of its own (this script with ``--child``). The
  child builds the model, and its torch twin for the torch side (benchmarks/models.py). It runs
  the warm-up steps and then waits for the parent.
- The parent attaches ``perf record -e cpu-clock -p PID`` to each child and then has them take
  turns, one step each (A B A B ...), ``--steps`` times. Before each step the machine idles
  ``--gap`` seconds, so that the other process's worker threads have stopped spinning. Then
  it stops perf. So only the steps are sampled, not the imports, the model's construction or
  the warm-up, and a change in the machine's load hits both implementations alike.
- ``cpu-clock`` is a software event: CPU time, sampled ``--freq`` times a second on each
  thread. It works where hardware counters are not exposed, as in most virtual machines.
- A sample's period is CPU time in nanoseconds, and a category's time per step is the sum of
  its samples' periods divided by the steps. With more than one thread, the categories add up
  to CPU time, which is more than the wall time per step (reported beside it). Worker threads
  that spin on after a step, in the gap, are counted too ("thread pools").

Both children get the same settings: the benchmarks' thread settings (``--threads``: BLAS,
torch and minivit's pool), glibc ``malloc`` kept from returning memory (minivit/heap.py), and the
OpenBLAS kernel set the benchmarks use (minivit/blas_kernels.py).

Needs Linux ``perf`` (Debian: ``linux-perf``) and permission to profile one's own processes
(``/proc/sys/kernel/perf_event_paranoid`` at most 2). Output: ``perf_breakdown.json`` and
``perf_breakdown.md`` in ``--out``, by default ``runs/bench-<device-tag>-perf-<date>-<time>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before NumPy loads: the OpenBLAS kernels the benchmarks use
    from minivit.blas_kernels import apply_for_command

    apply_for_command()

from benchmarks import harness, models, report  # noqa: E402

IMPLS = ("minivit", "torch")

# ----------------------------------------------------------------------------------------------
# What a sampled symbol is: the categories, tried in this order (the first that matches wins)

_EXP = re.compile(r"(?<![a-z])exp(?:f\d*|m1)?(?![a-z])")  # simd_exp_FLOAT, Sleef_expf8, __expf
_ELEMENTWISE_NUMPY = re.compile(
    r"^(?:FLOAT|DOUBLE|HALF|LONGLONG|LONG|INT|UINT|SHORT|BYTE|BOOL|CFLOAT|CDOUBLE)_"
    r"|sum_of_products|_to_contig|contig_to|_strided|reduce_loop|simd_"
)
_ELEMENTWISE_TORCH = re.compile(r"at::native|at::vec|Vectorized|Sleef")

CATEGORIES = (
    # (name, what it is, test on (dso, symbol))
    (
        "GEMM compute",
        "the GEMM micro-kernels (OpenBLAS's sgemm_kernel, MKL's sgemm_kernel)",
        lambda dso, sym: re.search(r"gemm_kernel", sym) is not None,
    ),
    (
        "zeroing or scaling C",
        "a GEMM with beta = 0 clears its output before it accumulates into it: OpenBLAS through "
        "libc's memset (or its gemm_beta kernel), MKL in its sgemm_mscale; any other memset",
        lambda dso, sym: "memset" in sym or re.search(r"gemm_beta|gemm_mscale", sym) is not None,
    ),
    (
        "GEMM packing",
        "the GEMM's copies of its operands into cache-sized blocks",
        lambda dso, sym: "gemm" in sym or sym.startswith("mkl_blas"),
    ),
    (
        "GEMV",
        "matrix-vector products (minivit's row and column sums)",
        lambda dso, sym: "gemv" in sym,
    ),
    ("exp", "the exponential (NumPy's and torch's vectorised exp)", lambda d, s: _EXP.search(s)),
    (
        "elementwise and reduction loops",
        "NumPy's ufunc, einsum and copy loops; torch's native CPU kernels",
        lambda dso, sym: (
            (dso.startswith("_multiarray_umath") and _ELEMENTWISE_NUMPY.search(sym) is not None)
            or (dso.startswith("libtorch") and _ELEMENTWISE_TORCH.search(sym) is not None)
        ),
    ),
    (
        "code generated at run time",
        "samples in anonymous executable memory (perf's [JIT]). minivit's process has none. In "
        "torch's, sampled one operator at a time on the CPU: GELU forward and backward and the "
        "patch convolution ran there; linear, matmul, layer norm, softmax and add did not",
        lambda dso, sym: dso.startswith("[JIT]"),
    ),
    (
        "thread pools",
        "BLAS's and OpenMP's worker threads spinning, waking and waiting (libgomp is torch's)",
        lambda dso, sym: (
            dso.startswith(("libgomp", "libiomp", "libomp"))
            or re.search(r"blas_thread_server|__kmp|mkl_serv", sym) is not None
        ),
    ),
    (
        "Python interpreter",
        "libpython: bytecode, attribute lookups, object allocation, garbage collection",
        lambda dso, sym: dso.startswith(("libpython", "python")),
    ),
    (
        "copies (memcpy, memmove)",
        "libc's block copies",
        lambda dso, sym: re.search(r"mem(?:cpy|move)", sym) is not None,
    ),
    (
        "malloc and free",
        "libc's allocator",
        lambda dso, sym: (
            dso.startswith("libc")
            and re.search(r"malloc|free|unlink_chunk|_int_|tcache|sysmalloc", sym) is not None
        ),
    ),
    (
        "operating system",
        "the kernel: page faults, scheduling, system calls",
        lambda dso, sym: dso.startswith("[kernel"),
    ),
    (
        "library machinery",
        "the rest of NumPy (array objects, ufunc dispatch) and torch (dispatcher, autograd)",
        lambda dso, sym: dso.startswith(("_multiarray_umath", "libtorch", "libc10", "_C.")),
    ),
)
OTHER = "other"


def categorize(dso: str, sym: str) -> str:
    """The category (a name in :data:`CATEGORIES`, or "other") of one sampled symbol."""
    for name, _, test in CATEGORIES:
        if test(dso, sym):
            return name
    return OTHER


# "      65000000  libfoo.so   [.] symbol"; a DSO may hold spaces ("[JIT] tid 7266")
_ROW = re.compile(r"^\s*(\d+)\s+(.+?)\s+\[([.kgu])\]\s+(.*?)\s*$")


def parse_report(text: str) -> list[tuple[int, str, str]]:
    """(period, dso, symbol) per row of ``perf report --stdio -F period,dso,sym`` output."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _ROW.match(line)
        if m:
            rows.append((int(m.group(1)), m.group(2).strip(), m.group(4)))
    return rows


def summarize(rows, steps: int, top: int = 12) -> dict:
    """Milliseconds of CPU time per step by category, and the ``top`` symbols."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    per_step = 1e-6 / steps  # a period is in nanoseconds
    cats = dict.fromkeys([name for name, _, _ in CATEGORIES] + [OTHER], 0.0)
    for period, dso, sym in rows:
        cats[categorize(dso, sym)] += period * per_step
    ranked = [
        {"ms": p * per_step, "dso": d, "symbol": s, "category": categorize(d, s)}
        for p, d, s in sorted(rows, key=lambda r: -r[0])
    ]
    return {
        "cpu_ms_per_step": sum(r[0] for r in rows) * per_step,
        "categories_ms": cats,
        "top_symbols": ranked[:top],
        # every symbol of at least 0.05 ms a step, so that a report can be sorted again
        "symbols": [r for r in ranked if r["ms"] >= 0.05],
    }


# ----------------------------------------------------------------------------------------------
# the child: build, warm up, then one step for each "step" line the parent sends


def child(args) -> int:
    threads = args.threads or None  # 0: the libraries' own defaults
    harness.configure(harness.BenchConfig(threads=threads, torch=args.child == "torch"))
    built = models.build(args.models[0], "numpy", args.batch, with_torch=args.child == "torch")
    key = "train_step" if args.child == "minivit" else "torch_train_step"
    if key not in built:
        print(json.dumps({"error": f"{args.models[0]} has no torch twin"}), flush=True)
        return 0
    step = built[key]
    for _ in range(args.warmup):
        step()
    print("READY", flush=True)
    for line in sys.stdin:  # until "done" or the parent closes the pipe
        if not line.startswith("step"):
            break
        t0 = time.perf_counter()
        step()
        print(f"{time.perf_counter() - t0:.9f}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# the parent: one child per implementation, perf attached to each, their steps in turns


def check_perf() -> None:
    """Raise SystemExit with the reason when perf cannot sample another process of ours here.

    The probe does what the real run does, on a sleeping child: ``perf record -e cpu-clock
    -p PID``, stopped by SIGINT, then ``perf report`` on its data.
    """
    if shutil.which("perf") is None:
        raise SystemExit("perf_breakdown: needs Linux perf (Debian: apt-get install linux-perf)")
    why = ""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "probe.data")
        target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            perf = _perf_record(target.pid, data)
            time.sleep(0.3)
            running = perf.poll() is None  # perf that exits at once has sampled nothing
            if running:
                perf.send_signal(signal.SIGINT)
            why = perf.communicate(timeout=30)[1].strip()
            if not running:
                why = why or f"perf record exited at once with status {perf.returncode}"
        finally:
            target.kill()
            target.wait()
        if running and os.path.exists(data) and os.path.getsize(data) > 0:
            try:
                read_report(data)
                return
            except subprocess.CalledProcessError as exc:
                why = (exc.stderr or "").strip() or f"perf report exited with {exc.returncode}"
    raise SystemExit(
        "perf_breakdown: `perf record -e cpu-clock -p PID` does not work here (is "
        "/proc/sys/kernel/perf_event_paranoid above 2?)" + (f":\n{why}" if why else "")
    )


def _perf_record(pid: int, data_path: str, freq: int | None = None) -> subprocess.Popen:
    """``perf record`` of CPU time (cpu-clock samples) in process ``pid``, into ``data_path``;
    SIGINT stops it and has it write its data."""
    rate = ["-F", str(freq)] if freq else []
    return subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", *rate, "-p", str(pid), "-o", data_path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _child_command(args, impl: str, name: str) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        impl,
        "--models",
        name,
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]


class Sampled:
    """One child process and the ``perf record`` attached to it."""

    def __init__(self, args, impl: str, name: str, data_path: str):
        self.impl, self.data_path, self.perf = impl, data_path, None
        self.times: list[float] = []  # seconds per sampled step
        self.proc = subprocess.Popen(
            _child_command(args, impl, name),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        self.error = None
        if line != "READY":
            info = json.loads(line) if line.startswith("{") else {}
            self.error = info.get("error") or f"the child stopped before its steps ({line!r})"

    def attach(self, freq: int) -> None:
        self.perf = _perf_record(self.proc.pid, self.data_path, freq)

    def check_attached(self) -> None:
        if self.perf.poll() is not None:
            raise RuntimeError(f"perf record stopped at once: {self.perf.stderr.read().strip()}")

    def step(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} child died during a step")
        self.times.append(float(line))

    def stop_perf(self) -> None:
        if self.perf is not None and self.perf.poll() is None:
            self.perf.send_signal(signal.SIGINT)  # perf writes its data and exits
            self.perf.wait(timeout=60)

    def close(self) -> None:
        if self.perf is not None and self.perf.poll() is None:
            self.perf.kill()
            self.perf.wait()
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the child's loop ends
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def read_report(data_path: str) -> str:
    out = subprocess.run(
        ["perf", "report", "-i", data_path, "--stdio", "--sort", "dso,sym"]
        + ["-F", "period,dso,sym"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def breakdown_model(args, name: str, log=print) -> dict:
    """Both implementations of one model, their steps taken in turns, sampled and summarised.

    Both children are built and warmed up first, each with perf attached, and then take turns,
    one step each (A B A B ...), so that a change in the machine's load hits both alike. Before
    each step the machine idles ``--gap`` seconds, so that the other process's worker threads
    have stopped spinning (OpenBLAS's spin about 0.1 s after a GEMM), as in the benchmarks.
    """
    result = {"model": name, "batch": args.batch, "threads": args.threads, "steps": args.steps}
    impls = IMPLS[:1] if args.no_torch else IMPLS
    log(f"sampling {name}, batch {args.batch}: {args.steps} steps of {' and '.join(impls)}")
    with tempfile.TemporaryDirectory() as tmp:
        started, runs = [], []  # every child (all are closed), the ones that run steps
        try:
            for impl in impls:
                run = Sampled(args, impl, name, os.path.join(tmp, f"{impl}.data"))
                started.append(run)
                if run.error:
                    log(f"perf_breakdown: {impl} skipped: {run.error}")
            runs = [r for r in started if not r.error]
            for run in runs:
                run.attach(args.freq)
            time.sleep(0.5)  # let perf attach to every thread before the first step
            for run in runs:
                run.check_attached()
            for _ in range(args.steps):
                for run in runs:
                    time.sleep(args.gap)
                    run.step()
            for run in runs:
                run.stop_perf()
        finally:
            for run in started:
                run.close()
        for run in runs:
            summary = summarize(parse_report(read_report(run.data_path)), args.steps, args.top)
            summary["wall_ms_median"] = statistics.median(run.times) * 1e3
            summary["wall_ms"] = [t * 1e3 for t in run.times]
            result[run.impl] = summary
    return result


# ----------------------------------------------------------------------------------------------
# reports


def table(result: dict, top: int = 12) -> list[str]:
    """Markdown: one row per category (ms of CPU time per step), then the top symbols."""
    impls = [i for i in IMPLS if i in result]
    head = "| category | " + " | ".join(f"{i} ms" for i in impls)
    head += " | minivit - torch ms |" if len(impls) == 2 else " |"
    lines = [head, "|---" * (len(impls) + 1 + (len(impls) == 2)) + "|"]
    rows = [(name, lambda r, n=name: r["categories_ms"][n]) for name, _, _ in CATEGORIES]
    rows += [
        (OTHER, lambda r: r["categories_ms"][OTHER]),
        ("**CPU time per step**", lambda r: r["cpu_ms_per_step"]),
        ("wall time per step (median)", lambda r: r["wall_ms_median"]),
    ]
    for label, value in rows:
        vals = [value(result[i]) for i in impls]
        row = f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals)
        row += f" | {vals[0] - vals[1]:+.1f} |" if len(impls) == 2 else " |"
        lines.append(row)
    for impl in impls:
        lines += ["", f"Top symbols, {impl} (ms of CPU time per step):", ""]
        lines += ["| ms | category | library | symbol |", "|---|---|---|---|"]
        for s in result[impl]["top_symbols"][:top]:
            sym = s["symbol"] if len(s["symbol"]) <= 90 else s["symbol"][:87] + "..."
            sym = sym.replace("|", "\\|")
            lines.append(f"| {s['ms']:.1f} | {s['category']} | {s['dso']} | `{sym}` |")
    return lines


def markdown(results: list, env: dict, top: int = 12) -> str:
    out = ["# Where a train step's CPU time goes (perf, cpu-clock samples)", ""]
    out.append(f"- device: {env.get('device', '?')}")
    out.append(
        "- float32; each implementation in a process of its own, sampled only during its timed "
        "steps; a category's figure is CPU time per step over all threads"
    )
    out.append("- categories, first match wins:")
    out += [f"  - {name}: {what}" for name, what, _ in CATEGORIES]
    for r in results:
        threads = r["threads"] or "library default"
        out += ["", f"## {r['model']}, batch {r['batch']}, threads {threads}", ""]
        out += [f"{r['steps']} sampled steps per implementation.", "", *table(r, top)]
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224"], metavar="MODEL")
    p.add_argument(
        "--batch",
        type=int,
        default=4,
        help="default 4: one shard of the 2-core benchmark's batch of 8, on one thread",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="BLAS, torch and minivit's pool (0: their defaults)"
    )
    p.add_argument("--steps", type=int, default=20, help="sampled steps per implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--freq", type=int, default=999, help="samples per second per thread")
    p.add_argument("--gap", type=float, default=0.15, help="idle seconds before each step")
    p.add_argument("--top", type=int, default=12, help="symbols listed per implementation")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default: a new one in runs/)")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)


def argv_from_bench(args) -> list[str]:
    """This script's command line from ``minivit bench --perf``'s (benchmarks/run.py's): its
    models, --repeats (the steps), --warmup, --threads, --gap, --no-torch and --out. The
    benchmark's other options do not apply. The batch stays this script's default (4: one
    shard of the 2-core batch of 8) unless --threads asks for more cores."""
    argv = ["--models", *(args.models or ["vit_tiny_patch16_224"])]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
        if args.threads > 1:
            argv += ["--batch", str(4 * args.threads)]  # one shard of 4 per thread
    for flag, value in (("--steps", args.repeats), ("--warmup", args.warmup), ("--gap", args.gap)):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_torch:
        argv.append("--no-torch")
    if args.out:
        argv += ["--out", args.out]
    return argv


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.freq < 1 or min(args.warmup, args.gap) < 0:
        p.error("--steps, --batch and --freq must be >= 1, --warmup and --gap >= 0")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: the libraries' defaults)")
    if args.child:
        return child(args)
    check_perf()
    cfg = harness.BenchConfig(threads=args.threads or None, torch=not args.no_torch)
    env = harness.environment_info(cfg)
    out = args.out or harness.default_out(env, "perf")
    results = [breakdown_model(args, name, log) for name in args.models]
    for r in results:
        log("\n".join(table(r, args.top)))
    os.makedirs(out, exist_ok=True)
    report.write_json(results, env, os.path.join(out, "perf_breakdown.json"))
    with open(os.path.join(out, "perf_breakdown.md"), "w") as f:
        f.write(markdown(results, env, args.top))
    log(f"wrote {out}/perf_breakdown.json and perf_breakdown.md")
    if not any(i in r for r in results for i in IMPLS):
        log("perf_breakdown: no implementation ran")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
