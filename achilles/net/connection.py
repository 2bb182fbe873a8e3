"""The Twisted half of the wire protocol, shared by server, node and controller.

:class:`FramedProtocol` is a Twisted protocol whose header lines and raw payloads go
through the sans-IO :class:`~achilles.protocol.framing.FrameReader`; a protocol error
from a peer becomes an error frame and a close, never an exception in the reactor.
:class:`ClientProtocol` adds the peer side of the handshake (nodes, controllers, admin).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol, task
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from achilles.compat import twisted as compat
from achilles.config import is_loopback
from achilles.errors import AuthenticationError, ProtocolError
from achilles.net import memlink as _memlink
from achilles.net import tls
from achilles.protocol import auth
from achilles.protocol.framing import (
    MAX_PAYLOAD_LENGTH,
    Frame,
    FrameReader,
    encode,
)
from achilles.protocol.messages import (
    PROTOCOL_VERSION,
    AuthReply,
    Challenge,
    ErrorFrame,
    Heartbeat,
    Hello,
    Message,
    Welcome,
)

log = logging.getLogger("achilles")

#: refusals that say "not now" rather than "never": the peer retries with backoff
TRANSIENT_REFUSALS = ("too-many-connections", "handshake-timeout")

PYTHON = "%s.%s" % platform.python_version_tuple()[:2]

#: frames up to this payload size may be written straight to the socket (see send)
DIRECT_SEND_MAX = 64 * 1024
#: Twisted reads 64 KiB and writes 128 KiB per reactor turn: a 4 MiB chunk took 64 turns
#: in and 32 out at every hop. While a large payload is arriving we read up to this
#: much per turn, and we let a write hand the kernel up to SEND_LIMIT at once.
READ_LIMIT = 4 * 1024 * 1024
SEND_LIMIT = 4 * 1024 * 1024
DEFAULT_READ = 64 * 1024


#: while a read is being handled, the protocols holding frames to send (see dataReceived)
_corked: list[FramedProtocol] | None = None


#: what runs at the end of this reactor turn, before the held frames are written
_turn_end: list[Callable[[], None]] = []
_turn_pending = False


def at_turn_end(reactor: Any, fn: Callable[[], None]) -> None:
    """Run ``fn`` once at the end of this reactor turn (after every peer that was ready
    in one poll was read), before the frames held meanwhile are written."""
    if fn not in _turn_end:
        _turn_end.append(fn)
    _end_turn_later(reactor)


def _end_turn_later(reactor: Any) -> None:
    global _turn_pending
    if not _turn_pending:
        _turn_pending = True
        reactor.callLater(0, _end_turn)


def _end_turn() -> None:
    """Run the turn's end (see at_turn_end), then write what the protocols held while
    reads were handled (see dataReceived)."""
    global _turn_pending
    _turn_pending = False
    while _turn_end:
        fns = list(_turn_end)
        _turn_end.clear()
        for fn in fns:
            fn()
    _flush_held()


def _flush_held() -> None:
    """Write what the protocols held while reads were handled."""
    global _corked
    held, _corked = _corked or [], None
    for proto in held:
        proto._flush()


class FramedProtocol(protocol.Protocol):
    """Header lines and raw payloads, read by the sans-IO FrameReader.

    A line protocol on the wire (a JSON header line, then raw bytes), but not a
    ``LineReceiver``: that re-splits everything left in its buffer each time it switches
    between line and raw mode, which is quadratic in the number of frames that arrive
    in one read (a node's burst of small results). The FrameReader is linear.
    """

    max_payload = MAX_PAYLOAD_LENGTH  # the server raises or lowers it from its settings
    peer_desc = "peer"
    #: Twisted types it as ``ITransport | None``, which models neither the TCP, TLS and
    #: memory transports' extra methods nor that it is set before any callback
    transport: Any
    clock: Any = None  # an IReactorTime, set by whoever builds the protocol
    sends = 0  # frames sent (a keepalive need not add a heartbeat to other traffic)

    def connectionMade(self) -> None:
        self.reader = FrameReader(self.max_payload)
        self.authenticated = False
        self.last_heard = self.clock.seconds()
        # Small frames (a result, a heartbeat) must leave at once: with Nagle's algorithm
        # and delayed ACKs each round trip waits ~40 ms.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        # Plain TCP: small frames are sent at once (see send); TLS and test transports
        # always go through Twisted's buffered write.
        self._socket = compat.tcp_socket(self.transport)
        if self._socket is not None:
            compat.set_send_limit(self.transport, SEND_LIMIT)
        self._out: list[bytes] = []
        # Every write to the socket or to Twisted's buffer happens under this lock, so
        # that another thread may write a frame straight to the socket (send_now).
        self._write_lock = threading.Lock()
        self._tail = b""  # the part of such a frame the socket did not take

    def dataReceived(self, data: bytes) -> None:
        # Any bytes count as a sign of life: a large payload may take longer to arrive
        # than the heartbeat timeout, and it is not silence.
        self.last_heard = self.clock.seconds()
        reader = self.reader
        reader.feed(data)
        transport = self.transport
        # Every frame sent while this read is handled is held, then each connection's
        # frames are written together: one read often sends several (a node's results
        # become results for controllers and tasks for nodes), and one write is cheaper.
        global _corked
        outer = _corked is None
        if outer:
            _corked = []
        try:
            while not transport.disconnecting:
                try:
                    frame = reader.next()
                except ProtocolError as exc:
                    self._protocol_error(exc)
                    break
                if frame is None:
                    break
                self._dispatch(frame)
            if self._socket is not None:  # the rest of a large payload: in big reads
                compat.set_read_size(transport, min(max(DEFAULT_READ, reader.owed), READ_LIMIT))
            self.read_done()
        finally:
            if outer:
                reactor = getattr(transport, "reactor", None)
                if (_corked or _turn_end) and reactor is not None:
                    # Held to the end of this reactor turn, so that the reads of every
                    # peer that was ready in one poll share one write per connection: at
                    # 1,000 nodes each result arrives on its own connection, and a write
                    # to the controller per result was a third of the server's CPU (W8).
                    _end_turn_later(reactor)
                else:
                    _flush_held()

    def read_done(self) -> None:
        """Every frame of one read was handled (before the held frames are written)."""

    def send(self, msg: Message, payload: bytes = b"") -> None:
        """Send one frame.

        Twisted buffers every write until the reactor's next poll says the socket is
        writable: two ``epoll_ctl`` calls and a loop turn per frame, which on a
        two-core machine is a large part of a small frame's cost. When nothing is
        buffered ahead of it, a small frame is written to the socket here and now;
        whatever the socket does not take (and every large frame) goes to Twisted.
        """
        t = self.transport
        if t is None:
            return
        self.sends += 1
        pieces = encode(msg, payload)
        if self._socket is None:
            t.writeSequence(pieces)
        elif _corked is not None:  # held until the read that caused it is handled
            if not self._out:
                _corked.append(self)
            self._out.extend(pieces)
        else:
            self._out = pieces
            self._flush()

    def _flush(self) -> None:
        """Write the held frames: straight to the socket if they are small and nothing
        is buffered ahead of them, else (and for what the socket does not take) through
        Twisted."""
        with self._write_lock:
            pieces, self._out = self._out, []
            t, sock = self.transport, self._socket
            if self._tail:  # a frame another thread began must be finished first
                pieces.insert(0, self._tail)
                self._tail = b""
            if not pieces or t is None or sock is None:
                return
            size = sum(len(p) for p in pieces)
            if size > DIRECT_SEND_MAX or not compat.nothing_buffered(t):
                t.writeSequence(pieces)
                return
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            sent = self._send_some(sock, data)
            if sent < len(data):
                t.write(data[sent:])

    @staticmethod
    def _send_some(sock: Any, data: bytes) -> int:
        try:
            return int(sock.send(data))
        except OSError:  # EAGAIN, or a broken connection: Twisted's write path reports it
            return 0

    def send_now(self, msg: Message, payload: bytes = b"") -> bool:
        """From a thread other than the reactor's: write one small frame straight to the
        socket, if nothing is waiting to be written ahead of it; False if it could not
        (then send it through the reactor). Saves the hop to the reactor thread, which
        on these machines is a wake-up and a GIL hand-over, and for an ``apply`` a large
        part of its latency."""
        t, sock = self.transport, self._socket
        if sock is None or t is None or len(payload) > DIRECT_SEND_MAX:
            return False
        data = b"".join(encode(msg, payload))
        with self._write_lock:
            if self._out or self._tail or not compat.nothing_buffered(t):
                return False
            sent = self._send_some(sock, data)
            if sent < len(data):  # the rest goes first in the reactor's next write
                self._tail = data[sent:]
                t.reactor.callFromThread(self._flush)
        return True

    def fail(self, code: str, detail: str) -> None:
        """Tell the peer what was wrong, then close."""
        self.send(ErrorFrame(code, detail[:2000]))
        self._flush()
        self.transport.loseConnection()

    def authenticated_ok(self) -> None:
        """The peer proved itself: payloads and full-size headers are accepted now."""
        self.authenticated = True
        self.reader.authenticated()

    def _dispatch(self, frame: Frame) -> None:
        try:
            self.frameReceived(frame)
        except ProtocolError as exc:
            self._protocol_error(exc)

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("protocol error from %s: %s", self.peer_desc, exc)
        self.fail(exc.code, exc.detail)

    def frameReceived(self, frame: Frame) -> None:
        raise NotImplementedError


#: the session of this process's clients that bring none of their own (nodes, admin)
_PROCESS_SESSION = auth.make_session(os.urandom(16))


def node_name() -> str:
    """This process's name in the cluster: ``host:pid``, in the safe alphabet."""
    return auth.safe_name(f"{socket.gethostname()}:{os.getpid()}")


class ClientProtocol(FramedProtocol):
    """The peer side: say hello, answer the server's challenge, check its proof, then
    serve. A refusal ends the connection; it is final (``owner.refused(err, True)``)
    only when it carries the server's proof, else the connection is retried."""

    role = "controller"
    peer_desc = "server"

    def __init__(
        self,
        secret: str,
        clock: Any,
        username: str = "achilles",
        slots: int = 0,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 30.0,
        session: str = "",
        name: str = "",
    ) -> None:
        self.secret = secret
        #: the name the server shows for this peer ("" for ``host:pid``)
        self.name = name
        #: the owner's session token, the same on every reconnect (see AuthReply)
        self.session = session or _PROCESS_SESSION
        self.clock = clock
        self.username = username
        self.slots = slots
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._sends_seen = 0
        self._transcript: auth.Transcript | None = None
        self.peer_id = -1

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send(Hello())
        self._keepalive = task.LoopingCall(self._keepalive_tick)
        self._keepalive.clock = self.clock
        self._keepalive.start(min(self.heartbeat_interval, self.heartbeat_timeout / 3), now=False)

    def _keepalive_tick(self) -> None:
        """Send our heartbeat; drop a server that has gone silent (no FIN may ever come,
        e.g. when the network is cut), so that the reconnect logic takes over."""
        silent = self.clock.seconds() - self.last_heard
        sent, self._sends_seen = self.sends - self._sends_seen, self.sends
        if silent > self.heartbeat_timeout:
            log.warning("server silent for %.0f s; dropping the connection", silent)
            self.transport.abortConnection()
        elif self.authenticated and not sent:  # other frames since the last tick do
            self.send(Heartbeat())
            self._sends_seen = self.sends

    def connectionLost(self, reason: Any = None) -> None:
        if self._keepalive.running:
            self._keepalive.stop()
        self.owner.disconnected(self)

    def frameReceived(self, frame: Frame) -> None:
        msg = frame.msg
        if self.authenticated:
            return self.messageReceived(msg, frame.payload)
        if isinstance(msg, ErrorFrame):
            self._refused(msg)
        elif isinstance(msg, Challenge) and self._transcript is None:
            self._answer(msg)
        elif isinstance(msg, Welcome) and self._transcript is not None:
            t = self._transcript
            try:
                auth.verify(
                    auth.server_digest(self.secret, t, msg.peer_id), msg.digest, "the server"
                )
            except AuthenticationError as exc:
                log.error("%s; retrying", exc)
                self.refused(ErrorFrame("bad-server", str(exc)), False)
                self.transport.loseConnection()
                return
            self.authenticated_ok()
            self.peer_id = msg.peer_id
            self.ready()
        else:
            raise ProtocolError("unexpected", f"{msg.TYPE!r} frame during the handshake")

    def _answer(self, msg: Challenge) -> None:
        """Our proof, over a transcript with the certificate this connection showed us.
        A version mismatch is left to the server to refuse (with its proof)."""
        auth.check_nonce(msg.nonce, "the server's")
        if msg.version != PROTOCOL_VERSION:
            log.error(
                "the server speaks achilles protocol %d, this side %d; retrying",
                msg.version,
                PROTOCOL_VERSION,
            )
        nonce = auth.make_nonce(os.urandom(auth.NONCE_BYTES))
        name = self.name or node_name()
        t = self._transcript = auth.Transcript(
            msg.nonce,
            nonce,
            self.role,
            self.username,
            name,
            PROTOCOL_VERSION,
            PYTHON,
            msg.python,
            tls.peer_fingerprint(self.transport),
            self.session,
        )
        self.send(
            AuthReply(
                self.role,
                self.username,
                nonce,
                auth.peer_digest(self.secret, t),
                PROTOCOL_VERSION,
                PYTHON,
                self.slots,
                name,
                self.session,
            )
        )

    def _refused(self, err: ErrorFrame) -> None:
        """A refusal is final only if the server proved it knows the secret."""
        t = self._transcript
        proven = t is not None and bool(err.proof)
        if proven and t is not None:
            try:
                auth.verify(
                    auth.refusal_digest(self.secret, t, err.code), err.proof, "the server's refusal"
                )
            except AuthenticationError:
                proven = False
        if not proven:
            log.warning(
                "refused by %s (%s: %s), which did not prove it knows the secret; retrying",
                self.peer_desc,
                err.code,
                err.detail[:200],
            )
        self.refused(err, proven)
        self.transport.loseConnection()

    # The owner (a Node or a Controller, set by ClientFactory) hears about the
    # connection's life: connected(proto), refused(error frame), disconnected(proto).
    owner: Any

    def ready(self) -> None:
        """Authenticated both ways: start work."""
        self.owner.connected(self)

    def refused(self, err: ErrorFrame, proven: bool) -> None:
        """The server refused us; ``proven``: with a proof that it holds the secret
        (final), else perhaps by whoever holds the port (retry)."""
        self.owner.refused(err, proven)

    def messageReceived(self, msg: Message, payload: bytes) -> None:
        raise NotImplementedError


class ClientFactory(protocol.Factory):
    """Builds one protocol per connection attempt, passing the same arguments."""

    def __init__(self, cls: type[ClientProtocol], owner: Any, **kwargs: Any) -> None:
        self.cls = cls
        self.owner = owner
        self.kwargs = kwargs

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        proto = self.cls(**self.kwargs)
        proto.factory = self
        proto.owner = self.owner
        return proto


def client_endpoint(reactor: Any, settings: Any) -> Any:
    """TCP to the server, in TLS unless the server is on loopback or ``tls`` is off (see
    :mod:`achilles.net.tls`); in memory if the server is this process's own embedded one
    (see :mod:`achilles.net.memlink`)."""
    from twisted.internet import endpoints

    memory = _memlink.endpoint_for(reactor, settings.host, settings.port)
    if memory is not None and not settings.tls_ca:
        return memory
    plain = endpoints.TCP4ClientEndpoint(reactor, settings.host, settings.port, timeout=10)
    use_tls = (
        settings.tls == "on"
        or bool(settings.tls_ca)
        or (settings.tls == "auto" and not is_loopback(settings.host))
    )
    if not use_tls:
        return plain
    return endpoints.wrapClientTLS(tls.client_options(settings), plain)  # type: ignore[arg-type]


def describe_connect_error(reason: Any) -> str:
    """Why a connection attempt failed, in a few words ("connection refused", "timed
    out", "host name not found", ...), from a Twisted Failure or an exception."""
    from twisted.internet import error

    exc = getattr(reason, "value", reason)
    kinds = (
        (error.ConnectionRefusedError, "connection refused"),
        (error.TimeoutError, "timed out"),
        (error.DNSLookupError, "host name not found"),
        (error.NoRouteError, "no route to host"),
    )
    for kind, words in kinds:
        if isinstance(exc, kind):
            return words
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return text[:200]


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """A client endpoint that tells ``on_failure(reason)`` about each failed attempt to
    connect (``ClientService`` retries them in silence), then fails as it would."""

    def __init__(self, endpoint: Any, on_failure: Any) -> None:
        self.endpoint = endpoint
        self.on_failure = on_failure

    def connect(self, factory: Any) -> Any:
        def failed(reason: Any) -> Any:
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("reporting a failed connection attempt")
            return reason

        return self.endpoint.connect(factory).addErrback(failed)
