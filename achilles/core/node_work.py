"""A node's brain: the chunks it holds and what its pool of workers must do; events in,
instructions out. The node's executor (:mod:`achilles.node.executor`) feeds it what the
server, the pool's result pipe, the workers' exits and a periodic tick bring, and
carries out what it answers; nothing here touches a process, a pipe or a clock.

    server --ChunksArrived--> [ waiting ] --fill (depth x processes)--> [ running ]
                                  ^                                        |  |
                                  | rerun (at most MAX_LOCAL_RERUNS)       |  | SendToPool
                                  +------------- PoolRestarted <-----------+  v
    server <--Report--- ResultsRead / blame (crashed, timeout) <------- pool generation

A chunk runs in one *generation* of the pool. When a worker dies, a chunk passes its
time limit, or a running job is cancelled, the whole generation is killed and a fresh
one started (``RestartPool``): a worker killed while holding a queue lock would block
its siblings. The chunk the dead worker's slot names is reported (the server counts its
attempts); the generation's other running chunks run again here, up to
MAX_LOCAL_RERUNS times each. A worker that retired (a pool's ``maxtasksperchild``) exits
with code 0 after freeing its slot: that is no death.

Time comes in as a number (``time.monotonic`` of the node, which is the clock the
workers write their start times with).
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from achilles.core.pace import MAX_PREFETCH, Pace
from achilles.protocol.messages import CRASHED, OK, TIMEOUT

#: an unblamed chunk that keeps being caught in pool restarts is reported as crashed after
#: this many local reruns, so the server's attempt count bounds it (never forever)
MAX_LOCAL_RERUNS = 2
#: job code bundles larger than this reach the workers through a file (see FunctionArrived)
SPOOL_ABOVE = 4 * 1024

#: (pid, job number, seq, start) of a worker running a chunk, as its slot says
Busy = tuple[int, int, int, float]
#: (job, seq, status, payload, elapsed) of a chunk the pool finished
Outcome = tuple[str, int, str, bytes, float]


def describe_exit(code: int | None) -> str:
    """How a worker ended, for logs and crash reports: ``signal 9 SIGKILL``, ``exit code 3``."""
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"signal {-code} {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# --- events --------------------------------------------------------------------------
# HOT: what is made per chunk (SendToPool, Report) is slotted but not frozen, as in
# core.scheduler: a frozen dataclass's __init__ costs 0.9 us against 0.26 us here.
@dataclass(frozen=True, slots=True)
class FunctionArrived:
    """Connection (Function frame): a job's code, before its first chunk here."""

    job: str
    bundle: bytes


@dataclass(frozen=True, slots=True)
class ChunksArrived:
    """Connection (Task or Tasks frame): one or more chunks of a job, to run."""

    job: str
    seqs: Sequence[int]
    payloads: Sequence[bytes]
    timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class ResultsRead:
    """Executor (a pool's result pipe): outcomes the workers of pool ``generation``
    wrote, in the order they wrote them."""

    generation: int
    results: Sequence[Outcome]


@dataclass(frozen=True, slots=True)
class WorkersDied:
    """Executor (a worker's sentinel, or its periodic look): workers of pool
    ``generation`` exited. ``exits`` is (pid, exit code) each (negative: a signal);
    ``slot_pids`` the pids the slot table holds and ``busy`` its busy slots, both read
    after the exits were seen. Time limits are checked too, at ``now``."""

    generation: int
    now: float
    exits: Sequence[tuple[int, int | None]]
    slot_pids: Sequence[int]
    busy: Sequence[Busy]


@dataclass(frozen=True, slots=True)
class Tick:
    """Executor, every WATCH_INTERVAL: the current pool's busy slots, to check time
    limits at ``now``."""

    now: float
    busy: Sequence[Busy]


@dataclass(frozen=True, slots=True)
class PoolRestarted:
    """Executor, having carried out RestartPool: pool ``generation`` is dead, and
    ``results`` are the outcomes its workers had written before it went (none is lost)."""

    generation: int
    results: Sequence[Outcome]


