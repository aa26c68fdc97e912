"""minivit.HybridViT: names and shapes, the backbone against PyTorch, a whole-model gradient check
in float64, state dicts and checkpoints, configs, bad input, and a few training steps."""

from __future__ import annotations

import numpy as np
import pytest
from _numgrad import rel_err
from _requires import require

import minivit
from minivit import HybridViT, ops
from minivit.gradcheck import check_model_directional

# Every backbone feature at a tiny size: a stem with a max-pool, an identity-shortcut block and a
# strided block with a 1x1 downsample, group norms of 2 groups. 8x8 -> 4x4 -> 4x4 -> 2x2.
CFG = dict(img_size=8, in_chans=2, num_classes=3, stem_chs=4, stem_kernel=3, stem_pool=True,
           stages=[[4, 1, 1], [6, 1, 2]], gn_groups=2, embed_dim=8, depth=1, num_heads=2,
           mlp_ratio=1.5)  # fmt: skip
BB = "patch_embed.backbone."


def tiny(backend, dtype="float64", **kw):
    seed = kw.pop("seed", 0)
    m = HybridViT(**{**CFG, **kw}, dtype=dtype, backend=backend, seed=seed)
    rng = np.random.default_rng(4)
    for k, p in m.params.items():  # off the init: zero-init norm scales, zero biases, tiny cls
        m.params[k] = p + backend.asarray((0.2 * rng.standard_normal(p.shape)).astype(dtype))
    return m


def test_names_and_shapes(backend):
    m = tiny(backend)
    assert m.grid == (2, 2) and m.num_patches == 4 and m.patch_size == 4
    shapes = {k: tuple(v.shape) for k, v in m.params.items()}
    expected = {
        BB + "stem.conv.weight": (4, 2, 3, 3),
        BB + "stem.norm.weight": (4,),
        BB + "stages.0.blocks.0.conv1.weight": (4, 4, 3, 3),
        BB + "stages.0.blocks.0.norm2.bias": (4,),
        BB + "stages.1.blocks.0.conv1.weight": (6, 4, 3, 3),
        BB + "stages.1.blocks.0.downsample.conv.weight": (6, 4, 1, 1),
        BB + "stages.1.blocks.0.downsample.norm.weight": (6,),
        "patch_embed.proj.weight": (8, 6, 1, 1),
        "patch_embed.proj.bias": (8,),
        "cls_token": (1, 1, 8),
        "pos_embed": (1, 5, 8),
        "blocks.0.attn.qkv.weight": (24, 8),
        "norm.weight": (8,),
        "head.weight": (3, 8),
    }
    for k, s in expected.items():
        assert shapes[k] == s, k
    assert BB + "stages.0.blocks.0.downsample.conv.weight" not in shapes  # identity shortcut
    assert not any("bias" in k and ".conv" in k for k in shapes)  # convs before norms: no bias
    x = backend.asarray(np.random.default_rng(0).standard_normal((3, 2, 8, 8)))
    logits = m.forward(x)
    assert logits.shape == (3, 3)
    dx = m.backward(backend.xp.ones_like(logits))
    assert dx.shape == x.shape
    assert list(m.grads) == list(m.params)
    assert all(m.grads[k].shape == m.params[k].shape for k in m.params)
    assert m.forward_features(x).shape == (3, 5, 8)


