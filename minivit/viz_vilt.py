"""ViLT figures: the word-patch alignment (the transport plan of WPA), as in the ViLT paper.

For one image-caption pair, the IPOT plan between the caption's words and the image's patches is
computed from the model's final features exactly as the WPA loss does; each word's row of the
plan, normalized to sum to one, is drawn as a heatmap over the image grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["alignment_plan", "alignment_figure"]


def alignment_plan(model, input_ids, text_mask, image):
    """One pair -> (words (list of str positions), plan (L, I) numpy, grid (gh, gw)).

    input_ids (L,), text_mask (L,), image (C, H, W): numpy arrays. The model is left as it
    was: a pending forward's cache is kept for its backward (``Model.keep_cache``).
    """
    from . import ops
    from .models import vilt_heads as H

    be = model.backend
    L = int(np.asarray(text_mask).sum())
    ids = be.asarray(np.asarray(input_ids)[None, :L])
    mask = be.asarray(np.asarray(text_mask, bool)[None, :L])
    img = be.asarray(np.asarray(image)[None], dtype=model.dtype)
    # the features only, and a pending training step left alone; every patch, so that the
    # plan's columns tile the grid
    with model.keep_cache(), ops.no_grad():
        out = model.forward(ids, mask, img, max_image_len=-1)
    tv, iv = H.wpa_valid_masks(out["text_mask"], out["image_mask"])
    _, cache = H.wpa_forward(out["text_feats"], out["image_feats"], tv, iv)
    plan = be.to_numpy(H.wpa_plan(cache))[0]  # (L, I)
    gh = image.shape[1] // model.patch_size
    gw = image.shape[2] // model.patch_size
    return be.to_numpy(tv)[0], plan, (gh, gw)


def alignment_figure(model, data, input_ids, text_mask, image, path="alignment.png"):
    """Draw the word-patch alignment of one pair: the image, then one panel per word with the
    word's transport-plan row (over the patch grid) laid over the image. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    words_valid, plan, (gh, gw) = alignment_plan(model, input_ids, text_mask, image)
    L = len(words_valid)
    ids = np.asarray(input_ids)[:L]
    vocab = data.tokenizer.vocab
    pix = data.to_pixels(image).transpose(1, 2, 0)  # (H, W, 3) in [0, 1]
    H, W = pix.shape[:2]
    rows = [i for i in range(L) if words_valid[i]]
    n = len(rows) + 1
    ncol = min(n, 7)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol, 2.2 * nrow + 0.4), squeeze=False)
    axes = axes.ravel()
    caption = " ".join(vocab[i] for i in ids[rows])
    axes[0].imshow(pix)
    axes[0].set_title("image", fontsize=9)
    for ax, i in zip(axes[1:], rows):
        heat = plan[i, 1:].reshape(gh, gw)  # drop the image CLS column
        heat = heat / max(heat.sum(), 1e-12)
        up = np.kron(heat, np.ones((H // gh, W // gw)))  # (H, W), one block per patch
        ax.imshow(pix)
        ax.imshow(up, cmap="magma", alpha=0.6, vmin=0, vmax=max(heat.max(), 1e-12))
        ax.set_title(vocab[int(ids[i])], fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f'word-patch alignment (IPOT plan): "{caption}"', fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
