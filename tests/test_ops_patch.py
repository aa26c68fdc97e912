"""patch_embed_forward / patch_embed_backward: reference, gradients, conv2d oracle, errors."""

from __future__ import annotations

import numpy as np
import pytest
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

dims = dict(
    B=st.integers(1, 2),
    C=st.integers(1, 3),
    gh=st.integers(1, 3),
    gw=st.integers(1, 3),
    P=st.integers(1, 3),
    D=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**31),
)


def _draw(seed, B, C, gh, gw, P, D, bias):
    r = np.random.default_rng(seed)
    images = r.standard_normal((B, C, gh * P, gw * P))
    w = r.standard_normal((D, C, P, P))
    b = r.standard_normal(D) if bias else None
    return [images, w, b, P]


def ref_patch_embed(images, w, b, P):
    """Patch by patch in row-major order: out[b, i*gw + j] = <patch(i, j), w[d]> + b[d]."""
    B, C, H, W = images.shape
    gh, gw = H // P, W // P
    out = np.zeros((B, gh * gw, w.shape[0]))
    for i in range(gh):
        for j in range(gw):
            patch = images[:, :, i * P : (i + 1) * P, j * P : (j + 1) * P]  # (B, C, P, P)
            out[:, i * gw + j] = np.einsum("bcpq,dcpq->bd", patch, w)
    return out if b is None else out + b


@fixture_settings()
@given(**dims)
def test_forward_matches_reference(backend, B, C, gh, gw, P, D, bias, seed):
    inputs = _draw(seed, B, C, gh, gw, P, D, bias)
    dev = [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs]
    out, _ = ops.patch_embed_forward(*dev)
    assert out.shape == (B, gh * gw, D)
    assert rel_err(backend.to_numpy(out), ref_patch_embed(*inputs)) <= 1e-13


@fixture_settings()
@given(**dims)
def test_backward_matches_central_differences(backend, B, C, gh, gw, P, D, bias, seed):
    inputs = _draw(seed, B, C, gh, gw, P, D, bias)
    slots = {0: 0, 1: 1, 2: 2} if bias else {0: 0, 1: 1}
    check_grads(
        backend, ops.patch_embed_forward, ops.patch_embed_backward, inputs, slots, seed=seed
    )


@fixture_settings()
@given(**dims)
def test_matches_torch_conv2d(backend, B, C, gh, gw, P, D, bias, seed):
    torch = require("torch")
    inputs = _draw(seed, B, C, gh, gw, P, D, bias)
    dev = [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs]
    out, cache = ops.patch_embed_forward(*dev)
    g = np.random.default_rng(seed + 1).standard_normal(out.shape)
    dimages, dw, db = ops.patch_embed_backward(backend.asarray(g), cache)
    ti, tw = to_torch(inputs[0]), to_torch(inputs[1])
    tb = to_torch(inputs[2]) if bias else None
    # timm's PatchEmbed: conv with kernel = stride = P, then flatten(2).transpose(1, 2).
    tout = torch.nn.functional.conv2d(ti, tw, tb, stride=P).flatten(2).transpose(1, 2)
    tout.backward(torch.from_numpy(g))
    errs = [
        rel_err(backend.to_numpy(out), tout.detach().numpy()),
        rel_err(backend.to_numpy(dimages), ti.grad.numpy()),
        rel_err(backend.to_numpy(dw), tw.grad.numpy()),
    ]
    if bias:
        errs.append(rel_err(backend.to_numpy(db), tb.grad.numpy()))
    else:
        assert db is None
    assert record_torch_err("patch_embed", *errs) <= 1e-10


def test_patchify_roundtrip(backend):
    from minivit.ops.patch import patchify, unpatchify

    x = backend.asarray(np.arange(2 * 3 * 4 * 6, dtype=np.float64).reshape(2, 3, 4, 6))
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    # Patch (0, 1) of image 0, channel 0, flattened as (C, P, P): rows 0-1, columns 2-3.
    np.testing.assert_array_equal(backend.to_numpy(p)[0, 1, :4], [2, 3, 8, 9])
    np.testing.assert_array_equal(backend.to_numpy(unpatchify(p, x.shape, 2)), backend.to_numpy(x))


def test_bad_input(backend):
    images = backend.asarray(np.zeros((1, 3, 4, 6)))
    w = backend.asarray(np.zeros((5, 3, 2, 2)))
    b = backend.asarray(np.zeros(5))
    with pytest.raises(ValueError, match=r"image size 5x6 must be divisible by patch_size 2"):
        ops.patch_embed_forward(backend.asarray(np.zeros((1, 3, 5, 6))), w, b, 2)
    with pytest.raises(ValueError, match=r"image size 4x6 must be divisible by patch_size 4"):
        ops.patch_embed_forward(images, backend.asarray(np.zeros((5, 3, 4, 4))), b, 4)
    with pytest.raises(ValueError, match=r"w must have shape \(\*, 3, 2, 2\).*got \(5, 1, 2, 2\)"):
        ops.patch_embed_forward(images, backend.asarray(np.zeros((5, 1, 2, 2))), b, 2)
    with pytest.raises(ValueError, match=r"w must have shape \(D, C, P, P\)"):
        ops.patch_embed_forward(images, backend.asarray(np.zeros((5, 12))), b, 2)
    with pytest.raises(ValueError, match=r"images must have shape \(B, C, H, W\), got \(3, 4, 6\)"):
        ops.patch_embed_forward(backend.asarray(np.zeros((3, 4, 6))), w, b, 2)
    with pytest.raises(ValueError, match=r"patch_size must be a positive int, got 0"):
        ops.patch_embed_forward(images, w, b, 0)
    with pytest.raises(ValueError, match=r"b must have shape \(5\)"):
        ops.patch_embed_forward(images, w, backend.asarray(np.zeros(4)), 2)
    with pytest.raises(TypeError, match=r"w has dtype float32 but images has dtype float64"):
        ops.patch_embed_forward(images, w.astype(np.float32), b, 2)
    with pytest.raises(TypeError, match=r"images must have dtype float32 or float64, got uint8"):
        ops.patch_embed_forward(images.astype(np.uint8), w, b, 2)
