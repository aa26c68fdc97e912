"""Optimizers, the learning-rate schedule and gradient clipping, on a flat dict of parameters.

A model keeps its parameters in ``model.params`` (name -> array) and its gradients in
``model.grads`` (same keys). The optimizers here update ``params`` **in place**, so the model's
arrays stay the same objects, and work on NumPy and CuPy alike::

    opt = AdamW(model.params, lr=1e-3, weight_decay=0.05)
    sched = WarmupCosine(base_lr=1e-3, total_steps=1000, warmup_steps=50)
    for step in range(1000):
        model.forward(...); model.backward(...)
        clip_grad_norm(model.grads, max_norm=1.0)
        opt.step(model.grads, lr=sched(step))

The semantics are PyTorch's (``torch.optim.AdamW``, ``torch.optim.SGD``,
``torch.nn.utils.clip_grad_norm_``), and the tests compare against them step by step.

Weight decay and which parameters get it
----------------------------------------
Decay is applied only to parameters for which ``no_decay(name, param)`` is false. The default
rule, :func:`default_no_decay`, exempts (as timm and BERT-style recipes do):

* every parameter with ``ndim <= 1``: biases and the LayerNorm / BatchNorm weights;
* ``cls_token`` and ``pos_embed`` (the last component of the name, so ``transformer.pos_embed``
  too) and ``dist_token``;
* any name containing ``position_embeddings``, ``token_type_embeddings`` or ``norm``
  (case-insensitive; this catches ``LayerNorm.weight`` and ``norm1.weight`` whatever their shape).

Pass your own predicate to change it, e.g. ``no_decay=lambda name, p: False`` to decay
everything.

State
-----
``state_dict()`` returns plain arrays under flat string keys (``"step"``, the optimizer's step
count; ``"step.<name>"``, the steps that updated each parameter; ``"exp_avg.<name>"``,
``"exp_avg_sq.<name>"`` for AdamW, ``"momentum_buffer.<name>"`` for SGD), so a checkpoint
(safetensors) can hold them and ``load_state_dict`` resumes bit for bit. A state without the
per-parameter counts (written before they existed) loads with every count equal to ``"step"``.

Checks
------
Hyperparameters are refused (ValueError, or TypeError for a non-number) unless finite and in
range, in the constructors and in ``step(..., lr=...)``: lr, weight_decay and eps >= 0, betas a
pair in [0, 1), SGD's momentum and dampening >= 0 (as torch; no upper bound). Python
and NumPy numbers (and 0-d arrays) are taken. ``step`` needs a dict of gradients, as
``model.grads``; an empty one (a step before any backward, or after ``model.zero_grads()``)
updates nothing, as torch's step does when every ``.grad`` is None, and warns
(``RuntimeWarning``) rather than raising, so that a loop that steps that way keeps running;
``step_count`` still counts it.

A parameter without a gradient at a step is left alone, as PyTorch leaves a parameter whose
``.grad`` is None, and its own step count stays where it was: like PyTorch's per-parameter
state, that count (not the optimizer's) sets AdamW's bias correction and SGD's first momentum
step, so a parameter that first gets a gradient late is updated as PyTorch updates it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

from . import kernels_cupy
from .backend import array_module, backend_of
from .models.base import float_arg

__all__ = [
    "AdamW",
    "SGD",
    "WarmupCosine",
    "warmup_cosine_lr",
    "clip_grad_norm",
    "global_grad_norm",
    "default_no_decay",
]

NoDecayRule = Callable[[str, object], bool]

_NO_DECAY_LEAVES = frozenset({"cls_token", "pos_embed", "dist_token"})
_NO_DECAY_SUBSTRINGS = ("position_embeddings", "token_type_embeddings", "norm")


def _real(name: str, value, low: float = 0.0, high: float = math.inf, *, high_open=False):
    """A hyperparameter (or a step's lr) as a float: ``models.base.float_arg``, the check the
    models' constructors use, in [low, high] (or [low, high) with ``high_open``)."""
    return float_arg(name, value, low, high, below=high_open)


def default_no_decay(name: str, param) -> bool:
    """True when ``param`` should get no weight decay (see the module docstring for the rule)."""
    if param.ndim <= 1:
        return True
    if name.rsplit(".", 1)[-1] in _NO_DECAY_LEAVES:
        return True
    lowered = name.lower()
    return any(s in lowered for s in _NO_DECAY_SUBSTRINGS)


class _Optimizer:
    """What AdamW and SGD share: the parameter dict, decay groups, step count and state I/O."""

    _buffers: tuple[str, ...] = ()  # names of the per-parameter state arrays

    def __init__(self, params: Mapping[str, object], lr: float, weight_decay: float, no_decay):
        if not isinstance(params, Mapping) or not params:
            raise TypeError("params must be a non-empty dict of name -> array")
        for name, p in params.items():
            dtype = getattr(p, "dtype", None)
            if dtype is None or getattr(dtype, "kind", None) != "f":
                raise TypeError(f"params[{name!r}] must be a floating array, got {dtype}")
        lr = _real("lr", lr)
        weight_decay = _real("weight_decay", weight_decay)
        if no_decay is not None and not callable(no_decay):
            raise TypeError(
                f"no_decay must be a function (name, param) -> bool or None, got "
                f"{type(no_decay).__name__}"
            )
        backend_of(*params.values())  # one backend for all
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        rule = default_no_decay if no_decay is None else no_decay
        self.decay = {name: not rule(name, p) for name, p in params.items()}
        self.step_count = 0  # optimizer steps taken
        self.param_steps = {name: 0 for name in params}  # the steps that updated each parameter
        # Per-parameter buffers, allocated once so every step reuses them.
        self.state = {
            buf: {name: array_module(p).zeros_like(p) for name, p in params.items()}
            for buf in self._buffers
        }

    @property
    def decay_names(self) -> list[str]:
        """Parameters that get weight decay."""
        return [n for n, d in self.decay.items() if d]

    @property
    def no_decay_names(self) -> list[str]:
        """Parameters exempt from weight decay."""
        return [n for n, d in self.decay.items() if not d]

    def _check_grads(self, grads: Mapping[str, object]):
        if not isinstance(grads, Mapping):
            raise TypeError(
                "grads must be a dict of name -> array (or None), as model.grads, got "
                f"{type(grads).__name__}"
            )
        if not grads:
            # Most likely a step before any backward, or right after model.zero_grads(): then
            # nothing is updated, as torch's step() does when every .grad is None. Said, not
            # raised: a loop that skips a step this way keeps running.
            warnings.warn(
                f"{type(self).__name__}.step got an empty grads dict: no parameter is updated "
                "(was backward run since the last zero_grads()?)",
                RuntimeWarning,
                stacklevel=3,
            )
        unknown = [k for k in grads if k not in self.params]
        if unknown:
            raise KeyError(
                f"grads has names that are not parameters: {', '.join(map(str, unknown))} "
                "(an optimizer over some of a model's parameters, the others frozen, takes "
                "their gradients alone: {k: g for k, g in model.grads.items() if k in params})"
            )
        for name, g in grads.items():
            if g is None:
                continue
            p = self.params[name]
            if getattr(g, "shape", None) is None or getattr(g, "dtype", None) is None:
                raise TypeError(
                    f"grads[{name!r}] must be an array (or None), got {type(g).__name__}"
                )
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(
                    f"grads[{name!r}] has shape {tuple(g.shape)}, params[{name!r}] has "
                    f"shape {tuple(p.shape)}"
                )
            if g.dtype != p.dtype:
                raise TypeError(
                    f"grads[{name!r}] has dtype {g.dtype}, params[{name!r}] has dtype {p.dtype}"
                )

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """The optimizer state as copies of plain arrays under flat keys (see module docstring).

        Arrays stay on the parameters' backend; ``"step"`` is a 0-d int64 array.
        """
        xp = array_module(*self.params.values())
        out: dict[str, object] = {"step": xp.asarray(self.step_count, dtype=xp.int64)}
        for name, n in self.param_steps.items():
            out[f"step.{name}"] = xp.asarray(n, dtype=xp.int64)
        for buf, arrays in self.state.items():
            for name, a in arrays.items():
                out[f"{buf}.{name}"] = a.copy()
        return out

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore from :meth:`state_dict` (arrays of either backend). Copies into the existing
        buffers; a wrong key set or shape raises naming every offending key. The per-parameter
        step counts may be absent as a whole (an older state): each is then ``"step"``."""
        expected = {"step"} | {f"{b}.{n}" for b in self.state for n in self.params}
        counts = {f"step.{n}" for n in self.params}
        if counts & set(state):
            expected |= counts
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected - counts)
        misshaped = []
        for b, arrays in self.state.items():
            for n, a in arrays.items():
                key = f"{b}.{n}"
                if key in state and tuple(state[key].shape) != tuple(a.shape):
                    misshaped.append(f"{key}: {tuple(state[key].shape)} != {tuple(a.shape)}")
        if missing or unexpected or misshaped:
            parts = []
            if missing:
                parts.append("missing keys: " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected keys: " + ", ".join(unexpected))
            if misshaped:
                parts.append("wrong shapes: " + "; ".join(misshaped))
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + " | ".join(parts))
        be = backend_of(*self.params.values())

        def count(key):
            return int(be.to_numpy(be.asarray(state[key])).reshape(()))

        self.step_count = count("step")
        self.param_steps = {
            n: count(f"step.{n}") if f"step.{n}" in state else self.step_count for n in self.params
        }
        for b, arrays in self.state.items():
            for n, a in arrays.items():
                a[...] = be.asarray(state[f"{b}.{n}"], dtype=a.dtype)

    def _lr(self, lr):
        if lr is None:
            return self.lr
        # checked like the constructor's: a negative lr would ascend, a NaN poison every param
        self.lr = _real("lr", lr)  # a scheduled lr stays the current one, as in a param group
        return self.lr


class AdamW(_Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    Per parameter with gradient ``g``, at step ``t`` (starting at 1)::

        p   <- p * (1 - lr * wd)                 # decoupled decay, only where decay applies
        m   <- beta1 m + (1 - beta1) g
        v   <- beta2 v + (1 - beta2) g^2
        p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    A parameter whose gradient is ``None`` or absent is left untouched at this step (no decay
    either), as PyTorch does for a parameter without ``.grad``; its moments keep their values,
    and ``t`` is the parameter's own count of updates, as in PyTorch's per-parameter state.
    """

    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Mapping[str, object],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        no_decay: NoDecayRule | None = None,
    ):
        super().__init__(params, lr, weight_decay, no_decay)
        try:
            b1, b2 = betas
        except (TypeError, ValueError) as exc:  # not iterable / not two of them
            raise type(exc)(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        b1 = _real("betas[0]", b1, 0.0, 1.0, high_open=True)
        b2 = _real("betas[1]", b2, 0.0, 1.0, high_open=True)
        self.betas = (b1, b2)
        self.eps = _real("eps", eps)

    def step(self, grads: Mapping[str, object], lr: float | None = None) -> None:
        """One update of every parameter that has a gradient, in place."""
        self._check_grads(grads)
        lr = self._lr(lr)
        b1, b2 = self.betas
        self.step_count += 1
        m_all, v_all = self.state["exp_avg"], self.state["exp_avg_sq"]
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            self.param_steps[name] += 1
            t = self.param_steps[name]  # this parameter's own count, as in torch's state
            # m_hat / (sqrt(v_hat) + eps) = s m / (sqrt(v) + eps sqrt(1 - b2^t)) with
            # s = sqrt(1 - b2^t) / (1 - b1^t): the bias corrections go into two scalars, which
            # saves a pass over v (the "more efficient order" of the Adam paper, section 2).
            bc2_sqrt = math.sqrt(1.0 - b2**t)
            step_size = lr * bc2_sqrt / (1.0 - b1**t)
            eps_hat = self.eps * bc2_sqrt
            xp = array_module(p)
            m, v = m_all[name], v_all[name]
            decay = 1.0 - lr * self.weight_decay if self.weight_decay and self.decay[name] else 1.0
            if kernels_cupy.use_kernels(p, g, m, v):
                # On the GPU the whole update below is one fused launch (kernels_cupy.py), not ten.
                kernels_cupy.adamw_update(
                    p, g, m, v, b1=b1, b2=b2, step_size=step_size, eps_hat=eps_hat, decay=decay
                )
                continue
            if decay != 1.0:
                p *= decay
            # One scratch array per parameter, reused for every intermediate below.
            tmp = xp.multiply(g, 1.0 - b1)  # (1 - b1) g
            m *= b1
            m += tmp
            xp.multiply(g, g, out=tmp)
            tmp *= 1.0 - b2  # (1 - b2) g^2
            v *= b2
            v += tmp
            xp.sqrt(v, out=tmp)
            tmp += eps_hat  # (sqrt(v_hat) + eps) * sqrt(1 - b2^t)
            xp.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    Per parameter, with coupled (L2) weight decay where decay applies::

        d   <- g + wd * p
        buf <- d                                   at the parameter's first update
        buf <- momentum * buf + (1 - dampening) d  afterwards
        d   <- d + momentum * buf   if nesterov, else buf
        p   <- p - lr * d
    """

    def __init__(
        self,
        params: Mapping[str, object],
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        no_decay: NoDecayRule | None = None,
    ):
        momentum = _real("momentum", momentum)  # >= 0, as torch; no upper bound there either
        dampening = _real("dampening", dampening)  # >= 0; torch sets no upper bound either
        # a Python or NumPy bool (np.True_: dtype kind "b", on NumPy 1 and 2 alike)
        if not (isinstance(nesterov, bool) or getattr(nesterov, "dtype", None) == "bool"):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self._buffers = ("momentum_buffer",) if momentum else ()
        super().__init__(params, lr, weight_decay, no_decay)
        self.momentum = momentum
        self.dampening = dampening
        self.nesterov = bool(nesterov)

    def step(self, grads: Mapping[str, object], lr: float | None = None) -> None:
        """One update of every parameter that has a gradient, in place."""
        self._check_grads(grads)
        lr = self._lr(lr)
        self.step_count += 1
        mu = self.momentum
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            first = self.param_steps[name] == 0  # torch: the momentum buffer is still None
            self.param_steps[name] += 1
            xp = array_module(p)
            if self.weight_decay and self.decay[name]:
                d = xp.multiply(p, self.weight_decay)
                d += g  # g + wd p, a fresh array: g itself is never modified
            else:
                d = g
            if mu:
                buf = self.state["momentum_buffer"][name]
                if first:
                    buf[...] = d
                else:
                    buf *= mu
                    if self.dampening:
                        buf += (1.0 - self.dampening) * d
                    else:
                        buf += d
                if self.nesterov:
                    d = d + mu * buf
                else:
                    d = buf
            p -= lr * d


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def warmup_cosine_lr(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> float:
    """The learning rate for the optimizer step with 0-based index ``step``.

    Linear warmup from 0 over ``warmup_steps`` steps (``base_lr * step / warmup_steps``, so step
    0 has lr 0 when there is a warmup), then a half cosine from ``base_lr`` down to ``min_lr`` at
    ``step = total_steps``; ``min_lr`` after that. With ``min_lr = 0`` this is exactly
    ``transformers.get_cosine_schedule_with_warmup`` times ``base_lr`` up to ``total_steps``
    (past it, transformers' cosine rises again; this one stays at ``min_lr``).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """:func:`warmup_cosine_lr` with its settings bound: ``sched(step) -> lr``."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr=0.0):
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self(0)  # validate the settings now rather than at the first step

    def __call__(self, step: int) -> float:
        return warmup_cosine_lr(
            step,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            min_lr=self.min_lr,
        )

    def __repr__(self) -> str:
        return (
            f"WarmupCosine(base_lr={self.base_lr}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, min_lr={self.min_lr})"
        )


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------


def global_grad_norm(grads: Mapping[str, object], norm_type: float = 2.0):
    """The norm of all gradients taken together, as a 0-d array on their backend.

    ``None`` entries are skipped. ``norm_type`` is 2 (Euclidean) or ``inf`` (largest entry).
    """
    gs = [g for g in grads.values() if g is not None]
    if not gs:
        raise ValueError("grads has no arrays")
    xp = array_module(*gs)
    if norm_type == math.inf:
        return xp.max(xp.stack([xp.abs(g).max() for g in gs]))
    if norm_type != 2.0:
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")
    # dot of the flat view: one BLAS reduction per array, no squared temporary.
    sq = xp.stack([xp.dot(g.reshape(-1), g.reshape(-1)) for g in gs])
    return xp.sqrt(sq.sum())


def clip_grad_norm(grads: Mapping[str, object], max_norm: float, norm_type: float = 2.0):
    """Scale all gradients in place so that their global norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the factor is ``min(1, max_norm / (norm + 1e-6))``,
    applied to every gradient, and the norm before clipping is returned (a 0-d array; ``float()``
    it to log). The factor stays on the device, so clipping never waits for the GPU.
    """
    total = global_grad_norm(grads, norm_type)
    xp = array_module(total)
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0)
    for g in grads.values():
        if g is not None:
            g *= coef.astype(g.dtype)
    return total
