"""A node's core: events in, exact instruction lists out (no processes, no pipes, no
clock); its invariants are checked after every event."""

from __future__ import annotations

import random

import pytest

from achilles.core.node_work import (
    MAX_LOCAL_RERUNS,
    SPOOL_ABOVE,
    AllCancelled,
    Busy,
    ChunksArrived,
    Closing,
    DropFunction,
    Event,
    Flush,
    FunctionArrived,
    Instruction,
    JobCancelled,
    NodeWork,
    Outcome,
    PoolRestarted,
    Report,
    RestartPool,
    ResultsRead,
    SendToPool,
    Shutdown,
    StoreFunction,
    Tick,
    WorkersDied,
    describe_exit,
)
from achilles.core.pace import MAX_PREFETCH, PREFETCH
from achilles.protocol.messages import CRASHED, ERROR, OK, TIMEOUT

NAME = "n1"
LONG = 0.5  # seconds a chunk takes: long enough to keep the depth at PREFETCH


# --- helpers: one place that says what code, chunks and results look like -----------------
def code(job: str) -> bytes:
    return b"FN:" + job.encode()


def chunk(job: str, seq: int) -> bytes:
    return f"{job}#{seq}".encode()


def result(job: str, seq: int) -> bytes:
    return f"result {job}#{seq}".encode()


def ok(job: str, seq: int, elapsed: float = LONG) -> Outcome:
    return (job, seq, OK, result(job, seq), elapsed)


def send(job: str, seq: int, number: int = 1) -> SendToPool:
    return SendToPool(job, seq, number, chunk(job, seq))


def report(job: str, seq: int, elapsed: float = LONG) -> Report:
    return Report(job, seq, OK, result(job, seq), elapsed)


def died(job: str, seq: int, pid: int, how: str = "signal 9 SIGKILL") -> Report:
    return Report(
        job,
        seq,
        CRASHED,
        (f"worker pid {pid} died ({how}) running chunk {seq} of job {job} on node {NAME}").encode(),
        0.0,
    )


def caught(job: str, seq: int, times: int) -> Report:
    return Report(
        job,
        seq,
        CRASHED,
        (
            f"chunk {seq} of job {job} was running on node {NAME} "
            f"when its pool had to be restarted, {times} times"
        ).encode(),
        0.0,
    )


class Work:
    """A NodeWork whose invariants are checked after every event it handles."""

    def __init__(self, processes: int = 1) -> None:
        self.core = NodeWork(processes, NAME)

    def __call__(self, event: Event) -> list[Instruction]:
        out = self.core.handle(event)
        self.core.validate()
        return out

    def job(self, job: str, *seqs: int, timeout: float = 0.0) -> list[Instruction]:
        """The job's code, then its chunks; what the chunks caused."""
        self(FunctionArrived(job, code(job)))
        return self.chunks(job, *seqs, timeout=timeout)

    def chunks(self, job: str, *seqs: int, timeout: float = 0.0) -> list[Instruction]:
        return self(ChunksArrived(job, seqs, [chunk(job, s) for s in seqs], timeout))

    def results(self, *outcomes: Outcome, generation: int = 0) -> list[Instruction]:
        """Outcomes read from pool ``generation`` (0: the current one)."""
        return self(ResultsRead(generation or self.core.generation, outcomes))

    def deaths(
        self,
        *exits: tuple[int, int | None],
        busy: list[Busy],
        slot_pids: list[int] | None = None,
        now: float = 1.0,
        generation: int = 0,
    ) -> list[Instruction]:
        """Workers of pool ``generation`` (0: the current one) exited; the slot table
        holds ``slot_pids`` (by default, the busy ones)."""
        pids = [b[0] for b in busy] if slot_pids is None else slot_pids
        return self(WorkersDied(generation or self.core.generation, now, exits, pids, busy))

    def restarted(self, *outcomes: Outcome) -> list[Instruction]:
        """The shell carried out RestartPool: the old pool is gone."""
        return self(PoolRestarted(self.core.generation, outcomes))

    def waiting(self) -> list[tuple[str, int]]:
        return [(i.job, i.seq) for i in self.core.waiting]

    def running(self) -> list[tuple[str, int]]:
        return list(self.core.running)


