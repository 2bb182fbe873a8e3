"""One frozen dataclass per frame type.

The header of a frame is ``{"t": TYPE, "len": n, **fields}``; each field's annotation
is the JSON type the decoder enforces. A payload, where a frame has one, travels after
the header as raw bytes and is never part of these objects (the server routes payloads
without looking inside them).

Roles: ``node`` (runs tasks), ``controller`` (submits jobs), ``admin`` (status, kill).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, fields
from typing import ClassVar

from achilles.errors import ProtocolError

#: 2: batch frames (chunks, tasks, results); 3: isolated jobs; 4: the peer speaks first
#: (Hello), a transcript bound to the TLS certificate, refusals with a proof; 5: NodeInfo;
#: 6: Output (task output to the caller) and NodeStats (which a version-5 peer would
#: close the connection over as unknown frame types)
PROTOCOL_VERSION = 6

ROLES = ("node", "controller", "admin")


class ChunkStatus(enum.Enum):
    """What a node reports of a chunk (the ``status`` of ``Result``/``Results``).

    The wire and the per-chunk code carry the plain text values (the constants below):
    an enum member would be pickled by reference in every worker's result and sent
    through the JSON encoder's slow path in every header."""

    OK = "ok"  #: payload: the pickled list of the chunk's results
    ERROR = "error"  #: payload: pickled (exception, traceback text) the task raised
    CRASHED = "crashed"  #: payload: utf-8 text; the worker died running it (retried)
    TIMEOUT = "timeout"  #: payload: utf-8 text; it ran past its time limit (retried)
    CANCELLED = "cancelled"  #: the node dropped it unrun: its job was cancelled


OK = ChunkStatus.OK.value
ERROR = ChunkStatus.ERROR.value
CRASHED = ChunkStatus.CRASHED.value
TIMEOUT = ChunkStatus.TIMEOUT.value
CANCELLED = ChunkStatus.CANCELLED.value
#: every status a node may report (anything else is refused)
STATUSES = frozenset(s.value for s in ChunkStatus)


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[str] = ""
    #: whether a payload is allowed
    PAYLOAD: ClassVar[bool] = False

    def check(self, n: int) -> None:
        """Checks across fields and the payload length ``n`` (fields are typed already).

        Raises:
            ProtocolError: the frame is inconsistent.
        """


class ListOf:
    """The JSON type of a field holding an array of ``elem`` values."""

    def __init__(self, elem: type) -> None:
        self.elem = elem
        self.__name__ = f"list of {elem.__name__}"


#: most items in one batch frame (a header holds at most 8 KiB anyway)
MAX_BATCH = 1024

#: a job id a controller chooses (ours are uuid4 hex): a safe alphabet, so that it can be
#: logged and shown as it is, and at most JOB_ID_MAX characters
JOB_ID_MAX = 64
#: the job ids frames may carry: a controller's, or the server's key for one on the way
#: to and from nodes (``<owner>-<id>``, see ``core.scheduler.job_key``), a little longer
_JOB = re.compile(r"[A-Za-z0-9._-]{1,96}")


def _check_job(t: str, job: str) -> None:
    """A frame's job id: 1 to 96 characters of ``A-Za-z0-9._-`` (anything else would reach
    logs, ``achilles status`` and file names on the nodes)."""
    if not _JOB.fullmatch(job):
        raise ProtocolError(
            "bad-field", f"{t!r} job id is not 1 to 96 characters of A-Z a-z 0-9 . _ -"
        )


def _check_seq(t: str, seq: int) -> None:
    """A chunk's sequence number indexes the job's arguments: never negative."""
    if seq < 0:
        raise ProtocolError("bad-field", f"{t!r} chunk number {seq} is negative")


