"""ViLT's VQA path against Hugging Face transformers' ``ViltForQuestionAnswering`` (an oracle
nobody here wrote).

A random-weight ``ViltForQuestionAnswering`` (no dropout) is converted with ``from_hf_vilt`` into
a minivit ``ViLT(num_vqa_labels=A)``; on captions with padding, and with or without a pixel mask
that leaves two images partly padded:

- forward: ``vqa_forward(pooled)`` gives HF's logits, relative error < 1e-10 in float64 and
  < 1e-5 for a float32 minivit model (its fast kernels) against HF in float64;
- backward: the original's VQA loss, binary cross-entropy with logits against soft scores times
  the number of answers (``F.binary_cross_entropy_with_logits(logits, t) * A``, i.e. the sum over
  answers averaged over the batch), is differentiated by hand (dlogits = (sigmoid - t) / B) and
  fed to ``vqa_backward`` and ``ViLT.backward``: every parameter's gradient (classifier and
  encoder) and the image gradient match torch autograd through HF's model (< 1e-8);
- names: a VQA checkpoint's keys map onto minivit's ``vqa_classifier.*`` and encoder names, and
  load into ``ViLT(num_vqa_labels=A)`` with only the pre-training heads (``itm_score``,
  ``mlm_score``) missing.

With a pixel mask HF fills each image up to the largest valid patch count with randomly drawn
padding patches (and shuffles the fullest image's patches), where minivit keeps every patch in
row-major order: the image features differ, but padding is masked as a key and attention is
permutation-equivariant, so the pooled output, the logits and every gradient do not depend on it.

Budget: a few seconds on a CPU (tiny config: D 32, 2 layers, 4x4 patches, batch 3).
"""

from __future__ import annotations

import numpy as np
import pytest
from _requires import require

torch = require("torch")
transformers = require("transformers")

from test_convert_vilt import (  # noqa: E402  (the same tiny config, weights and captions)
    B,
    D,
    P,
    S,
    _hf_config,
    _minivit,
    _randomize,
    _rel,
)
from test_convert_vilt import _inputs as _caption_inputs  # noqa: E402
from test_convert_vilt import _minivit_from as _converted  # noqa: E402

from minivit.convert import from_hf_vilt  # noqa: E402
from minivit.models import vilt_heads as H  # noqa: E402

pytestmark = pytest.mark.oracle

A = 7  # answers
PRETRAIN_HEADS = ("itm_score.", "mlm_score.")


def _hf_model(seed=0):
    from transformers import ViltForQuestionAnswering

    torch.manual_seed(seed)
    model = ViltForQuestionAnswering(_hf_config(num_labels=A)).double().eval()
    return _randomize(model, seed, norms=("classifier.1.weight",))  # the classifier's LayerNorm


def _inputs(seed=0, pixel_mask=False):
    ids, mask, images = _caption_inputs(seed)
    pmask = None
    if pixel_mask:  # image 0 whole, image 1 3x4 patches valid, image 2 2x3 (bottom/right pad)
        pmask = np.zeros((B, S, S), bool)
        pmask[0] = True
        pmask[1, : 3 * P, :] = True
        pmask[2, : 2 * P, : 3 * P] = True
        images = images * pmask[:, None]  # the processor pads with zeros
    return ids, mask, images, pmask


def _minivit_from(hf, dtype="float64"):
    # HF's VQA model has no pre-training heads: minivit keeps its own itm_score.* and mlm_score.*
    return _converted(hf, dtype, missing=PRETRAIN_HEADS, num_vqa_labels=A)


def _hf_run(hf, ids, mask, images, pmask, *, image_grad=False):
    pixels = torch.from_numpy(images).requires_grad_(image_grad)
    out = hf(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        pixel_values=pixels,
        pixel_mask=None if pmask is None else torch.from_numpy(pmask.astype(np.int64)),
    )
    return out.logits, pixels


def _soft_targets(rng):
    """VQA's soft scores: min(1, #annotators / 3)-like values, mostly zero."""
    t = rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], size=(B, A), p=[0.6, 0.1, 0.1, 0.1, 0.1])
    t[:, 0] = 1.0  # every question has an answer
    return t


@pytest.mark.parametrize("pixel_mask", [False, True], ids=["no_pixel_mask", "pixel_mask"])
def test_vqa_logits_match_hf(pixel_mask):
    hf = _hf_model()
    ids, mask, images, pmask = _inputs(pixel_mask=pixel_mask)
    with torch.no_grad():
        logits_hf = _hf_run(hf, ids, mask, images, pmask)[0].numpy()
    assert logits_hf.shape == (B, A)

    model = _minivit_from(hf)
    out = model.forward(ids, mask, images, image_mask=pmask)
    logits, _ = H.vqa_forward(out["pooled"], model.params)
    assert logits.shape == (B, A) and logits.dtype == np.float64
    assert _rel(logits, logits_hf) < 1e-10

    # float32 minivit (its fast float32 kernels: GELU's erfc polynomial, fused paths)
    m32 = _minivit_from(hf, dtype="float32")
    out32 = m32.forward(ids, mask, images.astype(np.float32), image_mask=pmask)
    logits32, _ = H.vqa_forward(out32["pooled"], m32.params)
    assert logits32.dtype == np.float32
    assert _rel(logits32.astype(np.float64), logits_hf) < 1e-5


