"""`minivit predict` on ViLT checkpoints: a caption's match probability and its [MASK] fills.

Two kinds of checkpoint:

- a minivit ViLT with the shapes captions' vocabulary (what ``train vilt`` writes): the command
  line's figures must be the model's own heads on the same image and caption;
- Hugging Face ViLT weights as published (``model.safetensors``, ``config.json`` and ``vocab.txt``
  in one folder), from a random-weight ``ViltForMaskedLM``: ``load_model`` reads them and
  ``predict`` fills the [MASK] with the same words and probabilities as transformers does with
  its own tokenizer, an oracle nobody here wrote.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _requires import require
from hypothesis import given, settings
from hypothesis import strategies as st

from minivit import ops
from minivit.checkpoint import load_model, save_model
from minivit.cli import main
from minivit.data.shapes import WORDS
from minivit.data.tokenizer import SPECIAL_TOKENS, WordTokenizer
from minivit.models import vilt_heads
from minivit.models.vilt import ViLT
from minivit.train.predict import match_and_fill, vilt_image_size, vilt_pixels, vilt_tokenizer

S = 32  # image side; patches of 16: a 2 x 2 grid


def _png(path, seed=0, size=S, shape=None):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = shape or (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _pixels(path, size):
    """The image as the model sees it, computed here: RGB, bicubic to ``size`` (height, width;
    as Hugging Face's ViLT processor resamples), [0, 255] -> (x / 255 - 0.5) / 0.5."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize(size[::-1], Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.float64) / 255.0
    return ((a - 0.5) / 0.5).transpose(2, 0, 1)


def _padded(arrays):
    """Images (3, h, w) of several sizes -> the batch (n, 3, H, W) and its pixel mask."""
    H, W = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
    x, m = np.zeros((len(arrays), 3, H, W)), np.zeros((len(arrays), H, W), dtype=bool)
    for i, a in enumerate(arrays):
        x[i, :, : a.shape[1], : a.shape[2]], m[i, : a.shape[1], : a.shape[2]] = a, True
    return x, m


def _shapes_run(folder, backend):
    model = ViLT(
        vocab_size=len(SPECIAL_TOKENS) + len(WORDS), max_text_len=16, img_size=S, patch_size=16,
        embed_dim=16, depth=1, num_heads=2, backend=backend, seed=3,
        max_image_len=1,  # trained sampling one patch per image: predict must use every patch
    )  # fmt: skip
    # Weights far from the initial ones (std 0.02 leaves every probability near uniform, where
    # a wrong image would change the figures below the printed precision): 0.5 N(0, 1) added.
    rng = np.random.default_rng(7)
    for name, v in model.params.items():
        noise = rng.standard_normal(v.shape).astype(str(v.dtype))
        model.params[name] = v + backend.asarray(0.5 * noise)
    folder.mkdir()
    save_model(folder / "checkpoint.safetensors", model)
    return model


def test_predict_scores_a_caption_with_a_shapes_run(tmp_path, capsys, backend):
    model = _shapes_run(tmp_path / "run", backend)
    # an RGB image of the model's size, and a grey one of another shape
    images = [_png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 1, shape=(45, 20))]
    caption = "a small [MASK] circle left of a [MASK] square"
    argv = ["predict", str(tmp_path / "run"), *map(str, images), "--caption", caption]
    assert main([*argv, "--top", "4", "--backend", backend.name]) == 0
    text = capsys.readouterr().out
    matches = [float(m) for m in re.findall(r"match (\d\.\d{4})", text)]
    fills = re.findall(r"\[MASK\] (\d): (.*)", text)
    assert len(matches) == 2 and [k for k, _ in fills] == ["1", "2", "1", "2"]

    # the same figures from the model's heads, computed here
    tok = WordTokenizer(WORDS, max_text_len=16)
    ids, mask = tok.encode(caption)
    be = model.backend
    # 32 x 32 stays; 45 x 20 (height x width): the shorter side to 32 scales the longer to 72,
    # over the cap int(32 * 1333 / 800) = 53, so both shrink by 53 / 72: 53 x 23.6 -> 53 x 24
    # -> multiples of the patch (16): 48 x 16. The batch is 48 x 32, the first image padded.
    x, m = _padded([_pixels(images[0], (32, 32)), _pixels(images[1], (48, 16))])
    with ops.no_grad():
        out = model.forward(be.asarray(np.stack([ids] * 2)), be.asarray(np.stack([mask] * 2)),
                            be.asarray(x.astype(np.float32)), be.asarray(m),
                            interpolate_pos_encoding=True, max_image_len=-1)  # fmt: skip
        itm, _ = vilt_heads.itm_forward(out["pooled"], model.params)
        where = np.nonzero(ids == tok.mask_id)[0]
        mlm, _ = vilt_heads.mlm_forward(out["text_feats"][:, be.asarray(where)], model.params)
    itm, mlm = be.to_numpy(itm).astype(np.float64), be.to_numpy(mlm).astype(np.float64)
    p_match = np.exp(itm[:, 1]) / np.exp(itm).sum(axis=1)
    np.testing.assert_allclose(matches, p_match, atol=6e-5)  # printed to 4 places
    specials = [tok.index[t] for t in SPECIAL_TOKENS]  # never listed as fills
    probs = np.exp(mlm - mlm.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for (_, listed), p in zip(fills, probs.reshape(-1, probs.shape[-1])):
        pairs = re.findall(r"(\S+): (\d\.\d{4})", listed)
        best = np.argsort(-np.where(np.isin(np.arange(p.size), specials), -1, p))[:4]
        assert [w for w, _ in pairs] == [tok.vocab[j] for j in best]
        np.testing.assert_allclose([float(v) for _, v in pairs], p[best], atol=6e-5)

    # no [MASK]: the match alone; an unknown word is shown as the model reads it
    assert main([*argv[:4], "--caption", "a big circle", "--backend", backend.name]) == 0
    text = capsys.readouterr().out
    assert text.startswith("caption: a [UNK] circle\n") and "[MASK]" not in text
    assert len(re.findall(r"match \d\.\d{4}", text)) == 2


def test_predict_user_errors(tmp_path, backend):
    from test_train_vit import parse

    from minivit.train.predict import run

    _shapes_run(tmp_path / "run", backend)
    img = str(_png(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="give one with --caption"):
        run(parse(["predict", str(tmp_path / "run"), img]))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nred\n")
    (tmp_path / "run" / "vocab.txt").write_text("red\n")  # not the run's: left alone
    model, meta = load_model(tmp_path / "run" / "checkpoint.safetensors")
    assert isinstance(vilt_tokenizer(model, meta, tmp_path / "run" / "checkpoint.safetensors"),
                      WordTokenizer)  # fmt: skip
    with pytest.raises(ValueError, match=r"vocab\.txt' has 6 tokens, the model 23"):
        run(parse(["predict", str(tmp_path / "run"), img, "--caption", "a red circle",
                   "--vocab", str(tmp_path / "vocab.txt")]))  # fmt: skip
    with pytest.raises(ValueError, match="no vocabulary file"):
        run(parse(["predict", str(tmp_path / "run"), img, "--caption", "a", "--vocab", "nope"]))
    with pytest.raises(ValueError, match=r"run/vocab\.txt'.*lacks the special token"):
        run(parse(["predict", str(tmp_path / "run"), img, "--caption", "a",
                   "--vocab", str(tmp_path / "run" / "vocab.txt")]))  # fmt: skip
    with pytest.raises(ValueError, match="--invert is for ViT"):
        run(parse(["predict", str(tmp_path / "run"), img, "--caption", "a", "--invert", "no"]))
    with pytest.raises(ValueError, match="more than max_text_len"):
        run(parse(["predict", str(tmp_path / "run"), img, "--caption", "a red circle " * 9]))


# ----------------------------------------------------------------------------------------------
# Hugging Face ViLT weights, as published


def _hf_folder(folder):
    """A random-weight ViltForMaskedLM saved as on the hub, with a small BERT vocabulary."""
    torch = require("torch")
    require("transformers")
    from test_convert_vilt import _hf_config, _randomize
    from transformers import ViltForMaskedLM

    words = ["a", "red", "blue", "circle", "square", "cat", "dog", "##s", "on", "the", "."]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"w{i}" for i in range(_hf_config().vocab_size - len(vocab))]
    config = _hf_config()
    config.layer_norm_eps = 0.5  # not a default anywhere: config.json must carry it
    torch.manual_seed(0)
    hf = _randomize(ViltForMaskedLM(config).eval(), seed=0)
    hf.save_pretrained(folder)  # model.safetensors + config.json (decoder tied: left out)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return hf, vocab


@pytest.mark.oracle
def test_predict_fills_masks_as_transformers_does(tmp_path, capsys):
    import torch
    from test_convert_vilt import MAXLEN, P
    from test_convert_vilt import S as HF_S
    from transformers import BertTokenizer
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    hf, vocab = _hf_folder(tmp_path / "hf")
    model, meta = load_model(tmp_path / "hf" / "model.safetensors")
    assert meta["missing_heads"] == ["itm_score"]  # the MLM checkpoint has no ITM head
    assert (model.embed_dim, model.depth, model.num_heads) == (32, 2, 4)
    assert model.max_text_len == MAXLEN and model.eps == model.text_eps == 0.5
    # a square image, a wide one and a tall one: 32 x 32, 16 x 48 and 48 x 16 once resized
    images = [
        _png(tmp_path / "cat.png", size=HF_S),
        _png(tmp_path / "wide.png", 1, shape=(30, 70, 3)),
        _png(tmp_path / "tall.png", 2, shape=(50, 21, 3)),
    ]
    caption = "Red [MASK] on the blue squares."

    tok = vilt_tokenizer(model, meta, tmp_path / "hf" / "model.safetensors")  # vocab.txt beside
    results = match_and_fill(model, tok, images, caption, top=5)
    assert all(r["match"] is None and len(r["fills"]) == 1 for r in results)

    # Hugging Face end to end: its tokenizer, its image processor (the model's defaults: the
    # shorter side to image_size, sides a multiple of the patch), its model
    bert = BertTokenizer.from_pretrained(tmp_path / "hf")  # (transformers 5 ignores vocab_file=)
    enc = bert([caption] * 3, padding="max_length", max_length=MAXLEN, return_tensors="pt")
    np.testing.assert_array_equal(enc["input_ids"][0].numpy(), tok.encode(caption)[0])
    processor = ViltImageProcessorPil(size={"shortest_edge": HF_S}, size_divisor=P)
    from PIL import Image

    pix = processor([Image.open(p) for p in images], return_tensors="pt")
    assert tuple(pix["pixel_values"].shape) == (3, 3, 48, 48)
    valid = pix["pixel_mask"].numpy()
    assert [(int(v.any(1).sum()), int(v.any(0).sum())) for v in valid] == [
        (32, 32), (16, 48), (48, 16)]  # fmt: skip
    with torch.no_grad():
        logits = hf(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values=pix["pixel_values"],
            pixel_mask=pix["pixel_mask"],
        ).logits
    at = int(np.nonzero(enc["input_ids"][0].numpy() == bert.mask_token_id)[0][0])
    for r, lg in zip(results, logits):
        p = torch.softmax(lg[at].double(), -1).numpy()
        ranked = np.where(np.arange(p.size) < 5, -1, p)  # the five specials come first in vocab
        best = np.argsort(-ranked, kind="stable")[:5]
        assert [w for w, _ in r["fills"][0]] == [vocab[j] for j in best]
        np.testing.assert_allclose([q for _, q in r["fills"][0]], p[best], rtol=1e-4, atol=1e-6)

    # the command line says the same, and refuses a caption with nothing to predict
    assert main(["predict", str(tmp_path / "hf"), str(images[1]), "--caption", caption]) == 0
    out = capsys.readouterr().out
    assert "match" not in out and f"[MASK] 1: {results[1]['fills'][0][0][0]}: " in out
    assert main(["predict", str(tmp_path / "hf"), str(images[0]), "--caption", "a red cat"]) == 2
    assert "no image-text matching head" in capsys.readouterr().err


@pytest.mark.oracle
def test_vilt_pixels_are_those_of_the_hugging_face_processor(tmp_path):
    require("transformers")
    from PIL import Image
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    shapes = [(37, 37), (30, 70), (50, 21), (33, 64), (64, 33), (25, 60), (9, 9)]
    paths = [_png(tmp_path / f"{i}.png", i, shape=(*hw, 3)) for i, hw in enumerate(shapes)]
    for shorter, divisor in ((32, 8), (48, 16), (384, 32)):
        processor = ViltImageProcessorPil(size={"shortest_edge": shorter}, size_divisor=divisor)
        ref = processor([Image.open(p) for p in paths], return_tensors="np")
        x, m = vilt_pixels(paths, shorter, divisor)
        np.testing.assert_array_equal(m, ref["pixel_mask"] == 1)
        np.testing.assert_allclose(x, ref["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.oracle
def test_transparency_and_greyscale_are_read_as_hugging_face_reads_them(tmp_path):
    """Transparent pixels lie on white (transformers' convert_to_rgb since it composites),
    whatever colour they hold; a greyscale image becomes three equal channels."""
    require("transformers")
    from PIL import Image
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent rows over random (hidden) colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(rng.integers(0, 8, (36, 36), dtype=np.uint8), "P")
    pal.putpalette(rng.integers(0, 256, 8 * 3, dtype=np.uint8).tolist())
    pal.save(tmp_path / "pal.png", transparency=3)  # palette entry 3 is transparent
    Image.fromarray(rng.integers(0, 256, (48, 30), dtype=np.uint8), "L").save(tmp_path / "l.png")
    paths = [tmp_path / "rgba.png", tmp_path / "pal.png", tmp_path / "l.png"]
    processor = ViltImageProcessorPil(
        size={"shortest_edge": 32}, size_divisor=8, do_convert_rgb=True
    )
    images = [Image.open(p) for p in paths]
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black
    if not (processor([clear], return_tensors="np")["pixel_values"] == 1.0).all():
        # transformers before 5.21 (the GPU image has 5.17) drops the alpha and shows the
        # hidden colours. Lay those images on white with PIL, as 5.21 and later do, so that the
        # rest (resize, greyscale) is still transformers' own.
        white = Image.new("RGBA", (1, 1), (255, 255, 255, 255))
        images = [
            Image.alpha_composite(white.resize(im.size), im.convert("RGBA")).convert("RGB")
            if "A" in im.getbands() or "transparency" in im.info
            else im
            for im in images
        ]
    ref = processor(images, return_tensors="np")
    x, m = vilt_pixels(paths, 32, 8)
    np.testing.assert_array_equal(m, ref["pixel_mask"] == 1)
    np.testing.assert_allclose(x, ref["pixel_values"], rtol=0, atol=1e-6)
    assert (x[0, :, :4] == 1.0).all()  # the transparent top is white
    assert (x[2, 0] == x[2, 1]).all() and (x[2, 1] == x[2, 2]).all()


def test_photos_are_read_upright_and_16_bit_images_keep_their_contrast(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    upright = rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)  # a portrait photo
    Image.fromarray(upright).save(tmp_path / "upright.png")
    # as a phone stores it: sideways (rotated a quarter turn), with EXIF orientation 6 ("rotate
    # 90 degrees clockwise to view")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, 1)).save(tmp_path / "sideways.png", exif=exif)
    x, _ = vilt_pixels([tmp_path / "sideways.png"], 32, 8)
    np.testing.assert_array_equal(x, vilt_pixels([tmp_path / "upright.png"], 32, 8)[0])
    assert x.shape == (1, 3, 48, 16)  # 70 x 30: portrait, not landscape

    wide = rng.integers(0, 65536, (24, 40), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "16bit.png")  # mode I;16
    Image.fromarray((wide >> 8).astype(np.uint8), "L").save(tmp_path / "8bit.png")
    for channels in (1, 3):
        got = vilt_pixels([tmp_path / "16bit.png"], 32, 8, channels)[0]
        want = vilt_pixels([tmp_path / "8bit.png"], 32, 8, channels)[0]
        assert got.shape[1] == channels and got.std() > 0.3  # not clipped to white
        np.testing.assert_array_equal(got, want)


def test_float_and_32_bit_greyscale_images_are_not_read_as_black(tmp_path):
    """A float TIFF (PIL mode "F") holding [0, 1] intensities, which PIL's own conversion reads
    as black; on the 0..255 scale it is read as such (clipped). A 32-bit integer image (mode
    "I") of values up to 255 is on the 8-bit scale, one with larger values on the 16-bit one."""
    from PIL import Image

    from minivit.train.predict import load_image, open_image

    rng = np.random.default_rng(7)
    levels = rng.integers(0, 256, (12, 20)).astype(np.uint8)
    Image.fromarray(levels, "L").save(tmp_path / "8bit.png")
    cases = {
        "unit.tif": (levels / 255.0).astype(np.float32),  # intensities in [0, 1]
        "scale255.tif": levels.astype(np.float32),  # the 8-bit scale
        "int8scale.tif": levels.astype(np.int32),  # mode I, values <= 255
        "int16scale.tif": levels.astype(np.int32) * 256 + 7,  # mode I, the 16-bit scale
    }
    for name, a in cases.items():
        Image.fromarray(a).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == ("F" if a.dtype == np.float32 else "I")
        for mode in ("L", "RGB"):
            got = np.asarray(open_image(tmp_path / name, mode))
            np.testing.assert_array_equal(got, np.asarray(open_image(tmp_path / "8bit.png", mode)))
    # through the classifier's reader: the same pixels as the 8-bit file
    got = load_image(tmp_path / "unit.tif", 8, 1, invert="no")
    assert got.std() > 0.1
    np.testing.assert_array_equal(got, load_image(tmp_path / "8bit.png", 8, 1, invert="no"))

    # outside both scales: clipped; NaN is black
    odd = np.array([[-3.0, 0.5, 300.0, np.nan]], dtype=np.float32)
    Image.fromarray(odd).save(tmp_path / "odd.tif")
    assert np.asarray(open_image(tmp_path / "odd.tif", "L")).tolist() == [[0, 0, 255, 0]]
    # the scale is judged from the finite values: one +inf pixel keeps [0, 1] intensities
    inf = np.array([[0.0, 0.5, 1.0, np.inf, -np.inf]], dtype=np.float32)
    Image.fromarray(inf).save(tmp_path / "inf.tif")
    assert np.asarray(open_image(tmp_path / "inf.tif", "L")).tolist() == [[0, 128, 255, 255, 0]]
    big = np.array([[0, 65535, 1 << 20]], dtype=np.int32)
    Image.fromarray(big).save(tmp_path / "big.tif")
    assert np.asarray(open_image(tmp_path / "big.tif", "L")).tolist() == [[0, 255, 255]]


@pytest.mark.oracle
@settings(max_examples=300, deadline=None)
@given(
    hw=st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
    shorter_divisor=st.sampled_from([(384, 32), (32, 8), (48, 16), (224, 16), (100, 7)]),
)
def test_vilt_image_size_is_the_processors_rule(hw, shorter_divisor):
    vilt = require("transformers.models.vilt.image_processing_pil_vilt")
    shorter, divisor = shorter_divisor
    h, w = vilt.get_resize_output_image_size(
        np.zeros((3, *hw)), shorter=shorter, longer=int(1333 / 800 * shorter),
        size_divisor=divisor, input_data_format="channels_first",
    )  # fmt: skip
    got = vilt_image_size(*hw, shorter, divisor)
    if h and w:
        assert got == (h, w)
    else:  # the processor would make an empty image: a side keeps one patch here
        assert got == (max(h, divisor), max(w, divisor))


@pytest.mark.oracle
def test_load_model_reads_a_vqa_folder_and_refuses_missing_weights(tmp_path, capsys):
    torch = require("torch")
    require("transformers")
    from safetensors.numpy import load_file, save_file
    from transformers import ViltForQuestionAnswering

    from minivit.checkpoint import CheckpointError

    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    from test_convert_vilt import _hf_config

    torch.manual_seed(0)
    ViltForQuestionAnswering(_hf_config(num_labels=7)).save_pretrained(tmp_path / "vqa")
    model, meta = load_model(tmp_path / "vqa" / "model.safetensors")
    assert model.num_vqa_labels == 7 and meta["missing_heads"] == ["itm_score", "mlm_score"]
    img = str(_png(tmp_path / "a.png"))
    assert main(["predict", str(tmp_path / "vqa"), img, "--caption", "a [MASK]"]) == 2
    assert "neither an image-text matching nor an MLM head" in capsys.readouterr().err
    assert main(["train", "vit", "--resume", str(tmp_path / "vqa"), "--no-progress"]) == 2
    assert "no checkpoint.safetensors (a minivit run)" in capsys.readouterr().err  # not a run
    vqa_file = str(tmp_path / "vqa" / "model.safetensors")
    assert main(["train", "vit", "--resume", vqa_file, "--no-progress"]) == 2
    assert "not a minivit training checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), img, "--caption", "a"]) == 2
    assert "neither checkpoint.safetensors (a minivit run) nor model" in capsys.readouterr().err

    sd = load_file(tmp_path / "vqa" / "model.safetensors")
    del sd[[k for k in sd if k.endswith("layernorm_after.weight")][-1]]  # the last block's
    save_file(sd, tmp_path / "vqa" / "model.safetensors")
    lacks = r"lacks ViLT weights: transformer\.blocks\.1\.norm2\.weight$"
    with pytest.raises(CheckpointError, match=lacks):
        load_model(tmp_path / "vqa" / "model.safetensors")


def test_a_digit_drawn_large_on_grey_paper_reads_as_the_digits_read(tmp_path):
    """For a model trained on the 8x8 digits, a picture of a digit as a user makes one (larger,
    with a margin, dark ink on grey paper) comes to the model as the digits are: ground 0, the
    strongest ink 1, the ink filling the frame from top to bottom. Before, the margin shrank
    the digit to a few pixels and the paper stayed grey (a review measured 0.18 accuracy
    against 0.96 on such pictures)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from minivit.train.predict import load_image

    digits = load_digits().images / 16.0
    exact = 0
    for i in range(40):
        x = digits[i]
        a = 210 + (40 - 210) * x  # ink 40 on paper 210
        big = Image.fromarray(np.rint(a).astype(np.uint8), "L").resize((64, 64), Image.NEAREST)
        page = Image.new("L", (100, 90), 210)
        page.paste(big, (20, 13))
        page.save(tmp_path / "d.png")
        got = load_image(tmp_path / "d.png", 8, 1, digit=True)
        assert got.shape == (1, 8, 8) and got.min() >= 0 and got.max() == 1
        assert got[0, 0].any() and got[0, 7].any()  # top to bottom, as every digit
        exact += np.abs(got[0] - x / x.max()).max() < 0.02
    # the rest differ by where a digit's columns are centred, to a whole pixel
    assert exact >= 30, exact  # 31 of 40 measured (267 of 300)
    # without digit=True (a Hugging Face ViT, say) the picture is only resized, as before
    plain = load_image(tmp_path / "d.png", 8, 1)
    assert plain[0, 0, 0] > 0.1  # the paper stays grey
    # a picture with no ink to find is left as it is
    Image.new("L", (30, 30), 200).save(tmp_path / "blank.png")
    np.testing.assert_allclose(load_image(tmp_path / "blank.png", 8, 1, digit=True), 1 - 200 / 255)
