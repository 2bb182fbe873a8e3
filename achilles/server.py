"""The server: authenticates peers, and runs the scheduler's instructions.

Each connection is a :class:`ServerProtocol`; all of them share one
:class:`~achilles.core.scheduler.Scheduler` through :class:`ServerFactory`. Payloads are
routed as opaque bytes: the server never unpickles anything.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol, task

from achilles.config import LOOPBACK, Settings, require_secret
from achilles.core import scheduler as sch
from achilles.errors import (
    AuthenticationError,
    ConfigError,
    ProtocolError,
    VersionMismatchError,
)
from achilles.net.connection import PYTHON, FramedProtocol
from achilles.protocol import auth, batching
from achilles.protocol.framing import Frame, split
from achilles.protocol.messages import (
    PROTOCOL_VERSION,
    ROLES,
    AuthReply,
    Cancel,
    Challenge,
    Chunk,
    Chunks,
    Cluster,
    Drain,
    End,
    ErrorFrame,
    Function,
    Heartbeat,
    JobFailed,
    Kill,
    Killed,
    Message,
    Result,
    Results,
    Status,
    StatusRequest,
    Submit,
    Tasks,
    Welcome,
)

log = logging.getLogger("achilles.server")

TICK = 1.0

#: most characters of a peer's own text (its Python version, name) put in a log line
SHOWN_MAX = 64


def shown(text: str, limit: int = SHOWN_MAX) -> str:
    """Peer-supplied text for a log line: quoted, control characters escaped (``repr``),
    cut to ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"

# What each role may send once authenticated.
ALLOWED: dict[str, tuple[type[Message], ...]] = {
    "node": (Result, Results, Heartbeat, Drain, ErrorFrame),
    "controller": (Submit, Chunk, Chunks, Cancel, End, Kill, StatusRequest, Heartbeat,
                   ErrorFrame),
    "admin": (Kill, StatusRequest, Heartbeat, ErrorFrame),
}


