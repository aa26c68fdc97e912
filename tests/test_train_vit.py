"""`minivit train vit` end to end on a tiny recipe, exact resume, `minivit eval` and `predict`,
on each backend (the commands' --backend)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from minivit.cli import main, parse_args
from minivit.train import common


def parse(argv):
    return parse_args(argv)


def run_job(args):  # the command without main()'s reporting of errors
    return args._run(args)


TINY = ["--epochs", "3", "--train-limit", "96", "--batch-size", "32", "--embed-dim", "16",
        "--depth", "1", "--num-heads", "2", "--warmup-epochs", "1", "--no-progress",
        "--drop-rate", "0.1", "--drop-path-rate", "0.1"]  # fmt: skip


def test_cli_run_folder_eval_and_predict(tmp_path, capsys, backend):
    out = tmp_path / "run"
    on = ["--backend", backend.name]
    assert main(["train", "vit", *TINY, *on, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"test accuracy: [01]\.\d{4}", lines[-1])
    for name in ("checkpoint.safetensors", "metrics.json", "curves.png", "attention.png"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 3 and metrics["test_size"] == 360
    assert lines[-1] == f"test accuracy: {metrics['test_accuracy']:.4f}"

    assert main(["eval", str(out), *on]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == lines[-1]

    # a test digit written as a dark-on-white PNG, as a user would draw it
    from PIL import Image

    from minivit.data import load_digits_split

    d = load_digits_split()
    img = (255 * (1 - np.kron(d.x_test[0, 0], np.ones((4, 4))))).astype(np.uint8)  # 32x32
    Image.fromarray(img).save(tmp_path / "digit.png")
    assert main(["predict", str(out), str(tmp_path / "digit.png"), "--top", "10", *on]) == 0
    text = capsys.readouterr().out
    probs = [float(p) for p in re.findall(r"\d: (\d\.\d{4})", text)]
    assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-3


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, capsys, backend):
    full = tmp_path / "full"
    on = ["--backend", backend.name]
    assert main(["train", "vit", *TINY, *on, "--no-plots", "--out", str(full)]) == 0

    part = tmp_path / "part"
    real_save = common.save_training_checkpoint

    def save_then_crash(path, model, optimizer, epoch, history, **extra):
        real_save(path, model, optimizer, epoch, history, **extra)
        if epoch == 1:
            raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(common, "save_training_checkpoint", save_then_crash)
    assert main(["train", "vit", *TINY, *on, "--no-plots", "--out", str(part)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    # an option that contradicts the saved recipe is refused, in one line, and nothing runs
    resume = ["train", "vit", "--resume", str(part), *on, "--no-progress", "--no-plots"]
    saved = (part / "checkpoint.safetensors").read_bytes()
    assert main([*resume, "--lr", "0.5", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (the run's: 0.002)" in err and "--epochs" not in err  # 3 is the run's own
    assert (part / "checkpoint.safetensors").read_bytes() == saved
    # a value typed is checked even when it is the option's default (100 epochs; the run's: 3)
    assert main([*resume, "--epochs", "100"]) == 2
    assert "--epochs 100 (the run's: 3)" in capsys.readouterr().err
    # and a resume cannot move the run elsewhere
    assert main([*resume, "--out", str(tmp_path / "elsewhere")]) == 2
    assert "continues the run in its own folder" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
    assert (part / "checkpoint.safetensors").read_bytes() == saved
    # options left at their defaults take the saved values (epochs 3, embed-dim 16, ...)
    assert main(resume) == 0
    capsys.readouterr()

    a = json.loads((full / "metrics.json").read_text())["history"]
    b = json.loads((part / "metrics.json").read_text())["history"]
    keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    # the schedule runs over the global step: 96 images in batches of 32 are 3 steps an epoch,
    # 9 in all, the first epoch's 3 the warmup; each epoch logs the lr of its last step
    from minivit.optim import WarmupCosine

    sched = WarmupCosine(2e-3, 9, 3, min_lr=1e-5)
    assert [r["lr"] for r in a] == pytest.approx([sched(2), sched(5), sched(8)], rel=1e-12)
    from minivit.checkpoint import load_checkpoint

    ta, _ = load_checkpoint(full / "checkpoint.safetensors")
    tb, _ = load_checkpoint(part / "checkpoint.safetensors")
    assert set(ta) == set(tb) and any(k.startswith("optim.") for k in ta)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])


def test_the_logged_training_loss_is_the_mean_over_samples(tmp_path, monkeypatch):
    """80 images in batches of 32: the last batch holds 16. The epoch's train_loss is the mean
    over the 80 samples (each batch's mean loss weighted by its size), not over the batches."""
    from minivit import ops

    seen = []
    real = ops.cross_entropy_forward

    def recording(logits, labels, **kw):
        out = real(logits, labels, **kw)
        if "label_smoothing" in kw:  # the training step's call (evaluate passes none)
            seen.append((float(out[0]), len(labels)))
        return out

    monkeypatch.setattr(ops, "cross_entropy_forward", recording)
    argv = [*TINY, "--epochs", "1", "--train-limit", "80", "--no-plots", "--out", str(tmp_path)]
    assert main(["train", "vit", *argv]) == 0
    assert [n for _, n in seen] == [32, 32, 16]
    logged = json.loads((tmp_path / "metrics.json").read_text())["history"][0]["train_loss"]
    assert logged == pytest.approx(sum(loss * n for loss, n in seen) / 80, rel=1e-6)


def test_each_epoch_draws_its_own_shuffle_and_masks():
    """epoch_rngs seeds an epoch's host generator (shuffle, augmentation) and the model's
    (dropout) from (seed, epoch): the same for a resumed epoch, another for the next one."""
    from minivit import ViT

    m = ViT(img_size=4, patch_size=2, in_chans=1, num_classes=2, embed_dim=8, depth=1,
            num_heads=2)  # fmt: skip

    def draws(seed, epoch):
        host = common.epoch_rngs(m, seed, epoch)
        return host.permutation(50).tolist(), m.backend.to_numpy(m.rng.random(5)).tolist()

    assert draws(0, 1) == draws(0, 1)  # a resumed epoch replays its draws
    for other in (draws(0, 2), draws(1, 1)):
        assert other[0] != draws(0, 1)[0] and other[1] != draws(0, 1)[1]


def test_resume_refuses_non_training_checkpoint(tmp_path):
    from minivit import ViT
    from minivit.checkpoint import save_model

    save_model(tmp_path / "checkpoint.safetensors", ViT(img_size=8, patch_size=2, depth=1))
    with pytest.raises(ValueError, match="not a training checkpoint"):
        run_job(parse(["train", "vit", "--resume", str(tmp_path), "--no-progress"]))
    with pytest.raises(FileNotFoundError):
        run_job(parse(["train", "vit", "--resume", str(tmp_path / "nothing"), "--no-progress"]))


def test_the_command_line_reports_user_errors_in_one_line(tmp_path, capsys, monkeypatch):
    """A missing file, a checkpoint of another job, a batch size of 0: one line on stderr and
    exit status 2, not a traceback (MINIVIT_TRACEBACK=1 brings the traceback back)."""
    from minivit import ViLT
    from minivit.checkpoint import save_model

    monkeypatch.delenv("MINIVIT_TRACEBACK", raising=False)
    assert main(["train", "vit", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "minivit: error:" in capsys.readouterr().err
    save_model(tmp_path / "vilt" / "checkpoint.safetensors",
               ViLT(vocab_size=20, max_text_len=4, img_size=16, patch_size=8, embed_dim=8,
                    depth=1, num_heads=2))  # fmt: skip
    assert main(["train", "vit", "--resume", str(tmp_path / "vilt"), "--no-progress"]) == 2
    assert "holds a ViLT, but `minivit train vit` resumes ViT runs" in capsys.readouterr().err
    assert main(["train", "hybrid", "--resume", str(tmp_path / "vilt"), "--no-progress"]) == 2
    assert "resumes HybridViT runs" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "vilt"), str(tmp_path / "x.png")]) == 2
    assert "a ViLT checkpoint scores a caption: give one with --caption" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "vit", "--batch-size", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("MINIVIT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", "vit", "--resume", str(tmp_path / "nothing"), "--no-progress"])


