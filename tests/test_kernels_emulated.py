"""The fused CuPy kernels, run on the CPU by a SIMT emulator.

``test_kernels_cupy.py`` runs the kernels on a GPU; where there is none (CI, most sessions) this
file runs the same CUDA text and the same Python launch code (``minivit/kernels_cupy.py`` with
``tests/_cuda_emu.py``'s stand-in for the ``cupy`` module) on the CPU, and compares each kernel
with the generic NumPy op it replaces, as the device test does. The emulator's own checks come
first: each shows a mistake it must catch (so a green run here means something). Skipped, with
the reason, where g++ is missing. ``test_kernels_nvrtc.py`` compiles the same text for sm_90.
"""

from __future__ import annotations

import math

import _cuda_emu as emu
import numpy as np
import pytest
from _paths import both, close
from _requires import skipping_missing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivit import gradcheck as gc
from minivit import kernels_cupy, ops

# Without g++ every test here fails with the emulator's "no C++ compiler (g++)" (a check
# skipped quietly would pass for one that ran), except in the device run, which skips what its
# machine lacks (tests/_requires.py) and runs the real kernels instead.
if emu.CXX is None and skipping_missing():
    pytest.skip("the SIMT emulator needs g++", allow_module_level=True)

DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    """kernels_cupy builds and launches its kernels through the emulator (one multiprocessor,
    so the layernorm backward's grid-stride loop takes several turns)."""
    fake = emu.fake_cupy(multiprocessors=1)
    monkeypatch.setattr(kernels_cupy, "_cp", lambda: fake)
    monkeypatch.setattr(kernels_cupy, "_CACHE", {})
    return fake


def _close(ref, got, dtype):
    close(ref, got, dtype, tol32=(1e-4, 3e-5), tol64=(1e-10, 1e-11))


