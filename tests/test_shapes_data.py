"""The generated image-caption data and the word tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from minivit.data.shapes import COLOURS, SHAPES, SIZES, Caption, ShapesCaptions, mask_tokens
from minivit.data.tokenizer import SPECIAL_TOKENS, WordTokenizer


@pytest.fixture(scope="module")
def data():
    return ShapesCaptions(seed=0)


# ----------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_padding_and_mask():
    tok = WordTokenizer(["a", "red", "circle"], max_text_len=6)
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    ids, mask = tok.encode("A red circle")
    assert ids.tolist() == [1, 5, 6, 7, 2, 0]
    assert mask.tolist() == [True] * 5 + [False]
    assert tok.decode(ids) == "a red circle"
    assert tok.decode(ids, skip_special_tokens=False) == "[CLS] a red circle [SEP]"
    ids, _ = tok.encode("a [MASK] zebra")
    assert ids[1:4].tolist() == [5, tok.mask_id, tok.unk_id]


def test_tokenizer_rejects_long_text_unless_truncating():
    tok = WordTokenizer(["a"], max_text_len=4)
    with pytest.raises(ValueError, match="max_text_len"):
        tok.encode("a a a")
    ids, mask = tok.encode("a a a", truncate=True)
    assert ids.tolist() == [1, 5, 5, 2] and mask.all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([99])


def test_tokenizer_encode_batch_shapes():
    tok = WordTokenizer(["a", "b"], max_text_len=5)
    ids, mask = tok.encode_batch(["a", "a b b"])
    assert ids.shape == mask.shape == (2, 5)
    assert ids.dtype == np.int64 and mask.dtype == bool
    assert mask.sum(1).tolist() == [3, 5]


# ----------------------------------------------------------------------------------------------
# scenes and captions


def test_same_seed_same_data_and_streams_differ(data):
    a = data.itm_batch(data.rng("train", 3), 16)
    b = ShapesCaptions(seed=0).itm_batch(ShapesCaptions(seed=0).rng("train", 3), 16)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert a["texts"] == b["texts"]
    other = data.itm_batch(data.rng("train", 4), 16)
    test = data.itm_batch(data.rng("test"), 16)
    seed1 = ShapesCaptions(seed=1).itm_batch(ShapesCaptions(seed=1).rng("train", 3), 16)
    for x in (other, test, seed1):
        assert not np.array_equal(a["images"], x["images"])


def test_heldout_is_fixed_and_disjoint_from_training(data):
    h1 = data.heldout(32)
    h2 = ShapesCaptions(seed=0).heldout(32)
    np.testing.assert_array_equal(h1["images"], h2["images"])
    np.testing.assert_array_equal(h1["mlm_labels"], h2["mlm_labels"])
    train = np.concatenate([data.itm_batch(data.rng("train", s), 32)["images"] for s in range(3)])
    # no held-out image appears among training images
    d = ((h1["images"][:, None] - train[None]) ** 2).reshape(32, len(train), -1).sum(-1)
    assert d.min() > 1.0


def test_scenes_have_one_to_three_objects_of_every_kind(data):
    rng = data.rng("train", 0)
    scenes = [data.sample_scene(rng) for _ in range(300)]
    assert {len(s) for s in scenes} == {1, 2, 3}
    objs = [o for s in scenes for o in s]
    assert {o.shape for o in objs} == {"circle", "square", "triangle"}
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == {"small", "large"}
    for s in scenes:
        assert len({(o.colour, o.shape) for o in s}) == len(s)  # distinct objects
        for o in s:
            assert o.r <= o.cx <= data.img_size - o.r and o.r <= o.cy <= data.img_size - o.r


def test_positive_captions_are_true_and_negatives_false(data):
    b = data.itm_batch(data.rng("train", 1), 200)
    kinds = b["kind"]
    assert set(np.unique(kinds)) == {0, 1, 2}
    assert 0.35 < (kinds == 0).mean() < 0.65
    assert 0.3 < (kinds == 2).sum() / (kinds > 0).sum() < 0.7  # half the negatives are hard
    np.testing.assert_array_equal(b["itm_labels"], (kinds == 0).astype(np.int64))
    tok = data.tokenizer
    for text, scene, kind in zip(b["texts"], b["scenes"], kinds):
        ids, _ = tok.encode(text)  # every caption fits and has no unknown word
        assert tok.unk_id not in ids
        cap = _parse(text)
        assert data.is_true(cap, scene) == (kind == 0)


def test_hard_negatives_change_exactly_one_attribute(data):
    rng = data.rng("train", 2)
    for _ in range(100):
        scene = data.sample_scene(rng)
        pos = data.describe(scene, rng)
        neg = data.hard_negative(pos, scene, rng)
        a, b = pos.text().split(), neg.text().split()
        assert len(a) == len(b)
        assert sum(x != y for x, y in zip(a, b)) == 1, (pos.text(), neg.text())
        assert data.is_true(pos, scene) and not data.is_true(neg, scene)
        word = next(y for x, y in zip(a, b) if x != y)
        kind = data.changed_attribute(pos, neg)
        assert word in {"colour": COLOURS, "shape": SHAPES, "size": SIZES,
                        "relation": ("left", "right", "above", "below")}[kind]  # fmt: skip


def test_itm_batch_names_the_change_of_every_hard_negative_only(data):
    b = data.itm_batch(data.rng("train", 4), 200)
    hard = b["kind"] == 2
    assert hard.any() and (~hard).any()
    assert set(b["changed"][hard]) <= {"colour", "shape", "size", "relation"}
    assert (b["changed"][~hard] == "").all()


def test_relation_share_sets_how_often_the_relation_is_flipped(data):
    def relation_flips(share, n=400):
        rng = data.rng("train", 3)
        flips = total = 0
        while total < n:
            scene = data.sample_scene(rng, counts=(2, 3))
            pos = data.describe(scene, rng)
            if pos.relation is None:
                continue
            neg = data.hard_negative(pos, scene, rng, relation_share=share)
            assert not data.is_true(neg, scene)
            flips += neg.relation != pos.relation
            total += 1
        return flips / n

    assert relation_flips(1.0) == 1.0
    assert relation_flips(0.0) == 0.0
    assert 0.25 < relation_flips(None) < 0.42  # uniform over colour, shape, relation (, size)
    assert 0.42 < relation_flips(0.5) < 0.58


def test_relations_match_positions(data):
    rng = data.rng("train", 5)
    for _ in range(100):
        scene = data.sample_scene(rng, n_objects=2)
        cap = data.describe(scene, rng)
        first = next(o for o in scene if (o.colour, o.shape) == cap.objects[0][:2])
        second = next(o for o in scene if (o.colour, o.shape) == cap.objects[1][:2])
        dx, dy = second.cx - first.cx, second.cy - first.cy
        expected = {
            "left of": dx >= data.gap,
            "right of": -dx >= data.gap,
            "above": dy >= data.gap,
            "below": -dy >= data.gap,
        }[cap.relation]
        assert expected


def test_images_show_the_objects_colours(data):
    rng = data.rng("train", 6)
    scenes = [data.sample_scene(rng) for _ in range(20)]
    images = data.render(scenes, rng)
    assert images.shape == (20, 3, 48, 48) and images.dtype == np.float32
    pix = data.to_pixels(images)
    for img, scene in zip(pix, scenes):
        for o in scene:
            # a pixel just below the centre is inside every shape (the triangle's apex is up)
            y, x = int(o.cy + 1), int(o.cx)
            np.testing.assert_allclose(img[:, y, x], COLOURS[o.colour], atol=0.25)


# ----------------------------------------------------------------------------------------------
# masking


def test_bert_masking_rates_and_labels():
    rng = np.random.default_rng(0)
    n, L, V = 4000, 12, 30
    ids = rng.integers(5, V, size=(n, L))
    ids[:, 0], ids[:, -1] = 1, 2
    mask = np.ones((n, L), bool)
    mask[:, -3:] = False  # padding
    ids[:, -3:] = 0
    masked, labels = mask_tokens(
        ids, mask, rng, vocab_size=V, mask_id=3, special_ids=(0, 1, 2, 3, 4), min_one=False
    )
    chosen = labels != -100
    words = mask & (ids > 4)
    assert not chosen[~words].any()  # never CLS, SEP or padding
    assert abs(chosen.sum() / words.sum() - 0.15) < 0.01
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    as_mask = (masked == 3) & chosen
    kept = (masked == ids) & chosen
    swapped = chosen & ~as_mask & ~kept
    frac = np.array([as_mask.sum(), swapped.sum(), kept.sum()]) / chosen.sum()
    # 80 / 10 / 10, where a random word may happen to equal the original (1/25 of the swaps)
    np.testing.assert_allclose(frac, [0.8, 0.1 * 24 / 25, 0.1 + 0.1 / 25], atol=0.02)
    assert (masked[swapped] > 4).all()  # random words are never specials
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])


def _words(starts_row, candidate_row):
    """The words of one row: lists of token positions, each a chosen-or-not unit (a run from a
    word's first token through its pieces, cut at any token that cannot be chosen)."""
    words = []
    for t in np.nonzero(candidate_row)[0]:
        if starts_row[t] or not words or words[-1][-1] != t - 1:
            words.append([t])
        else:
            words[-1].append(t)
    return words


@pytest.mark.parametrize("min_one", [False, True])
def test_whole_word_masking_takes_words_whole(min_one):
    rng = np.random.default_rng(1)
    n, L, V = 3000, 14, 40
    ids = rng.integers(5, V, size=(n, L))
    ids[:, 0] = 1  # [CLS]
    starts = rng.random((n, L)) < 0.6  # about 1.7 pieces per word
    starts[:, 1] = True
    lengths = rng.integers(4, L - 1, size=n)
    mask = np.arange(L) < lengths[:, None]  # [CLS] ... then padding
    ids[np.arange(n), lengths - 1] = 2  # [SEP]
    ids[~mask] = 0
    ids[(rng.random((n, L)) < 0.05) & mask & (ids > 2)] = 4  # an [UNK] amid the words
    masked, labels = mask_tokens(
        ids,
        mask,
        rng,
        vocab_size=V,
        mask_id=3,
        special_ids=(0, 1, 2, 3, 4),
        min_one=min_one,
        word_starts=starts,
    )
    chosen = labels != -100
    candidate = mask & (ids > 4)
    assert not chosen[~candidate].any()
    # a piece right after an [UNK] begins a word of its own: it can be chosen
    orphan = candidate & ~starts
    orphan[:, 1:] &= ids[:, :-1] == 4
    orphan[:, 0] = False
    assert orphan.sum() > 200 and chosen[orphan].mean() > 0.08
    n_words = n_chosen = expected = 0
    for b in range(n):
        words = _words(starts[b], candidate[b])
        picked = [chosen[b, w].all() for w in words]
        for w in words:
            assert chosen[b, w].all() or not chosen[b, w].any()  # a word is chosen whole
        assert not min_one or any(picked)
        n_words += len(words)
        n_chosen += sum(picked)
        # each word with probability 0.15; with min_one, a row that drew none gets one
        expected += 0.15 * len(words) + (0.85 ** len(words) if min_one else 0)
    assert abs(n_chosen - expected) / n_words < 0.01
    as_mask = ((masked == 3) & chosen).sum() / chosen.sum()
    assert abs(as_mask - 0.8) < 0.02  # the 80 / 10 / 10 split, token by token
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])


