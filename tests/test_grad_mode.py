"""Inference without caches: ``minivit.no_grad()``.

Under ``no_grad()`` a forward must give exactly what it gives with gradients on, keep no cache
(backward and the attention maps refuse, naming no_grad), free each block's activations as it
goes, and the mode must be per thread, scoped, and carried into a model's batch shards.
"""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

import minivit
from minivit import _parallel, blocks, ops
from minivit.models import ViT, sharding
from minivit.models.hybrid import HybridViT

pytestmark = pytest.mark.usefixtures("keep_parallel_settings")


def _vit(backend, depth=2, **kw):
    cfg = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=depth,
               num_heads=2, dtype="float64", seed=0, backend=backend)  # fmt: skip
    cfg.update(kw)
    return ViT(**cfg)


def _images(backend, b, size=8, dtype="float64"):
    x = np.random.default_rng(1).standard_normal((b, 3, size, size))
    return backend.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# the mode itself


def test_mode_is_scoped_nested_and_restored_after_an_error():
    assert minivit.grad_enabled()
    with minivit.no_grad():
        assert not ops.grad_enabled()
        with ops.set_grad_enabled(True):
            assert ops.grad_enabled()
        assert not ops.grad_enabled()
    assert ops.grad_enabled()
    with pytest.raises(KeyError):
        with minivit.no_grad():
            raise KeyError("x")
    assert ops.grad_enabled()


def test_set_grad_enabled_as_a_call_and_no_grad_as_a_decorator():
    try:
        minivit.set_grad_enabled(False)  # a plain call sets the mode, as torch's does
        assert not ops.grad_enabled()
    finally:
        minivit.set_grad_enabled(True)
    assert ops.grad_enabled()

    @minivit.no_grad()
    def depth(n):  # a decorated function that calls itself: the mode must nest
        assert not ops.grad_enabled()
        return depth(n - 1) if n else "done"

    assert depth(3) == "done" and ops.grad_enabled()


def test_mode_is_per_thread():
    seen = []
    with minivit.no_grad():
        t = threading.Thread(target=lambda: seen.append(ops.grad_enabled()))
        t.start()
        t.join()
        assert not ops.grad_enabled()
    assert seen == [True]  # another thread keeps its own mode


# ----------------------------------------------------------------------------------------------
# the op that skips work: GELU


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype, n", [("float32", 300_000), ("float32", 50), ("float64", 1000)])
def test_gelu_under_no_grad_gives_the_same_values_and_no_backward(backend, approximate, dtype, n):
    # 300k float32 values take the fast (blocked, threaded) NumPy path, the others the generic one
    x = backend.asarray(np.random.default_rng(0).normal(0, 3, n), dtype=dtype)
    ref, _ = ops.gelu_forward(x, approximate)
    with minivit.no_grad():
        out, cache = ops.gelu_forward(x, approximate)
    np.testing.assert_array_equal(backend.to_numpy(out), backend.to_numpy(ref))
    assert not hasattr(cache, "dydx") and not hasattr(cache, "x")  # nothing kept for backward
    with pytest.raises(RuntimeError, match="no_grad"):
        ops.gelu_backward(backend.xp.ones_like(x), cache)


def test_encoder_backward_refuses_a_no_grad_cache(backend):
    m = _vit(backend)
    x = backend.asarray(np.random.default_rng(0).standard_normal((2, 5, 16)))
    with minivit.no_grad():
        y, cache = blocks.encoder_forward(x, m.params, "blocks.", 2, 2)
    assert cache.blocks is None
    with pytest.raises(RuntimeError, match="no_grad"):
        blocks.encoder_backward(backend.xp.ones_like(y), cache, {})


# ----------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("shards", [False, True])
def test_vit_no_grad_forward_equals_and_keeps_nothing(backend, shards):
    sharding.set_enabled(shards)
    _parallel.set_num_threads(2)
    m, x = _vit(backend), _images(backend, 4)
    ref = backend.to_numpy(m.forward(x))
    feats = backend.to_numpy(m.forward_features(x))
    with minivit.no_grad():
        out = backend.to_numpy(m.forward(x))
        assert m._cache is None
        out_f = backend.to_numpy(m.forward_features(x))
        assert m._cache is None
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out_f, feats)
    with pytest.raises(RuntimeError, match="no_grad"):
        m.backward(backend.asarray(ref))
    with pytest.raises(RuntimeError, match="no_grad"):
        m.cached_attention()
    m.forward(x)  # with gradients on again: backward works
    assert m.backward(backend.asarray(ref)).shape == x.shape


