"""The blocking public API: ``Pool`` as in ``multiprocessing.pool``, across a cluster.

Structure follows CPython's ``multiprocessing/pool.py``: ``AsyncResult`` waits on a
``threading.Event``; ``IMapIterator`` on a condition. A job's input is fed by one
thread per job (it pickles chunks and blocks on the job's window, so a generator is
read lazily); for ``map`` the same thread collects the results. Results arrive in the
reactor thread (:mod:`achilles.controller`); every wait here has an optional timeout
and nothing here ever runs in the reactor thread.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

from achilles.config import cluster_configured, require_secret, resolve
from achilles.controller import ApplyHandle, Controller, JobHandle
from achilles.core.job import RAISED, Outcome, default_chunksize, window_for
from achilles.errors import (
    ChunkFailedError,
    ConnectionLostError,
    SerializationError,
    TimeoutError,
    rebuild_exc,
)
from achilles.local import LocalCluster
from achilles.net import reactor as _reactor
from achilles.protocol.messages import ERROR, OK
from achilles.serialization import (
    dumps_chunk,
    dumps_function,
    loads_chunk,
    loads_exception,
)

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
#: functions whose apply jobs a pool keeps open (the least recently used ends)
MAX_APPLY_JOBS = 8
_END = object()

_controllers: dict[tuple[Any, ...], Controller] = {}
#: guards ``_controllers`` and the controllers' ``users`` counts. Held only for those
#: few lines, never while waiting for the reactor thread (which may take it) and never
#: taken by a finaliser (which runs wherever the garbage collector does).
_controllers_lock = threading.Lock()


def _controller(settings: Any) -> Controller:
    """The connection to this cluster, shared by the pools that use it (counted)."""
    key = (settings.host, settings.port, settings.username, settings.secret_key,
           settings.tls_ca)
    with _controllers_lock:
        ctl = _controllers.get(key)
        if ctl is not None and ctl.fatal is None:
            ctl.users += 1
            return ctl
    made = _reactor.call_blocking(Controller, settings, _reactor.ensure_started())
    with _controllers_lock:
        ctl = _controllers.get(key)
        if ctl is None or ctl.fatal is not None:  # else another pool made one meanwhile
            ctl = _controllers[key] = made
        ctl.users += 1
    if ctl is not made:
        _reactor.call_soon(made.close)
    return ctl


def _release_controller(ctl: Controller) -> None:
    """A pool is done with the connection; the last one closes it (no reconnecting to a
    cluster nobody uses any more)."""
    with _controllers_lock:
        ctl.users -= 1
        if ctl.users > 0:
            return
        for key, value in list(_controllers.items()):
            if value is ctl:
                del _controllers[key]
    try:
        if _reactor.in_reactor_thread():
            ctl.close()
        else:
            _reactor.call_blocking(ctl.close, timeout=5)
    except Exception:  # closing is best effort: the server may be gone already
        pass


#: what a forked child inherited from its parent: kept, never used or collected (a
#: collected copy could write to the parent's connections or stop its workers)
_orphans: list[Any] = []


def _after_fork_in_child() -> None:
    global _controllers_lock
    _orphans.extend(_controllers.values())
    _controllers.clear()
    _controllers_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _item_bytes(iterable: Any, n: int) -> int:
    """The pickled size of a sequence's first item (0 if it cannot be told cheaply)."""
    if n == 0 or not hasattr(iterable, "__getitem__") or isinstance(iterable, dict):
        return 0
    try:
        first = iterable[0]
        if isinstance(first, (bytes, bytearray, str)):
            return len(first)
        if isinstance(first, (int, float, bool)) or first is None:
            return 0  # small: no cap
        return len(dumps_chunk([first]))
    except Exception:  # not indexable after all, or not picklable: found out later
        return 0


