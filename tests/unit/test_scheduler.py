"""The server's scheduler: events in, exact instruction lists out (no I/O, no clock)."""

from __future__ import annotations

import pytest

from achilles.core.pace import MAX_PREFETCH, PREFETCH, QUEUED_BYTES, QUEUED_WORK, Pace
from achilles.core.scheduler import (
    MAX_SLOTS,
    RUN_BYTES,
    CancelOnNode,
    ChunkAdded,
    ChunksAdded,
    ClusterChanged,
    Event,
    FailJob,
    ForwardResult,
    Instruction,
    JobCancelled,
    JobEnded,
    JobSubmitted,
    NodeDraining,
    NodeJoined,
    NodeLost,
    OwnerLost,
    Refuse,
    ResultReceived,
    ResultsReceived,
    SendFunction,
    SendTask,
    Tick,
    deadline,
    job_key,
)
from achilles.core.scheduler import Scheduler as _Scheduler
from achilles.protocol.messages import CANCELLED, CRASHED, ERROR, OK, TIMEOUT

OWNER = 100


class Scheduler(_Scheduler):
    """The scheduler, with its invariants checked after every event."""

    def handle(self, event: Event, now: float) -> list[Instruction]:
        out = super().handle(event, now)
        self.validate()
        return out


# --- helpers: one place that says what a job's function and chunks look like --------------
def fn_bytes(job: str) -> bytes:
    return b"FN:" + job.encode()


def chunk(job: str, seq: int) -> bytes:
    return f"{job}#{seq}".encode()


def result(job: str, seq: int) -> bytes:
    return f"result {job}#{seq}".encode()


def join(s: Scheduler, node: int, slots: int = 1, now: float = 0.0) -> list[object]:
    return s.handle(NodeJoined(node, slots, f"n{node}"), now)


def submit(s: Scheduler, job: str = "j", owner: int = OWNER, **kw: object) -> list[object]:
    return s.handle(JobSubmitted(job, owner, fn_bytes(job), **kw), 0.0)  # type: ignore[arg-type]


def add(s: Scheduler, job: str, *seqs: int, owner: int = OWNER) -> list[object]:
    out: list[object] = []
    for seq in seqs:
        out += s.handle(ChunkAdded(job, seq, chunk(job, seq), owner), 0.0)
    return out


def key(job: str, owner: int = OWNER) -> str:
    """The scheduler's key for ``job`` of ``owner``: what nodes are sent and answer with."""
    return job_key(owner, job)


def report(
    s: Scheduler,
    node: int,
    job: str,
    seq: int,
    status: str = OK,
    payload: bytes | None = None,
    now: float | None = None,
    elapsed: float = 0.25,
    owner: int = OWNER,
) -> list[object]:
    """A node's result; by default it arrives ``elapsed`` after time 0, when chunks
    were sent: a node with no distance (the scheduler measures the round trip)."""
    if payload is None:
        payload = result(job, seq)
    when = elapsed if now is None else now
    return s.handle(ResultReceived(node, key(job, owner), seq, status, payload, elapsed), when)


def send_fn(node: int, job: str, owner: int = OWNER) -> SendFunction:
    return SendFunction(node, key(job, owner), fn_bytes(job))


def task(node: int, job: str, seq: int, timeout: float = 0.0, owner: int = OWNER) -> SendTask:
    return SendTask(node, key(job, owner), seq, chunk(job, seq), timeout)


def forward(
    job: str, seq: int, status: str = OK, owner: int = OWNER, payload: bytes | None = None
) -> ForwardResult:
    return ForwardResult(
        owner, job, seq, status, result(job, seq) if payload is None else payload, 0.25
    )


# --- dispatch -----------------------------------------------------------------------------
def test_node_join_then_job_sends_function_then_tasks() -> None:
    """A job's first chunk on a node is preceded by its function; later chunks are not."""
    s = Scheduler()
    assert join(s, 1) == [ClusterChanged(1, 1)]
    assert submit(s, timeout=2.5) == []
    assert add(s, "j", 0) == [send_fn(1, "j"), task(1, "j", 0, 2.5)]
    assert add(s, "j", 1) == [task(1, "j", 1, 2.5)]


