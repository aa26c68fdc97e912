"""What a model refuses, and how: output gradients that do not fit the forward's output (the
same error whatever the thread count or batch size), a forward cache made stale by new
parameters, and bad constructor arguments. NumPy only, tiny models: a few seconds."""

from __future__ import annotations

import numpy as np
import pytest

from minivit import _parallel
from minivit.models import ViT, sharding
from minivit.models.hybrid import HybridViT
from minivit.models.sharding import ShardedRun
from minivit.models.vilt import ViLT

pytestmark = pytest.mark.usefixtures("keep_parallel_settings")

VIT = dict(img_size=4, patch_size=2, in_chans=1, num_classes=2, embed_dim=8, depth=1,
           num_heads=2)  # fmt: skip
HYBRID = dict(img_size=8, in_chans=1, num_classes=2, stem_chs=4, stages=[[8, 1, 2]],
              embed_dim=8, depth=1, num_heads=2)  # fmt: skip
VILT = dict(vocab_size=11, max_text_len=5, img_size=8, patch_size=4, in_chans=3, embed_dim=8,
            depth=1, num_heads=2)  # fmt: skip

# (threads, shards on): one thread runs whole; two threads cut the batch of 4 into shards
PATHS = {"whole": (1, True), "shards": (2, True), "shards-off": (2, False)}


def _path(name):
    threads, shards = PATHS[name]
    _parallel.set_num_threads(threads)
    sharding.set_enabled(shards)
    return name == "shards"


def _images(model, b=4, seed=0):
    s = model.img_size
    return np.random.default_rng(seed).standard_normal((b, model.in_chans, s, s))


def _vilt_inputs(b=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 11, (b, 3))
    ids[:, 0] = 1
    return ids, np.ones((b, 3), bool), rng.standard_normal((b, 3, 8, 8))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("cls, cfg", [(ViT, VIT), (HybridViT, HYBRID)], ids=["vit", "hybrid"])
