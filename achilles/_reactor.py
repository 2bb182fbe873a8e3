"""The Twisted reactor in one daemon thread, for the life of the process.

Modelled on crochet (itamarst/crochet): a reactor cannot be restarted, and a notebook
calls ``map`` many times, so the reactor is started once, lazily, by the first pool,
without signal handlers (those belong to the main thread and the user). Blocking
callers go through :func:`call_blocking`, which refuses to run in the reactor thread
(it would deadlock), takes a timeout, cancels the operation when it expires, and is
released with :class:`ReactorStopped` if the reactor goes away.
"""
from __future__ import annotations

import atexit
import threading
from typing import Any, Callable

from twisted.internet import defer
from twisted.python import failure, threadable

from achilles.errors import ReactorStopped, TimeoutError

_lock = threading.Lock()
_thread: threading.Thread | None = None
_waiters: set[threading.Event] = set()
_stopped = False


def reactor() -> Any:
    from twisted.internet import reactor as r
    return r


def ensure_started() -> Any:
    """Start the reactor thread if nobody runs a reactor yet; return the reactor."""
    global _thread
    with _lock:
        r = reactor()
        if _stopped:
            raise ReactorStopped("the achilles reactor thread has stopped (interpreter exit)")
        if _thread is None and not r.running:
            _thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False},
                                       daemon=True, name="achilles-reactor")
            _thread.start()
            atexit.register(shutdown)
        return r


def in_reactor_thread() -> bool:
    return threadable.isInIOThread()


def call_soon(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``fn`` in the reactor thread, without waiting (FIFO with other calls)."""
    ensure_started().callFromThread(fn, *args, **kwargs)


def call_blocking(fn: Callable[..., Any], *args: Any, timeout: float | None = None,
                  **kwargs: Any) -> Any:
    """Run ``fn`` in the reactor thread and wait for its (Deferred) result.

    Raises:
        RuntimeError: if called from the reactor thread itself.
        TimeoutError: after ``timeout`` seconds; the Deferred is cancelled.
        ReactorStopped: if the reactor stops while waiting.
    """
    if in_reactor_thread():
        raise RuntimeError("achilles: a blocking call cannot run in the reactor thread")
    r = ensure_started()
    done = threading.Event()
    box: list[Any] = []
    holder: list[defer.Deferred[Any]] = []

    def run() -> None:
        d = defer.maybeDeferred(fn, *args, **kwargs)
        holder.append(d)

        def finish(result: Any) -> None:
            box.append(result)
            done.set()

        d.addBoth(finish)

    with _lock:
        _waiters.add(done)
    try:
        r.callFromThread(run)
        if not done.wait(timeout):
            r.callFromThread(lambda: holder and holder[0].cancel())
            raise TimeoutError(f"no answer within {timeout:g} s")
    finally:
        with _lock:
            _waiters.discard(done)
    if not box:
        raise ReactorStopped("the reactor stopped while a call was waiting")
    result = box[0]
    if isinstance(result, failure.Failure):
        result.raiseException()
    return result


def shutdown() -> None:
    """Stop the reactor thread (at interpreter exit) and release every waiter."""
    global _stopped
    with _lock:
        _stopped = True
        waiters = list(_waiters)
    for event in waiters:
        event.set()
    r = reactor()
    if _thread is not None and r.running:
        r.callFromThread(r.stop)
        _thread.join(2.0)
