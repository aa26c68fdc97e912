"""Batch shards in worker processes (``MINIVIT_SHARD=processes``, minivit/models/shard_workers.py):
the same outputs and gradients as thread shards, parameters that follow the caller's, workers
that follow the model, errors and interruptions that leave the model usable."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import minivit
from minivit import _parallel, ops
from minivit.models import shard_workers, sharding

pytestmark = pytest.mark.skipif(not shard_workers.available(), reason="needs os.fork")


@pytest.fixture
def two_threads(keep_parallel_settings):
    _parallel.set_num_threads(2)


def _vit(**kw):
    cfg = dict(img_size=32, depth=2, embed_dim=32, num_heads=2, num_classes=5, dtype="float64")
    return minivit.create_model("vit_tiny_patch16_224", **{**cfg, **kw})


def _step(model, x, y):
    """Forward, cross-entropy, backward with the input gradient: (logits, dx, grads)."""
    model.zero_grads()
    logits = model.forward(x, train=True)
    _, cache = ops.cross_entropy_forward(logits, y)
    (dl,) = ops.cross_entropy_backward(np.asarray(1.0), cache)
    dx = model.backward(dl, input_grad=True)
    return logits, dx, {k: v.copy() for k, v in model.grads.items()}


def _inputs(batch=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, 32, 32)), rng.integers(0, 5, batch)


def _pids(model):
    return [w.pid for w in shard_workers._POOLS[id(model)].workers]


def _assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-12)
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        np.testing.assert_allclose(a[2][k], b[2][k], rtol=0, atol=1e-12, err_msg=k)


def test_processes_give_the_thread_shards_results(two_threads):
    model = _vit()
    x, y = _inputs()  # 5 samples: shards of 2 and 3
    sharding.set_mode("threads")
    ref = _step(model, x, y)
    sharding.set_mode("processes")
    got = _step(model, x, y)
    _assert_same(got, ref)
    assert len(_pids(model)) == 1 and all(p != os.getpid() for p in _pids(model))
    # inference: the same logits, no cache kept here or in the worker
    with ops.no_grad():
        np.testing.assert_allclose(model.forward(x), ref[0], rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="backward"):
        model.backward(np.ones((5, 5)))
    # three threads: two workers
    _parallel.set_num_threads(3)
    _assert_same(_step(model, x, y), ref)
    assert len(_pids(model)) == 2


def test_workers_follow_the_parameters_and_the_model(two_threads):
    model = _vit()
    x, y = _inputs(4)
    sharding.set_mode("processes")
    _step(model, x, y)
    pid = _pids(model)
    # an optimizer's in-place step, and a parameter replaced by assignment
    from minivit.optim import AdamW

    opt = AdamW(model.params, lr=0.1)
    opt.step(model.grads)
    model.params["head.weight"] = model.params["head.weight"] * 2.0
    got = _step(model, x, y)
    sharding.set_mode("threads")
    _assert_same(got, _step(model, x, y))
    sharding.set_mode("processes")
    assert _pids(model) == pid  # the same workers: only the values changed
    model.note = "a plain attribute the replica lacks"
    _step(model, x, y)
    assert _pids(model) != pid  # forked again, from the model as it is now


def _vilt_and_inputs(seed):
    """A one-block ViLT and a batch of 4: (model, ids, text mask with one padded caption, images,
    rng)."""
    from minivit.models.vilt import ViLT

    model = ViLT(vocab_size=30, max_text_len=8, img_size=32, patch_size=16, embed_dim=16,
                 depth=1, num_heads=2, dtype="float64", seed=1)  # fmt: skip
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(0, 30, (4, 6)), np.ones((4, 6), bool)
    mask[1, 4:] = False
    return model, ids, mask, rng.standard_normal((4, 3, 32, 32)), rng


def test_a_vilt_runs_in_processes_too(two_threads):
    model, ids, mask, img, rng = _vilt_and_inputs(2)
    g = rng.standard_normal((4, 16))
    runs = {}
    for mode in ("threads", "processes"):
        sharding.set_mode(mode)
        model.zero_grads()
        out = model.forward(ids, mask, img, train=True)
        remote = isinstance(model._cache.shards[-1], shard_workers.RemoteShard)
        assert remote == (mode == "processes")  # the second shard really ran in a worker
        dimg = model.backward({"pooled": g})
        runs[mode] = (out["pooled"], out["text_feats"], out["attn"][0], dimg, dict(model.grads))
    for a, b in zip(runs["threads"][:4], runs["processes"][:4]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    for k, v in runs["threads"][4].items():
        np.testing.assert_allclose(runs["processes"][4][k], v, rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("room", ["all", "some", "none"])
def test_arrays_placed_in_the_inbox_give_the_pipes_results(two_threads, monkeypatch, room):
    """Large request and reply arrays go through the worker's shared inbox instead of the pipe:
    a ViLT forward (ids, mask, images; back: features, pooled, attention maps) and a backward
    with every gradient (back: the images' gradient), one after the other, so the backward's
    arrays land while the forward's cache may still view its own. "some": regions too small
    for everything (the rest goes through the pipe); "none": nothing fits."""
    monkeypatch.setattr(shard_workers._Inbox, "MIN_BYTES", 0)  # every array is placed...
    region = {"all": 2**20, "some": 600, "none": 8}[room]
    monkeypatch.setattr(shard_workers._Inbox, "REGION_BYTES", region)  # ...if it fits
    monkeypatch.setattr(shard_workers._Inbox, "REPLY_BYTES", region)
    placed, replied = [], []
    pack, unpack = shard_workers._Inbox.pack, shard_workers._Inbox.unpack

    def leaves(value):
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            return [x for v in value for x in leaves(v)]
        return [value]

    def spy(self, value, where):  # in this process: the requests
        out = pack(self, value, where)
        placed.extend(True for v in leaves(out) if isinstance(v, shard_workers._Placed))
        placed.extend(False for v in leaves(out) if isinstance(v, np.ndarray))  # for the pipe
        return out

    def spy_replies(self, value, copy=False):  # the replies' arrays, as they arrive here
        if copy:
            arrays = (
                v for v in leaves(value) if isinstance(v, (shard_workers._Placed, np.ndarray))
            )
            replied.extend(isinstance(v, shard_workers._Placed) for v in arrays)
        return unpack(self, value, copy)

    monkeypatch.setattr(shard_workers._Inbox, "pack", spy)
    monkeypatch.setattr(shard_workers._Inbox, "unpack", spy_replies)
    model, ids, mask, img, rng = _vilt_and_inputs(3)
    grads = {
        "text_feats": rng.standard_normal((4, 6, 16)),
        "image_feats": rng.standard_normal((4, 5, 16)),  # 4 patches and the image CLS
        "pooled": rng.standard_normal((4, 16)),
    }
    runs = {}
    for mode in ("threads", "processes"):
        sharding.set_mode(mode)
        for _ in range(2):  # the second step's arrays overwrite the first's
            model.zero_grads()
            out = model.forward(ids, mask, img, train=True)
            remote = isinstance(model._cache.shards[-1], shard_workers.RemoteShard)
            assert remote == (mode == "processes")
            dimg = model.backward(grads)
        runs[mode] = (out["pooled"], out["image_feats"], dimg, dict(model.grads))
    for a, b in zip(runs["threads"][:3], runs["processes"][:3]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
    for k, v in runs["threads"][3].items():
        np.testing.assert_allclose(runs["processes"][3][k], v, rtol=0, atol=1e-12, err_msg=k)
    expect = {"all": {True}, "some": {True, False}, "none": {False}}[room]
    assert set(placed) == expect
    assert set(replied) == expect  # placed by the worker, or left for the pipe


def test_a_replys_arrays_are_the_callers_own(two_threads, monkeypatch):
    """A worker's reply comes back through its inbox, which the next reply overwrites: what the
    caller got from one forward must not change with the next. ViLT's attention maps are the
    case that shows it: they are joined only when read (``sharding.JoinedList``), so the
    worker's part is held as it came, here read only after another forward."""
    monkeypatch.setattr(shard_workers._Inbox, "MIN_BYTES", 0)
    model, ids, mask, img, rng = _vilt_and_inputs(5)
    sharding.set_mode("threads")
    want = np.array(model.forward(ids, mask, img, train=True)["attn"][0])
    sharding.set_mode("processes")
    first = model.forward(ids, mask, img, train=True)
    assert isinstance(model._cache.shards[-1], shard_workers.RemoteShard)
    model.forward(ids[::-1].copy(), mask[::-1].copy(), -img, train=True)  # other values
    np.testing.assert_allclose(first["attn"][0], want, rtol=0, atol=1e-12)


def test_the_inbox_round_trips_what_it_takes_and_leaves_the_rest(monkeypatch):
    """pack then unpack (one process: the mapping is the same memory) gives back equal arrays
    for every layout and dtype it takes, and leaves other containers and array subclasses to
    the pipe untouched."""
    from collections import namedtuple

    monkeypatch.setattr(shard_workers._Inbox, "MIN_BYTES", 1)
    inbox = shard_workers._Inbox()
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 5))
    pair = namedtuple("Pair", "x y")(a, 1)
    masked = np.ma.masked_array(a, a > 0)
    value = {
        "c": a,
        "reversed": a[::-1, ::-2],  # negative strides
        "fortran": np.asfortranarray(a),
        "bool": a > 0,
        "int": rng.integers(0, 9, (3, 4)),
        "big-endian": a.astype(">f4"),
        "structured": np.zeros(3, dtype=[("i", "<i4"), ("f", "<f8")]),
        "empty": np.zeros((0, 3)),
        "list": [a, (a[0], None)],
        "pair": pair,
        "masked": masked,
    }
    packed = inbox.pack(value, "forward")
    placed = shard_workers._Placed
    assert isinstance(packed["c"], placed) and isinstance(packed["list"][1][0], placed)
    assert packed["pair"] is pair and packed["masked"] is masked  # left for the pipe
    assert packed["empty"] is value["empty"]  # nothing to place
    got = inbox.unpack(packed)
    for k in ("c", "reversed", "fortran", "bool", "int", "big-endian", "structured"):
        assert got[k].dtype == value[k].dtype, k
        np.testing.assert_array_equal(got[k], value[k], err_msg=k)
    np.testing.assert_array_equal(got["list"][1][0], a[0])
    assert got["list"][1][1] is None and type(got["list"][1]) is tuple


