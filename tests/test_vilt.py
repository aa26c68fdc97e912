"""minivit's ViLT: shapes, masks, position interpolation, gradients with all three losses, bad
input, names, and a few steps of the training loop on a tiny config."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
from _requires import require

from minivit.models import vilt_heads as H
from minivit.models.vilt import ViLT, interpolation_matrix

V, T = 23, 10


def tiny(backend, dtype="float64", **kw):
    cfg = dict(
        vocab_size=V,
        max_text_len=T,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        dtype=dtype,
        backend=backend,
        seed=1,
    )
    cfg.update(kw)
    model = ViLT(**cfg)
    # random values everywhere (biases start at zero, norms at one)
    rng = np.random.default_rng(2)
    for k, v in model.params.items():
        noise = rng.normal(0, 0.1, v.shape)
        model.params[k] = v + backend.asarray(noise, dtype=v.dtype)
    return model


def batch(backend, B=4, L=8, S=16, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, V, (B, L))
    mask = np.ones((B, L), bool)
    mask[0, 6:] = False
    mask[1, 4:] = False
    ids[:, 0] = 1
    ids[np.arange(B), mask.sum(1) - 1] = 2
    ids[~mask] = 0
    images = rng.normal(size=(B, 3, S, S))
    return backend.asarray(ids), backend.asarray(mask), backend.asarray(images, dtype=dtype)


def test_forward_shapes_masks_and_determinism(backend):
    model = tiny(backend)
    ids, mask, images = batch(backend)
    out = model.forward(ids, mask, images)
    B, L, D, Np = 4, 8, 16, 4
    assert out["text_feats"].shape == (B, L, D)
    assert out["image_feats"].shape == (B, 1 + Np, D)
    assert out["pooled"].shape == (B, D)
    assert out["image_mask"].shape == (B, 1 + Np) and bool(out["image_mask"].all())
    assert backend.to_numpy(out["patch_index"]).tolist() == [list(range(Np))] * B
    assert len(out["attn"]) == 2 and out["attn"][0].shape == (B, 2, L + 1 + Np, L + 1 + Np)
    attn = backend.to_numpy(out["attn"][0])
    # no query attends to text padding (key-padding mask)
    assert np.abs(attn[0, :, :, 6:8]).max() == 0 and np.abs(attn[1, :, :, 4:8]).max() == 0
    again = model.forward(ids, mask, images)
    for k in ("text_feats", "image_feats", "pooled"):
        np.testing.assert_array_equal(backend.to_numpy(out[k]), backend.to_numpy(again[k]))
    # padding tokens' ids do not change the valid outputs
    ids2 = backend.to_numpy(ids).copy()
    ids2[0, 7] = 9
    out2 = model.forward(backend.asarray(ids2), mask, images)
    np.testing.assert_allclose(
        backend.to_numpy(out2["pooled"]), backend.to_numpy(out["pooled"]), rtol=1e-12
    )


def test_float32_stays_float32(backend):
    model = tiny(backend, dtype="float32")
    ids, mask, images = batch(backend, dtype="float32")
    out = model.forward(ids, mask, images)
    assert out["text_feats"].dtype == np.float32 and out["pooled"].dtype == np.float32
    model.backward(dict(pooled=out["pooled"] * 0 + 1))
    assert all(g.dtype == np.float32 for g in model.grads.values())


def _directional(model, loss_fn, grads, rng, h=1e-5):
    orig = {k: v.copy() for k, v in model.params.items()}
    dirs = {k: rng.normal(size=v.shape) for k, v in orig.items()}
    be = model.backend

    def at(s):
        for k in orig:
            model.params[k] = orig[k] + be.asarray(s * h * dirs[k])
        return loss_fn()

    num = (at(1) - at(-1)) / (2 * h)
    for k in orig:
        model.params[k] = orig[k]
    ana = sum(float((be.to_numpy(grads[k]) * dirs[k]).sum()) for k in orig)
    return ana, num


def _three_losses_directional(model, backend, direction_seed, h=1e-5, mask_seed=None):
    """d(itm + mlm + 0.1 wpa)/d(every parameter) of ``model`` on ``batch``, analytic against
    central differences along a random direction, float64, with the IPOT plan held constant (a
    constant of the loss, as in the original). ``mask_seed``: reseed ``model.rng`` before every
    forward, so that dropout draws the same masks each time. Returns (losses, grads)."""
    ids, mask, images = batch(backend)
    labels = np.full((4, 8), -100)
    labels[0, 2], labels[1, 1], labels[2, 3], labels[3, 5] = 7, 9, 11, 6
    labels = backend.asarray(labels)
    itm = backend.asarray(np.array([-100, 1, 0, 1]))
    plan = [None]

    def loss():
        if mask_seed is not None:
            model.rng = model.backend.rng(mask_seed)
        losses, cache = H.pretrain_forward(
            model, ids, mask, images, labels, itm, wpa_weight=0.1, wpa_plan=plan[0], train=True
        )
        return float(losses["loss"]), losses, cache

    _, losses, cache = loss()
    plan[0] = losses["wpa_plan"]
    grads = {k: v.copy() for k, v in H.pretrain_backward(model, cache).items()}
    ana, num = _directional(
        model, lambda: loss()[0], grads, np.random.default_rng(direction_seed), h
    )
    assert abs(ana - num) <= 1e-7 * abs(num), (ana, num)
    return losses, grads


def test_whole_model_directional_gradient_all_three_losses(backend):
    """d(itm + mlm + 0.1 wpa)/d(every parameter) along a random direction (see the helper)."""
    model = tiny(backend)
    losses, grads = _three_losses_directional(model, backend, 3)
    assert losses["itm"] > 0 and losses["mlm"] > 0 and losses["wpa"] != 0
    assert set(grads) == set(model.params)


def test_tied_mlm_decoder_is_the_word_table_with_both_gradients(backend):
    """tie_mlm_decoder=True: no decoder of its own; the word table's gradient passes the
    central-difference check, and equals the sum of the two gradients of the same model untied
    whose decoder holds the table's values."""
    word, dec = "text_embeddings.word_embeddings.weight", "mlm_score.decoder.weight"
    tied = tiny(backend, tie_mlm_decoder=True)
    assert dec not in tied.params and tied.mlm_decoder_key == word
    _, grads = _three_losses_directional(tied, backend, 8)
    assert set(grads) == set(tied.params)

    untied = tiny(backend)  # given the same values, and a decoder holding the table's
    untied.params = {k: v.copy() for k, v in tied.params.items()}
    untied.params[dec] = tied.params[word].copy()
    host = backend.to_numpy
    apart = {}
    for model, out in ((tied, grads), (untied, apart)):
        ids, mask, images = batch(backend)
        labels = np.full((4, 8), -100)
        labels[0, 2], labels[1, 1], labels[2, 3], labels[3, 5] = 7, 9, 11, 6
        itm = backend.asarray(np.array([-100, 1, 0, 1]))
        _, cache = H.pretrain_forward(
            model, ids, mask, images, backend.asarray(labels), itm, wpa_weight=0.1, train=True
        )
        out.update({k: host(v) for k, v in H.pretrain_backward(model, cache).items()})
    np.testing.assert_allclose(grads[word], apart[word] + apart[dec], rtol=0, atol=1e-12)
    assert np.abs(apart[dec]).max() > 1e-3 and np.abs(apart[word]).max() > 1e-3  # both count

    # loading: a decoder equal to the table is taken (and dropped), a different one refused
    sd = untied.state_dict()
    with pytest.raises(ValueError, match="differs from that table"):
        tied.load_state_dict({**sd, dec: sd[dec] + 1.0})
    with pytest.raises(ValueError, match="needs that table beside it"):
        tied.load_state_dict({dec: sd[dec]}, strict=False)
    assert tied.load_state_dict(sd) == ([], [])
    assert dec not in tied.state_dict()


