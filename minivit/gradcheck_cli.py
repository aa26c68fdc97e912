"""``minivit gradcheck``: check every op's backward against numerical derivatives.

For each case (an op with one choice of options, on small inputs) it runs the directional check
and the elementwise check of :mod:`minivit.gradcheck`, prints one row per case (op, input shapes,
largest relative error of each check, pass or fail), then the per-input table of every failure,
and exits 1 when any case fails. A user error exits with status 2 before anything is checked:
an option out of its range (``--eps`` or ``--rtol`` not above 0, fewer than one
``--directions``, a negative ``--seed``) as argparse reports it, a bad ``--ops`` name with one
``minivit: error:`` line.

Ops that other parts of the package add later (optimal transport, the hybrid stem's convolution)
are picked up here when ``minivit.ops`` has them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import gradcheck as gc
from .backend import get_backend

__all__ = ["Case", "add_arguments", "build_cases", "run", "run_case"]

# Default tolerances per dtype: in float64 a central difference with eps ~ 1e-6 is good to ~1e-9
# relative, so 1e-6 leaves room; float32 only supports a coarse check (see docs/gradcheck.md).


# Ops in minivit.ops that have no numerical check, and why.
NOT_CHECKED = {
    "ipot": "its backward returns zeros by design (a stop-gradient solver, as ViLT uses it)",
}


@dataclass
class Case:
    """One op under one set of options, with its inputs ready."""

    name: str  # shown in the table, e.g. "attention (one valid key)"
    op: str  # the op family, used by --ops, e.g. "attention"
    forward: Callable[..., Any]
    backward: Callable[..., Any]
    inputs: tuple
    kwargs: dict = field(default_factory=dict)
    grad_indices: Any = None  # see gradcheck.check_backward
    names: tuple | None = None
    skip: str = ""  # why this case is not run (shown in the table; not a failure)

    def shapes(self) -> str:
        parts = []
        for a in self.inputs:
            if hasattr(a, "shape") and hasattr(a, "dtype"):
                s = "x".join(str(d) for d in a.shape) or "()"
                kind = a.dtype.kind
                parts.append(s if kind == "f" else f"{s}:{'int' if kind in 'iu' else 'bool'}")
        return " ".join(parts)


def _by_dtype(key) -> str:
    """A default of gradcheck.DEFAULTS as help text: "1e-06 in float64, 0.02 in float32"."""
    return ", ".join(f"{v[key]:g} in {dtype}" for dtype, v in gc.DEFAULTS.items())


def add_arguments(parser) -> None:
    from .train.common import non_negative_int, positive_float, positive_int

    parser.add_argument(
        "--dtype",
        choices=sorted(gc.DEFAULTS),  # the dtypes the library has eps and rtol for
        default="float64",
        help="dtype of the inputs (default float64; float32 gives only a coarse check)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed for inputs and directions (>= 0)"
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        default=None,
        metavar="OP",
        help="check only these op families or cases (e.g. attention gelu); a family takes "
        "every case named after it: sinkhorn takes its implicit-backward case too, "
        "sinkhorn_implicit that case alone; default: all",
    )
    parser.add_argument(
        "--rtol",
        type=positive_float,
        default=None,
        help=f"relative tolerance, > 0 (default {_by_dtype('rtol')})",
    )
    parser.add_argument(
        "--eps",
        type=positive_float,
        default=None,
        help=f"finite-difference step, > 0 (default {_by_dtype('eps')})",
    )
    parser.add_argument(
        "--directions",
        type=positive_int,
        default=3,
        help="random directions per input, >= 1 (default 3)",
    )
    parser.add_argument(
        "--no-full",
        action="store_true",
        help="skip the elementwise check (directional only; for larger inputs)",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print every per-input table, not only failures",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------


def build_cases(backend, dtype: str = "float64", seed: int = 0) -> list[Case]:
    """Every op in ``minivit.ops`` on small inputs, each interesting option as its own case."""
    from . import ops

    gen = gc.host_rng(seed)
    # Some cases need a finite-difference step far below what float32 allows.
    coarse = dtype != "float64"

    def randn(*shape, scale=1.0, shift=0.0):
        return backend.asarray(gen.standard_normal(shape) * scale + shift, dtype=dtype)

    def uniform(*shape, low=0.0, high=1.0):
        return backend.asarray(gen.uniform(low, high, shape), dtype=dtype)

    def ints(high, *shape):
        return backend.asarray(gen.integers(0, high, shape), dtype="int64")

    def boolean(values):
        return backend.asarray(values, dtype=bool)

    def pair(name):
        return getattr(ops, name + "_forward"), getattr(ops, name + "_backward")

    def has(name):
        return hasattr(ops, name + "_forward") and hasattr(ops, name + "_backward")

    cases: list[Case] = []

    def add(name, op, inputs, **kw):
        fwd, bwd = pair(op)
        cases.append(Case(name, op, fwd, bwd, tuple(inputs), **kw))

    # --- the core ops (API.md) ---------------------------------------------------------------
    add("linear", "linear", [randn(2, 3, 4), randn(5, 4), randn(5)])
    add("linear (no bias)", "linear", [randn(3, 4), randn(5, 4), None])
    add("layernorm", "layernorm", [randn(2, 3, 6), randn(6, shift=1.0), randn(6)])
    # Rows that are almost constant: the variance is tiny, so errors in a one-pass variance or a
    # sloppy rstd derivative show here first.
    add(
        "layernorm (near-constant rows)",
        "layernorm",
        [randn(3, 5, scale=1e-2, shift=3.0), randn(5, shift=1.0), randn(5)],
        skip="needs float64: the float32 step is as large as the rows' spread" if coarse else "",
    )
    add("gelu (none)", "gelu", [randn(3, 5, scale=2.0)], kwargs={"approximate": "none"})
    add("gelu (tanh)", "gelu", [randn(3, 5, scale=2.0)], kwargs={"approximate": "tanh"})
    add("linear_gelu", "linear_gelu", [randn(2, 3, 4), randn(6, 4), randn(6)])
    if has("tanh"):
        add("tanh", "tanh", [randn(3, 5)])
    add("softmax", "softmax", [randn(2, 3, 5)])
    add("softmax (axis=1)", "softmax", [randn(2, 4, 3)], kwargs={"axis": 1})
    add("softmax (large logits)", "softmax", [randn(3, 5, scale=30.0)])
    if has("dropout"):
        # A fresh generator with the same seed on every call, so every forward of the finite
        # difference draws the same mask.
        def dropout_fixed(x, p=0.3):
            return ops.dropout_forward(x, p, rng=backend.rng(seed + 1), train=True)

        cases.append(
            Case(
                "dropout (train, p=0.3)",
                "dropout",
                dropout_fixed,
                ops.dropout_backward,
                (randn(4, 6),),
            )
        )
        add("dropout (eval)", "dropout", [randn(4, 6)], kwargs={"p": 0.3, "train": False})

    B, N, D, H = 2, 4, 8, 2

    def attn_inputs(bias=True, mask=None):
        return [
            randn(B, N, D),
            randn(3 * D, D, scale=D**-0.5),
            randn(3 * D) if bias else None,
            randn(D, D, scale=D**-0.5),
            randn(D) if bias else None,
            H,
            mask,
        ]

    add("attention", "attention", attn_inputs())
    add("attention (no biases)", "attention", attn_inputs(bias=False))
    mask = [[True, True, False, True], [True, False, True, False]]
    add("attention (key_mask)", "attention", attn_inputs(mask=boolean(mask)))
    one = [[False, False, True, False], [True, True, True, True]]
    add("attention (one valid key)", "attention", attn_inputs(mask=boolean(one)))
    none_valid = [[False] * N, [True, False, True, True]]
    add("attention (no valid key)", "attention", attn_inputs(mask=boolean(none_valid)))

    add("embedding", "embedding", [ints(7, 2, 5), randn(7, 4)])
    add("patch_embed", "patch_embed", [randn(2, 3, 4, 6), randn(5, 3, 2, 2), randn(5), 2])

    targets = ints(5, 3, 4)
    add("cross_entropy", "cross_entropy", [randn(3, 4, 5), targets])
    ignored = backend.to_numpy(targets).copy()
    ignored[0, :2] = -100
    ignored[2, 3] = -100
    add(
        "cross_entropy (ignore_index)",
        "cross_entropy",
        [randn(3, 4, 5), backend.asarray(ignored)],
    )
    add(
        "cross_entropy (label_smoothing=0.1)",
        "cross_entropy",
        [randn(6, 5), ints(5, 6)],
        kwargs={"label_smoothing": 0.1},
    )
    add("cross_entropy (large logits)", "cross_entropy", [randn(6, 5, scale=30.0), ints(5, 6)])

    # --- ops that later parts add (optimal transport, hybrid stem) ---------------------------
    if has("cosine_cost"):
        add("cosine_cost", "cosine_cost", [randn(2, 3, 4), randn(2, 5, 4)])
        # A row of x whose norm (5e-6) is below the clamp at eps = 1e-5, as a padding token's
        # features can be: there the row's map is linear (x / eps), without the projection
        # that a row above the clamp has. The step (1e-6) keeps it on that side. (Not a zero
        # row: there the projection term vanishes, so it would not show whether it is left
        # out.)
        x = gen.standard_normal((2, 3, 4))
        x[1, 0] *= 5e-6 / math.sqrt(float((x[1, 0] ** 2).sum()))
        add(
            "cosine_cost (a row below the norm's clamp)",
            "cosine_cost",
            [backend.asarray(x, dtype=dtype), randn(2, 5, 4)],
            skip="needs float64: the float32 step crosses the clamp at 1e-5" if coarse else "",
        )
    if has("sinkhorn"):
        cost = uniform(2, 3, 4)
        a = backend.asarray(_simplex(gen, (2, 3)), dtype=dtype)
        b = backend.asarray(_simplex(gen, (2, 4)), dtype=dtype)
        add(
            "sinkhorn (uniform marginals)",
            "sinkhorn",
            [cost, None, None],
            kwargs={"epsilon": 0.1, "n_iters": 20},
        )
        add(
            "sinkhorn (given marginals)",
            "sinkhorn",
            [uniform(2, 3, 4), a, b],
            kwargs={"epsilon": 0.1, "n_iters": 20},
            skip="needs float64: the float32 step breaks sum(a) = sum(b)" if coarse else "",
        )
        cases.append(_padded_sinkhorn(ops, backend, gen, dtype, coarse))
    if has("sinkhorn_value"):
        # The envelope gradient (dcost = P) is the derivative only at convergence: run to it.
        add(
            "sinkhorn_value (converged)",
            "sinkhorn_value",
            [uniform(2, 3, 4), None, None],
            kwargs={"epsilon": 0.5, "n_iters": 300},
        )
    if hasattr(ops, "sinkhorn_implicit_backward"):
        # The implicit-function backward is the derivative of the fixed point, so the forward
        # must converge; da, db are only defined up to a constant shift, so check cost alone.
        cases.append(
            Case(
                "sinkhorn (implicit backward, converged)",
                "sinkhorn_implicit",
                ops.sinkhorn_forward,
                ops.sinkhorn_implicit_backward,
                (uniform(2, 3, 4), None, None),
                kwargs={"epsilon": 0.5, "n_iters": 300},
                grad_indices=[0],
            )
        )
    if has("ot_distance"):
        # The contract is dcost = ddistance * plan with the plan held constant (ViLT's WPA), which
        # is not the derivative of the forward (the plan moves with the cost). So the check
        # differentiates <plan0, cost> with plan0 computed once at the unperturbed cost.
        for method in ("ipot", "sinkhorn"):
            cost0 = uniform(2, 3, 4)
            _, base_cache = ops.ot_distance_forward(cost0, method=method)
            plan0 = base_cache.plan

            def frozen(cost, _plan=plan0, _cache=base_cache):
                return (_plan * cost).sum(axis=(-2, -1)), _cache

            cases.append(
                Case(
                    f"ot_distance ({method}, plan held)",
                    "ot_distance",
                    frozen,
                    ops.ot_distance_backward,
                    (cost0,),
                )
            )
    # ipot_backward returns zeros by design (a stop-gradient solver, as in ViLT), so there is no
    # derivative to check; it is listed by --list as skipped.
    if has("conv2d"):
        add("conv2d", "conv2d", [randn(2, 3, 5, 5), randn(4, 3, 3, 3), randn(4)])
        add(
            "conv2d (stride 2, padding 1, no bias)",
            "conv2d",
            [randn(2, 3, 6, 5), randn(4, 3, 3, 3), None],
            kwargs={"stride": 2, "padding": 1},
        )
    if has("relu"):
        # Away from the kink at 0, where the derivative does not exist.
        x = gen.standard_normal((3, 5))
        x += 0.1 * (2 * (x > 0) - 1)
        add("relu", "relu", [backend.asarray(x, dtype=dtype)])
    if has("maxpool2d"):
        # Odd sizes: the trailing row and column fill no window and must get zero gradient.
        add("maxpool2d", "maxpool2d", [randn(2, 3, 5, 5)], kwargs={"kernel_size": 2})
    if has("groupnorm"):
        add(
            "groupnorm",
            "groupnorm",
            [randn(2, 4, 3, 3), randn(4, shift=1.0), randn(4), 2],
        )
    return cases


def _simplex(gen, shape):
    w = gen.uniform(0.5, 1.5, shape)
    return w / w.sum(axis=-1, keepdims=True)


def _padded_sinkhorn(ops, backend, gen, dtype, coarse) -> Case:
    """Sinkhorn with padded marginals, as ViLT's masks make them: a zero entry in a (a padded
    word) and in b (a padded patch). A marginal cannot go below 0, so at a zero entry the
    derivative is one-sided, and a central difference does not apply there: the case holds
    those entries at 0 (forward) and leaves their gradient out (backward). What it checks is
    that padding leaves dcost, and da and db at every other entry, the true derivatives.
    (tests/test_sinkhorn.py checks the one-sided value at a zero entry with a forward
    difference.)"""
    a, b = _simplex(gen, (2, 3)), _simplex(gen, (2, 4))
    a[0, 2] = 0.0
    b[1, 1] = 0.0
    a /= a.sum(axis=-1, keepdims=True)
    b /= b.sum(axis=-1, keepdims=True)
    xp = backend.xp
    keep_a, keep_b = backend.asarray(a > 0), backend.asarray(b > 0)

    def forward(cost, a_, b_, **kw):
        return ops.sinkhorn_forward(cost, xp.where(keep_a, a_, 0), xp.where(keep_b, b_, 0), **kw)

    def backward(dplan, cache):
        dcost, da, db = ops.sinkhorn_backward(dplan, cache)
        return dcost, xp.where(keep_a, da, 0), xp.where(keep_b, db, 0)

    cost = backend.asarray(gen.uniform(0.0, 1.0, (2, 3, 4)), dtype=dtype)
    return Case(
        "sinkhorn (padded marginals)",
        "sinkhorn",
        forward,
        backward,
        (cost, backend.asarray(a, dtype=dtype), backend.asarray(b, dtype=dtype)),
        kwargs={"epsilon": 0.1, "n_iters": 20},
        skip="needs float64: the float32 step breaks sum(a) = sum(b)" if coarse else "",
    )


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: Case
    directional: gc.GradcheckReport | None = None
    full: gc.GradcheckReport | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        if self.case.skip:
            return True
        if self.error or self.directional is None:
            return False
        return self.directional.passed and (self.full is None or self.full.passed)

    @property
    def max_rel_err(self) -> float:
        errs = [r.max_rel_err for r in (self.directional, self.full) if r is not None]
        return max(errs) if errs else float("inf")


def run_case(case: Case, *, eps, rtol, n_directions=3, full=True, seed=0) -> CaseResult:
    """Both checks on one case; an exception becomes a failed result carrying its message."""
    res = CaseResult(case)
    if case.skip:
        return res
    t0 = time.perf_counter()
    common = dict(
        grad_indices=case.grad_indices,
        eps=eps,
        rtol=rtol,
        seed=seed,
        kwargs=case.kwargs,
        names=case.names,
        title=case.name,
    )
    try:
        res.directional = gc.check_backward(
            case.forward, case.backward, case.inputs, n_directions=n_directions, **common
        )
        if full:
            res.full = gc.check_backward_full(case.forward, case.backward, case.inputs, **common)
    except Exception as exc:  # a crash in an op is a failure to report, not to hide
        res.error = f"{type(exc).__name__}: {exc}"
    res.seconds = time.perf_counter() - t0
    return res


def uncovered_ops(cases: list[Case]) -> list[str]:
    """Backward functions in ``minivit.ops`` that no case exercises and ``NOT_CHECKED`` does not
    explain, by family name (``sinkhorn_implicit`` for ``sinkhorn_implicit_backward``)."""
    from . import ops

    families = {n[: -len("_backward")] for n in dir(ops) if n.endswith("_backward")}
    families = {f for f in families if callable(getattr(ops, f + "_backward"))}
    checked = {getattr(c.backward, "__name__", "").removesuffix("_backward") for c in cases}
    checked |= {c.op for c in cases}
    return sorted(families - checked - set(NOT_CHECKED))


def _select(cases: list[Case], wanted: list[str] | None) -> tuple[list[Case], list[str]]:
    if not wanted:
        return cases, []
    chosen, unknown = [], []
    for w in wanted:
        hits = [c for c in cases if c.op == w or c.name == w or c.name.startswith(w + " (")]
        if not hits:
            unknown.append(w)
        chosen += [c for c in hits if c not in chosen]
    return chosen, unknown


def _result_word(r: CaseResult) -> str:
    if r.case.skip:
        return f"skipped ({r.case.skip})"
    return "pass" if r.passed else ("ERROR" if r.error else "FAIL")


def _fmt_err(report) -> str:
    if report is None:
        return "-"
    return f"{report.max_rel_err:.1e}"


def run(args) -> int:
    backend = get_backend(getattr(args, "backend", None))
    dtype = getattr(args, "dtype", "float64")
    # the library's defaults for the dtype; a step it would refuse is a usage error here, said
    # once (`minivit: error: ...`), not a FAILED row per case
    eps, rtol = gc.step_and_rtol([dtype], getattr(args, "eps", None), getattr(args, "rtol", None))
    seed = getattr(args, "seed", 0)
    cases, unknown = _select(build_cases(backend, dtype, seed), getattr(args, "ops", None))
    if unknown:  # a user error: `minivit: error: ...`, exit status 2 (minivit/cli.py)
        known = sorted({c.op for c in build_cases(backend, dtype, seed)})
        raise ValueError(
            f"unknown op(s) for --ops: {', '.join(unknown)}; known ops: {', '.join(known)} "
            "(or a case's name, as `minivit gradcheck --list` prints it)"
        )
    if getattr(args, "list", False):
        for c in cases:
            print(f"{c.name:40s} {c.shapes()}")
        return 0

    full = not getattr(args, "no_full", False)
    print(
        f"gradcheck on {backend.name}, {dtype}, eps={eps:g}, rtol={rtol:g}, seed={seed}"
        f" ({'directional + elementwise' if full else 'directional only'})"
    )
    results = []
    table = [("op", "shapes", "directional", "elementwise", "max rel err", "result")]
    for case in cases:
        r = run_case(
            case,
            eps=eps,
            rtol=rtol,
            n_directions=getattr(args, "directions", 3),
            full=full,
            seed=seed,
        )
        results.append(r)
        table.append(
            (
                case.name,
                case.shapes(),
                _fmt_err(r.directional),
                _fmt_err(r.full),
                "-" if (r.error or r.case.skip) else f"{r.max_rel_err:.1e}",
                _result_word(r),
            )
        )
    print(gc.format_table(table))
    if not getattr(args, "ops", None):
        for op, why in NOT_CHECKED.items():
            print(f"not checked: {op}: {why}")
        missing = uncovered_ops(cases)
        if missing:
            print(
                f"WARNING: no gradcheck case for: {', '.join(missing)} (add one in gradcheck_cli)"
            )

    failed = [r for r in results if not r.passed]
    for r in results:
        if r.case.skip or (r.passed and not getattr(args, "verbose", False)):
            continue
        print()
        if r.error:
            print(f"{r.case.name}: {r.error}")
            continue
        for rep in (r.directional, r.full):
            if rep is not None:
                print(rep)
    skipped = [r for r in results if r.case.skip]
    print()
    print(
        f"{len(results) - len(failed) - len(skipped)}/{len(results) - len(skipped)} cases passed"
        + (f", {len(skipped)} skipped" if skipped else "")
        + (f"; FAILED: {', '.join(r.case.name for r in failed)}" if failed else "")
    )
    return 1 if failed else 0
