"""The CPU stand-in for CuPy (tests/_cupy_stand_in.py) is as strict as it claims.

``pytest --cupy-stand-in`` runs the cupy half of the suite on it, so a leniency here would let a
bug through that a GPU then finds. Each test shows one rule failing code the way CuPy fails it.
"""

from __future__ import annotations

import _cupy_stand_in as si
import numpy as np
import pytest

from minivit import backend as B
from minivit import ops

cp = si.MODULES["cupy"]


def test_no_implicit_conversion_to_numpy():
    a = cp.ones(3)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.testing.assert_allclose(a, np.ones(3))
    np.testing.assert_array_equal(a.get(), np.ones(3))
    np.testing.assert_array_equal(cp.asnumpy(a), np.ones(3))


def test_host_arrays_are_refused_in_device_work():
    a, h = cp.ones(3), np.ones(3)
    for bad in (lambda: a + h, lambda: h + a, lambda: cp.exp(h), lambda: cp.matmul(a, h),
                lambda: cp.concatenate([a, h]), lambda: cp.add(a, a, out=h)):  # fmt: skip
        with pytest.raises(TypeError, match="Unsupported type"):
            bad()
    assert float((a + 2.0).sum()) == 9.0 and float((a * np.float32(2)).sum()) == 6.0
    a[np.array([0, 2])] = np.array([5.0, 7.0])  # host indices and values are copied over
    np.testing.assert_array_equal(a.get(), [5.0, 1.0, 7.0])
    c = cp.asarray(h)  # a copy: the host array is not aliased
    h[0] = 9
    assert float(c[0]) == 1.0


def test_device_scalars_are_zero_d_arrays_without_index():
    a = cp.arange(6).reshape(2, 3)
    s, e = a.sum(), a[1, 2]
    assert type(s) is si.ndarray and s.shape == () and int(s) == 15
    assert type(e) is si.ndarray and e.item() == 5
    e[...] = 50  # an element is a view, as on a GPU
    assert int(a.max()) == 50
    with pytest.raises(TypeError):
        range(s)  # no __index__ on CuPy arrays


def test_only_cupys_names_exist_and_gaps_say_so():
    with pytest.raises(AttributeError, match="not in CuPy"):
        cp.nanmedian_of_nothing  # noqa: B018
    assert not hasattr(cp.random.default_rng(0), "permutation")  # NumPy's, not CuPy's
    assert not hasattr(cp.ones(2).flags, "writeable")
    assert "fuse" in dir(cp)
    with pytest.raises(si.StandInGap, match="not emulated"):
        cp.fuse(lambda x: x)
    # NumPy functions on device arrays dispatch to the stand-in, as CuPy's do
    assert type(np.concatenate([cp.ones(2), cp.zeros(1)])) is si.ndarray
    assert type(np.exp(cp.ones(2))) is si.ndarray


def test_fresh_memory_is_garbage_and_random_streams_differ_from_numpy():
    assert np.isnan(cp.empty(4).get()).all() and np.isnan(cp.empty_like(cp.ones(2)).get()).all()
    got = cp.random.default_rng(7).random(5).get()
    assert not np.allclose(got, np.random.default_rng(7).random(5))
    np.testing.assert_array_equal(got, cp.random.default_rng(7).random(5).get())  # seeded
    legacy = cp.random.RandomState(7)  # POT makes one when it finds CuPy
    assert type(legacy.rand(2, 3)) is si.ndarray and legacy.randn(4).shape == (4,)
    assert cp.cuda.Device(cp.ones(1).device).id == 0  # a Device from an array's device


