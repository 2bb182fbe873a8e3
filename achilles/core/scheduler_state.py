"""The scheduler's state: what it knows of each node and each job, and the rules that
name and time them (see :mod:`achilles.core.scheduler`)."""

from __future__ import annotations

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

    def eligible(self) -> bool:
        return bool(self.queue) and (self.limit <= 0 or len(self.inflight) < self.limit)
