"""Fused CuPy kernels for the elementwise-heavy ops (used only on the ``cupy`` backend).

On a GPU, each NumPy-style expression in the generic ops is one kernel launch that reads and
writes whole arrays. The kernels here do the same arithmetic in one launch per op, and keep less
for the backward:

    gelu_forward / gelu_backward         exact (erf) GELU; the backward recomputes Phi and phi
                                         from x, so the cache holds x only (as PyTorch's does)
    bias_gelu_forward                    GELU(h + b) in one pass, h += b in place (an MLP's fc1)
    layernorm_forward / _backward        one warp per row; the cache holds mean and rstd, xhat
                                         is recomputed; dgamma, dbeta as column sums in a
                                         fixed order (no atomics: a replay gives the same bits)
    softmax_forward / softmax_backward   one warp per row, with an optional scale folded in
                                         (attention's 1 / sqrt(head_dim))
    qkv_grad                             attention's dq, dK^T, dV^T into the layout of the qkv
                                         rows, one launch instead of three strided copies
    adamw_update                         AdamW's whole update of one parameter in one pass

The generic ``xp`` code in ``minivit/ops`` stays the reference: ``tests/test_kernels_cupy.py``
compares every kernel with it and runs the gradient checks on the device. Where there is no
device, ``tests/test_kernels_emulated.py`` runs the same sources (``ELEMENTWISE``, ``RAW``) and
the launch code below on the CPU through a SIMT emulator, and ``tests/test_kernels_nvrtc.py``
compiles them for sm_90 with NVRTC, as CuPy does on the device.
Walk-through: ``docs/kernels.md``. The environment variable ``MINIVIT_KERNELS=0`` (or
:func:`set_enabled`) turns the kernels off.

This module never imports CuPy by name: it reaches it through ``minivit.backend``, and only when
a kernel is first used, so it imports cleanly on machines without CuPy.
"""

from __future__ import annotations

from .backend import Switch, contiguous_on, get_backend

__all__ = [
    "enabled",
    "set_enabled",
    "use_kernels",
    "gelu_forward",
    "gelu_backward",
    "bias_gelu_forward",
    "layernorm_forward",
    "layernorm_backward",
    "softmax_forward",
    "softmax_backward",
    "qkv_grad",
    "adamw_update",
]

_SWITCH = Switch("MINIVIT_KERNELS")
_CACHE: dict = {}

WARP = 32
ROWS_PER_BLOCK = 8  # warps per block of 256 threads, one row per warp
# The layernorm backward's dgamma and dbeta: one thread per column sums a chunk of rows.
LN_ROWS_PER_CHUNK = 128
COLS_PER_BLOCK = 256


def enabled() -> bool:
    return _SWITCH.on


def set_enabled(flag: bool) -> bool:
    """Turn the fused kernels on or off; returns the previous setting."""
    return _SWITCH.set(flag)


def use_kernels(*arrays) -> bool:
    """True when every (non-None) array is a C-contiguous CuPy float32/float64 array, or a
    bool one (a mask)."""
    return (
        _SWITCH.on
        and contiguous_on("cupy", *arrays)
        and all(a is None or a.dtype.kind == "b" or _float_kernel_dtype(a) for a in arrays)
    )


def _float_kernel_dtype(a) -> bool:
    return a.dtype.kind == "f" and a.dtype.itemsize in (4, 8)


def _cp():
    return get_backend("cupy").xp


def _ctype(dtype) -> str:
    return {4: "float", 8: "double"}[dtype.itemsize]


# ----------------------------------------------------------------------------------------------
# GELU (exact) and the Adam update: elementwise kernels

_SQRT_HALF = "0.7071067811865476"
_INV_SQRT_2PI = "0.3989422804014327"


