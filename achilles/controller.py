"""The controller: the reactor-side client in the user's process.

A :class:`Controller` owns one connection to a server (reconnecting with backoff) and
the jobs submitted through it. Each job is a :class:`JobHandle`: the sans-IO
:class:`~achilles.core.job.Job` behind a ``threading.Condition``, shared between the
reactor thread (which delivers results) and the pool's threads (which feed input and
consume output). Nothing here blocks; blocking lives in :mod:`achilles.pool`.

After a reconnect (the server restarted, or the network blinked) every job is
submitted again with the chunks it still holds; results are de-duplicated by sequence
number, so output stays exactly once.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import uuid
from collections import deque
from typing import Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer

from achilles.config import Settings, require_secret
from achilles.core.job import FAILED, AdaptiveChunker, Job, Outcome
from achilles.errors import AuthenticationError, ConnectionLostError
from achilles.net.connection import (
    TRANSIENT_REFUSALS,
    ClientFactory,
    ClientProtocol,
    client_endpoint,
)
from achilles.protocol.framing import runs, split
from achilles.protocol.messages import (
    Cancel,
    Chunk,
    Chunks,
    Cluster,
    End,
    ErrorFrame,
    JobFailed,
    Kill,
    Killed,
    Message,
    Result,
    Results,
    Status,
    StatusRequest,
    Submit,
)

log = logging.getLogger("achilles.controller")
_JITTER = random.Random()  # our own: reconnect jitter must not disturb the global RNG


class JobHandle:
    """One job, shared by the reactor thread and the pool's threads (under ``cond``)."""

    isolated = False  # the server keeps its chunks' attempt counts until the job ends

    def __init__(self, function: bytes, ordered: bool, window: int, max_attempts: int = 3,
                 timeout: float = 0.0, limit: int = 0, total: int = -1) -> None:
        self.id = uuid.uuid4().hex
        self.function = function
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.limit = limit
        self.total = total  # chunks, when the input's length is known
        self.core = Job(ordered, window)
        self.chunker = AdaptiveChunker()
        self.cond = threading.Condition()
        self.error: BaseException | None = None  # the connection failed for good
        self.cancelled = False

    # reactor thread ----------------------------------------------------------------
    def deliver(self, seq: int, status: str, payload: bytes, elapsed: float) -> None:
        with self.cond:
            pos = self.core.position(seq)
            if not self.core.on_result(seq, status, payload):
                return
            if pos is not None and status == "ok":
                self.chunker.observe(pos[1] - pos[0], elapsed)
                self.core.observe(elapsed)
            self.cond.notify_all()

    def deliver_failure(self, seq: int, detail: str) -> None:
        with self.cond:
            if not self.core.on_failed(seq, detail):
                return
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def unfinished(self) -> list[tuple[int, bytes]]:
        with self.cond:
            return self.core.unfinished()

    # any thread (callers hold cond) ------------------------------------------------------
    def take(self, limit: int | None = None) -> list[Outcome]:
        outs = self.core.take(limit)
        if outs:
            self.cond.notify_all()  # room in the window for the feeder
        return outs


class ApplyHandle:
    """A long-lived job for a pool's ``apply``/``apply_async`` calls of one function.

    Each call is one chunk of it, and each chunk stands alone (``isolated``): a call
    that raises, or whose worker keeps dying, fails that call only. Sharing the job
    saves each call a Submit, the function's trip to a node, an End and a Cancel:
    four of the eight frames an apply took, and the reactor turns they cost.

    A call is held (``calls``) until its outcome arrives, so that it is sent again
    after a reconnect; an outcome settles its call once (a duplicate finds none).
    """

    isolated = True
    total = -1

    def __init__(self, function: bytes, max_attempts: int = 3, timeout: float = 0.0,
                 limit: int = 0) -> None:
        self.id = uuid.uuid4().hex
        self.function = function
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.limit = limit
        self.cond = threading.Condition()
        self.calls: dict[int, tuple[bytes, Callable[[str, Any], None]]] = {}
        self._seqs = itertools.count()
        self.error: BaseException | None = None
        self.cancelled = False
        self.retiring = False  # evicted from its pool's cache: ends when idle
        self.on_idle: Callable[["ApplyHandle"], None] | None = None

    def add(self, payload: bytes, settle: Callable[[str, Any], None]) -> int:
        """A new call; ``settle(status, value)`` runs (in the reactor thread) when its
        outcome arrives: ``ok``/``error`` with the result chunk; FAILED with the
        server's text (bytes), or with the exception that failed the connection."""
        with self.cond:
            seq = next(self._seqs)
            self.calls[seq] = (payload, settle)
            return seq

    def abandon(self, seq: int) -> bool:
        """Stop waiting for a call (Ctrl-C); True if no other call is pending."""
        with self.cond:
            self.calls.pop(seq, None)
            self.cond.notify_all()
            return not self.calls

    def _settle(self, seq: int, status: str, payload: bytes) -> None:
        with self.cond:
            call = self.calls.pop(seq, None)
            idle = not self.calls
            if idle:
                self.cond.notify_all()
        if call is not None:
            call[1](status, payload)
            if idle and self.retiring and self.on_idle is not None:
                self.on_idle(self)

    # the JobHandle interface the Controller uses ------------------------------------
    def deliver(self, seq: int, status: str, payload: bytes, elapsed: float) -> None:
        self._settle(seq, status, payload)

    def deliver_failure(self, seq: int, detail: str) -> None:
        self._settle(seq, FAILED, detail.encode("utf-8"))

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            calls, self.calls = self.calls, {}
            self.cond.notify_all()
        for _, settle in calls.values():
            settle(FAILED, exc)

    def unfinished(self) -> list[tuple[int, bytes]]:
        with self.cond:
            return [(seq, call[0]) for seq, call in self.calls.items()]


