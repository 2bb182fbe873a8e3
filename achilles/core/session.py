"""The controller's session with its server, sans-IO: what to send, and what to send
again after a reconnect.

    pool threads --JobOpened/ChunkMade/CallMade--> [ jobs: Submit + unfinished chunks ]
                                                      |  Send / QueueChunk (if connected)
    server --ResultReceived/FailureReceived--> pop seq +--> Deliver / DeliverFailure
                                                  (a seq not held: a duplicate, dropped)
    Connected     -> each job's Submit again, then exactly its unfinished chunks, Ready
    Disconnected  -> StartDeadline; DeadlinePassed fails every job (FailJob)

A chunk is held here from the moment it is made until its outcome arrives, so that it
is sent again on the next connection, and an outcome is handed on once: this is the
wire side of exactly-once output. The caller's side (the window, the reorder buffer)
is :mod:`achilles.core.job`; the threads, the Condition and the sockets are the shell's
(:mod:`achilles.controller`). Jobs belong to opaque owners ``H`` here (the shell's
handles), which instructions hand back.

An apply job (``CallMade``) is opened by its first call, and after a failure by the
next call: each call is one chunk of it, settled once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from achilles.errors import AchillesError, AuthenticationError, ConnectionLostError
from achilles.protocol.messages import Cancel, Chunk, End, Message, Submit

H = TypeVar("H")


# --- events -----------------------------------------------------------------------------
# HOT: the events and instructions made for every chunk are slotted dataclasses that are
# not frozen (a frozen one sets each field through object.__setattr__, several times
# slower); nothing mutates them once made.
@dataclass(frozen=True, slots=True)
class Started:
    """The controller starts connecting: the reconnect deadline runs from now."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The connection to the server is authenticated both ways."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The authenticated connection was lost."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The server refused this controller (final unless ``transient``)."""

    detail: str
    transient: bool  # not now, or not proven by the server: it retries
    #: "auth-failed" from a server that did not prove it knows the secret (a wrong
    #: secret here, or someone else on the port)
    unproven_auth: bool = False


@dataclass(frozen=True, slots=True)
class DeadlinePassed:
    """No connection came within the reconnect deadline."""


@dataclass(frozen=True, slots=True)
class Closing:
    """The controller is closing (or the process exiting): no deadline, no warnings."""


@dataclass(frozen=True, slots=True)
class JobOpened(Generic[H]):
    """A job to submit, and to submit again after every reconnect."""

    owner: H
    submit: Submit
    function: bytes


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class ChunkMade:
    """A job's feeder made chunk ``seq``: held until its outcome, sent when connected."""

    job: str
    seq: int
    payload: bytes


@dataclass(slots=True)  # not frozen: one per call (see HOT)
class CallMade(Generic[H]):
    """An apply call (one chunk of its job); the job is opened first if not held."""

    owner: H
    submit: Submit
    function: bytes
    seq: int
    payload: bytes


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class ResultReceived:
    """A Result (or one item of Results) from the server."""

    job: str
    seq: int
    status: str
    payload: bytes
    elapsed: float


@dataclass(frozen=True, slots=True)
class FailureReceived:
    """JobFailed: the server gave up on (or refused) chunk ``seq``, or the job (-1)."""

    job: str
    seq: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class JobEnded:
    """The caller has every outcome of the job: End it, and forget it."""

    job: str


@dataclass(frozen=True, slots=True)
class JobCancelled:
    """The caller gave up on the job: Cancel it, and forget it."""

    job: str


@dataclass(frozen=True, slots=True)
class CallAbandoned:
    """The caller stopped waiting for an apply call: it is not sent again."""

    job: str
    seq: int


Event = (
    Started
    | Connected
    | Disconnected
    | Refused
    | DeadlinePassed
    | Closing
    | JobOpened[H]
    | ChunkMade
    | CallMade[H]
    | ResultReceived
    | FailureReceived
    | JobEnded
    | JobCancelled
    | CallAbandoned
)


# --- instructions -------------------------------------------------------------------------
@dataclass(slots=True)  # not frozen: one per apply call (see HOT)
class Send:
    """Write a frame now (after the chunks queued in this reactor turn)."""

    msg: Message
    payload: bytes = b""


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class QueueChunk:
    """Send a feeder's chunk at the end of this reactor turn (the shell batches them)."""

    job: str
    seq: int
    payload: bytes


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class Deliver(Generic[H]):
    """Hand a chunk's outcome to its job's owner (once)."""

    owner: H
    seq: int
    status: str
    payload: bytes
    elapsed: float


