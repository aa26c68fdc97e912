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
from _requires import require

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
    with pytest.raises(RuntimeError, match="the last backward consumed it"):
        v.backward(d)
    with pytest.raises(RuntimeError, match="cached_attention needs .* the last backward consumed"):
        v.cached_attention()
    for k, g in v.grads.items():  # a refused backward leaves the gradients alone
        np.testing.assert_array_equal(backend.to_numpy(g), first[k])
    _step(v, x, y, backend)  # a new forward makes a new cache: the same gradients again
    for k, g in v.grads.items():
        np.testing.assert_allclose(backend.to_numpy(g), first[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The cache's life around errors: a refused call leaves it usable, a failure part-way says so


@pytest.fixture(params=[1, 2], ids=["whole", "shards"])
def threads(request):
    """The batch whole on one thread, or in two shards (models/sharding.py)."""
    _parallel.set_num_threads(request.param)  # _one_thread puts the count back
    return request.param


def _grads(v, backend):
    return {k: backend.to_numpy(g) for k, g in v.grads.items()}


def _reference(backend, rng_seed=0):
    v = _model(backend)
    x, y = _inputs(backend, np.random.default_rng(rng_seed))
    _step(v, x, y, backend)
    return v, x, y, _grads(v, backend)


def _dlogits(v, x, y, backend):
    logits = v.forward(x)
    _, c = ops.cross_entropy_forward(logits, y)
    (dl,) = ops.cross_entropy_backward(backend.xp.asarray(1.0, dtype=logits.dtype), c)
    return dl


def _assert_grads(v, backend, want):
    got = _grads(v, backend)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_refused_forward_keeps_the_last_cache(backend, threads):
    v, x, y, want = _reference(backend)
    dl = _dlogits(v, x, y, backend)
    with pytest.raises(TypeError, match="dtype"):
        v.forward(x.astype(np.float64))  # refused by the input checks
    with pytest.raises(ValueError, match="shape"):
        v.forward(x[:, :2])
    assert len(v.cached_attention()) == CFG["depth"]
    v.backward(dl, input_grad=False)  # the first forward's cache is still whole
    _assert_grads(v, backend, want)


def test_a_forward_that_fails_part_way_says_so(backend, threads, monkeypatch):
    v, x, y, _ = _reference(backend)
    v.forward(x)

    def broken(*a, **k):
        raise FloatingPointError("block failed")

    monkeypatch.setattr("minivit.models.vit.encoder_forward", broken)
    with pytest.raises(FloatingPointError, match="block failed"):
        v.forward(x)
    with pytest.raises(RuntimeError, match="the last forward raised an error"):
        v.backward(backend.xp.ones((B, 10), dtype=np.float32))


def test_a_backward_that_fails_part_way_drops_the_rest(backend, threads, monkeypatch):
    """An error inside backward (a GPU's out-of-memory, Ctrl-C) after it has begun to free the
    cache leaves the cache incomplete: a retry and cached_attention then say so, and a new
    forward gives the right gradients again."""
    from minivit import blocks

    v, x, y, want = _reference(backend)
    dl = _dlogits(v, x, y, backend)
    calls = []
    real = blocks.block_backward

    def fails_once(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second block from the top, after the first was freed
            raise MemoryError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(blocks, "block_backward", fails_once)
    with pytest.raises(MemoryError):
        v.backward(dl, input_grad=False)
    monkeypatch.setattr(blocks, "block_backward", real)
    with pytest.raises(RuntimeError, match="the last backward raised an error .* incomplete"):
        v.backward(dl, input_grad=False)
    with pytest.raises(RuntimeError, match="incomplete"):
        v.cached_attention()
    _step(v, x, y, backend)
    _assert_grads(v, backend, want)


def test_a_refused_backward_keeps_the_cache(backend, threads):
    """A gradient of the wrong shape is refused before anything is freed."""
    v, x, y, want = _reference(backend)
    dl = _dlogits(v, x, y, backend)
    with pytest.raises(ValueError):
        v.backward(dl[:, :3], input_grad=False)
    v.backward(dl, input_grad=False)
    _assert_grads(v, backend, want)


def test_a_gradient_is_taken_in_the_models_dtype(backend, threads):
    """As torch casts a gradient to its output's dtype: a float64 dlogits gives the float32
    model's float32 gradients (GELU's backward, writing over its gradient, once made them
    float64)."""
    v, x, y, want = _reference(backend)
    dl = _dlogits(v, x, y, backend)
    dimages = v.backward(dl.astype(np.float64))
    assert dimages.dtype == np.float32
    assert {str(g.dtype) for g in v.grads.values()} == {"float32"}
    _assert_grads(v, backend, want)


def test_vilt_a_backward_that_fails_part_way_drops_the_rest(backend, monkeypatch):
    from minivit import ViLT, blocks

    m = ViLT(vocab_size=50, max_text_len=6, img_size=16, patch_size=8, embed_dim=16, depth=2,
             num_heads=2, seed=0, backend=backend.name)  # fmt: skip
    r = np.random.default_rng(0)
    ids = backend.asarray(r.integers(0, 50, (2, 6)))
    mask = backend.asarray(np.ones((2, 6), bool))
    img = backend.asarray(r.standard_normal((2, 3, 16, 16)).astype(np.float32))
    out = m.forward(ids, mask, img)
    grads = dict(pooled=backend.xp.ones_like(out["pooled"]))
    with pytest.raises(ValueError, match="takes gradients for"):
        m.backward(dict(grads, logits=out["pooled"]))  # refused: the cache stays
    calls = []
    real = blocks.block_backward

    def fails_once(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(blocks, "block_backward", fails_once)
    with pytest.raises(MemoryError):
        m.backward(grads)
    monkeypatch.setattr(blocks, "block_backward", real)
    with pytest.raises(RuntimeError, match="incomplete"):
        m.backward(grads)
    m.forward(ids, mask, img)
    m.backward(grads)  # a new forward, a whole backward


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
    require("torch")
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
