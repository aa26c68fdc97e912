"""A strict CPU stand-in for CuPy: minivit's ``cupy`` code paths, run where there is no GPU.

``pytest --cupy-stand-in`` (tests/conftest.py) calls :func:`install`, after which ``import
cupy`` and ``import cupyx`` give this module's stand-ins, and runs the ``cupy`` half of the
suite on them. The arrays compute with NumPy underneath, so the numbers prove nothing about a
GPU; what the run checks is the code around them, the part that a NumPy-only test never
executes and that fails on a device in ways unrelated to arithmetic. The stand-in is strict
where CuPy 14.2 is:

- **No implicit conversion to NumPy.** ``numpy.asarray(a)``, ``np.testing.assert_allclose(a,
  ...)`` and every other path through ``__array__`` raise ``TypeError``, as CuPy's arrays do;
  ``a.get()``, ``cupy.asnumpy(a)`` and ``Backend.to_numpy`` are the ways out.
- **No NumPy arrays inside device work.** CuPy's functions, ufuncs, operators and kernels
  refuse a ``numpy.ndarray`` argument ("Unsupported type"); Python and NumPy scalars pass.
  ``cupy.asarray``/``cupy.array`` copy host data over. Assignment follows CuPy: through an
  integer-array or mask index the value may be a NumPy array (copied over); through a basic
  index (slices, ``...``) it is a fill, which takes a scalar or a device array only.
- **Only CuPy's calls.** The module, ``ndarray``, ``random``, ``Generator``, ``linalg``, the
  ufuncs and ``cupyx`` have exactly the public names of CuPy 14.2, and every emulated function
  and method checks its arguments against CuPy's signature (both in ``tests/_cupy_names.py``,
  generated from the package): a NumPy-only name is an ``AttributeError``, a NumPy-only keyword
  (``sum(where=)``, ``sort(stable=)``) a ``TypeError``. Ufuncs take ``out``, ``dtype`` and
  ``casting`` only; ``reduce``/``accumulate`` exist for add and multiply, ``reduceat`` for
  add, ``at`` for add, subtract, maximum, minimum and the bitwise ones; NumPy's ufunc methods
  on device arrays other than a plain call fail. ``ndarray.flags`` has CuPy's three fields (no
  ``writeable``). One boolean mask per index, not a mask beside other arrays. ``cupy.where``
  wants a device array as its condition; ``Generator.integers`` int bounds. A CuPy name that
  this file does not emulate raises ``NotImplementedError`` when used.
- **Device scalars.** Reductions, integer indexing and ``allclose``/``array_equal`` give 0-d
  arrays, not Python or NumPy scalars; ``bool``, ``int``, ``float`` and ``.item()`` work on
  them, ``__index__`` does not (``range(cupy_scalar)`` fails on CuPy too).
- **NumPy functions on device arrays** dispatch to the stand-in (``__array_ufunc__``,
  ``__array_function__``), as CuPy's do, and fail for functions CuPy lacks.
- **Uninitialised memory**: ``empty`` and ``empty_like`` fill floats with NaN (integers with a
  byte pattern), so a result that reads memory it never wrote shows it.
- **Random numbers** come from a stream unlike NumPy's for the same seed, so a test that
  expects the two backends to draw alike fails here as it would on a GPU.
- **Kernels**: ``RawKernel`` and ``ElementwiseKernel`` run in the SIMT emulator of
  ``tests/_cuda_emu.py``; their array arguments must be this module's arrays, C-contiguous.
- **Device plumbing** (``cuda.Device``, ``runtime.getDeviceProperties``, streams, events, the
  memory pool and its allocator hook, ``cupyx.profiler.benchmark``) exists with CuPy's call
  signatures, timed on the host clock, so that the benchmark harness's CuPy branch runs; the
  pool counts the bytes of live stand-in arrays, so peak-memory readings are approximate.
- **Counting** (:func:`counting`): the kernel launches, host-to-device copies and host syncs
  that CuPy would make, including the copies its batched matmul makes of non-contiguous
  operands; ``tests/test_launches.py`` holds minivit's CuPy path to its counts.

Stricter than CuPy, on purpose or for simplicity (a failure here may be a false alarm):
``ElementwiseKernel`` wants C-contiguous arrays (CuPy handles strides); NumPy arrays are refused
where CuPy would convert them (``take_along_axis`` indices, ``put_along_axis`` values, the
value of ``scatter_add``); out-of-bounds integer indices raise (CuPy wraps them); writing into a
``broadcast_to`` view raises; ``Generator.random``/``uniform`` draw float32 or float64 only;
``scatter_add``'s dtype check applies to every index form.

It cannot tell: speed; a GPU's rounding; asynchronous errors; out-of-memory; the places where a
CuPy routine itself differs from NumPy's beyond its signature (results here are NumPy's).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import sys
import time
import types
import weakref

import _cuda_emu
import numpy as np
import scipy.special
from _cupy_names import NAMES, SIGNATURES, VERSION

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
    "NumPy array explicitly."
)


def _unsupported(a):
    return TypeError(f"Unsupported type {type(a)}")


class StandInGap(NotImplementedError):
    """A CuPy name that exists but that the stand-in does not emulate."""


# ----------------------------------------------------------------------------------------------
# moving between the stand-in's arrays and the NumPy arrays inside them


def _device(a):
    """An argument of device work -> what NumPy computes with. NumPy arrays are refused."""
    if isinstance(a, ndarray):
        return a._a
    if isinstance(a, np.ndarray):
        raise _unsupported(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_device(v) for v in a)
    return a


def _host_ok(a):
    """An index or an assigned value: NumPy arrays and lists are allowed (CuPy copies them)."""
    if isinstance(a, ndarray):
        return a._a
    if isinstance(a, tuple):
        return tuple(_host_ok(v) for v in a)
    return a


def _wrap(r, outs=(), inputs=None):
    """NumPy results -> the stand-in's: arrays wrapped, scalars made 0-d arrays, containers
    mapped. A result that is one of the ``out=`` arrays comes back as the caller's object.
    A result is new device memory unless it is a view of one of ``inputs`` (the call's NumPy
    arrays; without them, unless NumPy gave it a base)."""
    if isinstance(r, np.ndarray):
        for o in outs:
            if o._a is r:
                return o
        return ndarray._of(_allocated(r) if _fresh(r, inputs) else r)
    if isinstance(r, np.generic):
        return ndarray._of(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v, outs, inputs) for v in r)
    if isinstance(r, list):
        return [_wrap(v, outs, inputs) for v in r]
    return r


def _fresh(r: np.ndarray, inputs) -> bool:
    if inputs is not None and any(r is a for a in inputs):
        return False  # the argument itself (ascontiguousarray of a contiguous array, ...)
    if inputs is None or r.base is None:
        return r.base is None
    return not any(np.may_share_memory(r, a) for a in inputs)  # (a copying reshape has a base)


def _arrays(args):
    """The arrays (NumPy's, or the stand-in's) among a call's arguments, inside lists and
    tuples too."""
    for a in args:
        if isinstance(a, (np.ndarray, ndarray)):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _arrays(a)


def _outs(kwargs):
    out = kwargs.get("out")
    if out is None:
        return ()
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        if not isinstance(o, ndarray):
            raise _unsupported(o)
    return outs


def _call(fn, args, kwargs, owner=None):
    """fn (a NumPy callable) on device arguments, with CuPy's refusal of host arrays; ``owner``
    is the array whose method fn is."""
    outs = _outs(kwargs)
    orig = tuple(args) + tuple(kwargs.values()) + ((owner,) if owner is not None else ())
    args, kwargs = _device(tuple(args)), {k: _device(v) for k, v in kwargs.items()}
    inputs = list(_arrays(args + tuple(kwargs.values()) + (owner,)))
    # CuPy's matmul copies some operands first; the copies live until the GEMM is done, beside
    # the result, so the memory pool counts them for that long (a train step's peak can be there)
    scratch = (
        [_allocated(np.empty_like(m)) for m in _matmul_copied(*args[:2])]
        if (fn is np.matmul)
        else []
    )
    r = fn(*args, **kwargs)
    if not _COUNTERS:
        pass
    elif fn is np.matmul:
        _count("launch", _matmul_launches(*args[:2], kwargs.get("out")))
    elif fn in (np.concatenate, np.stack):  # CuPy: one copy per array, up to 8 of them
        arrays = args[0] if args else kwargs.get("arrays", ())
        _count("launch", len(arrays) if len(arrays) <= 8 else 1)
        if len(arrays) > 8:
            _count("h2d")  # (the pointer array)
    elif outs or isinstance(r, np.generic) or _fresh_results(r, inputs):
        _count("launch")  # an elementwise op, a reduction, a copy: one kernel
    elif r is None and inputs:
        _count("launch")  # in place: copyto, put_along_axis, fill, ...
    for a in _arrays(orig):  # a result that is an argument itself: the caller's object
        if isinstance(a, ndarray) and r is a._a:
            return a
    result = _wrap(r, outs, inputs)
    del scratch  # after the result's buffer was counted: both existed at once
    return result


def _fresh_results(r, inputs) -> bool:
    if isinstance(r, np.ndarray):
        return _fresh(r, inputs)
    return isinstance(r, (tuple, list)) and any(_fresh_results(v, inputs) for v in r)


# ----------------------------------------------------------------------------------------------
# counting what a GPU would see: kernel launches, host-to-device copies, device-to-host syncs

_COUNTERS: list = []


@contextlib.contextmanager
def counting():
    """Count, inside the block, the device work that CuPy would do, in a ``Counter``:

    - ``launch``: a kernel or cuBLAS call. One per elementwise op, reduction, fill, copy,
      random draw, creation with values (``zeros``, not ``empty``), ``RawKernel`` or
      ``ElementwiseKernel`` call; and for ``matmul``, the copies CuPy makes inside it
      (:func:`_matmul_launches`). A view (reshape of contiguous data, transpose, basic
      slicing) launches nothing.
    - ``h2d``: a copy of host data to the device (``asarray`` of a NumPy array or a list).
    - ``sync``: a read of device data on the host (``get``, ``item``, ``int``, ``float``,
      ``bool``, ``tolist``), which waits for all queued work.
    - ``matmul_copied_bytes``: the bytes of the operands that matmul copied.

    An approximation of CuPy 14.2, good for comparing code paths, not a profile: a few CuPy
    routines launch more than one kernel (fancy indexing, ``take_along_axis``)."""
    c = collections.Counter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _count(kind, n=1):
    for c in _COUNTERS:
        c[kind] += n


def _cublas_ready(m: np.ndarray) -> bool:
    return m.flags.c_contiguous or m.flags.f_contiguous


def _matmul_launches(a, b, out=None) -> int:
    """cuBLAS calls and CuPy's own copies for ``matmul(a, b, out)``, as CuPy 14.2 makes them
    (``cupy/_core/_routines_linalg.pyx``). Up to two dimensions, ``dot`` reads a C- or
    F-contiguous operand in place (a transpose through cuBLAS's flags) and copies any other,
    a padded slice included. Above two, every operand that is not C-contiguous is copied first
    (``ascontiguousarray``), even a plain transpose; a broadcast batch builds pointer arrays,
    one kernel per batch dimension and operand; and a result that cannot go straight into
    ``out`` is copied there."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return 1
    ndim = max(a.ndim, b.ndim)
    copied = _matmul_copied(a, b)
    _count("matmul_copied_bytes", sum(m.nbytes for m in copied))
    n = 1 + len(copied)  # the GEMM and the copies
    if ndim > 2:
        pad = lambda m: (1,) * (ndim - m.ndim) + m.shape[:-2] if m.ndim >= 2 else ()  # noqa: E731
        batch = [pad(m) for m in (a, b) if m.ndim >= 2]
        if len(batch) == 2 and any(
            (x == 1) != (y == 1) for x, y in zip(*batch)
        ):  # a batch axis of 1 against one that is not: the batched (pointer) path
            n += 3 * (ndim - 2)
    if out is not None and not out.flags.c_contiguous:
        n += 1
    return n


def _matmul_copied(a=None, b=None) -> list:
    """The operands of ``matmul(a, b)`` that CuPy 14.2 copies before its GEMM (see
    :func:`_matmul_launches`)."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return []
    if max(a.ndim, b.ndim) <= 2:  # cuBLAS reads a C- or F-contiguous matrix in place
        return [
            m for m in (a, b) if m.ndim == 2 and not (m.flags.c_contiguous or m.flags.f_contiguous)
        ]
    return [m for m in (a, b) if m.ndim >= 2 and not m.flags.c_contiguous]


def _check_dtype(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "OUSV":
        raise ValueError(f"Unsupported dtype {a.dtype}")
    return a


# ----------------------------------------------------------------------------------------------
# memory accounting: the default pool, and the allocator hook the benchmarks use


class MemoryPointer:
    def __init__(self, size):
        self.size = size


class MemoryPool:
    """``cupy.get_default_memory_pool()``: bytes held by live stand-in arrays."""

    def __init__(self):
        self._used = 0

    def used_bytes(self):
        return self._used

    def total_bytes(self):
        return self._used

    def free_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def malloc(self, size):
        return MemoryPointer(size)

    def _release(self, size):
        self._used -= size


_POOL = MemoryPool()
_ALLOCATOR = [_POOL.malloc]


def _allocated(a: np.ndarray) -> np.ndarray:
    """Account for a new buffer as CuPy's allocator would see it (a hook may be set)."""
    if a.nbytes:
        _POOL._used += a.nbytes  # counted first: a hook reading used_bytes sees this buffer
        _ALLOCATOR[0](a.nbytes)
        weakref.finalize(a, _POOL._release, a.nbytes)
    return a


# ----------------------------------------------------------------------------------------------
# the array


_SCATTER_ADD_TYPES = {np.dtype(t).char for t in ("int32", "float16", "float32", "float64",
                                                  "uint32", "uint64")}  # fmt: skip


class Flags:
    """CuPy's ``ndarray.flags``: three fields, read-only."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, a: np.ndarray):
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = a.flags.owndata

    def __getitem__(self, key):  # flags["C_CONTIGUOUS"], as CuPy allows
        return getattr(self, key.lower())


class ndarray:  # noqa: N801 (CuPy's name; minivit.backend recognises cupy arrays by it)
    """A device array of the stand-in: a NumPy array inside, CuPy's rules outside."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise StandInGap("cupy.ndarray(memptr=..., strides=...)")
        self._a = _allocated(_garbage(np.empty(shape, dtype=dtype, order=order)))

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        obj = cls.__new__(cls)
        obj._a = a
        return obj

    # -- conversions
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A host copy (``numpy.ndarray``), or the data copied into ``out``."""
        _count("sync")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError(f"Shape mismatch: {arr.shape} != {self._a.shape}")
        self._a[...] = arr

    def item(self):
        _count("sync")
        return self._a.item()

    def tolist(self):
        _count("sync")
        return self._a.tolist()

    def _scalar(self, kind):
        _count("sync")
        if self._a.size != 1:
            raise TypeError(f"only size-1 arrays can be converted to Python scalars ({kind})")
        return self._a.reshape(()).item()

    def __bool__(self):
        _count("sync")
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return bool(self._a.reshape(()))

    def __int__(self):
        return int(self._scalar("int"))

    def __float__(self):
        return float(self._scalar("float"))

    def __complex__(self):
        return complex(self._scalar("complex"))

    def __repr__(self):
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __format__(self, spec):
        _count("sync")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __reduce__(self):
        return (asarray, (self.get(),))  # unpickled as a copy of the host data

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # -- the NumPy protocols: device arrays in NumPy's functions dispatch here
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        mine = getattr(_MODULE, ufunc.__name__, None)
        if not isinstance(mine, ufunc_) or method != "__call__":  # CuPy: plain calls only
            return NotImplemented
        return mine(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        target = _MODULE
        for part in func.__module__.split(".")[1:]:
            target = getattr(target, part, None)
        fn = getattr(target, func.__name__, None) if target is not None else None
        if fn is None:
            return NotImplemented
        return fn(*args, **kwargs)

    # -- attributes
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: Flags(self._a))
    T = property(lambda self: ndarray._of(self._a.T))
    mT = property(lambda self: ndarray._of(self._a.mT))
    real = property(lambda self: ndarray._of(self._a.real))
    imag = property(lambda self: ndarray._of(self._a.imag))
    device = property(lambda self: _DEVICE)

    @property
    def base(self):
        return None if self._a.base is None else ndarray._of(self._a.base)

    # -- indexing
    def __getitem__(self, key):
        _check_index(key)
        key = _host_ok(key)
        r = self._a[key]
        if not isinstance(r, np.ndarray):  # an element: a 0-d view, as CuPy gives
            kt = key if isinstance(key, tuple) else (key,)
            r = self._a[kt + (Ellipsis,)]
        return ndarray._of(r)

    def __setitem__(self, key, value):
        _check_index(key)
        if not _array_index(key):  # a basic index: CuPy fills it, from a scalar or device array
            if isinstance(value, list):
                raise TypeError(f"Unsupported type {type(value)}")
            if isinstance(value, np.ndarray) and value.ndim > 0:
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        _count("launch")  # a fill or a copy kernel
        self._a[_host_ok(key)] = _host_ok(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    # -- methods that only exist in CuPy
    def scatter_add(self, slices, value):
        if self._a.dtype.char not in _SCATTER_ADD_TYPES:  # atomicAdd's types, as CuPy checks
            raise TypeError(
                "scatter_add only supports int32, float16, float32, float64, uint32, uint64, "
                f"as data type (got {self._a.dtype})"
            )
        _MODULE.add.at(self, slices, value)

    def scatter_max(self, slices, value):
        _MODULE.maximum.at(self, slices, value)

    def scatter_min(self, slices, value):
        _MODULE.minimum.at(self, slices, value)

    def reduced_view(self, dtype=None):
        return ndarray._of(self._a.reshape(-1) if self._a.flags.c_contiguous else self._a)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True, blocking=False):
        if not copy and np.dtype(dtype) == self._a.dtype:
            return self
        _count("launch")
        return ndarray._of(_allocated(self._a.astype(dtype, order=order, copy=True)))

    def copy(self, order="C"):
        _count("launch")
        return ndarray._of(_allocated(self._a.copy(order=order)))


def _index_parts(key):
    return key if isinstance(key, tuple) else (key,)


def _array_index(key) -> bool:
    """Whether an index holds an array (device or host) or a list: advanced indexing."""
    return any(isinstance(k, (ndarray, np.ndarray, list)) for k in _index_parts(key))


def _check_index(key):
    """CuPy takes one boolean mask, or integer arrays, but not a mask beside other arrays."""
    parts = [k._a if isinstance(k, ndarray) else k for k in _index_parts(key)]
    arrays = [np.asarray(k) for k in parts if isinstance(k, (np.ndarray, list))]
    if any(a.dtype == bool for a in arrays) and len(arrays) > 1:
        raise ValueError("currently, CuPy only supports slices that consist of one boolean array.")


def _gap_attr(name):
    def get(self):
        raise StandInGap(f"cupy.ndarray.{name} is CuPy's but not emulated by the stand-in")

    return property(get)


# operators: CuPy runs each as its ufunc, so a NumPy operand is refused there too
_BINARY = {
    "add": "add",
    "sub": "subtract",
    "mul": "multiply",
    "truediv": "true_divide",
    "floordiv": "floor_divide",
    "mod": "remainder",
    "pow": "power",
    "matmul": "matmul",
    "and": "bitwise_and",
    "or": "bitwise_or",
    "xor": "bitwise_xor",
    "lshift": "left_shift",
    "rshift": "right_shift",
}
_COMPARE = {
    "eq": "equal",
    "ne": "not_equal",
    "lt": "less",
    "le": "less_equal",
    "gt": "greater",
    "ge": "greater_equal",
}
_UNARY = {"neg": "negative", "pos": "positive", "abs": "absolute", "invert": "invert"}


def _operators():
    # CuPy 14.2's ndarray has the reflected form of every binary operator and the in-place
    # form of all but @ (no __imatmul__); comparisons have neither.
    for op, uf in {**_BINARY, **_COMPARE}.items():
        f = getattr(np, uf)
        setattr(ndarray, f"__{op}__", lambda self, other, f=f: _call(f, (self, other), {}))
        if op in _COMPARE:
            continue
        setattr(ndarray, f"__r{op}__", lambda self, other, f=f: _call(f, (other, self), {}))
        if op != "matmul":
            inplace = lambda self, other, f=f: _call(f, (self, other), {"out": self})  # noqa: E731
            setattr(ndarray, f"__i{op}__", inplace)
    for op, uf in _UNARY.items():
        f = getattr(np, uf)
        setattr(ndarray, f"__{op}__", lambda self, f=f: _call(f, (self,), {}))


def _method(name):
    def method(self, *args, **kwargs):
        return _call(getattr(self._a, name), args, kwargs, owner=self._a)

    method.__name__ = name
    return method


_OWN = set(vars(ndarray))
for _name in NAMES["cupy.ndarray"]:
    if _name in _OWN or _name.startswith("_"):
        continue
    setattr(ndarray, _name, _method(_name) if hasattr(np.ndarray, _name) else _gap_attr(_name))

_operators()
ndarray.__module__ = "cupy"  # minivit.backend tells a cupy array by its type's module and name


def _garbage(a: np.ndarray) -> np.ndarray:
    """What fresh device memory holds: NaN for floats, a byte pattern for the rest."""
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    elif a.size:
        a.view(np.uint8).fill(0xA5)
    return a


# ----------------------------------------------------------------------------------------------
# ufuncs


_UFUNC_AT = ("add", "subtract", "maximum", "minimum", "bitwise_and", "bitwise_or", "bitwise_xor")


class ufunc_:  # noqa: N801
    """A CuPy ufunc: NumPy's, behind CuPy's refusal of host arrays."""

    def __init__(self, np_ufunc, name=None):
        self._u = np_ufunc
        self.__name__ = self.name = name or np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs

    def __call__(self, *args, **kwargs):
        extra = set(kwargs) - {"out", "dtype", "casting"}
        if extra:  # NumPy's where=, order=, subok=, ... are not CuPy's
            raise TypeError(f"Wrong arguments {sorted(extra)} for ufunc {self.__name__}")
        return _call(self._u, args, kwargs)

    def _only(self, method, names):
        if self.__name__ not in names:
            raise NotImplementedError(f"{self.__name__}.{method} is not supported by CuPy")

    def reduce(self, *args, **kwargs):
        self._only("reduce", ("add", "multiply"))
        return _call(self._u.reduce, args, kwargs)

    def accumulate(self, *args, **kwargs):
        self._only("accumulate", ("add", "multiply"))
        return _call(self._u.accumulate, args, kwargs)

    def reduceat(self, *args, **kwargs):
        self._only("reduceat", ("add",))
        return _call(self._u.reduceat, args, kwargs)

    def outer(self, *args, **kwargs):
        return _call(self._u.outer, args, kwargs)

    def at(self, a, indices, b=None):
        self._only("at", _UFUNC_AT)
        if not isinstance(a, ndarray):
            raise _unsupported(a)
        rest = () if b is None else (_device(b),)
        _count("launch")
        self._u.at(a._a, _host_ok(indices), *rest)

    @property
    def types(self):
        return self._u.types

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


for _name in NAMES["cupy.ufunc"]:
    if not hasattr(ufunc_(np.add), _name):
        raise AssertionError(f"the stand-in's ufunc lacks CuPy's {_name!r}")


# ----------------------------------------------------------------------------------------------
# the module's functions


def _creation(np_fn):
    """zeros, ones, full, arange, ...: a new device array (host-array arguments refused)."""

    @functools.wraps(np_fn)
    def make(*args, **kwargs):
        r = np_fn(*_device(args), **{k: _device(v) for k, v in kwargs.items()})
        _count("launch")  # (a memset for zeros: counted as a launch too)
        return ndarray._of(_allocated(_check_dtype(r)))

    return make


def _empty(np_fn):
    @functools.wraps(np_fn)
    def make(*args, **kwargs):
        return ndarray._of(_allocated(_garbage(np_fn(*_device(args), **kwargs))))

    return make


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    """A device array: ``a`` itself when it is one (cast if ``dtype`` differs, copied if
    ``copy``), else a copy of the host data."""
    if isinstance(a, ndarray):
        if copy:
            return a.astype(a.dtype if dtype is None else dtype, copy=True)
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _from_host(a, dtype, order or "K")


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        r = np.array(obj._a, dtype=dtype, copy=True if copy else None, order=order, ndmin=ndmin)
        if r is obj._a:
            return obj
        _count("launch")
        return ndarray._of(_allocated(r))
    return _from_host(obj, dtype, order, ndmin)


def _from_host(obj, dtype, order, ndmin=0):
    """A new device array holding a copy of host data (a list may hold device arrays)."""
    if isinstance(obj, (list, tuple)):
        obj = [v.get() if isinstance(v, ndarray) else v for v in obj]
    r = np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    _count("h2d")
    return ndarray._of(_allocated(_check_dtype(r)))


def where(condition, x=None, y=None):
    """CuPy's where reads the condition as a device array (no Python bools, no host arrays)."""
    if not isinstance(condition, ndarray):
        raise (_unsupported(condition) if isinstance(condition, np.ndarray) else
               AttributeError(f"cupy.where: {type(condition).__name__} has no astype"))  # fmt: skip
    if (x is None) != (y is None):
        raise ValueError("Must provide both 'x' and 'y' or neither.")
    return _call(np.where, (condition,) if x is None else (condition, x, y), {})


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return _MODULE if any(isinstance(a, ndarray) for a in args) else np


def _gap(qualname):
    def missing(*args, **kwargs):
        raise StandInGap(f"{qualname} is CuPy's but not emulated by tests/_cupy_stand_in.py")

    missing.__name__ = qualname.rsplit(".", 1)[-1]
    return missing


_gap_marker = object()

_CREATION = {
    "zeros",
    "ones",
    "full",
    "arange",
    "linspace",
    "logspace",
    "eye",
    "identity",
    "tri",
    "zeros_like",
    "ones_like",
    "full_like",
    "meshgrid",
    "indices",
}
_EMPTY = {"empty", "empty_like"}
_PLAIN_TYPES = (np.dtype, np.finfo, np.iinfo)


def _fill(module, qual, names, source, special):
    """Give ``module`` the names: emulated where ``source`` (a NumPy namespace) has a
    counterpart, else a StandInGap on use."""
    for name in names:
        if name in special:
            setattr(module, name, special[name])
            continue
        obj = getattr(source, name, _gap_marker) if source is not None else _gap_marker
        if obj is _gap_marker:
            setattr(module, name, _gap(f"{qual}.{name}"))
        elif isinstance(obj, np.ufunc):
            setattr(module, name, ufunc_(obj, name))
        elif isinstance(obj, type) and (issubclass(obj, np.generic) or obj in _PLAIN_TYPES):
            setattr(module, name, obj)  # dtypes and type objects are NumPy's in CuPy too
        elif isinstance(obj, (float, int, type(None))) or obj is np.newaxis:
            setattr(module, name, obj)
        elif name in _CREATION:
            setattr(module, name, _creation(obj))
        elif name in _EMPTY:
            setattr(module, name, _empty(obj))
        elif callable(obj) and not isinstance(obj, type):
            setattr(module, name, _function(obj, name))
        else:
            setattr(module, name, _gap(f"{qual}.{name}"))


_ARRAY_BOOL = {"allclose", "array_equal", "array_equiv"}  # a 0-d device array on CuPy


def _function(np_fn, name):
    @functools.wraps(np_fn)
    def fn(*args, **kwargs):
        r = _call(np_fn, args, kwargs)
        return _wrap(np.asarray(r)) if name in _ARRAY_BOOL else r

    fn.__name__ = name
    return fn


class _Module(types.ModuleType):
    """A module that names what CuPy lacks in its AttributeError."""

    def __getattr__(self, name):
        raise AttributeError(
            f"module {self.__name__!r} has no attribute {name!r} (not in CuPy {VERSION})"
        )


# ----------------------------------------------------------------------------------------------
# random


class Generator:
    """``cupy.random.Generator``: CuPy's methods only, another stream than NumPy's."""

    def __init__(self, seed=None):
        if isinstance(seed, np.random.SeedSequence):
            seed = seed.entropy
        key = (
            [] if seed is None else [int(v) for v in np.atleast_1d(np.asarray(seed, dtype=object))]
        )
        self._g = np.random.default_rng(None if seed is None else [0x43555059, *key])

    def _draw(self, kinds, name, size, dtype, out, fn):
        dtype = np.dtype(dtype)
        if dtype.char not in kinds:
            raise TypeError(f"{name} does not support dtype {dtype}")
        _count("launch")
        if out is not None:  # drawn straight into out
            out._a[...] = fn(size, dtype)
            return out
        return ndarray._of(_allocated(np.asarray(fn(size, dtype))))

    def random(self, size=None, dtype=np.float64, out=None):
        return self._draw("fd", "random", size, dtype, out, lambda s, d: self._g.random(s, dtype=d))

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return self._draw(
            "fd",
            "standard_normal",
            size,
            dtype,
            out,
            lambda s, d: self._g.standard_normal(s, dtype=d),
        )

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return self._draw(
            "fd", "uniform", size, dtype, None, lambda s, d: self._g.uniform(low, high, s).astype(d)
        )

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        low, high = int(low), None if high is None else int(high)  # CuPy takes int bounds only
        r = self._g.integers(low, high, size=size, dtype=dtype, endpoint=endpoint)
        _count("launch")
        return ndarray._of(_allocated(np.asarray(r)))


for _name in NAMES["cupy.random.Generator"]:
    if not hasattr(Generator, _name):
        setattr(Generator, _name, _gap(f"cupy.random.Generator.{_name}"))


class RandomState:
    """``cupy.random.RandomState``, the legacy generator (POT makes one when it finds CuPy):
    its common draws, on another stream than NumPy's."""

    def __init__(self, seed=None, method=None):
        self.seed(seed)

    def seed(self, seed=None):
        self._g = Generator(seed)._g

    def _out(self, a, dtype):
        _count("launch")
        return ndarray._of(_allocated(np.asarray(a, dtype=dtype)))

    def rand(self, *size, dtype=float):
        return self._out(self._g.random(size), dtype)

    def randn(self, *size, dtype=float):
        return self._out(self._g.standard_normal(size), dtype)

    def random_sample(self, size=None, dtype=float):
        return self._out(self._g.random(size), dtype)

    def standard_normal(self, size=None, dtype=float):
        return self._out(self._g.standard_normal(size), dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=float):
        return self._out(self._g.uniform(low, high, size), dtype)

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=float):
        return self._out(self._g.normal(loc, scale, size), dtype)

    def randint(self, low, high=None, size=None, dtype="l"):
        return self._out(self._g.integers(low, high, size), dtype)


