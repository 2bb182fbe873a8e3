"""The reactor's pool pipes: message splitting at every offset, interop with multiprocess's
own Connection, a writer that never blocks, a reader driven by a fake reactor."""

from __future__ import annotations

import os
import random
import select
import struct
import threading
from collections.abc import Callable
from typing import Any

import multiprocess.connection as mpc
import pytest

from achilles.node import pipe as _pipe
from achilles.node.pipe import MessageSplitter, PipeReader, PipeWriter, header

KIB = 1024
MIB = 1024 * 1024
#: more than a widened pipe holds (PipeWriter asks for PIPE_SIZE of buffer)
OVER = _pipe.PIPE_SIZE + 200 * KIB
#: bound on every drain loop, so a broken writer/reader fails instead of hanging
MAX_TURNS = 20_000


def frame(msg: bytes) -> bytes:
    """The bytes ``Connection.send_bytes(msg)`` writes."""
    return struct.pack("!i", len(msg)) + msg


def long_frame(msg: bytes) -> bytes:
    """The same message with the 12-byte (-1, 64-bit length) header."""
    return struct.pack("!iQ", -1, len(msg)) + msg


def feed_in_pieces(data: bytes, size: int) -> list[bytes]:
    splitter = MessageSplitter()
    out: list[bytes] = []
    for i in range(0, len(data), size):
        out.extend(splitter.feed(data[i : i + size]))
    return out


# Small messages: an empty one, one-byte ones, bytes that look like headers.
SMALL = [
    b"",
    b"a",
    b"hello world",
    b"\x00\x00\x00\x05",
    b"\xff\xff\xff\xff",
    b"",
    bytes(range(256)),
    b"x" * 1000,
    b"\n",
]
SMALL_STREAM = b"".join(frame(msg) for msg in SMALL)
# One message over 64 KiB between small ones.
BIG = random.Random(7).randbytes(100 * KIB + 3)
BIG_MESSAGES = [b"first", b"", BIG, b"after", b"\x00" * 17]
BIG_STREAM = b"".join(frame(msg) for msg in BIG_MESSAGES)


