"""``minivit train vit``: a ViT on scikit-learn's 8x8 digits, from scratch, on NumPy or CuPy.

The default recipe (every option below) reaches >= 0.97 test accuracy on the held-out stratified
20 % split in well under three minutes on two CPU cores. What makes a ViT learn from 1437 tiny
images: 2x2 patches (16 tokens + CLS), a position embedding that starts from 2D sine-cosine
codes (it is still learned), random whole-pixel shifts of every training image, label
smoothing, AdamW with warmup and a cosine decay, and gradient clipping. Rotations, zooms and
stochastic depth are options (--rotate, --scale-min/max, --drop-path-rate); within 100 epochs
they did not help on average. docs/vit.md lists the runs that chose the recipe.

The run folder gets ``checkpoint.safetensors`` (model + optimizer + epoch, rewritten atomically
after every epoch, so ``--resume RUN`` continues exactly), ``metrics.json``, ``curves.png`` and
``attention.png``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .common import (
    below_one,
    non_negative_float,
    non_negative_int,
    number_in,
    positive_float,
    positive_int,
)

# Defaults of the recipe (see docs/vit.md for how they were chosen).
DEFAULTS = dict(
    model="vit_digits",
    epochs=100,
    batch_size=64,
    lr=2e-3,
    min_lr=1e-5,
    weight_decay=0.05,
    warmup_epochs=3,
    label_smoothing=0.1,
    clip_grad=1.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    shift=1.0,
    rotate=0.0,
    scale_min=1.0,
    scale_max=1.0,
    test_size=0.2,
    split_seed=0,
    seed=0,
    dtype="float32",
)
ARCH = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "global_pool",
    "pos_embed_init",
)


@dataclass(frozen=True)
class DigitsJob:
    """What tells one digits-classification job from another; the loop below serves them all
    (``train vit`` here, ``train hybrid`` in hybrid.py with its own model and recipe)."""

    name: str  # `minivit train <name>`, also the progress bar's label
    defaults: dict  # the recipe: one entry per option in RECIPE_OPTIONS, plus dtype
    arch: tuple  # model-config entries that get a --flag overriding the registered config
    run_prefix: str  # default run folder runs/<run_prefix>-<time>
    model_class: str  # the class its checkpoints hold (checked on --resume)
    title: str  # curves.png's title; {backend} is filled in


JOB = DigitsJob(
    name="vit",
    defaults=DEFAULTS,
    arch=ARCH,
    run_prefix="vit-digits",
    model_class="ViT",
    title="ViT on digits ({backend}); train loss includes label smoothing",
)

# (option, type, help) of every recipe option; the defaults come from the job's ``defaults``.
# The types refuse values out of range as the command line is parsed (common.number_in).
RECIPE_OPTIONS = (
    ("model", str, "registered config (minivit.list_models)"),
    ("epochs", positive_int, None),
    ("batch_size", positive_int, None),
    ("lr", non_negative_float, "peak AdamW learning rate"),
    ("min_lr", non_negative_float, "lr at the cosine's end"),
    ("weight_decay", non_negative_float, None),
    ("warmup_epochs", non_negative_float, None),
    ("label_smoothing", below_one, None),
    ("clip_grad", non_negative_float, "global gradient-norm clip; 0 turns it off"),
    ("drop_rate", below_one, None),
    ("drop_path_rate", below_one, None),
    ("shift", non_negative_float, "max random shift, pixels"),
    ("rotate", non_negative_float, "max rotation, degrees"),
    ("scale_min", positive_float, None),
    ("scale_max", positive_float, None),
    ("test_size", number_in(float, 0.0, 1.0, open_low=True, open_high=True), None),
    ("split_seed", non_negative_int, "seed of the stratified train/test split"),
    ("seed", non_negative_int, "seed of the initialisation, shuffling, augmentation and dropout"),
)
# The type of an ARCH override, where it is not a positive int.
ARCH_TYPES = {"mlp_ratio": positive_float, "global_pool": str, "pos_embed_init": str}


def _with_default(help, default):
    """An option's help with its default; a split seed left unset follows --seed."""
    shown = (
        "the --seed" if default is None else repr(default) if isinstance(default, str) else default
    )
    return f"{help} (default: {shown})" if help else f"default: {shown}"


