"""Per-op benchmarks: each op's forward and backward timed separately, beside a PyTorch twin.

Ops: linear, layernorm, gelu, softmax, attention, cross_entropy (and sinkhorn, whose cases live
in ``benchmarks/bench_sinkhorn.py`` and are called from here).

Sizes follow a ViT: B images of N tokens of width D, with D / 64 heads and an MLP of width 4 D.
The sweep moves one axis at a time from the centre (B=8, N=197, D=384): tokens 50..1024, width
192..1024, batch 1..32 (64 as well on a GPU). Per op, the tensor shapes are:

    linear         x (B, N, D) @ w (4D, D)^T + b      (the MLP's fc1)
    layernorm      x (B, N, D)
    gelu           x (B, N, 4D)                       (the MLP's hidden activations)
    softmax        x (B, D/64, N, N)                  (attention scores)
    attention      x (B, N, D), D/64 heads, qkv and proj weights
    cross_entropy  logits (B*N, 1000), integer targets

The PyTorch twin of each op is written here with plain eager calls (F.linear, F.layer_norm,
F.gelu, torch.softmax, the attention written out as matmul + softmax, F.cross_entropy); the
backward twin is ``torch.autograd.grad`` of a stored forward, so both sides time the backward
alone.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness, report

OP_NAMES = ("linear", "layernorm", "gelu", "softmax", "attention", "cross_entropy", "sinkhorn")


def known_ops() -> str:
    """The accepted op names, for help texts and error messages."""
    return ", ".join(OP_NAMES)


def resolve_ops(names) -> list[str]:
    """``names`` as op names (case ignored), in the benchmark's order, each once. Unknown names
    raise ``ValueError`` naming them all and listing the known ones."""
    unknown = [str(n) for n in names if str(n).lower() not in OP_NAMES]
    if unknown:
        raise ValueError(
            f"unknown op{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for --ops; known: {known_ops()}"
        )
    wanted = {str(n).lower() for n in names}
    return [n for n in OP_NAMES if n in wanted]


CENTRE = dict(batch=8, tokens=197, width=384)
# Idle seconds before each timed CPU run of an op (BenchConfig.gap_s, when None): an op takes
# milliseconds, and a model's 0.12 s would dominate the sweep's wall time.
GAP_S = 0.01


def sizes(quick: bool, gpu: bool) -> list[dict]:
    """The sweep: one axis at a time from CENTRE (quick: the centre and one small size). The
    centre comes first, so an op that ignores an axis is timed at the centre."""
    if quick:
        return [dict(CENTRE), dict(batch=8, tokens=197, width=192)]
    out = [dict(CENTRE)]
    for n in (50, 577, 1024):
        out.append(dict(CENTRE, tokens=n))
    for d in (192, 768, 1024):
        out.append(dict(CENTRE, width=d))
    for b in (1, 32) + ((64,) if gpu else ()):
        out.append(dict(CENTRE, batch=b))
    return out


# ----------------------------------------------------------------------------------------------
# inputs and flop counts


def _host_inputs(op: str, size: dict, seed: int = 0) -> dict:
    """Host (numpy, float64) inputs of one case, identical for minivit and torch."""
    rng = np.random.default_rng(seed)
    B, N, D = size["batch"], size["tokens"], size["width"]
    H = max(D // 64, 1)
    if op == "linear":
        return dict(
            x=rng.standard_normal((B, N, D)),
            w=rng.standard_normal((4 * D, D)) * D**-0.5,
            b=rng.standard_normal(4 * D) * 0.1,
            dout=rng.standard_normal((B, N, 4 * D)),
        )
    if op == "layernorm":
        return dict(
            x=rng.standard_normal((B, N, D)),
            g=1 + 0.1 * rng.standard_normal(D),
            b=0.1 * rng.standard_normal(D),
            dout=rng.standard_normal((B, N, D)),
        )
    if op == "gelu":
        return dict(x=rng.standard_normal((B, N, 4 * D)), dout=rng.standard_normal((B, N, 4 * D)))
    if op == "softmax":
        return dict(x=rng.standard_normal((B, H, N, N)) * 3, dout=rng.standard_normal((B, H, N, N)))
    if op == "attention":
        return dict(
            x=rng.standard_normal((B, N, D)),
            w_qkv=rng.standard_normal((3 * D, D)) * D**-0.5,
            b_qkv=rng.standard_normal(3 * D) * 0.1,
            w_proj=rng.standard_normal((D, D)) * D**-0.5,
            b_proj=rng.standard_normal(D) * 0.1,
            heads=H,
            dout=rng.standard_normal((B, N, D)),
        )
    if op == "cross_entropy":
        K = 1000
        return dict(
            logits=rng.standard_normal((B * N, K)) * 2,
            targets=rng.integers(0, K, B * N),
            dout=np.array(1.0),
        )
    raise ValueError(f"unknown op {op!r}")


def flops(op: str, size: dict) -> tuple[float | None, float | None]:
    """(forward, backward) floating-point operations, counting GEMM work only (None if none)."""
    B, N, D = size["batch"], size["tokens"], size["width"]
    M = B * N
    if op == "linear":
        f = 2.0 * M * D * 4 * D
        return f, 2 * f
    if op == "attention":
        f = 2.0 * M * D * 3 * D + 2.0 * M * D * D + 4.0 * B * N * N * D
        return f, 2 * f
    return None, None


def shape_label(op: str, size: dict) -> str:
    B, N, D = size["batch"], size["tokens"], size["width"]
    return {
        "linear": f"({B},{N},{D})x({4 * D},{D})",
        "layernorm": f"({B},{N},{D})",
        "gelu": f"({B},{N},{4 * D})",
        "softmax": f"({B},{max(D // 64, 1)},{N},{N})",
        "attention": f"({B},{N},{D}) h={max(D // 64, 1)}",
        "cross_entropy": f"({B * N},1000)",
    }[op]


# ----------------------------------------------------------------------------------------------
# minivit and torch callables


def minivit_case(op: str, host: dict, backend: str, dtype: str = "float32"):
    """(forward_fn, backward_fn) running minivit's op on ``backend``."""
    from minivit import ops
    from minivit.backend import get_backend

    be = get_backend(backend)
    dt = getattr(be.xp, dtype)

    def arr(a):
        return be.asarray(a, dtype=dt)

    if op == "linear":
        args = (arr(host["x"]), arr(host["w"]), arr(host["b"]))
        fwd, bwd = ops.linear_forward, ops.linear_backward
    elif op == "layernorm":
        args = (arr(host["x"]), arr(host["g"]), arr(host["b"]))
        fwd, bwd = ops.layernorm_forward, ops.layernorm_backward
    elif op == "gelu":
        args = (arr(host["x"]),)
        fwd, bwd = ops.gelu_forward, ops.gelu_backward
    elif op == "softmax":
        args = (arr(host["x"]),)
        fwd, bwd = ops.softmax_forward, ops.softmax_backward
    elif op == "attention":
        args = (
            arr(host["x"]),
            arr(host["w_qkv"]),
            arr(host["b_qkv"]),
            arr(host["w_proj"]),
            arr(host["b_proj"]),
            int(host["heads"]),
        )
        fwd, bwd = ops.attention_forward, ops.attention_backward
    elif op == "cross_entropy":
        args = (arr(host["logits"]), be.asarray(host["targets"]))
        fwd, bwd = ops.cross_entropy_forward, ops.cross_entropy_backward
    else:
        raise ValueError(op)
    dout = arr(host["dout"])
    _, cache = fwd(*args)
    return (lambda: fwd(*args)), (lambda: bwd(dout, cache))


