"""``minivit predict CHECKPOINT IMAGES...``: what a trained model says about image files.

A ViT or Hybrid ViT checkpoint gives class probabilities; a ViLT checkpoint scores a caption
(``--caption``) against each image (below). Images are read with Pillow.

Every image file is read upright (its EXIF orientation applied), with transparency laid onto
white and 16-bit, 32-bit integer and floating-point greyscale brought to 8 bits
(:func:`open_image`, which gives the rules).

ViT and Hybrid ViT: each image is converted to the model's channels (grayscale "L" for one,
"RGB" for three), resized to the model's input size and scaled to [0, 1]. The digits the model
learned from are bright ink on a dark background, so a picture with a bright background (a
dark digit on white paper, the usual case) is inverted first (``--invert auto``, judged from
the border pixels). For a model trained on the digits, a picture larger than 8 x 8 is then
made to look like them before it is shrunk (:func:`load_image`): its background brought to 0
and its ink to full strength, the ink cropped, and centred in a square, since every one of
those digits fills its frame from top to bottom. Then the training run's normalisation (mean
and std from the checkpoint) is applied.

ViLT (a ``train vilt`` run, or Hugging Face ViLT weights: a ``model.safetensors`` with its
``config.json`` and ``vocab.txt`` beside it): each image is prepared as the original ViLT and
Hugging Face's ``ViltProcessor`` prepare it (:func:`vilt_image_size`, :func:`vilt_pixels`):
converted to RGB, resized with bicubic interpolation so that its shorter side is the model's
``img_size`` (384 for the published models) and its aspect ratio is kept (where the longer
side would then exceed 1333/800 of that, both shrink in proportion until it does not), both
sides rounded down to a multiple of the patch size, and normalised with ViLT's mean and std
of 0.5. Images of different sizes are padded at the bottom
and right to a common size, with a pixel mask that keeps the padding out of attention, and the
model's position embeddings are interpolated to each image's patch grid. Every patch is used
(no ``max_image_len`` sampling).
The caption is tokenized with the run's word tokenizer, or with BERT's WordPiece and the
``vocab.txt`` (``--vocab``, else the one beside the checkpoint, unless that is a ``train vilt``
run's). Printed per image: the image-text matching head's probability that the caption
describes the image, and for every ``[MASK]`` in the caption the words the MLM head puts there,
most probable first (never a special token). A head the checkpoint does not hold (Hugging
Face's MLM checkpoint has no ITM head) is left out, not run with random weights.
"""

from __future__ import annotations

import argparse

from .common import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a checkpoint file, a run folder, or a folder of Hugging Face ViT or ViLT weights "
        "(model.safetensors and config.json)",
    )
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="invert brightness first (auto: when the border is bright)")  # fmt: skip
    p.add_argument(
        "--top",
        type=positive_int,
        default=3,
        help="how many classes (ViLT: words per [MASK]) to list (default: 3)",
    )
    p.add_argument(
        "--caption",
        default=None,
        help="ViLT: the caption to score against each image; write [MASK] where "
        "the model should fill in a word",
    )
    p.add_argument(
        "--vocab",
        default=None,
        help="ViLT: a BERT vocab.txt (default: the vocab.txt of a Hugging Face folder, else "
        "the train vilt run's own word list)",
    )


# PIL modes of 16-bit integer greyscale (16-bit PNGs, TIFFs): PIL's own conversion to "L" or
# "RGB" clips them, which turns nearly every pixel of a 16-bit image white
_GREY_16 = ("I;16", "I;16B", "I;16L", "I;16N")


