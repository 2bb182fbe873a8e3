"""The server's side of one connection: the handshake, then frames handed to the
:class:`~achilles.server.router.ServerFactory` (which owns the scheduler)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from achilles.errors import (
    AuthenticationError,
    ProtocolError,
    VersionMismatchError,
)
from achilles.net.connection import PYTHON, FramedProtocol, at_turn_end
from achilles.protocol import auth
from achilles.protocol.framing import Frame
from achilles.protocol.messages import (
    PROTOCOL_VERSION,
    ROLES,
    AuthReply,
    Cancel,
    Challenge,
    Chunk,
    Chunks,
    Drain,
    End,
    ErrorFrame,
    Failure,
    Heartbeat,
    Hello,
    Kill,
    Message,
    NodeInfo,
    NodeStats,
    Output,
    Result,
    Results,
    StatusRequest,
    Submit,
    Welcome,
)
from achilles.protocol.text import shown

if TYPE_CHECKING:
    from achilles.server.router import ServerFactory

log = logging.getLogger("achilles.server")

# What each role may send once authenticated.
ALLOWED: dict[str, tuple[type[Message], ...]] = {
    "node": (
        Result,
        Results,
        Output,
        Heartbeat,
        Drain,
        NodeInfo,
        NodeStats,
        Failure,
        ErrorFrame,
    ),
    "controller": (Submit, Chunk, Chunks, Cancel, End, Kill, StatusRequest, Heartbeat, ErrorFrame),
    "admin": (Kill, StatusRequest, Heartbeat, ErrorFrame),
}


class ServerProtocol(FramedProtocol):
    factory: ServerFactory  # set by the factory that builds it
    #: the channel binding: the fingerprint of our TLS certificate if this connection is
    #: TLS ("" on plain TCP or in memory); set by the port's first-byte sniffer
    binding = ""
    #: why this plain connection is refused (plain TCP from another machine), if it is
    plain_refusal = ""
    _hello = False  # its Hello was read (one is allowed, before the AuthReply)
    _closed = False  # connectionLost ran (``connected`` is never cleared by a close)
    heartbeat_sent = 0.0  # when the factory's tick last sent it a heartbeat
    #: what a node said of itself (its NodeInfo frame, escaped), for ``achilles status``
    info: dict[str, Any]

    def connectionMade(self) -> None:
        super().connectionMade()
        self.reader.max_payload = self.factory.settings.max_payload
        peer = self.transport.getPeer()
        self.peer_host = str(getattr(peer, "host", "?"))
        self.peer_desc = f"{self.peer_host}:{getattr(peer, 'port', '?')}"
        self.peer_id = next(self.factory.ids)
        self.info = {}
        self.role = ""
        self.name = self.peer_desc
        self._handshake_timer = self.factory.clock.callLater(
            self.factory.settings.handshake_timeout, self._handshake_expired
        )
        self.factory.open_connections += 1
        if self.factory.open_connections > self.factory.settings.max_connections:
            log.warning(
                "refused %s: over %d connections",
                self.peer_desc,
                self.factory.settings.max_connections,
            )
            return self.fail("too-many-connections", "the server is at its connection limit")
        if self.plain_refusal:
            log.warning("refused plain TCP from %s: TLS is required off loopback", self.peer_desc)
            return self.fail("tls-required", self.plain_refusal)
        if self.binding == "" and not self.factory.in_memory(self):
            self.factory.plain_accepted(self.peer_host)
        delay = self.factory.throttle.delay(self.peer_host, self.factory.clock.seconds())
        if delay > 0:
            return self.fail(
                "throttled",
                f"too many failed logins from {self.peer_host}; try again in {delay:.0f} s",
            )
        self._nonce = auth.make_nonce(os.urandom(auth.NONCE_BYTES))
        self.send(Challenge(self._nonce, PROTOCOL_VERSION, PYTHON))

    def _handshake_expired(self) -> None:
        log.warning(
            "%s did not authenticate within %g s; dropped",
            self.peer_desc,
            self.factory.settings.handshake_timeout,
        )
        self.fail("handshake-timeout", "authentication not completed in time")
        # fail() flushes the error frame, then closes; a peer that will not read it
        # (a full socket buffer) is cut off a moment later
        self.factory.clock.callLater(1.0, self._abort_if_open)

    def _abort_if_open(self) -> None:
        # ``connected`` is not cleared by a close; ``_closed`` is (see connectionLost)
        if not self._closed and self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.factory.reading += 1
        try:
            super().dataReceived(data)
        finally:
            self.factory.reading -= 1

    def read_done(self) -> None:
        reactor = getattr(self.transport, "reactor", None)
        if reactor is None or self._socket is None:  # in memory, or TLS: at once
            self.factory.flush_batches()
        else:  # with the reads of the other peers ready now: fewer, fuller batches
            at_turn_end(reactor, self.factory.flush_batches)

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        if self._handshake_timer.active():
            self._handshake_timer.cancel()
        self.factory.open_connections -= 1
        self.factory.peer_lost(self, reason)

    def frameReceived(self, frame: Frame) -> None:
        msg = frame.msg
        if not self.authenticated:
            if isinstance(msg, Hello) and not self._hello:
                self._hello = True
                return None
            if not isinstance(msg, AuthReply):
                raise ProtocolError(
                    "not-authenticated", f"{msg.TYPE!r} frame before authentication"
                )
            return self._authenticate(msg)
        if not isinstance(msg, ALLOWED[self.role]):
            raise ProtocolError("not-allowed", f"a {self.role} may not send {msg.TYPE!r}")
        self.factory.message(self, msg, frame.payload)

    def _transcript(self, msg: AuthReply) -> auth.Transcript:
        return auth.Transcript(
            self._nonce,
            msg.nonce,
            msg.role,
            msg.username,
            msg.name,
            msg.version,
            msg.python,
            PYTHON,
            self.binding,
            msg.session,
        )

    def _authenticate(self, msg: AuthReply) -> None:
        """The peer's proof first (it also proves the refusals that follow), then what
        it claims: role, names, nonce, versions."""
        secret, t = self.factory.secret, self._transcript(msg)
        try:
            auth.verify(
                auth.peer_digest(secret, t), msg.digest, f"{shown(msg.role)} at {self.peer_desc}"
            )
        except AuthenticationError as exc:
            self.factory.login_failed(self.peer_host, str(exc))
            return self._refuse(msg, t, "auth-failed", str(exc))
        try:
            if msg.role not in ROLES:
                raise ProtocolError("bad-role", f"unknown role {msg.role[:32]!r}")
            auth.check_nonce(msg.nonce, "the peer's")
            auth.check_name(msg.username, "the username")
            auth.check_name(msg.name, "the node name")
            auth.check_session(msg.session)
            auth.check_versions(msg.version, msg.python, PYTHON, f"{msg.role} {self.peer_desc}")
        except ProtocolError as exc:
            return self._refuse(msg, t, exc.code, exc.detail)
        except VersionMismatchError as exc:
            return self._refuse(msg, t, "version-mismatch", str(exc))
        self.factory.throttle.succeeded(self.peer_host)
        self._handshake_timer.cancel()
        self.authenticated_ok()
        self.role = msg.role
        self.name = msg.name
        self.session = msg.session
        self.send(Welcome(auth.server_digest(secret, t, self.peer_id), self.peer_id))
        self.factory.peer_joined(self, msg)

    def _refuse(self, msg: AuthReply, t: auth.Transcript, code: str, detail: str) -> None:
        """Refuse a handshake, with a proof the peer can check if it holds the secret
        (then, and only then, the refusal is final for it). Logged with the peer's
        address and both sides' versions, the peer's own text bounded and escaped; failed
        logins from one address are counted and logged once per interval instead."""
        if code != "auth-failed":
            log.warning(
                "refused %s from %s (%s): peer achilles protocol %d, Python %s, "
                "name %s; server achilles protocol %d, Python %s",
                shown(msg.role),
                self.peer_desc,
                code,
                msg.version,
                shown(msg.python),
                shown(msg.name),
                PROTOCOL_VERSION,
                PYTHON,
            )
        proof = auth.refusal_digest(self.factory.secret, t, code)
        self.send(ErrorFrame(code, detail, proof))
        self._flush()
        self.transport.loseConnection()
