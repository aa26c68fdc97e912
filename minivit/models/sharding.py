"""Batch shards: a model's forward and backward on the CPU as independent pieces of the batch.

Nothing in a ViT couples the samples of a batch: every token of image i is computed from image i
alone, in the forward and in the backward. Only the parameter gradients are sums over the
batch. So with T threads a batch can be cut into T shards of consecutive samples, each shard
run through the plain, single-threaded forward and backward on its own thread, and the
parameter gradients of the shards added up at the end. That is data parallelism with the
threads of one process, and on NumPy it is the fastest way found here to use a few cores:

- one hand-over to the pool per forward and two per backward (the shards, then the sum of
  their gradients), instead of one per op (about 200 for a ViT-Ti step, each costing a worker
  wake-up and a wait for the slower thread);
- every thread runs everything, including the small serial glue between the ops;
- each thread works on a few images, whose activations stay in its own cache.

Measured on 2 cores (benchmarks/README.md): the ViT-Ti/16 batch-8 train step took 465-500 ms
with the per-op pool and 420-450 ms with shards, in the same hour; each shard's thread is busy
about 95% of the step.

The outputs and gradients are the same as without shards, to rounding: the batch sums of the
parameter gradients are taken per shard, then over the shards, and a shard's smaller arrays
may take another (equally exact) code path of an op. So float32 results depend on the thread
count at the level of rounding (the per-op pool's blocked sums already did). Shards are used
only when they give the same result and pay: on NumPy, with more than one pool thread
(``MINIVIT_NUM_THREADS``) and at least one sample per thread (a smaller batch keeps the per-op
pool, which uses every thread), not inside another parallel block, and not when the forward
draws random numbers (dropout or stochastic depth in training, ViLT's patch sampling: each
shard would need its own stream). ``MINIVIT_SHARD=0`` turns them off.

Memory: every shard holds a full set of parameter gradients until they are summed (T copies
instead of one, for the length of the sum), the price of data parallelism; after the sum only
the total is kept.

How: a shard is a shallow copy of the model (``copy.copy``) that shares the parameter arrays
and keeps its own cache and gradients. After a sharded forward the model's ``_cache`` is a
:class:`ShardedRun`; ``backward`` sees it and runs the shards' backward the same way. The shards
run in the gradient mode of the thread that called the forward (``ops.no_grad()`` is per
thread). Under ``no_grad()`` the decorated forward keeps no cache, whole or sharded: a model's
forward just stores its cache, and the decorator drops it.

Threads or processes: with threads, every NumPy call of a shard gives up the GIL for its loop
and must take it back afterwards, which often means waiting for the other shard's Python
(a few percent of the ViT-Ti step on the 2-core AVX2 host: benchmarks/shard_contention.py,
figures in benchmarks/README.md). With
``MINIVIT_SHARD=processes`` (or :func:`set_mode`) the first shard runs in the calling thread and
every other one in a worker process forked for the model (``shard_workers.py``): same results,
no shared GIL, at the price of a fork per model and a copy of the parameters per forward.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import threading
from collections.abc import Mapping, Sequence

from .. import _parallel
from ..backend import Switch, _library_of
from ..ops import grad_enabled, set_grad_enabled
from . import shard_workers

__all__ = [
    "ShardedRun",
    "JoinedList",
    "shard_bounds",
    "sharded_forward",
    "sharded_backward",
    "sum_grads",
    "take",
    "join",
    "enabled",
    "set_enabled",
    "mode",
    "set_mode",
    "using",
    "env_mode",
    "shard_query",
    "on_each_shard",
    "output_spec",
    "check_output_grad",
    "run_whole",
    "whole",
    "MODES",
]

# where the shards after the first run: "threads" (this process) or "processes" (workers,
# minivit/models/shard_workers.py); MINIVIT_SHARD=processes chooses the second
_NAMED = {"threads": "threads", "thread": "threads", "process": "processes",
          "processes": "processes"}  # fmt: skip
_SWITCH = Switch("MINIVIT_SHARD", names=tuple(_NAMED))
_WHERE = {"value": _NAMED.get(_SWITCH.raw, "threads")}
MODES = ("threads", "processes", "off")


def env_mode() -> str | None:
    """The mode ``MINIVIT_SHARD`` names ("off", "threads" or "processes"), or None when it is
    unset or only says "on" ("1" and the like): then the caller may choose. The variable's own
    text decides, not what :func:`set_mode` or :func:`set_enabled` made of it since."""
    return "off" if _SWITCH.raw in Switch.OFF else _NAMED.get(_SWITCH.raw)


def enabled() -> bool:
    """Whether batch shards may be used (``MINIVIT_SHARD`` unset or not "0"), on threads or in
    processes (:func:`mode`)."""
    return _SWITCH.on


def set_enabled(flag: bool) -> bool:
    """Turn batch shards on or off; returns the previous setting (tests and benchmarks). On
    again, they run where they ran before (:func:`mode`)."""
    return _SWITCH.set(flag)


def mode() -> str:
    """ "threads", "processes" or "off": where the shards after the first run, if anywhere."""
    return _WHERE["value"] if _SWITCH.on else "off"


@contextlib.contextmanager
def using(value: str):
    """Run the body in shard mode ``value``, then restore the setting exactly as it was (on or
    off, and where the shards run when on)."""
    saved = (_SWITCH.on, _WHERE["value"])
    set_mode(value)
    try:
        yield
    finally:
        _SWITCH.on, _WHERE["value"] = saved


def set_mode(value: str) -> str:
    """Set :func:`mode`; returns the previous one. "processes" needs ``os.fork`` (Linux,
    macOS); see ``minivit/models/shard_workers.py`` for what it does and costs."""
    if value not in MODES:
        raise ValueError(f"the shard mode must be one of {', '.join(MODES)}, got {value!r}")
    if value == "processes" and not shard_workers.available():
        raise RuntimeError("shards in processes need os.fork, which this platform lacks")
    prev = mode()
    _SWITCH.set(value != "off")
    if value != "off":
        _WHERE["value"] = value
    return prev


# Set while a decorated forward runs whole on this thread: a decorated forward it calls (ViT's
# forward calls forward_features) then runs whole too, so one pass never mixes the two.
_whole = threading.local()


@contextlib.contextmanager
def whole():
    """Inside the block, every decorated forward on this thread runs whole, never in shards:
    one cache held by the model itself, none by worker processes (whose caches of a pending
    sharded forward, ``MINIVIT_SHARD=processes``, it leaves alone)."""
    _whole.depth = getattr(_whole, "depth", 0) + 1
    try:
        yield
    finally:
        _whole.depth -= 1


def run_whole(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` inside :func:`whole`."""
    with whole():
        return fn(*args, **kwargs)