def test_directional_gradient_with_image_mask_and_other_grid(backend):
    """Pixel mask (a smaller valid region per image) and 24x24 images on a 16x16 model: the
    interpolated position embeddings and their transpose in backward."""
    model = tiny(backend)
    ids, mask, _ = batch(backend)
    rng = np.random.default_rng(4)
    images = backend.asarray(rng.normal(size=(4, 3, 24, 24)))
    pix = np.ones((4, 24, 24), bool)
    pix[0, 16:, :] = False  # 2 x 3 valid patches
    pix[1, :, 8:] = False  # 3 x 1
    pix = backend.asarray(pix)
    r = {
        "text_feats": rng.normal(size=(4, 8, 16)),
        "image_feats": rng.normal(size=(4, 10, 16)),
        "pooled": rng.normal(size=(4, 16)),
    }

    def loss():
        out = model.forward(ids, mask, images, pix, interpolate_pos_encoding=True)
        return sum(float((backend.to_numpy(out[k]) * r[k]).sum()) for k in r)

    out = model.forward(ids, mask, images, pix, interpolate_pos_encoding=True)
    im = backend.to_numpy(out["image_mask"])
    assert im.sum(1).tolist() == [7, 4, 10, 10]
    model.backward({k: backend.asarray(v) for k, v in r.items()})
    grads = {k: v.copy() for k, v in model.grads.items()}
    dimg_ok = float(np.abs(backend.to_numpy(grads["transformer.pos_embed"])).sum()) > 0
    assert dimg_ok
    ana, num = _directional(model, loss, grads, np.random.default_rng(5))
    assert abs(ana - num) <= 1e-7 * abs(num), (ana, num)


def test_position_interpolation_matches_torch_bilinear_align_corners():
    torch = require("torch")
    g = 4
    table = np.random.default_rng(0).normal(size=(1, 6, g, g))
    for h, w in ((4, 4), (3, 5), (6, 2), (1, 3)):
        rh, rw = np.array(interpolation_matrix(h, g)), np.array(interpolation_matrix(w, g))
        mine = np.einsum("hi,wj,cij->chw", rh, rw, table[0])
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(table), size=(h, w), mode="bilinear", align_corners=True
        )[0].numpy()
        np.testing.assert_allclose(mine, ref, rtol=1e-12, atol=1e-14)


