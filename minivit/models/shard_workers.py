"""Batch shards in worker processes: the shards of ``sharding.py`` without a shared GIL.

``MINIVIT_SHARD=processes`` (or ``sharding.set_mode("processes")``) runs every shard but the
first in a worker process of its own; the first runs in the calling thread, as before. Why:
with threads, each NumPy call gives up the GIL for its loop and must take it back afterwards,
and with two threads it often waits for the other one to finish running Python. On the 2-core
AVX2 host that cost the ViT-Ti/16 batch-8 train step a few percent (measured by
benchmarks/shard_contention.py; figures in benchmarks/README.md). A process has an interpreter
of its own, so its shard never waits. ``minivit train vit`` and ``train hybrid`` use this mode
by default on Linux (``--shards``); they train the same weights as thread shards, bit for bit.

How, for one model:

- **Workers** are forked (``os.fork``) the first time the model runs sharded in this mode, one
  per extra shard, and live until the model is garbage-collected or the interpreter exits.
  A fork copies the whole process, so a worker starts with a replica of the model: the same
  class, configuration and attributes. If any of those change later (a plain attribute such as
  ``max_image_len``, the parameter names or shapes), the next sharded call stops the workers
  and forks new ones.
- **Parameters** live in memory that the parent and its workers all map (an anonymous shared
  mapping made before the fork). Before every sharded forward the parent copies the model's
  current parameters into it, so an optimizer step, a loaded checkpoint or a parameter
  replaced by assignment all reach the workers. The copy costs a pass over the parameters (23
  MB for ViT-Ti), made on the pool's threads while the workers wait. Nothing of the caller's
  is rebound.
- **Inputs and outputs** of a shard: its large input arrays (a shard's images, a large
  gradient sent to its backward) are copied into the worker's *inbox*, a shared mapping with
  a region for forward requests, one for backward requests and one for replies
  (:class:`_Inbox`). The large arrays of a reply (a ViLT's features and attention maps, an
  input gradient) come back through the reply region, copied out as they arrive. The rest of
  a request or a reply goes over a pipe between this process and its own forked child,
  pickled (no outside data passes there). A worker's error
  comes back as its class name and message, never as a pickled exception; the **parameter
  gradients** come back through a second shared mapping per worker and are summed as the
  threads' are.
- **The cache** of a worker's shard stays in the worker, between its forward and backward; the
  parent's ``ShardedRun`` holds a :class:`RemoteShard` in its place.
- **Errors**: an exception in a worker is sent back and raised in the caller, with the
  worker's traceback added as a note; the worker keeps serving. Requests and replies carry
  sequence numbers. If the caller is interrupted while a request is outstanding (Ctrl-C), or a
  worker dies, that worker is stopped and reaped at once and never asked again, so no late
  reply is ever taken for another request's. A forward that finds a worker dead (it died
  since the last call, before its death could be seen) runs once more on new workers; a
  backward or a query fails (:class:`WorkerLost`, a RuntimeError: the shard's cache died
  with the worker), and the model's next sharded call forks new workers. Workers ignore
  Ctrl-C themselves (the parent decides); they end when the parent's end of their pipe
  closes, and on Linux the kernel kills them if the parent dies (when forked from the main
  thread).

- **Memory**: a worker is a fork of the whole process. Every page the parent writes after the
  fork (the heap it reuses for activations, the parameters an optimizer updates) is copied for
  one side, so in a long run a worker comes to hold about what the parent held at the fork,
  besides its shard's own activations. Between steps it keeps only its last forward's cache.

Only NumPy models run sharded at all (``sharding.shard_bounds``), and this mode needs
``os.fork``. It is meant for Linux: on macOS, system libraries that NumPy may use (Accelerate,
the Objective-C runtime) are not safe in a child forked from a threaded process, so the
training commands default to it on Linux only. On Linux too, a fork while another thread of
the program is inside OpenBLAS can hang in OpenBLAS's fork handler (seen with a background
thread multiplying matrices): such a program should use thread shards. Results are those of
thread shards, to the same rounding: each shard runs the same code on the same samples (a
parameter changed in place between a forward and its backward aside: the workers read the
copy made at the forward, the first shard the live array).
"""

from __future__ import annotations

