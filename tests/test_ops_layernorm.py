"""layernorm_forward / layernorm_backward: reference, gradients, PyTorch oracle, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

lead_dims = st.lists(st.integers(1, 4), min_size=0, max_size=3)
# "normal": N(0, 1) rows; "near_constant": c + 1e-6 * noise, rows whose variance is far below
# eps; "offset": 1e3 + noise, where a one-pass E[x^2] - E[x]^2 would lose most of its digits.
row_kinds = st.sampled_from(["normal", "near_constant", "offset"])


def ref_layernorm(x, gamma, beta, eps):
    """Row by row with exactly rounded sums (math.fsum), in float64."""
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    d = rows.shape[1]
    for i, row in enumerate(rows):
        mean = math.fsum(row) / d
        var = math.fsum((v - mean) ** 2 for v in row) / d
        out[i] = [(v - mean) / math.sqrt(var + eps) for v in row]
    return (out * gamma + beta).reshape(x.shape)


def _tol(x, tol):
    """tol, or the precision the rows themselves carry if that is coarser.

    An entry of x is known to eps |x|, so x - mean, and with it xhat, to eps |x| / |x - mean|:
    about 1e-9 relative on rows c + 1e-6 noise, worse where two noise draws nearly coincide.
    """
    if x.size == 0:
        return tol
    spread = np.abs(x - x.mean(axis=-1, keepdims=True)).max(axis=-1)
    # A constant row (D = 1 included) normalizes exactly to 0: it adds no uncertainty.
    cond = np.where(spread > 0, np.abs(x).max(axis=-1) / np.where(spread > 0, spread, 1.0), 1.0)
    return max(tol, 64 * np.finfo(float).eps * float(cond.max()))


def _draw(seed, lead, d, kind):
    r = np.random.default_rng(seed)
    noise = r.standard_normal((*lead, d))
    if kind == "near_constant":
        x = r.uniform(-5, 5) + 1e-6 * noise
    elif kind == "offset":
        x = 1e3 + noise
    else:
        x = noise
    return x, r.standard_normal(d), r.standard_normal(d)


@fixture_settings()
@given(
    lead=lead_dims,
    d=st.integers(1, 9),
    kind=row_kinds,
    eps=st.sampled_from([1e-6, 1e-5, 1e-12]),
    seed=st.integers(0, 2**31),
)
def test_forward_matches_reference(backend, lead, d, kind, eps, seed):
    x, gamma, beta = _draw(seed, lead, d, kind)
    out, cache = ops.layernorm_forward(*map(backend.asarray, (x, gamma, beta)), eps=eps)
    ref = ref_layernorm(x, gamma, beta, eps)
    assert rel_err(backend.to_numpy(out), ref) <= _tol(x, 1e-12)
    # The cache keeps what the backward needs: normalized x and 1 / std per row; the fused
    # CuPy kernel keeps x with the mean and 1 / std per row instead (kernels_cupy.py).
    if getattr(cache, "fused", False):
        assert cache.mean.shape == tuple(lead) and cache.rstd.shape == tuple(lead)
    else:
        assert cache.xhat.shape == x.shape and cache.rstd.shape == (*lead, 1)


@fixture_settings()
@given(
    lead=lead_dims,
    d=st.integers(1, 7),
    kind=row_kinds,
    eps=st.sampled_from([1e-6, 1e-5]),
    seed=st.integers(0, 2**31),
)
def test_backward_matches_central_differences(backend, lead, d, kind, eps, seed):
    x, gamma, beta = _draw(seed, lead, d, kind)
    # Near-constant rows vary on the scale sqrt(eps) ~ 1e-3: a smaller step keeps the
    # truncation error of the central difference (~ h^2 / eps) far below 1e-6.
    h = 1e-7 if kind == "near_constant" else 1e-6
    check_grads(
        backend,
        ops.layernorm_forward,
        ops.layernorm_backward,
        [x, gamma, beta],
        {0: 0, 1: 1, 2: 2},
        kwargs={"eps": eps},
        seed=seed,
        h=h,
        terms=_dx_terms,
    )


def _dx_terms(inputs, dout):
    """The size of the terms that dx = rstd (g - mean(g) - xhat mean(g xhat)) subtracts.

    With D = 2, dx is O(eps / std^3) while the terms are O(rstd |dout gamma|): rows such as
    1e3 + noise then leave dx with an absolute rounding error of eps times the terms' size.
    """
    x, gamma = inputs[0], inputs[1]
    var = x.var(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + 1e-6)
    return {0: float(np.abs(rstd).max() * np.abs(dout * gamma).max()) if x.size else 0.0}


@fixture_settings()
@given(lead=lead_dims, d=st.integers(2, 9), kind=row_kinds, seed=st.integers(0, 2**31))
def test_matches_torch(backend, lead, d, kind, seed):
    torch = require("torch")
    x, gamma, beta = _draw(seed, lead, d, kind)
    out, cache = ops.layernorm_forward(*map(backend.asarray, (x, gamma, beta)), eps=1e-6)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape)
    dx, dgamma, dbeta = ops.layernorm_backward(backend.asarray(g), cache)
    dx_scale = float(np.abs(backend.to_numpy(cache.rstd)).max() * np.abs(g * gamma).max())
    tx, tg, tb = map(to_torch, (x, gamma, beta))
    tout = torch.nn.functional.layer_norm(tx, (d,), tg, tb, eps=1e-6)
    tout.backward(torch.from_numpy(g))
    errs = [
        rel_err(backend.to_numpy(out), tout.detach().numpy()),
        # dx subtracts terms of size rstd |dout gamma|; with D = 2 the result is O(eps) only.
        rel_err(backend.to_numpy(dx), tx.grad.numpy(), scale=dx_scale),
        rel_err(backend.to_numpy(dgamma), tg.grad.numpy()),
        rel_err(backend.to_numpy(dbeta), tb.grad.numpy()),
    ]
    assert record_torch_err(f"layernorm[{kind}]", *errs) <= _tol(x, 1e-10)


def test_single_feature_rows(backend):
    # D = 1: xhat is identically 0, so out = beta and every gradient but dbeta is exactly 0.
    # (PyTorch returns rounding noise ~1e-14 here, which is why the oracle test draws D >= 2.)
    x, gamma, beta = np.array([[2.0], [-7.5]]), np.array([3.0]), np.array([0.25])
    out, cache = ops.layernorm_forward(*map(backend.asarray, (x, gamma, beta)))
    np.testing.assert_array_equal(backend.to_numpy(out), [[0.25], [0.25]])
    dx, dgamma, dbeta = ops.layernorm_backward(backend.asarray(np.array([[1.0], [2.0]])), cache)
    np.testing.assert_array_equal(backend.to_numpy(dx), 0.0)
    np.testing.assert_array_equal(backend.to_numpy(dgamma), 0.0)
    np.testing.assert_array_equal(backend.to_numpy(dbeta), [3.0])


def test_near_constant_float32_rows_stay_finite(backend):
    x = (3.0 + 1e-6 * np.random.default_rng(0).standard_normal((4, 16))).astype(np.float32)
    g, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    out, cache = ops.layernorm_forward(*map(backend.asarray, (x, g, b)))
    dx, _, _ = ops.layernorm_backward(backend.asarray(np.ones_like(x)), cache)
    assert out.dtype == np.float32 and dx.dtype == np.float32
    assert np.all(np.isfinite(backend.to_numpy(out))) and np.all(np.isfinite(backend.to_numpy(dx)))
    # A constant row normalizes to beta exactly. Its gradient is not zero: with var = 0,
    # d xhat / dx = (I - 1/D) / sqrt(eps), so dx = (g - mean(g)) / sqrt(eps).
    c = np.full((2, 5), 7.0)
    out, cache = ops.layernorm_forward(*map(backend.asarray, (c, np.ones(5), np.zeros(5))))
    np.testing.assert_array_equal(backend.to_numpy(out), 0.0)
    g = np.random.default_rng(1).standard_normal(c.shape)
    dx, _, _ = ops.layernorm_backward(backend.asarray(g), cache)
    expected = (g - g.mean(axis=-1, keepdims=True)) / np.sqrt(1e-6)
    np.testing.assert_allclose(backend.to_numpy(dx), expected, rtol=1e-12, atol=1e-12)


def test_skip_is_added_to_dx(backend):
    # A residual connection's gradient joins dx in the norm's backward: dx + skip, the parameter
    # gradients unchanged, skip itself left as it was. float32 takes the fast paths. On NumPy
    # the sum is exact; a GPU compiler fuses the kernel's last multiply with the add (one
    # rounding instead of two), so there it agrees to a float32 rounding.
    r = np.random.default_rng(3)
    x, d, skip = (backend.asarray(r.standard_normal((4, 200, 24)), dtype="float32") for _ in "xds")
    g, b = (backend.asarray(r.standard_normal(24), dtype="float32") for _ in "gb")
    kept = backend.to_numpy(skip).copy()
    _, cache = ops.layernorm_forward(x, g, b)
    dx, dg, db = ops.layernorm_backward(d, cache)
    dx_s, dg_s, db_s = ops.layernorm_backward(d, cache, skip=skip)
    if backend.name == "numpy":
        np.testing.assert_array_equal(dx_s, dx + skip)
    else:
        want = backend.to_numpy(dx + skip)
        np.testing.assert_allclose(backend.to_numpy(dx_s), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(backend.to_numpy(dg_s), backend.to_numpy(dg))
    np.testing.assert_array_equal(backend.to_numpy(db_s), backend.to_numpy(db))
    np.testing.assert_array_equal(backend.to_numpy(skip), kept)
    with pytest.raises(ValueError, match=r"skip must have shape \(4, 200, 24\)"):
        ops.layernorm_backward(d, cache, skip=skip[:, :3])
    with pytest.raises(
        TypeError, match=r"skip has dtype float64 but the forward.s output has dtype float32"
    ):
        ops.layernorm_backward(d, cache, skip=skip.astype("float64"))


def test_bad_input(backend):
    x = backend.asarray(np.zeros((2, 4)))
    g = backend.asarray(np.ones(4))
    with pytest.raises(ValueError, match=r"gamma must have shape \(4\)"):
        ops.layernorm_forward(x, backend.asarray(np.ones(3)), g)
    with pytest.raises(ValueError, match=r"beta must have shape \(4\)"):
        ops.layernorm_forward(x, g, backend.asarray(np.ones((1, 4))))
    with pytest.raises(ValueError, match=r"eps must be positive"):
        ops.layernorm_forward(x, g, g, eps=0.0)
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64"):
        ops.layernorm_forward(backend.asarray(np.zeros((2, 4), dtype=np.int32)), g, g)
    with pytest.raises(TypeError, match=r"gamma has dtype float32 but x has dtype float64"):
        ops.layernorm_forward(x, g.astype(np.float32), g)
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        ops.layernorm_forward(backend.asarray(np.float64(1.0).reshape(())), g, g)