def test_shards_in_processes_train_the_same_weights_as_threads(
    tmp_path, monkeypatch, keep_parallel_settings
):
    """--shards processes (the default on Linux) and --shards threads run the same
    shards, so the weights come out equal bit for bit; the mode is restored afterwards."""
    from minivit import _parallel
    from minivit.checkpoint import load_checkpoint
    from minivit.models import shard_workers, sharding

    if not shard_workers.available():
        pytest.skip("needs os.fork")
    forks = []
    real = shard_workers.workers_for
    monkeypatch.setattr(shard_workers, "workers_for", lambda m, n: forks.append(n) or real(m, n))
    plain = [*TINY, "--drop-rate", "0", "--drop-path-rate", "0"]  # no randomness: shards run
    before = sharding.mode()
    _parallel.set_num_threads(2)
    for mode in ("processes", "threads"):
        out = tmp_path / mode
        assert main(["train", "vit", *plain, "--shards", mode, "--out", str(out)]) == 0
        assert sharding.mode() == before
        if mode == "processes":
            assert forks, "no shard ran in a worker process"
            n_forks, forks[:] = len(forks), []
        else:
            assert not forks
    assert n_forks >= 9  # every training step's forward (3 epochs x 3 batches), at least
    a, _ = load_checkpoint(tmp_path / "processes" / "checkpoint.safetensors")
    b, _ = load_checkpoint(tmp_path / "threads" / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["train", "vit", "--clip-grad", "-1"],
            "argument --clip-grad: must be at least 0.0, got -1",
        ),
        (["train", "vit", "--min-lr", "-1"], "argument --min-lr: must be at least 0.0"),
        (["train", "vit", "--patch-size", "0"], "argument --patch-size: must be at least 1"),
        (["train", "vit", "--num-heads", "0"], "argument --num-heads: must be at least 1"),
        (
            ["train", "vit", "--label-smoothing", "1"],
            "argument --label-smoothing: must be in [0.0, 1.0)",
        ),
        (["train", "vit", "--test-size", "0"], "argument --test-size: must be in (0.0, 1.0)"),
        (["train", "vit", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
        (["train", "vit", "--train-limit", "-5"], "argument --train-limit: must be at least 0"),
        (["train", "vit", "--mlp-ratio", "-1"], "argument --mlp-ratio: must be above 0.0"),
        (["train", "hybrid", "--stem-chs", "0"], "argument --stem-chs: must be at least 1"),
        (["train", "vilt", "--clip", "-1"], "argument --clip: must be at least 0.0"),
        (["train", "vilt", "--wpa-weight", "-0.1"], "argument --wpa-weight: must be at least 0.0"),
        (["train", "vilt", "--patch-size", "0"], "argument --patch-size: must be at least 1"),
        (
            ["train", "vilt", "--hard-fraction", "2"],
            "argument --hard-fraction: must be in [0.0, 1.0]",
        ),
        (["train", "vilt", "--workers", "-1"], "argument --workers: must be at least 0"),
        (["train", "vilt", "--curriculum", "abc"], "must be A,B with 0 <= A <= B <= 1, got 'abc'"),
        (["predict", "run", "digit.png", "--top", "0"], "argument --top: must be at least 1"),
    ],
)
def test_values_out_of_range_are_refused_as_the_line_is_parsed(
    argv, says, tmp_path, capsys, monkeypatch
):
    """Before, a negative clip flipped the gradient, a negative min-lr or WPA weight trained
    quietly to nonsense, and a zero patch size or head count ended in a ZeroDivisionError."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["train", "vit", "--scale-min", "2", "--scale-max", "1"],
            "--scale-min 2.0 is above --scale-max 1.0",
        ),
        (
            ["train", "vit", "--model", "hybrid_digits"],
            "is a HybridViT, and `minivit train vit` trains ViT models: train it with "
            "`minivit train hybrid`",
        ),
        (
            ["train", "hybrid", "--model", "vit_digits"],
            "is a ViT, and `minivit train hybrid` trains HybridViT models",
        ),
        (  # a registered model made for other images: refused before the first step
            ["train", "vit", "--model", "vit_tiny_patch16_224"],
            "--model vit_tiny_patch16_224 takes 3 x 224 x 224 images in 1000 classes, and the "
            "digits are 1 x 8 x 8 in 10: train a model made for them (vit_digits,",
        ),
        (
            ["train", "hybrid", "--model", "hybrid_resnet_small_32"],
            "takes 3 x 32 x 32 images in 10 classes",
        ),
    ],
)
def test_a_refused_run_leaves_no_folder(argv, says, tmp_path, capsys, monkeypatch):
    """Checks that need the whole recipe (or the model) run before the run folder is made, so
    a refused run leaves no empty folder behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIVIT_TRACEBACK", raising=False)
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minivit: error: ") and says in err
    assert not (tmp_path / "runs").exists()


