"""Sans-IO framing: a JSON header line, then ``len`` raw payload bytes.

The Twisted shells use :class:`HeaderParser` from ``LineReceiver`` (``lineReceived`` ->
:meth:`HeaderParser.header`, ``rawDataReceived`` -> :meth:`HeaderParser.payload`).
:class:`Decoder` does the same over a plain byte stream, for tests, the fuzzer and any
caller without Twisted. Every limit is checked before memory is committed to it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from achilles.errors import ProtocolError
from achilles.protocol.messages import FIELD_TYPES, MESSAGES, Message

DELIMITER = b"\n"
MAX_HEADER_LENGTH = 8 * 1024
PREAUTH_MAX_HEADER_LENGTH = 1024  # the handshake's frames are a few hundred bytes
MAX_PAYLOAD_LENGTH = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    msg: Message
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Need:
    """The header was read; ``n`` payload bytes must follow."""
    n: int


def encode(msg: Message, payload: bytes = b"") -> list[bytes]:
    """Return the pieces of one frame (header line, payload) for ``writeSequence``."""
    header: dict[str, Any] = {"t": msg.TYPE, "len": len(payload)}
    for name in FIELD_TYPES[msg.TYPE]:
        header[name] = getattr(msg, name)
    line = json.dumps(header, separators=(",", ":")).encode("ascii") + DELIMITER
    return [line, payload] if payload else [line]


def encode_bytes(msg: Message, payload: bytes = b"") -> bytes:
    """:func:`encode` joined into one ``bytes``."""
    return b"".join(encode(msg, payload))


def _check_fields(t: str, header: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, typ in FIELD_TYPES[t].items():
        if name not in header:
            raise ProtocolError("bad-field", f"{t!r} frame lacks field {name!r}")
        value = header[name]
        if typ is float and type(value) is int:
            try:
                value = float(value)
            except OverflowError:
                raise ProtocolError("bad-field", f"{t!r} field {name!r} is out of range")
        if typ is float and type(value) is float and not math.isfinite(value):
            raise ProtocolError("bad-field", f"{t!r} field {name!r} must be finite")
        if type(value) is not typ:
            raise ProtocolError(
                "bad-field", f"{t!r} field {name!r} must be {typ.__name__}, "
                f"not {type(value).__name__}")
        if isinstance(value, str):
            try:  # JSON escapes can smuggle in lone surrogates, which no codec accepts
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError("bad-field", f"{t!r} field {name!r} is not valid text")
        values[name] = value
    return values


def parse_header(line: bytes, max_payload: int = MAX_PAYLOAD_LENGTH,
                 allow_payload: bool = True,
                 max_header: int = MAX_HEADER_LENGTH) -> tuple[Message, int]:
    """Validate one header line (without its delimiter); return the message and ``len``.

    Raises:
        ProtocolError: for a line over the limit, non-JSON, a non-object, an unknown or
            missing type, a bad length, a missing or mistyped field.
    """
    if len(line) > max_header:
        raise ProtocolError("header-too-long",
                            f"header of {len(line)} bytes, limit {max_header}")
    try:
        header = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("bad-json", f"header is not JSON ({exc.__class__.__name__})")
    if type(header) is not dict:
        raise ProtocolError("not-object", "header must be a JSON object")
    t = header.get("t")
    if type(t) is not str:
        raise ProtocolError("bad-type", "header lacks a string 't'")
    cls = MESSAGES.get(t)
    if cls is None:
        raise ProtocolError("unknown-type", f"unknown frame type {t[:64]!r}")
    n = header.get("len", 0)
    if type(n) is not int or n < 0:
        raise ProtocolError("bad-length", "'len' must be a non-negative integer")
    if n:
        if not cls.PAYLOAD:
            raise ProtocolError("unexpected-payload", f"{t!r} frames carry no payload")
        if not allow_payload:
            raise ProtocolError("payload-before-auth",
                                "no payload is accepted before authentication")
        if n > max_payload:
            raise ProtocolError("payload-too-large",
                                f"payload of {n} bytes, limit {max_payload}")
    return cls(**_check_fields(t, header)), n


class HeaderParser:
    """Turns a header line, then raw data, into frames; used by the Twisted shells."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_LENGTH) -> None:
        self.max_payload = max_payload
        self.allow_payload = False  # set once the peer has authenticated
        self.max_header = PREAUTH_MAX_HEADER_LENGTH  # raised with allow_payload
        self._msg: Message | None = None
        self._need = 0
        self._parts: list[bytes] = []
        self._have = 0

    def header(self, line: bytes) -> Frame | Need:
        msg, n = parse_header(line, self.max_payload, self.allow_payload, self.max_header)
        if n == 0:
            return Frame(msg)
        self._msg, self._need, self._parts, self._have = msg, n, [], 0
        return Need(n)

    def payload(self, data: bytes) -> tuple[Frame | None, bytes]:
        """Take raw bytes; return the frame once complete, and what is left over."""
        missing = self._need - self._have
        if len(data) < missing:
            self._parts.append(data)
            self._have += len(data)
            return None, b""
        self._parts.append(data[:missing] if len(data) > missing else data)
        payload = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        msg = self._msg
        assert msg is not None
        self._msg, self._parts, self._need, self._have = None, [], 0, 0
        return Frame(msg, payload), data[missing:]


class Decoder:
    """Byte stream in, frames out: :class:`HeaderParser` plus line splitting."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_LENGTH,
                 allow_payload: bool = True) -> None:
        self.parser = HeaderParser(max_payload)
        self.parser.allow_payload = allow_payload
        self.parser.max_header = MAX_HEADER_LENGTH if allow_payload \
            else PREAUTH_MAX_HEADER_LENGTH
        self._buffer = b""
        self._in_payload = False

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        while data:
            if self._in_payload:
                frame, data = self.parser.payload(data)
                if frame is None:
                    break
                frames.append(frame)
                self._in_payload = False
                continue
            self._buffer += data
            data = b""
            idx = self._buffer.find(DELIMITER)
            if idx < 0:
                if len(self._buffer) > self.parser.max_header:
                    raise ProtocolError("header-too-long",
                                        f"no newline within {self.parser.max_header} bytes")
                break
            line, data = self._buffer[:idx], self._buffer[idx + 1:]
            self._buffer = b""
            got = self.parser.header(line)
            if isinstance(got, Need):
                self._in_payload = True
            else:
                frames.append(got)
        return frames
