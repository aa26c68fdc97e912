"""What every backward does with its ``dout`` (minivit/ops/_common.py, ``check_dout``), and the
options that take integers.

``dout`` must be an array of the forward output's backend, shape and dtype: never broadcast,
never cast (each gradient keeps its input's dtype). Before any work, a backward raises

- ``ValueError`` naming dout, the shape given and the output's, for another shape;
- ``TypeError`` naming both dtypes for the other float dtype, and both libraries for an array
  of the other backend.

Where the output is 0-d (cross-entropy's loss, the OT distance of one problem) a Python float
or int is a ``dout`` too. The cases are test_ops_contract.py's table (every op of
docs/ops/README.md), plus the other backwards of Sinkhorn and the OT distance of one problem.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_ops_contract import CASES, DTYPES, OpCase, _ot_inputs

from minivit import ops
from minivit.backend import get_backend
from minivit.ops._common import check_dout

_SK = {"epsilon": 0.1, "n_iters": 20}

DOUT_CASES = CASES + [
    OpCase(
        "sinkhorn_implicit",
        ops.sinkhorn_forward,
        ops.sinkhorn_implicit_backward,
        lambda r, t, be: (_ot_inputs(r, t), {"epsilon": 0.1, "n_iters": 200}),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "sinkhorn_value",
        ops.sinkhorn_value_forward,
        ops.sinkhorn_value_backward,
        lambda r, t, be: (_ot_inputs(r, t), _SK),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "ot_distance_one_problem",  # a 0-d distance
        ops.ot_distance_forward,
        ops.ot_distance_backward,
        lambda r, t, be: ([r.random((3, 4)).astype(t)], {"n_iters": 10}),
        {0: 0},
        1,
    ),
]
DOUT_IDS = [c.name for c in DOUT_CASES]


def _forward(case, backend, dtype, seed=0):
    """Host inputs, device inputs, out, cache."""
    rng = np.random.default_rng(seed)
    inputs, kwargs = case.make(rng, dtype, backend)
    dev = [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs]
    out, cache = case.fwd(*dev, **kwargs)
    return inputs, dev, out, cache


def _bad_shapes(shape):
    """Shapes a careless dout might have that NumPy would often take without a word: an extra
    axis of 1 (broadcasts), the first axis dropped (broadcasts), the first two axes swapped (the
    same size: a reshape takes it)."""
    if not shape:
        return [(1,), (3,)]
    bad = [shape + (1,), shape[1:]]
    if len(shape) >= 2 and shape[0] != shape[1]:
        bad.append((shape[1], shape[0]) + shape[2:])
    return bad


def _check_grads(case, inputs, dev, grads, dtype):
    assert isinstance(grads, tuple) and len(grads) == case.n_grads
    for i, slot in case.grad_slots.items():
        g = grads[slot]
        assert type(g) is type(dev[i]), f"{case.name}: grads[{slot}] left the backend"
        assert tuple(g.shape) == tuple(inputs[i].shape), f"{case.name}: grads[{slot}] shape"
        assert g.dtype == dtype, f"{case.name}: grads[{slot}] has dtype {g.dtype}, not {dtype}"


@pytest.mark.parametrize("case", DOUT_CASES, ids=DOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dout_of_another_shape_is_refused(case, dtype, backend):
    inputs, dev, out, cache = _forward(case, backend, dtype)
    shape = tuple(out.shape)
    for bad in _bad_shapes(shape):
        dout = backend.asarray(np.ones(bad, dtype=dtype))
        # named as the backward's parameter: dout, or dplan / dvalue / ddistance for OT
        want = r"d\w+ " + re.escape(f"must have shape {shape}") + ".*" + re.escape(f"got {bad}")
        with pytest.raises(ValueError, match=want):
            case.bwd(dout, cache)
    # the right shape still works (and the cache is still good after the refusals)
    dout = backend.asarray(np.random.default_rng(1).standard_normal(shape).astype(dtype))
    _check_grads(case, inputs, dev, case.bwd(dout, cache), dtype)


@pytest.mark.parametrize("case", DOUT_CASES, ids=DOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dout_of_the_other_dtype_is_refused(case, dtype, backend):
    other = np.float64 if dtype == np.float32 else np.float32
    inputs, dev, out, cache = _forward(case, backend, dtype)
    shape = tuple(out.shape)
    d = np.random.default_rng(1).standard_normal(shape)
    want = (
        rf"d\w+ has dtype {np.dtype(other).name} but the forward's output has dtype "
        f"{np.dtype(dtype).name}"
    )
    with pytest.raises(TypeError, match=want):
        case.bwd(backend.asarray(d.astype(other)), cache)
    _check_grads(case, inputs, dev, case.bwd(backend.asarray(d.astype(dtype)), cache), dtype)


@pytest.mark.parametrize("case", DOUT_CASES, ids=DOUT_IDS)
def test_dout_of_the_other_backend_is_refused(case, backend, request):
    # on numpy, a dout of the CPU stand-in for CuPy; on cupy (a GPU or the stand-in), NumPy's
    if backend.name == "numpy":
        other = request.getfixturevalue("cupy_stand_in")
    else:
        other = get_backend("numpy")
    _, _, out, cache = _forward(case, backend, np.float64)
    dout = other.asarray(np.ones(tuple(out.shape)))
    if backend.name != "numpy" and out.ndim == 0:  # scalar-valued: CuPy takes a host scalar
        (g,) = case.bwd(dout, cache)[:1]
        assert type(g) is type(out)
        return
    want = rf"d\w+ is a {other.name} array but the forward ran on {backend.name}"
    with pytest.raises(TypeError, match=want):
        case.bwd(dout, cache)


def test_a_dout_that_is_not_an_array_is_refused(backend):
    x = backend.asarray(np.ones((2, 3)))
    _, cache = ops.tanh_forward(x)
    with pytest.raises(TypeError, match=r"dout must be a \w+\.ndarray of shape \(2, 3\).*list"):
        ops.tanh_backward([[1.0] * 3] * 2, cache)
    with pytest.raises(TypeError, match=r"dout must be an array of shape \(2, 3\).*Python float"):
        ops.tanh_backward(1.0, cache)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_a_scalar_output_takes_a_python_number(dtype, backend):
    rng = np.random.default_rng(0)
    logits = backend.asarray(rng.standard_normal((3, 5)).astype(dtype))
    targets = backend.asarray(np.array([0, 4, 2]))
    _, cache = ops.cross_entropy_forward(logits, targets)
    (want,) = ops.cross_entropy_backward(backend.asarray(np.asarray(2.0, dtype=dtype)), cache)
    for dout in (2.0, 2):
        (got,) = ops.cross_entropy_backward(dout, cache)
        assert got.dtype == dtype
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    with pytest.raises(TypeError, match=r"got a Python bool"):
        ops.cross_entropy_backward(True, cache)
    # a NumPy scalar is a 0-d NumPy array: its dtype counts (numpy.float64 subclasses float)
    other = np.float64 if dtype == np.float32 else np.float32
    if backend.name == "numpy":
        with pytest.raises(TypeError, match=rf"dout has dtype {np.dtype(other).name}"):
            ops.cross_entropy_backward(other(2.0), cache)
        (got,) = ops.cross_entropy_backward(np.dtype(dtype).type(2.0), cache)
        np.testing.assert_array_equal(got, backend.to_numpy(want))
    # the OT distance of one problem is 0-d too
    dist, c_ot = ops.ot_distance_forward(backend.asarray(rng.random((3, 4)).astype(dtype)))
    (dcost,) = ops.ot_distance_backward(1.5, c_ot)
    assert dcost.dtype == dtype and tuple(dcost.shape) == (3, 4)
    np.testing.assert_array_equal(backend.to_numpy(dcost), 1.5 * backend.to_numpy(c_ot.plan))


def test_linear_gelu_overwrite_refuses_before_writing(backend):
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6, 8), (5, 8), (5,)))
    out, cache = ops.linear_gelu_forward(*map(backend.asarray, (x, w, b)))
    for bad in (np.ones((6, 4, 5), np.float32), np.ones((4, 6, 5))):  # the size; the shape
        dout = backend.asarray(bad)
        with pytest.raises((ValueError, TypeError), match=r"linear_gelu_backward: dout"):
            ops.linear_gelu_backward(dout, cache, overwrite_dout=True)
        np.testing.assert_array_equal(backend.to_numpy(dout), bad)  # not written


def test_gelu_out_buffer_is_checked_like_dout(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))
    _, cache = ops.gelu_forward(x)
    dout = backend.asarray(np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match=r"gelu_backward: out has dtype float64"):
        ops.gelu_backward(dout, cache, out=backend.asarray(np.zeros((3, 4))))
    with pytest.raises(ValueError, match=r"gelu_backward: out must have shape \(3, 4\)"):
        ops.gelu_backward(dout, cache, out=backend.asarray(np.zeros((4, 3), np.float32)))
    buf = backend.asarray(np.zeros((3, 4), np.float32))
    (dx,) = ops.gelu_backward(dout, cache, out=buf)
    assert dx is buf and dx.dtype == np.float32


def test_check_dout_accepts_what_only_looks_different():
    a = np.ones((2, 3), dtype=np.float32)
    check_dout("op", a.view(np.memmap), (2, 3), np.dtype(np.float32), np.ndarray)  # a subclass
    other = np.dtype("<f4").newbyteorder("=")  # float32, but another dtype object
    assert other == np.dtype(np.float32) and other is not np.dtype(np.float32)
    check_dout("op", a.astype(other), (2, 3), np.dtype("float32"), np.ndarray)
    check_dout("op", 1.0, (), np.dtype(np.float32), np.ndarray, scalar_ok=True)
    check_dout("op", np.float32(1.0), (), np.dtype(np.float32), np.ndarray)
    # a plain number only where the op takes one (a scalar-valued op): elsewhere an array
    with pytest.raises(TypeError, match="got a Python float"):
        check_dout("op", 1.0, (), np.dtype(np.float32), np.ndarray)
    with pytest.raises(ValueError, match=r"op: dout must have shape \(3, 2\)"):
        check_dout("op", a, (3, 2), np.dtype(np.float32), np.ndarray)


# --------------------------------------------------------------------------------------------
# Zero tokens in attention


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_attention_with_no_tokens(mask, backend):
    rng = np.random.default_rng(0)
    B, D = 2, 4
    x = backend.asarray(np.zeros((B, 0, D)))
    params = [backend.asarray(rng.standard_normal(s)) for s in ((3 * D, D), (3 * D,), (D, D), (D,))]
    key_mask = backend.asarray(np.zeros((B, 0), bool)) if mask else None
    out, cache = ops.attention_forward(x, *params, 2, key_mask=key_mask)
    assert tuple(out.shape) == (B, 0, D) and out.dtype == np.float64
    assert tuple(cache.attn.shape) == (B, 2, 0, 0)
    grads = ops.attention_backward(backend.asarray(np.zeros((B, 0, D))), cache)
    assert tuple(grads[0].shape) == (B, 0, D)
    for g, p in zip(grads[1:], params):
        assert tuple(g.shape) == tuple(p.shape)
        assert not backend.to_numpy(g).any()


# --------------------------------------------------------------------------------------------
# Integer options: any integral (operator.index), not a bool or a float


def _dev(backend, *arrays):
    return [backend.asarray(a) for a in arrays]


def _integer_option_calls(backend):
    """(name, call(value)) for every integer option; each call returns an array to compare."""
    rng = np.random.default_rng(0)
    x3 = rng.standard_normal((2, 3, 4))
    att = _dev(backend, x3, *(rng.standard_normal(s) for s in ((12, 4), (12,), (4, 4), (4,))))
    img = _dev(backend, rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((5, 3, 2, 2)))
    cost = backend.asarray(rng.random((2, 3, 4)))
    fmap = backend.asarray(rng.standard_normal((2, 4, 5, 5)))
    gb = _dev(backend, np.ones(4), np.zeros(4))
    wconv = backend.asarray(rng.standard_normal((3, 4, 3, 3)))
    return [
        ("num_heads", lambda v: ops.attention_forward(*att, v)[0]),
        ("patch_size", lambda v: ops.patch_embed_forward(*img, None, v)[0]),
        ("n_iters", lambda v: ops.sinkhorn_forward(cost, n_iters=v)[0]),
        (
            "check_every",
            lambda v: ops.sinkhorn_forward(cost, n_iters=5, tol=1e-9, check_every=v)[0],
        ),
        ("n_iters", lambda v: ops.ipot_forward(cost, n_iters=v)[0]),
        ("inner_iters", lambda v: ops.ipot_forward(cost, n_iters=3, inner_iters=v)[0]),
        ("num_groups", lambda v: ops.groupnorm_forward(fmap, *gb, v)[0]),
        ("kernel_size", lambda v: ops.maxpool2d_forward(fmap, v)[0]),
        ("stride", lambda v: ops.conv2d_forward(fmap, wconv, stride=v)[0]),
        ("padding", lambda v: ops.conv2d_forward(fmap, wconv, padding=(v, v))[0]),
        ("axis", lambda v: ops.softmax_forward(cost, axis=v)[0]),
    ]


@pytest.mark.filterwarnings("ignore::minivit.ops.SinkhornConvergenceWarning")
def test_integer_options_take_numpy_integers(backend):
    for name, call in _integer_option_calls(backend):
        want = call(2)
        for v in (np.int64(2), np.int32(2), np.uint8(2)):
            got = call(v)
            np.testing.assert_array_equal(
                backend.to_numpy(got), backend.to_numpy(want), err_msg=f"{name}={v!r}"
            )
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((1, 3, 4)))
    w = [backend.asarray(rng.standard_normal(s)) for s in ((12, 4), (12,), (4, 4), (4,))]
    _, cache = ops.attention_forward(x, *w, np.int64(2))
    assert type(cache.num_heads) is int  # kept as a Python int


@pytest.mark.filterwarnings("ignore::minivit.ops.SinkhornConvergenceWarning")
def test_integer_options_refuse_bools_and_floats(backend):
    """Another kind of value is a TypeError, as in the models' constructors; 0 a ValueError."""
    for name, call in _integer_option_calls(backend):
        for v in (True, np.True_, 2.0, np.float64(2.0), "2"):
            with pytest.raises(
                TypeError, match=rf"{name} must be .*, got \w+ .*{re.escape(repr(v))}"
            ):
                call(v)
        if name not in ("padding", "axis"):  # 0 is a valid padding and axis
            with pytest.raises(ValueError, match=rf"{name} must be .*, got 0"):
                call(0)


