"""Pins the Twisted internals that :mod:`achilles.compat.twisted` uses: if an upgrade
moves one, this fails by name (and setup.py's upper bound on Twisted is the newest
release it passed on)."""

from __future__ import annotations

import socket
import sys
from typing import Any

import pytest
from twisted.internet import protocol, tcp
from twisted.python import threadable

from achilles.compat import twisted as compat


class _Reactor:
    """Just enough of a reactor for a transport to be built and written to."""

    def addReader(self, r: Any) -> None: ...
    def removeReader(self, r: Any) -> None: ...
    def addWriter(self, w: Any) -> None: ...
    def removeWriter(self, w: Any) -> None: ...
    def callLater(self, *a: Any, **k: Any) -> None: ...


@pytest.fixture
def transport() -> Any:
    a, b = socket.socketpair()
    a.setblocking(False)
    t = tcp.Connection(a, protocol.Protocol(), _Reactor())
    t.connected = 1
    yield t
    a.close()
    b.close()


def test_tcp_transport_exposes_its_socket(transport: Any) -> None:
    assert compat.tcp_socket(transport) is transport.socket
    assert compat.tcp_socket(object()) is None  # TLS, memory: written through Twisted


def test_buffer_fields_say_whether_anything_waits(transport: Any) -> None:
    """``_tempDataBuffer``/``dataBuffer``/``offset`` exist and move as we read them."""
    assert compat.nothing_buffered(transport)
    transport.write(b"x")
    assert transport._tempDataBuffer == [b"x"] and not compat.nothing_buffered(transport)
    transport._tempDataBuffer, transport._tempDataLen = [], 0
    transport.dataBuffer, transport.offset = b"abc", 1
    assert not compat.nothing_buffered(transport)
    transport.offset = 3
    assert compat.nothing_buffered(transport)
    transport.disconnecting = True
    assert not compat.nothing_buffered(transport)


def test_send_limit_and_read_size_are_the_transports_knobs(transport: Any) -> None:
    """``SEND_LIMIT`` caps one write, ``bufferSize`` one read; we set both."""
    assert isinstance(tcp.Connection.SEND_LIMIT, int)
    assert isinstance(transport.bufferSize, int)
    compat.set_send_limit(transport, 1 << 22)
    compat.set_read_size(transport, 1 << 21)
    assert transport.SEND_LIMIT == 1 << 22 and transport.bufferSize == 1 << 21


def test_forget_reactor_uninstalls_the_global_one() -> None:
    """The installed reactor lives in sys.modules and as an attribute of
    twisted.internet; ``threadable.ioThread`` names its thread."""
    import twisted.internet

    missing = object()
    saved = (
        sys.modules.get("twisted.internet.reactor", missing),
        getattr(twisted.internet, "reactor", missing),
        threadable.ioThread,
    )
    sentinel = object()
    sys.modules["twisted.internet.reactor"] = sentinel  # type: ignore[assignment]
    twisted.internet.reactor = sentinel  # type: ignore[attr-defined]
    threadable.ioThread = 12345
    try:
        assert compat.forget_reactor() is sentinel
        assert "twisted.internet.reactor" not in sys.modules
        assert getattr(twisted.internet, "reactor", None) is not sentinel
        assert threadable.ioThread is None
    finally:
        module, attr, threadable.ioThread = saved
        if module is not missing:
            sys.modules["twisted.internet.reactor"] = module  # type: ignore[assignment]
        if attr is not missing:
            twisted.internet.reactor = attr  # type: ignore[attr-defined]
