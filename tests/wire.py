"""Test helpers for the wire format: a frame as one ``bytes``, and a reader that
returns every frame of each feed at once."""
from __future__ import annotations

from achilles.protocol.framing import MAX_PAYLOAD_LENGTH, Frame, FrameReader, encode
from achilles.protocol.messages import Message


def encode_bytes(msg: Message, payload: bytes = b"") -> bytes:
    """:func:`~achilles.protocol.framing.encode` joined into one ``bytes``."""
    return b"".join(encode(msg, payload))


class Decoder(FrameReader):
    """A :class:`FrameReader` that returns every frame of each feed at once (payloads
    allowed unless told otherwise: it reads an authenticated stream)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_LENGTH,
                 allow_payload: bool = True) -> None:
        super().__init__(max_payload, allow_payload)

    def feed(self, data: bytes) -> list[Frame]:  # type: ignore[override]
        super().feed(data)
        frames: list[Frame] = []
        while True:
            frame = self.next()
            if frame is None:
                return frames
            frames.append(frame)
