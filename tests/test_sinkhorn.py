"""Optimal transport ops: Sinkhorn, its unrolled and envelope backward, IPOT, OT distance, cosine.

Oracles: POT (``ot.sinkhorn(..., method="sinkhorn_log")`` and the exact ``ot.emd2``) and PyTorch
autograd through unrolled torch implementations written here. Budget: < 40 s on 2 cores.
Everything in float64 unless the test says otherwise.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit import ops
from minivit.ops.sinkhorn import SinkhornConvergenceWarning

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def rel(a, r, floor=0.0):
    """Norm-wise relative error max|a - r| / max(max|a|, max|r|, floor).

    ``floor`` is the noise level of a central difference (~1e-10 absolute here): where the true
    gradient is exactly zero (one row: the plan is b whatever the cost) it keeps rounding noise
    from counting as a relative error of 1.
    """
    a = np.asarray(a, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    assert a.shape == r.shape, (a.shape, r.shape)
    scale = max(np.abs(a).max(), np.abs(r).max(), floor)
    diff = np.abs(a - r).max()
    return float(diff / scale) if scale > 0 else float(diff)


def central_diff(loss, x, h=1e-6):
    """Central differences of the scalar loss(x) for a host float64 array x, entry by entry."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + h
        hi, f_hi = flat[i], loss(x)
        flat[i] = orig - h
        lo, f_lo = flat[i], loss(x)
        flat[i] = orig
        gflat[i] = (f_hi - f_lo) / (hi - lo)
    return g


def simplex(rng, shape, lo=0.2):
    w = rng.uniform(lo, 1.0, shape)
    return w / w.sum(-1, keepdims=True)


def pot_log(a, b, C, eps, iters, stop=0.0):
    ot = require("ot")  # here, not at the top: the device run has no POT (tests/_requires.py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=iters, stopThr=stop)


def torch_sinkhorn(C, a, b, eps, iters):
    """Unrolled log-domain Sinkhorn in torch (same start and order as POT): an autograd oracle."""
    logK = -C / eps
    la, lb = torch.log(a), torch.log(b)
    f = torch.zeros_like(la)
    for _ in range(iters):
        g = lb - torch.logsumexp(logK + f[..., :, None], dim=-2)
        f = la - torch.logsumexp(logK + g[..., None, :], dim=-1)
    return torch.exp(logK + f[..., :, None] + g[..., None, :])


def ipot_reference(C, a, b, beta, iters, inner):
    """IPOT in the scaling domain, zero marginals as masks (Xie et al. 2018, ViLT's variant)."""
    T = np.ones_like(C)
    A = np.exp(-C / beta)
    sigma = a.copy()
    for _ in range(iters):
        Q = A * T
        for _ in range(inner):
            qs = np.einsum("...ij,...i->...j", Q, sigma)
            delta = np.where(b > 0, b / np.where(b > 0, qs, 1), 0.0)
            qd = np.einsum("...ij,...j->...i", Q, delta)
            sigma = np.where(a > 0, a / np.where(a > 0, qd, 1), 0.0)
        T = sigma[..., :, None] * Q * delta[..., None, :]
    return T


def problem(rng, lead=(), n=5, m=7, marg=True):
    C = rng.random(lead + (n, m))
    if not marg:
        return C, None, None
    return C, simplex(rng, lead + (n,)), simplex(rng, lead + (m,))


# --------------------------------------------------------------------------------------------
# Forward against POT
# --------------------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("iters", [1, 7, 60])
@pytest.mark.parametrize("eps", [0.03, 0.5])
def test_sinkhorn_matches_pot_same_iterations(backend, iters, eps):
    rng = np.random.default_rng(iters)
    C, a, b = problem(rng, lead=(3,))
    plan, cache = ops.sinkhorn_forward(
        backend.asarray(C), backend.asarray(a), backend.asarray(b), epsilon=eps, n_iters=iters
    )
    plan = backend.to_numpy(plan)
    assert cache.n_run == iters
    for k in range(3):  # stopThr=0: POT runs all its iterations, as we do
        ref = pot_log(a[k], b[k], C[k], eps, iters)
        assert np.abs(plan[k] - ref).max() <= 1e-9
    # uniform marginals by default
    plan_u, _ = ops.sinkhorn_forward(backend.asarray(C[0]), epsilon=eps, n_iters=iters)
    ref_u = pot_log(np.full(5, 1 / 5), np.full(7, 1 / 7), C[0], eps, iters)
    assert np.abs(backend.to_numpy(plan_u) - ref_u).max() <= 1e-9


@pytest.mark.oracle
def test_sinkhorn_matches_pot_at_convergence_and_marginals_hold(backend):
    rng = np.random.default_rng(1)
    C, a, b = problem(rng, n=9, m=6)
    plan, cache = ops.sinkhorn_forward(
        backend.asarray(C),
        backend.asarray(a),
        backend.asarray(b),
        epsilon=0.1,
        n_iters=5000,
        tol=1e-14,
    )
    assert cache.n_run < 5000 and cache.n_run % 10 == 0  # stopped early, at a check
    plan = backend.to_numpy(plan)
    ref = pot_log(a, b, C, 0.1, 5000, stop=1e-15)
    assert np.abs(plan - ref).max() <= 1e-9
    assert np.abs(plan.sum(-1) - a).max() <= 1e-9
    assert np.abs(plan.sum(-2) - b).max() <= 1e-9


@pytest.fixture
def stable_path(monkeypatch):
    """Run the max-stabilized log-sum-exp path (the one CuPy always takes) on NumPy too."""
    import minivit.ops.sinkhorn as sk

    monkeypatch.setattr(sk, "_FAST_CPU_PATH", False)


@pytest.mark.oracle
def test_stabilized_path_matches_pot_and_fast_path(stable_path):
    # The CPU normally takes the cheaper update (docs/ops/sinkhorn.md); this is the other one.
    import minivit.ops.sinkhorn as sk

    rng = np.random.default_rng(21)
    C, a, b = problem(rng, (3,), 6, 9)
    a[1, 4] = 0
    b[2, :2] = 0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    stable, cache = ops.sinkhorn_forward(C, a, b, epsilon=0.05, n_iters=40)
    for k in (0,):  # POT starts padding rows at 0, so compare it where there is no padding
        assert np.abs(stable[k] - pot_log(a[k], b[k], C[k], 0.05, 40)).max() <= 1e-9
    sk._FAST_CPU_PATH = True
    fast, cache_f = ops.sinkhorn_forward(C, a, b, epsilon=0.05, n_iters=40)
    assert np.abs(fast - stable).max() <= 1e-12
    assert (fast[a == 0] == 0).all() and (stable[a == 0] == 0).all()
    dP = rng.standard_normal(C.shape)
    for g1, g2 in zip(ops.sinkhorn_backward(dP, cache), ops.sinkhorn_backward(dP, cache_f)):
        assert rel(g1, g2) <= 1e-10
    # the backward's two ways: every kernel rebuilt (stabilized) and one rescaled (the CPU's)
    sk._FAST_CPU_PATH = False
    grads = ops.sinkhorn_backward(dP, cache_f)
    sk._FAST_CPU_PATH = True
    for g1, g2 in zip(grads, ops.sinkhorn_backward(dP, cache_f)):
        assert rel(g1, g2) <= 1e-12  # measured 3e-15
    sk._FAST_CPU_PATH = False
    # the stabilized path with an early stop
    sk._FAST_CPU_PATH = False
    _, c2 = ops.sinkhorn_forward(C, a, b, epsilon=0.5, n_iters=1000, tol=1e-12)
    assert c2.n_run < 1000


