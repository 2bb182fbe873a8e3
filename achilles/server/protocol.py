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
from achilles.net.connection import PYTHON, FramedProtocol
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
    Heartbeat,
    Kill,
    Message,
    Result,
    Results,
    StatusRequest,
    Submit,
    Welcome,
)

if TYPE_CHECKING:
    from achilles.server.router import ServerFactory

log = logging.getLogger("achilles.server")

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
    factory: ServerFactory  # set by the factory that builds it

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