def torch_backbone(t, x, cfg):
    """The same backbone written with torch.nn.functional (an oracle): ``t`` maps minivit's
    parameter names to torch tensors. test_timm_oracle.py puts it inside timm's HybridEmbed."""
    import torch.nn.functional as F

    def gn(h, name):
        C = h.shape[1]
        g = max(d for d in range(1, min(cfg["gn_groups"], C) + 1) if C % d == 0)
        return F.group_norm(h, g, t[name + ".weight"], t[name + ".bias"], eps=1e-5)

    k = cfg["stem_kernel"]
    h = F.relu(gn(F.conv2d(x, t[BB + "stem.conv.weight"], padding=k // 2), BB + "stem.norm"))
    if cfg["stem_pool"]:
        h = F.max_pool2d(h, 2)
    cin = cfg["stem_chs"]
    for si, (c, n, s) in enumerate(cfg["stages"]):
        for bi in range(n):
            p = f"{BB}stages.{si}.blocks.{bi}."
            stride = s if bi == 0 else 1
            y = F.relu(
                gn(F.conv2d(h, t[p + "conv1.weight"], stride=stride, padding=1), p + "norm1")
            )
            y = gn(F.conv2d(y, t[p + "conv2.weight"], padding=1), p + "norm2")
            if stride != 1 or cin != c:
                sc = gn(F.conv2d(h, t[p + "downsample.conv.weight"], stride=stride),
                        p + "downsample.norm")  # fmt: skip
            else:
                sc = h
            h = F.relu(y + sc)
            cin = c
    return h


def test_backbone_matches_torch(backend):
    torch = require("torch")
    m = tiny(backend)
    x = np.random.default_rng(1).standard_normal((2, 2, 8, 8))
    feat, cache = m._backbone_forward(backend.asarray(x))
    g = np.random.default_rng(2).standard_normal(tuple(feat.shape))
    grads = {}
    dx = m._backbone_backward(backend.asarray(g), cache, grads)
    tx = torch.from_numpy(x).requires_grad_(True)
    tfeat = torch_backbone(
        {k: torch.from_numpy(v) for k, v in m.state_dict().items()}, tx, m.config
    )
    tfeat.backward(torch.from_numpy(g))
    assert rel_err(backend.to_numpy(feat), tfeat.detach().numpy()) <= 1e-10
    assert rel_err(backend.to_numpy(dx), tx.grad.numpy()) <= 1e-10


def test_whole_model_gradcheck(backend):
    m = tiny(backend)
    rng = np.random.default_rng(5)
    x = backend.asarray(rng.standard_normal((3, 2, 8, 8)))
    y = backend.asarray(np.array([0, 2, 1]))

    def loss():
        out, _ = ops.cross_entropy_forward(m.forward(x), y)
        return out

    _, c = ops.cross_entropy_forward(m.forward(x), y)
    dx = m.backward(ops.cross_entropy_backward(backend.xp.asarray(1.0), c)[0])
    check_model_directional(loss, m.params, m.grads, n_directions=3, rtol=1e-6).assert_ok()
    # One row per parameter says which one is wrong, should one be.
    rep = check_model_directional(loss, m.params, m.grads, per_parameter=True, n_directions=1)
    rep.assert_ok()
    # The image gradient, by one directional derivative.
    d = backend.asarray(rng.standard_normal(x.shape))
    eps = 1e-6
    lp = float(ops.cross_entropy_forward(m.forward(x + eps * d), y)[0])
    lm = float(ops.cross_entropy_forward(m.forward(x - eps * d), y)[0])
    num = (lp - lm) / (2 * eps)
    ana = float((dx * d).sum())
    assert abs(num - ana) <= 1e-6 * max(abs(ana), 1e-3)


def test_state_dict_roundtrip_and_checkpoint(backend, tmp_path):
    from minivit.checkpoint import load_model, save_model

    m = tiny(backend)
    sd = m.state_dict()
    assert all(isinstance(a, np.ndarray) for a in sd.values())
    other = HybridViT(**CFG, dtype="float64", backend=backend, seed=9)
    other.load_state_dict(sd)
    for k in sd:
        np.testing.assert_array_equal(backend.to_numpy(other.params[k]), sd[k])
    bad = dict(sd)
    del bad[BB + "stem.norm.bias"]
    bad["patch_embed.proj.weight"] = np.zeros((8, 5, 1, 1))
    bad["patch_embed.backbone.extra"] = np.zeros(2)
    with pytest.raises(ValueError) as e:
        other.load_state_dict(bad)
    for piece in (BB + "stem.norm.bias", "patch_embed.backbone.extra",
                  "patch_embed.proj.weight: expected (8, 6, 1, 1)"):  # fmt: skip
        assert piece in str(e.value)
    # save_model / load_model rebuild the class and config from the file's metadata.
    path = tmp_path / "hybrid.safetensors"
    save_model(path, m)
    loaded, _ = load_model(path, backend=backend)
    assert type(loaded).__name__ == "HybridViT" and loaded.config == m.config
    x = backend.asarray(np.random.default_rng(3).standard_normal((2, 2, 8, 8)))
    np.testing.assert_array_equal(backend.to_numpy(loaded.forward(x)), backend.to_numpy(m(x)))


def test_training_steps_reduce_the_loss(backend):
    from minivit.optim import AdamW

    m = HybridViT(**CFG, dtype="float64", backend=backend, seed=0)
    r = np.random.default_rng(7)
    y = np.arange(12) % 3
    x = r.standard_normal((3, 2, 8, 8))[y] + 0.5 * r.standard_normal((12, 2, 8, 8))  # 3 classes
    x, y = backend.asarray(x), backend.asarray(y)
    opt = AdamW(m.params, lr=1e-2, weight_decay=0.0)
    one = backend.xp.asarray(1.0)
    losses = []
    for _ in range(10):
        loss, c = ops.cross_entropy_forward(m.forward(x, train=True), y)
        m.backward(ops.cross_entropy_backward(one, c)[0])
        opt.step(m.grads)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_registry_configs():
    names = minivit.list_models()
    assert "hybrid_digits" in names and "hybrid_resnet_small_32" in names
    d = minivit.create_model("hybrid_digits")
    assert isinstance(d, HybridViT)
    assert (d.img_size, d.in_chans, d.num_classes, d.grid) == (8, 1, 10, (4, 4))
    r = minivit.create_model("hybrid_resnet_small_32", depth=1)
    assert (r.img_size, r.in_chans, r.grid, r.feature_chs, r.depth) == (32, 3, (8, 8), 128, 1)
    assert r.params["pos_embed"].shape == (1, 65, 192)
    # Zero-initialised last norm of every residual block: each block starts as the identity.
    for k, v in r.params.items():
        if k.endswith("norm2.weight") and k.startswith(BB):
            assert not np.any(v)


def test_dropout_train_and_eval(backend):
    m = tiny(backend, drop_rate=0.3, drop_path_rate=0.2)
    x = backend.asarray(np.random.default_rng(6).standard_normal((4, 2, 8, 8)))
    e1, e2 = m.forward(x), m.forward(x)
    np.testing.assert_array_equal(backend.to_numpy(e1), backend.to_numpy(e2))
    t = m.forward(x, train=True)
    assert not np.allclose(backend.to_numpy(t), backend.to_numpy(e1))
    dx = m.backward(backend.xp.ones_like(t))
    assert dx.shape == x.shape and set(m.grads) == set(m.params)


def test_float32_stays_float32(backend):
    m = tiny(backend, dtype="float32")
    x = backend.asarray(np.ones((2, 2, 8, 8), np.float32))
    out = m.forward(x, train=True)
    dx = m.backward(out)
    assert out.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in m.grads.values())


def test_no_head_returns_features(backend):
    m = tiny(backend, num_classes=0)
    assert "head.weight" not in m.params
    f = m.forward(backend.asarray(np.zeros((2, 2, 8, 8))))
    assert f.shape == (2, 8)
    m.backward(backend.xp.ones_like(f))
    assert set(m.grads) == set(m.params)


def test_bad_input(backend):
    m = tiny(backend)
    with pytest.raises(RuntimeError, match="needs the cache of a forward"):
        HybridViT(**CFG, backend=backend).backward(backend.xp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\(B, 2, 8, 8\).*got \(1, 3, 8, 8\)"):
        m.forward(backend.xp.zeros((1, 3, 8, 8)))
    with pytest.raises(TypeError, match="float64"):
        m.forward(backend.xp.zeros((1, 2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="divide"):
        HybridViT(**{**CFG, "embed_dim": 9})
    with pytest.raises(ValueError, match="stem_kernel"):
        HybridViT(**{**CFG, "stem_kernel": 2})
    with pytest.raises(ValueError, match=r"stages\[1\]"):
        HybridViT(**{**CFG, "stages": [[4, 1, 1], [6, 0, 2]]})


def test_forward_flops_by_hand():
    # stem 2 (4x4 px) (2 ch) (1 ch) (9 taps) = 576; proj 2 (16 tokens) (2 ch) (4) = 256;
    # block: 2 (17 tokens) (4) (4*4 + 2*4) = 3264 and 4 (17^2) (4) = 4624; head 2 (4) (3) = 24.
    m = HybridViT(img_size=4, in_chans=1, num_classes=3, stem_chs=2, stages=[], embed_dim=4,
                  depth=1, num_heads=1, mlp_ratio=1.0)  # fmt: skip
    assert m.forward_flops(1) == 576 + 256 + 3264 + 4624 + 24
    assert m.forward_flops(5) == 5 * m.forward_flops(1)


def test_train_command_runs_and_evaluates(tmp_path, capsys, backend):
    """`minivit train hybrid` (one short epoch) and `minivit eval` of its run, on the backend."""
    import json

    from minivit.cli import main

    out, on = tmp_path / "run", ["--backend", backend.name]
    args = ["train", "hybrid", "--epochs", "1", "--train-limit", "64", "--batch-size", "32",
            "--no-progress", "--no-plots", "--out", str(out), *on]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == backend.name and metrics["test_size"] == 360
    trained = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["eval", str(out), *on]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == trained


def test_train_command_builds_the_stem_it_is_given(tmp_path):
    """`train hybrid --stem-chs 6`: the trained model's stem has 6 channels, in the run's
    metrics, the checkpoint's config and its stem weights (the default config has 32), and the
    checkpoint reloads as that model."""
    import json

    from minivit.checkpoint import load_checkpoint, load_model, read_metadata
    from minivit.cli import main

    out = tmp_path / "run"
    args = ["train", "hybrid", "--stem-chs", "6", "--embed-dim", "16", "--depth", "1",
            "--num-heads", "2", "--epochs", "1", "--train-limit", "32", "--batch-size", "32",
            "--no-progress", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["stem_chs"] == 6
    path = out / "checkpoint.safetensors"
    meta = read_metadata(path)
    assert meta["config"]["stem_chs"] == 6 and meta["train"]["args"]["stem_chs"] == 6
    tensors, _ = load_checkpoint(path)
    assert tensors[BB + "stem.conv.weight"].shape == (6, 1, 3, 3)
    model, _ = load_model(path, backend="numpy")
    assert isinstance(model, HybridViT) and model.stem_chs == 6
