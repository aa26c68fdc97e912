"""Datasets and batching (host-side NumPy; batches move to the backend at the end)."""

from .digits import (  # noqa: F401
    DigitsSplit,
    iterate_batches,
    load_digits_split,
    random_affine,
    random_translate,
)
from .wordpiece import WordPieceTokenizer  # noqa: F401
