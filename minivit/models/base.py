"""What every minivit model shares: a flat ``params`` dict on one backend, in one dtype.

A model keeps its parameters in ``params`` (name -> array, in the order of the checkpoint whose
names it follows), the gradients of its last ``backward`` in ``grads`` (the same keys) and the
arguments that define it in ``config`` (exactly the constructor's keyword arguments, so that
``type(model)(**model.config)`` rebuilds it; checkpoints store it). The forward and backward
passes, the parameter layout and the initialisation belong to each model; this base holds only
the plumbing that is the same for all of them:

* :meth:`_setup` checks the dtype, resolves the backend and stores the config;
* :meth:`state_dict` / :meth:`load_state_dict` (one error names every mismatch), ``to``,
  ``zero_grads``, ``num_params``, ``__call__`` and ``__repr__``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping

from ..backend import _library_of, get_backend, type_name, warn_settings_once

__all__ = ["Model", "load_state_dict_into", "resolve_dtype", "int_arg", "float_arg"]


def int_arg(name, value, minimum=1):
    """``value`` as an int, checked: an integer (Python or NumPy; a float only when it is a
    whole number, as a config read from JSON may hold) of at least ``minimum``. A constructor
    argument's ValueError or TypeError names it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not isinstance(value, numbers.Integral) and not (
        math.isfinite(value) and float(value).is_integer()
    ):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def float_arg(name, value, minimum=0.0, maximum=math.inf, *, above=False, below=False):
    """``value`` as a float, checked: a real number (a Python or NumPy scalar, or a 0-d array of
    numbers; not a bool), finite, at least ``minimum`` (above it with ``above=True``) and at
    most ``maximum`` (below it with ``below=True``). The models' constructors and the
    optimizers (hyperparameters, a step's lr) check their numbers with it."""
    zero_d = getattr(value, "ndim", None) == 0 and getattr(value.dtype, "kind", "") in "fiu"
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or zero_d):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    low_ok = v > minimum if above else v >= minimum
    high_ok = v < maximum if below else v <= maximum
    if not math.isfinite(v) or not low_ok or not high_ok:
        if maximum == math.inf:
            where = f"{'>' if above else '>='} {minimum:g}"
        else:
            low = f"({minimum:g}" if above else f"[{minimum:g}"
            where = f"in {low}, {maximum:g}{')' if below else ']'}"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return v


def resolve_dtype(dtype, backend) -> str:
    """ "float32" or "float64" from a name or a dtype object (numpy.float32, dtype("float64"))."""
    try:
        dtype = backend.xp.dtype(dtype).name
    except TypeError:
        pass
    if str(dtype) not in ("float32", "float64"):
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return str(dtype)