def _grey_to_8bit(im):
    """A 16-bit, 32-bit integer ("I") or 32-bit float ("F") greyscale image as an "L" image, by
    the rules of :func:`open_image`."""
    import numpy as np
    from PIL import Image

    if im.mode in _GREY_16:
        a = np.asarray(im, dtype=np.int64) >> 8  # the top 8 bits
    elif im.mode == "I":  # no bit depth recorded: judged from the values
        a = np.asarray(im, dtype=np.int64)
        if a.size and a.max() > 255:
            a = a >> 8  # a 16-bit image (older Pillow opens 16-bit PNGs as "I")
    else:  # "F": the scale is judged from the finite values
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        unit = finite.size and finite.min() >= 0.0 and finite.max() <= 1.0
        a = np.nan_to_num(a, nan=0.0, posinf=1.0 if unit else 255.0, neginf=0.0)
        if unit:
            a = a * 255.0  # intensities in [0, 1], as floating-point images usually hold
        a = np.rint(a)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def open_image(path, mode):
    """An image file as a PIL image in ``mode`` ("RGB" or "L"), the way a viewer shows it:

    - turned upright by its EXIF orientation tag (a phone's portrait photo is stored sideways);
    - transparency laid onto white (as Hugging Face's ``convert_to_rgb`` does): PIL's plain
      conversion would show whatever colour the transparent pixels happen to hold;
    - wide greyscale brought to 8 bits, where PIL's own conversion would clip it to white or
      read [0, 1] floats as black: 16-bit (modes "I;16*") keeps its top 8 bits; 32-bit integer
      (mode "I") is read on the 8-bit scale when no value exceeds 255, else on the 16-bit
      scale (its top 8 of 16 bits); 32-bit float (mode "F", a float TIFF) is read as
      intensities in [0, 1] when every value lies there, else on the 8-bit scale (0..255).
      Values outside the scale are clipped to black or white; NaN is black, +inf white and
      -inf black (the scale is judged from the finite values).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as f:
        im = ImageOps.exif_transpose(f)  # a loaded copy, upright
    if im.mode in _GREY_16 or im.mode in ("I", "F"):
        im = _grey_to_8bit(im)
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert(mode)


def load_image(path, size, channels, invert="auto", digit=False):
    """One image file -> float64 array (channels, size, size) in [0, 1], for ViT and Hybrid ViT.
    Read with :func:`open_image`; BOX resampling when shrinking, BICUBIC when enlarging.

    ``digit=True`` (a model trained on the 8x8 digits, one channel): a picture larger than the
    model's input is first made to look like those digits (:func:`_as_digit`): the background
    brought to 0 and the brightest ink to 1, the ink cropped, and centred in a square, since
    every one of the digits fills its frame from top to bottom. Without it, a digit drawn with a
    margin, or on grey paper, reached the model small or on a grey ground, and was misread."""
    import numpy as np
    from PIL import Image

    im = open_image(path, "L" if channels == 1 else "RGB")
    big = im.width > size or im.height > size
    if digit and channels == 1 and big:
        a = np.asarray(im, dtype=np.float64) / 255.0
        if invert == "yes" or (invert == "auto" and _border_mean(a[None]) > 0.5):
            a = 1.0 - a
        a = _as_digit(a, size)
        im = Image.fromarray(a.astype(np.float32), "F")
        big = im.width > size  # (square now)
        resample = Image.Resampling.BOX if big else Image.Resampling.BICUBIC
        a = np.asarray(im.resize((size, size), resample), dtype=np.float64)
        return np.clip(a, 0.0, 1.0)[None]
    # BOX averages every source pixel when shrinking (as the 8x8 digits were made, by counting
    # ink in 4x4 blocks).
    im = im.resize((size, size), Image.Resampling.BOX if big else Image.Resampling.BICUBIC)
    a = np.asarray(im, dtype=np.float64) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, S, S)
    if invert == "yes" or (invert == "auto" and _border_mean(a) > 0.5):
        a = 1.0 - a
    return a


def _as_digit(a, size):
    """A greyscale picture (H, W) in [0, 1], bright ink on a dark ground -> the ink as the 8x8
    digits hold theirs: the ground (the border's median) at 0 and the brightest ink at 1, cut
    to the ink's bounding box (pixels above 5% of the ink's level: the digits' faintest
    strokes are 1/16), and centred in a square of the box's longer side, its aspect kept, to a
    whole pixel of the ``size`` x ``size`` result. A picture with no ink to find (its brightest
    pixel within 0.1 of the ground) is returned unchanged."""
    import numpy as np

    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    ground, peak = float(np.median(border)), float(a.max())
    if peak - ground < 0.1:
        return a
    a = np.clip((a - ground) / (peak - ground), 0.0, 1.0)
    ink = a > 0.05
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    a = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = a.shape
    n = max(h, w)
    out = np.zeros((n, n))
    # centred to a whole pixel of the size x size result: half a pixel's shift would blur
    # every stroke across two columns
    cell = n / size
    top = min(int(round(round((n - h) / 2 / cell) * cell)), n - h)
    left = min(int(round(round((n - w) / 2 / cell) * cell)), n - w)
    out[top : top + h, left : left + w] = a
    return out


def _border_mean(a):
    import numpy as np

    border = np.concatenate(
        [a[:, 0, :].ravel(), a[:, -1, :].ravel(), a[:, :, 0].ravel(), a[:, :, -1].ravel()]
    )
    return float(border.mean())


def classify(model, meta, images, invert="auto"):
    """A ViT or Hybrid ViT's class probabilities (n, K), numpy, for the image files."""
    import numpy as np

    from .. import ops
    from ..ops.softmax import softmax

    if not hasattr(model, "num_classes"):
        raise ValueError(
            f"predict classifies images with a ViT or Hybrid ViT checkpoint; this one holds a "
            f"{type(model).__name__}"
        )
    if model.num_classes == 0:
        raise ValueError("this checkpoint has no classification head (num_classes=0)")
    data = meta.get("train", {}).get("data", {}) if isinstance(meta.get("train"), dict) else {}
    mean, std = data.get("mean", 0.5), data.get("std", 0.5)  # HF ViT's default is 0.5 / 0.5
    digit = data.get("dataset") == "digits"  # a run of train vit / train hybrid
    x = np.stack([load_image(p, model.img_size, model.in_chans, invert, digit) for p in images])
    x = ((x - mean) / std).astype(model.dtype)
    be = model.backend
    with ops.no_grad():  # inference: no cache kept
        return be.to_numpy(softmax(model.forward(be.asarray(x))))


