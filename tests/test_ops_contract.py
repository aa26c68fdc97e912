"""The contract every core op keeps (API.md), checked on one table of cases.

- grads is a tuple with one entry per floating array parameter, None for an absent optional one;
- each gradient has its input's shape and dtype;
- forward and backward never change their inputs, ``dout`` or the cache (backward is replayable);
- float32 in, float32 out (no silent upcast), within 1e-5 relative of the float64 forward.

What a backward does with a ``dout`` of the wrong shape, dtype or backend: test_ops_dout.py, on
this same table.

The per-op files (test_ops_<family>.py) hold the references, gradient checks, oracles and errors.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
from _numgrad import rel_err

from minivit import ops
from minivit.ops import Cache


@dataclass
class OpCase:
    name: str
    fwd: object
    bwd: object
    make: object  # (host rng, dtype, backend) -> (inputs list, kwargs dict)
    grad_slots: dict  # input index -> grads slot
    n_grads: int
    none_slots: tuple = ()
    same_across_dtypes: bool = True  # False where the float32 run draws different randomness
    extra: dict = field(default_factory=dict)


def _n(rng, *shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _attention_inputs(rng, dtype, biases=True, mask=True):
    B, N, D = 2, 5, 6
    km = np.ones((B, N), dtype=bool)
    km[0, 3:] = False
    inputs = [
        _n(rng, B, N, D, dtype=dtype),
        _n(rng, 3 * D, D, dtype=dtype) * 0.4,
        _n(rng, 3 * D, dtype=dtype) if biases else None,
        _n(rng, D, D, dtype=dtype) * 0.4,
        _n(rng, D, dtype=dtype) if biases else None,
        3,
        km if mask else None,
    ]
    return inputs, {}


def _ce_inputs(rng, dtype, smoothing):
    logits = _n(rng, 3, 4, 5, dtype=dtype)
    targets = rng.integers(0, 5, size=(3, 4))
    targets[1, 2] = -100
    return [logits, targets], {"label_smoothing": smoothing}


def _ot_inputs(rng, dtype, marginals=True, pad=False):
    """cost (2, 3, 4) in [0, 1) and, with ``marginals``, a (2, 3) and b (2, 4) summing to 1;
    ``pad`` gives a of shape (3,), broadcast over the batch, and zeros in a and b (padding)."""
    B, n, m = 2, 3, 4
    cost = rng.random((B, n, m)).astype(dtype)
    if not marginals:
        return [cost]
    a = rng.random(n if pad else (B, n)) + 0.5
    b = rng.random((B, m)) + 0.5
    if pad:
        a[-1] = 0.0
        b[:, 0] = 0.0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    return [cost, a.astype(dtype), b.astype(dtype)]


def _cosine_inputs(rng, dtype, broadcast=False):
    """x (2, 3, 5), y (2, 4, 5); ``broadcast``: y (4, 5) and a zero row of x (a clamped norm)."""
    x = _n(rng, 2, 3, 5, dtype=dtype)
    y = _n(rng, 4, 5, dtype=dtype) if broadcast else _n(rng, 2, 4, 5, dtype=dtype)
    if broadcast:
        x[1, 2] = 0.0
    return [x, y], {}


_SK = {"epsilon": 0.1, "n_iters": 20}  # Sinkhorn's options in these cases


def _ot_case(name, fwd, bwd, n_grads, marginals, pad, kwargs):
    """A transport op on _ot_inputs: with marginals, every input has its grad (when the op
    returns three); without, only the cost, and the marginals' slots are None."""
    three = n_grads == 3
    return OpCase(
        name,
        fwd,
        bwd,
        lambda r, t, be: (_ot_inputs(r, t, marginals=marginals, pad=pad), kwargs),
        {0: 0, 1: 1, 2: 2} if marginals and three else {0: 0},
        n_grads,
        none_slots=(1, 2) if three and not marginals else (),
    )


