"""One code path for NumPy and CuPy.

Everything that computes (ops, blocks, models, the optimizer) reaches its array library only
through this module, in the style of Chainer's ``chainer.backend``::

    xp = array_module(x)          # numpy or cupy, whichever x lives in
    y = xp.exp(x - x.max(axis=-1, keepdims=True))

A :class:`Backend` bundles the array module with the few things that differ between the two
libraries: how to move data to the host, how to wait for the device, where ``erf`` lives and how
to make a seeded random generator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy

__all__ = [
    "Backend",
    "BackendUnavailable",
    "array_module",
    "backend_of",
    "require_array",
    "erf",
    "get_backend",
    "available_backends",
]

BACKEND_NAMES = ("numpy", "cupy")


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for but cannot run here (no CuPy, or no CUDA device)."""


@dataclass(frozen=True)
class Backend:
    """An array library plus the handful of operations that differ between libraries.

    Attributes:
        name: ``"numpy"`` or ``"cupy"``.
        xp: the array module itself.
    """

    name: str
    xp: ModuleType
    _erf: Any = field(repr=False, compare=False)

    def asarray(self, a, dtype=None):
        """Put ``a`` (array, list or scalar, from either backend) on this backend."""
        if self.name == "numpy" and _is_cupy_array(a):
            a = a.get()
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a) -> numpy.ndarray:
        """Return ``a`` as a host ``numpy.ndarray`` (a copy from the device for CuPy)."""
        if _is_cupy_array(a):
            return a.get()
        return numpy.asarray(a)

    def host_values(self, *values) -> list:
        """Device scalars (0-d arrays, e.g. reductions) -> Python numbers, read in one transfer.

        On a GPU each read of device data waits for all queued work; reading several values
        at once waits once. On NumPy it is ``[v.item() for v in values]``."""
        if not values:
            return []
        # Each value's bytes, end to end, in one array: one copy to the host, and every value
        # comes back with its own dtype (stacking would promote int64 and uint64 to float64).
        xp = self.xp
        raw = self.to_numpy(
            xp.concatenate([xp.ascontiguousarray(v).reshape(1).view(xp.uint8) for v in values])
        )
        out, i = [], 0
        for v in values:
            out.append(raw[i : i + v.dtype.itemsize].view(v.dtype)[0].item())
            i += v.dtype.itemsize
        return out

    def synchronize(self) -> None:
        """Block until all queued device work has finished (a no-op on the CPU)."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def erf(self, x):
        """The error function, elementwise, keeping ``x``'s dtype."""
        return self._erf(x)

    def scatter_add(self, a, indices, values) -> None:
        """In place ``a[indices] += values`` where repeated indices add up (``numpy.add.at``)."""
        if self.name == "numpy":
            numpy.add.at(a, indices, values)
        else:
            import cupyx

            cupyx.scatter_add(a, indices, values)

    def rng(self, seed=None):
        """A seeded random generator living on this backend (``xp.random.default_rng``).

        It supports ``random(shape, dtype=...)``, ``standard_normal(shape, dtype=...)`` and
        ``integers(...)`` on both backends.
        """
        return self.xp.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


_CACHE: dict[str, Backend] = {}


def _make_numpy() -> Backend:
    import scipy.special

    return Backend("numpy", numpy, scipy.special.erf)


def _make_cupy() -> Backend:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        raise BackendUnavailable(
            f"backend 'cupy' needs CuPy, which could not be imported ({exc}). "
            "Install it with `pip install minivit[gpu]` (cupy-cuda12x), or `minivit[gpu-cuda13]` "
            "(cupy-cuda13x) for CUDA 13, on a machine with CUDA."
        ) from exc
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendUnavailable(
            f"backend 'cupy': CuPy is installed but no CUDA device could be queried ({exc})."
        ) from exc
    if n < 1:
        raise BackendUnavailable("backend 'cupy': CuPy is installed but no CUDA device was found.")
    import cupyx.scipy.special

    return Backend("cupy", cupy, cupyx.scipy.special.erf)


def env_backend_name() -> str | None:
    """The backend that ``$MINIVIT_BACKEND`` names (any case), or None when it is unset or
    empty. Every command's default backend, and ``get_backend(None)``'s, comes from here. Raises
    ``ValueError`` naming the variable when it names no backend (it is not checked that the
    backend can run here: ``get_backend`` says that)."""
    env = os.environ.get("MINIVIT_BACKEND")
    if not env:
        return None
    if env.lower() not in BACKEND_NAMES:
        raise ValueError(f"$MINIVIT_BACKEND must be one of {BACKEND_NAMES}, got {env!r}")
    return env.lower()


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name`` (``"numpy"`` or ``"cupy"``).

    ``None`` reads the environment variable ``MINIVIT_BACKEND`` (:func:`env_backend_name`;
    default ``"numpy"``). A
    :class:`Backend` passed in is returned unchanged. Raises :class:`BackendUnavailable` when
    CuPy or a CUDA device is missing, and ``ValueError`` for an unknown name.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = env_backend_name() or "numpy"
    name = str(name).lower()
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name not in _CACHE:
        _CACHE[name] = _make_numpy() if name == "numpy" else _make_cupy()
    return _CACHE[name]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    names = []
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def _is_cupy_array(a) -> bool:
    # Checked by type name so that NumPy-only machines never import cupy.
    t = type(a)
    return t.__module__.startswith("cupy") and t.__name__ == "ndarray"