@dataclass(frozen=True, slots=True)
class DeliverFailure(Generic[H]):
    """Tell the owner the server gave up on chunk ``seq`` (once)."""

    owner: H
    seq: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class FailJob(Generic[H]):
    """The job cannot go on: the server is unreachable or refused us."""

    owner: H
    error: BaseException


@dataclass(frozen=True, slots=True)
class Ready:
    """Connected and every job resubmitted: release those waiting for the connection."""


@dataclass(frozen=True, slots=True)
class FailWaiters:
    """Fail those waiting for the connection."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class StartDeadline:
    """Start the reconnect deadline: DeadlinePassed after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class CancelDeadline:
    """Stop the reconnect deadline."""


@dataclass(frozen=True, slots=True)
class StopReconnecting:
    """Stop reconnecting for good: the refusal is final."""


@dataclass(frozen=True, slots=True)
class Warn:
    """Log a warning."""

    text: str


Instruction = (
    Send
    | QueueChunk
    | Deliver[H]
    | DeliverFailure[H]
    | FailJob[H]
    | Ready
    | FailWaiters
    | StartDeadline
    | CancelDeadline
    | StopReconnecting
    | Warn
)


# --- the session --------------------------------------------------------------------------
@dataclass(slots=True)
class HeldJob(Generic[H]):
    """A job the session holds: how to submit it, and its chunks still without outcome."""

    owner: H
    submit: Submit
    function: bytes
    unfinished: dict[int, bytes] = field(default_factory=dict)


#: "auth-failed" refusals in a row after which a controller that never connected gives up
UNPROVEN_AUTH_LIMIT = 3