# ----------------------------------------------------------------------------------------------
# ViLT: image-text matching and fill-in-the-blank


def vilt_tokenizer(model, meta, checkpoint, vocab=None):
    """The tokenizer of a ViLT checkpoint (``meta``: its metadata, as ``load_model`` returns
    it): BERT's WordPiece on ``vocab`` (a vocab.txt), else on the vocab.txt beside
    ``checkpoint``, else the shapes captions' word tokenizer when the model's vocabulary is
    that one (a ``train vilt`` run)."""
    from pathlib import Path

    from ..checkpoint import FORMAT
    from ..data.shapes import WORDS
    from ..data.tokenizer import SPECIAL_TOKENS, WordTokenizer

    shapes_vocab = model.vocab_size == len(SPECIAL_TOKENS) + len(WORDS)
    beside = Path(checkpoint).parent / "vocab.txt"
    # the vocab.txt of a Hugging Face folder; a run of train vilt has its own word list
    own_run = meta.get("format") == FORMAT and shapes_vocab
    found = vocab is None and beside.exists() and not own_run
    if found:
        vocab = beside
    if vocab is not None:
        if not Path(vocab).is_file():
            raise ValueError(f"no vocabulary file at {str(vocab)!r}")
        from ..data.wordpiece import WordPieceTokenizer

        what = f"{str(vocab)!r}" + (" (found beside the checkpoint)" if found else "")
        try:
            tok = WordPieceTokenizer.from_file(vocab, max_text_len=model.max_text_len)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from exc
        if tok.vocab_size != model.vocab_size:
            raise ValueError(
                f"the vocabulary {what} has {tok.vocab_size} tokens, the model "
                f"{model.vocab_size}: not this model's vocabulary"
            )
        return tok
    if shapes_vocab:
        return WordTokenizer(WORDS, max_text_len=model.max_text_len)
    raise ValueError(
        f"this ViLT has a vocabulary of {model.vocab_size} tokens and no vocab.txt beside it: "
        "give its vocabulary file with --vocab"
    )


