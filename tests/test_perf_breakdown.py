"""The perf breakdown (benchmarks/perf_breakdown.py): parsing perf's report, the categories, the
arithmetic per step, the tables, and one real run where ``perf`` can sample this process.

No timing is asserted. Budget: < 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import perf_breakdown as pb  # noqa: E402

# Rows as `perf report --stdio --sort dso,sym -F period,dso,sym` prints them (shortened names).
REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 22K of event 'cpu-clock'
#
#       Period  Shared Object                    Symbol
# ............  ...............................  ......
#
   300000000  libscipy_openblas64_-32a4b2a6.so  [.] sgemm_kernel_HASWELL
    20000000  libscipy_openblas64_-32a4b2a6.so  [.] sgemm_oncopy_HASWELL
    10000000  libtorch_cpu.so                   [.] mkl_blas_def_sgemm_scopy_right4_bdz
     9000000  libtorch_cpu.so                   [.] mkl_blas_def_sgemm_mscale
     4000000  libscipy_openblas64_-32a4b2a6.so  [.] sgemv_kernel_4x4
    12000000  libc.so.6                         [.] __memset_avx2_unaligned_erms
    18000000  _multiarray_umath.cpython-311-x86_64-linux-gnu.so  [.] simd_exp_FLOAT
     5000000  libtorch_cpu.so                   [.] Sleef_finz_expf8_u10avx2
    26000000  _multiarray_umath.cpython-311-x86_64-linux-gnu.so  [.] FLOAT_multiply_X86_V3
     3000000  _multiarray_umath.cpython-311-x86_64-linux-gnu.so  [.] float_sum_of_products_contig_contig_outstride0_two
     2000000  libtorch_cpu.so                   [.] at::native::(anonymous namespace)::_vec_softmax_lastdim<float>(float const*, float*, long, long)
     6500000  [JIT] tid 7266                    [.] 0x00007fda1f0c0249
     1000000  libscipy_openblas64_-32a4b2a6.so  [.] blas_thread_server
      700000  libgomp.so.1                      [.] 0x000000000001de62
     4000000  libpython3.11.so.1.0              [.] _PyEval_EvalFrameDefault
     3000000  libc.so.6                         [.] __memmove_avx_unaligned_erms
     1000000  libc.so.6                         [.] _int_malloc
      500000  [kernel.kallsyms]                 [k] clear_page_erms
     2000000  _multiarray_umath.cpython-311-x86_64-linux-gnu.so  [.] PyArray_NewFromDescr_int
     1500000  libtorch_cpu.so                   [.] c10::impl::OperatorEntry::getKernelForDispatchKey
      500000  libfoo.so                         [.] mystery
"""  # noqa: E501 (perf's rows, as it prints them)

EXPECTED = {
    "sgemm_kernel_HASWELL": "GEMM compute",
    "sgemm_oncopy_HASWELL": "GEMM packing",
    "mkl_blas_def_sgemm_scopy_right4_bdz": "GEMM packing",
    "mkl_blas_def_sgemm_mscale": "zeroing or scaling C",
    "sgemv_kernel_4x4": "GEMV",
    "__memset_avx2_unaligned_erms": "zeroing or scaling C",
    "simd_exp_FLOAT": "exp",
    "Sleef_finz_expf8_u10avx2": "exp",
    "FLOAT_multiply_X86_V3": "elementwise and reduction loops",
    "float_sum_of_products_contig_contig_outstride0_two": "elementwise and reduction loops",
    "at::native::(anonymous namespace)::_vec_softmax_lastdim<float>(float const*, float*, long, "
    "long)": "elementwise and reduction loops",
    "0x00007fda1f0c0249": "code generated at run time",
    "blas_thread_server": "thread pools",
    "0x000000000001de62": "thread pools",
    "_PyEval_EvalFrameDefault": "Python interpreter",
    "__memmove_avx_unaligned_erms": "copies (memcpy, memmove)",
    "_int_malloc": "malloc and free",
    "clear_page_erms": "operating system",
    "PyArray_NewFromDescr_int": "library machinery",
    "c10::impl::OperatorEntry::getKernelForDispatchKey": "library machinery",
    "mystery": "other",
}


def test_report_rows_are_parsed_with_their_libraries_and_symbols():
    rows = pb.parse_report(REPORT)
    assert len(rows) == len(EXPECTED)  # comment and header lines skipped
    assert rows[0] == (300000000, "libscipy_openblas64_-32a4b2a6.so", "sgemm_kernel_HASWELL")
    jit = [r for r in rows if r[1].startswith("[JIT]")]
    assert jit == [(6500000, "[JIT] tid 7266", "0x00007fda1f0c0249")]  # a DSO with spaces
    softmax = [r for r in rows if "softmax" in r[2]]
    assert softmax[0][2].endswith("(float const*, float*, long, long)")  # spaces in a symbol


def test_each_symbol_lands_in_its_category():
    got = {sym: pb.categorize(dso, sym) for _, dso, sym in pb.parse_report(REPORT)}
    assert got == EXPECTED


def test_exp_matches_the_exponential_only():
    for sym in (
        "simd_exp_FLOAT",
        "__expf_fma",
        "Sleef_expf8_u10",
        "expm1",
        "at::native::exp_kernel",
    ):
        assert pb._EXP.search(sym), sym
    for sym in ("expand_inplace", "PyArray_ExpandDims", "exponent_bits", "complex_"):
        assert not pb._EXP.search(sym), sym