def test_fast_path_rebuilds_its_kernel_when_the_potentials_rise(monkeypatch):
    """The CPU path rescales E = exp(logK + f + g) by exp(delta) each half-step, and a product
    cannot revive an entry that underflowed to 0. On this float32 problem (skewed marginals,
    small epsilon) the potentials rise by more than the margin after a rebuild: the rebuild
    must fire, and with it the result equals the stabilized path's. Without it (margin inf)
    the plan's total came out at 4e11 instead of 1."""
    import minivit.ops.sinkhorn as sk

    rng = np.random.default_rng(21)
    C = (rng.random((7, 2)) * 10).astype(np.float32)
    a, b = rng.random(7) ** 8, rng.random(2) ** 8
    a, b = (a / a.sum()).astype(np.float32), (b / b.sum()).astype(np.float32)
    rebuilt, rebuild = [], sk._ScaledKernel.rebuild

    def counting_rebuild(self, r=None, c=None):
        rebuilt.append(r is None and c is None)  # E rebuilt from its own potentials
        return rebuild(self, r, c)

    monkeypatch.setattr(sk._ScaledKernel, "rebuild", counting_rebuild)
    fast, cache = ops.sinkhorn_forward(C, a, b, epsilon=1e-3, n_iters=60)
    assert sum(rebuilt) > 120 // (2 * sk._REANCHOR_EVERY)  # more than the periodic ones
    dP = np.random.default_rng(0).standard_normal(C.shape).astype(np.float32)
    grads_fast = ops.sinkhorn_backward(dP, cache)  # walks one kernel back by rescaling
    monkeypatch.setattr(sk, "_FAST_CPU_PATH", False)
    stable, _ = ops.sinkhorn_forward(C, a, b, epsilon=1e-3, n_iters=60)
    assert np.abs(fast - stable).max() <= 1e-6 and abs(float(fast.sum()) - 1) < 1e-3
    grads = ops.sinkhorn_backward(dP, cache)  # rebuilds every kernel
    for g_fast, g in zip(grads_fast, grads):
        assert rel(g_fast, g) <= 1e-4  # float32, epsilon 1e-3: the cost's gradient is ~1e3


def test_fast_backward_rebuilds_its_kernel_when_the_potentials_rise(monkeypatch):
    """The CPU backward walks one kernel back through the iterations by rescaling. On this
    float32 problem it must rebuild it on the way (the potentials rise by more than the margin):
    then it equals the backward that rebuilds every kernel (measured 5e-5 apart); with no
    rebuild at all (margin inf, no periodic one) it was 57% off."""
    import minivit.ops.sinkhorn as sk

    rng = np.random.default_rng(38)
    C = (rng.random((2, 8, 11)) * 3).astype(np.float32)
    a, b = rng.random((2, 8)) ** 4, rng.random((2, 11)) ** 4
    a = (a / a.sum(-1, keepdims=True)).astype(np.float32)
    b = (b / b.sum(-1, keepdims=True)).astype(np.float32)
    dP = rng.standard_normal(C.shape).astype(np.float32)
    _, cache = ops.sinkhorn_forward(C, a, b, epsilon=0.003, n_iters=30)
    fast = ops.sinkhorn_backward(dP, cache)
    monkeypatch.setattr(sk, "_FAST_CPU_PATH", False)
    for g_fast, g in zip(fast, ops.sinkhorn_backward(dP, cache)):
        if g is not None:
            assert rel(g_fast, g) <= 5e-4


@pytest.mark.parametrize("fast", [True, False], ids=["rescaled", "stabilized"])
def test_padding_on_both_axes_gives_finite_gradients_in_float32(fast, monkeypatch):
    """Where a padded row meets a padded column, logK + beta + alpha is bounded by nothing and
    overflowed float32 (both paths), and inf times the zero adjoint there made whole gradients
    NaN. Those entries are -inf in logK now."""
    import minivit.ops.sinkhorn as sk

    monkeypatch.setattr(sk, "_FAST_CPU_PATH", fast)
    rng = np.random.default_rng(5)
    C = rng.random((2, 10, 12))
    C[..., -3:, :] = C[..., :, -4:] = 1  # what padding tokens' cosine cost can look like
    a, b = rng.random((2, 10)), rng.random((2, 12))
    a[:, -3:] = b[:, -4:] = 0
    a, b = a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True)
    C, a, b = (x.astype(np.float32) for x in (C, a, b))
    plan, cache = ops.sinkhorn_forward(C, a, b, epsilon=0.008, n_iters=50)
    grads = ops.sinkhorn_backward(rng.standard_normal(C.shape).astype(np.float32), cache)
    assert np.isfinite(plan).all() and all(np.isfinite(g).all() for g in grads)
    assert not plan[:, -3:].any() and not plan[..., -4:].any()
    assert not grads[0][:, -3:, -4:].any()  # no cost gradient where nothing is transported


