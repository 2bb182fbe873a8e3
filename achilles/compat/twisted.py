"""The Twisted internals achilles relies on, in one place (pinned by
``tests/unit/test_compat_twisted.py``; the upper bound on Twisted in ``setup.py`` is the
newest release those tests passed on).

* A TCP transport's buffer fields (``abstract.FileDescriptor``): ``_tempDataBuffer``,
  ``dataBuffer`` and ``offset`` say whether anything waits to be written; the class
  attribute ``SEND_LIMIT`` caps one write; ``tcp.Connection.bufferSize`` is the size of
  one read; ``tcp.Connection.socket`` is the socket. Used to write small frames
  straight to the socket and to read large payloads in large reads
  (:mod:`achilles.net.connection`).
* ``twisted.python.threadable.ioThread``, and the installed reactor in ``sys.modules``:
  a forked child drops the parent's reactor and installs a fresh one
  (:mod:`achilles.net.reactor`).
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet import tcp
from twisted.python import threadable


def tcp_socket(transport: Any) -> socket.socket | None:
    """The socket under a plain TCP transport; None for TLS, memory or test transports
    (which must always be written through Twisted)."""
    if isinstance(transport, tcp.Connection):
        return transport.socket
    return None


def set_send_limit(transport: Any, limit: int) -> None:
    """Let one write of the transport hand the kernel up to ``limit`` bytes (Twisted's
    default is 128 KiB a reactor turn)."""
    transport.SEND_LIMIT = limit


def set_read_size(transport: Any, size: int) -> None:
    """Read up to ``size`` bytes a reactor turn (Twisted's default is 64 KiB)."""
    transport.bufferSize = size


def nothing_buffered(transport: Any) -> bool:
    """Nothing waits in the transport's write buffer, and it is open. (Only the
    reactor's ``doWrite`` changes that buffer without our lock, and it only drains it:
    once it looks empty, everything written before is in the kernel.)"""
    return (
        not (transport._tempDataBuffer or transport.offset < len(transport.dataBuffer))
        and bool(transport.connected)
        and not transport.disconnecting
    )


def forget_reactor() -> Any:
    """Uninstall the global reactor (in a forked child, whose copy has no thread); return
    it. The next ``from twisted.internet import reactor`` installs a fresh default one."""
    old = sys.modules.pop("twisted.internet.reactor", None)
    import twisted.internet

    if getattr(twisted.internet, "reactor", None) is old:
        del twisted.internet.reactor
    threadable.ioThread = None
    return old