def _exception(outcome: Outcome) -> BaseException:
    """The exception a failed outcome stands for, with the remote traceback as cause."""
    if outcome.exc is not None:  # RAISED: by the input, in this process
        return outcome.exc
    if outcome.status == ERROR:
        exc, tb = loads_exception(outcome.payload)
        return rebuild_exc(exc, tb)
    detail = outcome.payload.decode("utf-8", "replace")
    where = f"chunk {outcome.seq} (arguments {outcome.start} to " \
            f"{outcome.start + outcome.count - 1})"
    if "time limit" in detail:
        return TimeoutError(f"{where} failed: {detail}")
    return ChunkFailedError(f"{where} failed: {detail}", outcome.seq, outcome.start,
                            outcome.start + outcome.count)


def _values(outcome: Outcome) -> list[Any]:
    if outcome.status != OK:
        raise _exception(outcome)
    return loads_chunk(outcome.payload)  # type: ignore[no-any-return]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(progress: Any, total: int | None) -> Any:
    """A tqdm bar when asked for, else a no-op: the widget bar in a notebook that has
    ipywidgets, the text bar elsewhere (and, quietly, in a notebook without them)."""
    if not progress:
        return _NoBar()
    options = {"total": total, "unit": "item", "smoothing": 0.1}
    if isinstance(progress, dict):
        options.update(progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto's "IProgress not found" and such
        try:
            from tqdm.auto import tqdm
            return tqdm(**options)
        except Exception:  # the widget bar cannot be shown here
            from tqdm.std import tqdm as text_tqdm
            return text_tqdm(**options)


class _Flag:
    """A one-shot ``threading.Event``: one lock, held until set. (An Event is a Condition
    and two locks, and its construction raises and catches three AttributeErrors: a
    measurable part of an ``apply``, which makes one per call.)"""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                self._lock.release()
            except RuntimeError:  # set twice at once: released already
                pass

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._lock.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._lock.release()  # let the next waiter through
        return self._set


class ApplyResult:
    """What ``*_async`` returns: ``get``, ``wait``, ``ready``, ``successful``."""

    def __init__(self, callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None,
                 pool: "Pool | None" = None) -> None:
        self._pool = pool  # kept alive until the result is in, as multiprocessing does
        self._event = _Flag()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None
        self._handle: Any = None
        self._seq = -1  # an apply call's sequence number in its job

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError(f"no result within {timeout} s")
        if self._success:
            return self._value
        raise self._value

    def _set(self, success: bool, value: Any) -> None:
        if self._event.is_set():
            return
        self._success, self._value = success, value
        try:
            if success and self._callback is not None:
                self._callback(value)
            elif not success and self._error_callback is not None:
                self._error_callback(value)
        finally:
            self._event.set()
            self._pool = None

    def __await__(self) -> Any:
        """``await result`` inside a running asyncio loop (a notebook)."""
        import asyncio
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self.get).__await__()


AsyncResult = ApplyResult
MapResult = ApplyResult