# (in_params, out_params, operation) of each cupy.ElementwiseKernel. The sources are data so that
# tests/_cuda_emu.py can run the same text on the CPU (and NVRTC compile it) where no GPU exists.
ELEMENTWISE = {
    "gelu_fwd": (
        "T x",
        "T y",
        f"y = x * (T)0.5 * ((T)1 + erf(x * (T){_SQRT_HALF}))",
    ),
    "bias_gelu_fwd": (  # h is read and written: the bias is added in place
        "T b",
        "T h, T y",
        f"h = h + b; y = h * (T)0.5 * ((T)1 + erf(h * (T){_SQRT_HALF}))",
    ),
    "gelu_bwd": (
        "T dy, T x",
        "T dx",
        f"""
        T cdf = (T)0.5 * ((T)1 + erf(x * (T){_SQRT_HALF}));
        T pdf = exp((T)-0.5 * x * x) * (T){_INV_SQRT_2PI};
        dx = dy * (cdf + x * pdf)
        """,
    ),
    # The order of NumPy's passes in optim.AdamW, and 1 - b1, 1 - b2 computed in double on
    # the host: (T)1 - b1 in float32 is 1 - float32(0.999) = 0.00099998713, 1.3e-5 off
    # 0.001, and v came out that far from NumPy's in every entry (a review found it).
    "adamw": (
        "T g, T decay, T b1, T c1, T b2, T c2, T step_size, T eps_hat",
        "T p, T m, T v",
        """
        p = p * decay;
        m = b1 * m + c1 * g;
        v = b2 * v + (g * g) * c2;
        p = p - (m / (sqrt(v) + eps_hat)) * step_size
        """,
    ),
}


def _elementwise(name):
    if name not in _CACHE:
        _CACHE[name] = _cp().ElementwiseKernel(*ELEMENTWISE[name], f"minivit_{name}")
    return _CACHE[name]


def gelu_forward(x):
    """GELU(x) = x Phi(x) in one launch; the backward needs only x."""
    return _elementwise("gelu_fwd")(x)


def gelu_backward(dout, x, out=None):
    """dx = dout (Phi(x) + x phi(x)), Phi and phi recomputed from x in the same launch;
    ``out`` may be ``dout`` (each entry is read before it is written)."""
    if out is None:
        return _elementwise("gelu_bwd")(dout, x)
    _elementwise("gelu_bwd")(dout, x, out)
    return out


def bias_gelu_forward(h, b):
    """GELU(h + b), with ``h += b`` done in the same launch: a linear layer's bias and its
    activation in one pass over the GEMM's output ``h`` (C-contiguous, overwritten).

    ``h`` then holds the activation's input, which is all :func:`gelu_backward` needs. Against
    a bias add and then :func:`gelu_forward`, this saves one launch and one read of ``h`` (an
    MLP's widest activation); ``h + b`` is still written back."""
    y = _cp().empty_like(h)
    _elementwise("bias_gelu_fwd")(b, h, y)
    return y


def adamw_update(p, g, m, v, *, b1, b2, step_size, eps_hat, decay=1.0):
    """AdamW's update of one parameter, in place, in one launch.

    p *= decay; m, v <- the Adam moments of g; p -= step_size m / (sqrt(v) + eps_hat).

    The scalars are those of ``minivit.optim.AdamW.step`` (bias corrections folded into
    ``step_size`` and ``eps_hat``; ``decay = 1 - lr * weight_decay`` or 1).
    """
    dt = p.dtype.type
    _elementwise("adamw")(
        g, dt(decay), dt(b1), dt(1.0 - b1), dt(b2), dt(1.0 - b2), dt(step_size), dt(eps_hat),
        p, m, v,
    )  # fmt: skip
    return p


# ----------------------------------------------------------------------------------------------
# row kernels: layernorm and softmax, one warp per row

_ROW_COMMON = r"""
typedef {T} T;
// Softmax keeps a row of up to 32 * ROW_REGS entries in its warp's registers (longer rows take
// a loop that reads them again): 16 per lane for float32, 8 for float64 (the same 64 bytes).
constexpr int ROW_REGS = sizeof(T) == 4 ? 16 : 8;
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ T warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) {
        T w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}
"""