@pytest.mark.parametrize("fast", [True, False], ids=["cpu-path", "stabilized"])
@pytest.mark.parametrize(
    "dtype, frac", [(np.float32, 2e-4), (np.float32, 1e-4), (np.float64, 1e-5)]
)
def test_a_small_epsilon_with_padding_keeps_the_backward_finite(
    fast, dtype, frac, monkeypatch, backend
):
    """A padded column of a real row: exp(logK + beta + alpha) there overflows for a small
    epsilon, and inf times the zero marginal made dcost NaN on that column (a review found it at
    these epsilons). dcost, and da and db at every unpadded entry, are finite; on the stabilized
    path (CuPy's always) they equal the trimmed problem's. (The CPU path's rescaled kernel
    rounds differently, and at these epsilons the unrolled derivative is too ill-conditioned for
    its values to be compared: a relative change of 1e-15 in the cost moves dcost by 0.8%,
    docs/ops/sinkhorn.md.) At a padded entry db is the one-sided derivative, which may
    overflow."""
    import minivit.ops.sinkhorn as sk

    monkeypatch.setattr(sk, "_FAST_CPU_PATH", fast)
    rng = np.random.default_rng(0)
    C = (rng.random((4, 8, 11)) * 2).astype(dtype)
    a, b = np.full((4, 8), 1 / 8), np.full((4, 11), 1 / 11)
    b[2, 9:] = 0  # two padded patches in problem 2, two padded words in problem 1
    a[1, 6:] = 0
    a, b = (
        (a / a.sum(-1, keepdims=True)).astype(dtype),
        (b / b.sum(-1, keepdims=True)).astype(dtype),
    )
    kw = dict(epsilon=frac * float(np.median(C)), n_iters=50)
    dP = rng.standard_normal(C.shape).astype(dtype)

    def grads(C_, a_, b_, dP_):
        with np.errstate(over="ignore", invalid="ignore"):  # (the padded entries' overflow)
            _, cache = ops.sinkhorn_forward(*map(backend.asarray, (C_, a_, b_)), **kw)
            return [backend.to_numpy(g) for g in ops.sinkhorn_backward(backend.asarray(dP_), cache)]

    dC, da, db = grads(C, a, b, dP)
    assert np.isfinite(dC).all() and np.isfinite(da).all()
    assert not dC[2, :, 9:].any() and not dC[1, 6:].any()  # nothing moves there
    assert np.isfinite(db[b > 0]).all()
    if fast and backend.name == "numpy":
        return  # the CPU path: finite, and no more to compare (above)
    for k, rows, cols in ((1, slice(0, 6), slice(None)), (2, slice(None), slice(0, 9))):
        tC, ta, tb = grads(C[k, rows, cols], a[k, rows], b[k, cols], dP[k, rows, cols])
        np.testing.assert_array_equal(dC[k, rows, cols], tC)  # the same iterates exactly
        np.testing.assert_array_equal(da[k, rows], ta)
        np.testing.assert_array_equal(db[k, cols], tb)


def test_tiny_epsilon_is_finite_and_non_negative(backend):
    rng = np.random.default_rng(2)
    C = rng.random((2, 8, 11)) * 3
    eps = 1e-4 * float(np.median(C))
    for dtype in (np.float32, np.float64):
        plan, _ = ops.sinkhorn_forward(backend.asarray(C, dtype=dtype), epsilon=eps, n_iters=50)
        p = backend.to_numpy(plan)
        assert p.dtype == dtype
        assert np.isfinite(p).all() and (p >= 0).all()
        assert np.abs(p.sum(-1) - 1 / 8).max() < 1e-3  # rows exact after each iteration
    # On NumPy the first half-steps fall back to the stabilized log-sum-exp (sums underflow);
    # the result must equal the stabilized path's.
    import minivit.ops.sinkhorn as sk

    fast, _ = ops.sinkhorn_forward(backend.asarray(C), epsilon=eps, n_iters=50)
    old, sk._FAST_CPU_PATH = sk._FAST_CPU_PATH, False
    try:
        stable, _ = ops.sinkhorn_forward(backend.asarray(C), epsilon=eps, n_iters=50)
    finally:
        sk._FAST_CPU_PATH = old
    assert np.abs(backend.to_numpy(fast) - backend.to_numpy(stable)).max() <= 1e-10
    dp = backend.asarray(rng.standard_normal(C.shape))
    plan, cache = ops.sinkhorn_forward(backend.asarray(C), epsilon=eps, n_iters=20)
    for g in ops.sinkhorn_backward(dp, cache)[:1]:
        assert np.isfinite(backend.to_numpy(g)).all()


# --------------------------------------------------------------------------------------------
# Backward: central differences, torch autograd, envelope
# --------------------------------------------------------------------------------------------


