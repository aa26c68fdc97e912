"""linear and linear_gelu (forward / backward): reference, gradients, PyTorch oracle, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st
from test_ops_activations import ref_gelu

from minivit import ops

lead_dims = st.lists(st.integers(1, 4), min_size=0, max_size=3)
seeds = st.integers(0, 2**31)
DRAWS = dict(
    lead=lead_dims, din=st.integers(1, 7), dout=st.integers(1, 6), bias=st.booleans(), seed=seeds
)
SMALL_DRAWS = dict(DRAWS, din=st.integers(1, 5), dout=st.integers(1, 5))  # the gradient checks


def ref_linear(x, w, b):
    """An explicit contraction over the input features, in float64."""
    out = np.einsum("...i,oi->...o", x.astype(np.float64), w.astype(np.float64))
    return out if b is None else out + b


def _draw(seed, lead, din, dout, bias):
    r = np.random.default_rng(seed)
    x = r.standard_normal((*lead, din))
    w = r.standard_normal((dout, din))
    b = r.standard_normal(dout) if bias else None
    return x, w, b


@fixture_settings()
@given(**DRAWS)
def test_forward_matches_reference(backend, lead, din, dout, bias, seed):
    x, w, b = _draw(seed, lead, din, dout, bias)
    out, _ = ops.linear_forward(*(backend.asarray(a) if a is not None else None for a in (x, w, b)))
    assert out.shape == (*lead, dout)
    assert rel_err(backend.to_numpy(out), ref_linear(x, w, b)) <= 1e-13


@fixture_settings()
@given(**SMALL_DRAWS)
def test_backward_matches_central_differences(backend, lead, din, dout, bias, seed):
    x, w, b = _draw(seed, lead, din, dout, bias)
    slots = {0: 0, 1: 1, 2: 2} if bias else {0: 0, 1: 1}
    check_grads(backend, ops.linear_forward, ops.linear_backward, [x, w, b], slots, seed=seed)


def _against_torch(
    backend, fwd, bwd, torch_fn, name, lead, din, dout, bias, seed, scales=None, **kwargs
):
    """fwd/bwd against torch autograd of torch_fn(x, w, b) on the same float64 draw.

    ``scales(x, w, b, g)``, when given, returns the sizes (out, dx, dw, db) that each result's
    rounding error is measured against, for results that can be small through cancellation
    (see :func:`rel_err`)."""
    torch = require("torch")
    x, w, b = _draw(seed, lead, din, dout, bias)
    out, cache = fwd(*(backend.asarray(a) if a is not None else None for a in (x, w, b)), **kwargs)
    g = np.random.default_rng(seed + 1).standard_normal(out.shape)
    dx, dw, db = bwd(backend.asarray(g), cache)
    tx, tw = to_torch(x), to_torch(w)
    tb = to_torch(b) if bias else None
    tout = torch_fn(tx, tw, tb)
    tout.backward(torch.from_numpy(g))
    s_out, s_dx, s_dw, s_db = scales(x, w, b, g) if scales else (0.0, 0.0, 0.0, 0.0)
    errs = [
        rel_err(backend.to_numpy(out), tout.detach().numpy(), scale=s_out),
        rel_err(backend.to_numpy(dx), tx.grad.numpy(), scale=s_dx),
        rel_err(backend.to_numpy(dw), tw.grad.numpy(), scale=s_dw),
    ]
    if bias:
        errs.append(rel_err(backend.to_numpy(db), tb.grad.numpy(), scale=s_db))
    else:
        assert db is None
    assert record_torch_err(name, *errs) <= 1e-10


@fixture_settings()
@given(**DRAWS)
def test_matches_torch(backend, lead, din, dout, bias, seed):
    torch = require("torch")
    fn = torch.nn.functional.linear
    args = (lead, din, dout, bias, seed)
    _against_torch(backend, ops.linear_forward, ops.linear_backward, fn, "linear", *args)


def test_bad_input(backend):
    x = backend.asarray(np.zeros((2, 3)))
    w = backend.asarray(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"x's last dimension must equal w's in_features 3"):
        ops.linear_forward(backend.asarray(np.zeros((2, 5))), w)
    with pytest.raises(ValueError, match=r"w must have shape \(Dout, Din\)"):
        ops.linear_forward(x, backend.asarray(np.zeros((4, 3, 1))))
    with pytest.raises(ValueError, match=r"b must have shape \(4\)"):
        ops.linear_forward(x, w, backend.asarray(np.zeros(3)))
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got int64"):
        ops.linear_forward(backend.asarray(np.zeros((2, 3), dtype=np.int64)), w)
    with pytest.raises(TypeError, match=r"x must be a NumPy or CuPy array, got list"):
        ops.linear_forward([[0.0, 1.0, 2.0]], w)
    # a torch tensor is named, with the way out (its torch dtype has no NumPy kind to test)
    torch = require("torch")
    with pytest.raises(TypeError, match=r"x must be .* got torch.Tensor \(convert it with "):
        ops.linear_forward(torch.zeros(2, 3), w)
    with pytest.raises(TypeError, match=r"w has dtype float32 but x has dtype float64"):
        ops.linear_forward(x, w.astype(np.float32))
    with pytest.raises(TypeError, match=r"b has dtype float32"):
        ops.linear_forward(x, w, backend.asarray(np.zeros(4, dtype=np.float32)))


# ----------------------------------------------------------------------------------------------
# linear_gelu: GELU(x w^T + b), the MLP's fc1 and its activation as one op

approx = st.sampled_from(["none", "tanh"])


def ref_linear_gelu(x, w, b, approximate):
    """ref_linear, then the activation tests' element-by-element GELU, in float64."""
    return ref_gelu(ref_linear(x, w, b), approximate)


