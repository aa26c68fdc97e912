"""minivit's ViT against timm's own ``VisionTransformer``, the model it claims to compute.

The other model tests compare with Hugging Face transformers, through minivit's own map from
Hugging Face's names to timm's. Here the oracle is timm itself (installed with ``--no-deps``;
``tests/_timm.py`` imports it without torchvision), so the names, the shapes, the order, the
forward, every gradient, the initialisation, the position-embedding resize and timm's own
published file format are all checked against code nobody here wrote. No weights are downloaded:
every timm model is built with ``pretrained=False`` and random weights.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from _requires import require
from _timm import import_timm
from test_hybrid import BB, torch_backbone
from test_hybrid import CFG as HYBRID  # the tiny hybrid: every backbone feature, 2x2 grid
from test_vit import hf_reference, minivit_loss_grads, perturbed, rel  # as the HF checks

import minivit
from minivit.checkpoint import CheckpointError, load_model
from minivit.convert import resample_abs_pos_embed

timm = require("timm", lambda _: import_timm())
from timm.layers import HybridEmbed  # noqa: E402
from timm.layers import resample_abs_pos_embed as timm_resample  # noqa: E402
from timm.models import save_for_hf  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.oracle

# Small enough for float64 everywhere, with every size distinct: 9 patches of 4x4x2, width 24 in
# 3 heads of 8, an MLP of 36, 5 classes.
SMALL = dict(img_size=12, patch_size=4, in_chans=2, num_classes=5, embed_dim=24, depth=2,
             num_heads=3, mlp_ratio=1.5)  # fmt: skip
TIMM_NAMES = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
              "vit_base_patch32_384")  # fmt: skip


def timm_small(dtype=torch.float64, **kw):
    """timm's VisionTransformer at SMALL (overridden by kw), every parameter perturbed: timm
    starts biases at 0 and norms at 1, where a wrong index or a missing term would not show."""
    torch.manual_seed(0)
    return perturbed(VisionTransformer(**{**SMALL, **kw}).to(dtype).eval())


def publish(folder, name="vit_tiny_patch16_224", float64=False, **kw):
    """timm's model ``name`` (random, seed 0), saved in ``folder`` as timm publishes it for the
    hub (``save_for_hf``); in float64 and perturbed if asked. Returns the model."""
    torch.manual_seed(0)
    t = timm.create_model(name, pretrained=False, **kw)
    if float64:
        t = perturbed(t.to(torch.float64).eval())
    save_for_hf(t, folder, safe_serialization=True)
    return t


def host_state(m):
    return {k: t.detach().numpy() for k, t in m.state_dict().items()}


def timm_loss_grads(m, x, y):
    """timm's logits, its autograd gradients by parameter name, and the image gradient."""
    return hf_reference(m, x, y, logits_of=lambda m, xt: m(xt))


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_registered_configs_have_timms_names_shapes_and_order(name):
    """The state dict of timm's model of the same name, key for key, in timm's order."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        t = timm.create_model(name, pretrained=False)
    v = minivit.create_model(name)
    theirs = [(k, tuple(p.shape)) for k, p in t.state_dict().items()]
    ours = [(k, tuple(p.shape)) for k, p in v.params.items()]
    assert ours == theirs
    assert v.num_params() == sum(p.numel() for p in t.parameters())
    attn = t.blocks[0].attn
    assert v.config["num_heads"] == attn.num_heads
    assert v.config["eps"] == t.norm.eps == t.blocks[0].norm1.eps
    assert v.mlp_hidden == t.blocks[0].mlp.fc1.out_features


@pytest.mark.parametrize(
    "kw",
    [{}, {"global_pool": "avg"}, {"qkv_bias": False}, {"depth": 1, "num_heads": 1}],
    ids=["token", "avg", "no-qkv-bias", "one-head"],
)
def test_forward_and_every_gradient_match_timm_float64(backend, kw):
    """timm's weights load by name as they are (no conversion); the logits, the gradient of
    every parameter (by name) and the image gradient agree with timm's autograd."""
    m = timm_small(**kw)
    v = minivit.ViT(**{**SMALL, **kw}, dtype="float64", backend=backend)
    sd = host_state(m)
    assert list(sd) == list(v.params)
    v.load_state_dict(sd)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 2, 12, 12)), np.array([0, 3, 4])
    ref_logits, ref_grads, ref_dx = timm_loss_grads(m, x, y)
    logits, grads, dx = minivit_loss_grads(v, x, y, backend)
    dx = backend.to_numpy(dx)
    assert rel(logits, ref_logits) < 1e-12
    assert set(grads) == set(ref_grads)
    worst = max((rel(grads[k], ref_grads[k]), k) for k in grads)
    assert worst[0] < 1e-10, worst
    assert rel(dx, ref_dx) < 1e-10


