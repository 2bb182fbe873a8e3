"""A job as the pool's threads and the reactor thread share it: a handle.

Two kinds satisfy :class:`Handle`: :class:`JobHandle` (a ``map``/``imap``: the sans-IO
:class:`~achilles.core.job.Job` behind a ``threading.Condition``) and
:class:`ApplyHandle` (the long-lived job that a pool's ``apply`` calls of one function
share). The reactor thread delivers outcomes into them; the pool's threads feed input
and wait on ``cond``. What the server still owes them, and what to send again after a
reconnect, is the controller's session (:mod:`achilles.core.session`), not theirs.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from achilles.core.job import FAILED, AdaptiveChunker, Job, Outcome
from achilles.protocol.messages import FUNCTION_NAME_MAX, Submit

#: how an apply call hears of its outcome: the outcome, or the exception that failed
#: the connection (in the reactor thread)
Settle = Callable[[Outcome | BaseException], None]


class Handle(Protocol):
    """What the controller and the pool use of a job, whichever its kind."""

    id: str
    function: bytes
    cond: threading.Condition
    error: BaseException | None  # the connection failed for good, or the pool stopped
    cancelled: bool

    def submit_frame(self) -> Submit:
        """The Submit that opens this job on a server (again after a reconnect)."""

    def deliver(self, seq: int, status: str, payload: bytes, elapsed: float) -> None:
        """Chunk ``seq``'s outcome from a node (reactor thread; once per chunk)."""

    def deliver_failure(self, seq: int, reason: str, detail: str) -> None:
        """The server gave up on chunk ``seq`` after its attempts (reactor thread)."""

    def fail(self, exc: BaseException) -> None:
        """The job cannot go on: every waiter gets ``exc``."""

    def interrupt(self, seq: int) -> bool:
        """A caller waiting for it (for call ``seq``) was interrupted; True if the job
        is to be cancelled on the cluster."""

    def wait_done(self, timeout: float | None, gone: Callable[[], bool]) -> bool:
        """``Pool.join``: wait until every task submitted has run (or ``gone()``);
        True if the caller is to end the job (nobody else will)."""


def _submit(handle: JobHandle | ApplyHandle, total: int, isolated: bool) -> Submit:
    return Submit(
        handle.id,
        handle.max_attempts,
        handle.timeout,
        handle.limit,
        total,
        int(isolated),
        handle.name[:FUNCTION_NAME_MAX],
        getattr(handle, "items", -1),
    )


