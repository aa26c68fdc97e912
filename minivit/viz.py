"""Pictures of what a ViT attends to: attention maps per head and attention rollout.

Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers"): each
layer's attention, averaged over heads, is mixed with the identity to account for the residual
connection, ``A_hat = 0.5 A + 0.5 I`` (rows renormalised), and the layers are multiplied,
``R = A_hat_L ... A_hat_1``. Row 0 of R (the CLS token) over the patch tokens says how much each
patch flows into the representation the head classifies.

Drawn with matplotlib's Agg backend into PNG files; no display needed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention_maps", "attention_rollout", "attention_figure"]


def attention_maps(model, images):
    """Run ``model.forward(images)`` (eval) and return each block's attention as numpy arrays,
    a list of depth arrays (B, H, T, T), T = 1 + number of patches.

    The model is left as it was: a pending forward's cache (a training step between its forward
    and its backward) is put back afterwards, so the next ``backward`` is that forward's. Works
    under ``minivit.no_grad()`` too: the maps need this forward's cache, so it keeps one for as
    long as it takes to read them. The forward runs whole, never in batch shards, so that
    shard worker processes holding a pending forward's cache are left alone.
    """
    from .ops import set_grad_enabled

    be = model.backend
    x = be.asarray(images, dtype=model.dtype)
    with model.keep_cache(), set_grad_enabled(True):
        model.forward(x, train=False)
        return [be.to_numpy(a) for a in model.cached_attention()]


HEAD_FUSIONS = ("mean", "max")


def attention_rollout(attns, head_fusion="mean"):
    """attns: list of (B, H, T, T) from the first block to the last -> rollout (B, T, T).

    head_fusion: how each layer's heads become one matrix, "mean" (Abnar & Zuidema) or "max".
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(
            f"head_fusion must be one of {', '.join(map(repr, HEAD_FUSIONS))}, got {head_fusion!r}"
        )
    B, _, T, _ = attns[0].shape
    eye = np.eye(T)
    R = np.broadcast_to(eye, (B, T, T)).copy()  # (B, T, T)
    for a in attns:
        fused = a.max(axis=1) if head_fusion == "max" else a.mean(axis=1)  # (B, T, T)
        a_hat = 0.5 * fused + 0.5 * eye  # the residual path carries the token itself
        a_hat /= a_hat.sum(axis=-1, keepdims=True)
        R = a_hat @ R  # later layers act on what earlier layers already mixed
    return R


def attention_figure(model, images, labels=None, path="attention.png", probs=None, layer=-1):
    """One row per image: the image, the CLS token's attention over the patches for every head
    of block ``layer`` (default the last), and the attention rollout over all blocks.

    images: (B, C, S, S) model inputs (numpy or the model's backend). Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(model.backend.to_numpy(images))
    depth = model.config["depth"]
    if not -depth <= int(layer) < depth:
        raise ValueError(
            f"layer must be in [-{depth}, {depth}) for a model of depth {depth}, got {layer}"
        )
    for name, per_image in (("labels", labels), ("probs", probs)):
        if per_image is not None and len(per_image) != len(images):
            raise ValueError(
                f"{name} must give one entry per image: {len(images)} images, "
                f"{len(per_image)} {name}"
            )
    attns = attention_maps(model, images)
    roll = attention_rollout(attns)  # (B, T, T)
    a = attns[layer]  # (B, H, T, T)
    B, H = a.shape[:2]
    g = model.img_size // model.patch_size
    n_layer = layer % len(attns)
    # What the head reads: the CLS token (global_pool "token"), or the mean of the patch tokens
    # ("avg"), whose attention rows are then averaged.
    avg = getattr(model, "global_pool", "token") == "avg"
    head_rows = a[:, :, 1:, 1:].mean(axis=2) if avg else a[:, :, 0, 1:]  # (B, H, N)
    roll_rows = roll[:, 1:, 1:].mean(axis=1) if avg else roll[:, 0, 1:]  # (B, N)
    fig, axes = plt.subplots(B, H + 2, figsize=(1.8 * (H + 2), 1.9 * B), squeeze=False)
    for b in range(B):
        img = images[b].mean(axis=0) if images.shape[1] != 3 else images[b].transpose(1, 2, 0)
        if img.ndim == 3:
            img = (img - img.min()) / (np.ptp(img) + 1e-12)
        ax = axes[b, 0]
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None)
        title = ""
        if labels is not None:
            title = f"label {int(labels[b])}"
        if probs is not None:
            title += f"\npred {int(np.argmax(probs[b]))} ({float(np.max(probs[b])):.2f})"
        ax.set_title(title, fontsize=8)
        for h in range(H):
            ax = axes[b, 1 + h]
            ax.imshow(head_rows[b, h].reshape(g, g), cmap="viridis")
            if b == 0:
                ax.set_title(f"block {n_layer} head {h}", fontsize=8)
        ax = axes[b, H + 1]
        ax.imshow(roll_rows[b].reshape(g, g), cmap="magma")
        if b == 0:
            ax.set_title("rollout", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    what = "mean patch-token" if avg else "CLS"
    fig.suptitle(f"{what} attention over patches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
