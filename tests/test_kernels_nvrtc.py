"""minivit's CUDA kernel text compiles for the H100/H200 (sm_90) under NVRTC, the compiler CuPy
uses, with CuPy's own options, and no kernel spills registers to local memory.

No GPU is needed: NVRTC makes a cubin without a device (``tests/_nvrtc.py``). This catches a
kernel that the emulator runs (g++ compiles it there) but that CuPy would fail to compile on the
device, where every device minute counts. The row kernels are compiled exactly as
``kernels_cupy`` hands them to ``cupy.RawKernel``; an ElementwiseKernel's operation is compiled
inside the emulator's wrapper (``_cuda_emu.ElementwiseKernel.cuda_source``), as CuPy compiles
it inside a loop of its own generated code. Skipped, with the reason, where libnvrtc is missing
(the ``nvidia-cuda-nvrtc-cu12`` test extra installs it on Linux x86-64).
"""

from __future__ import annotations

import os
import platform
import sys

import _cuda_emu as emu
import _nvrtc
import numpy as np
import pytest
from _requires import skipping_missing

from minivit import kernels_cupy

needs_nvrtc = pytest.mark.skipif(_nvrtc.LIB is None, reason=f"NVRTC: {_nvrtc.MISSING}")

DTYPES = [np.float32, np.float64]


# every NVRTC release found: CUDA 13's is the device image's (cupy-cuda13x), 12's a
# cupy-cuda12x user's; both are test extras
RELEASES = sorted(_nvrtc.LIBS) or ["none"]


def _compiled(source, name, dtype, release):
    out = _nvrtc.compile_cuda(
        source, arch="sm_90", filename=f"{name}_{np.dtype(dtype)}.cu", release=release
    )
    assert out.cubin[:4] == b"\x7fELF", "NVRTC returned no cubin"
    return out


@needs_nvrtc
@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(kernels_cupy.RAW))
def test_row_kernel_compiles_for_sm90_without_spills(name, dtype, release):
    out = _compiled(kernels_cupy.raw_source(name, np.dtype(dtype)), name, dtype, release)
    k = out.kernels[name]  # the entry point CuPy's RawKernel looks up (extern "C", unmangled)
    assert k.registers > 0, out.log
    assert k.spill_store_bytes == 0 and k.spill_load_bytes == 0, out.log
    assert k.stack_bytes == 0, out.log  # no local arrays: everything lives in registers


@needs_nvrtc
@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(kernels_cupy.ELEMENTWISE))
def test_elementwise_operation_compiles_for_sm90_without_spills(name, dtype, release):
    kernel = emu.ElementwiseKernel(*kernels_cupy.ELEMENTWISE[name], f"minivit_{name}")
    out = _compiled(kernel.cuda_source(np.dtype(dtype)), name, dtype, release)
    (k,) = out.kernels.values()
    assert k.spill_store_bytes == 0 and k.spill_load_bytes == 0, out.log
    assert k.stack_bytes == 0, out.log


def test_the_test_extras_two_nvrtc_releases_are_both_found():
    """On Linux x86-64 the test extra installs CUDA 12's and CUDA 13's NVRTC. One missing there
    fails, as a missing oracle does: its compile checks would otherwise be skipped or never
    drawn, and the run would pass as if they had run (skipped in the device run, and when
    MINIVIT_NVRTC picks one library alone)."""
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("the NVRTC wheels are a test extra on Linux x86-64 only")
    if os.environ.get("MINIVIT_NVRTC"):
        pytest.skip("MINIVIT_NVRTC picks one NVRTC library alone")
    missing = sorted({"12", "13"} - {release.split(".")[0] for release in _nvrtc.LIBS})
    if missing and skipping_missing():
        pytest.skip(f"NVRTC of CUDA {missing} is not installed (the device run)")
    assert not missing, (
        f"no NVRTC of CUDA {', '.join(missing)} (found {sorted(_nvrtc.LIBS)}); "
        f"pip install -e '.[test]' installs both. {_nvrtc.MISSING}"
    )


@needs_nvrtc
def test_a_kernel_that_cannot_compile_is_reported_with_the_compilers_message():
    # the check can fail: an undeclared name is NVRTC's error, with its log, not a pass
    bad = 'extern "C" __global__ void k(float* y) { y[0] = undeclared_name; }'
    with pytest.raises(_nvrtc.NvrtcError, match="undeclared_name"):
        _nvrtc.compile_cuda(bad)


@needs_nvrtc
def test_ptxas_report_sees_a_stack_frame():
    # an array too large for registers, indexed at run time, lives in local memory: the parser
    # must read that from ptxas's report (a kernel above passes only if its frame is 0 bytes)
    src = (
        'extern "C" __global__ void k(float* y, int i) {\n'
        "    float a[1024];\n"
        "    a[0] = y[0];\n"
        "    for (int j = 1; j < 1024; ++j) a[j] = a[j - 1] * y[j] + 1.0f;  // a running product\n"
        "    y[threadIdx.x] = a[i & 1023];\n"
        "}\n"
    )
    k = _nvrtc.compile_cuda(src).kernels["k"]
    assert k.stack_bytes >= 1024 * 4 and k.registers > 0


def test_ptxas_report_parser_reads_spills_per_function():
    # ptxas -v's lines as NVRTC logs them (spills are hard to provoke on purpose: ptxas
    # avoids them while registers last, so the parser is checked on the text itself)
    log = (
        "ptxas info    : Compiling entry function 'a' for 'sm_90'\n"
        "ptxas info    : Function properties for a\n"
        "ptxas         .     8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers, 8 bytes cumulative stack size\n"
        "ptxas info    : Function properties for b\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 30 registers, used 1 barriers\n"
    )
    k = _nvrtc._parse_ptxas(log)
    assert k["a"] == _nvrtc.Kernel(registers=255, stack_bytes=8, spill_store_bytes=12,
                                   spill_load_bytes=16)  # fmt: skip
    assert k["b"] == _nvrtc.Kernel(registers=30, stack_bytes=0, spill_store_bytes=0,
                                   spill_load_bytes=0)  # fmt: skip
