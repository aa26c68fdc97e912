"""What every training job shares: run folders, progress, metrics, curves, resumable checkpoints.

A training job (``minivit train vit``, ``train vilt``, ``train hybrid``) uses it like this::

    run_dir = make_run_dir(args.out, "vit-digits")            # or the resumed run's folder
    history = History()
    for epoch in range(start_epoch, epochs):
        host_rng = epoch_rngs(model, seed, epoch)             # seeds this epoch's randomness
        with progress(total=steps, desc=f"epoch {epoch+1}/{epochs}", disable=quiet) as bar:
            ...  bar.update(1); bar.set_postfix(loss=..., acc=...)
        history.append(epoch=epoch + 1, train_loss=..., test_acc=..., ...)
        save_training_checkpoint(run_dir / CHECKPOINT, model, optimizer, epoch + 1, history,
                                 args=vars_for_json(args))
    write_json(run_dir / "metrics.json", {...})
    plot_curves(history, run_dir / "curves.png")

Exact resume: nothing random is carried from one epoch to the next. Each epoch draws its
shuffling, augmentation and dropout from generators seeded by (seed, epoch) (:func:`epoch_rngs`),
so the checkpoint's epoch counter, together with the parameters and the optimizer state, is the
complete training state; a run stopped after k epochs and resumed continues bit for bit.
"""

from __future__ import annotations

import json
import math
import operator
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..checkpoint import RUN_FILE as CHECKPOINT  # the checkpoint in a run folder
from ..checkpoint import (
    load_checkpoint,
    load_weights_into,
    publish,
    save_model,
    split_prefix,
)

__all__ = [
    "CHECKPOINT",
    "History",
    "make_run_dir",
    "number_in",
    "non_negative_int",
    "non_negative_float",
    "positive_float",
    "fraction",
    "below_one",
    "progress",
    "epoch_rngs",
    "reseed_model_rng",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "write_json",
    "plot_curves",
    "vars_for_json",
    "saved_recipe",
    "resumed_run_dir",
    "Timer",
]


class History:
    """Per-epoch records (dicts of numbers), kept in order; JSON-able."""

    def __init__(self, records=None):
        self.records = [dict(r) for r in (records or [])]

    def append(self, **record):
        self.records.append(record)

    def column(self, key):
        """[(epoch, value)] for every record that has ``key``."""
        return [(r["epoch"], r[key]) for r in self.records if key in r]

    def last(self, key, default=None):
        for r in reversed(self.records):
            if key in r:
                return r[key]
        return default

    def to_list(self):
        return [dict(r) for r in self.records]

    def __len__(self):
        return len(self.records)


def make_run_dir(out=None, prefix="run", root="runs") -> Path:
    """``out`` if given, else ``runs/<prefix>-<YYYYmmdd-HHMMSS>`` (made unique); created.

    An ``out`` that already holds a run (its checkpoint) is refused: a new run would overwrite
    the trained weights, and leave the old run's figures beside them. Call this once every
    option has been checked, so a refused value leaves no empty folder behind."""
    if out:
        path = Path(out)
        if (path / CHECKPOINT).exists():
            raise ValueError(
                f"{str(out)!r} already holds a run ({CHECKPOINT}); continue it with "
                f"--resume {out}, or choose another --out"
            )
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{prefix}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{prefix}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def progress(total, desc="", disable=False, **kwargs):
    """A tqdm progress bar (to stderr) over ``total`` steps; use as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kwargs)


def reseed_model_rng(model, seed, index):
    """Replace the model's generator (``model.rng``, on its backend: dropout masks, ViLT's patch
    sampling) by one seeded from (seed, index), an epoch or a step: the draws of that epoch or
    step then depend on nothing else, so a resumed run draws what the uninterrupted one did."""
    model.rng = model.backend.rng(int(seed) * 1_000_003 + int(index) + 1)


def epoch_rngs(model, seed, epoch):
    """Seed this epoch's randomness; returns the host generator for shuffling and augmentation.

    The model's generator is reseeded from (seed, epoch) too (:func:`reseed_model_rng`).
    """
    reseed_model_rng(model, seed, epoch)
    return np.random.default_rng([int(seed), int(epoch), 7919])


def save_training_checkpoint(path, model, optimizer, epoch, history, **extra) -> Path:
    """Atomically write model parameters, optimizer state (as ``optim.<key>`` tensors), the
    epoch count and the history (and any JSON-able ``extra`` entries) to ``path``."""
    tensors = {f"optim.{k}": v for k, v in optimizer.state_dict().items()} if optimizer else {}
    train = {"epoch": int(epoch), "history": history.to_list(), **extra}
    return save_model(path, model, extra_tensors=tensors, metadata={"train": train})


def load_training_checkpoint(path, model, optimizer=None):
    """Load parameters (and optimizer state) saved by :func:`save_training_checkpoint`.

    Returns (epoch, History, train_metadata). Raises CheckpointError for a corrupt file or one
    written for another config.
    """
    meta = load_weights_into(model, path)
    train = meta.get("train", {})
    if optimizer is not None:
        tensors, _ = load_checkpoint(path)
        state, _ = split_prefix(tensors, "optim.")
        if not state:
            raise ValueError(f"checkpoint {str(path)!r} has no optimizer state to resume from")
        optimizer.load_state_dict(state)
    return int(train.get("epoch", 0)), History(train.get("history", [])), train


def number_in(kind, low=None, high=None, *, open_low=False, open_high=False):
    """An argparse type: ``kind`` (int or float) within ``[low, high]``, an end left out when
    None or excluded when open. A value out of range fails when the command line is parsed,
    with the flag's name, before anything runs (a negative ``--clip-grad`` used to flip the
    gradient without a word)."""
    import argparse

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {_A[kind]}: {text!r}") from None
        if kind is float and not math.isfinite(value):  # NaN or an infinity
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(
                f"must be {_range_text(low, high, open_low, open_high)}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some of its messages
    return parse


_A = {int: "an integer", float: "a number"}


def _range_text(low, high, open_low, open_high):
    if high is None:
        return f"{'above' if open_low else 'at least'} {low}"
    if low is None:
        return f"{'below' if open_high else 'at most'} {high}"
    return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


positive_int = number_in(int, 1)  # a batch size of 0 used to fail later (ZeroDivisionError)
non_negative_int = number_in(int, 0)
non_negative_float = number_in(float, 0.0)
positive_float = number_in(float, 0.0, open_low=True)
fraction = number_in(float, 0.0, 1.0)  # a share, 0 and 1 included
below_one = number_in(float, 0.0, 1.0, open_high=True)  # in [0, 1): a dropout rate, smoothing


def write_json(path, obj) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def vars_for_json(args, drop=("resume", "out", "no_progress")) -> dict:
    """argparse Namespace -> a JSON-able dict: the options, less ``drop`` (run-local ones) and
    the command line's own entries (``_run``, ``_given``: names that start with "_")."""
    return {
        k: v
        for k, v in vars(args).items()
        if k not in drop and not k.startswith("_") and not callable(v)
    }


