"""The benchmark harness (benchmarks/): timing logic, report writing, one tiny run end to end.

No timing is asserted (speed lives in the benchmarks, never in tests). Budget: < 20 s.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from _requires import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import harness, report  # noqa: E402


class FakeClock:
    """A clock that advances by the given durations, one per call of the timed function."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_host_warms_up_untimed_then_takes_the_median():
    clock = FakeClock()
    durations = iter([100.0, 100.0, 5.0, 1.0, 3.0, 2.0, 4.0])  # 2 warm-ups, then 5 runs
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(durations)

    t = harness.time_host(fn, repeats=5, warmup=2, clock=clock)
    assert len(calls) == 7
    assert t.times_s == [5.0, 1.0, 3.0, 2.0, 4.0]  # the slow warm-ups are not counted
    assert t.median_s == 3.0 and t.min_s == 1.0 and t.mean_s == 3.0
    assert t.repeats == 5 and t.warmup == 2


def test_time_host_waits_for_the_sync_inside_the_timed_region():
    """Asynchronous work is only done once ``sync`` returns: its time is part of the run's (a
    clock read before the sync would time the launch alone)."""
    clock = FakeClock()

    def fn():
        clock.now += 1.0  # the launch

    def sync():
        clock.now += 10.0  # the work it launched

    t = harness.time_host(fn, repeats=3, warmup=1, sync=sync, clock=clock)
    assert t.times_s == [11.0, 11.0, 11.0] and t.method == "perf_counter+sync"


def test_summarize_even_count_and_errors():
    t = harness.summarize([4.0, 1.0, 3.0, 2.0], warmup=0, method="x")
    assert t.median_s == 2.5
    with pytest.raises(ValueError):
        harness.summarize([], 0, "x")
    with pytest.raises(ValueError):
        harness.time_host(lambda: None, repeats=0, warmup=0)


def test_time_interleaved_alternates_cases_after_their_warmups():
    clock = FakeClock()
    order = []

    def make(name, dt):
        def fn():
            order.append(name)
            clock.now += dt

        return fn

    cases = {"a": (make("a", 1.0), "minivit", "cpu"), "b": (make("b", 3.0), "torch", "cpu")}
    out = harness.time_interleaved(cases, repeats=3, warmup=1, clock=clock)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert out["a"].median_s == 1.0 and out["b"].median_s == 3.0
    assert out["a"].repeats == 3 and "interleaved" in out["a"].method


def test_the_sgemm_ceiling_is_the_fastest_run_not_the_median(monkeypatch):
    """A busy moment slows some runs of the ceiling's GEMM; the ceiling is the device's best."""
    times = [0.5, 0.25, 1.0, 0.5, 0.5]

    def fake_time(fn, impl, device, repeats, warmup):
        assert repeats == 9  # the default
        return harness.summarize(times, warmup, "fake")

    monkeypatch.setattr(harness, "time_callable", fake_time)
    c = harness.sgemm_ceiling("numpy", n=8)
    assert c["seconds"] == 0.25 and c["flops_per_s"] == 2 * 8**3 / 0.25
    assert c["median_flops_per_s"] == 2 * 8**3 / 0.5


class FakeTorchCuda:
    """torch.cuda with events that read a clock in ms: a run's elapsed_time is the fn's ms."""

    def __init__(self, clock):
        clock_ = clock

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.t = None

            def record(self):
                self.t = clock_.now

            def synchronize(self):
                pass

            def elapsed_time(self, end):  # milliseconds, as torch's
                return end.t - self.t

        self.Event = Event
        self.synced = 0

    def synchronize(self):
        self.synced += 1


