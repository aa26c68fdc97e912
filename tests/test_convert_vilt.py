"""Parity with Hugging Face transformers' ViLT (an oracle nobody here wrote).

A random-weight ``ViltForMaskedLM`` in float64, with no dropout, is converted with
``from_hf_vilt`` and must give minivit's ViLT the same pooled output and text features (relative
error < 1e-10), the same image features up to HF's random patch order, and the same parameter
gradients (< 1e-8).

HF's ``ViltEmbeddings.visual_embed`` draws the patch order with ``torch.multinomial`` even when
every patch is kept (``max_image_length=-1``): the features come out permuted. The forward test
recovers that permutation by matching features (attention is permutation-equivariant, so every
row must find an exact partner); the gradient test replaces ``torch.multinomial`` by the
identity order, so HF's image features line up with minivit's row-major patches.
"""

from __future__ import annotations

import numpy as np
import pytest
from _requires import require

torch = require("torch")
transformers = require("transformers")

from minivit.convert import from_hf_vilt  # noqa: E402
from minivit.models import vilt_heads as H  # noqa: E402
from minivit.models.vilt import ViLT  # noqa: E402

pytestmark = pytest.mark.oracle

V, D, DEPTH, HEADS, S, P, MAXLEN = 37, 32, 2, 4, 32, 8, 12
B, L = 3, 9


def _hf_config(**extra):
    """The tiny ViltConfig of these tests (and tests/test_vilt_vqa.py), without dropout."""
    from transformers import ViltConfig

    return ViltConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=2 * D,
        image_size=S,
        patch_size=P,
        max_position_embeddings=MAXLEN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        **extra,
    )


def _randomize(model, seed, norms=()):
    """Random weights everywhere (HF starts biases and norms at 0 / 1): 1 + 0.1 N(0, 1) for the
    LayerNorm weights (and the parameters named in ``norms``), 0.1 N(0, 1) elsewhere."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm = name.endswith("LayerNorm.weight") or "layernorm" in name and "weight" in name
            p.copy_(1.0 + 0.1 * noise if is_norm or name in norms else 0.1 * noise)
    return model


def _hf_model(seed=0, tied=False):
    from transformers import ViltForMaskedLM

    torch.manual_seed(seed)
    model = ViltForMaskedLM(_hf_config()).double().eval()
    # HF ties the decoder to the word embeddings (ViltConfig keeps tie_word_embeddings=True);
    # the original ViLT keeps them apart, as minivit does: untie, so each has its own gradient
    # (tied=True keeps HF's tie).
    if not tied:
        dec = model.mlm_score.decoder
        dec.weight = torch.nn.Parameter(dec.weight.detach().clone())
    return _randomize(model, seed)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, V, size=(B, L))
    mask = np.ones((B, L), bool)
    mask[0, 6:] = False  # padding in two captions
    mask[1, 4:] = False
    ids[:, 0] = 1
    lengths = mask.sum(1)
    ids[np.arange(B), lengths - 1] = 2  # [SEP]
    ids[~mask] = 0
    images = rng.standard_normal((B, 3, S, S))
    return ids, mask, images


def _minivit(dtype="float64", **kw):
    """minivit's ViLT in the tiny config (HF's layernorm eps 1e-12 throughout)."""
    return ViLT(
        vocab_size=V,
        max_text_len=MAXLEN,
        img_size=S,
        patch_size=P,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=2.0,
        eps=1e-12,
        text_eps=1e-12,
        dtype=dtype,
        **kw,
    )


def _minivit_from(hf, dtype="float64", missing=("itm_score.",), **kw):
    """HF's weights converted into ``_minivit(dtype, **kw)``; the heads HF's model lacks (names
    starting with ``missing``: ViltForMaskedLM has no ITM head) keep minivit's own."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    model = _minivit(dtype, **kw)
    left_out, unexpected = model.load_state_dict(from_hf_vilt(sd), strict=False)
    assert set(left_out) == {k for k in model.params if k.startswith(missing)}
    assert not unexpected
    return model


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_forward_parity_with_hf_vilt():
    hf = _hf_model()
    model = _minivit_from(hf)
    ids, mask, images = _inputs()
    with torch.no_grad():
        out = hf.vilt(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            pixel_values=torch.from_numpy(images),
        )
        seq = out.last_hidden_state.numpy()
        pooled_hf = out.pooler_output.numpy()
        mlm_hf = hf.mlm_score(out.last_hidden_state[:, :L]).numpy()
    mine = model.forward(ids, mask, images)
    assert _rel(mine["pooled"], pooled_hf) < 1e-10
    text_hf = seq[:, :L]
    assert _rel(mine["text_feats"][mask], text_hf[mask]) < 1e-10
    logits, _ = H.mlm_forward(mine["text_feats"], model.params, model.text_eps)
    assert _rel(logits[mask], mlm_hf[mask]) < 1e-10

    # image features: the same rows up to HF's random patch order
    img_hf = seq[:, L:]  # (B, 1 + Np, D), CLS first
    img = mine["image_feats"]
    assert img.shape == img_hf.shape
    assert _rel(img[:, 0], img_hf[:, 0]) < 1e-10  # the image CLS is never permuted
    for b in range(B):
        dist = ((img_hf[b, 1:, None, :] - img[b, None, 1:, :]) ** 2).sum(-1)  # (Np, Np)
        perm = dist.argmin(axis=1)
        assert sorted(perm.tolist()) == list(range(img.shape[1] - 1)), "not a permutation"
        assert _rel(img[b, 1:][perm], img_hf[b, 1:]) < 1e-10


