"""minivit's WordPiece tokenizer against Hugging Face's BERT tokenizers (oracles nobody here wrote).

One small vocabulary (the five specials, single letters and their "##" forms, whole words and
suffixes, accent-stripped words, Greek, CJK ideographs, ASCII and Unicode punctuation) is
written to a ``vocab.txt``; minivit's ``WordPieceTokenizer`` and two Hugging Face tokenizers read
that same file:

- ``rust``: ``BertTokenizerFast`` (in transformers 5 also ``BertTokenizer``), the ``tokenizers``
  library's BertNormalizer + BertPreTokenizer + WordPiece. minivit follows this one;
- ``python``: the pure-Python one (``BertTokenizerLegacy`` in transformers 5, ``BertTokenizer``
  before).

On hand-picked cases and on text drawn by hypothesis from alphabets where the two agree, the
tokens, the ids, the padding, the mask and the truncation must equal both. Where the two
disagree (the module docstring of ``minivit.data.wordpiece`` lists how),
``test_follows_the_rust_tokenizer_where_the_python_one_differs`` pins minivit to the Rust one.

The end-to-end check: captions tokenized by HF on one side and by minivit on the other, through
a random-weight HF ``ViltForMaskedLM`` and its conversion into minivit's ViLT (float64), give the
same MLM logits.

Budget: a few seconds on a CPU.
"""

from __future__ import annotations

import string

import numpy as np
import pytest
from _requires import require
from hypothesis import given
from hypothesis import strategies as st

from minivit.data import WordPieceTokenizer
from minivit.data.tokenizer import WordTokenizer

L = 16  # max_text_len of the comparisons: long drawn text is truncated

# BERT's order of the specials (ids 0, 1, 2, 3, 4 here), not WordTokenizer's: ids go by name.
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a the on of and is are in table cat dog red blue green circle square photo man "
    "woman riding horse hello world play un cafe café orange naive resume uber zurich "
    "ελληνικα οδος привет мир"
).split()
SUFFIXES = "##s ##ing ##ed ##aff ##able ##er ##ly ##e ##ιων".split()
GREEK = "αβγδεζηθικλμνξοπρσςτυφχψω"
CJK = "我爱猫狗中国人的"
# every ASCII punctuation mark, and Unicode ones (CJK full stop and comma among them)
PUNCT = list(string.punctuation) + list("¡¿«»–—…“”‘’、。，！？·")
# Letters and Greek also as "##" pieces, so most words have a cut; digits have none: "x9y"
# cannot be cut and becomes [UNK].
VOCAB = (
    SPECIALS
    + WORDS
    + SUFFIXES
    + [*string.ascii_lowercase, *GREEK]
    + ["##" + c for c in string.ascii_lowercase + GREEK]
    + list(string.digits)
    + list(CJK)
    + PUNCT
)

HAND_PICKED = [
    "Café Ôrange",
    "naïve résumé ÜBER Zürich",
    "Cafe\u0301 au lait",  # a decomposed accent
    "我爱猫",
    "我的猫，狗。鱼",  # CJK punctuation; 鱼 is not in the vocabulary
    "hello,world!!",
    "¡hola! «quote» … $5+3=8 a^b `x` ~y_z",
    "hel\x00lo \x07wor\x7fld\u200b \ufffd! soft\u00adhyphen",  # control and format characters
    "tab\tand\nnewline\r\nend\u00a0nbsp\u3000ideographic\u2028line",
    "a [MASK] on the table",
    "a[MASK]b [UNK][SEP] [mask]",  # specials stay whole; lower-case "[mask]" is plain text
    "x9y and 42",  # "x9y" cannot be cut
    "UNAFFABLE cats played",
    "ΑΒΓ αβγ ελληνικα",
    "привет, мир!",
    "😀 emoji",
    "a" * 100,  # 100 characters: cut into pieces (and truncated)
    "b" * 101 + " c",  # 101 characters: one [UNK]
    "",
    "   \t\n ",
    "the cat " * 12,  # truncated
]

