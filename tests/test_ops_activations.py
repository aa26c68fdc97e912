"""gelu (exact and tanh forms) and tanh: reference, gradients, PyTorch oracle, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4)
scales = st.sampled_from([0.1, 1.0, 4.0, 12.0])  # 12: deep in both tails
approx = st.sampled_from(["none", "tanh"])


def ref_gelu(x, approximate):
    """Element by element with the math module, in float64."""
    x = np.asarray(x, dtype=np.float64)
    if approximate == "none":
        f = lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))  # noqa: E731
    else:
        c = math.sqrt(2.0 / math.pi)
        f = lambda v: 0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v**3)))  # noqa: E731
    return np.array([f(v) for v in x.reshape(-1)]).reshape(x.shape)


def ref_tanh(x):
    return np.array([math.tanh(v) for v in np.ravel(x)]).reshape(np.shape(x))


def _max(a):
    return float(np.max(a)) if np.size(a) else 0.0


def _draw(seed, shape, scale):
    return scale * np.random.default_rng(seed).standard_normal(shape)


@fixture_settings()
@given(shape=shapes, scale=scales, approximate=approx, seed=st.integers(0, 2**31))
def test_gelu_forward_matches_reference(backend, shape, scale, approximate, seed):
    x = _draw(seed, shape, scale)
    out, _ = ops.gelu_forward(backend.asarray(x), approximate=approximate)
    assert out.shape == x.shape
    assert rel_err(backend.to_numpy(out), ref_gelu(x, approximate)) <= 1e-14


@fixture_settings()
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**31))
def test_tanh_forward_matches_reference(backend, shape, scale, seed):
    x = _draw(seed, shape, scale)
    out, _ = ops.tanh_forward(backend.asarray(x))
    assert rel_err(backend.to_numpy(out), ref_tanh(x)) <= 1e-15


@fixture_settings()
@given(shape=shapes, scale=scales, approximate=approx, seed=st.integers(0, 2**31))
def test_gelu_backward_matches_central_differences(backend, shape, scale, approximate, seed):
    x = _draw(seed, shape, scale)
    check_grads(
        backend,
        ops.gelu_forward,
        ops.gelu_backward,
        [x],
        {0: 0},
        kwargs={"approximate": approximate},
        seed=seed,
    )


@fixture_settings()
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**31))
def test_tanh_backward_matches_central_differences(backend, shape, scale, seed):
    x = _draw(seed, shape, scale)
    check_grads(backend, ops.tanh_forward, ops.tanh_backward, [x], {0: 0}, seed=seed)


@fixture_settings()
@given(shape=shapes, scale=scales, approximate=approx, seed=st.integers(0, 2**31))
def test_gelu_matches_torch(backend, shape, scale, approximate, seed):
    torch = require("torch")
    x = _draw(seed, shape, scale)
    out, cache = ops.gelu_forward(backend.asarray(x), approximate=approximate)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape)
    (dx,) = ops.gelu_backward(backend.asarray(g), cache)
    tx = to_torch(x)
    tout = torch.nn.functional.gelu(tx, approximate=approximate)
    tout.backward(torch.from_numpy(g))
    # In the negative tail Phi = (1 + erf) / 2 or (1 + tanh) / 2 cancels: GELU's rounding error
    # is then eps |x| (not eps |GELU|), and the backward's is eps |dout| times the size of its
    # terms; both formulas, ours and PyTorch's, share this. Errors are measured against those.
    if approximate == "tanh":
        dudx = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)
        dterms = np.abs(g) * (1 + 0.5 * np.abs(x) * dudx)
    else:
        dterms = np.abs(g) * (1 + np.abs(x))
    errs = (
        rel_err(backend.to_numpy(out), tout.detach().numpy(), scale=_max(np.abs(x))),
        rel_err(backend.to_numpy(dx), tx.grad.numpy(), scale=_max(dterms)),
    )
    assert record_torch_err(f"gelu[{approximate}]", *errs) <= 1e-10


@fixture_settings()
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**31))
def test_tanh_matches_torch(backend, shape, scale, seed):
    torch = require("torch")
    x = _draw(seed, shape, scale)
    out, cache = ops.tanh_forward(backend.asarray(x))
    g = np.random.default_rng(seed + 1).standard_normal(x.shape)
    (dx,) = ops.tanh_backward(backend.asarray(g), cache)
    tx = to_torch(x)
    tout = torch.tanh(tx)
    tout.backward(torch.from_numpy(g))
    # dx = dout (1 - y^2): for |x| >> 1 the subtraction cancels, and the error is measured
    # against |dout|, the size of the terms (see test_tanh_gradient_in_the_tails).
    terms = float(np.abs(g).max()) if g.size else 0.0
    errs = (
        rel_err(backend.to_numpy(out), tout.detach().numpy()),
        rel_err(backend.to_numpy(dx), tx.grad.numpy(), scale=terms),
    )
    assert record_torch_err("tanh", *errs) <= 1e-10


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    "shape, dtype",
    [((3, 5), "float64"), ((64, 300), "float32")],  # the second takes NumPy's fast path
    ids=["generic", "fast-path-size"],
)
def test_gelu_backward_into_out_and_into_dout(backend, approximate, shape, dtype):
    """``out=`` receives the same dx, and may be dout itself (linear_gelu_backward's
    overwrite_dout, which a model's consuming backward uses)."""
    r = np.random.default_rng(5)
    x = backend.asarray(r.standard_normal(shape).astype(dtype) * 2)
    d = backend.asarray(r.standard_normal(shape).astype(dtype))
    _, c = ops.gelu_forward(x, approximate=approximate)
    (want,) = ops.gelu_backward(d, c)
    out = backend.xp.empty_like(d)
    assert ops.gelu_backward(d, c, out=out)[0] is out
    np.testing.assert_array_equal(backend.to_numpy(out), backend.to_numpy(want))
    assert ops.gelu_backward(d, c, out=d)[0] is d
    np.testing.assert_array_equal(backend.to_numpy(d), backend.to_numpy(want))


def test_linear_gelu_backward_may_overwrite_dout(backend):
    r = np.random.default_rng(6)
    x = backend.asarray(r.standard_normal((4, 7, 5)))
    w, b = backend.asarray(r.standard_normal((9, 5))), backend.asarray(r.standard_normal(9))
    y, c = ops.linear_gelu_forward(x, w, b)
    d = backend.asarray(r.standard_normal(y.shape))
    keep = backend.to_numpy(d).copy()
    want = ops.linear_gelu_backward(d, c)
    np.testing.assert_array_equal(backend.to_numpy(d), keep)  # untouched by default
    got = ops.linear_gelu_backward(d, c, overwrite_dout=True)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(backend.to_numpy(g), backend.to_numpy(e))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 300, 256)])  # the second takes the fast paths