class Session(Generic[H]):
    """One controller's jobs and connection state. Not thread-safe: the shell serialises
    calls to ``handle``.

    Args:
        where: the server, as messages name it (``host:port``).
        reconnect_timeout: how long a job waits for a connection before it fails.
    """

    def __init__(self, where: str, reconnect_timeout: float) -> None:
        self.where = where
        self.reconnect_timeout = reconnect_timeout
        self.jobs: dict[str, HeldJob[H]] = {}
        self.connected = False
        self.closing = False
        self.fatal: BaseException | None = None  # a final refusal: nothing more is sent
        self.deadline = False  # the reconnect deadline is running
        self.ever_connected = False
        self.unproven_refusals = 0  # "auth-failed" in a row, before any connection
        self._out: list[Instruction[H]] = []

    def handle(self, event: Event[H]) -> list[Instruction[H]]:
        """The instructions that ``event`` calls for, in the order to carry them out."""
        out: list[Instruction[H]] = []
        self._out = out
        _HANDLERS[type(event)](self, event)
        return out

    def holds(self, job: str) -> bool:
        """Whether the job is open here (not ended, cancelled or failed)."""
        return job in self.jobs

    # -- connection --------------------------------------------------------------------
    def _arm(self) -> None:
        if not self.deadline:
            self.deadline = True
            self._out.append(StartDeadline(self.reconnect_timeout))

    def _disarm(self) -> None:
        if self.deadline:
            self.deadline = False
            self._out.append(CancelDeadline())

    def _on_started(self, ev: Started) -> None:
        self._arm()

    def _on_connected(self, ev: Connected) -> None:
        self.connected = self.ever_connected = True
        self.unproven_refusals = 0
        self._disarm()
        out = self._out
        for job in self.jobs.values():
            out.append(Send(job.submit, job.function))
            for seq in sorted(job.unfinished):
                out.append(Send(Chunk(job.submit.job, seq), job.unfinished[seq]))
        out.append(Ready())

    def _on_disconnected(self, ev: Disconnected) -> None:
        self.connected = False
        if self.fatal is None and not self.closing:
            self._out.append(Warn("lost the achilles server; reconnecting"))
            self._arm()

    def _on_refused(self, ev: Refused) -> None:
        if ev.unproven_auth and not self.ever_connected:
            # Not proven, so not final for a running controller (it may be a stand-in
            # on the port); but a new one whose every try says "wrong secret" fails
            # soon, instead of at the reconnect deadline.
            self.unproven_refusals += 1
            if self.unproven_refusals >= UNPROVEN_AUTH_LIMIT:
                self._out.append(StopReconnecting())
                self._fail_all(
                    AuthenticationError(
                        f"the achilles server at {self.where} refused this controller "
                        f"{self.unproven_refusals} times: {ev.detail} (the refusals carried no "
                        f"proof that it knows the secret either)"
                    ),
                    final=True,
                )
                return
        if ev.transient:
            self._out.append(Warn(f"the achilles server is busy ({ev.detail}); retrying"))
            return
        self._out.append(StopReconnecting())
        self._fail_all(
            AuthenticationError(
                f"the achilles server at {self.where} refused this controller: {ev.detail}"
            ),
            final=True,
        )

    def _on_deadline_passed(self, ev: DeadlinePassed) -> None:
        self.deadline = False
        self._fail_all(
            ConnectionLostError(
                f"cannot reach the achilles server at {self.where} "
                f"(tried for {self.reconnect_timeout:g} s)"
            ),
            final=False,
        )

    def _on_closing(self, ev: Closing) -> None:
        self.closing = True
        self._disarm()

    def _fail_all(self, exc: BaseException, final: bool) -> None:
        if final:
            self.fatal = exc
        for job in self.jobs.values():
            self._out.append(FailJob(job.owner, exc))
        self.jobs.clear()
        self._out.append(FailWaiters(exc))

    # -- jobs --------------------------------------------------------------------------
    def _open(self, owner: H, submit: Submit, function: bytes) -> HeldJob[H] | None:
        if self.fatal is not None:
            self._out.append(FailJob(owner, self.fatal))
            return None
        job = self.jobs.get(submit.job)
        if job is None:
            job = self.jobs[submit.job] = HeldJob(owner, submit, function)
        if self.connected:
            self._out.append(Send(submit, function))
        else:
            self._arm()  # a job waits for the server at most reconnect_timeout
        return job

    def _on_job_opened(self, ev: JobOpened[H]) -> None:
        self._open(ev.owner, ev.submit, ev.function)

    def _on_chunk_made(self, ev: ChunkMade) -> None:
        job = self.jobs.get(ev.job)
        if job is None:
            return  # ended, cancelled or failed meanwhile: nobody wants it
        job.unfinished[ev.seq] = ev.payload
        if self.connected:
            self._out.append(QueueChunk(ev.job, ev.seq, ev.payload))

    def _on_call_made(self, ev: CallMade[H]) -> None:
        job = self.jobs.get(ev.submit.job)
        if job is None:
            job = self._open(ev.owner, ev.submit, ev.function)
            if job is None:
                return
        job.unfinished[ev.seq] = ev.payload
        if self.connected:
            self._out.append(Send(Chunk(ev.submit.job, ev.seq), ev.payload))

    def _on_call_abandoned(self, ev: CallAbandoned) -> None:
        job = self.jobs.get(ev.job)
        if job is not None:
            job.unfinished.pop(ev.seq, None)

    def _on_job_ended(self, ev: JobEnded) -> None:
        if self.jobs.pop(ev.job, None) is not None and self.connected:
            self._out.append(Send(End(ev.job)))

    def _on_job_cancelled(self, ev: JobCancelled) -> None:
        if self.jobs.pop(ev.job, None) is not None and self.connected:
            self._out.append(Send(Cancel(ev.job)))

    # -- outcomes ----------------------------------------------------------------------
    def _on_result_received(self, ev: ResultReceived) -> None:
        job = self.jobs.get(ev.job)
        if job is None or job.unfinished.pop(ev.seq, None) is None:
            return  # a duplicate (the chunk was sent again), or of a job that is gone
        self._out.append(Deliver(job.owner, ev.seq, ev.status, ev.payload, ev.elapsed))

    def _on_failure_received(self, ev: FailureReceived) -> None:
        job = self.jobs.get(ev.job)
        if job is not None and ev.seq < 0:  # the server refused the job itself
            del self.jobs[ev.job]
            self._out.append(
                FailJob(
                    job.owner,
                    AchillesError(
                        f"the achilles server at {self.where} refused job {ev.job}: {ev.detail}"
                    ),
                )
            )
            return
        if job is None or job.unfinished.pop(ev.seq, None) is None:
            return
        self._out.append(DeliverFailure(job.owner, ev.seq, ev.reason, ev.detail))


_HANDLERS: dict[type, Callable[[Session[Any], Any], None]] = {
    Started: Session._on_started,
    Connected: Session._on_connected,
    Disconnected: Session._on_disconnected,
    Refused: Session._on_refused,
    DeadlinePassed: Session._on_deadline_passed,
    Closing: Session._on_closing,
    JobOpened: Session._on_job_opened,
    ChunkMade: Session._on_chunk_made,
    CallMade: Session._on_call_made,
    CallAbandoned: Session._on_call_abandoned,
    JobEnded: Session._on_job_ended,
    JobCancelled: Session._on_job_cancelled,
    ResultReceived: Session._on_result_received,
    FailureReceived: Session._on_failure_received,
}
