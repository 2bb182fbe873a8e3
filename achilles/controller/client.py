"""The controller's Twisted shell: one connection to a server, and the jobs sent on it.

A :class:`Controller` connects (reconnecting with backoff), feeds what happens to its
sans-IO :class:`~achilles.core.session.Session` and carries out the instructions it
gets back: frames to write, outcomes to deliver to the jobs' handles, the reconnect
deadline. After a reconnect (the server restarted, or the network blinked) the session
submits every job again with exactly its unfinished chunks; results are de-duplicated
by sequence number, so output stays exactly once. Nothing here blocks; blocking lives
in :mod:`achilles.pool`.

Threads: everything runs in the reactor thread except ``send_call_now``, which an
``apply`` calls from its own thread. ``_lock`` serialises the session's ``handle``
between the two; it is held for nothing else, so it nests with no other lock.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory

from achilles.config import Settings, require_secret
from achilles.controller import output
from achilles.controller.handles import ApplyHandle, Handle
from achilles.core import session as ses
from achilles.errors import ConnectionLostError
from achilles.net.connection import (
    TRANSIENT_REFUSALS,
    ClientFactory,
    ClientProtocol,
    ReportingEndpoint,
    client_endpoint,
    describe_connect_error,
)
from achilles.protocol import auth, batching
from achilles.protocol.framing import split
from achilles.protocol.messages import (
    Chunks,
    Cluster,
    ErrorFrame,
    JobFailed,
    Kill,
    Killed,
    Message,
    Output,
    Result,
    Results,
    Status,
    StatusRequest,
)
from achilles.protocol.text import shown

log = logging.getLogger("achilles.controller")
_JITTER = random.Random()  # our own: reconnect jitter must not disturb the global RNG
#: seconds between two warnings of a controller that cannot reach its server again
CONNECT_WARN_INTERVAL = 10.0
#: seconds a job may wait with no node in the cluster before the caller is told, and
#: then between two such warnings
NO_NODE_WARN = 3.0
NO_NODE_REPEAT = 30.0


class ControllerProtocol(ClientProtocol):
    """The connection: frames go to the owning Controller."""

    role = "controller"
    owner: Controller

    def messageReceived(self, msg: Message, payload: bytes) -> None:
        self.owner.message(msg, payload)


class Controller:
    """A connection to one server, shared by every pool that targets it."""

    def __init__(self, settings: Settings, reactor: Any, role: str = "controller") -> None:
        self.settings = settings
        self.reactor = reactor
        self.session: ses.Session[Handle] = ses.Session(
            f"{settings.host}:{settings.port}", settings.reconnect_timeout
        )
        self._lock = threading.Lock()
        self.proto: ControllerProtocol | None = None
        self.cluster = Cluster(0, 0)
        self._ready: list[defer.Deferred[Any]] = []
        self._replies: dict[type, deque[defer.Deferred[Any]]] = {Status: deque(), Killed: deque()}
        self._deadline: Any = None
        self._chunks_out: list[ses.QueueChunk] = []
        self.users = 0  # pools sharing this connection (see pool.connections)
        endpoint: Any = ReportingEndpoint(client_endpoint(reactor, settings), self._attempt_failed)
        self._connect_error: BaseException | None = None  # the first attempt failed
        self._warned_at = -1e9  # when a failed attempt was last logged
        self._no_node_check: Any = None  # the pending look for "no node, jobs waiting"
        self._no_node_warned = -1e9
        cls = type("Proto", (ControllerProtocol,), {"role": role})
        factory = ClientFactory(
            cls,
            self,
            secret=require_secret(settings, "a controller"),
            clock=reactor,
            username=settings.username,
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_timeout=settings.heartbeat_timeout,
            # the same on every reconnect: the server gives this
            # controller its jobs back (see AuthReply.session)
            session=auth.make_session(os.urandom(16)),
        )
        self.service = ClientService(
            endpoint,
            cast(IProtocolFactory, factory),
            clock=reactor,
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0, jitter=_JITTER.random),
        )
        self._run(ses.Started())  # the deadline runs before the first attempt can end
        self.service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", self._run, ses.Closing())

    @property
    def fatal(self) -> BaseException | None:
        """The final refusal that ended this connection, if any (or the failure of its
        very first attempt to connect)."""
        return self.session.fatal or self._connect_error

    def _attempt_failed(self, reason: Any) -> None:
        """An attempt to connect failed. Before this controller ever connected, that is
        said at once: whoever waits for it (a new Pool, ``achilles status``) fails with
        the address and the reason, and no retry follows. Once it has connected (jobs
        may be open), it keeps retrying until the reconnect deadline, saying so every
        CONNECT_WARN_INTERVAL seconds."""
        where = f"{self.settings.host}:{self.settings.port}"
        why = describe_connect_error(reason)
        if not self.session.ever_connected and self.session.fatal is None:
            self._connect_error = ConnectionLostError(f"cannot connect to {where}: {why}")
            self.service.stopService()
            waiting, self._ready = self._ready, []
            for d in waiting:
                d.errback(self._connect_error)
            return
        now = self.reactor.seconds()
        if now - self._warned_at >= CONNECT_WARN_INTERVAL:
            self._warned_at = now
            log.warning(
                "cannot connect to the achilles server at %s: %s; retrying (open jobs "
                "wait for it for up to %g s)",
                where,
                why,
                self.settings.reconnect_timeout,
            )

    # -- the session -------------------------------------------------------------------
    def _run(self, event: ses.Event[Handle]) -> None:
        with self._lock:
            out = self.session.handle(event)
        self._execute(out)

    def _execute(self, out: list[ses.Instruction[Handle]]) -> None:
        for ins in out:
            if isinstance(ins, ses.Deliver):
                ins.owner.deliver(ins.seq, ins.status, ins.payload, ins.elapsed)
            elif isinstance(ins, ses.QueueChunk):
                self._queue_chunk(ins)
            elif isinstance(ins, ses.Send):
                self._send(ins.msg, ins.payload)
            elif isinstance(ins, ses.DeliverFailure):
                ins.owner.deliver_failure(ins.seq, ins.reason, ins.detail)
            elif isinstance(ins, ses.FailJob):
                ins.owner.fail(ins.error)
            else:
                self._execute_other(ins)

    def _execute_other(self, ins: ses.Instruction[Handle]) -> None:
        if isinstance(ins, ses.Ready):
            waiting, self._ready = self._ready, []
            for d in waiting:
                d.callback(self)
        elif isinstance(ins, ses.FailWaiters):
            waiting, self._ready = self._ready, []
            for d in waiting:
                d.errback(ins.error)
        elif isinstance(ins, ses.StartDeadline):
            self._deadline = self.reactor.callLater(ins.delay, self._run, ses.DeadlinePassed())
        elif isinstance(ins, ses.CancelDeadline):
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
        elif isinstance(ins, ses.StopReconnecting):
            self.service.stopService()
        elif isinstance(ins, ses.Warn):
            log.warning("%s", ins.text)

    # -- connection -------------------------------------------------------------------
    def connected(self, proto: ControllerProtocol) -> None:
        """Authenticated both ways: every job goes again, then the waiters."""
        with self._lock:
            self.proto = proto
            out = self.session.handle(ses.Connected())
        self._chunks_out.clear()  # every unfinished chunk is sent again now
        self._execute(out)

    def disconnected(self, proto: ControllerProtocol) -> None:
        """A connection (or an attempt at one) ended; pending admin replies fail."""
        if self.proto is proto:
            with self._lock:
                self.proto = None
                out = self.session.handle(ses.Disconnected())
            self.cluster = Cluster(0, 0)
            self._execute(out)
        for replies in self._replies.values():
            while replies:
                replies.popleft().errback(ConnectionLostError("lost the server"))

    def refused(self, err: ErrorFrame, proven: bool = True) -> None:
        """The server refused us: retry if it only said "not now" (or has not proved
        itself), else give up."""
        self._run(
            ses.Refused(
                err.detail,
                err.code in TRANSIENT_REFUSALS or not proven,
                unproven_auth=err.code == "auth-failed" and not proven,
            )
        )

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
        """Stop the connection and reconnecting; fires once closed."""
        if self._no_node_check is not None and self._no_node_check.active():
            self._no_node_check.cancel()
        self._no_node_check = None
        self._run(ses.Closing())
        return self.service.stopService()

    # -- jobs (reactor thread) ----------------------------------------------------------
    def _send(self, msg: Message, payload: bytes = b"") -> None:
        if self._chunks_out:  # keep the order: a job's chunks before its End or Cancel
            self._send_chunks()
        if self.proto is not None:
            self.proto.send(msg, payload)

    def submit(self, handle: Handle) -> None:
        """Open a job (sent now, or when connected)."""
        self._run(ses.JobOpened(handle, handle.submit_frame(), handle.function))
        self._watch_for_nodes()

    def _watch_for_nodes(self) -> None:
        """While the cluster has no node, look again in NO_NODE_WARN seconds whether
        jobs are waiting for one, and say so."""
        if self.cluster.nodes or self._no_node_check is not None:
            return
        self._no_node_check = self.reactor.callLater(NO_NODE_WARN, self._no_node)

    def _no_node(self) -> None:
        self._no_node_check = None
        if self.cluster.nodes or not self.session.jobs or self.session.closing:
            return
        now = self.reactor.seconds()
        if now - self._no_node_warned >= NO_NODE_REPEAT:
            self._no_node_warned = now
            log.warning(
                "no node connected to the cluster at %s:%s; waiting (%d job(s) run when "
                "one connects: `achilles node --host SERVER`)",
                self.settings.host,
                self.settings.port,
                len(self.session.jobs),
            )
        self._watch_for_nodes()

    def send_call(self, handle: ApplyHandle, seq: int, payload: bytes) -> None:
        """One apply call: its job is submitted first if this connection does not have
        it (the first call, or after a failure), and the chunk leaves at once."""
        if handle.error is not None:  # failed meanwhile: settle this call too
            return handle.fail(handle.error)
        self._run(ses.CallMade(handle, handle.submit_frame(), handle.function, seq, payload))
        self._watch_for_nodes()

    def send_call_now(self, handle: ApplyHandle, seq: int, payload: bytes) -> bool:
        """``send_call`` from the caller's thread, straight to the socket, when this
        connection already has the job and nothing is queued to be written; False if it
        must go through the reactor. (The session holds the call first, so a call sent
        on a connection that then drops is sent again on the next.)"""
        if handle.error is not None:
            return False
        with self._lock:
            proto = self.proto
            if proto is None or not self.session.holds(handle.id):
                return False
            out = self.session.handle(
                ses.CallMade(handle, handle.submit_frame(), handle.function, seq, payload)
            )
        [send] = out  # connected, and the job held: the chunk's frame, nothing else
        assert isinstance(send, ses.Send)
        return proto.send_now(send.msg, send.payload)

    def forget_call(self, handle: Handle, seq: int) -> None:
        """Nobody waits for this apply call any more: not sent again."""
        self._run(ses.CallAbandoned(handle.id, seq))

    def send_chunk(self, handle: Handle, seq: int, payload: bytes) -> None:
        """A feeder's chunk: held until its result; sent at the end of this reactor
        turn, with those of its job that the feeder made meanwhile, in one frame."""
        self._run(ses.ChunkMade(handle.id, seq, payload))

    def _queue_chunk(self, item: ses.QueueChunk) -> None:
        if not self._chunks_out:
            self.reactor.callLater(0, self._send_chunks)
        self._chunks_out.append(item)

    def _send_chunks(self) -> None:
        held, self._chunks_out = self._chunks_out, []
        proto = self.proto
        if proto is None:
            return
        held = [h for h in held if self.session.holds(h.job)]
        for msg, payload in batching.frames(Chunks, held):
            proto.send(msg, payload)

    def end(self, handle: Handle) -> None:
        """The pool has every outcome of the job: the server may forget it."""
        self._run(ses.JobEnded(handle.id))

    def cancel(self, handle: Handle) -> None:
        """The pool gave up on the job: the server drops its work."""
        self._run(ses.JobCancelled(handle.id))

    # -- admin ------------------------------------------------------------------------
    def request(self, msg: Message, reply: type) -> defer.Deferred[Any]:
        """Send ``msg`` once connected; fires with the next ``reply`` frame's value."""

        def send(_: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            self._replies[reply].append(d)
            self._send(msg)
            return d

        return self.when_ready().addCallback(send)

    def status(self) -> defer.Deferred[Any]:
        """The cluster's status document."""
        return self.request(StatusRequest(), Status)

    def kill(self) -> defer.Deferred[Any]:
        """Stop every node; fires with how many were told to."""
        return self.request(Kill(), Killed)

    # -- frames -----------------------------------------------------------------------
    def message(self, msg: Message, payload: bytes) -> None:
        """A frame from the server (dispatched by table, as in the server and node)."""
        handler = _HANDLERS.get(type(msg))
        if handler is not None:  # heartbeats ask nothing of us
            handler(self, msg, payload)

    def _on_result(self, msg: Result, payload: bytes) -> None:
        self._run(ses.ResultReceived(msg.job, msg.seq, msg.status, payload, msg.elapsed))

    def _on_results(self, msg: Results, payload: bytes) -> None:
        job = msg.job
        for seq, piece, status, elapsed in zip(
            msg.seqs, split(payload, msg.sizes), msg.statuses, msg.elapsed
        ):
            if not self.session.holds(job):
                break  # the job ended (or failed) on an earlier item
            self._run(ses.ResultReceived(job, seq, status, piece, elapsed))

    def _on_job_failed(self, msg: JobFailed, payload: bytes) -> None:
        self._run(
            ses.FailureReceived(msg.job, msg.seq, msg.reason, payload.decode("utf-8", "replace"))
        )

    def _on_output(self, msg: Output, payload: bytes) -> None:
        """What a chunk of one of our jobs printed: shown now (before its result, which
        the server forwards after it), for a job still held."""
        held = self.session.jobs.get(msg.job)
        if held is not None:
            context = getattr(held.owner, "output_context", None)
            output.show(msg.node, payload, msg.dropped, context)

    def _on_cluster(self, msg: Cluster, payload: bytes) -> None:
        self.cluster = msg
        if not msg.nodes and self.session.jobs:  # the last node left (killCluster?)
            self._watch_for_nodes()

    def _on_status(self, msg: Status, payload: bytes) -> None:
        self._reply(Status, json.loads(payload))

    def _on_killed(self, msg: Killed, payload: bytes) -> None:
        self._reply(Killed, msg.nodes)

    def _on_error(self, msg: ErrorFrame, payload: bytes) -> None:
        log.error("server says: %s %s", msg.code, shown(msg.detail, 200))

    def _reply(self, kind: type, value: Any) -> None:
        if self._replies[kind]:
            self._replies[kind].popleft().callback(value)


#: frame type -> handler
_HANDLERS: dict[type, Callable[[Controller, Any, bytes], None]] = {
    Result: Controller._on_result,
    Results: Controller._on_results,
    JobFailed: Controller._on_job_failed,
    Output: Controller._on_output,
    Cluster: Controller._on_cluster,
    Status: Controller._on_status,
    Killed: Controller._on_killed,
    ErrorFrame: Controller._on_error,
}
