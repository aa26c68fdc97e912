"""Named model configs: ``create_model(name, **overrides)`` and ``list_models()``.

A config is a function returning a model; register one with the ``register_model`` decorator
from any module (the ViLT and Hybrid modules register theirs when imported)::

    from minivit.models.registry import register_model

    @register_model
    def vilt_b32_mlm(**overrides):
        return ViLT(**{**dict(embed_dim=768, depth=12), **overrides})

``create_model`` imports the known model modules first, so their configs are always listed.
"""

from __future__ import annotations

import importlib

__all__ = ["register_model", "create_model", "list_models", "model_config"]

_REGISTRY: dict = {}
_CONFIGS: dict = {}

# Modules that register configs when imported; a missing one (not written yet) is skipped.
_MODEL_MODULES = ("minivit.models.vit", "minivit.models.hybrid", "minivit.models.vilt")


def register_model(fn=None, *, name=None, config=None):
    """Register ``fn(**overrides) -> model`` under ``name`` (default: fn.__name__).

    ``config`` (optional) is the dict of keyword arguments the name stands for; it is shown by
    :func:`model_config`.
    """

    def wrap(f):
        key = name or f.__name__
        _REGISTRY[key] = f
        if config is not None:
            _CONFIGS[key] = dict(config)
        return f

    return wrap(fn) if fn is not None else wrap


def register_config(name, cls, **config):
    """Register ``name`` as ``cls(**config, **overrides)`` (a shortcut for plain configs)."""

    def make(**overrides):
        return cls(**{**config, **overrides})

    make.__name__ = name
    make.__doc__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in config.items())})"
    register_model(make, name=name, config=config)
    return make


def _load_modules():
    for mod in _MODEL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def list_models():
    """Sorted names of every registered config."""
    _load_modules()
    return sorted(_REGISTRY)


def model_config(name):
    """The keyword arguments a registered name stands for (empty if it did not give them)."""
    _load_modules()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return dict(_CONFIGS.get(name, {}))


def create_model(name, **overrides):
    """Build the model registered as ``name``; keyword overrides replace config entries."""
    _load_modules()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**overrides)
