"""The server's scheduler: events in, exact instruction lists out (no I/O, no clock)."""
from __future__ import annotations

import pytest

from achilles.core.pace import MAX_PREFETCH, PREFETCH, QUEUED_WORK
from achilles.core.scheduler import (
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


def report(s: Scheduler, node: int, job: str, seq: int, status: str = OK,
           payload: bytes | None = None, now: float = 1.0,
           elapsed: float = 0.25) -> list[object]:
    if payload is None:
        payload = result(job, seq)
    return s.handle(ResultReceived(node, job, seq, status, payload, elapsed), now)


def send_fn(node: int, job: str) -> SendFunction:
    return SendFunction(node, job, fn_bytes(job))


def task(node: int, job: str, seq: int, timeout: float = 0.0) -> SendTask:
    return SendTask(node, job, seq, chunk(job, seq), timeout)


def forward(job: str, seq: int, status: str = OK, owner: int = OWNER,
            payload: bytes | None = None) -> ForwardResult:
    return ForwardResult(owner, job, seq, status,
                         result(job, seq) if payload is None else payload, 0.25)


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
    assert add(s, "j", 0, 1, 2, 3) == [send_fn(1, "j"), task(1, "j", 0),
                                       send_fn(2, "j"), task(2, "j", 1),
                                       task(1, "j", 2), task(2, "j", 3)]


def test_capacity_is_slots_times_prefetch() -> None:
    """A node is given at most slots * PREFETCH chunks; the rest wait in the queue."""
    s = Scheduler()
    join(s, 1, slots=3)
    submit(s)
    out = add(s, "j", *range(10))
    tasks = [i for i in out if isinstance(i, SendTask)]
    assert len(tasks) == 3 * PREFETCH
    assert [t.seq for t in tasks] == list(range(3 * PREFETCH))
    assert list(s.jobs["j"].queue) == list(range(3 * PREFETCH, 10))


def test_short_chunks_deepen_a_nodes_queue_and_long_ones_restore_it() -> None:
    """A node whose chunks take microseconds is given up to MAX_PREFETCH per slot (each
    would otherwise wait a round trip); chunks of QUEUED_WORK or more bring it back to
    PREFETCH. A crash says nothing about duration."""
    s = Scheduler()
    join(s, 1, slots=2)
    submit(s)
    add(s, "j", *range(200))
    assert len(s.nodes[1].inflight) == 2 * PREFETCH
    seq = 0
    for _ in range(20):  # fast chunks
        report(s, 1, "j", seq, elapsed=20e-6)
        seq += 1
    assert s.nodes[1].pace.depth == MAX_PREFETCH
    assert len(s.nodes[1].inflight) == 2 * MAX_PREFETCH
    report(s, 1, "j", seq, status=CRASHED, payload=b"died", elapsed=0.0)  # no duration
    assert s.nodes[1].pace.depth == MAX_PREFETCH
    for later in range(seq + 1, seq + 40):  # long chunks
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
    batch = many.handle(ChunksAdded("j", list(range(6)), [chunk("j", q) for q in range(6)],
                                    OWNER), 0.0)
    assert [i for i in singles if not isinstance(i, ClusterChanged)] == batch
    singles = [i for seq in (0, 1) for i in report(one, 1, "j", seq)]
    batch = many.handle(ResultsReceived(1, "j", [0, 1], [OK, OK],
                                        [result("j", 0), result("j", 1)], [0.25, 0.25]), 1.0)
    assert sorted(map(repr, singles)) == sorted(map(repr, batch))
    out = many.handle(ResultsReceived(1, "j", [2, 99, 3], [OK, OK, OK],
                                      [b"a", b"b", b"c"], [0.25] * 3), 1.0)
    assert [type(i).__name__ for i in out] == ["ForwardResult", "Refuse"]
    assert 3 in many.jobs["j"].inflight  # the item after the refused one was not taken
    assert many.handle(ChunksAdded("nope", [0, 1], [b"x", b"y"], OWNER), 1.0) == [
        Refuse(OWNER, "chunk for unknown job nope")]


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
    assert join(s, 1) == [ClusterChanged(1, 1), send_fn(1, "j"), task(1, "j", 0),
                          task(1, "j", 1)]


def test_duplicate_chunk_is_not_queued_twice() -> None:
    """A chunk re-sent with the same seq, queued or in flight, is ignored."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1, 2)
    assert add(s, "j", 0) == []  # in flight
    assert add(s, "j", 2) == []  # queued
    assert list(s.jobs["j"].queue) == [2]
    assert report(s, 1, "j", 0) == [forward("j", 0), task(1, "j", 2)]
    assert report(s, 1, "j", 1) == [forward("j", 1)]
    assert report(s, 1, "j", 2) == [forward("j", 2)]
    assert not s.jobs["j"].queue


# --- node loss ----------------------------------------------------------------------------
def test_node_lost_requeues_its_chunks_first_on_another_node() -> None:
    """A lost node's in-flight chunks go back to the front of the queue, ahead of new ones."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    assert add(s, "j", 0, 1, 2, 3, 4) == [send_fn(1, "j"), task(1, "j", 0), task(1, "j", 1)]
    assert join(s, 2) == [ClusterChanged(2, 2), send_fn(2, "j"), task(2, "j", 2),
                          task(2, "j", 3)]
    assert s.handle(NodeLost(1, "connection lost"), 1.0) == [ClusterChanged(1, 1)]
    assert list(s.jobs["j"].queue) == [0, 1, 4]
    assert report(s, 2, "j", 2) == [forward("j", 2), task(2, "j", 0)]
    assert report(s, 2, "j", 3) == [forward("j", 3), task(2, "j", 1)]
    assert report(s, 2, "j", 0) == [forward("j", 0), task(2, "j", 4)]
    assert s.jobs["j"].attempts == {0: 1, 1: 1}


def test_node_lost_with_free_node_redispatches_immediately() -> None:
    """When another node has room, a lost node's chunks are sent to it in the same step."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1)
    join(s, 2)
    assert s.handle(NodeLost(1, "gone"), 1.0) == [ClusterChanged(1, 1), send_fn(2, "j"),
                                                  task(2, "j", 0), task(2, "j", 1)]


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
    assert list(s.jobs["j"].queue) == [0]


# --- failures -----------------------------------------------------------------------------
def test_crashed_chunk_retried_until_max_attempts_then_fails_alone() -> None:
    """A crashing chunk is retried first in line, then reported failed, naming the chunk;
    the job's other chunks go on."""
    s = Scheduler()
    join(s, 1)
    submit(s, max_attempts=2)
    add(s, "j", 0, 1, 2)
    assert report(s, 1, "j", 0, CRASHED, b"worker died (signal 11)") == [task(1, "j", 0)]
    assert list(s.jobs["j"].queue) == [2]
    assert report(s, 1, "j", 0, CRASHED, b"worker died (signal 11)") == [
        FailJob(OWNER, "j", 0, CRASHED, "worker died (signal 11) (attempt 2 of 2)"),
        task(1, "j", 2)]
    assert list(s.jobs["j"].queue) == []  # the job goes on, as multiprocessing's does
    assert add(s, "j", 3) == []  # later chunks are still queued
    assert list(s.jobs["j"].queue) == [3]
    assert report(s, 1, "j", 1) == [forward("j", 1), task(1, "j", 3)]
    assert s.snapshot()["jobs"][0]["failed"] == 1  # type: ignore[index]


def test_timeout_result_is_retried_like_a_crash() -> None:
    """A TIMEOUT result requeues the chunk and counts as an attempt."""
    s = Scheduler()
    join(s, 1)
    submit(s, max_attempts=1)
    add(s, "j", 0)
    assert report(s, 1, "j", 0, TIMEOUT, b"over 5 s") == [
        FailJob(OWNER, "j", 0, TIMEOUT, "over 5 s (attempt 1 of 1)")]


def test_node_loss_counts_towards_max_attempts() -> None:
    """Losing the node running a chunk on its last attempt fails the job."""
    s = Scheduler()
    join(s, 1)
    join(s, 2)
    submit(s, max_attempts=1)
    add(s, "j", 0)
    assert s.handle(NodeLost(1, "reset"), 1.0) == [
        FailJob(OWNER, "j", 0, CRASHED,
                "node n1 was lost (reset) while running it (attempt 1 of 1)"),
        ClusterChanged(1, 1)]


def test_error_result_forwarded_and_the_job_goes_on() -> None:
    """A task's ERROR result is forwarded and the job's other chunks still run (as in
    multiprocessing, a raising task does not stop the others)."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1, 2, 3)
    assert report(s, 1, "j", 0, ERROR, b"exc") == [forward("j", 0, ERROR, payload=b"exc"),
                                                    task(1, "j", 2)]
    assert list(s.jobs["j"].queue) == [3]
    assert add(s, "j", 4) == []
    assert list(s.jobs["j"].queue) == [3, 4]
    assert s.snapshot()["jobs"][0]["failed"] == 1  # type: ignore[index]


def test_isolated_job_error_fails_only_its_chunk() -> None:
    """In an isolated job (apply calls), an ERROR result cuts nothing: later chunks run."""
    s = Scheduler()
    join(s, 1)
    submit(s, isolated=True)
    add(s, "j", 0, 1, 2, 3)
    assert report(s, 1, "j", 0, ERROR, b"exc") == [forward("j", 0, ERROR, payload=b"exc"),
                                                    task(1, "j", 2)]
    assert list(s.jobs["j"].queue) == [3]
    assert add(s, "j", 4) == []  # queued behind 3, not dropped
    assert list(s.jobs["j"].queue) == [3, 4]
    assert s.snapshot()["jobs"][0]["failed"] == 1  # type: ignore[index]


def test_isolated_job_outlives_a_chunk_that_fails_for_good() -> None:
    """A chunk of an isolated job out of attempts fails alone; the job keeps serving and
    keeps no per-chunk history."""
    s = Scheduler()
    join(s, 1)
    submit(s, max_attempts=1, isolated=True)
    add(s, "j", 0, 1, 2)
    assert report(s, 1, "j", 0, CRASHED, b"worker died") == [
        FailJob(OWNER, "j", 0, CRASHED, "worker died (attempt 1 of 1)"), task(1, "j", 2)]
    assert report(s, 1, "j", 1) == [forward("j", 1)]
    assert add(s, "j", 3) == [task(1, "j", 3)]
    assert s.jobs["j"].attempts == {}
    assert sorted(s.jobs["j"].payloads) == [2, 3]


def test_cancelled_result_requeues_chunk() -> None:
    """A CANCELLED result of a live job puts the chunk back at the front of the queue."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0, 1, 2)
    assert report(s, 1, "j", 0, CANCELLED, b"") == [task(1, "j", 0)]
    assert list(s.jobs["j"].queue) == [2]


def test_unknown_status_is_refused_and_chunk_not_lost() -> None:
    """A result with an unknown status is refused, and the chunk still completes later."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    assert report(s, 1, "j", 0, "bogus", b"") == [
        Refuse(1, "unknown result status 'bogus'", close=True)]
    job = s.jobs["j"]
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
    assert join(s, 1, slots=2) == [ClusterChanged(1, 2),
                                   send_fn(1, "a"), task(1, "a", 0),
                                   send_fn(1, "b"), task(1, "b", 0),
                                   task(1, "a", 1), task(1, "b", 1)]


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
    assert add(s, "b", 0, 1, 2, 3) == [send_fn(1, "b"), task(1, "b", 0), task(1, "b", 1),
                                       task(1, "b", 2)]


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
        CancelOnNode(1, "a"), CancelOnNode(2, "a"),
        send_fn(1, "b"), task(1, "b", 1), task(1, "b", 2)]
    assert set(s.jobs) == {"b"}
    assert s.nodes[1].inflight == {("b", 1), ("b", 2)}
    assert report(s, 1, "a", 0) == []  # late result of a removed job: dropped


def test_job_cancelled_by_owner() -> None:
    """JobCancelled from the owner drops the job; from another controller it is ignored."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    assert s.handle(JobCancelled("j", owner=OWNER + 1), 1.0) == []
    assert s.handle(JobCancelled("j", owner=OWNER), 1.0) == [CancelOnNode(1, "j")]
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
    assert s.handle(JobEnded("j", owner=OWNER), 2.0) == [CancelOnNode(1, "j")]
    assert s.jobs == {}
    assert s.nodes[1].functions == set()


def test_duplicate_job_id_refused() -> None:
    """Submitting a job id that exists already is refused."""
    s = Scheduler()
    submit(s)
    assert submit(s, owner=7) == [Refuse(7, "job j exists already")]


def test_chunk_for_unknown_or_foreign_job_refused() -> None:
    """A chunk for a job that does not exist or belongs to someone else is refused."""
    s = Scheduler()
    submit(s, owner=1)
    assert s.handle(ChunkAdded("nope", 0, b"", 1), 0.0) == [
        Refuse(1, "chunk for unknown job nope")]
    assert s.handle(ChunkAdded("j", 0, b"", 2), 0.0) == [Refuse(2, "chunk for unknown job j")]


# --- stray results ------------------------------------------------------------------------
def test_late_result_from_dropped_node_is_dropped() -> None:
    """A result from a node that was dropped is ignored; the requeued copy's result counts."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    join(s, 2)
    s.handle(NodeLost(1, "timeout"), 1.0)
    assert s.jobs["j"].inflight == {0: 2}
    assert report(s, 1, "j", 0) == []
    assert report(s, 2, "j", 0) == [forward("j", 0)]
    assert report(s, 2, "j", 0) == [Refuse(2, "result for chunk 0 of job j, which it was "
                                              "not given", close=True)]


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
    assert report(s, 1, "j", 0) == [Refuse(1, "result for chunk 0 of job j, which it was "
                                              "not given", close=True)]
    assert s.jobs["j"].inflight == {0: 2, 1: 1}
    assert report(s, 2, "j", 0) == [forward("j", 0)]


def test_result_for_chunk_never_given_is_refused() -> None:
    """A result for a chunk the job never had is refused."""
    s = Scheduler()
    join(s, 1)
    submit(s)
    add(s, "j", 0)
    assert report(s, 1, "j", 99) == [
        Refuse(1, "result for chunk 99 of job j, which it was not given",
               close=True)]
    assert s.jobs["j"].inflight == {0: 1}


# --- status -------------------------------------------------------------------------------
def test_snapshot_shape() -> None:
    """snapshot() lists nodes and jobs with their counters, ages relative to now."""
    s = Scheduler()
    join(s, 1, slots=2, now=1.0)
    s.handle(JobSubmitted("j", OWNER, b"F"), 2.0)
    s.handle(ChunkAdded("j", 0, b"c", OWNER), 2.0)
    s.handle(ResultReceived(1, "j", 0, OK, b"r", 0.1), 3.0)
    s.handle(ChunkAdded("j", 1, b"c", OWNER), 4.0)
    assert s.snapshot() == {
        "nodes": [{"id": 1, "name": "n1", "slots": 2, "inflight": 1, "done": 1,
                   "draining": False}],
        "jobs": [{"id": "j", "owner": OWNER, "done": 1, "total": None, "added": 2,
                  "queued": 0, "inflight": 1, "retries": 0, "age": 2.0,
                  "chunks_per_s": 0.5, "failed": 0}],
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
    s.jobs["j"].inflight.clear()  # the node still holds it
    with pytest.raises(AssertionError, match="payloads kept for"):
        s.validate()