def test_without_a_head_the_features_are_timms(backend):
    """num_classes=0: timm's forward returns the pooled features; so does minivit's, and the
    backward of a gradient on them gives timm's parameter gradients."""
    for pool in ("token", "avg"):
        m = timm_small(num_classes=0, global_pool=pool)
        v = minivit.ViT(**{**SMALL, "num_classes": 0, "global_pool": pool}, dtype="float64",
                        backend=backend)  # fmt: skip
        v.load_state_dict(host_state(m))
        x = np.random.default_rng(1).standard_normal((2, 2, 12, 12))
        g = np.random.default_rng(2).standard_normal((2, 24))
        xt = torch.tensor(x)
        feats = m(xt)
        (feats * torch.tensor(g)).sum().backward()
        out = v.forward(backend.asarray(x))
        assert out.shape == (2, 24)
        assert rel(backend.to_numpy(out), feats.detach().numpy()) < 1e-12
        v.backward(backend.asarray(g), input_grad=False)
        for k, p in m.named_parameters():
            assert rel(backend.to_numpy(v.grads[k]), p.grad.numpy()) < 1e-10, (pool, k)


def test_vit_tiny_at_224_float32_matches_timm(backend):
    """The real ViT-Ti/16 in float32, with timm's own initialisation: the sizes where minivit's
    float32 fast paths and kernels run (the small float64 tests stay on the generic code)."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    v = minivit.create_model("vit_tiny_patch16_224", backend=backend)
    v.load_state_dict(host_state(m))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    y = np.array([7, 901])
    ref_logits, ref_grads, ref_dx = timm_loss_grads(m, x, y)
    logits, grads, dx = minivit_loss_grads(v, x, y, backend)
    dx = backend.to_numpy(dx)
    assert logits.dtype == np.float32 and dx.dtype == np.float32
    assert rel(logits, ref_logits) < 2e-5  # 1.4e-6 measured on NumPy
    worst = max((rel(grads[k], ref_grads[k]), k) for k in grads)
    assert worst[0] < 1e-4, worst  # 2.3e-6
    assert rel(dx, ref_dx) < 1e-4  # 1.6e-6


class _HybridBackbone(torch.nn.Module):
    """minivit's hybrid CNN in torch (test_hybrid's functional oracle) as the backbone module
    that timm's HybridEmbed takes; its weights under minivit's names with '.' as '/'."""

    def __init__(self, shapes, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.ParameterDict()  # (built from a plain dict, it would sort the keys)
        for k, s in shapes.items():
            self.w[k.replace(".", "/")] = torch.nn.Parameter(0.5 * torch.randn(s))

    @staticmethod
    def name(key):
        """minivit's name for a key of timm's state dict around this backbone."""
        return key.removeprefix(BB + "w.").replace("/", ".")

    def forward(self, x):
        return torch_backbone({k.replace("/", "."): p for k, p in self.w.items()}, x, self.cfg)


def test_hybrid_is_timms_vision_transformer_over_its_cnn(backend):
    """The Hybrid ViT is timm's VisionTransformer with a HybridEmbed (a CNN, then a 1x1 proj):
    timm's model built that way around minivit's CNN (in torch) has the transformer half's
    names, shapes and order, and its logits and every gradient are minivit's. So the feature
    map becomes tokens as timm flattens it, and the proj, CLS, positions, blocks and head are
    timm's; the CNN alone is test_hybrid.py's check against torch."""
    v = minivit.HybridViT(**HYBRID, dtype="float64", backend=backend)
    torch.manual_seed(0)
    bb = _HybridBackbone({k: p.shape for k, p in v.params.items() if k.startswith(BB)}, v.config)
    keys = ("img_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio")
    m = VisionTransformer(
        **{k: HYBRID[k] for k in keys},
        patch_size=1,  # timm's hybrids take the feature map's positions as 1x1 patches
        embed_layer=lambda **kw: HybridEmbed(backbone=bb, **kw),
    )
    m = perturbed(m.to(torch.float64).eval())
    assert m.patch_embed.grid_size == v.grid
    theirs = [(k, tuple(p.shape)) for k, p in m.state_dict().items()]
    ours = [(k, tuple(p.shape)) for k, p in v.params.items()]
    assert [kv for kv in ours if not kv[0].startswith(BB)] == [
        kv for kv in theirs if not kv[0].startswith(BB)
    ]
    sd = {_HybridBackbone.name(k): a for k, a in host_state(m).items()}
    assert list(sd) == list(v.params)  # the backbone's order too, as minivit lists it
    v.load_state_dict(sd)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, HYBRID["in_chans"], 8, 8)), np.array([0, 2, 1])
    ref_logits, ref_grads, ref_dx = timm_loss_grads(m, x, y)
    ref_grads = {_HybridBackbone.name(k): g for k, g in ref_grads.items()}
    logits, grads, dx = minivit_loss_grads(v, x, y, backend)
    assert rel(logits, ref_logits) < 1e-12  # 6.5e-16 measured on NumPy
    assert set(grads) == set(ref_grads)
    worst = max((rel(grads[k], ref_grads[k]), k) for k in grads)
    assert worst[0] < 1e-10, worst  # 6.2e-15
    assert rel(backend.to_numpy(dx), ref_dx) < 1e-10  # 3.4e-15


def _stats(a):
    a = np.asarray(a, np.float64)
    return a.mean(), a.std(), np.abs(a).max()


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_initialisation_follows_timms(global_pool):
    """Each parameter starts from timm's distribution: compared by mean, spread and largest
    magnitude with those of timm's own freshly built ViT-S/16 (random, so within tolerance),
    and the constant ones (norms at 1, biases at 0) exactly."""
    torch.manual_seed(0)
    t = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2,
                          global_pool=global_pool)  # fmt: skip
    v = minivit.create_model("vit_small_patch16_224", depth=2, global_pool=global_pool)
    theirs = host_state(t)
    assert list(theirs) == list(v.params)
    for k, a in v.params.items():
        b = theirs[k]
        if np.ptp(b) == 0:  # a constant: ones or zeros
            assert np.array_equal(np.asarray(a), b), k
            continue
        (ma, sa, xa), (mb, sb, xb) = _stats(a), _stats(b)
        assert abs(ma - mb) < 4 * sb / np.sqrt(b.size) + 1e-12, (k, ma, mb)
        assert 0.8 < sa / sb < 1.25, (k, sa, sb)
        # the largest magnitude tells a uniform (bounded) from a normal of the same spread
        assert 0.6 < xa / xb < 1.6, (k, xa, xb)


@pytest.mark.parametrize("old,new", [(14, 7), (7, 14), (14, 24), (4, 5)])
def test_position_embedding_resize_is_timms(old, new):
    """minivit.convert.resample_abs_pos_embed against timm's function of the same name (bicubic,
    antialiased, the CLS token kept). timm interpolates in float32 whatever the input, so the
    two agree to float32 rounding; minivit works in float64."""
    pe = np.random.default_rng(old * 100 + new).standard_normal((1, 1 + old * old, 8))
    ours = resample_abs_pos_embed(pe, (new, new))
    with torch.no_grad():
        ref = timm_resample(torch.tensor(pe), (new, new), num_prefix_tokens=1).numpy()
    assert ours.shape == ref.shape == (1, 1 + new * new, 8)
    assert rel(ours, ref) < 1e-5


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_heads": 6},
        {"global_pool": "avg", "num_classes": 0},
        {"mlp_ratio": 2.7},
        {"act_layer": "gelu"},
    ],
    ids=["as-registered", "other-heads", "avg-no-head", "mlp-ratio-2.7", "gelu-by-name"],
)
def test_a_folder_timm_publishes_loads(backend, tmp_path, kw):
    """The folder timm writes for the Hugging Face hub (``save_for_hf``: model.safetensors and
    timm's config.json, with its ``architecture`` and ``model_args``) loads with
    ``load_model`` and computes what timm computes, including a head count the weights cannot
    show."""
    kw = {"num_classes": 7, **kw}
    t = publish(tmp_path, depth=2, img_size=32, float64=True, **kw)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224"  # timm's format, not transformers'
    v, _ = load_model(tmp_path / "model.safetensors", backend=backend, dtype="float64")
    assert v.config["num_heads"] == t.blocks[0].attn.num_heads
    assert v.config["global_pool"] == t.global_pool
    assert v.config["mlp_ratio"] == kw.get("mlp_ratio", 4.0)  # as declared, not 518 / 192
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32))
    with torch.no_grad():
        ref = t(torch.tensor(x)).numpy()
    assert rel(backend.to_numpy(v.forward(backend.asarray(x))), ref) < 1e-12


def test_a_timm_folder_whose_config_disagrees_is_refused(tmp_path):
    """timm's config.json names the model's depth (in ``model_args``) and its width
    (``num_features``): weights that disagree with it are refused, as with transformers'."""
    publish(tmp_path, depth=2, img_size=32)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_args"]["depth"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="depth"):
        load_model(tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"global_pool": "avg", "fc_norm": False}, "global_pool is 'avg'"),
        ({"class_token": False, "global_pool": "avg"}, "class_token=False"),
        ({"reg_tokens": 2}, "reg_tokens=2"),
        ({"act_layer": "gelu_tanh"}, "act_layer='gelu_tanh'"),
    ],
    ids=["avg-pool-without-fc-norm", "no-class-token", "register-tokens", "tanh-gelu"],
)
def test_a_timm_model_minivit_would_compute_differently_is_refused(tmp_path, kw, match):
    """timm options whose weights minivit's names could misread, or that leave no trace in the
    names at all, are refused by what timm's config.json says instead of giving other outputs:
    an average pool over the final norm (the names read as a CLS-token pool), no class token,
    register tokens, another activation."""
    publish(tmp_path, depth=1, img_size=32, **kw)
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "model.safetensors")


