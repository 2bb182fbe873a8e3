"""The scheduler's state: what it knows of each node and each job, and the rules that
name and time them (see :mod:`achilles.core.scheduler`)."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from achilles.core.pace import Pace

#: most worker slots a node is believed to have (it may claim 10**9 and take every chunk)
MAX_SLOTS = 1024
#: least grace past a job's time limit before the server takes a chunk away
MIN_GRACE = 2.0


def job_key(owner: int, job: str) -> str:
    """The scheduler's name for job ``job`` of the controller on connection ``owner``
    (what nodes see): unambiguous, as the owner is digits and ends at the first ``-``."""
    return f"{owner}-{job}"


def deadline(timeout: float) -> float:
    """How long a node may hold a running chunk of a job with a time limit of ``timeout``
    before the server takes it away: the limit, plus time for the node's own kill, a pool
    restart and the report to arrive."""
    return timeout + max(MIN_GRACE, timeout / 2)


@dataclass
class NodeState:
    id: int
    slots: int
    name: str
    #: (job, seq) -> when its clock started (-1: not yet), in the order they were sent.
    #: The first ``slots`` are the ones the node can be running; a chunk's clock starts
    #: when it is among them, as the node runs its chunks in the order it got them.
    inflight: dict[tuple[str, int], float] = field(default_factory=dict)
    functions: set[str] = field(default_factory=set)
    # jobs this node was told to drop: a result of theirs may still be on its way
    dropped: deque[str] = field(default_factory=lambda: deque(maxlen=128))
    draining: bool = False
    done: int = 0
    pace: Pace = field(default_factory=Pace)  # chunks per slot it is given
    order: int = 0  # when it joined: the tie-break between nodes equally free

    @property
    def capacity(self) -> int:
        return 0 if self.draining else self.slots * self.pace.depth


@dataclass
class JobState:
    id: str  # the key (see job_key)
    name: str  # the id its controller chose
    owner: int
    function: bytes
    max_attempts: int
    timeout: float
    limit: int
    submitted: float
    queue: deque[int] = field(default_factory=deque)
    payloads: dict[int, bytes] = field(default_factory=dict)
    inflight: dict[int, int] = field(default_factory=dict)  # seq -> node
    attempts: dict[int, int] = field(default_factory=dict)
    failures: int = 0  # chunks that raised or were given up on (the job goes on)
    total: int = -1  # chunks expected, -1 if unknown
    added: int = 0
    done: int = 0
    retries: int = 0
    last_pick: int = 0
    isolated: bool = False
    function_name: str = ""
    items: int = -1
    #: nodes that held a chunk past its deadline or answered "cancelled": they get no
    #: more of this job's chunks while another node can take them
    shunned: set[int] = field(default_factory=set)
    #: nodes it was sent to (a superset of those holding its function or chunks): a
    #: job's end visits these, not every node
    holders: set[int] = field(default_factory=set)

    def eligible(self) -> bool:
        return bool(self.queue) and (self.limit <= 0 or len(self.inflight) < self.limit)


class FreeNodes:
    """The nodes with room for a chunk, the largest free share of capacity first (ties:
    the earliest joined), so that a dispatch costs O(log nodes), not a scan of every
    node (at 1,000 nodes the scan was most of the server's CPU per chunk).

    A heap with lazy deletion: :meth:`update` pushes a node's current entry and makes
    its older ones stale (each node has one version number); stale entries are skipped
    when met and the heap is rebuilt when they outnumber the live ones. Whoever changes
    a node's chunks in flight or its capacity calls :meth:`update` (or :meth:`remove`).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int]] = []  # (-share, order, version, id)
        self._version: dict[int, int] = {}

    def update(self, node: NodeState) -> None:
        """The node's room changed (or it joined)."""
        version = self._version.get(node.id, 0) + 1
        self._version[node.id] = version
        free = node.capacity - len(node.inflight)
        if free > 0:
            heapq.heappush(self._heap, (-free / node.slots, node.order, version, node.id))
            if len(self._heap) > 4 * len(self._version) + 64:
                self._compact()

    def remove(self, node_id: int) -> None:
        """The node is gone."""
        self._version.pop(node_id, None)

    def best(self, shunned: set[int]) -> int | None:
        """The id of the node with the largest free share not in ``shunned`` (None if
        none has room); its entry is used up (the caller dispatches to it and updates)."""
        heap, version = self._heap, self._version
        passed = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            if version.get(entry[3]) != entry[2]:
                continue  # stale
            if entry[3] in shunned:
                passed.append(entry)
                continue
            found = entry[3]
            break
        for entry in passed:
            heapq.heappush(heap, entry)
        return found

    def problems(self, nodes: dict[int, NodeState]) -> list[str]:
        """What disagrees with ``nodes`` (for Scheduler.validate): every node with room
        has one live entry, with its current share; no live entry names a node gone."""
        live = {e[3]: e for e in self._heap if self._version.get(e[3]) == e[2]}
        out = [f"free-node entry for node {i}, which is gone" for i in live if i not in nodes]
        for node in nodes.values():
            free = node.capacity - len(node.inflight)
            entry = live.get(node.id)
            if free > 0 and (entry is None or entry[0] != -free / node.slots):
                out.append(f"node {node.id}: {free} free, but its free-node entry is {entry}")
        return out

    def _compact(self) -> None:
        version = self._version
        self._heap = [e for e in self._heap if version.get(e[3]) == e[2]]
        heapq.heapify(self._heap)