def test_cuda_event_timings_are_converted_from_ms_to_seconds(monkeypatch):
    """torch's CUDA events and CuPy's get_elapsed_time give milliseconds, cupyx.profiler's
    gpu_times seconds: every GPU path reports seconds, from the GPU (not the host) times. Fake
    modules stand in for torch.cuda and CuPy, so this runs without a GPU."""
    import types

    clock = FakeClock()  # milliseconds here
    durations = iter([50.0, 2.0, 6.0, 4.0] * 3)
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(durations)

    fake_cuda = FakeTorchCuda(clock)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    t = harness.time_callable(fn, "torch", "cuda", repeats=3, warmup=1)
    assert t.times_s == pytest.approx([0.002, 0.006, 0.004]) and t.median_s == pytest.approx(0.004)
    assert t.method == "torch.cuda.Event" and fake_cuda.synced >= 2
    cases = {"t": (fn, "torch", "cuda")}
    t = harness.time_interleaved(cases, repeats=3, warmup=1, clock=lambda: 1e9)["t"]
    assert t.times_s == pytest.approx([0.002, 0.006, 0.004]) and t.method.startswith("CUDA")

    # CuPy: cupyx.profiler.benchmark's GPU times (seconds), not its host times
    class Result:
        gpu_times = [[0.003, 0.001, 0.002]]  # device 0, one per repeat
        cpu_times = [0.5, 0.5, 0.5]

    def benchmark(f, n_repeat, n_warmup):
        assert n_repeat == 3 and n_warmup == 0  # the warm-ups ran before, untimed
        return Result()

    stream = types.SimpleNamespace(synchronize=lambda: None)
    cupy_cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cupy_cuda))
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cupyx.profiler", types.SimpleNamespace(benchmark=benchmark))
    calls.clear()
    t = harness.time_callable(lambda: calls.append(1), "minivit", "cuda", repeats=3, warmup=2)
    assert len(calls) == 2 and t.times_s == [0.003, 0.001, 0.002] and t.median_s == 0.002


def test_result_row_rates_the_median_against_its_ceiling():
    """GFLOP/s and the fraction of sgemm come from the median run (as the ratios do), not the
    fastest; the peak memory and its method are kept as measured."""
    t = harness.summarize([1.0, 2.0, 6.0], warmup=1, method="m")  # median 2, min 1, mean 3
    row = harness.result_row({"name": "x"}, t, 4e9, 4e9, (123, "tracemalloc"))
    assert row["median_ms"] == 2000.0 and row["min_ms"] == 1000.0 and row["mean_ms"] == 3000.0
    assert row["gflops_per_s"] == 2.0 and row["frac_of_sgemm"] == 0.5
    assert row["peak_mem_bytes"] == 123 and row["mem_method"] == "tracemalloc"
    assert "frac_of_sgemm" not in harness.result_row({}, t, 4e9, None, None)


def test_each_row_is_rated_against_its_own_implementations_ceiling():
    """A torch row's % of sgemm is against torch's GEMM on its device, a minivit row's against
    its backend's: the key names the implementation, not the row's backend label."""
    m = dict(impl="minivit", backend="numpy", device="cpu")
    t = dict(impl="torch", backend="torch-cpu", device="cpu")
    g = dict(impl="torch", backend="torch-cuda", device="cuda")
    assert harness.ceiling_key(m) == ("numpy", "cpu")
    assert harness.ceiling_key(t) == ("torch", "cpu")
    assert harness.ceiling_key(g) == ("torch", "cuda")


def test_peak_memory_on_cpu_sees_a_numpy_buffer():
    import numpy as np

    peak, method = harness.peak_memory(lambda: np.ones(1 << 20), "minivit", "cpu")
    assert method == "tracemalloc"
    assert peak >= 8 * (1 << 20)


def test_peak_memory_counts_the_shard_a_worker_process_would_hold(keep_parallel_settings):
    """Under MINIVIT_SHARD=processes tracemalloc sees only this process, so a worker's shard (half
    a batch's activations on 2 threads) would go uncounted; the memory run puts it on a thread."""
    import numpy as np

    import minivit
    from minivit import _parallel
    from minivit.models import shard_workers, sharding

    if not shard_workers.available():
        pytest.skip("needs os.fork")
    _parallel.set_num_threads(2)
    cfg = dict(img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5, dtype="float64")
    model = minivit.create_model("vit_tiny_patch16_224", **cfg)
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64))

    def step():
        model.forward(x, train=True)
        model.backward(np.ones((8, 5)))

    with sharding.using("threads"):
        step()  # warm-up: workers, caches
        ref, ref_method = harness.peak_memory(step, "minivit", "cpu")
    with sharding.using("processes"):
        step()
        got, method = harness.peak_memory(step, "minivit", "cpu")
        assert sharding.mode() == "processes"  # put back after the memory run
    assert ref_method == "tracemalloc"
    assert method == "tracemalloc (batch shards on threads)"
    assert 0.8 * ref < got < 1.25 * ref, (got, ref)