@fixture_settings()
@given(**DRAWS, approximate=approx)
def test_linear_gelu_forward_matches_reference(backend, lead, din, dout, bias, approximate, seed):
    x, w, b = _draw(seed, lead, din, dout, bias)
    args = (backend.asarray(a) if a is not None else None for a in (x, w, b))
    out, _ = ops.linear_gelu_forward(*args, approximate=approximate)
    assert out.shape == (*lead, dout)
    # measured against |h|, the size of what cancels in GELU's negative tail (see below)
    h_size = np.abs(ref_linear(x, w, b)).max(initial=0.0)
    ref = ref_linear_gelu(x, w, b, approximate)
    assert rel_err(backend.to_numpy(out), ref, scale=h_size) <= 1e-13


@fixture_settings()
@given(**SMALL_DRAWS, approximate=approx)
def test_linear_gelu_backward_matches_central_differences(
    backend, lead, din, dout, bias, approximate, seed
):
    x, w, b = _draw(seed, lead, din, dout, bias)
    slots = {0: 0, 1: 1, 2: 2} if bias else {0: 0, 1: 1}
    check_grads(
        backend,
        ops.linear_gelu_forward,
        ops.linear_gelu_backward,
        [x, w, b],
        slots,
        kwargs={"approximate": approximate},
        seed=seed,
    )


@fixture_settings()
@given(**DRAWS, approximate=approx)
def test_linear_gelu_matches_torch(backend, lead, din, dout, bias, approximate, seed):
    torch = require("torch")
    F = torch.nn.functional

    def fn(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate=approximate)

    def scales(x, w, b, g):
        # In GELU's negative tail Phi = (1 + erf) / 2 or (1 + tanh) / 2 cancels (ours and
        # PyTorch's formulas alike), so the output's rounding error is eps |h|, not eps |GELU|,
        # and the derivative's is eps |g| times the size of its terms; the GEMMs carry those
        # sizes on (as test_ops_activations.test_gelu_matches_torch measures GELU alone).
        h = ref_linear(x, w, b)
        if approximate == "tanh":
            dudh = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * h**2)
            terms = np.abs(g) * (1 + 0.5 * np.abs(h) * dudh)
        else:
            terms = np.abs(g) * (1 + np.abs(h))
        t2 = terms.reshape(-1, terms.shape[-1])
        x2 = np.abs(x).reshape(-1, x.shape[-1])
        return (
            np.abs(h).max(initial=0.0),
            (t2 @ np.abs(w)).max(initial=0.0),
            (t2.T @ x2).max(initial=0.0),
            t2.sum(axis=0).max(initial=0.0),
        )

    fwd, bwd = ops.linear_gelu_forward, ops.linear_gelu_backward
    args = (lead, din, dout, bias, seed)
    _against_torch(
        backend, fwd, bwd, fn, "linear_gelu", *args, scales=scales, approximate=approximate
    )


def test_linear_gelu_bad_input(backend):
    x = backend.asarray(np.zeros((2, 3)))
    w = backend.asarray(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"x's last dimension must equal w's in_features 3"):
        ops.linear_gelu_forward(backend.asarray(np.zeros((2, 5))), w)
    with pytest.raises(ValueError, match=r"b must have shape \(4\)"):
        ops.linear_gelu_forward(x, w, backend.asarray(np.zeros(3)))
    with pytest.raises(TypeError, match=r"b has dtype float32"):
        ops.linear_gelu_forward(x, w, backend.asarray(np.zeros(4, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"approximate must be 'none' or 'tanh', got 'erf'"):
        ops.linear_gelu_forward(x, w, approximate="erf")
    with ops.no_grad():
        _, cache = ops.linear_gelu_forward(x, w, backend.asarray(np.zeros(4)))
    with pytest.raises(RuntimeError, match=r"no_grad"):
        ops.linear_gelu_backward(backend.asarray(np.zeros((2, 4))), cache)