def test_function_sent_once_per_node() -> None:
    """With two nodes, each receives the function exactly once, before its first task."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s)
    assert add(s, "j", 0, 1, 2, 3) == [
        send_fn(1, "j"),
        task(1, "j", 0),
        send_fn(2, "j"),
        task(2, "j", 1),
        task(1, "j", 2),
        task(2, "j", 3),
    ]


def test_capacity_is_slots_times_prefetch() -> None:
    """A node is given at most slots * PREFETCH chunks; the rest wait in the queue."""
    s = Scheduler()
    join(s, 1, slots=3)
    submit(s)
    out = add(s, "j", *range(10))
    tasks = [i for i in out if isinstance(i, SendTask)]
    assert len(tasks) == 3 * PREFETCH
    assert [t.seq for t in tasks] == list(range(3 * PREFETCH))
    assert list(s.jobs[key("j")].queue) == list(range(3 * PREFETCH, 10))


def test_short_chunks_deepen_a_nodes_queue_and_long_ones_restore_it() -> None:
    """A node whose chunks take microseconds is given up to MAX_PREFETCH per slot (each
    would otherwise wait a round trip); chunks of QUEUED_WORK or more bring it back to
    PREFETCH. A crash says nothing about duration."""
    s = Scheduler()
    join(s, 1, slots=2)
    submit(s)
    add(s, "j", *range(8 * MAX_PREFETCH))
    assert len(s.nodes[1].inflight) == 2 * PREFETCH
    seq = 0
    for _ in range(20):  # fast chunks
        report(s, 1, "j", seq, elapsed=20e-6)
        seq += 1
    assert s.nodes[1].pace.depth == MAX_PREFETCH
    assert len(s.nodes[1].inflight) == 2 * MAX_PREFETCH
    report(s, 1, "j", seq, status=CRASHED, payload=b"died", elapsed=0.0)  # no duration
    assert s.nodes[1].pace.depth == MAX_PREFETCH
    for _ in range(4 * MAX_PREFETCH):  # long chunks, until the excess has drained
        if len(s.nodes[1].inflight) <= 2 * PREFETCH:
            break
        later = min(q for _, q in s.nodes[1].inflight)
        report(s, 1, "j", later, elapsed=10 * QUEUED_WORK)
    assert s.nodes[1].pace.depth == PREFETCH
    # what was sent is not taken back; the excess drains as results come, unrefilled
    assert len(s.nodes[1].inflight) == 2 * PREFETCH


def test_batch_events_equal_their_items_one_by_one() -> None:
    """ChunksAdded and ResultsReceived give the same instructions as the single events
    in order, dispatching once at the end; a refused item stops the rest."""
    one, many = Scheduler(), Scheduler()
    for s in (one, many):
        join(s, 1, slots=2)
        submit(s)
    singles = [i for seq in range(6) for i in add(one, "j", seq)]
    batch = many.handle(
        ChunksAdded("j", list(range(6)), [chunk("j", q) for q in range(6)], OWNER), 0.0
    )
    assert [i for i in singles if not isinstance(i, ClusterChanged)] == batch
    singles = [i for seq in (0, 1) for i in report(one, 1, "j", seq)]
    batch = many.handle(
        ResultsReceived(
            1, key("j"), [0, 1], [OK, OK], [result("j", 0), result("j", 1)], [0.25, 0.25]
        ),
        1.0,
    )
    assert sorted(map(repr, singles)) == sorted(map(repr, batch))
    out = many.handle(
        ResultsReceived(1, key("j"), [2, 99, 3], [OK, OK, OK], [b"a", b"b", b"c"], [0.25] * 3), 1.0
    )
    assert [type(i).__name__ for i in out] == ["ForwardResult", "Refuse"]
    assert 3 in many.jobs[key("j")].inflight  # the item after the refused one was not taken
    assert many.handle(ChunksAdded("nope", [0, 1], [b"x", b"y"], OWNER), 1.0) == [
        Refuse(OWNER, "chunk 0 for unknown job nope", job="nope", seq=0)
    ]


def test_ok_result_is_forwarded_and_next_task_dispatched() -> None:
    """An OK result goes to the job's owner and frees a slot for the next queued chunk."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1, 2)
    assert report(s, 1, "j", 0) == [forward("j", 0), task(1, "j", 2)]
    assert report(s, 1, "j", 1) == [forward("j", 1)]


def test_job_submitted_with_no_nodes_waits_for_a_node() -> None:
    """Chunks of a job submitted before any node joined are dispatched when one joins."""
    s = Scheduler()
    submit(s)
    assert add(s, "j", 0, 1, 2) == []
    assert join(s, 1) == [ClusterChanged(1, 1), send_fn(1, "j"), task(1, "j", 0), task(1, "j", 1)]


def test_duplicate_chunk_is_not_queued_twice() -> None:
    """A chunk re-sent with the same seq, queued or in flight, is ignored."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1, 2)
    assert add(s, "j", 0) == []  # in flight
    assert add(s, "j", 2) == []  # queued
    assert list(s.jobs[key("j")].queue) == [2]
    assert report(s, 1, "j", 0) == [forward("j", 0), task(1, "j", 2)]
    assert report(s, 1, "j", 1) == [forward("j", 1)]
    assert report(s, 1, "j", 2) == [forward("j", 2)]
    assert not s.jobs[key("j")].queue


# --- node loss ----------------------------------------------------------------------------
def test_node_lost_requeues_its_chunks_first_on_another_node() -> None:
    """A lost node's in-flight chunks go back to the front of the queue, ahead of new ones."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    assert add(s, "j", 0, 1, 2, 3, 4) == [send_fn(1, "j"), task(1, "j", 0), task(1, "j", 1)]
    assert join(s, 2) == [ClusterChanged(2, 2), send_fn(2, "j"), task(2, "j", 2), task(2, "j", 3)]
    assert s.handle(NodeLost(1, "connection lost"), 1.0) == [ClusterChanged(1, 1)]
    assert list(s.jobs[key("j")].queue) == [0, 1, 4]
    assert report(s, 2, "j", 2) == [forward("j", 2), task(2, "j", 0)]
    assert report(s, 2, "j", 3) == [forward("j", 3), task(2, "j", 1)]
    assert report(s, 2, "j", 0) == [forward("j", 0), task(2, "j", 4)]
    assert s.jobs[key("j")].attempts == {0: 1, 1: 1}