def torch_case(op: str, host: dict, device: str, dtype: str = "float32"):
    """(forward_fn, backward_fn): the same computation in PyTorch eager on ``device``."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)

    def t(a, grad=True):
        return torch.tensor(a, dtype=dt, device=device, requires_grad=grad)

    if op == "linear":
        ins = [t(host["x"]), t(host["w"]), t(host["b"])]

        def f():
            return F.linear(*ins)

    elif op == "layernorm":
        ins = [t(host["x"]), t(host["g"]), t(host["b"])]
        D = ins[0].shape[-1]

        def f():
            return F.layer_norm(ins[0], (D,), ins[1], ins[2], eps=1e-6)

    elif op == "gelu":
        ins = [t(host["x"])]

        def f():
            return F.gelu(ins[0])

    elif op == "softmax":
        ins = [t(host["x"])]

        def f():
            return torch.softmax(ins[0], dim=-1)

    elif op == "attention":
        ins = [t(host[k]) for k in ("x", "w_qkv", "b_qkv", "w_proj", "b_proj")]
        H = int(host["heads"])

        def f():
            x, w_qkv, b_qkv, w_proj, b_proj = ins
            B, N, D = x.shape
            hd = D // H
            qkv = F.linear(x, w_qkv, b_qkv).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            p = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1)
            ctx = (p @ v).transpose(1, 2).reshape(B, N, D)
            return F.linear(ctx, w_proj, b_proj)

    elif op == "cross_entropy":
        ins = [t(host["logits"])]
        targets = torch.tensor(host["targets"], device=device)

        def f():
            return F.cross_entropy(ins[0], targets)

    else:
        raise ValueError(op)
    dout = torch.tensor(host["dout"], dtype=dt, device=device)
    out = f()

    def bwd():
        return torch.autograd.grad(out, ins, dout, retain_graph=True)

    return f, bwd


# ----------------------------------------------------------------------------------------------
# running


def run(
    cfg: harness.BenchConfig, ceilings: dict | None = None, log=print, rows: list | None = None
) -> list[dict]:
    """Time every selected op on every selected backend, each beside its torch twin.

    Rows are appended to ``rows`` as each case finishes (Sinkhorn's when all its cases have);
    a case that raises is logged and skipped (as in ``models.run``).
    """
    ceilings = ceilings or {}
    names = list(OP_NAMES) if cfg.ops is None else resolve_ops(cfg.ops)
    have_torch = cfg.torch and harness.impl_available("torch")
    rows = [] if rows is None else rows
    for backend in cfg.backends:
        if not harness.impl_available(backend):
            log(f"ops: backend {backend} unavailable, skipped")
            continue
        device = harness.torch_device(backend)
        torch_ok = have_torch and (device == "cpu" or harness.torch_cuda())
        for op in names:
            if op == "sinkhorn":
                continue
            done = set()  # an op that ignores an axis (cross_entropy: the width) runs once a shape
            for size in sizes(cfg.quick, device == "cuda"):
                label = shape_label(op, size)
                if label in done:
                    continue
                done.add(label)
                try:
                    _time_op(cfg, op, size, backend, device, torch_ok, ceilings, log, rows)
                except Exception as exc:
                    log(f"ops: {op} {label} on {backend} failed: {type(exc).__name__}: {exc}")
                    rows.append(report.failure_row(op, label, backend, exc))
                    harness.release_memory(device)
    if "sinkhorn" in names:
        rows.extend(run_sinkhorn(cfg, log))
    return rows


def _time_op(cfg, op, size, backend, device, torch_ok, ceilings, log, rows) -> None:
    """One op at one size, forward then backward, minivit beside its torch twin; each phase's
    rows are appended to ``rows`` when it finishes."""
    host = _host_inputs(op, size)
    f_fwd, f_bwd = flops(op, size)
    cases = {}
    m_fwd, m_bwd = minivit_case(op, host, backend)
    cases[("minivit", "forward")] = (m_fwd, "minivit", device)
    cases[("minivit", "backward")] = (m_bwd, "minivit", device)
    if torch_ok:
        t_fwd, t_bwd = torch_case(op, host, device)
        cases[("torch", "forward")] = (t_fwd, "torch", device)
        cases[("torch", "backward")] = (t_bwd, "torch", device)
    for phase in ("forward", "backward"):
        sub = {k: v for k, v in cases.items() if k[1] == phase}
        timed = harness.time_interleaved(
            sub, cfg.repeats, cfg.warmup, gap_s=GAP_S if cfg.gap_s is None else cfg.gap_s
        )
        for (impl, _), timing in timed.items():
            fn = sub[(impl, phase)][0]
            mem = harness.peak_memory(fn, impl, device) if cfg.memory else None
            base = dict(
                group="op",
                name=op,
                phase=phase,
                backend=backend if impl == "minivit" else f"torch-{device}",
                impl=impl,
                device=device,
                dtype="float32",
                shape=shape_label(op, size),
                **size,
            )
            fl = f_fwd if phase == "forward" else f_bwd
            ceiling = ceilings.get(harness.ceiling_key(base))
            rows.append(harness.result_row(base, timing, fl, ceiling, mem))
        m = timed[("minivit", phase)].median_s
        t = timed.get(("torch", phase))
        ratio = f"  x{m / t.median_s:.2f} torch" if t else ""
        log(
            f"  {backend:5s} {op:13s} {phase:8s} {shape_label(op, size):24s} "
            f"{1e3 * m:9.3f} ms{ratio}"
        )


def run_sinkhorn(cfg: harness.BenchConfig, log=print) -> list[dict]:
    """The Sinkhorn cases of benchmarks/bench_sinkhorn.py, tagged as op rows."""
    try:
        from benchmarks import bench_sinkhorn
    except ImportError as exc:
        log(f"ops: sinkhorn benchmark unavailable ({exc})")
        return []
    backends = [b for b in cfg.backends if harness.impl_available(b)]
    if not backends:
        return []
    try:
        raw = bench_sinkhorn.run(cfg.quick, backends)
    except Exception as exc:  # another helper's code: report, never lose the other results
        log(f"ops: sinkhorn benchmark failed: {type(exc).__name__}: {exc}")
        return [report.failure_row("sinkhorn", "all", ", ".join(backends), exc)]
    rows = []
    for r in raw:
        row = dict(r)
        row.update(group="sinkhorn", name="sinkhorn", source="bench_sinkhorn")
        row["device"] = harness.torch_device(r.get("backend", "numpy"))
        if "median_s" in r:
            row["median_ms"] = 1e3 * r["median_s"]
        if "min_s" in r:
            row["min_ms"] = 1e3 * r["min_s"]
        rows.append(row)
        sp = r.get("speedup_vs_pot_loop")
        log(
            f"  {r.get('backend')} sinkhorn {r.get('impl')} {r.get('dtype')} "
            f"iters={r.get('n_iters')} {row.get('median_ms', float('nan')):.1f} ms"
            + (f"  {sp:.1f}x POT loop" if sp else "")
        )
    return rows


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run benchmarks/run.py instead")
