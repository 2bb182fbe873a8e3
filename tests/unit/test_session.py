"""The controller's session: events in, exact instruction lists out (no sockets, no clock).

Owners are plain strings here; in the controller they are the jobs' handles.
"""

from __future__ import annotations

import dataclasses

import pytest

from achilles.core import session as ses
from achilles.core.job import Job
from achilles.core.session import (
    CallAbandoned,
    CallMade,
    CancelDeadline,
    ChunkMade,
    Closing,
    Connected,
    DeadlinePassed,
    Deliver,
    DeliverFailure,
    Disconnected,
    FailJob,
    FailureReceived,
    FailWaiters,
    JobCancelled,
    JobEnded,
    JobOpened,
    QueueChunk,
    Ready,
    Refused,
    ResultReceived,
    Send,
    Session,
    StartDeadline,
    Started,
    StopReconnecting,
    Warn,
)
from achilles.errors import AuthenticationError, ConnectionLostError
from achilles.protocol.messages import (
    CRASHED,
    OK,
    TIMEOUT,
    Cancel,
    Chunk,
    End,
    Submit,
)

WHERE = "10.0.0.7:4242"
DEADLINE = 30.0
LOST = Warn("lost the achilles server; reconnecting")


# --- helpers: one place that says what a job, its chunks and results look like ------------
def fn(job: str) -> bytes:
    return b"FN:" + job.encode()


def submit(job: str, isolated: int = 0) -> Submit:
    return Submit(job, 3, 0.0, 0, -1, isolated)


def payload(job: str, seq: int) -> bytes:
    return f"{job}#{seq}".encode()


def opened(owner: str, job: str) -> JobOpened[str]:
    return JobOpened(owner, submit(job), fn(job))


def call(owner: str, job: str, seq: int) -> CallMade[str]:
    return CallMade(owner, submit(job, isolated=1), fn(job), seq, payload(job, seq))


def made(job: str, seq: int) -> ChunkMade:
    return ChunkMade(job, seq, payload(job, seq))


def result(job: str, seq: int) -> ResultReceived:
    return ResultReceived(job, seq, OK, b"R" + payload(job, seq), 0.5)


def delivered(owner: str, job: str, seq: int) -> Deliver[str]:
    return Deliver(owner, seq, OK, b"R" + payload(job, seq), 0.5)


def resent(job: str, seq: int) -> Send:
    return Send(Chunk(job, seq), payload(job, seq))


def session(connected: bool = True) -> Session[str]:
    s: Session[str] = Session(WHERE, DEADLINE)
    assert s.handle(Started()) == [StartDeadline(DEADLINE)]
    if connected:
        assert s.handle(Connected()) == [CancelDeadline(), Ready()]
    return s


def run(s: Session[str], *events: ses.Event[str]) -> list[ses.Instruction[str]]:
    out: list[ses.Instruction[str]] = []
    for event in events:
        out += s.handle(event)
    return out


# --- submitting --------------------------------------------------------------------------
def test_submit_then_chunks_within_the_window() -> None:
    """A job is submitted at once; its feeder's chunks are queued for the end of the
    reactor turn, as many as the job's window allows, and one more per outcome taken."""
    s, job = session(), Job(ordered=True, window=3)
    assert s.handle(opened("A", "a")) == [Send(submit("a"), fn("a"))]
    out = []
    while job.can_add():
        out += s.handle(made("a", job.add(1)))
    assert out == [QueueChunk("a", seq, payload("a", seq)) for seq in range(3)]
    assert s.handle(result("a", 0)) == [delivered("A", "a", 0)]
    job.on_result(0, OK, b"R")
    assert not job.can_add()  # a result alone does not free the window: it is owed
    assert len(job.take()) == 1 and job.can_add()
    assert s.handle(made("a", job.add(1))) == [QueueChunk("a", 3, payload("a", 3))]