@pytest.mark.parametrize("mode", ["untied", "tied", "tied-model"])
def test_gradient_parity_with_hf_vilt(monkeypatch, mode):
    """Every gradient against HF's autograd. HF's own ViltForMaskedLM ties the MLM decoder to
    the word embeddings (tied): minivit keeps them apart by default, as the original ViLT does,
    and its two gradients add up to HF's one (docs/vilt.md); built with tie_mlm_decoder=True
    (tied-model) it has HF's one table and HF's gradient of it."""
    tied = mode != "untied"
    # identity patch order inside HF's visual_embed (see the module docstring)
    monkeypatch.setattr(torch, "multinomial", lambda w, n, replacement=False, **kw: torch.arange(n))
    hf = _hf_model(seed=3, tied=tied)
    assert (
        hf.mlm_score.decoder.weight is hf.vilt.embeddings.text_embeddings.word_embeddings.weight
    ) == tied
    model = _minivit_from(hf, tie_mlm_decoder=mode == "tied-model")
    ids, mask, images = _inputs(seed=4)
    rng = np.random.default_rng(5)
    Np = (S // P) ** 2
    r_pool = rng.standard_normal((B, D))
    r_text = rng.standard_normal((B, L, D)) * mask[:, :, None]
    r_img = rng.standard_normal((B, 1 + Np, D))
    r_mlm = rng.standard_normal((B, L, V)) * mask[:, :, None]

    # HF: a scalar that touches every output, then autograd
    out = hf.vilt(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        pixel_values=torch.from_numpy(images),
    )
    seq = out.last_hidden_state
    loss = (
        (out.pooler_output * torch.from_numpy(r_pool)).sum()
        + (seq[:, :L] * torch.from_numpy(r_text)).sum()
        + (seq[:, L:] * torch.from_numpy(r_img)).sum()
        + (hf.mlm_score(seq[:, :L]) * torch.from_numpy(r_mlm)).sum()
    )
    loss.backward()
    hf_grads = from_hf_vilt(
        {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    )

    # minivit: the same scalar, by hand
    mine = model.forward(ids, mask, images)
    assert _rel(mine["image_feats"], seq[:, L:].detach().numpy()) < 1e-10  # identity order
    logits, cache = H.mlm_forward(
        mine["text_feats"], model.params, model.text_eps, model.mlm_decoder_key
    )
    head_grads = {}
    dtext = H.mlm_backward(r_mlm, cache, head_grads) + r_text
    model.backward(dict(text_feats=dtext, image_feats=r_img, pooled=r_pool))
    grads = dict(model.grads)
    for k, g in head_grads.items():
        grads[k] = grads[k] + g

    word, dec = "text_embeddings.word_embeddings.weight", "mlm_score.decoder.weight"
    if mode == "tied-model":  # one table, as HF's
        assert dec not in model.params and dec not in grads
        del hf_grads[dec]  # (from_hf_vilt filled it in with the word table's gradient)
    assert set(hf_grads) <= set(grads)
    assert len(hf_grads) == len(grads) - 2  # all but minivit's itm_score.*
    if mode == "tied":  # HF's one gradient of the shared table is the sum of minivit's two
        assert _rel(grads[word], hf_grads[word]) > 0.01  # (apart, neither is HF's alone)
        grads[word] = grads[word] + grads.pop(dec)
        del hf_grads[dec]  # (from_hf_vilt filled it in with the word table's gradient)
    worst = max(_rel(grads[k], hf_grads[k]) for k in hf_grads)
    assert worst < 1e-8, worst


def _rename_to_new_layout(sd):
    """The transformers-5 layout of its newer vision models (layers.N.attention.q_proj ...)."""
    table = {
        "attention.attention.query": "attention.q_proj",
        "attention.attention.key": "attention.k_proj",
        "attention.attention.value": "attention.v_proj",
        "attention.output.dense": "attention.o_proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }
    out = {}
    for k, v in sd.items():
        k2 = k.replace("vilt.encoder.layer.", "vilt.layers.")
        for old, new in table.items():
            k2 = k2.replace("." + old + ".", "." + new + ".")
        out[k2] = v
    return out


def test_from_hf_vilt_accepts_both_namings_and_model_without_prefix():
    hf = _hf_model(seed=7)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    a = from_hf_vilt(sd)
    b = from_hf_vilt(_rename_to_new_layout(sd))
    c = from_hf_vilt({k[len("vilt.") :]: v for k, v in sd.items() if k.startswith("vilt.")})
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert set(c) == {k for k in a if not k.startswith("mlm_score")}
    q = sd["vilt.encoder.layer.1.attention.attention.query.weight"]
    kk = sd["vilt.encoder.layer.1.attention.attention.key.weight"]
    v = sd["vilt.encoder.layer.1.attention.attention.value.weight"]
    np.testing.assert_array_equal(
        a["transformer.blocks.1.attn.qkv.weight"], np.concatenate([q, kk, v])
    )
    # HF's decoder bias is the original's separate mlm_score.bias
    np.testing.assert_array_equal(a["mlm_score.bias"], sd["mlm_score.decoder.bias"])
    assert "mlm_score.decoder.bias" not in a


def test_a_vilt_without_qkv_biases_is_read_as_one():
    """ViltConfig(qkv_bias=False) has no query/key/value biases: the config read off the weights
    says so, and the model built from it takes the weights whole (strict)."""
    from transformers import ViltForMaskedLM

    from minivit.convert import infer_vilt_config

    torch.manual_seed(0)
    hf = ViltForMaskedLM(_hf_config(qkv_bias=False)).double().eval()
    sd = from_hf_vilt({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    assert not any(k.endswith("attn.qkv.bias") for k in sd)
    cfg = infer_vilt_config(sd, num_heads=4)
    assert cfg["qkv_bias"] is False
    model = ViLT(**cfg, dtype="float64")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == [] and all(k.startswith("itm_score.") for k in missing)


def test_from_hf_vilt_names_unknown_and_incomplete_keys():
    hf = _hf_model(seed=8)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    with pytest.raises(ValueError, match="vilt.encoder.layer.0.crossattention.weight"):
        from_hf_vilt({**sd, "vilt.encoder.layer.0.crossattention.weight": np.zeros(3)})
    broken = dict(sd)
    del broken["vilt.encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(ValueError, match="layer 0 has no k bias"):
        from_hf_vilt(broken)
    # nothing of ViLT's (an empty dict, or only the buffers it skips) is an error, as for ViT
    with pytest.raises(ValueError, match="no ViLT weights in a state dict of 0 entries"):
        from_hf_vilt({})
    with pytest.raises(ValueError, match="of 1 entries .*position_ids"):
        from_hf_vilt({"vilt.embeddings.text_embeddings.position_ids": np.arange(3)})


def test_from_hf_vilt_fills_the_tied_decoder_that_save_pretrained_leaves_out():
    """transformers ties ViLT's MLM decoder to the word embeddings, and ``save_pretrained``
    writes the tied weight once: the decoder's key is missing from the file."""
    sd = {k: v.detach().numpy() for k, v in _hf_model().state_dict().items()}
    word = sd["vilt.embeddings.text_embeddings.word_embeddings.weight"]
    del sd["mlm_score.decoder.weight"]
    out = from_hf_vilt(sd)
    np.testing.assert_array_equal(out["mlm_score.decoder.weight"], word)
    head_less = {k: v for k, v in sd.items() if not k.startswith("mlm_score.")}
    assert "mlm_score.decoder.weight" not in from_hf_vilt(head_less)  # no MLM head: no decoder
