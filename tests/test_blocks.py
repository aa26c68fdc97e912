"""minivit.blocks: the pre-LN block against PyTorch, backward by directional derivatives,
gradient accumulation, prefixes, masks and dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minivit import blocks
from minivit.gradcheck import check_backward

D, HD, H = 8, 12, 2


def make_params(backend, prefix, rng, dtype="float64", qkv_bias=True):
    host = blocks.init_block_params(prefix, D, HD, qkv_bias, rng=rng)
    # Non-trivial norms and biases so every parameter matters.
    for k, v in host.items():
        host[k] = v + 0.3 * rng.standard_normal(v.shape)
    return {k: backend.asarray(v, dtype=dtype) for k, v in host.items()}


def torch_block(x, p, prefix, key_mask=None, eps=1e-6):
    """An independent pre-LN block in PyTorch (timm's Block, written out)."""
    t = {k: torch.tensor(v) for k, v in p.items()}
    x = torch.tensor(x)
    B, N, _ = x.shape
    h = torch.nn.functional.layer_norm(
        x, (D,), t[prefix + "norm1.weight"], t[prefix + "norm1.bias"], eps
    )
    qkv = h @ t[prefix + "attn.qkv.weight"].T + t[prefix + "attn.qkv.bias"]
    q, k, v = qkv.reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / (D // H) ** 0.5
    if key_mask is not None:
        s = s.masked_fill(~torch.tensor(key_mask)[:, None, None, :], float("-inf"))
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    x = x + a @ t[prefix + "attn.proj.weight"].T + t[prefix + "attn.proj.bias"]
    h = torch.nn.functional.layer_norm(
        x, (D,), t[prefix + "norm2.weight"], t[prefix + "norm2.bias"], eps
    )
    h = torch.nn.functional.gelu(h @ t[prefix + "mlp.fc1.weight"].T + t[prefix + "mlp.fc1.bias"])
    return (x + h @ t[prefix + "mlp.fc2.weight"].T + t[prefix + "mlp.fc2.bias"]).numpy()


@pytest.mark.parametrize("prefix", ["blocks.0.", "transformer.blocks.3."])
def test_block_matches_torch(backend, rng, prefix):
    p = make_params(backend, prefix, rng)
    x = rng.standard_normal((2, 5, D))
    mask = np.array([[True] * 5, [True, True, False, True, False]])
    out, cache = blocks.block_forward(
        backend.asarray(x), p, prefix, H, key_mask=backend.asarray(mask)
    )
    ref = torch_block(x, {k: backend.to_numpy(v) for k, v in p.items()}, prefix, mask)
    np.testing.assert_allclose(backend.to_numpy(out), ref, rtol=1e-12, atol=1e-12)
    assert cache.attn.shape == (2, H, 5, 5)
    # masked keys get exactly zero attention
    assert float(abs(backend.to_numpy(cache.attn)[1][..., [2, 4]]).max()) == 0.0


def _encoder_as_op(p, names, depth, mask, **opts):
    """The encoder as an op over (x, *params) for gradcheck.check_backward."""

    def fwd(x, *vals):
        q = dict(p)
        q.update(zip(names, vals))
        return blocks.encoder_forward(x, q, "blocks.", depth, H, key_mask=mask, **opts)

    def bwd(dout, cache):
        g = {}
        dx = blocks.encoder_backward(dout, cache, g)
        return (dx, *[g[k] for k in names])

    return fwd, bwd


def test_encoder_backward_directional(backend, rng):
    depth = 2
    p = {}
    for i in range(depth):
        p.update(make_params(backend, f"blocks.{i}.", rng))
    names = list(p)
    x = backend.asarray(rng.standard_normal((2, 4, D)))
    mask = backend.asarray(np.array([[True, True, True, True], [True, False, True, False]]))
    fwd, bwd = _encoder_as_op(p, names, depth, mask)
    rep = check_backward(
        fwd,
        bwd,
        [x, *[p[k] for k in names]],
        n_directions=2,
        rtol=1e-6,
        grad_indices=list(range(1 + len(names))),
        names=["x", *names],
    )
    rep.assert_ok()


def test_dropout_and_drop_path_backward(backend, rng):
    """With a fixed-seed generator the random masks are replayed, so the check is exact."""
    p = make_params(backend, "blocks.0.", rng)
    names = list(p)
    x = backend.asarray(rng.standard_normal((3, 4, D)))

    def fwd(x, *vals):
        q = dict(zip(names, vals))
        return blocks.block_forward(
            x, q, "blocks.0.", H, drop=0.3, drop_path=0.4, rng=backend.rng(5), train=True
        )

    def bwd(dout, cache):
        g = {}
        return (blocks.block_backward(dout, cache, g), *[g[k] for k in names])

    out, cache = fwd(x, *[p[k] for k in names])
    assert cache.drop_attn is not None and cache.path_mlp is not None
    check_backward(
        fwd,
        bwd,
        [x, *[p[k] for k in names]],
        n_directions=2,
        grad_indices=list(range(1 + len(names))),
        names=["x", *names],
    ).assert_ok()
    # eval mode: no randomness, no generator needed, identical to drop=0
    e1, _ = blocks.block_forward(x, p, "blocks.0.", H, drop=0.3, drop_path=0.4, train=False)
    e2, _ = blocks.block_forward(x, p, "blocks.0.", H)
    assert (backend.to_numpy(e1) == backend.to_numpy(e2)).all()
    assert not np.allclose(backend.to_numpy(out), backend.to_numpy(e2))


def test_grads_accumulate_and_residual(backend, rng):
    p = make_params(backend, "blocks.0.", rng)
    x = backend.asarray(rng.standard_normal((2, 3, D)))
    dout = backend.asarray(rng.standard_normal((2, 3, D)))
    _, c = blocks.block_forward(x, p, "blocks.0.", H)
    g1 = {}
    blocks.block_backward(dout, c, g1)
    assert set(g1) == set(p)
    g2 = {k: v.copy() for k, v in g1.items()}
    blocks.block_backward(dout, c, g2)  # a second pass adds
    for k in g1:
        np.testing.assert_allclose(backend.to_numpy(g2[k]), 2 * backend.to_numpy(g1[k]))
    # zero branches (zero projection and fc2 weights and biases): the block is the identity and
    # the input gradient is exactly the skip path's dout
    z = dict(p)
    for k in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
        z["blocks.0." + k] = p["blocks.0." + k] * 0
    out, c = blocks.block_forward(x, z, "blocks.0.", H)
    assert (backend.to_numpy(out) == backend.to_numpy(x)).all()
    dx = blocks.block_backward(dout, c, {})
    np.testing.assert_array_equal(backend.to_numpy(dx), backend.to_numpy(dout))


def test_no_qkv_bias_and_float32(backend, rng):
    p = make_params(backend, "b.", rng, dtype="float32", qkv_bias=False)
    assert "b.attn.qkv.bias" not in p
    x = backend.asarray(rng.standard_normal((2, 3, D)), dtype="float32")
    out, c = blocks.block_forward(x, p, "b.", H)
    assert out.dtype == np.float32
    g = {}
    dx = blocks.block_backward(out, c, g)
    assert dx.dtype == np.float32 and all(v.dtype == np.float32 for v in g.values())
    assert "b.attn.qkv.bias" not in g


def test_init_and_shapes():
    rng = np.random.default_rng(0)
    p = blocks.init_block_params("blocks.0.", 16, 64, rng=rng)
    assert {k: v.shape for k, v in p.items()} == blocks.block_param_shapes("blocks.0.", 16, 64)
    assert (p["blocks.0.norm1.weight"] == 1).all() and (p["blocks.0.mlp.fc1.bias"] == 0).all()
    w = blocks.trunc_normal(np.random.default_rng(1), (200, 200), std=0.02)
    assert abs(w.std() - 0.02) < 1e-3 and abs(w).max() <= 2.0
    w = blocks.trunc_normal(np.random.default_rng(1), (1000,), std=1.0, a=-0.5, b=0.5)
    assert w.min() >= -0.5 and w.max() <= 0.5


def test_encoder_drop_path_list_checked(backend, rng):
    p = make_params(backend, "blocks.0.", rng)
    x = backend.asarray(rng.standard_normal((1, 2, D)))
    with pytest.raises(ValueError, match="drop_path"):
        blocks.encoder_forward(x, p, "blocks.", 1, H, drop_path=[0.1, 0.2])


def test_drop_path_rescales_kept_samples(backend, rng):
    """Stochastic depth keeps each sample's branch with probability 1 - p and scales it by
    1 / (1 - p) (timm's DropPath), so its expectation is the eval-mode branch. With the MLP
    branch zeroed, out - x is the attention branch alone: per sample it is either exactly 0
    or the eval-mode branch / (1 - p), and a seeded generator gives both cases."""
    p = make_params(backend, "blocks.0.", rng)
    for k in ("mlp.fc2.weight", "mlp.fc2.bias"):
        p["blocks.0." + k] = p["blocks.0." + k] * 0
    x = backend.asarray(rng.standard_normal((8, 3, D)))
    rate = 0.4
    e, _ = blocks.block_forward(x, p, "blocks.0.", H)
    t, _ = blocks.block_forward(
        x, p, "blocks.0.", H, drop_path=rate, rng=backend.rng(3), train=True
    )
    xh = backend.to_numpy(x)
    branch_eval = backend.to_numpy(e) - xh
    branch_train = backend.to_numpy(t) - xh
    dropped = np.all(branch_train == 0, axis=(1, 2))
    assert dropped.any() and not dropped.all()
    assert np.all(np.abs(branch_eval[dropped]) > 0)  # 0 is not the eval branch by chance
    np.testing.assert_allclose(
        branch_train[~dropped], branch_eval[~dropped] / (1 - rate), rtol=1e-10, atol=1e-12
    )
