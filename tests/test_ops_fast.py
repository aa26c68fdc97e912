"""The NumPy fast paths (minivit/ops/_fast.py, minivit/_parallel.py) against the generic code.

Each op is run twice on the same inputs, fast paths off (the generic xp code, the reference
tested elsewhere against float64 and PyTorch) and on, at sizes above the fast-path threshold,
on one and two threads. Budget: a few seconds.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from _paths import both, close
from _requires import require

from minivit import _parallel, ops
from minivit.ops import _fast


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    prev_on, prev_threads = _fast.enabled(), _parallel.get_num_threads()
    # Small blocks and no inline threshold, so that these test-sized arrays really run as many
    # blocks, on two threads where a test asks for two (the defaults keep arrays under 512K
    # elements inline and in one block).
    monkeypatch.setattr(_parallel, "BLOCK_ELEMS", 4096)
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_ELEMS", 0)
    yield
    _fast.set_enabled(prev_on)
    _parallel.set_num_threads(prev_threads)


def _both(fn):
    """fn() with the fast paths off, then on; returns (reference, fast)."""
    return both(_fast.set_enabled, fn)


def _close(ref, got, dtype):
    close(ref, got, dtype, tol32=(1e-4, 2e-5), tol64=(1e-11, 1e-12))


THREADS = [1, 2]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear(threads, dtype):
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 67, 96)).astype(dtype)
    w = rng.standard_normal((130, 96)).astype(dtype)
    b = rng.standard_normal(130).astype(dtype)
    d = rng.standard_normal((4, 67, 130)).astype(dtype)

    def run():
        out, c = ops.linear_forward(x, w, b)
        no_dx = ops.linear_backward(d, c, need_dx=False)  # dw, db only (training's first layer)
        assert no_dx[0] is None
        return (out,) + ops.linear_backward(d, c) + no_dx[1:]

    ref, got = _both(run)
    _close(ref, got, dtype)
    np.testing.assert_array_equal(got[2], got[4])  # the same dw with and without dx


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layernorm(threads, dtype):
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 101, 200)) * 3 + 5).astype(dtype)
    g = rng.standard_normal(200).astype(dtype)
    b = rng.standard_normal(200).astype(dtype)
    d = rng.standard_normal(x.shape).astype(dtype)
    skip = rng.standard_normal(x.shape).astype(dtype)
    x0, d0, skip0 = x.copy(), d.copy(), skip.copy()

    def run():
        out, c = ops.layernorm_forward(x, g, b, 1e-6)
        return (out,) + ops.layernorm_backward(d, c) + ops.layernorm_backward(d, c, skip=skip)[:1]

    _close(*_both(run), dtype)
    np.testing.assert_array_equal(x, x0)  # inputs untouched
    np.testing.assert_array_equal(d, d0)
    np.testing.assert_array_equal(skip, skip0)


@pytest.mark.parametrize("value", [1000.0, 2.0, -3e4])
def test_layernorm_constant_float32_rows_give_beta(value):
    """A constant row normalizes to beta exactly on the fast path too, as on the generic one:
    its mean is the row sum divided by D. (Taken as the row times a rounded 1/D, the mean
    missed by an ulp, and rstd = 1/sqrt(eps) made that 0.6 at 1000.)"""
    x = np.full((64, 768), value, np.float32)
    g = np.random.default_rng(3).standard_normal(768).astype(np.float32)
    b = np.random.default_rng(4).standard_normal(768).astype(np.float32)
    d = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)

    def run():
        out, c = ops.layernorm_forward(x, g, b, 1e-6)
        return (out, *ops.layernorm_backward(d, c))

    (ref_out, *ref_grads), (out, *grads) = _both(run)
    np.testing.assert_array_equal(out, np.broadcast_to(b, x.shape))
    np.testing.assert_array_equal(ref_out, out)
    dgamma, dbeta = grads[1:]
    np.testing.assert_array_equal(dgamma, 0.0)  # xhat is 0 everywhere
    np.testing.assert_allclose(dbeta, d.sum(0), rtol=1e-5, atol=1e-4)
    _close(ref_grads, grads, np.float32)


@pytest.mark.parametrize("threads", THREADS)
def test_gelu_exact_float32(threads):
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((5, 77, 300)) * 3).astype(np.float32)
    x[0, 0, :7] = [0.0, -0.0, 1e-8, -1e-8, 9.0, -9.0, -30.0]
    d = rng.standard_normal(x.shape).astype(np.float32)

    def run():
        out, c = ops.gelu_forward(x)
        return out, ops.gelu_backward(d, c)[0]

    ref, got = _both(run)
    # The fast float32 erf is a rational approximation (absolute error < 2e-7 after rounding):
    # compare absolutely, at the float32 resolution of the generic path.
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=5e-5)
    # and against float64 directly
    from scipy.special import erf

    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))
    assert np.abs(got[0] - exact).max() <= 1e-6 * max(1.0, np.abs(x64).max() / 9)
    assert got[0][0, 0, 0] == 0 and np.isfinite(got[0]).all()


def test_gelu_float32_erf_is_within_its_documented_error():
    """The fast float32 GELU against float64 over [-9, 9], point by point: the output within
    3e-7 of max(1, |x|) (rounding of the output itself is up to 2.4e-7 there; measured 1.7e-7)
    and the derivative within 5e-7 (measured 2.7e-7). A coefficient of the erf approximation
    rounded to 4 digits (p = 0.3276) is 2.3e-6 off and fails; the test above allows that."""
    from scipy.special import erf

    x = np.linspace(-9, 9, 300_000, dtype=np.float32)
    out, dydx = _fast.gelu_forward_f32(x.copy(), derivative=True)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + erf(x64 / np.sqrt(2)))
    pdf = np.exp(-0.5 * x64 * x64) / np.sqrt(2 * np.pi)
    assert (np.abs(out - x64 * cdf) / np.maximum(1.0, np.abs(x64))).max() <= 3e-7
    assert np.abs(dydx - (cdf + x64 * pdf)).max() <= 5e-7
    # inference: no derivative is made at all (an array of x's size saved)
    assert _fast.gelu_forward_f32(x.copy(), derivative=False)[1] is None


def test_gelu_backward_into_out_with_a_non_contiguous_gradient():
    """``out=`` is filled (and returned) when dout is a transposed view, which the fast
    product cannot take as it is: the fallback must still write into ``out``."""
    rng = np.random.default_rng(14)
    x = (rng.standard_normal((64, 400)) * 2).astype(np.float32)
    d = rng.standard_normal((400, 64)).astype(np.float32).T  # (64, 400), not C-contiguous
    _, c = ops.gelu_forward(x)
    (want,) = ops.gelu_backward(np.ascontiguousarray(d), c)
    out = np.zeros_like(x)
    assert ops.gelu_backward(d, c, out=out)[0] is out
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("grad", [True, False])
def test_bias_gelu_adds_the_bias_in_its_blocks_over_h(threads, grad):
    """fc1's fused path: GELU(h + b) with the bias added block by block and the output written
    over h. Exactly gelu_forward(h + b) (the same float32 add, the same formula), forward and
    backward, and h's memory is reused for the output."""
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(11)
    h = (rng.standard_normal((3, 97, 256)) * 2).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    d = rng.standard_normal(h.shape).astype(np.float32)
    with ops.set_grad_enabled(grad):
        want, cw = ops.gelu_forward(h + b)
        mine = h.copy()
        got, cg = ops.bias_gelu_forward(mine, b)
    assert np.shares_memory(got, mine)  # no new (M, Dout) array for the output
    np.testing.assert_array_equal(got, want)
    if grad:
        np.testing.assert_array_equal(ops.gelu_backward(d, cg)[0], ops.gelu_backward(d, cw)[0])


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_is_linear_then_gelu(threads, dtype, approximate, bias, monkeypatch):
    _parallel.set_num_threads(threads)
    biases = []  # the bias each blocked GELU was handed
    real = _fast.gelu_forward_f32
    monkeypatch.setattr(
        _fast,
        "gelu_forward_f32",
        lambda x, *a, **k: biases.append(k.get("bias")) or real(x, *a, **k),
    )
    rng = np.random.default_rng(12)
    # x2 (268, 64): above MIN_ELEMS, so with two threads the GEMMs run in row blocks on the
    # pool (the path that adds a bias inside its blocks)
    x = rng.standard_normal((4, 67, 64)).astype(dtype)
    w = (rng.standard_normal((200, 64)) * 0.3).astype(dtype)
    b = rng.standard_normal(200).astype(dtype) if bias else None
    d = rng.standard_normal((4, 67, 200)).astype(dtype)
    h, c_fc = ops.linear_forward(x, w, b)
    y0, c_act = ops.gelu_forward(h, approximate=approximate)
    want = (y0,) + ops.linear_backward(ops.gelu_backward(d, c_act)[0], c_fc)
    biases.clear()
    y, c = ops.linear_gelu_forward(x, w, b, approximate=approximate)
    got = (y,) + ops.linear_gelu_backward(d, c)
    # fc1's bias goes to GELU's blocks exactly where they run (float32, exact form)
    fused = bias and dtype == np.float32 and approximate == "none"
    assert [v is not None for v in biases] == ([True] if fused else [False] * len(biases))
    for g, e in zip(got, want):
        if e is None:
            assert g is None
        else:  # the bias lands in the same rows either way: equal to the last bit
            np.testing.assert_array_equal(g, e)


