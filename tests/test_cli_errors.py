"""User mistakes on the command line end as the README says: one `minivit: error: ...` line (or
argparse's usage and error for an option out of range) and exit status 2, before any work.

Covers `minivit bench` (unknown --models / --ops names, $MINIVIT_BACKEND), `minivit eval`
(--batch-size, --json) and a backend that cannot run. Budget: < 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import pytest

from minivit import backend as backend_module
from minivit.backend import BackendUnavailable
from minivit.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy missing, whatever this machine has (a GPU, or the test suite's CPU stand-in)."""

    def missing():
        raise BackendUnavailable("backend 'cupy' needs CuPy, which could not be imported (test)")

    monkeypatch.setattr(backend_module, "_CACHE", {})
    monkeypatch.setattr(backend_module, "_make_cupy", missing)


@pytest.fixture
def no_bench_run(monkeypatch):
    """benchmarks/run.py's execute replaced by a recorder: nothing is timed."""
    from benchmarks import run

    calls = []
    monkeypatch.setattr(run, "execute", lambda cfg, out: calls.append(cfg))
    return calls


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minivit: error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------------
# minivit bench: names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, unknown, known",
    [
        (["--models", "nosuchmodel", "--ops"], "'nosuchmodel'", "vit_tiny_patch16_224 (ViT-Ti/16)"),
        (["--ops", "nosuchop", "gelu", "--models"], "'nosuchop'", "cross_entropy, sinkhorn"),
        (["--ops", "foo", "bar", "--models", "vit_tiny_patch16_224"], "'foo', 'bar'", "linear"),
    ],
)
def test_bench_refuses_unknown_names(capsys, no_bench_run, argv, unknown, known):
    assert main(["bench", "--no-torch", *argv]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert unknown in line and known in line
    assert no_bench_run == []  # nothing ran


def test_bench_names_both_unknown_models_and_ops(capsys, no_bench_run):
    assert main(["bench", "--models", "vit_huge", "--ops", "conv"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'vit_huge'" in line and "'conv'" in line and "hybrid_resnet_small_32" in line
    assert "layernorm" in line and no_bench_run == []


def test_bench_accepts_report_labels_for_models(no_bench_run):
    assert main(["bench", "--models", "ViT-Ti/16", "vit-b/16", "--ops", "GELU"]) == 0
    (cfg,) = no_bench_run
    assert cfg.models == ["vit_tiny_patch16_224", "vit_base_patch16_224"]
    assert cfg.ops == ["gelu"]


def test_bench_profile_and_perf_check_names_too(monkeypatch, capsys):
    from benchmarks import perf_breakdown, profile_step

    called = []
    monkeypatch.setattr(profile_step, "execute", lambda a: called.append(a.models))
    monkeypatch.setattr(perf_breakdown, "main", lambda argv: called.append(argv) or 0)
    for flag in ("--profile", "--perf"):
        assert main(["bench", flag, "--models", "nosuchmodel"]) == 2
        assert "'nosuchmodel'" in _one_error_line(capsys.readouterr().err)
    assert main(["bench", "--profile", "--models", "ViT-S/16"]) == 0
    assert called == [["vit_small_patch16_224"]]
    # the profile and the breakdown build any registered model, not just the timed five
    assert main(["bench", "--profile", "--models", "vit_digits"]) == 0
    assert called[-1] == ["vit_digits"]
    assert main(["bench", "--models", "vit_digits", "--no-torch"]) == 2  # not timed
    assert "'vit_digits'" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "flag, value", [("--repeats", "-1"), ("--repeats", "0"), ("--warmup", "-1"), ("--gap", "-1")]
)
def test_bench_refuses_counts_out_of_range(flag, value, capsys, no_bench_run):
    """--repeats -1 used to measure nothing and exit 0 with an empty report."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--ops", "gelu", "--models", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_bench_script_refuses_a_bad_minivit_backend(monkeypatch, capsys, no_bench_run):
    from benchmarks import run as bench_run

    monkeypatch.setenv("MINIVIT_BACKEND", " CuPy")
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--ops", "gelu", "--models"])
    assert exc.value.code == 2
    assert "$MINIVIT_BACKEND must be one of ('numpy', 'cupy'), got ' CuPy'" in (
        capsys.readouterr().err
    )


def test_a_huge_integer_is_refused_in_one_line(capsys):
    """math.isfinite on an int past float's range raised OverflowError: a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "vit", "--seed", "-" + "9" * 400])
    assert exc.value.code == 2
    assert "argument --seed: must be at least 0" in capsys.readouterr().err


def test_eval_json_is_strict_json_when_the_loss_is_not_finite():
    from minivit.train.evaluate import _finite_or_none

    m = {"test_loss": float("nan"), "confusion": [[1.0, float("inf")]], "epoch": 3}
    text = json.dumps(_finite_or_none(m), allow_nan=False)
    assert json.loads(text) == {"test_loss": None, "confusion": [[1.0, None]], "epoch": 3}


def test_bench_help_lists_the_names(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in ("cross_entropy", "sinkhorn", "vilt_b32", "hybrid_resnet_small_32", "ViLT-B/32"):
        assert name in out


def test_bench_script_refuses_unknown_names(capsys, no_bench_run):
    from benchmarks import run

    with pytest.raises(SystemExit) as e:
        run.main(["--ops", "nosuchop", "--models"])
    assert e.value.code == 2
    assert "unknown op 'nosuchop'" in capsys.readouterr().err
    assert no_bench_run == []


def test_bench_config_with_unknown_names_fails_before_timing(tmp_path):
    from benchmarks import harness, run

    cfg = harness.BenchConfig(backends=["numpy"], ops=["nosuchop"], models=[], sgemm_n=64)
    with pytest.raises(ValueError, match="unknown op 'nosuchop'"):
        run.execute(cfg, str(tmp_path / "out"), log=lambda *a: None)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# minivit bench: $MINIVIT_BACKEND, and a backend that cannot run
# --------------------------------------------------------------------------------------------


def test_bench_takes_minivit_backend_as_its_default(monkeypatch, no_bench_run):
    from benchmarks import harness

    monkeypatch.setattr(harness, "impl_available", lambda name: True)  # as on a GPU machine
    monkeypatch.setenv("MINIVIT_BACKEND", "numpy")
    assert main(["bench", "--ops", "--models", "--no-torch"]) == 0
    assert no_bench_run[-1].backends == ["numpy"]  # not numpy plus cupy on a GPU machine

    from benchmarks.run import config_from_args
    from minivit.cli import build_parser

    args = build_parser().parse_args(["bench", "--ops"])
    assert config_from_args(args).backends == ["numpy"]  # the script reads it too


def test_bench_refuses_an_unusable_minivit_backend(monkeypatch, capsys, no_cupy, no_bench_run):
    monkeypatch.setenv("MINIVIT_BACKEND", "cupy")
    assert main(["bench", "--ops", "--models", "--no-torch"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("minivit: error: backend 'cupy' needs CuPy")
    assert no_bench_run == []
    monkeypatch.setenv("MINIVIT_BACKEND", "tpu")
    assert main(["bench", "--ops", "--models", "--no-torch"]) == 2
    assert "got 'tpu'" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["gradcheck", "--ops", "gelu"], ["bench", "--ops", "gelu"]])
def test_a_missing_backend_is_a_minivit_error(capsys, no_cupy, no_bench_run, command):
    assert main([*command, "--backend", "cupy"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("minivit: error: backend 'cupy' needs CuPy")


# --------------------------------------------------------------------------------------------
# minivit eval
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path):
    """A checkpoint of an untrained tiny ViT that records a digits split, as train vit writes."""
    from minivit.checkpoint import save_model
    from minivit.models.vit import ViT

    model = ViT(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=8, depth=1,
                num_heads=2, backend="numpy")  # fmt: skip
    path = tmp_path / "checkpoint.safetensors"
    data = {"dataset": "digits", "test_size": 0.2, "seed": 0}
    save_model(path, model, metadata={"train": {"data": data, "epoch": 1}})
    return path


@pytest.mark.parametrize("size", ["0", "-4", "x"])
def test_eval_refuses_a_batch_size_below_one(tiny_run, capsys, size):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny_run), "--backend", "numpy", "--batch-size", size])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --batch-size:" in err and size in err


def test_eval_and_resume_of_a_folder_without_a_run_name_only_a_run(tmp_path, capsys):
    """eval and --resume read only a run's checkpoint: a folder without one is not said to
    need Hugging Face weights (predict, which reads those too, names both)."""
    (tmp_path / "model.safetensors").write_bytes(b"")  # a hub folder's file is no run
    for argv in (["eval", str(tmp_path)], ["train", "vit", "--resume", str(tmp_path)]):
        assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
        err = capsys.readouterr().err
        assert (
            f"no checkpoint in {str(tmp_path)!r}: no checkpoint.safetensors (a minivit run)" in err
        )
        assert "Hugging Face" not in err


@pytest.mark.parametrize(
    "sizes", [["--img-size", "32", "--patch-size", "32"], ["--img-size", "16"]]
)
def test_train_vilt_refuses_a_one_patch_grid_naming_the_flags(sizes, capsys, tmp_path, monkeypatch):
    """The scenes need a grid of at least 2 x 2 patches: the refusal names the two flags (it
    said "cells must be >= 2", a word no option uses) and leaves no run folder."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "vilt", *sizes, "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "patch grid" in err and "make --img-size at least twice --patch-size" in err
    assert not (tmp_path / "runs").exists()


def test_a_misspelt_setting_is_refused_by_commands_and_warned_about_once_in_programs():
    """$MINIVIT_SHARD=thred (or a thread count that is no number) named nothing minivit knows
    and was silently read as the default. A command refuses it, naming what it takes; a
    program of one's own is warned once, when it builds its first model."""
    import subprocess

    env = {**os.environ, "MINIVIT_SHARD": "thred", "MINIVIT_NUM_THREADS": "two",
           "PYTHONPATH": ROOT}  # fmt: skip
    cmd = [sys.executable, "-m", "minivit", "gradcheck", "--ops", "linear"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("minivit: error: ") and out.stderr.count("\n") == 1
    assert "$MINIVIT_NUM_THREADS='two' is not a whole number" in out.stderr
    assert (
        "$MINIVIT_SHARD='thred' is not one of '0', 'false', 'no', 'off', '1', 'true', 'yes', "
        "'on', 'threads', 'thread', 'process', 'processes'" in out.stderr
    )
    program = (
        "import warnings, minivit\n"
        "warnings.simplefilter('always')\n"
        "for _ in range(2):\n"
        "    minivit.ViT(img_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2)\n"
    )
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0
    assert out.stderr.count("RuntimeWarning") == 2  # one per setting, not one per model
    assert "$MINIVIT_SHARD='thred' is not one of" in out.stderr and "read as '1'" in out.stderr
    env["MINIVIT_SHARD"] = "thread"  # the singular is understood
    del env["MINIVIT_NUM_THREADS"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_eval_json_prints_the_json_alone(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--backend", "numpy", "--batch-size", "64"]) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert plain[-1].startswith("test accuracy: ") and plain[1].startswith("test loss: ")

    assert main(["eval", str(tiny_run), "--backend", "numpy", "--json"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)  # the whole of stdout is one JSON object
    assert metrics["test_size"] == 360 and metrics["epoch"] == 1
    assert plain[-1] == f"test accuracy: {metrics['test_accuracy']:.4f}"
    assert err.strip().splitlines() == plain  # the usual lines, on stderr


def _subcommands(parser, path=()):
    """(words, parser) for every command that takes options: `train vilt`, `bench`, ..."""
    found = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = True
            for word, sub in action.choices.items():
                yield from _subcommands(sub, path + (word,))
    if not found:
        yield path, parser


# A number the help states as the default: "(default: 32)", "default 1:", "(default '0': ...".
_STATED_DEFAULT = re.compile(r"default:?\s+'?(-?\d[\d.e+-]*)")


def test_every_default_a_help_states_is_the_real_one():
    """A help text that writes its default by hand can drift from ``default=`` when one of them
    changes. Every number a help gives as its default must equal the option's value. Not checked:
    ``%(default)s`` (argparse fills it in), and options whose default is None, resolved later
    (``bench --repeats``, ``gradcheck --eps``): their helps are made from the same constants."""
    from minivit.cli import build_parser

    checked, wrong = 0, []
    for words, sub in _subcommands(build_parser()):
        for action in sub._actions:
            if action.default is None:
                continue
            for m in _STATED_DEFAULT.finditer(action.help or ""):
                stated, real = m.group(1).rstrip(".:"), action.default
                checked += 1
                same = (
                    float(stated) == float(real)
                    if isinstance(real, (int, float)) and not isinstance(real, bool)
                    else stated == str(real)
                )
                if not same:
                    wrong.append(f"{' '.join(words)} {action.option_strings}: {stated} != {real!r}")
    assert checked > 10  # the pattern does find the hand-written defaults
    assert not wrong, "\n".join(wrong)