def test_wpa_uses_only_words_and_patches(backend):
    model = tiny(backend)
    ids, mask, images = batch(backend)
    out = model.forward(ids, mask, images)
    tv, iv = H.wpa_valid_masks(out["text_mask"], out["image_mask"])
    tv_h = backend.to_numpy(tv)
    assert tv_h[0].tolist() == [False, True, True, True, True, False, False, False]
    assert not backend.to_numpy(iv)[:, 0].any()
    dist, cache = H.wpa_forward(out["text_feats"], out["image_feats"], tv, iv)
    plan = backend.to_numpy(H.wpa_plan(cache))  # (B, L, I)
    assert np.abs(plan[~tv_h]).max() == 0  # CLS, SEP and padding rows
    assert np.abs(plan[:, :, 0]).max() == 0  # the image CLS column
    np.testing.assert_allclose(plan.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    # d dist / d cost = plan: the gradient of a row's distance never reaches padding words
    dt, di = H.wpa_backward(backend.asarray(np.ones(4)), cache)
    assert np.abs(backend.to_numpy(dt)[~tv_h]).max() == 0
    assert np.abs(backend.to_numpy(di)[:, 0]).max() == 0
    assert (backend.to_numpy(dist) > 0).all()


def test_wpa_loss_averages_over_the_itm_rows_only(backend):
    """The WPA term is wpa_weight * (sum of +d over matches, -d over mismatches) / n_itm,
    where n_itm counts only the rows with an ITM label: the -100 (MLM) row has no distance
    and must not count either, so here the sum is divided by 3, not by the batch size 4."""
    model = tiny(backend)
    ids, mask, images = batch(backend)
    labels = backend.asarray(np.full((4, 8), -100))
    itm = backend.asarray(np.array([-100, 1, 0, 1]))
    losses, _ = H.pretrain_forward(
        model, ids, mask, images, labels, itm, wpa_weight=0.1, train=False
    )
    d = backend.to_numpy(losses["wpa_distance"])
    assert d[0] == 0 and (d[1:] > 0).all()
    np.testing.assert_allclose(losses["wpa"], 0.1 * (d[1] - d[2] + d[3]) / 3, rtol=1e-12)


def test_wpa_valid_masks_leave_the_callers_image_mask_alone(backend):
    """wpa_valid_masks drops the image CLS from its own copy: the image mask it was given (the
    model's output, used again by the caller) keeps its CLS column."""
    text_mask = backend.asarray(np.array([[True] * 4, [True, True, True, False]]))
    image_mask = backend.asarray(np.array([[True] * 5, [True, True, True, False, False]]))
    before = backend.to_numpy(image_mask).copy()
    _, iv = H.wpa_valid_masks(text_mask, image_mask)
    assert not backend.to_numpy(iv)[:, 0].any()
    np.testing.assert_array_equal(backend.to_numpy(image_mask), before)


def test_wpa_row_without_words_has_no_distance_and_no_gradient(backend):
    """A caption of only [CLS] and [SEP] has no word to align: its distance is 0 and its
    features get no gradient from WPA (its dummy uniform marginal still makes a plan, which
    the backward must not follow). The other rows keep theirs."""
    rng = np.random.default_rng(3)
    text = backend.asarray(rng.standard_normal((3, 5, 8)))
    image = backend.asarray(rng.standard_normal((3, 4, 8)))
    tv = np.ones((3, 5), bool)
    tv[1] = False  # row 1: no word
    iv = backend.asarray(np.ones((3, 4), bool))
    dist, cache = H.wpa_forward(text, image, backend.asarray(tv), iv)
    d = backend.to_numpy(dist)
    assert d[1] == 0 and (d[[0, 2]] > 0).all()
    dt, di = (backend.to_numpy(g) for g in H.wpa_backward(backend.asarray(np.ones(3)), cache))
    assert np.abs(dt[1]).max() == 0 and np.abs(di[1]).max() == 0
    assert np.abs(dt[0]).max() > 0 and np.abs(di[2]).max() > 0


def test_max_image_len_samples_with_a_seeded_generator(backend):
    a, b = tiny(backend, max_image_len=3), tiny(backend, max_image_len=3)
    ids, mask, images = batch(backend)
    oa, ob = a.forward(ids, mask, images), b.forward(ids, mask, images)
    assert oa["image_feats"].shape == (4, 4, 16)
    pa = backend.to_numpy(oa["patch_index"])
    np.testing.assert_array_equal(pa, backend.to_numpy(ob["patch_index"]))
    assert (np.diff(pa, axis=1) > 0).all()  # distinct, row-major order
    # backward scatters the kept patches back: gradient check along one direction
    r = np.random.default_rng(0).normal(size=(4, 4, 16))
    a.rng = a.backend.rng(7)
    out = a.forward(ids, mask, images)
    keep = backend.to_numpy(out["patch_index"])
    a.backward(dict(image_feats=backend.asarray(r)))
    grads = {k: v.copy() for k, v in a.grads.items()}

    def loss():
        a.rng = a.backend.rng(7)  # the same sample each time
        o = a.forward(ids, mask, images)
        assert (backend.to_numpy(o["patch_index"]) == keep).all()
        return float((backend.to_numpy(o["image_feats"]) * r).sum())

    ana, num = _directional(a, loss, grads, np.random.default_rng(1))
    assert abs(ana - num) <= 1e-7 * abs(num)
    assert a.forward(ids, mask, images, max_image_len=-1)["image_feats"].shape == (4, 5, 16)


def test_dropout_only_in_training_and_its_gradient(backend):
    """drop_rate acts in training only; an evaluation forward is the same model without it.
    With the masks replayed (the same seed before each forward), the gradient of all three
    losses holds along a random direction through every dropout (text, image, blocks)."""
    a, plain = tiny(backend, drop_rate=0.25), tiny(backend)
    ids, mask, images = batch(backend)
    ev = a.forward(ids, mask, images)
    ref = plain.forward(ids, mask, images)
    np.testing.assert_array_equal(backend.to_numpy(ev["pooled"]), backend.to_numpy(ref["pooled"]))
    assert a.forward_draws_random({"train": True}) and not a.forward_draws_random({})
    assert not plain.forward_draws_random({"train": True})  # shards stay on without dropout
    tr1 = backend.to_numpy(a.forward(ids, mask, images, train=True)["text_feats"])
    tr2 = backend.to_numpy(a.forward(ids, mask, images, train=True)["text_feats"])
    assert not np.allclose(tr1, tr2)  # new masks each step
    # about a quarter of each dropout's entries are zeroed (read from the forward's cache)
    c = a._cache
    for drop_cache in (c.text_drop, c.image_drop):
        assert 0.1 < float((backend.to_numpy(drop_cache.mask) == 0).mean()) < 0.4

    # h = 1e-6: the 1/(1-p) scaling of the kept entries raises the curvature, and at the
    # other tests' 1e-5 the difference quotient's O(h^2) error reached 4e-7 for some masks
    _three_losses_directional(a, backend, 4, h=1e-6, mask_seed=11)
    with pytest.raises(ValueError, match="drop_rate"):
        tiny(backend, drop_rate=1.0)


def test_bad_inputs_raise_clear_errors(backend):
    model = tiny(backend)
    ids, mask, images = batch(backend)
    ids_h, mask_h = backend.to_numpy(ids), backend.to_numpy(mask)
    long_ids = backend.asarray(np.ones((4, T + 1), np.int64))
    with pytest.raises(ValueError, match="longer than max_text_len"):
        model.forward(long_ids, backend.asarray(np.ones((4, T + 1), bool)), images)
    bad = ids_h.copy()
    bad[2, 3] = V
    with pytest.raises(ValueError, match=r"vocab_size=23.*23"):
        model.forward(backend.asarray(bad), mask, images)
    bad[2, 3] = -1
    with pytest.raises(ValueError, match="vocab_size"):
        model.forward(backend.asarray(bad), mask, images)
    with pytest.raises(ValueError, match="text_mask must have the shape of input_ids"):
        model.forward(ids, backend.asarray(mask_h[:, :5]), images)
    with pytest.raises(TypeError, match="text_mask must be boolean"):
        model.forward(ids, backend.asarray(mask_h * 0.5), images)
    with pytest.raises(TypeError, match=r"text_mask must be boolean \(or integer 0/1\)"):
        model.forward(ids, backend.asarray(mask_h.astype(np.int64) * 2), images)
    int_mask = model.forward(ids, backend.asarray(mask_h.astype(np.int64)), images)["pooled"]
    np.testing.assert_array_equal(
        backend.to_numpy(int_mask), backend.to_numpy(model.forward(ids, mask, images)["pooled"])
    )
    no_cls = mask_h.copy()
    no_cls[1, 0] = False
    with pytest.raises(ValueError, match=r"first token \(\[CLS\]\)"):
        model.forward(ids, backend.asarray(no_cls), images)
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        model.forward(backend.asarray(ids_h * 1.0), mask, images)
    with pytest.raises(ValueError, match=r"images must be 16x16.*got 24x24"):
        model.forward(ids, mask, backend.asarray(np.zeros((4, 3, 24, 24))))
    with pytest.raises(ValueError, match=r"in_chans=3"):
        model.forward(ids, mask, backend.asarray(np.zeros((4, 1, 16, 16))))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model.forward(
            ids, mask, backend.asarray(np.zeros((4, 3, 20, 20))), interpolate_pos_encoding=True
        )
    with pytest.raises(ValueError, match="hold 2 images but input_ids holds 4"):
        model.forward(ids, mask, images[:2])
    with pytest.raises(TypeError, match="dtype float64"):
        model.forward(ids, mask, images.astype(np.float32))
    with pytest.raises(ValueError, match="image_mask must have shape"):
        model.forward(ids, mask, images, backend.asarray(np.ones((4, 5), bool)))
    with pytest.raises(ValueError, match="backward takes gradients"):
        model.forward(ids, mask, images)
        model.backward(dict(logits=images))


def test_names_state_dict_and_registry(backend):
    model = tiny(backend)
    names = list(model.params)
    for k in (
        "text_embeddings.word_embeddings.weight",
        "text_embeddings.position_embeddings.weight",
        "text_embeddings.token_type_embeddings.weight",
        "text_embeddings.LayerNorm.weight",
        "token_type_embeddings.weight",
        "transformer.cls_token",
        "transformer.pos_embed",
        "transformer.patch_embed.proj.weight",
        "transformer.blocks.1.attn.qkv.weight",
        "transformer.blocks.0.mlp.fc2.bias",
        "transformer.norm.weight",
        "pooler.dense.weight",
        "itm_score.fc.weight",
        "mlm_score.transform.dense.weight",
        "mlm_score.transform.LayerNorm.bias",
        "mlm_score.decoder.weight",
        "mlm_score.bias",
    ):
        assert k in names
    assert model.params["token_type_embeddings.weight"].shape == (2, 16)
    other = tiny(backend)
    other.params = {k: v * 0 for k, v in other.params.items()}
    other.load_state_dict(model.state_dict())
    ids, mask, images = batch(backend)
    np.testing.assert_array_equal(
        backend.to_numpy(other.forward(ids, mask, images)["pooled"]),
        backend.to_numpy(model.forward(ids, mask, images)["pooled"]),
    )
    sd = model.state_dict()
    sd.pop("pooler.dense.bias")
    with pytest.raises(ValueError, match="pooler.dense.bias"):
        other.load_state_dict(sd)
    from minivit import create_model

    small = create_model("vilt_shapes_small", backend=backend)
    assert isinstance(small, ViLT) and small.embed_dim == 96
    full = create_model("vilt_b32_mlm", depth=1, backend=backend)  # the published shapes
    assert full.params["transformer.pos_embed"].shape == (1, 145, 768)
    assert full.params["text_embeddings.word_embeddings.weight"].shape == (30522, 768)


def test_vqa_head_gradient(backend):
    model = tiny(backend, num_vqa_labels=5)
    rng = np.random.default_rng(0)
    pooled = backend.asarray(rng.normal(size=(3, 16)))
    r = rng.normal(size=(3, 5))
    logits, cache = H.vqa_forward(pooled, model.params)
    g = {}
    dpooled = H.vqa_backward(backend.asarray(r), cache, g)
    assert set(g) == {k for k in model.params if k.startswith("vqa_classifier.")}
    d = rng.normal(size=(3, 16))
    h = 1e-6
    lp = float(
        (
            backend.to_numpy(H.vqa_forward(pooled + h * backend.asarray(d), model.params)[0]) * r
        ).sum()
    )
    lm = float(
        (
            backend.to_numpy(H.vqa_forward(pooled - h * backend.asarray(d), model.params)[0]) * r
        ).sum()
    )
    num = (lp - lm) / (2 * h)
    ana = float((backend.to_numpy(dpooled) * d).sum())
    assert abs(ana - num) <= 1e-6 * abs(num)


def test_training_loop_runs_a_few_steps(tmp_path, capsys, backend):
    from minivit.cli import parse_args
    from minivit.train import vilt as train_vilt

    args = parse_args(
        [
            "train", "vilt", "--steps", "4", "--batch-size", "8", "--mlm-batch-size", "4",
            "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--eval-size", "16",
            "--eval-every", "2", "--out", str(tmp_path), "--no-progress", "--dtype", "float64",
            "--backend", backend.name,
        ]
    )  # fmt: skip
    assert isinstance(args, argparse.Namespace)
    assert train_vilt.run(args) == 0
    text = capsys.readouterr().out
    assert re.search(r"^itm accuracy: \d\.\d{4}$", text, re.M)
    assert re.search(r"^mlm accuracy: \d\.\d{4}$", text, re.M)
    for name in ("checkpoint.safetensors", "metrics.json", "curves.png", "alignment.png"):
        assert (tmp_path / name).exists(), name
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["itm_acc"] <= 1 and 0 <= metrics["mlm_acc"] <= 1
    assert set(metrics["itm_acc_by_change"]) <= {"colour", "shape", "size", "relation"}
    assert metrics["itm_acc_by_change"]  # the 16 held-out pairs hold hard negatives
    assert re.search(
        r"^hard-negative itm accuracy: \d\.\d{4} \((colour|shape|size|relation) ", text, re.M
    )
    assert len(metrics["history"]) == 2
    # the checkpoint loads back into a model that reproduces the evaluation
    from minivit.checkpoint import load_model

    model, _ = load_model(tmp_path / "checkpoint.safetensors")
    assert isinstance(model, ViLT) and model.embed_dim == 16


def test_training_steps_follow_the_schedule_and_clip_each_step(tmp_path, monkeypatch):
    """With --warmup 0.5 of 4 steps the first 2 warm up: the lr logged at every step (a check
    each step) is WarmupCosine(lr, 4, 2, min_lr)'s; --clip 0.5 clips every step's gradients
    once at 0.5, and --clip 0 never."""
    import json

    from minivit import optim
    from minivit.cli import parse_args
    from minivit.train import vilt as train_vilt

    clips, real = [], optim.clip_grad_norm

    def recording(grads, max_norm, *a, **kw):
        clips.append(max_norm)
        return real(grads, max_norm, *a, **kw)

    monkeypatch.setattr(optim, "clip_grad_norm", recording)

    def argv(out, *extra):
        return ["train", "vilt", "--batch-size", "4", "--mlm-batch-size", "2", "--embed-dim",
                "16", "--depth", "1", "--num-heads", "2", "--eval-size", "8", "--eval-every",
                "1", "--workers", "0", "--lr", "1e-3", "--min-lr", "1e-4", "--out", str(out),
                "--no-progress", *extra]  # fmt: skip

    out = tmp_path / "run"
    clipped = argv(out, "--steps", "4", "--warmup", "0.5", "--clip", "0.5")
    assert train_vilt.run(parse_args(clipped)) == 0
    assert clips == [0.5] * 4
    history = json.loads((out / "metrics.json").read_text())["history"]
    sched = optim.WarmupCosine(1e-3, 4, 2, min_lr=1e-4)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["lr"] for r in history] == pytest.approx([sched(s) for s in range(4)], rel=1e-12)
    assert history[1]["lr"] < history[2]["lr"] == pytest.approx(1e-3)  # the peak after warmup

    clips.clear()
    off = argv(tmp_path / "unclipped", "--steps", "1", "--clip", "0")
    assert train_vilt.run(parse_args(off)) == 0
    assert clips == []