import atexit
import builtins
import copy
import ctypes
import mmap
import os
import signal
import time
import traceback
import warnings
import weakref

from .. import _parallel
from ..backend import get_backend

__all__ = ["available", "register", "RemoteShard", "WorkerLost", "workers_for", "stop_all"]

# the undecorated forward and backward methods, by name: a worker is told which one to run
# (a decorated method's function cannot be pickled by reference: the class holds the wrapper)
_METHODS: dict = {}

# id(model) -> _Pool, for the models that have workers
_POOLS: dict = {}


def available() -> bool:
    """Whether worker processes can be made here (``os.fork`` exists)."""
    return hasattr(os, "fork")


def register(method) -> str:
    """Record an undecorated model method under a name a worker can look up; returns it."""
    key = f"{method.__module__}.{method.__qualname__}"
    _METHODS[key] = method
    return key


def _np():
    # host memory only: the workers serve NumPy models (sharding.shard_bounds)
    return get_backend("numpy").xp


def _view(buffer, shape, dtype, offset=0):
    """The array of ``shape`` and ``dtype`` lying in ``buffer`` from byte ``offset``."""
    np = _np()
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(buffer, dtype, count, offset).reshape(shape)


def _shared(shape, dtype):
    """A zeroed array in an anonymous shared mapping (seen by processes forked afterwards)."""
    np = _np()
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return _view(mmap.mmap(-1, max(nbytes, 1)), shape, dtype)


def _fingerprint(model):
    """What a worker's replica must agree with: the class, the parameter names, shapes and
    dtypes, and every plain public attribute (the configuration among them)."""
    plain = (bool, int, float, str, type(None))
    attrs = tuple(
        sorted(
            (k, v)
            for k, v in vars(model).items()
            if not k.startswith("_")
            and (
                isinstance(v, plain)
                or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v))
            )
        )
    )
    params = tuple((k, v.shape, v.dtype) for k, v in model.params.items())  # (not str(dtype):
    # slow, and this runs before every sharded forward)
    return (type(model), params, attrs)


def _die_with_parent():
    """Linux: have the kernel kill this process when its parent exits (prctl PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's end-of-file still stops it
        pass


class WorkerLost(RuntimeError):
    """A shard worker died, or its pipe broke or fell out of step: it has been stopped and
    reaped, and the model's next sharded call forks a new one. A sharded forward that meets one
    runs once more on new workers; a backward or a query cannot (the shard's cache was in the
    worker), and raises it."""


class _Worker:
    """One forked process serving one shard of one model.

    Every request carries a sequence number that its reply repeats. Any failure to hand a
    request over or to read its reply in full (the worker died, the pipe broke, this process
    was interrupted mid-way) stops the worker at once: the pipe may hold half a message or a
    reply to a request nobody waits for any more, so the worker is never asked again. The
    model's next sharded call forks a new one.
    """

    STOP_TIMEOUT_S = 5.0

    def __init__(self, model, slots, pool_conns):
        import multiprocessing
        import threading

        self.grads = {k: _shared(v.shape, v.dtype) for k, v in slots.items()}
        self.inbox = _Inbox()
        self.conn, child = multiprocessing.Pipe()
        # PR_SET_PDEATHSIG fires when the forking *thread* ends: only the main thread's end is
        # the process's; from another thread the pipe's end-of-file alone stops the worker
        pdeathsig = threading.current_thread() is threading.main_thread()
        with warnings.catch_warnings():  # Python 3.12 warns about forking a threaded process:
            warnings.simplefilter("ignore", DeprecationWarning)  # the child uses no thread
            pid = os.fork()
        if pid == 0:  # the worker: serve, then leave without running the parent's exit hooks
            code = 0
            try:
                self.conn.close()
                for c in pool_conns:  # the parent's ends of the other workers' pipes
                    c.close()
                _serve(model, child, slots, self.grads, self.inbox, pdeathsig)
            except BaseException:  # noqa: BLE001 (a crash of the loop itself: say it, leave)
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self.alive = True  # may be asked
        self.reaped = False
        self.seq = 0

    def _dead(self, what):
        self.stop(kill=True)
        return WorkerLost(
            f"the shard worker process {self.pid} {what}; the model's workers are forked "
            "again at its next sharded call"
        )

    def send(self, *msg):
        if not self.alive:  # lost before (a query met it dead), or stopped with its pool
            raise WorkerLost(
                f"the shard worker process {self.pid} was stopped earlier, and the cache of the "
                "forward it served went with it: run the forward again"
            )
        self.seq += 1
        try:
            self.conn.send((self.seq, *msg))
        except OSError:
            raise self._dead("is gone (its pipe is closed)") from None
        except BaseException:  # interrupted mid-message: the pipe may hold half of it
            self.stop(kill=True)
            raise

    def receive(self):
        """The reply to the last request: its value, or the worker's exception raised here."""
        try:
            seq, kind, value, text = self.conn.recv()
        except (EOFError, OSError):
            raise self._dead("died") from None
        except BaseException:  # interrupted: the reply stays unread, out of step from now on
            self.stop(kill=True)
            raise
        if seq != self.seq:
            raise self._dead(f"answered request {seq} where {self.seq} was due")
        if kind == "ok":
            return self.inbox.unpack(value, copy=True)  # before anything else is sent
        name, message, base = value
        raise _rebuilt(
            name, message, f"raised in the shard worker process {self.pid}:\n{text}", base
        )

    def poll_dead(self) -> bool:
        """Whether the process has ended (reaped here if so)."""
        if self.reaped:
            return True
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid = self.pid
        if pid:
            self.reaped, self.alive = True, False
        return self.reaped

    def stop(self, kill=False):
        """Stop the process (asked to, or killed) and reap it; waits at most STOP_TIMEOUT_S
        for a polite stop before killing."""
        if self.reaped:
            return
        polite = self.alive and not kill
        self.alive = False
        if polite:
            try:
                self.conn.send((self.seq + 1, "stop"))
            except OSError:
                pass
            deadline = time.monotonic() + self.STOP_TIMEOUT_S
            while not self.poll_dead() and time.monotonic() < deadline:
                time.sleep(0.005)
        if not self.reaped:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:  # already gone
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.reaped = True
        self.conn.close()


