"""``minivit train hybrid``: a Hybrid ViT (CNN stem + ViT encoder) on scikit-learn's 8x8 digits.

The stem's convolutions see every pixel with its neighbours before the transformer mixes the
positions, which gives the model the locality a plain ViT has to learn from data; on 1437 tiny
training images that is worth a lot. The recipe is the ViT job's (AdamW with warmup and a cosine
decay, label smoothing, gradient clipping, stochastic depth, random shifts, rotations and
zooms), with fewer epochs.

The run folder is the same as ``train vit``'s: ``checkpoint.safetensors`` (model + optimizer +
epoch, rewritten atomically after every epoch, so ``--resume RUN`` continues exactly),
``metrics.json``, ``curves.png`` and ``attention.png``. The job ends by printing
``test accuracy: 0.xxxx``.
"""

from __future__ import annotations

import argparse

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
    seed=0,
    dtype="float32",
)
ARCH = ("stem_chs", "embed_dim", "depth", "num_heads", "mlp_ratio")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--model", default=d["model"], help="registered config (minivit.list_models)")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate")
    p.add_argument("--min-lr", type=float, default=d["min_lr"], help="lr at the cosine's end")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"])
    p.add_argument("--label-smoothing", type=float, default=d["label_smoothing"])
    p.add_argument("--clip-grad", type=float, default=d["clip_grad"], help="0 turns it off")
    p.add_argument("--drop-rate", type=float, default=d["drop_rate"])
    p.add_argument("--drop-path-rate", type=float, default=d["drop_path_rate"])
    p.add_argument("--shift", type=float, default=d["shift"], help="max random shift, pixels")
    p.add_argument("--rotate", type=float, default=d["rotate"], help="max rotation, degrees")
    p.add_argument("--scale-min", type=float, default=d["scale_min"])
    p.add_argument("--scale-max", type=float, default=d["scale_max"])
    p.add_argument("--test-size", type=float, default=d["test_size"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--dtype", choices=["float32", "float64"], default=d["dtype"])
    for name in ARCH:
        kind = float if name == "mlp_ratio" else int
        p.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help="override the model config"
        )
    p.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="use only the first N training images (0: all); for quick checks",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads (default 1: the matmuls here are small, and on a busy machine more "
        "threads spin instead of compute; 0: one per core)",
    )
    p.add_argument("--out", default=None, help="run folder (default runs/hybrid-digits-<time>)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue the run in this folder (or this checkpoint file)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip curves.png and attention.png")


def build_model(cfg, backend):
    """The model named cfg['model'] with the architecture and dropout overrides in cfg."""
    from ..models import create_model

    over = {k: cfg[k] for k in ARCH if cfg.get(k) is not None}
    return create_model(
        cfg["model"],
        drop_rate=cfg["drop_rate"],
        drop_path_rate=cfg["drop_path_rate"],
        dtype=cfg["dtype"],
        backend=backend,
        seed=cfg["seed"],
        **over,
    )


def train(args) -> dict:
    """Run (or resume) the job described by the parsed ``args``; returns the metrics dict."""
    from .. import ops
    from ..backend import get_backend
    from ..data import iterate_batches, load_digits_split, random_affine, random_translate
    from ..optim import AdamW, WarmupCosine, clip_grad_norm
    from .common import (
        CHECKPOINT,
        History,
        Timer,
        epoch_rngs,
        load_training_checkpoint,
        make_run_dir,
        plot_curves,
        progress,
        resolve_checkpoint,
        save_training_checkpoint,
        vars_for_json,
        write_json,
    )
    from .vit import evaluate

    timer = Timer()
    backend = get_backend(getattr(args, "backend", None))
    cfg = vars_for_json(
        args, drop=("_run", "resume", "out", "no_progress", "no_plots", "backend", "threads")
    )
    if args.resume:
        ckpt = resolve_checkpoint(args.resume)
        from ..checkpoint import read_metadata

        saved = read_metadata(ckpt).get("train", {}).get("args")
        if not saved:
            raise ValueError(f"{str(ckpt)!r} is not a training checkpoint (no saved args)")
        cfg = {**cfg, **saved}  # the recipe is the saved one
        run_dir = ckpt.parent
    else:
        run_dir = make_run_dir(args.out, "hybrid-digits")

    data = load_digits_split(cfg["test_size"], seed=cfg["seed"])
    x_train, y_train = data.x_train, data.y_train
    if cfg.get("train_limit"):
        x_train, y_train = x_train[: cfg["train_limit"]], y_train[: cfg["train_limit"]]
    x_test = data.normalize(data.x_test, cfg["dtype"])

    model = build_model(cfg, backend)
    opt = AdamW(model.params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    bs = cfg["batch_size"]
    steps_per_epoch = -(-len(x_train) // bs)
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(int(round(cfg["warmup_epochs"] * steps_per_epoch)), total)
    sched = WarmupCosine(cfg["lr"], total, warmup, cfg["min_lr"])
    start, history = 0, History()
    if args.resume:
        start, history, _ = load_training_checkpoint(ckpt, model, opt)

    def augment(x, rng):
        # Whole-pixel shifts keep the strokes as sharp as in the test images; rotation or zoom
        # needs interpolation (random_affine, bilinear).
        scale = (cfg["scale_min"], cfg["scale_max"])
        if cfg["rotate"] == 0 and scale == (1.0, 1.0) and float(cfg["shift"]).is_integer():
            return random_translate(x, rng, int(cfg["shift"]))
        return random_affine(x, rng, cfg["shift"], cfg["rotate"], scale)

    xp = backend.xp
    one = xp.asarray(1.0, dtype=cfg["dtype"])
    quiet = getattr(args, "no_progress", False)
    step = start * steps_per_epoch
    with progress(
        total=total, initial=start * steps_per_epoch, desc="train hybrid", disable=quiet
    ) as bar:
        for epoch in range(start, cfg["epochs"]):
            host_rng = epoch_rngs(model, cfg["seed"], epoch)
            loss_sum = xp.zeros((), dtype=cfg["dtype"])
            correct = xp.zeros((), dtype=xp.int64)
            for i, idx in enumerate(iterate_batches(len(x_train), bs, host_rng)):
                step = epoch * steps_per_epoch + i  # global optimizer step, for the schedule
                xb = augment(x_train[idx], host_rng)
                xb = backend.asarray(data.normalize(xb, cfg["dtype"]))  # (b, 1, 8, 8)
                yb = backend.asarray(y_train[idx])  # (b,)
                logits = model.forward(xb, train=True)  # (b, 10)
                loss, c = ops.cross_entropy_forward(
                    logits, yb, label_smoothing=cfg["label_smoothing"]
                )
                (dlogits,) = ops.cross_entropy_backward(one, c)
                model.backward(dlogits)
                if cfg["clip_grad"]:
                    clip_grad_norm(model.grads, cfg["clip_grad"])
                opt.step(model.grads, lr=sched(step))
                loss_sum += loss * len(idx)
                correct += (logits.argmax(axis=-1) == yb).sum()
                bar.update(1)
            train_loss = float(loss_sum) / len(x_train)
            train_acc = int(correct) / len(x_train)
            test_loss, test_acc, _ = evaluate(model, x_test, data.y_test)
            history.append(
                epoch=epoch + 1,
                train_loss=train_loss,
                train_acc=train_acc,
                test_loss=test_loss,
                test_acc=test_acc,
                lr=sched(min(step, total - 1)),
                time=timer.elapsed(),
            )
            bar.set_postfix(
                loss=f"{train_loss:.3f}", acc=f"{train_acc:.3f}", test_acc=f"{test_acc:.3f}"
            )
            save_training_checkpoint(
                run_dir / CHECKPOINT,
                model,
                opt,
                epoch + 1,
                history,
                args=cfg,
                data={
                    "dataset": "digits",
                    "test_size": cfg["test_size"],
                    "seed": cfg["seed"],
                    "mean": data.mean,
                    "std": data.std,
                },
            )

    test_loss, test_acc, probs = evaluate(model, x_test, data.y_test)
    metrics = dict(
        test_accuracy=test_acc,
        test_loss=test_loss,
        epochs=cfg["epochs"],
        train_size=len(x_train),
        test_size=len(x_test),
        num_params=model.num_params(),
        backend=backend.name,
        wall_time_s=timer.elapsed(),
        model=cfg["model"],
        config=model.config,
        args=cfg,
        history=history.to_list(),
        run_dir=str(run_dir),
    )
    if not getattr(args, "no_plots", False):
        plot_curves(history, run_dir / "curves.png", title=f"Hybrid ViT on digits ({backend.name})")
        from ..viz import attention_figure

        attention_figure(
            model, x_test[:4], data.y_test[:4], run_dir / "attention.png", probs=probs[:4]
        )
    metrics["wall_time_s"] = timer.elapsed()
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def _limit_threads(n):
    """Cap the BLAS threads: the GEMMs here are small, and more threads than cores (or a busy
    machine) make OpenBLAS spin instead of compute."""
    import os

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return None
    if n <= 0:
        n = os.cpu_count() or 1
    return threadpool_limits(n)


def run(args) -> int:
    limiter = _limit_threads(getattr(args, "threads", 0))
    try:
        metrics = train(args)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    print(f"run folder: {metrics['run_dir']}")
    print(f"test accuracy: {metrics['test_accuracy']:.4f}")
    return 0