class IMapIterator:
    """What ``imap`` returns; ``imap_unordered`` returns the unordered kind.

    As multiprocessing's: a task that raised raises at its place (after the results
    before it), and the next ``next()`` goes on with the results after it."""

    def __init__(self, handle: JobHandle, pool: "Pool", bar: Any = None) -> None:
        self._handle = handle
        self._pool = pool
        self._bar = _NoBar() if bar is None else bar
        self._items: list[Any] = []
        self._errors: dict[int, BaseException] = {}  # position in _items -> its error
        self._pos = 0
        self._stop = 0  # the first error's position, or len(_items)
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        """A generator over the results: a ``for`` loop then pays a generator resumption
        per item rather than a method call. For a fast function the caller's own loop is
        what limits an imap (W5: two million items), and this halves our share of it."""
        return self._results()

    def _results(self) -> Iterator[Any]:
        counting = not isinstance(self._bar, _NoBar)
        while True:
            items, bar = self._items, self._bar
            pos, stop = self._pos, self._stop
            while pos < stop:
                item = items[pos]
                pos += 1
                self._pos = pos  # right at every yield: the loop may stop anywhere
                if counting:
                    bar.update(1)
                yield item
            try:
                self._wait_items(None)
            except StopIteration:
                return

    def next(self, timeout: float | None = None) -> Any:
        if self._pos >= self._stop:
            self._wait_items(timeout)
        item = self._items[self._pos]
        self._pos += 1
        self._bar.update(1)
        return item

    __next__ = next

    def _wait_items(self, timeout: float | None) -> None:
        """Until there are items to take; raises a task's error in its place, and
        StopIteration at the end."""
        while self._pos >= self._stop:
            exc = self._errors.pop(self._pos, None)
            if exc is not None:
                self._pos += 1
                self._stop = min(self._errors, default=len(self._items))
                raise exc
            if self._done:
                self._bar.close()
                raise StopIteration
            try:
                self._refill(timeout)
            except KeyboardInterrupt:  # Ctrl-C: stop the job on the cluster too
                self._finish(cancel=True)
                raise

    def _refill(self, timeout: float | None) -> None:
        handle = self._handle
        with handle.cond:
            while True:
                outs = handle.take(1)  # one chunk at a time: the window stays honest
                if outs or handle.core.finished():
                    break
                if handle.error is not None:  # the pool was terminated, or the cluster lost
                    self._finish(cancel=True)
                    raise handle.error
                if not handle.cond.wait(timeout):
                    raise TimeoutError(f"no result within {timeout} s")
            finished = handle.core.finished()
        items: list[Any] = []
        for out in outs:
            if out.status == OK:
                items.extend(loads_chunk(out.payload))
            else:
                self._errors[len(items)] = _exception(out)
                items.append(None)
        self._items, self._pos = items, 0
        self._stop = min(self._errors, default=len(items))
        if finished:
            self._finish(cancel=False)

    def _finish(self, cancel: bool) -> None:
        self._done = True
        if cancel:
            self._bar.close()
        self._pool._job_done(self._handle, cancel)

    def __del__(self) -> None:
        # An iterator dropped before its end: its job is cancelled (its input is read
        # lazily, so nothing else would ever finish it). Later, in the reactor thread: a
        # finaliser must not take locks (see _reactor.call_from_finalizer).
        if not getattr(self, "_done", True) and self._pool._pid == os.getpid():
            _reactor.call_from_finalizer(self._pool._job_done, self._handle, True)

    def __aiter__(self) -> "IMapIterator":
        return self

    def _next_or_end(self) -> Any:
        try:
            return self.next()
        except StopIteration:  # it cannot travel through an asyncio future
            return _END

    async def __anext__(self) -> Any:
        """``async for x in pool.imap(...)``: waits in a thread, not in the event loop."""
        import asyncio
        item = await asyncio.get_running_loop().run_in_executor(None, self._next_or_end)
        if item is _END:
            raise StopAsyncIteration
        return item


IMapUnorderedIterator = IMapIterator