def add_arguments(p: argparse.ArgumentParser, job: DigitsJob = JOB) -> None:
    d = job.defaults
    for name, kind, help in RECIPE_OPTIONS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=d[name],
            help=_with_default(help, d[name]),
        )
    p.add_argument("--dtype", choices=["float32", "float64"], default=d["dtype"])
    for name in job.arch:
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=ARCH_TYPES.get(name, positive_int),
            default=None,
            help="override the model config",
        )
    p.add_argument(
        "--train-limit",
        type=non_negative_int,
        default=0,
        help="use only the first N training images (0: all); for quick checks",
    )
    p.add_argument("--out", default=None, help=f"run folder (default runs/{job.run_prefix}-<time>)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue the run in this folder (or this checkpoint file)",
    )
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=1,
        help="BLAS threads on the numpy backend when minivit's pool has one thread (default "
        "1; 0: BLAS default). With more pool threads (MINIVIT_NUM_THREADS, one per core by "
        "default) each batch runs as one shard per pool thread, each on one BLAS thread",
    )
    p.add_argument(
        "--shards",
        choices=("processes", "threads", "off"),
        default=default_shards(),
        help="with more than one pool thread, where each batch shard but the first runs: "
        "in a forked worker process (default on Linux, unless MINIVIT_SHARD says otherwise: no "
        "shard waits for another's GIL, and the weights come out the same, bit for bit), on a "
        "thread, or nowhere (the whole batch, each op threaded)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip curves.png and attention.png")


def default_shards() -> str:
    """The --shards default: MINIVIT_SHARD's mode when the variable names one ("0",
    "threads", "processes"), else processes on Linux, else threads."""
    import sys

    from ..models import shard_workers, sharding

    named = sharding.env_mode()
    if named is not None:
        return named
    # Linux only by default: macOS's system libraries (Accelerate, the Objective-C runtime) are
    # not safe to use in a child forked from a threaded process
    linux = sys.platform.startswith("linux")
    return "processes" if linux and shard_workers.available() else "threads"


def evaluate(model, x, y, batch_size=256):
    """(mean cross-entropy, accuracy, probabilities (n, K) numpy) over host arrays x, y."""
    import numpy as np

    from .. import ops

    be = model.backend
    losses, correct, probs = 0.0, 0, []
    for i in range(0, len(x), batch_size):
        xb = be.asarray(x[i : i + batch_size])
        yb = be.asarray(y[i : i + batch_size])
        with ops.no_grad():  # inference: no cache kept
            logits = model.forward(xb, train=False)
        loss, _ = ops.cross_entropy_forward(logits, yb)
        losses += float(loss) * len(yb)
        correct += int((logits.argmax(axis=-1) == yb).sum())
        z = logits - logits.max(axis=-1, keepdims=True)
        e = be.xp.exp(z)
        probs.append(be.to_numpy(e / e.sum(axis=-1, keepdims=True)))
    return losses / len(x), correct / len(x), np.concatenate(probs)


def build_model(cfg, backend, arch=ARCH):
    """The model named cfg['model'] with the ``arch`` and dropout overrides in cfg."""
    from ..models import create_model

    over = {k: cfg[k] for k in arch if cfg.get(k) is not None}
    return create_model(
        cfg["model"],
        drop_rate=cfg["drop_rate"],
        drop_path_rate=cfg["drop_path_rate"],
        dtype=cfg["dtype"],
        backend=backend,
        seed=cfg["seed"],
        **over,
    )


