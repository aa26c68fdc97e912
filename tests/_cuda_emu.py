"""Running minivit's CUDA kernels where no GPU exists: a small SIMT emulator.

The fused kernels of ``minivit/kernels_cupy.py`` are CUDA C++ text handed to CuPy. Without a GPU
they would never run in CI, so this module runs the same text on the CPU:

* ``fake_cupy()`` stands in for the ``cupy`` module inside ``kernels_cupy`` (``RawKernel``,
  ``ElementwiseKernel``, ``empty``, ``zeros``, ``int32``, ``cuda.Device``...). Its arrays are
  NumPy arrays, so the Python side of each kernel (grid and block sizes, argument types, shared
  memory size, which array is written in place) runs unchanged.
* A RawKernel's source is compiled with g++ against ``_HEADER``, which models CUDA's
  execution: one OS thread per CUDA thread, the blocks of a grid two at a time;
  ``__syncthreads`` and the warp shuffles are barriers (a shuffle writes the lane's value, meets
  its warp, reads its partner's, honouring ``width``); ``atomicAdd`` is a relaxed atomic; each
  block gets fresh dynamic shared memory. Each launch runs in a forked child process, on arrays
  in shared mappings, under a watchdog. An ElementwiseKernel is a plain loop over the elements,
  in this process.
* It is strict where a GPU would fail silently, so a test can catch it:
  - a scalar argument must be the NumPy type whose size the kernel reads (``np.int32`` for
    ``int``, ``np.int64`` for ``long long``, the array dtype for ``T``); a pointer argument must
    be a C-contiguous array of the pointed-to type;
  - every array argument sits between guard bands as long as itself, holding a huge finite
    SENTINEL: a write into one is reported, a read from one spoils the result; an access that
    reaches unmapped memory kills the child and is reported as a crash (one that lands in other
    mapped memory goes unseen), and a kernel that never ends is reported as a timeout;
  - fresh arrays (``empty``) and each block's shared memory start as NaN, so an output or a
    shared entry that is read before it is written shows up as NaN; shared memory has guard
    bands too;
  - a full-mask shuffle after some lanes of the warp returned, or in a partial warp, is
    reported; a launch a GPU refuses (block over 1024 threads, over 48 KiB of dynamic shared
    memory, an empty grid) is too, and so are the lanes of a warp meeting at shuffles on
    different source lines (different branches). A barrier that waits more than TIMEOUT_S (plus
    BLOCK_TIME_S per block of the grid) is reported as a deadlock.

Data races: the OS seldom interleaves two threads' accesses, so a plain run misses races, but
``RawKernel.race_check`` (``fake_cupy(check_races=True)``) runs the launch again as a
standalone program under ThreadSanitizer. Barriers are mutexes and condition variables and
``atomicAdd`` a relaxed atomic, so TSan sees the ordering of ``__syncthreads`` and of atomics as
CUDA gives it: a missing ``__syncthreads`` or a ``+=`` in place of ``atomicAdd`` is reported,
within a block or between two blocks that run at once.

What it cannot show: speed, memory coalescing, a race between blocks that do not run in the
same pair, or one between lanes of a warp that only a shuffle separates (the emulator's
shuffles are barriers and order memory; CUDA promises that only for ``__syncwarp``).
The same text is compiled for the H100/H200's sm_90 by NVRTC, the compiler CuPy uses, with
CuPy's options (``tests/_nvrtc.py``, ``tests/test_kernels_nvrtc.py``); an ElementwiseKernel is
compiled there inside the wrapper of :meth:`ElementwiseKernel.cuda_source`, not CuPy's generated
code, so that checks its operation text.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import threading
from types import SimpleNamespace

import numpy as np

CXX = shutil.which("g++") or shutil.which("c++")
GUARD = 64  # at least this many elements of guard band on each side of an array argument
# What a guard band holds: a huge finite value, so a kernel that reads one computes on and the
# result is spoiled (positive: it wins a running maximum, where NaN would lose every comparison);
# bytes that differ afterwards were written by the kernel.
SENTINEL = 1.2345e30
TIMEOUT_S = 20.0  # a barrier wait longer than this is a deadlock; the launch is killed 1 s later
# ... plus this much per block: a large grid (a model's whole batch, on a loaded machine) is slow,
# not stuck
BLOCK_TIME_S = 0.05

_HEADER = r"""
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

