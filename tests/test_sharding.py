"""Batch shards (minivit/models/sharding.py): a model's forward and backward cut into pieces of
the batch on the pool's threads must give what the whole batch gives.

Each check runs the same model on the same inputs with shards off (the whole batch, itself
checked elsewhere against float64 differences and transformers) and on, with 2 and 3 threads,
and asserts that shards really ran. NumPy only: shards are a CPU feature. Budget: a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from minivit import _parallel, viz
from minivit.models import ViT, sharding
from minivit.models.hybrid import HybridViT
from minivit.models.sharding import ShardedRun, shard_bounds, sum_grads

pytestmark = pytest.mark.usefixtures("keep_parallel_settings")


def _vit(**kw):
    cfg = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
               num_heads=2, dtype="float64", seed=0)  # fmt: skip
    cfg.update(kw)
    return ViT(**cfg)


def _close(a, b, what=""):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=what)


def _images(b, size=8, seed=1):
    return np.random.default_rng(seed).standard_normal((b, 3, size, size))


def _run(model, images, shards, threads, train=True):
    """forward + backward of sum(logits * r); -> (logits, dimages, grads, the forward's cache,
    which the backward consumed)."""
    sharding.set_enabled(shards)
    _parallel.set_num_threads(threads)
    out = model.forward(images, train=train)
    cache = model._cache
    r = np.random.default_rng(2).standard_normal(out.shape)
    dimages = model.backward(r)
    assert model._cache is None
    return out, dimages, dict(model.grads), cache


@pytest.mark.parametrize("threads, batch", [(2, 5), (3, 7), (2, 2)])
def test_vit_shards_match_whole_batch(threads, batch):
    m, x = _vit(), _images(batch)
    ref_out, ref_dx, ref_g, ref_c = _run(m, x, False, threads)
    out, dx, g, c = _run(m, x, True, threads)
    assert not isinstance(ref_c, ShardedRun)
    assert isinstance(c, ShardedRun) and len(c.shards) == min(threads, batch)
    # per-sample work, equal to rounding (a shard's smaller arrays may take another code path:
    # the fast paths are chosen by size)
    _close(out, ref_out)
    _close(dx, ref_dx)
    assert list(g) == list(ref_g) == list(m.params)
    for k in g:  # batch sums, added per shard: equal to rounding
        _close(g[k], ref_g[k], k)


def test_hybrid_shards_match_whole_batch():
    m = HybridViT(img_size=16, in_chans=3, num_classes=4, stem_chs=8, stages=((16, 1, 2),),
                  gn_groups=4, embed_dim=16, depth=1, num_heads=2, dtype="float64")  # fmt: skip
    x = _images(4, size=16)
    ref_out, ref_dx, ref_g, _ = _run(m, x, False, 2)
    out, dx, g, c = _run(m, x, True, 2)
    assert isinstance(c, ShardedRun)
    _close(out, ref_out)
    _close(dx, ref_dx)
    for k in g:
        _close(g[k], ref_g[k], k)


def test_forward_features_and_attention_join_the_shards():
    m, x = _vit(), _images(4)
    sharding.set_enabled(False)
    ref_feats = m.forward_features(x)
    ref_attn = m.cached_attention()
    sharding.set_enabled(True)
    _parallel.set_num_threads(2)
    feats = m.forward_features(x)
    assert isinstance(m._cache, ShardedRun)
    _close(feats, ref_feats)
    for a, b in zip(m.cached_attention(), ref_attn):
        assert a.shape == (4, 2, 5, 5)
        _close(a, b)
    assert np.asarray(viz.attention_maps(m, x)).shape == (2, 4, 2, 5, 5)


def test_no_shards_when_they_would_change_the_result_or_cannot_pay():
    _parallel.set_num_threads(2)
    sharding.set_enabled(True)
    drop = _vit(drop_rate=0.1)
    assert drop.forward_draws_random({"images": None, "train": True})  # dropout in training
    assert not drop.forward_draws_random({"images": None, "train": False})  # eval draws nothing
    drop.forward(_images(4), train=True)
    assert not isinstance(drop._cache, ShardedRun)
    drop.forward(_images(4), train=False)
    assert isinstance(drop._cache, ShardedRun)
    m = _vit()
    assert shard_bounds(m, 1, False) is None  # one sample
    assert shard_bounds(m, 3, False) == [(0, 1), (1, 3)]
    assert shard_bounds(m, 4, True) is None  # random draws: one stream, the whole batch
    _parallel.set_num_threads(1)
    assert shard_bounds(m, 8, False) is None  # one thread
    _parallel.set_num_threads(2)
    sharding.set_enabled(False)
    assert shard_bounds(m, 8, False) is None  # MINIVIT_SHARD=0


def _vilt_run(model, shards):
    from test_vilt import batch

    be = model.backend
    ids, tmask, images = batch(be, B=5)
    pix = np.ones((5, 16, 16), bool)
    pix[1, :, 8:] = False  # a narrower image: its own position-embedding resampling
    sharding.set_enabled(shards)
    out = model.forward(ids, tmask, images, be.asarray(pix))
    cache = model._cache
    r = np.random.default_rng(3)
    grads = {k: r.standard_normal(out[k].shape) for k in ("text_feats", "image_feats", "pooled")}
    dimages = model.backward(grads)
    return out, dimages, dict(model.grads), cache


def test_vilt_shards_match_whole_batch():
    from test_vilt import tiny

    from minivit.backend import get_backend

    _parallel.set_num_threads(2)
    m = tiny(get_backend("numpy"))
    ref_out, ref_dx, ref_g, ref_c = _vilt_run(m, False)
    out, dx, g, c = _vilt_run(m, True)
    assert not isinstance(ref_c, ShardedRun) and isinstance(c, ShardedRun)
    for k in ("text_feats", "image_feats", "pooled", "text_mask", "image_mask", "patch_index"):
        _close(out[k], ref_out[k], k)
    assert len(out["attn"]) == len(ref_out["attn"]) == 2
    for a, b in zip(out["attn"], ref_out["attn"]):
        _close(a, b)
    _close(dx, ref_dx)
    assert list(g) == list(ref_g)
    for k in g:
        _close(g[k], ref_g[k], k)
    # patch sampling draws from the model's generator: never sharded
    assert m.forward_draws_random({"max_image_len": 2})
    assert not m.forward_draws_random({"max_image_len": None})


def test_input_errors_name_the_callers_shape():
    _parallel.set_num_threads(2)
    with pytest.raises(ValueError, match=r"got \(4, 3, 4, 4\)"):
        _vit().forward(np.zeros((4, 3, 4, 4)))


def test_an_error_in_a_shard_reaches_the_caller(monkeypatch):
    _parallel.set_num_threads(2)
    m, x = _vit(), _images(4)
    m.forward(x)

    def broken(*a, **k):
        raise FloatingPointError("shard failed")

    monkeypatch.setattr("minivit.models.vit.encoder_backward", broken)
    with pytest.raises(FloatingPointError, match="shard failed"):
        m.backward(np.ones((4, 5)))


def test_sum_grads_copes_with_shared_and_read_only_arrays():
    shared = np.ones(3)
    ro = np.full(2, 2.0)
    ro.flags.writeable = False
    parts = [{"a": shared, "b": shared, "c": ro}, {"a": np.ones(3), "b": np.ones(3), "c": ro}]
    total = sum_grads(parts, ["a", "b", "c"])
    np.testing.assert_array_equal(total["a"], 2.0)
    np.testing.assert_array_equal(total["b"], 2.0)
    np.testing.assert_array_equal(total["c"], 4.0)
    np.testing.assert_array_equal(shared, 2.0)  # one key's sum never lands in the other's


def test_float32_at_fast_path_sizes():
    """Sizes where the whole batch takes the pooled GEMMs and the blocked elementwise paths,
    and each shard their inline forms."""
    m = ViT(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=2,
            num_heads=2, dtype="float32", seed=0)  # fmt: skip
    x = _images(8, size=32).astype(np.float32)
    ref_out, ref_dx, ref_g, _ = _run(m, x, False, 2)
    out, dx, g, c = _run(m, x, True, 2)
    assert isinstance(c, ShardedRun) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-7)
    for k in g:
        scale = float(np.abs(ref_g[k]).max()) or 1.0
        np.testing.assert_allclose(g[k], ref_g[k], rtol=0, atol=1e-4 * scale, err_msg=k)


def test_fewer_samples_than_threads_run_whole_and_input_grad_false():
    m, x = _vit(), _images(2)
    _, _, _, c = _run(m, x, True, 3)
    assert not isinstance(c, ShardedRun)  # 2 samples, 3 threads: the per-op pool
    _parallel.set_num_threads(2)
    m.forward(x, train=True)
    assert isinstance(m._cache, ShardedRun)
    assert m.backward(np.ones((2, 5)), input_grad=False) is None
    assert set(m.grads) == set(m.params)


def test_gradient_with_the_wrong_batch_is_refused():
    _parallel.set_num_threads(2)
    m = _vit()
    m.forward(_images(4))
    for rows in (6, 2):
        with pytest.raises(ValueError, match=rf"grad has shape \({rows}, 5\).*4 samples"):
            m.backward(np.ones((rows, 5)))


def test_a_forward_run_whole_runs_its_inner_forward_whole():
    m = _vit()
    _parallel.set_num_threads(2)
    assert shard_bounds(m, 4, False) is not None
    assert sharding.run_whole(shard_bounds, m, 4, False) is None


def test_dropout_set_after_construction_is_seen():
    m = _vit()
    assert not m.forward_draws_random({"train": True})
    m.drop_rate = 0.3
    assert m.forward_draws_random({"train": True})
    m.drop_rate = 0.0
    m.drop_path = [0.0, 0.1]  # the per-block rates forward reads
    assert m.forward_draws_random({"train": True})


def test_joined_list_reads_like_the_joined_arrays():
    parts = [[np.zeros((1, 2)), np.ones((1, 2))], [np.zeros((2, 2)), 2 * np.ones((2, 2))]]
    j = sharding.join(np, parts)
    assert isinstance(j, sharding.JoinedList) and len(j) == 2
    np.testing.assert_array_equal(j[1], [[1, 1], [2, 2], [2, 2]])
    assert j[-1] is j[1]  # joined once
    assert [a.shape for a in j] == [(3, 2), (3, 2)] and len(j[0:1]) == 1
    with pytest.raises(IndexError):
        j[2]
    import copy
    import pickle

    for plain in (pickle.loads(pickle.dumps(j)), copy.deepcopy(j), j + [], [] + j):
        assert type(plain) is list and len(plain) == 2
        np.testing.assert_array_equal(plain[1], j[1])
    x = np.full((3, 2), 7.0)
    assert ([x] + j)[0] is x and (j + [x])[2] is x  # each side keeps its place


def test_shards_keep_no_gradients_after_the_sum():
    _parallel.set_num_threads(2)
    m = _vit()
    m.forward(_images(4))
    run = m._cache
    m.backward(np.ones((4, 5)))
    assert all(sh.grads == {} for sh in run.shards)
    assert m._cache is None and all(sh._cache.encoder.blocks == [None] * 2 for sh in run.shards)
    assert set(m.grads) == set(m.params)


def test_the_pool_state_is_clean_after_a_failing_task():
    _parallel.set_num_threads(2)

    def fail():
        raise KeyError("task")

    with pytest.raises(KeyError):
        _parallel.run_tasks([fail, lambda: None])
    assert not _parallel.in_block()


def test_vilt_pretraining_losses_and_grads_match_whole_batch():
    from test_vilt import batch, tiny

    from minivit.backend import get_backend
    from minivit.models import vilt_heads as H

    _parallel.set_num_threads(2)
    be = get_backend("numpy")
    m = tiny(be)
    ids, mask, images = batch(be)
    labels = np.full((4, 8), -100)
    labels[0, 2], labels[1, 1], labels[2, 3], labels[3, 5] = 7, 9, 11, 6
    itm = np.array([-100, 1, 0, 1])
    res = []
    for shards in (False, True):
        sharding.set_enabled(shards)
        losses, cache = H.pretrain_forward(m, ids, mask, images, labels, itm, wpa_weight=0.1)
        assert isinstance(m._cache, ShardedRun) == shards
        res.append((losses, dict(H.pretrain_backward(m, cache))))
    (l0, g0), (l1, g1) = res
    for k in ("loss", "itm", "mlm", "wpa"):
        _close(float(l1[k]), float(l0[k]), k)
    for k in g0:
        _close(g1[k], g0[k], k)


def test_env_mode_reads_the_variable_not_the_live_setting(monkeypatch):
    """``env_mode`` is what MINIVIT_SHARD says (for the training commands' --shards default),
    whatever set_mode or set_enabled made of the setting since."""
    for raw, want in (("processes", "processes"), ("threads", "threads"), ("0", "off"),
                      ("off", "off"), ("1", None)):  # fmt: skip
        monkeypatch.setattr(sharding._SWITCH, "raw", raw)
        assert sharding.env_mode() == want, raw
    monkeypatch.setattr(sharding._SWITCH, "raw", "1")
    sharding.set_enabled(False)  # turned off in code: the environment still names no mode
    assert sharding.env_mode() is None
    monkeypatch.setattr(sharding._SWITCH, "raw", "0")
    sharding.set_mode("threads")  # turned on in code: the environment still says off
    assert sharding.env_mode() == "off"