def train(args, job: DigitsJob = JOB) -> dict:
    """Run (or resume) ``job`` as described by the parsed ``args``; returns the metrics dict."""
    from .. import ops
    from ..backend import get_backend
    from ..checkpoint import checkpoint_file
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
        resumed_run_dir,
        save_training_checkpoint,
        saved_recipe,
        vars_for_json,
        write_json,
    )

    timer = Timer()
    backend = get_backend(getattr(args, "backend", None))
    # (threads, shards: how the run is carried out; off or another thread count rounds
    # float32 differently, processes and threads alike do not)
    local = ("resume", "out", "no_progress", "no_plots", "backend", "threads", "shards")
    cfg = vars_for_json(args, drop=local)
    command = f"minivit train {job.name}"
    if args.resume:
        ckpt = checkpoint_file(args.resume, weights=False)
        cfg = {**cfg, **saved_recipe(ckpt, args, local, job.model_class, command)}
        run_dir = resumed_run_dir(ckpt, args.out)
    if cfg["scale_min"] > cfg["scale_max"]:
        raise ValueError(f"--scale-min {cfg['scale_min']} is above --scale-max {cfg['scale_max']}")

    split_seed = cfg.get("split_seed")  # absent (older runs) or None: the --seed
    data = load_digits_split(
        cfg["test_size"], seed=cfg["seed"] if split_seed is None else split_seed
    )
    x_train, y_train = data.x_train, data.y_train
    if cfg.get("train_limit"):
        x_train, y_train = x_train[: cfg["train_limit"]], y_train[: cfg["train_limit"]]
    x_test = data.normalize(data.x_test, cfg["dtype"])

    model = build_model(cfg, backend, job.arch)
    if type(model).__name__ != job.model_class:  # e.g. --model hybrid_digits to `train vit`
        other = {"ViT": "vit", "HybridViT": "hybrid"}.get(type(model).__name__)
        raise ValueError(
            f"--model {cfg['model']} is a {type(model).__name__}, and `{command}` trains "
            f"{job.model_class} models"
            + (f": train it with `minivit train {other}`" if other else "")
        )
    want = (model.config["in_chans"], model.config["img_size"], model.config["num_classes"])
    if want != (x_test.shape[1], x_test.shape[2], 10):  # the digits: 1 x 8 x 8, 10 classes
        raise ValueError(
            f"--model {cfg['model']} takes {want[0]} x {want[1]} x {want[1]} images in "
            f"{want[2]} classes, and the digits are 1 x 8 x 8 in 10: train a model made for "
            f"them ({job.defaults['model']}, or another config of that input size)"
        )
    opt = AdamW(model.params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    bs = cfg["batch_size"]
    steps_per_epoch = -(-len(x_train) // bs)
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(int(round(cfg["warmup_epochs"] * steps_per_epoch)), total)
    sched = WarmupCosine(cfg["lr"], total, warmup, cfg["min_lr"])
    if not args.resume:  # now that every option has been checked
        run_dir = make_run_dir(args.out, job.run_prefix)
    start, history = 0, History()
    if args.resume:
        start, history, _ = load_training_checkpoint(ckpt, model, opt)

    def augment(x, rng):
        # Whole-pixel shifts keep strokes as sharp as in the test images; rotation or zoom
        # needs interpolation (random_affine, bilinear).
        scale = (cfg["scale_min"], cfg["scale_max"])
        if cfg["rotate"] == 0 and scale == (1.0, 1.0) and float(cfg["shift"]).is_integer():
            return random_translate(x, rng, int(cfg["shift"]))
        return random_affine(x, rng, cfg["shift"], cfg["rotate"], scale)

    xp = backend.xp
    one = xp.asarray(1.0, dtype=cfg["dtype"])
    quiet = getattr(args, "no_progress", False)
    step = start * steps_per_epoch
    with progress(total=total, initial=step, desc=f"train {job.name}", disable=quiet) as bar:
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
                model.backward(dlogits, input_grad=False)
                if cfg["clip_grad"]:
                    clip_grad_norm(model.grads, cfg["clip_grad"])
                opt.step(model.grads, lr=sched(step))
                model.zero_grads()  # spent: not kept through the next forward
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
                    "seed": data.seed,
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
        title = job.title.format(backend=backend.name)
        plot_curves(history, run_dir / "curves.png", title=title)
        from ..viz import attention_figure

        attention_figure(
            model, x_test[:4], data.y_test[:4], run_dir / "attention.png", probs=probs[:4]
        )
    metrics["wall_time_s"] = timer.elapsed()
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def run(args, job: DigitsJob = JOB) -> int:
    from .. import _parallel
    from ..models import sharding

    shards = getattr(args, "shards", None) or sharding.mode()
    with sharding.using(shards), _parallel.limit_blas_threads(getattr(args, "threads", 0)):
        metrics = train(args, job)
    print(f"run folder: {metrics['run_dir']}")
    print(f"test accuracy: {metrics['test_accuracy']:.4f}")
    return 0
