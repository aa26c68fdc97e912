"""minivit/blas_kernels.py: the choice of OpenBLAS's kernel set for the benchmarks.

The decision rule, the cache, the rules of when it may act (never over the user's setting, never
after NumPy has loaded), and, where NumPy runs on OpenBLAS on x86-64, that a chosen set really is
the one NumPy then loads and that a probe measures.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from minivit import blas_kernels as bk


def _openblas_arch():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    pools = [p for p in threadpool_info() if p.get("internal_api") == "openblas"]
    return pools[0].get("architecture") if pools else None


needs_openblas_x86 = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and _openblas_arch()),
    reason="NumPy's BLAS here is not OpenBLAS on Linux x86-64",
)


def test_decide_takes_the_fastest_only_when_it_clearly_wins():
    assert bk.decide({"default": 90.0, "Haswell": 96.0, "Zen": 95.0}) == "Haswell"
    assert bk.decide({"default": 90.0, "Haswell": 92.0}) is None  # 2% is within the noise
    assert bk.decide({"default": 100.0, "Haswell": 90.0}) is None  # OpenBLAS's pick is best
    assert bk.decide({"Haswell": 90.0}) is None  # nothing to compare with
    assert bk.decide({"default": 90.0, "Haswell": 92.0}, min_gain=0.01) == "Haswell"


def test_best_kernels_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    fake = {"choice": "Zen", "detected": "SkylakeX", "gflops_1thread": {"default": 1, "Zen": 2}}
    monkeypatch.setattr(bk, "_measure", lambda: calls.append(1) or dict(fake))
    logged = []
    first = bk.best_kernels(log=logged.append)
    assert first["choice"] == "Zen" and len(calls) == 1 and len(logged) == 1
    assert bk.best_kernels()["choice"] == "Zen" and len(calls) == 1  # from the cache
    with open(tmp_path / "minivit" / "openblas-kernels.json") as f:
        assert list(json.load(f).values())[0]["choice"] == "Zen"
    bk.best_kernels(refresh=True)
    assert len(calls) == 2


def test_measure_times_each_kernel_set_once_per_round(monkeypatch):
    # "Zen" loads the Haswell kernels and "Cooperlake" the SkylakeX ones (as OpenBLAS maps them
    # on the machine this was written on); "SkylakeX" is OpenBLAS's own pick; the last set
    # cannot run here.
    loads = {None: "SkylakeX", "Haswell": "Haswell", "SkylakeX": "SkylakeX", "Zen": "Haswell",
             "Cooperlake": "SkylakeX"}  # fmt: skip
    speed = {"SkylakeX": 90.0, "Haswell": 96.0}
    calls = []

    def probe(name):
        calls.append(name)
        if name not in loads:
            return None
        return {"arch": loads[name], "gflops": speed[loads[name]] - (len(calls) == 1)}

    monkeypatch.setattr(bk, "_probe", probe)
    monkeypatch.setattr(bk, "CANDIDATES", ("Haswell", "SkylakeX", "Zen", "Cooperlake", "Nope"))
    r = bk._measure(rounds=2)
    assert r["kernels"] == {"default": "SkylakeX", "Haswell": "Haswell"}
    assert r["gflops_1thread"] == {"default": 90.0, "Haswell": 96.0}  # the best of two rounds
    assert r["choice"] == "Haswell" and r["detected"] == "SkylakeX"
    assert calls == [None, "Haswell", "SkylakeX", "Zen", "Cooperlake", "Nope", None, "Haswell"]


def test_a_failed_measurement_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(bk, "_probe", lambda name: None)  # e.g. a probe that timed out
    r = bk.best_kernels()
    assert r["choice"] is None and "failed" in r["reason"]
    assert not (tmp_path / "minivit" / "openblas-kernels.json").exists()


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv("MINIVIT_OPENBLAS_KERNELS", "Has well")
    with pytest.raises(ValueError, match="MINIVIT_OPENBLAS_KERNELS"):
        bk.apply_best_kernels()


def _apply_in_fresh_python(env_extra, tmp_path, after=""):
    """Run apply_best_kernels in an interpreter where NumPy is not loaded; -> its JSON line."""
    code = (
        "import json, os, sys\n"
        "from minivit.blas_kernels import apply_best_kernels\n"
        "r = apply_best_kernels()\n"
        "r['env'] = os.environ.get('OPENBLAS_CORETYPE')\n"
        "r['numpy_loaded_before'] = 'numpy' in sys.modules\n" + after + "print(json.dumps(r))\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), **env_extra)
    if "OPENBLAS_CORETYPE" not in env_extra:
        env.pop("OPENBLAS_CORETYPE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_users_setting_and_the_off_switch_win(tmp_path):
    r = _apply_in_fresh_python({"OPENBLAS_CORETYPE": "Haswell"}, tmp_path)
    assert r["applied"] == "Haswell" and r["why"] == "set by the user"
    r = _apply_in_fresh_python({"MINIVIT_OPENBLAS_KERNELS": "default"}, tmp_path)
    assert r["applied"] is None and r["env"] is None
    assert not r["numpy_loaded_before"]  # importing minivit.blas_kernels must not load NumPy


def test_too_late_once_numpy_is_loaded():
    # this test process has NumPy loaded: the kernel set can no longer change
    assert "numpy" in sys.modules
    r = bk.apply_best_kernels()
    assert r["applied"] is None or r["why"] == "set by the user"
    assert bk.last_applied() == r


@needs_openblas_x86
def test_a_forced_set_is_the_one_numpy_loads(tmp_path):
    after = (
        "from threadpoolctl import threadpool_info\n"
        "import numpy\n"
        "r['arch'] = [p['architecture'] for p in threadpool_info() "
        "if p['internal_api'] == 'openblas']\n"
    )
    r = _apply_in_fresh_python({"MINIVIT_OPENBLAS_KERNELS": "Haswell"}, tmp_path, after)
    assert r["applied"] == "Haswell" and r["env"] == "Haswell"
    assert "Haswell" in r["arch"]


@needs_openblas_x86
def test_a_probe_measures_the_detected_set():
    got = bk._probe(None)
    assert got is not None and got["gflops"] > 1.0
    assert got["arch"] == _openblas_arch() or os.environ.get("OPENBLAS_CORETYPE")


def _minivit(args, tmp_path, **env):
    full = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), **env)
    return subprocess.run([sys.executable, "-m", "minivit", *args], env=full,
                          capture_output=True, text=True)  # fmt: skip


def test_the_command_line_refuses_a_bad_setting_and_help_measures_nothing(tmp_path):
    bad = _minivit(["bench", "--quick"], tmp_path, MINIVIT_OPENBLAS_KERNELS="a b")
    assert bad.returncode == 2 and "MINIVIT_OPENBLAS_KERNELS" in bad.stderr
    helped = _minivit(["bench", "--help"], tmp_path)
    assert helped.returncode == 0 and "usage" in helped.stdout
    assert not (tmp_path / "minivit").exists()  # --help timed no kernel set
