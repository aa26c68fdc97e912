"""minivit.convert: HF -> timm name maps (both namings), timm pass-through, pos-embed resample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minivit.convert import (
    check_timm_vit,
    default_num_heads,
    detect_vit_naming,
    from_hf_vit,
    infer_vit_config,
    resample_abs_pos_embed,
)
from minivit.convert.vit import bicubic_resize_matrix, mlp_ratio_for


@pytest.fixture(scope="module")
def hf_sd():
    from transformers import ViTConfig, ViTForImageClassification

    c = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                  num_labels=3)  # fmt: skip
    return {k: v.numpy() for k, v in ViTForImageClassification(c).state_dict().items()}


def test_transformers5_names_map_to_timm(hf_sd):
    assert detect_vit_naming(hf_sd) == "hf_v5"
    sd = from_hf_vit(hf_sd)
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(2):
        for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected += [f"blocks.{i}.{n}.weight", f"blocks.{i}.{n}.bias"]
    expected += ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert list(sd) == expected
    assert sd["blocks.1.attn.qkv.weight"].shape == (24, 8)
    q, k, v = (hf_sd[f"vit.layers.1.attention.{n}_proj.weight"] for n in "qkv")
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"], np.concatenate([q, k, v]))
    np.testing.assert_array_equal(sd["blocks.0.mlp.fc2.bias"], hf_sd["vit.layers.0.mlp.fc2.bias"])
    np.testing.assert_array_equal(sd["pos_embed"], hf_sd["vit.embeddings.position_embeddings"])
    np.testing.assert_array_equal(sd["head.weight"], hf_sd["classifier.weight"])
    assert infer_vit_config(sd, num_heads=2) == dict(
        img_size=8, patch_size=4, in_chans=3, num_classes=3, embed_dim=8, depth=2, num_heads=2,
        qkv_bias=True, mlp_ratio=2.0, global_pool="token")  # fmt: skip


def test_the_default_head_count_is_timms_for_the_width():
    """The heads leave no trace in the weights: without num_heads (or a config.json), a width
    gets timm's head count. Heads of 64 for Ti, S, B and L; 16 heads for SigLIP's so400m and
    ViT-H, -g and -G, whose heads are 72, 80, 88 and 104 wide (embed_dim // 64 would give 18,
    20, 22 and 26, and a silently wrong model)."""
    widths = {192: 3, 384: 6, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1664: 16, 32: 1}
    for d, heads in widths.items():
        assert default_num_heads(d) == heads, d

    def shaped(*shape):  # the shape is all infer_vit_config reads
        return np.broadcast_to(np.float32(0), shape)

    D = 1280  # ViT-H/14
    sd = {
        "patch_embed.proj.weight": shaped(D, 3, 14, 14),
        "pos_embed": shaped(1, 1 + 4, D),
        "blocks.0.mlp.fc1.weight": shaped(4 * D, D),
        "blocks.0.attn.qkv.bias": shaped(3 * D),
    }
    assert infer_vit_config(sd)["num_heads"] == 16
    assert infer_vit_config(sd, num_heads=20)["num_heads"] == 20  # given: taken as it is


def test_hub_names_give_the_same_dict(hf_sd):
    hub = {}
    for k, v in hf_sd.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        k = k.replace("attention.q_proj", "attention.attention.query")
        k = k.replace("attention.k_proj", "attention.attention.key")
        k = k.replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        hub[k] = v
    hub["vit.pooler.dense.weight"] = np.zeros((8, 8), np.float32)  # ViTModel's pooler: dropped
    assert detect_vit_naming(hub) == "hf_hub"
    a, b = from_hf_vit(hf_sd), from_hf_vit(hub)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_the_two_layer_norms_map_by_value_in_both_namings(hf_sd):
    """layernorm_before is the pre-attention norm (norm1) and layernorm_after the pre-MLP one
    (norm2), in the hub naming and in transformers 5's. Freshly built norms are all ones and
    zeros, where a swap would not show: here every tensor is random, so the norms differ."""
    rng = np.random.default_rng(0)
    v5 = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in hf_sd.items()}
    hub = {}
    for k, v in v5.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for old, new in (("q_proj", "attention.query"), ("k_proj", "attention.key"),
                         ("v_proj", "attention.value"), ("o_proj", "output.dense")):  # fmt: skip
            k = k.replace("attention." + old, "attention." + new)
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        hub[k] = v
    for src, layer in ((v5, "vit.layers"), (hub, "vit.encoder.layer")):
        sd = from_hf_vit(src)
        for i in range(2):
            for hf_name, timm_name in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
                for part in ("weight", "bias"):
                    np.testing.assert_array_equal(
                        sd[f"blocks.{i}.{timm_name}.{part}"],
                        src[f"{layer}.{i}.{hf_name}.{part}"],
                        err_msg=f"{layer}.{i}.{hf_name}.{part}",
                    )


def test_timm_pass_through_and_errors(hf_sd):
    sd = from_hf_vit(hf_sd)
    assert detect_vit_naming(sd) == "timm"
    again = from_hf_vit({"model." + k: v for k, v in sd.items()})
    assert list(again) == list(sd)
    with pytest.raises(ValueError, match="blocks.0.attn.nope"):
        check_timm_vit({**sd, "blocks.0.attn.nope.weight": np.zeros(1)})
    bad = dict(hf_sd)
    bad["vit.layers.0.attention.weird.weight"] = np.zeros(1)
    del bad["vit.layers.1.attention.k_proj.bias"]
    with pytest.raises(ValueError, match="weird"):
        from_hf_vit(bad)
    del bad["vit.layers.0.attention.weird.weight"]
    with pytest.raises(ValueError, match=r"layer 1: bias of \['k'\] missing"):
        from_hf_vit(bad)
    with pytest.raises(ValueError, match="cannot tell"):
        detect_vit_naming({"foo": np.zeros(1)})


@pytest.mark.oracle
@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((14, 14), (7, 7)), ((5, 3), (8, 10)),
                                     ((7, 7), (12, 5)), ((3, 3), (3, 3))])  # fmt: skip
def test_resample_matches_torch_antialiased_bicubic(old, new):
    """timm's resample_abs_pos_embed calls F.interpolate(bicubic, antialias=True); ours agrees."""
    rng = np.random.default_rng(0)
    pe = rng.standard_normal((1, 1 + old[0] * old[1], 5))
    out = resample_abs_pos_embed(pe, new, old_size=old)
    assert out.shape == (1, 1 + new[0] * new[1], 5)
    np.testing.assert_array_equal(out[:, :1], pe[:, :1])  # the CLS token is kept as is
    g = torch.tensor(pe[0, 1:]).reshape(1, *old, 5).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(g, size=new, mode="bicubic", antialias=True,
                                          align_corners=False)  # fmt: skip
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
    np.testing.assert_allclose(out[:, 1:], ref, rtol=0, atol=1e-12)