def test_node_lost_with_free_node_redispatches_immediately() -> None:
    """When another node has room, a lost node's chunks are sent to it in the same step."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1)
    join(s, 2)
    assert s.handle(NodeLost(1, "gone"), 1.0) == [
        ClusterChanged(1, 1),
        send_fn(2, "j"),
        task(2, "j", 0),
        task(2, "j", 1),
    ]


def test_lost_node_unknown_is_ignored() -> None:
    """Losing a node that never joined changes nothing."""
    s = Scheduler()
    assert s.handle(NodeLost(9, "never was"), 0.0) == []


def test_draining_node_gets_no_new_work() -> None:
    """After NodeDraining, new chunks go to other nodes and results still get forwarded."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s)
    add(s, "j", 0)
    assert s.handle(NodeDraining(1), 1.0) == [ClusterChanged(1, 1)]
    assert add(s, "j", 1, 2, 3) == [send_fn(2, "j"), task(2, "j", 1), task(2, "j", 2)]
    assert report(s, 1, "j", 0) == [forward("j", 0)]
    assert report(s, 2, "j", 1) == [forward("j", 1), task(2, "j", 3)]


def test_all_nodes_draining_leaves_work_queued() -> None:
    """With every node draining, chunks stay queued."""
    s = Scheduler()
    join(s, 1)
    s.handle(NodeDraining(1), 0.0)
    submit(s)
    assert add(s, "j", 0) == []
    assert list(s.jobs[key("j")].queue) == [0]


# --- failures -----------------------------------------------------------------------------
def test_crashed_chunk_retried_until_max_attempts_then_fails_alone() -> None:
    """A crashing chunk is retried first in line, then reported failed, naming the chunk;
    the job's other chunks go on."""
    s = Scheduler()
    join(s, 1)
    submit(s, max_attempts=2)
    add(s, "j", 0, 1, 2)
    assert report(s, 1, "j", 0, CRASHED, b"worker died (signal 11)") == [task(1, "j", 0)]
    assert list(s.jobs[key("j")].queue) == [2]
    assert report(s, 1, "j", 0, CRASHED, b"worker died (signal 11)") == [
        FailJob(OWNER, "j", 0, CRASHED, "worker died (signal 11) (attempt 2 of 2)"),
        task(1, "j", 2),
    ]
    assert list(s.jobs[key("j")].queue) == []  # the job goes on, as multiprocessing's does
    assert add(s, "j", 3) == []  # later chunks are still queued
    assert list(s.jobs[key("j")].queue) == [3]
    assert report(s, 1, "j", 1) == [forward("j", 1), task(1, "j", 3)]
    assert s.snapshot()["jobs"][0]["failed"] == 1  # type: ignore[index]


def test_timeout_result_is_retried_like_a_crash() -> None:
    """A TIMEOUT result requeues the chunk and counts as an attempt."""
    s = Scheduler()
    join(s, 1)
    submit(s, max_attempts=1)
    add(s, "j", 0)
    assert report(s, 1, "j", 0, TIMEOUT, b"over 5 s") == [
        FailJob(OWNER, "j", 0, TIMEOUT, "over 5 s (attempt 1 of 1)")
    ]


def test_node_loss_counts_towards_max_attempts() -> None:
    """Losing the node running a chunk on its last attempt fails the job."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s, max_attempts=1)
    add(s, "j", 0)
    assert s.handle(NodeLost(1, "reset"), 1.0) == [
        FailJob(
            OWNER, "j", 0, CRASHED, "node n1 was lost (reset) while running it (attempt 1 of 1)"
        ),
        ClusterChanged(1, 1),
    ]


def test_error_result_forwarded_and_the_job_goes_on() -> None:
    """A task's ERROR result is forwarded and the job's other chunks still run (as in
    multiprocessing, a raising task does not stop the others)."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1, 2, 3)
    assert report(s, 1, "j", 0, ERROR, b"exc") == [
        forward("j", 0, ERROR, payload=b"exc"),
        task(1, "j", 2),
    ]
    assert list(s.jobs[key("j")].queue) == [3]
    assert add(s, "j", 4) == []
    assert list(s.jobs[key("j")].queue) == [3, 4]
    assert s.snapshot()["jobs"][0]["failed"] == 1  # type: ignore[index]


def test_isolated_job_error_fails_only_its_chunk() -> None:
    """In an isolated job (apply calls), an ERROR result cuts nothing: later chunks run."""
    s = Scheduler()
    join(s, 1)
    submit(s, isolated=True)
    add(s, "j", 0, 1, 2, 3)
    assert report(s, 1, "j", 0, ERROR, b"exc") == [
        forward("j", 0, ERROR, payload=b"exc"),
        task(1, "j", 2),
    ]
    assert list(s.jobs[key("j")].queue) == [3]
    assert add(s, "j", 4) == []  # queued behind 3, not dropped
    assert list(s.jobs[key("j")].queue) == [3, 4]
    assert s.snapshot()["jobs"][0]["failed"] == 1  # type: ignore[index]


