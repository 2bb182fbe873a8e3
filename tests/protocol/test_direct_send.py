"""Frames written straight to the socket (from the reactor, or from a caller's thread with
``send_now``) keep their order with what goes through Twisted's buffer.

The transport is a ``tcp.Connection`` over a real loopback socket pair whose Twisted
buffer is simulated: ``write``/``writeSequence`` record what Twisted would send later.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import task, tcp
from wire import encode_bytes

from achilles.net.connection import FramedProtocol
from achilles.protocol import messages as m


class FakeReactor:
    def __init__(self) -> None:
        self.from_thread: list[Any] = []

    def callFromThread(self, fn: Any, *args: Any) -> None:
        self.from_thread.append((fn, args))


class BufferedConnection(tcp.Connection):
    """A tcp.Connection over a real socket, whose Twisted-side buffer only records."""

    def __init__(self, sock: socket.socket) -> None:  # no reactor: nothing polls it
        self.socket = sock
        self.reactor = FakeReactor()
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.connected = True
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self._tempDataBuffer.append(bytes(data))

    def writeSequence(self, seq: list[bytes]) -> None:
        self._tempDataBuffer.extend(bytes(p) for p in seq)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> tuple[FramedProtocol, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    peer.setblocking(False)
    request.addfinalizer(ours.close)
    request.addfinalizer(peer.close)
    proto = FramedProtocol()
    proto.clock = task.Clock()
    proto.makeConnection(BufferedConnection(ours))
    return proto, peer


def drain(peer: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = peer.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def fill(sock: socket.socket) -> bytes:
    """Write until the kernel takes no more; return what was written."""
    sent = b""
    chunk = b"f" * 65536
    while True:
        try:
            n = sock.send(chunk)
        except BlockingIOError:
            return sent
        sent += chunk[:n]


def test_send_now_writes_the_frame_at_once(pair) -> None:
    """With nothing queued, send_now puts the whole frame on the socket and says so."""
    proto, peer = pair
    msg = m.Chunk("job", 3)
    assert proto.send_now(msg, b"payload")
    assert drain(peer) == encode_bytes(msg, b"payload")
    assert proto.transport.reactor.from_thread == []


def test_send_now_refuses_when_twisted_holds_data(pair) -> None:
    """If anything waits in Twisted's buffer, send_now writes nothing and returns False
    (the caller then sends through the reactor, behind it)."""
    proto, peer = pair
    proto.transport._tempDataBuffer.append(b"earlier")
    assert not proto.send_now(m.Chunk("job", 1), b"x")
    assert drain(peer) == b""


def test_send_now_refuses_large_frames(pair) -> None:
    """A payload over DIRECT_SEND_MAX is never written from another thread."""
    from achilles.net.connection import DIRECT_SEND_MAX

    proto, peer = pair
    assert not proto.send_now(m.Chunk("job", 1), b"x" * (DIRECT_SEND_MAX + 1))
    assert drain(peer) == b""


def test_partial_direct_send_is_finished_before_later_frames(pair) -> None:
    """When the socket takes only part of a send_now frame, its rest goes first in the
    reactor's next write: the byte stream is the frames in the order they were sent."""
    proto, peer = pair
    filler = fill(proto.transport.socket)
    first, second = m.Chunk("job", 1), m.Chunk("job", 2)
    assert proto.send_now(first, b"A" * 30000)
    assert proto.transport.reactor.from_thread == [(proto._flush, ())]
    proto.send(second, b"B" * 10)  # the reactor's own next frame
    on_wire = drain(peer)
    later = b"".join(proto.transport._tempDataBuffer)  # what Twisted would send next
    assert on_wire + later + drain(peer) == filler + encode_bytes(
        first, b"A" * 30000
    ) + encode_bytes(second, b"B" * 10)
    assert proto._tail == b""