# --- code ---------------------------------------------------------------------------------
def test_function_is_kept_numbered_and_spooled_when_large() -> None:
    """A job's code gets the next job number; a large bundle is to be spooled; code that
    comes again for a job replaces the old (dropped first) under the same number."""
    w = Work()
    assert w(FunctionArrived("a", code("a"))) == [StoreFunction("a", 1, code("a"), False)]
    big = b"x" * (SPOOL_ABOVE + 1)
    assert w(FunctionArrived("b", big)) == [StoreFunction("b", 2, big, True)]
    assert w(FunctionArrived("a", big)) == [DropFunction("a"), StoreFunction("a", 1, big, True)]
    exact = b"x" * SPOOL_ABOVE
    assert w(FunctionArrived("c", exact)) == [StoreFunction("c", 3, exact, False)]


def test_job_numbers_are_not_reused_after_a_cancel() -> None:
    """A job cancelled and sent again gets a new number: a slot naming the old one can
    no longer be taken for it."""
    w = Work()
    w(FunctionArrived("a", code("a")))
    assert w(JobCancelled("a")) == [DropFunction("a")]
    assert w(FunctionArrived("a", code("a"))) == [StoreFunction("a", 2, code("a"), False)]


# --- filling the pool ---------------------------------------------------------------------
def test_fill_up_to_depth_per_worker() -> None:
    """The pool is given PREFETCH chunks per worker; the rest wait here, in order."""
    w = Work(processes=2)
    assert w.job("a", *range(6)) == [send("a", s) for s in range(2 * PREFETCH)]
    assert w.waiting() == [("a", 4), ("a", 5)]


def test_results_free_room_and_end_with_one_flush() -> None:
    """Results read together are reported, the room they free is filled, then one Flush
    sends the reports on as a burst."""
    w = Work(processes=1)
    w.job("a", 0, 1, 2, 3, 4)
    assert w.results(ok("a", 0), ok("a", 1)) == [
        report("a", 0),
        report("a", 1),
        send("a", 2),
        send("a", 3),
        Flush(),
    ]
    assert w.results(ok("a", 2)) == [report("a", 2), send("a", 4), Flush()]
    assert w.core.done == 3


def test_short_chunks_deepen_the_pool() -> None:
    """Chunks of microseconds keep up to MAX_PREFETCH per worker in the pool; errors and
    crashes say nothing about duration."""
    w = Work(processes=1)
    w.job("a", *range(4 * MAX_PREFETCH))
    out = w.results(*[ok("a", s, 1e-6) for s in range(PREFETCH)])
    assert [i.seq for i in out if isinstance(i, SendToPool)] == list(
        range(PREFETCH, PREFETCH + MAX_PREFETCH)
    )
    assert w.core.pace.depth == MAX_PREFETCH
    err: Outcome = ("a", PREFETCH, ERROR, b"exc", 0.0)
    assert w.results(err) == [
        Report("a", PREFETCH, ERROR, b"exc", 0.0),
        send("a", PREFETCH + MAX_PREFETCH),
        Flush(),
    ]
    assert w.core.pace.depth == MAX_PREFETCH


def test_chunk_of_a_job_without_code_is_dropped() -> None:
    """A chunk whose job's code is not here (cancelled meanwhile) is not sent."""
    w = Work()
    assert w.chunks("x", 0) == []
    assert w.waiting() == [] and w.running() == []


def test_unknown_or_duplicate_result_is_ignored() -> None:
    """A result for a chunk not running here, or one already reported, changes nothing."""
    w = Work()
    w.job("a", 0)
    assert w.results(ok("a", 7)) == []
    assert w.results(ok("a", 0)) == [report("a", 0), Flush()]
    assert w.results(ok("a", 0)) == []