def _normal(rng, shape, dtype, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


# ----------------------------------------------------------------------------------------------
# the emulator catches what a GPU would get wrong silently

_PROBE = r"""
typedef float T;
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
extern "C" __global__ void probe(const T* x, T* y, int n, int mode) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (mode == 1 && threadIdx.x % 32 == 5) return;   // one lane leaves its warp
    T v = i < n ? x[i] : (T)0;
    T s = warp_sum(v);                                 // every lane gets its warp's total
    if (mode == 2) { y[i + 1] = s; return; }           // one past the end for the last thread
    if (i < n) y[i] = s;
}
"""


def _probe(x, mode, n_type=np.int32, block=64):
    y = np.full_like(x, np.nan)
    k = emu.RawKernel(_PROBE, "probe")
    k((math.ceil(x.size / block),), (block,), (x, y, n_type(x.size), np.int32(mode)))
    return y


def test_emulator_warp_shuffles_reach_across_lanes():
    x = np.arange(100, dtype=np.float32)
    want = np.repeat([x[i : i + 32].sum() for i in range(0, 128, 32)], 32)[:100]
    np.testing.assert_array_equal(_probe(x, 0), want)


def test_emulator_reports_a_shuffle_after_a_lane_returned():
    with pytest.raises(emu.EmulatorError, match="returned"):
        _probe(np.ones(64, np.float32), 1)


def test_emulator_reports_lanes_at_different_shuffles():
    src = r"""
    extern "C" __global__ void split(float* y) {
        float v = (float)threadIdx.x;
        if (threadIdx.x % 2) v = __shfl_xor_sync(0xffffffffu, v, 1);   // odd lanes here
        else v = __shfl_xor_sync(0xffffffffu, v, 2);                    // even lanes there
        y[threadIdx.x] = v;
    }
    """
    with pytest.raises(emu.EmulatorError, match="different __shfl_xor_sync calls"):
        emu.RawKernel(src, "split")((1,), (32,), (np.zeros(32, np.float32),))


def test_emulator_reports_a_write_out_of_bounds():
    with pytest.raises(emu.EmulatorError, match="outside an array"):
        _probe(np.ones(64, np.float32), 2)


def test_emulator_rejects_a_scalar_of_the_wrong_size():
    with pytest.raises(emu.EmulatorError, match="pass np.int32, not int64"):
        _probe(np.ones(64, np.float32), 0, n_type=np.int64)


_SHARED = r"""
extern "C" __global__ void shared(float* y, int n) {
    extern __shared__ unsigned char raw[];
    float* buf = reinterpret_cast<float*>(raw);
    buf[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    y[threadIdx.x] = buf[(threadIdx.x + 1) % n];
}
"""


def test_emulator_shares_memory_in_a_block_and_guards_its_end():
    k = emu.RawKernel(_SHARED, "shared")
    y = np.full(64, np.nan, np.float32)
    k((1,), (64,), (y, np.int32(64)), shared_mem=64 * 4)
    np.testing.assert_array_equal(y, np.roll(np.arange(64, dtype=np.float32), -1))
    with pytest.raises(emu.EmulatorError, match="outside the dynamic shared memory"):
        k((1,), (64,), (y, np.int32(64)), shared_mem=32 * 4)


def test_emulator_shuffle_width_keeps_lanes_in_their_segment():
    src = r"""
    extern "C" __global__ void seg(float* y) {
        float v = (float)threadIdx.x;
        y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 16, 16)     // a later segment: own
                         + 100 * __shfl_down_sync(0xffffffffu, v, 4, 8)  // end of segment: own
                         + 10000 * __shfl_sync(0xffffffffu, v, 9, 8);   // lane 9 % 8 of segment
    }
    """
    y = np.full(32, np.nan, np.float32)
    emu.RawKernel(src, "seg")((1,), (32,), (y,))
    lane = np.arange(32)
    xor = np.where(lane < 16, lane, lane ^ 16)  # the upper half reads the lower (earlier) one
    down = np.where(lane % 8 + 4 < 8, lane + 4, lane)
    want = xor + 100 * down + 10000 * (lane // 8 * 8 + 1)
    np.testing.assert_array_equal(y, want.astype(np.float32))


def test_emulator_leaves_unwritten_outputs_nan(emulated):
    assert np.isnan(emulated.empty_like(np.ones(3, np.float32))).all()
    src = r"""
    extern "C" __global__ void evens(float* y) {
        if (threadIdx.x % 2 == 0) y[threadIdx.x] = 1.0f;   // the odd entries are never written
    }
    """
    y = emulated.empty_like(np.ones(32, np.float32))
    emu.RawKernel(src, "evens")((1,), (32,), (y,))
    assert (y[::2] == 1).all() and np.isnan(y[1::2]).all()


def test_emulator_gives_every_block_fresh_shared_memory():
    """Shared memory does not outlive its block: a read before any write is NaN in every block
    (on a GPU it is whatever an earlier block left, so a kernel must not rely on it)."""
    src = r"""
    extern "C" __global__ void stale(float* y) {
        extern __shared__ unsigned char raw[];
        float* buf = reinterpret_cast<float*>(raw);
        y[blockIdx.x] = buf[0];   // read before write
        __syncthreads();
        buf[0] = 1.0f;
    }
    """
    y = np.zeros(3, np.float32)
    emu.RawKernel(src, "stale")((3,), (32,), (y,), shared_mem=4)
    assert np.isnan(y).all()


def test_emulator_reports_rows_past_the_end(monkeypatch, rng):
    """Mutation check: the layernorm forward without `if (row >= M) return;` lets the warps of
    the last block past the last row write beyond the outputs."""
    src = kernels_cupy.RAW["minivit_ln_fwd"]
    broken = src.replace("if (row >= M) return;", "")
    assert broken != src
    monkeypatch.setitem(kernels_cupy.RAW, "minivit_ln_fwd", broken)
    x = _normal(rng, (3, 41, 7), np.float32)  # 123 rows: 5 warps of the last block have none
    with pytest.raises(emu.EmulatorError, match="outside an array|crashed"):
        kernels_cupy.layernorm_forward(x, np.ones(7, np.float32), np.zeros(7, np.float32), 1e-6)


def test_emulator_stops_a_kernel_that_never_ends(monkeypatch):
    monkeypatch.setattr(emu, "TIMEOUT_S", 0.3)
    src = r"""
    extern "C" __global__ void spin(volatile int* flag) { while (flag[0] == 0) {} }
    """
    with pytest.raises(emu.EmulatorError, match="did not finish"):
        emu.RawKernel(src, "spin")((1,), (32,), (np.zeros(1, np.int32),))


def test_emulator_rejects_launches_a_gpu_rejects():
    y = np.zeros(64, np.float32)
    k = emu.RawKernel(_SHARED, "shared")
    with pytest.raises(emu.EmulatorError, match="invalid launch"):
        k((1,), (2048,), (y, np.int32(64)), shared_mem=4)
    with pytest.raises(emu.EmulatorError, match="invalid launch"):
        k((1,), (64,), (y, np.int32(64)), shared_mem=64 * 1024)
    with pytest.raises(emu.EmulatorError, match="partial warp"):
        _probe(np.ones(48, np.float32), 0, block=48)


def test_a_softmax_without_its_warp_reduction_is_caught(monkeypatch, rng):
    """Mutation check: the kernel with each lane's partial sum in place of the warp's total
    (rows longer than a warp) must not pass the comparison below."""
    broken = kernels_cupy.RAW["minivit_softmax_fwd"].replace(
        "T inv = (T)1 / warp_sum(s);", "T inv = (T)1 / s;"
    )
    assert broken != kernels_cupy.RAW["minivit_softmax_fwd"]
    monkeypatch.setitem(kernels_cupy.RAW, "minivit_softmax_fwd", broken)
    x = _normal(rng, (4, 70), np.float64)
    with pytest.raises(AssertionError):
        _close(ops.softmax_forward(x)[0], kernels_cupy.softmax_forward(x), np.float64)


# ----------------------------------------------------------------------------------------------
# each kernel against the generic NumPy op


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype, rng):
    x = _normal(rng, (7, 33, 13), dtype, 3)
    d = _normal(rng, (7, 33, 13), dtype)
    y, c = ops.gelu_forward(x)
    _close(
        (y, ops.gelu_backward(d, c)[0]),
        (kernels_cupy.gelu_forward(x), kernels_cupy.gelu_backward(d, x)),
        dtype,
    )
    want = kernels_cupy.gelu_backward(d, x)
    assert kernels_cupy.gelu_backward(d, x, out=d) is d  # in place, as linear_gelu_backward asks
    np.testing.assert_array_equal(d, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_matches_bias_then_gelu(dtype, rng):
    x = _normal(rng, (50, 96), dtype, 2)
    b = _normal(rng, (96,), dtype)
    h = x.copy()
    y = kernels_cupy.bias_gelu_forward(h, b)  # h += b in place
    _close((ops.gelu_forward(x + b)[0], x + b), (y, h), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 41, 7), (2, 13, 32), (37, 192), (5, 1030)])
