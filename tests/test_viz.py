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


def test_maps_and_figure(backend, tmp_path):
    v = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=2,
            num_heads=2, backend=backend)  # fmt: skip
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    maps = attention_maps(v, x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)
    np.testing.assert_allclose(maps[1].sum(-1), 1.0, rtol=1e-5)
    path = attention_figure(v, x, labels=[1, 2, 3], path=tmp_path / "att.png",
                            probs=np.full((3, 10), 0.1))  # fmt: skip
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


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