def test_job_opened_while_disconnected_waits_for_the_connection() -> None:
    """Without a connection a job and its chunks are held, the reconnect deadline runs,
    and the connection sends the Submit, then the chunks in order, then Ready."""
    s = session(connected=False)
    assert run(s, opened("A", "a"), made("a", 1), made("a", 0)) == []  # deadline running
    assert s.handle(Connected()) == [
        CancelDeadline(),
        Send(submit("a"), fn("a")),
        resent("a", 0),
        resent("a", 1),
        Ready(),
    ]


def test_a_job_opened_after_the_deadline_passed_starts_it_again() -> None:
    """The deadline runs again for a job opened when no connection is up and none runs."""
    s = session(connected=False)
    exc = s.handle(DeadlinePassed())[-1]
    assert isinstance(exc, FailWaiters) and isinstance(exc.error, ConnectionLostError)
    assert s.handle(opened("A", "a")) == [StartDeadline(DEADLINE)]


# --- reconnecting --------------------------------------------------------------------------
def test_reconnect_submits_again_with_exactly_the_unfinished_chunks() -> None:
    """After a reconnect every open job is submitted again, in the order they opened,
    each followed by exactly its chunks without an outcome, in sequence order."""
    s = session()
    run(
        s,
        opened("A", "a"),
        *(made("a", i) for i in range(4)),
        opened("B", "b"),
        made("b", 0),
        call("C", "c", 0),
        call("C", "c", 1),
    )
    run(s, result("a", 1), result("a", 3), result("b", 0), result("c", 0))
    assert s.handle(Disconnected()) == [LOST, StartDeadline(DEADLINE)]
    assert s.handle(Connected()) == [
        CancelDeadline(),
        Send(submit("a"), fn("a")),
        resent("a", 0),
        resent("a", 2),
        Send(submit("b"), fn("b")),
        Send(submit("c", isolated=1), fn("c")),
        resent("c", 1),
        Ready(),
    ]


def test_chunks_made_while_disconnected_are_held_not_sent() -> None:
    """Chunks and calls made while the connection is down are sent by the reconnect."""
    s = session()
    run(s, opened("A", "a"), made("a", 0))
    s.handle(Disconnected())
    assert run(s, made("a", 1), call("C", "c", 0)) == []
    assert s.handle(Connected()) == [
        CancelDeadline(),
        Send(submit("a"), fn("a")),
        resent("a", 0),
        resent("a", 1),
        Send(submit("c", isolated=1), fn("c")),
        resent("c", 0),
        Ready(),
    ]


def test_duplicate_results_after_a_resend_are_dropped() -> None:
    """A chunk sent again may run twice: its first result is delivered, any later one
    (from either run) is dropped, as is a result for a chunk never made."""
    s = session()
    run(s, opened("A", "a"), made("a", 0), made("a", 1))
    run(s, Disconnected(), Connected())
    assert s.handle(result("a", 0)) == [delivered("A", "a", 0)]
    assert s.handle(result("a", 0)) == []
    assert s.handle(result("a", 7)) == []
    assert s.handle(result("zz", 0)) == []
    assert s.handle(result("a", 1)) == [delivered("A", "a", 1)]


def test_repeated_disconnects_warn_each_time_and_run_one_deadline() -> None:
    """A second loss before the first deadline passed starts no second deadline."""
    s = session()
    assert s.handle(Disconnected()) == [LOST, StartDeadline(DEADLINE)]
    assert s.handle(Disconnected()) == [LOST]


# --- giving up --------------------------------------------------------------------------------
def test_deadline_passed_fails_every_job_and_every_waiter() -> None:
    """No connection within the deadline: every job and waiter fails with one
    ConnectionLostError naming the server; the jobs are forgotten."""
    s = session()
    run(s, opened("A", "a"), made("a", 0), call("C", "c", 0), Disconnected())
    out = s.handle(DeadlinePassed())
    assert isinstance(out[-1], FailWaiters)
    exc = out[-1].error
    assert out == [FailJob("A", exc), FailJob("C", exc), FailWaiters(exc)]
    assert isinstance(exc, ConnectionLostError)
    assert str(exc) == f"cannot reach the achilles server at {WHERE} (tried for 30 s)"
    assert not s.holds("a") and not s.holds("c")
    assert s.handle(Connected()) == [Ready()]  # nothing left to resubmit
    assert s.handle(result("a", 0)) == []