# The longer side's cap, as a multiple of the shorter side: COCO's 1333:800, which the original
# ViLT took from its object-detection ancestry (and Hugging Face's ViLT processor keeps).
LONGER_PER_SHORTER = 1333 / 800


def vilt_image_size(height: int, width: int, shorter: int, divisor: int) -> tuple[int, int]:
    """The (height, width) ViLT resizes a height x width image to.

    The shorter side becomes ``shorter``, the longer one keeps the aspect ratio but is capped
    at ``int(shorter * 1333 / 800)`` (then the whole image shrinks in proportion); each side is
    rounded to the nearest pixel, then down to a multiple of ``divisor`` (the patch size). This
    is the rule of the original ViLT and of Hugging Face's ViLT processor (``size_divisor``
    32 there, the patch size of the published models), to the same floating-point steps. Where
    a very thin image would round a side down to nothing (the processor then fails), the side
    keeps one ``divisor``.
    """
    if min(height, width) < 1:
        raise ValueError(f"an image of {height}x{width} pixels has no pixels to read")
    longest = int(LONGER_PER_SHORTER * shorter)
    scale = shorter / min(height, width)
    if height < width:
        h, w = float(shorter), scale * width
    else:
        h, w = scale * height, float(shorter)
    if max(h, w) > longest:
        shrink = longest / max(h, w)
        h, w = shrink * h, shrink * w
    h, w = int(h + 0.5) // divisor * divisor, int(w + 0.5) // divisor * divisor
    return max(h, divisor), max(w, divisor)


