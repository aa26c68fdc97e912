"""softmax_forward / softmax_backward: reference, invariants, gradients, oracle, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)
# (scale, offset): ordinary logits, logits spread over ~1e3 (one-hot rows), and logits all
# near 1e3 (exp would overflow without the max subtracted).
regimes = st.sampled_from([(1.0, 0.0), (1e3, 0.0), (1.0, 1e3), (30.0, -1e3)])


def _draw(seed, shape, regime):
    scale, offset = regime
    return offset + scale * np.random.default_rng(seed).standard_normal(shape)


@fixture_settings()
@given(shape=shapes, regime=regimes, data=st.data(), seed=st.integers(0, 2**31))
def test_forward_matches_reference_and_rows_sum_to_one(backend, shape, regime, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = _draw(seed, shape, regime)
    y, _ = ops.softmax_forward(backend.asarray(x), axis=axis)
    y = backend.to_numpy(y)
    assert rel_err(y, scipy.special.softmax(x, axis=axis)) <= 1e-13
    assert np.all(y >= 0) and np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=0, atol=1e-13)


@fixture_settings()
@given(shape=shapes, regime=regimes, data=st.data(), seed=st.integers(0, 2**31))
def test_backward_matches_central_differences(backend, shape, regime, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = _draw(seed, shape, regime)
    check_grads(
        backend,
        ops.softmax_forward,
        ops.softmax_backward,
        [x],
        {0: 0},
        kwargs={"axis": axis},
        seed=seed,
    )


@fixture_settings()
@given(shape=shapes, regime=regimes, data=st.data(), seed=st.integers(0, 2**31))
def test_matches_torch(backend, shape, regime, data, seed):
    torch = require("torch")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = _draw(seed, shape, regime)
    y, cache = ops.softmax_forward(backend.asarray(x), axis=axis)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape)
    (dx,) = ops.softmax_backward(backend.asarray(g), cache)
    tx = to_torch(x)
    ty = torch.softmax(tx, dim=axis)
    ty.backward(torch.from_numpy(g))
    # dx = y * dout - y * <dout, y> subtracts terms of size |y| |dout|: on a saturated row the
    # result is far smaller than that, and its error is measured against the terms' size.
    terms = float(np.abs(backend.to_numpy(y)).max() * np.abs(g).max()) if g.size else 0.0
    errs = (
        rel_err(backend.to_numpy(y), ty.detach().numpy()),
        rel_err(backend.to_numpy(dx), tx.grad.numpy(), scale=terms),
    )
    assert record_torch_err("softmax", *errs) <= 1e-10


def test_large_float32_logits_do_not_overflow(backend):
    x = np.array([[1e3, 1e3 - 1.0, -1e3], [88.0, 89.0, 90.0]], dtype=np.float32)
    y, cache = ops.softmax_forward(backend.asarray(x))
    y = backend.to_numpy(y)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, scipy.special.softmax(x.astype(np.float64), axis=-1), rtol=1e-6)


def test_bad_input(backend):
    x = backend.asarray(np.zeros((2, 3)))
    with pytest.raises(
        ValueError, match=r"axis must be in \[-2, 2\) for x of shape \(2, 3\), got 2"
    ):
        ops.softmax_forward(x, axis=2)
    with pytest.raises(ValueError, match=r"axis must be in"):
        ops.softmax_forward(x, axis=-3)
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got int64"):
        ops.softmax_forward(backend.asarray(np.zeros((2, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        ops.softmax_forward(backend.asarray(np.zeros(())))