def test_a_workers_error_is_raised_here_and_the_worker_serves_on(two_threads, monkeypatch):
    model = _vit()
    x, y = _inputs(4)
    real = ops.patch_embed_forward

    def fails_on_the_marker(images, *a, **k):
        if (images[:, 0, 0, 0] == 12345.0).any():
            raise ValueError("the marked sample")
        return real(images, *a, **k)

    monkeypatch.setattr(ops, "patch_embed_forward", fails_on_the_marker)  # before the fork
    sharding.set_mode("processes")
    bad = x.copy()
    bad[3, 0, 0, 0] = 12345.0  # in the second shard: the worker's
    with pytest.raises(ValueError, match="the marked sample") as info:
        model.forward(bad, train=True)
    assert any("shard worker process" in n for n in getattr(info.value, "__notes__", []))
    with pytest.raises(RuntimeError, match="no cached forward|backward"):
        model.backward(np.ones((4, 5)))
    pid = _pids(model)
    sharding.set_mode("threads")
    ref = _step(model, x, y)
    sharding.set_mode("processes")
    _assert_same(_step(model, x, y), ref)
    assert _pids(model) == pid  # the same worker, still serving


def test_an_interrupted_call_stops_the_workers_and_the_next_forks_new_ones(
    two_threads, monkeypatch
):
    model = _vit()
    x, y = _inputs(4)
    sharding.set_mode("processes")
    ref = _step(model, x, y)
    pid = _pids(model)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_workers.RemoteShard, "finish_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.forward(x, train=True)
    monkeypatch.undo()
    with pytest.raises(ProcessLookupError):
        os.kill(pid[0], 0)  # stopped and reaped
    _assert_same(_step(model, x, y), ref)
    assert _pids(model) != pid


