"""Zero-size inputs: a batch of 0, a layer of no input features, a softmax over no entries.

Each gives an empty result of the right shape, and its backward empty input gradients and
zero parameter gradients, as PyTorch does, instead of a NumPy reshape or reduction error from
inside the op (which ``reshape(-1, ...)`` and ``min`` of a zero-size array raised).
"""

from __future__ import annotations

import numpy as np
from _requires import require

from minivit import ViLT, ViT, ops
from minivit.models.hybrid import HybridViT

torch = require("torch")


def _host(backend, *arrays):
    return [backend.to_numpy(a) for a in arrays]


def test_conv2d_and_groupnorm_on_a_batch_of_0(backend):
    x = backend.asarray(np.zeros((0, 3, 6, 6)))
    w = backend.asarray(np.random.default_rng(0).standard_normal((4, 3, 3, 3)))
    b = backend.asarray(np.ones(4))
    out, c = ops.conv2d_forward(x, w, b, stride=2, padding=1)
    assert out.shape == (0, 4, 3, 3)
    dx, dw, db = _host(backend, *ops.conv2d_backward(backend.asarray(np.zeros(out.shape)), c))
    assert dx.shape == (0, 3, 6, 6) and not dw.any() and not db.any()

    gamma, beta = backend.asarray(np.ones(4)), backend.asarray(np.zeros(4))
    y, c = ops.groupnorm_forward(backend.asarray(np.zeros((0, 4, 5, 5))), gamma, beta, 2)
    assert y.shape == (0, 4, 5, 5)
    dx, dg, dbeta = _host(backend, *ops.groupnorm_backward(backend.asarray(np.zeros(y.shape)), c))
    assert dx.shape == y.shape and dg.shape == dbeta.shape == (4,)
    assert not dg.any() and not dbeta.any()


def test_linear_with_no_input_features_is_its_bias_as_in_torch(backend):
    b = np.array([1.0, -2.0, 3.0])
    x, w = np.zeros((2, 0)), np.zeros((3, 0))
    out, c = ops.linear_forward(*map(backend.asarray, (x, w, b)))
    d = np.random.default_rng(1).standard_normal((2, 3))
    dx, dw, db = _host(backend, *ops.linear_backward(backend.asarray(d), c))
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    tout = torch.nn.functional.linear(tx, tw, tb)
    tout.backward(torch.from_numpy(d))
    np.testing.assert_array_equal(backend.to_numpy(out), tout.detach().numpy())
    assert dx.shape == (2, 0) and dw.shape == (3, 0)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-15)


def test_softmax_over_no_entries_is_empty_as_in_torch(backend):
    for shape, axis in (((2, 0), -1), ((0, 3), 0), ((0, 3), -1)):
        y, c = ops.softmax_forward(backend.asarray(np.zeros(shape)), axis=axis)
        (dx,) = ops.softmax_backward(backend.asarray(np.zeros(shape)), c)
        assert y.shape == dx.shape == torch.softmax(torch.zeros(shape), axis).shape


def _grads_are_zero(model):
    host = model.backend.to_numpy
    return set(model.grads) == set(model.params) and not any(
        host(g).any() for g in model.grads.values()
    )


def test_models_on_a_batch_of_0(backend):
    vit = ViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3,
              dtype="float64", backend=backend)  # fmt: skip
    hybrid = HybridViT(img_size=32, in_chans=3, num_classes=3, dtype="float64", backend=backend)
    for model in (vit, hybrid):
        S, C = model.img_size, model.in_chans
        logits = model.forward(backend.asarray(np.zeros((0, C, S, S))), train=True)
        assert logits.shape == (0, 3)
        dimg = model.backward(backend.asarray(np.zeros((0, 3))))
        assert dimg.shape == (0, C, S, S) and _grads_are_zero(model)

    vilt = ViLT(vocab_size=20, max_text_len=6, img_size=32, patch_size=16, embed_dim=16, depth=1,
                num_heads=2, dtype="float64", backend=backend)  # fmt: skip
    ids = backend.asarray(np.zeros((0, 6), np.int64))
    mask = backend.asarray(np.zeros((0, 6), bool))
    out = vilt.forward(ids, mask, backend.asarray(np.zeros((0, 3, 32, 32))), train=True)
    assert out["text_feats"].shape == (0, 6, 16) and out["pooled"].shape == (0, 16)
    dimg = vilt.backward({"pooled": backend.asarray(np.zeros((0, 16)))})
    assert dimg.shape == (0, 3, 32, 32) and _grads_are_zero(vilt)