def test_a_timm_folder_of_a_name_minivit_does_not_know_warns_about_its_heads(tmp_path):
    """timm's config.json gives the head count only when the model was built with one other
    than its name's. For a name minivit does not register, the count is the width's common one,
    a guess: load_model says so, and num_heads= settles it. timm's own test_vit (width 64 in 2
    heads of 32) is such a model."""
    t = publish(tmp_path, "test_vit", float64=True)
    path = tmp_path / "model.safetensors"
    with pytest.warns(UserWarning, match="does not give the head count of 'test_vit'"):
        guessed, _ = load_model(path, dtype="float64")
    assert guessed.config["num_heads"] == 1 != t.blocks[0].attn.num_heads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, _ = load_model(path, dtype="float64", num_heads=2)
    x = np.random.default_rng(5).standard_normal((1, 3, 160, 160))
    with torch.no_grad():
        ref = t(torch.tensor(x)).numpy()
    assert rel(v.forward(x), ref) < 1e-12


@pytest.mark.parametrize(
    "config,match",
    [
        (None, "is not a JSON object"),
        ([], "is not a JSON object"),
        ({"architecture": None}, "architecture is not a name"),
        ({"architecture": "vit_tiny_patch16_224", "model_args": []}, "model_args is not"),
    ],
    ids=["null", "list", "no-architecture-name", "model-args-list"],
)
def test_a_config_json_of_the_wrong_shape_is_refused(tmp_path, config, match):
    publish(tmp_path, depth=1, img_size=32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "model.safetensors")


def test_transformers_head_count_wins_over_a_stray_num_heads(tmp_path):
    """A transformers config.json with both names: num_attention_heads is transformers' own."""
    publish(tmp_path, depth=1, img_size=32)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 3, "num_heads": 6}))
    v, _ = load_model(tmp_path / "model.safetensors")
    assert v.config["num_heads"] == 3