def test_isolated_job_outlives_a_chunk_that_fails_for_good() -> None:
    """A chunk of an isolated job out of attempts fails alone; the job keeps serving and
    keeps no per-chunk history."""
    s = Scheduler()
    join(s, 1)
    submit(s, max_attempts=1, isolated=True)
    add(s, "j", 0, 1, 2)
    assert report(s, 1, "j", 0, CRASHED, b"worker died") == [
        FailJob(OWNER, "j", 0, CRASHED, "worker died (attempt 1 of 1)"),
        task(1, "j", 2),
    ]
    assert report(s, 1, "j", 1) == [forward("j", 1)]
    assert add(s, "j", 3) == [task(1, "j", 3)]
    assert s.jobs[key("j")].attempts == {}
    assert sorted(s.jobs[key("j")].payloads) == [2, 3]


def test_cancelled_answer_for_a_live_job_counts_an_attempt() -> None:
    """A node answering CANCELLED for a chunk of a live job (ours never does) gets it
    back at the front of the queue only while attempts remain: the chunk then fails as
    a crash would, instead of looping (38,778 round trips in 12 s before)."""
    s = Scheduler()
    join(s, 1)
    submit(s, max_attempts=2)
    add(s, "j", 0, 1, 2)
    assert report(s, 1, "j", 0, CANCELLED, b"") == [task(1, "j", 0)]  # no other node
    assert list(s.jobs[key("j")].queue) == [2]
    assert s.jobs[key("j")].attempts == {0: 1}
    assert report(s, 1, "j", 0, CANCELLED, b"") == [
        FailJob(
            OWNER,
            "j",
            0,
            CRASHED,
            "node n1 answered 'cancelled' for it, though its job was live (attempt 2 of 2)",
        ),
        task(1, "j", 2),
    ]


def test_node_answering_cancelled_gets_no_more_of_the_job_while_others_can_take_it() -> None:
    """After a CANCELLED answer, the job's chunks go to other nodes (here the requeued
    one, then the next), while other jobs may still use the shunned node."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s)
    add(s, "j", 0, 1, 2, 3)  # 0, 2 -> n1; 1, 3 -> n2
    assert report(s, 1, "j", 0, CANCELLED, b"") == []  # n2 is full: 0 waits for it
    assert list(s.jobs[key("j")].queue) == [0]
    assert report(s, 2, "j", 1) == [forward("j", 1), task(2, "j", 0)]
    submit(s, "other")
    assert add(s, "other", 0) == [send_fn(1, "other"), task(1, "other", 0)]


def test_unknown_status_is_refused_and_chunk_not_lost() -> None:
    """A result with an unknown status is refused, and the chunk still completes later."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    assert report(s, 1, "j", 0, "bogus", b"") == [
        Refuse(1, "unknown result status 'bogus'", close=True)
    ]
    job = s.jobs[key("j")]
    assert job.inflight == {0: 1} and not job.queue  # still the node's, not lost
    assert report(s, 1, "j", 0) == [forward("j", 0)]


# --- fairness and limits ------------------------------------------------------------------
def test_two_jobs_share_the_cluster_interleaved() -> None:
    """Two waiting jobs are dispatched alternately when capacity appears."""
    s = Scheduler()
    submit(s, "a")
    submit(s, "b")
    add(s, "a", 0, 1, 2, 3)
    add(s, "b", 0, 1, 2, 3)
    assert join(s, 1, slots=2) == [
        ClusterChanged(1, 2),
        send_fn(1, "a"),
        task(1, "a", 0),
        send_fn(1, "b"),
        task(1, "b", 0),
        task(1, "a", 1),
        task(1, "b", 1),
    ]


def test_freed_slot_goes_to_job_with_fewest_in_flight() -> None:
    """A slot freed by one job's result goes to the job with fewest chunks in flight."""
    s = Scheduler()
    join(s, 1, slots=2)
    submit(s, "a")
    submit(s, "b")
    add(s, "a", 0, 1)
    add(s, "b", 0, 1)  # node full: a has 2 in flight, b has 2
    submit(s, "c")
    assert add(s, "c", 0, 1) == []
    assert report(s, 1, "a", 0) == [forward("a", 0), send_fn(1, "c"), task(1, "c", 0)]
    assert report(s, 1, "b", 0) == [forward("b", 0), task(1, "c", 1)]


def test_job_limit_caps_in_flight_chunks() -> None:
    """A job's limit caps its chunks in flight even when nodes have room."""
    s = Scheduler()
    join(s, 1, slots=4)
    submit(s, limit=2)
    assert add(s, "j", 0, 1, 2, 3) == [send_fn(1, "j"), task(1, "j", 0), task(1, "j", 1)]
    assert report(s, 1, "j", 0) == [forward("j", 0), task(1, "j", 2)]