def test_out_naming_a_finished_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--train-limit", "32", "--batch-size", "32", "--embed-dim", "8",
            "--depth", "1", "--num-heads", "2", "--no-progress", "--no-plots"]  # fmt: skip
    assert main(["train", "vit", *tiny, "--out", str(out)]) == 0
    saved = (out / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "vit", *tiny, "--out", str(out)]) == 2
    assert "already holds a run (checkpoint.safetensors); continue it with --resume" in (
        capsys.readouterr().err
    )
    assert (out / "checkpoint.safetensors").read_bytes() == saved


def test_the_logged_figures_are_counted_on_the_run_s_own_split(tmp_path, monkeypatch, capsys):
    """A run on the split of --split-seed 3, 80 training images in batches of 32 (the last
    holds 16), clipped at 0.5, then `eval --json` of it. Pinned down against counts made here:
    the run trains on that split's images and records its seed; each step clips once at the
    configured norm (and none with --clip-grad 0); an epoch's train_acc is its hits over the 80
    samples seen; the last epoch's test figures are those of the final model on the test
    images; eval rebuilds the recorded split (its loss is the run's) and its confusion matrix
    has a row per true class, a column per prediction. (The resume tests compare a run with
    itself, so a figure wrong in both went unseen.)"""
    from minivit import ops, optim
    from minivit.checkpoint import load_model, read_metadata
    from minivit.data import load_digits_split
    from minivit.train.vit import evaluate

    steps, clips = [], []
    real_ce, real_clip = ops.cross_entropy_forward, optim.clip_grad_norm

    def recording_ce(logits, labels, **kw):
        if "label_smoothing" in kw:  # the training step's call (evaluate passes none)
            hits = int((np.asarray(logits).argmax(axis=-1) == np.asarray(labels)).sum())
            steps.append((np.asarray(labels).copy(), hits))
        return real_ce(logits, labels, **kw)

    def recording_clip(grads, max_norm, *a, **kw):
        clips.append(max_norm)
        return real_clip(grads, max_norm, *a, **kw)

    monkeypatch.setattr(ops, "cross_entropy_forward", recording_ce)
    monkeypatch.setattr(optim, "clip_grad_norm", recording_clip)
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "2", "--train-limit", "80", "--split-seed", "3",
            "--clip-grad", "0.5", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(["train", "vit", *argv]) == 0
    assert [len(labels) for labels, _ in steps] == [32, 32, 16] * 2
    assert clips == [0.5] * 6  # once per optimizer step, at the configured norm

    split = load_digits_split(0.2, seed=3)
    assert not np.array_equal(
        np.sort(split.y_train[:80]), np.sort(load_digits_split().y_train[:80])
    )
    for epoch in (0, 1):  # each epoch goes once over split 3's first 80 training images
        seen = np.concatenate([labels for labels, _ in steps[3 * epoch : 3 * epoch + 3]])
        np.testing.assert_array_equal(np.sort(seen), np.sort(split.y_train[:80]))
    meta = read_metadata(out / "checkpoint.safetensors")["train"]
    assert meta["data"]["seed"] == 3 and meta["args"]["split_seed"] == 3

    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    for epoch, record in enumerate(history):
        hits = sum(h for _, h in steps[3 * epoch : 3 * epoch + 3])
        assert record["train_acc"] == pytest.approx(hits / 80, rel=1e-12)
    assert history[-1]["test_acc"] == metrics["test_accuracy"]
    assert history[-1]["test_loss"] == metrics["test_loss"]

    capsys.readouterr()
    assert main(["eval", str(out), "--backend", "numpy", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)
    assert ev["test_accuracy"] == metrics["test_accuracy"]
    model, _ = load_model(out / "checkpoint.safetensors", backend="numpy")
    pred = evaluate(model, split.normalize(split.x_test, "float32"), split.y_test)[2].argmax(1)
    confusion = np.array(ev["confusion"])
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(split.y_test, minlength=10))
    np.testing.assert_array_equal(confusion.sum(axis=0), np.bincount(pred, minlength=10))
    assert np.trace(confusion) == round(ev["test_accuracy"] * len(split.y_test))

    clips.clear()  # --clip-grad 0 turns clipping off
    argv = [*TINY, "--epochs", "1", "--train-limit", "32", "--clip-grad", "0", "--no-plots"]
    assert main(["train", "vit", *argv, "--out", str(tmp_path / "unclipped")]) == 0
    assert clips == []