def default_rng(seed=None):
    return seed if isinstance(seed, Generator) else Generator(seed)


# ----------------------------------------------------------------------------------------------
# the device, streams, events, kernels, cupyx


class Device:
    """``cupy.cuda.Device``: one device, id 0."""

    def __init__(self, device=None):
        device = getattr(device, "id", device)  # a Device, an int or None
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise RuntimeError(f"the stand-in has one device, id 0, not {self.id}")
        self.attributes = {"MultiProcessorCount": 2, "MaxSharedMemoryPerBlock": 48 * 1024}
        self.compute_capability = "90"

    def synchronize(self):
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEVICE = Device(0)


class Stream:
    def synchronize(self):
        pass


class Event:
    """``cupy.cuda.Event``: the host clock at ``record``."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def get_elapsed_time(start, end):
    return (end.t - start.t) * 1e3  # milliseconds, as CuPy's


def set_allocator(allocator=None):
    _ALLOCATOR[0] = _POOL.malloc if allocator is None else allocator


class RawKernel:
    """``cupy.RawKernel`` run by the SIMT emulator (tests/_cuda_emu.py)."""

    def __init__(
        self,
        code,
        name,
        options=(),
        backend="nvrtc",
        translate_cucomplex=False,
        *,
        enable_cooperative_groups=False,
        jitify=False,
    ):
        self._k = _cuda_emu.RawKernel(code, name)
        self.name = name

    def __call__(self, grid, block, args, *, shared_mem=0, enable_cooperative_groups=False):
        _count("launch")
        self._k(grid, block, tuple(_kernel_arg(a, self.name) for a in args), shared_mem)


class ElementwiseKernel:
    """``cupy.ElementwiseKernel`` run by the SIMT emulator's elementwise loop."""

    def __init__(
        self,
        in_params,
        out_params,
        operation,
        name="kernel",
        reduce_dims=True,
        preamble="",
        no_return=False,
        return_tuple=False,
        loop_prep="",
        after_loop="",
        options=(),
    ):
        if preamble or loop_prep or after_loop:
            raise StandInGap("ElementwiseKernel preamble/loop_prep/after_loop")
        self._k = _cuda_emu.ElementwiseKernel(in_params, out_params, operation, name)
        self.name = name

    def __call__(self, *args, size=None, block_size=None, stream=None):
        if size is not None:
            raise StandInGap("ElementwiseKernel(size=...)")
        given = [a for a in args if isinstance(a, ndarray)]
        _count("launch")
        r = self._k(*(_kernel_arg(a, self.name) for a in args))
        return _wrap(r, tuple(given))


