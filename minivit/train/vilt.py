"""``minivit train vilt``: pre-train a small ViLT on the generated shapes captions.

With no arguments it trains on the CPU with the three objectives of the original (ITM, MLM and
word-patch alignment) and ends by printing, on held-out pairs::

    itm accuracy: 0.xxxx
    mlm accuracy: 0.xxxx

The run folder (``runs/vilt-shapes-<time>`` or ``--out``) receives ``checkpoint.safetensors``
(model, optimizer state, history; written at every ``--eval-every`` check and at the end, so
``--resume RUN`` continues an interrupted run from its last check, in RUN), ``metrics.json``,
``curves.png`` and ``alignment.png`` (the word-patch transport plan of a held-out pair, one panel
per word).

Recipe (see docs/vilt.md): every step runs one fused forward over ``--batch-size`` ITM rows
(half matching; of the mismatches 80% hard, which trains the weak point harder, while the
held-out set keeps BERT-style half-hard negatives) and ``--mlm-batch-size`` MLM rows (matching
pairs, captions BERT-masked), as the original's two forwards but in one batch; AdamW with a
linear warmup and a cosine decay; scenes of one to three objects from the start (an optional
curriculum, ``--curriculum A,B``, shows simpler scenes first: it left ITM at chance for longer);
the next batches are made by a forked worker (``--workers``) while the model computes. A training
forward sees every patch of each image unless ``--max-image-len K`` samples K of them, as the
original's ``max_image_len``; the held-out checks always see every patch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import time
import warnings

import numpy as np

from ..checkpoint import checkpoint_file
from .common import (
    CHECKPOINT,
    History,
    below_one,
    fraction,
    load_training_checkpoint,
    make_run_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    progress,
    reseed_model_rng,
    resumed_run_dir,
    save_training_checkpoint,
    saved_recipe,
    vars_for_json,
    write_json,
)

__all__ = ["add_arguments", "run", "make_batch", "evaluate", "train"]

COMMAND = "minivit train vilt"
# Options a --resume may change: how the run is carried out, not what it computes (float32
# rounding aside: another thread count or backend rounds differently).
LOCAL = ("resume", "out", "no_progress", "backend", "threads", "workers")
# Options added after runs were saved, with what a run saved before them did: its recipe reads
# as if it had them (saved_recipe), so a resume keeps that, and refuses another value.
# (--relation-share predates --resume: every saved recipe has it.)
ADDED = {"drop_rate": 0.0, "max_image_len": -1, "tie_mlm_decoder": False}


def patch_count(text) -> int:
    """An argparse type: -1 (every patch) or a positive number of patches per image."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value == -1:
        return -1
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or -1: every patch)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--steps", type=positive_int, default=9000, help="optimizer steps (default: %(default)s)")
    a(
        "--batch-size",
        type=positive_int,
        default=32,
        help="ITM rows per step (default: %(default)s)",
    )
    a(
        "--mlm-batch-size",
        type=positive_int,
        default=32,
        help="MLM rows per step (default: %(default)s)",
    )
    a(
        "--lr",
        type=non_negative_float,
        default=2e-3,
        help="peak learning rate (default: %(default)s)",
    )
    a(
        "--min-lr",
        type=non_negative_float,
        default=1e-5,
        help="learning rate at the end (default: %(default)s)",
    )
    a(
        "--warmup",
        type=fraction,
        default=0.05,
        help="warmup, a fraction of the steps (default: %(default)s)",
    )
    a("--weight-decay", type=non_negative_float, default=0.01, help="default: %(default)s")
    a(
        "--clip",
        type=non_negative_float,
        default=1.0,
        help="global gradient-norm clip (0: off; default: %(default)s)",
    )
    a(
        "--wpa-weight",
        type=non_negative_float,
        default=0.1,
        help="word-patch alignment weight (0: off; default: %(default)s)",
    )
    a(
        "--curriculum",
        type=curriculum_text,
        default="0",
        help="A,B: one-object scenes for the first fraction A of the steps, one or two objects "
        "until B, then one to three (default '0': no curriculum, one to three from the start)",
    )
    a(
        "--hard-fraction",
        type=fraction,
        default=0.8,
        help="share of training ITM negatives that are hard (the held-out set keeps half; "
        "default: %(default)s)",
    )
    a(
        "--relation-share",
        type=fraction,
        default=None,
        help="share of hard training negatives that flip the relation, when the caption has "
        "one (default: uniform over the caption's attributes; the held-out set stays uniform)",
    )
    a("--img-size", type=positive_int, default=48, help="default: %(default)s")
    a("--patch-size", type=positive_int, default=16, help="default: %(default)s")
    a("--embed-dim", type=positive_int, default=96, help="default: %(default)s")
    a("--depth", type=positive_int, default=3, help="default: %(default)s")
    a("--num-heads", type=positive_int, default=4, help="default: %(default)s")
    a("--mlp-ratio", type=positive_float, default=2.0, help="default: %(default)s")
    a("--max-text-len", type=positive_int, default=16, help="default: %(default)s")
    a(
        "--max-image-len",
        type=patch_count,
        default=-1,
        metavar="K",
        help="patches per image in each training step: a seeded random sample of K (valid "
        "patches first), as the original's max_image_len (200 in its pre-training); -1 "
        "(default), or a K of at least the patch count, keeps every patch. The held-out "
        "evaluation always uses every patch",
    )
    a(
        "--drop-rate",
        type=below_one,
        default=0.0,
        help="dropout in training, where the original has it (0.1 there; default "
        "%(default)s: none)",
    )
    a(
        "--tie-mlm-decoder",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="make the MLM decoder the word-embedding table, as Hugging Face's ViltForMaskedLM "
        "does (default: a decoder of its own, as the original ViLT)",
    )
    a("--dtype", default="float32", choices=["float32", "float64"])
    a(
        "--eval-size",
        type=positive_int,
        default=1000,
        help="held-out ITM pairs and MLM captions each (default: %(default)s)",
    )
    a(
        "--eval-every",
        type=non_negative_int,
        default=500,
        help="steps between quick held-out checks (0: off; default: %(default)s)",
    )
    a("--seed", type=non_negative_int, default=0, help="default: %(default)s")
    a(
        "--threads",
        type=non_negative_int,
        default=1,
        help="CPU threads for BLAS and minivit's thread pool (default %(default)s: the "
        "matrices are small, and a second thread mostly waits on a busy machine; 0 = one per core)",
    )
    a(
        "--workers",
        type=non_negative_int,
        default=1,
        help="processes that make the next batches while the model computes (0: inline; "
        "default: 1)",
    )
    a("--out", default=None, help="run folder (default: runs/vilt-shapes-<time>)")
    a(
        "--resume",
        default=None,
        help="a run folder or checkpoint to continue from (saved at every --eval-every check)",
    )
    a("--no-progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------
# batches


def make_batch(
    data, rng, n_itm, n_mlm, counts=None, probs=None, hard_fraction=0.5, relation_share=None
):
    """One fused batch as numpy arrays: ITM rows first, then MLM rows.

    Returns dict(input_ids (B, L), text_mask (B, L), images (B, 3, S, S), mlm_labels (B, L),
    itm_labels (B,)), with L cut to the longest caption of the batch.
    """
    parts = []
    if n_itm:
        ib = data.itm_batch(
            rng,
            n_itm,
            counts=counts,
            probs=probs,
            hard_fraction=hard_fraction,
            relation_share=relation_share,
        )
        parts.append(
            (
                ib["input_ids"],
                ib["text_mask"],
                ib["images"],
                np.full_like(ib["input_ids"], -100),
                ib["itm_labels"],
            )
        )
    if n_mlm:
        mb = data.mlm_batch(rng, n_mlm, counts=counts, probs=probs)
        parts.append(
            (
                mb["masked_ids"],
                mb["text_mask"],
                mb["images"],
                mb["mlm_labels"],
                np.full(n_mlm, -100, dtype=np.int64),
            )
        )
    ids, mask, images, mlm, itm = (np.concatenate(x) for x in zip(*parts))
    L = int(mask.sum(axis=1).max())
    return dict(
        input_ids=ids[:, :L],
        text_mask=mask[:, :L],
        images=images,
        mlm_labels=mlm[:, :L],
        itm_labels=itm,
    )


def heldout(data, n):
    """The held-out evaluation sets (numpy): n ITM pairs and n BERT-masked matching captions,
    both from the test stream, which training never draws from."""
    rng = data.rng("test")
    itm = data.itm_batch(rng, n)
    mlm = data.mlm_batch(rng, n)
    return itm, mlm


# ----------------------------------------------------------------------------------------------
# evaluation


def _forward_chunks(model, be, ids, mask, images, chunk=256):
    # every patch, whatever the model's max_image_len: held-out figures stay comparable
    from .. import ops

    outs = []
    for s in range(0, len(ids), chunk):
        L = int(mask[s : s + chunk].sum(axis=1).max())
        with ops.no_grad():  # inference: no cache kept
            out = model.forward(
                be.asarray(ids[s : s + chunk, :L]),
                be.asarray(mask[s : s + chunk, :L]),
                be.asarray(images[s : s + chunk], dtype=model.dtype),
                max_image_len=-1,
            )
        outs.append((s, L, out))
    return outs


def evaluate(model, data, itm_set, mlm_set, n=None):
    """ITM accuracy on held-out pairs and MLM accuracy on held-out masked content words, with
    every patch of each image (the model's ``max_image_len`` samples in training only).

    Returns dict(itm_acc, mlm_acc, mlm_acc_all (every masked token), itm_acc_by_change (hard
    negatives by the attribute they changed: colour, shape, size, relation), itm_acc_hard (hard
    negatives only), itm_loss, mlm_loss).
    """
    from ..models import vilt_heads as H

    be = model.backend
    n = len(itm_set["itm_labels"]) if n is None else n
    # ITM
    logits = []
    for _, _, out in _forward_chunks(
        model, be, itm_set["input_ids"][:n], itm_set["text_mask"][:n], itm_set["images"][:n]
    ):
        lg, _ = H.itm_forward(out["pooled"], model.params)
        logits.append(be.to_numpy(lg))
    logits = np.concatenate(logits).astype(np.float64)
    labels = itm_set["itm_labels"][:n]
    pred = logits.argmax(axis=1)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    itm_loss = float(-logp[np.arange(n), labels].mean())
    hard = itm_set["kind"][:n] == 2
    # MLM: accuracy over masked tokens, and over masked content words (the reported figure)
    correct = total = correct_all = total_all = 0
    nll = 0.0
    labels_m = mlm_set["mlm_labels"][:n]
    for s, L, out in _forward_chunks(
        model, be, mlm_set["masked_ids"][:n], mlm_set["text_mask"][:n], mlm_set["images"][:n]
    ):
        lab = labels_m[s : s + len(out["pooled"]), :L]
        rows, cols = np.nonzero(lab != -100)
        feats = out["text_feats"][be.asarray(rows), be.asarray(cols)]
        lg, _ = H.mlm_forward(feats, model.params, model.text_eps, model.mlm_decoder_key)
        lg = be.to_numpy(lg).astype(np.float64)
        tgt = lab[rows, cols]
        hit = lg.argmax(axis=1) == tgt
        content = data.is_content(tgt)
        correct += int(hit[content].sum())
        total += int(content.sum())
        correct_all += int(hit.sum())
        total_all += len(tgt)
        z = lg - lg.max(axis=1, keepdims=True)
        nll += float(-(z[np.arange(len(tgt)), tgt] - np.log(np.exp(z).sum(axis=1))).sum())
    changed = itm_set["changed"][:n]
    by_change = {
        c: float((pred[changed == c] == labels[changed == c]).mean())
        for c in ("colour", "shape", "size", "relation")
        if (changed == c).any()
    }
    return dict(
        itm_acc=float((pred == labels).mean()),
        itm_acc_hard=float((pred[hard] == labels[hard]).mean()) if hard.any() else float("nan"),
        itm_acc_by_change=by_change,
        itm_loss=itm_loss,
        mlm_acc=correct / max(total, 1),
        mlm_acc_all=correct_all / max(total_all, 1),
        mlm_loss=nll / max(total_all, 1),
        mlm_tokens=total,
    )


# ----------------------------------------------------------------------------------------------
# training


def build(args):
    from ..data.shapes import ShapesCaptions
    from ..models.vilt import ViLT

    # one grid cell per patch, so that every object lies within one patch
    cells = args.img_size // args.patch_size
    if cells < 2:
        raise ValueError(
            f"--img-size {args.img_size} with --patch-size {args.patch_size} gives a {cells} x "
            f"{cells} patch grid, and the scenes put one object per patch in a grid of at least "
            f"2 x 2: make --img-size at least twice --patch-size"
        )
    data = ShapesCaptions(
        img_size=args.img_size, max_text_len=args.max_text_len, seed=args.seed, cells=cells
    )
    model = ViLT(
        vocab_size=data.tokenizer.vocab_size,
        max_text_len=args.max_text_len,
        img_size=args.img_size,
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
        mlp_ratio=args.mlp_ratio,
        dtype=args.dtype,
        backend=args.backend,
        seed=args.seed,
        drop_rate=args.drop_rate,  # (a recipe saved before an option: ADDED fills it in)
        # patches kept per image in a training forward (the config records it; evaluation
        # passes -1)
        max_image_len=args.max_image_len,
        tie_mlm_decoder=args.tie_mlm_decoder,
    )
    return data, model


def parse_curriculum(text):
    """ "A,B" -> (A, B) fractions of the steps; "0" or "" -> (0, 0) (no curriculum)."""
    refused = ValueError(f"--curriculum must be A,B with 0 <= A <= B <= 1, got {text!r}")
    try:
        parts = [float(x) for x in str(text).split(",") if x.strip()] or [0.0]
    except ValueError:
        raise refused from None
    a = parts[0]
    b = parts[1] if len(parts) > 1 else a
    if len(parts) > 2 or not 0 <= a <= b <= 1:
        raise refused
    return a, b


def curriculum_text(text) -> str:
    """An argparse type: the ``--curriculum`` text, kept as typed (the recipe saves it), once
    :func:`parse_curriculum` accepts it."""
    try:
        parse_curriculum(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--curriculum ")) from None
    return text


def curriculum_counts(step, total, curriculum):
    """Object counts allowed at ``step``: one object during the first fraction A of the steps,
    one or two until B, then one to three."""
    a, b = curriculum
    if step < a * total:
        return (1,)
    if step < b * total:
        return (1, 2)
    return (1, 2, 3)


# ----------------------------------------------------------------------------------------------
# batches for every step, made in a worker process while the model computes


def batch_spec(args, data):
    """What a worker needs to make the batch of any step (plain, picklable values)."""
    return dict(
        img_size=data.img_size,
        max_text_len=data.tokenizer.max_text_len,
        seed=data.seed,
        cells=data.cells,
        steps=args.steps,
        curriculum=parse_curriculum(args.curriculum),
        batch_size=args.batch_size,
        mlm_batch_size=args.mlm_batch_size,
        hard_fraction=args.hard_fraction,
        relation_share=getattr(args, "relation_share", None),
    )


_WORKER: dict = {}


def _init_worker(spec):
    from ..data.shapes import ShapesCaptions

    _WORKER["data"] = ShapesCaptions(
        img_size=spec["img_size"],
        max_text_len=spec["max_text_len"],
        seed=spec["seed"],
        cells=spec["cells"],
    )
    _WORKER["spec"] = spec


def _batch_for_step(step):
    # every step's data comes from its own stream: resuming at step k is exact, and a worker
    # makes the same batch as the main process would
    data, spec = _WORKER["data"], _WORKER["spec"]
    counts = curriculum_counts(step, spec["steps"], spec["curriculum"])
    return make_batch(
        data,
        data.rng("train", step),
        spec["batch_size"],
        spec["mlm_batch_size"],
        counts=counts,
        hard_fraction=spec["hard_fraction"],
        relation_share=spec["relation_share"],
    )


def _init_pool_worker(spec):
    """A batch worker's start: Ctrl-C is the training process's to handle (it stops the pool).
    A worker that took the signal itself printed a stray "Process ForkPoolWorker-1:" traceback
    before the run's own "minivit: interrupted". (Inline, with --workers 0, the training
    process makes its batches itself and keeps its own handler.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(spec)


# Seconds to wait for one batch from a worker (a batch takes milliseconds to make).
BATCH_TIMEOUT_S = 300


@contextlib.contextmanager
def prefetch(spec, steps, workers, depth=4):
    """Yields an iterator over the batches of ``steps``: made by ``workers`` forked processes
    (at most ``depth`` ahead, so memory stays bounded), or inline when workers is 0 or the
    platform cannot fork."""
    import multiprocessing as mp

    if workers <= 0 or "fork" not in mp.get_all_start_methods():
        _init_worker(spec)
        yield (_batch_for_step(s) for s in steps)
        return
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process: the
        warnings.simplefilter("ignore", DeprecationWarning)  # workers make batches with NumPy
        pool = mp.get_context("fork").Pool(  # alone and touch none of the parent's threads
            workers, initializer=_init_pool_worker, initargs=(spec,)
        )

    pending = collections.deque()  # the batches asked for and not taken yet, oldest first
    lost = False  # a batch never came (its worker died or hangs)

    def gen():
        nonlocal lost
        it = iter(steps)
        pending.extend(pool.apply_async(_batch_for_step, (s,)) for s in itertools.islice(it, depth))
        while pending:
            try:
                # A pool loses the task of a worker that dies (its result never comes), and a
                # forked worker can hang on a lock another thread held at the fork: an error
                # after a wait no batch needs, not a training run that hangs for ever.
                batch = pending[0].get(timeout=BATCH_TIMEOUT_S)
            except mp.TimeoutError:
                lost = True
                raise RuntimeError(
                    f"a batch worker made no batch in {BATCH_TIMEOUT_S} s (a worker process "
                    "died or hung); run again, or with --workers 0 to make the batches inline"
                ) from None
            pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.apply_async(_batch_for_step, (nxt,)))
            yield batch

    try:
        yield gen()
    finally:
        _stop_pool(pool, pending, lost=lost)


def _stop_pool(pool, pending, lost=False):
    """Stop the batch workers, letting the batches in flight arrive first.

    ``Pool.terminate`` kills the workers wherever they are. One killed while it sends a batch
    leaves the result queue's lock taken, and ``terminate`` then waits for ever on the pool's
    task thread, which needs that lock for its last message (a hazard of CPython's Pool; a test
    hung on it about once in ten runs on a loaded machine). Batches take milliseconds, so the
    ones in flight are awaited (as long as one batch may take) and the idle workers are told to
    leave. ``terminate`` is kept for workers that died or hang, whose batches never come: at
    once when a batch was already ``lost`` (its wait is over), after the wait otherwise, and on
    an interrupt during the wait.
    """
    try:
        deadline = time.monotonic() + BATCH_TIMEOUT_S
        for result in () if lost else pending:
            result.wait(max(0.0, deadline - time.monotonic()))
        finished = not lost and all(result.ready() for result in pending)
    except BaseException:  # Ctrl-C while waiting: no more waiting
        pool.terminate()
        raise
    if finished:
        pool.close()  # the workers find their queue empty and exit
    else:
        pool.terminate()
    pool.join()


def train(args, data, model, *, log=print, quiet=False):
    """The training loop; returns (history, run_dir, final metrics, held-out sets)."""
    from .. import optim
    from ..models import vilt_heads as H

    be = model.backend
    if args.resume:  # the run goes on in its own folder (checked before anything is made)
        ckpt = checkpoint_file(args.resume, weights=False)
        run_dir = resumed_run_dir(ckpt, args.out)
    opt = optim.AdamW(model.params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = int(round(args.warmup * args.steps))
    sched = optim.WarmupCosine(args.lr, args.steps, warmup, min_lr=args.min_lr)
    spec = batch_spec(args, data)
    if not args.resume:  # now that every option has been checked
        run_dir = make_run_dir(args.out, "vilt-shapes")
    history = History()
    start = 0
    if args.resume:
        start, history, _ = load_training_checkpoint(ckpt, model, opt)  # opt's counts too
    itm_set, mlm_set = heldout(data, args.eval_size)
    quick = min(256, args.eval_size)
    t0 = time.perf_counter()
    sums = dict(loss=0.0, itm=0.0, mlm=0.0, wpa=0.0, acc=0.0, n=0)
    with (
        progress(total=args.steps, initial=start, desc="vilt", disable=quiet) as bar,
        prefetch(spec, range(start, args.steps), getattr(args, "workers", 0)) as batches,
    ):
        for step, b in zip(range(start, args.steps), batches):
            reseed_model_rng(model, args.seed, step)  # this step's masks, resumed or not
            losses, cache = H.pretrain_forward(
                model,
                be.asarray(b["input_ids"]),
                be.asarray(b["text_mask"]),
                be.asarray(b["images"], dtype=model.dtype),
                be.asarray(b["mlm_labels"]),
                be.asarray(b["itm_labels"]),
                wpa_weight=args.wpa_weight,
            )
            grads = H.pretrain_backward(model, cache)
            if args.clip:
                optim.clip_grad_norm(grads, args.clip)
            opt.step(grads, lr=sched(step))
            itm_pred = be.to_numpy(losses["itm_logits"]).argmax(axis=1)
            losses = {k: float(losses[k]) for k in ("loss", "itm", "mlm", "wpa")}
            # This step's gradients, the heads' caches and the model's outputs (which hold
            # every block's attention maps) are spent: the next forward must not run beside them.
            model.zero_grads()
            del grads, cache
            rows = b["itm_labels"] != -100
            acc = float((itm_pred[rows] == b["itm_labels"][rows]).mean())
            for k in ("loss", "itm", "mlm", "wpa"):
                sums[k] += losses[k]
            sums["acc"] += acc
            sums["n"] += 1
            bar.update(1)
            bar.set_postfix(
                itm=f"{losses['itm']:.3f}", mlm=f"{losses['mlm']:.3f}", acc=f"{acc:.2f}"
            )
            last = step + 1 == args.steps
            if (args.eval_every and (step + 1) % args.eval_every == 0) or last:
                n = sums["n"]
                rec = dict(
                    epoch=step + 1,
                    train_loss=sums["loss"] / n,
                    train_itm_loss=sums["itm"] / n,
                    train_mlm_loss=sums["mlm"] / n,
                    train_wpa_loss=sums["wpa"] / n,
                    train_acc=sums["acc"] / n,
                    lr=sched(step),
                    time=time.perf_counter() - t0,
                )
                if not last:
                    m = evaluate(model, data, itm_set, mlm_set, n=quick)
                    rec.update(test_acc=m["itm_acc"], test_mlm_acc=m["mlm_acc"])
                    # one line per check, with or without the bar
                    bar.write(
                        f"step {step + 1}: loss {rec['train_loss']:.3f} "
                        f"itm {m['itm_acc']:.3f} (hard {m['itm_acc_hard']:.3f}) "
                        f"mlm {m['mlm_acc']:.3f} [{rec['time']:.0f}s]"
                    )
                history.append(**rec)
                sums = dict(loss=0.0, itm=0.0, mlm=0.0, wpa=0.0, acc=0.0, n=0)
                if not last:  # so that an interrupted run resumes from here (--resume)
                    save_training_checkpoint(
                        run_dir / CHECKPOINT, model, opt, step + 1, history,
                        args=vars_for_json(args),
                    )  # fmt: skip
    final = evaluate(model, data, itm_set, mlm_set)
    history.records[-1].update(test_acc=final["itm_acc"], test_mlm_acc=final["mlm_acc"])
    final["train_time_s"] = time.perf_counter() - t0
    save_training_checkpoint(
        run_dir / CHECKPOINT, model, opt, args.steps, history, args=vars_for_json(args)
    )
    return history, run_dir, final, (itm_set, mlm_set)


def plot_vilt_curves(history, path):
    """Losses (train ITM/MLM/WPA) and held-out accuracies (ITM, MLM) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("train_itm_loss", "ITM"),
        ("train_mlm_loss", "MLM"),
        ("train_wpa_loss", "WPA (x0.1, +pos -neg)"),
    ):
        pts = history.column(key)
        if pts:
            ax1.plot(*zip(*pts), label=label)
    for key, label in (
        ("train_acc", "ITM train"),
        ("test_acc", "ITM held-out"),
        ("test_mlm_acc", "MLM held-out (content words)"),
    ):
        pts = history.column(key)
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=label)
    ax1.set(xlabel="step", ylabel="loss", title="training losses")
    ax2.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _limit_threads(n):
    """Use ``n`` threads (0: one per core) for minivit's thread pool, and a context that holds
    BLAS to as many. The caller restores the pool's count."""
    from .. import _parallel

    n = n if n > 0 else (os.cpu_count() or 1)
    _parallel.set_num_threads(n)
    return _parallel.limit_blas_threads(n)