def test_training_loss_decreases_on_a_fixed_batch():
    """A handful of AdamW steps on one batch must reduce all of ITM + MLM + WPA."""
    from minivit import optim
    from minivit.backend import get_backend
    from minivit.data.shapes import ShapesCaptions
    from minivit.train.vilt import make_batch

    data = ShapesCaptions(seed=0)
    model = ViLT(
        vocab_size=data.tokenizer.vocab_size, max_text_len=16, img_size=48, patch_size=16,
        embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, dtype="float64", seed=0,
    )  # fmt: skip
    b = make_batch(data, data.rng("train", 0), 16, 8)
    be = get_backend("numpy")
    opt = optim.AdamW(model.params, lr=3e-3)
    first = None
    for _ in range(12):
        losses, cache = H.pretrain_forward(
            model, b["input_ids"], b["text_mask"], be.asarray(b["images"], "float64"),
            b["mlm_labels"], b["itm_labels"],
        )  # fmt: skip
        first = float(losses["loss"]) if first is None else first
        opt.step(H.pretrain_backward(model, cache))
    assert float(losses["loss"]) < 0.8 * first


def test_a_training_batch_keeps_each_task_to_its_rows():
    """make_batch: ITM rows first with MLM labels all -100, then MLM rows with ITM labels -100;
    the text cut to the longest caption, whose last valid token is its [SEP]. The held-out sets
    of the training loop come from the test stream, never from a training step's."""
    from minivit.data.shapes import ShapesCaptions
    from minivit.train import vilt as train_vilt

    data = ShapesCaptions(seed=0)
    b = train_vilt.make_batch(data, data.rng("train", 0), 6, 4)
    labels_mlm, labels_itm = b["mlm_labels"], b["itm_labels"]
    assert (labels_mlm[:6] == -100).all() and (labels_mlm[6:] != -100).any(axis=1).all()
    assert (labels_itm[6:] == -100).all() and set(labels_itm[:6].tolist()) <= {0, 1}
    lengths = b["text_mask"].sum(axis=1)
    assert b["input_ids"].shape[1] == lengths.max()  # cut to the longest caption, no shorter
    last = b["input_ids"][np.arange(len(lengths)), lengths - 1]
    assert (last == data.tokenizer.sep_id).all()  # every caption whole, to its [SEP]
    itm, mlm = train_vilt.heldout(data, 8)
    step0 = data.itm_batch(data.rng("train", 0), 8)
    assert not np.array_equal(itm["images"], step0["images"])
    np.testing.assert_array_equal(itm["images"], data.itm_batch(data.rng("test"), 8)["images"])


