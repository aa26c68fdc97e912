"""What a model holds in memory across a train step: backward consumes the forward's cache, a
new forward drops the last one's first, and backward drops the last gradients before making
new ones, so a training loop holds one set of activations at a time, as PyTorch does.

The peaks are measured on the arrays themselves: tracemalloc on NumPy (NumPy reports its
buffers to it), the memory pool's used bytes, seen at every allocation, on CuPy.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from minivit import ViT, _parallel, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the benchmarks' model builders and meter
    sys.path.insert(0, ROOT)

CFG = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=4,
           num_heads=4, mlp_ratio=4.0, dtype="float32")  # fmt: skip
B = 8


@pytest.fixture(autouse=True)
def _one_thread():
    # Batch shards and blocked elementwise work on two threads make a peak depend on how the
    # threads' temporaries happen to overlap (+-8% seen); one thread makes it repeatable.
    threads = _parallel.get_num_threads()
    _parallel.set_num_threads(1)
    yield
    _parallel.set_num_threads(threads)


def _model(backend):
    return ViT(backend=backend.name, seed=0, **CFG)


def _inputs(backend, rng):
    x = rng.standard_normal((B, 3, 32, 32)).astype(np.float32)
    return backend.asarray(x), backend.asarray(rng.integers(0, 10, B))


def _step(v, x, y, backend):
    logits = v.forward(x, train=True)
    _, c = ops.cross_entropy_forward(logits, y)
    (dl,) = ops.cross_entropy_backward(backend.xp.asarray(1.0, dtype=logits.dtype), c)
    v.backward(dl, input_grad=False)


class _Meter:
    """Bytes of this backend's arrays in use: ``peak(fn)`` is the most in use while fn ran.

    On NumPy, tracemalloc runs from the meter's start, so only what was allocated after that
    counts: the meter must start before the first step it compares.
    """

    def __init__(self, backend):
        self.numpy = backend.name == "numpy"

    def __enter__(self):
        gc.collect()
        if self.numpy:
            tracemalloc.start()
        return self

    def __exit__(self, *exc):
        if self.numpy:
            tracemalloc.stop()

    def peak(self, fn):
        gc.collect()
        if self.numpy:
            tracemalloc.reset_peak()
            fn()
            return tracemalloc.get_traced_memory()[1]
        import cupy

        from benchmarks import harness  # the benchmarks' own meter: the pool, per allocation

        cupy.cuda.get_current_stream().synchronize()
        start = cupy.get_default_memory_pool().used_bytes()
        above, how = harness.peak_memory(fn, "minivit", "cuda")
        assert above is not None, how
        return start + above


def test_backward_consumes_the_cache(backend, rng):
    v = _model(backend)
    x, y = _inputs(backend, rng)
    _step(v, x, y, backend)
    first = {k: backend.to_numpy(g) for k, g in v.grads.items()}
    assert v._cache is None
    d = backend.xp.ones((B, 10), dtype=np.float32)
    with pytest.raises(RuntimeError, match="consumes its forward's cache"):
        v.backward(d)
    with pytest.raises(RuntimeError, match="since the last backward"):
        v.cached_attention()
    assert set(v.grads) == set(first)  # a refused backward leaves the gradients alone
    _step(v, x, y, backend)  # a new forward makes a new cache: the same gradients again
    for k, g in v.grads.items():
        np.testing.assert_allclose(backend.to_numpy(g), first[k], rtol=1e-5, atol=1e-6)


def test_a_consumed_encoder_cache_is_refused_with_a_reason(backend, rng):
    from minivit.blocks import encoder_backward, encoder_forward

    v = _model(backend)
    x = backend.asarray(rng.standard_normal((2, 5, 32)).astype(np.float32))
    out, cache = encoder_forward(x, v.params, "blocks.", 2, 4)
    encoder_backward(backend.xp.ones_like(out), cache, {})
    assert cache.blocks == [None, None]  # each block's cache went once used
    with pytest.raises(RuntimeError, match="consumed by an earlier backward"):
        encoder_backward(backend.xp.ones_like(out), cache, {})


def test_a_training_loop_holds_one_set_of_activations(backend, rng):
    """Later steps of a loop peak where the first does. Before, the model kept a step's cache
    until the next forward had made its own (twice the activations at that peak), and the
    gradients until the next backward had made new ones."""
    v = _model(backend)
    x, y = _inputs(backend, rng)
    with _Meter(backend) as meter:
        peaks = [meter.peak(lambda: _step(v, x, y, backend)) for _ in range(3)]
    grads = sum(int(g.nbytes) for g in v.grads.values())
    # a later step's forward runs beside the last step's gradients (as torch's does without
    # zero_grad(set_to_none=True) first); nothing else is carried over
    assert max(peaks[1:]) <= peaks[0] + 1.1 * grads, (peaks, grads)
    v.zero_grads()  # what a training loop does after the optimizer's step: then no more
    with _Meter(backend) as meter:
        first = meter.peak(lambda: _step(v, x, y, backend))
        v.zero_grads()
        again = meter.peak(lambda: _step(v, x, y, backend))
    assert again <= first + 0.01 * grads, (first, again, grads)


_TORCH_PEAK = r"""
import gc, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from torch.profiler import ProfilerActivity, profile
from benchmarks import models

