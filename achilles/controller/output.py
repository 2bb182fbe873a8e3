"""What tasks printed, shown in the caller's terminal or notebook cell.

A node's worker captures a chunk's stdout and stderr (``warnings`` included) and the
server routes it, unopened, to the job's controller only (see
:class:`achilles.protocol.messages.Output`). Here it is opened, defensively (it came
from a node), and written line by line, each line prefixed with the node's name, to
this process's ``sys.stdout`` or ``sys.stderr`` as the task wrote it. Control characters
other than newline and tab are escaped, so a task cannot move the cursor, clear the
screen or forge a line of the caller's own output; what it prints stays plain text.

In a notebook it is written in the context the job was started in (a copy taken by the
pool), so it lands in the cell that ran the job, not in whichever cell started the
reactor thread.
"""

from __future__ import annotations

import contextvars
import json
import sys
from typing import Any

#: characters a task may not put on the caller's terminal as they are: C0 controls but
#: newline and tab, DEL, C1 controls, and the bidirectional overrides (which reorder
#: what is shown)
_ESCAPES = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
        0x2028,
        0x2029,
    )
    if c not in (0x09, 0x0A)
}
_ESCAPES[0x0D] = "\\r"


def escape(text: str) -> str:
    """``text`` with every control character but newline and tab escaped."""
    return text.translate(_ESCAPES)


def _name(node: str) -> str:
    return escape(node[:64]) or "node"


def lines(node: str, payload: bytes, dropped: int) -> list[tuple[str, str]]:
    """``(stream, text)`` to write for one Output frame: each line of the task's output
    prefixed ``[node] ``, and a note of what was dropped. A payload that is not what a
    worker sends is shown as a note, not trusted."""
    prefix = f"[{_name(node)}] "
    out: list[tuple[str, str]] = []
    try:
        pieces = json.loads(payload.decode("utf-8")) if payload else []
        if not isinstance(pieces, list):
            raise ValueError("not a list")
    except ValueError:
        return [("err", f"{prefix}(unreadable output from this node: {len(payload)} bytes)\n")]
    for piece in pieces:
        if not (isinstance(piece, list) and len(piece) == 2):
            continue
        stream, text = piece
        if stream == "cut" and isinstance(text, int):
            dropped += text
        elif stream in ("out", "err") and isinstance(text, str) and text:
            body = escape(text)
            if not body.endswith("\n"):
                body += "\n"
            out.append((stream, "".join(prefix + line for line in body.splitlines(True))))
    if dropped > 0:
        out.append(("err", f"{prefix}[... {dropped} more characters of output dropped]\n"))
    return out


def show(node: str, payload: bytes, dropped: int, context: contextvars.Context | None) -> None:
    """Write one Output frame's text to this process's stdout and stderr (in
    ``context``, the job's, if given). Never raises: a closed or broken stream loses the
    output, not the job."""

    def write() -> None:
        for stream, text in lines(node, payload, dropped):
            target: Any = sys.stdout if stream == "out" else sys.stderr
            try:
                target.write(text)
                target.flush()
            except Exception:
                pass

    try:
        if context is not None:
            context.copy().run(write)
        else:
            write()
    except Exception:
        pass


def wanted(forward_output: bool | None) -> bool:
    """Whether a pool forwards its tasks' output: as asked, or by default when this
    process's stdout is a terminal or a notebook's (ipykernel's) stream."""
    if forward_output is not None:
        return bool(forward_output)
    stdout = sys.stdout
    if stdout is None:
        return False
    if type(stdout).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stdout.isatty())
    except Exception:
        return False
