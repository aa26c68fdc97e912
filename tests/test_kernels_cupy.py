"""The fused CuPy kernels (minivit/kernels_cupy.py) against the generic xp code, on the device.

Each op runs twice on the same CuPy inputs, kernels off (the generic code: the reference that the
op tests check against float64 and PyTorch) and on; then the ops, kernels on, pass the float64
directional gradient checks of minivit.gradcheck on the device. Skipped, with the reason, where
CuPy or a CUDA device is missing. Budget: a few seconds on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _paths import both, close

from minivit import gradcheck as gc
from minivit import kernels_cupy, ops
from minivit.backend import BackendUnavailable, get_backend

try:
    BE = get_backend("cupy")
except BackendUnavailable as exc:  # no CuPy or no device: every test here needs one
    pytest.skip(f"fused CuPy kernels need a CUDA device: {exc}", allow_module_level=True)

pytestmark = pytest.mark.cupy

DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def _kernels_on():
    # These tests are about the kernels: on for each (a run on the CPU stand-in of CuPy turns
    # them off elsewhere, see conftest.py), and the previous setting restored after.
    prev = kernels_cupy.set_enabled(True)
    yield
    kernels_cupy.set_enabled(prev)


def _dev(a, dtype=None):
    return BE.asarray(a, dtype=dtype)


def _both(fn):
    return both(kernels_cupy.set_enabled, fn)


def _close(ref, got, dtype):
    close(ref, got, dtype, tol32=(1e-4, 3e-5), tol64=(1e-10, 1e-11), to_numpy=BE.to_numpy)


def test_kernels_are_used_on_contiguous_cupy_arrays():
    x = _dev(np.ones((4, 8), np.float32))
    assert kernels_cupy.use_kernels(x)
    assert not kernels_cupy.use_kernels(x.T)
    _, c = ops.layernorm_forward(x, _dev(np.ones(8, np.float32)), _dev(np.zeros(8, np.float32)))
    assert getattr(c, "fused", False)
    _, c = ops.gelu_forward(x)
    assert getattr(c, "fused", False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype, rng):
    x = _dev(rng.standard_normal((7, 33, 130)) * 3, dtype)
    d = _dev(rng.standard_normal((7, 33, 130)), dtype)

    def run():
        y, c = ops.gelu_forward(x)
        return y, ops.gelu_backward(d, c)[0]

    _close(*_both(run), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_matches_bias_then_gelu(dtype, rng):
    x = _dev(rng.standard_normal((50, 96)) * 2, dtype)
    b = _dev(rng.standard_normal(96), dtype)
    h = x.copy()
    y = kernels_cupy.bias_gelu_forward(h, b)  # h += b in place
    kernels_cupy.set_enabled(False)
    ref, _ = ops.gelu_forward(x + b)
    _close(ref, y, dtype)
    _close(x + b, h, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu(dtype, rng):
    # fc1 + GELU: the GEMM without its bias, then bias and GELU in one kernel
    x = _dev(rng.standard_normal((3, 17, 24)), dtype)
    w = _dev(rng.standard_normal((40, 24)) * 0.3, dtype)
    b = _dev(rng.standard_normal(40), dtype)
    d = _dev(rng.standard_normal((3, 17, 40)), dtype)

    def run():
        y, c = ops.linear_gelu_forward(x, w, b)
        return (y,) + ops.linear_gelu_backward(d, c)

    _close(*_both(run), dtype)
    _, c = ops.linear_gelu_forward(x, w, b)
    assert getattr(c.act, "fused", False)  # the kernel path ran


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [7, 32, 192, 1030])
def test_layernorm(dtype, D, rng):
    x = _dev(rng.standard_normal((3, 41, D)) * 2 + 3, dtype)
    g = _dev(rng.standard_normal(D), dtype)
    b = _dev(rng.standard_normal(D), dtype)
    d = _dev(rng.standard_normal((3, 41, D)), dtype)

    skip = _dev(rng.standard_normal((3, 41, D)), dtype)

    def run():
        y, c = ops.layernorm_forward(x, g, b, 1e-6)
        return (y,) + ops.layernorm_backward(d, c) + ops.layernorm_backward(d, c, skip=skip)[:1]

    _close(*_both(run), dtype)


def test_layernorm_backward_replays_bit_for_bit(rng):
    # dgamma and dbeta are summed in a fixed order (no atomics), so a replay gives the same bits
    x = _dev(rng.standard_normal((2, 150, 40)), np.float32)  # 3 chunks of rows
    g = _dev(rng.standard_normal(40), np.float32)
    d = _dev(rng.standard_normal((2, 150, 40)), np.float32)
    _, c = ops.layernorm_forward(x, g, g, 1e-6)
    assert getattr(c, "fused", False)
    first, again = ops.layernorm_backward(d, c), ops.layernorm_backward(d, c)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(BE.to_numpy(a), BE.to_numpy(b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 5, 197, 300, 1100])  # registers / loop (see the kernel)
def test_softmax(dtype, N, rng):
    x = _dev(rng.standard_normal((2, 3, 9, N)) * 8, dtype)
    d = _dev(rng.standard_normal((2, 3, 9, N)), dtype)

    def run():
        y, c = ops.softmax_forward(x)
        return y, ops.softmax_backward(d, c)[0]

    _close(*_both(run), dtype)


@pytest.mark.parametrize("N", [77, 600])  # float64 rows in registers, and the loop
def test_softmax_scale_and_in_place(N, rng):
    x = _dev(rng.standard_normal((20, N)), np.float64)
    ref = BE.to_numpy(x) * 0.125
    ref = np.exp(ref - ref.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    y = kernels_cupy.softmax_forward(x, 0.125, out=x)
    assert y is x
    np.testing.assert_allclose(BE.to_numpy(y), ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "key-mask"])
def test_attention(dtype, masked, rng):
    B, N, D, H = 3, 37, 64, 4
    x = _dev(rng.standard_normal((B, N, D)), dtype)
    w_qkv = _dev(rng.standard_normal((3 * D, D)) * 0.2, dtype)
    b_qkv = _dev(rng.standard_normal(3 * D), dtype)
    w_proj = _dev(rng.standard_normal((D, D)) * 0.2, dtype)
    b_proj = _dev(rng.standard_normal(D), dtype)
    d = _dev(rng.standard_normal((B, N, D)), dtype)
    mask = None
    if masked:  # padding after 20 keys, a sample with no valid key, and one with all of them
        m = np.ones((B, N), bool)
        m[0, 20:] = False
        m[1] = False
        mask = _dev(m)

    def run():
        y, c = ops.attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, H, key_mask=mask)
        return (y, c.attn) + ops.attention_backward(d, c)

    (ref, got) = _both(run)
    _close(ref, got, dtype)
    if masked:  # masked keys, and every key of the sample without any, get exactly 0
        p = BE.to_numpy(got[1])
        assert not p[0, :, :, 20:].any() and not p[1].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_update_matches_the_generic_update(dtype, rng):
    p0 = rng.standard_normal(1000)
    g = _dev(rng.standard_normal(1000), dtype)
    m0, v0 = rng.standard_normal(1000) * 0.1, np.abs(rng.standard_normal(1000)) * 0.01
    lr, wd, b1, b2, eps, t = 1e-3, 0.05, 0.9, 0.999, 1e-8, 3
    bc2 = math.sqrt(1 - b2**t)
    step_size, eps_hat, decay = lr * bc2 / (1 - b1**t), eps * bc2, 1 - lr * wd
    # generic: the formulas of minivit.optim.AdamW.step, written out with xp
    p, m, v = _dev(p0, dtype), _dev(m0, dtype), _dev(v0, dtype)
    p *= decay
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - step_size * m / (BE.xp.sqrt(v) + eps_hat)
    pk, mk, vk = _dev(p0, dtype), _dev(m0, dtype), _dev(v0, dtype)
    kernels_cupy.adamw_update(
        pk, g, mk, vk, b1=b1, b2=b2, step_size=step_size, eps_hat=eps_hat, decay=decay
    )
    _close((p, m, v), (pk, mk, vk), dtype)


# ----------------------------------------------------------------------------------------------
# gradient checks on the device, kernels on, float64


def test_gradcheck_gelu_layernorm_softmax_linear_gelu_on_device(rng):
    kernels_cupy.set_enabled(True)
    x = _dev(rng.standard_normal((3, 5, 40)))
    gc.check_backward(ops.gelu_forward, ops.gelu_backward, (x,)).assert_ok()
    gc.check_backward(ops.softmax_forward, ops.softmax_backward, (x * 3,)).assert_ok()
    g = _dev(rng.standard_normal(40))
    b = _dev(rng.standard_normal(40))
    gc.check_backward(ops.layernorm_forward, ops.layernorm_backward, (x, g, b)).assert_ok()
    w = _dev(rng.standard_normal((24, 40)) * 0.3)
    gc.check_backward(ops.linear_gelu_forward, ops.linear_gelu_backward, (x, w, b[:24])).assert_ok()


def test_gradcheck_attention_on_device(rng):
    kernels_cupy.set_enabled(True)
    B, N, D, H = 2, 6, 16, 2
    inputs = (
        _dev(rng.standard_normal((B, N, D))),
        _dev(rng.standard_normal((3 * D, D)) * 0.3),
        _dev(rng.standard_normal(3 * D)),
        _dev(rng.standard_normal((D, D)) * 0.3),
        _dev(rng.standard_normal(D)),
        H,
    )
    gc.check_backward(ops.attention_forward, ops.attention_backward, inputs).assert_ok()
    mask = np.ones((B, N), bool)
    mask[0, 4:] = False
    masked = inputs + (_dev(mask),)
    gc.check_backward(ops.attention_forward, ops.attention_backward, masked).assert_ok()