def _rows():
    base = dict(group="op", name="gelu", device="cpu", batch=8, width=192, repeats=3)
    rows = []
    for tokens, m, t in ((50, 1.0, 2.0), (197, 4.0, 2.0)):
        shape = f"({tokens})"
        for phase in ("forward", "backward"):
            rows.append(
                dict(
                    base,
                    phase=phase,
                    tokens=tokens,
                    shape=shape,
                    impl="minivit",
                    backend="numpy",
                    median_ms=m,
                    peak_mem_bytes=2**20,
                    mem_method="tracemalloc",
                )
            )
            rows.append(
                dict(
                    base,
                    phase=phase,
                    tokens=tokens,
                    shape=shape,
                    impl="torch",
                    backend="torch-cpu",
                    median_ms=t,
                )
            )
            rows.append(
                dict(
                    base,
                    phase=phase,
                    tokens=tokens,
                    shape=shape,
                    impl="minivit",
                    backend="cupy",
                    device="cuda",
                    median_ms=m / 10,
                )
            )
    rows.append(
        dict(
            group="model",
            name="vit_tiny_patch16_224",
            label="ViT-Ti/16",
            phase="train_step",
            shape="B=8",
            device="cpu",
            impl="minivit",
            backend="numpy",
            batch=8,
            median_ms=900.0,
            gflops_per_s=50.0,
        )
    )
    rows.append(
        dict(
            group="model",
            name="vit_tiny_patch16_224",
            label="ViT-Ti/16",
            phase="train_step",
            shape="B=8",
            device="cpu",
            impl="torch",
            backend="torch-cpu",
            batch=8,
            median_ms=1000.0,
        )
    )
    rows.append(
        dict(
            group="sinkhorn",
            name="sinkhorn",
            backend="numpy",
            impl="minivit",
            dtype="float32",
            batch=64,
            n=40,
            m=145,
            n_iters=50,
            median_ms=10.0,
            speedup_vs_pot_loop=12.0,
        )
    )
    return rows