def test_whole_word_masking_with_every_token_a_word_is_token_masking():
    rng_ids = np.random.default_rng(2)
    ids = rng_ids.integers(5, 30, size=(50, 9))
    mask = rng_ids.random((50, 9)) < 0.9
    kw = dict(vocab_size=30, mask_id=3, special_ids=(0, 1, 2, 3, 4))
    plain = mask_tokens(ids, mask, np.random.default_rng(3), **kw)
    whole = mask_tokens(ids, mask, np.random.default_rng(3), word_starts=np.ones((50, 9)), **kw)
    for a, b in zip(plain, whole):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="word_starts has shape"):
        mask_tokens(ids, mask, np.random.default_rng(3), word_starts=np.ones((50, 8)), **kw)


def test_masking_min_one_and_mlm_batch(data):
    b = data.mlm_batch(data.rng("train", 7), 64)
    chosen = b["mlm_labels"] != -100
    assert chosen.any(axis=1).all()  # at least one masked word per caption
    assert (b["itm_labels"] == 1).all()
    # labels hold the original caption's ids
    np.testing.assert_array_equal(b["mlm_labels"][chosen], b["input_ids"][chosen])
    assert data.is_content(np.array(data.tokenizer.convert_tokens_to_ids(["red", "left"]))).all()
    assert not data.is_content(np.array(data.tokenizer.convert_tokens_to_ids(["a", "of"]))).any()