_LN_FWD = r"""
extern "C" __global__ void minivit_ln_fwd(const T* __restrict__ x, const T* __restrict__ gamma,
        const T* __restrict__ beta, T* __restrict__ out, T* __restrict__ mean,
        T* __restrict__ rstd, long long M, int D, T eps) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= M) return;  // the whole warp leaves together
    const T* xr = x + row * D;
    T s = 0;
    for (int j = lane; j < D; j += 32) s += xr[j];
    T m = warp_sum(s) / (T)D;
    T s2 = 0;
    for (int j = lane; j < D; j += 32) { T d = xr[j] - m; s2 += d * d; }
    T r = (T)1 / sqrt(warp_sum(s2) / (T)D + eps);  // two-pass variance, as the generic path
    T* orow = out + row * D;
    for (int j = lane; j < D; j += 32) orow[j] = (xr[j] - m) * r * gamma[j] + beta[j];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}
"""

_LN_BWD = r"""
extern "C" __global__ void minivit_ln_bwd(const T* __restrict__ dout, const T* __restrict__ x,
        const T* __restrict__ mean, const T* __restrict__ rstd, const T* __restrict__ gamma,
        const T* __restrict__ skip, T* __restrict__ dx, long long M, int D, int has_skip) {
    // has_skip: add skip (a residual connection's gradient) to dx; else skip is not read.
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= M) return;
    const T* dr = dout + row * D;
    const T* xr = x + row * D;
    T m = mean[row], r = rstd[row];
    T sum_g = 0, sum_gx = 0;
    for (int j = lane; j < D; j += 32) {
        T g = dr[j] * gamma[j];
        sum_g += g;
        sum_gx += g * ((xr[j] - m) * r);
    }
    T mg = warp_sum(sum_g) / (T)D;
    T mgx = warp_sum(sum_gx) / (T)D;
    T* dxr = dx + row * D;
    const T* sr = skip + row * D;
    for (int j = lane; j < D; j += 32) {
        T xh = (xr[j] - m) * r;
        T v = r * (dr[j] * gamma[j] - mg - xh * mgx);
        dxr[j] = has_skip ? sr[j] + v : v;
    }
}
"""

_LN_BWD_PARAMS = r"""
extern "C" __global__ void minivit_ln_bwd_params(const T* __restrict__ dout,
        const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ rstd,
        T* __restrict__ part, long long M, int D, int rows_per_chunk) {
    // Each thread sums its column j over one chunk of rows, in row order: part[0, chunk, j] is
    // the chunk's share of dgamma[j], part[1, chunk, j] of dbeta[j]. One writer per entry.
    int col_blocks = (D + blockDim.x - 1) / blockDim.x;
    long long chunks = gridDim.x / col_blocks;
    long long chunk = blockIdx.x / col_blocks;
    int j = (blockIdx.x % col_blocks) * blockDim.x + threadIdx.x;
    if (j >= D) return;
    long long r0 = chunk * rows_per_chunk;
    long long r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
    T sg = 0, sb = 0;
    for (long long row = r0; row < r1; ++row) {
        T d = dout[row * D + j];
        sg += d * ((x[row * D + j] - mean[row]) * rstd[row]);
        sb += d;
    }
    part[chunk * D + j] = sg;
    part[(chunks + chunk) * D + j] = sb;
}
"""

