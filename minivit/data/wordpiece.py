"""BERT's WordPiece tokenizer, for models with BERT's vocabulary (``vilt_b32_mlm``).

A caption goes through four steps, as in BERT (and Hugging Face's ``BertTokenizer``):

1. **Specials.** ``[PAD] [CLS] [SEP] [MASK] [UNK]`` written in the text, exactly so, are cut out
   first and stay whole tokens: ``"a [MASK] on the table"`` masks one position.
2. **Normalization.** NUL, U+FFFD and control, format and private-use characters are dropped,
   and every whitespace character becomes a space; each CJK ideograph gets a space on either
   side (BERT's vocabulary holds them one by one); accents are stripped (decompose to NFD, drop
   the non-spacing marks) and the text is lower-cased, character by character.
3. **Words.** Split at whitespace, and every punctuation character becomes a word of its own.
4. **WordPiece.** Each word is cut greedily, longest match first, into vocabulary pieces; every
   piece after the first carries the prefix ``##`` ("unaffable" -> ``un ##aff ##able``). A word
   with no such cut, or longer than ``max_chars_per_word`` characters, becomes one ``[UNK]``.

The encoded layout, the mask and batching are ``WordTokenizer``'s::

    [CLS] piece1 piece2 ... [SEP] [PAD] ... [PAD]

The special tokens' ids are looked up by name in the vocabulary (BERT's ``vocab.txt`` has
``[PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103``).

Reference: Hugging Face's ``BertTokenizer``, which since transformers 5 is the Rust
``tokenizers`` pipeline (``BertNormalizer``, ``BertPreTokenizer``, ``WordPiece``). Where
transformers' older pure-Python tokenizer (``BertTokenizerLegacy`` now) differs from it, this
module follows the Rust one, which is what ``BertTokenizer.from_pretrained`` gives:

* accents are stripped before lower-casing, and lower-casing goes character by character, so a
  capital sigma becomes "σ" even at the end of a word (Python's ``str.lower`` gives "ς" there);
* there is no NFC composition step (the Python one composes first, which matters only when
  accents are kept: ``strip_accents=False`` or ``do_lower_case=False``);
* unassigned code points are kept (the Python one drops them as control characters);
* the CJK Extension E block is spaced out from U+2B920, not U+2B820 (the Rust port's bound);
* a special token is recognized only as written in the raw text (the Python one also finds
  "[MASK]" once cleaning has removed, say, a zero-width space inside it).

Characters that Unicode added or re-categorized after the Rust library's tables were made (they
are older than Python's ``unicodedata`` for categories, newer for case) can still come out
differently; Python's ``unicodedata`` decides here.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from .tokenizer import SPECIAL_TOKENS, WordTokenizer

__all__ = ["WordPieceTokenizer"]

_SPECIALS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_PREFIX = "##"  # marks a piece that continues the word before it

# BERT's "Chinese character" blocks: CJK Unified Ideographs, Extensions A to F, and the two blocks
# of Compatibility Ideographs; Extension E starts at U+2B920 as in the tokenizers library (BERT's
# original has U+2B820). Hiragana, Katakana and Hangul are not in them: BERT leaves those scripts
# to whitespace and WordPiece.
_CJK_BLOCKS = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_BLOCKS)


def _is_control(ch: str) -> bool:
    """Control, format, private-use and surrogate characters; tab, newline and CR are whitespace.

    Unassigned code points (category Cn) are kept, as the tokenizers library keeps them."""
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(ch: str) -> bool:
    """Unicode punctuation, plus all of ASCII's non-alphanumeric symbols ("$", "+", "^", "`"...),
    which Unicode files under symbols but BERT splits off like punctuation."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _normalize(text: str, *, lower: bool, strip_accents: bool, space_cjk: bool) -> str:
    """Step 2 of the module docstring: clean, space out CJK, strip accents, lower-case."""
    out = []
    for ch in text:
        if ch in "\x00\ufffd" or _is_control(ch):
            continue
        if ch.isspace():
            ch = " "
        elif space_cjk and _is_cjk(ch):
            ch = f" {ch} "
        out.append(ch)
    text = "".join(out)
    if strip_accents:  # "é" -> "e" + U+0301 (a non-spacing mark, category Mn) -> "e"
        decomposed = unicodedata.normalize("NFD", text)
        text = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    if lower:
        # character by character: str.lower() would turn a word-final "Σ" into "ς"
        text = "".join(c.lower() for c in text)
    return text


