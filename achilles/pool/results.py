"""What the pool's calls return: ``ApplyResult`` (``AsyncResult``) and ``IMapIterator``.

Structure follows CPython's ``multiprocessing/pool.py``: an ``ApplyResult`` waits on a
flag (a one-shot ``threading.Event``), an ``IMapIterator`` on its job's condition.
Outcomes arrive in the reactor thread (:mod:`achilles.controller`); every wait here
has an optional timeout, and nothing here runs in the reactor thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from achilles.controller import Handle, JobHandle
from achilles.core.job import Outcome
from achilles.errors import ChunkFailedError, TimeoutError, rebuild_exc
from achilles.net import reactor as _reactor
from achilles.protocol.messages import ERROR, OK, TIMEOUT
from achilles.serialization import loads_chunk, loads_exception

if TYPE_CHECKING:
    from achilles.pool.pool import Pool

_END = object()


def _exception(outcome: Outcome) -> BaseException:
    """The exception a failed outcome stands for, with the remote traceback as cause."""
    if outcome.exc is not None:  # RAISED: by the input, in this process
        return outcome.exc
    if outcome.status == ERROR:
        exc, tb = loads_exception(outcome.payload)
        return rebuild_exc(exc, tb)
    detail = outcome.payload.decode("utf-8", "replace")
    where = (
        f"chunk {outcome.seq} (arguments {outcome.start} to {outcome.start + outcome.count - 1})"
    )
    if outcome.reason == TIMEOUT:
        return TimeoutError(f"{where} failed: {detail}")
    return ChunkFailedError(
        f"{where} failed: {detail}", outcome.seq, outcome.start, outcome.start + outcome.count
    )


def _values(outcome: Outcome) -> list[Any]:
    """A chunk's results; raises what a failed outcome stands for."""
    if outcome.status != OK:
        raise _exception(outcome)
    return loads_chunk(outcome.payload)


class _NoBar:
    """The progress bar when none was asked for."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


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

    def __init__(
        self,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
        pool: Pool | None = None,
    ) -> None:
        self._pool = pool  # kept alive until the result is in, as multiprocessing does
        self._event = _Flag()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None
        self._handle: Handle | None = None
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

    def __init__(self, handle: JobHandle, pool: Pool, bar: Any = None) -> None:
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

    def __aiter__(self) -> IMapIterator:
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
