"""The controller's bookkeeping for one job, the caller's side, sans-IO.

A job's input is cut into chunks; each chunk's place in the input is kept
(``pending``) until its outcome arrives, and outcomes are handed to the caller once,
in input order for ``map``/``imap``. At most ``window`` chunks are outstanding (made
and not yet consumed by the caller): that is the backpressure that keeps a
ten-million-item generator out of memory, and keeps a slow ``imap`` consumer from
making anyone buffer without bound. The wire side (holding each chunk's bytes until
its result, sending them again after a reconnect) is :mod:`achilles.core.session`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from achilles.core.pace import PREFETCH, Pace
from achilles.protocol.messages import ChunkStatus


class OutcomeStatus(enum.Enum):
    """How a chunk ended, as the caller sees it: a node's OK or ERROR, or one of these
    two that no node reported (plain text values, as ``ChunkStatus``)."""

    OK = ChunkStatus.OK.value  #: its results
    ERROR = ChunkStatus.ERROR.value  #: a task raised
    FAILED = "failed"  #: the server gave up on it (attempts exhausted)
    RAISED = "raised"  #: it never left the caller: reading or pickling its input raised


FAILED = OutcomeStatus.FAILED.value
RAISED = OutcomeStatus.RAISED.value


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    start: int  # position of the chunk's first argument in the input
    count: int
    sent: float = -1.0  # when it was made (the caller's clock), -1 unknown
    size: int = -1  # its payload's bytes, -1 unknown


@dataclass(frozen=True, slots=True)
class Outcome:
    seq: int
    status: str  # an OutcomeStatus value
    payload: bytes
    start: int
    count: int
    exc: BaseException | None = None  # RAISED: what the input raised
    reason: str = ""  # FAILED: the chunk's last status on the cluster (CRASHED, TIMEOUT)


#: an automatic chunk size keeps a chunk's pickled arguments under about this many bytes
CHUNK_BYTES = 4 * 1024 * 1024


def default_chunksize(n_items: int, slots: int, item_bytes: int = 0) -> int:
    """multiprocessing's rule, about four chunks per worker slot, capped so that a chunk
    of items of about ``item_bytes`` each (pickled) stays near CHUNK_BYTES.

    The cap matters for large arguments: every hop copies a chunk into a fresh buffer,
    and buffers of tens of MiB are fresh pages from the kernel each time (page faults
    on every 4 KiB), where a few MiB are reused. Measured on W3 (64 arguments of
    4 MiB, two slots): chunks of 8 arguments ran at 0.35x multiprocessing's MiB/s,
    chunks of one at 0.75x.
    """
    if n_items == 0:
        return 1
    chunksize, extra = divmod(n_items, max(1, slots) * 4)
    chunksize = chunksize + 1 if extra else chunksize
    if item_bytes > 0:
        chunksize = min(chunksize, max(1, CHUNK_BYTES // item_bytes))
    return chunksize


class AdaptiveChunker:
    """Chunk sizes for inputs of unknown length: aim for ``target`` seconds of work.

    Starts at one item per chunk and follows the measured compute rate, at most
    doubling per step, so a slow function never gets a huge first chunk and a fast
    one quickly stops paying per-chunk overhead.
    """

    def __init__(self, target: float = 0.05, maximum: int = 65536) -> None:
        self.target = target
        self.maximum = maximum
        self.size = 1

    def observe(self, count: int, elapsed: float) -> None:
        if count <= 0:
            return
        if elapsed <= 0:
            want = self.maximum
        else:
            want = int(self.target * count / elapsed)
        self.size = max(1, min(self.maximum, want, self.size * 2))


class Job:
    """State of one job on the controller side. Not thread-safe: callers hold a lock."""

    def __init__(self, ordered: bool, window: int) -> None:
        self.ordered = ordered
        self.window = self.base_window = max(1, window)
        self.pace = Pace()
        self.pending: dict[int, ChunkInfo] = {}
        self._ready: dict[int, Outcome] = {}
        self._next = 0  # next sequence number to hand out (ordered)
        self.added = 0  # chunks created
        self.items = 0  # arguments read from the input
        self.consumed = 0  # chunks handed to the caller
        self.input_done = False

    @property
    def outstanding(self) -> int:
        return self.added - self.consumed

    def can_add(self) -> bool:
        return self.outstanding < self.window

    def add(self, count: int, now: float = -1.0, size: int = -1) -> int:
        """Record a new chunk of ``count`` arguments (made at ``now``, if given); return
        its sequence number."""
        seq = self.added
        self.pending[seq] = ChunkInfo(self.items, count, now, size)
        self.added += 1
        self.items += count
        return seq

    def add_raised(self, exc: BaseException, count: int = 0) -> int:
        """A chunk that failed before it could be sent (its input raised while being
        read, or would not pickle): its outcome is ready at once, in its place. As in
        multiprocessing, the job's other chunks are not affected."""
        seq = self.add(count)
        info = self.pending.pop(seq)
        self._ready[seq] = Outcome(seq, RAISED, b"", info.start, count, exc)
        return seq

    def observe(self, elapsed: float, turnaround: float = -1.0, size: int = -1) -> None:
        """A chunk took ``elapsed`` s to compute (and ``turnaround`` s from being made to
        its result, if known). While chunks are much shorter than a round trip, keep
        more of them outstanding (the servers and nodes queue deeper too, see Pace), up
        to MAX_PREFETCH / PREFETCH times the base window; longer chunks keep the base."""
        rtt = turnaround - elapsed if turnaround >= 0 else -1.0
        depth = self.pace.observe(elapsed, rtt, size)
        self.window = min(MAX_WINDOW, self.base_window * (depth // PREFETCH))

    def lift_window(self) -> None:
        """No limit on outstanding chunks any more: the caller waits for every task to
        run before it consumes (``join()`` before reading an ``imap``), as
        multiprocessing allows; the results then wait in memory."""
        self.window = self.base_window = 1 << 62

    def close_input(self) -> None:
        self.input_done = True

    def on_result(self, seq: int, status: str, payload: bytes, reason: str = "") -> bool:
        """Take a result; return False for a duplicate or unknown one (dropped)."""
        info = self.pending.pop(seq, None)
        if info is None:
            return False
        self._ready[seq] = Outcome(seq, status, payload, info.start, info.count, reason=reason)
        return True

    def on_failed(self, seq: int, detail: str, reason: str = "") -> bool:
        """The server gave up on chunk ``seq``; ``reason`` is its last status there."""
        return self.on_result(seq, FAILED, detail.encode("utf-8"), reason)

    def take(self, limit: int | None = None) -> list[Outcome]:
        """Outcomes the caller may have now (at most ``limit``): in input order if
        ordered, else in arrival order. Taken outcomes leave the window."""
        out: list[Outcome] = []
        if self.ordered:
            while self._next in self._ready and (limit is None or len(out) < limit):
                out.append(self._ready.pop(self._next))
                self._next += 1
        else:
            while self._ready and (limit is None or len(out) < limit):
                out.append(self._ready.pop(next(iter(self._ready))))
        self.consumed += len(out)
        return out

    def finished(self) -> bool:
        """Every chunk of a closed input has been handed to the caller."""
        return self.input_done and self.consumed == self.added

    def complete(self) -> bool:
        """Every chunk of a closed input has its outcome (taken or not)."""
        return self.input_done and not self.pending

    def position(self, seq: int) -> tuple[int, int] | None:
        info = self.pending.get(seq)
        return None if info is None else (info.start, info.start + info.count)


#: most chunks a job keeps outstanding, whatever the cluster says its size is: the slots
#: come from nodes (and a node that claimed 10**9 of them once made an ``imap`` over an
#: endless generator read 377,895 items, 487 MB, in 6 s)
MAX_WINDOW = 16_384


def window_for(slots: int, limit: int = 0) -> int:
    """How many chunks a job keeps outstanding: a few per slot it can use, at most
    MAX_WINDOW."""
    usable = min(slots, limit) if limit > 0 else slots
    return min(MAX_WINDOW, max(4, math.ceil(usable * 3)))
