"""minivit.ViT: parity with Hugging Face transformers (both state-dict namings) and with
timm-named weights, a whole-model gradient check, state dicts, configs and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import minivit
from minivit import ViT, ops
from minivit.convert import from_hf_vit
from minivit.gradcheck import check_model_directional

CFG = dict(img_size=8, patch_size=2, in_chans=3, num_classes=5, embed_dim=16, depth=2,
           num_heads=4, mlp_ratio=1.5)  # fmt: skip


def hf_model(dtype=torch.float64):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    c = ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=16,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, num_labels=5,
                  layer_norm_eps=1e-6, hidden_act="gelu")  # fmt: skip
    return perturbed(ViTForImageClassification(c).to(dtype).eval())


def perturbed(m):
    """m with every parameter moved off its initial value, in place: HF and timm start biases
    at 0 and norms at 1, where a wrong index or a missing term would not show."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def hub_naming(sd):
    """transformers-5 in-memory names -> the names of checkpoints published on the hub."""
    out = {}
    for k, v in sd.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for a, b in (("attention.q_proj", "attention.attention.query"),
                     ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"),
                     ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):  # fmt: skip
            k = k.replace(a, b)
        out[k] = v
    return out


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def hf_reference(m, x, y, logits_of=lambda m, xt: m(pixel_values=xt).logits):
    """The torch model's logits, its autograd gradients by parameter name and the image
    gradient, of a mean cross-entropy (``logits_of``: how the model is called; timm's takes
    the images alone)."""
    xt = torch.tensor(x, requires_grad=True)
    logits = logits_of(m, xt)
    torch.nn.functional.cross_entropy(logits, torch.tensor(y)).backward()
    grads = {k: p.grad.numpy() for k, p in m.named_parameters()}
    return logits.detach().numpy(), grads, xt.grad.numpy()


def minivit_loss_grads(v, x, y, backend):
    logits = v.forward(backend.asarray(x))
    _, cache = ops.cross_entropy_forward(logits, backend.asarray(y))
    (dl,) = ops.cross_entropy_backward(backend.xp.asarray(1.0, dtype=logits.dtype), cache)
    dx = v.backward(dl)
    return backend.to_numpy(logits), {k: backend.to_numpy(g) for k, g in v.grads.items()}, dx


@pytest.mark.oracle
@pytest.mark.parametrize("naming", ["transformers5", "hub"])
def test_parity_with_transformers_float64(backend, naming):
    m = hf_model()
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    assert any(".attention.q_proj." in k for k in sd)  # the installed naming, as documented
    if naming == "hub":
        sd = hub_naming(sd)
        assert any(".attention.attention.query." in k for k in sd)
    v = ViT(**CFG, dtype="float64", backend=backend)
    v.load_state_dict(from_hf_vit(sd))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 3, 8, 8)), np.array([0, 3, 4])
    ref_logits, ref_grads, ref_dx = hf_reference(m, x, y)
    logits, grads, dx = minivit_loss_grads(v, x, y, backend)
    assert rel(logits, ref_logits) < 1e-10
    ref = from_hf_vit(ref_grads)  # HF gradients under timm names, q/k/v fused like the weights
    assert set(ref) == set(grads) == set(v.params)
    worst = max(rel(grads[k], ref[k]) for k in grads)
    assert worst < 1e-8, worst
    assert rel(backend.to_numpy(dx), ref_dx) < 1e-8


@pytest.mark.oracle
def test_parity_with_transformers_float32(backend):
    m = hf_model(torch.float32)
    v = ViT(**CFG, dtype="float32", backend=backend)
    v.load_state_dict(from_hf_vit({k: t.numpy() for k, t in m.state_dict().items()}))
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = m(pixel_values=torch.tensor(x)).logits.numpy()
    out = v.forward(backend.asarray(x))
    assert out.dtype == np.float32
    assert rel(backend.to_numpy(out), ref) < 1e-5


