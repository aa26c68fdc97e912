"""What minivit's CuPy path asks of a GPU, counted on the CPU stand-in (kernels on).

On a GPU, a small model's step is often bound by the host: each kernel launch and each cuBLAS
call costs microseconds of Python and driver time, whatever its size, and every read of device
data on the host (a sync) waits for the whole queue. These tests hold the CuPy path to the
launch counts it has now, per encoder block, so that a change that adds launches (or a sync
inside a model) fails here rather than only in a GPU benchmark. The counts follow CuPy 14.2's
rules, including the copies its batched matmul makes of non-contiguous operands
(``_cupy_stand_in.counting``); they are a model, not a profile. The figures and PyTorch's for
the same block are in docs/kernels.md.
"""

from __future__ import annotations

import _cuda_emu
import _cupy_stand_in as si
import numpy as np
import pytest
from _requires import skipping_missing

import minivit
from minivit import kernels_cupy, ops

if _cuda_emu.CXX is None and skipping_missing():  # elsewhere a missing g++ fails (_requires)
    pytest.skip("the kernels' SIMT emulator needs g++", allow_module_level=True)

# Launches per encoder block of a ViT train step on the CuPy kernel path (see module docstring).
BLOCK_FORWARD = 17
BLOCK_BACKWARD = 29
# ... of which attention's forward and backward (with or without a key mask)
ATTENTION_LAUNCHES = 25


@pytest.fixture
def kernels(cupy_stand_in):
    prev = kernels_cupy.set_enabled(True)
    yield cupy_stand_in
    kernels_cupy.set_enabled(prev)


def _vit_step(be, depth):
    model = minivit.ViT(
        img_size=16, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10,
        backend=be, dtype="float32",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    images = be.asarray(rng.standard_normal((2, 3, 16, 16)), dtype="float32")
    labels = be.asarray(np.array([1, 7]))
    with si.counting() as fwd:
        logits = model.forward(images, train=True)
    with si.counting() as loss:
        _, cache = ops.cross_entropy_forward(logits, labels)
        (dlogits,) = ops.cross_entropy_backward(1.0, cache)
    with si.counting() as bwd:
        model.backward(dlogits, input_grad=False)
    return fwd, loss, bwd


def test_vit_train_step_launches_per_block(kernels):
    # Two depths: the difference is one block's cost, the rest (embedding, head) cancels out.
    (f1, loss, b1), (f3, _, b3) = _vit_step(kernels, 1), _vit_step(kernels, 3)
    per_block = ((f3["launch"] - f1["launch"]) / 2, (b3["launch"] - b1["launch"]) / 2)
    assert per_block[0] <= BLOCK_FORWARD and per_block[1] <= BLOCK_BACKWARD, per_block
    # No host sync and no host-to-device copy anywhere inside the model's forward or backward:
    # the host can queue a whole step ahead of the GPU.
    for c in (f3, b3):
        assert c["sync"] == 0 and c["h2d"] == 0, c
    # The loss reads one small array on the host (its target check and count), no more.
    assert loss["sync"] == 1 and loss["h2d"] == 0, loss


def _vilt_step(be, depth):
    from minivit.models.vilt import ViLT

    model = ViLT(
        vocab_size=23, max_text_len=10, img_size=16, patch_size=8, embed_dim=16, depth=depth,
        num_heads=2, mlp_ratio=2.0, dtype="float32", seed=1, backend=be,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    B, L = 2, 6
    mask = np.ones((B, L), bool)
    mask[0, 4:] = False  # text padding: the key mask that attention's softmax kernel reads
    ids = np.where(mask, rng.integers(5, 23, (B, L)), 0)
    images = be.asarray(rng.standard_normal((B, 3, 16, 16)), dtype="float32")
    shapes = {"text_feats": (B, L, 16), "image_feats": (B, 5, 16), "pooled": (B, 16)}
    douts = {k: be.asarray(rng.standard_normal(s), dtype="float32") for k, s in shapes.items()}
    ids, mask = be.asarray(ids), be.asarray(mask)
    with si.counting() as fwd:
        model.forward(ids, mask, images)
    with si.counting() as bwd:
        model.backward(douts)
    return fwd, bwd


def test_vilt_blocks_cost_what_vit_blocks_cost(kernels):
    # ViLT's blocks are ViT's with a text padding mask: the mask costs no launch. Its forward
    # reads the host three times, all before the encoder: the input checks (one read), the
    # embedding op's id range, and the valid image sizes that choose the patch sampling.
    (f1, b1), (f3, b3) = _vilt_step(kernels, 1), _vilt_step(kernels, 3)
    per_block = ((f3["launch"] - f1["launch"]) / 2, (b3["launch"] - b1["launch"]) / 2)
    assert per_block[0] <= BLOCK_FORWARD and per_block[1] <= BLOCK_BACKWARD, per_block
    assert f3["sync"] <= 3 and b3["sync"] == 0, (f3, b3)


@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "key-mask"])
def test_attention_never_copies_a_square_operand(kernels, masked):
    # CuPy's batched matmul copies non-contiguous operands; the kernel path's layout leaves it
    # only (N, hd)-sized ones to copy (ops/attention.py), never P or dS (B, H, N, N). A key
    # mask (ViLT's text padding) is read by the softmax kernel and costs no launch.
    B, N, D, H = 2, 40, 8, 2
    rng = np.random.default_rng(1)

    def dev(*shape):
        return kernels.asarray(rng.standard_normal(shape), dtype="float32")

    x, w_qkv, b_qkv, w_proj, b_proj = dev(B, N, D), dev(3 * D, D), dev(3 * D), dev(D, D), dev(D)
    mask = None
    if masked:
        m = np.ones((B, N), bool)
        m[1, 25:] = False
        mask = kernels.asarray(m)
    dout = dev(B, N, D)
    with si.counting() as c:
        out, cache = ops.attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, H, key_mask=mask)
        ops.attention_backward(dout, cache)
    assert getattr(cache, "kernel_layout", False)  # the path under test ran
    square = B * H * N * N * 4
    small = B * H * N * (D // H) * 4
    assert c["matmul_copied_bytes"] == 5 * small < square, c
    assert c["launch"] <= ATTENTION_LAUNCHES, c


def test_linear_gelu_saves_a_launch(kernels):
    rng = np.random.default_rng(2)
    x, w, b = (kernels.asarray(rng.standard_normal(s), dtype="float32") for s in
               ((4, 5, 8), (16, 8), (16,)))  # fmt: skip
    with si.counting() as fused:
        ops.linear_gelu_forward(x, w, b)
    with si.counting() as apart:
        ops.gelu_forward(ops.linear_forward(x, w, b)[0])
    assert (fused["launch"], apart["launch"]) == (2, 3)