# --- a worker dies ------------------------------------------------------------------------
def test_worker_death_blames_the_chunk_in_its_slot_and_reruns_the_others() -> None:
    """The chunk the dead worker's slot names is reported crashed, with the worker's
    exit; the generation's other running chunks run again in the new pool (queued in
    front of the waiting ones), except one whose result was already written."""
    w = Work(processes=2)
    w.job("a", *range(6))
    busy = [(101, 1, 0, 0.5), (102, 1, 1, 0.5)]
    assert w.deaths((101, -9), busy=busy) == [RestartPool(2, "worker 101 signal 9 SIGKILL")]
    assert w.chunks("a", 6) == []  # no new chunk for a pool about to be killed
    # a1's result was in the pipe: read before the kill, it counts
    assert w.restarted(ok("a", 1)) == [
        report("a", 1),
        died("a", 0, 101),
        # a2 and a3 go back in front of a4 (one by one, so the later first)
        send("a", 3),
        send("a", 2),
        send("a", 4),
        send("a", 5),
        Flush(),
    ]
    assert w.core.generation == 2
    assert w.waiting() == [("a", 6)]


def test_results_from_a_torn_down_generation_are_ignored() -> None:
    """Once a pool was replaced, an outcome tagged with it is not reported: its chunk
    was rerun (or reported) already."""
    w = Work()
    w.job("a", 0, 1)
    w.deaths((101, -11), busy=[(101, 1, 0, 0.0)])
    assert w.restarted() == [died("a", 0, 101, "signal 11 SIGSEGV"), send("a", 1), Flush()]
    assert w.results(ok("a", 1), generation=1) == []
    assert w.results(ok("a", 1), generation=2) == [report("a", 1), Flush()]


def test_death_reported_for_an_old_generation_is_ignored() -> None:
    """Exits seen in a pool already replaced restart nothing."""
    w = Work()
    w.job("a", 0)
    w.deaths((101, -9), busy=[(101, 1, 0, 0.0)])
    w.restarted()
    assert w.deaths((101, -9), busy=[], generation=1) == []


def test_rerun_budget_exhausted_reports_the_chunk_crashed() -> None:
    """A chunk caught (unblamed) in more than MAX_LOCAL_RERUNS restarts is reported as
    crashed, so the server's attempt count bounds it."""
    assert MAX_LOCAL_RERUNS == 2  # the history below is written for it
    w = Work(processes=1)
    w.job("a", *range(10))
    assert w.running() == [("a", 0), ("a", 1)]  # a1 waits in the pool behind a0
    w.deaths((100, -9), busy=[(100, 1, 0, 0.0)])
    assert w.restarted() == [died("a", 0, 100), send("a", 1), send("a", 2), Flush()]
    w.deaths((101, -9), busy=[(101, 1, 2, 0.0)])  # a1 waits behind a2 now
    assert w.restarted() == [died("a", 2, 101), send("a", 1), send("a", 3), Flush()]
    w.deaths((102, -9), busy=[(102, 1, 3, 0.0)])
    assert w.restarted() == [
        caught("a", 1, MAX_LOCAL_RERUNS + 1),
        died("a", 3, 102),
        send("a", 4),
        send("a", 5),
        Flush(),
    ]


def test_retired_worker_is_no_death() -> None:
    """A worker that exits with code 0 after freeing its slot (maxtasksperchild) retired:
    nothing restarts. One that exits 0 still holding its slot (os._exit(0) in a task)
    died."""
    w = Work()
    w.job("a", 0, 1)
    assert w.deaths((101, 0), busy=[], slot_pids=[102]) == []
    assert w.deaths((102, 0), busy=[(102, 1, 0, 0.0)]) == [RestartPool(2, "worker 102 exit code 0")]
    assert w.restarted() == [died("a", 0, 102, "exit code 0"), send("a", 1), Flush()]