@pytest.mark.oracle
def test_timm_named_safetensors_file_loads(backend, tmp_path):
    """A timm-keyed model.safetensors (as timm writes it) loads by name and gives HF's logits."""
    from safetensors.numpy import save_file

    from minivit.checkpoint import load_model

    m = hf_model()
    timm_sd = from_hf_vit({k: t.numpy() for k, t in m.state_dict().items()})
    assert list(timm_sd)[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight",
                                 "patch_embed.proj.bias"]  # fmt: skip
    save_file(
        {k: np.ascontiguousarray(v) for k, v in timm_sd.items()}, tmp_path / "model.safetensors"
    )
    v, _ = load_model(tmp_path / "model.safetensors", backend=backend, dtype="float64",
                      num_heads=4, eps=1e-6)  # fmt: skip
    assert v.config["depth"] == 2 and v.config["mlp_ratio"] == 1.5
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8))
    with torch.no_grad():
        ref = m(pixel_values=torch.tensor(x)).logits.numpy()
    assert rel(backend.to_numpy(v.forward(backend.asarray(x))), ref) < 1e-10
    # the HF hub file with its config.json beside it loads too (heads and eps from the json)
    hub = tmp_path / "hub"
    hub.mkdir()
    sd = hub_naming({k: t.numpy() for k, t in m.state_dict().items()})
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, hub / "model.safetensors")
    m.config.to_json_file(hub / "config.json")
    v2, _ = load_model(hub / "model.safetensors", backend=backend, dtype="float64")
    assert v2.config["num_heads"] == 4
    assert rel(backend.to_numpy(v2.forward(backend.asarray(x))), ref) < 1e-10


@pytest.mark.oracle
def test_a_hub_file_that_disagrees_with_its_config_is_refused(tmp_path):
    """The blocks are counted by their names, so a file that lost its last whole block loaded as
    a one-block model without a word. The config.json beside it says two: refused, naming it."""
    from safetensors.numpy import save_file

    from minivit.checkpoint import CheckpointError, load_model

    m = hf_model()
    sd = hub_naming({k: t.numpy() for k, t in m.state_dict().items()})
    cut = {k: np.ascontiguousarray(v) for k, v in sd.items() if ".layer.1." not in k}
    assert len(cut) < len(sd)
    save_file(cut, tmp_path / "model.safetensors")
    m.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"num_hidden_layers is 2, the weights give depth=1"):
        load_model(tmp_path / "model.safetensors")
    (tmp_path / "config.json").unlink()  # without the config nothing says so: it loads
    v, _ = load_model(tmp_path / "model.safetensors")
    assert v.depth == 1


@pytest.mark.oracle
@pytest.mark.parametrize(
    "change,match",
    [({"hidden_act": "gelu_new"}, r"hidden_act is 'gelu_new'.*exact GELU"),
     ({"intermediate_size": 32}, r"intermediate_size is 32, the weights give an MLP of 24")],
    ids=["tanh-gelu", "other-mlp-width"],
)  # fmt: skip
def test_what_a_hub_config_says_beyond_the_shapes_is_checked(tmp_path, change, match):
    """transformers' activation leaves no trace in the weights (a tanh-approximated GELU would
    load and compute the exact one), and its MLP width must be the weights' own."""
    from safetensors.numpy import save_file

    from minivit.checkpoint import CheckpointError, load_model

    m = hf_model()
    sd = hub_naming({k: t.numpy() for k, t in m.state_dict().items()})
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp_path / "model.safetensors")
    for k, v in change.items():
        setattr(m.config, k, v)
    m.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "model.safetensors")


