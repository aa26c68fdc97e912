"""cross_entropy_forward / _backward: reference, ignore_index, label smoothing, oracle, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from _numgrad import check_grads, fixture_settings, record_torch_err, rel_err, to_torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops

lead_dims = st.lists(st.integers(1, 4), min_size=1, max_size=3)
scales = st.sampled_from([1.0, 30.0, 1e3])  # 1e3: saturated softmax, exp overflows unshifted
smoothings = st.sampled_from([0.0, 0.1, 0.37])
ignores = st.sampled_from([-100, 1])  # 1: a real class id used as the ignore value


def _draw(seed, lead, K, scale, ignore_index):
    r = np.random.default_rng(seed)
    logits = scale * r.standard_normal((*lead, K))
    targets = r.integers(0, K, size=lead)
    targets[r.random(lead) < 0.3] = ignore_index
    return logits, targets


def ref_cross_entropy(logits, targets, ignore_index, s):
    """Position by position: -(1 - s) log p[t] - (s / K) sum_k log p[k], mean over kept ones."""
    K = logits.shape[-1]
    total, n = 0.0, 0
    for idx in np.ndindex(*targets.shape):
        t = int(targets[idx])
        if t == ignore_index:
            continue
        logp = logits[idx] - scipy.special.logsumexp(logits[idx])
        total += -(1 - s) * logp[t] - s / K * logp.sum()
        n += 1
    return total / n if n else 0.0


def _terms(logits):
    return max(1.0, float(np.abs(logits).max()))


dims = dict(
    lead=lead_dims,
    K=st.integers(2, 7),
    scale=scales,
    smoothing=smoothings,
    ignore_index=ignores,
    seed=st.integers(0, 2**31),
)


@fixture_settings()
@given(**dims)
def test_forward_matches_reference(backend, lead, K, scale, smoothing, ignore_index, seed):
    logits, targets = _draw(seed, lead, K, scale, ignore_index)
    loss, _ = ops.cross_entropy_forward(
        backend.asarray(logits),
        backend.asarray(targets),
        ignore_index=ignore_index,
        label_smoothing=smoothing,
    )
    assert loss.shape == () and loss.dtype == np.float64
    ref = ref_cross_entropy(logits, targets, ignore_index, smoothing)
    # log-softmax subtracts numbers of size |logits| (and log(1 + tiny) on saturated rows), so
    # a loss near 0 is exact only to eps * max(1, |logits|): the error is measured against that.
    assert rel_err(float(loss), ref, scale=_terms(logits)) <= 1e-13


@fixture_settings()
@given(**dims)
def test_backward_matches_central_differences(
    backend, lead, K, scale, smoothing, ignore_index, seed
):
    logits, targets = _draw(seed, lead, K, scale, ignore_index)
    check_grads(
        backend,
        ops.cross_entropy_forward,
        ops.cross_entropy_backward,
        [logits, targets],
        {0: 0},
        kwargs={"ignore_index": ignore_index, "label_smoothing": smoothing},
        seed=seed,
    )


@fixture_settings()
@given(**dims)
def test_matches_torch(backend, lead, K, scale, smoothing, ignore_index, seed):
    torch = require("torch")
    logits, targets = _draw(seed, lead, K, scale, ignore_index)
    if not np.any(targets != ignore_index):
        targets.flat[0] = (ignore_index + 1) % K  # torch returns NaN with nothing to average
    loss, cache = ops.cross_entropy_forward(
        backend.asarray(logits),
        backend.asarray(targets),
        ignore_index=ignore_index,
        label_smoothing=smoothing,
    )
    g = float(np.random.default_rng(seed + 1).standard_normal())
    (dlogits,) = ops.cross_entropy_backward(backend.asarray(np.array(g)), cache)
    tl = to_torch(logits)
    tloss = torch.nn.functional.cross_entropy(
        tl.reshape(-1, K),
        torch.from_numpy(targets.reshape(-1)),
        ignore_index=ignore_index,
        label_smoothing=smoothing,
    )
    tloss.backward(torch.tensor(g, dtype=torch.float64))
    # dlogits = (softmax - q) * dout / n: at a saturated target softmax - 1 cancels, so the
    # error is measured against the size of the terms, |dout| / n.
    terms = abs(g) / max(int(np.sum(targets != ignore_index)), 1)
    errs = (
        rel_err(float(loss), tloss.item(), scale=_terms(logits)),
        rel_err(backend.to_numpy(dlogits), tl.grad.numpy(), scale=terms),
    )
    assert record_torch_err("cross_entropy", *errs) <= 1e-10


def test_all_ignored_gives_zero_loss_and_zero_grad(backend):
    logits = backend.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    targets = backend.asarray(np.full(3, -100))
    loss, cache = ops.cross_entropy_forward(logits, targets, label_smoothing=0.2)
    assert float(loss) == 0.0
    (dlogits,) = ops.cross_entropy_backward(backend.asarray(np.array(1.0)), cache)
    np.testing.assert_array_equal(backend.to_numpy(dlogits), 0.0)


def test_dout_scales_the_gradient_and_float32_stays_float32(backend):
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    t = np.array([0, 1, 2, 1, 0])
    loss, cache = ops.cross_entropy_forward(backend.asarray(x), backend.asarray(t))
    assert loss.dtype == np.float32
    (d1,) = ops.cross_entropy_backward(backend.asarray(np.array(1.0, np.float32)), cache)
    (d3,) = ops.cross_entropy_backward(backend.asarray(np.array(3.0, np.float32)), cache)
    assert d1.dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(d3), 3 * backend.to_numpy(d1), rtol=1e-6)
    # Each row of dlogits sums to zero: softmax minus a distribution.
    np.testing.assert_allclose(backend.to_numpy(d1).sum(-1), 0.0, atol=1e-7)
    # A Python number as dout (folded in on the host) gives the same gradient.
    (d3_host,) = ops.cross_entropy_backward(3.0, cache)
    assert d3_host.dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(d3_host), backend.to_numpy(d3))


def test_empty_batch(backend):
    logits = backend.asarray(np.zeros((0, 5)))
    loss, cache = ops.cross_entropy_forward(logits, backend.asarray(np.zeros(0, dtype=np.int64)))
    assert float(loss) == 0.0
    assert ops.cross_entropy_backward(1.0, cache)[0].shape == (0, 5)


def test_bad_input(backend):
    logits = backend.asarray(np.zeros((2, 3, 4)))
    t = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\).*got 4"):
        ops.cross_entropy_forward(logits, backend.asarray(t + 4))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\) or equal ignore_index"):
        ops.cross_entropy_forward(logits, backend.asarray(t - 1))
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\).*got \(2, 4\)"):
        ops.cross_entropy_forward(logits, backend.asarray(np.zeros((2, 4), dtype=np.int64)))
    with pytest.raises(TypeError, match=r"targets must be an integer array"):
        ops.cross_entropy_forward(logits, backend.asarray(t.astype(np.float64)))
    with pytest.raises(TypeError, match=r"logits must have dtype float32 or float64, got int64"):
        ops.cross_entropy_forward(backend.asarray(np.zeros((2, 3, 4), int)), backend.asarray(t))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        ops.cross_entropy_forward(logits, backend.asarray(t), label_smoothing=1.5)