using std::erf; using std::exp; using std::log; using std::sqrt; using std::tanh; using std::fabs;
template <class V> inline V rsqrt(V v) { return V(1) / std::sqrt(v); }

struct dim3 { unsigned x, y, z; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

namespace simt {

static std::mutex err_mu;
static std::string error;
static std::atomic<bool> failed{false};
static double timeout_s = 20;  // a barrier wait longer than this is reported as a deadlock

static void fail(const std::string& what) {
    std::lock_guard<std::mutex> g(err_mu);
    if (!failed) error = what;
    failed = true;
}

// A barrier for `live` threads. A thread that leaves the kernel stops counting (CUDA's
// __syncthreads on sm_70+); a wait that is never completed reports a deadlock.
struct Barrier {
    std::mutex mu;
    std::condition_variable cv;
    int live = 0, arrived = 0;
    long generation = 0;

    void release_locked() { arrived = 0; ++generation; cv.notify_all(); }
    void wait(const char* what) {
        std::unique_lock<std::mutex> lk(mu);
        long g = generation;
        if (++arrived >= live) { release_locked(); return; }
        auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds((long long)(timeout_s * 1000));
        while (generation == g && !failed) {
            cv.wait_for(lk, std::chrono::milliseconds(20));
            if (generation == g && std::chrono::steady_clock::now() > deadline) {
                fail(std::string("deadlock: ") + what + " was not reached by every thread that "
                     "is still running (divergent control flow around it)");
            }
        }
    }
    // A thread returns from the kernel. In a warp (strict) no lane may leave while the others
    // wait in a shuffle; a block's __syncthreads just stops counting it.
    void leave(bool strict) {
        std::lock_guard<std::mutex> lk(mu);
        --live;
        if (arrived > 0 && strict) {
            fail("a lane returned while the rest of its warp waited in a full-mask warp op");
            release_locked();
        } else if (arrived > 0 && arrived >= live) {
            release_locked();
        }
    }
};

struct Warp {
    Barrier bar;
    int size = 32;
    alignas(8) unsigned char slot[32][8];
    int site[32];  // the source line of the shuffle each lane is in
};

struct Block {
    Barrier bar;
    std::vector<Warp> warps;
};

static thread_local Block* block = nullptr;               // this thread's block
static thread_local unsigned char* dynamic_smem = nullptr;  // and its shared memory
static unsigned wave = 2;  // blocks that run at the same time

static Warp& my_warp() { return block->warps[threadIdx.x / 32]; }

template <class V> V exchange(unsigned mask, V v, int src_lane, const char* what, int line) {
    Warp& w = my_warp();
    if (mask != 0xffffffffu) fail(std::string(what) + ": the emulator supports full masks only");
    if (w.size != 32) fail(std::string(what) + " with a full mask in a partial warp (blockDim.x "
                           "is not a multiple of 32): lanes that do not exist are named");
    {
        std::lock_guard<std::mutex> lk(w.bar.mu);
        if (w.bar.live != w.size)
            fail(std::string(what) + " with a full mask after some lanes of the warp returned");
    }
    int lane = threadIdx.x % 32;
    std::memcpy(w.slot[lane], &v, sizeof(V));
    w.site[lane] = line;
    w.bar.wait(what);
    for (int l = 0; l < w.size; ++l) {
        if (w.site[l] != line) {
            fail(std::string("the lanes of a warp met at different ") + what + " calls (source "
                 "lines " + std::to_string(line) + " and " + std::to_string(w.site[l]) + ")");
            break;
        }
    }
    V r = v;
    if (src_lane >= 0 && src_lane < w.size) std::memcpy(&r, w.slot[src_lane], sizeof(V));
    w.bar.wait(what);
    return r;
}

}  // namespace simt

// CUDA's source lanes, with `width` (a power of two <= 32) splitting the warp into segments: a
// lane may read an earlier segment but not a later one, and then keeps its own value.
template <class V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
    int lane = threadIdx.x % 32, src = lane ^ lane_mask;
    if (src >= (lane / width + 1) * width) src = lane;
    return simt::exchange(mask, v, src, "__shfl_xor_sync", line);
}
template <class V>
V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32,
                   int line = __builtin_LINE()) {
    int lane = threadIdx.x % 32;
    int src = lane % width + (int)delta < width ? lane + (int)delta : lane;
    return simt::exchange(mask, v, src, "__shfl_down_sync", line);
}
template <class V>
V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32, int line = __builtin_LINE()) {
    int lane = threadIdx.x % 32;
    int src = lane / width * width + ((src_lane % width) + width) % width;
    return simt::exchange(mask, v, src, "__shfl_sync", line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { simt::my_warp().bar.wait("__syncwarp"); }
inline void __syncthreads() { simt::block->bar.wait("__syncthreads"); }
// A relaxed atomic read-modify-write, as CUDA's: it orders nothing else, so under ThreadSanitizer
// a plain read of the same entry that no barrier separates from it is still a race.
template <class V> V atomicAdd(V* p, V v) {
    V old, sum;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        sum = old + v;
    } while (!__atomic_compare_exchange(p, &old, &sum, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}

namespace simt {

// Runs body(args) as a grid of gx blocks of bx threads, `wave` blocks at a time (a GPU runs
// several at once, so a race between blocks can show, and ThreadSanitizer can see it).
static int run_grid(unsigned gx, unsigned bx, unsigned long long shmem, void (*body)(void**),
                    void** args) {
    gridDim = {gx, 1, 1};
    blockDim = {bx, 1, 1};
    // Each block's dynamic shared memory between guard bands, fresh (0xff..: NaN) per block.
    const size_t G = std::max<size_t>(4096, shmem);
    for (unsigned first = 0; first < gx && !failed; first += wave) {
        unsigned n = std::min(wave, gx - first);
        std::vector<Block> blocks(n);
        std::vector<std::vector<unsigned char>> smem(n);
        std::vector<std::thread> threads;
        threads.reserve((size_t)n * bx);
        for (unsigned k = 0; k < n; ++k) {
            Block& blk = blocks[k];
            smem[k].assign(shmem + 2 * G, 0xff);
            blk.bar.live = (int)bx;
            blk.warps = std::vector<Warp>((bx + 31) / 32);
            for (unsigned w = 0; w < blk.warps.size(); ++w) {
                int size = (int)std::min(32u, bx - 32 * w);
                blk.warps[w].size = size;
                blk.warps[w].bar.live = size;
            }
            unsigned b = first + k;
            unsigned char* sm = smem[k].data() + G;
            for (unsigned t = 0; t < bx; ++t) {
                threads.emplace_back([&blk, sm, b, t, body, args] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {b, 0, 0};
                    block = &blk;
                    dynamic_smem = sm;
                    body(args);
                    blk.warps[t / 32].bar.leave(true);
                    blk.bar.leave(false);
                });
            }
        }
        for (auto& th : threads) th.join();
        for (unsigned k = 0; k < n; ++k) {
            for (size_t i = 0; i < G; ++i) {
                if (smem[k][i] != 0xff || smem[k][G + shmem + i] != 0xff) {
                    fail("a thread wrote outside the dynamic shared memory (shared_mem=" +
                         std::to_string(shmem) + " bytes)");
                    break;
                }
            }
        }
    }
    return failed ? 1 : 0;
}

// One launch, in a forked child: a wild access then kills the child, not the test process,
// and a kernel that never ends is stopped by the watchdog. The arrays live in shared mappings
// (tests/_cuda_emu.py), so the child's writes are the parent's.
static int launch(unsigned gx, unsigned bx, unsigned long long shmem, void (*body)(void**),
                  void** args, char* err, int errlen, double timeout) {
    if (gx == 0 || bx == 0 || bx > 1024 || shmem > 48 * 1024) {
        std::snprintf(err, errlen, "invalid launch: grid %u, block %u (1..1024), shared_mem %llu "
                      "bytes (at most 48 KiB without opting in)", gx, bx, shmem);
        return 1;
    }
    char* msg = (char*)mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                            -1, 0);
    if (msg == MAP_FAILED) { std::snprintf(err, errlen, "mmap failed"); return 1; }
    msg[0] = 0;
    pid_t pid = fork();
    if (pid == 0) {
        timeout_s = timeout;
        int rc = run_grid(gx, bx, shmem, body, args);
        if (rc) std::snprintf(msg, 4096, "%s", error.c_str());
        _exit(rc);
    }
    int status = 0, rc = 1;
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::milliseconds((long long)(timeout * 1000) + 1000);
    while (true) {
        pid_t done = waitpid(pid, &status, WNOHANG);
        if (done == pid) break;
        if (std::chrono::steady_clock::now() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            std::snprintf(err, errlen, "the kernel did not finish within %.1f s", timeout + 1);
            munmap(msg, 4096);
            return 1;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (WIFSIGNALED(status)) {
        std::snprintf(err, errlen, "the kernel crashed (signal %d): an access far outside its "
                      "arrays (an illegal address on a GPU)", WTERMSIG(status));
    } else if (WEXITSTATUS(status) != 0) {
        std::snprintf(err, errlen, "%s", msg);
    } else {
        rc = 0;
    }
    munmap(msg, 4096);
    return rc;
}

}  // namespace simt
"""

_LAUNCH = r"""
static void simt_body(void** a) { %(name)s(%(args)s); }
extern "C" int simt_run(unsigned gx, unsigned bx, unsigned long long shmem, void** a,
                        char* err, int errlen, double timeout) {
    return simt::launch(gx, bx, shmem, simt_body, a, err, errlen, timeout);
}
"""

_TSAN_MAIN = r"""
#include <cstdlib>
// A standalone launch for ThreadSanitizer: argv = grid block shared_mem args.bin, where
// args.bin holds the argument count, then per argument (is_pointer, nbytes, offset, bytes).
int main(int argc, char** argv) {
    unsigned gx = std::atoi(argv[1]), bx = std::atoi(argv[2]);
    unsigned long long shmem = std::atoll(argv[3]);
    FILE* f = std::fopen(argv[4], "rb");
    int n = 0;
    if (!f || std::fread(&n, 4, 1, f) != 1) return 2;
    std::vector<std::vector<unsigned char>> store(n);
    std::vector<void*> ptrs(n), a(n);
    for (int i = 0; i < n; ++i) {
        long long head[3];
        if (std::fread(head, 8, 3, f) != 3) return 2;
        store[i].resize(head[1] + 16);
        if (std::fread(store[i].data(), 1, head[1], f) != (size_t)head[1]) return 2;
        ptrs[i] = store[i].data() + head[2];
        a[i] = head[0] ? (void*)&ptrs[i] : (void*)store[i].data();
    }
    int rc = simt::run_grid(gx, bx, shmem, simt_body, a.data());
    if (rc) std::fprintf(stderr, "%s\n", simt::error.c_str());
    return rc;
}
"""

_CTYPES = {
    "float": (np.float32, ctypes.c_float),
    "double": (np.float64, ctypes.c_double),
    "int": (np.int32, ctypes.c_int),
    "long long": (np.int64, ctypes.c_longlong),
    "unsigned": (np.uint32, ctypes.c_uint),
    "unsigned int": (np.uint32, ctypes.c_uint),
    "bool": (np.bool_, ctypes.c_bool),
}
_CNAME = {np.dtype(v[0]): k for k, v in _CTYPES.items() if k != "unsigned int"}

_BUILD_DIR = None
_BUILD_LOCK = threading.Lock()
_LAUNCH_LOCK = threading.Lock()  # one launch at a time, as on one CUDA stream
_BUILT: dict[str, str] = {}  # source hash -> compiled file
_LIBS: dict[str, ctypes.CDLL] = {}


class EmulatorError(RuntimeError):
    """The emulated kernel did something that is wrong (or undefined) on a GPU."""


def _compile(source: str, tsan: bool = False) -> str:
    """g++ ``source`` into a shared library, or with ``tsan`` into a ThreadSanitizer program;
    -> its path. Built once per source text and process."""
    global _BUILD_DIR
    key = hashlib.sha1(source.encode()).hexdigest()[:16] + ("-tsan" if tsan else "")
    with _BUILD_LOCK:  # two shard threads may ask for the same kernel at once
        if key in _BUILT:
            return _BUILT[key]
        if CXX is None:
            raise EmulatorError("no C++ compiler (g++) on this machine")
        if _BUILD_DIR is None:
            _BUILD_DIR = tempfile.mkdtemp(prefix="minivit-simt-")
            atexit.register(shutil.rmtree, _BUILD_DIR, True)
        src = os.path.join(_BUILD_DIR, f"{key}.cpp")
        out = os.path.join(_BUILD_DIR, key if tsan else f"{key}.so")
        with open(src, "w") as f:
            f.write(source)
        flags = ["-g", "-fsanitize=thread"] if tsan else ["-shared", "-fPIC"]
        cmd = [CXX, "-std=c++17", "-O1", "-pthread", "-w", *flags, "-o", out, src]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise EmulatorError(f"{cmd[0]} {' '.join(flags)} failed:\n{done.stderr[-4000:]}")
        _BUILT[key] = out
        return out


def _build(source: str) -> ctypes.CDLL:
    """``source`` compiled and loaded (cached)."""
    path = _compile(source)
    if path not in _LIBS:
        _LIBS[path] = ctypes.CDLL(path)
    return _LIBS[path]


def _resolve(ctype: str, typedefs: dict[str, str]) -> str:
    ctype = " ".join(ctype.replace("const", " ").replace("volatile", " ").split())
    return typedefs.get(ctype, ctype)


def _params(decl: str) -> list[tuple[str, str, bool]]:
    """'const T* __restrict__ x, long long M' -> [('T', 'x', True), ('long long', 'M', False)]."""
    out = []
    for p in decl.split(","):
        p = p.replace("__restrict__", " ").strip()
        m = re.fullmatch(r"(.*?)\s*(\**)\s*(\w+)", p, re.S)
        if not m or not m.group(1):
            raise EmulatorError(f"cannot read the parameter {p!r}")
        out.append((" ".join(m.group(1).split()), m.group(3), bool(m.group(2))))
    return out


def _guard_value(dtype) -> np.ndarray:
    """One element of a guard band: SENTINEL for floats, a byte pattern for integers."""
    return np.array(SENTINEL if dtype.kind == "f" else 0x5A5A5A5A, dtype)


class _Guarded:
    """Copies of the array arguments in shared memory (the forked launch writes them), each
    between guard bands of SENTINEL as long as the array (at least GUARD elements); aliases
    share one copy."""

    def __init__(self):
        self.items: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = {}
        self._maps: list[mmap.mmap] = []

    def pointer(self, a: np.ndarray) -> int:
        key = (a.__array_interface__["data"][0], a.nbytes)
        for start, nbytes in self.items:
            overlap = start < key[0] + key[1] and key[0] < start + nbytes
            if overlap and (start, nbytes) != key:
                raise EmulatorError("two array arguments overlap without being the same array")
        if key not in self.items:
            g = max(GUARD, a.size)
            m = mmap.mmap(-1, max((a.size + 2 * g) * a.itemsize, 1))  # MAP_SHARED, anonymous
            self._maps.append(m)
            buf = np.frombuffer(m, a.dtype, a.size + 2 * g)
            buf[:g] = buf[g + a.size :] = _guard_value(a.dtype)
            buf[g : g + a.size] = a.reshape(-1)
            self.items[key] = (a, buf, g)
        a, buf, g = self.items[key]
        return buf[g:].ctypes.data

    def buffer_of(self, address: int) -> tuple[np.ndarray, int]:
        """(the guarded buffer, the byte offset of its array) for a pointer from ``pointer``."""
        for _, buf, g in self.items.values():
            if buf[g:].ctypes.data == address:
                return buf, g * buf.itemsize
        raise KeyError(address)

    def finish(self, where: str):
        """Copy the results back; fail if a guard band was written."""
        for a, buf, g in self.items.values():
            want = _guard_value(a.dtype).reshape(1).view(np.uint8)
            for band in (buf[:g], buf[g + a.size :]):
                if (band.view(np.uint8).reshape(len(band), -1) != want).any():
                    raise EmulatorError(f"{where} wrote outside an array argument {a.shape}")
            if a.flags.writeable:  # (a read-only argument is an input's broadcast view)
                a.reshape(-1)[...] = buf[g : g + a.size]


def _pointer_array(values: list):
    """``void* args[]`` pointing at each ctypes value, as cuLaunchKernel takes its arguments."""
    return (ctypes.c_void_p * max(len(values), 1))(
        *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
    )


def _run(lib: ctypes.CDLL, grid: int, block: int, shmem: int, values: list, where: str):
    ptrs = _pointer_array(values)
    err = ctypes.create_string_buffer(1024)
    with _LAUNCH_LOCK:
        rc = lib.simt_run(
            ctypes.c_uint(grid),
            ctypes.c_uint(block),
            ctypes.c_ulonglong(shmem),
            ptrs,
            err,
            1024,
            ctypes.c_double(TIMEOUT_S + BLOCK_TIME_S * grid),
        )
    if rc:
        raise EmulatorError(f"{where}: {err.value.decode()}")


def _dims(d) -> int:
    d = tuple(d) if isinstance(d, (tuple, list)) else (d,)
    if any(int(v) != 1 for v in d[1:]):
        raise EmulatorError(f"the emulator runs 1-D grids and blocks only, got {d}")
    return int(d[0])


class RawKernel:
    """``cupy.RawKernel(code, name)``: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, code: str, name: str, *, check_races: bool = False, **_options):
        self.code, self.name, self.check_races = code, name, check_races
        m = re.search(
            r'extern\s+"C"\s+__global__\s+void\s+' + re.escape(name) + r"\s*\(([^)]*)\)", code
        )
        if not m:
            raise EmulatorError(f'no extern "C" __global__ void {name}(...) in the source')
        self.params = _params(m.group(1))
        typedefs = re.findall(r"typedef\s+([\w ]+?)\s+(\w+)\s*;", code)
        self.typedefs = {alias: ctype for ctype, alias in typedefs}
        self._lib = None

    def cpu_source(self) -> str:
        # `extern __shared__ T name[];` is the block's dynamic shared memory
        if re.search(r"(?<!extern )__shared__", self.code):
            raise EmulatorError(f"{self.name}: only dynamic (extern) __shared__ is emulated")
        code = re.sub(
            r"extern\s+__shared__\s+([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;",
            r"\1* \2 = reinterpret_cast<\1*>(simt::dynamic_smem);",
            self.code,
        )
        args = ", ".join(
            f"*reinterpret_cast<{t}{'*' if ptr else ''}*>(a[{i}])"
            for i, (t, _, ptr) in enumerate(self.params)
        )
        return _HEADER + code + _LAUNCH % {"name": self.name, "args": args}

    def _values(self, args, guarded: _Guarded) -> list:
        """The launch's arguments as ctypes values (pointers into ``guarded``), checked."""
        if len(args) != len(self.params):
            raise EmulatorError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = []
        for (ctype, pname, ptr), a in zip(self.params, args):
            base = _resolve(ctype, self.typedefs)
            want = _CTYPES.get(base)
            if want is None:
                raise EmulatorError(f"{self.name}: the emulator has no type {base!r} ({pname})")
            if ptr:
                if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                    raise EmulatorError(f"{self.name}: {pname} needs a C-contiguous array")
                if a.dtype != want[0]:
                    raise EmulatorError(f"{self.name}: {pname} is {base}*, got a {a.dtype} array")
                values.append(ctypes.c_void_p(guarded.pointer(a)))
            else:
                if type(a) is not want[0]:
                    raise EmulatorError(
                        f"{self.name}: {pname} is {base} ({np.dtype(want[0]).itemsize} bytes); "
                        f"pass np.{np.dtype(want[0]).name}, not {type(a).__name__}"
                    )
                values.append(want[1](a.item()))
        return values

    def __call__(self, grid, block, args, shared_mem=0):
        if self._lib is None:
            self._lib = _build(self.cpu_source())
        guarded = _Guarded()
        values = self._values(args, guarded)
        _run(self._lib, _dims(grid), _dims(block), int(shared_mem), values, self.name)
        guarded.finish(self.name)
        if self.check_races:
            report = self.race_check(grid, block, args, shared_mem)
            if report:
                raise EmulatorError(f"{self.name}: a data race\n{report}")

    def race_check(self, grid, block, args, shared_mem=0) -> str | None:
        """Run the launch once more under ThreadSanitizer; -> its first data-race report, or None.

        The emulator's barriers are mutexes and its atomics relaxed, so a shared or global
        entry that two threads touch without a barrier or an atomic between them (a missing
        ``__syncthreads``, a ``+=`` in place of ``atomicAdd``) is reported even when the OS did
        not interleave them; between blocks only when they run at once (two at a time). Its
        shuffles order memory within a warp, which CUDA's do not. The outputs of this run are
        discarded."""
        exe = _compile(self.cpu_source() + _TSAN_MAIN, tsan=True)
        guarded = _Guarded()
        values = self._values(args, guarded)
        with tempfile.TemporaryDirectory(prefix="minivit-tsan-") as d:
            data = os.path.join(d, "args.bin")
            with open(data, "wb") as f:
                f.write(np.int32(len(values)).tobytes())
                for (_, _, ptr), v in zip(self.params, values):
                    if ptr:  # the whole guarded buffer, and where the array starts in it
                        buf, off = guarded.buffer_of(v.value)
                        raw = buf.tobytes()
                    else:
                        raw, off = bytes(v), 0
                    f.write(np.array([ptr, len(raw), off], np.int64).tobytes() + raw)
            env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
            argv = [exe, str(_dims(grid)), str(_dims(block)), str(int(shared_mem)), data]
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        if "ThreadSanitizer" in done.stderr:
            return "\n".join(done.stderr.splitlines()[:30])
        if done.returncode:
            raise EmulatorError(f"{self.name} under TSan: {done.stderr[-2000:]}")
        return None


class ElementwiseKernel:
    """``cupy.ElementwiseKernel(in_params, out_params, operation, name)``.

    As in CuPy: inputs broadcast against each other and against given outputs; missing outputs
    are allocated (here NaN-filled); an array input, 0-d included, is a const reference to its
    element (so an input passed again as an output sees the new value); scalars (NumPy scalars
    or Python numbers) are passed by value; a one-letter type is a placeholder, fixed by the
    dtype of the first array argument declared with it (one placeholder per kernel here); any
    other type name is NumPy's (``float`` is float64)."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str, **_options):
        self.ins = [tuple(p.split()) for p in in_params.split(",")]
        self.outs = [tuple(p.split()) for p in out_params.split(",")]
        self.operation, self.name = operation, name

    @staticmethod
    def _dtype(t: str, placeholder) -> np.dtype:
        return np.dtype(placeholder) if len(t) == 1 else np.dtype(t)

    def _source(self, dtype, scalars: tuple[bool, ...], cuda: bool) -> str:
        lines, params = [], []
        ctype = _CNAME[np.dtype(dtype)]
        for i, ((t, n), sc) in enumerate(zip(self.ins + self.outs, scalars)):
            t = _CNAME[self._dtype(t, dtype)]
            out = i >= len(self.ins)
            if cuda:
                params.append(f"{t} {n}_" if sc else f"{'' if out else 'const '}{t}* {n}_")
                ref = f"{n}_" if sc else f"{n}_[i]"
            else:
                ref = f"*({t}*)a[{i}]" if sc else f"(*({t}**)a[{i}])[i]"
            const = "" if out else "const "
            lines.append(f"{const}{t} {n} = {ref};" if sc else f"{const}{t}& {n} = {ref};")
        body = "\n        ".join(lines) + f"\n        {self.operation.strip()};"
        if cuda:
            return (
                f"typedef {ctype} T;\n"
                f'extern "C" __global__ void {self.name}_{ctype}('
                f"long long n, {', '.join(params)}) {{\n"
                "    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
                f"    if (i < n) {{\n        {body}\n    }}\n}}\n"
            )
        return (
            f"{_HEADER}\ntypedef {ctype} T;\n"
            'extern "C" int simt_run(long long n, void** a) {\n'
            f"    for (long long i = 0; i < n; ++i) {{\n        {body}\n    }}\n    return 0;\n}}\n"
        )

    def cuda_source(self, dtype) -> str:
        """The kernel as a CUDA __global__ function over arrays (every argument an array)."""
        n = len(self.ins) + len(self.outs)
        return self._source(dtype, (False,) * n, cuda=True)

    def __call__(self, *args):
        n_in, n_out = len(self.ins), len(self.outs)
        if len(args) not in (n_in, n_in + n_out):
            raise EmulatorError(f"{self.name} takes {n_in} or {n_in + n_out} arguments")
        outs = list(args[n_in:]) or [None] * n_out
        decl = self.ins + self.outs
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        typed = [a for (t, _), a in zip(decl, args) if len(t) == 1 and isinstance(a, np.ndarray)]
        if len({t for t, _ in decl if len(t) == 1}) > 1 or not typed:
            raise EmulatorError(
                f"{self.name}: the emulator needs one placeholder, fixed by an array"
            )
        dtype = typed[0].dtype
        shape = np.broadcast_shapes(*[a.shape for a in arrays])
        for i, o in enumerate(outs):
            if o is None:
                outs[i] = np.full(shape, np.nan, dtype)
            elif o.shape != shape or not o.flags.c_contiguous:
                raise EmulatorError(f"{self.name}: output {i} must be C-contiguous, {shape}")
        values, scalars = [], []
        guarded = _Guarded()
        for (t, n), a in zip(decl, list(args[:n_in]) + outs):
            want = self._dtype(t, dtype)
            if isinstance(a, np.ndarray):
                if a.dtype != want:
                    raise EmulatorError(f"{self.name}: {n} is {want}, got {a.dtype}")
                if any(a is o for o in outs):
                    values.append(ctypes.c_void_p(guarded.pointer(a)))
                else:
                    b = np.ascontiguousarray(np.broadcast_to(a, shape))
                    values.append(ctypes.c_void_p(guarded.pointer(b)))
                scalars.append(False)
            else:
                values.append(_CTYPES[_CNAME[want]][1](want.type(a).item()))
                scalars.append(True)
        lib = _build(self._source(dtype, tuple(scalars), cuda=False))
        with _LAUNCH_LOCK:
            lib.simt_run(ctypes.c_longlong(int(np.prod(shape))), _pointer_array(values))
        guarded.finish(self.name)
        return outs[0] if n_out == 1 else tuple(outs)


def _nan_empty(shape, dtype=np.float64, **_):
    """Fresh memory: NaN for floats, a byte pattern for the rest."""
    a = np.empty(shape, dtype)
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    else:
        a.view(np.uint8).fill(0xA5)
    return a


def _nan_empty_like(a, dtype=None, **_):
    return _nan_empty(a.shape, a.dtype if dtype is None else dtype)


_TSAN = None


def tsan_available() -> bool:
    """Whether g++ here builds and runs a ThreadSanitizer program."""
    global _TSAN
    if _TSAN is None:
        _TSAN = False
        if CXX is not None:
            with tempfile.TemporaryDirectory(prefix="minivit-tsan-") as d:
                src, exe = os.path.join(d, "t.cpp"), os.path.join(d, "t")
                with open(src, "w") as f:
                    f.write("#include <thread>\nint main() { std::thread t([]{}); t.join(); }\n")
                cmd = [CXX, "-fsanitize=thread", "-pthread", "-o", exe, src]
                built = subprocess.run(cmd, capture_output=True).returncode == 0
                _TSAN = built and subprocess.run([exe], capture_output=True).returncode == 0
    return _TSAN


def fake_cupy(multiprocessors: int = 2, check_races: bool = False) -> SimpleNamespace:
    """A stand-in for the ``cupy`` module as kernels_cupy uses it, backed by the emulator.

    ``multiprocessors`` is what ``cuda.Device().attributes['MultiProcessorCount']`` answers; a
    small count makes the grid-stride loops take more than one turn. ``check_races``: every
    RawKernel launch also runs under ThreadSanitizer (``RawKernel.race_check``) and a data race
    raises EmulatorError."""
    device = SimpleNamespace(attributes={"MultiProcessorCount": multiprocessors})
    return SimpleNamespace(
        RawKernel=functools.partial(RawKernel, check_races=check_races),
        ElementwiseKernel=ElementwiseKernel,
        empty=_nan_empty,
        empty_like=_nan_empty_like,
        zeros=np.zeros,
        int32=np.int32,
        int64=np.int64,
        float32=np.float32,
        float64=np.float64,
        bool_=np.bool_,
        cuda=SimpleNamespace(Device=lambda *a: device),
    )