_SM_FWD = r"""
extern "C" __global__ void minivit_softmax_fwd(const T* x, T* y, const bool* __restrict__ keys,
        long long M, int N, T scale, long long rows_per_key_row) {
    // keys: read only when rows_per_key_row > 0: a mask (M / rows_per_key_row, N), true where
    // a key may be attended to; row r reads its row r / rows_per_key_row (attention's rows
    // (b, h, i) all read the keys of sample b). Masked entries get 0, and a row with no valid
    // key gets all 0 (not NaN), as the generic path does.
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= M) return;
    const T* xr = x + row * N;
    T* yr = y + row * N;
    const bool* kr = rows_per_key_row > 0 ? keys + (row / rows_per_key_row) * N : 0;
    int first = 0;  // the first valid key: the max starts there (every lane finds the same)
    if (kr) while (first < N && !kr[first]) ++first;
    if (first == N) {  // no valid key: the whole warp writes zeros and leaves together
        for (int j = lane; j < N; j += 32) yr[j] = 0;
        return;
    }
    T mx = xr[first];
    if (N <= 32 * ROW_REGS) {
        // The row fits in the warp's registers (lane holds entries lane, lane + 32, ...): x is
        // read once and y written once. The sums run in the loop path's order, so both paths
        // give the same bits.
        T v[ROW_REGS];
        unsigned valid = 0;  // bit k: entry lane + 32 k exists and may be attended to
#pragma unroll
        for (int k = 0; k < ROW_REGS; ++k) {
            int j = lane + 32 * k;
            bool ok = j < N && (!kr || kr[j]);
            v[k] = ok ? xr[j] : mx;
            valid |= ok ? 1u << k : 0u;
            mx = v[k] > mx ? v[k] : mx;
        }
        mx = warp_max(mx);
        T s = 0;
#pragma unroll
        for (int k = 0; k < ROW_REGS; ++k) {
            v[k] = (valid >> k) & 1u ? exp((v[k] - mx) * scale) : (T)0;
            s += v[k];
        }
        T inv = (T)1 / warp_sum(s);
#pragma unroll
        for (int k = 0; k < ROW_REGS; ++k)
            if (lane + 32 * k < N) yr[lane + 32 * k] = v[k] * inv;  // after every read: y may be x
        return;
    }
    for (int j = lane; j < N; j += 32) mx = (!kr || kr[j]) && xr[j] > mx ? xr[j] : mx;
    mx = warp_max(mx);
    T s = 0;
    for (int j = lane; j < N; j += 32) {
        T e = kr && !kr[j] ? (T)0 : exp((xr[j] - mx) * scale);
        yr[j] = e;
        s += e;
    }
    T inv = (T)1 / warp_sum(s);
    for (int j = lane; j < N; j += 32) yr[j] *= inv;  // y may alias x: each entry is its own
}
"""

_SM_BWD = r"""
extern "C" __global__ void minivit_softmax_bwd(const T* dy, const T* __restrict__ y,
        T* dx, long long M, int N, T scale) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= M) return;
    const T* dr = dy + row * N;
    const T* yr = y + row * N;
    T* xr = dx + row * N;
    if (N <= 32 * ROW_REGS) {  // dy and y read once, kept in registers (dx may be dy)
        T d[ROW_REGS], p[ROW_REGS];
        T s = 0;
#pragma unroll
        for (int k = 0; k < ROW_REGS; ++k) {
            int j = lane + 32 * k;
            d[k] = j < N ? dr[j] : (T)0;
            p[k] = j < N ? yr[j] : (T)0;
            s += d[k] * p[k];
        }
        s = warp_sum(s);
#pragma unroll
        for (int k = 0; k < ROW_REGS; ++k)
            if (lane + 32 * k < N) xr[lane + 32 * k] = scale * p[k] * (d[k] - s);
        return;
    }
    T s = 0;
    for (int j = lane; j < N; j += 32) s += dr[j] * yr[j];
    s = warp_sum(s);
    for (int j = lane; j < N; j += 32) xr[j] = scale * yr[j] * (dr[j] - s);
}
"""

