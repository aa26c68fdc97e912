"""``minivit train hybrid``: a Hybrid ViT (CNN stem + ViT encoder) on scikit-learn's 8x8 digits.

The stem's convolutions see every pixel with its neighbours before the transformer mixes the
positions, which gives the model the locality a plain ViT has to learn from data; on 1437 tiny
training images that is worth a lot. The recipe is the ViT job's (AdamW with warmup and a cosine
decay, label smoothing, gradient clipping, stochastic depth, random shifts, rotations and
zooms), with fewer epochs; so is the training loop: this module gives ``train vit``'s loop
(minivit/train/vit.py) another model, recipe, architecture flags and run folder name.

The run folder is the same as ``train vit``'s: ``checkpoint.safetensors`` (model + optimizer +
epoch, rewritten atomically after every epoch, so ``--resume RUN`` continues exactly),
``metrics.json``, ``curves.png`` and ``attention.png``. The job ends by printing
``test accuracy: 0.xxxx``.
"""

from __future__ import annotations

import argparse

from . import vit

DEFAULTS = dict(
    model="hybrid_digits",
    epochs=30,
    batch_size=32,
    lr=2e-3,
    min_lr=1e-5,
    weight_decay=0.05,
    warmup_epochs=2,
    label_smoothing=0.1,
    clip_grad=1.0,
    drop_rate=0.0,
    drop_path_rate=0.1,
    shift=1.0,
    rotate=10.0,
    scale_min=0.9,
    scale_max=1.1,
    test_size=0.2,
    split_seed=None,  # the split follows --seed
    seed=0,
    dtype="float32",
)
ARCH = ("stem_chs", "embed_dim", "depth", "num_heads", "mlp_ratio")

JOB = vit.DigitsJob(
    name="hybrid",
    defaults=DEFAULTS,
    arch=ARCH,
    run_prefix="hybrid-digits",
    model_class="HybridViT",
    title="Hybrid ViT on digits ({backend})",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    vit.add_arguments(p, JOB)


def build_model(cfg, backend):
    """The model named cfg['model'] with the architecture and dropout overrides in cfg."""
    return vit.build_model(cfg, backend, ARCH)


def train(args) -> dict:
    """Run (or resume) the job described by the parsed ``args``; returns the metrics dict."""
    return vit.train(args, JOB)


def run(args) -> int:
    return vit.run(args, JOB)