class ServerProtocol(FramedProtocol):
    factory: ServerFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        self.reader.max_payload = self.factory.settings.max_payload
        peer = self.transport.getPeer()
        self.peer_desc = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.peer_id = next(self.factory.ids)
        self.role = ""
        self.name = self.peer_desc
        self._handshake_timer = self.factory.clock.callLater(
            self.factory.settings.handshake_timeout, self._handshake_expired)
        self.factory.open_connections += 1
        if self.factory.open_connections > self.factory.settings.max_connections:
            log.warning("refused %s: over %d connections", self.peer_desc,
                        self.factory.settings.max_connections)
            return self.fail("too-many-connections", "the server is at its connection limit")
        self._nonce = auth.make_nonce(os.urandom(auth.NONCE_BYTES))
        self.send(Challenge(self._nonce, PROTOCOL_VERSION, PYTHON))

    def _handshake_expired(self) -> None:
        log.warning("%s did not authenticate within %g s; dropped", self.peer_desc,
                    self.factory.settings.handshake_timeout)
        self.fail("handshake-timeout", "authentication not completed in time")
        # fail() flushes the error frame, then closes; a peer that will not read it
        # (a full socket buffer) is cut off a moment later
        self.factory.clock.callLater(1.0, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.factory.reading += 1
        try:
            super().dataReceived(data)
        finally:
            self.factory.reading -= 1

    def read_done(self) -> None:
        self.factory.flush_batches()

    def connectionLost(self, reason: Any = None) -> None:
        if self._handshake_timer.active():
            self._handshake_timer.cancel()
        self.factory.open_connections -= 1
        self.factory.peer_lost(self, reason)

    def frameReceived(self, frame: Frame) -> None:
        msg = frame.msg
        if not self.authenticated:
            if not isinstance(msg, AuthReply):
                raise ProtocolError("not-authenticated",
                                    f"{msg.TYPE!r} frame before authentication")
            return self._authenticate(msg)
        if not isinstance(msg, ALLOWED[self.role]):
            raise ProtocolError("not-allowed", f"a {self.role} may not send {msg.TYPE!r}")
        self.factory.message(self, msg, frame.payload)

    def _authenticate(self, msg: AuthReply) -> None:
        secret = self.factory.secret
        try:
            if msg.role not in ROLES:
                raise ProtocolError("bad-role", f"unknown role {msg.role[:32]!r}")
            auth.check_versions(msg.version, msg.python, PYTHON,
                                f"{msg.role} {self.peer_desc}")
            expected = auth.peer_digest(secret, self._nonce, msg.nonce, msg.role, msg.username)
            auth.verify(expected, msg.digest, f"{msg.role} at {self.peer_desc}")
        except ProtocolError as exc:
            return self._refuse(msg, exc.code, exc.detail)
        except AuthenticationError as exc:
            code = "version-mismatch" if isinstance(exc, VersionMismatchError) else "auth-failed"
            return self._refuse(msg, code, str(exc))
        self._handshake_timer.cancel()
        self.authenticated_ok()
        self.role = msg.role
        self.name = msg.name[:200] or self.peer_desc
        self.send(Welcome(auth.server_digest(secret, self._nonce, msg.nonce), self.peer_id))
        self.factory.peer_joined(self, msg)

    def _refuse(self, msg: AuthReply, code: str, detail: str) -> None:
        """Refuse a handshake: one log line with the peer's address and both sides'
        versions (the peer's own text bounded and escaped), then the error frame."""
        log.warning("refused %s from %s (%s): peer achilles protocol %d, Python %s, name %s; "
                    "server achilles protocol %d, Python %s", shown(msg.role), self.peer_desc,
                    code, msg.version, shown(msg.python), shown(msg.name), PROTOCOL_VERSION,
                    PYTHON)
        self.fail(code, detail)


class ServerFactory(protocol.Factory):
    protocol = ServerProtocol  # type: ignore[assignment]

    def __init__(self, settings: Settings, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.settings = settings
        self.secret = require_secret(settings, "achilles-server")
        self.clock = clock
        self.open_connections = 0
        self.scheduler = sch.Scheduler()
        self.ids = itertools.count(1)
        self.peers: dict[int, ServerProtocol] = {}
        self.cluster = Cluster(0, 0)
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = clock
        # Tasks for a node and results for a controller made while handling one read are
        # held here and sent as one batch frame per peer and job (see flush_batches).
        self.reading = 0
        self._batches: dict[int, list[Any]] = {}
        self._handlers: dict[type, Callable[[ServerProtocol, Any, bytes], None]] = {
            Submit: self._on_submit, Chunk: self._on_chunk, Chunks: self._on_chunks,
            Cancel: self._on_cancel, End: self._on_end, Result: self._on_result,
            Results: self._on_results, Kill: self._on_kill,
            StatusRequest: self._on_status, Drain: self._on_drain,
            Heartbeat: self._on_heartbeat, ErrorFrame: self._on_error,
        }

    def startFactory(self) -> None:
        if not self._ticker.running:
            self._ticker.start(TICK, now=False)

    def stopFactory(self) -> None:
        if self._ticker.running:
            self._ticker.stop()

    # -- scheduler plumbing -----------------------------------------------------------
    def feed(self, event: Any) -> None:
        for ins in self.scheduler.handle(event, self.clock.seconds()):
            self._execute(ins)
        if not self.reading:  # a timer or a lost connection: nothing else will come
            self.flush_batches()

    def flush_batches(self) -> None:
        """Send the held tasks and results, batched (see :mod:`achilles.protocol.batching`)."""
        batches, self._batches = self._batches, {}
        for peer_id, items in batches.items():
            peer = self.peers.get(peer_id)
            if peer is None:
                continue
            # a peer is either a node (held tasks) or a controller (held results)
            kind = Tasks if isinstance(items[0], sch.SendTask) else Results
            for msg, payload in batching.frames(kind, items):
                peer.send(msg, payload)

    def _hold(self, peer_id: int, ins: Any) -> None:
        self._batches.setdefault(peer_id, []).append(ins)

    def _execute(self, ins: Any) -> None:
        if isinstance(ins, sch.SendTask):
            self._hold(ins.node, ins)
        elif isinstance(ins, sch.ForwardResult):
            self._hold(ins.owner, ins)
        elif isinstance(ins, sch.SendFunction):
            self._send(ins.node, Function(ins.job), ins.payload)
        elif isinstance(ins, sch.CancelOnNode):
            self._send(ins.node, Cancel(ins.job))
        elif isinstance(ins, sch.FailJob):
            log.warning("chunk %d of job %s failed: %s", ins.seq, ins.job, ins.detail)
            self._send(ins.owner, JobFailed(ins.job, ins.seq, ins.reason),
                       ins.detail.encode("utf-8"))
        elif isinstance(ins, sch.ClusterChanged):
            self.cluster = Cluster(ins.nodes, ins.slots)
            for peer in list(self.peers.values()):
                if peer.role == "controller":
                    self._send(peer.peer_id, self.cluster)
        elif isinstance(ins, sch.Refuse):
            refused = self.peers.get(ins.peer)
            log.warning("refused from %s: %s", refused.name if refused else ins.peer,
                        ins.reason)
            if ins.close and refused is not None:
                self._batches.pop(ins.peer, None)
                refused.fail("refused", ins.reason)

    def _send(self, peer_id: int, msg: Message, payload: bytes = b"") -> None:
        """Send one frame to a peer, after whatever is held for it (order is kept)."""
        if peer_id in self._batches:
            self.flush_batches()
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.send(msg, payload)

    def buildProtocol(self, addr: Any) -> ServerProtocol:  # type: ignore[override]
        proto: ServerProtocol = super().buildProtocol(addr)  # type: ignore[assignment]
        proto.clock = self.clock
        return proto

    def _tick(self) -> None:
        """Heartbeats both ways: a peer silent past the timeout is dropped (a frozen or
        cut-off node sends no FIN), which for a node requeues its chunks."""
        now = self.clock.seconds()
        for peer in list(self.peers.values()):
            silent = now - peer.last_heard
            if silent > self.settings.heartbeat_timeout:
                log.warning("%s %s lost: no heartbeat for %.1f s", peer.role, peer.name,
                            silent)
                peer.transport.abortConnection()
            else:
                peer.send(Heartbeat())

    # -- peers ------------------------------------------------------------------------
    def peer_joined(self, peer: ServerProtocol, msg: AuthReply) -> None:
        self.peers[peer.peer_id] = peer
        log.info("%s %s connected from %s", peer.role, peer.name, peer.peer_desc)
        if peer.role == "node":
            self.feed(sch.NodeJoined(peer.peer_id, msg.slots, peer.name))
        elif peer.role == "controller":
            peer.send(self.cluster)

    def peer_lost(self, peer: ServerProtocol, reason: Any) -> None:
        if self.peers.pop(peer.peer_id, None) is None:
            return
        log.info("%s %s disconnected", peer.role, peer.name)
        if peer.role == "node":
            node = self.scheduler.nodes.get(peer.peer_id)
            if node is not None and node.inflight:
                log.warning("node %s lost with %d chunk(s) in flight: requeued", peer.name,
                            len(node.inflight))
            self.feed(sch.NodeLost(peer.peer_id, "connection closed"))
        elif peer.role == "controller":
            for job in [j for j in self.scheduler.jobs.values() if j.owner == peer.peer_id]:
                self._log_job_end(job.id, -1, "cancelled (its controller left)")
            self.feed(sch.OwnerLost(peer.peer_id))

    def message(self, peer: ServerProtocol, msg: Message, payload: bytes) -> None:
        self._handlers[type(msg)](peer, msg, payload)

    # -- handlers ---------------------------------------------------------------------
    def _on_submit(self, peer: ServerProtocol, msg: Submit, payload: bytes) -> None:
        log.info("job %s submitted by %s (%s chunks)", msg.job[:8], peer.name,
                 msg.total if msg.total >= 0 else "?")
        self.feed(sch.JobSubmitted(msg.job, peer.peer_id, payload, msg.max_attempts,
                                   msg.timeout, msg.limit, msg.total, bool(msg.isolated)))

    def _log_job_end(self, job_id: str, owner: int, how: str) -> None:
        job = self.scheduler.jobs.get(job_id)
        if job is not None and (owner < 0 or job.owner == owner):
            log.info("job %s %s: %d chunks done in %.2f s, %d retries", job_id[:8], how,
                     job.done, self.clock.seconds() - job.submitted, job.retries)

    def _on_chunk(self, peer: ServerProtocol, msg: Chunk, payload: bytes) -> None:
        self.feed(sch.ChunkAdded(msg.job, msg.seq, payload, peer.peer_id))

    def _on_chunks(self, peer: ServerProtocol, msg: Chunks, payload: bytes) -> None:
        self.feed(sch.ChunksAdded(msg.job, msg.seqs, split(payload, msg.sizes), peer.peer_id))

    def _on_cancel(self, peer: ServerProtocol, msg: Cancel, payload: bytes) -> None:
        self._log_job_end(msg.job, peer.peer_id, "cancelled")
        self.feed(sch.JobCancelled(msg.job, peer.peer_id))

    def _on_end(self, peer: ServerProtocol, msg: End, payload: bytes) -> None:
        self._log_job_end(msg.job, peer.peer_id, "finished")
        self.feed(sch.JobEnded(msg.job, peer.peer_id))

    def _on_result(self, peer: ServerProtocol, msg: Result, payload: bytes) -> None:
        self.feed(sch.ResultReceived(peer.peer_id, msg.job, msg.seq, msg.status, payload,
                                     msg.elapsed))

    def _on_results(self, peer: ServerProtocol, msg: Results, payload: bytes) -> None:
        self.feed(sch.ResultsReceived(peer.peer_id, msg.job, msg.seqs, msg.statuses,
                                      split(payload, msg.sizes), msg.elapsed))

    def _on_drain(self, peer: ServerProtocol, msg: Drain, payload: bytes) -> None:
        log.info("node %s is leaving", peer.name)
        self.feed(sch.NodeDraining(peer.peer_id))

    def _on_kill(self, peer: ServerProtocol, msg: Kill, payload: bytes) -> None:
        nodes = [p for p in self.peers.values() if p.role == "node"]
        log.warning("kill requested by %s: stopping %d node(s)", peer.name, len(nodes))
        for node in nodes:
            node.send(Kill())
        peer.send(Killed(len(nodes)))

    def _on_status(self, peer: ServerProtocol, msg: StatusRequest, payload: bytes) -> None:
        snap = self.scheduler.snapshot()
        now = self.clock.seconds()
        for node in snap["nodes"]:
            proto = self.peers.get(node["id"])
            node["last_seen_age"] = round(now - proto.last_heard, 3) if proto else None
        snap["controllers"] = sum(1 for p in self.peers.values() if p.role == "controller")
        for job in snap["jobs"]:
            owner = self.peers.get(job["owner"])
            job["owner"] = owner.name if owner else str(job["owner"])
        peer.send(Status(), json.dumps(snap).encode("utf-8"))

    def _on_heartbeat(self, peer: ServerProtocol, msg: Heartbeat, payload: bytes) -> None:
        pass

    def _on_error(self, peer: ServerProtocol, msg: ErrorFrame, payload: bytes) -> None:
        log.warning("%s %s reported: %s %s", peer.role, peer.name, msg.code, msg.detail)


def listen(settings: Settings, reactor: Any = None) -> Any:
    """Start listening; return the listening port (``.getHost().port`` is the real port).

    Raises:
        ConfigError: no secret (unless insecure on loopback), or TLS half-configured.
    """
    if reactor is None:
        from twisted.internet import reactor
    if settings.insecure and not settings.secret_key and settings.host not in LOOPBACK:
        raise ConfigError("insecure mode (no secret) is only allowed on a loopback address, "
                          f"not on {settings.host!r}")
    if settings.insecure and not settings.secret_key:
        log.warning("INSECURE: no secret; any local process can use this server")
    factory = ServerFactory(settings, clock=reactor)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("TLS needs both --tls-cert (ACHILLES_TLS_CERT) and --tls-key "
                          "(ACHILLES_TLS_KEY)")
    if settings.tls_cert and settings.tls_key:
        from twisted.internet import ssl
        with open(settings.tls_cert, "rb") as c, open(settings.tls_key, "rb") as k:
            cert = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
        return reactor.listenSSL(settings.port, factory, cert.options(),
                                 interface=settings.host)
    return reactor.listenTCP(settings.port, factory, interface=settings.host)