def test_report_pairs_ratios_speedups_markdown_and_plots(tmp_path):
    rows = _rows()
    ps = {(p["name"], p["phase"], p["shape"], p["device"]): p for p in report.pairs(rows)}
    assert ps[("gelu", "forward", "(50)", "cpu")]["ratio"] == 0.5
    assert ps[("gelu", "forward", "(197)", "cpu")]["ratio"] == 2.0
    assert ps[("gelu", "forward", "(50)", "cuda")]["ratio"] is None  # no torch-cuda row
    assert ps[("vit_tiny_patch16_224", "train_step", "B=8", "cpu")]["ratio"] == 0.9
    sp = report.gpu_speedups(rows)
    assert len(sp) == 4 and all(abs(s["speedup"] - 10.0) < 1e-12 for s in sp)
    env = {"cpu": "test cpu", "cpu_count": 2, "repeats": 3, "warmup": 1, "tf32": False}
    paths = report.write_all(rows, env, str(tmp_path))
    md = open(paths["markdown"]).read()
    assert "| ViT-Ti/16 | 8 | train_step | numpy | 900.0 | 1000.0 | **0.900** |" in md
    assert "12.0x" in md and "GPU over CPU" in md and "test cpu" in md
    data = json.load(open(paths["json"]))
    assert data["results"] == json.loads(json.dumps(rows)) and data["environment"] == env
    require("matplotlib")
    names = sorted(os.path.basename(p) for p in paths["plots"])
    assert names == [
        "ops_time_vs_tokens.png",
        "ratio_minivit_over_torch.png",
        "speedup_gpu_over_cpu.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in paths["plots"])


def test_report_merges_result_files(tmp_path):
    rows = _rows()
    a = report.write_json(rows[:3], {"cpu": "a"}, str(tmp_path / "a.json"))
    b = report.write_json(rows[3:], {"cpu": "b", "cpu_count": 16}, str(tmp_path / "b.json"))
    merged, env = report.merge([a, b, str(tmp_path / "missing.json")])
    assert len(merged) == len(rows) and env["cpu"] == "a"
    assert env["merged"][0]["cpu"] == "b"
    # a merged run that was cut off by its time limit still says so in the merged report
    c = report.write_json(rows[3:], {"cpu": "c", "interrupted": True}, str(tmp_path / "c.json"))
    merged, env = report.merge([a, c])
    assert not env.get("interrupted") and env["merged"][0]["interrupted"] is True
    assert "interrupted" in report.markdown(merged, env)


def test_merging_two_runs_of_one_device_is_refused(tmp_path, capsys):
    """Two files that measured the same case on the same device would pair one run's minivit
    time with the other's torch time (or one would hide the other): refused, naming both."""
    rows = _rows()
    a = report.write_json(rows, {"cpu": "a"}, str(tmp_path / "a.json"))
    b = report.write_json(rows[:2], {"cpu": "a"}, str(tmp_path / "b.json"))
    with pytest.raises(ValueError, match=r"a\.json and .*b\.json both measured gelu forward"):
        report.merge([a, b])
    assert report.main([a, b]) == 2
    assert "merge runs made on different devices" in capsys.readouterr().err


def test_the_model_table_shows_minivits_share_of_sgemm_and_each_sides_memory():
    """A model row's GFLOP/s and % of sgemm are minivit's (the torch row has its own, unused
    here), and each peak-memory column is its own implementation's."""
    case = dict(group="model", name="vit_tiny_patch16_224", label="ViT-Ti/16", phase="forward",
                shape="B=8", device="cpu", batch=8)  # fmt: skip
    rows = [
        dict(case, impl="minivit", backend="numpy", median_ms=30.0, gflops_per_s=50.0,
             frac_of_sgemm=0.25, peak_mem_bytes=2 * 2**20, mem_method="tracemalloc"),
        dict(case, impl="torch", backend="torch-cpu", median_ms=20.0, gflops_per_s=75.0,
             frac_of_sgemm=0.9, peak_mem_bytes=3 * 2**20, mem_method="RSS"),
    ]  # fmt: skip
    (p,) = report.pairs(rows)
    assert p["gflops"] == 50.0 and p["frac"] == 0.25 and p["ratio"] == 1.5
    md = report.markdown(rows, {"cpu": "c"})
    assert "| 30.0 | 20.0 | **1.500** | 50 | 25% | 2.0 | 3.0 |" in md


def test_a_gpu_run_merges_with_its_host_cpus_run(tmp_path):
    """The same case measured on two devices is what merging is for: accepted, and each device
    keeps its own minivit / torch pair (never one device's time over the other's)."""
    rows = []
    for dev, m, t in (("cpu", 4.0, 2.0), ("cuda", 1.0, 4.0)):
        for impl, ms in (("minivit", m), ("torch", t)):
            rows.append(dict(group="op", name="gelu", phase="forward", shape="(50)", device=dev,
                             impl=impl, backend=impl, median_ms=ms))  # fmt: skip
    a = report.write_json(rows[:2], {"cpu": "host"}, str(tmp_path / "cpu.json"))
    b = report.write_json(rows[2:], {"gpu": "gpu"}, str(tmp_path / "gpu.json"))
    merged, env = report.merge([a, b])
    assert len(merged) == 4 and env["cpu"] == "host"
    ratios = {p["device"]: p["ratio"] for p in report.pairs(merged)}
    assert ratios == {"cpu": 2.0, "cuda": 0.25}


def test_a_merged_report_states_each_runs_settings():
    env = {"cpu": "host", "repeats": 7, "warmup": 2,
           "merged": [{"cpu": "other", "cpu_count": 16, "torch_threads": 16, "repeats": 3,
                       "warmup": 1, "quick": True, "sgemm": {"numpy (n=1024)": 1.086e11},
                       "error": "RuntimeError: boom"}]}  # fmt: skip
    text = "\n".join(report.environment_lines(env))
    assert "median of 7 repeats" in text
    assert (
        "warm-up 1, median of 3 repeats, quick; sgemm ceilings numpy (n=1024) 109 GFLOP/s" in text
    )
    assert "**stopped by an error**: RuntimeError: boom" in text


def test_model_flops_are_torchs_own_count():
    """The GEMM FLOPs of each model's forward and train step equal what torch's FlopCounterMode
    counts on the twin (one block each, to stay quick). The train step is not 3 forwards: no
    image gradient is computed, so the patch embedding's input gradient is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import models

    for name in ("vit_tiny_patch16_224", "vilt_b32"):
        built = models.build(name, "numpy", 1, True, depth=1)
        for phase in ("forward", "train_step"):
            with FlopCounterMode(display=False) as counter:
                built[f"torch_{phase}"]()
            assert built["flops"][phase] == counter.get_total_flops(), (name, phase)
        assert built["flops"]["train_step"] < 3 * built["flops"]["forward"]


def test_the_torch_twin_computes_the_models_function():
    """The twin is loaded with the model's own weights and must give its outputs: a twin that
    left out a term (ViLT's text token type, say) would time another function. Small models."""
    from benchmarks import models

    require("torch")
    small = dict(depth=1, embed_dim=32, num_heads=2)
    for name in ("vit_tiny_patch16_224", "vilt_b32"):
        built = models.build(name, "numpy", 2, True, **small)
        assert built["twin_max_abs_diff"] < 1e-4, name


def test_a_model_phase_is_timed_with_the_configured_gap_and_its_own_ceilings(monkeypatch):
    """One model phase gives a minivit and a torch row: the idle gap is the configuration's
    (BenchConfig.gap_s; models.GAP_S when None), and each row is rated against the ceiling
    of its own implementation, from the median, with the peak memory of its own function."""
    from benchmarks import models

    seen = {}

    def timed(cases, repeats, warmup, gap_s=0.0):
        seen.setdefault("gap", []).append(gap_s)
        return {k: harness.summarize([1.0, 2.0, 9.0], warmup, "fake") for k in cases}

    monkeypatch.setattr(harness, "time_interleaved", timed)
    peaks = {"m-fn": 1, "t-fn": 2}  # the functions stand in for the two sides' phases
    monkeypatch.setattr(harness, "peak_memory", lambda fn, impl, dev: (peaks[fn], impl))
    built = {"forward": "m-fn", "torch_forward": "t-fn", "flops": {"forward": 4e9}}
    ceilings = {("numpy", "cpu"): 4e9, ("torch", "cpu"): 8e9}
    for gap in (0.0, None):
        cfg = harness.BenchConfig(repeats=3, warmup=1, gap_s=gap)
        rows = models._time_phase(cfg, "vit_tiny_patch16_224", "numpy", "cpu", 8, built,
                                  "forward", ceilings, lambda *a: None)  # fmt: skip
    assert seen["gap"] == [0.0, models.GAP_S]
    by = {r["impl"]: r for r in rows}
    assert by["minivit"]["backend"] == "numpy" and by["torch"]["backend"] == "torch-cpu"
    assert by["minivit"]["frac_of_sgemm"] == 0.5 and by["torch"]["frac_of_sgemm"] == 0.25
    assert by["minivit"]["peak_mem_bytes"] == 1 and by["torch"]["peak_mem_bytes"] == 2
    assert by["torch"]["mem_method"] == "torch"


def test_a_model_phase_that_fails_is_a_row_of_the_report(monkeypatch):
    """A model phase that raises (out of memory, say) is logged and kept as a failure row, so
    the report says what is missing; the other phase still runs."""
    from benchmarks import models

    def phase(cfg, name, backend, device, B, built, phase, ceilings, log):
        if phase == "forward":
            raise MemoryError("simulated")
        return [dict(group="model", name=name, phase=phase)]

    monkeypatch.setattr(models, "build", lambda *a, **k: {})
    monkeypatch.setattr(models, "_time_phase", phase)
    logged = []
    cfg = harness.BenchConfig(models=["vit_tiny_patch16_224"], torch=False)
    rows = models.run(cfg, log=logged.append)
    assert [(r["group"], r["phase"]) for r in rows] == [("failed", "forward"),
                                                        ("model", "train_step")]  # fmt: skip
    assert rows[0]["backend"] == "numpy" and rows[0]["error"] == "MemoryError: simulated"
    assert any("forward" in m and "simulated" in m for m in logged)


def test_the_default_folder_is_a_new_one_in_runs(tmp_path, monkeypatch):
    """Without --out a run writes to a new runs/bench-<device>-<time>/ folder under the working
    directory, never into benchmarks/results/ (whose kept figures it would overwrite)."""
    from benchmarks import run

    monkeypatch.chdir(tmp_path)
    paths = run.execute(_tiny_config(["layernorm"]), None, log=lambda *a: None)
    folder = os.path.dirname(paths["json"])
    assert os.path.dirname(folder) == "runs" and os.path.basename(folder).startswith("bench-cpu-")
    assert os.path.isfile(tmp_path / paths["markdown"])


def test_the_ceiling_is_the_best_of_a_first_and_a_last_measurement(tmp_path, monkeypatch):
    """A ceiling measured while the machine was busy gave fractions above 100%: it is measured
    again at the end, the better of the two kept, and every fraction recomputed from it."""
    from benchmarks import run

    real, calls = harness.sgemm_ceiling, []

    def first_slow(backend, impl, n=1024):
        c = dict(real(backend, impl, n=n))
        calls.append(1)
        if len(calls) == 1:  # the first measurement, taken on a busy machine
            c["flops_per_s"] = c["median_flops_per_s"] = 1e3
        return c

    monkeypatch.setattr(harness, "sgemm_ceiling", first_slow)
    paths = run.execute(_tiny_config(["linear"]), str(tmp_path), log=lambda *a: None)
    rows, env = report.load_json(paths["json"])
    (first,) = env["sgemm_first"].values()
    (best,) = env["sgemm"].values()
    assert first == 1e3 and best > 1e6
    assert all(r["frac_of_sgemm"] == r["gflops_per_s"] * 1e9 / best for r in rows)


def test_tiny_benchmark_end_to_end(tmp_path, backend):
    # On cupy: CUDA-event timing, the memory pool's peak (on a GPU, or on the CPU stand-in).
    from benchmarks import run

    cfg = harness.BenchConfig(
        backends=[backend.name],
        repeats=2,
        warmup=1,
        quick=True,
        ops=["layernorm"],
        models=[],
        threads=None,
        torch=False,
        sgemm_n=128,
    )
    paths = run.execute(cfg, str(tmp_path), log=lambda *a: None)
    rows, env = report.load_json(paths["json"])
    assert {r["phase"] for r in rows} == {"forward", "backward"}
    assert {r["impl"] for r in rows} >= {"minivit"}
    assert all(r["median_ms"] > 0 and r["repeats"] == 2 for r in rows)
    assert {r["backend"] for r in rows} == {backend.name}
    assert env["sgemm"] and env["repeats"] == 2
    assert "layernorm" in open(paths["markdown"]).read()


def test_a_run_without_threadpoolctl_still_reports(tmp_path, monkeypatch, keep_parallel_settings):
    """threadpoolctl is a dependency, but benchmarks/gpu_run.sh installs minivit with --no-deps
    on an image that may lack it: the run limits no BLAS threads and says so, and goes on."""
    from benchmarks import run

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import raises ImportError
    cfg = harness.BenchConfig(backends=["numpy"], repeats=1, warmup=0, quick=True,
                              ops=["layernorm"], models=[], threads=1, torch=False, memory=False,
                              sgemm_n=64)  # fmt: skip
    paths = run.execute(cfg, str(tmp_path), log=lambda *a: None)
    rows, env = report.load_json(paths["json"])
    assert rows and env["threadpools"] == "threadpoolctl not installed"


def _tiny_config(ops_):
    return harness.BenchConfig(
        backends=["numpy"],
        repeats=1,
        warmup=0,
        quick=True,
        ops=ops_,
        models=[],
        threads=None,
        torch=False,
        memory=False,
        sgemm_n=64,
    )


def test_a_failing_case_is_logged_and_the_others_still_run(tmp_path, monkeypatch):
    # a device run is one shot: one op that raises must not cost the rest of the figures
    from benchmarks import ops, run

    real = ops.minivit_case

    def case(op, host, backend):
        if op == "gelu":
            raise RuntimeError("out of memory (simulated)")
        return real(op, host, backend)

    monkeypatch.setattr(ops, "minivit_case", case)
    logged = []
    paths = run.execute(_tiny_config(["gelu", "layernorm"]), str(tmp_path), log=logged.append)
    rows, env = report.load_json(paths["json"])
    timed = [r for r in rows if r["group"] != "failed"]
    assert {r["name"] for r in timed} == {"layernorm"} and not env.get("interrupted")
    failed = [m for m in logged if "failed" in m]
    assert failed and all("gelu" in m and "simulated" in m for m in failed)
    # the report says what is missing and why, not only the log
    lost = [r for r in rows if r["group"] == "failed"]
    assert lost and {r["name"] for r in lost} == {"gelu"}
    assert "RuntimeError: out of memory (simulated)" in lost[0]["error"]
    text = open(paths["markdown"]).read()
    assert "## Cases that failed (not timed)" in text and "- gelu " in text


def test_an_op_that_ignores_an_axis_runs_once_per_shape(monkeypatch):
    # the quick sweep's two sizes differ only in width, which cross_entropy does not use
    from benchmarks import ops

    timed = []
    monkeypatch.setattr(ops, "_time_op", lambda cfg, op, size, *rest: timed.append((op, size)))
    ops.run(_tiny_config(["cross_entropy", "layernorm"]), log=lambda *a: None)
    assert [size for op, size in timed if op == "cross_entropy"] == [ops.CENTRE]
    assert [op for op, _ in timed].count("layernorm") == len(ops.sizes(True, False)) == 2


def test_an_interrupted_run_writes_what_it_measured(tmp_path, monkeypatch):
    # gpu_run.sh stops each step with SIGINT at its time limit: the report keeps the cases
    # that finished and says it was interrupted
    from benchmarks import run

    real, calls = harness.time_interleaved, []

    def timed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # layernorm's forward and backward done, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "time_interleaved", timed)
    with pytest.raises(KeyboardInterrupt):  # raised again once the report is written
        run.execute(_tiny_config(["layernorm", "gelu"]), str(tmp_path), log=lambda *a: None)
    paths = {"json": str(tmp_path / "results.json"), "markdown": str(tmp_path / "results.md")}
    rows, env = report.load_json(paths["json"])
    assert env["interrupted"] is True
    assert {(r["name"], r["phase"]) for r in rows} == {
        ("layernorm", "forward"),
        ("layernorm", "backward"),
    }
    assert "interrupted" in open(paths["markdown"]).read()


def test_an_error_escaping_a_group_still_writes_the_report_then_raises(tmp_path, monkeypatch):
    from benchmarks import ops, run

    def broken(*args, **kwargs):
        raise RuntimeError("a bug outside any one case")

    monkeypatch.setattr(ops, "run_sinkhorn", broken)
    with pytest.raises(RuntimeError, match="outside any one case"):
        run.execute(_tiny_config(["layernorm", "sinkhorn"]), str(tmp_path), log=lambda *a: None)
    rows, env = report.load_json(str(tmp_path / "results.json"))
    assert {r["name"] for r in rows} == {"layernorm"} and "outside any one case" in env["error"]


def test_minivit_bench_command_parses_its_options():
    from minivit.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "--quick", "--ops", "linear", "gelu", "--models", "--repeats", "4"]
    )
    assert args.quick and args.ops == ["linear", "gelu"] and args.models == []
    assert args.repeats == 4 and args.backend is None
    from benchmarks.run import config_from_args

    cfg = config_from_args(args)
    assert cfg.backends[0] == "numpy" and cfg.repeats == 4 and cfg.warmup == 1


