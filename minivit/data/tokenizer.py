"""A word-level tokenizer with BERT's special tokens.

The generated captions (``minivit.data.shapes``) use a closed vocabulary of a few dozen words, so
a word-level tokenizer is exact: no sub-words, no out-of-vocabulary words in the data itself.
Unknown words (typed by a user) map to ``[UNK]``.

Layout of one encoded caption of ``max_text_len`` slots::

    [CLS] w1 w2 ... wn [SEP] [PAD] ... [PAD]
    mask:  1  1 ...  1   1     0   ...   0

The ids of the special tokens are fixed and come first: ``[PAD]=0, [CLS]=1, [SEP]=2, [MASK]=3,
[UNK]=4``, as in BERT's ordering of the specials relative to each other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["SPECIAL_TOKENS", "WordTokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")

_WORD = re.compile(r"\[(?:PAD|CLS|SEP|MASK|UNK)\]|[a-z0-9]+|[^\sa-z0-9]", re.IGNORECASE)


class WordTokenizer:
    """Maps words to ids and back; pads to ``max_text_len`` and returns the attention mask.

    Args:
        words: the vocabulary words (specials are added in front; duplicates are ignored).
        max_text_len: the length every encoded caption is padded to, ``[CLS]`` and ``[SEP]``
            included.
    """

    def __init__(self, words: Iterable[str], max_text_len: int = 16):
        vocab = list(SPECIAL_TOKENS)
        for w in words:
            w = w.lower()
            if w not in vocab:
                vocab.append(w)
        self._use_vocab(vocab, max_text_len)

    def _use_vocab(self, vocab, max_text_len):
        """Check ``max_text_len``, index ``vocab`` and find the special tokens' ids (a token
        listed twice keeps its last id, as Hugging Face's vocabulary dict does)."""
        if max_text_len < 2:
            raise ValueError(
                f"max_text_len must be at least 2 ([CLS] and [SEP]), got {max_text_len}"
            )
        self.vocab: list[str] = list(vocab)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        missing = [t for t in SPECIAL_TOKENS if t not in self.index]
        if missing:
            raise ValueError(f"the vocabulary lacks the special token(s) {', '.join(missing)}")
        self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id = (
            self.index[t] for t in SPECIAL_TOKENS
        )
        self.max_text_len = int(max_text_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The ids of ``[PAD] [CLS] [SEP] [MASK] [UNK]``: never a word to mask or to predict."""
        return (self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id)

    def tokenize(self, text: str) -> list[str]:
        """Lower-cases and splits into words and punctuation marks; specials stay whole."""
        return [
            t.upper() if t.upper() in SPECIAL_TOKENS else t.lower() for t in _WORD.findall(text)
        ]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        out = []
        for t in tokens:
            out.append(self.index.get(t, self.unk_id))
        return out

    def encode(self, text: str, *, truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One caption -> (ids int64 (max_text_len,), mask bool (max_text_len,)).

        A caption whose words plus ``[CLS]``/``[SEP]`` do not fit raises ``ValueError`` unless
        ``truncate`` is set, in which case the words are cut and ``[SEP]`` kept last.
        """
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        room = self.max_text_len - 2
        if len(ids) > room:
            if not truncate:
                raise ValueError(
                    f"text has {len(ids)} tokens, more than max_text_len - 2 = {room} "
                    f"(max_text_len={self.max_text_len} counts [CLS] and [SEP]): {text!r}"
                )
            ids = ids[:room]
        seq = [self.cls_id, *ids, self.sep_id]
        out = np.full(self.max_text_len, self.pad_id, dtype=np.int64)
        out[: len(seq)] = seq
        mask = np.zeros(self.max_text_len, dtype=bool)
        mask[: len(seq)] = True
        return out, mask

    def encode_batch(self, texts: Sequence[str], *, truncate: bool = False):
        """Captions -> (ids int64 (B, max_text_len), mask bool (B, max_text_len))."""
        pairs = [self.encode(t, truncate=truncate) for t in texts]
        ids = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, self.max_text_len), int)
        mask = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, self.max_text_len), bool)
        return ids, mask

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """ids -> their tokens; an id outside the vocabulary raises ValueError."""
        out = []
        for i in np.asarray(ids).tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary of size {self.vocab_size}")
            out.append(self.vocab[i])
        return out

    def word_starts(self, ids) -> np.ndarray:
        """bool, the shape of ``ids``: True on each token that begins a word, for whole-word
        masking (``mask_tokens(..., word_starts=...)``). Here every token is a word of its own;
        ``WordPieceTokenizer`` marks its ``##`` pieces False."""
        return np.ones(self._in_vocab(ids).shape, bool)

    def _in_vocab(self, ids) -> np.ndarray:
        """``ids`` as an integer array; an id outside the vocabulary raises ValueError."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"id {ids[bad].flat[0]} is outside the vocabulary of size {self.vocab_size}"
            )
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """ids (L,) -> text; padding is always dropped, other specials unless asked to keep."""
        words = [
            w
            for w in self.convert_ids_to_tokens(ids)
            if w != "[PAD]" and not (skip_special_tokens and w in SPECIAL_TOKENS)
        ]
        return " ".join(words)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_text_len={self.max_text_len})"