class ControllerProtocol(ClientProtocol):
    role = "controller"
    owner: "Controller"

    def messageReceived(self, msg: Message, payload: bytes) -> None:
        self.owner.message(msg, payload)


class Controller:
    """A connection to one server, shared by every pool that targets it."""

    def __init__(self, settings: Settings, reactor: Any, role: str = "controller") -> None:
        self.settings = settings
        self.reactor = reactor
        self.jobs: dict[str, JobHandle] = {}
        self.proto: ControllerProtocol | None = None
        self.cluster = Cluster(0, 0)
        self.fatal: BaseException | None = None
        self._ready: list[defer.Deferred[Any]] = []
        self._replies: dict[type, deque[defer.Deferred[Any]]] = {
            Status: deque(), Killed: deque()}
        self._give_up: Any = None
        self._chunks_out: list[tuple[JobHandle, int, bytes]] = []
        self.closing = False
        self.users = 0  # pools sharing this connection (see pool._controller)
        endpoint = client_endpoint(reactor, settings)
        cls = type("Proto", (ControllerProtocol,), {"role": role})
        factory = ClientFactory(cls, self, secret=require_secret(settings, "a controller"),
                                clock=reactor,
                                username=settings.username,
                                heartbeat_interval=settings.heartbeat_interval,
                                heartbeat_timeout=settings.heartbeat_timeout)
        self.service = ClientService(endpoint, factory, clock=reactor,
                                     retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0,
                                                               jitter=_JITTER.random))
        self.service.startService()
        self._arm_give_up()
        reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)

    def _shutting_down(self) -> None:
        self.closing = True

    # -- connection -------------------------------------------------------------------
    def _arm_give_up(self) -> None:
        if self._give_up is None or not self._give_up.active():
            self._give_up = self.reactor.callLater(self.settings.reconnect_timeout,
                                                   self._unreachable)

    def _unreachable(self) -> None:
        self._fail_all(ConnectionLostError(
            f"cannot reach the achilles server at {self.settings.host}:"
            f"{self.settings.port} (tried for {self.settings.reconnect_timeout:g} s)"),
            final=False)

    def connected(self, proto: ControllerProtocol) -> None:
        self.proto = proto
        self._chunks_out.clear()  # every unfinished chunk is sent again below
        if self._give_up is not None and self._give_up.active():
            self._give_up.cancel()
        for handle in list(self.jobs.values()):
            self._send_submit(handle)
            for seq, payload in handle.unfinished():
                proto.send(Chunk(handle.id, seq), payload)
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.callback(self)

    def disconnected(self, proto: ControllerProtocol) -> None:
        if self.proto is proto:
            self.proto = None
            self.cluster = Cluster(0, 0)
            if self.fatal is None and not self.closing:
                log.warning("lost the achilles server; reconnecting")
                self._arm_give_up()
        for replies in self._replies.values():
            while replies:
                replies.popleft().errback(ConnectionLostError("lost the server"))

    def refused(self, err: ErrorFrame) -> None:
        if err.code in TRANSIENT_REFUSALS:
            log.warning("the achilles server is busy (%s); retrying", err.detail)
            return
        self.service.stopService()
        self._fail_all(AuthenticationError(
            f"the achilles server at {self.settings.host}:{self.settings.port} refused "
            f"this controller: {err.detail}"), final=True)

    def _fail_all(self, exc: BaseException, final: bool) -> None:
        if final:
            self.fatal = exc
        for handle in list(self.jobs.values()):
            handle.fail(exc)
        self.jobs.clear()
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.errback(exc)

    def when_ready(self) -> defer.Deferred[Any]:
        """Fires once authenticated (at once if already)."""
        if self.fatal is not None:
            return defer.fail(self.fatal)
        if self.proto is not None:
            return defer.succeed(self)
        d: defer.Deferred[Any] = defer.Deferred()
        self._ready.append(d)
        return d

    def close(self) -> defer.Deferred[Any]:
        self.closing = True
        if self._give_up is not None and self._give_up.active():
            self._give_up.cancel()
        return self.service.stopService()

    # -- jobs -------------------------------------------------------------------------
    def _send(self, msg: Message, payload: bytes = b"") -> None:
        if self._chunks_out:  # keep the order: a job's chunks before its End or Cancel
            self._send_chunks()
        if self.proto is not None:
            self.proto.send(msg, payload)

    def _send_submit(self, handle: JobHandle) -> None:
        self._send(Submit(handle.id, handle.max_attempts, handle.timeout, handle.limit,
                          handle.total, int(handle.isolated)), handle.function)

    def submit(self, handle: JobHandle) -> None:
        if self.fatal is not None:
            return handle.fail(self.fatal)
        self.jobs[handle.id] = handle
        if self.proto is None:
            self._arm_give_up()  # a job waits for the server at most reconnect_timeout
        self._send_submit(handle)

    def send_call(self, handle: ApplyHandle, seq: int, payload: bytes) -> None:
        """One apply call: its job is submitted first if this connection does not have
        it (the first call, or after a failure), and the chunk leaves at once."""
        if handle.error is not None:  # failed meanwhile: settle this call too
            return handle.fail(handle.error)
        if handle.id not in self.jobs:
            self.submit(handle)  # type: ignore[arg-type]
            if handle.id not in self.jobs:
                return
        self._send(Chunk(handle.id, seq), payload)

    def send_call_now(self, handle: ApplyHandle, seq: int, payload: bytes) -> bool:
        """``send_call`` from the caller's thread, straight to the socket, when this
        connection already has the job and nothing is queued to be written; False if it
        must go through the reactor. (A call sent on a connection that then drops is
        sent again on the next, as every unfinished call is.)"""
        proto = self.proto
        if proto is None or handle.error is not None or handle.id not in self.jobs:
            return False
        return proto.send_now(Chunk(handle.id, seq), payload)

    def send_chunk(self, handle: JobHandle, seq: int, payload: bytes) -> None:
        """Chunks go out at the end of this reactor turn; those of one job that the
        feeder made meanwhile, in one frame."""
        if handle.id not in self.jobs or self.proto is None:
            return  # sent with the job's other unfinished chunks when it reconnects
        if not self._chunks_out:
            self.reactor.callLater(0, self._send_chunks)
        self._chunks_out.append((handle, seq, payload))

    def _send_chunks(self) -> None:
        held, self._chunks_out = self._chunks_out, []
        proto = self.proto
        if proto is None:
            return
        held = [h for h in held if h[0].id in self.jobs]
        for group in runs(held, lambda h: h[0].id):
            if len(group) == 1:
                proto.send(Chunk(group[0][0].id, group[0][1]), group[0][2])
            else:
                proto.send(Chunks(group[0][0].id, [g[1] for g in group],
                                  [len(g[2]) for g in group]), b"".join(g[2] for g in group))

    def end(self, handle: JobHandle) -> None:
        if self.jobs.pop(handle.id, None) is not None:
            self._send(End(handle.id))

    def cancel(self, handle: JobHandle) -> None:
        if self.jobs.pop(handle.id, None) is not None:
            self._send(Cancel(handle.id))

    # -- admin ------------------------------------------------------------------------
    def request(self, msg: Message, reply: type) -> defer.Deferred[Any]:
        def send(_: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            self._replies[reply].append(d)
            self._send(msg)
            return d
        return self.when_ready().addCallback(send)

    def status(self) -> defer.Deferred[Any]:
        return self.request(StatusRequest(), Status)

    def kill(self) -> defer.Deferred[Any]:
        return self.request(Kill(), Killed)

    # -- frames -----------------------------------------------------------------------
    def message(self, msg: Message, payload: bytes) -> None:
        if isinstance(msg, Result):
            handle = self.jobs.get(msg.job)
            if handle is not None:
                handle.deliver(msg.seq, msg.status, payload, msg.elapsed)
        elif isinstance(msg, Results):
            handle = self.jobs.get(msg.job)
            for seq, piece, status, elapsed in zip(msg.seqs, split(payload, msg.sizes),
                                                   msg.statuses, msg.elapsed):
                if handle is None or handle.id not in self.jobs:
                    break  # the job ended (or failed) on an earlier item
                handle.deliver(seq, status, piece, elapsed)
        elif isinstance(msg, JobFailed):
            handle = self.jobs.get(msg.job)
            if handle is not None:
                handle.deliver_failure(msg.seq, payload.decode("utf-8", "replace"))
        elif isinstance(msg, Cluster):
            self.cluster = msg
        elif isinstance(msg, Status):
            self._reply(Status, json.loads(payload))
        elif isinstance(msg, Killed):
            self._reply(Killed, msg.nodes)
        elif isinstance(msg, ErrorFrame):
            log.error("server says: %s %s", msg.code, msg.detail)

    def _reply(self, kind: type, value: Any) -> None:
        if self._replies[kind]:
            self._replies[kind].popleft().callback(value)