@dataclass(frozen=True, slots=True)
class JobCancelled:
    """Connection (Cancel frame): drop a job's code and chunks, stop its running ones."""

    job: str


@dataclass(frozen=True, slots=True)
class AllCancelled:
    """Connection, lost: drop every job and chunk in hand (the server requeues them)."""


@dataclass(frozen=True, slots=True)
class Closing:
    """Node, stopping: stop everything; nothing is sent or reported after this."""


Event = (
    FunctionArrived
    | ChunksArrived
    | ResultsRead
    | WorkersDied
    | Tick
    | PoolRestarted
    | JobCancelled
    | AllCancelled
    | Closing
)


# --- instructions --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StoreFunction:
    """Keep a job's code for its chunks: as bytes, or if ``spool``, in a file the workers
    read (a large bundle would otherwise be copied through the pipe with every chunk)."""

    job: str
    number: int
    bundle: bytes
    spool: bool


@dataclass(frozen=True, slots=True)
class DropFunction:
    """Forget a job's code (and remove its spooled file, if any)."""

    job: str


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class SendToPool:
    """Write this chunk to the current pool's task pipe, with its job's code."""

    job: str
    seq: int
    number: int  # the job's number: the slot table names jobs by number
    payload: bytes


@dataclass(slots=True)  # not frozen: one per chunk (see HOT)
class Report:
    """Send a chunk's outcome to the server (held until the next Flush)."""

    job: str
    seq: int
    status: str
    payload: bytes
    elapsed: float


@dataclass(frozen=True, slots=True)
class Flush:
    """The reports before this are one burst: send them on now, together."""


@dataclass(frozen=True, slots=True)
class RestartPool:
    """Read what the current pool's result pipe holds, kill that pool, start pool
    ``generation``, then feed PoolRestarted. ``reason`` (empty for a cancellation) is
    what to log."""

    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop watching, kill the pool's workers, remove the spooled code."""


Instruction = StoreFunction | DropFunction | SendToPool | Report | Flush | RestartPool | Shutdown


@dataclass(slots=True, eq=False)
class Item:
    """A chunk this node holds, waiting or running."""

    job: str
    seq: int
    payload: bytes
    timeout: float
    gen: int = 0  # the pool generation it was sent to (0: not sent yet)
    cancelled: bool = False  # its job was cancelled while it ran: report nothing
    reruns: int = 0  # times it was running when its pool was replaced, unblamed


