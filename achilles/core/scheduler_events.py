"""The scheduler's events (what the server's shell tells it) and instructions (what it
tells the shell to do): who sends each and what it means is in its docstring.

A job has two names: the id its controller chose (``job`` in what comes from or goes to
a controller) and the scheduler's key for it, ``<owner>-<id>`` (``job`` in what comes
from or goes to a node; see ``scheduler.job_key``), so that two controllers may choose
the same id."""

from __future__ import annotations

from dataclasses import dataclass


# --- events --------------------------------------------------------------------------
# HOT: the events and instructions made for every chunk are plain slotted dataclasses,
# not frozen ones: a frozen dataclass's __init__ sets each field through
# object.__setattr__ (1.6 us for SendTask, against 0.4 us), and the server makes two per
# chunk. Nothing mutates them once made.
@dataclass(frozen=True)
class NodeJoined:
    """Shell: a node authenticated; it has ``slots`` worker processes (so it says: the
    scheduler believes at most MAX_SLOTS)."""

    node: int
    slots: int
    name: str


@dataclass(frozen=True)
class NodeLost:
    """Shell: a node's connection closed or went silent; its chunks are requeued."""

    node: int
    reason: str


@dataclass(frozen=True)
class NodeDraining:
    """Node (Drain frame): it is leaving; give it no more work."""

    node: int


@dataclass(frozen=True)
class JobSubmitted:
    """Controller ``owner`` (Submit frame): a new job and its function bundle."""

    job: str
    owner: int
    function: bytes
    max_attempts: int = 3
    timeout: float = 0.0
    limit: int = 0
    total: int = -1
    isolated: bool = False  # long-lived (apply calls): keeps no per-chunk history
    function_name: str = ""  # shown only (escaped by the server)
    items: int = -1  # the job's items, if known (shown only)


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class ChunkAdded:
    """Controller ``owner`` (Chunk frame): one chunk of its job's arguments, to queue."""

    job: str
    seq: int
    payload: bytes
    owner: int


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class ChunksAdded:
    """Several chunks of one job at once (a batch frame): queued, then dispatched."""

    job: str
    seqs: list[int]
    payloads: list[bytes]
    owner: int


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class ResultReceived:
    """Node (Result frame): the outcome of one chunk it was given (``job``: the key)."""

    node: int
    job: str
    seq: int
    status: str
    payload: bytes
    elapsed: float = 0.0


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class ResultsReceived:
    """Several results of one job from one node (a batch frame)."""

    node: int
    job: str
    seqs: list[int]
    statuses: list[str]
    payloads: list[bytes]
    elapsed: list[float]


@dataclass(frozen=True)
class JobCancelled:
    """Controller (Cancel frame): drop its job and everything of it the nodes hold."""

    job: str
    owner: int


@dataclass(frozen=True)
class JobEnded:
    """Controller (End frame): it has every result of its job; forget the job."""

    job: str
    owner: int


@dataclass(frozen=True)
class OwnerLost:
    """Shell: a controller's connection closed; its jobs are dropped."""

    owner: int


@dataclass(frozen=True)
class Tick:
    """Shell, every second: take chunks away from nodes that hold them past their job's
    time limit (plus a grace) while still sending heartbeats."""


Event = (
    NodeJoined
    | NodeLost
    | NodeDraining
    | JobSubmitted
    | ChunkAdded
    | ChunksAdded
    | ResultReceived
    | ResultsReceived
    | JobCancelled
    | JobEnded
    | OwnerLost
    | Tick
)


# --- instructions --------------------------------------------------------------------
@dataclass(frozen=True)
class SendFunction:
    """Send a job's function bundle to a node, before its first task of that job."""

    node: int
    job: str
    payload: bytes


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class SendTask:
    """Send one chunk to a node to run (the shell batches these per node and job)."""

    node: int
    job: str
    seq: int
    payload: bytes
    timeout: float


@dataclass(frozen=True)
class CancelOnNode:
    """Tell the node to drop the job: its queued chunks, running ones, its function (its
    results for the job that are on their way are dropped here)."""

    node: int
    job: str


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class ForwardResult:
    """Pass a chunk's result (or its raised exception) to the job's controller (``job``:
    the id it chose)."""

    owner: int
    job: str
    seq: int
    status: str
    payload: bytes
    elapsed: float


@dataclass(frozen=True)
class FailJob:
    """Tell the controller a chunk failed for good (attempts exhausted); the job goes on."""

    owner: int
    job: str
    seq: int
    reason: str
    detail: str


@dataclass(frozen=True)
class ClusterChanged:
    """Tell every controller the cluster's new size (live nodes, their slots)."""

    nodes: int
    slots: int


@dataclass(frozen=True)
class Refuse:
    """A peer sent something that does not fit the state: log it and tell the peer
    (an ErrorFrame "refused"), so that a controller learns that its submit or chunk was
    not taken; ``close`` if it can only be a misbehaving peer (not a race), and drop its
    connection."""

    peer: int
    reason: str
    close: bool = False
    job: str = ""  # the controller's job it refused (its own id), if any
    seq: int = -1  # and the chunk (-1: the job itself)


Instruction = (
    SendFunction | SendTask | CancelOnNode | ForwardResult | FailJob | ClusterChanged | Refuse
)
