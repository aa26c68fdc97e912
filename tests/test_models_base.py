"""minivit.models.base: the Model plumbing ViT and HybridViT share (dtype, backend, state dicts)."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.models.base import Model, load_state_dict_into, resolve_dtype
from minivit.models.hybrid import HybridViT
from minivit.models.vit import ViT

HYBRID = dict(img_size=8, in_chans=1, num_classes=3, stem_chs=4, stages=[[8, 1, 2]],
              embed_dim=8, depth=1, num_heads=2)  # fmt: skip
VIT = dict(img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depth=1,
           num_heads=2)  # fmt: skip


@pytest.mark.parametrize("cls, cfg", [(ViT, VIT), (HybridViT, HYBRID)])
def test_models_share_the_base(cls, cfg):
    m = cls(**cfg, dtype=np.float64)  # dtype objects as well as names
    assert isinstance(m, Model) and m.dtype == "float64"
    assert repr(m).startswith(f"{cls.__name__}(") and "dtype='float64'" in repr(m)
    assert m.num_params() == sum(int(np.prod(s)) for s in m.param_shapes().values())
    assert list(m.params) == list(m.param_shapes())
    # config rebuilds the model (checkpoints rely on it)
    again = cls(**m.config, dtype="float64")
    assert all(np.array_equal(again.params[k], v) for k, v in m.params.items())


def test_resolve_dtype_rejects_other_types():
    from minivit.backend import get_backend

    be = get_backend("numpy")
    assert resolve_dtype(np.dtype("float32"), be) == "float32"
    for bad in ("float16", np.int64, "nonsense"):
        with pytest.raises(TypeError, match="dtype must be 'float32' or 'float64'"):
            resolve_dtype(bad, be)


def test_load_state_dict_names_every_problem():
    m = HybridViT(**HYBRID)
    sd = m.state_dict()
    sd.pop("cls_token")
    sd["pos_embed"] = np.zeros((1, 3, 8))
    sd["extra.weight"] = np.zeros(2)
    with pytest.raises(ValueError) as err:
        m.load_state_dict(sd)
    msg = str(err.value)
    assert "HybridViT" in msg and "cls_token" in msg and "pos_embed" in msg
    assert "extra.weight" in msg
    sd["pos_embed"] = m.state_dict()["pos_embed"] + 1.0
    missing, unexpected = load_state_dict_into(m, sd, strict=False)
    assert (missing, unexpected) == (["cls_token"], ["extra.weight"])
    assert np.allclose(m.state_dict()["pos_embed"], sd["pos_embed"])


@pytest.mark.parametrize("cls, cfg", [(ViT, VIT), (HybridViT, HYBRID)])
def test_to_moves_the_parameters(backend, cls, cfg):
    m = cls(**cfg, dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 1, cfg["img_size"], cfg["img_size"]))
    ref = m.forward(x)
    m.backward(np.ones_like(ref))
    assert m.to(backend) is m and m.backend.name == backend.name
    assert m.grads == {} and m._cache is None
    out = m.forward(backend.asarray(x))
    np.testing.assert_allclose(backend.to_numpy(out), ref, rtol=1e-10, atol=1e-12)
    before = m.state_dict()
    m.to("numpy")
    assert all(np.array_equal(m.params[k], v) for k, v in before.items())


def test_load_state_dict_checks_every_entry_before_it_copies_any():
    """The dtype check sat in the copy loop: a state dict whose 10th entry was an int array
    raised after 9 parameters had been overwritten. Now every entry is checked first, and one
    error names every problem (torch tensors and lists included, which gave "'torch.dtype'
    object has no attribute 'kind'" and a confusing shape message)."""
    import torch

    m = ViT(**VIT, dtype="float64")
    before = m.state_dict()
    good = ViT(**VIT, dtype="float64", seed=1).state_dict()
    tenth = list(good)[9]
    cases = [
        ({tenth: good[tenth].astype(np.int64)}, rf"not floating arrays: {tenth}: int64"),
        ({"head.bias": torch.zeros(3, dtype=torch.float64)}, r"head.bias: torch.Tensor \(conv"),
        ({"head.bias": [0.0, 0.0, 0.0]}, "not numpy or cupy arrays: head.bias: list"),
    ]
    for change, match in cases:
        with pytest.raises(TypeError, match=match):
            m.load_state_dict({**good, **change})
        assert all(np.array_equal(m.params[k], v) for k, v in before.items())
    # every problem in one error, types and keys alike
    bad = {**good, tenth: good[tenth].astype(np.int32), "head.bias": [0.0]}
    bad.pop("cls_token")
    with pytest.raises(TypeError) as err:
        m.load_state_dict(bad)
    assert all(s in str(err.value) for s in (tenth, "head.bias: list", "missing keys: cls_token"))
    with pytest.raises(TypeError, match="state_dict must be a dict of name -> array, got list"):
        m.load_state_dict(list(good.values()))
    assert all(np.array_equal(m.params[k], v) for k, v in before.items())
    m.load_state_dict({k: v.astype(np.float32) for k, v in good.items()})  # other floats: cast
    assert all(m.params[k].dtype == np.float64 for k in m.params)


def test_load_state_dict_keeps_device_arrays_on_the_device(cupy_stand_in):
    """A CuPy model loading CuPy arrays copies them on the device: it used to read every array
    back to the host and upload it again (on the stand-in, a sync and an h2d per parameter).
    The parameters are copies, not the caller's arrays, cast to the model's dtype."""
    import _cupy_stand_in as si

    cp = cupy_stand_in.xp
    src = ViT(**VIT, dtype="float32", seed=1, backend="cupy")
    m = ViT(**VIT, dtype="float64", backend="cupy")
    with si.counting() as c:
        m.load_state_dict(src.params)
    assert c["sync"] == 0 and c["h2d"] == 0, dict(c)
    assert c["launch"] == len(src.params)  # one cast-and-copy each
    for k, v in src.params.items():
        assert m.params[k] is not v and m.params[k].dtype == np.float64
        np.testing.assert_array_equal(m.params[k].get(), v.get())
    fortran = {k: cp.asfortranarray(v) for k, v in src.params.items()}
    m.load_state_dict(fortran)  # another layout in: C-contiguous parameters out (the kernels)
    assert all(p.flags.c_contiguous for p in m.params.values())
    same = ViT(**VIT, dtype="float32", backend="cupy")
    same.load_state_dict(src.params)  # no cast: still a copy of its own
    key = "head.weight"
    same.params[key][...] = 0
    assert float(abs(src.params[key]).sum()) > 0


def test_loaded_parameters_are_c_contiguous_whatever_the_layout_given():
    """Weights given as transposed views or in Fortran order (torch's .t().numpy(), say) load
    C-contiguous: the fast paths and the kernels take only those, and would be skipped."""
    src = ViT(**VIT, dtype="float64", seed=1)
    m = ViT(**VIT, dtype="float64")
    m.load_state_dict({k: np.asfortranarray(v) for k, v in src.params.items()})
    assert all(p.flags.c_contiguous for p in m.params.values())
    m.load_state_dict({k: np.asfortranarray(v).astype(np.float32) for k, v in src.params.items()})
    assert all(p.flags.c_contiguous for p in m.params.values())


def test_load_state_dict_takes_arrays_of_either_backend(backend):
    other = ViT(**VIT, dtype="float64", seed=1, backend=backend)
    want = other.state_dict()
    for target in (backend.name, "numpy"):
        m = ViT(**VIT, dtype="float64", backend=target)
        m.load_state_dict(other.params)  # arrays of ``backend``, into a model on ``target``
        assert all(np.array_equal(m.backend.to_numpy(m.params[k]), v) for k, v in want.items())