def test_layernorm(dtype, shape, rng):
    D = shape[-1]
    x = _normal(rng, shape, dtype, 2, 3)
    g, b = _normal(rng, (D,), dtype), _normal(rng, (D,), dtype)
    d = _normal(rng, shape, dtype)
    y, c = ops.layernorm_forward(x, g, b, 1e-6)
    ref = (y,) + ops.layernorm_backward(d, c)
    out, mean, rstd = kernels_cupy.layernorm_forward(x, g, b, 1e-6)
    got = (out,) + kernels_cupy.layernorm_backward(d, x, mean, rstd, g)
    _close(ref, got, dtype)
    skip = _normal(rng, shape, dtype)  # a residual's gradient, added to dx in the same pass
    dx = kernels_cupy.layernorm_backward(d, x, mean, rstd, g, skip)[0]
    np.testing.assert_array_equal(dx, got[1] + skip)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 5, 197, 256, 257, 300, 512, 513, 1100])
def test_softmax(dtype, N, rng):
    # A row stays in a warp's registers up to 512 entries in float32, 256 in float64; longer
    # rows take the loop (300: registers in float32, the loop in float64)
    shape = (2, 9, N) if N < 1000 else (3, N)
    x = _normal(rng, shape, dtype, 8)
    d = _normal(rng, shape, dtype)
    y, c = ops.softmax_forward(x)
    ref = (y, ops.softmax_backward(d, c)[0])
    yk = kernels_cupy.softmax_forward(x)
    _close(ref, (yk, kernels_cupy.softmax_backward(d, yk)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "key-mask"])