def _check_batch(msg: Batch, n: int, lists: tuple[str, ...]) -> None:
    """A batch frame: parallel lists of one length (1 to MAX_BATCH) whose ``sizes`` add
    up to the payload, which is the items' payloads back to back."""
    _check_job(msg.TYPE, msg.job)
    k = len(msg.seqs)
    if not 0 < k <= MAX_BATCH:
        raise ProtocolError("bad-field", f"{msg.TYPE!r} frame with {k} items (1 to {MAX_BATCH})")
    for name in lists:
        if len(getattr(msg, name)) != k:
            raise ProtocolError(
                "bad-field",
                f"{msg.TYPE!r} field {name!r} has {len(getattr(msg, name))} items, not {k}",
            )
    sizes = msg.sizes
    if min(sizes) < 0 or sum(sizes) != n:
        raise ProtocolError(
            "bad-field", f"{msg.TYPE!r} sizes do not add up to the payload of {n} bytes"
        )
    if min(msg.seqs) < 0:
        raise ProtocolError("bad-field", f"{msg.TYPE!r} has a negative chunk number")


# --- handshake ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """The peer's first frame on plain TCP, so that the server can tell plain from TLS
    by the first byte (sent on TLS and in memory too, for one code path)."""

    TYPE = "hello"


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """Server's opening: a fresh nonce and the server's versions."""

    TYPE = "challenge"
    nonce: str
    version: int
    python: str


@dataclass(frozen=True, slots=True)
class AuthReply(Message):
    """Peer's answer: who it is, its own nonce for the server, and its proof."""

    TYPE = "auth"
    role: str
    username: str
    nonce: str
    digest: str
    version: int
    python: str
    slots: int
    name: str
    #: the client's session: random, kept across its reconnects, never shown. A new
    #: connection with the session of a live one takes over its jobs (the old one is
    #: dropped), and job ids are the session's own, so another client cannot squat them
    session: str


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Server's proof that it holds the secret too, and the peer's id."""

    TYPE = "welcome"
    digest: str
    peer_id: int


@dataclass(frozen=True, slots=True)
class ErrorFrame(Message):
    """Sent before the sender closes the connection (or to fail one request). A server
    refusing a handshake after the peer's AuthReply adds ``proof`` (see
    ``auth.refusal_digest``): only then may the peer treat the refusal as final."""

    TYPE = "error"
    code: str
    detail: str
    proof: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    TYPE = "hb"


# --- controller -> server ---------------------------------------------------------------
#: longest function name a Submit frame may carry
FUNCTION_NAME_MAX = 200


@dataclass(frozen=True, slots=True)
class Submit(Message):
    """A new job; the payload is the serialised function bundle."""

    TYPE = "submit"
    PAYLOAD = True
    job: str
    max_attempts: int
    timeout: float  # per task, seconds; 0 means none
    limit: int  # most chunks in flight at once; 0 means no limit
    total: int  # chunks the job will have; -1 while unknown (a generator)
    #: 1: every chunk stands alone (a pool's apply calls of one function share a job):
    #: a chunk that raises or fails for good fails only itself, not the job
    isolated: int = 0
    #: the function's qualified name, for ``achilles status`` and the dashboard
    #: (at most FUNCTION_NAME_MAX characters; the server escapes it)
    name: str = ""
    #: the job's items (arguments), -1 while unknown: the dashboard's items per second
    items: int = -1

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)
        if self.items < -1:
            raise ProtocolError("bad-field", f"'submit' items {self.items} (-1: unknown)")
        if len(self.name) > FUNCTION_NAME_MAX:
            raise ProtocolError(
                "bad-field", f"'submit' function name over {FUNCTION_NAME_MAX} characters"
            )
        if len(self.job) > JOB_ID_MAX:
            raise ProtocolError(
                "bad-field", f"'submit' job id of {len(self.job)} characters (at most {JOB_ID_MAX})"
            )
        if self.total < -1:
            raise ProtocolError("bad-field", f"'submit' total {self.total} (-1: unknown)")


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """One chunk of a job's arguments (opaque payload)."""

    TYPE = "chunk"
    PAYLOAD = True
    job: str
    seq: int

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)
        _check_seq(self.TYPE, self.seq)


@dataclass(frozen=True, slots=True)
class Batch(Message):
    """What every batch frame has: items ``seqs`` of one job, whose payloads of
    ``sizes`` bytes are the frame's payload back to back; LISTS are the fields that hold
    one value per item."""

    PAYLOAD = True
    LISTS: ClassVar[tuple[str, ...]] = ("sizes",)
    job: str
    seqs: list[int]
    sizes: list[int]

    def check(self, n: int) -> None:
        _check_batch(self, n, self.LISTS)