def saved_recipe(ckpt, args, local, model_class, command, added=None, same=None) -> dict:
    """The recipe a ``--resume`` continues: the options saved in the training checkpoint
    ``ckpt``, which must hold a ``model_class``.

    A resumed run is the run it continues, so the saved options win over this command line's.
    An option given on this command line with another value than the saved one is an error,
    not silently dropped (``--lr 0.01`` on a resume used to be ignored without a word). Options
    not typed on the command line are not "given": ``args._given`` names those typed, a
    default value typed included (``minivit.cli.parse_args``; a Namespace made otherwise
    gives none). ``local`` names the options a resume may change (threads, backend, where the
    output goes), which are neither saved nor checked.

    ``added`` maps options added after some runs were saved to what those runs did (e.g.
    ``{"max_image_len": -1}``): a recipe without the option reads as having that value, so the
    run resumes with it, and another value given on this command line is a clash like any other.

    ``same`` maps an option whose text can spell one value in several ways (``--curriculum``:
    "0" and "0,0") to a test ``same[k](given, saved)`` of their values; other options compare
    as saved.
    """
    from ..checkpoint import read_metadata

    meta = read_metadata(ckpt)
    if meta.get("model") is None:
        raise ValueError(f"{str(ckpt)!r} is not a minivit training checkpoint: nothing to resume")
    if meta.get("model") != model_class:
        raise ValueError(
            f"{str(ckpt)!r} holds a {meta.get('model')}, but `{command}` resumes "
            f"{model_class} runs; resume it with the command that wrote it"
        )
    saved = meta.get("train", {}).get("args")
    if not saved:
        raise ValueError(f"{str(ckpt)!r} is not a training checkpoint (no saved args)")
    saved = {k: v for k, v in {**(added or {}), **saved}.items() if k not in local}
    options = vars_for_json(args, drop=local)
    typed = getattr(args, "_given", ())  # the options typed (minivit.cli.parse_args)
    given = {k: v for k, v in options.items() if k in typed}
    same = same or {}
    clashes = [
        f"--{k.replace('_', '-')} {_as_saved(v)!r} (the run's: {saved[k]!r})"
        for k, v in sorted(given.items())
        if k in saved and not same.get(k, operator.eq)(_as_saved(v), saved[k])
    ]
    if clashes:
        raise ValueError(
            f"--resume continues {str(ckpt.parent)!r} with its own recipe, and this command "
            f"line contradicts it: {', '.join(clashes)}. Drop those options, or start a new "
            "run (--out) with them"
        )
    return saved


def resumed_run_dir(ckpt, out=None) -> Path:
    """The folder a ``--resume`` of checkpoint ``ckpt`` continues in: the run's own. An ``--out``
    naming another folder is refused rather than ignored (a resume cannot move a run)."""
    run_dir = Path(ckpt).parent
    if out and Path(out).resolve() != run_dir.resolve():
        raise ValueError(
            f"--resume continues the run in its own folder {str(run_dir)!r}; --out "
            f"{str(out)!r} cannot move it (drop --out, or copy the run folder there and "
            "resume the copy)"
        )
    return run_dir


def _as_saved(value):
    # a value as it reads back from a checkpoint's JSON metadata (tuples as lists, and so on)
    return json.loads(json.dumps(value, default=_json_default))


def plot_curves(history: History, path, title="") -> Path:
    """Loss and accuracy per epoch (train and, where recorded, test) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (
        ("train_loss", ax1, "train"),
        ("test_loss", ax1, "test"),
        ("train_acc", ax2, "train"),
        ("test_acc", ax2, "test"),
    ):
        pts = history.column(key)
        if pts:
            e, v = zip(*pts)
            ax.plot(e, v, label=label)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


class Timer:
    """Wall time since creation (``elapsed()`` seconds)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0