def test_workers_end_with_their_model(two_threads):
    model = _vit()
    x, y = _inputs(4)
    sharding.set_mode("processes")
    _step(model, x, y)
    (pid,) = _pids(model)
    del model
    gc.collect()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_set_mode_checks_its_value(two_threads):
    with pytest.raises(ValueError, match="threads, processes, off"):
        sharding.set_mode("gpu")
    sharding.set_mode("threads")
    assert sharding.set_mode("off") == "threads" and not sharding.enabled()
    assert sharding.set_mode("off") in sharding.MODES and not sharding.enabled()
    sharding.set_enabled(True)
    assert sharding.mode() == "threads"


def test_attention_maps_are_read_from_the_workers_shard(two_threads):
    model = _vit()
    x, _ = _inputs(5)
    maps = {}
    for mode in ("threads", "processes"):
        sharding.set_mode(mode)
        model.forward(x, train=True)
        maps[mode] = model.cached_attention()
    assert len(maps["processes"]) == 2 and maps["processes"][0].shape == (5, 2, 5, 5)
    for a, b in zip(maps["threads"], maps["processes"]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)


def test_a_worker_killed_between_steps_is_replaced(two_threads, monkeypatch):
    """A death that has happened by the next call is seen by workers_for, which forks a new
    worker before any request: the forward is sent once, not retried (the retry is for deaths
    it cannot see yet: the next test)."""
    import signal

    model = _vit()
    x, y = _inputs(4)
    sharding.set_mode("processes")
    ref = _step(model, x, y)
    (pid,) = _pids(model)
    os.kill(pid, signal.SIGKILL)
    _wait_until_dead(pid)  # (a zombie: dead, not yet reaped)
    sent = []
    start = shard_workers.RemoteShard.start_forward
    monkeypatch.setattr(
        shard_workers.RemoteShard,
        "start_forward",
        lambda self, *a: sent.append(self.worker.pid) or start(self, *a),
    )
    _assert_same(_step(model, x, y), ref)  # a new worker, no error
    assert len(sent) == 1 and sent[0] != pid  # to the new worker, once
    assert _pids(model) != [pid]
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left


