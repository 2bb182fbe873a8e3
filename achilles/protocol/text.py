"""Text that came from a peer, made safe to log or show: quoted, control characters
escaped (no forged log lines, no terminal escape sequences), and cut short."""

from __future__ import annotations

#: most characters of a peer's own text (its Python version, name) put in a log line
SHOWN_MAX = 64


def shown(text: str, limit: int = SHOWN_MAX) -> str:
    """Peer-supplied text for a log line: quoted, control characters escaped (``repr``),
    cut to ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"