def tiny(backend, **kw):
    cfg = dict(img_size=4, patch_size=2, in_chans=2, num_classes=3, embed_dim=8, depth=2,
               num_heads=2, dtype="float64", backend=backend, seed=3)  # fmt: skip
    cfg.update(kw)
    v = ViT(**cfg)
    rng = np.random.default_rng(4)
    for k, p in v.params.items():  # move off the init (zero biases, unit norms, tiny cls)
        v.params[k] = p + backend.asarray(0.2 * rng.standard_normal(p.shape))
    return v


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_whole_model_gradcheck(backend, global_pool):
    """Every parameter's and the image's gradient against central differences, for the CLS
    token's head and for timm's average pool (fc_norm over the mean of the patch tokens)."""
    v = tiny(backend, global_pool=global_pool)
    rng = np.random.default_rng(5)
    x = backend.asarray(rng.standard_normal((3, 2, 4, 4)))
    y = backend.asarray(np.array([0, 2, 1]))

    def loss():
        out, _ = ops.cross_entropy_forward(v.forward(x), y)
        return out

    _, c = ops.cross_entropy_forward(v.forward(x), y)
    dx = v.backward(ops.cross_entropy_backward(backend.xp.asarray(1.0), c)[0])
    assert list(v.grads) == list(v.params)
    check_model_directional(loss, v.params, v.grads, n_directions=3, rtol=1e-6).assert_ok()
    rep = check_model_directional(loss, v.params, v.grads, per_parameter=True, n_directions=1)
    rep.assert_ok()
    # the image gradient, by one directional derivative
    d = backend.asarray(rng.standard_normal(x.shape))
    eps = 1e-6
    lp = float(ops.cross_entropy_forward(v.forward(x + eps * d), y)[0])
    lm = float(ops.cross_entropy_forward(v.forward(x - eps * d), y)[0])
    num = (lp - lm) / (2 * eps)
    ana = float((dx * d).sum())
    assert abs(num - ana) <= 1e-6 * max(abs(ana), 1e-3)


def test_training_forward_gradcheck_with_dropout_and_drop_path(backend):
    """In training, dropout (after the position embedding, in every block and before the head)
    and stochastic depth draw masks; with the generator reseeded before each forward the masks
    are fixed, and the loss is a smooth function of the parameters whose gradient backward must
    give, masks included (a mask dropped from the backward passed every other test)."""
    v = tiny(backend, drop_rate=0.3, drop_path_rate=0.3)
    rng = np.random.default_rng(7)
    x = backend.asarray(rng.standard_normal((3, 2, 4, 4)))
    y = backend.asarray(np.array([0, 2, 1]))

    def forward():
        v.rng = backend.rng(11)  # the same masks at every evaluation
        return v.forward(x, train=True)

    def loss():
        return ops.cross_entropy_forward(forward(), y)[0]

    with minivit.no_grad():
        plain = v.forward(x)
    assert not np.allclose(backend.to_numpy(forward()), backend.to_numpy(plain))  # masks drawn
    _, c = ops.cross_entropy_forward(forward(), y)
    v.backward(ops.cross_entropy_backward(backend.xp.asarray(1.0), c)[0])
    rep = check_model_directional(loss, v.params, v.grads, per_parameter=True, n_directions=1)
    rep.assert_ok()


def test_dropout_train_and_eval(backend):
    v = tiny(backend, drop_rate=0.3, drop_path_rate=0.2)
    x = backend.asarray(np.random.default_rng(6).standard_normal((4, 2, 4, 4)))
    e1, e2 = v.forward(x), v.forward(x)
    assert (backend.to_numpy(e1) == backend.to_numpy(e2)).all()
    t = v.forward(x, train=True)
    assert not np.allclose(backend.to_numpy(t), backend.to_numpy(e1))
    dx = v.backward(backend.xp.ones_like(t))
    assert dx.shape == x.shape and set(v.grads) == set(v.params)