@pytest.mark.parametrize("pixel_mask", [False, True], ids=["no_pixel_mask", "pixel_mask"])
def test_vqa_loss_gradients_match_torch_autograd(pixel_mask):
    hf = _hf_model(seed=3)
    model = _minivit_from(hf)
    ids, mask, images, pmask = _inputs(seed=4, pixel_mask=pixel_mask)
    targets = _soft_targets(np.random.default_rng(5))

    # HF: the original ViLT's VQA loss (as ViltForQuestionAnswering computes it), then autograd
    logits_hf, pixels = _hf_run(hf, ids, mask, images, pmask, image_grad=True)
    t = torch.from_numpy(targets)
    loss_hf = torch.nn.functional.binary_cross_entropy_with_logits(logits_hf, t) * A
    loss_hf.backward()
    hf_grads = from_hf_vilt(
        {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    )
    dimages_hf = pixels.grad.numpy()

    # minivit: the same loss by hand. mean over B*A elements times A = sum / B, so
    # dL/dlogits = (sigmoid(logits) - targets) / B
    out = model.forward(ids, mask, images, image_mask=pmask)
    logits, cache = H.vqa_forward(out["pooled"], model.params)
    z = logits
    loss = (np.maximum(z, 0) - z * targets + np.log1p(np.exp(-np.abs(z)))).sum() / B
    assert abs(loss - loss_hf.item()) <= 1e-10 * abs(loss_hf.item())
    dlogits = (1.0 / (1.0 + np.exp(-z)) - targets) / B
    head = {}
    dpooled = H.vqa_backward(dlogits, cache, head)
    dimages = model.backward(dict(pooled=dpooled))
    grads = dict(model.grads)
    for k, g in head.items():
        grads[k] = grads[k] + g

    # every HF parameter has its gradient; minivit's pre-training heads get none from VQA
    assert set(hf_grads) == {k for k in grads if not k.startswith(PRETRAIN_HEADS)}
    for k in grads:
        if k.startswith(PRETRAIN_HEADS):
            assert not np.any(grads[k]), k
    errs = {k: _rel(grads[k], hf_grads[k]) for k in hf_grads}
    for k in (
        "vqa_classifier.3.weight",
        "vqa_classifier.1.weight",
        "vqa_classifier.0.weight",
        "pooler.dense.weight",
        "transformer.blocks.0.attn.qkv.weight",
        "transformer.patch_embed.proj.weight",
        "text_embeddings.word_embeddings.weight",
    ):
        assert np.abs(hf_grads[k]).max() > 0, k  # the comparison means something
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-8, (worst, errs[worst])

    # d loss / d pixels (zero on padded pixels in both)
    assert dimages.shape == images.shape
    assert _rel(dimages, dimages_hf) < 1e-8
    if pmask is not None:
        assert not np.any(dimages * ~pmask[:, None])


def test_vqa_checkpoint_keys_convert_to_minivit_names():
    hf = _hf_model(seed=7)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert {k for k in sd if k.startswith("classifier.")} == {
        f"classifier.{i}.{kind}" for i in (0, 1, 3) for kind in ("weight", "bias")
    }
    out = from_hf_vilt(sd)
    model = _minivit(num_vqa_labels=A)
    shapes = {k: tuple(v.shape) for k, v in model.params.items()}
    expected = {k for k in shapes if not k.startswith(PRETRAIN_HEADS)}
    assert set(out) == expected
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: shapes[k] for k in expected}
    for i in (0, 1, 3):  # the classifier is copied as is, index for index
        for kind in ("weight", "bias"):
            np.testing.assert_array_equal(
                out[f"vqa_classifier.{i}.{kind}"], sd[f"classifier.{i}.{kind}"]
            )
    assert out["vqa_classifier.3.weight"].shape == (A, 2 * D)

    # the same keys without the "vilt." prefix on the encoder give the same dict
    bare = {k[len("vilt.") :] if k.startswith("vilt.") else k: v for k, v in sd.items()}
    again = from_hf_vilt(bare)
    assert again.keys() == out.keys()

    # into a model with another number of answers: a clear error naming the classifier
    other = _minivit(num_vqa_labels=A + 1)
    with pytest.raises(ValueError, match=r"vqa_classifier\.3\.weight"):
        other.load_state_dict(out, strict=False)