# Drawn text: vocabulary words, and runs of characters from the alphabets above plus accented
# Latin, whitespace and control characters. No combining marks and no capital sigma: there the
# Python tokenizer differs (NFC; Python's word-final "ς"), see the test that pins those.
_ALPHABET = (
    string.ascii_letters
    + string.digits
    + "ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖØÙÚÛÜÝàáâãäåçèéêëìíîïñòóôõöøùúûüýÿĀāČčĘęĞğİıŁłŐőŒœŠšŸŽž"
    + GREEK
    + "ΑΒΓΔΩ"
    + CJK
    + "鱼山水"
    + "".join(PUNCT)
    + " \t\n\r\u00a0\u3000\u2028"
    + "\x00\x01\x1b\x7f\u200b\u00ad\ufeff\ufffd"
)
texts = st.lists(
    st.one_of(
        st.sampled_from(WORDS + ["UNAFFABLE", "Café", "ÔRANGE"]).map(lambda w: w + " "),
        st.text(alphabet=_ALPHABET, max_size=10),
        st.sampled_from(["[MASK]", "[UNK]", " [MASK] "]),
    ),
    max_size=12,
).map("".join)

OPTIONS = [
    {},
    {"do_lower_case": False},
    {"strip_accents": False},
    {"do_lower_case": False, "strip_accents": True},
    {"tokenize_chinese_chars": False},
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """A folder holding VOCAB as a vocab.txt, the form HF's ``from_pretrained`` reads."""
    folder = tmp_path_factory.mktemp("bert_vocab")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_tokenizers(vocab_dir):
    """``make(kind, **options)``: the HF tokenizer ("rust" or "python") read from ``vocab_dir``
    (made once per options)."""
    require("tokenizers")  # the Rust BERT tokenizer is the oracle
    transformers = require("transformers")  # and transformers' BERT tokenizers
    from transformers import BertTokenizerFast

    try:  # transformers 5: BertTokenizer is the Rust one, the Python one is kept apart
        from transformers.models.bert.tokenization_bert_legacy import (
            BertTokenizerLegacy as BertTokenizerPython,
        )
    except ImportError:  # transformers 4: BertTokenizer is the Python one
        from transformers import BertTokenizer as BertTokenizerPython
    if BertTokenizerPython is BertTokenizerFast:  # a transformers without the Python one
        BertTokenizerPython = None

    classes = {"rust": BertTokenizerFast, "python": BertTokenizerPython}
    made = {}

    def make(kind, **options):
        if classes[kind] is None:
            pytest.skip(f"this transformers ({transformers.__version__}) has no Python tokenizer")
        key = (kind, tuple(sorted(options.items())))
        if key not in made:
            made[key] = classes[kind].from_pretrained(str(vocab_dir), **options)
        return made[key]

    return make


def _check_against(hf, tok, text):
    """Tokens, ids, and the padded, truncated encoding of one text: minivit's == HF's."""
    tokens = tok.tokenize(text)
    assert tokens == hf.tokenize(text), repr(text)
    assert tok.convert_tokens_to_ids(tokens) == hf.encode(text, add_special_tokens=False)
    ids, mask = tok.encode(text, truncate=True)
    enc = hf(text, padding="max_length", max_length=tok.max_text_len, truncation=True)
    np.testing.assert_array_equal(ids, enc["input_ids"], err_msg=repr(text))
    np.testing.assert_array_equal(mask, np.array(enc["attention_mask"], bool), err_msg=repr(text))


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["rust", "python"])
def test_hand_picked_cases_match_hf(kind, hf_tokenizers, vocab_dir):
    hf = hf_tokenizers(kind)
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", max_text_len=L)
    for text in HAND_PICKED:
        _check_against(hf, tok, text)
    # the cases that motivated them, spelled out
    assert tok.tokenize("Café Ôrange") == ["cafe", "orange"]
    assert tok.tokenize("我爱猫") == ["我", "爱", "猫"]
    assert tok.tokenize("hello,world!!") == ["hello", ",", "world", "!", "!"]
    assert tok.tokenize("UNAFFABLE") == ["un", "##aff", "##able"]
    assert tok.tokenize("a [MASK] on the table") == ["a", "[MASK]", "on", "the", "table"]
    assert tok.tokenize("x9y " + "b" * 101) == ["[UNK]", "[UNK]"]
    assert tok.tokenize("") == tok.tokenize(" \t\x00") == []
    if kind == "python":  # decode joins "##" pieces as its convert_tokens_to_string does
        for text in HAND_PICKED:
            plain = [t for t in tok.tokenize(text) if t not in SPECIALS]
            ids = tok.convert_tokens_to_ids(plain)
            assert tok.decode(ids) == hf.convert_tokens_to_string(plain), repr(text)


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["rust", "python"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
@given(text=texts)
def test_drawn_text_matches_hf(kind, options, text, hf_tokenizers, vocab_dir):
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", max_text_len=L, **options)
    _check_against(hf_tokenizers(kind, **options), tok, text)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "text, options, python_gives",
    [
        ("ΟΔΟΣ", {}, "οδος"),  # str.lower(): a word-final sigma
        ("cafe\u0301", {"do_lower_case": False}, "café"),  # NFC first
        ("a\u0378b", {}, "a ##b"),  # U+0378 is unassigned: dropped as "control"
        ("a\U0002b820b", {}, "a [UNK] b"),  # CJK Extension E from U+2B820
        ("[MA\u200bSK]", {}, "[MASK]"),  # specials found after cleaning
    ],
)
def test_follows_the_rust_tokenizer_where_the_python_one_differs(
    text, options, python_gives, hf_tokenizers, vocab_dir
):
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", max_text_len=L, **options)
    rust = hf_tokenizers("rust", **options)
    _check_against(rust, tok, text)
    # python_gives records what transformers' legacy Python tokenizer gave (5.24.0); it is not
    # asserted, so that a change in that legacy class cannot fail this test of minivit
    assert tok.tokenize(text) != python_gives.split()