def test_limited_job_leaves_room_for_others() -> None:
    """Capacity a limited job cannot use goes to another job."""
    s = Scheduler()
    join(s, 1, slots=2)
    submit(s, "a", limit=1)
    submit(s, "b")
    add(s, "a", 0, 1)
    assert add(s, "b", 0, 1, 2, 3) == [
        send_fn(1, "b"),
        task(1, "b", 0),
        task(1, "b", 1),
        task(1, "b", 2),
    ]


# --- job lifecycle ------------------------------------------------------------------------
def test_owner_lost_removes_its_jobs_and_cancels_on_nodes() -> None:
    """When a controller goes, its jobs are dropped, nodes told, and others get the room."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s, "a", owner=10)
    submit(s, "b", owner=20)
    add(s, "a", 0, 1, 2, owner=10)  # a#0 -> n1, a#1 -> n2, a#2 -> n1
    add(s, "b", 0, 1, 2, owner=20)  # b#0 -> n2, then both nodes are full
    assert s.handle(OwnerLost(10), 1.0) == [
        CancelOnNode(1, key("a", 10)),
        CancelOnNode(2, key("a", 10)),
        send_fn(1, "b", 20),
        task(1, "b", 1, owner=20),
        task(1, "b", 2, owner=20),
    ]
    assert set(s.jobs) == {key("b", 20)}
    assert list(s.nodes[1].inflight) == [(key("b", 20), 1), (key("b", 20), 2)]
    assert report(s, 1, "a", 0, owner=10) == []  # late result of a removed job: dropped


def test_job_cancelled_by_owner() -> None:
    """JobCancelled from the owner drops the job; from another controller it is ignored."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    assert s.handle(JobCancelled("j", owner=OWNER + 1), 1.0) == []
    assert s.handle(JobCancelled("j", owner=OWNER), 1.0) == [CancelOnNode(1, key("j"))]
    assert s.jobs == {}


def test_job_ended_forgets_job_and_its_function_on_nodes() -> None:
    """JobEnded removes a finished job and tells nodes holding its function to drop it."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s)
    add(s, "j", 0)
    report(s, 1, "j", 0)
    assert s.handle(JobEnded("j", owner=OWNER + 1), 2.0) == []  # not the owner
    assert s.handle(JobEnded("j", owner=OWNER), 2.0) == [CancelOnNode(1, key("j"))]
    assert s.jobs == {}
    assert s.nodes[1].functions == set()


def test_duplicate_job_id_refused() -> None:
    """Submitting again a job id that the same controller has already is refused."""
    s = Scheduler()
    submit(s)
    assert submit(s) == [Refuse(OWNER, "job j exists already", job="j")]


def test_same_job_id_from_another_controller_is_a_job_of_its_own() -> None:
    """Job ids cannot be squatted: another controller choosing the same id gets its own
    job, with its own function and chunks, and each owner gets only its own results."""
    s = Scheduler()
    join(s, 1, slots=2)
    submit(s, owner=1)
    assert submit(s, owner=2) == []
    assert add(s, "j", 0, owner=1) == [send_fn(1, "j", 1), task(1, "j", 0, owner=1)]
    assert add(s, "j", 0, owner=2) == [send_fn(1, "j", 2), task(1, "j", 0, owner=2)]
    assert report(s, 1, "j", 0, owner=2) == [forward("j", 0, owner=2)]
    assert s.handle(JobEnded("j", 2), 1.0) == [CancelOnNode(1, key("j", 2))]
    assert report(s, 1, "j", 0, owner=1) == [forward("j", 0, owner=1)]


def test_chunk_for_unknown_or_foreign_job_refused() -> None:
    """A chunk for a job that does not exist or belongs to someone else is refused,
    naming the chunk and the job id the sender used."""
    s = Scheduler()
    submit(s, owner=1)
    assert s.handle(ChunkAdded("nope", 0, b"", 1), 0.0) == [
        Refuse(1, "chunk 0 for unknown job nope", job="nope", seq=0)
    ]
    assert s.handle(ChunkAdded("j", 3, b"", 2), 0.0) == [
        Refuse(2, "chunk 3 for unknown job j", job="j", seq=3)
    ]


# --- stray results ------------------------------------------------------------------------
def test_late_result_from_dropped_node_is_dropped() -> None:
    """A result from a node that was dropped is ignored; the requeued copy's result counts."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    join(s, 2)
    s.handle(NodeLost(1, "timeout"), 1.0)
    assert s.jobs[key("j")].inflight == {0: 2}
    assert report(s, 1, "j", 0) == []
    assert report(s, 2, "j", 0) == [forward("j", 0)]
    assert report(s, 2, "j", 0) == [
        Refuse(2, "result for chunk 0 of job 100-j, which it was not given", close=True)
    ]


