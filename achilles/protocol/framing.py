"""Sans-IO framing: a JSON header line, then ``len`` raw payload bytes.

The Twisted shells feed what they receive to a :class:`FrameReader` and take frames
from it one at a time. Every limit is checked before memory is committed to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from achilles.errors import ProtocolError
from achilles.protocol.messages import (
    FIELD_NAMES,
    FIELD_SPECS,
    MESSAGES,
    ListOf,
    Message,
)

T = TypeVar("T")

DELIMITER = b"\n"
MAX_HEADER_LENGTH = 8 * 1024
PREAUTH_MAX_HEADER_LENGTH = 1024  # the handshake's frames are a few hundred bytes
MAX_PAYLOAD_LENGTH = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    msg: Message
    payload: bytes = b""


_PREFIX = {t: '{"t":%s,"len":' % json.dumps(t) for t in MESSAGES}
#: per type, each field's name and its key text in a header
_KEYS = {t: tuple((name, ',"%s":' % name) for name in FIELD_NAMES[t]) for t in MESSAGES}
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii
_compact = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per call


def _json_value(value: Any) -> str:
    """One field value as JSON text (fields are str, int, finite float, or lists)."""
    t = type(value)
    if t is str:
        return _quote(value)
    if t is int:
        return int.__repr__(value)
    if t is float and math.isfinite(value):
        return float.__repr__(value)  # repr of a finite float is valid JSON
    if t is list and value:
        text = _json_list(value)
        if text is not None:
            return text
    return _compact(value)  # or let json decide (or refuse)


def _json_list(value: list[Any]) -> str | None:
    """A list of ints, finite floats or strs as JSON text, about twice as fast as the
    encoder (a batch frame's header has four such lists); None for anything else."""
    types = set(map(type, value))
    if types == {int}:
        return "[" + ",".join(map(int.__repr__, value)) + "]"
    if types == {str}:
        return "[" + ",".join(map(_quote, value)) + "]"
    if types == {float} and all(map(math.isfinite, value)):
        return "[" + ",".join(map(float.__repr__, value)) + "]"
    return None


def encode(msg: Message, payload: bytes = b"") -> list[bytes]:
    """Return the pieces of one frame (header line, payload) for ``writeSequence``.

    The header is built by hand (about 4x faster than ``json.dumps`` of a dict: this runs
    for every frame); its text is exactly what ``json.dumps`` with compact separators
    would give for the same fields."""
    parts = [_PREFIX[msg.TYPE], str(len(payload))]
    for name, key in _KEYS[msg.TYPE]:
        parts.append(key)
        parts.append(_json_value(getattr(msg, name)))
    parts.append("}\n")
    line = "".join(parts).encode("ascii")
    return [line, payload] if payload else [line]


def split(payload: bytes, sizes: list[int]) -> list[bytes]:
    """A batch frame's payload cut back into its items' payloads (``check`` made sure
    the sizes add up)."""
    if len(sizes) == 1:
        return [payload]
    out, at = [], 0
    for size in sizes:
        out.append(payload[at : at + size])
        at += size
    return out


#: most items a sender puts in one batch frame: the header of a Results frame takes up to
#: about 80 bytes an item, and must stay under MAX_HEADER_LENGTH
BATCH_LIMIT = 64


def runs(items: list[T], key: Callable[[T], Any], limit: int = BATCH_LIMIT) -> Iterator[list[T]]:
    """The items in order, cut into runs of consecutive items with the same key, at most
    ``limit`` long: what one batch frame can carry (a run of one goes as a single
    frame)."""
    start = 0
    while start < len(items):
        k, end = key(items[start]), start + 1
        while end < len(items) and end - start < limit and key(items[end]) == k:
            end += 1
        yield items[start:end]
        start = end


#: every integer in a header fits in signed 64 bits (a peer's 4,300-digit number would
#: otherwise reach the scheduler, and ``json.dumps`` of ``achilles status`` refuses it)
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def _plain(value: Any, typ: Any) -> bool:
    """The common case, in a few type checks: exactly the field's type, and for text
    ASCII, for an int one of 64 bits, for a float a finite one."""
    if type(value) is not typ:
        return False
    if typ is str:
        return value.isascii()
    if typ is int:
        return INT_MIN <= value <= INT_MAX
    return typ is not float or math.isfinite(value)


def _plain_list(value: Any, elem: type) -> bool:
    """The common case of a list field, checked in C loops: a list of exactly ``elem``
    (ASCII text for str, 64-bit for int, finite for float)."""
    if type(value) is not list:
        return False
    if not value:
        return True
    if set(map(type, value)) != {elem}:
        return False
    if elem is str:
        return "".join(value).isascii()
    if elem is float:
        return all(map(math.isfinite, value))
    return min(value) >= INT_MIN and max(value) <= INT_MAX


def _bad_value(t: str, name: str, typ: Any, value: Any) -> Any:
    """The slow path of :func:`_check_fields`: check a list field item by item, convert
    an int for a float field, or explain what is wrong with the value."""
    if isinstance(typ, ListOf):
        if type(value) is not list:
            raise ProtocolError(
                "bad-field", f"{t!r} field {name!r} must be a list, not {type(value).__name__}"
            )
        elem = typ.elem
        return [v if _plain(v, elem) else _bad_value(t, name, elem, v) for v in value]
    if typ is float and type(value) is int:
        try:
            value = float(value)
        except OverflowError:
            raise ProtocolError("bad-field", f"{t!r} field {name!r} is out of range") from None
    if typ is float and type(value) is float:
        if not math.isfinite(value):
            raise ProtocolError("bad-field", f"{t!r} field {name!r} must be finite")
        return value
    if typ is int and type(value) is int:  # outside 64 bits
        raise ProtocolError(
            "bad-field", f"{t!r} field {name!r} is out of range (a signed 64-bit integer)"
        )
    if typ is str and type(value) is str:  # JSON escapes can smuggle in lone surrogates
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("bad-field", f"{t!r} field {name!r} is not valid text") from None
        return value
    raise ProtocolError(
        "bad-field", f"{t!r} field {name!r} must be {typ.__name__}, not {type(value).__name__}"
    )


def _check_fields(t: str, header: dict[str, Any]) -> list[Any]:
    values: list[Any] = []
    for name, typ in FIELD_SPECS[t]:
        try:
            value = header[name]
        except KeyError:
            raise ProtocolError("bad-field", f"{t!r} frame lacks field {name!r}") from None
        if not _plain(value, typ) and not (type(typ) is ListOf and _plain_list(value, typ.elem)):
            value = _bad_value(t, name, typ, value)
        values.append(value)
    return values


def parse_header(
    line: bytes,
    max_payload: int = MAX_PAYLOAD_LENGTH,
    allow_payload: bool = True,
    max_header: int = MAX_HEADER_LENGTH,
) -> tuple[Message, int]:
    """Validate one header line (without its delimiter); return the message and ``len``.

    Raises:
        ProtocolError: for a line over the limit, non-JSON, a non-object, an unknown or
            missing type, a bad length, a missing or mistyped field.
    """
    if len(line) > max_header:
        raise ProtocolError("header-too-long", f"header of {len(line)} bytes, limit {max_header}")
    try:
        header = _loads(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("bad-json", f"header is not JSON ({exc.__class__.__name__})") from None
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
            raise ProtocolError(
                "payload-before-auth", "no payload is accepted before authentication"
            )
        if n > max_payload:
            raise ProtocolError("payload-too-large", f"payload of {n} bytes, limit {max_payload}")
    msg = cls(*_check_fields(t, header))
    msg.check(n)
    return msg, n


_loads = json.JSONDecoder().decode  # json.loads minus its per-call type sniffing


class FrameReader:
    """Bytes in (:meth:`feed`), frames out (:meth:`next`), one at a time.

    One at a time, so that a frame can change the limits for the frames after it (the
    handshake raises them) and a protocol error stops reading at the bad frame, after
    the good frames before it were handled. Linear in the bytes fed, however they are
    split: the read position moves through the buffer (no re-splitting of what is left,
    as ``LineReceiver`` does on every switch between line and raw mode); what stays
    between feeds is at most a partial header line; a payload that spans feeds is kept
    as a list of the pieces received and joined once, when complete.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD_LENGTH, allow_payload: bool = False) -> None:
        self.max_payload = max_payload
        self.allow_payload = allow_payload
        self.max_header = MAX_HEADER_LENGTH if allow_payload else PREAUTH_MAX_HEADER_LENGTH
        self._buf = b""
        self._pos = 0
        self._msg: Message | None = None  # a header read, its payload still owed
        self._need = 0  # payload bytes still owed
        self._parts: list[bytes] = []  # payload pieces received so far

    def authenticated(self) -> None:
        """The peer proved itself: payloads and full-size headers are accepted now."""
        self.allow_payload = True
        self.max_header = MAX_HEADER_LENGTH

    @property
    def owed(self) -> int:
        """Payload bytes of the current frame still to come (0 between frames)."""
        return self._need

    @property
    def held(self) -> int:
        """Bytes kept between feeds (a partial header and a partial payload)."""
        return len(self._buf) - self._pos + sum(len(p) for p in self._parts)

    def feed(self, data: bytes) -> None:
        if self._pos >= len(self._buf):
            self._buf = data
        else:  # a partial header line (at most max_header bytes) is left
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def next(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed.

        Raises:
            ProtocolError: the stream is malformed (the connection must be closed).
        """
        buf, pos = self._buf, self._pos
        if self._msg is not None:
            return self._payload(buf, pos)
        end = buf.find(DELIMITER, pos)
        if end < 0:
            if len(buf) - pos > self.max_header:
                raise ProtocolError("header-too-long", f"no newline within {self.max_header} bytes")
            return None
        self._pos = end + 1
        msg, n = parse_header(buf[pos:end], self.max_payload, self.allow_payload, self.max_header)
        if n == 0:
            return Frame(msg)
        self._msg, self._need = msg, n
        return self._payload(buf, end + 1)

    def _payload(self, buf: bytes, pos: int) -> Frame | None:
        need = self._need
        have = len(buf) - pos
        if not self._parts and have >= need:  # all of it in this buffer: one slice
            self._pos = pos + need
            payload = buf[pos : pos + need]
        else:
            take = min(have, need)
            if take:
                self._parts.append(buf[pos : pos + take])  # the whole piece: no copy
                self._need = need = need - take
            self._pos = pos + take
            if need:
                return None
            payload = b"".join(self._parts)
            self._parts = []
        msg, self._msg, self._need = self._msg, None, 0
        assert msg is not None
        return Frame(msg, payload)
