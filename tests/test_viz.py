"""minivit.viz: attention maps and rollout (Abnar & Zuidema) and the PNG they are drawn into."""

from __future__ import annotations

import numpy as np
import pytest

from minivit import ViT
from minivit.viz import attention_figure, attention_maps, attention_rollout


def test_rollout_by_hand():
    rng = np.random.default_rng(0)
    attns = []
    for _ in range(3):
        a = rng.random((2, 4, 5, 5))
        attns.append(a / a.sum(-1, keepdims=True))
    R = attention_rollout(attns)
    expect = np.broadcast_to(np.eye(5), (2, 5, 5))
    for a in attns:
        m = 0.5 * a.mean(1) + 0.5 * np.eye(5)
        expect = m @ expect
    np.testing.assert_allclose(R, expect, rtol=1e-12)
    np.testing.assert_allclose(R.sum(-1), 1.0)  # rows stay distributions
    # one layer of uniform attention: half stays on the token, half spreads evenly
    u = [np.full((1, 1, 4, 4), 0.25)]
    np.testing.assert_allclose(attention_rollout(u)[0], 0.5 * np.eye(4) + 0.125)


def test_rollout_max_fuses_the_heads_by_their_maximum():
    rng = np.random.default_rng(2)
    a = rng.random((1, 3, 4, 4))
    a /= a.sum(-1, keepdims=True)
    m = 0.5 * a.max(1) + 0.5 * np.eye(4)
    np.testing.assert_allclose(attention_rollout([a], "max"), m / m.sum(-1, keepdims=True))
    assert not np.allclose(attention_rollout([a], "max"), attention_rollout([a], "mean"))


def test_maps_and_figure(backend, tmp_path, monkeypatch):
    """The figure draws, per image, each head's CLS row of the last block and the rollout's CLS
    row, each over the patch grid (the panels' arrays are recorded as they are drawn)."""
    from matplotlib.axes import Axes

    v = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=2,
            num_heads=2, backend=backend)  # fmt: skip
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    maps = attention_maps(v, x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)
    np.testing.assert_allclose(maps[1].sum(-1), 1.0, rtol=1e-5)
    drawn = []
    real = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, a, **k: drawn.append(a) or real(ax, a, **k))
    path = attention_figure(v, x, labels=[1, 2, 3], path=tmp_path / "att.png",
                            probs=np.full((3, 10), 0.1))  # fmt: skip
    roll = attention_rollout(maps)
    for b in range(3):  # per row: the image, two heads, the rollout
        image, h0, h1, rolled = drawn[4 * b : 4 * b + 4]
        for h, panel in enumerate((h0, h1)):
            np.testing.assert_allclose(panel, maps[-1][b, h, 0, 1:].reshape(4, 4), rtol=1e-6)
        np.testing.assert_allclose(rolled, roll[b, 0, 1:].reshape(4, 4), rtol=1e-6)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_figure_refuses_a_layer_or_labels_that_do_not_fit(tmp_path):
    """A layer outside the model, or labels / probs of another length than the batch: a
    ValueError that says so (it was a bare IndexError from deep inside)."""
    v = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=2,
            num_heads=2)  # fmt: skip
    x = np.zeros((3, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"layer must be in \[-2, 2\) for a model of depth 2"):
        attention_figure(v, x, path=tmp_path / "a.png", layer=2)
    with pytest.raises(ValueError, match="labels must give one entry per image: 3 images, 2"):
        attention_figure(v, x, labels=[1, 2], path=tmp_path / "a.png")
    with pytest.raises(ValueError, match="probs must give one entry per image: 3 images, 4"):
        attention_figure(v, x, probs=np.full((4, 10), 0.1), path=tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
    attention_figure(v, x, path=tmp_path / "a.png", layer=-2)  # the first block


def test_rollout_refuses_an_unknown_head_fusion():
    a = [np.full((1, 2, 3, 3), 1 / 3)]
    assert attention_rollout(a, "max").shape == (1, 3, 3)
    with pytest.raises(ValueError, match=r"head_fusion must be one of 'mean', 'max', got 'maxx'"):
        attention_rollout(a, "maxx")  # was: the mean, silently


@pytest.mark.usefixtures("keep_parallel_settings")
@pytest.mark.parametrize("mode, threads", [("off", 1), ("threads", 2), ("processes", 2)])
def test_maps_leave_a_pending_training_forward_alone(mode, threads):
    """attention_maps between a training forward and its backward replaced the forward's cache
    (the backward then ran on the maps' images, or failed deep); with shards in processes the
    workers' caches were replaced too. Now the pending cache is put back, and under no_grad()
    the maps work (they failed there: no cache)."""
    import minivit
    from minivit import _parallel
    from minivit.models import sharding

    if mode == "processes" and not sharding.shard_workers.available():
        pytest.skip("shards in processes need os.fork")
    sharding.set_mode(mode)
    _parallel.set_num_threads(threads)
    v = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2,
            num_heads=2, dtype="float64")  # fmt: skip
    rng = np.random.default_rng(0)
    # the maps' batch as large as the pending forward's: a replaced cache fits the gradient
    x, other = rng.standard_normal((4, 1, 8, 8)), rng.standard_normal((4, 1, 8, 8))
    d = rng.standard_normal((4, 3))
    v.forward(x, train=True)
    v.backward(d)
    ref = {k: g.copy() for k, g in v.grads.items()}
    v.forward(x, train=True)
    maps = attention_maps(v, other)
    assert maps[0].shape == (4, 2, 5, 5)
    v.backward(d)
    for k in ref:
        np.testing.assert_allclose(v.grads[k], ref[k], rtol=1e-12, atol=1e-14, err_msg=k)
    with minivit.no_grad():
        again = attention_maps(v, other)
    np.testing.assert_allclose(again[1], maps[1], rtol=1e-12)
    with pytest.raises(RuntimeError, match="the last backward consumed it"):
        v.backward(d)  # no cache before the maps, none after: the reason is kept too


def test_keep_cache_does_not_bring_back_a_cache_made_stale_inside():
    """Parameters replaced inside the block (load_state_dict) make the pending cache stale: it
    stays dropped, and backward says why, as it does outside the block."""
    v = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
            num_heads=2, dtype="float64")  # fmt: skip
    other = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                num_heads=2, dtype="float64", seed=5)  # fmt: skip
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    v.forward(x, train=True)
    with v.keep_cache():
        v.load_state_dict(other.params)
    with pytest.raises(RuntimeError, match="load_state_dict replaced the parameters"):
        v.backward(np.ones((2, 3)))
    v.forward(x, train=True)
    with v.keep_cache():  # a plain forward inside: the pending cache comes back
        v.forward(x)
    v.backward(np.ones((2, 3)))


