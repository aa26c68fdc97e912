"""attention_forward / attention_backward: reference, masks, gradients, PyTorch oracle, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

# none: no mask; random: each key valid with probability 1/2 (at least one per item);
# single: exactly one valid key per item; empty_row: item 0 has no valid key at all.
mask_kinds = st.sampled_from(["none", "random", "single", "empty_row"])


def _make_mask(r, B, N, kind):
    if kind == "none":
        return None
    if kind == "single":
        m = np.zeros((B, N), dtype=bool)
        m[np.arange(B), r.integers(0, N, size=B)] = True
        return m
    m = r.random((B, N)) < 0.5
    m[np.arange(B), r.integers(0, N, size=B)] = True
    if kind == "empty_row":
        m[0] = False
    return m


def _draw(seed, B, N, H, hd, biases, kind):
    r = np.random.default_rng(seed)
    D = H * hd
    x = r.standard_normal((B, N, D))
    w_qkv = r.standard_normal((3 * D, D)) / np.sqrt(D)
    b_qkv = r.standard_normal(3 * D) if biases else None
    w_proj = r.standard_normal((D, D)) / np.sqrt(D)
    b_proj = r.standard_normal(D) if biases else None
    return [x, w_qkv, b_qkv, w_proj, b_proj, H, _make_mask(r, B, N, kind)]


def ref_attention(x, w_qkv, b_qkv, w_proj, b_proj, H, key_mask):
    """Batch item by item and head by head, only over the valid keys; returns (out, attn)."""
    B, N, D = x.shape
    hd = D // H
    attn = np.zeros((B, H, N, N))
    ctx = np.zeros((B, N, D))
    for b in range(B):
        qkv = x[b] @ w_qkv.T + (0 if b_qkv is None else b_qkv)  # (N, 3D)
        keys = np.arange(N) if key_mask is None else np.flatnonzero(key_mask[b])
        for h in range(H):
            q = qkv[:, h * hd : (h + 1) * hd]
            k = qkv[keys, D + h * hd : D + (h + 1) * hd]
            v = qkv[keys, 2 * D + h * hd : 2 * D + (h + 1) * hd]
            if keys.size == 0:
                continue  # nothing to attend to: zero probabilities, zero context
            p = scipy.special.softmax(q @ k.T / np.sqrt(hd), axis=-1)  # (N, n_valid)
            attn[b, h][:, keys] = p
            ctx[b, :, h * hd : (h + 1) * hd] = p @ v
    out = ctx @ w_proj.T + (0 if b_proj is None else b_proj)
    return out, attn


def _dev(backend, inputs):
    return [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs]


dims = dict(
    B=st.integers(1, 3),
    N=st.integers(1, 5),
    H=st.integers(1, 3),
    hd=st.integers(1, 3),
    biases=st.booleans(),
    kind=mask_kinds,
    seed=st.integers(0, 2**31),
)


@fixture_settings()
@given(**dims)
def test_forward_matches_reference(backend, B, N, H, hd, biases, kind, seed):
    inputs = _draw(seed, B, N, H, hd, biases, kind)
    out, cache = ops.attention_forward(*_dev(backend, inputs))
    ref_out, ref_attn = ref_attention(*inputs)
    attn = backend.to_numpy(cache.attn)
    assert attn.shape == (B, H, N, N)
    assert rel_err(backend.to_numpy(out), ref_out) <= 1e-12
    assert rel_err(attn, ref_attn) <= 1e-12
    mask = inputs[-1]
    if mask is not None:
        # Masked keys get exactly zero probability; rows with a valid key sum to 1.
        assert np.all(attn[np.broadcast_to(~mask[:, None, None, :], attn.shape)] == 0)
        has_key = mask.any(axis=1)
        np.testing.assert_allclose(attn[has_key].sum(-1), 1.0, atol=1e-13)
        np.testing.assert_array_equal(attn[~has_key], 0.0)
    else:
        np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-13)


@fixture_settings()
@given(**dims)
def test_backward_matches_central_differences(backend, B, N, H, hd, biases, kind, seed):
    inputs = _draw(seed, B, N, H, hd, biases, kind)
    slots = {0: 0, 1: 1, 3: 3}
    if biases:
        slots.update({2: 2, 4: 4})
    check_grads(backend, ops.attention_forward, ops.attention_backward, inputs, slots, seed=seed)


@fixture_settings()
@given(**dims)
def test_matches_torch(backend, B, N, H, hd, biases, kind, seed):
    torch = require("torch")
    F = torch.nn.functional
    inputs = _draw(seed, B, N, H, hd, biases, kind)
    out, cache = ops.attention_forward(*_dev(backend, inputs))
    g = np.random.default_rng(seed + 1).standard_normal(out.shape)
    grads = ops.attention_backward(backend.asarray(g), cache)

    x, w_qkv, b_qkv, w_proj, b_proj, _, mask = inputs
    D = H * hd
    tx, twq, twp = to_torch(x), to_torch(w_qkv), to_torch(w_proj)
    tbq = to_torch(b_qkv) if biases else None
    tbp = to_torch(b_proj) if biases else None
    qkv = F.linear(tx, twq, tbq).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    attn_mask = None if mask is None else torch.from_numpy(mask)[:, None, None, :]
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
    tout = F.linear(ctx.transpose(1, 2).reshape(B, N, D), twp, tbp)
    tout.backward(torch.from_numpy(g))
    errs = [rel_err(backend.to_numpy(out), tout.detach().numpy())]
    for slot, t in enumerate((tx, twq, tbq, twp, tbp)):
        if t is None:
            assert grads[slot] is None
        else:
            errs.append(rel_err(backend.to_numpy(grads[slot]), t.grad.numpy()))
    assert record_torch_err("attention", *errs) <= 1e-10


def test_fully_masked_item_gives_zeros_and_zero_gradient(backend):
    inputs = _draw(3, 2, 4, 2, 3, True, "random")
    inputs[-1][0] = False  # item 0: no key may be attended to
    out, cache = ops.attention_forward(*_dev(backend, inputs))
    out, attn = backend.to_numpy(out), backend.to_numpy(cache.attn)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(attn))
    np.testing.assert_array_equal(attn[0], 0.0)
    # With no context, every token of item 0 comes out as the projection bias.
    np.testing.assert_array_equal(out[0], np.broadcast_to(inputs[4], out[0].shape))
    g = np.random.default_rng(0).standard_normal(out.shape)
    dx, dw_qkv, db_qkv, dw_proj, db_proj = ops.attention_backward(backend.asarray(g), cache)
    dx = backend.to_numpy(dx)
    assert np.all(np.isfinite(dx))
    np.testing.assert_array_equal(dx[0], 0.0)  # item 0's output does not depend on its x
    # Item 0 alone contributes nothing to the weight gradients of q, k, v.
    only0 = [a[:1] if isinstance(a, np.ndarray) and a.ndim == 3 else a for a in inputs]
    only0[-1] = inputs[-1][:1]
    out0, cache0 = ops.attention_forward(*_dev(backend, only0))
    grads0 = ops.attention_backward(backend.asarray(g[:1]), cache0)
    for slot in (0, 1, 2, 3):
        np.testing.assert_array_equal(backend.to_numpy(grads0[slot]), 0.0)


def test_single_valid_key_copies_its_value(backend):
    # With one valid key, every query puts probability 1 on it: ctx = v of that key.
    B, N, H, hd = 2, 5, 2, 2
    inputs = _draw(4, B, N, H, hd, True, "single")
    out, cache = ops.attention_forward(*_dev(backend, inputs))
    attn = backend.to_numpy(cache.attn)
    key = inputs[-1].argmax(axis=1)
    for b in range(B):
        np.testing.assert_array_equal(attn[b, :, :, key[b]], 1.0)


def test_cache_attn_is_head_major_as_timm(backend):
    # Rows of w_qkv are [q; k; v], each (H, hd) head-major: head 1 of q is rows hd..2hd.
    B, N, H, hd = 1, 3, 2, 2
    D = H * hd
    inputs = _draw(5, B, N, H, hd, False, "none")
    w = inputs[1].copy()
    w[:hd] = 0.0  # head 0 queries are zero -> head 0 attends uniformly
    inputs[1] = w
    _, cache = ops.attention_forward(*_dev(backend, inputs))
    attn = backend.to_numpy(cache.attn)
    np.testing.assert_allclose(attn[0, 0], 1.0 / N, rtol=1e-15)
    assert not np.allclose(attn[0, 1], 1.0 / N)
    assert D == 4


def test_bad_input(backend):
    B, N, D, H = 2, 3, 4, 2
    x = backend.asarray(np.zeros((B, N, D)))
    wq = backend.asarray(np.zeros((3 * D, D)))
    bq = backend.asarray(np.zeros(3 * D))
    wp = backend.asarray(np.zeros((D, D)))
    bp = backend.asarray(np.zeros(D))
    with pytest.raises(ValueError, match=r"num_heads=3 must divide the width D=4"):
        ops.attention_forward(x, wq, bq, wp, bp, 3)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int"):
        ops.attention_forward(x, wq, bq, wp, bp, 0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\), got \(3, 4\)"):
        ops.attention_forward(backend.asarray(np.zeros((N, D))), wq, bq, wp, bp, H)
    with pytest.raises(ValueError, match=r"w_qkv must have shape \(12, 4\)"):
        ops.attention_forward(x, backend.asarray(np.zeros((D, D))), bq, wp, bp, H)
    with pytest.raises(ValueError, match=r"b_qkv must have shape \(12\)"):
        ops.attention_forward(x, wq, bp, wp, bp, H)
    with pytest.raises(ValueError, match=r"w_proj must have shape \(4, 4\)"):
        ops.attention_forward(x, wq, bq, wq, bp, H)
    with pytest.raises(ValueError, match=r"b_proj must have shape \(4\)"):
        ops.attention_forward(x, wq, bq, wp, bq, H)
    with pytest.raises(ValueError, match=r"key_mask must have shape \(2, 3\).*got \(2, 4\)"):
        ops.attention_forward(x, wq, bq, wp, bp, H, backend.asarray(np.ones((B, D), bool)))
    with pytest.raises(TypeError, match=r"key_mask must be a boolean array"):
        ops.attention_forward(x, wq, bq, wp, bp, H, backend.asarray(np.ones((B, N))))
    with pytest.raises(TypeError, match=r"w_qkv has dtype float32 but x has dtype float64"):
        ops.attention_forward(x, wq.astype(np.float32), bq, wp, bp, H)
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got int64"):
        ops.attention_forward(x.astype(np.int64), wq, bq, wp, bp, H)