def test_milliseconds_per_step_add_up():
    rows = pb.parse_report(REPORT)
    total_ns = sum(r[0] for r in rows)
    s = pb.summarize(rows, steps=4, top=3)
    assert s["cpu_ms_per_step"] == pytest.approx(total_ns / 1e6 / 4)
    assert sum(s["categories_ms"].values()) == pytest.approx(s["cpu_ms_per_step"])
    assert s["categories_ms"]["GEMM compute"] == pytest.approx(75.0)  # 300 ms over 4 steps
    assert s["categories_ms"]["exp"] == pytest.approx((18 + 5) / 4)
    assert [t["symbol"] for t in s["top_symbols"]] == [
        "sgemm_kernel_HASWELL",
        "FLOAT_multiply_X86_V3",
        "sgemm_oncopy_HASWELL",
    ]
    assert len(s["symbols"]) == len(rows)  # every row is at least 0.05 ms a step here
    # over 16 steps, the rows under 0.8 ms in all (0.7, 0.5, 0.5) fall below 0.05 ms a step
    assert len(pb.summarize(rows, steps=16)["symbols"]) == len(rows) - 3
    with pytest.raises(ValueError, match="steps"):
        pb.summarize(rows, steps=0)


def test_table_puts_the_two_implementations_side_by_side():
    rows = pb.parse_report(REPORT)
    m = pb.summarize(rows[:10], steps=1)
    t = pb.summarize(rows[10:], steps=1)
    m["wall_ms_median"], t["wall_ms_median"] = 400.0, 390.0
    result = {"model": "vit_tiny_patch16_224", "batch": 4, "threads": 1, "steps": 1}
    lines = pb.table(dict(result, minivit=m, torch=t), top=2)
    assert lines[0] == "| category | minivit ms | torch ms | minivit - torch ms |"
    gemm = next(x for x in lines if x.startswith("| GEMM compute |"))
    assert gemm == "| GEMM compute | 300.0 | 0.0 | +300.0 |"
    assert "| wall time per step (median) | 400.0 | 390.0 | +10.0 |" in lines
    assert "Top symbols, torch (ms of CPU time per step):" in lines
    # one implementation only (--no-torch): no difference column
    alone = pb.table(dict(result, minivit=m), top=1)
    assert alone[0] == "| category | minivit ms |"
    assert all(line.count("|") == 3 for line in alone[: len(pb.CATEGORIES) + 5])
    md = pb.markdown([dict(result, minivit=m)], {"device": "test"}, top=1)
    assert md.startswith("# Where a train step's CPU time goes") and "- GEMV:" in md


def _perf_works() -> str | None:
    try:
        pb.check_perf()
    except SystemExit as exc:
        return str(exc)
    return None


def test_a_real_run_samples_the_steps_of_minivit(tmp_path):
    """End to end, minivit only (no torch import): a ViT-Ti/16 at batch 1, two sampled steps."""
    why = _perf_works()
    if why:
        pytest.skip(why)
    lines = []
    argv = ["--no-torch", "--batch", "1", "--steps", "2", "--warmup", "1", "--freq", "499"]
    assert pb.main(argv + ["--out", str(tmp_path)], log=lines.append) == 0
    data = json.load(open(tmp_path / "perf_breakdown.json"))
    (r,) = data["results"]
    m = r["minivit"]
    assert "torch" not in r and r["batch"] == 1 and r["steps"] == 2
    assert m["cpu_ms_per_step"] > 0 and m["wall_ms_median"] > 0
    # most of a ViT step is GEMM, and minivit's process runs no generated code
    assert m["categories_ms"]["GEMM compute"] > 0.3 * m["cpu_ms_per_step"]
    assert m["categories_ms"]["code generated at run time"] == 0
    assert (tmp_path / "perf_breakdown.md").exists()


def test_bad_options_are_refused():
    for argv in (["--steps", "0"], ["--threads", "-1"], ["--gap", "-0.1"]):
        with pytest.raises(SystemExit):
            pb.main(argv)


def test_missing_perf_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(pb.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="needs Linux perf"):
        pb.check_perf()
    with pytest.raises(SystemExit, match="needs Linux perf"):
        pb.main(["--steps", "1"])  # before any child is started


def test_bench_perf_flag_maps_its_options():
    from minivit.cli import build_parser

    args = build_parser().parse_args(["bench", "--perf", "--repeats", "4", "--no-torch"])
    assert args.perf
    assert pb.argv_from_bench(args) == [
        "--models", "vit_tiny_patch16_224", "--steps", "4", "--no-torch"
    ]  # fmt: skip
    args = build_parser().parse_args(
        ["bench", "--perf", "--threads", "2", "--models", "vit_small_patch16_224", "--out", "D"]
    )
    got = pb.argv_from_bench(args)
    assert got == [
        "--models", "vit_small_patch16_224", "--threads", "2", "--batch", "8", "--out", "D"
    ]  # fmt: skip
    parsed = argparse.ArgumentParser()
    pb.add_arguments(parsed)
    ns = parsed.parse_args(got)  # the script takes what the mapping gives
    assert ns.threads == 2 and ns.batch == 8 and ns.models == ["vit_small_patch16_224"]