class JobHandle:
    """One ``map``/``imap`` job, shared by the reactor thread and the pool's threads
    (under ``cond``)."""

    #: the context (a copy of the caller's) that the job's task output is written in:
    #: a notebook routes it to the cell that ran the job (see controller.output)
    output_context: contextvars.Context | None = None

    def __init__(
        self,
        function: bytes,
        ordered: bool,
        window: int,
        max_attempts: int = 3,
        timeout: float = 0.0,
        limit: int = 0,
        total: int = -1,
        name: str = "",
        items: int = -1,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.name = name  # the function's, shown by the server
        self.items = items  # the job's items, if known (the dashboard's items/s)
        self.function = function
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.limit = limit
        self.total = total  # chunks, when the input's length is known
        # not isolated: the server keeps its chunks' attempt counts until the job ends
        self._submit = _submit(self, total, False)
        self.core = Job(ordered, window)
        self.chunker = AdaptiveChunker()
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.cancelled = False

    def submit_frame(self) -> Submit:
        return self._submit

    # reactor thread ----------------------------------------------------------------
    def deliver(self, seq: int, status: str, payload: bytes, elapsed: float) -> None:
        with self.cond:
            info = self.core.pending.get(seq)  # taken out by on_result
            if not self.core.on_result(seq, status, payload):
                return
            if info is not None and status == "ok":
                self.chunker.observe(info.count, elapsed)
                turnaround = time.monotonic() - info.sent if info.sent >= 0 else -1.0
                self.core.observe(elapsed, turnaround, info.size)
            self.cond.notify_all()

    def deliver_failure(self, seq: int, reason: str, detail: str) -> None:
        with self.cond:
            if not self.core.on_failed(seq, detail, reason):
                return
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    # any thread --------------------------------------------------------------------
    def take(self, limit: int | None = None) -> list[Outcome]:
        """Outcomes ready for the caller (who holds ``cond``)."""
        outs = self.core.take(limit)
        if outs:
            self.cond.notify_all()  # room in the window for the feeder
        return outs

    def interrupt(self, seq: int) -> bool:
        self.fail(KeyboardInterrupt())
        return True

    def wait_done(self, timeout: float | None, gone: Callable[[], bool]) -> bool:
        """The window is lifted: an ``imap`` nobody reads yet is read to its end, and
        its results wait in memory (as multiprocessing's join allows). Its own thread
        ends the job."""
        with self.cond:
            self.core.lift_window()
            self.cond.notify_all()
            self.cond.wait_for(
                lambda: gone() or self.core.complete() or self.cancelled or self.error is not None,
                timeout,
            )
        return False


class ApplyHandle:
    """A long-lived job for a pool's ``apply``/``apply_async`` calls of one function.

    Each call is one chunk of it, and each chunk stands alone (isolated): a call that
    raises, or whose worker keeps dying, fails that call only. Sharing the job saves
    each call a Submit, the function's trip to a node, an End and a Cancel: four of the
    eight frames an apply took, and the reactor turns they cost.

    ``calls`` holds each call's ``settle`` until its outcome arrives; an outcome
    settles its call once (a duplicate finds none).
    """

    total = -1

    #: the context (a copy of the caller's) that the job's task output is written in:
    #: a notebook routes it to the cell that ran the job (see controller.output)
    output_context: contextvars.Context | None = None

    def __init__(
        self,
        function: bytes,
        max_attempts: int = 3,
        timeout: float = 0.0,
        limit: int = 0,
        name: str = "",
    ) -> None:
        self.id = uuid.uuid4().hex
        self.name = name  # the function's, shown by the server
        self.function = function
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.limit = limit
        self.cond = threading.Condition()
        self.calls: dict[int, Settle] = {}
        self._seqs = itertools.count()
        self.error: BaseException | None = None
        self.cancelled = False
        self.retiring = False  # evicted from its pool's cache: ends when idle
        self.on_idle: Callable[[ApplyHandle], None] | None = None
        self._submit = _submit(self, self.total, True)

    def submit_frame(self) -> Submit:
        return self._submit

    def add(self, settle: Settle) -> int:
        """A new call; ``settle`` runs (in the reactor thread) with its outcome: OK or
        ERROR with the result chunk, FAILED with the server's text, or the exception
        that failed the connection."""
        with self.cond:
            seq = next(self._seqs)
            self.calls[seq] = settle
            return seq

    def abandon(self, seq: int) -> bool:
        """Stop waiting for a call (Ctrl-C); True if no other call is pending."""
        with self.cond:
            self.calls.pop(seq, None)
            self.cond.notify_all()
            return not self.calls

    def _settle(self, seq: int, outcome: Outcome) -> None:
        with self.cond:
            settle = self.calls.pop(seq, None)
            idle = not self.calls
            if idle:
                self.cond.notify_all()
        if settle is not None:
            settle(outcome)
            if idle and self.retiring and self.on_idle is not None:
                self.on_idle(self)

    def deliver(self, seq: int, status: str, payload: bytes, elapsed: float) -> None:
        self._settle(seq, Outcome(seq, status, payload, 0, 1))

    def deliver_failure(self, seq: int, reason: str, detail: str) -> None:
        self._settle(seq, Outcome(seq, FAILED, detail.encode("utf-8"), 0, 1, reason=reason))

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            calls, self.calls = self.calls, {}
            self.cond.notify_all()
        for settle in calls.values():
            settle(exc)

    def interrupt(self, seq: int) -> bool:
        """Only this call is abandoned; the job is cancelled (killing its worker) only
        if no other call shares it."""
        return self.abandon(seq)

    def wait_done(self, timeout: float | None, gone: Callable[[], bool]) -> bool:
        """Lives on until its pool ends it: wait for its calls."""
        with self.cond:
            self.cond.wait_for(lambda: not self.calls, timeout)
        return True