def _kernel_arg(a, name):
    if isinstance(a, ndarray):
        if not a._a.flags.c_contiguous:
            raise ValueError(
                f"{name}: a kernel reads its array arguments as C-contiguous memory; got "
                f"strides {a.strides} for shape {a.shape}"
            )
        return a._a
    if isinstance(a, np.ndarray):
        raise _unsupported(a)
    return a


class _BenchResult:
    def __init__(self, name, cpu, gpu):
        self.name, self.cpu_times, self.gpu_times = name, cpu, gpu


def benchmark(
    func,
    args=(),
    kwargs=None,
    n_repeat=10000,
    *,
    name=None,
    n_warmup=10,
    max_duration=float("inf"),
    devices=None,
):
    """``cupyx.profiler.benchmark``: host-clock times stand in for the CUDA-event times."""
    kwargs = kwargs or {}
    for _ in range(n_warmup):
        func(*args, **kwargs)
    times = []
    for _ in range(n_repeat):
        t = time.perf_counter()
        func(*args, **kwargs)
        times.append(time.perf_counter() - t)
    t = np.asarray(times)
    return _BenchResult(name or getattr(func, "__name__", "func"), t, t[None, :])


def scatter_add(a, slices, value):
    a.scatter_add(slices, value)


# ----------------------------------------------------------------------------------------------
# assembling the modules