def test_state_dict_roundtrip_and_errors(backend):
    v = tiny(backend)
    sd = v.state_dict()
    assert all(isinstance(a, np.ndarray) for a in sd.values())
    w = tiny(backend, seed=9)
    w.load_state_dict(sd)
    for k in sd:
        assert (backend.to_numpy(w.params[k]) == sd[k]).all()
    bad = dict(sd)
    del bad["norm.weight"], bad["blocks.1.mlp.fc1.bias"]
    bad["head.extra"] = np.zeros(3)
    bad["pos_embed"] = np.zeros((1, 4, 8))
    with pytest.raises(ValueError) as e:
        w.load_state_dict(bad)
    msg = str(e.value)
    for name in (
        "norm.weight",
        "blocks.1.mlp.fc1.bias",
        "head.extra",
        "pos_embed: expected (1, 5, 8)",
    ):
        assert name in msg
    missing, unexpected = w.load_state_dict({"head.extra": np.zeros(3)}, strict=False)
    assert "head.extra" in unexpected and "norm.weight" in missing


def test_bad_input(backend):
    v = tiny(backend)
    with pytest.raises(RuntimeError, match="needs the cache of a forward"):
        v.backward(backend.xp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\(B, 2, 4, 4\).*got \(1, 3, 4, 4\)"):
        v.forward(backend.xp.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"img_size=4.*got \(1, 2, 8, 8\)"):
        v.forward(backend.xp.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match="got \\(2, 4, 4\\)"):
        v.forward(backend.xp.zeros((2, 4, 4)))
    with pytest.raises(TypeError, match="float64"):
        v.forward(backend.xp.zeros((1, 2, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="divisible"):
        ViT(img_size=10, patch_size=4)
    with pytest.raises(ValueError, match="divide"):
        ViT(embed_dim=10, num_heads=3, depth=1, img_size=16)


def test_float32_stays_float32(backend):
    v = ViT(img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depth=1,
            num_heads=2, backend=backend)  # fmt: skip
    x = backend.asarray(np.ones((2, 1, 4, 4), np.float32))
    out = v.forward(x, train=True)
    dx = v.backward(out)
    assert out.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in v.grads.values())


def test_no_head_returns_features(backend):
    v = tiny(backend, num_classes=0)
    assert "head.weight" not in v.params
    x = backend.asarray(np.random.default_rng(1).standard_normal((2, 2, 4, 4)))
    f = v.forward(x)
    assert f.shape == (2, 8)
    v.backward(backend.xp.ones_like(f))
    assert set(v.grads) == set(v.params)


def test_registry():
    names = minivit.list_models()
    for n in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
              "vit_base_patch32_384", "vit_digits"):  # fmt: skip
        assert n in names
    m = minivit.create_model("vit_tiny_patch16_224", depth=1)
    assert m.config["embed_dim"] == 192 and m.config["num_heads"] == 3 and m.config["depth"] == 1
    # timm's parameter counts
    assert minivit.create_model("vit_tiny_patch16_224").num_params() == 5_717_416
    from minivit.models.registry import model_config

    assert model_config("vit_base_patch32_384")["patch_size"] == 32
    with pytest.raises(ValueError, match="unknown model"):
        minivit.create_model("vit_huge_nope")


def test_timm_init_statistics():
    v = minivit.create_model("vit_small_patch16_224", depth=2)
    p = {k: np.asarray(a, np.float64) for k, a in v.params.items()}
    assert abs(p["blocks.0.attn.qkv.weight"].std() - 0.02) < 5e-4
    assert abs(p["pos_embed"].std() - 0.02) < 1e-3
    assert np.abs(p["cls_token"]).max() < 1e-5
    assert (p["blocks.1.norm2.weight"] == 1).all() and (p["head.bias"] == 0).all()
    assert p["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert np.abs(p["patch_embed.proj.weight"]).max() <= 1 / np.sqrt(3 * 16 * 16)


@pytest.mark.parametrize("cls_name", ["ViT", "HybridViT"])
def test_backward_without_input_grad_gives_the_same_parameter_grads(backend, cls_name):
    # Training skips the image gradient (input_grad=False): the parameter grads must not change.
    if cls_name == "ViT":
        v = ViT(img_size=8, patch_size=2, in_chans=2, num_classes=3, embed_dim=8, depth=1,
                num_heads=2, dtype="float64", backend=backend)  # fmt: skip
    else:
        v = minivit.create_model("hybrid_digits", num_classes=3, dtype="float64",
                                 backend=backend)  # fmt: skip
    x = np.random.default_rng(3).standard_normal((2, v.in_chans, v.img_size, v.img_size))
    x = backend.asarray(x)
    d = backend.xp.asarray(np.random.default_rng(4).standard_normal((2, 3)))
    v.forward(x)
    dx = v.backward(d)
    full = {k: backend.to_numpy(g) for k, g in v.grads.items()}
    assert dx.shape == x.shape
    v.forward(x)
    assert v.backward(d, input_grad=False) is None
    for k, g in v.grads.items():
        np.testing.assert_array_equal(backend.to_numpy(g), full[k], err_msg=k)


def test_the_constructor_takes_api_md_positional_order():
    """shared/API.md: ViT(img_size, patch_size, in_chans, num_classes, embed_dim, depth,
    num_heads, mlp_ratio, qkv_bias, eps, dtype, backend, seed); the rest is keyword only."""
    v = ViT(8, 4, 2, 3, 8, 1, 2, 2.0, False, 1e-5, "float64", "numpy", 7)
    assert (v.img_size, v.patch_size, v.in_chans, v.num_classes) == (8, 4, 2, 3)
    assert (v.embed_dim, v.depth, v.num_heads, v.mlp_ratio) == (8, 1, 2, 2.0)
    assert (v.qkv_bias, v.eps, v.dtype, v.backend.name) == (False, 1e-5, "float64", "numpy")
    same = ViT(8, 4, 2, 3, 8, 1, 2, 2.0, False, 1e-5, dtype="float64", seed=7)
    for k in v.params:
        np.testing.assert_array_equal(v.params[k], same.params[k])
    with pytest.raises(TypeError):
        ViT(8, 4, 2, 3, 8, 1, 2, 2.0, False, 1e-5, "float64", "numpy", 7, 0.1)  # drop_rate


def test_stochastic_depth_rates_rise_linearly_to_the_last_block():
    """timm's rule: block i drops its branches at drop_path_rate * i / (depth - 1), so the
    first block gets 0 and the last block the full rate; a single block gets 0."""
    v = ViT(img_size=4, patch_size=2, in_chans=2, num_classes=3, embed_dim=8, depth=4,
            num_heads=2, drop_path_rate=0.3)  # fmt: skip
    np.testing.assert_allclose(v.drop_path, np.linspace(0, 0.3, 4), rtol=0, atol=1e-15)
    v = ViT(img_size=4, patch_size=2, in_chans=2, num_classes=3, embed_dim=8, depth=1,
            num_heads=2, drop_path_rate=0.3)  # fmt: skip
    assert v.drop_path == [0.0]


def test_sincos_pos_embed_values():
    """The fixed 2D codes against a formula written out here: a zero CLS row, then for the
    patch at row y, column x of the grid [sin(y w), cos(y w), sin(x w), cos(x w)] with
    w_k = 10000^(-k / q), q = dim / 4 (MAE's layout: a swapped pair or a wrong frequency
    would give a different, still plausible-looking, initial pos_embed). Parameters are drawn
    on the host, so NumPy builds it whatever the backend."""
    from minivit.models.vit import sincos_2d_pos_embed

    g, dim = 3, 8
    q = dim // 4
    pe = sincos_2d_pos_embed(g, dim, np)
    assert pe.shape == (1, 1 + g * g, dim)
    np.testing.assert_array_equal(pe[0, 0], np.zeros(dim))
    w = np.array([10000.0 ** (-k / q) for k in range(q)])
    for y in range(g):
        for x in range(g):
            want = np.concatenate([np.sin(y * w), np.cos(y * w), np.sin(x * w), np.cos(x * w)])
            np.testing.assert_allclose(pe[0, 1 + y * g + x], want, rtol=0, atol=1e-12)