def test_prefetch_workers_make_the_same_batches_as_inline():
    from minivit.data.shapes import ShapesCaptions
    from minivit.train import vilt as train_vilt

    data = ShapesCaptions(seed=3)
    args = argparse.Namespace(
        steps=10, curriculum="0.2,0.5", batch_size=6, mlm_batch_size=4, hard_fraction=0.5
    )
    spec = train_vilt.batch_spec(args, data)
    with train_vilt.prefetch(spec, range(1, 7), workers=1) as it:
        forked = list(it)
    with train_vilt.prefetch(spec, range(1, 7), workers=0) as it:
        inline = list(it)
    assert len(forked) == len(inline) == 6
    for a, b in zip(forked, inline):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # the curriculum: one-object captions (4 or 5 words) during the first 20% of the steps
    first = inline[0]["text_mask"].sum(axis=1)
    assert first.max() <= 7


def test_curriculum_counts_change_at_the_fractions_of_the_steps():
    """curriculum_counts(step, total, (A, B)): one object while step < A * total, one or two
    while step < B * total, then one to three; each phase starts exactly at its fraction, and
    with no curriculum (0, 0) every step, the first too, has one to three."""
    from minivit.train.vilt import curriculum_counts

    one, two, three = (1,), (1, 2), (1, 2, 3)
    counts = [curriculum_counts(step, 8, (0.25, 0.5)) for step in range(8)]
    assert counts == [one, one, two, two, three, three, three, three]
    assert [curriculum_counts(step, 8, (0.0, 0.0)) for step in range(8)] == [three] * 8
    assert [curriculum_counts(step, 8, (0.25, 0.25)) for step in (1, 2)] == [one, three]
    assert [curriculum_counts(step, 8, (1.0, 1.0)) for step in (0, 7)] == [one, one]