@given(
    lead=st.sampled_from([(), (2,), (2, 1)]),
    n=st.integers(1, 5),
    m=st.integers(1, 5),
    eps=st.sampled_from([0.05, 0.2, 1.0]),
    iters=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_sinkhorn_backward_central_differences(lead, n, m, eps, iters, seed):
    rng = np.random.default_rng(seed)
    C, a, b = problem(rng, lead, n, m)
    dP = rng.standard_normal(C.shape)
    plan, cache = ops.sinkhorn_forward(C, a, b, epsilon=eps, n_iters=iters)
    dC, da, db = ops.sinkhorn_backward(dP, cache)

    def loss(C_, a_, b_):
        return float((ops.sinkhorn_forward(C_, a_, b_, epsilon=eps, n_iters=iters)[0] * dP).sum())

    assert rel(dC, central_diff(lambda x: loss(x, a, b), C), floor=1e-3) <= 1e-6
    assert rel(da, central_diff(lambda x: loss(C, x, b), a), floor=1e-3) <= 1e-6
    # With one column the last (row) update fixes the plan at a whatever b is: the true db is 0,
    # and the quotient is rounding noise through a dozen iterations (HYPOTHESIS_PROFILE=thorough
    # found 1.2e-9, over the floor of 1e-3 the other gradients use)
    db_floor = 1e-2 if m == 1 else 1e-3
    assert rel(db, central_diff(lambda x: loss(C, a, x), b), floor=db_floor) <= 1e-6
    if m == 1:
        assert np.abs(db).max() <= 1e-12  # and the backward gives that 0 (to rounding)


def test_sinkhorn_backward_with_gradcheck_module(backend):
    from minivit.gradcheck import check_backward

    rng = np.random.default_rng(3)
    C, a, b = (backend.asarray(x) for x in problem(rng, (2,), 4, 6))
    check_backward(
        ops.sinkhorn_forward,
        ops.sinkhorn_backward,
        [C, a, b],
        kwargs={"epsilon": 0.1, "n_iters": 25},
        n_directions=4,
    ).assert_ok()


@pytest.mark.oracle
@pytest.mark.parametrize("iters", [1, 5, 40])
def test_sinkhorn_backward_matches_torch_autograd(backend, iters):
    rng = np.random.default_rng(10 + iters)
    C, a, b = problem(rng, (2, 3), 6, 4)
    dP = rng.standard_normal(C.shape)
    plan, cache = ops.sinkhorn_forward(
        backend.asarray(C), backend.asarray(a), backend.asarray(b), epsilon=0.07, n_iters=iters
    )
    grads = ops.sinkhorn_backward(backend.asarray(dP), cache)
    tC, ta, tb = (torch.tensor(x, requires_grad=True) for x in (C, a, b))
    tplan = torch_sinkhorn(tC, ta, tb, 0.07, iters)
    (tplan * torch.tensor(dP)).sum().backward()
    assert rel(backend.to_numpy(plan), tplan.detach().numpy()) <= 1e-12
    for g, t in zip(grads, (tC, ta, tb)):
        assert rel(backend.to_numpy(g), t.grad.numpy()) <= 1e-10


def test_sinkhorn_backward_broadcast_marginals_and_zero_entries(backend):
    rng = np.random.default_rng(4)
    C = rng.random((3, 5, 6))
    a = simplex(rng, (5,))  # shared by the 3 problems: da must be summed back to (5,)
    b = simplex(rng, (3, 6))
    b[:, 2] = 0.0
    b /= b.sum(-1, keepdims=True)
    dP = rng.standard_normal(C.shape)
    plan, cache = ops.sinkhorn_forward(
        backend.asarray(C), backend.asarray(a), backend.asarray(b), epsilon=0.1, n_iters=9
    )
    dC, da, db = (backend.to_numpy(g) for g in ops.sinkhorn_backward(backend.asarray(dP), cache))
    assert da.shape == (5,) and db.shape == (3, 6) and dC.shape == C.shape
    assert all(np.isfinite(g).all() for g in (dC, da, db))

    def loss(C_, a_, b_):
        return float((ops.sinkhorn_forward(C_, a_, b_, epsilon=0.1, n_iters=9)[0] * dP).sum())

    assert rel(dC, central_diff(lambda x: loss(x, a, b), C)) <= 1e-6
    assert rel(da, central_diff(lambda x: loss(C, x, b), a)) <= 1e-6
    # at a zero entry the derivative is one-sided (the marginal cannot go negative): compare the
    # returned value with a forward difference
    h = 1e-7
    bp = b.copy()
    bp[1, 2] = h
    one_sided = (loss(C, a, bp) - loss(C, a, b)) / h
    assert abs(db[1, 2] - one_sided) <= 1e-5 * max(1.0, abs(one_sided))
    mask = b > 0
    num_b = central_diff(lambda x: loss(C, a, np.where(mask, x, 0.0)), b)
    assert rel(db[mask], num_b[mask]) <= 1e-6


@pytest.mark.parametrize("lead", [(), (1,)])
def test_shared_marginal_gradients_sum_over_the_batch(backend, lead):
    """A marginal shared by the batch, of shape (n,) or (1, n), is one input used by every
    problem: its gradient is the *sum* over the batch of the per-problem gradients, the ones
    the same marginal tiled to (3, n) gets (a mean would be a third of it)."""
    rng = np.random.default_rng(21)
    C = rng.random((3, 5, 6))
    a, b = simplex(rng, lead + (5,)), simplex(rng, lead + (6,))
    dP = backend.asarray(rng.standard_normal(C.shape))
    kw = dict(epsilon=0.2, n_iters=6)
    _, c_shared = ops.sinkhorn_forward(backend.asarray(C), *map(backend.asarray, (a, b)), **kw)
    a3, b3 = (np.broadcast_to(p, (3, p.shape[-1])).copy() for p in (a, b))
    _, c_tiled = ops.sinkhorn_forward(backend.asarray(C), *map(backend.asarray, (a3, b3)), **kw)
    dC, da, db = (backend.to_numpy(g) for g in ops.sinkhorn_backward(dP, c_shared))
    dC3, da3, db3 = (backend.to_numpy(g) for g in ops.sinkhorn_backward(dP, c_tiled))
    assert da.shape == a.shape and db.shape == b.shape
    np.testing.assert_allclose(dC, dC3, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(da, da3.sum(0).reshape(a.shape), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(db, db3.sum(0).reshape(b.shape), rtol=1e-12, atol=1e-14)


def test_sinkhorn_backward_zero_row_marginal_near_convergence(backend):
    # at a zero a_i the forward jumps as a_i leaves 0 (the start f_0,i goes from -inf to 0), by
    # less the further it has converged; after 300 iterations the returned da_i (the start held
    # fixed) agrees with a forward difference (docs/ops/sinkhorn.md)
    rng = np.random.default_rng(6)
    C = rng.random((5, 6))
    a, b = simplex(rng, (5,)), simplex(rng, (6,))
    a[2] = 0.0
    a /= a.sum()
    dP = rng.standard_normal(C.shape)
    kw = dict(epsilon=0.1, n_iters=300)
    _, cache = ops.sinkhorn_forward(
        backend.asarray(C), backend.asarray(a), backend.asarray(b), **kw
    )
    da = backend.to_numpy(ops.sinkhorn_backward(backend.asarray(dP), cache)[1])

    def loss(a_):
        return float((ops.sinkhorn_forward(C, a_, b, **kw)[0] * dP).sum())

    h = 1e-7
    ap = a.copy()
    ap[2] = h
    one_sided = (loss(ap) - loss(a)) / h
    assert np.isfinite(da).all()
    assert abs(da[2] - one_sided) <= 1e-4 * max(1.0, abs(one_sided))


def test_envelope_gradient_of_regularized_value(backend):
    rng = np.random.default_rng(5)
    C, a, b = problem(rng, (2,), 5, 4)
    kw = dict(epsilon=0.3, n_iters=3000, tol=1e-15, check_every=5)

    def value(C_, a_, b_):
        v, _ = ops.sinkhorn_value_forward(
            backend.asarray(C_), backend.asarray(a_), backend.asarray(b_), **kw
        )
        return backend.to_numpy(v)

    v, cache = ops.sinkhorn_value_forward(
        backend.asarray(C), backend.asarray(a), backend.asarray(b), **kw
    )
    dv = np.array([0.7, -1.3])
    dC, da, db = (
        backend.to_numpy(g) for g in ops.sinkhorn_value_backward(backend.asarray(dv), cache)
    )
    assert rel(dC, central_diff(lambda x: float(value(x, a, b) @ dv), C, h=1e-5)) <= 1e-6
    # the value lives on sum(a) = sum(b): differentiate along a balanced direction
    ua = rng.standard_normal(a.shape)
    ub = rng.standard_normal(b.shape)
    ub += (ua.sum(-1, keepdims=True) - ub.sum(-1, keepdims=True)) / b.shape[-1]
    h = 1e-5
    num = (value(C, a + h * ua, b + h * ub) - value(C, a - h * ua, b - h * ub)) / (2 * h)
    ana = (da * ua).sum(-1) + (db * ub).sum(-1)
    assert rel(ana, dv * num) <= 1e-6
    # the envelope dcost is the plan itself
    plan, _ = ops.sinkhorn_forward(backend.asarray(C), backend.asarray(a), backend.asarray(b), **kw)
    assert np.abs(dC - dv[:, None, None] * backend.to_numpy(plan)).max() == 0.0


def test_implicit_backward_matches_unrolled_at_convergence(backend):
    rng = np.random.default_rng(17)
    C = rng.random((2, 5, 7))
    a = rng.uniform(0.2, 1, (2, 5))
    b = rng.uniform(0.2, 1, (2, 7))
    a[1, 3] = 0  # padding is handled too
    b[0, 6] = 0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    to = backend.asarray
    P, cache = ops.sinkhorn_forward(to(C), to(a), to(b), epsilon=0.2, n_iters=5000, tol=1e-15)
    dP = to(rng.standard_normal(C.shape))
    unrolled = [backend.to_numpy(g) for g in ops.sinkhorn_backward(dP, cache)]
    implicit = [backend.to_numpy(g) for g in ops.sinkhorn_implicit_backward(dP, cache)]
    assert rel(implicit[0], unrolled[0]) <= 1e-9
    # marginal gradients are defined up to (da + c, db - c): compare along balanced directions
    ua = rng.standard_normal(a.shape) * (a > 0)
    ub = rng.standard_normal(b.shape) * (b > 0)
    ub += (ua.sum(-1, keepdims=True) - ub.sum(-1, keepdims=True)) / (b > 0).sum(-1)[:, None]
    ub *= b > 0

    def along(g):
        return (g[1] * ua).sum(-1) + (g[2] * ub).sum(-1)

    assert rel(along(implicit), along(unrolled)) <= 1e-9
    # far from convergence the two differ: the implicit gradient assumes the fixed point
    P5, cache5 = ops.sinkhorn_forward(to(C), to(a), to(b), epsilon=0.02, n_iters=2)
    d5 = backend.to_numpy(ops.sinkhorn_backward(dP, cache5)[0])
    i5 = backend.to_numpy(ops.sinkhorn_implicit_backward(dP, cache5)[0])
    assert rel(i5, d5) > 1e-3


def test_unrolled_backward_tends_to_envelope_at_convergence():
    # d<P, C> through the plan differs from the envelope, but the unrolled gradient of the
    # regularized value, <P,C> + eps sum P(log P - 1), tends to P as the iterations converge.
    rng = np.random.default_rng(6)
    C, a, b = problem(rng, (), 4, 5)
    eps = 0.5
    plan, cache = ops.sinkhorn_forward(C, a, b, epsilon=eps, n_iters=400)
    dP = C + eps * np.log(plan)  # d value / d P
    dC, _, _ = ops.sinkhorn_backward(dP, cache)
    dC = dC + plan  # the explicit dependence of <P, C> on C
    assert rel(dC, plan) <= 1e-8


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


def test_invariants(backend):
    rng = np.random.default_rng(7)
    C, a, b = problem(rng, (4,), 6, 5)
    kw = dict(epsilon=0.1, n_iters=30)
    to = backend.asarray
    P = backend.to_numpy(ops.sinkhorn_forward(to(C), to(a), to(b), **kw)[0])
    # Column constants in the cost are absorbed by g at every iteration (g is recomputed from
    # scratch first); row constants by f only at the fixed point, since f starts at 0.
    C2 = C + rng.random((4, 1, 5)) * 3
    P2 = backend.to_numpy(ops.sinkhorn_forward(to(C2), to(a), to(b), **kw)[0])
    assert np.abs(P2 - P).max() <= 1e-12
    conv = dict(epsilon=0.1, n_iters=5000, tol=1e-14)
    Pc = backend.to_numpy(ops.sinkhorn_forward(to(C), to(a), to(b), **conv)[0])
    C3 = C2 + rng.random((4, 6, 1)) * 3
    P3 = backend.to_numpy(ops.sinkhorn_forward(to(C3), to(a), to(b), **conv)[0])
    assert np.abs(P3 - Pc).max() <= 1e-12
    # permuting rows and columns of the inputs permutes the plan
    pi, pj = rng.permutation(6), rng.permutation(5)
    P3 = ops.sinkhorn_forward(to(C[:, pi][:, :, pj]), to(a[:, pi]), to(b[:, pj]), **kw)[0]
    assert np.abs(backend.to_numpy(P3) - P[:, pi][:, :, pj]).max() <= 1e-14
    # a batch equals its problems one by one
    for k in range(4):
        Pk = ops.sinkhorn_forward(to(C[k]), to(a[k]), to(b[k]), **kw)[0]
        assert np.abs(backend.to_numpy(Pk) - P[k]).max() <= 1e-15
    # nothing is mutated; backward is replayable
    copies = [x.copy() for x in (C, a, b)]
    _, cache = ops.sinkhorn_forward(to(C), to(a), to(b), **kw)
    dP = to(rng.standard_normal(C.shape))
    dP0 = backend.to_numpy(dP).copy()
    g1 = ops.sinkhorn_backward(dP, cache)
    g2 = ops.sinkhorn_backward(dP, cache)
    assert all(np.array_equal(x, y) for x, y in zip(copies, (C, a, b)))
    assert np.array_equal(backend.to_numpy(dP), dP0)
    for x, y, inp in zip(g1, g2, (C, a, b)):
        assert np.array_equal(backend.to_numpy(x), backend.to_numpy(y))
        assert x.shape == inp.shape and x.dtype == inp.dtype


def test_padding_is_exactly_zero_and_equals_trimmed_problem(backend):
    rng = np.random.default_rng(8)
    C = rng.random((2, 7, 9))
    a = rng.uniform(0.2, 1, (2, 7))
    b = rng.uniform(0.2, 1, (2, 9))
    a[0, 5:] = 0  # text padding
    a[1, 2] = 0
    b[0, 6:] = 0  # image padding
    b[1, 0] = 0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    to = backend.asarray
    for method in ("sinkhorn", "ipot"):
        if method == "sinkhorn":
            P, cache = ops.sinkhorn_forward(to(C), to(a), to(b), epsilon=0.05, n_iters=25)
        else:
            P, cache = ops.ipot_forward(to(C), to(a), to(b), n_iters=25)
        P = backend.to_numpy(P)
        assert np.isfinite(P).all()
        assert (P[a == 0] == 0).all()
        assert (np.swapaxes(P, -1, -2)[b == 0] == 0).all()
        for k in range(2):
            ra, cb = a[k] > 0, b[k] > 0
            kw = {"epsilon": 0.05} if method == "sinkhorn" else {}
            fwd = ops.sinkhorn_forward if method == "sinkhorn" else ops.ipot_forward
            Pt, _ = fwd(to(C[k][np.ix_(ra, cb)]), to(a[k][ra]), to(b[k][cb]), n_iters=25, **kw)
            assert np.abs(P[k][np.ix_(ra, cb)] - backend.to_numpy(Pt)).max() <= 1e-15
    dP = to(rng.standard_normal(C.shape))
    _, cache = ops.sinkhorn_forward(to(C), to(a), to(b), epsilon=0.05, n_iters=25)
    for g in ops.sinkhorn_backward(dP, cache):
        assert np.isfinite(backend.to_numpy(g)).all()
    dC = backend.to_numpy(ops.sinkhorn_backward(dP, cache)[0])
    assert (dC[a == 0] == 0).all()


# --------------------------------------------------------------------------------------------
# Errors and warnings
# --------------------------------------------------------------------------------------------


class _FakeCupyArray:
    """Looks like a cupy.ndarray to minivit.backend (it only checks the type's name)."""

    dtype = np.dtype(np.float64)
    shape = (3,)
    ndim = 1


_FakeCupyArray.__module__ = "cupy._core.core"
_FakeCupyArray.__name__ = "ndarray"


def test_bad_inputs(backend):
    rng = np.random.default_rng(9)
    C, a, b = (backend.asarray(x) for x in problem(rng, (), 3, 4))
    f = ops.sinkhorn_forward
    neg = backend.to_numpy(a).copy()
    neg[0] = -0.1
    with pytest.raises(ValueError, match="a must be non-negative"):
        f(C, backend.asarray(neg), b)
    nan = backend.to_numpy(a).copy()
    nan[1] = np.nan
    with pytest.raises(ValueError, match="a must be finite"):
        f(C, backend.asarray(nan), b)
    with pytest.raises(ValueError, match="equal total mass"):
        f(C, a * 1.01, b)
    f(C, a * (1 + 1e-5), b)  # within tolerance: accepted (finite differences need this)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="epsilon"):
            f(C, a, b, epsilon=eps)
    with pytest.raises(ValueError, match=r"a must have shape \(\.\.\., 3\)"):
        f(C, b, b)
    with pytest.raises(ValueError, match="does not broadcast"):
        f(C, backend.asarray(np.full((2, 3), 1 / 3)), b)
    with pytest.raises(ValueError, match="cost must have at least 2"):
        f(backend.asarray(np.ones(3)))
    with pytest.raises(TypeError, match="dtype"):
        f(C, a.astype(np.float32), b)
    with pytest.raises(TypeError, match="float32 or float64"):
        f(backend.asarray(np.ones((3, 4), dtype=np.int64)))
    other = np.full(3, 1 / 3) if backend.name == "cupy" else _FakeCupyArray()
    with pytest.raises(TypeError, match="two backends"):
        f(backend.asarray(np.ones((3, 3))), other)
    with pytest.raises(ValueError, match="n_iters"):
        f(C, n_iters=0)
    with pytest.raises(ValueError, match="beta"):
        ops.ipot_forward(C, beta=0)
    with pytest.raises(ValueError, match="equal total mass"):
        ops.ipot_forward(C, a * 2, b)
    with pytest.raises(ValueError, match="method"):
        ops.ot_distance_forward(C, method="emd")
    with pytest.raises(ValueError, match="share d"):
        ops.cosine_cost_forward(C, backend.asarray(np.ones((2, 5))))


def test_tolerance_warning_and_early_stop(backend):
    rng = np.random.default_rng(11)
    C = backend.asarray(rng.random((2, 6, 8)))
    with pytest.warns(SinkhornConvergenceWarning, match="did not reach tol"):
        ops.sinkhorn_forward(C, epsilon=0.01, n_iters=5, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan, cache = ops.sinkhorn_forward(C, epsilon=0.5, n_iters=1000, tol=1e-10, check_every=7)
        ops.sinkhorn_forward(C, epsilon=0.01, n_iters=5)  # no tol: no check, no warning
    assert cache.n_run % 7 == 0 and cache.n_run < 1000
    assert cache.alphas.shape[0] == cache.n_run
    err = np.abs(backend.to_numpy(plan).sum(-2) - 1 / 8).sum(-1).max()
    assert err < 1e-10


def test_tolerance_stops_at_the_first_check_below_tol_with_weighted_marginals(backend):
    """tol bounds the L1 error of the column sums against b itself, not relative to b: with a
    non-uniform b the returned plan's error, measured here from the plan, is below tol, and the
    plan of the previous check (n_run - 5 iterations, run without tol) is not: the early stop
    came neither too early nor too late (a relative measure stops later here)."""
    rng = np.random.default_rng(12)
    C = rng.random((2, 5, 7))
    a, b = simplex(rng, (2, 5)), simplex(rng, (2, 7), lo=0.05)
    args = [backend.asarray(v) for v in (C, a, b)]
    tol = 1e-4
    plan, cache = ops.sinkhorn_forward(*args, epsilon=0.1, n_iters=1000, tol=tol, check_every=5)
    assert cache.n_run % 5 == 0 and 5 < cache.n_run < 1000
    err = np.abs(backend.to_numpy(plan).sum(-2) - b).sum(-1).max()
    assert err < tol
    before, _ = ops.sinkhorn_forward(*args, epsilon=0.1, n_iters=cache.n_run - 5)
    assert np.abs(backend.to_numpy(before).sum(-2) - b).sum(-1).max() >= tol


# --------------------------------------------------------------------------------------------
# IPOT and the OT distance
# --------------------------------------------------------------------------------------------


@pytest.mark.oracle
def test_ipot_distance_approaches_emd2(backend):
    rng = np.random.default_rng(12)
    C, a, b = problem(rng, (), 8, 10)
    exact = require("ot").emd2(a, b, C)
    errs = []
    for iters in (50, 200, 1000):
        d, _ = ops.ot_distance_forward(
            backend.asarray(C),
            backend.asarray(a),
            backend.asarray(b),
            method="ipot",
            n_iters=iters,
        )
        errs.append(abs(float(backend.to_numpy(d)) - exact) / exact)
    assert errs[0] > errs[1] > errs[2]
    assert errs[-1] <= 1e-3


def _torch_unrolled_cost_grad(C, a, b, eps, iters, d, dtype):
    """PyTorch's autograd through the log-domain loop sinkhorn_forward runs (g, then f)."""
    Ct = torch.tensor(C, dtype=dtype, requires_grad=True)
    logK = -Ct / eps
    la, lb = (torch.log(torch.tensor(x, dtype=dtype)) for x in (a, b))
    f = torch.zeros(la.shape, dtype=dtype)
    for _ in range(iters):
        g = lb - torch.logsumexp(logK + f[..., :, None], -2)
        f = la - torch.logsumexp(logK + g[..., None, :], -1)
    torch.exp(logK + f[..., :, None] + g[..., None, :]).backward(torch.tensor(d, dtype=dtype))
    return Ct.grad.numpy()


@pytest.mark.oracle
@pytest.mark.parametrize("path", ["default", "log-domain"])
def test_float32_unrolled_gradient_at_a_small_epsilon_is_as_good_as_torch(
    backend, path, monkeypatch
):
    """At epsilon 1e-3 of costs about 1 the exponents logK + potentials are sums of terms near
    1000, and the cost gradient a small difference of terms: the backward must use one rounding
    of the plan and weights that sum to 1 (sinkhorn._weight_sums). float32 against minivit's
    float64 (itself PyTorch's to 1e-10 here), no worse than PyTorch's float32 autograd of the
    same loop. (Measured: 0.010% on either path, PyTorch 0.080%; 2.0% on the default path and
    0.72% on the log-domain one before the backward did both.)"""
    import minivit.ops.sinkhorn as sk

    monkeypatch.setattr(sk, "_FAST_CPU_PATH", path == "default")
    rng = np.random.default_rng(21)
    C = np.abs(rng.standard_normal((3, 6, 7))).astype(np.float32)
    a, b = simplex(rng, (3, 6)).astype(np.float32), simplex(rng, (3, 7)).astype(np.float32)
    d = rng.standard_normal(C.shape)
    eps, iters = 1e-3, 50

    def minivit_grad(dtype):
        args = [backend.asarray(x.astype(dtype)) for x in (C, a, b)]
        _, cache = ops.sinkhorn_forward(*args, epsilon=eps, n_iters=iters)
        return backend.to_numpy(ops.sinkhorn_backward(backend.asarray(d.astype(dtype)), cache)[0])

    g64 = minivit_grad(np.float64)
    t64 = _torch_unrolled_cost_grad(C, a, b, eps, iters, d, torch.float64)
    assert rel(g64, t64) <= 1e-10
    err_torch32 = rel(_torch_unrolled_cost_grad(C, a, b, eps, iters, d, torch.float32), g64)
    err32 = rel(minivit_grad(np.float32), g64)
    assert err32 <= err_torch32, (err32, err_torch32)


@pytest.mark.parametrize("path", ["default", "log-domain"])
def test_ipot_matches_scaling_domain_reference(backend, path, monkeypatch):
    # NumPy runs the scaling domain itself unless it under/overflows; CuPy the log domain
    import minivit.ops.sinkhorn as sk

    monkeypatch.setattr(sk, "_FAST_CPU_PATH", path == "default")
    rng = np.random.default_rng(13)
    C = rng.random((3, 5, 8)) * 2
    a = rng.uniform(0.2, 1, (3, 5))
    b = rng.uniform(0.2, 1, (3, 8))
    a[1, 3:] = 0
    b[2, 6:] = 0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    for inner in (1, 3):
        P, cache = ops.ipot_forward(
            backend.asarray(C),
            backend.asarray(a),
            backend.asarray(b),
            n_iters=50,
            inner_iters=inner,
        )
        ref = ipot_reference(C, a, b, 0.5, 50, inner)
        assert rel(backend.to_numpy(P), ref) <= 1e-12
    grads = ops.ipot_backward(backend.asarray(np.ones(C.shape)), cache)
    assert all(float(abs(backend.to_numpy(g)).max()) == 0.0 for g in grads)
    assert [g.shape for g in grads] == [C.shape, a.shape, b.shape]


def test_ipot_scaling_domain_needs_no_rescue_on_a_plain_kernel():
    """NumPy's scaling domain on its own: on a plain kernel it must give the reference plan
    itself. A wrong update there fails its own check, and the log domain's rescue hid it."""
    import minivit.ops.sinkhorn as sk

    rng = np.random.default_rng(13)
    C = rng.random((3, 5, 8)) * 2
    a, b = rng.uniform(0.2, 1, (3, 5)), rng.uniform(0.2, 1, (3, 8))
    a[1, 3:] = 0
    b[2, 6:] = 0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    for inner in (1, 3):
        scaled = sk._ipot_scaling(C, a, b, 0.5, 50, inner)
        assert scaled is not None and rel(scaled, ipot_reference(C, a, b, 0.5, 50, inner)) <= 1e-12


def test_ipot_falls_back_to_the_log_domain_when_the_scalings_underflow(backend):
    """A sharp kernel (exp(-C / beta) down to exp(-4000)) underflows in the scaling domain; the
    plan then comes from the log domain, finite, rows summing to a, zero on padding."""
    import minivit.ops.sinkhorn as sk

    rng = np.random.default_rng(16)
    C = rng.random((2, 5, 6)) * 2000
    a, b = simplex(rng, (2, 5)), simplex(rng, (2, 6))
    a[0, 4] = 0
    a /= a.sum(-1, keepdims=True)
    assert sk._ipot_scaling(C, a, b, 0.5, 50, 1) is None  # the scaling domain gives up here
    args = [backend.asarray(x) for x in (C, a, b)]
    plan = backend.to_numpy(ops.ipot_forward(*args)[0])
    old, sk._FAST_CPU_PATH = sk._FAST_CPU_PATH, False
    try:
        log_plan = backend.to_numpy(ops.ipot_forward(*args)[0])
    finally:
        sk._FAST_CPU_PATH = old
    np.testing.assert_array_equal(plan, log_plan)
    assert np.isfinite(plan).all() and (plan[0, 4] == 0).all()
    np.testing.assert_allclose(plan.sum(-1), a, rtol=1e-12, atol=0)


@pytest.mark.oracle
@pytest.mark.parametrize("method", ["ipot", "sinkhorn"])
def test_ot_distance_forward_backward(backend, method):
    rng = np.random.default_rng(14)
    C, a, b = problem(rng, (4,), 6, 7)
    opts = {"epsilon": 0.1, "n_iters": 40} if method == "sinkhorn" else {}
    d, cache = ops.ot_distance_forward(
        backend.asarray(C), backend.asarray(a), backend.asarray(b), method=method, **opts
    )
    if method == "ipot":
        plan = ipot_reference(C, a, b, 0.5, 50, 1)
    else:
        plan = np.stack([pot_log(a[k], b[k], C[k], 0.1, 40) for k in range(4)])
    # ViLT's form: trace(C @ T^T) with T the plan
    assert (
        rel(backend.to_numpy(d), np.trace(C @ np.swapaxes(plan, -1, -2), axis1=1, axis2=2)) < 1e-9
    )
    dd = rng.standard_normal(4)
    (dC,) = ops.ot_distance_backward(backend.asarray(dd), cache)
    assert rel(backend.to_numpy(dC), dd[:, None, None] * plan) <= 1e-9


@given(
    lead=st.sampled_from([(), (3,), (2, 2)]),
    n=st.integers(1, 5),
    m=st.integers(1, 5),
    method=st.sampled_from(["ipot", "sinkhorn"]),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ot_distance_backward_central_differences_with_the_plan_held(lead, n, m, method, pad, seed):
    """The distance is <plan, cost> with the plan a constant of the cost (ViLT's WPA runs its
    solver without gradient), so its derivative is that of the linear map C -> <plan, C> for
    the plan the forward found: central differences of that map, on drawn shapes, batches and
    padded marginals (zero entries), must equal the backward."""
    rng = np.random.default_rng(seed)
    C, a, b = problem(rng, lead, n, m)
    if pad and n > 1:
        a[..., -1] = 0.0  # a padded word
        a /= a.sum(-1, keepdims=True)
    opts = {"epsilon": 0.1, "n_iters": 30} if method == "sinkhorn" else {"n_iters": 20}
    d, cache = ops.ot_distance_forward(C, a, b, method=method, **opts)
    plan = np.array(cache.plan)
    assert np.allclose(d, (plan * C).sum(axis=(-2, -1)), rtol=1e-12, atol=0)
    if pad and n > 1:
        assert (plan[..., -1, :] == 0).all()
    dd = rng.standard_normal(d.shape)
    (dC,) = ops.ot_distance_backward(dd, cache)

    def held(C_):
        return float((dd * (plan * C_).sum(axis=(-2, -1))).sum())

    assert rel(dC, central_diff(held, C)) <= 1e-8


# --------------------------------------------------------------------------------------------
# Cosine cost
# --------------------------------------------------------------------------------------------


def cosine_reference(x, y, eps):
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), eps)
    return 1 - np.einsum("...nd,...md->...nm", x, y)


@pytest.mark.oracle
def test_cosine_cost_forward_backward(backend):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 4, 6))
    y = rng.standard_normal((2, 5, 6))
    x[0, 1] = 0.0  # a zero row: the eps clamp is active
    x[1, 2] *= 1e-7
    dout = rng.standard_normal((2, 4, 5))
    out, cache = ops.cosine_cost_forward(backend.asarray(x), backend.asarray(y))
    assert rel(backend.to_numpy(out), cosine_reference(x, y, 1e-5)) <= 1e-14
    dx, dy = (backend.to_numpy(g) for g in ops.cosine_cost_backward(backend.asarray(dout), cache))

    def loss(x_, y_):
        return float((backend.to_numpy(ops.cosine_cost_forward(x_, y_)[0]) * dout).sum())

    assert rel(dx, central_diff(lambda v: loss(v, y), x, h=1e-9)) <= 1e-6
    assert rel(dy, central_diff(lambda v: loss(x, v), y)) <= 1e-6
    tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    nx = torch.nn.functional.normalize(tx, dim=-1, eps=1e-5)
    ny = torch.nn.functional.normalize(ty, dim=-1, eps=1e-5)
    tout = 1 - nx @ ny.transpose(-1, -2)
    (tout * torch.tensor(dout)).sum().backward()
    assert rel(backend.to_numpy(out), tout.detach().numpy()) <= 1e-14
    assert rel(dx, tx.grad.numpy()) <= 1e-10
    assert rel(dy, ty.grad.numpy()) <= 1e-10


@given(
    lead=st.sampled_from([(), (2,), (2, 1)]),
    n=st.integers(1, 4),
    m=st.integers(1, 4),
    d=st.integers(1, 6),
    shared_y=st.booleans(),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cosine_cost_backward_central_differences(lead, n, m, d, shared_y, zero_row, seed):
    """On drawn shapes: leading dims, a y shared by the batch (its gradient summed back), and a
    zero row of x, where the norm's clamp at eps makes the row's map linear."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (n, d))
    y = rng.standard_normal((m, d) if shared_y else lead + (m, d))
    if zero_row:
        x[..., 0, :] = 0.0
    out, cache = ops.cosine_cost_forward(x, y)
    assert out.shape == lead + (n, m)
    assert rel(out, cosine_reference(x, y, 1e-5)) <= 1e-13
    dout = rng.standard_normal(out.shape)
    dx, dy = ops.cosine_cost_backward(dout, cache)
    assert dx.shape == x.shape and dy.shape == y.shape

    def loss(x_, y_):
        return float((ops.cosine_cost_forward(x_, y_)[0] * dout).sum())

    # h well below eps, so the zero row stays on the clamped (linear) side
    assert rel(dx, central_diff(lambda v: loss(v, y), x, h=1e-7), floor=1e-6) <= 1e-6
    assert rel(dy, central_diff(lambda v: loss(x, v), y), floor=1e-6) <= 1e-6


def test_cosine_cost_broadcast_and_float32(backend):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 4, 5))
    y = rng.standard_normal((6, 5))  # shared by the batch: dy summed back
    out, cache = ops.cosine_cost_forward(backend.asarray(x), backend.asarray(y))
    dx, dy = ops.cosine_cost_backward(backend.asarray(np.ones((3, 4, 6))), cache)
    assert out.shape == (3, 4, 6) and dx.shape == x.shape and dy.shape == y.shape
    dy1 = sum(
        backend.to_numpy(
            ops.cosine_cost_backward(
                backend.asarray(np.ones((4, 6))),
                ops.cosine_cost_forward(backend.asarray(x[k]), backend.asarray(y))[1],
            )[1]
        )
        for k in range(3)
    )
    assert rel(backend.to_numpy(dy), dy1) <= 1e-14
    out32, _ = ops.cosine_cost_forward(
        backend.asarray(x, dtype=np.float32), backend.asarray(y, dtype=np.float32)
    )
    assert out32.dtype == np.float32
    assert rel(backend.to_numpy(out32), backend.to_numpy(out)) <= 1e-6


def test_float32_stays_float32_and_close_to_float64(backend):
    rng = np.random.default_rng(18)
    C, a, b = problem(rng, (2,), 6, 5)
    dP = rng.standard_normal(C.shape)
    out = {}
    for dt in (np.float32, np.float64):
        to = lambda x, dt=dt: backend.asarray(x, dtype=dt)  # noqa: E731
        plan, cache = ops.sinkhorn_forward(to(C), to(a), to(b), epsilon=0.1, n_iters=20)
        grads = ops.sinkhorn_backward(to(dP), cache)
        assert plan.dtype == dt and all(g.dtype == dt for g in grads)
        out[dt] = [backend.to_numpy(x) for x in (plan, *grads)]
    for x32, x64 in zip(out[np.float32], out[np.float64]):
        assert rel(x32, x64) <= 1e-4