def test_kernel_arguments_must_be_contiguous_device_arrays():
    k = cp.ElementwiseKernel("T x", "T y", "y = x * 2", "double_it")
    x = cp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(k(x).get(), 2 * np.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        k(x.T)
    with pytest.raises(TypeError, match="Unsupported type"):
        k(np.ones(3))


def test_minivit_sees_a_cupy_backend(cupy_stand_in):
    be = cupy_stand_in
    assert be.name == "cupy" and be.xp is cp
    x = be.asarray(np.ones((2, 3)))
    assert B.backend_of(x) is be and B.contiguous_on("cupy", x)
    y, _ = ops.linear_forward(x, be.asarray(np.ones((4, 3))), None)
    np.testing.assert_array_equal(be.to_numpy(y), np.full((2, 4), 3.0))
    with pytest.raises(TypeError, match=r"numpy.ndarray.*cupy.ndarray"):
        ops.linear_forward(np.ones((2, 3)), be.asarray(np.ones((4, 3))), None)


def test_memory_pool_and_allocator_hook_see_allocations():
    pool = cp.get_default_memory_pool()
    seen = []
    cp.cuda.set_allocator(lambda n: seen.append(n) or pool.malloc(n))
    try:
        before = pool.used_bytes()
        a = cp.zeros(1000, dtype=cp.float32)
        assert pool.used_bytes() - before == 4000 and seen == [4000]
        del a
        assert pool.used_bytes() == before
    finally:
        cp.cuda.set_allocator(None)


def test_calls_bind_to_cupys_signatures():
    a = cp.ones(3)
    # keywords and forms NumPy takes and CuPy 14.2 does not
    for bad in (lambda: a.sum(where=True), lambda: a.item(0), lambda: cp.sort(a, stable=True),
                lambda: cp.take_along_axis(a, cp.zeros(3, dtype=cp.int64)),
                lambda: cp.add(a, a, where=True)):  # fmt: skip
        with pytest.raises(TypeError):
            bad()
    with pytest.raises(NotImplementedError):
        cp.maximum.reduce(a)  # only add and multiply reduce on CuPy
    assert a.reshape(3, 1).shape == (3, 1) and cp.sort(a, axis=0).shape == (3,)


def test_assignment_and_indexing_follow_cupy():
    a = cp.zeros(4)
    with pytest.raises(ValueError, match="fill"):
        a[1:3] = np.ones(2)  # a basic index is a fill: no host arrays
    with pytest.raises(TypeError):
        a[...] = [1.0, 2.0, 3.0, 4.0]
    a[1:3] = cp.ones(2)
    a[np.array([0])] = np.array([5.0])  # an advanced index copies host values over
    np.testing.assert_array_equal(a.get(), [5.0, 1.0, 1.0, 0.0])
    m = cp.zeros((2, 2))
    with pytest.raises(ValueError, match="one boolean array"):
        m[cp.asarray(np.array([True, False])), cp.asarray(np.array([0]))]
    with pytest.raises(AttributeError):
        cp.where(True, a, a)  # CuPy reads the condition as a device array
    assert type(cp.allclose(a, a)) is si.ndarray


def test_peak_memory_hook_sees_the_new_buffer(cupy_stand_in):
    from benchmarks import harness

    assert harness._peak_cupy(lambda: cp.ones(1 << 16)) >= 8 << 16


def test_counting_sees_launches_hidden_copies_and_syncs():
    a = cp.ones((2, 3, 4, 5), dtype=np.float32)
    b = cp.ones((2, 3, 5, 4), dtype=np.float32)
    with si.counting() as c:
        a.transpose(0, 1, 3, 2)[:, 1:]  # views: nothing
        a.reshape(6, 20)
        cp.empty(8)  # allocation only
    assert c["launch"] == 0
    with si.counting() as c:
        a + 1  # one elementwise kernel
        a.sum(axis=-1)  # one reduction
        a.transpose(1, 0, 2, 3).reshape(-1)  # a reshape that must copy
        cp.zeros(3)
        a[0] = 2.0  # a fill
    assert c["launch"] == 5
    with si.counting() as c:
        a @ a.transpose(0, 1, 3, 2)  # batched: CuPy copies the transposed operand first
    assert c["launch"] == 2 and c["matmul_copied_bytes"] == a.nbytes
    with si.counting() as c:
        a[0, 0] @ a[0, 0].T  # two dimensions: cuBLAS reads the transpose in place
    assert c["launch"] == 1 and c["matmul_copied_bytes"] == 0
    with si.counting() as c:
        out = cp.empty((2, 4, 3, 4), dtype=np.float32).transpose(0, 2, 1, 3)
        cp.matmul(a, b, out=out)  # a strided out: computed, then copied in
    assert c["launch"] == 2
    with si.counting() as c:
        float(a.sum())  # a device-to-host read waits for the queue
        cp.asarray(np.ones(3))
    assert (c["launch"], c["sync"], c["h2d"]) == (1, 1, 1)
    with si.counting() as c:
        same = cp.ascontiguousarray(a)  # already contiguous: the array itself, no launch
        cp.stack((a, a, a))  # one copy per array (CuPy, up to 8)
        cp.copyto(b, b)  # in place, returns None: still a kernel
    assert same is a and c["launch"] == 4
    with si.counting() as c:
        a[0, 0, :, :3] @ b[0, 0, :3]  # a padded slice: not C- or F-contiguous, copied
    assert c["launch"] == 2
