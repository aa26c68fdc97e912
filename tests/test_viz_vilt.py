"""The word-patch alignment figure (minivit/viz_vilt.py): the plan it draws is the WPA plan.

Budget: < 5 s.
"""

from __future__ import annotations

import numpy as np
import pytest
from _requires import require

from minivit import ops
from minivit.data.shapes import ShapesCaptions
from minivit.models import vilt_heads as H
from minivit.models.vilt import ViLT
from minivit.viz_vilt import alignment_figure, alignment_plan


@pytest.fixture(scope="module")
def pair():
    data = ShapesCaptions(img_size=48, max_text_len=16, seed=0, cells=3)
    itm_set = data.itm_batch(data.rng("test"), 8)
    model = ViLT(
        vocab_size=data.tokenizer.vocab_size,
        max_text_len=16,
        img_size=48,
        patch_size=16,
        embed_dim=16,
        depth=1,
        num_heads=2,
        mlp_ratio=2.0,
        dtype="float64",
        seed=3,
    )
    # the pair with the longest caption: several words to align
    k = int(np.argmax(itm_set["text_mask"].sum(axis=1)))
    return data, model, itm_set["input_ids"][k], itm_set["text_mask"][k], itm_set["images"][k]


def test_plan_is_the_wpa_plan_of_the_pair(pair):
    data, model, ids, mask, image = pair
    words, plan, grid = alignment_plan(model, ids, mask, image)
    L = int(mask.sum())
    assert grid == (3, 3) and plan.shape == (L, 1 + 9) and words.shape == (L,)
    # only the words take part: not [CLS] (position 0), not [SEP] (the last valid position)
    assert not words[0] and not words[L - 1] and words[1 : L - 1].all()
    assert (plan[~words] == 0).all() and (plan[:, 0] == 0).all()  # nor the image's CLS
    # the same plan as the WPA loss finds for this pair, from a batch of one
    with ops.no_grad():
        out = model.forward(
            ids[None, :L], mask[None, :L].astype(bool), image[None].astype("float64")
        )
    tv, iv = H.wpa_valid_masks(out["text_mask"], out["image_mask"])
    _, cache = H.wpa_forward(out["text_feats"], out["image_feats"], tv, iv)
    np.testing.assert_array_equal(plan, H.wpa_plan(cache)[0])
    # uniform marginals over the valid words and patches: IPOT's plan holds them roughly
    n_words = int(words.sum())
    assert plan.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(plan[words].sum(axis=1), 1.0 / n_words, rtol=0.2)


def test_figure_has_a_panel_per_word(pair, tmp_path):
    matplotlib = require("matplotlib")
    data, model, ids, mask, image = pair
    path = alignment_figure(model, data, ids, mask, image, tmp_path / "alignment.png")
    assert path.exists()
    pixels = matplotlib.image.imread(path)
    n_panels = int(alignment_plan(model, ids, mask, image)[0].sum()) + 1  # the image first
    ncol = min(n_panels, 7)
    # figsize (2.0 per column) x (2.2 per row + 0.4) inches at 110 dpi
    assert pixels.shape[1] == round(2.0 * ncol * 110)
    assert pixels.shape[0] == round((2.2 * -(-n_panels // ncol) + 0.4) * 110)


def test_plan_leaves_a_pending_training_forward_alone(pair):
    """alignment_plan between a training forward and its backward ran a no_grad forward that
    dropped the pending cache, so the backward failed ("no_grad ... keeps none"). The cache is
    now put back (Model.keep_cache): the backward gives the gradients it gives without the plan."""
    data, model, ids, mask, image = pair
    batch = data.itm_batch(data.rng("train"), 2)
    inputs = (batch["input_ids"], batch["text_mask"], batch["images"].astype("float64"))
    out = model.forward(*inputs, train=True)
    grad = {"pooled": np.ones(out["pooled"].shape)}
    model.backward(grad)
    ref = {k: g.copy() for k, g in model.grads.items()}
    model.forward(*inputs, train=True)
    alignment_plan(model, ids, mask, image)
    model.backward(grad)
    for k in ref:
        np.testing.assert_array_equal(model.grads[k], ref[k], err_msg=k)


def test_figure_draws_each_words_plan_row_over_its_patches(pair, tmp_path, monkeypatch):
    """Each word's panel is titled with that word, and its heat is the word's plan row without
    the image-CLS column, normalised to sum to one, laid out row-major over the patch grid, one
    16x16 block per patch (the image drawn first, under it)."""
    require("matplotlib")
    from matplotlib.axes import Axes

    data, model, ids, mask, image = pair
    words, plan, (gh, gw) = alignment_plan(model, ids, mask, image)
    drawn, titles = [], []
    imshow, set_title = Axes.imshow, Axes.set_title
    monkeypatch.setattr(Axes, "imshow", lambda ax, a, **k: drawn.append(a) or imshow(ax, a, **k))
    monkeypatch.setattr(
        Axes, "set_title", lambda ax, t, **k: titles.append(t) or set_title(ax, t, **k)
    )
    alignment_figure(model, data, ids, mask, image, tmp_path / "alignment.png")
    rows = np.flatnonzero(words)
    assert len(drawn) == 1 + 2 * len(rows)
    vocab = data.tokenizer.vocab
    assert titles == ["image"] + [vocab[int(ids[i])] for i in rows]
    for k, i in enumerate(rows):
        heat = plan[i, 1:] / plan[i, 1:].sum()
        up = drawn[2 + 2 * k]
        assert up.shape == image.shape[1:]
        # block (r, c) of the image holds patch r * gw + c
        blocks = up.reshape(gh, 16, gw, 16)[:, 0, :, 0]
        np.testing.assert_allclose(blocks, heat.reshape(gh, gw), rtol=1e-12)
        np.testing.assert_allclose(up, np.kron(blocks, np.ones((16, 16))), rtol=0)


def test_plan_covers_every_patch_even_when_the_model_samples_patches(pair):
    """A model that samples ``max_image_len`` patches in its forward still gets a plan over
    every patch (the columns must tile the grid the figure draws them on)."""
    data, model, ids, mask, image = pair
    sampling = ViLT(vocab_size=data.tokenizer.vocab_size, max_text_len=16, img_size=48,
                    patch_size=16, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                    dtype="float64", seed=3, max_image_len=4)  # fmt: skip
    words, plan, grid = alignment_plan(sampling, ids, mask, image)
    assert grid == (3, 3) and plan.shape == (int(mask.sum()), 1 + 9)
    np.testing.assert_array_equal(plan, alignment_plan(model, ids, mask, image)[1])