def test_a_final_refusal_fails_everything_now_and_later() -> None:
    """A refusal that is not transient stops reconnecting and fails every job and waiter;
    a job opened afterwards fails at once with the same error; losing the connection
    then says nothing."""
    s = session()
    run(s, opened("A", "a"))
    out = s.handle(Refused("bad secret", transient=False))
    assert isinstance(out[-1], FailWaiters)
    exc = out[-1].error
    assert out == [StopReconnecting(), FailJob("A", exc), FailWaiters(exc)]
    assert isinstance(exc, AuthenticationError) and s.fatal is exc
    assert str(exc) == f"the achilles server at {WHERE} refused this controller: bad secret"
    assert s.handle(opened("B", "b")) == [FailJob("B", exc)]
    assert s.handle(call("C", "c", 0)) == [FailJob("C", exc)]
    assert s.handle(Disconnected()) == []


def test_a_transient_refusal_only_warns() -> None:
    """'Too many connections' and the like: a warning; jobs stay, nothing stops."""
    s = session(connected=False)
    run(s, opened("A", "a"))
    assert s.handle(Refused("too many", transient=True)) == [
        Warn("the achilles server is busy (too many); retrying")
    ]
    assert s.holds("a") and s.fatal is None


def test_closing_stops_the_deadline_and_the_warnings() -> None:
    """A closing controller cancels its deadline and does not warn when the connection
    goes, nor start the deadline again."""
    s = session(connected=False)
    assert s.handle(Closing()) == [CancelDeadline()]
    s = session()
    assert s.handle(Closing()) == []
    assert s.handle(Disconnected()) == []


# --- apply calls ------------------------------------------------------------------------------
def test_apply_call_opens_its_job_once_and_is_settled_once() -> None:
    """The first call of an apply job submits it (isolated), later ones only send their
    chunk; each call's outcome is delivered once, whatever comes after."""
    s = session()
    assert s.handle(call("C", "c", 0)) == [Send(submit("c", isolated=1), fn("c")), resent("c", 0)]
    assert s.handle(call("C", "c", 1)) == [resent("c", 1)]
    assert s.handle(result("c", 1)) == [delivered("C", "c", 1)]
    assert s.handle(result("c", 1)) == []
    failed = FailureReceived("c", 0, TIMEOUT, "ran past its time limit")
    assert s.handle(failed) == [DeliverFailure("C", 0, TIMEOUT, "ran past its time limit")]
    assert s.handle(failed) == []
    assert s.handle(result("c", 0)) == []
    assert s.holds("c")  # an apply job lives on without calls


def test_a_call_made_again_is_sent_again() -> None:
    """A call whose direct write did not happen comes back through the reactor: it is
    held once and its chunk is sent."""
    s = session()
    run(s, call("C", "c", 0))
    assert s.handle(call("C", "c", 0)) == [resent("c", 0)]
    assert s.handle(result("c", 0)) == [delivered("C", "c", 0)]


def test_an_abandoned_call_is_not_sent_again() -> None:
    """A call nobody waits for (Ctrl-C) is not resent after a reconnect; the job's other
    calls are."""
    s = session()
    run(s, call("C", "c", 0), call("C", "c", 1), CallAbandoned("c", 0), Disconnected())
    assert s.handle(Connected()) == [
        CancelDeadline(),
        Send(submit("c", isolated=1), fn("c")),
        resent("c", 1),
        Ready(),
    ]
    assert s.handle(result("c", 0)) == []


def test_a_failure_reason_reaches_the_owner() -> None:
    """JobFailed's reason (the chunk's last status) is handed on as it came."""
    s = session()
    run(s, opened("A", "a"), made("a", 0), made("a", 1))
    assert s.handle(FailureReceived("a", 1, CRASHED, "worker died")) == [
        DeliverFailure("A", 1, CRASHED, "worker died")
    ]


