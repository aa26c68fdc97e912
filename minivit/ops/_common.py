"""What every op shares: the cache type, the gradient mode and the input checks.

Every backward checks its ``dout`` first, with :func:`check_dout`, whose docstring states the
rule: the forward output's backend, shape and dtype, exactly.

Checks raise ``TypeError`` for a wrong kind of value (not an array, wrong dtype, two backends) and
``ValueError`` for a wrong shape or value, and always name the argument, what was expected and
what was given. Integer and real options (``num_heads``, ``n_iters``, ``epsilon``:
:func:`check_count`, :func:`check_real`) keep the same rule, as the models' constructors do: a
bool or a string is a wrong kind (``TypeError``), a count of 0 a wrong value (``ValueError``).
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import threading
from types import SimpleNamespace

from ..backend import array_module, backend_of, require_array

__all__ = [
    "Cache",
    "grad_enabled",
    "no_grad",
    "set_grad_enabled",
    "check_grad_cache",
    "array_module",
    "backend_of",
    "check_float",
    "check_same_dtype",
    "check_shape",
    "check_int",
    "check_bool",
    "check_dout",
    "check_count",
    "as_index",
    "check_real",
    "result_dtype",
]


class Cache(SimpleNamespace):
    """What a forward keeps for its backward: a plain record with named fields.

    An op's backward reads a cache and never writes to it, so one cache can be replayed (as the
    gradient checks do). A model's backward consumes its forward's cache instead: it drops each
    block's part once used (``blocks.encoder_backward``), as torch's backward frees its graph.
    """


# ----------------------------------------------------------------------------------------------
# Gradient mode: whether a forward must keep what its backward needs
#
# Inference needs no backward. Under ``no_grad()`` a model's forward keeps no cache (each
# block's activations are freed as soon as the next block has read them, as under PyTorch's
# ``torch.no_grad()``), and an op may skip work that only its backward would use (GELU's
# derivative). A cache made under ``no_grad()`` is not valid for backward. The mode is per
# thread; the batch shards of a model's forward run in the mode of the thread that called it.

_grad = threading.local()


def grad_enabled() -> bool:
    """Whether forwards on this thread keep what backward needs (True unless in no_grad())."""
    return getattr(_grad, "enabled", True)


class set_grad_enabled:
    """Turn gradients on (``True``) or off for this thread, as ``torch.set_grad_enabled``.

    Called plainly it sets the mode; as ``with set_grad_enabled(flag):`` it sets the mode for
    the block and puts the previous one back after it, even after an exception.
    """

    def __init__(self, flag: bool):
        self._previous = grad_enabled()
        _grad.enabled = bool(flag)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _grad.enabled = self._previous
        return False


class no_grad(contextlib.ContextDecorator):
    """Inference without caches: ``with minivit.no_grad(): logits = model.forward(images)``,
    or ``@minivit.no_grad()`` on a function. Nests, and restores the mode after an exception."""

    def __init__(self):
        self._previous = []  # a stack: a decorated function may call itself

    def __enter__(self):
        self._previous.append(grad_enabled())
        _grad.enabled = False
        return self

    def __exit__(self, *exc):
        _grad.enabled = self._previous.pop()
        return False


def check_grad_cache(op: str, cache) -> None:
    """Refuse, with a clear error, a cache that a forward under no_grad() made."""
    if getattr(cache, "no_grad", False):
        raise RuntimeError(
            f"{op}: this cache comes from a forward under no_grad(), which keeps nothing for "
            "backward; run the forward with gradients on"
        )


def _describe(a) -> str:
    dtype = getattr(a, "dtype", None)
    shape = getattr(a, "shape", None)
    if dtype is None:
        return type(a).__name__
    return f"{type(a).__module__.split('.')[0]}.ndarray of dtype {dtype} and shape {tuple(shape)}"


def check_float(name: str, a, ndim_min: int = 0):
    """``a`` must be a float32/float64 array with at least ``ndim_min`` dims."""
    dtype = require_array(name, a).dtype  # (a torch tensor's dtype is not NumPy's)
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise TypeError(f"{name} must have dtype float32 or float64, got {dtype}")
    if a.ndim < ndim_min:
        raise ValueError(
            f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(a.shape)}"
        )
    return a


def check_int(name: str, a):
    """``a`` must be an integer array (ids, targets)."""
    dtype = require_array(name, a).dtype  # (a torch tensor's dtype is not NumPy's)
    if dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {_describe(a)}")
    return a


def check_bool(name: str, a):
    """``a`` must be a boolean array (masks)."""
    dtype = require_array(name, a).dtype  # (a torch tensor's dtype is not NumPy's)
    if dtype.kind != "b":
        raise TypeError(f"{name} must be a boolean array, got {_describe(a)}")
    return a


def check_same_dtype(**arrays):
    """All non-None arrays must share one floating dtype; returns it."""
    named = [(k, v) for k, v in arrays.items() if v is not None]
    first_name, first = named[0]
    for k, v in named[1:]:
        if v.dtype != first.dtype:
            raise TypeError(
                f"{k} has dtype {v.dtype} but {first_name} has dtype {first.dtype}; "
                "all floating inputs of an op must share one dtype"
            )
    return first.dtype


def check_shape(name: str, a, expected: tuple, what: str = ""):
    """``a.shape`` must equal ``expected`` (entries of ``None`` match any size)."""
    shape = tuple(a.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {exp}{extra}, got {shape}")
    return a


def check_dout(
    op: str, dout, shape: tuple, dtype, kind, name: str = "dout", scalar_ok: bool = False
) -> None:
    """Refuse, before any work, a ``dout`` that is not shaped like the forward's output.

    The rule (every ``<op>_backward``): ``dout`` is an array of the forward output's backend,
    shape and dtype, exactly. It is never broadcast and never cast, so each gradient keeps its
    input's dtype:

    - an array of the other backend (a NumPy ``dout`` for a CuPy forward, or the reverse), or
      something that is not an array at all, raises ``TypeError``;
    - another dtype (float64 for a float32 forward, or the reverse) raises ``TypeError`` naming
      both: cast ``dout`` first;
    - another shape raises ``ValueError`` naming the shape given and the output's.

    A NumPy scalar (``numpy.float32(1.0)``; ``numpy.float64`` included, although it subclasses
    ``float``) counts as a 0-d NumPy array: its dtype must match.

    ``scalar_ok``: the backwards of a scalar-valued op (``cross_entropy``'s loss, the OT
    distance and Sinkhorn value of one problem) also take a plain number for their 0-d output:
    a Python real (not a bool), which takes the output's dtype as in NumPy arithmetic, or a
    host scalar or 0-d host array of the output's dtype, on either backend (CuPy takes host
    scalars as plain numbers). Such a backward turns it into an array itself.

    ``shape`` is the output's shape (a tuple), ``dtype`` its dtype and ``kind`` the array type
    of the forward's backend (``type()`` of any array the cache holds); ``name`` is what the
    errors call the array (a buffer given for the gradient is checked the same way). Only the
    type, shape and dtype are compared (no pass over the data): about 0.2 us a call.
    """
    if type(dout) is not kind or dout.shape != shape or dout.dtype is not dtype:
        _check_dout_slowly(op, dout, shape, dtype, kind, name, scalar_ok)


def _library(t) -> str:
    """'numpy' or 'cupy': the top-level module of an array type (as ``_describe`` names it)."""
    return t.__module__.split(".")[0]


def _check_dout_slowly(op, dout, shape, dtype, kind, name, scalar_ok=False):
    """check_dout past its one-line fast test: accept what only looked different (an array
    subclass, an equal dtype that is another object, a plain number where ``scalar_ok``),
    refuse the rest with the error that says why."""
    d_dtype, d_shape = getattr(dout, "dtype", None), getattr(dout, "shape", None)
    python_real = isinstance(dout, numbers.Real) and d_dtype is None
    if isinstance(dout, bool) or python_real:
        if scalar_ok and shape == () and not isinstance(dout, bool):
            return
        raise TypeError(
            f"{op}: {name} must be an array of shape {shape} and dtype {dtype} (the forward's "
            f"output), got a Python {type(dout).__name__}"
        )
    if d_dtype is None or d_shape is None:
        raise TypeError(
            f"{op}: {name} must be a {_library(kind)}.ndarray of shape {shape} and dtype {dtype} "
            f"(the forward's output), got {_describe(dout)}"
        )
    # a NumPy scalar or 0-d host array goes to a scalar-valued op on either backend
    host_scalar = scalar_ok and shape == () and d_shape == () and _library(type(dout)) == "numpy"
    if not host_scalar and _library(type(dout)) != _library(kind):
        raise TypeError(
            f"{op}: {name} is a {_library(type(dout))} array but the forward ran on "
            f"{_library(kind)}; move it there first (Backend.asarray)"
        )
    if d_dtype != dtype:
        raise TypeError(
            f"{op}: {name} has dtype {d_dtype} but the forward's output has dtype {dtype}; "
            f"backward never casts (each gradient keeps its input's dtype): cast {name} first"
        )
    if tuple(d_shape) != shape:
        raise ValueError(
            f"{op}: {name} must have shape {shape} (the forward's output), got {tuple(d_shape)}"
        )


def as_index(value):
    """``value`` as a Python int when it is integral (an int, a NumPy integer, a 0-d integer
    array: whatever ``operator.index`` takes), else None. Bools are not integers here."""
    # NumPy's bool too: NumPy 2.4 refuses it in operator.index, but 2.0 only warns
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_count(name: str, value, minimum: int = 1) -> int:
    """An integer option (a size, a count: num_heads, patch_size, n_iters) >= ``minimum``,
    returned as a Python int. NumPy integers are accepted. As everywhere in minivit (the
    models' ``int_arg``), another type (a bool, a float, a string) raises ``TypeError`` and an
    integer below ``minimum`` ``ValueError``, each naming the option."""
    v = as_index(value)
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if v is None:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if v < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_real(name: str, value) -> float:
    """A real-valued option (epsilon, beta, tol) as a Python float: Python and NumPy ints and
    floats are accepted; bools, strings and arrays raise ``TypeError`` naming the option (the
    caller checks the range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def result_dtype(*arrays):
    """The dtype an op returns: that of its floating inputs (checked equal by the op)."""
    for a in arrays:
        if a is not None:
            return a.dtype
    raise ValueError("no array given")
