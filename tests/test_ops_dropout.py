"""dropout_forward / dropout_backward: the mask, determinism, eval mode, gradients, oracle."""

from __future__ import annotations

import numpy as np
import pytest
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=3)
probs = st.sampled_from([0.1, 0.5, 0.73])
dtypes = st.sampled_from([np.float32, np.float64])


def test_mask_is_deterministic_for_a_seed(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((8, 16)))
    a, _ = ops.dropout_forward(x, p=0.5, rng=backend.rng(7))
    b, _ = ops.dropout_forward(x, p=0.5, rng=backend.rng(7))
    c, _ = ops.dropout_forward(x, p=0.5, rng=backend.rng(8))
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    assert not np.array_equal(backend.to_numpy(a) == 0, backend.to_numpy(c) == 0)
    # One generator advances: two calls in a row draw two different masks.
    r = backend.rng(7)
    d, _ = ops.dropout_forward(x, p=0.5, rng=r)
    e, _ = ops.dropout_forward(x, p=0.5, rng=r)
    np.testing.assert_array_equal(backend.to_numpy(d), backend.to_numpy(a))
    assert not np.array_equal(backend.to_numpy(d), backend.to_numpy(e))


@fixture_settings()
@given(shape=shapes, p=probs, dtype=dtypes, seed=st.integers(0, 2**31))
def test_eval_mode_and_p_zero_are_identity(backend, shape, p, dtype, seed):
    x_h = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    x = backend.asarray(x_h)
    g = backend.asarray(np.random.default_rng(seed + 1).standard_normal(shape).astype(dtype))
    for out, cache in (
        ops.dropout_forward(x, p=p, rng=backend.rng(seed), train=False),
        ops.dropout_forward(x, p=p, train=False),  # no rng needed in eval mode
        ops.dropout_forward(x, p=0.0, rng=backend.rng(seed)),
        ops.dropout_forward(x, p=0.0),
    ):
        np.testing.assert_array_equal(backend.to_numpy(out), x_h)
        assert out.dtype == dtype
        (dx,) = ops.dropout_backward(g, cache)
        np.testing.assert_array_equal(backend.to_numpy(dx), backend.to_numpy(g))


@fixture_settings()
@given(shape=shapes, p=probs, dtype=dtypes, seed=st.integers(0, 2**31))
def test_kept_entries_scaled_and_backward_uses_same_mask(backend, shape, p, dtype, seed):
    # Entries of x are nonzero, so out == 0 exactly where an entry was dropped.
    x_h = (1.0 + np.random.default_rng(seed).random(shape)).astype(dtype)
    out, cache = ops.dropout_forward(backend.asarray(x_h), p=p, rng=backend.rng(seed))
    out = backend.to_numpy(out)
    assert out.dtype == dtype
    kept = out != 0
    # Kept entries carry 1 / (1 - p), as in inverted dropout (float32 rounds the scale once).
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(out[kept], x_h[kept] / (1 - p), rtol=tol)
    g = np.random.default_rng(seed + 1).standard_normal(shape).astype(dtype)
    (dx,) = ops.dropout_backward(backend.asarray(g), cache)
    dx = backend.to_numpy(dx)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx[~kept], 0.0)
    np.testing.assert_allclose(dx[kept], g[kept] / (1 - p), rtol=tol)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_expected_keep_fraction(backend, p):
    n = 200_000
    out, _ = ops.dropout_forward(backend.asarray(np.ones(n)), p=p, rng=backend.rng(0))
    kept = float((backend.to_numpy(out) != 0).mean())
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, f"kept {kept:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Inverted dropout keeps the expectation: mean(out) ~ 1.
    assert abs(float(backend.to_numpy(out).mean()) - 1.0) < 5 * sigma / (1 - p)


@fixture_settings()
@given(shape=shapes, p=probs, seed=st.integers(0, 2**31))
def test_backward_matches_central_differences(backend, shape, p, seed):
    x = np.random.default_rng(seed).standard_normal(shape)

    def fwd(x):  # a fresh generator each call, so every evaluation draws the same mask
        return ops.dropout_forward(x, p=p, rng=backend.rng(seed))

    check_grads(backend, fwd, ops.dropout_backward, [x], {0: 0}, seed=seed)


@fixture_settings()
@given(shape=shapes, p=probs, seed=st.integers(0, 2**31))
def test_matches_torch_with_the_same_mask(backend, shape, p, seed):
    torch = require("torch")
    x = 1.0 + np.random.default_rng(seed).random(shape)
    out, cache = ops.dropout_forward(backend.asarray(x), p=p, rng=backend.rng(seed))
    keep = np.asarray(backend.to_numpy(out) != 0)
    g = np.random.default_rng(seed + 1).standard_normal(shape)
    (dx,) = ops.dropout_backward(backend.asarray(g), cache)
    # torch.nn.functional.dropout draws its own mask; apply ours the way it applies its own.
    tx = to_torch(x)
    tout = tx * torch.from_numpy(keep).to(torch.float64) / (1 - p)
    tout.backward(torch.from_numpy(g))
    errs = (
        rel_err(backend.to_numpy(out), tout.detach().numpy()),
        rel_err(backend.to_numpy(dx), tx.grad.numpy()),
    )
    assert record_torch_err("dropout", *errs) <= 1e-10


def test_torch_dropout_statistics_agree(backend):
    # The same inverted-dropout law as torch.nn.functional.dropout: values in {0, x / (1 - p)}.
    torch = require("torch")
    p, n = 0.3, 100_000
    out, _ = ops.dropout_forward(backend.asarray(np.full(n, 2.0)), p=p, rng=backend.rng(1))
    t = torch.nn.functional.dropout(torch.full((n,), 2.0, dtype=torch.float64), p=p)
    ours, theirs = backend.to_numpy(out), t.numpy()
    assert set(np.unique(ours)) == set(np.unique(theirs)) == {0.0, 2.0 / (1 - p)}
    assert abs((ours == 0).mean() - (theirs == 0).mean()) < 0.01


def test_bad_input(backend):
    x = backend.asarray(np.zeros(4))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        ops.dropout_forward(x, p=1.0, rng=backend.rng(0))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got -0.1"):
        ops.dropout_forward(x, p=-0.1, rng=backend.rng(0))
    with pytest.raises(ValueError, match=r"needs rng=Backend.rng\(seed\)"):
        ops.dropout_forward(x, p=0.5)
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got int64"):
        ops.dropout_forward(backend.asarray(np.zeros(4, dtype=np.int64)), p=0.5, rng=backend.rng(0))