def test_bias_gelu_is_gelu_of_h_plus_b(backend, approximate, dtype, shape, request):
    """bias_gelu_forward (fc1's activation with its bias, h handed over) gives gelu_forward(h +
    b), forward and backward, on every path: generic, NumPy blocks, the CuPy kernel."""
    from minivit import kernels_cupy

    prev = kernels_cupy.set_enabled(True)  # on CuPy (stand-in runs turn them off by default)
    request.addfinalizer(lambda: kernels_cupy.set_enabled(prev))
    r = np.random.default_rng(7)
    h = (r.standard_normal(shape) * 3).astype(dtype)
    b = r.standard_normal(shape[-1]).astype(dtype)
    d = backend.asarray(r.standard_normal(shape).astype(dtype))
    want, cw = ops.gelu_forward(backend.asarray(h + b), approximate=approximate)
    got, cg = ops.bias_gelu_forward(backend.asarray(h), backend.asarray(b), approximate)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(want), **tol)
    (dg,), (dw,) = ops.gelu_backward(d, cg), ops.gelu_backward(d, cw)
    np.testing.assert_allclose(backend.to_numpy(dg), backend.to_numpy(dw), **tol)


def test_bias_gelu_checks_its_bias(backend):
    h = backend.asarray(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"b must have shape \(4\)"):
        ops.bias_gelu_forward(h, backend.asarray(np.ones((3, 4))))
    with pytest.raises(TypeError, match="dtype"):
        ops.bias_gelu_forward(h, backend.asarray(np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        ops.bias_gelu_forward(backend.asarray(np.float64(1.0)), backend.asarray(np.ones(1)))


def test_tanh_gradient_in_the_tails(backend):
    # Backward uses 1 - y^2 with y = tanh(x) rounded to float64, so for |x| >> 1 its absolute
    # error is that of y (~eps), while 1 - y^2 itself shrinks like 4 exp(-2|x|): relative errors
    # there are large for every y-based implementation (PyTorch's too, which is why the oracle
    # test above measures dx against |dout|). Check the absolute bound against the exact sech^2.
    x = np.concatenate([np.linspace(-20, -5, 16), np.linspace(5, 20, 16)])
    g = np.random.default_rng(0).standard_normal(x.shape)
    _, cache = ops.tanh_forward(backend.asarray(x))
    (dx,) = ops.tanh_backward(backend.asarray(g), cache)
    exact = g / np.cosh(x) ** 2
    assert np.all(np.abs(backend.to_numpy(dx) - exact) <= 4 * np.finfo(float).eps * np.abs(g))


def test_gelu_known_values(backend):
    # GELU(0) = 0, GELU'(0) = 1/2; far tails: GELU(x) -> x and -> 0.
    x = backend.asarray(np.array([0.0, 40.0, -40.0]))
    out, cache = ops.gelu_forward(x)
    np.testing.assert_array_equal(backend.to_numpy(out), [0.0, 40.0, -0.0])
    (dx,) = ops.gelu_backward(backend.asarray(np.ones(3)), cache)
    np.testing.assert_allclose(backend.to_numpy(dx), [0.5, 1.0, 0.0], atol=1e-300)


def test_bad_input(backend):
    x = backend.asarray(np.zeros(3))
    with pytest.raises(ValueError, match=r"approximate must be 'none' or 'tanh', got 'erf'"):
        ops.gelu_forward(x, approximate="erf")
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got int64"):
        ops.gelu_forward(backend.asarray(np.zeros(3, dtype=np.int64)))
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got float16"):
        ops.tanh_forward(backend.asarray(np.zeros(3, dtype=np.float16)))
    with pytest.raises(TypeError, match=r"x must be a NumPy or CuPy array, got float"):
        ops.tanh_forward(1.0)