class NodeWork:
    """Feed events with :meth:`handle`; carry out the instructions it returns, in order.

    Args:
        processes: the pool's worker count (chunks in the pool: ``depth`` per worker).
        name: the node's name, for the texts of reports and logs.
    """

    def __init__(self, processes: int, name: str) -> None:
        self.processes = processes
        self.name = name
        self.waiting: deque[Item] = deque()
        self.running: dict[tuple[str, int], Item] = {}
        self.job_numbers: dict[str, int] = {}  # jobs whose code is here
        self.last_number = 0
        self.generation = 1  # of the pool that SendToPool writes to
        self.restarting = False  # RestartPool was given, PoolRestarted has not come
        self.closed = False
        self.done = 0  # outcomes read from the pool
        self.pace = Pace()  # how many chunks per worker to keep in the pool
        self._blamed: dict[tuple[str, int], tuple[str, bytes]] = {}  # for the restart
        self._out: list[Instruction] = []
        self._reported = False

    # -- entry point -----------------------------------------------------------------
    def handle(self, event: Event) -> list[Instruction]:
        self._out = []
        self._reported = False
        if not self.closed:
            _HANDLERS[type(event)](self, event)
            if self._reported:
                self._out.append(Flush())
        return self._out

    # -- jobs ------------------------------------------------------------------------
    def _on_function_arrived(self, ev: FunctionArrived) -> None:
        if ev.job in self.job_numbers:
            self._out.append(DropFunction(ev.job))
        else:
            self.last_number += 1
            self.job_numbers[ev.job] = self.last_number
        self._out.append(
            StoreFunction(ev.job, self.job_numbers[ev.job], ev.bundle, len(ev.bundle) > SPOOL_ABOVE)
        )

    def _on_chunks_arrived(self, ev: ChunksArrived) -> None:
        # no check for a chunk already held: the server tracks what each node holds and
        # never sends it twice (validate() checks it in the tests)
        self.waiting.extend(
            Item(ev.job, seq, payload, ev.timeout) for seq, payload in zip(ev.seqs, ev.payloads)
        )
        self._fill()

    def _on_job_cancelled(self, ev: JobCancelled) -> None:
        if self.job_numbers.pop(ev.job, None) is not None:
            self._out.append(DropFunction(ev.job))
        self.waiting = deque(i for i in self.waiting if i.job != ev.job)
        hit = False
        for item in self.running.values():
            if item.job == ev.job:
                item.cancelled = hit = True
        if hit:
            self._restart("")

    def _on_all_cancelled(self, ev: AllCancelled) -> None:
        self._out.extend(DropFunction(job) for job in self.job_numbers)
        self.job_numbers.clear()
        self.waiting.clear()
        if self.running:
            for item in self.running.values():
                item.cancelled = True
            self._restart("")

    def _on_closing(self, ev: Closing) -> None:
        self.closed = True
        self.waiting.clear()
        self.running.clear()
        self._blamed.clear()
        self.restarting = False
        self._out.append(Shutdown())

    # -- the pool --------------------------------------------------------------------
    def _fill(self) -> None:
        """Keep ``depth`` chunks per worker in the pool (more while chunks are very short,
        as the server does): a worker that finishes picks up the next at once instead of
        idling while its result travels through the reactor, and results that finish
        together leave together. A chunk not yet started is never blamed (its slot is
        not busy) when a pool dies."""
        if self.restarting:
            return  # no new chunk for a pool about to be killed
        room = self.pace.depth * self.processes
        while self.waiting and len(self.running) < room:
            item = self.waiting.popleft()
            number = self.job_numbers.get(item.job)
            if number is None:
                continue  # its job was cancelled meanwhile
            item.gen = self.generation
            self.running[(item.job, item.seq)] = item
            self._out.append(SendToPool(item.job, item.seq, number, item.payload))

    def _on_results_read(self, ev: ResultsRead) -> None:
        self._take(ev.generation, ev.results)
        self._fill()

    def _take(self, generation: int, results: Sequence[Outcome]) -> None:
        for job, seq, status, payload, elapsed in results:
            item = self.running.get((job, seq))
            if item is None or item.gen != generation:
                continue  # from a torn-down generation: its chunk was rerun or reported
            del self.running[(job, seq)]
            if item.cancelled:
                continue
            self.done += 1
            if status == OK:
                self.pace.observe(elapsed, size=len(item.payload))
            self._report(job, seq, status, payload, elapsed)

    def _report(self, job: str, seq: int, status: str, payload: bytes, elapsed: float) -> None:
        self._out.append(Report(job, seq, status, payload, elapsed))
        self._reported = True

    # -- watching --------------------------------------------------------------------
    def _on_workers_died(self, ev: WorkersDied) -> None:
        if ev.generation != self.generation:
            return  # a pool already replaced
        pids = set(ev.slot_pids)
        # exit code 0 and no slot: it retired (maxtasksperchild) between chunks
        dead = {pid: describe_exit(code) for pid, code in ev.exits if code != 0 or pid in pids}
        self._check(ev.now, dead, ev.busy)

    def _on_tick(self, ev: Tick) -> None:
        self._check(ev.now, {}, ev.busy)

    def _check(self, now: float, dead: dict[int, str], busy: Sequence[Busy]) -> None:
        """Blame the chunk in a dead worker's slot, and any past its time limit (its
        worker is killed with the pool); restart the pool if anything died."""
        if self.restarting:
            return
        numbers = {n: job for job, n in self.job_numbers.items()}
        for pid, number, seq, started in busy:
            key = (numbers.get(number, ""), seq)
            item = self.running.get(key)
            if item is None:
                continue
            if pid in dead:
                self._blamed[key] = (
                    CRASHED,
                    (
                        f"worker pid {pid} died ({dead[pid]}) running chunk {seq} of job "
                        f"{item.job} on node {self.name}"
                    ).encode(),
                )
            elif item.timeout > 0 and now - started > item.timeout:
                dead[pid] = "time limit"
                self._blamed[key] = (
                    TIMEOUT,
                    (
                        f"chunk {seq} of job {item.job} ran past its time limit of "
                        f"{item.timeout:g} s on node {self.name}; its worker was killed"
                    ).encode(),
                )
        if dead:
            self._restart(", ".join(f"worker {pid} {why}" for pid, why in dead.items()))

    def _restart(self, reason: str) -> None:
        if self.restarting:
            return
        self.restarting = True
        self._out.append(RestartPool(self.generation + 1, reason))

    def _on_pool_restarted(self, ev: PoolRestarted) -> None:
        """The old pool's last outcomes count; its blamed chunks are reported, the others
        run again (reported as crashed once they have been caught MAX_LOCAL_RERUNS times)."""
        if not self.restarting or ev.generation != self.generation:
            return
        self._take(ev.generation, ev.results)
        self.generation += 1
        self.restarting = False
        for key, item in list(self.running.items()):
            del self.running[key]
            if item.cancelled:
                continue
            blame = self._blamed.get(key)
            if blame is not None:
                self._report(item.job, item.seq, blame[0], blame[1], 0.0)
            elif item.reruns >= MAX_LOCAL_RERUNS:
                self._report(
                    item.job,
                    item.seq,
                    CRASHED,
                    (
                        f"chunk {item.seq} of job {item.job} was running on node {self.name} "
                        f"when its pool had to be restarted, {item.reruns + 1} times"
                    ).encode(),
                    0.0,
                )
            else:
                item.reruns += 1
                self.waiting.appendleft(item)
        self._blamed.clear()
        self._fill()

    # -- checks ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise AssertionError if an invariant does not hold (tests call it after every
        event)."""
        gen = self.generation
        for key, item in self.running.items():
            assert key == (item.job, item.seq), f"{key} holds chunk {item.seq} of {item.job}"
            assert item.gen == gen, f"{key} runs in pool {item.gen}, the pool is {gen}"
            assert item.cancelled or item.job in self.job_numbers, f"{key}: no code"
        # the depth shrinks when chunks grow longer; what was sent is not taken back
        assert len(self.running) <= MAX_PREFETCH * self.processes, "pool over-filled"
        keys = [(i.job, i.seq) for i in self.waiting]
        assert len(set(keys)) == len(keys), "a chunk waits twice"
        assert all(i.gen == 0 or i.reruns for i in self.waiting), "a sent chunk waits"
        assert not any(k in self.running and not self.running[k].cancelled for k in keys), (
            "a chunk both waits and runs"
        )
        numbers = list(self.job_numbers.values())
        assert len(set(numbers)) == len(numbers), "two jobs share a number"
        assert all(0 < n <= self.last_number for n in numbers), "a job number from nowhere"
        assert self.restarting or not self._blamed, "blame outside a restart"
        assert self._blamed.keys() <= self.running.keys(), "blame for a chunk not running"
        if self.closed:
            assert not (self.waiting or self.running or self.restarting), "closed, not idle"
        elif not self.restarting:
            room = self.pace.depth * self.processes
            assert not self.waiting or len(self.running) >= room, "room left unfilled"


_HANDLERS: dict[type, Callable[[NodeWork, Any], None]] = {
    FunctionArrived: NodeWork._on_function_arrived,
    ChunksArrived: NodeWork._on_chunks_arrived,
    ResultsRead: NodeWork._on_results_read,
    WorkersDied: NodeWork._on_workers_died,
    Tick: NodeWork._on_tick,
    PoolRestarted: NodeWork._on_pool_restarted,
    JobCancelled: NodeWork._on_job_cancelled,
    AllCancelled: NodeWork._on_all_cancelled,
    Closing: NodeWork._on_closing,
}