def test_sinkhorn_benchmark_runs_beside_pot(backend):
    # the batched op against a loop of POT calls on the same arrays (POT takes cupy arrays too)
    from benchmarks import bench_sinkhorn

    require("ot")  # (the benchmark leaves the POT loop out without it)

    rows = bench_sinkhorn.run(quick=True, backends=[backend.name])
    impls = {(r["impl"], r["dtype"]) for r in rows}
    assert {("minivit", "float32"), ("minivit", "float64"), ("POT loop", "float64")} <= impls
    assert all(r["backend"] == backend.name and r["median_s"] > 0 for r in rows)


def test_minivit_bench_dispatches_to_the_timed_run_the_profile_or_perf(monkeypatch):
    """One dispatcher (benchmarks/run.py's) serves `minivit bench` and the script alike."""
    from benchmarks import perf_breakdown, profile_step, run
    from minivit import bench
    from minivit.cli import build_parser

    called = []
    monkeypatch.setattr(run, "execute", lambda cfg, out: called.append(("timed", cfg.repeats)))
    monkeypatch.setattr(profile_step, "execute", lambda a: called.append(("profile", a.steps)))
    monkeypatch.setattr(perf_breakdown, "main", lambda argv: called.append(("perf", argv)) or 0)
    for flags in ([], ["--profile"], ["--perf"]):
        args = build_parser().parse_args(["bench", "--repeats", "2", *flags])
        assert bench.run(args) == 0
    assert called == [
        ("timed", 2),
        ("profile", 2),
        ("perf", ["--models", "vit_tiny_patch16_224", "--steps", "2"]),
    ]