# --- end and cancel ---------------------------------------------------------------------------
def test_cancel_sends_cancel_and_forgets_the_job() -> None:
    """A cancelled job is cancelled on the server once; its later chunks and results are
    dropped and a reconnect does not submit it again."""
    s = session()
    run(s, opened("A", "a"), made("a", 0))
    assert s.handle(JobCancelled("a")) == [Send(Cancel("a"))]
    assert s.handle(JobCancelled("a")) == []
    assert run(s, made("a", 1), result("a", 0)) == []
    assert run(s, Disconnected(), Connected()) == [
        LOST,
        StartDeadline(DEADLINE),
        CancelDeadline(),
        Ready(),
    ]


def test_end_sends_end_once() -> None:
    """An ended job is ended on the server once and forgotten."""
    s = session()
    run(s, opened("A", "a"), made("a", 0), result("a", 0))
    assert s.handle(JobEnded("a")) == [Send(End("a"))]
    assert s.handle(JobEnded("a")) == []
    assert not s.holds("a")


@pytest.mark.parametrize("event", [JobEnded("a"), JobCancelled("a")])
def test_end_or_cancel_while_disconnected_just_forgets(event: ses.Event[str]) -> None:
    """Without a connection there is nobody to tell (the server drops a lost
    controller's jobs); the job is not submitted again."""
    s = session()
    run(s, opened("A", "a"), made("a", 0), Disconnected())
    assert s.handle(event) == []
    assert s.handle(Connected()) == [CancelDeadline(), Ready()]


# --- the module itself ------------------------------------------------------------------------
def test_every_event_and_instruction_says_what_it_is() -> None:
    """Each event and instruction class has a one-line docstring of its own."""
    names = [
        n
        for n, v in vars(ses).items()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == ses.__name__
    ]
    assert len(names) == 26  # 14 events, 11 instructions, HeldJob
    for name in names:
        doc = vars(ses)[name].__doc__
        assert doc and "\n" not in doc.strip() and not doc.startswith(name + "("), name


def test_a_new_controller_gives_up_after_three_unproven_auth_refusals() -> None:
    """ "auth-failed" without the server's proof is not final (a stand-in may hold the
    port), but a controller that never got in and hears it three times in a row fails
    its waiters with AuthenticationError, instead of waiting for the deadline."""
    s = Session[str]("h:1", 60.0)
    s.handle(Started())
    refusal = Refused("wrong secret key", transient=True, unproven_auth=True)
    for _ in range(2):
        assert s.handle(refusal) == [
            Warn("the achilles server is busy (wrong secret key); retrying")
        ]
    out = s.handle(refusal)
    assert out[0] == StopReconnecting() and isinstance(out[-1], FailWaiters)
    assert isinstance(s.fatal, AuthenticationError) and "3 times" in str(s.fatal)


def test_unproven_auth_refusals_do_not_end_a_controller_that_was_in() -> None:
    """Once connected, the same refusals (a server restart, someone on the port) only
    make it retry until the reconnect deadline."""
    s = Session[str]("h:1", 60.0)
    s.handle(Started())
    s.handle(Connected())
    s.handle(Disconnected())
    for _ in range(5):
        s.handle(Refused("wrong secret key", transient=True, unproven_auth=True))
    assert s.fatal is None


def test_a_refused_job_fails_with_the_servers_reason() -> None:
    """JobFailed "refused" for seq -1 (the server would not take the job): the caller's
    job fails with an error that says why, instead of waiting forever."""
    s = Session[str]("h:1", 60.0)
    s.handle(Started())
    s.handle(Connected())
    s.handle(JobOpened("owner", Submit("j", 3, 0.0, 0, 1), b"F"))
    out = s.handle(FailureReceived("j", -1, "refused", "job j exists already"))
    assert len(out) == 1 and isinstance(out[0], FailJob) and out[0].owner == "owner"
    assert "refused job j: job j exists already" in str(out[0].error)
    assert not s.holds("j")