def test_held_out_mlm_accuracy_counts_content_words_only(backend):
    """evaluate's mlm_acc is the hits over the masked content words (colours, shapes, sizes,
    relation words) of the held-out MLM set, and mlm_acc_all over every masked token. A decoder
    bias that makes every prediction one content word gives hits known from the labels alone."""
    from minivit.data.shapes import ShapesCaptions
    from minivit.train import vilt as train_vilt

    data = ShapesCaptions(seed=0)
    model = ViLT(vocab_size=data.tokenizer.vocab_size, max_text_len=16, img_size=48,
                 patch_size=16, embed_dim=16, depth=1, num_heads=2, dtype="float64",
                 backend=backend, seed=0)  # fmt: skip
    itm_set, mlm_set = train_vilt.heldout(data, 24)
    labels = mlm_set["mlm_labels"]
    targets = labels[labels != -100]
    content = data.is_content(targets)
    assert content.any() and not content.all()  # both kinds are masked
    word = np.bincount(targets[content]).argmax()  # the most masked content word
    bias = np.zeros(data.tokenizer.vocab_size)
    bias[word] = 1e6
    model.params["mlm_score.bias"] = backend.asarray(bias)
    m = train_vilt.evaluate(model, data, itm_set, mlm_set)
    hits = targets == word
    assert m["mlm_tokens"] == content.sum()
    assert m["mlm_acc"] == pytest.approx(hits[content].sum() / content.sum(), rel=1e-12)
    assert m["mlm_acc_all"] == pytest.approx(hits.mean(), rel=1e-12)
    assert m["mlm_acc"] > m["mlm_acc_all"]


