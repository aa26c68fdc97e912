"""Models: ViT (and, from their own modules, the Hybrid ViT and ViLT) plus the config registry."""

from .registry import create_model, list_models, register_model  # noqa: F401
from .vit import ViT  # noqa: F401
