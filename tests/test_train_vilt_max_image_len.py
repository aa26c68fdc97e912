"""`minivit train vilt --max-image-len K`: training forwards sample K patches per image, the
held-out evaluation and the alignment figure see every patch, bad values are argparse errors,
the checkpoint's config records K, and a run saved before the option existed still resumes
(as does one saved before --drop-rate, held to no dropout).
(That a run with K stopped and resumed ends where a whole one does: tests/test_vilt.py.)"""

from __future__ import annotations

import pytest
from test_vilt import run_interrupted

from minivit.checkpoint import load_checkpoint, load_model, read_metadata, save_checkpoint
from minivit.cli import parse_args
from minivit.models.vilt import ViLT
from minivit.train import vilt as train_vilt

NP = 9  # 48-pixel images in 16-pixel patches: a 3 x 3 grid


def _argv(out, *extra):
    return [
        "train", "vilt", "--steps", "4", "--batch-size", "6", "--mlm-batch-size", "4",
        "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--eval-size", "12",
        "--eval-every", "2", "--workers", "0", "--out", str(out), "--no-progress",
        "--dtype", "float64", *extra,
    ]  # fmt: skip


def _spy_forwards(monkeypatch):
    """Record (train, image tokens out) for every ViLT forward."""
    real, seen = ViLT.forward, []

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append((bool(kwargs.get("train", False)), int(out["image_feats"].shape[1])))
        return out

    monkeypatch.setattr(ViLT, "forward", spy)
    return seen


@pytest.mark.parametrize("k, kept", [(4, 4), (20, NP)], ids=["sampled", "above-patch-count"])
def test_training_forwards_keep_k_patches_and_evaluation_every_patch(
    tmp_path, monkeypatch, k, kept, backend
):
    seen = _spy_forwards(monkeypatch)
    argv = _argv(tmp_path, "--max-image-len", str(k), "--backend", backend.name)
    args = parse_args(argv)
    assert args.max_image_len == k
    assert train_vilt.run(args) == 0
    train = [n for is_train, n in seen if is_train]
    held_out = [n for is_train, n in seen if not is_train]
    assert len(train) == 4  # one fused forward per step
    assert train == [1 + kept] * 4  # CLS + K patches
    # quick check at step 2, the final evaluation (ITM and MLM sets), the alignment figure
    assert len(held_out) >= 5 and held_out == [1 + NP] * len(held_out)
    assert (tmp_path / "alignment.png").exists()
    # the model config in the checkpoint records K, and the reloaded model knows it
    meta = read_metadata(tmp_path / "checkpoint.safetensors")
    assert meta["config"]["max_image_len"] == k and meta["train"]["args"]["max_image_len"] == k
    model, _ = load_model(tmp_path / "checkpoint.safetensors")
    assert model.max_image_len == k
    # patch sampling shapes no weight: the run loads into a model that keeps every patch
    whole, _ = load_model(tmp_path / "checkpoint.safetensors", max_image_len=-1)
    assert whole.max_image_len == -1
    for name, w in model.params.items():
        assert (whole.params[name] == w).all(), name


def test_default_keeps_every_patch_in_training(tmp_path, monkeypatch):
    seen = _spy_forwards(monkeypatch)
    assert train_vilt.run(parse_args(_argv(tmp_path))) == 0
    assert {n for _, n in seen} == {1 + NP}
    assert read_metadata(tmp_path / "checkpoint.safetensors")["config"]["max_image_len"] == -1


@pytest.mark.parametrize("bad", ["0", "-2", "-100", "1.5", "all"])
def test_bad_values_are_argparse_errors(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["train", "vilt", "--max-image-len", bad])
    assert exc.value.code == 2
    assert "--max-image-len" in capsys.readouterr().err


@pytest.mark.parametrize("good", ["-1", "1", "9", "200"])
def test_good_values_parse(good):
    args = parse_args(["train", "vilt", "--max-image-len", good])
    assert args.max_image_len == int(good)


def _as_saved_before_the_option(ckpt):
    """Rewrite a training checkpoint as a run saved before --max-image-len existed wrote it:
    its recipe (train.args) has no max_image_len (its model config always had one: -1)."""
    tensors, meta = load_checkpoint(ckpt)
    del meta["train"]["args"]["max_image_len"]
    assert meta["config"]["max_image_len"] == -1
    save_checkpoint(ckpt, tensors, meta)


def test_a_run_saved_before_the_option_resumes(tmp_path, monkeypatch):
    run_interrupted(parse_args(_argv(tmp_path / "old")), monkeypatch)
    ckpt = tmp_path / "old" / "checkpoint.safetensors"
    _as_saved_before_the_option(ckpt)
    resume = ["train", "vilt", "--resume", str(tmp_path / "old"), "--no-progress"]
    # left at its default, the run resumes (steps 3 and 4), with every patch
    seen = _spy_forwards(monkeypatch)
    assert train_vilt.run(parse_args(resume)) == 0
    assert [n for is_train, n in seen if is_train] == [1 + NP] * 2
    assert {n for _, n in seen} == {1 + NP}
    meta = read_metadata(ckpt)
    assert meta["train"]["epoch"] == 4 and meta["train"]["args"]["max_image_len"] == -1
    # another value contradicts the old run, which kept every patch
    _as_saved_before_the_option(ckpt)
    with pytest.raises(ValueError, match=r"--max-image-len 4 \(the run's: -1\)"):
        train_vilt.run(parse_args([*resume, "--max-image-len", "4"]))


def test_a_run_saved_before_drop_rate_is_held_to_no_dropout(tmp_path, monkeypatch):
    """--drop-rate came after --resume too: a recipe without it reads as no dropout (train
    vilt's ADDED), so a resume that asks for dropout is refused instead of silently changing
    the old run's recipe."""
    run_interrupted(parse_args(_argv(tmp_path / "old")), monkeypatch)
    ckpt = tmp_path / "old" / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(ckpt)
    del meta["train"]["args"]["drop_rate"]
    save_checkpoint(ckpt, tensors, meta)
    resume = ["train", "vilt", "--resume", str(tmp_path / "old"), "--no-progress"]
    with pytest.raises(ValueError, match=r"--drop-rate 0\.3 \(the run's: 0\.0\)"):
        train_vilt.run(parse_args([*resume, "--drop-rate", "0.3"]))
    assert train_vilt.run(parse_args(resume)) == 0
