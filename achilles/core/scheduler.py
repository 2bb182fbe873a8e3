"""The server's brain: nodes, jobs, chunks; events in, instructions out.

    controller --Submit/Chunk--> [ job.queue ] --dispatch--> node.inflight --Task--> node
        ^                             ^   requeue on NodeLost,                 |
        |                             |   crash or timeout (attempts < max)    |
        +------ForwardResult----------+-------------- ResultReceived <---------+

A node announces ``slots`` worker processes; it is given up to ``slots * PREFETCH``
(see ``core.pace``) chunks so that the next chunk is already there when a worker frees
up (round trips hide behind work), and more (up to MAX_PREFETCH per slot) while its
chunks take less than a round trip, or while the node is far (its round trip is
measured, see ``_take_result``). Whenever a slot frees, the job with the fewest
chunks in flight gets it, so concurrent jobs share the cluster fairly. Payloads are
opaque ``bytes``: the scheduler keeps a chunk's payload until its result arrives, so it
can resend it to another node, and never looks inside.

Heartbeats are the shell's business: a silent peer's connection is closed, and
that arrives here as NodeLost like any other loss. A node that does talk but holds a
chunk past its job's time limit plus a grace (see :func:`deadline`) has it taken away on
the next Tick, as does a node answering "cancelled" for a live job: the chunk counts an
attempt, and that node gets no more of the job's chunks while another node can take
them.

What a peer says is believed only so far: a node's slots are capped at MAX_SLOTS, and a
job is keyed by its owner's connection and the id it chose (:func:`job_key`), so that
another controller choosing the same id gets a job of its own. (Keyed by connection, not
by the controller's session: the key is what nodes see, and a session lets whoever shows
it take a controller's place. A job never outlives its connection anyway: a controller's
new connection with the session of one still held drops that one first, see the server's
router.)

Execution is at least once: a chunk on a lost node runs again elsewhere. Results are
forwarded once per chunk; a late result of a job the node was told to drop is dropped
here, and one for a chunk the node was never given gets the node refused.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any

from achilles.core.pace import PREFETCH
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
    Tick,
)
from achilles.core.scheduler_state import (
    MAX_SLOTS,
    FreeNodes,
    JobState,
    NodeState,
    deadline,
    job_key,
)
from achilles.protocol.messages import CANCELLED, CRASHED, ERROR, OK, STATUSES, TIMEOUT

#: a run of chunks to one node (see _dispatch) ends once it carries this many bytes
RUN_BYTES = 256 * 1024


class Scheduler:
    """Feed events with :meth:`handle`; carry out the instructions it returns, in order."""

    def __init__(self) -> None:
        self.nodes: dict[int, NodeState] = {}
        self.jobs: dict[str, JobState] = {}
        self._free = FreeNodes()  # who has room, most free first (see _pick_node)
        self._joins = 0
        self._live_nodes = self._live_slots = 0  # nodes not draining, and their slots
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
        self._joins += 1
        node = NodeState(ev.node, min(max(1, ev.slots), MAX_SLOTS), ev.name, order=self._joins)
        old = self.nodes.get(ev.node)
        if old is not None and not old.draining:
            self._count_live(old, -1)
        self.nodes[ev.node] = node
        self._count_live(node, 1)
        self._free.update(node)
        self._cluster_changed()
        self._dispatch()

    def _on_node_lost(self, ev: NodeLost) -> None:
        node = self.nodes.pop(ev.node, None)
        if node is None:
            return
        self._free.remove(node.id)
        if not node.draining:
            self._count_live(node, -1)
        for job_id, seq in sorted(node.inflight, reverse=True):
            job = self.jobs.get(job_id)
            if job is not None and job.inflight.get(seq) == node.id:
                del job.inflight[seq]
                self._retry(
                    job, seq, CRASHED, f"node {node.name} was lost ({ev.reason}) while running it"
                )
        for job in self.jobs.values():
            job.shunned.discard(node.id)
        self._cluster_changed()
        self._dispatch()

    def _on_node_draining(self, ev: NodeDraining) -> None:
        node = self.nodes.get(ev.node)
        if node is not None and not node.draining:
            node.draining = True
            self._count_live(node, -1)
            self._free.update(node)
            self._cluster_changed()

    def _cluster_changed(self) -> None:
        # counted as nodes come and go: a scan here made 1,000 joins cost 10**6 steps
        self._out.append(ClusterChanged(self._live_nodes, self._live_slots))

    def _count_live(self, node: NodeState, sign: int) -> None:
        self._live_nodes += sign
        self._live_slots += sign * node.slots

    # -- jobs ------------------------------------------------------------------------
    def _on_job_submitted(self, ev: JobSubmitted) -> None:
        key = job_key(ev.owner, ev.job)
        if key in self.jobs:
            self._out.append(Refuse(ev.owner, f"job {ev.job} exists already", job=ev.job))
            return
        self.jobs[key] = JobState(
            key,
            ev.job,
            ev.owner,
            ev.function,
            max(1, ev.max_attempts),
            ev.timeout,
            ev.limit,
            self._now,
            total=ev.total,
            isolated=ev.isolated,
            function_name=ev.function_name,
            items=ev.items,
        )

    def _on_chunk_added(self, ev: ChunkAdded) -> None:
        self._add_chunk(self._owned(ev.job, ev.seq, ev.owner), ev.seq, ev.payload)
        self._dispatch()

    def _on_chunks_added(self, ev: ChunksAdded) -> None:
        job = self._owned(ev.job, ev.seqs[0], ev.owner)
        for seq, payload in zip(ev.seqs, ev.payloads):
            if not self._add_chunk(job, seq, payload):
                break
        self._dispatch()

    def _owned(self, name: str, seq: int, owner: int) -> JobState | None:
        """The owner's job ``name``; None (and refused, naming chunk ``seq``) if it has
        none of that name."""
        job = self.jobs.get(job_key(owner, name))
        if job is None:
            self._out.append(
                Refuse(owner, f"chunk {seq} for unknown job {name}", job=name, seq=seq)
            )
        return job

    @staticmethod
    def _add_chunk(job: JobState | None, seq: int, payload: bytes) -> bool:
        """Queue a chunk; False if its job is not the owner's (refused)."""
        if job is None:
            return False
        if seq in job.payloads:
            return True  # re-sent after a reconnect, still pending here
        job.payloads[seq] = payload
        job.queue.append(seq)
        job.added = max(job.added, seq + 1)
        return True

    def _on_job_ended(self, ev: JobEnded | JobCancelled) -> None:
        """End and Cancel alike: the owner's job is forgotten, its work on nodes dropped
        (a job of that id that is not the sender's is not touched)."""
        job = self.jobs.get(job_key(ev.owner, ev.job))
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
        for node_id in job.holders:  # not every node: at 1,000 nodes that was a scan
            node = self.nodes.get(node_id)
            if node is not None and (
                job.id in node.functions or any(j == job.id for j, _ in node.inflight)
            ):
                node.inflight = {k: t for k, t in node.inflight.items() if k[0] != job.id}
                self._cancel_on_node(node, job.id)
                self._free.update(node)

    def _cancel_on_node(self, node: NodeState, job_id: str) -> None:
        """Tell a node to drop a job. Its results for the job still on their way are
        dropped when they come, and the clocks of its other chunks start again: a node
        restarts its pool to stop a running chunk, and reruns the others."""
        node.functions.discard(job_id)
        node.dropped.append(job_id)
        self._out.append(CancelOnNode(node.id, job_id))
        self._restart_clocks(node)

    # -- results ---------------------------------------------------------------------
    def _on_result_received(self, ev: ResultReceived) -> None:
        self._take_result(ev.node, ev.job, ev.seq, ev.status, ev.payload, ev.elapsed)
        self._dispatch()

    def _on_results_received(self, ev: ResultsReceived) -> None:
        for seq, status, payload, elapsed in zip(ev.seqs, ev.statuses, ev.payloads, ev.elapsed):
            if not self._take_result(ev.node, ev.job, seq, status, payload, elapsed):
                break
        self._dispatch()

    def _take_result(
        self, node_id: int, job_id: str, seq: int, status: str, payload: bytes, elapsed: float
    ) -> bool:
        """One chunk's outcome; False if the node was refused (read no more from it)."""
        node = self.nodes.get(node_id)
        if node is None:
            return True
        job = self.jobs.get(job_id)
        if job is None or (job_id, seq) not in node.inflight:
            if job_id in node.dropped:
                return True  # from before the job was dropped here: a harmless race
            # Only a misbehaving node reports a chunk it does not hold: a node that lost
            # a chunk to a requeue was disconnected or told to drop its job first.
            self._out.append(
                Refuse(
                    node_id,
                    f"result for chunk {seq} of job {job_id}, which it was not given",
                    close=True,
                )
            )
            return False
        if status not in STATUSES:  # leave the chunk in flight: it is not lost
            self._out.append(Refuse(node_id, f"unknown result status {status[:32]!r}", close=True))
            return False
        del job.inflight[seq]
        started = node.inflight.pop((job_id, seq))
        if status in (OK, ERROR):
            # a clock started at dispatch: the chunk met a free worker, so its turnaround
            # less its run time is the round trip to the node (see Pace)
            rtt = self._now - started - elapsed if started >= 0 else -1.0
            self._done(node, job, seq, status, payload, elapsed, rtt)
        elif status in (CRASHED, TIMEOUT):
            self._restart_clocks(node)  # the node restarted its pool: it reruns the rest
            self._retry(
                job, seq, status, payload.decode("utf-8", "replace").replace(job.id, job.name)
            )
        else:  # CANCELLED, for a live job: not ours to believe (the loop of issue 12)
            job.shunned.add(node.id)
            self._retry(
                job,
                seq,
                CRASHED,
                f"node {node.name} answered {CANCELLED!r} for it, though its job was live",
            )
        self._free.update(node)  # a chunk less in flight, and its pace may have changed
        return True

    def _done(
        self,
        node: NodeState,
        job: JobState,
        seq: int,
        status: str,
        payload: bytes,
        elapsed: float,
        rtt: float = -1.0,
    ) -> None:
        """A chunk ran (and returned or raised): pass its result on."""
        node.done += 1
        if status == OK:
            node.pace.observe(elapsed, rtt, len(job.payloads[seq]))
        job.done += 1
        del job.payloads[seq]
        if job.isolated:  # a long-lived job: keep no history of its chunks
            job.attempts.pop(seq, None)
        if status == ERROR:
            job.failures += 1
        self._out.append(ForwardResult(job.owner, job.name, seq, status, payload, elapsed))

    def _retry(self, job: JobState, seq: int, status: str, detail: str) -> None:
        attempts = job.attempts.get(seq, 0) + 1
        job.attempts[seq] = attempts
        if attempts >= job.max_attempts:
            job.payloads.pop(seq, None)
            if job.isolated:
                del job.attempts[seq]
            job.failures += 1
            self._out.append(
                FailJob(
                    job.owner,
                    job.name,
                    seq,
                    status,
                    f"{detail} (attempt {attempts} of {job.max_attempts})",
                )
            )
            return
        job.retries += 1
        job.queue.appendleft(seq)

    # -- time limits -----------------------------------------------------------------
    def _on_tick(self, ev: Tick) -> None:
        """Start the clocks of chunks a node can now be running; take away the chunks of
        jobs with a time limit that a node has held past their deadline."""
        if not any(job.timeout > 0 for job in self.jobs.values()):
            return  # only chunks of jobs with a time limit need clocks (O(jobs), not slots)
        now = self._now
        late: dict[tuple[int, str], set[int]] = {}  # (node, job) -> its late chunks
        for node in self.nodes.values():
            for key, started in list(islice(node.inflight.items(), node.slots)):
                if started < 0:
                    node.inflight[key] = now
                    continue
                job = self.jobs[key[0]]
                if job.timeout > 0 and now - started > deadline(job.timeout):
                    late.setdefault((node.id, job.id), set()).add(key[1])
        for (node_id, job_id), seqs in late.items():
            self._take_away(self.nodes[node_id], self.jobs[job_id], seqs)
        if late:
            self._dispatch()

    def _take_away(self, node: NodeState, job: JobState, late: set[int]) -> None:
        """The node holds chunks ``late`` of ``job`` past their deadline: it is told to
        drop the job; those chunks count an attempt (TIMEOUT) and go back to the queue,
        and so do the job's other chunks it held (for free); it gets no more for now."""
        grace = deadline(job.timeout) - job.timeout
        for job_id, seq in sorted(node.inflight, reverse=True):
            if job_id != job.id:
                continue
            del node.inflight[(job_id, seq)]
            del job.inflight[seq]
            if seq in late:
                self._retry(
                    job,
                    seq,
                    TIMEOUT,
                    (
                        f"node {node.name} held chunk {seq} of job {job.name} past its time "
                        f"limit of {job.timeout:g} s (and {grace:g} s of grace) without an "
                        f"answer; taken away"
                    ),
                )
            else:
                job.queue.appendleft(seq)
        job.shunned.add(node.id)
        self._cancel_on_node(node, job.id)
        self._free.update(node)

    @staticmethod
    def _restart_clocks(node: NodeState) -> None:
        for key in node.inflight:
            node.inflight[key] = -1.0

    # -- dispatch --------------------------------------------------------------------
    def _pick_job(self, blocked: set[str]) -> JobState | None:
        best: JobState | None = None
        for job in self.jobs.values():
            if (
                job.eligible()
                and job.id not in blocked
                and (
                    best is None
                    or (len(job.inflight), job.last_pick) < (len(best.inflight), best.last_pick)
                )
            ):
                best = job
        return best

    def _pick_node(self, job: JobState) -> NodeState | None:
        """The node with the largest free share of its capacity (ties: the earliest
        joined), of those the job does not shun (unless it shuns every live node: then
        attempts are the bound). O(log nodes): see FreeNodes."""
        shunned = job.shunned
        if shunned and all(n.id in shunned for n in self.nodes.values() if not n.draining):
            shunned.clear()
        node_id = self._free.best(shunned)
        return None if node_id is None else self.nodes[node_id]

    def _dispatch(self) -> None:
        blocked: set[str] = set()  # jobs with room only on nodes they shun
        while True:
            job = self._pick_job(blocked)
            if job is None:
                return
            node = self._pick_node(job)
            if node is None:
                if not job.shunned:
                    return  # no node has room
                blocked.add(job.id)
                continue
            if job.id not in node.functions:
                node.functions.add(job.id)
                job.holders.add(node.id)
                self._out.append(SendFunction(node.id, job.id, job.function))
            # Chunks far shorter than a round trip (or a far node's) go to a node in
            # runs that fill its room (one frame each way for all of them): spread over
            # 1,000 nodes, each chunk cost a frame and a system call both ways, and runs
            # of half the room still cost 1,000 nodes twice what 10 cost (W8). A room of
            # tiny chunks is ~QUEUED_WORK of work. Long chunks go one at a time.
            room = node.capacity - len(node.inflight)
            sent = 0
            for _ in range(room if node.pace.depth > PREFETCH else 1):
                if not job.eligible() or sent >= RUN_BYTES:
                    break  # big chunks are spread like long ones (W3: 4 MiB each)
                sent += self._send_task(job, node)
            self._free.update(node)

    def _send_task(self, job: JobState, node: NodeState) -> int:
        """Send the job's next chunk to the node; return its payload's size."""
        seq = job.queue.popleft()
        self._picks += 1
        job.last_pick = self._picks
        job.inflight[seq] = node.id
        # its clock starts now if the node can be running it already (see NodeState)
        node.inflight[(job.id, seq)] = self._now if len(node.inflight) < node.slots else -1.0
        payload = job.payloads[seq]
        self._out.append(SendTask(node.id, job.id, seq, payload, job.timeout))
        return len(payload)

    # -- invariants ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise AssertionError naming the first broken invariant (the tests call this
        after every :meth:`handle`): a chunk is queued, in flight on exactly one live
        node, or gone with its payload; a node holds only chunks its jobs say it holds."""
        for job in self.jobs.values():
            queued, flying = set(job.queue), set(job.inflight)
            _require(len(queued) == len(job.queue), f"job {job.id}: a chunk queued twice")
            _require(not queued & flying, f"job {job.id}: a chunk both queued and in flight")
            _require(
                set(job.payloads) == queued | flying,
                f"job {job.id}: payloads kept for {sorted(job.payloads)}, but queued "
                f"{sorted(queued)} and in flight {sorted(flying)}",
            )
            _require(
                job.limit <= 0 or len(flying) <= job.limit,
                f"job {job.id}: {len(flying)} in flight over its limit {job.limit}",
            )
            for seq, node_id in job.inflight.items():
                node = self.nodes.get(node_id)
                _require(
                    node is not None and (job.id, seq) in node.inflight,
                    f"job {job.id}: chunk {seq} in flight on node {node_id}, which "
                    f"does not hold it",
                )
        for node in self.nodes.values():
            for job_id, seq in node.inflight:
                held = self.jobs.get(job_id)
                _require(
                    held is not None and held.inflight.get(seq) == node.id,
                    f"node {node.id}: holds chunk {seq} of job {job_id}, which is "
                    f"not in flight there",
                )
            _require(
                node.functions >= {j for j, _ in node.inflight},
                f"node {node.id}: runs chunks of a job whose function it was not sent",
            )
        for problem in self._free.problems(self.nodes):
            _require(False, problem)
        live = [n for n in self.nodes.values() if not n.draining]
        _require(
            (self._live_nodes, self._live_slots) == (len(live), sum(n.slots for n in live)),
            f"live nodes and slots counted {self._live_nodes}, {self._live_slots}",
        )

    # -- status ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of the cluster for ``achilles status``."""
        return {
            "nodes": [
                {
                    "id": n.id,
                    "name": n.name,
                    "slots": n.slots,
                    "inflight": len(n.inflight),
                    # a node runs its first ``slots`` chunks; the rest wait in its queue
                    "busy": min(len(n.inflight), n.slots),
                    "queued": max(len(n.inflight) - n.slots, 0),
                    "done": n.done,
                    "draining": n.draining,
                }
                for n in self.nodes.values()
            ],
            "jobs": [
                {
                    "id": j.name,
                    "owner": j.owner,
                    "done": j.done,
                    "total": j.total if j.total >= 0 else None,
                    "added": j.added,
                    "queued": len(j.queue),
                    "inflight": len(j.inflight),
                    "retries": j.retries,
                    "age": round(self._now - j.submitted, 3),
                    "chunks_per_s": round(j.done / max(self._now - j.submitted, 1e-9), 2),
                    "failed": j.failures,
                    "function": j.function_name,
                }
                for j in self.jobs.values()
            ],
        }


#: event type -> its handler: one dispatch, by table, as in the server and the shells
_HANDLERS: dict[type, Callable[[Scheduler, Any], None]] = {
    NodeJoined: Scheduler._on_node_joined,
    NodeLost: Scheduler._on_node_lost,
    NodeDraining: Scheduler._on_node_draining,
    JobSubmitted: Scheduler._on_job_submitted,
    ChunkAdded: Scheduler._on_chunk_added,
    ChunksAdded: Scheduler._on_chunks_added,
    JobCancelled: Scheduler._on_job_ended,
    JobEnded: Scheduler._on_job_ended,
    OwnerLost: Scheduler._on_owner_lost,
    ResultReceived: Scheduler._on_result_received,
    ResultsReceived: Scheduler._on_results_received,
    Tick: Scheduler._on_tick,
}


def _require(condition: bool, broken: str) -> None:
    if not condition:
        raise AssertionError(broken)