def _parse(text):
    """Caption text -> Caption (the inverse of Caption.text, for the tests)."""
    words = text.split()
    objects, relation, i = [], None, 0
    while i < len(words):
        w = words[i]
        if w == "a":
            size = None
            if words[i + 1] in ("small", "large"):
                size = words[i + 1]
                i += 1
            objects.append((words[i + 1], words[i + 2], size))
            i += 3
        elif w in ("left", "right"):
            relation = f"{w} of"
            i += 2
        elif w in ("above", "below"):
            relation = w
            i += 1
        else:  # "and"
            i += 1
    return Caption(tuple(objects), relation)


def test_grid_layout_puts_each_object_inside_its_own_patch(data):
    assert data.layout == "grid" and data.img_size == 48 and data.cells == 3
    rng = data.rng("train", 8)
    cell = data.img_size / data.cells
    for _ in range(200):
        scene = data.sample_scene(rng)
        cells = set()
        for o in scene:
            col, row = int(o.cx // cell), int(o.cy // cell)
            cells.add((row, col))
            assert col * cell <= o.cx - o.r and o.cx + o.r <= (col + 1) * cell
            assert row * cell <= o.cy - o.r and o.cy + o.r <= (row + 1) * cell
        assert len(cells) == len(scene)


def _object_mask(o, S):
    """The pixels object ``o`` covers, from its geometry as the docs give it (pixel centres at
    k + 0.5; a square of half side r; a triangle, apex up, half width r at its base)."""
    c = np.arange(S) + 0.5
    dx, dy = c[None, :] - o.cx, c[:, None] - o.cy
    if o.shape == "circle":
        return dx**2 + dy**2 <= o.r**2
    if o.shape == "square":
        return (np.abs(dx) <= o.r) & (np.abs(dy) <= o.r)
    t = (dy + o.r) / (2 * o.r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= o.r * t)


@pytest.mark.parametrize("size", [32, 64])
def test_free_layout_objects_do_not_overlap(size):
    """The docs: "free" places objects where they do not overlap. The check treated every
    object as its circle, and squares' and triangles' corners overlapped (in these scenes,
    9 of 557 pairs at 32 px and 22 of 562 at 64 px)."""
    free = ShapesCaptions(img_size=size, layout="free", seed=2)
    rng = free.rng("train", 0)
    pairs = 0
    for _ in range(400):
        scene = free.sample_scene(rng)
        masks = [_object_mask(o, size) for o in scene]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                pairs += 1
                assert not (masks[i] & masks[j]).any(), (scene[i], scene[j])
    assert pairs > 300


def test_free_layout_and_bad_arguments():
    free = ShapesCaptions(img_size=32, layout="free", seed=1)
    b = free.itm_batch(free.rng("train", 0), 32)
    assert b["images"].shape == (32, 3, 32, 32)
    for text, scene, label in zip(b["texts"], b["scenes"], b["itm_labels"]):
        assert free.is_true(_parse(text), scene) == bool(label)
    with pytest.raises(ValueError, match="layout"):
        ShapesCaptions(layout="spiral")
    with pytest.raises(ValueError, match="max_text_len"):
        ShapesCaptions(max_text_len=8)
    with pytest.raises(ValueError, match="split"):
        free.rng("validation")
