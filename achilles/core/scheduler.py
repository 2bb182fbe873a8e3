"""The server's brain: nodes, jobs, chunks; events in, instructions out.

    controller --Submit/Chunk--> [ job.queue ] --dispatch--> node.inflight --Task--> node
        ^                             ^   requeue on NodeLost,                 |
        |                             |   crash or timeout (attempts < max)    |
        +------ForwardResult----------+-------------- ResultReceived <---------+

A node announces ``slots`` worker processes; it is given up to ``slots * PREFETCH``
(see ``core.pace``) chunks so that the next chunk is already there when a worker frees
up (round trips hide behind work), and more (up to MAX_PREFETCH per slot) while its
chunks take less than a round trip. Whenever a slot frees, the job with the fewest chunks in flight
gets it, so concurrent jobs share the cluster fairly. Payloads are opaque ``bytes``:
the scheduler keeps a chunk's payload until its result arrives, so it can resend it
to another node, and never looks inside.

Heartbeats are the shell's business: a silent peer's connection is closed, and
that arrives here as NodeLost like any other loss.

Execution is at least once: a chunk on a lost node runs again elsewhere. Results are
forwarded once per chunk; a late or unknown result is dropped here.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from achilles.core.pace import Pace
from achilles.core.scheduler_events import (
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
from achilles.protocol.messages import CRASHED, ERROR, OK, STATUSES, TIMEOUT


@dataclass
class NodeState:
    id: int
    slots: int
    name: str
    inflight: set[tuple[str, int]] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    # jobs this node was told to drop: a result of theirs may still be on its way
    dropped: deque[str] = field(default_factory=lambda: deque(maxlen=64))
    draining: bool = False
    done: int = 0
    pace: Pace = field(default_factory=Pace)  # chunks per slot it is given

    @property
    def capacity(self) -> int:
        return 0 if self.draining else self.slots * self.pace.depth



@dataclass
class JobState:
    id: str
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

    def eligible(self) -> bool:
        return bool(self.queue) and (self.limit <= 0 or len(self.inflight) < self.limit)



class Scheduler:
    """Feed events with :meth:`handle`; carry out the instructions it returns, in order."""

    def __init__(self) -> None:
        self.nodes: dict[int, NodeState] = {}
        self.jobs: dict[str, JobState] = {}
        self._picks = 0
        self._out: list[Instruction] = []
        self._now = 0.0

    # -- entry point -----------------------------------------------------------------
    def handle(self, event: Event, now: float) -> list[Instruction]:
        self._now = now
        self._out = []
        _HANDLERS[type(event)](self, event)
        return self._out

    # -- nodes -----------------------------------------------------------------------
    def _on_node_joined(self, ev: NodeJoined) -> None:
        self.nodes[ev.node] = NodeState(ev.node, max(1, ev.slots), ev.name)
        self._cluster_changed()
        self._dispatch()

    def _on_node_lost(self, ev: NodeLost) -> None:
        node = self.nodes.pop(ev.node, None)
        if node is None:
            return
        for job_id, seq in sorted(node.inflight, reverse=True):
            job = self.jobs.get(job_id)
            if job is not None and job.inflight.get(seq) == node.id:
                del job.inflight[seq]
                self._retry(job, seq, CRASHED,
                            f"node {node.name} was lost ({ev.reason}) while running it")
        self._cluster_changed()
        self._dispatch()

    def _on_node_draining(self, ev: NodeDraining) -> None:
        node = self.nodes.get(ev.node)
        if node is not None:
            node.draining = True
            self._cluster_changed()

    def _cluster_changed(self) -> None:
        live = [n for n in self.nodes.values() if not n.draining]
        self._out.append(ClusterChanged(len(live), sum(n.slots for n in live)))

    # -- jobs ------------------------------------------------------------------------
    def _on_job_submitted(self, ev: JobSubmitted) -> None:
        if ev.job in self.jobs:
            self._out.append(Refuse(ev.owner, f"job {ev.job} exists already"))
            return
        self.jobs[ev.job] = JobState(ev.job, ev.owner, ev.function, max(1, ev.max_attempts),
                                     ev.timeout, ev.limit, self._now, total=ev.total,
                                     isolated=ev.isolated)

    def _owned_job(self, job_id: str, owner: int) -> JobState | None:
        job = self.jobs.get(job_id)
        if job is None or (owner >= 0 and job.owner != owner):
            return None
        return job

    def _on_chunk_added(self, ev: ChunkAdded) -> None:
        self._add_chunk(ev.job, ev.seq, ev.payload, ev.owner)
        self._dispatch()

    def _on_chunks_added(self, ev: ChunksAdded) -> None:
        for seq, payload in zip(ev.seqs, ev.payloads):
            if not self._add_chunk(ev.job, seq, payload, ev.owner):
                break
        self._dispatch()

    def _add_chunk(self, job_id: str, seq: int, payload: bytes, owner: int) -> bool:
        """Queue a chunk; False if its job is unknown (refused)."""
        job = self._owned_job(job_id, owner)
        if job is None:
            self._out.append(Refuse(owner, f"chunk for unknown job {job_id}"))
            return False
        if seq in job.payloads:
            return True  # re-sent after a reconnect, still pending here
        job.payloads[seq] = payload
        job.queue.append(seq)
        job.added = max(job.added, seq + 1)
        return True

    def _on_job_cancelled(self, ev: JobCancelled) -> None:
        job = self._owned_job(ev.job, ev.owner)
        if job is not None:
            self._remove_job(job)
            self._dispatch()

    def _on_job_ended(self, ev: JobEnded) -> None:
        job = self._owned_job(ev.job, ev.owner)
        if job is not None:
            self._remove_job(job)
            self._dispatch()

    def _on_owner_lost(self, ev: OwnerLost) -> None:
        for job in [j for j in self.jobs.values() if j.owner == ev.owner]:
            self._remove_job(job)
        self._dispatch()

    def _remove_job(self, job: JobState) -> None:
        """Forget a job; nodes holding its function or chunks are told to drop them."""
        del self.jobs[job.id]
        for node in self.nodes.values():
            if job.id in node.functions or any(j == job.id for j, _ in node.inflight):
                node.inflight = {(j, s) for j, s in node.inflight if j != job.id}
                node.functions.discard(job.id)
                node.dropped.append(job.id)
                self._out.append(CancelOnNode(node.id, job.id))

    # -- results ---------------------------------------------------------------------
    def _on_result_received(self, ev: ResultReceived) -> None:
        self._take_result(ev.node, ev.job, ev.seq, ev.status, ev.payload, ev.elapsed)
        self._dispatch()

    def _on_results_received(self, ev: ResultsReceived) -> None:
        for seq, status, payload, elapsed in zip(ev.seqs, ev.statuses, ev.payloads,
                                                 ev.elapsed):
            if not self._take_result(ev.node, ev.job, seq, status, payload, elapsed):
                break
        self._dispatch()

    def _take_result(self, node_id: int, job_id: str, seq: int, status: str,
                     payload: bytes, elapsed: float) -> bool:
        """One chunk's outcome; False if the node was refused (read no more from it)."""
        node = self.nodes.get(node_id)
        job = self.jobs.get(job_id)
        if node is None or job is None:
            return True  # the job was cancelled or ended meanwhile: a harmless race
        if (job_id, seq) not in node.inflight or job.inflight.get(seq) != node_id:
            if job_id in node.dropped:
                return True  # from before the job was dropped here (and submitted again)
            # Only a misbehaving node reports a chunk it does not hold: a node that lost
            # a chunk to a requeue was disconnected first.
            self._out.append(Refuse(node_id, f"result for chunk {seq} of job "
                                             f"{job_id}, which it was not given",
                                    close=True))
            return False
        if status not in STATUSES:  # leave the chunk in flight: it is not lost
            self._out.append(Refuse(node_id, f"unknown result status {status[:32]!r}",
                                    close=True))
            return False
        del job.inflight[seq]
        node.inflight.discard((job_id, seq))
        if status in (OK, ERROR):
            node.done += 1
            if status == OK:
                node.pace.observe(elapsed)
            job.done += 1
            del job.payloads[seq]
            if job.isolated:  # a long-lived job: keep no history of its chunks
                job.attempts.pop(seq, None)
            if status == ERROR:
                job.failures += 1
            self._out.append(ForwardResult(job.owner, job.id, seq, status, payload, elapsed))
        elif status in (CRASHED, TIMEOUT):
            self._retry(job, seq, status, payload.decode("utf-8", "replace"))
        else:  # CANCELLED: the node dropped it without running it
            job.queue.appendleft(seq)
        return True

    def _retry(self, job: JobState, seq: int, status: str, detail: str) -> None:
        attempts = job.attempts.get(seq, 0) + 1
        job.attempts[seq] = attempts
        if attempts >= job.max_attempts:
            job.payloads.pop(seq, None)
            if job.isolated:
                del job.attempts[seq]
            job.failures += 1
            self._out.append(FailJob(job.owner, job.id, seq, status,
                                     f"{detail} (attempt {attempts} of {job.max_attempts})"))
            return
        job.retries += 1
        job.queue.appendleft(seq)

    # -- dispatch --------------------------------------------------------------------
    def _pick_job(self) -> JobState | None:
        best: JobState | None = None
        for job in self.jobs.values():
            if job.eligible() and (best is None or (len(job.inflight), job.last_pick)
                                   < (len(best.inflight), best.last_pick)):
                best = job
        return best

    def _dispatch(self) -> None:
        while True:
            job = self._pick_job()
            if job is None:
                return
            node, most = None, 0.0  # the node with the largest free share of its capacity
            for n in self.nodes.values():
                free = n.capacity - len(n.inflight)
                if free > 0 and free / n.slots > most:
                    node, most = n, free / n.slots
            if node is None:
                return
            seq = job.queue.popleft()
            self._picks += 1
            job.last_pick = self._picks
            job.inflight[seq] = node.id
            node.inflight.add((job.id, seq))
            if job.id not in node.functions:
                node.functions.add(job.id)
                self._out.append(SendFunction(node.id, job.id, job.function))
            self._out.append(SendTask(node.id, job.id, seq, job.payloads[seq], job.timeout))

    # -- invariants ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise AssertionError naming the first broken invariant (the tests call this
        after every :meth:`handle`): a chunk is queued, in flight on exactly one live
        node, or gone with its payload; a node holds only chunks its jobs say it holds."""
        for job in self.jobs.values():
            queued, flying = set(job.queue), set(job.inflight)
            _require(len(queued) == len(job.queue), f"job {job.id}: a chunk queued twice")
            _require(not queued & flying, f"job {job.id}: a chunk both queued and in flight")
            _require(set(job.payloads) == queued | flying,
                     f"job {job.id}: payloads kept for {sorted(job.payloads)}, but queued "
                     f"{sorted(queued)} and in flight {sorted(flying)}")
            _require(job.limit <= 0 or len(flying) <= job.limit,
                     f"job {job.id}: {len(flying)} in flight over its limit {job.limit}")
            for seq, node_id in job.inflight.items():
                node = self.nodes.get(node_id)
                _require(node is not None and (job.id, seq) in node.inflight,
                         f"job {job.id}: chunk {seq} in flight on node {node_id}, which "
                         f"does not hold it")
        for node in self.nodes.values():
            for job_id, seq in node.inflight:
                held = self.jobs.get(job_id)
                _require(held is not None and held.inflight.get(seq) == node.id,
                         f"node {node.id}: holds chunk {seq} of job {job_id}, which is "
                         f"not in flight there")
            _require(node.functions >= {j for j, _ in node.inflight},
                     f"node {node.id}: runs chunks of a job whose function it was not sent")

    # -- status ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of the cluster for ``achilles status``."""
        return {
            "nodes": [{"id": n.id, "name": n.name, "slots": n.slots,
                       "inflight": len(n.inflight), "done": n.done,
                       "draining": n.draining} for n in self.nodes.values()],
            "jobs": [{"id": j.id, "owner": j.owner, "done": j.done,
                      "total": j.total if j.total >= 0 else None, "added": j.added,
                      "queued": len(j.queue), "inflight": len(j.inflight),
                      "retries": j.retries, "age": round(self._now - j.submitted, 3),
                      "chunks_per_s": round(j.done / max(self._now - j.submitted, 1e-9), 2),
                      "failed": j.failures} for j in self.jobs.values()],
        }


#: event type -> its handler: one dispatch, by table, as in the server and the shells
_HANDLERS: dict[type, Callable[[Scheduler, Any], None]] = {
    NodeJoined: Scheduler._on_node_joined,
    NodeLost: Scheduler._on_node_lost,
    NodeDraining: Scheduler._on_node_draining,
    JobSubmitted: Scheduler._on_job_submitted,
    ChunkAdded: Scheduler._on_chunk_added,
    ChunksAdded: Scheduler._on_chunks_added,
    JobCancelled: Scheduler._on_job_cancelled,
    JobEnded: Scheduler._on_job_ended,
    OwnerLost: Scheduler._on_owner_lost,
    ResultReceived: Scheduler._on_result_received,
    ResultsReceived: Scheduler._on_results_received,
}


def _require(condition: bool, broken: str) -> None:
    if not condition:
        raise AssertionError(broken)