_QKV_GRAD = r"""
// A tile of 32 tokens x 32 entries of one head, moved by a block of 32 x 8 threads.
constexpr int QKV_TILE = 32;
constexpr int QKV_ROWS = 8;
extern "C" __global__ void minivit_qkv_grad(const T* __restrict__ dq, const T* __restrict__ dkt,
        const T* __restrict__ dvt, T* __restrict__ dqkv, int N, int H, int hd, int n_tiles,
        int e_tiles, long long heads) {
    // dqkv (B, N, 3, H, hd), the gradient of attention's qkv rows [q; k; v], from dq
    // (B, H, N, hd) and dK^T, dV^T (B, H, hd, N). Block = (part, head, token tile, entry tile).
    // A warp writes 32 consecutive entries of one token's row of dqkv. For dq it also reads 32
    // consecutive entries; dK^T and dV^T are read along their rows (32 consecutive tokens)
    // into shared memory and written out transposed, so every global access is coalesced.
    // (The padding column keeps the transposed reads of the tile off a single bank.)
    extern __shared__ unsigned char smem[];
    T* tile = reinterpret_cast<T*>(smem);  // (QKV_TILE, QKV_TILE + 1)
    long long b_id = blockIdx.x;
    int et = b_id % e_tiles;
    b_id /= e_tiles;
    int nt = b_id % n_tiles;
    b_id /= n_tiles;
    long long head = b_id % heads;  // (b, h)
    int part = (int)(b_id / heads);  // 0 q, 1 k, 2 v: the same for the whole block
    int tx = threadIdx.x % QKV_TILE, ty = threadIdx.x / QKV_TILE;
    int n0 = nt * QKV_TILE, e0 = et * QKV_TILE;
    long long b = head / H;
    int h = head % H;
    // dqkv's entry (b, n, part, h, e0 + tx) for token n
    T* out = dqkv + (long long)part * H * hd + (long long)h * hd + e0 + tx;
    long long out_token = 3LL * H * hd;  // the stride between tokens of dqkv
    if (part == 0) {  // dq is already token-major: a straight copy
        const T* src = dq + head * N * hd + e0 + tx;
        for (int r = ty; r < QKV_TILE; r += QKV_ROWS) {
            int n = n0 + r;
            if (n < N && e0 + tx < hd) out[(b * N + n) * out_token] = src[(long long)n * hd];
        }
        return;  // the whole block: part is uniform, so no thread waits at the barrier below
    }
    const T* src = (part == 1 ? dkt : dvt) + head * hd * N;
    for (int r = ty; r < QKV_TILE; r += QKV_ROWS) {  // row e0 + r of dK^T, tokens n0 + tx
        int e = e0 + r, n = n0 + tx;
        if (e < hd && n < N) tile[r * (QKV_TILE + 1) + tx] = src[(long long)e * N + n];
    }
    __syncthreads();
    for (int r = ty; r < QKV_TILE; r += QKV_ROWS) {  // token n0 + r, entries e0 + tx
        int n = n0 + r;
        if (n < N && e0 + tx < hd) out[(b * N + n) * out_token] = tile[tx * (QKV_TILE + 1) + r];
    }
}
"""

QKV_TILE, QKV_ROWS = 32, 8  # as in the kernel's source


RAW = {
    "minivit_ln_fwd": _LN_FWD,
    "minivit_ln_bwd": _LN_BWD,
    "minivit_ln_bwd_params": _LN_BWD_PARAMS,
    "minivit_softmax_fwd": _SM_FWD,
    "minivit_softmax_bwd": _SM_BWD,
    "minivit_qkv_grad": _QKV_GRAD,
}


def raw_source(name, dtype) -> str:
    """The CUDA source of the row kernel ``name`` for float32 or float64 ``dtype``."""
    return _ROW_COMMON.replace("{T}", _ctype(dtype)) + RAW[name]


def _raw(name, dtype):
    key = (name, dtype.itemsize)
    if key not in _CACHE:
        _CACHE[key] = _cp().RawKernel(raw_source(name, dtype), name)
    return _CACHE[key]


