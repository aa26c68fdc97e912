"""Comparing an optimised path with the generic code it replaces (test_ops_fast, test_kernels_cupy).

``both`` runs a computation with the path switched off (the generic xp code, the reference the op
tests check against float64 and PyTorch) and then on; ``close`` compares the two results, nested
in tuples, relative to the largest entry: sums are taken in another order, so float32 results
differ by rounding that grows with the size of the terms.
"""

from __future__ import annotations

import numpy as np


def both(set_enabled, fn):
    """fn() with the path off, then on (``set_enabled(flag)`` switches it); -> (ref, got)."""
    set_enabled(False)
    ref = fn()
    set_enabled(True)
    got = fn()
    return ref, got


def close(ref, got, dtype, *, tol32, tol64, to_numpy=np.asarray):
    """Every array of ``got`` equals its twin in ``ref`` to (rtol, atol) = tol32 or tol64, the atol
    relative to the largest entry (at least 1). Tuples, lists and dicts (same keys, same order)
    are compared entry by entry; None must pair with None."""
    if isinstance(ref, dict):  # e.g. a model's grads: the same keys, then each array
        assert list(ref) == list(got)
        ref, got = tuple(ref.values()), tuple(got.values())
    if isinstance(ref, (tuple, list)):
        assert len(ref) == len(got)
        for r, g in zip(ref, got):
            close(r, g, dtype, tol32=tol32, tol64=tol64, to_numpy=to_numpy)
        return
    if ref is None:
        assert got is None
        return
    r, g = to_numpy(ref), to_numpy(got)
    assert g.dtype == r.dtype and g.shape == r.shape
    scale = max(float(np.abs(r).max()), 1.0)
    rtol, atol = tol32 if dtype == np.float32 else tol64
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * scale)
