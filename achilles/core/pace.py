"""How many chunks to keep queued ahead of the workers, from how long chunks take.

One rule serves three places: the server (chunks per slot it gives a node), a node
(chunks per worker it puts in its pool) and the controller (a job's window).
"""

from __future__ import annotations

#: chunks per slot queued ahead while chunks are long
PREFETCH = 2
#: most chunks per slot, while chunks are very short
MAX_PREFETCH = 16
#: how much work (seconds) to hold per slot beyond the running chunk, so that the round
#: trip of the next chunk hides behind work
QUEUED_WORK = 0.002


class Pace:
    """How many chunks per worker slot to keep queued, from how long chunks take.

    About QUEUED_WORK of work per slot: long chunks keep PREFETCH per slot (little to
    wait for at a job's end); chunks of microseconds get up to MAX_PREFETCH, or each
    would wait for a whole round trip.
    """

    def __init__(self) -> None:
        self.depth = PREFETCH
        self.chunk_s = -1.0  # smoothed duration of a chunk, -1 until one is seen

    def observe(self, elapsed: float) -> int:
        """A chunk took ``elapsed`` s; return the new depth."""
        self.chunk_s = elapsed if self.chunk_s < 0 else 0.8 * self.chunk_s + 0.2 * elapsed
        want = int(QUEUED_WORK / max(self.chunk_s, 1e-6)) + 1
        self.depth = max(PREFETCH, min(MAX_PREFETCH, want))
        return self.depth