def _module(qual, names, source, special):
    m = _Module(qual)
    _fill(m, qual, names, source, special)
    return m


_MODULE = _module(
    "cupy",
    NAMES["cupy"],
    np,
    {
        "ndarray": ndarray,
        "ufunc": ufunc_,
        "asarray": asarray,
        "asanyarray": asarray,
        "array": array,
        "asnumpy": asnumpy,
        "get_array_module": get_array_module,
        "get_default_memory_pool": lambda: _POOL,
        "RawKernel": RawKernel,
        "ElementwiseKernel": ElementwiseKernel,
        "is_available": lambda: True,
        "where": where,
    },
)
_MODULE.__version__ = f"{VERSION} (CPU stand-in)"
_MODULE.random = _module(
    "cupy.random",
    NAMES["cupy.random"],
    None,
    {"default_rng": default_rng, "Generator": Generator, "RandomState": RandomState},
)
_MODULE.linalg = _module("cupy.linalg", NAMES["cupy.linalg"], np.linalg, {})
_MODULE.lib = _Module("cupy.lib")
_MODULE.lib.stride_tricks = _module(
    "cupy.lib.stride_tricks", NAMES["cupy.lib.stride_tricks"], np.lib.stride_tricks, {}
)
_runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1,
    getDeviceProperties=lambda device=0: {
        "name": b"CPU stand-in for CuPy",
        "totalGlobalMem": 0,
        "multiProcessorCount": 2,
        "major": 9,
        "minor": 0,
    },
)
_MODULE.cuda = types.SimpleNamespace(
    Device=Device,
    Stream=Stream,
    Event=Event,
    get_current_stream=lambda: Stream(),
    get_elapsed_time=get_elapsed_time,
    set_allocator=set_allocator,
    runtime=_runtime,
    is_available=lambda: True,
)