def test_result_from_node_that_no_longer_holds_chunk_is_refused() -> None:
    """A result from a node for a chunk it no longer holds is refused and it is dropped."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1)
    join(s, 2)
    assert report(s, 1, "j", 0, CRASHED, b"died") == [send_fn(2, "j"), task(2, "j", 0)]
    # node 1 is not running chunk 0 any more: a result from it now can only come from a
    # misbehaving node (ours never reports a chunk after reporting it crashed)
    assert report(s, 1, "j", 0) == [
        Refuse(1, "result for chunk 0 of job 100-j, which it was not given", close=True)
    ]
    assert s.jobs[key("j")].inflight == {0: 2, 1: 1}
    assert report(s, 2, "j", 0) == [forward("j", 0)]


def test_result_for_chunk_never_given_is_refused() -> None:
    """A result for a chunk the job never had is refused."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    assert report(s, 1, "j", 99) == [
        Refuse(1, "result for chunk 99 of job 100-j, which it was not given", close=True)
    ]
    assert s.jobs[key("j")].inflight == {0: 1}


# --- status -------------------------------------------------------------------------------
def test_snapshot_shape() -> None:
    """snapshot() lists nodes and jobs with their counters, ages relative to now."""
    s = Scheduler()
    join(s, 1, slots=2, now=1.0)
    s.handle(JobSubmitted("j", OWNER, b"F", function_name="m.f"), 2.0)
    s.handle(ChunkAdded("j", 0, b"c", OWNER), 2.0)
    s.handle(ResultReceived(1, key("j"), 0, OK, b"r", 0.1), 3.0)
    s.handle(ChunkAdded("j", 1, b"c", OWNER), 4.0)
    assert s.snapshot() == {
        "nodes": [
            {
                "id": 1,
                "name": "n1",
                "slots": 2,
                "inflight": 1,
                "busy": 1,
                "queued": 0,
                "done": 1,
                "draining": False,
            }
        ],
        "jobs": [
            {
                "id": "j",
                "owner": OWNER,
                "done": 1,
                "total": None,
                "added": 2,
                "queued": 0,
                "inflight": 1,
                "retries": 0,
                "age": 2.0,
                "chunks_per_s": 0.5,
                "failed": 0,
                "function": "m.f",
            }
        ],
    }


def test_stale_result_of_a_dropped_then_resubmitted_job_is_ignored() -> None:
    """A result sent before the node dropped a job is ignored quietly, even when the
    same job id was submitted again meanwhile (a controller that reconnected)."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    s.handle(OwnerLost(OWNER), 1.0)
    submit(s)
    assert report(s, 1, "j", 0) == []  # no Refuse: the node is not disconnected
    assert add(s, "j", 0) == [send_fn(1, "j"), task(1, "j", 0)]  # and serves the new job


def test_validate_names_a_broken_invariant() -> None:
    """validate() (run after every event above) does catch a chunk lost from the books."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    s.jobs[key("j")].inflight.clear()  # the node still holds it
    with pytest.raises(AssertionError, match="payloads kept for"):
        s.validate()


# --- what nodes claim, and what they hold -------------------------------------------------
def test_advertised_slots_are_capped() -> None:
    """A node claiming 10**9 slots is believed for MAX_SLOTS: it is given at most
    MAX_SLOTS * PREFETCH chunks, and controllers are told MAX_SLOTS."""
    s = Scheduler()
    assert join(s, 1, slots=10**9) == [ClusterChanged(1, MAX_SLOTS)]
    submit(s)
    n = MAX_SLOTS * PREFETCH + 100
    out = s.handle(ChunksAdded("j", list(range(n)), [b"c"] * n, OWNER), 0.0)
    assert sum(isinstance(i, SendTask) for i in out) == MAX_SLOTS * PREFETCH
    assert len(s.jobs[key("j")].queue) == 100


def test_result_for_a_job_the_node_never_had_is_refused() -> None:
    """A result naming a job the node was never given (another controller's id, or a
    made-up one) gets it refused and closed; one for a job it dropped is a race."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s)
    add(s, "j", 0)  # -> n1
    assert s.handle(ResultReceived(2, "j", 0, OK, b"forged", 0.0), 1.0) == [
        Refuse(2, "result for chunk 0 of job j, which it was not given", close=True)
    ]
    assert s.handle(ResultReceived(2, key("j"), 0, OK, b"forged", 0.0), 1.0) == [
        Refuse(2, f"result for chunk 0 of job {key('j')}, which it was not given", close=True)
    ]
    assert s.handle(JobCancelled("j", OWNER), 1.0) == [CancelOnNode(1, key("j"))]
    assert report(s, 1, "j", 0) == []


def test_time_limit_takes_a_held_chunk_away_and_counts_an_attempt() -> None:
    """A node holding a chunk past its job's time limit plus the grace (while it talks)
    is told to drop the job at the next Tick; the chunk counts an attempt and goes to
    another node, and the late result that may still come is dropped."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s, timeout=1.0)
    add(s, "j", 0, 1)  # 0 -> n1 at t=0, 1 -> n2
    report(s, 2, "j", 1, now=0.5)
    assert deadline(1.0) == 3.0
    assert s.handle(Tick(), 3.0) == []  # not past it yet
    assert s.handle(Tick(), 3.5) == [CancelOnNode(1, key("j")), task(2, "j", 0, 1.0)]
    assert s.jobs[key("j")].attempts == {0: 1}
    assert s.jobs[key("j")].retries == 1
    assert report(s, 1, "j", 0, now=4.0) == []  # late: dropped
    assert report(s, 2, "j", 0, now=4.0) == [forward("j", 0)]