def _split_words(text: str) -> list[str]:
    """Step 3: whitespace-separated words, with each punctuation character a word of its own."""
    words = []
    for chunk in text.split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if start < i:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class WordPieceTokenizer(WordTokenizer):
    """BERT's uncased (by default) WordPiece tokenizer over a given vocabulary.

    ``encode``, ``encode_batch``, ``convert_tokens_to_ids``, ``convert_ids_to_tokens``,
    ``special_ids``, ``vocab_size`` and ``len`` are ``WordTokenizer``'s: the same layout, mask
    and errors; ``decode`` is its decode with the ``##`` pieces joined.

    Args:
        vocab: the tokens in id order (``vocab[i]`` has id ``i``); must hold the five specials.
        max_text_len: the length every encoded caption is padded to, ``[CLS]`` and ``[SEP]``
            included (40, ViLT's, by default).
        do_lower_case: lower-case the text (BERT's uncased models).
        strip_accents: strip accents; ``None`` follows ``do_lower_case``, as in BERT.
        tokenize_chinese_chars: put spaces around CJK ideographs, so each is a word.
        max_chars_per_word: a longer word becomes ``[UNK]`` without being cut.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        max_text_len: int = 40,
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        max_chars_per_word: int = 100,
    ):
        self._use_vocab(vocab, max_text_len)
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = self.do_lower_case if strip_accents is None else bool(strip_accents)
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.max_chars_per_word = int(max_chars_per_word)
        # True on the pieces that continue the word before them ("##ing")
        self._continues_word = np.array([t.startswith(_PREFIX) for t in self.vocab], bool)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw) -> WordPieceTokenizer:
        """Reads a BERT ``vocab.txt``: one token a line, id = line number (from 0).

        Lines end at "\\n" only, and whitespace at a line's right end is dropped (a "\\r" of
        Windows line ends, stray spaces), as the tokenizers library reads the file."""
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":  # the newline that ends the last line
            lines.pop()
        return cls([line.rstrip() for line in lines], **kw)

    def tokenize(self, text: str) -> list[str]:
        """Text -> WordPiece tokens (no ``[CLS]``/``[SEP]``); specials in the text stay whole."""
        tokens = []
        start = 0
        for m in _SPECIALS.finditer(text):
            tokens += self._tokenize_plain(text[start : m.start()])
            tokens.append(m.group())
            start = m.end()
        return tokens + self._tokenize_plain(text[start:])

    def _tokenize_plain(self, text: str) -> list[str]:
        text = _normalize(
            text,
            lower=self.do_lower_case,
            strip_accents=self.strip_accents,
            space_cjk=self.tokenize_chinese_chars,
        )
        return [piece for word in _split_words(text) for piece in self._wordpiece(word)]

    def _wordpiece(self, word: str) -> list[str]:
        """Step 4: greedy longest-match-first cut of one word; ``[UNK]`` if there is none."""
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces = []
        start = 0
        while start < len(word):
            prefix = _PREFIX if start else ""
            for end in range(len(word), start, -1):
                if prefix + word[start:end] in self.index:
                    break
            else:  # not even one character matched: the word cannot be cut
                return ["[UNK]"]
            pieces.append(prefix + word[start:end])
            start = end
        return pieces

    def word_starts(self, ids) -> np.ndarray:
        """bool, the shape of ``ids``: False on a ``##`` piece, which continues the word before
        it; True on every other token (a word's first piece, a special). For whole-word masking:
        ``mask_tokens(..., word_starts=tok.word_starts(ids))``."""
        return ~self._continues_word[self._in_vocab(ids)]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """ids (L,) -> text; padding is always dropped, other specials unless asked to keep.

        ``WordTokenizer.decode``'s tokens, with each ``##`` piece joined onto the piece before
        it: the normalized (lower-cased, accent-stripped) words come back, one space between
        words and punctuation marks."""
        text = super().decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(" " + _PREFIX, "")

    def __repr__(self) -> str:
        return (
            f"WordPieceTokenizer(vocab_size={self.vocab_size}, max_text_len={self.max_text_len}, "
            f"do_lower_case={self.do_lower_case})"
        )