def test_resample_properties():
    W = bicubic_resize_matrix(5, 9)
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    const = np.full((1, 1 + 16, 3), 0.7, np.float32)
    out = resample_abs_pos_embed(const, (6, 6))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.7, rtol=1e-6)  # constants stay constant
    with pytest.raises(ValueError, match="not square"):
        resample_abs_pos_embed(np.zeros((1, 1 + 12, 3)), (4, 4))


def test_a_timm_average_pool_vit_file_loads(tmp_path):
    """timm's global_pool="avg" ViT keeps fc_norm instead of norm; a plain safetensors file of
    one loads with global_pool="avg" inferred, and gives the same logits."""
    from safetensors.numpy import save_file

    from minivit import ViT
    from minivit.checkpoint import load_model

    v = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
            num_heads=2, global_pool="avg", dtype="float64", seed=3)  # fmt: skip
    sd = v.state_dict()
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    save_file(dict(reversed(list(sd.items()))), str(tmp_path / "model.safetensors"))
    w, _ = load_model(tmp_path / "model.safetensors", num_heads=2, dtype="float64")
    assert w.global_pool == "avg"
    assert list(w.params) == list(v.params)  # timm's order, fc_norm before the head
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    np.testing.assert_allclose(w.forward(x), v.forward(x), rtol=1e-12, atol=1e-14)


