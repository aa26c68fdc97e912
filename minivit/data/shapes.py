"""Generated image-caption data: coloured shapes and the sentences that describe them.

Each scene holds one to three objects. An object has a shape (circle, square, triangle), a colour
(six of them), a size (small or large) and a position. Its caption names every object::

    1 object:   "a large red circle"
    2 objects:  "a red circle left of a blue square"
    3 objects:  "a red circle above a blue square and a green triangle"

A caption is *true* of a scene when its objects can be matched one to one with the scene's objects
(same colour and shape, and size where the caption names one) and its relation holds. Positive
captions use a relation with a clear margin (``gap`` pixels along the dominant axis, measured at
32 pixels and scaled with the image); a negative caption must be clearly false: its relation, if
the objects match, points the wrong way by at least half that margin.

Negatives for image-text matching (ITM):
- easy: the caption of another random scene;
- hard: the scene's own caption with exactly one attribute changed (a colour, a shape, the
  relation, or the size of a lone object), checked to be false.

Masked language modelling (MLM) follows BERT: each word token is chosen with probability 0.15;
a chosen token becomes ``[MASK]`` 80% of the time, a random word 10% and stays 10%. The labels
hold the original id at chosen positions and -100 elsewhere.

Everything is drawn from ``numpy.random.default_rng`` streams keyed by ``(seed, split, ...)``, so
the same seed gives the same data, and the held-out split (``split="test"``) is a stream the
training data never draws from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tokenizer import WordTokenizer

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "RELATIONS",
    "Obj",
    "Caption",
    "ShapesCaptions",
    "mask_tokens",
]

COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.65, 0.25, 0.85),
}
SHAPES = ("circle", "square", "triangle")


def _reach(obj) -> float:
    """How far an object's pixels reach from its centre: r for a circle; r sqrt 2 for a square
    (its corners) and a triangle (its base corners, at (+-r, +r)). Two objects whose reaches do
    not meet do not overlap (the circles alone let corners overlap: 9 of 557 pairs at 32 px
    and 22 of 562 at 64 px, in tests/test_shapes_data.py's scenes)."""
    return obj.r if obj.shape == "circle" else obj.r * 2**0.5


SIZES = ("small", "large")
# relation word(s) -> (axis, sign): "A left of B" means x_B - x_A > 0.
RELATIONS = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
FUNCTION_WORDS = ("a", "and", "of")
WORDS = FUNCTION_WORDS + tuple(COLOURS) + SHAPES + SIZES + ("left", "right", "above", "below")
CONTENT_WORDS = tuple(COLOURS) + SHAPES + SIZES + ("left", "right", "above", "below")

# pixel normalization (pixel - MEAN) / STD, ViLT's (0.5, 0.5): values in [-1, 1], the grey
# background near 0 (a dark background would add one large constant to every patch and drown
# the objects: training then learns the colours late and the shapes hardly at all).
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half extent, pixels


@dataclass(frozen=True)
class Caption:
    """A structured caption: the objects named, in order, and an optional relation between the
    first two (``"a X <relation> a Y [and a Z]"``)."""

    objects: tuple  # of (colour, shape, size or None)
    relation: str | None = None

    def text(self) -> str:
        words = []
        for k, (colour, shape, size) in enumerate(self.objects):
            if k == 1:
                words.append(self.relation)
            elif k == 2:
                words.append("and")
            words.append("a")
            if size is not None:
                words.append(size)
            words.extend([colour, shape])
        return " ".join(words)


def mask_tokens(
    ids,
    text_mask,
    rng,
    *,
    vocab_size,
    mask_id,
    special_ids,
    prob=0.15,
    min_one=True,
    word_starts=None,
):
    """BERT's masking: returns (masked_ids, labels), labels = -100 where not chosen.

    Args:
        ids: int (B, L) token ids; text_mask: bool (B, L), True on real tokens.
        rng: a ``numpy.random.Generator``.
        special_ids: ids never chosen ([PAD], [CLS], [SEP], ...); random replacements are drawn
            from the other ids.
        min_one: choose at least one word per caption (short captions would otherwise often go
            unmasked and give no signal).
        word_starts: None (every token is a word of its own), or bool (B, L), True on each
            token that begins a word: a tokenizer's ``word_starts(ids)``. Then the masking is
            whole-word, as in the original ViLT's main model: each word is chosen with
            probability ``prob`` with all of its pieces, and each chosen piece then goes through
            the 80 / 10 / 10 split on its own (Hugging Face's whole-word collator does the same,
            but picks words until 15% of the *tokens* are chosen).
    """
    ids = np.asarray(ids)
    special = np.isin(ids, np.asarray(list(special_ids)))
    candidate = np.asarray(text_mask, bool) & ~special  # (B, L)
    # a word begins at a token that starts one, and at a token that cannot be chosen or follows
    # one (so no word runs across a special or padding: a piece after [UNK] is a word of its
    # own); None: at every token
    starts = np.ones(ids.shape, bool)
    if word_starts is not None:
        word_starts = np.asarray(word_starts, bool)
        if word_starts.shape != ids.shape:
            raise ValueError(f"word_starts has shape {word_starts.shape}, ids {ids.shape}")
        starts = word_starts | ~candidate
        starts[:, 1:] |= ~candidate[:, :-1]
        starts[:, :1] = True
    chosen = (rng.random(ids.shape) < prob) & candidate & starts  # the words' first tokens
    if min_one:
        # rows with no choice get one uniformly random word
        first = candidate & starts
        empty = ~chosen.any(axis=1) & first.any(axis=1)
        if empty.any():
            score = rng.random(ids.shape) + first  # words' first tokens score in [1, 2)
            pick = np.argmax(score, axis=1)
            rows = np.nonzero(empty)[0]
            chosen[rows, pick[rows]] = True
    if word_starts is not None:  # each token follows its word's first token
        position = np.arange(ids.shape[1])
        head = np.maximum.accumulate(np.where(starts, position, 0), axis=1)  # (B, L)
        chosen = np.take_along_axis(chosen, head, axis=1) & candidate
    labels = np.where(chosen, ids, -100)
    u = rng.random(ids.shape)
    word_ids = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids)))
    random_words = word_ids[rng.integers(0, len(word_ids), size=ids.shape)]
    masked = ids.copy()
    masked[chosen & (u < 0.8)] = mask_id
    swap = chosen & (u >= 0.8) & (u < 0.9)
    masked[swap] = random_words[swap]
    return masked, labels