def _rollout_by_definition(attns):
    """Abnar & Zuidema (2020): A' = 0.5 mean_h(A) + 0.5 I, rows renormalised, multiplied from the
    first layer up (R = A'_L ... A'_1)."""
    T = attns[0].shape[-1]
    R = np.eye(T)
    for a in attns:
        m = 0.5 * a.mean(axis=1) + 0.5 * np.eye(T)
        R = (m / m.sum(axis=-1, keepdims=True)) @ R
    return R


def _record_figure(monkeypatch):
    """Every imshow'd array and every axes title, in drawing order."""
    from matplotlib.axes import Axes

    drawn, titles = [], []
    imshow, set_title = Axes.imshow, Axes.set_title
    monkeypatch.setattr(Axes, "imshow", lambda ax, a, **k: drawn.append(a) or imshow(ax, a, **k))
    monkeypatch.setattr(
        Axes, "set_title", lambda ax, t, **k: titles.append(t) or set_title(ax, t, **k)
    )
    return drawn, titles


def test_figure_draws_the_layer_it_is_asked_for_and_each_rows_label(tmp_path, monkeypatch):
    """``layer=0`` draws the first block's heads and titles them "block 0" (a figure that always
    drew the last block, or titled it "block -2", passed the default-layer test); each image's
    title gives its own label and its own prediction, not the first image's."""
    v = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=4, embed_dim=16, depth=2,
            num_heads=2)  # fmt: skip
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    maps = attention_maps(v, x)
    probs = np.array([[0.1, 0.6, 0.2, 0.1], [0.05, 0.05, 0.1, 0.8]])
    drawn, titles = _record_figure(monkeypatch)
    attention_figure(v, x, labels=[2, 0], probs=probs, path=tmp_path / "a.png", layer=-2)
    for b in range(2):
        for h in range(2):
            np.testing.assert_allclose(
                drawn[4 * b + 1 + h], maps[0][b, h, 0, 1:].reshape(4, 4), rtol=1e-6
            )
    assert not np.allclose(maps[0][:, :, 0], maps[1][:, :, 0])  # the layers tell apart
    assert "block 0 head 0" in titles and "block 0 head 1" in titles
    assert "label 2\npred 1 (0.60)" in titles and "label 0\npred 3 (0.80)" in titles


def test_figure_of_an_avg_pool_model_draws_the_mean_patch_rows(tmp_path, monkeypatch):
    """A ``global_pool="avg"`` head reads the mean of the patch tokens, so each panel is the mean
    over the patch tokens' rows (queries) of their attention to the patches, for each head and
    for the rollout (computed here by its definition), and not the CLS row."""
    v = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=4, embed_dim=16, depth=2,
            num_heads=2, global_pool="avg", dtype="float64")  # fmt: skip
    x = np.random.default_rng(4).standard_normal((2, 1, 8, 8))
    maps = attention_maps(v, x)
    roll = _rollout_by_definition(maps)
    drawn, titles = _record_figure(monkeypatch)
    attention_figure(v, x, path=tmp_path / "a.png")
    for b in range(2):
        image, h0, h1, rolled = drawn[4 * b : 4 * b + 4]
        for h, panel in enumerate((h0, h1)):
            want = maps[-1][b, h, 1:, 1:].mean(axis=0).reshape(4, 4)
            np.testing.assert_allclose(panel, want, rtol=1e-10)
        np.testing.assert_allclose(rolled, roll[b, 1:, 1:].mean(axis=0).reshape(4, 4), rtol=1e-10)
    assert not np.allclose(rolled, roll[1, 0, 1:].reshape(4, 4))