def test_blocked_sums_come_out_the_same_every_run():
    """Column sums over row blocks (a bias gradient, layernorm's dgamma and dbeta) add the
    blocks' partial sums in block order, not in the order two threads finish them: float32
    results must not change from run to run."""
    _parallel.set_num_threads(2)
    rng = np.random.default_rng(13)
    d = rng.standard_normal((4, 67, 200)).astype(np.float32)
    x = rng.standard_normal((4, 67, 48)).astype(np.float32)
    w = rng.standard_normal((200, 48)).astype(np.float32)  # small: db by _fast.column_sum
    _, c_fc = ops.linear_forward(x, w, rng.standard_normal(200).astype(np.float32))
    _, c_ln = ops.layernorm_forward(d, np.ones(200, np.float32), np.zeros(200, np.float32))

    def sums():
        return ops.linear_backward(d, c_fc)[2], *ops.layernorm_backward(d, c_ln)[1:]

    first = sums()
    for _ in range(20):
        for got, want in zip(sums(), first):
            np.testing.assert_array_equal(got, want)


def test_gelu_fast_cache_keeps_the_derivative_not_x():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 400)).astype(np.float32)
    _fast.set_enabled(True)
    out, c = ops.gelu_forward(x)
    assert c.x is None and c.dydx.shape == x.shape  # x can be freed after the forward
    d = rng.standard_normal((400, 64)).astype(np.float32).T  # a non-contiguous gradient
    (dx,) = ops.gelu_backward(d, c)
    np.testing.assert_allclose(dx, d * c.dydx, rtol=1e-6, atol=0)
    (dx_c,) = ops.gelu_backward(np.ascontiguousarray(d), c)
    np.testing.assert_allclose(dx_c, dx, rtol=1e-6, atol=0)