def _row_grid(M):
    return ((M + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,), (ROWS_PER_BLOCK * WARP,)


def layernorm_forward(x, gamma, beta, eps):
    """x (..., D) -> (out, mean (...,), rstd (...,)), one warp per row."""
    cp = _cp()
    D = x.shape[-1]
    M = x.size // D
    out = cp.empty_like(x)
    mean = cp.empty(x.shape[:-1], dtype=x.dtype)
    rstd = cp.empty(x.shape[:-1], dtype=x.dtype)
    if M:
        dt = x.dtype.type
        grid, block = _row_grid(M)
        _raw("minivit_ln_fwd", x.dtype)(
            grid,
            block,
            (x, gamma, beta, out, mean, rstd, cp.int64(M), cp.int32(D), dt(eps)),
        )
    return out, mean, rstd


def layernorm_backward(dout, x, mean, rstd, gamma, skip=None):
    """-> (dx, dgamma, dbeta); xhat is recomputed from x, mean and rstd. ``skip`` (x's shape,
    C-contiguous), when given, is added to dx in the same pass.

    Deterministic: dx is one warp per row; dgamma and dbeta are column sums taken in a fixed
    order (each chunk of rows summed in row order by one thread per column, then the chunks'
    partial sums added by CuPy's reduction), so a replay gives the same bits. No atomics.
    """
    cp = _cp()
    D = x.shape[-1]
    M = x.size // D
    dx = cp.empty_like(x)
    if not M:
        return dx, cp.zeros(D, dtype=x.dtype), cp.zeros(D, dtype=x.dtype)
    grid, block = _row_grid(M)
    has_skip = skip is not None
    _raw("minivit_ln_bwd", x.dtype)(
        grid,
        block,
        (dout, x, mean, rstd, gamma, skip if has_skip else dout, dx)
        + (cp.int64(M), cp.int32(D), cp.int32(has_skip)),
    )
    chunks = (M + LN_ROWS_PER_CHUNK - 1) // LN_ROWS_PER_CHUNK
    col_blocks = (D + COLS_PER_BLOCK - 1) // COLS_PER_BLOCK
    part = cp.empty((2, chunks, D), dtype=x.dtype)  # every entry written by the kernel
    _raw("minivit_ln_bwd_params", x.dtype)(
        (chunks * col_blocks,),
        (COLS_PER_BLOCK,),
        (dout, x, mean, rstd, part, cp.int64(M), cp.int32(D), cp.int32(LN_ROWS_PER_CHUNK)),
    )
    dgamma, dbeta = part.sum(axis=1)  # (D,) each
    return dx, dgamma, dbeta


def qkv_grad(dq, dkt, dvt):
    """dq (B, H, N, hd), dkt and dvt (B, H, hd, N), C-contiguous -> dqkv (B, N, 3 H hd): the
    three gradients of attention's heads put back in the layout of its qkv rows, one launch.
    dK^T and dV^T are transposed through shared memory, tile by tile, so that both their reads
    and the writes are coalesced."""
    cp = _cp()
    B, H, N, hd = dq.shape
    dqkv = cp.empty((B, N, 3 * H * hd), dtype=dq.dtype)
    if dqkv.size:
        n_tiles = (N + QKV_TILE - 1) // QKV_TILE
        e_tiles = (hd + QKV_TILE - 1) // QKV_TILE
        blocks = 3 * B * H * n_tiles * e_tiles
        _raw("minivit_qkv_grad", dq.dtype)(
            (blocks,),
            (QKV_TILE * QKV_ROWS,),
            (dq, dkt, dvt, dqkv, cp.int32(N), cp.int32(H), cp.int32(hd))
            + (cp.int32(n_tiles), cp.int32(e_tiles), cp.int64(B * H)),
            shared_mem=QKV_TILE * (QKV_TILE + 1) * dq.dtype.itemsize,
        )
    return dqkv


def softmax_forward(x, scale=1.0, out=None, key_mask=None):
    """softmax(scale * x) over the last axis (scale > 0); ``out`` may be ``x`` (in place).

    ``key_mask`` (bool, C-contiguous, (S, N) with S dividing the number of rows): row r of x
    may attend only to the keys where row r // (rows / S) of the mask is true; the others get
    0, and a row with none gets all 0. For attention's scores (B, H, N, N), a (B, N) mask.
    """
    cp = _cp()
    N = x.shape[-1]
    M = x.size // N if N else 0
    y = cp.empty_like(x) if out is None else out
    if M and N:
        if key_mask is None:
            keys, per_row = cp.empty((1,), dtype=cp.bool_), 0  # (not read)
        else:
            keys, per_row = key_mask, M // (key_mask.size // N)
        grid, block = _row_grid(M)
        _raw("minivit_softmax_fwd", x.dtype)(
            grid,
            block,
            (x, y, keys, cp.int64(M), cp.int32(N), x.dtype.type(scale), cp.int64(per_row)),
        )
    return y


def softmax_backward(dout, y, scale=1.0, out=None):
    """dx = scale * y * (dout - sum(dout * y)) over the last axis; ``out`` may be ``dout``."""
    cp = _cp()
    N = y.shape[-1]
    M = y.size // N if N else 0
    dx = cp.empty_like(y) if out is None else out
    if M and N:
        grid, block = _row_grid(M)
        _raw("minivit_softmax_bwd", y.dtype)(
            grid, block, (dout, y, dx, cp.int64(M), cp.int32(N), y.dtype.type(scale))
        )
    return dx
