"""In-process connections to a server run by this process's own reactor.

The embedded cluster's server, its node and the caller's controller all run in one
reactor thread. Over loopback TCP every frame between them cost a send, a poll and a
receive in that one thread, and a 4 MiB chunk was copied into the kernel and out again
at each of its two hops. Here a connection to a server this process listens on (see
:func:`register`) is a pair of :class:`MemoryTransport`: what one side writes is handed
to the other side's ``dataReceived`` on the reactor's next turn, as the very bytes
objects written (large payloads are never joined or copied). Everything above the
transport is unchanged: the handshake, the framing, the limits.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.python import failure

log = logging.getLogger("achilles")

#: written pieces up to this size are joined into one dataReceived; larger ones are
#: delivered on their own, uncopied
JOIN_BELOW = 64 * 1024

_servers: dict[tuple[str, int], Any] = {}  # (host, port) -> server factory
_ports = itertools.count(50000)


def register(host: str, port: int, factory: Any) -> None:
    """Connections from this process to ``host:port`` go to ``factory`` in memory."""
    _servers[(host, port)] = factory


def unregister(host: str, port: int) -> None:
    _servers.pop((host, port), None)


def endpoint_for(reactor: Any, host: str, port: int) -> MemoryEndpoint | None:
    factory = _servers.get((host, port))
    return None if factory is None else MemoryEndpoint(reactor, factory, host, port)


class MemoryEndpoint:
    """A client endpoint (``connect(factory)``) whose connections stay in memory."""

    def __init__(self, reactor: Any, server_factory: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.server_factory = server_factory
        self.server_addr = IPv4Address("TCP", host, port)

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        client_addr = IPv4Address("TCP", self.server_addr.host, next(_ports))
        server_proto = self.server_factory.buildProtocol(client_addr)
        client_proto = factory.buildProtocol(self.server_addr)
        if server_proto is None or client_proto is None:
            return defer.fail(error.ConnectionRefusedError("no protocol"))
        a = MemoryTransport(self.reactor, self.server_addr, client_addr)  # server's side
        b = MemoryTransport(self.reactor, client_addr, self.server_addr)  # client's side
        a.peer, b.peer = b, a
        a.protocol, b.protocol = server_proto, client_proto
        server_proto.makeConnection(a)
        client_proto.makeConnection(b)
        return defer.succeed(client_proto)


class MemoryTransport:
    """One side of an in-memory connection; ``protocol`` is the side it belongs to."""

    def __init__(self, reactor: Any, host: IPv4Address, peer_addr: IPv4Address) -> None:
        self.reactor = reactor
        self.host = host
        self.peer_addr = peer_addr
        self.peer: MemoryTransport
        self.protocol: Any = None
        self.connected = True
        self.disconnecting = False
        self._out: list[bytes] = []
        self._call: Any = None
        self._closing: failure.Failure | None = None

    # ITransport ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if data and not self.disconnecting:
            self._out.append(data)
            self._schedule()

    def writeSequence(self, pieces: list[bytes]) -> None:
        if not self.disconnecting:
            self._out.extend(p for p in pieces if p)
            self._schedule()

    def loseConnection(self) -> None:
        """Close once what was written is delivered."""
        self._close(failure.Failure(error.ConnectionDone()))

    def abortConnection(self) -> None:
        """Close now, dropping what was not delivered yet."""
        self._out.clear()
        self._close(failure.Failure(error.ConnectionLost()))

    def getPeer(self) -> IPv4Address:
        return self.peer_addr

    def getHost(self) -> IPv4Address:
        return self.host

    # delivery ------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.reactor.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._call = None
        out, self._out = self._out, []
        peer = self.peer
        for data in _coalesce(out):
            if not peer.connected:
                break
            try:
                peer.protocol.dataReceived(data)
            except Exception:  # as Twisted does for a socket: log it, drop the link
                log.exception("error in dataReceived of an in-memory connection")
                self._out.clear()
                self._lost(failure.Failure())
                return
        if self._closing is not None and not self._out:
            reason, self._closing = self._closing, None
            self._lost(reason)

    def _close(self, reason: failure.Failure) -> None:
        if not self.connected or self.disconnecting:
            return
        self.disconnecting = True
        self._closing = reason
        self._schedule()

    def _lost(self, reason: failure.Failure) -> None:
        """Both sides are told, once each, in the reactor's turn."""
        for side in (self, self.peer):
            if side.connected:
                side.connected = False
                side.disconnecting = True
                side._out.clear()
                side.protocol.connectionLost(reason)


def _coalesce(pieces: list[bytes]) -> list[bytes]:
    """Small pieces joined into runs; each large piece on its own, as written."""
    out: list[bytes] = []
    run: list[bytes] = []
    for piece in pieces:
        if len(piece) < JOIN_BELOW:
            run.append(piece)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(b"".join(run))
    return out