def test_death_of_an_idle_worker_restarts_and_reruns_everything() -> None:
    """A worker that died between chunks blames none: all running chunks run again."""
    w = Work()
    w.job("a", 0, 1)
    assert w.deaths((101, -15), busy=[]) == [RestartPool(2, "worker 101 signal 15 SIGTERM")]
    assert w.restarted() == [send("a", 1), send("a", 0)]


# --- time limits --------------------------------------------------------------------------
def test_time_limit_reports_timeout_and_restarts() -> None:
    """A chunk running longer than its job's time limit is reported TIMEOUT and its pool
    replaced (which kills its worker); before the limit, a tick does nothing."""
    w = Work()
    w.job("a", 0, 1, timeout=5.0)
    busy = [(101, 1, 0, 4.0)]
    assert w(Tick(9.0, busy)) == []
    assert w(Tick(9.5, busy)) == [RestartPool(2, "worker 101 time limit")]
    assert w.restarted() == [
        Report(
            "a",
            0,
            TIMEOUT,
            (
                f"chunk 0 of job a ran past its time limit of 5 s on node "
                f"{NAME}; its worker was killed"
            ).encode(),
            0.0,
        ),
        send("a", 1),
        Flush(),
    ]


def test_no_time_limit_means_none() -> None:
    """A job with timeout 0 runs as long as it takes."""
    w = Work()
    w.job("a", 0)
    assert w(Tick(1e9, [(101, 1, 0, 0.0)])) == []


def test_death_and_time_limit_in_one_look_make_one_restart() -> None:
    """What one look finds is handled together: one restart, both chunks blamed."""
    w = Work(processes=2)
    w.job("a", 0, 1, 2, timeout=1.0)
    busy = [(101, 1, 0, 0.0), (102, 1, 1, 0.0)]
    assert w.deaths((101, -9), busy=busy, now=3.0) == [
        RestartPool(2, "worker 101 signal 9 SIGKILL, worker 102 time limit")
    ]
    out = w.restarted()
    assert [
        (type(i).__name__, getattr(i, "seq", None), getattr(i, "status", None)) for i in out
    ] == [
        ("Report", 0, CRASHED),
        ("Report", 1, TIMEOUT),
        ("SendToPool", 2, None),
        ("Flush", None, None),
    ]


# --- cancellation -------------------------------------------------------------------------
def test_cancel_of_a_running_job_restarts_without_reports() -> None:
    """Cancelling a job with running chunks replaces the pool (their workers are
    killed); nothing of that job is reported, even a result read before the kill, and
    the other job's chunks run again."""
    w = Work(processes=2)
    w.job("a", 0, 1)
    w.job("b", 0, 1, 2)
    assert w.running() == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert w(JobCancelled("a")) == [DropFunction("a"), RestartPool(2, "")]
    assert w.restarted(ok("a", 0)) == [send("b", 1, 2), send("b", 0, 2), send("b", 2, 2)]


def test_cancel_of_a_waiting_job_drops_it_without_a_restart() -> None:
    """A job whose chunks all wait here is dropped with no restart; other jobs go on."""
    w = Work(processes=1)
    w.job("a", 0, 1)
    w.job("b", 0, 1)
    assert w(JobCancelled("b")) == [DropFunction("b")]
    assert w.waiting() == []
    assert w.results(ok("a", 0)) == [report("a", 0), Flush()]


def test_cancel_of_an_unknown_job_does_nothing() -> None:
    """A cancel for a job never seen here is harmless."""
    w = Work()
    assert w(JobCancelled("zz")) == []


def test_all_cancelled_drops_every_job_and_restarts_if_any_ran() -> None:
    """When the server is lost, every job's code and chunks are dropped, running ones
    with their pool, and nothing is reported."""
    w = Work(processes=1)
    w.job("a", 0, 1, 2)
    w.job("b", 0)
    assert w(AllCancelled()) == [DropFunction("a"), DropFunction("b"), RestartPool(2, "")]
    assert w.restarted(ok("a", 0)) == []
    assert w.waiting() == [] and w.running() == []
    assert w(AllCancelled()) == []


