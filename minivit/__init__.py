"""minivit: ViT and ViLT from scratch in NumPy and CuPy, every forward and backward by hand.

The layers, lowest first (nothing lower imports anything higher)::

    backend   numpy or cupy behind one interface
    ops       stateless forward/backward pairs: out, cache = f_forward(...); grads = f_backward(...)
    blocks    the pre-LN encoder block and encoder, built only from ops
    models    ViT, HybridViT, ViLT: explicit forward and backward, params in a flat dict
    train     optimizers, data, training loops, command line
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Models are imported lazily so that `import minivit` stays light and the ops can be used alone.
_LAZY = {
    "ViT": "minivit.models.vit",
    "HybridViT": "minivit.models.hybrid",
    "ViLT": "minivit.models.vilt",
    "create_model": "minivit.models.registry",
    "list_models": "minivit.models.registry",
    "get_backend": "minivit.backend",
    "ops": "minivit.ops",
    "no_grad": "minivit.ops",
    "grad_enabled": "minivit.ops",
    "set_grad_enabled": "minivit.ops",
    "convert": "minivit.convert",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minivit' has no attribute {name!r}")