def test_chunk_held_past_its_deadline_every_attempt_fails_with_timeout() -> None:
    """A chunk taken away max_attempts times fails as a TIMEOUT, naming node and limit;
    with no other node, the shunned one gets it again meanwhile."""
    s = Scheduler()
    join(s, 1)
    submit(s, timeout=4.0, max_attempts=2)
    add(s, "j", 0)
    assert s.handle(Tick(), 10.5) == [
        CancelOnNode(1, key("j")),
        send_fn(1, "j"),
        task(1, "j", 0, 4.0),
    ]
    detail = (
        "node n1 held chunk 0 of job j past its time limit of 4 s (and 2 s of "
        "grace) without an answer; taken away (attempt 2 of 2)"
    )
    assert s.handle(Tick(), 17.0) == [
        FailJob(OWNER, "j", 0, TIMEOUT, detail),
        CancelOnNode(1, key("j")),
    ]


def test_a_chunks_clock_starts_when_the_node_can_be_running_it() -> None:
    """Of a node's chunks, only the first ``slots`` can be running: a chunk queued
    behind another starts its clock when the one ahead finishes (at the next Tick), so
    a node working through its queue in time is never taken for late."""
    s = Scheduler()
    join(s, 1)
    submit(s, timeout=1.0)
    add(s, "j", 0, 1)  # both on n1 (PREFETCH), 1 behind 0
    assert report(s, 1, "j", 0, now=2.9) == [forward("j", 0)]
    assert s.handle(Tick(), 3.0) == []  # 1's clock starts now, not at t=0
    assert s.handle(Tick(), 6.0) == []
    assert s.handle(Tick(), 6.5) == [
        CancelOnNode(1, key("j")),
        send_fn(1, "j"),
        task(1, "j", 1, 1.0),
    ]


def test_a_crash_report_restarts_the_clocks_of_the_nodes_other_chunks() -> None:
    """A node reporting a crash or a timeout restarted its pool and reruns its other
    chunks: their clocks start again, so they are not taken away for the lost time."""
    s = Scheduler()
    join(s, 1, slots=2)
    submit(s, timeout=1.0)
    add(s, "j", 0, 1)  # both running from t=0
    assert report(s, 1, "j", 0, CRASHED, b"worker died", now=2.5) == [task(1, "j", 0, 1.0)]
    assert s.handle(Tick(), 3.5) == []  # 1 would be late by its first clock; it restarts
    assert s.handle(Tick(), 5.4) == []
    assert s.handle(Tick(), 5.6) == [
        CancelOnNode(1, key("j")),
        send_fn(1, "j"),
        task(1, "j", 0, 1.0),
        task(1, "j", 1, 1.0),
    ]
    assert s.jobs[key("j")].attempts == {0: 2}  # 0 was late (sent again at 2.5), 1 not


def test_jobs_without_a_time_limit_are_never_taken_away() -> None:
    """Tick takes nothing away from a job with no time limit, however long it runs."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    assert s.handle(Tick(), 1e6) == []
    assert s.jobs[key("j")].inflight == {0: 1}


def test_job_that_shuns_every_node_with_room_lets_others_dispatch() -> None:
    """A job whose only node with room is one it shuns waits for the others; another
    job takes that room meanwhile."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s, timeout=1.0)
    add(s, "j", 0, 1)  # 0 -> n1, 1 -> n2
    report(s, 2, "j", 1, now=0.5)
    assert s.handle(Tick(), 4.0) == [CancelOnNode(1, key("j")), task(2, "j", 0, 1.0)]
    assert add(s, "j", 2, 3, 4) == [task(2, "j", 2, 1.0)]  # n2 is full now; n1 is shunned
    submit(s, "b")
    assert add(s, "b", 0) == [send_fn(1, "b"), task(1, "b", 0)]
    assert list(s.jobs[key("j")].queue) == [3, 4]
    assert s.jobs[key("j")].shunned == {1}


# --- scale (issue 16): many nodes, far nodes ------------------------------------------------
def _scan_pick(s: _Scheduler, shunned: set[int]) -> int | None:
    """The rule FreeNodes implements, as the plain scan it replaced: the largest free
    share of capacity, the earliest joined among equals."""
    best, most = None, 0.0
    for n in sorted(s.nodes.values(), key=lambda n: n.order):
        free = n.capacity - len(n.inflight)
        if free > 0 and free / n.slots > most and n.id not in shunned:
            best, most = n.id, free / n.slots
    return best