@pytest.mark.oracle
def test_encode_batch_matches_hf(hf_tokenizers, vocab_dir):
    hf = hf_tokenizers("rust")
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", max_text_len=L)
    ids, mask = tok.encode_batch(HAND_PICKED, truncate=True)
    enc = hf(HAND_PICKED, padding="max_length", max_length=L, truncation=True)
    assert ids.shape == mask.shape == (len(HAND_PICKED), L)
    assert ids.dtype == np.int64 and mask.dtype == bool
    np.testing.assert_array_equal(ids, enc["input_ids"])
    np.testing.assert_array_equal(mask, np.array(enc["attention_mask"], bool))
    empty_ids, empty_mask = tok.encode_batch([])
    assert empty_ids.shape == empty_mask.shape == (0, L)


@pytest.mark.oracle
def test_from_file_reads_a_vocab_as_hf_does(tmp_path):
    """Windows line ends, whitespace at a line's right end, no newline after the last line: the
    ids are the line numbers and the tokens what the Rust reader keeps."""
    tokens = SPECIALS + ["hello ", "world\t", "##s"]
    (tmp_path / "vocab.txt").write_bytes("\r\n".join(tokens).encode("utf-8"))
    tok = WordPieceTokenizer.from_file(tmp_path / "vocab.txt")
    assert tok.vocab == [t.rstrip() for t in tokens]
    require("transformers")  # transformers reads the same file
    from transformers import BertTokenizerFast

    assert tok.index == BertTokenizerFast.from_pretrained(str(tmp_path)).get_vocab()


def test_specials_are_looked_up_by_name(vocab_dir):
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert len(tok) == tok.vocab_size == len(VOCAB)
    assert tok.max_text_len == 40  # ViLT's
    assert tok.convert_ids_to_tokens([2, 4, 3]) == ["[CLS]", "[MASK]", "[SEP]"]
    assert repr(tok) == (
        f"WordPieceTokenizer(vocab_size={len(VOCAB)}, max_text_len=40, do_lower_case=True)"
    )
    ids, mask = tok.encode("a cats")
    assert ids[:5].tolist() == [2, tok.index["a"], tok.index["cat"], tok.index["##s"], 3]
    assert mask.tolist() == [True] * 5 + [False] * 35
    assert (ids[5:] == 0).all()


@given(text=texts)
def test_decode_joins_the_pieces_and_round_trips(text, vocab_dir):
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", max_text_len=L)
    ids, mask = tok.encode(text, truncate=True)
    pieces = tok.convert_ids_to_tokens(ids[mask][1:-1])
    # the normalized words come back whole ("cats" for cat ##s), so re-tokenizing the text
    # gives the same pieces, the specials too when they are kept
    kept = tok.decode(ids, skip_special_tokens=False)
    assert tok.tokenize(kept) == ["[CLS]", *pieces, "[SEP]"]
    assert tok.tokenize(tok.decode(ids)) == [p for p in pieces if p not in SPECIALS]