class Pool:
    """A drop-in ``multiprocessing.Pool`` whose workers are every core of a cluster.

    With a cluster configured (arguments, ``ACHILLES_*`` environment, or ``.env``), it
    uses that cluster; otherwise it starts an embedded one on this machine with
    ``processes`` workers (default: every core), stopped by ``close``/``terminate``.

    Args:
        processes: local: worker count; cluster: the most of this pool's chunks that
            run at once (None: every slot of the cluster).
        initializer, initargs: run in each worker before its first task of a job.
        maxtasksperchild: a worker that has run this many of this pool's tasks (chunks)
            is replaced by a fresh one, as in multiprocessing (None: never).
        context: accepted for compatibility; nodes choose their own start method.
        host, port, username, secret_key: the cluster (else environment, .env).
        max_attempts: tries of a chunk whose worker or node dies before the job fails.
        task_timeout: seconds a chunk may run before its worker is killed (None: no limit).
        tls_ca: PEM CA file to verify a TLS server with (turns TLS on).
    """

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: Any = None, *, host: str | None = None, port: int | None = None,
                 username: str | None = None, secret_key: str | None = None,
                 max_attempts: int | None = None, task_timeout: float | None = None,
                 tls_ca: str | None = None) -> None:
        self._state = TERMINATE  # until constructed, __del__ has nothing to do
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (
                not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be a positive number of seconds or None")
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasks = maxtasksperchild
        self._id = os.urandom(8).hex()
        self._pid = os.getpid()  # a forked child's copy of this pool is not its to use
        self._local: LocalCluster | None = None
        explicit = dict(host=host, port=port, username=username, secret_key=secret_key)
        settings = resolve(**explicit, max_attempts=max_attempts, tls_ca=tls_ca)
        if cluster_configured(**explicit):
            require_secret(settings, "Pool")
            self._limit = processes or 0
        else:
            self._local = LocalCluster(processes or os.cpu_count() or 1, settings.max_attempts)
            settings = self._local.settings
            self._limit = 0
        self._processes_hint = processes
        self._settings = settings
        self._max_attempts = settings.max_attempts
        self._timeout = float(task_timeout or 0.0)
        self._jobs: set[JobHandle] = set()
        self._apply_jobs: OrderedDict[bytes, ApplyHandle] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._ctl_held: Controller | None = None
        try:
            self._ctl = self._ctl_held = _controller(settings)
            _reactor.call_blocking(self._ctl.when_ready, timeout=settings.reconnect_timeout)
        except BaseException:
            self._shutdown()
            raise
        self._state = RUN

    # -- helpers ----------------------------------------------------------------------
    @property
    def _processes(self) -> int:
        if self._local is not None:
            return self._settings.processes or 1
        slots = self._ctl.cluster.slots or 1
        return min(slots, self._limit) if self._limit else slots

    def _check_running(self) -> None:
        if self._pid != os.getpid():
            raise ValueError(f"this Pool belongs to process {self._pid}, which forked this "
                             "one; make a new Pool in this process")
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _function(self, func: Callable[..., Any], mode: str) -> bytes:
        return dumps_function(func, mode, self._initializer, self._initargs, self._id,
                              maxtasks=self._maxtasks)

    def _new_job(self, func: Callable[..., Any], mode: str, ordered: bool,
                 total: int = -1) -> JobHandle:
        self._check_running()
        function = self._function(func, mode)
        handle = JobHandle(function, ordered, window_for(self._processes),
                           self._max_attempts, self._timeout, self._limit, total)
        with self._jobs_lock:
            self._jobs.add(handle)
        _reactor.call_soon(self._ctl.submit, handle)
        return handle

    def _job_done(self, handle: JobHandle, cancel: bool) -> None:
        with self._jobs_lock:
            if handle not in self._jobs:
                return
            self._jobs.discard(handle)
            if self._apply_jobs.get(handle.function) is handle:
                del self._apply_jobs[handle.function]
        with handle.cond:
            handle.cancelled = cancel or handle.cancelled
            handle.cond.notify_all()
        _reactor.call_soon(self._ctl.cancel if cancel else self._ctl.end, handle)

    def _plan(self, iterable: Iterable[Any],
              chunksize: int | None) -> tuple[int | None, int, int | None]:
        """(fixed chunk size or None for adaptive, chunk count or -1, item count or None).
        ``chunksize`` None or "auto": chosen for the input and the cluster."""
        if chunksize == "auto":
            chunksize = None
        if chunksize is not None and chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        n = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        if chunksize is None and n is not None:
            chunksize = default_chunksize(n, self._processes, _item_bytes(iterable, n))
        total = -(-n // chunksize) if n is not None and chunksize else -1
        return chunksize, total, n

    @staticmethod
    def _chunks(iterable: Iterable[Any], chunksize: int | None,
                handle: JobHandle) -> Iterator[list[Any]]:
        it = iter(iterable)
        while True:
            chunk = list(itertools.islice(it, chunksize or handle.chunker.size))
            if not chunk:
                return
            yield chunk

    def _feed(self, handle: JobHandle, chunks: Iterator[list[Any]],
              collect: Callable[[list[Outcome]], None] | None = None) -> None:
        """Pickle and send chunks within the window (runs in the job's thread).

        As multiprocessing does, an input that raises while being read ends the input
        with that exception in the next position, and a chunk that cannot be pickled
        is that exception in its position; neither stops the chunks already sent."""
        core = handle.core
        while True:
            failure: BaseException | None = None
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except Exception as exc:  # raised by the input itself
                chunk, failure = [], exc
            payload = b""
            if failure is None:
                try:
                    payload = dumps_chunk(chunk)
                except Exception as exc:
                    failure = exc
            with handle.cond:
                while not core.can_add():
                    if handle.error or handle.cancelled:
                        return
                    if collect is not None:
                        outs = handle.take()
                        if outs:
                            collect(outs)
                            continue
                    handle.cond.wait()
                if handle.error or handle.cancelled:
                    return
                if failure is not None:
                    core.add_raised(failure, len(chunk))
                    handle.cond.notify_all()
                    if not chunk:
                        break  # the input raised: it ends here
                    continue
                seq = core.add(payload, len(chunk))
            _reactor.call_soon(self._ctl.send_chunk, handle, seq, payload)
        with handle.cond:
            core.close_input()
            handle.cond.notify_all()

    def _start_thread(self, target: Callable[..., None], *args: Any) -> None:
        threading.Thread(target=target, args=args, daemon=True,
                         name="achilles-job").start()

    # -- map family -------------------------------------------------------------------
    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], mode: str,
                   chunksize: int | None, callback: Any, error_callback: Any,
                   progress: Any = False) -> ApplyResult:
        size, total, n = self._plan(iterable, chunksize)
        result = ApplyResult(callback, error_callback, self)
        bar = _progress_bar(progress, n)
        handle = self._new_job(func, mode, ordered=False, total=total)
        result._handle = handle
        self._start_thread(self._run_map, handle, iterable, size, result, bar)
        return result

    def _run_map(self, handle: JobHandle, iterable: Iterable[Any], chunksize: int | None,
                 result: ApplyResult, bar: Any) -> None:
        """Feed the job and collect its results. As multiprocessing's map, it waits for
        every task even after one raised, then raises the first error that arrived (an
        error of the input itself first: multiprocessing's map would not have started)."""
        parts: dict[int, list[Any]] = {}
        errors: list[BaseException] = []

        def collect(outs: list[Outcome]) -> None:
            for out in outs:
                if out.status == OK:
                    if not errors:  # else the results are not wanted
                        parts[out.start] = loads_chunk(out.payload)
                elif out.status == RAISED and not out.count:
                    errors.insert(0, _exception(out))
                else:
                    errors.append(_exception(out))
                bar.update(out.count)

        try:
            self._feed(handle, self._chunks(iterable, chunksize, handle), collect)
            with handle.cond:
                while True:
                    outs = handle.take()
                    if outs:
                        collect(outs)
                    elif handle.error is not None:
                        raise handle.error
                    elif handle.cancelled:
                        raise ValueError("Pool terminated")
                    elif handle.core.finished():
                        break
                    else:
                        handle.cond.wait()
        except BaseException as exc:
            bar.close()
            self._job_done(handle, cancel=True)
            result._set(False, exc)
            return
        bar.close()
        self._job_done(handle, cancel=False)
        if errors:
            result._set(False, errors[0])
        else:
            result._set(True, [x for start in sorted(parts) for x in parts[start]])

    def _wait(self, result: ApplyResult) -> Any:
        """get() for the blocking calls; Ctrl-C (KeyboardInterrupt) cancels the job on
        the cluster and leaves the pool usable."""
        try:
            return result.get()
        except KeyboardInterrupt:
            handle = getattr(result, "_handle", None)
            if isinstance(handle, ApplyHandle):
                # stop waiting for this call; cancel it on the cluster (its worker is
                # killed) only if no other call shares its job
                if handle.abandon(result._seq):
                    self._job_done(handle, cancel=True)  # type: ignore[arg-type]
            elif handle is not None:
                handle.fail(KeyboardInterrupt())
                self._job_done(handle, cancel=True)
            raise

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                  chunksize: int | None = None, callback: Any = None,
                  error_callback: Any = None, *, progress: Any = False) -> ApplyResult:
        return self._map_async(func, iterable, "map", chunksize, callback, error_callback,
                               progress)

    def map(self, func: Callable[..., Any], iterable: Iterable[Any],
            chunksize: int | None = None, *, progress: Any = False) -> list[Any]:
        """Apply ``func`` to every item, in parallel on the cluster; results in order.

        ``progress=True`` shows a tqdm bar (items done, rate, ETA); a dict is passed to
        tqdm as options."""
        return self._wait(self._map_async(func, iterable, "map", chunksize, None, None,
                                          progress))  # type: ignore[no-any-return]

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Any = None,
                      error_callback: Any = None, *, progress: Any = False) -> ApplyResult:
        return self._map_async(func, iterable, "star", chunksize, callback, error_callback,
                               progress)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None, *, progress: Any = False) -> list[Any]:
        """Like map, with each item unpacked as arguments: ``func(*item)``."""
        return self._wait(self._map_async(func, iterable, "star", chunksize, None, None,
                                          progress))  # type: ignore[no-any-return]

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any],
              chunksize: int | None, ordered: bool, progress: Any) -> IMapIterator:
        size, total, n = self._plan(iterable, chunksize)
        bar = _progress_bar(progress, n)
        handle = self._new_job(func, "map", ordered, total=total)
        it = IMapIterator(handle, self, bar)

        def feed() -> None:
            try:
                self._feed(handle, self._chunks(iterable, size, handle))
            except BaseException as exc:  # not the input's: KeyboardInterrupt and such
                handle.fail(exc)

        self._start_thread(feed)
        return it

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any],
             chunksize: int | str | None = 1, *, progress: Any = False) -> IMapIterator:
        """Lazy ``map``: results in input order, as they come; input read as needed.

        ``chunksize`` defaults to 1, as in multiprocessing (each result is yielded as
        soon as it and those before it are in); ``chunksize="auto"`` (or None) picks
        one from the input's length and the cluster, or from the measured speed of the
        function for a generator: far faster for short tasks. Also an async iterator:
        ``async for x in ...``."""
        return self._imap(func, iterable, chunksize, True, progress)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int | str | None = 1, *,
                       progress: Any = False) -> IMapIterator:
        """Like imap, in the order results finish."""
        return self._imap(func, iterable, chunksize, False, progress)

    # -- apply ------------------------------------------------------------------------
    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: dict[str, Any] | None = None, callback: Any = None,
                    error_callback: Any = None) -> ApplyResult:
        self._check_running()
        result = ApplyResult(callback, error_callback, self)
        function = self._function(func, "apply")
        try:
            payload = dumps_chunk([(tuple(args), dict(kwds or {}))])
        except Exception as exc:  # as multiprocessing: the result raises it, at get()
            result._set(False, exc)
            return result

        def settle(status: str, value: Any) -> None:  # in the reactor thread
            try:
                if isinstance(value, BaseException):  # the connection failed
                    raise value
                outcome = Outcome(seq, status, value, 0, 1)
                result._set(True, _values(outcome)[0])
            except BaseException as exc:
                result._set(False, exc)

        handle, seq = self._apply_call(function, payload, settle)
        result._handle, result._seq = handle, seq
        # one frame, written from this thread when it can be, else one hop to the reactor
        # thread: each hop costs a wake-up and a GIL hand-over
        if not self._ctl.send_call_now(handle, seq, payload):
            _reactor.call_soon(self._ctl.send_call, handle, seq, payload)
        return result

    def _apply_call(self, function: bytes, payload: bytes,
                    settle: Callable[[str, Any], None]) -> tuple[ApplyHandle, int]:
        """Add a call to the apply job of this function (made on first use; the least
        recently used beyond MAX_APPLY_JOBS ends once its calls are done)."""
        idle: list[ApplyHandle] = []
        with self._jobs_lock:
            handle = self._apply_jobs.get(function)
            if handle is None or handle.error is not None or handle.cancelled:
                handle = ApplyHandle(function, self._max_attempts, self._timeout,
                                     self._limit)
                handle.on_idle = _retire_weakly(weakref.ref(self))
                self._apply_jobs[function] = handle
                self._jobs.add(handle)  # type: ignore[arg-type]
                while len(self._apply_jobs) > MAX_APPLY_JOBS:
                    old = self._apply_jobs.popitem(last=False)[1]
                    old.retiring = True
                    with old.cond:
                        if not old.calls:
                            idle.append(old)
            else:
                self._apply_jobs.move_to_end(function)
            seq = handle.add(payload, settle)
        for old in idle:
            self._retire(old)
        return handle, seq

    def _retire(self, handle: ApplyHandle) -> None:
        self._job_done(handle, cancel=False)  # type: ignore[arg-type]

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: dict[str, Any] | None = None) -> Any:
        """Run ``func(*args, **kwds)`` on the cluster and return its result."""
        return self._wait(self.apply_async(func, args, kwds))

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """No more tasks; ``join`` waits for the submitted ones."""
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self) -> None:
        """Stop now: cancel every job (their results raise), stop an embedded cluster."""
        if self._pid != os.getpid():  # a forked child's copy: the parent's to stop
            self._state = TERMINATE
            return
        if self._state == TERMINATE and not self._jobs and self._ctl_held is None:
            return
        self._state = TERMINATE
        with self._jobs_lock:
            jobs = list(self._jobs)
        for handle in jobs:
            handle.fail(ValueError("Pool terminated"))
            self._job_done(handle, cancel=True)
        self._shutdown()

    def join(self, timeout: float | None = None) -> None:
        """Wait for every submitted task to have run (after close or terminate).

        As with multiprocessing, that includes the tasks of an ``imap`` nobody reads
        yet: its input is then read to the end and its results wait in memory."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._pid != os.getpid():
            return
        with self._jobs_lock:
            jobs = list(self._jobs)
        for handle in jobs:
            with handle.cond:
                if isinstance(handle, ApplyHandle):  # lives on: wait for its calls
                    handle.cond.wait_for(lambda: not handle.calls, timeout)
                else:
                    handle.core.lift_window()
                    handle.cond.notify_all()
                    handle.cond.wait_for(lambda: handle not in self._jobs
                                         or handle.core.complete() or handle.cancelled
                                         or handle.error is not None, timeout)
            if isinstance(handle, ApplyHandle):
                self._job_done(handle, cancel=False)  # type: ignore[arg-type]
        self._shutdown()

    def _shutdown(self) -> None:
        ctl, self._ctl_held = self._ctl_held, None
        if ctl is not None:
            _release_controller(ctl)
        if self._local is not None:
            local, self._local = self._local, None
            local.stop()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        """A pool nobody references any more: warn if it was still running (as
        multiprocessing does), and release what it holds, without taking a lock or
        waiting (a finaliser runs wherever the garbage collector runs)."""
        if getattr(self, "_state", TERMINATE) == RUN:
            _warn(f"unclosed running achilles pool {self!r}", ResourceWarning, source=self)
        ctl, local = getattr(self, "_ctl_held", None), getattr(self, "_local", None)
        if ctl is None and local is None:
            return
        self._state = TERMINATE
        self._ctl_held = self._local = None
        if self._pid != os.getpid():
            return  # a forked child's copy: the parent's to stop
        try:
            if local is not None:
                local.kill_workers()  # at once: signals only
            _reactor.call_from_finalizer(_release, ctl, list(self._jobs), local)
        except Exception:  # interpreter exit: the exit handlers kill what is left
            pass

    def __repr__(self) -> str:
        where = "local" if self._local is not None else \
            f"{self._settings.host}:{self._settings.port}"
        return f"<achilles.Pool state={self._state} cluster={where}>"


def _retire_weakly(ref: "weakref.ref[Pool]") -> Callable[[ApplyHandle], None]:
    """An apply job's ``on_idle``: ends the job through its pool, if the pool is still
    there. Weak: the controller holds the job, and must not keep the pool alive."""
    def retire(handle: ApplyHandle) -> None:
        pool = ref()
        if pool is not None:
            pool._retire(handle)
    return retire


def _release(ctl: Controller | None, jobs: list[Any], local: LocalCluster | None) -> None:
    """In the reactor thread: what a collected pool held. Its jobs are cancelled, its
    connection released, its embedded cluster stopped."""
    for handle in jobs:
        handle.fail(ValueError("Pool terminated"))
        with handle.cond:
            handle.cancelled = True
        if ctl is not None:
            ctl.cancel(handle)
    if ctl is not None:
        _release_controller(ctl)
    if local is not None:
        local.stop()


# --- one-shot helpers with the seed's argument order ------------------------------------
def _one_shot(host: Any, port: Any, username: Any, secret_key: Any) -> Pool:
    return Pool(host=host, port=port, username=username, secret_key=secret_key)


def map(func: Callable[..., Any], args: Iterable[Any], callback: Callable[[Any], Any] | None = None,  # noqa: A001
        chunksize: int | None = None, host: str | None = None, port: int | None = None,
        username: str | None = None, secret_key: str | None = None) -> list[Any]:
    """``Pool().map`` in one call; ``callback`` (if given) is applied to each result."""
    with _one_shot(host, port, username, secret_key) as pool:
        results = pool.map(func, args, chunksize)
    return [callback(r) for r in results] if callback else results


def _iterate(ordered: bool, func: Callable[..., Any], args: Iterable[Any],
             callback: Callable[[Any], Any] | None, chunksize: int | None,
             conn: tuple[Any, ...]) -> Iterator[Any]:
    with _one_shot(*conn) as pool:
        it = pool.imap(func, args, chunksize) if ordered else \
            pool.imap_unordered(func, args, chunksize)
        for r in it:
            yield callback(r) if callback else r


def imap(func: Callable[..., Any], args: Iterable[Any], callback: Callable[[Any], Any] | None = None,
         chunksize: int | None = None, host: str | None = None, port: int | None = None,
         username: str | None = None, secret_key: str | None = None) -> Iterator[Any]:
    """``Pool().imap`` as a generator; ``callback`` is applied to each result."""
    return _iterate(True, func, args, callback, chunksize, (host, port, username, secret_key))


def imap_unordered(func: Callable[..., Any], args: Iterable[Any],
                   callback: Callable[[Any], Any] | None = None, chunksize: int | None = None,
                   host: str | None = None, port: int | None = None,
                   username: str | None = None, secret_key: str | None = None) -> Iterator[Any]:
    """``Pool().imap_unordered`` as a generator; ``callback`` is applied to each result."""
    return _iterate(False, func, args, callback, chunksize, (host, port, username, secret_key))


def _admin_call(method: str, host: Any, port: Any, username: Any, secret_key: Any,
                tls_ca: Any = None, timeout: float = 30.0) -> Any:
    settings = resolve(host=host, port=port, username=username, secret_key=secret_key,
                       tls_ca=tls_ca)
    require_secret(settings, method)
    reactor = _reactor.ensure_started()
    ctl = _reactor.call_blocking(Controller, settings, reactor, "admin")
    try:
        return _reactor.call_blocking(getattr(ctl, method), timeout=timeout)
    except ConnectionLostError:
        raise
    finally:
        _reactor.call_soon(ctl.close)


def _confirm(prompt: str) -> bool:
    interactive = sys.stdin is not None and (sys.stdin.isatty() or "ipykernel" in sys.modules)
    if not interactive:
        raise RuntimeError("killCluster() needs confirmation, and this process cannot ask "
                           "for it (no terminal): pass command_verified=True")
    return input(prompt).strip().lower() in ("y", "yes")


def killCluster(host: str | None = None, port: int | None = None,  # noqa: N802 (seed name)
                username: str | None = None, secret_key: str | None = None,
                command_verified: bool = False, tls_ca: str | None = None) -> int:
    """Stop every node of the cluster (the server and this process keep running).

    Asks for confirmation unless ``command_verified=True``. Returns how many nodes were
    told to stop.
    """
    if not command_verified and not _confirm(
            "achilles: stop every node of the cluster? [y/N] "):
        print("achilles: killCluster cancelled")
        return 0
    return _admin_call("kill", host, port, username, secret_key, tls_ca)  # type: ignore[no-any-return]


def getClusterStatus(host: str | None = None, port: int | None = None,  # noqa: N802
                     username: str | None = None, secret_key: str | None = None,
                     tls_ca: str | None = None) -> dict[str, Any]:
    """The cluster's nodes and jobs, as a dict (what ``achilles status --json`` prints)."""
    return _admin_call("status", host, port, username, secret_key, tls_ca)  # type: ignore[no-any-return]


__all__ = ["Pool", "ApplyResult", "AsyncResult", "MapResult", "IMapIterator", "map", "imap",
           "imap_unordered", "killCluster", "getClusterStatus", "SerializationError"]