class _Placed:
    """Stands in a request for an array the parent placed in the worker's inbox, or in a reply
    for one the worker placed there."""

    __slots__ = ("region", "offset", "shape", "dtype")

    def __init__(self, region, offset, shape, dtype):
        self.region, self.offset, self.shape, self.dtype = region, offset, shape, dtype


class _Inbox:
    """A worker's inbox: a shared mapping, made before the fork, through which the large arrays
    of a request (a shard's images) and of a reply (a ViLT's features and attention maps, an
    input gradient) pass instead of through the pipe.

    Through the pipe, an array is pickled, written in pieces the other side must read in turn,
    and unpickled; a copy into shared memory takes a fraction of that time, and the worker reads
    a request's arrays where they lie (benchmarks/README.md has the figures). The regions:

    - ``forward`` and ``backward``, written by the parent: a forward's cache may keep views of
      its inputs until its backward has run, so the backward's arrays must not overwrite them.
      A region is written only while its worker is idle between requests (every request waits
      for its reply before the next is sent), and a forward's region only when the held
      forward, whose cache may view it, is about to be replaced.
    - ``reply``, written by the worker just before it answers, while the parent waits for that
      answer; the parent copies the arrays out as it receives them (:meth:`unpack` with
      ``copy=True``), before it sends anything else, so what it hands on never changes under
      its holder.

    Arrays below ``MIN_BYTES``, or past a region's room, go through the pipe as before. A placed
    array comes out C-ordered, in its own dtype (byte order included), and an array that a
    reply holds twice comes back as two copies: what pickling would keep (a Fortran order, one
    object for both) is not kept. The model outputs that pass here are neither. The mapping is
    address space: its pages take memory once written, and stay until the pool stops.
    """

    REGION_BYTES = 64 * 2**20  # forward, backward
    REPLY_BYTES = 256 * 2**20  # a ViLT-B/32's attention maps for 4 samples take 79 MB
    MIN_BYTES = 64 * 2**10
    ALIGN = 64  # bytes: a cache line

    def __init__(self):
        self.sizes = {"forward": self.REGION_BYTES, "backward": self.REGION_BYTES}
        self.sizes |= {"reply": self.REPLY_BYTES}
        self.bases, end = {}, 0
        for region, size in self.sizes.items():  # laid out one after the other
            self.bases[region], end = end, end + size
        self.buffer = mmap.mmap(-1, end)

    def pack(self, value, region):
        """``value`` (an array, or a plain dict / list / tuple of them) with its large NumPy
        arrays copied into ``region`` and replaced by :class:`_Placed` markers. Anything else
        (other containers, array subclasses, object arrays) is left to be pickled."""
        base, room = self.bases[region], self.sizes[region]
        used = [0]
        np = _np()

        def place(v):
            if type(v) is dict:
                return {k: place(x) for k, x in v.items()}
            if type(v) in (list, tuple):
                return type(v)(place(x) for x in v)
            if type(v) is not np.ndarray or v.nbytes < self.MIN_BYTES or v.dtype.hasobject:
                return v
            start = -(-used[0] // self.ALIGN) * self.ALIGN
            if start + v.nbytes > room:
                return v  # no room: through the pipe
            used[0] = start + v.nbytes
            np.copyto(_view(self.buffer, v.shape, v.dtype, base + start), v)
            return _Placed(region, start, v.shape, v.dtype)

        return place(value)

    def unpack(self, value, copy=False):
        """The inverse of :meth:`pack`: markers become views of the inbox (a request, in the
        worker), or with ``copy=True`` new arrays copied from it (a reply, in the parent)."""
        if type(value) is dict:
            return {k: self.unpack(x, copy) for k, x in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self.unpack(x, copy) for x in value)
        if not isinstance(value, _Placed):
            return value
        offset = self.bases[value.region] + value.offset
        view = _view(self.buffer, value.shape, value.dtype, offset)
        return view.copy() if copy else view


def _serve(model, conn, slots, grads, inbox, pdeathsig):
    """The worker's loop: run the forward and backward of its shard when asked."""
    from threadpoolctl import threadpool_limits

    from ..ops import set_grad_enabled

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if pdeathsig:
        _die_with_parent()
    # the parent's pool threads do not exist here; with one thread, a nested decorated call
    # runs whole (sharding.shard_bounds)
    _parallel.set_num_threads(1)
    limits = threadpool_limits(1)  # noqa: F841 (held for the process's life)
    replica = copy.copy(model)
    replica.params = dict(slots)  # views of the shared mapping the parent writes
    replica._cache = None
    replica.grads = {}
    shard = None
    while True:
        try:
            seq, kind, *args = conn.recv()
        except EOFError:  # the parent has gone
            return
        if kind == "stop":
            return
        try:
            if kind == "forward":
                key, part, keep = args
                part = inbox.unpack(part)
                shard = None  # the last forward's cache goes before this one builds its own
                shard = copy.copy(replica)
                shard.grads = {}
                with set_grad_enabled(keep):
                    out = _METHODS[key](shard, **part)
                if not keep:
                    shard = None
            elif kind == "query":  # read something off the held forward (its cache)
                (key,) = args
                if shard is None:
                    raise RuntimeError("this worker holds no forward to read")
                out = _METHODS[key](shard)
            elif kind == "backward":
                key, grad, options = args
                grad = inbox.unpack(grad)
                if shard is None:
                    raise RuntimeError("this worker holds no forward to run backward on")
                held, shard = shard, None  # the cache goes with the backward, as in-process
                result = _METHODS[key](held, grad, **options)
                for k, g in held.grads.items():
                    grads[k][...] = g
                out = (result, list(held.grads))
                del held, result  # the shard's gradients: not kept to the next step
            else:
                raise ValueError(f"unknown request {kind!r}")
            reply = (seq, "ok", inbox.pack(out, "reply"), "")
        except BaseException as exc:  # noqa: BLE001 (every failure goes back to the caller)
            shard = None
            what = (type(exc).__name__, str(exc), _builtin_base(type(exc)))
            reply = (seq, "error", what, traceback.format_exc())
        args = out = None
        conn.send(reply)
        reply = None


def _builtin_base(cls):
    """The name of the first built-in exception class among ``cls`` and its bases, short of
    Exception itself (NumPy's AxisError: ValueError), or None."""
    for c in cls.__mro__:
        if c in (Exception, BaseException):
            return None
        if getattr(builtins, c.__name__, None) is c:
            return c.__name__
    return None


def _rebuilt(name, message, note, base=None):
    """A worker's exception, raised here: the built-in exception class of that name (ValueError,
    TypeError, ...) with its message; else its first built-in base ``base``, the message naming
    the class; else a RuntimeError naming it. The worker's traceback goes in a note. The
    exception object itself never travels: it may not pickle, and unpickling it would run its
    class's code here. So an ``except ValueError`` catches the same errors as with thread
    shards."""
    cls = getattr(builtins, base or name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(message if cls.__name__ == name else f"{name}: {message}")
        except Exception:  # a class that takes more than a message (UnicodeDecodeError)
            exc = RuntimeError(f"{name}: {message}")
    else:
        exc = RuntimeError(f"{name}: {message}")
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10 has no add_note; keep the note where 3.11 keeps it (not printed there)
        exc.__notes__ = [note]
    return exc


class _Pool:
    """A model's workers and the shared parameter slots they read."""

    def __init__(self, model, n):
        self.fingerprint = _fingerprint(model)
        self.slots = {k: _shared(v.shape, v.dtype) for k, v in model.params.items()}
        self.sizes = {k: v.size for k, v in self.slots.items()}  # fixed: see the fingerprint
        self.workers = []
        try:
            for _ in range(n):
                self.workers.append(_Worker(model, self.slots, [w.conn for w in self.workers]))
        except BaseException:  # a fork or a mapping refused: reap the workers made so far
            self.stop(kill=True)
            raise

    def stop(self, kill=False):
        for w in self.workers:
            w.stop(kill)
        self.workers = []


def workers_for(model, n):
    """The model's ``n`` workers, forked now if it has none (or they no longer fit the model),
    with the model's current parameters copied into their shared slots."""
    pool = _POOLS.get(id(model))
    if pool is not None and (
        len(pool.workers) != n
        or any(not w.alive or w.poll_dead() for w in pool.workers)
        or pool.fingerprint != _fingerprint(model)
    ):
        pool.stop(kill=True)
        pool.finalizer.detach()
        pool = None
    if pool is None:
        pool = _Pool(model, n)
        _POOLS[id(model)] = pool
        pool.finalizer = weakref.finalize(model, _stop_pool, id(model))
    copyto, params = _np().copyto, model.params
    # on the pool's threads when large enough (_parallel.for_each_group): the workers wait for it
    _parallel.for_each_group(lambda k: copyto(pool.slots[k], params[k]), pool.sizes)
    return pool.workers


def _stop_pool(key):
    pool = _POOLS.pop(key, None)
    if pool is not None:
        pool.stop()


def stop_all():
    """Stop every model's workers (also run at interpreter exit)."""
    for key in list(_POOLS):
        _stop_pool(key)


atexit.register(stop_all)


class RemoteShard:
    """Stands in a ``ShardedRun`` for a shard whose forward ran in a worker: the worker holds
    its cache; ``grads`` is filled by its backward (views of the worker's shared mapping)."""

    def __init__(self, worker):
        self.worker = worker
        self.grads = {}
        self._cache = _HELD  # not None: for sharding._consumed, whole until the backward

    def start_forward(self, key, part, keep):
        self.worker.send("forward", key, self.worker.inbox.pack(part, "forward"), keep)

    def start_backward(self, key, grad, options):
        self._cache = None  # the worker frees it as its backward runs
        self.worker.send("backward", key, self.worker.inbox.pack(grad, "backward"), options)

    def finish_forward(self):
        return self.worker.receive()

    def query(self, key):
        """``fn(shard)`` in the worker, for the function registered under ``key``: what the
        parent would read off a local shard's cache (ViT's attention maps). An interruption
        stops the worker (``_Worker.receive``)."""
        if self._cache is None:
            raise RuntimeError("this shard's forward has been consumed by its backward")
        self.worker.send("query", key)
        return self.worker.receive()

    def finish_backward(self):
        out, keys = self.worker.receive()
        self.grads = {k: self.worker.grads[k] for k in keys}
        return out


_HELD = object()  # a RemoteShard's cache while its worker holds the real one