def run(args) -> int:
    from .. import _parallel

    if args.resume:  # the recipe is the run's own (before the model is built from it)
        recipe = saved_recipe(
            checkpoint_file(args.resume, weights=False),
            args,
            LOCAL,
            "ViLT",
            COMMAND,
            added=ADDED,
            same={"curriculum": lambda a, b: parse_curriculum(a) == parse_curriculum(b)},
        )
        args = argparse.Namespace(**{**vars(args), **recipe})
    pool_threads = _parallel.get_num_threads()
    try:
        with _limit_threads(args.threads):
            _train_and_report(args)
    finally:
        _parallel.set_num_threads(pool_threads)
    return 0


def _train_and_report(args):
    """The job itself: build, train, draw and save, then print the figures."""
    from ..viz_vilt import alignment_figure

    data, model = build(args)
    wall = time.perf_counter()
    history, run_dir, final, (itm_set, _) = train(args, data, model, quiet=args.no_progress)
    plot_vilt_curves(history, run_dir / "curves.png")
    # a held-out matching pair with the most objects, for the alignment figure
    pos = np.nonzero(itm_set["itm_labels"] == 1)[0]
    k = int(pos[np.argmax([len(itm_set["scenes"][i]) for i in pos])])
    fig_path = alignment_figure(
        model,
        data,
        itm_set["input_ids"][k],
        itm_set["text_mask"][k],
        itm_set["images"][k],
        run_dir / "alignment.png",
    )
    final["wall_time_s"] = time.perf_counter() - wall
    write_json(
        run_dir / "metrics.json",
        dict(
            final,
            args=vars_for_json(args),
            backend=model.backend.name,
            params=model.num_params(),
            history=history.to_list(),
            checkpoint=str(run_dir / CHECKPOINT),
            alignment_figure=str(fig_path),
        ),
    )
    print(f"run folder: {run_dir}")
    print(f"alignment figure: {fig_path}")
    by = ", ".join(f"{k} {v:.3f}" for k, v in final["itm_acc_by_change"].items())
    print(f"hard-negative itm accuracy: {final['itm_acc_hard']:.4f} ({by})")
    print(f"itm accuracy: {final['itm_acc']:.4f}")
    print(f"mlm accuracy: {final['mlm_acc']:.4f}")
