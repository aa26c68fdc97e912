"""``minivit eval CHECKPOINT``: a trained checkpoint's loss and accuracy on its own test split.

The checkpoint's metadata records the dataset and the split (test_size, seed), so the same held-
out images that the training run reported on are rebuilt and scored.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint.safetensors file or a run folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="compute dtype (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")


def evaluate_checkpoint(path, backend=None, dtype=None, batch_size=256) -> dict:
    """Load the checkpoint, rebuild its test split and score it; returns a metrics dict."""
    import numpy as np

    from ..checkpoint import load_model
    from ..data import load_digits_split
    from .common import resolve_checkpoint
    from .vit import evaluate

    path = resolve_checkpoint(path)
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

    m = evaluate_checkpoint(args.checkpoint, args.backend, args.dtype, args.batch_size)
    print(f"checkpoint: {m['checkpoint']} (epoch {m['epoch']}, {m['test_size']} test images)")
    print(f"test loss: {m['test_loss']:.4f}")
    if args.json:
        print(json.dumps(m))
    print(f"test accuracy: {m['test_accuracy']:.4f}")
    return 0
