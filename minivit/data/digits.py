"""scikit-learn's 8x8 digits: a seeded stratified split, normalisation, augmentation, batches.

Everything here runs with NumPy on the host; a batch moves to the compute backend only at the end
(``Backend.asarray``), so augmentation costs no device round trips and gives the same numbers on
every backend.

Pixels come as integers 0..16; they are scaled to [0, 1] (background 0) for augmentation, and
normalised with the training set's mean and standard deviation right before the model sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DigitsSplit",
    "load_digits_split",
    "iterate_batches",
    "random_translate",
    "random_affine",
    "NUM_CLASSES",
]

NUM_CLASSES = 10
IMG_SIZE = 8


@dataclass
class DigitsSplit:
    """A train/test split of the digits.

    x_train, x_test: (n, 1, 8, 8) float64 in [0, 1]; y_train, y_test: (n,) int64;
    mean, std: the training pixels' statistics used by :meth:`normalize`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float
    test_size: float
    seed: int

    def normalize(self, x, dtype="float32"):
        """[0, 1] pixels -> zero-mean unit-variance model inputs, in ``dtype``."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(dtype)


def load_digits_split(test_size=0.2, seed=0) -> DigitsSplit:
    """Load ``sklearn.datasets.load_digits`` and split it, stratified by class, with ``seed``.

    The split depends only on (test_size, seed), so a checkpoint that records them can rebuild
    its test set exactly.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    digits = load_digits()
    x = (digits.images.astype(np.float64) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return DigitsSplit(
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        mean=float(x_tr.mean()),
        std=float(x_tr.std()),
        test_size=float(test_size),
        seed=int(seed),
    )


def iterate_batches(n, batch_size, rng=None, drop_last=False):
    """Index arrays for one epoch over n samples: shuffled with ``rng`` (a numpy Generator), or
    in order when rng is None."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def random_translate(x, rng, max_shift=1):
    """Shift each image (B, C, H, W) by whole pixels, uniform in [-max_shift, max_shift] per
    axis, filling with zeros (the background). Whole pixels keep the strokes sharp, as in the
    test images; one vectorised gather for the batch."""
    B, C, H, W = x.shape
    s = int(max_shift)
    if s == 0:
        return x.copy()
    padded = np.zeros((B, C, H + 2 * s, W + 2 * s), dtype=x.dtype)
    padded[:, :, s : s + H, s : s + W] = x
    dy, dx = rng.integers(-s, s + 1, (2, B))  # (B,) each
    rows = (s - dy)[:, None] + np.arange(H)[None]  # (B, H) source rows
    cols = (s - dx)[:, None] + np.arange(W)[None]  # (B, W) source columns
    b = np.arange(B)[:, None, None]
    out = padded[b, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.transpose(0, 3, 1, 2)


def random_affine(x, rng, max_shift=1.0, max_rotate=0.0, scale=(1.0, 1.0)):
    """Randomly shift, rotate and scale each image (B, C, H, W), bilinear, zero outside.

    max_shift: pixels, uniform in [-max_shift, max_shift] per axis; max_rotate: degrees;
    scale: (low, high) zoom factor. All images are transformed in one vectorised gather.
    """
    B, C, H, W = x.shape
    if max_shift == 0 and max_rotate == 0 and scale == (1.0, 1.0):
        return x.copy()
    theta = np.deg2rad(rng.uniform(-max_rotate, max_rotate, B))  # (B,)
    s = rng.uniform(scale[0], scale[1], B)  # (B,)
    shift = rng.uniform(-max_shift, max_shift, (B, 2))  # (B, 2) as (dy, dx)
    cy, cx = (H - 1) / 2.0, (W - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(H) - cy, np.arange(W) - cx, indexing="ij")  # (H, W)
    # Inverse map: an output pixel p samples the input at R(-theta) (p - shift) / s.
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]  # (B, 1, 1)
    py = yy[None] - shift[:, 0, None, None]  # (B, H, W)
    px = xx[None] - shift[:, 1, None, None]
    sy = (cos * py - sin * px) / s[:, None, None] + cy  # (B, H, W) source row
    sx = (sin * py + cos * px) / s[:, None, None] + cx  # (B, H, W) source column
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    wy, wx = sy - y0, sx - x0
    padded = np.zeros((B, C, H + 2, W + 2), dtype=x.dtype)  # one ring of zeros
    padded[:, :, 1:-1, 1:-1] = x
    b = np.arange(B)[:, None, None]

    def tap(yi, xi):
        ok = (yi >= -1) & (yi <= H) & (xi >= -1) & (xi <= W)  # inside the zero ring
        v = padded[b, :, np.clip(yi + 1, 0, H + 1), np.clip(xi + 1, 0, W + 1)]  # (B, H, W, C)
        return v * ok[..., None]

    out = (
        tap(y0, x0) * ((1 - wy) * (1 - wx))[..., None]
        + tap(y0, x0 + 1) * ((1 - wy) * wx)[..., None]
        + tap(y0 + 1, x0) * (wy * (1 - wx))[..., None]
        + tap(y0 + 1, x0 + 1) * (wy * wx)[..., None]
    )  # (B, H, W, C)
    return out.transpose(0, 3, 1, 2).astype(x.dtype)