class ShapesCaptions:
    """The generated image-caption task.

    Args:
        img_size: image side in pixels (images are (3, img_size, img_size), float32, normalized
            to about [-1, 1]).
        max_text_len: padded caption length, [CLS] and [SEP] included.
        seed: the root of every random stream.
        shape_counts: which numbers of objects a scene may have.
        count_probs: their probabilities (default: uniform).
        layout: "grid" (default) puts each object in its own cell of a ``cells`` x ``cells``
            grid, its centre jittered around the cell's centre; with ``img_size / cells`` equal
            to the model's patch size every object lies within one patch. "free" places objects
            anywhere they do not overlap.
        cells: the grid's cells per side (grid layout).
    """

    def __init__(
        self,
        img_size: int = 48,
        max_text_len: int = 16,
        seed: int = 0,
        shape_counts=(1, 2, 3),
        count_probs=None,
        noise: float = 0.03,
        layout: str = "grid",
        cells: int = 3,
    ):
        if img_size < 16:
            raise ValueError(f"img_size must be at least 16 pixels, got {img_size}")
        self.img_size = int(img_size)
        self.seed = int(seed)
        self.shape_counts = tuple(int(c) for c in shape_counts)
        if not self.shape_counts or not all(1 <= c <= 3 for c in self.shape_counts):
            raise ValueError(f"shape_counts must be drawn from 1, 2, 3; got {shape_counts}")
        self.count_probs = count_probs
        self.noise = float(noise)
        self.tokenizer = WordTokenizer(WORDS, max_text_len=max_text_len)
        if max_text_len < 13:
            raise ValueError(
                f"max_text_len must be at least 13 for three-object captions, got {max_text_len}"
            )
        tok = self.tokenizer
        self.special_ids = tok.special_ids
        self.content_ids = np.array(tok.convert_tokens_to_ids(CONTENT_WORDS))
        if layout not in ("grid", "free"):
            raise ValueError(f"layout must be 'grid' or 'free', got {layout!r}")
        self.layout = layout
        self.cells = int(cells)
        if layout == "grid":
            if self.cells < 2 or self.cells**2 < max(self.shape_counts):
                raise ValueError(f"cells must be >= 2 and hold every object, got {cells}")
            cell = self.img_size / self.cells  # radii and jitter fit inside one cell
            # two clearly different sizes (areas about 1:3), little jitter: each object is a
            # near-template inside its patch, so shape and size are easy to see
            self._r_small = (0.22 * cell, 0.25 * cell)
            self._r_large = (0.40 * cell, 0.44 * cell)
            self._jitter = 0.05 * cell
            self.gap = 0.5 * cell
        else:
            scale = self.img_size / 32.0
            self._r_small = (3.5 * scale, 4.5 * scale)
            self._r_large = (5.5 * scale, 7.0 * scale)
            self.gap = 5.0 * scale

    # ----------------------------------------------------------------------------- streams
    def rng(self, split: str, *key) -> np.random.Generator:
        """The generator for ``split`` ("train" or "test") and an extra key (e.g. the step)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return np.random.default_rng([self.seed, 0 if split == "train" else 1, *key])

    # ----------------------------------------------------------------------------- scenes
    def sample_scene(self, rng, n_objects: int | None = None, counts=None, probs=None) -> tuple:
        """A random scene: ``n_objects`` (default: drawn from ``counts`` with ``probs``) objects
        with distinct (colour, shape) pairs, not overlapping, and (for two or more) at least one
        pair in a clear spatial relation."""
        counts = self.shape_counts if counts is None else counts
        probs = self.count_probs if probs is None else probs
        if n_objects is None:
            n_objects = int(counts[0] if len(counts) == 1 else rng.choice(counts, p=probs))
        S = self.img_size
        colours = list(COLOURS)
        n_pairs = len(colours) * len(SHAPES)
        for _ in range(200):
            # one draw per attempt: pair choice, size, radius and position for every object
            u = rng.random((n_objects, 5))
            pairs = np.argsort(rng.random(n_pairs))[:n_objects]
            objs = []
            if self.layout == "grid":
                cell = S / self.cells
                where = np.argsort(rng.random(self.cells**2))[:n_objects]  # distinct cells
            for k, p in enumerate(pairs):
                size = SIZES[int(u[k, 0] * 2)]
                lo, hi = self._r_small if size == "small" else self._r_large
                r = lo + (hi - lo) * u[k, 1]
                if self.layout == "grid":
                    row, col = divmod(int(where[k]), self.cells)
                    cx = (col + 0.5) * cell + self._jitter * (2 * u[k, 2] - 1)
                    cy = (row + 0.5) * cell + self._jitter * (2 * u[k, 3] - 1)
                else:
                    cx = (r + 0.5) + (S - 2 * r - 1) * u[k, 2]
                    cy = (r + 0.5) + (S - 2 * r - 1) * u[k, 3]
                objs.append(
                    Obj(SHAPES[p % len(SHAPES)], colours[p // len(SHAPES)], size, cx, cy, r)
                )
            if self._valid_layout(objs):
                return tuple(objs)
        raise RuntimeError("could not place the objects; img_size too small")

    def _valid_layout(self, objs) -> bool:
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, b = objs[i], objs[j]
                if (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 < (_reach(a) + _reach(b) + 1.0) ** 2:
                    return False
        if len(objs) > 1 and not self._clear_pairs(objs):
            return False
        return True

    def _clear_pairs(self, objs):
        """Ordered pairs (i, j, relation) whose relation holds with a clear margin."""
        out = []
        for i, a in enumerate(objs):
            for j, b in enumerate(objs):
                if i == j:
                    continue
                dx, dy = b.cx - a.cx, b.cy - a.cy
                if abs(dx) >= abs(dy) and abs(dx) >= self.gap:
                    out.append((i, j, "left of" if dx > 0 else "right of"))
                elif abs(dy) > abs(dx) and abs(dy) >= self.gap:
                    out.append((i, j, "above" if dy > 0 else "below"))
        return out

    def describe(self, scene, rng) -> Caption:
        """A true caption of ``scene``, with a random order of objects and a clear relation."""
        if len(scene) == 1:
            o = scene[0]
            return Caption(((o.colour, o.shape, o.size),), None)
        pairs = self._clear_pairs(scene)
        i, j, rel = pairs[int(rng.integers(len(pairs)))]
        order = [i, j] + [k for k in range(len(scene)) if k not in (i, j)]
        return Caption(tuple((scene[k].colour, scene[k].shape, None) for k in order), rel)

    def is_true(self, caption: Caption, scene, margin: float | None = None) -> bool:
        """Whether ``caption`` may be true of ``scene``.

        The relation counts as true unless it points the wrong way by at least ``margin``
        pixels (default: half the clear gap), so a caption judged false is clearly false.
        """
        margin = self.gap / 2 if margin is None else margin
        if len(caption.objects) != len(scene):
            return False
        match = []
        for colour, shape, size in caption.objects:
            hits = [
                k
                for k, o in enumerate(scene)
                if o.colour == colour and o.shape == shape and (size is None or o.size == size)
            ]
            if len(hits) != 1:
                return False
            match.append(hits[0])
        if len(set(match)) != len(match):
            return False
        if caption.relation is None:
            return True
        a, b = scene[match[0]], scene[match[1]]
        axis, sign = RELATIONS[caption.relation]
        delta = (b.cx - a.cx) if axis == 0 else (b.cy - a.cy)
        return sign * delta > -margin

    def hard_negative(self, caption: Caption, scene, rng, relation_share=None) -> Caption:
        """``caption`` with exactly one attribute changed, false of ``scene``.

        The attribute is drawn uniformly from those the caption has; ``relation_share`` (when
        given, and the caption has a relation) is instead the probability of flipping the
        relation, the rest shared uniformly by the others. A relation flip keeps every word but
        one, so only where the objects are tells it apart: the hardest kind to learn.
        """
        for _ in range(100):
            kinds = ["colour", "shape"]
            if any(s is not None for _, _, s in caption.objects):
                kinds.append("size")
            if caption.relation is not None and relation_share is not None:
                if rng.random() < relation_share:
                    kinds = ["relation"]
            elif caption.relation is not None:
                kinds.insert(2, "relation")  # the uniform draw's order: colour, shape, relation
            kind = kinds[int(rng.integers(len(kinds)))]
            objs = [list(o) for o in caption.objects]
            relation = caption.relation
            k = int(rng.integers(len(objs)))
            if kind == "colour":
                objs[k][0] = _other(rng, list(COLOURS), objs[k][0])
            elif kind == "shape":
                objs[k][1] = _other(rng, list(SHAPES), objs[k][1])
            elif kind == "size":
                k = next(i for i, o in enumerate(objs) if o[2] is not None)
                objs[k][2] = _other(rng, list(SIZES), objs[k][2])
            else:
                relation = _FLIP[relation]
            neg = Caption(tuple(tuple(o) for o in objs), relation)
            if not self.is_true(neg, scene):
                return neg
        raise RuntimeError("could not make a hard negative")

    @staticmethod
    def changed_attribute(caption: Caption, negative: Caption) -> str:
        """Which attribute a hard negative changed: "colour", "shape", "size" or "relation"."""
        if negative.relation != caption.relation:
            return "relation"
        for a, b in zip(caption.objects, negative.objects):
            for name, x, y in zip(("colour", "shape", "size"), a, b):
                if x != y:
                    return name
        raise ValueError(f"{negative.text()!r} does not differ from {caption.text()!r}")

    def easy_negative(self, scene, rng, pool=()) -> Caption:
        """The caption of another scene (from ``pool`` first, as the original swaps images
        within a batch, else a fresh one), false of ``scene``."""
        for t in range(100):
            if t < 8 and len(pool):
                other = pool[int(rng.integers(len(pool)))]
            else:
                other = self.sample_scene(rng)
            cap = self.describe(other, rng)
            if not self.is_true(cap, scene):
                return cap
        raise RuntimeError("could not make an easy negative")

    # ----------------------------------------------------------------------------- images
    def render(self, scenes, rng) -> np.ndarray:
        """Scenes -> images float32 (n, 3, S, S), normalized with PIXEL_MEAN and PIXEL_STD.

        Vectorized over images: one pass per object slot (at most three), the later object
        painted over the earlier where they touch.
        """
        S = self.img_size
        n = len(scenes)
        img = np.empty((n, 3, S, S), np.float32)
        # a mid-grey background, which the (0.5, 0.5) normalization puts near 0: the patches
        # carry the objects rather than a large constant shared by every image
        img[:] = rng.uniform(0.40, 0.50, size=(n, 1, 1, 1)).astype(np.float32)
        grid = np.arange(S, dtype=np.float32) + 0.5  # pixel centres
        jitter = rng.uniform(-0.06, 0.06, size=(n, 3, 3)).astype(np.float32)
        for k in range(3):
            rows = [i for i, sc in enumerate(scenes) if len(sc) > k]
            if not rows:
                break
            objs = [scenes[i][k] for i in rows]
            cx = np.array([o.cx for o in objs], np.float32)[:, None, None]  # (m, 1, 1)
            cy = np.array([o.cy for o in objs], np.float32)[:, None, None]
            r = np.array([o.r for o in objs], np.float32)[:, None, None]
            shape = np.array([SHAPES.index(o.shape) for o in objs])[:, None, None]
            dx = grid[None, None, :] - cx  # (m, 1, S)
            dy = grid[None, :, None] - cy  # (m, S, 1)
            circle = dx * dx + dy * dy <= r * r  # (m, S, S)
            h = r  # the square fills its circle's box: a third more area, and corners
            square = (np.abs(dx) <= h) & (np.abs(dy) <= h)
            # triangle, apex up: the half width grows from 0 at the top to r at the base
            t = (dy + r) / (2 * r)
            triangle = (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
            inside = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
            colour = np.array([COLOURS[o.colour] for o in objs], np.float32)  # (m, 3)
            colour = np.clip(colour + jitter[rows, k], 0, 1)
            sub = img[rows]  # (m, 3, S, S)
            np.copyto(sub, colour[:, :, None, None], where=inside[:, None])
            img[rows] = sub
        if self.noise:
            img += rng.normal(0.0, self.noise, size=img.shape).astype(np.float32)
        img -= PIXEL_MEAN
        img /= PIXEL_STD
        return img

    # ----------------------------------------------------------------------------- batches
    def itm_batch(
        self,
        rng,
        n: int,
        *,
        pos_fraction=0.5,
        hard_fraction=0.5,
        counts=None,
        probs=None,
        relation_share=None,
    ):
        """Image-text pairs for ITM (and WPA): half positive, the negatives half hard.
        ``relation_share``: see :meth:`hard_negative` (None: every attribute alike).

        Returns a dict of numpy arrays: images (n, 3, S, S), input_ids (n, L), text_mask (n, L),
        itm_labels (n,) (1 = match), kind (n,) (0 positive, 1 easy negative, 2 hard negative),
        changed (n,) str (the attribute a hard negative changed, "" elsewhere) and texts.
        """
        scenes = [self.sample_scene(rng, counts=counts, probs=probs) for _ in range(n)]
        u = rng.random((n, 2))
        caps, labels, kinds, changed = [], [], [], []
        for i, scene in enumerate(scenes):
            cap = self.describe(scene, rng)
            change = ""
            if u[i, 0] < pos_fraction:
                kind = 0
            elif u[i, 1] < hard_fraction:
                neg = self.hard_negative(cap, scene, rng, relation_share)
                kind, cap, change = 2, neg, self.changed_attribute(cap, neg)
            else:
                kind, cap = 1, self.easy_negative(scene, rng, scenes)
            caps.append(cap)
            changed.append(change)
            labels.append(int(kind == 0))
            kinds.append(kind)
        texts = [c.text() for c in caps]
        ids, mask = self.tokenizer.encode_batch(texts)
        return dict(
            images=self.render(scenes, rng),
            input_ids=ids,
            text_mask=mask,
            itm_labels=np.asarray(labels, np.int64),
            kind=np.asarray(kinds, np.int64),
            changed=np.asarray(changed),
            texts=texts,
            scenes=scenes,
        )

    def mlm_batch(self, rng, n: int, *, prob=0.15, min_one=True, counts=None, probs=None):
        """Matching pairs with BERT-masked captions: the dict of ``itm_batch`` (all positive)
        plus ``masked_ids`` (n, L) and ``mlm_labels`` (n, L) (-100 where not masked)."""
        batch = self.itm_batch(rng, n, pos_fraction=1.0, counts=counts, probs=probs)
        masked, labels = self.mask(
            batch["input_ids"], batch["text_mask"], rng, prob=prob, min_one=min_one
        )
        batch["masked_ids"] = masked
        batch["mlm_labels"] = labels
        return batch

    def mask(self, ids, text_mask, rng, *, prob=0.15, min_one=True):
        return mask_tokens(
            ids,
            text_mask,
            rng,
            vocab_size=self.tokenizer.vocab_size,
            mask_id=self.tokenizer.mask_id,
            special_ids=self.special_ids,
            prob=prob,
            min_one=min_one,
        )

    def heldout(self, n: int = 1000):
        """The fixed held-out set: ``n`` ITM pairs (half positive, negatives half hard) and, for
        the positive ones, BERT-masked captions (``masked_ids``, ``mlm_labels``)."""
        rng = self.rng("test")
        batch = self.itm_batch(rng, n)
        masked, labels = self.mask(batch["input_ids"], batch["text_mask"], rng)
        batch["masked_ids"] = masked
        batch["mlm_labels"] = labels
        return batch

    @staticmethod
    def to_pixels(images) -> np.ndarray:
        """Normalized images -> RGB values in [0, 1] (the inverse of the normalization)."""
        return np.clip(np.asarray(images, np.float64) * PIXEL_STD + PIXEL_MEAN, 0.0, 1.0)

    def is_content(self, ids) -> np.ndarray:
        """bool mask of ids that are content words (colours, shapes, sizes, relation words)."""
        return np.isin(np.asarray(ids), self.content_ids)


def _other(rng, values, current):
    choices = [v for v in values if v != current]
    return choices[int(rng.integers(len(choices)))]
