"""How many chunks to keep queued ahead of the workers, from how long chunks take.

One rule serves three places: the server (chunks per slot it gives a node), a node
(chunks per worker it puts in its pool) and the controller (a job's window).
"""

from __future__ import annotations

#: chunks per slot queued ahead while chunks are long
PREFETCH = 2
#: most chunks per slot, while chunks are very short
MAX_PREFETCH = 64
#: how much work (seconds) to hold per slot beyond the running chunk, so that the round
#: trip of the next chunk hides behind work
QUEUED_WORK = 0.002


#: most argument bytes to hold queued per slot: chunks of microseconds that each carry
#: megabytes are not queued 64 deep (W3: 64 arguments of 4 MiB went to one node, and
#: copying them cost more than the frames saved)
QUEUED_BYTES = 8 * 1024 * 1024

#: the measured round trip counts this much: a slot's queue must outlast the round trip
#: with room to spare (jitter), or the worker waits for each next chunk
RTT_MARGIN = 1.5


class Pace:
    """How many chunks per worker slot to keep queued, from how long chunks take.

    About QUEUED_WORK of work per slot, plus the round trip to the slot when one is
    measured (a node 10 ms away needs 20 ms of work queued, or it idles for each next
    chunk: W9): long chunks on a near node keep PREFETCH per slot (little to wait for
    at a job's end); chunks of microseconds, or far nodes, get up to MAX_PREFETCH.
    """

    def __init__(self) -> None:
        self.depth = PREFETCH
        self.chunk_s = -1.0  # smoothed duration of a chunk, -1 until one is seen
        #: the least round trip seen (a chunk's turnaround less its run time), -1: none
        self.rtt = -1.0
        self.chunk_bytes = -1.0  # smoothed size of a chunk's arguments, -1: unknown

    def observe(self, elapsed: float, rtt: float = -1.0, size: int = -1) -> int:
        """A chunk took ``elapsed`` s (and ``rtt`` s of round trip besides, if known),
        and its arguments were ``size`` bytes (if known); return the new depth. The
        least round trip seen is kept: a chunk that waited in a queue took longer, and
        that is no distance. Beyond PREFETCH, no more than QUEUED_BYTES are queued."""
        if rtt >= 0 and (self.rtt < 0 or rtt < self.rtt):
            self.rtt = rtt
        self.chunk_s = elapsed if self.chunk_s < 0 else 0.8 * self.chunk_s + 0.2 * elapsed
        ahead = QUEUED_WORK + RTT_MARGIN * max(self.rtt, 0.0)
        want = int(ahead / max(self.chunk_s, 1e-6)) + 1
        if size >= 0:
            b = self.chunk_bytes
            self.chunk_bytes = size if b < 0 else 0.8 * b + 0.2 * size
            want = min(want, int(QUEUED_BYTES / max(self.chunk_bytes, 1.0)))
        self.depth = max(PREFETCH, min(MAX_PREFETCH, want))
        return self.depth