_CUPYX = _module(
    "cupyx",
    NAMES["cupyx"],
    None,
    {"scatter_add": scatter_add},
)
_CUPYX.scipy = _Module("cupyx.scipy")
_CUPYX.scipy.special = _module(
    "cupyx.scipy.special", NAMES["cupyx.scipy.special"], scipy.special, {}
)
_CUPYX.profiler = _Module("cupyx.profiler")
_CUPYX.profiler.benchmark = benchmark

# ----------------------------------------------------------------------------------------------
# CuPy's signatures: a call whose arguments do not bind to CuPy's parameters fails here too


def _parse_signature(text: str) -> inspect.Signature:
    """An inspect.Signature from CuPy's signature text: names and kinds; defaults not evaluated."""
    parts, cur, depth, quote = [], "", 0, None
    for ch in text.strip()[1:-1]:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    P = inspect.Parameter
    params, kind = [], P.POSITIONAL_OR_KEYWORD
    for part in (p.strip() for p in parts if p.strip()):
        if part == "/":
            params = [q.replace(kind=P.POSITIONAL_ONLY) for q in params]
        elif part == "*":
            kind = P.KEYWORD_ONLY
        elif part.startswith("**"):
            params.append(P(part[2:].split(":")[0].strip(), P.VAR_KEYWORD))
        elif part.startswith("*"):
            params.append(P(part[1:].split(":")[0].strip(), P.VAR_POSITIONAL))
            kind = P.KEYWORD_ONLY
        else:
            name = part.split("=")[0].split(":")[0].split()[-1]  # "int n" (Cython) -> "n"
            params.append(P(name, kind, default=None if "=" in part else P.empty))
    return inspect.Signature(params)