def test_incomplete_or_inconsistent_hf_dicts_are_refused(hf_sd):
    """from_hf_vit dropped a missing position embedding, layernorm_before or classifier.bias
    without a word, and fused a (5, 8) query into a (21, 8) qkv. Now one error names each
    missing and mis-shaped key by its Hugging Face name, as check_timm_vit refuses a timm dict
    that lacks pos_embed."""

    def without(*keys):
        return {k: v for k, v in hf_sd.items() if k not in keys}

    for key in ("vit.embeddings.position_embeddings", "vit.layers.0.layernorm_before.weight",
                "classifier.bias", "vit.layers.1.mlp.fc2.bias", "vit.layernorm.bias",
                "vit.embeddings.patch_embeddings.projection.bias"):  # fmt: skip
        with pytest.raises(ValueError, match=rf"incomplete or inconsistent: missing: {key}$"):
            from_hf_vit(without(key))
    bad = dict(hf_sd)
    bad["vit.layers.0.attention.q_proj.weight"] = np.zeros((5, 8), np.float32)
    bad["vit.layers.1.mlp.fc1.bias"] = np.zeros(15, np.float32)
    with pytest.raises(ValueError, match=r"q_proj.weight: expected \(8, 8\), got \(5, 8\)"):
        from_hf_vit(bad)
    del bad["vit.layers.0.attention.q_proj.weight"]
    bad["vit.layers.0.attention.q_proj.weight"] = hf_sd["vit.layers.0.attention.q_proj.weight"]
    with pytest.raises(ValueError, match=r"vit.layers.1.mlp.fc1.bias: expected \(16,\), got"):
        from_hf_vit(bad)
    # both paths refuse the same dict
    timm = from_hf_vit(hf_sd)
    for key in ("pos_embed", "blocks.0.norm1.weight", "head.bias"):
        with pytest.raises(ValueError, match=rf"missing: {key}$"):
            check_timm_vit({k: v for k, v in timm.items() if k != key})
    wrong = {**timm, "blocks.1.attn.qkv.weight": np.zeros((21, 8), np.float32)}
    with pytest.raises(ValueError, match=r"blocks.1.attn.qkv.weight: expected \(24, 8\)"):
        check_timm_vit(wrong)


def test_what_from_hf_vit_leaves_out_on_purpose(hf_sd):
    """The pooler (ViTModel's, no timm counterpart) and the classifier as a whole (ViTModel has
    none: num_classes=0); q/k/v biases in no layer at all (qkv_bias=False)."""
    from transformers import ViTConfig, ViTModel

    c = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)  # fmt: skip
    model_sd = {k: v.numpy() for k, v in ViTModel(c).state_dict().items()}
    assert any(k.startswith("pooler.") for k in model_sd)
    sd = from_hf_vit(model_sd)
    assert "head.weight" not in sd and infer_vit_config(sd, num_heads=2)["num_classes"] == 0
    no_bias = {k: v for k, v in hf_sd.items() if not k.endswith(("q_proj.bias", "k_proj.bias",
                                                                   "v_proj.bias"))}  # fmt: skip
    assert not any(k.endswith("qkv.bias") for k in from_hf_vit(no_bias))


def test_any_mlp_width_is_read_back_from_the_weights():
    """The models size the MLP int(D * mlp_ratio), as timm does, and hidden / D times D can fall
    just short of hidden (15 / 11 * 11 is 14.999...): a checkpoint with such a width built a
    model one unit narrower and failed to load. The ratio read off the weights now maps back."""
    from minivit import ViT

    assert mlp_ratio_for(3072, 768) == 4.0 and mlp_ratio_for(518, 192) == 518 / 192
    assert all(int(D * mlp_ratio_for(H, D)) == H for D in range(1, 120) for H in range(1, 5 * D))
    v = ViT(img_size=4, patch_size=2, in_chans=1, num_classes=2, embed_dim=11, depth=1,
            num_heads=1, mlp_ratio=mlp_ratio_for(15, 11))  # fmt: skip
    sd = v.state_dict()
    assert sd["blocks.0.mlp.fc1.weight"].shape == (15, 11)
    cfg = infer_vit_config(sd, num_heads=1)
    ViT(**cfg).load_state_dict(sd)  # was: 14 units for the weights' 15