def run_interrupted(args, monkeypatch):
    """Run ``train vilt`` with ``args`` and stop it by Ctrl-C in step 3: with ``--eval-every 2``
    its checkpoint then holds step 2."""
    from minivit.train import vilt as train_vilt

    real, calls = H.pretrain_forward, []

    def stops_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(H, "pretrain_forward", stops_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_vilt.run(args)
    monkeypatch.setattr(H, "pretrain_forward", real)


@pytest.mark.parametrize(
    "option, off",
    [
        ([], None),
        (["--drop-rate", "0.2"], ["--drop-rate", "0"]),
        (["--max-image-len", "3"], ["--max-image-len", "-1"]),
        (["--tie-mlm-decoder"], ["--no-tie-mlm-decoder"]),
    ],
    ids=["plain", "dropout", "patch-sampling", "tied-decoder"],
)
def test_an_interrupted_training_run_resumes_exactly(tmp_path, monkeypatch, option, off):
    """The checkpoint is written at every --eval-every check, so a run stopped by Ctrl-C goes
    on from its last check, in its own folder, to the parameters of a run never stopped; with
    dropout or patch sampling too, since each step's masks and samples come from a generator
    seeded by (seed, step)."""
    from minivit.checkpoint import load_checkpoint
    from minivit.cli import parse_args
    from minivit.train import vilt as train_vilt

    def args_for(out, *extra):
        return parse_args(
            [
                "train", "vilt", "--steps", "4", "--batch-size", "8", "--mlm-batch-size", "4",
                "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--eval-size", "16",
                "--eval-every", "2", "--out", str(out), "--no-progress", "--dtype", "float64",
                *option, *extra,
            ]
        )  # fmt: skip

    assert train_vilt.run(args_for(tmp_path / "whole")) == 0
    run_interrupted(args_for(tmp_path / "cut"), monkeypatch)
    ckpt = tmp_path / "cut" / "checkpoint.safetensors"
    assert ckpt.exists()  # written at step 2
    resume = ["train", "vilt", "--resume", str(tmp_path / "cut"), "--no-progress"]
    with pytest.raises(ValueError, match=r"contradicts it: --lr 0\.5 \(the run's: 0\.002\)"):
        train_vilt.run(parse_args([*resume, "--lr", "0.5"]))
    # --curriculum compares by value: "0,0" is the run's "0" (only --lr clashes), "0.5" is not
    with pytest.raises(ValueError, match=r"contradicts it: --lr 0\.5 \(the run's: 0\.002\)\."):
        train_vilt.run(parse_args([*resume, "--lr", "0.5", "--curriculum", "0,0"]))
    with pytest.raises(ValueError, match=r"contradicts it: --curriculum '0\.5' \(the run's: '0'\)"):
        train_vilt.run(parse_args([*resume, "--curriculum", "0.5"]))
    # a resume cannot move the run: --out elsewhere is refused, not ignored
    elsewhere = ["--out", str(tmp_path / "elsewhere")]
    with pytest.raises(ValueError, match="continues the run in its own folder"):
        train_vilt.run(parse_args([*resume, *elsewhere]))
    assert not (tmp_path / "elsewhere").exists()
    # the recipe is the saved one (16 wide, 4 steps, float64), not the defaults of this line;
    # --out naming the run's own folder is no clash
    assert train_vilt.run(parse_args([*resume, "--out", str(tmp_path / "cut")])) == 0
    whole, _ = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    resumed, _ = load_checkpoint(ckpt)
    assert set(whole) == set(resumed)
    # a tied run's checkpoint has no decoder of its own: the word embeddings are it
    assert ("mlm_score.decoder.weight" in whole) != ("--tie-mlm-decoder" in option)
    for k in whole:
        np.testing.assert_allclose(resumed[k], whole[k], rtol=0, atol=1e-12, err_msg=k)
    if off:  # the option was on, and changed the training
        assert train_vilt.run(args_for(tmp_path / "plain", *off)) == 0
        other, _ = load_checkpoint(tmp_path / "plain" / "checkpoint.safetensors")
        assert any(not np.array_equal(other[k], whole[k]) for k in whole)


def _worker_ignores_sigint(step):
    """A stand-in batch maker: whether the process that runs it ignores Ctrl-C."""
    import signal

    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_lost_batch_is_an_error_not_a_hang(monkeypatch):
    """A pool never returns the task of a worker that died: the loop waited for ever. It now
    gives up after BATCH_TIMEOUT_S with an error that says what to do."""
    from minivit.data.shapes import ShapesCaptions
    from minivit.train import vilt as train_vilt

    data = ShapesCaptions()
    spec = dict(img_size=data.img_size, max_text_len=data.tokenizer.max_text_len,
                seed=data.seed, cells=data.cells, steps=2, curriculum=(0.0, 0.0), batch_size=2,
                mlm_batch_size=2, hard_fraction=0.5, relation_share=None)  # fmt: skip
    import threading

    monkeypatch.setattr(train_vilt, "BATCH_TIMEOUT_S", 0.5)
    monkeypatch.setattr(train_vilt, "_batch_for_step", _worker_dies)
    raised = []

    def first_batch():
        try:
            with train_vilt.prefetch(spec, range(1), workers=1) as batches:
                next(batches)
        except RuntimeError as exc:
            raised.append(exc)

    t = threading.Thread(target=first_batch, daemon=True)  # a hang fails, not blocks, the test
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "prefetch still waits for the dead worker's batch"
    assert len(raised) == 1
    assert re.search(r"a batch worker made no batch in 0.5 s.*--workers 0", str(raised[0]))


class _FakeResult:
    def __init__(self, ready):
        self._ready, self.waited = ready, []

    def wait(self, timeout=None):
        self.waited.append(timeout)

    def ready(self):
        return self._ready


class _FakePool:
    def __init__(self):
        self.calls = []

    def close(self):
        self.calls.append("close")

    def terminate(self):
        self.calls.append("terminate")

    def join(self):
        self.calls.append("join")


@pytest.mark.parametrize(
    "ready,lost,expected",
    [((True, True), False, "close"), ((True, False), False, "terminate"),
     ((False,), True, "terminate")],
    ids=["all-arrived", "one-never-came", "already-lost"],
)  # fmt: skip
def test_stopping_the_batch_workers(ready, lost, expected):
    """The batches in flight are awaited and the workers leave on their own (close): terminate,
    which can hang on a worker killed mid-send, only for a batch that never came. One already
    lost is not waited for a second time."""
    from minivit.train import vilt as train_vilt

    pool, pending = _FakePool(), [_FakeResult(r) for r in ready]
    train_vilt._stop_pool(pool, pending, lost=lost)
    assert pool.calls == [expected, "join"]
    assert all(len(r.waited) == (0 if lost else 1) for r in pending)
    # every wait has a limit (a dead worker's batch never comes), none beyond one batch's
    assert all(t is not None and 0 <= t <= train_vilt.BATCH_TIMEOUT_S for r in pending
               for t in r.waited)  # fmt: skip


def _worker_dies(step):
    """A stand-in batch maker whose process dies, as one killed by the OOM killer would."""
    import os

    os._exit(1)


def test_batch_workers_leave_ctrl_c_to_the_training_process():
    """A batch worker ignores SIGINT: Ctrl-C reaches the whole process group, and a worker that
    took it printed a stray traceback header before the run's own "minivit: interrupted". The
    training process keeps its own handler, also when it makes its batches inline."""
    import signal

    from minivit.data.shapes import ShapesCaptions
    from minivit.train import vilt as train_vilt

    data = ShapesCaptions()
    spec = dict(
        img_size=data.img_size,
        max_text_len=data.tokenizer.max_text_len,
        seed=data.seed,
        cells=data.cells,
        steps=4,
        curriculum=(0.0, 0.0),
        batch_size=2,
        mlm_batch_size=2,
        hard_fraction=0.5,
        relation_share=None,
    )
    before = signal.getsignal(signal.SIGINT)
    try:
        with train_vilt.prefetch(spec, range(2), workers=0) as batches:
            next(batches)
        assert signal.getsignal(signal.SIGINT) is before  # inline: untouched
        with train_vilt.prefetch(spec, range(2), workers=1) as batches:
            next(batches)
            assert signal.getsignal(signal.SIGINT) is before
        import multiprocessing as mp

        with mp.get_context("fork").Pool(
            1, initializer=train_vilt._init_pool_worker, initargs=(spec,)
        ) as pool:  # what a batch worker runs first
            got = pool.apply_async(signal.getsignal, (signal.SIGINT,)).get(timeout=60)
            assert got is signal.SIG_IGN
        # and prefetch's own workers run it: a batch made there sees Ctrl-C ignored
        real = train_vilt._batch_for_step
        train_vilt._batch_for_step = _worker_ignores_sigint
        try:
            with train_vilt.prefetch(spec, range(2), workers=1) as batches:
                assert next(batches) is True
        finally:
            train_vilt._batch_for_step = real
    finally:
        signal.signal(signal.SIGINT, before)
        train_vilt._WORKER.clear()


def test_a_replayed_plan_of_another_dtype_is_taken_in_the_model_dtype(backend):
    """A float32 model given a float64 plan (a replay saved in float64) ran its forward, then
    its backward failed in ot_distance_backward on an array the caller never passed."""
    model = tiny(backend, dtype="float32")
    ids, mask, images = batch(backend, dtype="float32")
    labels = backend.asarray(np.full((4, 8), -100))
    itm = backend.asarray(np.array([1, 1, 0, 1]))

    def run(plan):
        return H.pretrain_forward(
            model, ids, mask, images, labels, itm, wpa_weight=0.1, wpa_plan=plan
        )

    losses, _ = run(None)
    plan64 = backend.asarray(backend.to_numpy(losses["wpa_plan"]).astype(np.float64))
    again, cache = run(plan64)
    assert again["loss"].dtype == np.float32
    np.testing.assert_allclose(
        backend.to_numpy(again["loss"]), backend.to_numpy(losses["loss"]), rtol=1e-6
    )
    grads = H.pretrain_backward(model, cache)
    assert all(g.dtype == np.float32 for g in grads.values())
    with pytest.raises(ValueError, match=r"plan has shape \(4, 3, 5\).*a plan is \(B, L, I\)"):
        run(plan64[:, :3])