def _wait_until_dead(pid, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # a zombie whose threads have all ended: waitpid can reap it
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().split(") ")[-1].startswith("Z")
            if zombie and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return
        except FileNotFoundError:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not die")


@pytest.mark.parametrize("deaths", [1, 2])
def test_a_worker_found_dead_at_a_forward_is_replaced_once(two_threads, monkeypatch, deaths):
    """A worker that dies after the check for live workers, before its request (its death not
    yet visible): the forward runs again on a new worker and gives the same result. If the new
    one dies too, the error is raised, and the next call still works."""
    import signal

    model = _vit()
    x, y = _inputs(4)
    sharding.set_mode("processes")
    ref = _step(model, x, y)
    real = shard_workers.RemoteShard.start_forward
    killed = []

    def dies_first(self, *a):  # between the check for a live worker and the request
        if len(killed) < deaths:
            killed.append(self.worker.pid)
            os.kill(self.worker.pid, signal.SIGKILL)
            _wait_until_dead(self.worker.pid)
        real(self, *a)

    monkeypatch.setattr(shard_workers.RemoteShard, "start_forward", dies_first)
    if deaths == 1:
        _assert_same(_step(model, x, y), ref)  # retried on a new worker
    else:
        with pytest.raises(shard_workers.WorkerLost, match="worker process .* (died|is gone)"):
            model.forward(x, train=True)
    assert len(killed) == deaths
    monkeypatch.undo()
    _assert_same(_step(model, x, y), ref)
    assert _pids(model)[0] not in killed
    for pid in killed:  # every dead worker reaped
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_a_worker_lost_before_its_backward_is_raised(two_threads):
    """The cache of a worker's shard dies with it: its backward cannot be retried."""
    import signal

    model = _vit()
    x, y = _inputs(4)
    sharding.set_mode("processes")
    ref = _step(model, x, y)
    logits = model.forward(x, train=True)
    (pid,) = _pids(model)
    os.kill(pid, signal.SIGKILL)
    _wait_until_dead(pid)
    _, cache = ops.cross_entropy_forward(logits, y)
    (dl,) = ops.cross_entropy_backward(np.asarray(1.0), cache)
    with pytest.raises(shard_workers.WorkerLost):
        model.backward(dl, input_grad=True)
    _assert_same(_step(model, x, y), ref)  # the next step forks anew
    # a query that meets the dead worker first: the backward after it says the same, and what
    # to do (it was a bare "has been stopped")
    logits = model.forward(x, train=True)
    (pid,) = _pids(model)
    os.kill(pid, signal.SIGKILL)
    _wait_until_dead(pid)
    with pytest.raises(shard_workers.WorkerLost):
        model.cached_attention()
    with pytest.raises(shard_workers.WorkerLost, match="run the forward again"):
        model.backward(dl, input_grad=True)
    _assert_same(_step(model, x, y), ref)


@pytest.mark.parametrize("where", ["after the request", "reading a query"])
def test_no_reply_is_ever_read_out_of_step(two_threads, monkeypatch, where):
    """An interruption with a request outstanding stops the worker: its late reply must never
    be taken for the next request's (stale logits, or attention maps as logits). Two guards
    make sure of it together, the stop of a worker whose request was under way and the
    sequence number each reply repeats; this test fails only when both are gone."""
    from multiprocessing.connection import Connection

    model = _vit()
    x, y = _inputs(4)
    other = x[::-1].copy()
    sharding.set_mode("threads")
    with ops.no_grad():
        want = model.forward(other)
    sharding.set_mode("processes")
    _step(model, x, y)
    if where == "after the request":
        real = shard_workers.RemoteShard.start_forward

        def interrupted(self, *a):
            real(self, *a)
            raise KeyboardInterrupt

        monkeypatch.setattr(shard_workers.RemoteShard, "start_forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            model.forward(x, train=True)
    else:
        model.forward(x, train=True)
        real_recv = Connection.recv

        def interrupted_recv(self):
            monkeypatch.setattr(Connection, "recv", real_recv)
            raise KeyboardInterrupt

        monkeypatch.setattr(Connection, "recv", interrupted_recv)
        with pytest.raises(KeyboardInterrupt):
            model.cached_attention()
    monkeypatch.undo()
    with ops.no_grad():
        got = model.forward(other)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_a_reply_out_of_step_is_refused(two_threads):
    """The sequence-number guard on its own (the test above needs both guards gone to fail): a
    reply whose number is not the one due is never taken; the worker is stopped instead."""
    model = _vit()
    x, y = _inputs(4)
    sharding.set_mode("processes")
    _step(model, x, y)
    (worker,) = shard_workers.workers_for(model, 1)
    worker.send("query", "no such method")  # any request: its reply carries its number
    worker.seq += 1  # the parent now waits for a later request's reply
    with pytest.raises(shard_workers.WorkerLost, match=r"answered request \d+ where \d+ was due"):
        worker.receive()
    assert not worker.alive


def test_using_restores_the_setting_exactly(two_threads):
    sharding.set_mode("processes")
    sharding.set_mode("off")
    with sharding.using("threads"):
        assert sharding.mode() == "threads"
    assert sharding.mode() == "off"
    sharding.set_enabled(True)
    assert sharding.mode() == "processes"  # where they ran before "off"


def test_worker_errors_come_back_as_names_and_text():
    """A worker's error travels as its class name and message (never a pickled object): a
    built-in class is raised as itself, any other as a RuntimeError that names it."""
    exc = shard_workers._rebuilt("KeyError", "'head.weight'", "raised in the worker")
    assert type(exc) is KeyError and exc.__notes__ == ["raised in the worker"]
    exc = shard_workers._rebuilt("CheckpointError", "no such file", "n")
    assert type(exc) is RuntimeError and str(exc) == "CheckpointError: no such file"
    exc = shard_workers._rebuilt("SystemExit", "3", "n")  # not an Exception: never raised as one
    assert type(exc) is RuntimeError
    # a class outside builtins comes back as its first built-in base, the message naming it
    from numpy.exceptions import AxisError

    base = shard_workers._builtin_base(AxisError)
    exc = shard_workers._rebuilt("AxisError", "axis 3 is out of bounds", "n", base)
    assert base == "ValueError" and type(exc) is ValueError
    assert str(exc) == "AxisError: axis 3 is out of bounds"
    assert shard_workers._builtin_base(type("MyError", (Exception,), {})) is None
    # a built-in class that a message alone cannot make: a RuntimeError, not a TypeError here
    exc = shard_workers._rebuilt("UnicodeDecodeError", "'utf-8' codec can't decode", "n")
    assert type(exc) is RuntimeError and "UnicodeDecodeError" in str(exc)
