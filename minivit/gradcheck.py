"""Numerical gradient checks for hand-written backward passes.

Used by the test suite and by ``minivit gradcheck``. Everything here works on NumPy and CuPy
arrays: perturbations are made on the array's own backend, only scalars come back to the host.
The methodology (why float64, why central differences, the step size, directional versus
elementwise checks, the error measure) is explained in ``docs/gradcheck.md``.

Three levels, cheapest first::

    check_backward(fwd, bwd, inputs)        # directional derivatives, any input size
    check_backward_full(fwd, bwd, inputs)   # every gradient entry, small inputs
    check_jacobian(fwd, bwd, inputs)        # the whole Jacobian, tiny inputs

``fwd(*inputs, **kwargs)`` returns ``(out, cache)`` and ``bwd(dout, cache)`` returns the grads
tuple, exactly as every op in ``minivit.ops`` does, so an op is checked with::

    check_backward(ops.linear_forward, ops.linear_backward, (x, w, b)).assert_ok()

Error measure (the same everywhere): for an analytic value ``a`` and a numerical value ``n``::

    abs_err = |a - n|
    rel_err = |a - n| / max(|a|, |n|, atol / rtol)

and a check passes when ``rel_err <= rtol``, that is ``|a - n| <= max(rtol * max(|a|, |n|), atol)``.
``atol`` is the noise floor of the finite difference; by default it is estimated from the size of
the function being differentiated (see ``_auto_atol``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import backend_of

__all__ = [
    "GradcheckRow",
    "GradcheckReport",
    "numerical_grad",
    "numerical_jacobian",
    "analytic_jacobian",
    "check_backward",
    "check_backward_full",
    "check_jacobian",
    "check_model_directional",
    "grad_slots",
    "random_like",
    "host_rng",
    "format_table",
    "step_and_rtol",
    "DEFAULTS",
]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class GradcheckRow:
    """The result for one checked input (or one parameter, or the whole model)."""

    name: str
    shape: tuple
    max_abs_err: float
    max_rel_err: float
    passed: bool
    atol: float = 0.0
    n_compared: int = 0
    worst: str = ""  # where the largest relative error was: an index or a direction
    note: str = ""  # why a row failed without numbers (None grad, wrong shape, NaN)


@dataclass
class GradcheckReport:
    """Per-input results of one gradient check, with a readable table.

    ``passed`` is true when every row passed. ``str(report)`` is a table; ``assert_ok()`` raises
    ``AssertionError`` carrying that table when any row failed.
    """

    method: str
    rows: list[GradcheckRow] = field(default_factory=list)
    rtol: float = 1e-6
    title: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def max_rel_err(self) -> float:
        return max((r.max_rel_err for r in self.rows), default=math.nan)

    @property
    def max_abs_err(self) -> float:
        return max((r.max_abs_err for r in self.rows), default=math.nan)

    def worst_row(self) -> GradcheckRow | None:
        """The row with the largest relative error (a failing row first)."""
        if not self.rows:
            return None
        return max(self.rows, key=lambda r: (not r.passed, _nan_big(r.max_rel_err)))

    def __str__(self) -> str:
        head = f"{self.method} gradient check"
        if self.title:
            head += f" of {self.title}"
        head += f" (rtol={self.rtol:.0e}): {'PASS' if self.passed else 'FAIL'}"
        table = [("input", "shape", "max abs err", "max rel err", "atol", "worst at", "result")]
        for r in self.rows:
            table.append(
                (
                    r.name,
                    "x".join(str(s) for s in r.shape) or "scalar",
                    f"{r.max_abs_err:.2e}",
                    f"{r.max_rel_err:.2e}",
                    f"{r.atol:.1e}",
                    r.worst,
                    ("ok" if r.passed else "FAIL") + (f" ({r.note})" if r.note else ""),
                )
            )
        if len(table) == 1:
            return head + "\n  (nothing was checked)"
        return head + "\n" + format_table(table, indent="  ")

    def assert_ok(self) -> GradcheckReport:
        """Raise ``AssertionError`` with the table unless every row passed; return self."""
        if not self.passed:
            raise AssertionError("\n" + str(self))
        return self


def format_table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned plain-text columns; the first row is the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _nan_big(x: float) -> float:
    return math.inf if math.isnan(x) else x


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _is_array(a) -> bool:
    return hasattr(a, "dtype") and hasattr(a, "shape") and hasattr(a, "ndim")


def _is_float_array(a) -> bool:
    return _is_array(a) and a.dtype.kind == "f"


def _scalar(v) -> float:
    """A Python float from a scalar, a 0-d array or a size-1 array of either backend."""
    if _is_array(v):
        if v.size != 1:
            raise ValueError(f"expected a scalar, got an array of shape {tuple(v.shape)}")
        v = v.reshape(())
    return float(v)


def _host(a) -> np.ndarray:
    return backend_of(a).to_numpy(a)


def _unit_roundoff(dtype) -> float:
    return float(np.finfo(np.dtype(dtype)).eps)  # (CuPy's dtypes are NumPy's)


def host_rng(seed) -> np.random.Generator:
    """A seeded host generator, for making test data that is the same on every backend."""
    return np.random.default_rng(seed)


def random_like(a, seed: int | np.random.Generator, dtype=None):
    """Standard-normal values with ``a``'s shape on ``a``'s backend (drawn on the host).

    Drawing on the host with NumPy makes the same seed give the same numbers on every backend.
    """
    gen = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    host = gen.standard_normal(tuple(a.shape))
    return backend_of(a).asarray(host, dtype=dtype or a.dtype)


def grad_slots(inputs: Sequence[Any]) -> dict[int, int]:
    """Map each floating input's index to its position in the op's grads tuple.

    The API.md convention: the grads tuple has one entry per floating array parameter of the
    forward, in signature order, ``None`` for an optional input left as ``None``. So the slots are
    counted over the inputs that are floating arrays or ``None``; integer and boolean arrays (ids,
    targets, masks) and non-array options (``num_heads``, ``p``, an rng) take no slot. A ``None``
    given for a boolean optional (``key_mask=None``) is counted too, which is harmless as long as
    it comes after the floating inputs, as in every op of API.md.
    """
    slots: dict[int, int] = {}
    pos = 0
    for i, a in enumerate(inputs):
        if a is None:
            pos += 1
        elif _is_float_array(a):
            slots[i] = pos
            pos += 1
    return slots


def _resolve_indices(inputs, grad_indices) -> dict[int, int]:
    """input index -> grads-tuple position for the inputs to check."""
    slots = grad_slots(inputs)
    if grad_indices is None:
        return slots
    if isinstance(grad_indices, Mapping):
        out = {int(k): int(v) for k, v in grad_indices.items()}
    else:
        out = {}
        for i in grad_indices:
            if i not in slots:
                raise ValueError(
                    f"grad_indices: inputs[{i}] is not a floating array "
                    f"(got {type(inputs[i]).__name__}), so it has no gradient"
                )
            out[int(i)] = slots[i]
    for i in out:
        if not _is_float_array(inputs[i]):
            raise ValueError(f"grad_indices: inputs[{i}] is not a floating array")
    return out


def _input_names(forward, inputs, names) -> list[str]:
    if names is not None:
        names = list(names)
        if len(names) != len(inputs):
            raise ValueError(f"names has {len(names)} entries but there are {len(inputs)} inputs")
        return names
    try:
        params = [
            p.name
            for p in inspect.signature(forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"inputs[{i}]" for i in range(len(inputs))]


def _call(forward, args, kwargs):
    res = forward(*args, **kwargs)
    if not (isinstance(res, tuple) and len(res) == 2):
        raise TypeError("forward must return (out, cache), as every op's *_forward does")
    return res


def _same(a, saved) -> bool:
    """Whether array ``a`` still holds the host copy ``saved`` (NaN equal to NaN)."""
    return bool(np.array_equal(_host(a), saved, equal_nan=saved.dtype.kind == "f"))


def _inner(out, dout) -> float:
    """<out, dout> accumulated in float64 (the scalar whose derivative is checked)."""
    xp = backend_of(out).xp
    return float((out.astype(xp.float64) * dout.astype(xp.float64)).sum())


def _abs_inner(out, dout) -> float:
    xp = backend_of(out).xp
    return float((xp.abs(out.astype(xp.float64)) * xp.abs(dout.astype(xp.float64))).sum())


# The step and relative tolerance of a check, by the dtype of the inputs checked, when not given
# (docs/gradcheck.md, "Choosing eps"). float64 resolves a derivative to about 1e-10; float32 to
# 2e-5 at best, so its check is coarse: a smoke test of the float32 code, not a proof.
DEFAULTS = {"float64": {"eps": 1e-6, "rtol": 1e-6}, "float32": {"eps": 3e-3, "rtol": 2e-2}}


def step_and_rtol(dtypes, eps=None, rtol=None) -> tuple[float, float]:
    """``(eps, rtol)`` for inputs of ``dtypes``: the values given, else :data:`DEFAULTS` for the
    least precise of them.

    A step below ``sqrt(u)`` (``u`` the unit roundoff of that dtype) is refused. There the
    rounding of the two function values, about ``u S / eps`` on the derivative (``S`` their
    size), outgrows the derivative itself, and the noise floor that absorbs it lets any
    gradient pass: in float32 with ``eps = 1e-6`` a sign error in a weight's gradient passed.
    """
    names = {np.dtype(d).name for d in dtypes} or {"float64"}
    least = max(names, key=lambda n: _unit_roundoff(n))
    defaults = DEFAULTS.get(least, DEFAULTS["float32"])
    eps = defaults["eps"] if eps is None else float(eps)
    rtol = defaults["rtol"] if rtol is None else float(rtol)
    floor = math.sqrt(_unit_roundoff(least))
    if not (math.isfinite(eps) and eps >= floor):
        raise ValueError(
            f"eps={eps:g} is below what {least} inputs can resolve (sqrt(u) = {floor:.1e}): the "
            f"rounding of the finite differences would hide any error in the gradient. Use "
            f"eps >= {floor:.1e} (the default for {least}: {defaults['eps']:g}), or float64 inputs"
        )
    if not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a finite number above 0, got {rtol}")
    return eps, rtol


def _auto_atol(scale: float, eps: float, dtype, factor: float = 16.0) -> float:
    """Noise floor of a central difference: ``factor * u * scale / eps``.

    ``scale`` bounds the size of the function values being subtracted (for <out, dout> it is
    sum |out| |dout|); rounding them costs about ``u * scale`` each, and dividing by ``2 eps``
    turns that into ``u * scale / eps`` on the derivative. ``factor`` leaves room for rounding
    inside the forward itself. A tiny absolute floor keeps the ratio defined when all is zero.
    """
    return max(factor * _unit_roundoff(dtype) * scale / eps, 1e-300)


def _compare(analytic, numeric, rtol: float, atol: float):
    """(max abs err, max rel err, flat index of the worst entry) on host float64 arrays."""
    a = np.asarray(analytic, dtype=np.float64).ravel()
    n = np.asarray(numeric, dtype=np.float64).ravel()
    if a.size == 0:
        return 0.0, 0.0, -1
    diff = np.abs(a - n)
    denom = np.maximum(np.maximum(np.abs(a), np.abs(n)), atol / rtol)
    rel = diff / denom
    bad = ~np.isfinite(rel)
    if bad.any():  # a NaN or inf anywhere is a failure, reported as an infinite error
        k = int(np.flatnonzero(bad)[0])
        return math.inf, math.inf, k
    k = int(np.argmax(rel))
    return float(diff.max()), float(rel[k]), k


def _fmt_index(shape, flat: int) -> str:
    if flat < 0:
        return ""
    if not shape:
        return "()"
    return str(tuple(int(i) for i in np.unravel_index(flat, shape)))


def _prepare_dout(out, dout, seed):
    if dout is None:
        if not _is_float_array(out):
            raise TypeError("forward's output must be a floating array")
        return random_like(out, np.random.default_rng([seed, 1]))
    if tuple(dout.shape) != tuple(out.shape):
        raise ValueError(
            f"dout must have the output's shape {tuple(out.shape)}, got {tuple(dout.shape)}"
        )
    return dout


def _check_grad_entry(grads, pos, x, name) -> str:
    """Why grads[pos] cannot be compared with x ('' when it can)."""
    if not isinstance(grads, tuple):
        return f"backward returned {type(grads).__name__}, not a tuple"
    if pos >= len(grads):
        return f"grads has {len(grads)} entries, none at position {pos} for {name}"
    g = grads[pos]
    if g is None:
        return "backward gave None"
    if not _is_array(g):
        return f"backward gave {type(g).__name__}"
    if tuple(g.shape) != tuple(x.shape):
        return f"grad shape {tuple(g.shape)} != input shape {tuple(x.shape)}"
    if g.dtype != x.dtype:
        return f"grad dtype {g.dtype} != input dtype {x.dtype}"
    return ""


def _failed_row(name, x, note) -> GradcheckRow:
    return GradcheckRow(name, tuple(x.shape), math.inf, math.inf, False, note=note)


# --------------------------------------------------------------------------------------------
# Numerical derivatives
# --------------------------------------------------------------------------------------------


def numerical_grad(f: Callable[..., Any], inputs: Sequence[Any], index: int, eps: float = 1e-6):
    """Central-difference gradient of the scalar ``f(*inputs)`` with respect to ``inputs[index]``.

    Each entry is ``(f(x + h e_j) - f(x - h e_j)) / (x_j+ - x_j-)`` where the denominator is the
    distance between the two perturbed values as actually stored (not ``2 eps``), which removes
    the rounding of ``x_j +- eps`` from the estimate. The perturbation is made in place on a
    private copy of ``inputs[index]`` on its own backend; the caller's arrays are not touched.

    Returns a float64 array of ``inputs[index]``'s shape on its backend. One pair of ``f`` calls
    per entry, so keep the input small. Use float64 inputs: in float32 the rounding of ``f``
    swamps any step small enough to be accurate.
    """
    x0 = inputs[index]
    if not _is_float_array(x0):
        raise TypeError(f"inputs[{index}] must be a floating array, got {type(x0).__name__}")
    be = backend_of(x0)
    x = x0.copy()
    flat = x.reshape(-1)  # a view of the private copy: writes perturb x
    args = list(inputs)
    args[index] = x
    host = np.empty(flat.size, dtype=np.float64)
    for j in range(flat.size):
        orig = flat[j].copy()
        flat[j] = orig + eps
        xp_ = float(flat[j])
        fp = _scalar(f(*args))
        flat[j] = orig - eps
        xm_ = float(flat[j])
        fm = _scalar(f(*args))
        flat[j] = orig
        host[j] = (fp - fm) / (xp_ - xm_)
    return be.asarray(host.reshape(x0.shape), dtype=be.xp.float64)


def numerical_jacobian(f: Callable[..., Any], inputs: Sequence[Any], index: int, eps=1e-6):
    """Central-difference Jacobian of the array-valued ``f(*inputs)`` w.r.t. ``inputs[index]``.

    Returns a host float64 array of shape ``(out.size, x.size)``: column j is
    ``d out.ravel() / d x.ravel()[j]``. For tiny inputs only.
    """
    x0 = inputs[index]
    if not _is_float_array(x0):
        raise TypeError(f"inputs[{index}] must be a floating array, got {type(x0).__name__}")
    x = x0.copy()
    flat = x.reshape(-1)
    args = list(inputs)
    args[index] = x
    cols = []
    for j in range(flat.size):
        orig = flat[j].copy()
        flat[j] = orig + eps
        xp_ = float(flat[j])
        op = _host(f(*args)).astype(np.float64).ravel()
        flat[j] = orig - eps
        xm_ = float(flat[j])
        om = _host(f(*args)).astype(np.float64).ravel()
        flat[j] = orig
        cols.append((op - om) / (xp_ - xm_))
    return np.stack(cols, axis=1) if cols else np.zeros((0, 0))


def analytic_jacobian(
    forward,
    backward,
    inputs,
    index: int,
    grad_pos: int | None = None,
    *,
    kwargs: Mapping[str, Any] | None = None,
):
    """The Jacobian ``d out / d inputs[index]`` assembled from backward, one row per output entry.

    Row k is the grad that backward returns for the unit ``dout = e_k`` (``grads[grad_pos]``,
    by default the slot that ``grad_slots`` gives ``inputs[index]``). Returns a host float64
    array of shape ``(out.size, x.size)``.
    """
    kwargs = dict(kwargs or {})
    if grad_pos is None:
        grad_pos = grad_slots(inputs)[index]
    out, cache = _call(forward, list(inputs), kwargs)
    be = backend_of(out)
    rows = []
    for k in range(int(out.size)):
        e = np.zeros(int(out.size))
        e[k] = 1.0
        dout = be.asarray(e.reshape(out.shape), dtype=out.dtype)
        grads = backward(dout, cache)
        rows.append(_host(grads[grad_pos]).astype(np.float64).ravel())
    return np.stack(rows, axis=0)


# --------------------------------------------------------------------------------------------
# Op checks
# --------------------------------------------------------------------------------------------


def check_backward(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    dout=None,
    grad_indices: Sequence[int] | Mapping[int, int] | None = None,
    n_directions: int = 3,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    kwargs: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    joint: bool = False,
) -> GradcheckReport:
    """Directional-derivative check of ``backward`` (Chainer's ``check_backward`` method).

    With ``L(x) = <forward(x)[0], dout>`` (``dout`` random normal unless given), for each checked
    input ``x_i`` and each of ``n_directions`` random unit directions ``v``::

        numeric  = (L(x_i + eps v) - L(x_i - eps v)) / (2 eps)
        analytic = <grads[slot(i)], v>

    One row per checked input, so a failure says which input is wrong. Two forward calls per
    direction and input, whatever the input size. It also fails (with a note) when forward or
    backward modifies an input (the note names the pass) or backward modifies ``dout``. With
    ``joint=True`` one more row,
    ``(all inputs)``, perturbs every checked input at once along one unit direction and compares
    with ``sum_i <grads[slot(i)], v_i>``: exactly Chainer's check.

    Args:
        forward: ``forward(*inputs, **kwargs) -> (out, cache)``.
        backward: ``backward(dout, cache) -> grads`` (a tuple).
        inputs: positional inputs; non-floating ones (ids, masks, ints, None) are passed as is.
        grad_indices: which inputs to check. ``None``: every floating input, its grad found by
            the API.md slot rule (``grad_slots``). A sequence of input indices: those, same rule.
            A mapping ``{input index: grads position}``: explicit.
        atol: the absolute noise floor; ``None`` estimates it from sum |out| |dout| (see the
            module docstring and ``docs/gradcheck.md``).
        names: a name per input for the report (default: forward's parameter names).
    """
    kwargs = dict(kwargs or {})
    inputs = list(inputs)
    idx = _resolve_indices(inputs, grad_indices)
    eps, rtol = step_and_rtol([inputs[i].dtype for i in idx], eps, rtol)
    labels = _input_names(forward, inputs, names)
    before = {i: _host(a).copy() for i, a in enumerate(inputs) if _is_array(a)}
    out, cache = _call(forward, inputs, kwargs)
    # The contract of every op: forward and backward leave the inputs alone, backward dout.
    changed = {i: "forward" for i, a in before.items() if not _same(inputs[i], a)}
    dout = _prepare_dout(out, dout, seed)
    dout_before = _host(dout).copy()
    grads = backward(dout, cache)
    changed.update(
        (i, "backward") for i, a in before.items() if i not in changed and not _same(inputs[i], a)
    )
    scale = _abs_inner(out, dout)
    report = GradcheckReport("directional", rtol=rtol, title=title)
    for i, who in changed.items():
        report.rows.append(_failed_row(labels[i], inputs[i], f"{who} modified this input"))
    if not _same(dout, dout_before):
        report.rows.append(_failed_row("dout", dout, "backward modified dout"))
    gen = np.random.default_rng([seed, 2])

    def directional(group: list[int], label: str, shape: tuple) -> GradcheckRow:
        # One unit direction over all inputs in the group together.
        tol = atol if atol is not None else _auto_atol(scale, eps, inputs[group[0]].dtype)
        numeric, analytic = [], []
        for _ in range(n_directions):
            v = {i: random_like(inputs[i], gen) for i in group}
            norm = math.sqrt(sum(_inner(v[i], v[i]) for i in group)) or 1.0
            v = {i: v[i] / norm for i in group}
            plus, minus = list(inputs), list(inputs)
            for i in group:
                plus[i] = inputs[i] + eps * v[i]
                minus[i] = inputs[i] - eps * v[i]
            lp = _inner(_call(forward, plus, kwargs)[0], dout)
            lm = _inner(_call(forward, minus, kwargs)[0], dout)
            numeric.append((lp - lm) / (2 * eps))
            analytic.append(sum(_inner(grads[idx[i]], v[i]) for i in group))
        ae, re, k = _compare(analytic, numeric, rtol, tol)
        worst = f"dir {k}" if k >= 0 else ""
        return GradcheckRow(label, shape, ae, re, re <= rtol, tol, n_directions, worst)

    valid = []
    for i, pos in idx.items():
        why = _check_grad_entry(grads, pos, inputs[i], labels[i])
        if why:
            report.rows.append(_failed_row(labels[i], inputs[i], why))
            continue
        valid.append(i)
        report.rows.append(directional([i], labels[i], tuple(inputs[i].shape)))
    if joint and len(valid) > 1:
        total = sum(int(inputs[i].size) for i in valid)
        report.rows.append(directional(valid, "(all inputs)", (total,)))
    return report


def check_backward_full(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    dout=None,
    grad_indices: Sequence[int] | Mapping[int, int] | None = None,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    kwargs: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
) -> GradcheckReport:
    """Elementwise check: every gradient entry against its central difference.

    With ``L(x) = <forward(x)[0], dout>``, compares ``grads[slot(i)]`` with
    ``numerical_grad(L, inputs, i)`` entry by entry and reports, per input, the largest absolute
    and relative errors and the index of the worst entry. Costs two forward calls per input
    entry: for small inputs. Arguments as in :func:`check_backward`.
    """
    kwargs = dict(kwargs or {})
    inputs = list(inputs)
    idx = _resolve_indices(inputs, grad_indices)
    eps, rtol = step_and_rtol([inputs[i].dtype for i in idx], eps, rtol)
    labels = _input_names(forward, inputs, names)
    out, cache = _call(forward, inputs, kwargs)
    dout = _prepare_dout(out, dout, seed)
    grads = backward(dout, cache)
    scale = _abs_inner(out, dout)

    def loss(*args):
        return _inner(_call(forward, list(args), kwargs)[0], dout)

    report = GradcheckReport("elementwise", rtol=rtol, title=title)
    for i, pos in idx.items():
        x = inputs[i]
        why = _check_grad_entry(grads, pos, x, labels[i])
        if why:
            report.rows.append(_failed_row(labels[i], x, why))
            continue
        tol = atol if atol is not None else _auto_atol(scale, eps, x.dtype)
        num = numerical_grad(loss, inputs, i, eps)
        ae, re, k = _compare(_host(grads[pos]), _host(num), rtol, tol)
        report.rows.append(
            GradcheckRow(
                labels[i],
                tuple(x.shape),
                ae,
                re,
                re <= rtol,
                tol,
                int(x.size),
                worst=_fmt_index(tuple(x.shape), k),
            )
        )
    return report


def check_jacobian(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    grad_indices: Sequence[int] | Mapping[int, int] | None = None,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    kwargs: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
) -> GradcheckReport:
    """Full-Jacobian check for tiny inputs.

    The numerical Jacobian of the vector-valued forward (one central difference per input entry)
    against the Jacobian assembled from backward with unit ``dout`` (one backward per output
    entry). This exercises every output entry separately, so an error that a weighted sum could
    hide (a wrong entry hit only by a particular ``dout``) still shows. ``worst at`` is
    ``(output index) <- (input index)``.
    """
    kwargs = dict(kwargs or {})
    inputs = list(inputs)
    idx = _resolve_indices(inputs, grad_indices)
    eps, rtol = step_and_rtol([inputs[i].dtype for i in idx], eps, rtol)
    labels = _input_names(forward, inputs, names)
    out, cache = _call(forward, inputs, kwargs)
    scale = float(np.abs(_host(out).astype(np.float64)).max()) if out.size else 0.0

    def fwd_out(*args):
        return _call(forward, list(args), kwargs)[0]

    report = GradcheckReport("jacobian", rtol=rtol, title=title)
    for i, pos in idx.items():
        x = inputs[i]
        probe = backward(backend_of(out).xp.zeros_like(out), cache)
        why = _check_grad_entry(probe, pos, x, labels[i])
        if why:
            report.rows.append(_failed_row(labels[i], x, why))
            continue
        tol = atol if atol is not None else _auto_atol(scale, eps, x.dtype)
        jn = numerical_jacobian(fwd_out, inputs, i, eps)
        ja = analytic_jacobian(forward, backward, inputs, i, pos, kwargs=kwargs)
        ae, re, k = _compare(ja, jn, rtol, tol)
        where = ""
        if k >= 0:
            ko, kx = np.unravel_index(k, ja.shape)
            where = (
                f"{_fmt_index(tuple(out.shape), int(ko))}<-{_fmt_index(tuple(x.shape), int(kx))}"
            )
        report.rows.append(
            GradcheckRow(labels[i], tuple(x.shape), ae, re, re <= rtol, tol, int(ja.size), where)
        )
    return report


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------


def check_model_directional(
    loss_fn: Callable[[], Any],
    params: Mapping[str, Any],
    grads: Mapping[str, Any],
    eps: float | None = None,
    *,
    names: Sequence[str] | None = None,
    n_directions: int = 2,
    per_parameter: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    title: str = "",
) -> GradcheckReport:
    """Directional-derivative check of a whole model's parameter gradients.

    ``loss_fn()`` recomputes the scalar loss from the current ``params`` (deterministically: no
    dropout, or a fixed-seed one); ``grads`` holds the analytic gradients of that loss (computed
    beforehand, at the unperturbed parameters). For a random direction ``v`` over all the
    parameters in ``names`` (default: every key of ``params``), normalized to unit length::

        numeric  = (L(p + eps v) - L(p - eps v)) / (2 eps)
        analytic = sum_name <grads[name], v[name]>

    The arrays in ``params`` are perturbed in place (so the model sees the change) and restored
    exactly from a saved copy afterwards, also when ``loss_fn`` raises.

    With ``per_parameter=True`` there is one row per parameter (only that parameter perturbed,
    two loss calls per parameter and direction), which says which parameter is wrong; otherwise
    one row, ``(all parameters)``. A checked parameter with no gradient in ``grads`` (absent,
    or None) is a failed row of its own, "no gradient", and the others are checked without it:
    a backward that forgets a parameter fails, where a direction over the rest would pass. (To
    leave out a parameter on purpose, a frozen one, leave it out of ``names``.)
    """
    keys = list(names) if names is not None else list(params)
    unknown = [k for k in keys if k not in params]
    if unknown:
        raise KeyError(f"no parameter named: {', '.join(unknown)}")
    no_grad = [_failed_row(k, params[k], "no gradient") for k in keys if grads.get(k) is None]
    keys = [k for k in keys if grads.get(k) is not None]
    for k in keys:
        if tuple(grads[k].shape) != tuple(params[k].shape):
            raise ValueError(
                f"grads[{k!r}] has shape {tuple(grads[k].shape)} but params[{k!r}] has "
                f"shape {tuple(params[k].shape)}"
            )
    eps, rtol = step_and_rtol([params[k].dtype for k in keys], eps, rtol)
    gen = np.random.default_rng([seed, 3])
    saved = {k: params[k].copy() for k in keys}
    l0 = _scalar(loss_fn())
    dtype = params[keys[0]].dtype if keys else np.float64

    def restore(group):
        for k in group:
            params[k][...] = saved[k]

    def one_row(group, label):
        tol = atol if atol is not None else _auto_atol(max(abs(l0), 1.0), eps, dtype, 256.0)
        numeric, analytic = [], []
        for _ in range(n_directions):
            v = {k: random_like(params[k], gen) for k in group}
            norm = math.sqrt(sum(float((v[k] * v[k]).sum()) for k in group)) or 1.0
            v = {k: v[k] / norm for k in group}
            try:
                for k in group:
                    params[k][...] = saved[k] + eps * v[k]
                lp = _scalar(loss_fn())
                for k in group:
                    params[k][...] = saved[k] - eps * v[k]
                lm = _scalar(loss_fn())
            finally:
                restore(group)
            numeric.append((lp - lm) / (2 * eps))
            analytic.append(sum(_inner(grads[k], v[k]) for k in group))
        ae, re, kk = _compare(analytic, numeric, rtol, tol)
        shape = (
            tuple(params[group[0]].shape)
            if len(group) == 1
            else (sum(int(params[k].size) for k in group),)
        )
        return GradcheckRow(label, shape, ae, re, re <= rtol, tol, n_directions, f"dir {kk}")

    report = GradcheckReport("model directional", rtol=rtol, title=title)
    report.rows.extend(no_grad)
    if per_parameter:
        for k in keys:
            report.rows.append(one_row([k], k))
    elif keys:
        report.rows.append(one_row(keys, "(all parameters)"))
    return report