@dataclass(frozen=True, slots=True)
class Chunks(Batch):
    """Several chunks of one job (controller -> server)."""

    TYPE = "chunks"


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Stop a job: the controller gave up on it, or (server->node) drop its work."""

    TYPE = "cancel"
    job: str

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)


@dataclass(frozen=True, slots=True)
class End(Message):
    """The controller has every result of the job; the server may forget it."""

    TYPE = "end"
    job: str

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)


@dataclass(frozen=True, slots=True)
class Kill(Message):
    """Stop every node (killCluster)."""

    TYPE = "kill"


@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    TYPE = "status?"


# --- server -> node ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Function(Message):
    """A job's function bundle, sent once per node before its first task."""

    TYPE = "function"
    PAYLOAD = True
    job: str

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)


@dataclass(frozen=True, slots=True)
class Task(Message):
    """Run chunk ``seq`` of ``job``."""

    TYPE = "task"
    PAYLOAD = True
    job: str
    seq: int
    timeout: float

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)
        _check_seq(self.TYPE, self.seq)


@dataclass(frozen=True, slots=True)
class Tasks(Batch):
    """Run several chunks of ``job`` (server -> node)."""

    TYPE = "tasks"
    timeout: float


# --- node -> server -> controller -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Result(Message):
    """The outcome of one chunk; ``status`` is one of STATUSES."""

    TYPE = "result"
    PAYLOAD = True
    job: str
    seq: int
    status: str
    elapsed: float

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)
        _check_seq(self.TYPE, self.seq)


@dataclass(frozen=True, slots=True)
class Results(Batch):
    """The outcomes of several chunks of ``job``: what ``Result`` says of one, in
    parallel lists (node -> server -> controller)."""

    TYPE = "results"
    LISTS = ("sizes", "statuses", "elapsed")
    statuses: list[str]
    elapsed: list[float]


#: most bytes of one Output frame's payload (a worker keeps at most OUTPUT_CHARS
#: characters of a chunk's output; JSON-escaped, that fits)
OUTPUT_MAX = 256 * 1024
#: the end of the pool id in a job's bundle when the pool forwards its tasks' output
#: (the node's workers then capture it; see achilles.node.worker)
OUTPUT_TAG = ":out"


@dataclass(frozen=True, slots=True)
class Output(Message):
    """What chunk ``seq`` of ``job`` printed (node -> server -> its job's controller).

    The payload is UTF-8 JSON, a list of ``[stream, text]`` pairs in the order they were
    written (stream ``"out"`` or ``"err"``; ``warnings`` go to ``"err"``), opened only by
    the controller. ``dropped``: characters left out (the worker's per-chunk cap, the
    server's per-node budget). ``node``: empty from a node; the server puts the node's
    name there, which the controller shows as the prefix."""

    TYPE = "output"
    PAYLOAD = True
    job: str
    seq: int
    node: str
    dropped: int

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)
        _check_seq(self.TYPE, self.seq)
        if n > OUTPUT_MAX:
            raise ProtocolError(
                "payload-too-large", f"{self.TYPE!r} payload of {n} bytes (most {OUTPUT_MAX})"
            )
        if self.dropped < 0 or len(self.node) > INFO_MAX:
            raise ProtocolError("bad-field", f"{self.TYPE!r} dropped or node out of range")


#: longest text field of a NodeInfo frame (versions, host name, launcher), all of which
#: are in a safe alphabet: shown as they are
INFO_MAX = 64
_INFO = re.compile(r"[A-Za-z0-9._@:+-]{0,64}")


@dataclass(frozen=True, slots=True)
class NodeInfo(Message):
    """Sent once by a node after it is welcomed: what ``achilles status`` and ``achilles
    up`` show of it. ``launcher`` is how it was started ("up", "systemd" or "")."""

    TYPE = "nodeinfo"
    version: str
    python: str
    host: str
    launcher: str
    pid: int

    def check(self, n: int) -> None:
        for name in ("version", "python", "host", "launcher"):
            if not _INFO.fullmatch(getattr(self, name)):
                raise ProtocolError(
                    "bad-field",
                    f"{self.TYPE!r} field {name!r} is not 0 to {INFO_MAX} characters of "
                    f"A-Z a-z 0-9 . _ @ : + -",
                )
        if not 0 <= self.pid < 2**32:
            raise ProtocolError("bad-field", f"{self.TYPE!r} pid {self.pid} is out of range")