def test_softmax_register_and_loop_paths_give_the_same_bits(dtype, masked, rng, monkeypatch):
    """A row that fits in registers is summed in the loop's order: forcing the loop (room for
    one entry per lane) must not change a bit, forward or backward."""
    x = _normal(rng, (2, 3, 6, 200), dtype, 5)
    d = _normal(rng, (2, 3, 6, 200), dtype)
    mask = rng.random((2, 200)) < 0.7 if masked else None

    def run():
        y = kernels_cupy.softmax_forward(x, 0.3, key_mask=mask)
        return y, kernels_cupy.softmax_backward(d, y, 0.3)

    in_registers = run()
    loop = kernels_cupy._ROW_COMMON.replace("sizeof(T) == 4 ? 16 : 8", "1")
    assert loop != kernels_cupy._ROW_COMMON
    monkeypatch.setattr(kernels_cupy, "_ROW_COMMON", loop)
    monkeypatch.setattr(kernels_cupy, "_CACHE", {})
    for a, b in zip(in_registers, run()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(2, 2, 7, 5), (1, 1, 40, 33), (1, 1, 32, 32)],
    ids=["one-partial-tile", "partial-tiles-on-both-axes", "whole-tiles"],
)
def test_qkv_grad_puts_the_heads_back(shape, dtype, rng, monkeypatch):
    # (B, H, N, hd) and two (B, H, hd, N) -> (B, N, 3 H hd); a pure copy, so exact. Tiles of
    # 32 tokens x 32 entries: shapes below, across and at the tile size. Under the race
    # checker (float32; it costs more than the run): the shared tile is written before the
    # barrier and read after it.
    races = dtype == np.float32
    monkeypatch.setattr(kernels_cupy, "_cp", lambda: emu.fake_cupy(1, check_races=races))
    B, H, N, hd = shape
    dq = _normal(rng, (B, H, N, hd), dtype)
    dkt, dvt = _normal(rng, (B, H, hd, N), dtype), _normal(rng, (B, H, hd, N), dtype)
    want = np.stack((dq, dkt.swapaxes(2, 3), dvt.swapaxes(2, 3)), axis=1)  # (B, 3, H, N, hd)
    want = want.transpose(0, 3, 1, 2, 4).reshape(B, N, 3 * H * hd)
    np.testing.assert_array_equal(kernels_cupy.qkv_grad(dq, dkt, dvt), want)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    rows=st.integers(1, 20),
    width=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    shift=st.sampled_from([0.0, 1e3]),
    seed=st.integers(0, 2**31),
)
def test_row_kernels_on_drawn_shapes(rows, width, dtype, shift, seed):
    """Layernorm and softmax, forward and backward, on drawn row counts and widths (rows that do
    not fill a block, widths below, at and above a warp) and far-from-zero rows."""
    rng = np.random.default_rng(seed)
    x = _normal(rng, (rows, width), dtype, 3, shift)
    d = _normal(rng, (rows, width), dtype)
    g, b = _normal(rng, (width,), dtype), _normal(rng, (width,), dtype)
    y, c = ops.layernorm_forward(x, g, b, 1e-5)
    out, mean, rstd = kernels_cupy.layernorm_forward(x, g, b, 1e-5)
    ref = (y,) + ops.layernorm_backward(d, c)
    got = (out,) + kernels_cupy.layernorm_backward(d, x, mean, rstd, g)
    _close(ref, got, dtype)
    p, c = ops.softmax_forward(x)
    pk = kernels_cupy.softmax_forward(x)
    _close((p, ops.softmax_backward(d, c)[0]), (pk, kernels_cupy.softmax_backward(d, pk)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [45, 600])  # the row in registers, and the loop
def test_softmax_with_a_key_mask(dtype, N, rng, monkeypatch):
    """Attention's masked softmax: scores (B, H, Nq, N), a (B, N) mask read by each row of its
    sample; masked keys get 0, a sample with no valid key all 0. Under the race checker."""
    monkeypatch.setattr(kernels_cupy, "_cp", lambda: emu.fake_cupy(1, check_races=True))
    B, H, Nq = 3, 2, 5
    x = _normal(rng, (B, H, Nq, N), dtype, 4)
    mask = np.ones((B, N), bool)
    mask[0, 30:] = False
    mask[0, 0] = False  # the first key masked: the max starts at the first valid one
    mask[1] = False
    s = np.where(mask[:, None, None, :], x * 0.5, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0))
    want = e / np.maximum(e.sum(axis=-1, keepdims=True), np.finfo(dtype).tiny)
    got = kernels_cupy.softmax_forward(x, 0.5, key_mask=mask)
    _close(want.astype(dtype), got, dtype)
    assert not got[0, ..., 30:].any() and not got[0, ..., 0].any() and not got[1].any()