def _bound(fn, qual: str, text: str):
    sig = _parse_signature(text)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{qual}{text}: {exc}") from None
        return fn(*args, **kwargs)

    return call


def _bind_signatures(owners):
    """Wrap every emulated function and method that CuPy gives a signature in a check of it."""
    for qual, text in SIGNATURES.items():
        owner_name, _, name = qual.rpartition(".")
        owner = owners.get(owner_name)
        if owner is None:
            continue
        fn = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if callable(fn):  # (an ndarray property, such as a gap's, is left as it is)
            setattr(owner, name, _bound(fn, qual, text))


_bind_signatures(
    {
        "cupy": _MODULE,
        "cupy.ndarray": ndarray,
        "cupy.random.Generator": Generator,
        "cupy.linalg": _MODULE.linalg,
        "cupy.lib.stride_tricks": _MODULE.lib.stride_tricks,
    }
)

MODULES = {
    "cupy": _MODULE,
    "cupy.random": _MODULE.random,
    "cupy.linalg": _MODULE.linalg,
    "cupy.lib": _MODULE.lib,
    "cupy.lib.stride_tricks": _MODULE.lib.stride_tricks,
    "cupyx": _CUPYX,
    "cupyx.scipy": _CUPYX.scipy,
    "cupyx.scipy.special": _CUPYX.scipy.special,
    "cupyx.profiler": _CUPYX.profiler,
}


def install():
    """Make ``import cupy`` / ``import cupyx`` give the stand-in, in this process."""
    sys.modules.update(MODULES)
    import minivit.backend

    minivit.backend._CACHE.pop("cupy", None)
