"""``minivit eval CHECKPOINT``: a trained checkpoint's loss and accuracy on its own test split.

The checkpoint's metadata records the dataset and the split (test_size, seed), so the same held-
out images that the training run reported on are rebuilt and scored.

Printed: the checkpoint, ``test loss:`` and, last, ``test accuracy: 0.xxxx``. With ``--json``
stdout holds only the metrics as one JSON object (checkpoint, test_accuracy, test_loss,
test_size, epoch, confusion), for a JSON tool to read; the human lines go to stderr.
"""

from __future__ import annotations

import argparse

from .common import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint.safetensors file or a run folder")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="images per forward pass, >= 1 (default: 256)",
    )
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="compute dtype (default: the checkpoint's)")  # fmt: skip
    p.add_argument(
        "--json",
        action="store_true",
        help="print only the metrics, as one JSON object (the usual lines go to stderr)",
    )


def evaluate_checkpoint(path, backend=None, dtype=None, batch_size=256) -> dict:
    """Load the checkpoint, rebuild its test split and score it; returns a metrics dict."""
    import numpy as np

    from ..checkpoint import checkpoint_file, load_model
    from ..data import load_digits_split
    from .vit import evaluate

    if int(batch_size) < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    path = checkpoint_file(path, weights=False)
    model, meta = load_model(path, backend=backend, dtype=dtype)
    data_meta = meta.get("train", {}).get("data")
    if not data_meta or data_meta.get("dataset") != "digits":
        raise ValueError(
            f"{str(path)!r} does not record a digits test split (metadata train.data); "
            "`minivit eval` scores checkpoints written by `minivit train vit` or "
            "`minivit train hybrid`"
        )
    data = load_digits_split(data_meta["test_size"], seed=data_meta["seed"])
    x = data.normalize(data.x_test, model.dtype)
    loss, acc, probs = evaluate(model, x, data.y_test, batch_size)
    pred = probs.argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (data.y_test, pred), 1)
    return dict(
        checkpoint=str(path),
        test_accuracy=acc,
        test_loss=loss,
        test_size=int(len(x)),
        epoch=meta.get("train", {}).get("epoch"),
        confusion=confusion.tolist(),
    )


def run(args) -> int:
    import json
    import sys

    m = evaluate_checkpoint(args.checkpoint, args.backend, args.dtype, args.batch_size)
    human = sys.stderr if args.json else sys.stdout  # --json: stdout is the JSON alone
    what = f"{m['checkpoint']} (epoch {m['epoch']}, {m['test_size']} test images)"
    print(f"checkpoint: {what}", file=human)
    print(f"test loss: {m['test_loss']:.4f}", file=human)
    print(f"test accuracy: {m['test_accuracy']:.4f}", file=human)
    if args.json:  # strict JSON: a diverged model's NaN or infinite loss is written as null
        print(json.dumps(_finite_or_none(m), allow_nan=False))
    return 0


def _finite_or_none(value):
    """``value`` with every NaN or infinite float (in dicts and lists) replaced by None."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