def test_decode_spelled_out(vocab_dir):
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt")
    ids, _ = tok.encode("UNAFFABLE cats, [MASK]!")
    assert tok.decode(ids) == "unaffable cats , !"
    assert tok.decode(ids, skip_special_tokens=False) == "[CLS] unaffable cats , [MASK] ! [SEP]"


def test_word_starts_mark_the_pieces(vocab_dir):
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt")
    ids, mask = tok.encode_batch(["the cats are unaffable", "[MASK] cats"])
    pieces = tok.convert_ids_to_tokens(ids.ravel())
    starts = tok.word_starts(ids)
    assert starts.shape == ids.shape and starts.dtype == bool
    assert starts.ravel().tolist() == [not p.startswith("##") for p in pieces]
    assert not starts.all()  # "cats" is cat ##s
    words = WordTokenizer(["the", "cats"])
    assert words.word_starts(np.array([[1, 5, 6, 2, 0]])).all()  # one token, one word
    with pytest.raises(ValueError, match=f"id {len(VOCAB)} is outside the vocabulary"):
        tok.word_starts([1, len(VOCAB)])
    with pytest.raises(TypeError, match="ids must be integers"):
        tok.word_starts([1.0, 2.0])


def test_errors(vocab_dir):
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[MASK\]"):
        WordPieceTokenizer([t for t in VOCAB if t != "[MASK]"])
    with pytest.raises(ValueError, match="max_text_len must be at least 2"):
        WordPieceTokenizer(VOCAB, max_text_len=1)
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", max_text_len=5)
    with pytest.raises(ValueError, match="text has 4 tokens, more than max_text_len - 2 = 3"):
        tok.encode("the cats are")  # the cat ##s are
    ids, mask = tok.encode("the cats are", truncate=True)
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "the", "cat", "##s", "[SEP]"]
    assert mask.all()
    for bad in (-1, len(VOCAB)):
        with pytest.raises(ValueError, match=f"id {bad} is outside the vocabulary"):
            tok.decode([2, bad, 3])


@pytest.mark.oracle
def test_mlm_logits_match_hf_vilt_from_the_same_captions(hf_tokenizers, vocab_dir, monkeypatch):
    """From strings to MLM logits: HF's tokenizer and ViltForMaskedLM on one side, minivit's
    tokenizer and the converted ViLT on the other (float64, random weights)."""
    torch = require("torch")  # HF's ViLT runs on torch
    import test_convert_vilt as tiny  # the tiny ViLT config, weights and conversion

    from minivit.models import vilt_heads as H

    # the tiny config with this vocabulary's size (its helpers read the module's V)
    monkeypatch.setattr(tiny, "V", len(VOCAB))
    hf = tiny._hf_model(seed=11)
    model = tiny._minivit_from(hf)

    captions = ["a [MASK] on the table", "Café Ôrange, 我爱猫!", "UNAFFABLE cats", ""]
    tok = WordPieceTokenizer.from_file(vocab_dir / "vocab.txt", max_text_len=tiny.MAXLEN)
    ids, mask = tok.encode_batch(captions)
    enc = hf_tokenizers("rust")(
        captions, padding="max_length", max_length=tiny.MAXLEN, return_tensors="pt"
    )
    np.testing.assert_array_equal(ids, enc["input_ids"].numpy())
    assert (ids == tok.mask_id).sum() == 1 and mask.sum(1).tolist() == [7, 9, 7, 2]

    images = np.random.default_rng(12).standard_normal((len(captions), 3, tiny.S, tiny.S))
    with torch.no_grad():
        hf_logits = hf(**enc, pixel_values=torch.from_numpy(images)).logits.numpy()
    text_feats = model.forward(ids, mask, images)["text_feats"]
    logits, _ = H.mlm_forward(text_feats, model.params, model.text_eps)
    assert logits.shape == hf_logits.shape == (len(captions), tiny.MAXLEN, len(VOCAB))
    assert tiny._rel(logits[mask], hf_logits[mask]) < 1e-12
