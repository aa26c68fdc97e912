"""Turn benchmark rows into JSON, a markdown report and PNG plots.

A row is a flat dict (see ops.py and models.py). Rows pair up by (group, name, phase, shape,
device): the ``minivit`` row and the ``torch`` row of one case give the minivit-over-torch
ratio; the ``numpy`` and ``cupy`` rows of one case give the GPU-over-CPU speedup.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out DIR]   # redraw / merge
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["write_json", "load_json", "pairs", "markdown", "plots", "write_all"]


def write_json(rows: list, env: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1, default=_jsonable)
    os.replace(tmp, path)
    return path


def _jsonable(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def load_json(path: str) -> tuple[list, dict]:
    with open(path) as f:
        data = json.load(f)
    return data["results"], data.get("environment", {})


def _key(r: dict) -> tuple:
    return (
        r.get("group"),
        r.get("name"),
        r.get("phase"),
        r.get("shape"),
        r.get("device"),
        r.get("batch"),
        r.get("tokens"),
        r.get("width"),
    )


def pairs(rows: list) -> list[dict]:
    """One dict per case with minivit and torch medians and their ratio (minivit / torch)."""
    by: dict = {}
    for r in rows:
        if r.get("group") not in ("op", "model") or "median_ms" not in r:
            continue
        by.setdefault(_key(r), {})[r.get("impl")] = r
    out = []
    for k, d in by.items():
        m, t = d.get("minivit"), d.get("torch")
        if m is None:
            continue
        out.append(
            dict(
                group=k[0],
                name=k[1],
                phase=k[2],
                shape=k[3],
                device=k[4],
                backend=m.get("backend"),
                label=m.get("label", k[1]),
                minivit_ms=m["median_ms"],
                torch_ms=t["median_ms"] if t else None,
                ratio=m["median_ms"] / t["median_ms"] if t else None,
                minivit_mem=m.get("peak_mem_bytes"),
                torch_mem=t.get("peak_mem_bytes") if t else None,
                mem_method=m.get("mem_method"),
                torch_mem_method=t.get("mem_method") if t else None,
                gflops=m.get("gflops_per_s"),
                frac=m.get("frac_of_sgemm"),
                repeats=m.get("repeats"),
                twin_diff=m.get("twin_max_abs_diff"),
                batch=m.get("batch"),
                tokens=m.get("tokens"),
                width=m.get("width"),
            )
        )
    return out


def gpu_speedups(rows: list) -> list[dict]:
    """numpy median / cupy median for every case run on both (minivit rows only)."""
    by: dict = {}
    for r in rows:
        if r.get("impl") != "minivit" or "median_ms" not in r:
            continue
        k = (r.get("group"), r.get("name"), r.get("phase"), r.get("shape"))
        by.setdefault(k, {})[r.get("backend")] = r["median_ms"]
    out = []
    for k, d in by.items():
        if "numpy" in d and "cupy" in d:
            out.append(
                dict(
                    group=k[0],
                    name=k[1],
                    phase=k[2],
                    shape=k[3],
                    numpy_ms=d["numpy"],
                    cupy_ms=d["cupy"],
                    speedup=d["numpy"] / d["cupy"],
                )
            )
    return out


def _mb(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def _f(x, fmt="{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def environment_lines(env: dict) -> list[str]:
    lines = []
    dev = env.get("gpu") or env.get("cpu")
    lines.append(f"- device: {dev}" + (f" (host CPU {env.get('cpu')})" if env.get("gpu") else ""))
    lines.append(
        f"- python {env.get('python')}, numpy {env.get('numpy')}, torch {env.get('torch', '-')}"
        + (f", cupy {env['cupy']}" if env.get("cupy") else "")
    )
    pools = env.get("threadpools")
    if isinstance(pools, list):
        desc = ", ".join(
            f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}) "
            f"{p.get('num_threads')} threads"
            for p in pools
        )
        lines.append(f"- BLAS: {desc}")
    kernels = env.get("openblas_kernels")
    if isinstance(kernels, dict) and kernels:
        gf = kernels.get("gflops_1thread")
        lines.append(
            f"- OpenBLAS kernel set: {kernels.get('applied') or 'its own pick'} "
            f"({kernels.get('why')}"
            + (f"; 1-thread GEMM mix GFLOP/s {gf}" if gf else "")
            + "; see minivit/blas_kernels.py)"
        )
    lines.append(
        f"- threads: torch {env.get('torch_threads', '-')}, minivit pool "
        f"{env.get('minivit_threads', '-')} (batch shards "
        f"{ {True: 'on', False: 'off'}.get(env.get('minivit_batch_shards'), '-') }); "
        f"cores {env.get('cpu_count')}"
    )
    blas_env = {k: v for k, v in (env.get("env") or {}).items() if v is not None}
    lines.append(f"- environment: {blas_env or 'no OPENBLAS_/OMP_ variables set'}")
    lines.append(
        f"- fp32, TF32 {'on' if env.get('tf32') else 'off'}; warm-up {env.get('warmup')}, "
        f"median of {env.get('repeats')} repeats, implementations interleaved"
    )
    for m in env.get("merged") or []:
        sgemm = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in (m.get("sgemm") or {}).items())
        lines.append(
            f"- merged with a run on {m.get('cpu')} ({m.get('cpu_count')} cores, "
            f"torch threads {m.get('torch_threads')}; warm-up {m.get('warmup')}, median of "
            f"{m.get('repeats')} repeats{', quick' if m.get('quick') else ''}; sgemm ceilings "
            f"{sgemm or '-'} GFLOP/s)"
        )
    if env.get("sgemm"):
        med = env.get("sgemm_median") or {}  # absent in runs before the ceiling was a best run
        lines.append(
            (
                "- measured sgemm ceilings (fastest run; median in brackets): "
                if med
                else "- measured sgemm ceilings: "
            )
            + ", ".join(
                f"{k} {v / 1e9:.0f}" + (f" ({med[k] / 1e9:.0f})" if k in med else "") + " GFLOP/s"
                for k, v in env["sgemm"].items()
            )
        )
    runs = [env] + list(env.get("merged") or [])
    if any(r.get("interrupted") for r in runs):
        lines.append("- **interrupted** (a time limit): only the cases that finished are listed")
    for r in runs:
        if r.get("error"):
            lines.append(f"- **stopped by an error**: {r['error']}; the cases before it are listed")
    return lines


def markdown(rows: list, env: dict) -> str:
    ps = pairs(rows)
    out = ["# minivit benchmark results", ""]
    out += environment_lines(env)
    out.append("")
    models = [p for p in ps if p["group"] == "model"]
    if models:
        out += [
            "## Models",
            "",
            "| model | batch | phase | backend | minivit ms | torch ms | minivit / torch "
            "| GFLOP/s | of sgemm | peak MiB minivit | peak MiB torch |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in models:
            out.append(
                f"| {p['label']} | {p['batch']} | {p['phase']} | {p['backend']} "
                f"| {p['minivit_ms']:.1f} | {_f(p['torch_ms'], '{:.1f}')} "
                f"| {_f(p['ratio'], '**{:.3f}**')} | {_f(p['gflops'], '{:.0f}')} "
                f"| {_f(p['frac'], '{:.0%}')} | {_mb(p['minivit_mem'])} | {_mb(p['torch_mem'])} |"
            )
        methods = {p["mem_method"] for p in models} | {p["torch_mem_method"] for p in models}
        out += ["", "Peak memory: " + "; ".join(sorted(m for m in methods if m)) + ".", ""]
    ops_ = [p for p in ps if p["group"] == "op"]
    if ops_:
        out += [
            "## Ops (forward and backward timed separately)",
            "",
            "| op | shape | phase | backend | minivit ms | torch ms | minivit / torch | GFLOP/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in ops_:
            out.append(
                f"| {p['name']} | {p['shape']} | {p['phase']} | {p['backend']} "
                f"| {p['minivit_ms']:.3f} | {_f(p['torch_ms'], '{:.3f}')} "
                f"| {_f(p['ratio'])} | {_f(p['gflops'], '{:.0f}')} |"
            )
        out.append("")
    sk = [r for r in rows if r.get("group") == "sinkhorn"]
    if sk:
        out += [
            "## Sinkhorn (benchmarks/bench_sinkhorn.py)",
            "",
            "| backend | implementation | dtype | pairs x n x m | iters | median ms "
            "| speed-up over a loop of POT calls |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sk:
            out.append(
                f"| {r.get('backend')} | {r.get('impl')} | {r.get('dtype')} "
                f"| {r.get('batch')} x {r.get('n')} x {r.get('m')} | {r.get('n_iters')} "
                f"| {_f(r.get('median_ms'), '{:.1f}')} "
                f"| {_f(r.get('speedup_vs_pot_loop'), '{:.1f}x')} |"
            )
        out.append("")
    sp = gpu_speedups(rows)
    if sp:
        out += [
            "## GPU over CPU (minivit numpy ms / minivit cupy ms)",
            "",
            "| case | shape | phase | numpy ms | cupy ms | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for s in sp:
            out.append(
                f"| {s['name']} | {s['shape']} | {s['phase']} | {s['numpy_ms']:.2f} "
                f"| {s['cupy_ms']:.3f} | {s['speedup']:.1f}x |"
            )
        out.append("")
    failed = [r for r in rows if r.get("group") == "failed"]
    if failed:
        out += ["## Cases that failed (not timed)", ""]
        out += [f"- {r.get('name')} {r.get('phase')} on {r.get('backend')}: {r.get('error')}"
                for r in failed]  # fmt: skip
        out.append("")
    return "\n".join(out)


def failure_row(name: str, phase: str, backend: str, exc: BaseException) -> dict:
    """A case that raised (out of memory, say), for the report: the run goes on without it,
    and results.json and results.md say what is missing and why."""
    return dict(group="failed", name=name, phase=phase, backend=backend,
                error=f"{type(exc).__name__}: {exc}")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# plots


def plots(rows: list, outdir: str) -> list[str]:
    """PNG figures; returns the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(outdir, exist_ok=True)
    written = []
    op_rows = [r for r in rows if r.get("group") == "op" and "median_ms" in r]
    names = [n for n in dict.fromkeys(r["name"] for r in op_rows)]
    for axis, fixed in (("tokens", ("batch", "width")), ("width", ("batch", "tokens"))):
        if not op_rows:
            break
        # the sweep along `axis`: rows whose other two sizes are the most common (the centre)
        centre = {}
        for f in fixed:
            vals = [r.get(f) for r in op_rows]
            centre[f] = max(set(vals), key=vals.count)
        sel = [r for r in op_rows if all(r.get(f) == centre[f] for f in fixed)]
        if len({r.get(axis) for r in sel}) < 2:
            continue
        ncol = 3
        nrow = (len(names) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(10, 3 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for backend in dict.fromkeys(r["backend"] for r in sel):
                for phase, ls in (("forward", "-"), ("backward", "--")):
                    pts = sorted(
                        (r[axis], r["median_ms"])
                        for r in sel
                        if r["name"] == name and r["backend"] == backend and r["phase"] == phase
                    )
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, ls, marker="o", ms=3, label=f"{backend} {phase[:3]}")
            ax.set_title(name, fontsize=9)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis, fontsize=8)
            ax.set_ylabel("ms", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6, loc="upper left")
        fig.suptitle(
            f"op time vs {axis} ({', '.join(f'{k}={v}' for k, v in centre.items())})", fontsize=10
        )
        fig.tight_layout()
        path = os.path.join(outdir, f"ops_time_vs_{axis}.png")
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path)

    ps = [p for p in pairs(rows) if p["ratio"] is not None]
    centre_ops = [p for p in ps if p["group"] == "model"] + [
        p for p in ps if p["group"] == "op" and _is_centre(p, rows)
    ]
    if centre_ops:
        short = {"forward": "fwd", "backward": "bwd", "train_step": "train step"}
        labels = [
            f"{p['label']} {short.get(p['phase'], p['phase'])} [{p['device']}]" for p in centre_ops
        ]
        vals = [p["ratio"] for p in centre_ops]
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(vals) + 1.2))
        colors = ["tab:green" if v <= 1.0 else "tab:red" for v in vals]
        ax.barh(range(len(vals)), vals, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(vals)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("minivit time / torch eager time (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.tight_layout()
        path = os.path.join(outdir, "ratio_minivit_over_torch.png")
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path)

    sp = gpu_speedups(rows)
    if sp:
        labels = [f"{s['name']} {s['phase']} {s['shape']}" for s in sp]
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(sp) + 1.2))
        ax.barh(range(len(sp)), [s["speedup"] for s in sp], color="tab:blue")
        ax.set_xscale("log")
        ax.set_yticks(range(len(sp)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("GPU speed-up over CPU (numpy time / cupy time)", fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "speedup_gpu_over_cpu.png")
        fig.savefig(path, dpi=70)
        plt.close(fig)
        written.append(path)
    return written


def _is_centre(p: dict, rows: list) -> bool:
    # the op rows at the sweep's centre (the most common batch/tokens/width)
    vals = {}
    for f in ("batch", "tokens", "width"):
        xs = [r.get(f) for r in rows if r.get("group") == "op"]
        vals[f] = max(set(xs), key=xs.count) if xs else None
    return all(p.get(f) == vals[f] for f in vals)


def write_all(rows: list, env: dict, outdir: str) -> dict:
    """results.json, results.md and the PNGs in ``outdir``; returns their paths."""
    os.makedirs(outdir, exist_ok=True)
    paths = {"json": write_json(rows, env, os.path.join(outdir, "results.json"))}
    md = os.path.join(outdir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(rows, env) + "\n")
    paths["markdown"] = md
    paths["plots"] = plots(rows, outdir)
    return paths


def merge(paths: list) -> tuple[list, dict]:
    """Rows of several result files together; the first file's environment, the others' kept
    under ``env["merged"]`` (e.g. a GPU run and a CPU run on the same host).

    Merging is for runs on different devices. Two files that both measured a case on the same
    device (the same implementation) are refused with a ``ValueError``: their rows would pair
    one run's minivit time with the other's torch time, or one would hide the other."""
    rows, env, seen = [], {}, {}
    for path in paths:
        if not os.path.isfile(path):
            print(f"report: {path} missing, skipped", file=sys.stderr)
            continue
        r, e = load_json(path)
        for row in r:
            if row.get("group") not in ("op", "model"):
                continue
            key = (*_key(row), row.get("impl"))
            other = seen.setdefault(key, path)
            if other != path:
                raise ValueError(
                    f"{other} and {path} both measured {row.get('name')} {row.get('phase')} "
                    f"({row.get('impl')} on {row.get('device')}): merge runs made on different "
                    "devices (a GPU run with its host CPU's), not two runs of one device"
                )
        rows += r
        if not env:
            env = dict(e)
        else:
            env.setdefault("merged", []).append(
                {
                    k: e.get(k)
                    for k in (
                        "cpu",
                        "cpu_count",
                        "threadpools",
                        "torch_threads",
                        "minivit_threads",
                        "sgemm",
                        "quick",
                        "repeats",
                        "warmup",
                        "interrupted",
                        "error",
                        "elapsed_s",
                    )
                }
            )
    return rows, env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="redraw a benchmark report from its JSON file(s)")
    ap.add_argument("json", nargs="+", help="results.json files (several are merged)")
    ap.add_argument("--out", default=None, help="folder (default: the first JSON's folder)")
    a = ap.parse_args(argv)
    try:
        rows, env = merge(a.json)
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("report: no results", file=sys.stderr)
        return 1
    paths = write_all(rows, env, a.out or os.path.dirname(os.path.abspath(a.json[0])))
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
