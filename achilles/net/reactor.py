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
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python import failure, threadable

from achilles.compat import twisted as compat
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
            _thread = threading.Thread(
                target=r.run,
                kwargs={"installSignalHandlers": False},
                daemon=True,
                name="achilles-reactor",
            )
            _thread.start()
            atexit.register(shutdown)
        return r


def in_reactor_thread() -> bool:
    return threadable.isInIOThread()


def call_from_finalizer(fn: Callable[..., Any], *args: Any) -> bool:
    """Run ``fn`` in the reactor thread later, from a ``__del__`` or a weakref callback.

    A finaliser runs wherever the garbage collector happens to run: in any thread, in
    the middle of any code, possibly while that thread holds one of our locks (the
    reactor thread's own included). So this takes no lock and waits for nothing:
    ``callFromThread`` only appends to a list and writes a byte to the reactor's waker.
    False if there is no running reactor of ours (interpreter exit, or never started).
    """
    r = sys.modules.get("twisted.internet.reactor")
    if _thread is None or _stopped or r is None or not r.running:
        return False
    try:
        r.callFromThread(fn, *args)
    except Exception:  # the reactor is going away
        return False
    return True


def call_soon(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``fn`` in the reactor thread, without waiting (FIFO with other calls)."""
    ensure_started().callFromThread(fn, *args, **kwargs)


def call_blocking(
    fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any
) -> Any:
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
            r.callFromThread(lambda: holder[0].cancel() if holder else None)
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


def _after_fork_in_child() -> None:
    """A forked child (multiprocessing's fork context, gunicorn, Celery, pytest-xdist)
    has a copy of the reactor but not its thread. It gets a fresh reactor, started when
    it first needs one; the parent's copy is dropped without a word to the peers (its
    connections are the parent's). Only our copies of the parent's sockets are closed
    (a close, not a shutdown: the parent's connections are untouched), so that the
    parent closing one is seen by its peer, and its listening port is not kept open by
    a child that never accepts."""
    global _lock, _thread, _waiters, _stopped
    _lock = threading.Lock()
    _waiters = set()
    if _thread is None:  # we never ran the reactor here: it is not ours to replace
        return
    _thread = None
    _stopped = False
    old = compat.forget_reactor()
    _orphans.append(old)  # kept: a collected copy must not close what it holds
    for selectable in _selectables(old):
        sock = getattr(selectable, "socket", None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    shell: Any = sys.modules.get("achilles.net.connection")
    if shell is not None:
        shell._corked = None  # a read of the parent's that was being handled
        shell._turn_end.clear()
        shell._turn_pending = False
    from twisted.internet import default

    default.install()


def _selectables(old: Any) -> list[Any]:
    try:
        return list(old.getReaders()) + list(old.getWriters())
    except Exception:  # not a select-style reactor
        return []


_orphans: list[Any] = []
os.register_at_fork(after_in_child=_after_fork_in_child)


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