def test_gelu_float64_and_tanh_take_the_generic_path():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 400))
    out, c = ops.gelu_forward(x)
    assert getattr(c, "dydx", None) is None  # float64 keeps the library erf
    out, c = ops.gelu_forward(x.astype(np.float32), approximate="tanh")
    assert getattr(c, "dydx", None) is None


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax(threads, dtype):
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 3, 61, 150)) * 10).astype(dtype)
    _check_softmax(x, rng.standard_normal(x.shape).astype(dtype), dtype)


def _check_softmax(x, d, dtype):
    """softmax forward and backward, fast against generic; the fast rows sum to 1."""

    def run():
        y, c = ops.softmax_forward(x)
        return y, ops.softmax_backward(d, c)[0]

    ref, got = _both(run)
    _close(ref, got, dtype)
    np.testing.assert_allclose(got[0].sum(-1), 1, rtol=1e-5 if dtype == np.float32 else 1e-12)
    return got


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_gemms_on_the_pool(threads, stride):
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 8, 16, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)

    def run():
        out, c = ops.conv2d_forward(x, w, b, stride=stride, padding=1)
        d = np.cos(out)  # any fixed upstream gradient of the output's shape
        return (out,) + ops.conv2d_backward(d, c)

    _close(*_both(run), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_rows_far_below_the_block_maximum(dtype):
    # The fast path shifts each block of rows by the block's maximum; rows whose own maximum is
    # far below it underflow and must be redone with their own shift (ops/_fast.py, softmax_).
    rng = np.random.default_rng(6)
    x = rng.standard_normal((256, 128)).astype(dtype)
    x[1::3] -= 200.0  # exp(-200) underflows in float32 (1e-87; float64 still holds it)
    x[2::3] -= 1e4  # underflows in float64 too
    got = _check_softmax(x, rng.standard_normal(x.shape).astype(dtype), dtype)
    assert np.all(np.isfinite(got[0]))


@pytest.mark.parametrize("scale", [None, 0.5])
def test_softmax_rows_just_below_the_block_maximum_keep_their_small_entries(scale):
    """Rows whose maximum lies 60-100 below their block's: the block's shift leaves their sum
    between float32's smallest normal number and its square root, where the entries below 1
    lose their precision to denormals. Those rows must be redone too (the threshold is the
    square root: measured 4.9e-7 here, and 1.2e-4 with the smallest normal as threshold)."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    s = 1.0 if scale is None else scale
    x[1::2] -= (60.0 + rng.uniform(0, 40, (128, 1)).astype(np.float32)) / s
    want = ops.softmax_forward(x.astype(np.float64) * s)[0]
    got = _fast.softmax_(x.copy(), scale)
    big = want > 1e-30
    assert (np.abs(got[big] - want[big]) / want[big]).max() <= 1e-5


@pytest.fixture
def attention_paths(monkeypatch):
    """Counts of attention's fast forward and backward calls: a test of the fast path must see
    it run (arrays below ``_fast.MIN_ELEMS`` take the generic path on both sides unnoticed)."""
    from minivit.ops import attention

    calls = {"forward": 0, "backward": 0}
    for name, key in (("_fast_forward", "forward"), ("_fast_backward", "backward")):
        real = getattr(attention, name)

        def counted(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(attention, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scaled_softmax_rows_far_below_the_block_maximum(dtype):
    """Attention's softmax takes a scale: softmax(scale * S). The rows redone with their own
    shift (far below their block's maximum) must be scaled too."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((256, 64)).astype(dtype) * 4
    x[1::3] -= 2000.0  # times the scale 0.125: exp(-250) underflows in float32
    x[2::3] -= 1e5
    scale = 0.125
    want = ops.softmax_forward(x.astype(np.float64) * scale)[0].astype(dtype)
    got = _fast.softmax_(x.copy(), scale)
    _close(want, got, dtype)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [3, 1])  # a batch of one splits the heads over the threads
def test_attention(threads, dtype, B, attention_paths):
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(5)
    N, D, H = 65, 96, 4  # P (B, H, N, N) above MIN_ELEMS for B = 1 too
    x = rng.standard_normal((B, N, D)).astype(dtype)
    w_qkv = (rng.standard_normal((3 * D, D)) * 0.2).astype(dtype)
    b_qkv = rng.standard_normal(3 * D).astype(dtype)
    w_proj = (rng.standard_normal((D, D)) * 0.2).astype(dtype)
    b_proj = rng.standard_normal(D).astype(dtype)
    d = rng.standard_normal((B, N, D)).astype(dtype)

    def run():
        out, c = ops.attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, H)
        return (out, c.attn) + ops.attention_backward(d, c)

    _close(*_both(run), dtype)
    assert attention_paths == {"forward": 1, "backward": 1}  # the fast run took the fast path


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fully_masked", [False, True])
def test_attention_with_a_key_mask(threads, dtype, fully_masked, attention_paths):
    """Padded keys (ViLT's text): the fast path adds the mask as -inf and gives the masked keys
    exact zeros; a sequence with no valid key at all gets P = 0 rows, as on the generic path."""
    _parallel.set_num_threads(threads)
    rng = np.random.default_rng(6)
    B, N, D, H = 3, 41, 48, 4  # qkv (B, N, 3D) above MIN_ELEMS: the fast path runs
    x = rng.standard_normal((B, N, D)).astype(dtype)
    w_qkv = (rng.standard_normal((3 * D, D)) * 0.3).astype(dtype)
    w_proj = (rng.standard_normal((D, D)) * 0.3).astype(dtype)
    mask = np.ones((B, N), dtype=bool)
    mask[0, 30:] = False
    mask[2, 5:] = False
    if fully_masked:
        mask[1] = False
    d = rng.standard_normal((B, N, D)).astype(dtype)

    def run():
        out, c = ops.attention_forward(x, w_qkv, None, w_proj, None, H, key_mask=mask)
        return (out, c.attn) + ops.attention_backward(d, c)

    ref, got = _both(run)
    _close(ref, got, dtype)
    assert attention_paths == {"forward": 1, "backward": 1}
    attn = got[1]
    assert (np.moveaxis(attn, 3, 1)[~mask] == 0).all()  # masked keys (b, j): exactly 0
    if fully_masked:
        assert (attn[1] == 0).all()