# --- closing ------------------------------------------------------------------------------
def test_closing_stops_everything() -> None:
    """Closing shuts the pool down once; after it nothing is sent, reported or
    restarted, whatever arrives."""
    w = Work()
    w.job("a", 0, 1, 2)
    assert w(Closing()) == [Shutdown()]
    assert w.waiting() == [] and w.running() == [] and w.core.closed
    events: list[Event] = [
        FunctionArrived("b", code("b")),
        ChunksArrived("a", [3], [b"x"]),
        ResultsRead(1, [ok("a", 0)]),
        WorkersDied(1, 1.0, [(101, -9)], [101], []),
        Tick(1.0, []),
        PoolRestarted(1, []),
        JobCancelled("a"),
        AllCancelled(),
        Closing(),
    ]
    for event in events:
        assert w(event) == []


def test_closing_during_a_restart_ends_it() -> None:
    """A node closed between RestartPool and PoolRestarted (its workers were killed on
    the way out) starts no pool and reports nothing."""
    w = Work()
    w.job("a", 0)
    w.deaths((101, -9), busy=[(101, 1, 0, 0.0)])
    assert w(Tick(2.0, [])) == []  # nothing new is decided meanwhile
    assert w(Closing()) == [Shutdown()]
    assert w.restarted() == []


# --- texts --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code_,text",
    [
        (-9, "signal 9 SIGKILL"),
        (-11, "signal 11 SIGSEGV"),
        (-99, "signal 99"),
        (3, "exit code 3"),
        (0, "exit code 0"),
        (None, "unknown exit"),
    ],
)
def test_describe_exit(code_: int | None, text: str) -> None:
    """An exit code reads as a signal (with its name when it has one) or a code."""
    assert describe_exit(code_) == text


# --- many random steps --------------------------------------------------------------------
def test_random_histories_keep_the_invariants() -> None:
    """A simulated pool (results, deaths, time limits, cancels, new jobs) driven at
    random: every step keeps the invariants and every chunk is reported at most once."""
    rng = random.Random(15)
    for _ in range(40):
        w = Work(processes=rng.randint(1, 3))
        reported: set[tuple[str, int]] = set()
        next_seq = 0
        for _ in range(120):
            core = w.core
            running = [k for k, i in core.running.items() if not i.cancelled]
            roll = rng.random()
            if roll < 0.3:
                job = rng.choice("ab")
                if job not in core.job_numbers:
                    w(FunctionArrived(job, code(job)))
                seqs = list(range(next_seq, next_seq + rng.randint(1, 4)))
                next_seq += len(seqs)
                out = w.chunks(job, *seqs, timeout=rng.choice([0.0, 1.0]))
            elif roll < 0.6 and running:
                done = rng.sample(running, rng.randint(1, len(running)))
                out = w.results(*[ok(j, s, rng.choice([1e-6, LONG])) for j, s in done])
            elif roll < 0.8 and running:
                numbers = core.job_numbers
                busy = [
                    (100 + n, numbers[j], s, 0.0)
                    for n, (j, s) in enumerate(running[: core.processes])
                ]
                if rng.random() < 0.5:
                    out = w.deaths((rng.choice(busy)[0], -9), busy=busy)
                else:
                    out = w(Tick(rng.choice([0.5, 2.0]), busy))
            elif roll < 0.9:
                out = w(JobCancelled(rng.choice("ab")))
            else:
                out = w(AllCancelled())
            for ins in out:
                if isinstance(ins, RestartPool):
                    out += w.restarted()
                elif isinstance(ins, Report):
                    key = (ins.job, ins.seq)
                    assert key not in reported
                    reported.add(key)