def test_a_misshaped_gradient_is_refused_on_every_path(cls, cfg, path):
    """dlogits of another shape than the logits' (4, 2) is refused with the message that names
    the expected shape, before anything runs, with one thread as with batch shards: the
    transposed (2, 4) gave a wrong head.bias gradient with one thread, and (2,) a deep
    reshape error; (4, 3) passed the shards' batch-only check."""
    m = cls(**cfg, dtype="float64")
    x = _images(m)
    d = np.random.default_rng(1).standard_normal((4, 2))
    sharded = _path(path)
    m.forward(x)
    assert isinstance(m._cache, ShardedRun) == sharded
    for bad in (d.T.copy(), np.ones(2), np.ones((4, 3)), np.ones((3, 2)), np.ones((1, 4, 2))):
        shape = rf"\({', '.join(map(str, bad.shape))},?\)"
        with pytest.raises(ValueError, match=rf"grad has shape {shape}.*4 samples.*\(4, 2\)"):
            m.backward(bad)
    with pytest.raises(TypeError, match=r"an array of shape \(4, 2\), got list"):
        m.backward(d.tolist())
    # a refused gradient leaves the cache whole: the right one still works
    m.backward(d)
    np.testing.assert_allclose(m.grads["head.bias"], d.sum(0), rtol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_vilt_output_gradients_are_checked_key_by_key_on_every_path(path):
    m = ViLT(**VILT, dtype="float64")
    ids, mask, images = _vilt_inputs()
    sharded = _path(path)
    out = m.forward(ids, mask, images)
    assert isinstance(m._cache, ShardedRun) == sharded
    good = {k: np.ones(out[k].shape) for k in ("text_feats", "image_feats", "pooled")}
    for key, shape in (("text_feats", (4, 1, 8)), ("image_feats", (4, 5, 3)), ("pooled", (1, 8))):
        want = rf"\({', '.join(map(str, out[key].shape))}\)"
        with pytest.raises(ValueError, match=rf"grad\['{key}'\] has shape .*{want}"):
            m.backward({**good, key: np.ones(shape)})  # one thread broadcast (1, 8) silently
    with pytest.raises(
        TypeError, match="dict of output gradients.*text_feats, image_feats, pooled"
    ):
        m.backward(np.ones((4, 8)))  # was: unhashable type: 'numpy.ndarray'
    with pytest.raises(ValueError, match="backward takes gradients for.*got 'attn'"):
        m.backward({"attn": np.ones(3)})
    with pytest.raises(TypeError, match=r"grad\['pooled'\] must be None or an array"):
        m.backward({"pooled": [0.0] * 8})
    m.backward({**good, "text_feats": None})  # None and a missing key count as zero
    assert set(m.grads) == set(m.params)


@pytest.mark.parametrize("path", ["whole", "shards"])
def test_a_gradient_on_the_other_backend_is_refused_by_the_model(cupy_stand_in, path):
    """A CuPy gradient for a NumPy model (and the reverse) is refused by the model's backward,
    naming both backends, before the batch is cut: it used to reach the head's linear_backward,
    whose error named an op the caller never called. ViLT's dict is checked key by key."""
    cp = cupy_stand_in.xp
    _path(path)
    m = ViT(**VIT, dtype="float64")
    m.forward(_images(m))
    d = np.ones((4, 2))
    with pytest.raises(TypeError, match="ViT.backward: grad is a cupy array but the model runs "
                       "on numpy; move it there first"):  # fmt: skip
        m.backward(cp.asarray(d))
    m.backward(d)  # the cache was left whole
    mc = ViT(**VIT, dtype="float64", backend="cupy")
    mc.forward(cp.asarray(_images(mc)))
    with pytest.raises(TypeError, match="grad is a numpy array but the model runs on cupy"):
        mc.backward(d)
    v = ViLT(**VILT, dtype="float64")
    out = v.forward(*_vilt_inputs())
    with pytest.raises(TypeError, match=r"ViLT.backward: grad\['pooled'\] is a cupy array"):
        v.backward({"pooled": cp.ones(out["pooled"].shape)})


@pytest.mark.parametrize("path", ["whole", "shards"])
def test_new_parameters_make_a_pending_forward_stale(path):
    """forward, load_state_dict, backward gave the gradients of the replaced weights: loading
    drops the forward's cache, and backward says why. A refused load changes nothing, so the
    cache stays usable."""
    m, other = ViT(**VIT, dtype="float64"), ViT(**VIT, dtype="float64", seed=1)
    x, d = _images(m), np.ones((4, 2))
    _path(path)
    m.forward(x)
    bad = other.state_dict()
    bad["head.bias"] = bad["head.bias"].astype(np.int64)
    with pytest.raises(TypeError):
        m.load_state_dict(bad)
    m.backward(d)  # the refused load left the cache
    m.forward(x)
    m.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="load_state_dict replaced the parameters since"):
        m.backward(d)
    # a fresh forward on the new weights gives what the other model gives
    m.forward(x)
    m.backward(d)
    other.forward(x)
    other.backward(d)
    for k in m.params:
        np.testing.assert_allclose(m.grads[k], other.grads[k], rtol=1e-12, atol=1e-14)


def test_vilt_load_state_dict_drops_the_cache_too():
    m = ViLT(**VILT, dtype="float64")
    m.forward(*_vilt_inputs())
    m.load_state_dict(ViLT(**VILT, dtype="float64", seed=2).state_dict())
    with pytest.raises(RuntimeError, match="load_state_dict replaced"):
        m.backward({"pooled": np.ones((4, 8))})