class Model:
    """Base of ViT, HybridViT and ViLT: parameters, dtype, backend, state dicts.

    A subclass calls ``self._setup(config, dtype, backend)`` in its ``__init__`` once it has
    validated its own arguments, then fills ``self.params`` (see ``param_shapes``).
    """

    # heads that kept their random initialisation when the model was loaded from weights that
    # lack them (a Hugging Face ViLT MLM checkpoint has no ITM head): set by
    # checkpoint.load_model, written again by save_model, left out by ``minivit predict``
    missing_heads: tuple = ()

    # a model whose forward returns a dict (ViLT) names here the outputs its backward takes
    # gradients for; None: the forward returns one array, and backward takes its gradient
    # (checked before backward runs: models/sharding.check_output_grad)
    output_grad_keys: tuple | None = None

    def _setup(self, config, dtype, backend):
        """Resolve the backend and dtype, store ``config`` (also as attributes)."""
        warn_settings_once()  # a misspelt MINIVIT_* setting, before anything depends on it
        self.backend = get_backend(backend)
        self.dtype = resolve_dtype(dtype, self.backend)
        self.config = config
        self.__dict__.update(config)
        self.params = {}
        self.grads = {}
        self._cache = None
        self._no_cache = "new"  # why there is no cache, while there is none (_no_cache_error)

    # ------------------------------------------------------------------------------------------
    # parameters

    def state_dict(self):
        """name -> numpy array (a host copy), in ``params`` order."""
        return {k: self.backend.to_numpy(v).copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays (numpy or this backend) into ``params``, cast to the model's dtype.

        Every entry is checked before anything is copied, so a refused state dict leaves the
        model as it was. With strict=True every missing, unexpected and mis-shaped key is named
        in one ValueError. With strict=False only mis-shaped keys raise; missing keys keep their
        values and unexpected ones are ignored. A value that is not a floating numpy or CuPy
        array (a list, a torch tensor, an int array) raises one TypeError naming every such key
        (and any other problem). Returns (missing, unexpected) like PyTorch.

        Loading replaces the parameter arrays, so a pending forward's cache (which holds the
        old ones) is dropped: the next backward raises until a forward has run again. The
        gradients of the last backward are kept, as torch keeps ``.grad``.
        """
        return load_state_dict_into(self, state_dict, strict)

    def to(self, backend):
        """Move the parameters to ``backend`` (a name or a Backend); returns the model.

        Gradients and the forward cache are dropped (they live on the old backend); the dropout
        generator is re-created on the new backend from a seed drawn from the old one.
        """
        new = get_backend(backend)
        if new.name != self.backend.name:
            old = self.backend
            self.params = {
                k: new.asarray(old.to_numpy(v), dtype=self.dtype) for k, v in self.params.items()
            }
            if getattr(self, "rng", None) is not None:
                self.rng = new.rng(int(old.to_numpy(self.rng.integers(0, 2**31 - 1))))
            self.backend = new
        self.grads = {}
        self._drop_cache("moved")
        return self

    def zero_grads(self):
        """Let go of the gradients: ``grads`` becomes ``{}`` (torch's
        ``zero_grad(set_to_none=True)``), so that they are not held through the next forward.
        ``grads`` has the keys of ``params`` only from a ``backward`` until then; an optimizer
        step on the empty dict updates nothing (``optim`` warns)."""
        self.grads = {}

    # ------------------------------------------------------------------------------------------
    # the forward's cache, and why it may be missing
    #
    # A forward keeps what backward needs in ``_cache``; backward consumes it (docs/vit.md, "What
    # a train step holds"). A forward drops the last cache only once its inputs have passed its
    # checks (``_drop_cache()``), so a refused call leaves the last forward's cache usable. When
    # there is none, ``_no_cache`` says why, and backward and ``cached_attention`` say it too.

    _NO_CACHE_REASONS = {
        "new": "no forward has run yet",
        "dropped": "a forward has begun since",
        "consumed": "the last backward consumed it (each backward frees its forward's cache, as "
        "torch's frees its graph)",
        "no_grad": "the last forward ran under no_grad(), which keeps none",
        "forward_failed": "the last forward raised an error after it had dropped the previous "
        "cache",
        "backward_failed": "the last backward raised an error after it had begun to free the "
        "cache, so what is left of it is incomplete",
        "moved": "the model moved to another backend (to()) since",
        "loaded": "load_state_dict replaced the parameters since, and the cache holds the old ones",
    }

    def _drop_cache(self, why="dropped"):
        """Let go of the forward's cache; ``why`` is a key of ``_NO_CACHE_REASONS``."""
        self._cache = None
        self._no_cache = why

    @contextlib.contextmanager
    def keep_cache(self):
        """A block whose forwards leave a pending training step alone (the study tools draw
        their pictures in one): the forward's cache, or the reason there is none, is put back
        when the block ends, so the next ``backward`` is the pending forward's. Forwards inside
        run whole, never in batch shards, so that shard worker processes holding that forward's
        cache are not touched either.

        Parameters replaced inside the block (``load_state_dict``, ``to()``) make the pending
        cache stale: it is then not put back, and ``backward`` says why."""
        from .sharding import whole

        saved = self._cache, getattr(self, "_no_cache", "new")
        params, backend = dict(self.params), self.backend.name  # held: no id is reused
        try:
            with whole():
                yield self
        finally:
            if self.backend.name != backend:
                self._drop_cache("moved")
            elif self.params.keys() != params.keys() or any(
                self.params[k] is not v for k, v in params.items()
            ):
                self._drop_cache("loaded")
            else:
                self._cache, self._no_cache = saved

    def _no_cache_error(self, what):
        """The RuntimeError of ``what`` ("backward", ...) when there is no cache."""
        why = self._NO_CACHE_REASONS[getattr(self, "_no_cache", "new")]
        return RuntimeError(
            f"{what} needs the cache of a forward run with gradients on, and there is none: "
            f"{why}; run the forward again first"
        )

    def num_params(self):
        return sum(int(v.size) for v in self.params.values())

    def forward_draws_random(self, inputs) -> bool:
        """Whether a forward with these arguments (by name) draws random numbers: here, in
        training with a dropout or stochastic-depth rate above 0. Such a forward is never cut
        into batch shards (``models/sharding.py``); a model with other randomness says so."""
        if not inputs.get("train"):
            return False
        for name in ("drop_rate", "drop_path"):
            rate = getattr(self, name, 0.0)  # the attributes forward reads; drop_path: per block
            rates = rate if isinstance(rate, (list, tuple)) else [rate]
            if any(float(r or 0.0) > 0.0 for r in rates):
                return True
        return False

    # ------------------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self):
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{type(self).__name__}({cfg}, dtype={self.dtype!r}, backend={self.backend.name!r})"


def load_state_dict_into(model, state_dict, strict=True):
    """Check every entry (names, types, shapes) against ``model.params``, then copy them (cast
    to ``model.dtype``): a refused state dict changes nothing.

    Returns (missing, unexpected). Raises one error naming every problem: a TypeError when some
    value is not a floating numpy or CuPy array, else a ValueError.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict of name -> array, got {type(state_dict).__name__}"
        )
    expected = {k: tuple(v.shape) for k, v in model.params.items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    not_arrays, not_floating, misshaped = [], [], []
    for k, shape in expected.items():
        if k not in state_dict:
            continue
        v = state_dict[k]
        if _library_of(v) is None:  # a NumPy array or scalar, or a CuPy array
            not_arrays.append(f"{k}: {type_name(v)}")
        elif v.dtype.kind != "f":
            not_floating.append(f"{k}: {v.dtype}")
        elif tuple(v.shape) != shape:
            misshaped.append(f"{k}: expected {shape}, got {tuple(v.shape)}")
    problems = []
    if not_arrays:
        problems.append("values that are not numpy or cupy arrays: " + "; ".join(not_arrays))
    if not_floating:
        problems.append("values that are not floating arrays: " + "; ".join(not_floating))
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped))
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(map(str, unexpected)))
    if problems:
        error = TypeError if not_arrays or not_floating else ValueError
        raise error(f"state_dict does not match {type(model).__name__}: " + " | ".join(problems))
    be = model.backend
    loaded = False
    for k in expected:
        if k in state_dict:
            v = state_dict[k]
            # C-contiguous (the fast paths and kernels need it), never the caller's array
            if _library_of(v) == be.name:  # one copy (a cast is one), on the device for CuPy
                model.params[k] = be.xp.array(v, dtype=model.dtype, copy=True, order="C")
            else:  # from the other backend: the transfer makes the new array
                model.params[k] = be.xp.ascontiguousarray(be.asarray(v, dtype=model.dtype))
            loaded = True
    if loaded:  # a pending forward's cache holds the arrays just replaced
        model._drop_cache("loaded")
    return missing, unexpected
