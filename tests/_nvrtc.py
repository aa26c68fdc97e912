"""NVRTC, the CUDA compiler inside CuPy, driven through ctypes: minivit's kernel text is compiled
for the H100/H200 (sm_90) the way CuPy compiles it there, on a machine without a GPU.

NVRTC compiles to a cubin without a driver or a device. It comes from the ``nvidia-cuda-nvrtc-cu12``
wheel (a test extra on Linux x86-64) or a CUDA toolkit's ``libnvrtc``; where neither exists,
:data:`LIB` is None and the tests that need it skip with :data:`MISSING` as the reason.

The options are those CuPy 14 adds when it compiles a ``RawKernel`` (``cupy/cuda/compiler.py``,
``cupy/_core/raw.pyx``): ``-arch=sm_XX`` (a cubin, not PTX), ``-std=c++17``, ``-ftz=true`` and
``--device-as-default-execution-space``; its ``-I`` paths do not matter to kernels that include
no header.
``--ptxas-options=-v`` makes ptxas report each kernel's registers and spills, parsed into
:class:`Compiled`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
from dataclasses import dataclass, field

CUPY_OPTIONS = ("-std=c++17", "-ftz=true", "--device-as-default-execution-space")


def _candidates():
    """Where libnvrtc may be: the pip wheel's folder first, then a toolkit, then the loader."""
    try:
        import nvidia.cuda_nvrtc as wheel  # the nvidia-cuda-nvrtc-cu12 wheel (no __init__)

        for d in wheel.__path__:
            yield from sorted(glob.glob(os.path.join(d, "lib", "libnvrtc.so.*")))
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            yield from sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def _load():
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib, ""
    return None, "; ".join(errors) or "no libnvrtc (pip install nvidia-cuda-nvrtc-cu12)"


LIB, MISSING = _load()


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(LIB.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


class NvrtcError(RuntimeError):
    pass


def _check(status, what):
    if status:
        raise NvrtcError(f"{what}: {LIB.nvrtcGetErrorString(status).decode()}")


@dataclass
class Kernel:
    """ptxas's report on one entry function."""

    registers: int = -1
    stack_bytes: int = -1
    spill_store_bytes: int = -1
    spill_load_bytes: int = -1


@dataclass
class Compiled:
    cubin: bytes
    log: str
    kernels: dict[str, Kernel] = field(default_factory=dict)


def _parse_ptxas(log: str) -> dict[str, Kernel]:
    """ptxas -v's lines, per function::

    ptxas info    : Function properties for minivit_ln_bwd
    ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 32 registers, used 0 barriers
    """
    kernels: dict[str, Kernel] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel())
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", line)
        if m:
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(
                int, m.groups()
            )
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
    return kernels


def compile_cuda(source: str, arch: str = "sm_90", filename: str = "minivit.cu") -> Compiled:
    """Compile ``source`` to a cubin for ``arch`` with CuPy's options; raises NvrtcError with
    the compiler's log when it fails."""
    if LIB is None:
        raise NvrtcError(MISSING)
    prog = ctypes.c_void_p()
    _check(
        LIB.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), filename.encode(), 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    try:
        opts = [f"-arch={arch}", *CUPY_OPTIONS, "--ptxas-options=-v"]
        argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        status = LIB.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        _check(LIB.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(size.value)
        _check(LIB.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace")
        if status:
            raise NvrtcError(f"NVRTC could not compile {filename} for {arch}:\n{log[-4000:]}")
        _check(LIB.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(LIB.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return Compiled(cubin=cubin.raw, log=log, kernels=_parse_ptxas(log))
    finally:
        LIB.nvrtcDestroyProgram(ctypes.byref(prog))