CASES = [
    OpCase(
        "linear",
        ops.linear_forward,
        ops.linear_backward,
        lambda r, t, be: ([_n(r, 2, 3, 5, dtype=t), _n(r, 4, 5, dtype=t), _n(r, 4, dtype=t)], {}),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "linear_nobias",
        ops.linear_forward,
        ops.linear_backward,
        lambda r, t, be: ([_n(r, 7, 5, dtype=t), _n(r, 3, 5, dtype=t)], {}),
        {0: 0, 1: 1},
        3,
        none_slots=(2,),
    ),
    OpCase(
        "linear_gelu",
        ops.linear_gelu_forward,
        ops.linear_gelu_backward,
        lambda r, t, be: ([_n(r, 2, 3, 5, dtype=t), _n(r, 4, 5, dtype=t), _n(r, 4, dtype=t)], {}),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "layernorm",
        ops.layernorm_forward,
        ops.layernorm_backward,
        lambda r, t, be: (
            [_n(r, 2, 3, 7, dtype=t), _n(r, 7, dtype=t), _n(r, 7, dtype=t)],
            {},
        ),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "gelu",
        ops.gelu_forward,
        ops.gelu_backward,
        lambda r, t, be: ([_n(r, 3, 5, dtype=t) * 2], {}),
        {0: 0},
        1,
    ),
    OpCase(
        "gelu_tanh",
        ops.gelu_forward,
        ops.gelu_backward,
        lambda r, t, be: ([_n(r, 3, 5, dtype=t) * 2], {"approximate": "tanh"}),
        {0: 0},
        1,
    ),
    OpCase(
        "tanh",
        ops.tanh_forward,
        ops.tanh_backward,
        lambda r, t, be: ([_n(r, 4, 3, dtype=t) * 2], {}),
        {0: 0},
        1,
    ),
    OpCase(
        "softmax",
        ops.softmax_forward,
        ops.softmax_backward,
        lambda r, t, be: ([_n(r, 2, 3, 5, dtype=t) * 3], {}),
        {0: 0},
        1,
    ),
    OpCase(
        "softmax_axis1",
        ops.softmax_forward,
        ops.softmax_backward,
        lambda r, t, be: ([_n(r, 2, 3, 5, dtype=t) * 3], {"axis": 1}),
        {0: 0},
        1,
    ),
    OpCase(
        "dropout",
        ops.dropout_forward,
        ops.dropout_backward,
        lambda r, t, be: ([_n(r, 4, 6, dtype=t)], {"p": 0.4, "rng": be.rng(5)}),
        {0: 0},
        1,
        same_across_dtypes=False,
    ),
    OpCase(
        "dropout_eval",
        ops.dropout_forward,
        ops.dropout_backward,
        lambda r, t, be: ([_n(r, 4, 6, dtype=t)], {"p": 0.4, "train": False}),
        {0: 0},
        1,
    ),
    OpCase(
        "attention",
        ops.attention_forward,
        ops.attention_backward,
        lambda r, t, be: _attention_inputs(r, t),
        {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
        5,
    ),
    OpCase(
        "attention_nobias",
        ops.attention_forward,
        ops.attention_backward,
        lambda r, t, be: _attention_inputs(r, t, biases=False, mask=False),
        {0: 0, 1: 1, 3: 3},
        5,
        none_slots=(2, 4),
    ),
    OpCase(
        "embedding",
        ops.embedding_forward,
        ops.embedding_backward,
        lambda r, t, be: ([np.array([[1, 4, 1], [0, 6, 1]]), _n(r, 7, 4, dtype=t)], {}),
        {1: 0},
        1,
    ),
    OpCase(
        "patch_embed",
        ops.patch_embed_forward,
        ops.patch_embed_backward,
        lambda r, t, be: (
            [_n(r, 2, 3, 4, 6, dtype=t), _n(r, 5, 3, 2, 2, dtype=t), _n(r, 5, dtype=t), 2],
            {},
        ),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "patch_embed_nobias",
        ops.patch_embed_forward,
        ops.patch_embed_backward,
        lambda r, t, be: ([_n(r, 1, 2, 3, 3, dtype=t), _n(r, 4, 2, 3, 3, dtype=t), None, 3], {}),
        {0: 0, 1: 1},
        3,
        none_slots=(2,),
    ),
    OpCase(
        "cross_entropy",
        ops.cross_entropy_forward,
        ops.cross_entropy_backward,
        lambda r, t, be: _ce_inputs(r, t, 0.0),
        {0: 0},
        1,
    ),
    OpCase(
        "cross_entropy_smoothing",
        ops.cross_entropy_forward,
        ops.cross_entropy_backward,
        lambda r, t, be: _ce_inputs(r, t, 0.1),
        {0: 0},
        1,
    ),
    OpCase(
        "cosine_cost",
        ops.cosine_cost_forward,
        ops.cosine_cost_backward,
        lambda r, t, be: _cosine_inputs(r, t),
        {0: 0, 1: 1},
        2,
    ),
    OpCase(
        "cosine_cost_broadcast_clamped",
        ops.cosine_cost_forward,
        ops.cosine_cost_backward,
        lambda r, t, be: _cosine_inputs(r, t, broadcast=True),
        {0: 0, 1: 1},
        2,
    ),
    # The transport ops on _ot_inputs (see _ot_case): Sinkhorn and IPOT return (dcost, da, db);
    # ot_distance one grad only, (dcost,): API.md's table row, which the code follows, not its
    # general rule (one entry per floating array parameter would be (dcost, da, db)).
    *(
        _ot_case(f"{op}{variant}", fwd, bwd, n_grads, marginals, pad, kwargs)
        for op, fwd, bwd, n_grads, variants in (
            (
                "sinkhorn",
                ops.sinkhorn_forward,
                ops.sinkhorn_backward,
                3,
                [
                    ("", True, False, _SK),
                    ("_uniform", False, False, _SK),
                    ("_padded", True, True, _SK),
                ],
            ),
            (
                "ipot",
                ops.ipot_forward,
                ops.ipot_backward,
                3,
                [
                    ("", True, False, {}),
                    ("_uniform", False, False, {"n_iters": 10}),
                    ("_padded", True, True, {"beta": 0.2, "inner_iters": 2}),
                ],
            ),
            (
                "ot_distance",
                ops.ot_distance_forward,
                ops.ot_distance_backward,
                1,
                [
                    ("", True, False, {}),
                    ("_sinkhorn", True, True, {"method": "sinkhorn", **_SK}),
                    ("_uniform", False, False, {"n_iters": 10}),
                ],
            ),
        )
        for variant, marginals, pad, kwargs in variants
    ),
    OpCase(
        "conv2d",
        ops.conv2d_forward,
        ops.conv2d_backward,
        lambda r, t, be: (
            [_n(r, 2, 3, 5, 5, dtype=t), _n(r, 4, 3, 3, 3, dtype=t), _n(r, 4, dtype=t)],
            {"stride": 1, "padding": 1},
        ),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "conv2d_stride2_nobias",
        ops.conv2d_forward,
        ops.conv2d_backward,
        lambda r, t, be: (
            [_n(r, 1, 2, 6, 5, dtype=t), _n(r, 3, 2, 3, 2, dtype=t), None],
            {"stride": 2, "padding": (1, 0)},
        ),
        {0: 0, 1: 1},
        3,
        none_slots=(2,),
    ),
    OpCase(
        "relu",
        ops.relu_forward,
        ops.relu_backward,
        lambda r, t, be: ([_n(r, 2, 3, 4, 5, dtype=t)], {}),
        {0: 0},
        1,
    ),
    OpCase(
        "groupnorm",
        ops.groupnorm_forward,
        ops.groupnorm_backward,
        lambda r, t, be: (
            [_n(r, 2, 4, 3, 5, dtype=t), _n(r, 4, dtype=t), _n(r, 4, dtype=t), 2],
            {},
        ),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "maxpool2d",
        ops.maxpool2d_forward,
        ops.maxpool2d_backward,
        lambda r, t, be: ([_n(r, 2, 3, 5, 6, dtype=t)], {"kernel_size": 2}),  # a row dropped
        {0: 0},
        1,
    ),
]
# Arrays above 2^14 entries, where NumPy may take a blocked/threaded fast path (ops/_fast.py): the
# same contract must hold there.
CASES += [
    OpCase(
        "gelu_large",
        ops.gelu_forward,
        ops.gelu_backward,
        lambda r, t, be: ([_n(r, 64, 520, dtype=t) * 3], {}),
        {0: 0},
        1,
    ),
    OpCase(
        "layernorm_large",
        ops.layernorm_forward,
        ops.layernorm_backward,
        lambda r, t, be: ([_n(r, 64, 520, dtype=t), _n(r, 520, dtype=t), _n(r, 520, dtype=t)], {}),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "linear_gelu_large",  # float32: the fast GELU keeps its derivative, not its input
        ops.linear_gelu_forward,
        ops.linear_gelu_backward,
        lambda r, t, be: (
            [_n(r, 64, 24, dtype=t), _n(r, 520, 24, dtype=t), _n(r, 520, dtype=t)],
            {},
        ),
        {0: 0, 1: 1, 2: 2},
        3,
    ),
    OpCase(
        "softmax_large",
        ops.softmax_forward,
        ops.softmax_backward,
        lambda r, t, be: ([_n(r, 64, 520, dtype=t) * 5], {}),
        {0: 0},
        1,
    ),
]
IDS = [c.name for c in CASES]
DTYPES = [np.float32, np.float64]


def _run(case, backend, dtype, seed=0):
    """Host inputs, device inputs, kwargs, out, cache, host dout, device dout, grads."""
    rng = np.random.default_rng(seed)
    inputs, kwargs = case.make(rng, dtype, backend)
    dev = [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs]
    out, cache = case.fwd(*dev, **kwargs)
    dout_h = rng.standard_normal(tuple(out.shape)).astype(dtype)
    dout = backend.asarray(dout_h)
    grads = case.bwd(dout, cache)
    return inputs, dev, kwargs, out, cache, dout_h, dout, grads


def _snapshot(obj, backend):
    """Host copies of every array reachable from a cache (nested caches included)."""
    if isinstance(obj, Cache):
        return {k: _snapshot(v, backend) for k, v in vars(obj).items()}
    if isinstance(obj, types.ModuleType):
        return obj  # an array module (ipot's cache.xp): kept, compared by identity
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):
        return backend.to_numpy(obj).copy()
    return copy.deepcopy(obj)