# NumPy warns about the inf - inf and the overflow this test makes on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_softmax_non_finite_scores_stay_in_their_rows():
    # A NaN or inf score makes the block maximum useless; only its own row may come out NaN,
    # as on the generic path.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    x[5, 7] = np.nan
    x[70, 3] = np.inf
    x[140] = -np.inf
    x[200, 0], x[201, 0] = 3e38, -3e38  # the distance to the block maximum overflows

    def run():
        y, _ = ops.softmax_forward(x)
        return y

    ref, got = _both(run)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    bad = np.isnan(ref).any(axis=1)
    assert bad.sum() == 3  # the NaN, +inf and all -inf rows
    np.testing.assert_allclose(got[~bad], ref[~bad], rtol=1e-5, atol=1e-7)


def test_gelu_fast_path_refuses_float64():
    with pytest.raises(TypeError, match="float32"):
        _fast.gelu_forward_f32(np.ones((4, 4)))


def test_blas_single_threaded_nests_and_overlaps_across_threads():
    threadpoolctl = require("threadpoolctl")
    libs = _parallel._blas_controllers()
    if not libs:
        pytest.skip("threadpoolctl found no BLAS library")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        counts = lambda: [lib.num_threads for lib in libs]  # noqa: E731
        entered, release = threading.Event(), threading.Event()

        def other():
            with _parallel.blas_single_threaded():
                entered.set()
                release.wait(5)

        with _parallel.blas_single_threaded():
            assert counts() == [1] * len(libs)
            with _parallel.pool_only():  # nested: no change
                assert counts() == [1] * len(libs)
            t = threading.Thread(target=other)
            t.start()
            assert entered.wait(5)
            release.set()
            t.join()  # the other thread closed its context first: nothing restored yet
            assert counts() == [1] * len(libs)
            assert _parallel._blas_depth == 1
        assert counts() == [2] * len(libs)  # the last to close restored the counts
        assert _parallel._blas_depth == 0


