"""Test helpers for the op suites: float64 central differences and the error measures.

Written for the tests on purpose, independently of ``minivit.gradcheck``, so that the library's
gradient checker and the op tests do not share a bug.

Error measure (used for numerical gradients, float32-vs-float64 and the PyTorch oracle): for an
array ``a`` checked against a reference ``r``::

    rel_err(a, r) = max |a - r| / max(max |a|, max |r|)

a norm-wise relative error, so entries that are near zero do not blow it up.
"""

from __future__ import annotations

import os

import numpy as np


def rel_err(a, r, scale: float = 0.0) -> float:
    """max |a - r| / max(max |a|, max |r|, scale); 0 when all three are zero.

    ``scale`` is for results that are small only through cancellation (layernorm's dx when D = 2
    is O(eps) made from terms O(rstd |dout|)): the error is then measured against the size of
    the terms that were subtracted, the size that floating point can resolve.
    """
    a = np.asarray(a, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    assert a.shape == r.shape, f"shapes differ: {a.shape} vs {r.shape}"
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(r).max(), scale)
    diff = np.abs(a - r).max()
    if scale == 0.0:
        return float(diff)
    return float(diff / scale)


def central_diff(loss, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """The gradient of the scalar ``loss(x)`` w.r.t. the float64 array ``x``, entry by entry.

    Uses the step that was actually taken, ``(x + h) - (x - h)`` in floating point, as the
    denominator, so large entries (logits ~1e3) do not add a rounding error of their own.
    """
    x = np.array(x, dtype=np.float64)  # a private copy, perturbed in place below
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + h
        hi = flat[i]
        f_hi = loss(x)
        flat[i] = orig - h
        lo = flat[i]
        f_lo = loss(x)
        flat[i] = orig
        gflat[i] = (f_hi - f_lo) / (hi - lo)
    return g


def check_grads(
    backend,
    fwd,
    bwd,
    inputs,
    grad_slots: dict[int, int],
    kwargs=None,
    seed: int = 0,
    h: float = 1e-6,
    rtol: float = 1e-6,
    terms=None,
):
    """Check an op's backward against central differences of ``sum(out * dout)`` in float64.

    ``inputs`` are host values (numpy arrays go to ``backend``; anything else is passed as is);
    ``grad_slots`` maps the index of each float input to check to its slot in the grads tuple.
    Fails when ``max|a - n| > rtol * max(max|a|, max|n|, terms) + atol``, atol being the rounding
    noise floor of the difference quotient. ``terms`` (a function of (host inputs, dout) giving
    {input index: size}) is for gradients that are small only through cancellation, measured, as
    in :func:`rel_err`, against the size of the terms that cancel. Returns {input index: rel_err}.
    """
    kwargs = kwargs or {}
    # host values, NumPy scalars included (a 0-d draw), go to the backend under test
    to_dev = lambda a: backend.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else a  # noqa: E731
    dev = [to_dev(a) for a in inputs]
    out, cache = fwd(*dev, **kwargs)
    out_h = backend.to_numpy(out)
    dout = np.random.default_rng(seed).standard_normal(out_h.shape)
    grads = bwd(backend.asarray(dout), cache)
    term_size = terms(inputs, dout) if terms is not None else {}
    errs = {}
    for i, slot in grad_slots.items():
        analytic = backend.to_numpy(grads[slot])
        base = list(dev)

        def loss(xi, i=i, base=base):
            base[i] = backend.asarray(xi)
            o = backend.to_numpy(fwd(*base, **kwargs)[0])
            return float(np.sum(o * dout))

        numeric = central_diff(loss, inputs[i], h=h)
        noise = 64 * np.finfo(np.float64).eps * float(np.sum(np.abs(out_h * dout)) + 1.0) / h
        diff = np.abs(analytic - numeric).max() if numeric.size else 0.0
        scale = max(np.abs(analytic).max(), np.abs(numeric).max()) if numeric.size else 0.0
        scale = max(scale, term_size.get(i, 0.0))
        assert np.all(np.isfinite(analytic)), f"input {i}: analytic gradient has NaN/inf"
        assert diff <= rtol * scale + noise, (
            f"input {i} ({inputs[i].shape}): max|analytic - numeric| = {diff:.3e}, "
            f"scale {scale:.3e}, rel {diff / max(scale, 1e-300):.3e} > {rtol} (noise {noise:.1e})"
        )
        errs[i] = rel_err(analytic, numeric, scale=term_size.get(i, 0.0))
    return errs


def to_torch(a, requires_grad=True):
    """A float64 (or integer/bool) torch tensor from a host array, a leaf for autograd."""
    import torch

    t = torch.from_numpy(np.array(a))
    if requires_grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def record_torch_err(op: str, *errs: float) -> float:
    """The largest of ``errs``; appended to $MINIVIT_TORCH_ERR_LOG when set (for the report)."""
    e = max(errs)
    path = os.environ.get("MINIVIT_TORCH_ERR_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{op} {e:.3e}\n")
    return e


def fixture_settings():
    """Hypothesis settings for tests that also take the (function-scoped) ``backend`` fixture.

    The backend fixture returns a cached, stateless Backend, so sharing it between examples is
    safe; max_examples and the rest come from the loaded profile ("ci" by default).
    """
    from hypothesis import HealthCheck, settings

    return settings(
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
    )
