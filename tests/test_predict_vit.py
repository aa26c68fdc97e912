"""`minivit predict` on ViT checkpoints: the classes listed, most probable first, and the
training run's normalisation applied to the image.

A tiny ViT on 4 x 4 greyscale images, its head set by hand so that the class probabilities
are known, written as a training run writes it (``save_training_checkpoint``).
"""

from __future__ import annotations

import re

import numpy as np

from minivit import ViT
from minivit.cli import main
from minivit.optim import AdamW
from minivit.train.common import History, save_training_checkpoint

BIAS = np.array([0.0, 3.0, 1.0, 2.5, -1.0])  # classes by probability: 1, 3, 2, 0, 4


def _run(tmp_path, **data):
    """A run folder holding a ViT whose logits are BIAS whatever the image, and a 4 x 4 PNG."""
    from PIL import Image

    m = ViT(img_size=4, patch_size=2, in_chans=1, num_classes=5, embed_dim=8, depth=1,
            num_heads=2, seed=0, dtype="float64")  # fmt: skip
    m.params["head.weight"][...] = 0.0
    m.params["head.bias"][...] = BIAS
    run = tmp_path / "run"
    save_training_checkpoint(run / "checkpoint.safetensors", m, AdamW(m.params), 1, History(),
                             data=data)  # fmt: skip
    pixels = np.random.default_rng(0).integers(0, 256, (4, 4), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    return run, tmp_path / "x.png", pixels


def test_top_classes_are_listed_most_probable_first(tmp_path, capsys, backend):
    """--top 3 lists the three most probable classes in decreasing probability, the predicted
    class (the argmax) first. (Ten classes summing to 1, as test_train_vit.py checks, hold in
    any order.)"""
    run, png, _ = _run(tmp_path)
    assert main(["predict", str(run), str(png), "--top", "3", "--backend", backend.name]) == 0
    line = capsys.readouterr().out.strip()
    listed = [(int(k), float(p)) for k, p in re.findall(r"(\d+): (\d\.\d{4})", line)]
    p = np.exp(BIAS) / np.exp(BIAS).sum()
    assert [k for k, _ in listed] == [1, 3, 2]
    np.testing.assert_allclose([q for _, q in listed], p[[1, 3, 2]], atol=5e-5)
    assert line.startswith(f"{png}: predicted 1  (")


def test_the_runs_mean_and_std_normalise_the_image(tmp_path, monkeypatch, backend):
    """The model sees (image - mean) / std with the mean and std the run trained with (in its
    checkpoint's metadata), not the 0.5 / 0.5 that stands in when a checkpoint has none."""
    run, png, pixels = _run(tmp_path, mean=0.3, std=0.2)
    seen = []
    forward = ViT.forward

    def spy(self, images, train=False):
        seen.append(backend.to_numpy(images).copy())
        return forward(self, images, train)

    monkeypatch.setattr(ViT, "forward", spy)
    argv = ["predict", str(run), str(png), "--invert", "no", "--backend", backend.name]
    assert main(argv) == 0
    (x,) = seen
    assert x.shape == (1, 1, 4, 4) and x.dtype == np.float64
    np.testing.assert_allclose(x[0, 0], (pixels / 255.0 - 0.3) / 0.2, rtol=1e-12, atol=1e-12)