#: a node's CPU use is at most this many percent (one core is 100)
CPU_MAX = 100.0 * 4096
#: most bytes of a Failure frame's payload (the traceback text, UTF-8), and of its kind
FAILURE_TEXT_MAX = 4096
FAILURE_KIND_MAX = 128


@dataclass(frozen=True, slots=True)
class NodeStats(Message):
    """What a node measures of itself (node and workers), sent at its heartbeat cadence
    for the dashboard: ``cpu`` percent of one core since its last report, ``rss`` bytes
    resident; -1 where it cannot tell (not Linux)."""

    TYPE = "nodestats"
    cpu: float
    rss: int

    def check(self, n: int) -> None:
        # NaN fails both comparisons: refused too
        if not (-1.0 <= self.cpu <= CPU_MAX) or not -1 <= self.rss < 2**53:
            raise ProtocolError("bad-field", f"{self.TYPE!r} cpu or rss out of range")


@dataclass(frozen=True, slots=True)
class Failure(Message):
    """A short text summary of a chunk that raised (node -> server, for the dashboard;
    the result itself travels unopened): ``kind``, the exception's type name, and the
    traceback text as the payload (at most FAILURE_TEXT_MAX bytes of UTF-8)."""

    TYPE = "failure"
    PAYLOAD = True
    job: str
    seq: int
    kind: str

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)
        _check_seq(self.TYPE, self.seq)
        if n > FAILURE_TEXT_MAX or len(self.kind) > FAILURE_KIND_MAX:
            raise ProtocolError("bad-field", f"{self.TYPE!r} kind or text too long")


@dataclass(frozen=True, slots=True)
class Drain(Message):
    """A node is leaving: send it no more work."""

    TYPE = "drain"


# --- server -> controller ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JobFailed(Message):
    """A chunk failed for good (``reason``: its last status, after max_attempts tries),
    or the server refused a chunk or (``seq`` -1) the job itself (``reason``
    "refused")."""

    TYPE = "jobfailed"
    PAYLOAD = True  # utf-8 text of the last failure, or of the refusal
    job: str
    seq: int
    reason: str

    def check(self, n: int) -> None:
        _check_job(self.TYPE, self.job)
        if self.seq != -1:
            _check_seq(self.TYPE, self.seq)


@dataclass(frozen=True, slots=True)
class Cluster(Message):
    """The cluster's size, pushed to controllers whenever it changes."""

    TYPE = "cluster"
    nodes: int
    slots: int


@dataclass(frozen=True, slots=True)
class Status(Message):
    """Reply to StatusRequest; the payload is a JSON document."""

    TYPE = "status"
    PAYLOAD = True


@dataclass(frozen=True, slots=True)
class Killed(Message):
    """Reply to Kill: how many nodes were told to stop."""

    TYPE = "killed"
    nodes: int


MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Challenge,
        AuthReply,
        Welcome,
        ErrorFrame,
        Heartbeat,
        Submit,
        Chunk,
        Chunks,
        Cancel,
        End,
        Kill,
        StatusRequest,
        Function,
        Task,
        Tasks,
        Result,
        Results,
        Drain,
        NodeInfo,
        NodeStats,
        Failure,
        Output,
        JobFailed,
        Cluster,
        Status,
        Killed,
    )
}

_JSON_TYPES: dict[str, type | ListOf] = {
    "str": str,
    "int": int,
    "float": float,
    "list[int]": ListOf(int),
    "list[str]": ListOf(str),
    "list[float]": ListOf(float),
}

FIELD_TYPES: dict[str, dict[str, type | ListOf]] = {
    t: {f.name: _JSON_TYPES[str(f.type)] for f in fields(cls)} for t, cls in MESSAGES.items()
}

#: per type, its fields and their JSON types, in declaration (constructor) order
FIELD_SPECS: dict[str, tuple[tuple[str, type | ListOf], ...]] = {
    t: tuple(spec.items()) for t, spec in FIELD_TYPES.items()
}
FIELD_NAMES: dict[str, tuple[str, ...]] = {t: tuple(spec) for t, spec in FIELD_TYPES.items()}