def _library_of(a) -> str | None:
    if isinstance(a, numpy.ndarray) or isinstance(a, numpy.generic):
        return "numpy"
    if _is_cupy_array(a):
        return "cupy"
    return None


def require_array(name: str, a):
    """``a`` itself when it is a NumPy or CuPy array (or NumPy scalar); else a TypeError that
    says what ``a`` is, and for a torch tensor how to convert it."""
    if _library_of(a) is None:
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type_name(a)}")
    return a


def type_name(a) -> str:
    """``a``'s type by its qualified name, and for a torch tensor how to convert it."""
    t = type(a)
    what = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"
    hint = " (convert it with .detach().cpu().numpy())" if t.__module__.startswith("torch") else ""
    return what + hint


def backend_of(*arrays) -> Backend:
    """The :class:`Backend` that the arrays live in (``None`` entries and scalars are skipped).

    Arrays from two backends together raise ``TypeError`` naming both. With no arrays at all,
    the NumPy backend is returned.
    """
    found: dict[str, int] = {}
    for i, a in enumerate(arrays):
        lib = _library_of(a)
        if lib is not None and lib not in found:
            found[lib] = i
    if len(found) > 1:
        raise TypeError(
            "arrays from two backends were mixed: argument "
            f"{found['numpy']} is a numpy.ndarray and argument {found['cupy']} is a "
            "cupy.ndarray; move them to one backend first (Backend.asarray)"
        )
    return get_backend(next(iter(found), "numpy"))


def contiguous_on(name: str, *arrays) -> bool:
    """True when every array (``None`` entries skipped) is a C-contiguous array of backend
    ``name``: what the CPU fast paths and the fused CuPy kernels need to take over."""
    return all(a is None or (_library_of(a) == name and a.flags.c_contiguous) for a in arrays)


# The minivit environment settings read at import that name nothing minivit knows: env ->
# (what is wrong, what the library does instead). Every `minivit` command refuses them
# (settings_problems); a program of one's own is warned once, when it builds its first model.
_PROBLEMS: dict[str, tuple[str, str]] = {}
_WARNED: set[str] = set()


def setting_problem(env: str, wrong: str, instead: str) -> None:
    """Record an environment setting that names nothing minivit knows (:data:`_PROBLEMS`)."""
    _PROBLEMS[env] = (wrong, instead)


def settings_problems() -> list[str]:
    """Every minivit environment setting that names nothing minivit knows (``$MINIVIT_BACKEND``
    included), one message each; empty when all are understood."""
    problems = [wrong for wrong, _ in _PROBLEMS.values()]
    _WARNED.update(_PROBLEMS)  # (said now: no warning later)
    try:
        env_backend_name()
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def warn_settings_once() -> None:
    """A RuntimeWarning for each misspelt setting not yet reported (models call this when they
    are built: the library goes on with the default the warning names)."""
    import warnings

    for env, (wrong, instead) in _PROBLEMS.items():
        if env not in _WARNED:
            _WARNED.add(env)
            warnings.warn(f"{wrong}: {instead}", RuntimeWarning, stacklevel=4)


class Switch:
    """An on/off setting of an optimised path, on unless the environment variable ``env`` is
    "0", "false", "no" or "off" (``MINIVIT_FAST``, ``MINIVIT_KERNELS``); ``set`` changes it.
    ``names`` are the other values it understands (``MINIVIT_SHARD``: where the shards run); any
    other value is a :func:`setting_problem`, and the switch stays on."""

    OFF = ("0", "false", "no", "off")  # the values that turn a switch off
    ON = ("", "1", "true", "yes", "on")

    def __init__(self, env: str, names: tuple = ()):
        self.raw = os.environ.get(env, "1").strip().lower()  # the text, for richer settings
        self.on = self.raw not in self.OFF
        if self.raw not in self.OFF + self.ON + tuple(names):
            known = ", ".join(repr(v) for v in (*self.OFF, *self.ON[1:], *names))
            setting_problem(env, f"${env}={self.raw!r} is not one of {known}", "read as '1'")

    def set(self, flag: bool) -> bool:
        """Turn the path on or off; returns the previous setting."""
        prev, self.on = self.on, bool(flag)
        return prev


def array_module(*arrays) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) that the arrays live in.

    Mixing arrays from two backends raises ``TypeError`` naming both.
    """
    return backend_of(*arrays).xp


def erf(x):
    """The error function on whichever backend ``x`` lives in."""
    return backend_of(x).erf(x)