@pytest.mark.parametrize(
    "cls, base, bad, match",
    [
        (ViT, VIT, dict(patch_size=0), "patch_size must be >= 1"),  # was ZeroDivisionError
        (ViT, VIT, dict(in_chans=0), "in_chans must be >= 1"),  # was ZeroDivisionError
        (ViT, VIT, dict(img_size=0), "img_size must be >= 1"),
        (ViT, VIT, dict(depth=-1), "depth must be >= 0"),  # was a drop_path error in forward
        (ViT, VIT, dict(mlp_ratio=0), "mlp_ratio must be a finite number > 0"),
        (ViT, VIT, dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number"),
        (ViT, VIT, dict(mlp_ratio=0.05), "mlp_ratio 0.05 leaves the MLP no hidden unit"),
        (ViT, VIT, dict(embed_dim=0), "embed_dim must be >= 1"),  # was an attention error
        (ViT, VIT, dict(num_heads=0), "num_heads must be >= 1"),
        (ViT, VIT, dict(num_classes=-1), "num_classes must be >= 0"),
        (ViT, VIT, dict(patch_size=2.5), "patch_size must be a whole number"),
        (ViT, VIT, dict(eps=-1e-6), "eps must be a finite number >= 0"),
        (ViT, VIT, dict(drop_path_rate=float("nan")), "drop_path_rate"),
        (HybridViT, HYBRID, dict(stages=((8, 1),)), r"stages\[0\] must be \[channels"),
        (HybridViT, HYBRID, dict(stem_chs=0), "stem_chs must be >= 1"),
        (HybridViT, HYBRID, dict(gn_groups=0), "gn_groups must be >= 1"),
        (HybridViT, HYBRID, dict(depth=-2), "depth must be >= 0"),
        (HybridViT, HYBRID, dict(in_chans=0), "in_chans must be >= 1"),
        (ViLT, VILT, dict(patch_size=0), "patch_size must be >= 1"),
        (ViLT, VILT, dict(embed_dim=0), "embed_dim must be >= 1"),
        (ViLT, VILT, dict(depth=-1), "depth must be >= 0"),
        (ViLT, VILT, dict(mlp_ratio=0), "mlp_ratio must be a finite number > 0"),
        (ViLT, VILT, dict(in_chans=0), "in_chans must be >= 1"),
        (ViLT, VILT, dict(num_vqa_labels=-1), "num_vqa_labels must be >= 0"),
        (ViLT, VILT, dict(text_eps=float("inf")), "text_eps must be a finite number"),
    ],
)
def test_bad_constructor_arguments_are_named(cls, base, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(**{**base, **bad})


def test_constructor_argument_types():
    with pytest.raises(TypeError, match="img_size must be an int, got str"):
        ViT(**{**VIT, "img_size": "4"})
    with pytest.raises(TypeError, match="stages must be a list"):
        HybridViT(**{**HYBRID, "stages": 8})
    # NumPy numbers and whole floats (a config read from JSON) are taken, typed as the config's
    m = ViT(**{**VIT, "img_size": np.int64(4), "patch_size": 2.0, "mlp_ratio": np.float32(2)})
    assert m.config["img_size"] == 4 and type(m.config["img_size"]) is int
    assert type(m.config["patch_size"]) is int and m.config["mlp_ratio"] == 2.0
    assert HybridViT(**{**HYBRID, "stages": ((8, 1, 2),)}).config["stages"] == [[8, 1, 2]]
    no_blocks = ViT(**{**VIT, "depth": 0}, dtype="float64")  # depth 0 is a model still
    assert no_blocks.forward(_images(no_blocks)).shape == (4, 2)


@pytest.mark.parametrize("path", ["whole", "shards"])
def test_backward_after_forward_features_says_so(path):
    m = ViT(**VIT, dtype="float64")
    _path(path)
    feats = m.forward_features(_images(m))
    with pytest.raises(RuntimeError, match="the last forward was forward_features"):
        m.backward(np.ones(feats.shape))  # was: 'Cache' object has no attribute 'head'
    # the usual mistake, logits' gradient after forward_features, gets the same answer (it got
    # a shape error inviting a features-shaped gradient)
    with pytest.raises(RuntimeError, match="the last forward was forward_features"):
        m.backward(np.ones((feats.shape[0], m.num_classes)))
