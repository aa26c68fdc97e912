"""embedding_forward / embedding_backward: reference, repeated ids, gradients, oracle, errors."""

from __future__ import annotations

import numpy as np
import pytest
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

id_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3)
id_dtypes = st.sampled_from([np.int64, np.int32, np.uint8])


def _draw(seed, shape, V, D, id_dtype):
    r = np.random.default_rng(seed)
    ids = r.integers(0, V, size=shape).astype(id_dtype)  # small V: many repeats
    return ids, r.standard_normal((V, D))


def ref_embedding(ids, table):
    out = np.empty((*ids.shape, table.shape[1]))
    for idx in np.ndindex(*ids.shape):
        out[idx] = table[int(ids[idx])]
    return out


def ref_dtable(ids, dout, V):
    dtable = np.zeros((V, dout.shape[-1]))
    for idx in np.ndindex(*ids.shape):
        dtable[int(ids[idx])] += dout[idx]
    return dtable


@fixture_settings()
@given(
    shape=id_shapes,
    V=st.integers(1, 6),
    D=st.integers(1, 5),
    id_dtype=id_dtypes,
    seed=st.integers(0, 2**31),
)
def test_forward_and_backward_match_reference(backend, shape, V, D, id_dtype, seed):
    ids, table = _draw(seed, shape, V, D, id_dtype)
    out, cache = ops.embedding_forward(backend.asarray(ids), backend.asarray(table))
    np.testing.assert_array_equal(backend.to_numpy(out), ref_embedding(ids, table))
    g = np.random.default_rng(seed + 1).standard_normal((*shape, D))
    (dtable,) = ops.embedding_backward(backend.asarray(g), cache)
    assert rel_err(backend.to_numpy(dtable), ref_dtable(ids, g, V)) <= 1e-14


@fixture_settings()
@given(shape=id_shapes, V=st.integers(1, 6), D=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_backward_matches_central_differences(backend, shape, V, D, seed):
    ids, table = _draw(seed, shape, V, D, np.int64)
    check_grads(
        backend, ops.embedding_forward, ops.embedding_backward, [ids, table], {1: 0}, seed=seed
    )


@fixture_settings()
@given(shape=id_shapes, V=st.integers(1, 6), D=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_matches_torch(backend, shape, V, D, seed):
    torch = require("torch")
    ids, table = _draw(seed, shape, V, D, np.int64)
    out, cache = ops.embedding_forward(backend.asarray(ids), backend.asarray(table))
    g = np.random.default_rng(seed + 1).standard_normal((*shape, D))
    (dtable,) = ops.embedding_backward(backend.asarray(g), cache)
    tt = to_torch(table)
    tout = torch.nn.functional.embedding(torch.from_numpy(np.asarray(ids)), tt)
    tout.backward(torch.from_numpy(g))
    errs = (
        rel_err(backend.to_numpy(out), tout.detach().numpy()),
        rel_err(backend.to_numpy(dtable), tt.grad.numpy()),
    )
    assert record_torch_err("embedding", *errs) <= 1e-10


def test_repeated_ids_add_up(backend):
    ids = np.array([2, 2, 2, 0])
    table = np.zeros((3, 2))
    _, cache = ops.embedding_forward(backend.asarray(ids), backend.asarray(table))
    (dtable,) = ops.embedding_backward(backend.asarray(np.ones((4, 2))), cache)
    np.testing.assert_array_equal(backend.to_numpy(dtable), [[1, 1], [0, 0], [3, 3]])


def test_bad_input(backend):
    table = backend.asarray(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\).*got values in \[0, 5\]"):
        ops.embedding_forward(backend.asarray(np.array([0, 5])), table)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\).*\[-1, 2\]"):
        ops.embedding_forward(backend.asarray(np.array([-1, 2])), table)
    with pytest.raises(TypeError, match=r"ids must be an integer array"):
        ops.embedding_forward(backend.asarray(np.array([0.0, 1.0])), table)
    with pytest.raises(TypeError, match=r"table must have dtype float32 or float64, got int64"):
        ops.embedding_forward(
            backend.asarray(np.array([0])), backend.asarray(np.zeros((5, 3), int))
        )
    with pytest.raises(ValueError, match=r"table must have shape \(V, D\), got \(5,\)"):
        ops.embedding_forward(backend.asarray(np.array([0])), backend.asarray(np.zeros(5)))