class ShardedRun:
    """The cache of a sharded forward: the shard models (each holding its own cache) and the
    sample ranges ``bounds`` [(start, stop), ...] they ran on (plus what :func:`_record` notes
    on every cache)."""

    def __init__(self, shards, bounds):
        self.shards = shards
        self.bounds = bounds


def shard_bounds(model, batch_size: int, draws_random: bool):
    """[(start, stop), ...] cutting the batch into one shard per pool thread, or None when the
    forward should run whole (see the module docstring for the rules). ``draws_random``: the
    forward about to run draws random numbers (``Model.forward_draws_random``)."""
    n = _parallel.get_num_threads()
    if (
        n < 2
        or batch_size < n  # fewer samples than threads: the per-op pool uses every thread
        or draws_random
        or not _SWITCH.on
        or model.backend.name != "numpy"
        or _parallel.in_block()
        or getattr(_whole, "depth", 0)  # inside a forward that runs whole
    ):
        return None
    cuts = [batch_size * i // n for i in range(n + 1)]  # near-equal, consecutive
    return list(zip(cuts[:-1], cuts[1:]))


def take(value, s, e):
    """The samples s:e of a batched value: an array (first axis), or a dict / list / tuple of
    them; None and non-arrays pass through."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: take(v, s, e) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(take(v, s, e) for v in value)
    if getattr(value, "ndim", 0) >= 1:
        return value[s:e]
    return value


def output_spec(out):
    """What a forward's output gradient must look like, recorded with its cache: the output's
    shape for an array output, or {key: shape} of the array values of a dict output (ViLT's).
    Shapes only: nothing is read from the arrays, and lists (ViLT's attention maps) are left
    out unread."""
    if isinstance(out, dict):
        return {k: tuple(v.shape) for k, v in out.items() if getattr(v, "ndim", None) is not None}
    shape = getattr(out, "shape", None)
    return None if shape is None else tuple(shape)


def _record(cache, method, out):
    """Note on a forward's cache what its backward checks first: the method that made it
    (``made_by``: backward undoes ``forward`` only) and the output's shape(s) (``out_spec``,
    :func:`output_spec`), which the gradient must have. Returns ``cache``."""
    cache.made_by = method.__name__
    cache.out_spec = output_spec(out)
    return cache


def _shape_error(name, shape, expected):
    ran = f", but the forward ran on {expected[0]} samples" if expected else ""
    return ValueError(
        f"{name} has shape {tuple(shape)}{ran}: the gradient must have the shape of its "
        f"output, {expected}"
    )


def check_output_grad(model, grad, spec):
    """Refuse a gradient that does not fit the forward's output (``spec``, :func:`output_spec`)
    before anything is computed, whether the forward ran whole or in shards: an array output
    needs an array of its shape; a dict output (a model whose ``output_grad_keys`` names the
    differentiable keys) needs a dict of some of those keys, each None or an array of the
    output's shape, on the model's backend. Shapes and types only, so it costs nothing beside
    the backward."""
    keys = model.output_grad_keys
    what = f"{type(model).__name__}.backward"
    on = (what, model.backend.name)
    if keys is None:
        _check_array_grad(
            "grad", grad, spec, f"{what} takes the gradient of the forward's output, an array", on
        )
        return
    listed = ", ".join(keys)
    if not isinstance(grad, Mapping):
        raise TypeError(
            f"{what} takes a dict of output gradients with any of the keys {listed} (a missing "
            f"key counts as zero), got {type(grad).__name__}"
        )
    unknown = [k for k in grad if k not in keys]
    if unknown:
        raise ValueError(
            f"{what} takes gradients for {listed} only (a missing key counts as zero), got "
            f"{', '.join(repr(k) for k in unknown)}"
        )
    for k, g in grad.items():
        if g is not None:
            name = f"grad[{k!r}]"
            expected = None if spec is None else spec.get(k)
            _check_array_grad(name, g, expected, f"{name} must be None or an array", on)


def _check_array_grad(name, g, expected, must, on):
    """One array gradient: an array (``must`` says what was wanted) of shape ``expected``
    (None: any), of the backend ``on = (what, backend name)`` names."""
    if getattr(g, "shape", None) is None or getattr(g, "dtype", None) is None:
        raise TypeError(
            must
            + (f" of shape {expected}" if expected is not None else "")
            + f", got {type(g).__name__}"
        )
    what, backend = on
    library = _library_of(g)
    if library is not None and library != backend:
        raise TypeError(
            f"{what}: {name} is a {library} array but the model runs on {backend}; move it "
            "there first (model.backend.asarray)"
        )
    if expected is not None and tuple(g.shape) != expected:
        raise _shape_error(name, g.shape, expected)


def _cast(value, dtype):
    """A batched value (an array, or a dict / list / tuple of them) with its arrays in dtype."""
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if hasattr(value, "astype") and getattr(value, "dtype", None) is not None:
        return value.astype(dtype, copy=False)
    return value


def join(xp, parts):
    """The inverse of :func:`take`: the shards' outputs joined along the batch axis. A list of
    arrays (ViLT's per-block attention maps) becomes a :class:`JoinedList`, joined on access."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: join(xp, [p[k] for p in parts]) for k in first}
    if isinstance(first, list) and first and getattr(first[0], "ndim", 0) >= 1:
        return JoinedList(xp, parts)
    if isinstance(first, (list, tuple)):
        return type(first)(join(xp, list(col)) for col in zip(*parts))
    if getattr(first, "ndim", 0) >= 1:
        return xp.concatenate(parts, axis=0)
    return first


class JoinedList(Sequence):
    """A list of batched arrays whose shards are joined when an item is first read.

    ViLT returns every block's attention maps; joining them all after each sharded forward
    would copy depth x B x H x N^2 values that training never reads. Indexing, slicing,
    ``len``, iteration and ``+`` behave as on the joined list; ``list(joined)`` makes a plain
    one, and pickling or copying one gives a plain list.
    """

    def __init__(self, xp, parts):
        self._xp = xp
        self._parts = parts  # one list per shard, items in the same order
        self._joined = {}

    def __len__(self):
        return len(self._parts[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        if i not in self._joined:
            self._joined[i] = join(self._xp, [p[i] for p in self._parts])
        return self._joined[i]

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __reduce__(self):  # pickle / copy as the plain list it stands for
        return (list, (list(self),))

    def __repr__(self):
        return f"JoinedList({len(self)} items, {len(self._parts)} shards)"


def _run(calls):
    """Run the calls (no arguments) with :func:`minivit._parallel.run_tasks`, BLAS on one
    thread per task; returns their results in order."""
    results = [None] * len(calls)

    def task(i):
        def run():
            results[i] = calls[i]()

        return run

    with _parallel.blas_single_threaded():
        _parallel.run_tasks(task(i) for i in range(len(calls)))
    return results


def _run_beside_workers(local, remotes, start, finish):
    """Shard 0 here (``local()``), the others in their workers: ``remotes`` pairs each
    :class:`shard_workers.RemoteShard` with its samples (start, stop); ``start(remote, s, e)``
    sends one its request and ``finish(remote)`` takes its reply. Returns the results in shard
    order, or raises the first failure once every worker has answered. If this process is
    interrupted (or its own shard fails) while workers compute, they are stopped: their replies
    would be out of step with the next request (the next call forks new ones)."""
    started = []
    try:
        for r, (s, e) in remotes:
            started.append(r)  # before the send: one interrupted half-way is stopped too
            start(r, s, e)
        # the workers have the other cores: BLAS and the fast paths keep to this thread
        with _parallel.blas_single_threaded(), _parallel.inline():
            results = [local()]
    except BaseException:
        for r in started:
            r.worker.stop(kill=True)
        raise
    first_error = None
    for i, (r, _) in enumerate(remotes):
        try:
            results.append(finish(r))
        except Exception as exc:  # the worker's own error: it has answered, the others next
            first_error = first_error or exc
            results.append(None)
        except BaseException:  # interrupted while waiting: the rest may still be computing
            for other, _ in remotes[i:]:
                other.worker.stop(kill=True)
            raise
    if first_error is not None:
        raise first_error
    return results


def sharded_forward(batched, check=None):
    """Decorator of a model's forward: ``batched`` names the arguments that carry the batch
    (their first axis); all other arguments go to every shard unchanged. ``check(model, args)``
    (``args``: every argument by name) validates the inputs before they are cut, so that an
    error names the shapes the caller passed, not a shard's.

    The decorated method runs whole when :func:`shard_bounds` says so (as before: inside
    :func:`minivit._parallel.pool_only`), else once per shard on a shallow copy of the model,
    and returns the shards' outputs joined along the batch axis.

    The method must call ``self._drop_cache()`` once its inputs have passed its checks, before
    it computes anything: the last forward's cache goes then (never beside the new one), and a
    refused call leaves it usable. Before the shards run, the decorator does the same after
    ``check``.
    """

    def decorate(method):
        signature = inspect.signature(method)
        whole = _parallel.pool_only()(method)
        key = shard_workers.register(method)

        @functools.wraps(method)
        def forward(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            named = dict(list(bound.arguments.items())[1:])  # without self
            shape = getattr(named[batched[0]], "shape", ())
            bounds = None
            if len(shape) >= 1:  # not an array: the whole forward's own checks say so
                bounds = shard_bounds(self, shape[0], self.forward_draws_random(named))
            if bounds is None:  # the method checks its inputs, then drops the last cache itself
                try:
                    out = run_whole(whole, self, *args, **kwargs)
                except BaseException:
                    if self._cache is None and self._no_cache == "dropped":  # past its checks
                        self._drop_cache("forward_failed")
                    raise
                if not grad_enabled():  # inference: the method's cache is not kept
                    self._drop_cache("no_grad")
                elif self._cache is not None:
                    _record(self._cache, method, out)
                return out
            if check is not None:  # before the cut, so that errors name the caller's shapes
                check(self, named)
            # The last run's cache goes before this run builds its own (once the inputs have
            # passed the checks): in a training loop the two would otherwise be alive together,
            # twice the activations at the peak.
            self._drop_cache()
            shards = []
            for _ in bounds:
                shard = copy.copy(self)
                shard.grads = {}
                shards.append(shard)

            keep = grad_enabled()  # the shards run in the caller's gradient mode

            def part(s, e):  # the arguments of samples s:e
                return {k: take(v, s, e) if k in batched else v for k, v in named.items()}

            def call(shard, s, e):  # shard's forward on samples s:e, to run on a thread
                args = part(s, e)

                def run():
                    with set_grad_enabled(keep):
                        return method(shard, **args)

                return run

            try:
                if mode() == "processes":  # shard 0 here, the others in worker processes

                    def beside_workers():
                        workers = shard_workers.workers_for(self, len(bounds) - 1)
                        shards[1:] = [shard_workers.RemoteShard(w) for w in workers]
                        return _run_beside_workers(
                            call(shards[0], *bounds[0]),
                            list(zip(shards[1:], bounds[1:])),
                            lambda r, s, e: r.start_forward(key, part(s, e), keep),
                            lambda r: r.finish_forward(),
                        )

                    try:
                        outs = beside_workers()
                    except shard_workers.WorkerLost:
                        # A worker had died since the last call, unseen when the workers were
                        # checked. A forward can simply run again, on new workers: it draws no
                        # random numbers here (shard_bounds). A second loss is raised.
                        outs = None
                    if outs is None:  # (outside the handler: the first try's state is freed)
                        outs = beside_workers()
                else:
                    outs = _run([call(sh, s, e) for sh, (s, e) in zip(shards, bounds)])
            except BaseException:
                self._drop_cache("forward_failed")
                raise
            out = join(self.backend.xp, outs)
            if keep:
                self._cache = _record(ShardedRun(shards, bounds), method, out)
            else:
                self._drop_cache("no_grad")
            return out

        return forward

    return decorate


def sharded_backward(method):
    """Decorator of a model's backward(grad, **options): after a sharded forward, each shard
    runs its own backward on its samples of ``grad`` (an array or a dict of arrays), the
    parameter gradients are summed over the shards into ``self.grads`` and the input gradients
    (if any) are joined along the batch axis. After a whole forward it runs whole.

    Either way the gradient is first checked against the forward's output
    (:func:`check_output_grad`): the same error for the same mistake, whatever the thread count
    or batch size."""
    whole = _parallel.pool_only()(method)
    key = shard_workers.register(method)

    @functools.wraps(method)
    def backward(self, grad, **options):
        run = self._cache
        if run is None:
            raise self._no_cache_error("backward")
        # before anything is cut or computed: a refused gradient leaves the cache whole
        made_by = getattr(run, "made_by", "forward")
        if made_by != "forward":  # e.g. ViT's forward_features: not what backward undoes
            raise RuntimeError(
                f"backward goes back through forward(); the last forward was {made_by}(), "
                "whose output is not forward()'s: run forward() to train"
            )
        check_output_grad(self, grad, getattr(run, "out_spec", None))
        # in the model's dtype, as torch casts a gradient to its output's (a float64 ones for
        # a float32 model would otherwise make float64 gradients on some paths)
        grad = _cast(grad, self.dtype)
        # backward overwrites the gradients: the last ones go now, not after the new ones exist
        # (torch's optimizer.zero_grad(set_to_none=True) does the same for a step)
        self.grads = {}
        try:
            out = _backward(self, run, grad, options)
        except BaseException:
            # An error before the method began to free the cache (a refused gradient) leaves it
            # whole, ready for another try; one after leaves it incomplete, so it goes.
            if _consumed(run):
                self._drop_cache("backward_failed")
            raise
        self._drop_cache("consumed")  # with the shards' own caches, if any
        return out

    def _backward(self, run, grad, options):
        if not isinstance(run, ShardedRun):
            return whole(self, grad, **options)  # encoder_backward dropped the blocks' part

        def call(shard, s, e):  # shard's backward on samples s:e, to run on a thread
            return lambda: method(shard, take(grad, s, e), **options)

        if isinstance(run.shards[-1], shard_workers.RemoteShard):  # all but shard 0 are
            outs = _run_beside_workers(
                call(run.shards[0], *run.bounds[0]),
                list(zip(run.shards[1:], run.bounds[1:])),
                lambda r, s, e: r.start_backward(key, take(grad, s, e), options),
                lambda r: r.finish_backward(),
            )
        else:
            outs = _run([call(sh, s, e) for sh, (s, e) in zip(run.shards, run.bounds)])
        self.grads = sum_grads([sh.grads for sh in run.shards], list(self.params))
        for shard in run.shards:  # the total lives in self.grads; drop the per-shard copies
            shard.grads = {}
        return join(self.backend.xp, outs)

    return backward


def shard_query(fn):
    """Decorator of a function ``fn(shard_model)`` that reads a forward's cache (ViT's
    attention maps): registered, so that a worker process can run it on the shard it holds
    (``on_each_shard``). Apply it where the function is defined, at import."""
    fn._shard_key = shard_workers.register(fn)
    return fn


def on_each_shard(run, fn):
    """[fn(shard) for each shard of a ``ShardedRun``], in shard order; a shard held by a worker
    process runs it there (``fn`` decorated with :func:`shard_query`)."""
    return [
        sh.query(fn._shard_key) if isinstance(sh, shard_workers.RemoteShard) else fn(sh)
        for sh in run.shards
    ]


def _consumed(run) -> bool:
    """Whether a model's backward has begun to free this cache (a ``ShardedRun``: any shard's).
    A model's backward calls :func:`begin_consuming` on its cache just before the first part
    goes."""
    caches = [sh._cache for sh in run.shards] if isinstance(run, ShardedRun) else [run]
    return any(c is None or getattr(c, "consumed", False) for c in caches)


def begin_consuming(cache):
    """Mark a model's cache as being freed: from here on, an error in backward leaves it
    incomplete, and the model drops it (see ``sharded_backward``)."""
    cache.consumed = True


def sum_grads(parts, keys):
    """{key: sum of the parts' arrays}, in ``keys`` order, added in place into the first part's
    arrays (the shards' own gradients, which nothing else holds). The keys are split over the
    pool's threads in groups of about equal size when there are enough of them
    (``_parallel.for_each_group``)."""
    first = parts[0]
    seen = set()
    for k in keys:  # an array shared by two keys, or read-only, is copied before adding into
        a = first[k]
        if id(a) in seen or not a.flags.writeable:
            first[k] = a = a.copy()
        seen.add(id(a))

    def add(k):
        for p in parts[1:]:
            first[k] += p[k]

    _parallel.for_each_group(add, {k: first[k].size for k in keys})
    return {k: first[k] for k in keys}