def test_free_nodes_pick_what_a_scan_of_every_node_would() -> None:
    """Through joins, losses, draining, dispatch and results on uneven nodes, the
    heap's choice is always the scan's (largest free share, earliest joined)."""
    import random

    rng = random.Random(16)
    s = Scheduler()
    submit(s)
    live: list[int] = []
    seq = 0
    for step in range(400):
        op = rng.random()
        if op < 0.15 or not live:
            node = 1000 + step
            join(s, node, slots=rng.choice([1, 2, 3, 8]))
            live.append(node)
        elif op < 0.2 and len(live) > 1:
            s.handle(NodeLost(live.pop(rng.randrange(len(live))), "test"), 0.0)
        elif op < 0.22:
            s.handle(NodeDraining(rng.choice(live)), 0.0)
        elif op < 0.6:
            add(s, "j", *range(seq, seq + rng.randint(1, 5)))
            seq += 5
        else:
            held = [(n.id, k[1]) for n in s.nodes.values() for k in n.inflight]
            if held:
                node, done = rng.choice(held)
                report(s, node, "j", done, elapsed=rng.choice([1e-5, 0.01, 0.5]))
        expected = _scan_pick(s, set())
        got = s._free.best(set())
        assert got == expected
        if got is not None:
            s._free.update(s.nodes[got])  # put back what best() used up


def test_cluster_counts_follow_joins_drains_and_losses() -> None:
    """ClusterChanged counts live (not draining) nodes and their slots, kept as nodes
    come and go rather than counted by a scan."""
    s = Scheduler()
    assert join(s, 1, slots=2)[0] == ClusterChanged(1, 2)
    assert join(s, 2, slots=3)[0] == ClusterChanged(2, 5)
    assert s.handle(NodeDraining(1), 0.0) == [ClusterChanged(1, 3)]
    assert s.handle(NodeDraining(1), 0.0) == []  # said once
    assert s.handle(NodeLost(1, "gone"), 0.0)[0] == ClusterChanged(1, 3)
    assert s.handle(NodeLost(2, "gone"), 0.0)[0] == ClusterChanged(0, 0)


def test_tiny_chunks_go_to_a_node_in_runs_long_ones_one_by_one() -> None:
    """Once chunks are seen to take microseconds, a node with room is given as many of a
    job's chunks in a row as it has room for (one frame each way for all of them); while
    chunks are long (or unknown), they are spread one by one over the nodes."""
    s = Scheduler()
    for node in range(1, 5):
        join(s, node, slots=1)
    submit(s)
    out = add(s, "j", 0, 1, 2, 3)
    assert [i.node for i in out if isinstance(i, SendTask)] == [1, 2, 3, 4]  # spread
    for node, seq in zip(range(1, 5), range(4)):
        report(s, node, "j", seq, elapsed=1e-5)  # tiny: node depth MAX_PREFETCH
    n = 2 * MAX_PREFETCH + 3
    out = s.handle(ChunksAdded("j", list(range(4, 4 + n)), [b"x"] * n, OWNER), 1.0)
    nodes = [i.node for i in out if isinstance(i, SendTask)]
    assert (
        nodes == [1] * MAX_PREFETCH + [2] * MAX_PREFETCH + [3] * 3
    )  # runs, not 1, 2, 3, 4, 1, ...


def test_a_far_node_is_given_enough_chunks_to_cover_its_round_trip() -> None:
    """The round trip to a node is measured (a chunk sent to a free worker: its
    turnaround less its run time) and its queue deepens to cover it: 10 ms chunks 20 ms
    away get more than PREFETCH per slot; the same chunks on a near node get PREFETCH."""
    for rtt, deeper in ((0.020, True), (0.0002, False)):
        s = Scheduler()
        join(s, 1, slots=1)
        submit(s)
        add(s, "j", *range(50))
        report(s, 1, "j", 0, elapsed=0.010, now=0.010 + rtt)
        report(s, 1, "j", 1, elapsed=0.010, now=0.020 + rtt)
        depth = s.nodes[1].pace.depth
        assert (depth > PREFETCH) is deeper, (rtt, depth)
        assert len(s.nodes[1].inflight) == depth
        assert s.nodes[1].pace.rtt == pytest.approx(rtt)


def test_chunks_carrying_megabytes_are_neither_queued_deep_nor_sent_in_runs() -> None:
    """Chunks of microseconds are queued up to MAX_PREFETCH per slot only while that is
    at most QUEUED_BYTES of arguments (a node is not handed 64 arguments of 4 MiB), and
    a run to one node ends at RUN_BYTES, so big chunks are spread over the nodes."""
    pace = Pace()
    assert pace.observe(1e-6, size=100) == MAX_PREFETCH
    assert Pace().observe(1e-6, size=QUEUED_BYTES // 2) == PREFETCH
    s = Scheduler()
    for node in (1, 2):
        join(s, node, slots=1)
    submit(s)
    big = b"x" * (RUN_BYTES + 1)
    first = s.handle(ChunksAdded("j", [0, 1], [big, big], OWNER), 0.0)
    for node, seq in ((1, 0), (2, 1)):
        assert [i.seq for i in first if isinstance(i, SendTask) and i.node == node] == [seq]
        report(s, node, "j", seq, elapsed=1e-6)  # tiny, but each is RUN_BYTES + 1
    out = s.handle(ChunksAdded("j", list(range(2, 10)), [big] * 8, OWNER), 1.0)
    nodes = [i.node for i in out if isinstance(i, SendTask)]
    assert nodes == [1, 2] * 4  # one at a time, alternating