def test_limit_blas_threads_limits_restores_and_goes_without_threadpoolctl(monkeypatch):
    """The training jobs' BLAS limit: held inside, restored after, nothing for 0, and (on an
    install without threadpoolctl, as the device run's --no-deps one) a warning, not a crash."""
    threadpoolctl = require("threadpoolctl")

    libs = _parallel._blas_controllers()
    if not libs:
        pytest.skip("threadpoolctl found no BLAS library")
    counts = lambda: [lib.num_threads for lib in libs]  # noqa: E731
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        with _parallel.limit_blas_threads(1):
            assert counts() == [1] * len(libs)
        assert counts() == [2] * len(libs)
        with _parallel.limit_blas_threads(0):
            assert counts() == [2] * len(libs)
        monkeypatch.setitem(sys.modules, "threadpoolctl", None)
        with pytest.warns(RuntimeWarning, match="threadpoolctl is not installed"):
            with _parallel.limit_blas_threads(1):
                assert counts() == [2] * len(libs)


def test_fast_paths_are_skipped_for_non_contiguous_and_small_inputs():
    rng = np.random.default_rng(6)
    big = rng.standard_normal((300, 400)).astype(np.float32)
    _fast.set_enabled(True)  # also under MINIVIT_FAST=0 (the fixture restores the setting)
    assert _fast.use_fast(big)
    assert not _fast.use_fast(big.T)  # a transposed view
    assert not _fast.use_fast(big[:10, :10])
    _fast.set_enabled(False)
    assert not _fast.use_fast(big)


def test_for_each_block_covers_every_row_once_on_threads():
    _parallel.set_num_threads(2)
    seen = []
    lock = threading.Lock()

    def fn(s, e):
        with lock:
            seen.append((s, e))

    _parallel.for_each_block(fn, 1000, 300, block_elems=3000, min_elems=0)
    rows = sorted(r for s, e in seen for r in range(s, e))
    assert rows == list(range(1000))
    assert all(e - s <= 10 for s, e in seen)


def test_for_each_block_raises_a_worker_error():
    _parallel.set_num_threads(2)

    def fn(s, e):
        if s > 0:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        _parallel.for_each_block(fn, 1000, 300, block_elems=3000, min_elems=0)


@pytest.mark.parametrize("total", ["small", "large"])
def test_for_each_group_calls_every_key_once(total):
    """Every key once; below ``min_elems`` in all, inline on the calling thread in the keys'
    order (the pool's hand-over costs more than a small model's parameters take to copy);
    above it, on the pool's threads too."""
    _parallel.set_num_threads(2)
    sizes = {f"p{i}": 10 + i for i in range(40)}  # 1180 elements of work in all
    calls, lock, barrier = [], threading.Lock(), threading.Barrier(2, timeout=30)

    def fn(k):
        with lock:
            calls.append((k, threading.get_ident()))
        if total == "large" and k in ("p39", "p38"):  # the two groups' first keys meet here
            barrier.wait()

    _parallel.for_each_group(fn, sizes, min_elems=2000 if total == "small" else 1000)
    assert sorted(k for k, _ in calls) == sorted(sizes)
    threads = {t for _, t in calls}
    if total == "small":
        assert [k for k, _ in calls] == list(sizes) and threads == {threading.get_ident()}
    else:
        assert len(threads) == 2  # both groups ran at once: the barrier let them both through