def test_shards_run_in_the_callers_mode(monkeypatch):
    """The shards run on pool threads (the caller's too); each must see the caller's mode."""
    sharding.set_enabled(True)
    _parallel.set_num_threads(2)
    seen = []
    inner = blocks.block_forward
    # The two shards' blocks wait for each other, so the shards must run on two threads at
    # once (the calling thread alone could otherwise run both, in its own mode).
    meet = threading.Barrier(2, timeout=20)

    def spy(x, *args, **kwargs):
        seen.append((x.shape[0], ops.grad_enabled()))
        meet.wait()
        return inner(x, *args, **kwargs)

    monkeypatch.setattr(blocks, "block_forward", spy)
    m, x = _vit(minivit.get_backend("numpy")), _images(minivit.get_backend("numpy"), 4)
    with minivit.no_grad():
        m.forward(x)
    assert seen == [(2, False)] * 4  # two blocks in each of two shards of 2 images
    seen.clear()
    m.forward(x)
    assert seen == [(2, True)] * 4


def _peak(fn):
    """The peak of NumPy's traced allocations while fn() runs, in bytes."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _inference(m, x):
    def run():
        with minivit.no_grad():
            m.forward(x)

    return run


def test_no_grad_frees_each_blocks_activations():
    """With gradients on, the forward holds every block's cache at its end; under no_grad()
    only about one block's activations are alive at a time."""
    sharding.set_enabled(False)
    _parallel.set_num_threads(1)  # a second thread's temporaries would make the peak vary
    numpy_be = minivit.get_backend("numpy")
    m = _vit(numpy_be, depth=8, img_size=32, embed_dim=32)
    x = _images(numpy_be, 4, size=32)

    with_grad = _peak(lambda: m.forward(x))
    m._cache = None
    without = _peak(_inference(m, x))
    assert without < 0.3 * with_grad, (without, with_grad)


def test_no_grad_frees_the_hybrid_backbones_activations():
    sharding.set_enabled(False)
    _parallel.set_num_threads(1)  # a second thread's temporaries would make the peak vary
    numpy_be = minivit.get_backend("numpy")
    # six residual blocks; after the stem's pool and one stride-2 stage, 64 tokens, so the
    # backbone's activations (not attention) dominate the forward's memory
    m = HybridViT(img_size=32, in_chans=3, num_classes=3, stem_chs=16, stem_pool=True,
                  stages=[[16, 4, 1], [32, 2, 2]], gn_groups=4, embed_dim=16, depth=1,
                  num_heads=2, dtype="float64", backend=numpy_be)  # fmt: skip
    x = _images(numpy_be, 8, size=32)
    with_grad = _peak(lambda: m.forward(x))
    m._cache = None
    without = _peak(_inference(m, x))
    # measured 0.42 (the stem's own working set remains); 0.99 when the backbone kept its caches
    assert without < 0.6 * with_grad, (without, with_grad)


def test_hybrid_no_grad_forward_equals(backend):
    m = HybridViT(img_size=8, in_chans=3, num_classes=3, stem_chs=4, stages=[[4, 1, 1]],
                  gn_groups=2, embed_dim=8, depth=1, num_heads=2, dtype="float64",
                  backend=backend)  # fmt: skip
    x = _images(backend, 3)
    ref = backend.to_numpy(m.forward(x))
    with minivit.no_grad():
        out = backend.to_numpy(m.forward(x))
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(RuntimeError, match="no_grad"):
        m.backward(backend.asarray(ref))


@pytest.mark.parametrize("shards", [False, True])
def test_vilt_no_grad_forward_equals(backend, shards):
    from test_vilt import batch, tiny

    sharding.set_enabled(shards)
    _parallel.set_num_threads(2)
    model = tiny(backend)
    ids, mask, images = batch(backend)
    ref = model.forward(ids, mask, images)
    with minivit.no_grad():
        out = model.forward(ids, mask, images)
    assert out["attn"] is None and ref["attn"] is not None
    for k in ("text_feats", "image_feats", "pooled", "image_mask", "patch_index"):
        np.testing.assert_array_equal(backend.to_numpy(out[k]), backend.to_numpy(ref[k]), k)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward({"pooled": ref["pooled"]})
