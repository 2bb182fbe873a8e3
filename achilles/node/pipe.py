"""The node's reactor talks to its pool workers over the pool's own pipes, directly.

``multiprocess.Pool`` moves tasks and results through two helper threads (a task
handler that writes the task pipe, a result handler that reads the result pipe and
runs callbacks, which must then hop back to the reactor with ``callFromThread``). On
these machines every such hand-over is a wake-up of an idle thread, about 50-80 us
each, and a one-item chunk made four of them on the node alone. Here the reactor
writes the pool's task pipe itself (non-blocking: a full pipe never stalls the
reactor; what does not fit waits for the pipe to drain) and reads the result pipe
as one more file descriptor, so a result is in the reactor the moment the worker
writes it, and results that a worker finishes meanwhile are read in one go.

The byte format is the one ``multiprocess.connection.Connection.send_bytes`` writes
and ``recv_bytes`` reads (a signed 32-bit big-endian length, or -1 and a 64-bit
length for messages over 2 GiB), so the workers' side is multiprocess's own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

_LEN = struct.Struct("!i")
_LONG = struct.Struct("!Q")
#: small messages are joined with their header into one write
_JOIN_BELOW = 64 * 1024
#: most bytes taken from the result pipe in one reactor turn (then others get a turn)
READ_BUDGET = 8 * 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1024 * 1024
#: the first read of a burst: os.read allocates the whole size it is asked for (a 1 MiB
#: buffer is an mmap and munmap per read), and most bursts are a result or two
FIRST_READ = 64 * 1024


def widen(fd: int) -> None:
    """Give the pipe 1 MiB of buffer (Linux's default is 64 KiB): a 4 MiB chunk then
    crosses in 4 reactor turns, not 64. Best effort (the limit is pipe-max-size)."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):
        pass


def header(n: int) -> bytes:
    """The length prefix ``Connection.send_bytes`` puts before ``n`` bytes."""
    if n > 0x7FFFFFFF:
        return _LEN.pack(-1) + _LONG.pack(n)
    return _LEN.pack(n)


class MessageSplitter:
    """Sans-IO: bytes in, complete messages out (linear in the bytes, however split)."""

    def __init__(self) -> None:
        self._buf = b""
        self._parts: list[bytes] = []  # pieces of a large message still arriving
        self._need = 0  # bytes still owed to that message

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self._need:
            take = min(self._need, len(data))
            self._parts.append(data[:take])
            self._need -= take
            data = data[take:]
            if self._need:
                return out
            out.append(b"".join(self._parts))
            self._parts = []
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            start = pos + 4
            if n == -1:
                if end - pos < 12:
                    break
                (n,) = _LONG.unpack_from(buf, start)
                start += 8
            elif n < 0:  # multiprocess never writes one: the pipe is corrupt
                raise ValueError(f"corrupt pool pipe: message length {n}")
            if end - start >= n:
                out.append(buf[start : start + n])
                pos = start + n
                continue
            # a message larger than what is here: keep its pieces, join them once
            self._parts = [buf[start:]]
            self._need = n - (end - start)
            self._buf = b""
            return out
        self._buf = buf[pos:]
        return out


class Reader:
    """A descriptor the reactor watches for reading, until :meth:`stop` (the descriptor
    itself belongs to someone else and is not closed)."""

    fd: int
    active: bool
    reactor: Any

    def fileno(self) -> int:
        return self.fd if self.active else -1

    def stop(self) -> None:
        if self.active:
            self.reactor.removeReader(self)
            self.active = False

    def connectionLost(self, reason: Any) -> None:
        self.active = False


class PipeReader(Reader):
    """Reads a pipe in the reactor and hands complete messages to ``on_messages``."""

    def __init__(
        self,
        reactor: Any,
        fd: int,
        on_messages: Callable[[list[bytes]], None],
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.fd = fd
        self.on_messages = on_messages
        self.on_closed = on_closed
        self.splitter = MessageSplitter()
        self.active = True
        os.set_blocking(fd, False)
        widen(fd)
        reactor.addReader(self)

    def logPrefix(self) -> str:
        return "achilles-pool-results"

    def doRead(self) -> None:
        messages, closed = self.read_available()
        if messages:
            self.on_messages(messages)
        if closed:
            self.stop()
            if self.on_closed is not None:
                self.on_closed()

    def read_available(self) -> tuple[list[bytes], bool]:
        """The complete messages in the pipe now (up to READ_BUDGET bytes), and whether
        every writer is gone (the pool is being torn down)."""
        messages: list[bytes] = []
        budget = READ_BUDGET
        size = FIRST_READ  # grows while reads come back full
        while budget > 0 and self.active:
            try:
                data = os.read(self.fd, min(budget, size))
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                return messages, True
            budget -= len(data)
            messages.extend(self.splitter.feed(data))
            if len(data) < size:  # the pipe is (very likely) empty now
                break
            size = min(size * 4, PIPE_SIZE)
        return messages, False


class PipeWriter:
    """Writes messages to a pipe from the reactor without ever blocking it.

    A message is written at once if nothing is queued ahead of it; what the pipe does
    not take waits (as memoryviews, no copies) until the reactor says it is writable.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.queue: deque[memoryview] = deque()
        self.active = True
        self.writing = False
        os.set_blocking(fd, False)
        widen(fd)

    def fileno(self) -> int:
        return self.fd if self.active else -1

    def logPrefix(self) -> str:
        return "achilles-pool-tasks"

    def send(self, data: bytes) -> None:
        """Queue one message (framed here) and write what the pipe takes now."""
        if not self.active:
            return
        prefix = header(len(data))
        if len(data) < _JOIN_BELOW:
            self.queue.append(memoryview(prefix + data))
        else:
            self.queue.append(memoryview(prefix))
            self.queue.append(memoryview(data))
        if not self.writing:
            self.doWrite()

    def doWrite(self) -> None:
        queue = self.queue
        while queue and self.active:
            piece = queue[0]
            try:
                sent = os.write(self.fd, piece)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # the workers are gone (EPIPE): drop what is queued
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                queue.clear()
                break
            if sent < len(piece):
                queue[0] = piece[sent:]
                if not self.writing:
                    self.writing = True
                    self.reactor.addWriter(self)
                return
            queue.popleft()
        if self.writing:
            self.writing = False
            self.reactor.removeWriter(self)

    def stop(self) -> None:
        if self.writing:
            self.reactor.removeWriter(self)
            self.writing = False
        self.active = False
        self.queue.clear()

    def connectionLost(self, reason: Any) -> None:
        self.active = False
