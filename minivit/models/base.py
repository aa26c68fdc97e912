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

from ..backend import get_backend

__all__ = ["Model", "load_state_dict_into", "resolve_dtype"]


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

    def _setup(self, config, dtype, backend):
        """Resolve the backend and dtype, store ``config`` (also as attributes)."""
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

        With strict=True every missing, unexpected and mis-shaped key is named in one
        ValueError. With strict=False only mis-shaped keys raise; missing keys keep their values
        and unexpected ones are ignored. Returns (missing, unexpected) like PyTorch.
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
    }

    def _drop_cache(self, why="dropped"):
        """Let go of the forward's cache; ``why`` is a key of ``_NO_CACHE_REASONS``."""
        self._cache = None
        self._no_cache = why

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
    """Check names and shapes against ``model.params``, then copy (cast to ``model.dtype``).

    Returns (missing, unexpected). Raises one ValueError naming every problem.
    """
    expected = {k: tuple(v.shape) for k, v in model.params.items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k}: expected {expected[k]}, got {given[k]}"
        for k in expected
        if k in given and given[k] != expected[k]
    ]
    problems = []
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped))
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if problems:
        raise ValueError(
            f"state_dict does not match {type(model).__name__}: " + " | ".join(problems)
        )
    be = model.backend
    for k in expected:
        if k in state_dict:
            v = state_dict[k]
            if getattr(v, "dtype", None) is not None and v.dtype.kind != "f":
                raise TypeError(f"state_dict[{k!r}] must be a floating array, got {v.dtype}")
            model.params[k] = be.asarray(be.to_numpy(v), dtype=model.dtype).copy()
    return missing, unexpected
