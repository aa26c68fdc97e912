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

import minivit
from minivit import kernels_cupy, ops

if _cuda_emu.CXX is None:
    pytest.skip("the kernels' SIMT emulator needs g++", allow_module_level=True)

# Launches per encoder block of a ViT train step on the CuPy kernel path (see module docstring).
BLOCK_FORWARD = 17
BLOCK_BACKWARD = 29


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


def test_attention_never_copies_a_square_operand(kernels):
    # CuPy's batched matmul copies non-contiguous operands; the kernel path's layout leaves it
    # only (N, hd)-sized ones to copy (ops/attention.py), never P or dS (B, H, N, N).
    B, N, D, H = 2, 40, 8, 2
    rng = np.random.default_rng(1)

    def dev(*shape):
        return kernels.asarray(rng.standard_normal(shape), dtype="float32")

    x, w_qkv, b_qkv, w_proj, b_proj = dev(B, N, D), dev(3 * D, D), dev(3 * D), dev(D, D), dev(D)
    with si.counting() as c:
        out, cache = ops.attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, H)
        ops.attention_backward(dev(B, N, D), cache)
    assert getattr(cache, "kernel_layout", False)  # the path under test ran
    square = B * H * N * N * 4
    small = B * H * N * (D // H) * 4
    assert c["matmul_copied_bytes"] == 5 * small < square, c


def test_linear_gelu_saves_a_launch(kernels):
    rng = np.random.default_rng(2)
    x, w, b = (kernels.asarray(rng.standard_normal(s), dtype="float32") for s in
               ((4, 5, 8), (16, 8), (16,)))  # fmt: skip
    with si.counting() as fused:
        ops.linear_gelu_forward(x, w, b)
    with si.counting() as apart:
        ops.gelu_forward(ops.linear_forward(x, w, b)[0])
    assert (fused["launch"], apart["launch"]) == (2, 3)
