"""NVRTC, the CUDA compiler inside CuPy, driven through ctypes: minivit's kernel text is compiled
for the H100/H200 (sm_90) the way CuPy compiles it there, on a machine without a GPU.

NVRTC compiles to a cubin without a driver or a device. It comes from the pip wheels (the test
extra installs CUDA 12's ``nvidia-cuda-nvrtc-cu12`` and CUDA 13's ``nvidia-cuda-nvrtc``, on
Linux x86-64) or a CUDA toolkit's ``libnvrtc``; every release found is in :data:`LIBS`. Where
none exists, :data:`LIB` is None and the tests that need it skip with :data:`MISSING` as the
reason.

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
    """Where libnvrtc may be: $MINIVIT_NVRTC (one library file, and nothing else), else the pip
    wheels' folders (CUDA 12's ``nvidia/cuda_nvrtc``, CUDA 13's ``nvidia/cu13``), a toolkit, and
    the loader."""
    if os.environ.get("MINIVIT_NVRTC"):
        yield os.environ["MINIVIT_NVRTC"]
        return
    try:
        import nvidia  # the wheels' shared namespace package (no __init__)

        for d in nvidia.__path__:
            for sub in ("cuda_nvrtc", "cu13"):
                yield from sorted(glob.glob(os.path.join(d, sub, "lib", "libnvrtc.so.*")))
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            yield from sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def _open(path):
    # NVRTC opens its builtins library by name at its first compile: the one beside it, loaded
    # first, is found even where the loader's search path does not reach that folder
    # (a bare name from the loader's search has no folder to look in)
    folder = os.path.dirname(path) if os.path.isabs(path) else None
    for builtins in glob.glob(os.path.join(folder, "libnvrtc-builtins.so.*")) if folder else ():
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _version_of(lib) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _load():
    """One library per NVRTC release found, the first found of each, in :func:`_candidates`'
    order. The device's CuPy (cupy-cuda13x) compiles with CUDA 13's, a cupy-cuda12x with 12's:
    the tests compile with every one here."""
    libs, errors = {}, []
    for path in _candidates():
        try:
            lib = _open(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        libs.setdefault(_version_of(lib), lib)
    missing = "; ".join(errors) or "no libnvrtc (pip install nvidia-cuda-nvrtc-cu12)"
    return libs, ("" if libs else missing)


#: NVRTC release ("12.9", "13.0") -> its library; :data:`LIB` is the first found, or None
LIBS, MISSING = _load()
LIB = next(iter(LIBS.values()), None)


class NvrtcError(RuntimeError):
    pass


def _check(status, what, lib):
    if status:
        raise NvrtcError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


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


def compile_cuda(
    source: str, arch: str = "sm_90", filename: str = "minivit.cu", release: str | None = None
) -> Compiled:
    """Compile ``source`` to a cubin for ``arch`` with CuPy's options, under NVRTC ``release``
    (a key of :data:`LIBS`; the first found by default); raises NvrtcError with the compiler's
    log when it fails."""
    if LIB is None:
        raise NvrtcError(MISSING)
    lib = LIBS[release] if release else LIB

    def check(status, what):
        _check(status, what, lib)

    prog = ctypes.c_void_p()
    check(
        lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), filename.encode(), 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    try:
        opts = [f"-arch={arch}", *CUPY_OPTIONS, "--ptxas-options=-v"]
        argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace")
        if status:
            raise NvrtcError(f"NVRTC could not compile {filename} for {arch}:\n{log[-4000:]}")
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return Compiled(cubin=cubin.raw, log=log, kernels=_parse_ptxas(log))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