def test_minivit_bench_takes_its_backend_from_the_environment(monkeypatch):
    """Without --backend, $MINIVIT_BACKEND picks the backend (any case, as for every command);
    a backend that cannot run here is refused before the benchmark is dispatched."""
    from benchmarks import run
    from minivit import bench
    from minivit.backend import BackendUnavailable
    from minivit.cli import build_parser

    seen = []
    monkeypatch.setattr(run, "dispatch", lambda args: seen.append(args.backend) or 0)
    monkeypatch.setenv("MINIVIT_BACKEND", "NumPy")
    assert bench.run(build_parser().parse_args(["bench"])) == 0
    monkeypatch.delenv("MINIVIT_BACKEND")
    assert bench.run(build_parser().parse_args(["bench"])) == 0
    assert seen == ["numpy", None]
    if not harness.impl_available("cupy"):
        with pytest.raises(BackendUnavailable):
            bench.run(build_parser().parse_args(["bench", "--backend", "cupy"]))
        assert len(seen) == 2


def test_gil_cost_times_one_thread_and_shared_calls(capsys):
    from benchmarks import gil_cost

    rows = gil_cost.measure([600, 4096], calls=200, threads=2, repeats=1)
    assert [r["size"] for r in rows] == [600, 4096]
    for r in rows:
        assert r["one_thread_us"] > 0 and r["shared_us"] > 0
        assert r["extra_us"] == pytest.approx(r["shared_us"] - r["one_thread_us"])
    assert gil_cost.main(["--sizes", "700", "--calls", "50", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| float32 elements") and lines[2].startswith("| 700 |")
    with pytest.raises(SystemExit):
        gil_cost.main(["--threads", "1"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="shard_contention.py forks a worker")
def test_shard_contention_times_threads_processes_and_one_half(capsys):
    from benchmarks import shard_contention

    tiny = dict(img_size=32, depth=1, embed_dim=32, num_heads=2, num_classes=5)
    times, diff = shard_contention.measure(batch=4, repeats=2, gap=0.0, log=lambda *a: None,
                                           **tiny)  # fmt: skip
    assert list(times) == list(shard_contention.WAYS)
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())
    assert diff < 1e-5  # the worker's gradients are the threads' sums, to float32 rounding
    text = shard_contention.table(times, diff, "tiny", 4)
    assert "| processes |" in text and "max abs difference" in text
    with pytest.raises(ValueError, match="even"):
        shard_contention.measure(batch=3, **tiny)
