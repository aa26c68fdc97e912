"""``minivit predict CHECKPOINT IMAGES...``: class probabilities for image files (Pillow).

Each image is converted to the model's channels (grayscale "L" for one, "RGB" for three),
resized to the model's input size and scaled to [0, 1]. The digits the model learned from are
bright ink on a dark background, so a picture with a bright background (a dark digit on white
paper, the usual case) is inverted first (``--invert auto``, judged from the border pixels).
Then the training run's normalisation (mean and std from the checkpoint) is applied.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint.safetensors file or a run folder")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="invert brightness first (auto: when the border is bright)")  # fmt: skip
    p.add_argument("--top", type=int, default=3, help="how many classes to list per image")


def load_image(path, size, channels, invert="auto"):
    """One image file -> float64 array (channels, size, size) in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        # BOX averages every source pixel when shrinking (as the 8x8 digits were made, by
        # counting ink in 4x4 blocks); BICUBIC when enlarging.
        big = im.width > size or im.height > size
        im = im.resize((size, size), Image.Resampling.BOX if big else Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.float64) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, S, S)
    if invert == "yes" or (invert == "auto" and _border_mean(a) > 0.5):
        a = 1.0 - a
    return a


def _border_mean(a):
    import numpy as np

    border = np.concatenate(
        [a[:, 0, :].ravel(), a[:, -1, :].ravel(), a[:, :, 0].ravel(), a[:, :, -1].ravel()]
    )
    return float(border.mean())


def predict(path, images, backend=None, invert="auto"):
    """(probabilities (n, K) numpy, model) for the image files."""
    import numpy as np

    from .. import ops
    from ..checkpoint import load_model
    from .common import resolve_checkpoint

    model, meta = load_model(resolve_checkpoint(path), backend=backend)
    if not hasattr(model, "num_classes"):
        raise ValueError(
            f"predict classifies images with a ViT or Hybrid ViT checkpoint; this one holds a "
            f"{type(model).__name__}"
        )
    if model.num_classes == 0:
        raise ValueError("this checkpoint has no classification head (num_classes=0)")
    data = meta.get("train", {}).get("data", {}) if isinstance(meta.get("train"), dict) else {}
    mean, std = data.get("mean", 0.5), data.get("std", 0.5)  # HF ViT's default is 0.5 / 0.5
    x = np.stack([load_image(p, model.img_size, model.in_chans, invert) for p in images])
    x = ((x - mean) / std).astype(model.dtype)
    be = model.backend
    with ops.no_grad():  # inference: no cache kept
        logits = be.to_numpy(model.forward(be.asarray(x)))
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True), model


def run(args) -> int:
    probs, _ = predict(args.checkpoint, args.images, args.backend, args.invert)
    for path, p in zip(args.images, probs):
        order = p.argsort()[::-1][: max(1, args.top)]
        listed = "  ".join(f"{int(k)}: {p[k]:.4f}" for k in order)
        print(f"{path}: predicted {int(order[0])}  ({listed})")
    return 0
