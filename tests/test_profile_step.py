"""The step profile (benchmarks/profile_step.py): self times, op counts, the torch side, reports.

No timing is asserted; the counts and the bookkeeping are. Budget: < 25 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
from _requires import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import profile_step as ps  # noqa: E402

# a ViT small enough to profile in a second or two: 2 blocks, 16 patches of 8 x 8
SMALL = dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=2, num_classes=10)


class StepClock(ps.OpTimer):
    """An OpTimer on a clock that moves only when a test says so."""

    def __init__(self):
        super().__init__(gpu=False)
        self.now = 0.0

    def mark(self):
        return self.now


def test_self_time_leaves_out_the_ops_called_inside():
    clock = StepClock()

    def inner():
        clock.now += 3.0

    def outer():
        clock.now += 1.0
        wrapped_inner()
        clock.now += 4.0
        wrapped_inner()

    wrapped_inner = clock.wrap("inner", inner)
    clock.wrap("outer", outer)()
    clock.wrap("inner", inner)()  # a top-level call of the same op
    stats = clock.collect()
    assert stats == {"outer": [1, 5.0], "inner": [3, 9.0]}
    assert clock.collect() == {}  # collected records are gone


class FakeEvent:
    """A CUDA event on one stream: complete once an event recorded at or after it was waited
    for; reading an incomplete one fails, as cupy.cuda.get_elapsed_time does."""

    log: list = []

    def __init__(self, t):
        self.t, self.done = t, False
        FakeEvent.log.append(self)

    def synchronize(self):
        for ev in FakeEvent.log:
            if ev.t <= self.t:
                ev.done = True


class EventClock(ps.OpTimer):
    """An OpTimer whose marks are FakeEvents, on the GPU path of collect()."""

    def __init__(self):
        super().__init__(gpu=False)
        self.gpu, self.now = True, 0.0
        FakeEvent.log = []

    def mark(self):
        self.now += 1.0
        self._last = FakeEvent(self.now)
        return self._last

    def seconds(self, start, end):
        if not (start.done and end.done):
            raise RuntimeError("cudaErrorNotReady")
        return end.t - start.t


def test_collect_waits_for_the_last_event_recorded_not_the_last_call_started():
    # an op that calls another ends after it: waiting on the inner call's end would leave the
    # outer call's end (and the step's) unfinished when read
    clock = EventClock()
    inner = clock.wrap("inner", lambda: None)
    start = clock.mark()
    clock.wrap("outer", inner)()
    end = clock.mark()
    stats = clock.collect()
    assert stats == {"outer": [1, 2.0], "inner": [1, 1.0]}
    assert clock.seconds(start, end) == 5.0


def test_instrument_puts_the_ops_back_even_after_an_error():
    from minivit import ops

    before = ps.op_functions()
    assert {"linear_forward", "attention_backward", "layernorm_forward"} <= set(before)
    with pytest.raises(RuntimeError, match="inside"):
        with ps.instrument(ps.OpTimer(gpu=False)):
            assert ops.linear_forward is not before["linear_forward"]  # wrapped meanwhile
            raise RuntimeError("inside")
    assert ps.op_functions() == before


def test_profile_counts_every_op_call_of_a_train_step(backend):
    torch_ok = backend.name == "numpy"  # the stand-in for CuPy has no CUDA torch beside it
    if torch_ok:
        require("torch")
    p = ps.profile_model("vit_tiny_patch16_224", backend.name, 2, 2, 1, torch_ok, **SMALL)
    m = p["minivit"]
    calls = {o["name"]: o["calls"] for o in m["ops"]}
    depth = SMALL["depth"]
    assert calls["layernorm_forward"] == calls["layernorm_backward"] == 2 * depth + 1
    assert calls["attention_forward"] == calls["attention_backward"] == depth
    assert calls["linear_gelu_forward"] == calls["linear_gelu_backward"] == depth
    assert calls["linear_forward"] == calls["linear_backward"] == depth + 1  # fc2s and the head
    assert calls["patch_embed_forward"] == calls["cross_entropy_backward"] == 1
    assert all(o["ms"] >= 0 for o in m["ops"]) and m["step_ms_plain"] > 0
    assert m["between_ms"] >= -1e-6 * m["step_ms_profiled"]  # self times never exceed the step
    if torch_ok:
        names = {o["name"] for o in p["torch"]["ops"]}
        assert {"aten::mm", "aten::gelu_backward"} <= names
        assert "torch.profiler" in p["torch"]["method"]


def _args(tmp_path, models, no_torch=False):
    """profile_step's options: one step of batch 2 on NumPy, written under tmp_path."""
    return argparse.Namespace(
        backend=["numpy"],
        models=models,
        batch=2,
        steps=1,
        warmup=0,
        threads=None,
        top=4,
        tf32=False,
        no_torch=no_torch,
        out=str(tmp_path),
    )


def test_profile_command_writes_json_and_markdown(tmp_path):
    require("torch")
    paths = ps.execute(_args(tmp_path, ["vit_tiny_patch16_224"]), log=lambda *a: None)
    data = json.load(open(paths["json"]))
    (p,) = data["results"]
    assert p["label"] == "ViT-Ti/16" and p["batch"] == 2 and "torch" in p
    md = open(paths["markdown"]).read()
    assert "| # | minivit op | calls | ms | % | torch operator |" in md
    assert "(between ops)" in md and "(other ops)" in md and "step, not profiled" in md


def test_bench_profile_flag_maps_its_options():
    from minivit.cli import build_parser

    args = build_parser().parse_args(["bench", "--profile", "--repeats", "4", "--no-torch"])
    got = ps.args_from_bench(args)
    assert args.profile and got.steps == 4 and got.no_torch
    assert got.backend is None  # numpy, and cupy too where a device is present (as bench)
    assert got.models == ["vit_tiny_patch16_224"] and got.warmup == 1
    args = build_parser().parse_args(["bench", "--profile", "--backend", "numpy"])
    assert ps.args_from_bench(args).backend == ["numpy"]


def test_an_interrupted_profile_writes_the_models_that_finished(tmp_path, monkeypatch):
    real = ps.profile_model

    def profile_model(name, *args, **kwargs):
        if name == "vit_small_patch16_224":
            raise KeyboardInterrupt  # gpu_run.sh's time limit, as Ctrl-C
        return real(name, *args, **SMALL)

    monkeypatch.setattr(ps, "profile_model", profile_model)
    args = _args(tmp_path, ["vit_tiny_patch16_224", "vit_small_patch16_224"], no_torch=True)
    paths = ps.execute(args, log=lambda *a: None)
    data = json.load(open(paths["json"]))
    assert [p["model"] for p in data["results"]] == ["vit_tiny_patch16_224"]
    assert data["environment"]["interrupted"] is True
    assert data["environment"]["minivit_batch_shards"] is False
    md = open(paths["markdown"]).read()
    assert "interrupted" in md and "1 profiled steps per implementation" in md