def test_real_options_take_numpy_floats(backend):
    cost = backend.asarray(np.random.default_rng(0).random((2, 3, 4)))
    want = ops.sinkhorn_forward(cost, epsilon=0.25, n_iters=5)[0]
    got = ops.sinkhorn_forward(cost, epsilon=np.float32(0.25), n_iters=5)[0]
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    np.testing.assert_array_equal(
        backend.to_numpy(ops.ipot_forward(cost, beta=np.float32(0.5), n_iters=3)[0]),
        backend.to_numpy(ops.ipot_forward(cost, beta=0.5, n_iters=3)[0]),
    )
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match=r"epsilon must be a real number"):
            ops.sinkhorn_forward(cost, epsilon=bad)
    for bad in (0.0, -1, np.inf):
        with pytest.raises(ValueError, match=r"epsilon must be (a positive number|finite)"):
            ops.sinkhorn_forward(cost, epsilon=bad)


def test_scalar_valued_ops_take_host_scalars_on_either_backend(backend):
    """CuPy takes host scalars as plain numbers: a NumPy scalar or 0-d host array of the loss's
    dtype is a valid dout on a CuPy forward too (it was, before the checks); another dtype is
    not. Ops whose output is 0-d only for 0-d inputs (relu) take arrays only."""
    rng = np.random.default_rng(3)
    logits = backend.asarray(rng.standard_normal((4, 5)).astype(np.float32))
    _, cache = ops.cross_entropy_forward(logits, backend.asarray(np.array([0, 1, 2, 3])))
    (want,) = ops.cross_entropy_backward(backend.asarray(np.float32(2.0)), cache)
    for dout in (np.float32(2.0), np.array(2.0, dtype=np.float32)):
        (got,) = ops.cross_entropy_backward(dout, cache)
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    with pytest.raises(TypeError, match="has dtype float64"):
        ops.cross_entropy_backward(np.float64(2.0), cache)
    _, c_relu = ops.relu_forward(backend.asarray(np.float32(1.5).reshape(())))
    with pytest.raises(TypeError, match="got a Python float"):
        ops.relu_backward(1.0, c_relu)