def _assert_same(a, b, where="cache"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=f"{where} was modified")
    else:
        assert a == b, f"{where} was modified"


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_grads_tuple_shapes_and_dtypes(case, dtype, backend):
    inputs, dev, _, out, _, _, _, grads = _run(case, backend, dtype)
    assert isinstance(grads, tuple), f"{case.name}: backward must return a tuple"
    assert len(grads) == case.n_grads
    for slot in case.none_slots:
        assert grads[slot] is None, f"{case.name}: grads[{slot}] must be None for an absent input"
    for i, slot in case.grad_slots.items():
        g = grads[slot]
        assert g is not None, f"{case.name}: grads[{slot}] is None"
        assert type(g) is type(dev[i]), f"{case.name}: grads[{slot}] left the backend"
        assert tuple(g.shape) == tuple(inputs[i].shape), f"{case.name}: grads[{slot}] shape"
        assert g.dtype == dtype, f"{case.name}: grads[{slot}] has dtype {g.dtype}, not {dtype}"
        assert np.all(np.isfinite(backend.to_numpy(g)))
    # The output keeps the input's dtype: float32 is never silently upcast.
    assert out.dtype == dtype, f"{case.name}: output dtype {out.dtype} for {dtype.__name__} input"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inputs_dout_and_cache_not_mutated(case, backend):
    rng = np.random.default_rng(1)
    inputs, kwargs = case.make(rng, np.float64, backend)
    dev = [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs]
    before = [backend.to_numpy(a).copy() if hasattr(a, "dtype") else a for a in dev]
    out, cache = case.fwd(*dev, **kwargs)
    dout = backend.asarray(rng.standard_normal(tuple(out.shape)))
    dout_before = backend.to_numpy(dout).copy()
    cache_before = _snapshot(cache, backend)
    grads1 = case.bwd(dout, cache)
    _assert_same(_snapshot(cache, backend), cache_before)
    grads2 = case.bwd(dout, cache)  # replaying the cache gives the same grads
    for a, b in zip(grads1, grads2):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    np.testing.assert_array_equal(backend.to_numpy(dout), dout_before, err_msg="dout was modified")
    for i, (a, b) in enumerate(zip(dev, before)):
        if isinstance(b, np.ndarray):
            np.testing.assert_array_equal(backend.to_numpy(a), b, err_msg=f"input {i} modified")
    # A gradient must not alias dout or an input: modifying it must leave them alone.
    for g in grads1:
        if g is not None:
            g[...] = 12345.0
    np.testing.assert_array_equal(
        backend.to_numpy(dout), dout_before, err_msg="a grad aliases dout"
    )
    for i, (a, b) in enumerate(zip(dev, before)):
        if isinstance(b, np.ndarray):
            np.testing.assert_array_equal(backend.to_numpy(a), b, err_msg=f"grad aliases input {i}")


def _cast(xs, dtype):
    """Floating host arrays cast to dtype; ids, targets, masks and options unchanged."""
    return [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in xs]


@pytest.mark.parametrize("case", [c for c in CASES if c.same_across_dtypes], ids=lambda c: c.name)
def test_float32_forward_close_to_float64(case, backend):
    inputs64, kwargs = case.make(np.random.default_rng(2), np.float64, backend)
    inputs32 = _cast(inputs64, np.float32)

    def forward(xs):
        xs = [backend.asarray(a) if isinstance(a, np.ndarray) else a for a in xs]
        return backend.to_numpy(case.fwd(*xs, **kwargs)[0])

    out32 = forward(inputs32)
    assert out32.dtype == np.float32
    # Against float64 on the same (float32-rounded) inputs, so only the arithmetic differs,
    # and against float64 on the original inputs.
    assert rel_err(out32, forward(_cast(inputs32, np.float64))) <= 1e-5
    assert rel_err(out32, forward(inputs64)) <= 1e-5
