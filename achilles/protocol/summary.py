"""A short text summary of a chunk's error result, read without unpickling it.

An ``error`` result's payload is the pickle of ``(exception, traceback text)`` (see
``achilles.serialization.dumps_exception``). :func:`error_summary` walks its opcodes
with :func:`pickletools.genops`, which builds no object, imports nothing and runs no
code: the traceback text is the last string pushed, and its last line names the type.
"""

from __future__ import annotations

import pickletools

from achilles.protocol.messages import FAILURE_KIND_MAX, FAILURE_TEXT_MAX

#: a payload larger than this is not walked (an exception holding a large object)
SCAN_MAX = 1 << 20
_STRINGS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
)


def error_summary(payload: bytes) -> tuple[str, str]:
    """(the exception's type name, the traceback text), each cut to what a Failure frame
    carries; ("", "") if the payload cannot be read that way."""
    if len(payload) > SCAN_MAX:
        return "", ""
    text = ""
    try:
        for op, arg, _ in pickletools.genops(payload):
            if op.name in _STRINGS and isinstance(arg, str):
                text = arg
    except Exception:  # a truncated or odd pickle: whatever was read so far
        pass
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "", ""
    # the exception's line: the first unindented one after the last frame (a message
    # may run over several lines)
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = [line for line in lines[frames[-1] + 1 if frames else 0 :] if line[:1] != " "]
    kind = (after[0] if after else lines[-1]).split(":", 1)[0].strip()
    if " " in kind:
        kind = ""
    tail = text.encode("utf-8", "replace")[-FAILURE_TEXT_MAX:].decode("utf-8", "ignore")
    return kind[:FAILURE_KIND_MAX], tail
