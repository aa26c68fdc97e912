"""minivit.viz: attention maps and rollout (Abnar & Zuidema) and the PNG they are drawn into."""

from __future__ import annotations

import numpy as np

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
