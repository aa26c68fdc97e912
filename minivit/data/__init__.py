"""Datasets and batching (host-side NumPy; batches move to the backend at the end)."""

from .digits import DigitsSplit, iterate_batches, load_digits_split, random_affine  # noqa: F401