@pytest.mark.parametrize("N", [77, 600])  # float64 rows in registers, and the loop
def test_softmax_scale_and_in_place(N, rng):
    """Attention's use (ops/_fast.py): the scale folded in, the scores overwritten in place."""
    x = _normal(rng, (20, N), np.float64)
    d = _normal(rng, (20, N), np.float64)
    y_ref, c = ops.softmax_forward(x * 0.125)
    dx_ref = ops.softmax_backward(d, c)[0] * 0.125
    y = kernels_cupy.softmax_forward(x, 0.125, out=x)
    assert y is x
    dx = kernels_cupy.softmax_backward(d, y, 0.125, out=d)
    assert dx is d
    _close((y_ref, dx_ref), (y, dx), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_update_matches_the_optimizer(dtype, rng):
    from minivit.optim import AdamW

    p0, g = _normal(rng, (300,), dtype), _normal(rng, (300,), dtype)
    opt = AdamW({"w": p0.copy()}, lr=1e-3, weight_decay=0.05, no_decay=lambda n, p: False)
    for _ in range(3):
        opt.step({"w": g})
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-3, 0.05
    for t in range(1, 4):
        bc2 = math.sqrt(1 - b2**t)
        kernels_cupy.adamw_update(
            p,
            g,
            m,
            v,
            b1=b1,
            b2=b2,
            step_size=lr * bc2 / (1 - b1**t),
            eps_hat=eps * bc2,
            decay=1 - lr * wd,
        )
    # NumPy's passes in the same order with the same constants; g++ here contracts no a*b + c
    # (no -mfma), so the emulated kernel rounds as NumPy does: equal bit for bit. (On a GPU,
    # NVRTC fuses multiply-adds: equal to rounding.) Before, (T)1 - b2 in float32 put v 1.3e-5
    # off in every entry.
    np.testing.assert_array_equal(opt.params["w"], p)
    np.testing.assert_array_equal(opt.state["exp_avg"]["w"], m)
    np.testing.assert_array_equal(opt.state["exp_avg_sq"]["w"], v)


# ----------------------------------------------------------------------------------------------
# the kernels' backward against their own forward: float64 directional derivatives


def test_gradcheck_fused_kernels(rng):
    x = rng.standard_normal((3, 5, 40))
    g, b = rng.standard_normal(40), rng.standard_normal(40)

    def ln_fwd(x, g, b):
        out, mean, rstd = kernels_cupy.layernorm_forward(x, g, b, 1e-6)
        return out, (x, mean, rstd, g)

    def ln_bwd(dout, c):
        return kernels_cupy.layernorm_backward(dout, *c)

    def sm_fwd(x):
        y = kernels_cupy.softmax_forward(x, 0.7)
        return y, y

    def sm_bwd(dout, y):
        return (kernels_cupy.softmax_backward(dout, y, 0.7),)

    def gelu_fwd(x):
        return kernels_cupy.gelu_forward(x), x

    def gelu_bwd(dout, x):
        return (kernels_cupy.gelu_backward(dout, x),)

    def bias_gelu_fwd(x, b):
        h = x.copy()  # the kernel overwrites it with x + b
        return kernels_cupy.bias_gelu_forward(h, b), h

    def bias_gelu_bwd(dout, h):
        dh = kernels_cupy.gelu_backward(dout, h)
        return dh, dh.sum(axis=(0, 1))  # b was broadcast over the rows

    gc.check_backward(ln_fwd, ln_bwd, (x * 2 + 1, g, b)).assert_ok()
    gc.check_backward(sm_fwd, sm_bwd, (x * 3,)).assert_ok()
    gc.check_backward(gelu_fwd, gelu_bwd, (x,)).assert_ok()
    gc.check_backward(bias_gelu_fwd, bias_gelu_bwd, (x, b)).assert_ok()


# ----------------------------------------------------------------------------------------------
# the ops and a whole model on their fused branches, kernels on against kernels off


@pytest.fixture
def fused_on_numpy(monkeypatch):
    """The ops take their fused-kernel branches for C-contiguous NumPy float arrays, as they do
    for CuPy arrays on a GPU (the branch that never runs on a CPU otherwise): kernels_cupy's own
    use_kernels decides, with NumPy standing for the device backend."""
    from minivit.backend import contiguous_on

    prev = kernels_cupy.enabled()
    monkeypatch.setattr(
        kernels_cupy, "contiguous_on", lambda _name, *arrays: contiguous_on("numpy", *arrays)
    )
    yield
    kernels_cupy.set_enabled(prev)


def _both(fn):
    return both(kernels_cupy.set_enabled, fn)


@pytest.mark.usefixtures("fused_on_numpy")
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_on_their_fused_branch(dtype, rng):
    x = _normal(rng, (4, 9, 48), dtype, 2, 1)
    g, b = _normal(rng, (48,), dtype), _normal(rng, (48,), dtype)
    d = _normal(rng, x.shape, dtype)

    def run():
        y1, c1 = ops.layernorm_forward(x, g, b)
        y2, c2 = ops.gelu_forward(x)
        y3, c3 = ops.softmax_forward(x)
        fused = [getattr(c, "fused", False) for c in (c1, c2)]
        grads = ops.layernorm_backward(d, c1) + ops.gelu_backward(d, c2)
        return (y1, y2, y3) + grads + ops.softmax_backward(d, c3), fused

    (ref, fused_off), (got, fused_on) = _both(run)
    assert fused_off == [False, False] and fused_on == [True, True]
    _close(ref, got, dtype)


@pytest.mark.usefixtures("fused_on_numpy")
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_caches_take_a_non_contiguous_gradient(dtype, rng):
    """A kernel's cache meets a dout the kernels cannot read (not C-contiguous: a transposed
    view, say): layernorm rebuilds the generic cache from mean and rstd, GELU computes Phi and
    phi itself. Both must give what the kernels give for the same values, contiguous."""
    x = _normal(rng, (4, 9, 48), dtype, 2, 1)
    g, b = _normal(rng, (48,), dtype), _normal(rng, (48,), dtype)
    d = _normal(rng, x.shape, dtype)
    strided = np.asfortranarray(d)  # the same values, another layout
    assert not strided.flags.c_contiguous
    y1, c1 = ops.layernorm_forward(x, g, b)
    y2, c2 = ops.gelu_forward(x)
    assert c1.fused and c2.fused
    want = ops.layernorm_backward(d, c1) + ops.gelu_backward(d, c2)
    got = ops.layernorm_backward(strided, c1) + ops.gelu_backward(strided, c2)
    _close(want, got, dtype)


@pytest.mark.usefixtures("fused_on_numpy")
def test_vit_train_steps_with_the_fused_kernels(rng):
    """Two AdamW steps of a small ViT (float64): logits, every gradient and the updated
    parameters agree with the generic path, so the fused caches flow through the blocks."""
    from minivit.models import ViT
    from minivit.optim import AdamW

    x = rng.standard_normal((2, 3, 8, 8))
    y = np.array([1, 4])

    def run():
        v = ViT(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                num_heads=2, dtype="float64", seed=0)  # fmt: skip
        opt = AdamW(v.params, lr=1e-2)
        out = []
        for _ in range(2):
            logits = v.forward(x)
            _, c = ops.cross_entropy_forward(logits, y)
            v.backward(ops.cross_entropy_backward(np.float64(1.0), c)[0])
            out += [logits, dict(v.grads)]
            opt.step(v.grads)
        return out + [dict(v.params)]

    ref, got = _both(run)
    used = {"bias_gelu_fwd", "gelu_bwd", "adamw"} | {
        (name, 8) for name in kernels_cupy.RAW
    }  # the MLP's fc1 + GELU, layernorm, and attention's softmax
    assert used <= set(kernels_cupy._CACHE)  # the kernels did run
    assert ref[1].keys() == got[1].keys()
    _close(ref, got, np.float64)


@pytest.mark.usefixtures("fused_on_numpy")
def test_layernorm_takes_the_kernels_at_any_width(rng):
    """No shared memory in the layernorm kernels, so no width limit: 3100 in float64 (past the
    48 KiB a per-block copy of dgamma and dbeta would need) takes them and agrees."""
    D = 3100
    x = _normal(rng, (4, D), np.float64)
    d = _normal(rng, (4, D), np.float64)
    g, b = _normal(rng, (D,), np.float64), _normal(rng, (D,), np.float64)

    def run():
        y, c = ops.layernorm_forward(x, g, b)
        return y, ops.layernorm_backward(d, c), getattr(c, "fused", False)

    (y0, g0, fused0), (y1, g1, fused1) = _both(run)
    assert fused1 and not fused0
    _close((y0, g0), (y1, g1), np.float64)


@pytest.mark.usefixtures("fused_on_numpy")
def test_layernorm_backward_replays_bit_for_bit(rng, monkeypatch):
    """dgamma and dbeta are summed in a fixed order (chunks of rows, then the chunks), so a
    replay gives the same bits, however the blocks are scheduled."""
    monkeypatch.setattr(kernels_cupy, "LN_ROWS_PER_CHUNK", 8)  # 5 chunks: 5 blocks
    x = _normal(rng, (37, 70), np.float64)
    d = _normal(rng, (37, 70), np.float64)
    g, b = _normal(rng, (70,), np.float64), _normal(rng, (70,), np.float64)
    _, c = ops.layernorm_forward(x, g, b)
    first, again = ops.layernorm_backward(d, c), ops.layernorm_backward(d, c)
    for a, b_ in zip(first, again):
        np.testing.assert_array_equal(a, b_)
    ref = (d * ((x - c.mean[:, None]) * c.rstd[:, None])).sum(axis=0)
    np.testing.assert_allclose(first[1], ref, rtol=1e-13)


# ----------------------------------------------------------------------------------------------
# data races, under ThreadSanitizer

needs_tsan = pytest.mark.skipif(
    not emu.tsan_available(), reason="g++ here cannot build ThreadSanitizer programs"
)


@needs_tsan
def test_row_kernels_have_no_data_race(monkeypatch, rng):
    """Every row kernel, at a width above a warp, runs race-free under TSan: the layernorm
    backward's column sums over three chunks of rows (blocks run two at a time), softmax in
    place, as attention uses it (a row in registers, then a row long enough for the loop)."""
    monkeypatch.setattr(kernels_cupy, "_cp", lambda: emu.fake_cupy(1, check_races=True))
    monkeypatch.setattr(kernels_cupy, "LN_ROWS_PER_CHUNK", 8)
    x = _normal(rng, (20, 70), np.float64)
    d = _normal(rng, (20, 70), np.float64)
    g, b = _normal(rng, (70,), np.float64), _normal(rng, (70,), np.float64)
    _, mean, rstd = kernels_cupy.layernorm_forward(x, g, b, 1e-6)
    kernels_cupy.layernorm_backward(d, x, mean, rstd, g)
    y = kernels_cupy.softmax_forward(x, 0.5, out=x)
    kernels_cupy.softmax_backward(d, y, 0.5, out=d)
    x, d = _normal(rng, (4, 300), np.float64), _normal(rng, (4, 300), np.float64)
    y = kernels_cupy.softmax_forward(x, 0.5, out=x)
    kernels_cupy.softmax_backward(d, y, 0.5, out=d)


@needs_tsan
@pytest.mark.parametrize(
    "name, old, new",
    [
        ("minivit_ln_bwd_params", "part[chunk * D + j] = sg;", "part[j] = sg;"),  # blocks
        ("minivit_ln_bwd", "for (int j = lane; j < D; j += 32) {\n        T xh",
         "for (int j = 0; j < D; ++j) {\n        T xh"),  # every lane writes every entry
    ],
    ids=["chunks-write-one-row", "lanes-write-one-entry"],
)  # fmt: skip
def test_a_race_in_the_layernorm_backward_is_caught(monkeypatch, rng, name, old, new):
    """Mutation check: races the plain run does not see (the OS rarely interleaves them), TSan
    reports: one between blocks (two run at once), one between the lanes of a warp."""
    src = kernels_cupy.RAW[name]
    assert old in src
    monkeypatch.setitem(kernels_cupy.RAW, name, src.replace(old, new))
    monkeypatch.setattr(kernels_cupy, "_cp", lambda: emu.fake_cupy(1, check_races=True))
    monkeypatch.setattr(kernels_cupy, "LN_ROWS_PER_CHUNK", 8)
    x = _normal(rng, (40, 40), np.float64)  # 5 chunks of rows
    g = _normal(rng, (40,), np.float64)
    _, mean, rstd = kernels_cupy.layernorm_forward(x, g, g, 1e-6)
    with pytest.raises(emu.EmulatorError, match="data race"):
        kernels_cupy.layernorm_backward(x, x, mean, rstd, g)


_BLOCK_SUM = r"""
extern "C" __global__ void block_sum(const double* x, double* total, int n) {
    extern __shared__ unsigned char raw[];
    double* acc = reinterpret_cast<double*>(raw);
    if (threadIdx.x == 0) acc[0] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        atomicAdd(&acc[0], x[i]);
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(total, acc[0]);
}
"""


@needs_tsan
@pytest.mark.parametrize(
    "old, new",
    [
        (None, None),  # the kernel as written: race-free, and the right sum
        ("atomicAdd(&acc[0], x[i]);", "acc[0] += x[i];"),  # a plain += in shared memory
        ("x[i]);\n    __syncthreads();", "x[i]);"),  # thread 0 reads acc too early
        ("atomicAdd(total, acc[0]);", "*total += acc[0];"),  # blocks race on the total
    ],
    ids=["as-written", "non-atomic-shared-sum", "no-barrier-before-the-flush",
         "non-atomic-global-sum"],
)  # fmt: skip
def test_tsan_sees_shared_memory_atomics_and_barriers(old, new):
    """The emulator's TSan mode on the pattern no minivit kernel uses any more (the layernorm
    backward's shared-memory partial sums gave way to a fixed-order sum): per-block sums in
    shared memory, flushed with a global atomic. Each mutation is a race that TSan reports."""
    src = _BLOCK_SUM if old is None else _BLOCK_SUM.replace(old, new)
    assert old is None or old in _BLOCK_SUM
    x = np.arange(1.0, 301.0)
    total = np.zeros(1)
    k = emu.RawKernel(src, "block_sum", check_races=True)
    if old is None:
        k((3,), (64,), (x, total, np.int32(300)), shared_mem=8)
        assert total[0] == x.sum()
    else:
        # TSan keeps only a few recent accesses per word, so one run among 128 threads can miss
        # a race (the early flush went unreported in about one run in eight): each mutation
        # must be reported within three runs.
        with pytest.raises(emu.EmulatorError, match="data race"):
            for _ in range(3):
                k((3,), (64,), (x, total, np.int32(300)), shared_mem=8)


@pytest.mark.usefixtures("fused_on_numpy")
def test_vilt_forward_backward_with_the_fused_kernels(rng):
    """ViLT (text padding masks, which the attention softmax kernel reads): outputs, input and
    parameter gradients agree."""
    from minivit.models.vilt import ViLT

    B, L = 3, 6
    ids = rng.integers(5, 23, (B, L))
    mask = np.ones((B, L), bool)
    mask[0, 4:] = False
    ids[~mask] = 0
    images = rng.standard_normal((B, 3, 16, 16))
    shapes = {"text_feats": (B, L, 16), "image_feats": (B, 5, 16), "pooled": (B, 16)}
    douts = {k: rng.standard_normal(s) for k, s in shapes.items()}

    def run():
        m = ViLT(vocab_size=23, max_text_len=10, img_size=16, patch_size=8, embed_dim=16,
                 depth=2, num_heads=2, mlp_ratio=2.0, dtype="float64", seed=1)  # fmt: skip
        out = m.forward(ids, mask, images)
        dimages = m.backward(douts)
        return [out["text_feats"], out["image_feats"], out["pooled"], dimages, dict(m.grads)]

    ref, got = _both(run)
    used = {"bias_gelu_fwd", "gelu_bwd"} | {(name, 8) for name in kernels_cupy.RAW}
    assert used <= set(kernels_cupy._CACHE)  # masked attention on the kernel path too
    _close(ref, got, np.float64)