def vilt_pixels(paths, shorter: int, divisor: int, channels: int = 3):
    """Image files -> (pixels (n, C, H, W) float64, pixel_mask (n, H, W) bool), as ViLT reads them.

    Each image is read with :func:`open_image` (RGB, or greyscale for a one-channel model) and
    resized bicubically to :func:`vilt_image_size`, then mapped from [0, 255] to [-1, 1]
    (ViLT's mean and std of 0.5). H and W are the largest height and width in the batch: a
    smaller image fills the top left, zeros (mid-grey) the rest, and its mask is False there.
    """
    import numpy as np
    from PIL import Image

    from ..data.shapes import PIXEL_MEAN, PIXEL_STD

    if channels not in (1, 3):
        raise ValueError(f"images are read as RGB or greyscale, not with {channels} channels")
    arrays = []
    for path in paths:
        im = open_image(path, "RGB" if channels == 3 else "L")
        h, w = vilt_image_size(im.height, im.width, shorter, divisor)
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.float64).reshape(h, w, channels) / 255.0
        arrays.append(((a - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1))
    H = max(a.shape[1] for a in arrays)
    W = max(a.shape[2] for a in arrays)
    pixels = np.zeros((len(arrays), channels, H, W))
    mask = np.zeros((len(arrays), H, W), dtype=bool)
    for i, a in enumerate(arrays):
        pixels[i, :, : a.shape[1], : a.shape[2]] = a
        mask[i, : a.shape[1], : a.shape[2]] = True
    return pixels, mask


def match_and_fill(model, tokenizer, images, caption, top=5):
    """Score ``caption`` against each image file with a ViLT.

    Returns one dict per image: ``match``, the ITM head's probability that the caption
    describes the image (None when the checkpoint has no ITM head), and ``fills``, one list per
    ``[MASK]`` in the caption of the ``top`` (word, probability) pairs of the MLM head (empty
    without a [MASK]; None when the checkpoint has no MLM head). Special tokens are never
    listed as fills; the probabilities are those of the full softmax over the vocabulary.
    """
    import numpy as np

    from .. import ops
    from ..models import vilt_heads
    from ..ops.softmax import softmax

    missing = _missing_heads(model)
    ids, mask = tokenizer.encode(caption)
    where = np.nonzero(ids == tokenizer.mask_id)[0]
    if "itm_score" in missing and not where.size:
        raise ValueError(
            "this checkpoint has no image-text matching head: write [MASK] in the caption "
            "where its MLM head should fill in a word"
        )
    x, pixel_mask = vilt_pixels(images, model.img_size, model.patch_size, model.in_chans)
    n = len(images)
    be = model.backend
    with ops.no_grad():
        batch_ids, batch_mask = np.repeat(ids[None], n, 0), np.repeat(mask[None], n, 0)
        out = model.forward(
            be.asarray(batch_ids),
            be.asarray(batch_mask),
            be.asarray(x.astype(model.dtype)),
            be.asarray(pixel_mask),
            interpolate_pos_encoding=True,
            max_image_len=-1,  # every patch: no sampling at inference
        )
        match = fills = None
        if "itm_score" not in missing:
            logits, _ = vilt_heads.itm_forward(out["pooled"], model.params)
            match = be.to_numpy(softmax(logits))[:, 1]
        if "mlm_score" not in missing:
            feats = out["text_feats"][:, be.asarray(where)]  # (n, masks, D)
            logits, _ = vilt_heads.mlm_forward(
                feats, model.params, model.text_eps, model.mlm_decoder_key
            )
            probs = be.to_numpy(softmax(logits))  # (n, masks, V)
            specials = list(tokenizer.special_ids)
            probs[..., specials] = -1.0  # ranked last: never a word to fill in
            k = max(1, min(top, probs.shape[-1] - len(specials)))
            order = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
            fills = [
                [
                    list(zip(tokenizer.convert_ids_to_tokens(om), pm[om].tolist()))
                    for pm, om in zip(pi, oi)
                ]
                for pi, oi in zip(probs, order)
            ]
    return [
        {
            "match": None if match is None else float(match[i]),
            "fills": None if fills is None else fills[i],
        }
        for i in range(n)
    ]


def _missing_heads(model):
    """The heads a loaded ViLT lacks; ValueError when neither ITM nor MLM is left to run."""
    missing = set(model.missing_heads)
    if {"itm_score", "mlm_score"} <= missing:
        raise ValueError(
            "this checkpoint has neither an image-text matching nor an MLM head (a VQA or a "
            "bare ViltModel checkpoint): predict has nothing to score"
        )
    return missing


def run(args) -> int:
    from ..checkpoint import checkpoint_file, load_model
    from ..models.vilt import ViLT

    path = checkpoint_file(args.checkpoint)
    model, meta = load_model(path, backend=args.backend)
    if isinstance(model, ViLT):
        if args.caption is None:
            raise ValueError("a ViLT checkpoint scores a caption: give one with --caption")
        if args.invert != "auto":
            raise ValueError("--invert is for ViT and Hybrid ViT checkpoints (digits)")
        _missing_heads(model)  # before the tokenizer: a checkpoint with no head to run
        tok = vilt_tokenizer(model, meta, path, args.vocab)
        results = match_and_fill(model, tok, args.images, args.caption, args.top)
        ids, mask = tok.encode(args.caption)
        seen = tok.convert_ids_to_tokens(ids[mask][1:-1])  # as the model reads it ([UNK] too)
        print(f"caption: {' '.join(seen)}")
        for image, r in zip(args.images, results):
            line = f"{image}:"
            if r["match"] is not None:
                line += f" match {r['match']:.4f}"
            print(line)
            for k, fill in enumerate(r["fills"] or [], 1):
                listed = "  ".join(f"{w}: {p:.4f}" for w, p in fill)
                print(f"  [MASK] {k}: {listed}")
        return 0
    if args.caption is not None or args.vocab is not None:
        raise ValueError("--caption and --vocab are for ViLT checkpoints")
    probs = classify(model, meta, args.images, args.invert)
    for image, p in zip(args.images, probs):
        order = p.argsort()[::-1][: max(1, args.top)]
        listed = "  ".join(f"{int(k)}: {p[k]:.4f}" for k in order)
        print(f"{image}: predicted {int(order[0])}  ({listed})")
    return 0