class FakeReactor:
    """Records the reactor calls the pipe ends make; never calls them back itself."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def addReader(self, obj: Any) -> None:
        self.calls.append(("addReader", obj))

    def removeReader(self, obj: Any) -> None:
        self.calls.append(("removeReader", obj))

    def addWriter(self, obj: Any) -> None:
        self.calls.append(("addWriter", obj))

    def removeWriter(self, obj: Any) -> None:
        self.calls.append(("removeWriter", obj))


class Pipe:
    """An ``os.pipe()`` whose ends are closed by the fixture unless a test closed them."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.conns: list[mpc.Connection] = []

    def close_read(self) -> None:
        if self.r >= 0:
            os.close(self.r)
            self.r = -1

    def close_write(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def read_connection(self) -> mpc.Connection:
        """Hand the read end to a multiprocess Connection (which then owns it)."""
        conn = mpc.Connection(self.r)
        self.conns.append(conn)
        self.r = -1
        return conn

    def close(self) -> None:
        self.close_write()
        self.close_read()
        for conn in self.conns:
            conn.close()

    def drain_nonblocking(self) -> bytes:
        """Everything in the pipe now (the read end is made non-blocking)."""
        os.set_blocking(self.r, False)
        got = bytearray()
        while True:
            try:
                chunk = os.read(self.r, MIB)
            except BlockingIOError:
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk


@pytest.fixture
def pipe(request: pytest.FixtureRequest) -> Pipe:
    p = Pipe()
    request.addfinalizer(p.close)
    return p


@pytest.fixture
def reactor() -> FakeReactor:
    return FakeReactor()


class Worker(threading.Thread):
    """A thread that keeps the exception its target raised, for the test to re-raise."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(daemon=True, name="test-pipe-peer")
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 10.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "peer thread did not finish"
        if self.error is not None:
            raise self.error


# --- header ------------------------------------------------------------------------------
def test_header_is_four_bytes_up_to_int32_max_and_twelve_above() -> None:
    """header(n) is the signed 32-bit big-endian length up to 0x7FFFFFFF and -1 plus a
    64-bit length above it."""
    assert header(0) == b"\x00\x00\x00\x00"
    assert header(5) == b"\x00\x00\x00\x05"
    assert header(0x7FFFFFFF) == b"\x7f\xff\xff\xff"
    assert header(2**31) == b"\xff\xff\xff\xff" + struct.pack("!Q", 2**31)
    assert len(header(2**31)) == 12
    assert header(2**40 + 1) == struct.pack("!iQ", -1, 2**40 + 1)


# --- MessageSplitter ---------------------------------------------------------------------
def test_whole_stream_in_one_feed() -> None:
    """A stream of several messages fed at once gives every message in order."""
    assert MessageSplitter().feed(SMALL_STREAM) == SMALL
    assert MessageSplitter().feed(BIG_STREAM) == BIG_MESSAGES


def test_empty_feed_gives_nothing() -> None:
    """Feeding no bytes gives no messages, before, inside or after a message."""
    splitter = MessageSplitter()
    assert splitter.feed(b"") == []
    assert splitter.feed(frame(b"abc")[:5]) == []
    assert splitter.feed(b"") == []
    assert splitter.feed(frame(b"abc")[5:]) == [b"abc"]
    assert splitter.feed(b"") == []


def test_every_chunk_size_gives_same_messages() -> None:
    """Feeding the small-message stream in pieces of every size 1..N gives the same
    messages."""
    for size in range(1, len(SMALL_STREAM) + 1):
        assert feed_in_pieces(SMALL_STREAM, size) == SMALL, f"chunk size {size}"


def test_every_two_way_split_gives_same_messages() -> None:
    """Splitting the small-message stream once at every offset changes nothing."""
    for cut in range(len(SMALL_STREAM) + 1):
        splitter = MessageSplitter()
        got = splitter.feed(SMALL_STREAM[:cut]) + splitter.feed(SMALL_STREAM[cut:])
        assert got == SMALL, cut


def test_many_chunk_sizes_with_a_message_over_64_kib() -> None:
    """A stream holding a message over 64 KiB gives the same messages for pieces of many
    sizes, from single bytes to the whole stream."""
    sizes = [
        1,
        2,
        3,
        4,
        5,
        7,
        11,
        12,
        13,
        100,
        4095,
        4096,
        4097,
        16384,
        65535,
        65536,
        65537,
        len(BIG) - 1,
        len(BIG),
        len(BIG) + 1,
        len(BIG_STREAM) - 1,
        len(BIG_STREAM),
    ]
    for size in sizes:
        assert feed_in_pieces(BIG_STREAM, size) == BIG_MESSAGES, f"chunk size {size}"


def test_two_way_splits_around_a_large_message() -> None:
    """Splitting once anywhere around and inside the large message's header, at its start,
    middle and end, changes nothing."""
    start = len(frame(b"first")) + len(frame(b""))  # the large message's header
    body = start + 4
    end = body + len(BIG)
    cuts = [*range(start - 5, body + 6), body + len(BIG) // 2, *range(end - 5, end + 14)]
    for cut in cuts:
        splitter = MessageSplitter()
        got = splitter.feed(BIG_STREAM[:cut]) + splitter.feed(BIG_STREAM[cut:])
        assert got == BIG_MESSAGES, cut


def test_split_inside_the_four_byte_header() -> None:
    """A message arrives only once its whole 4-byte header and payload have been fed,
    whichever byte of the header the stream is cut at."""
    data = frame(b"payload")
    for cut in range(1, 4):
        splitter = MessageSplitter()
        assert splitter.feed(data[:cut]) == []
        assert splitter.feed(data[cut:4]) == []
        assert splitter.feed(data[4:-1]) == []
        assert splitter.feed(data[-1:] + frame(b"")[:2]) == [b"payload"]
        assert splitter.feed(frame(b"")[2:]) == [b""]


def test_header_fed_byte_by_byte() -> None:
    """Header bytes fed one at a time give nothing until the payload is complete."""
    splitter = MessageSplitter()
    data = frame(b"xy")
    assert [splitter.feed(data[i : i + 1]) for i in range(len(data))] == [
        [],
        [],
        [],
        [],
        [],
        [b"xy"],
    ]


def test_large_message_in_many_pieces_is_returned_once_whole() -> None:
    """A large message fed in many pieces is returned once, whole, with the last piece."""
    splitter = MessageSplitter()
    data = frame(BIG)
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    results = [splitter.feed(piece) for piece in pieces]
    assert all(r == [] for r in results[:-1])
    assert results[-1] == [BIG]
    assert results[-1][0] == BIG and type(results[-1][0]) is bytes


def test_large_message_completed_together_with_the_next_messages() -> None:
    """The piece that completes a large message may also carry whole and partial next
    messages: all whole ones come out in order, the partial one later."""
    data = frame(BIG) + frame(b"one") + frame(b"two") + frame(b"three")
    splitter = MessageSplitter()
    assert splitter.feed(data[:50_000]) == []
    assert splitter.feed(data[50_000:-2]) == [BIG, b"one", b"two"]
    assert splitter.feed(data[-2:]) == [b"three"]


def test_long_header_for_a_small_message() -> None:
    """A -1 plus 8-byte length header is parsed for small n too (the format allows it),
    at every split of the stream."""
    messages = [b"hello", b"", b"z" * 300, b"tail"]
    stream = long_frame(b"hello") + long_frame(b"") + frame(b"z" * 300) + long_frame(b"tail")
    assert MessageSplitter().feed(long_frame(b"hello")) == [b"hello"]
    for size in range(1, len(stream) + 1):
        assert feed_in_pieces(stream, size) == messages, f"chunk size {size}"
    for cut in range(len(stream) + 1):
        splitter = MessageSplitter()
        assert splitter.feed(stream[:cut]) + splitter.feed(stream[cut:]) == messages, cut


def test_long_header_of_a_huge_message_waits_for_its_bytes() -> None:
    """After header(2**31) and a few bytes the splitter gives nothing: it waits for the
    rest of the 2 GiB message."""
    splitter = MessageSplitter()
    assert splitter.feed(header(2**31)[:7]) == []
    assert splitter.feed(header(2**31)[7:] + b"abc") == []
    assert splitter.feed(b"def" * 100) == []


# --- interop with multiprocess.connection -------------------------------------------------
@pytest.fixture
def mp_pipe(request: pytest.FixtureRequest) -> tuple[mpc.Connection, mpc.Connection]:
    reader, writer = mpc.Pipe(duplex=False)

    def close() -> None:
        writer.close()
        reader.close()

    request.addfinalizer(close)
    return reader, writer


def test_send_bytes_stream_is_split_into_the_same_messages(
    mp_pipe: tuple[mpc.Connection, mpc.Connection],
) -> None:
    """The raw bytes a real multiprocess Connection's send_bytes writes are split by
    MessageSplitter into exactly the messages sent."""
    reader, writer = mp_pipe
    messages = SMALL + BIG_MESSAGES + [b"end"]

    def send_all() -> None:
        try:
            for msg in messages:
                writer.send_bytes(msg)
        finally:
            writer.close()  # the reader sees EOF even if sending failed

    peer = Worker(send_all)  # the large message does not fit the pipe: a peer writes
    peer.start()
    raw = bytearray()
    splitter = MessageSplitter()
    got: list[bytes] = []
    while True:
        chunk = os.read(reader.fileno(), 8 * KIB)
        if not chunk:
            break
        raw += chunk
        got.extend(splitter.feed(chunk))
    peer.finish()
    assert got == messages
    assert bytes(raw) == b"".join(frame(msg) for msg in messages)


def test_pipe_writer_messages_are_read_by_recv_bytes(pipe: Pipe, reactor: FakeReactor) -> None:
    """Messages PipeWriter writes into an os.pipe are read back exactly by a multiprocess
    Connection's recv_bytes."""
    messages = SMALL + BIG_MESSAGES + [random.Random(3).randbytes(MIB), b"last"]
    conn = pipe.read_connection()
    received: list[bytes] = []

    def receive_all() -> None:
        for _ in messages:
            received.append(conn.recv_bytes())

    peer = Worker(receive_all)
    peer.start()
    try:
        writer = PipeWriter(reactor, pipe.w)
        for msg in messages:
            writer.send(msg)
        for _ in range(MAX_TURNS):  # what the reactor would do: write when writable
            if not writer.writing:
                break
            select.select([], [pipe.w], [], 5.0)
            writer.doWrite()
        assert not writer.writing and not writer.queue
    finally:
        pipe.close_write()  # what is written stays readable; a peer still waiting sees EOF
    peer.finish()
    assert received == messages
    # whether the pipe ever filled depends on how fast the reader thread ran; if it did,
    # the writer was watched and then unwatched, once
    assert [name for name, _ in reactor.calls] in ([], ["addWriter", "removeWriter"])


# --- PipeWriter -----------------------------------------------------------------------------
def test_writer_small_message_is_written_at_once(pipe: Pipe, reactor: FakeReactor) -> None:
    """A message that fits the pipe is written by send itself, without registering with
    the reactor."""
    writer = PipeWriter(reactor, pipe.w)
    assert not os.get_blocking(pipe.w)
    writer.send(b"abc")
    writer.send(b"")
    writer.send(b"x" * (64 * KIB - 100))  # just below the joining limit
    assert reactor.calls == []
    assert not writer.writing and not writer.queue
    assert pipe.drain_nonblocking() == frame(b"abc") + frame(b"") + frame(b"x" * (64 * KIB - 100))


def test_writer_never_blocks_and_drains_in_order(pipe: Pipe, reactor: FakeReactor) -> None:
    """Writing 3 MiB into a 64 KiB pipe returns at once, registers the writer once, and as
    the pipe drains every byte arrives in order and the writer unregisters itself."""
    messages = [random.Random(i).randbytes(MIB) for i in range(3)]
    writer = PipeWriter(reactor, pipe.w)
    for msg in messages:
        writer.send(msg)  # a non-blocking fd: a blocking write would hang the test here
    assert writer.writing and writer.queue
    assert reactor.calls == [("addWriter", writer)]

    os.set_blocking(pipe.r, False)
    got = bytearray()
    for _ in range(MAX_TURNS):
        try:
            chunk = os.read(pipe.r, MIB)
        except BlockingIOError:  # the read side is empty: the reactor says "writable"
            if not writer.writing:
                break
            writer.doWrite()
            continue
        got += chunk
    else:
        pytest.fail("the pipe did not drain")
    assert bytes(got) == b"".join(frame(msg) for msg in messages)
    assert MessageSplitter().feed(bytes(got)) == messages
    assert reactor.calls == [("addWriter", writer), ("removeWriter", writer)]
    assert not writer.writing and not writer.queue


def test_writer_queues_behind_pending_bytes(pipe: Pipe, reactor: FakeReactor) -> None:
    """While earlier bytes wait, a small message is queued behind them, not written ahead
    of them, and the reactor is not asked twice."""
    writer = PipeWriter(reactor, pipe.w)
    writer.send(b"A" * (OVER))
    writer.send(b"small")
    assert reactor.calls == [("addWriter", writer)]
    os.set_blocking(pipe.r, False)
    got = bytearray()
    for _ in range(MAX_TURNS):
        try:
            got += os.read(pipe.r, MIB)
        except BlockingIOError:
            if not writer.writing:
                break
            writer.doWrite()
    assert MessageSplitter().feed(bytes(got)) == [b"A" * (OVER), b"small"]
    assert reactor.calls == [("addWriter", writer), ("removeWriter", writer)]


def test_writer_stop_drops_queue_and_further_sends(pipe: Pipe, reactor: FakeReactor) -> None:
    """stop() unregisters a waiting writer, drops what is queued, and later sends write
    nothing."""
    writer = PipeWriter(reactor, pipe.w)
    writer.send(b"B" * (OVER))
    assert writer.writing
    writer.stop()
    assert reactor.calls == [("addWriter", writer), ("removeWriter", writer)]
    assert not writer.writing and not writer.queue and writer.fileno() == -1
    written = pipe.drain_nonblocking()  # what went out before stop: a prefix, no more
    assert written == frame(b"B" * (OVER))[: len(written)]
    writer.send(b"dropped")
    writer.send(b"C" * (OVER))
    writer.doWrite()
    assert not writer.queue
    assert pipe.drain_nonblocking() == b""
    assert reactor.calls == [("addWriter", writer), ("removeWriter", writer)]
    writer.stop()  # twice: nothing more
    assert len(reactor.calls) == 2


def test_writer_fileno(pipe: Pipe, reactor: FakeReactor) -> None:
    """fileno() is the pipe's fd while active and -1 after stop."""
    writer = PipeWriter(reactor, pipe.w)
    assert writer.fileno() == pipe.w
    assert writer.logPrefix() == "achilles-pool-tasks"
    writer.stop()
    assert writer.fileno() == -1
    assert reactor.calls == []


def test_writer_drops_queue_when_reader_is_gone(pipe: Pipe, reactor: FakeReactor) -> None:
    """When the read end is closed (EPIPE), send raises nothing, the queue is dropped and
    a waiting writer unregisters itself."""
    writer = PipeWriter(reactor, pipe.w)
    writer.send(b"D" * (OVER))
    assert writer.writing
    pipe.close_read()
    writer.doWrite()
    assert not writer.queue and not writer.writing
    assert reactor.calls == [("addWriter", writer), ("removeWriter", writer)]
    writer.send(b"more")
    assert not writer.queue and not writer.writing
    assert len(reactor.calls) == 2


# --- PipeReader -----------------------------------------------------------------------------
class Sink:
    """Collects what a PipeReader delivers, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_messages(self, messages: list[bytes]) -> None:
        self.events.append(list(messages))

    def on_closed(self) -> None:
        self.events.append("closed")


@pytest.fixture
def sink() -> Sink:
    return Sink()


def test_reader_registers_and_delivers_one_list_per_doread(
    pipe: Pipe, reactor: FakeReactor, sink: Sink
) -> None:
    """A PipeReader registers with the reactor and delivers all messages in the pipe as
    one list per doRead call."""
    reader = PipeReader(reactor, pipe.r, sink.on_messages, sink.on_closed)
    assert reactor.calls == [("addReader", reader)]
    assert not os.get_blocking(pipe.r)
    assert reader.fileno() == pipe.r
    assert reader.logPrefix() == "achilles-pool-results"
    reader.doRead()  # nothing there yet: nothing delivered
    assert sink.events == []
    os.write(pipe.w, frame(b"one") + frame(b"") + frame(b"three"))
    reader.doRead()
    assert sink.events == [[b"one", b"", b"three"]]
    os.write(pipe.w, frame(b"four"))
    reader.doRead()
    assert sink.events == [[b"one", b"", b"three"], [b"four"]]
    assert reactor.calls == [("addReader", reader)]


def test_reader_keeps_partial_message(pipe: Pipe, reactor: FakeReactor, sink: Sink) -> None:
    """A message cut inside its header or payload is delivered once the rest arrives."""
    reader = PipeReader(reactor, pipe.r, sink.on_messages, sink.on_closed)
    data = frame(b"first") + frame(b"second")
    os.write(pipe.w, data[:2])
    reader.doRead()
    os.write(pipe.w, data[2:7])  # inside the first payload
    reader.doRead()
    assert sink.events == []
    os.write(pipe.w, data[7:])
    reader.doRead()
    assert sink.events == [[b"first", b"second"]]


def test_reader_on_closed_when_write_end_closes(
    pipe: Pipe, reactor: FakeReactor, sink: Sink
) -> None:
    """Closing the write end makes doRead deliver what was left, then call on_closed and
    remove the reader; fileno() is -1 after."""
    reader = PipeReader(reactor, pipe.r, sink.on_messages, sink.on_closed)
    os.write(pipe.w, frame(b"last"))
    pipe.close_write()
    for _ in range(10):
        if "closed" in sink.events:
            break
        reader.doRead()
    assert sink.events == [[b"last"], "closed"]
    assert reactor.calls == [("addReader", reader), ("removeReader", reader)]
    assert reader.fileno() == -1 and not reader.active
    reader.doRead()  # stopped: reads nothing, calls nothing
    reader.stop()
    assert sink.events == [[b"last"], "closed"]
    assert len(reactor.calls) == 2


def test_reader_full_pipe_then_eof_in_one_doread(
    pipe: Pipe, reactor: FakeReactor, sink: Sink
) -> None:
    """When a doRead takes a full 64 KiB and then meets end of file, the messages are
    delivered, then on_closed, each once."""
    messages = [b"m" * 1000] * 10 + [b"q" * (64 * KIB - 10 * 1004 - 4)]
    data = b"".join(frame(msg) for msg in messages)
    assert len(data) == 64 * KIB
    os.write(pipe.w, data)
    pipe.close_write()
    reader = PipeReader(reactor, pipe.r, sink.on_messages, sink.on_closed)
    reader.doRead()
    assert sink.events == [messages, "closed"]
    assert reactor.calls == [("addReader", reader), ("removeReader", reader)]


def test_splitter_refuses_a_corrupt_length() -> None:
    """A negative length other than -1 (never written by multiprocess) raises ValueError
    naming it, rather than looping or misreading."""
    with pytest.raises(ValueError, match="message length -4"):
        MessageSplitter().feed(struct.pack("!i", -4) + b"abcd")


def test_reader_without_on_closed(pipe: Pipe, reactor: FakeReactor, sink: Sink) -> None:
    """Without an on_closed callback, end of file just removes the reader."""
    reader = PipeReader(reactor, pipe.r, sink.on_messages)
    pipe.close_write()
    reader.doRead()
    assert sink.events == []
    assert reactor.calls == [("addReader", reader), ("removeReader", reader)]
    assert reader.fileno() == -1


def test_reader_stop(pipe: Pipe, reactor: FakeReactor, sink: Sink) -> None:
    """stop() removes the reader once, fileno() is -1 after it, and a later doRead
    delivers nothing."""
    reader = PipeReader(reactor, pipe.r, sink.on_messages, sink.on_closed)
    os.write(pipe.w, frame(b"unread"))
    reader.stop()
    reader.stop()
    assert reader.fileno() == -1
    assert reactor.calls == [("addReader", reader), ("removeReader", reader)]
    reader.doRead()
    assert sink.events == []


def test_reader_read_budget(
    pipe: Pipe, reactor: FakeReactor, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One doRead takes at most READ_BUDGET bytes; the rest waits for the next turn."""
    monkeypatch.setattr(_pipe, "READ_BUDGET", 6)
    reader = PipeReader(reactor, pipe.r, sink.on_messages, sink.on_closed)
    os.write(pipe.w, frame(b"ab") + frame(b"cd"))
    reader.doRead()
    assert sink.events == [[b"ab"]]
    reader.doRead()
    assert sink.events == [[b"ab"], [b"cd"]]


def test_writer_to_reader_through_a_pipe(pipe: Pipe, reactor: FakeReactor, sink: Sink) -> None:
    """A PipeWriter and a PipeReader on the two ends of one pipe, turned like a reactor
    would, carry small, empty and multi-MiB messages intact and in order."""
    messages = SMALL + [random.Random(5).randbytes(2 * MIB + 1)] + BIG_MESSAGES
    writer = PipeWriter(reactor, pipe.w)
    reader = PipeReader(reactor, pipe.r, sink.on_messages, sink.on_closed)
    for msg in messages:
        writer.send(msg)
    for _ in range(MAX_TURNS):
        reader.doRead()
        if not writer.writing:
            break
        writer.doWrite()
    reader.doRead()
    got = [msg for event in sink.events for msg in event]
    assert got == messages
    assert [name for name, _ in reactor.calls] == ["addReader", "addWriter", "removeWriter"]


def test_both_ends_widen_the_pipe(pipe: Pipe, reactor: FakeReactor) -> None:
    """A PipeWriter and a PipeReader ask for PIPE_SIZE of pipe buffer (Linux), so a large
    chunk crosses in a few reactor turns."""
    import fcntl

    PipeWriter(reactor, pipe.w)
    assert fcntl.fcntl(pipe.w, 1032) >= _pipe.PIPE_SIZE  # F_GETPIPE_SZ
    other = Pipe()
    try:
        PipeReader(reactor, other.r, lambda m: None)
        assert fcntl.fcntl(other.r, 1032) >= _pipe.PIPE_SIZE
    finally:
        other.close()
