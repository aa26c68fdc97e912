"""Import timm, the reference ViT, without torchvision.

timm's ``VisionTransformer`` is the model minivit's ViT claims to compute, so timm itself is the
oracle for it. But ``import timm`` also imports torchvision, for features a ViT never touches:
``FrozenBatchNorm2d`` (CNN backbones), the data transforms and the datasets. torchvision's wheels
are built against one CUDA build of torch, so installing it pulls a multi-GB torch over the CPU
build the tests use. The README's test command therefore installs timm with ``--no-deps``, and
this module imports it behind placeholders for torchvision:

- Each ``torchvision`` module timm imports is an empty module. Any name read from it is a
  placeholder class: it can be read, compared, hashed and subclassed, as import-time code does,
  but creating one raises ``RuntimeError``. So a timm code path that really used torchvision
  would fail loudly instead of computing something else.
- The placeholders exist only while ``import timm`` runs. Then they are taken out of
  ``sys.modules`` and the import system, so nothing else (transformers asks whether torchvision
  is installed) ever sees a torchvision that is not there.

Where a real torchvision is installed, it is used and nothing is replaced.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["import_timm"]

_ROOT = "torchvision"


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _refuse(self, *args, **kwargs):
    raise RuntimeError(
        f"{type(self).__qualname__} is a placeholder: torchvision is not installed, and timm "
        "was imported without it (tests/_timm.py). Nothing a ViT computes may use it."
    )


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname,
                                                             "__init__": _refuse})  # fmt: skip


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``torchvision`` import with a placeholder module (a package, so that its
    submodules import too)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _ROOT or fullname.startswith(_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """``import timm`` with placeholders for torchvision if it is missing; returns the module.

    Raises ImportError when timm itself is not installed.
    """
    if "timm" in sys.modules or importlib.util.find_spec(_ROOT) is not None:
        return importlib.import_module("timm")
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        timm = importlib.import_module("timm")
        # what the ViT path needs, imported while the placeholders stand
        importlib.import_module("timm.models.vision_transformer")
        importlib.import_module("timm.layers")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == _ROOT or n.startswith(_ROOT + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()
    return timm
