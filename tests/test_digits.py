"""minivit.data.digits: the stratified split, normalisation, batching and augmentation."""

from __future__ import annotations

import numpy as np

from minivit.data import iterate_batches, load_digits_split, random_affine, random_translate


def test_split_is_stratified_seeded_and_disjoint():
    a, b = load_digits_split(0.2, seed=0), load_digits_split(0.2, seed=0)
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~10 % of 360 per class
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    rows = {r.tobytes() for r in a.x_train.reshape(len(a.x_train), -1)}
    overlap = sum(r.tobytes() in rows for r in a.x_test.reshape(len(a.x_test), -1))
    assert overlap <= 2  # the digits hold a couple of exact duplicate images, nothing more
    c = load_digits_split(0.2, seed=1)
    assert not np.array_equal(a.y_test, c.y_test)
    z = a.normalize(a.x_train)
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4


def test_batches_cover_every_sample_once():
    rng = np.random.default_rng(0)
    idx = np.concatenate(list(iterate_batches(10, 4, rng)))
    assert sorted(idx) == list(range(10))
    assert [len(b) for b in iterate_batches(10, 4, rng, drop_last=True)] == [4, 4]
    assert list(np.concatenate(list(iterate_batches(5, 2)))) == [0, 1, 2, 3, 4]


def test_translate_moves_whole_pixels_and_fills_zeros():
    x = np.random.default_rng(0).random((50, 2, 8, 8))
    rng = np.random.default_rng(1)
    out = random_translate(x, rng, 2)
    dy, dx = np.random.default_rng(1).integers(-2, 3, (2, 50))
    for b in range(50):
        shifted = np.zeros_like(x[b])
        src = x[b][:, max(0, -dy[b]) : 8 - max(0, dy[b]), max(0, -dx[b]) : 8 - max(0, dx[b])]
        shifted[:, max(0, dy[b]) : 8 - max(0, -dy[b]), max(0, dx[b]) : 8 - max(0, -dx[b])] = src
        np.testing.assert_array_equal(out[b], shifted)


def test_affine_identity_and_range():
    x = np.random.default_rng(0).random((6, 1, 8, 8))
    np.testing.assert_array_equal(random_affine(x, np.random.default_rng(0), 0, 0), x)
    # a vanishing rotation samples every pixel at its own centre
    rot = random_affine(x, np.random.default_rng(0), max_shift=0, max_rotate=1e-12)
    np.testing.assert_allclose(rot, x, atol=1e-9)
    out = random_affine(x, np.random.default_rng(3), max_shift=1, max_rotate=10, scale=(0.9, 1.1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 + 1e-12
