"""The achilles wire protocol, sans I/O.

A frame is one JSON header line (``{"t": type, "len": payload bytes, ...}``) followed by
``len`` raw payload bytes. :mod:`.messages` defines one dataclass per frame type,
:mod:`.framing` turns bytes into frames and back, :mod:`.auth` holds the HMAC
challenge-response. Nothing here touches a socket, a reactor or a clock.
"""

__all__ = ["auth", "framing", "messages"]
