"""Test helpers for the wire format: a frame as one ``bytes``, a reader that returns
every frame of each feed at once, a peer's proof, and :class:`Raw`, a peer that speaks
the protocol by hand over a plain socket (to attack a real server with)."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from achilles.protocol import messages as m
from achilles.protocol.framing import MAX_PAYLOAD_LENGTH, Frame, FrameReader, encode, split
from achilles.protocol.messages import Message


def encode_bytes(msg: Message, payload: bytes = b"") -> bytes:
    """:func:`~achilles.protocol.framing.encode` joined into one ``bytes``."""
    return b"".join(encode(msg, payload))


class Decoder(FrameReader):
    """A :class:`FrameReader` that returns every frame of each feed at once (payloads
    allowed unless told otherwise: it reads an authenticated stream)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_LENGTH, allow_payload: bool = True) -> None:
        super().__init__(max_payload, allow_payload)

    def feed(self, data: bytes) -> list[Frame]:  # type: ignore[override]
        super().feed(data)
        frames: list[Frame] = []
        while True:
            frame = self.next()
            if frame is None:
                return frames
            frames.append(frame)


def auth_reply(
    server_nonce: str,
    secret: str,
    role: str = "controller",
    username: str = "achilles",
    name: str = "peer",
    slots: int = 1,
    version: int | None = None,
    python: str | None = None,
    server_python: str | None = None,
    binding: str = "",
    digest: str | None = None,
    nonce: str | None = None,
    session: str | None = None,
) -> Any:
    """A peer's AuthReply to a Challenge with ``server_nonce``, proven with ``secret``
    over the transcript it describes (or with the ``digest`` given). Its ``session`` is
    a new random one unless given: a controller with the session of another connection
    takes that one over."""
    import os

    from achilles.net.connection import PYTHON
    from achilles.protocol import auth
    from achilles.protocol.messages import PROTOCOL_VERSION, AuthReply

    version = PROTOCOL_VERSION if version is None else version
    python = PYTHON if python is None else python
    nonce = auth.make_nonce(os.urandom(auth.NONCE_BYTES)) if nonce is None else nonce
    session = auth.make_session(os.urandom(16)) if session is None else session
    t = auth.Transcript(
        server_nonce,
        nonce,
        role,
        username,
        name,
        version,
        python,
        PYTHON if server_python is None else server_python,
        binding,
        session,
    )
    proof = auth.peer_digest(secret, t) if digest is None else digest
    return AuthReply(role, username, nonce, proof, version, python, slots, name, session)


def transcript(server_nonce: str, reply: Any, binding: str = "") -> Any:
    """The transcript a server with ``server_nonce`` checks ``reply`` against."""
    from achilles.net.connection import PYTHON
    from achilles.protocol import auth

    return auth.Transcript(
        server_nonce,
        reply.nonce,
        reply.role,
        reply.username,
        reply.name,
        reply.version,
        reply.python,
        PYTHON,
        binding,
        reply.session,
    )


class Raw:
    """A plain TCP connection to a server on 127.0.0.1, its frames read with the sans-IO
    Decoder. Sending is safe from two threads (a heartbeat thread and the test)."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._send_lock = threading.Lock()
        self.send(b'{"t":"hello","len":0}\n')  # the peer speaks first
        self._decoder = Decoder()
        self._pending: list[Frame] = []
        self.frames: list[Frame] = []
        self.eof = False
        self.nonce = ""

    def next(self) -> Frame | None:
        """The next frame, or None once the server has closed the connection."""
        while not self._pending:
            if self.eof:
                return None
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    raise
                data = b""
            if not data:
                self.eof = True
                return None
            self._pending.extend(self._decoder.feed(data))
        frame = self._pending.pop(0)
        self.frames.append(frame)
        return frame

    def next_msg(self, *skip: type) -> Message | None:
        """The next frame's message that is not of a ``skip`` type (default: heartbeats
        and cluster sizes), or None once the server has closed the connection."""
        skip = skip or (m.Heartbeat, m.Cluster)
        while True:
            frame = self.next()
            if frame is None or not isinstance(frame.msg, skip):
                return None if frame is None else frame.msg

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may close before it has read everything: its right

    def send_msg(self, msg: Message, payload: bytes = b"") -> None:
        self.send(encode_bytes(msg, payload))

    def challenge(self) -> m.Challenge:
        msg = self.next_msg()
        assert isinstance(msg, m.Challenge), msg
        self.nonce = msg.nonce
        return msg

    def auth_reply(
        self,
        secret: str,
        role: str = "controller",
        username: str = "achilles",
        name: str = "raw-socket",
        session: str | None = None,
        **changes: Any,
    ) -> bytes:
        """A header line answering the challenge, proven with ``secret``; ``changes``
        replace header fields after the proof (those outside the transcript, such as
        ``slots``, keep it valid)."""
        reply = auth_reply(self.nonce, secret, role, username, name=name, session=session)
        header = {
            "t": "auth",
            "len": 0,
            "role": role,
            "username": username,
            "nonce": reply.nonce,
            "digest": reply.digest,
            "version": reply.version,
            "python": reply.python,
            "slots": 1,
            "name": name,
            "session": reply.session,
        }
        header.update(changes)
        return json.dumps(header).encode() + b"\n"

    def authenticate(self, secret: str, role: str = "controller", **reply: Any) -> m.Welcome:
        self.challenge()
        self.send(self.auth_reply(secret, role, **reply))
        msg = self.next_msg()
        assert isinstance(msg, m.Welcome), msg
        return msg

    def until_closed(self) -> list[Frame]:
        """Read until the server closes; a socket timeout means it never did."""
        while self.next() is not None:
            pass
        return self.frames

    def error_then_close(self) -> m.ErrorFrame:
        """The server's error frame, after which it must close the connection."""
        frames = self.until_closed()
        errors = [f.msg for f in frames if isinstance(f.msg, m.ErrorFrame)]
        assert errors, f"closed without an error frame: {frames}"
        return errors[-1]  # type: ignore[return-value]

    def close(self) -> None:
        self.sock.close()


def unpack(msg: Any, payload: bytes) -> tuple[list[int], list[bytes]]:
    """The sequence numbers and payloads a single-item or batch frame carries."""
    if isinstance(msg, m.Batch):
        return msg.seqs, split(payload, msg.sizes)
    return [msg.seq], [payload]


def outcomes(msg: Any) -> tuple[list[str], list[float]]:
    """The statuses and run times a ``Result`` or ``Results`` frame carries."""
    if isinstance(msg, m.Results):
        return msg.statuses, msg.elapsed
    return [msg.status], [msg.elapsed]