step = models.build("vit_tiny_patch16_224", "numpy", int(sys.argv[2]), True,
                    img_size=int(sys.argv[3]), depth=int(sys.argv[4]))["torch_train_step"]
step()  # warm-up, untraced
gc.collect()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
print(int(np.max(np.cumsum([e.nbytes() for e in events if e.name() == "[memory]"]))))
"""


@pytest.fixture(scope="module")
def torch_peak():
    """The most bytes torch's CPU allocator holds above parameters and inputs during its
    twin's train step (benchmarks/models.py), from the profiler's allocation events. The twin's
    step first drops the last gradients; they were allocated before the trace, so their
    release does not show and the start is without them. In a fresh process: the profiler
    remembers the sizes of blocks an earlier trace saw, and a later trace in the same process
    was seen to report frees of those (2-3% lower peaks, varying with the tests before it)."""
    pytest.importorskip("torch")
    args = [str(B), str(_SMALL["img_size"]), str(_SMALL["depth"])]
    run = subprocess.run(
        [sys.executable, "-c", _TORCH_PEAK, ROOT, *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return int(run.stdout.split()[-1])


# ViT-Ti/16's width, heads and 197 tokens at batch 8, two blocks: a train step whose activations
# outweigh its parameters, as at the benchmark's sizes.
_SMALL = dict(img_size=224, depth=2)


def _minivit_peak(backend):
    """minivit's train-step peak in bytes above parameters and inputs, as ``torch_peak``
    measures its twin's. The twin runs on the CPU: what it allocates does not depend on the
    device, save for the caching allocator's rounding."""
    from benchmarks import models

    mv = models.build("vit_tiny_patch16_224", backend.name, B, False, **_SMALL)
    mv["train_step"]()
    mv["model"].zero_grads()  # the start, as torch's: parameters and inputs only
    with _Meter(backend) as meter:
        start = meter.peak(lambda: None)
        return meter.peak(mv["train_step"]) - start


def _stand_in(backend) -> bool:
    return "_cupy_stand_in" in sys.modules and backend.xp is sys.modules["_cupy_stand_in"]._MODULE


def test_a_train_step_peaks_near_torchs(backend, torch_peak):
    """On NumPy within 10% of torch (its fast GELU holds its input beside its output and
    derivative for a moment: measured 1.06-1.12x at small depth, 1.01x for the 12 blocks of
    ViT-Ti/16); on a GPU at or below torch's, the target of issue 6."""
    if _stand_in(backend):
        pytest.skip("the stand-in runs the generic path here (kernels off): see the next test")
    ours, theirs = _minivit_peak(backend), torch_peak
    print(f"peak above parameters and inputs: minivit {ours}, torch {theirs} bytes")
    assert ours <= (1.1 if backend.name == "numpy" else 1.0) * theirs, (ours, theirs)


def test_the_gpu_path_peaks_no_higher_than_torchs(cupy_stand_in, monkeypatch, torch_peak):
    """The CuPy path with its fused kernels, on the CPU stand-in for CuPy, which counts the
    bytes of the arrays CuPy would allocate. Only memory is measured, so the row kernels are
    not run (their outputs are allocated by kernels_cupy's Python side either way, and the
    SIMT emulator would take minutes at these sizes); the elementwise kernels run."""
    import _cupy_stand_in

    from minivit import kernels_cupy

    monkeypatch.setattr(
        _cupy_stand_in.RawKernel, "__call__", lambda self, grid, block, args, **kw: None
    )
    previous = kernels_cupy.set_enabled(True)
    try:
        ours, theirs = _minivit_peak(cupy_stand_in), torch_peak
    finally:
        kernels_cupy.set_enabled(previous)
    print(f"peak above parameters and inputs: minivit {ours}, torch {theirs} bytes")
    assert ours <= theirs, (ours, theirs)
