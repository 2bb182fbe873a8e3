"""Authenticated peers that misbehave (issue 12, part 4), against a real server.

Every attacker here knows the secret: a raw socket (``wire.Raw``) speaking the protocol
by hand as a controller or a node, next to real nodes and a real ``Pool``. Each test
states the attack and checks the server's answer; before these defences each one
hung a caller, stalled a job, looped, or broke ``achilles status`` for everyone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import wire
from conftest import Cluster, child_env, wait_until
from wire import Raw

from achilles import ChunkFailedError, Pool
from achilles.core.pace import PREFETCH
from achilles.core.scheduler import MAX_SLOTS
from achilles.protocol import messages as m
from achilles.serialization import dumps_chunk, dumps_function, loads_chunk

#: what a hostile node does with the chunks it is given: the frame it answers with
#: (None: it holds them and never answers)
Answer = Callable[[str, list[int]], "tuple[m.Message, bytes] | None"]


def hold(job: str, seqs: list[int]) -> None:
    """Take the chunks, keep heartbeating, never answer."""
    return None


def cancelled(job: str, seqs: list[int]) -> tuple[m.Message, bytes]:
    """Answer every chunk "cancelled", though its job is live."""
    n = len(seqs)
    return m.Results(job, seqs, [0] * n, [m.CANCELLED] * n, [0.0] * n), b""


FORGED = "x\nFORGED LINE achilles.server: all is well\x1b[2J\x1b]0;pwned\x07"


def crashed(job: str, seqs: list[int]) -> tuple[m.Message, bytes]:
    """Report a crash whose text would forge a log line and clear the terminal."""
    text = FORGED.encode()
    n = len(seqs)
    return m.Results(job, seqs, [len(text)] * n, [m.CRASHED] * n, [0.0] * n), text * n


class HostileNode:
    """A raw node: authenticates claiming ``slots``, answers the server's heartbeats
    (so it is never dropped as silent), records the tasks and cancels it gets, and
    answers tasks with ``answer``. Runs in a thread until :meth:`stop`."""

    def __init__(
        self, cluster: Cluster, answer: Answer, slots: int = 1, name: str = "hostile-node"
    ) -> None:
        self.raw = Raw(cluster.port)
        self.raw.authenticate(cluster.secret, "node", slots=slots, name=name)
        self.answer = answer
        self.tasks: list[tuple[str, int]] = []
        self.cancels: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                frame = self.raw.next()
            except OSError:  # closed by stop(), or a socket timeout
                return
            if frame is None:
                return
            msg = frame.msg
            if isinstance(msg, m.Heartbeat):
                self.raw.send_msg(m.Heartbeat())
            elif isinstance(msg, (m.Task, m.Tasks)):
                seqs, _ = wire.unpack(msg, frame.payload)
                self.tasks.extend((msg.job, seq) for seq in seqs)
                reply = self.answer(msg.job, seqs)
                if reply is not None:
                    self.raw.send_msg(*reply)
            elif isinstance(msg, m.Cancel):
                self.cancels.append(msg.job)

    def stop(self) -> None:
        self.raw.close()
        self.thread.join(10)


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileNode]]:
    """Factory of hostile nodes, every one stopped when the test ends."""
    made: list[HostileNode] = []

    def make(cluster: Cluster, answer: Answer, **kwargs: Any) -> HostileNode:
        node = HostileNode(cluster, answer, **kwargs)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def raw() -> Iterator[Callable[..., Raw]]:
    """Factory of raw connections (authenticated with ``role``), closed at the end."""
    made: list[Raw] = []

    def make(cluster: Cluster, role: str | None = "controller", **reply: Any) -> Raw:
        conn = Raw(cluster.port)
        made.append(conn)
        if role is None:
            conn.challenge()
        else:
            conn.authenticate(cluster.secret, role, **reply)
        return conn

    yield make
    for conn in made:
        conn.close()


def _module_cluster(request: Any, tmp_path_factory: Any, nodes: int) -> Cluster:
    cluster = Cluster(request, str(tmp_path_factory.mktemp("nodecwd")))
    request.addfinalizer(cluster.stop)
    cluster.start_server()
    for _ in range(nodes):
        cluster.start_node(1)
    return cluster


@pytest.fixture(scope="module")
def bare(request: Any, tmp_path_factory: Any) -> Cluster:
    """A server with no node of its own: only the attackers' nodes get work."""
    return _module_cluster(request, tmp_path_factory, nodes=0)


@pytest.fixture(scope="module")
def one_node(request: Any, tmp_path_factory: Any) -> Cluster:
    """A server and one real node of one worker."""
    return _module_cluster(request, tmp_path_factory, nodes=1)


def nodes_named(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [n for n in cluster.status()["nodes"] if n["name"] == name]


def only_real_nodes(cluster: Cluster) -> None:
    """Wait until the nodes of earlier tests' attackers have left the server."""
    wait_until(
        lambda: len(cluster.status()["nodes"]) == len(cluster.nodes),
        10,
        what="the attackers of earlier tests to be gone",
    )


def log_lines(cluster: Cluster, text: str) -> list[str]:
    assert cluster.server is not None
    return [line for line in cluster.server.output().splitlines() if text in line]


def _line(header: dict[str, Any]) -> bytes:
    return json.dumps(header).encode() + b"\n"


def run_abs(conn: Raw, job: str, values: list[int], submit: bool = True) -> list[int]:
    """As a controller: (submit and) send one chunk of ``abs`` over ``values``; return
    its result, failing on any error frame."""
    if submit:
        conn.send_msg(m.Submit(job, 3, 0.0, 0, 1), dumps_function(abs))
    conn.send_msg(m.Chunk(job, 0), dumps_chunk(values))
    while True:
        frame = conn.next()
        assert frame is not None, "the server closed the connection"
        msg = frame.msg
        assert not isinstance(msg, (m.ErrorFrame, m.JobFailed)), msg
        if isinstance(msg, (m.Result, m.Results)) and msg.job == job:
            [seq], [payload] = wire.unpack(msg, frame.payload)
            assert seq == 0 and wire.outcomes(msg)[0] == [m.OK]
            return list(loads_chunk(payload))


# --- 1. jobs belong to their owner's session ----------------------------------------------
def test_a_squatted_job_id_does_not_take_the_owners_job(one_node, raw):
    """Attack: a controller reads a job id from ``status`` and submits a job with that
    id right after the owner's connection drops. Answer: the squatter gets a job of its
    own; the owner reconnects (same session), submits again, and gets its results (it
    was refused and hung forever before)."""
    session = "5e" * 16
    owner = raw(one_node, session=session)
    owner.send_msg(m.Submit("job-1", 3, 0.0, 0, 1), dumps_function(abs))
    wait_until(lambda: [j["id"] for j in one_node.status()["jobs"]] == ["job-1"], 10)
    owner.close()
    wait_until(lambda: not one_node.status()["jobs"], 10, what="the owner's job to go")
    squatter = raw(one_node)
    squatter.send_msg(m.Submit("job-1", 3, 0.0, 0, 1), b"not even a function")
    wait_until(lambda: len(one_node.status()["jobs"]) == 1, 10)
    again = raw(one_node, session=session)
    assert run_abs(again, "job-1", [-3, 4, -5]) == [3, 4, 5]
    jobs = one_node.status()["jobs"]
    assert sorted(j["id"] for j in jobs) == ["job-1", "job-1"]  # two jobs, one id each
    assert not log_lines(one_node, "exists already")


def test_a_new_connection_takes_over_a_half_open_one(one_node, raw):
    """Attack (or just NAT): the server still holds the owner's old connection, gone
    silent, when the owner reconnects. Answer: the old connection is dropped first and
    its jobs released, so the owner's resubmitted job is accepted and runs."""
    session = "7a" * 16
    stale = raw(one_node, session=session)
    stale.send_msg(m.Submit("job-2", 3, 0.0, 0, 1), dumps_function(abs))
    wait_until(lambda: one_node.status()["jobs"], 10)
    fresh = raw(one_node, session=session)
    stale.until_closed()  # the server closed the old one (a socket timeout fails here)
    assert stale.eof
    assert run_abs(fresh, "job-2", [-1, -2]) == [1, 2]
    assert log_lines(one_node, "dropping its old connection")


def test_a_refused_submit_or_chunk_is_told_to_its_controller(one_node, raw):
    """Attack: chunks for a job the sender does not own, and a second Submit of a live
    job. Answer: a JobFailed "refused" naming the job (and the chunk, or -1 for the job
    itself) with the reason, for each (before, only the server's log knew); the
    connection stays usable."""
    conn = raw(one_node)
    conn.send_msg(m.Chunk("nope", 7), b"x")
    assert conn.next_msg() == m.JobFailed("nope", 7, "refused")
    assert conn.frames[-1].payload == b"chunk 7 for unknown job nope"
    conn.send_msg(m.Submit("job-3", 3, 0.0, 0, 1), dumps_function(abs))
    conn.send_msg(m.Submit("job-3", 3, 0.0, 0, 1), dumps_function(abs))
    assert conn.next_msg() == m.JobFailed("job-3", -1, "refused")
    assert conn.frames[-1].payload == b"job job-3 exists already"
    assert run_abs(conn, "job-3", [-9], submit=False) == [9]
    assert log_lines(one_node, "chunk 7 for unknown job nope")


# --- 2. bounded slots ----------------------------------------------------------------------
def test_a_node_claiming_a_billion_slots_gets_at_most_max_slots_times_depth(bare, hostile, raw):
    """Attack: a node claims 10**9 slots, then sits on its chunks. Answer: it is believed
    for MAX_SLOTS (with a warning naming it), so it gets MAX_SLOTS * PREFETCH chunks of
    a 2,500-chunk job and the rest stay queued for others; controllers are told
    MAX_SLOTS. (It took nearly all the work before.)"""
    only_real_nodes(bare)
    greedy = hostile(bare, hold, slots=10**9, name="greedy")
    ctl = raw(bare)
    total = 2500
    ctl.send_msg(m.Submit("big", 3, 0.0, 0, total), dumps_function(abs))
    for start in range(0, total, 500):
        seqs = list(range(start, start + 500))
        ctl.send_msg(m.Chunks("big", seqs, [1] * 500), b"x" * 500)
    cap = MAX_SLOTS * PREFETCH
    wait_until(lambda: len(greedy.tasks) >= cap, 20, what=f"{cap} tasks")
    [node] = nodes_named(bare, "greedy")
    [job] = bare.status()["jobs"]
    assert node["slots"] == MAX_SLOTS and node["inflight"] == cap
    assert (job["inflight"], job["queued"]) == (cap, total - cap)
    assert len(greedy.tasks) == cap
    assert log_lines(bare, "node greedy claims 1000000000 slots: it is given work for 1024")


# --- 3. task_timeout enforced by the server -------------------------------------------------
def test_a_node_holding_chunks_past_the_time_limit_loses_them(fresh_cluster, hostile):
    """Attack: a node takes chunks and never answers, while heartbeating. Answer: with
    ``Pool(task_timeout=1)``, after the limit plus the 2 s grace the server takes its
    chunks away (an attempt each), tells it to drop the job, and the real node runs
    them: the map completes (it stalled forever before)."""
    cluster = fresh_cluster(nodes=1)  # a new node: it takes no more than the attacker
    sink = hostile(cluster, hold, name="sink")
    with Pool(task_timeout=1, **cluster.kwargs()) as pool:
        start = time.monotonic()
        assert pool.map_async(abs, range(-12, 0), chunksize=1).get(60) == list(range(12, 0, -1))
        took = time.monotonic() - start
    assert sink.tasks, "the hostile node was given nothing: the test proves nothing"
    wait_until(lambda: sink.cancels, 5, what="the hostile node to be told to drop the job")
    assert {job for job, _ in sink.tasks} == set(sink.cancels)
    assert len(sink.tasks) <= PREFETCH  # shunned by the job once caught
    assert took < 30, took
    print(f"map with a node holding {len(sink.tasks)} chunk(s) finished in {took:.1f} s")


# --- 4. a node answering "cancelled" ----------------------------------------------------------
def test_a_node_answering_cancelled_cannot_make_the_server_loop(bare, hostile):
    """Attack: the only node answers every chunk "cancelled". Answer: each answer counts
    an attempt, so each chunk fails after max_attempts as a crash would (38,778 round
    trips in 12 s before, and the map never ended)."""
    only_real_nodes(bare)
    liar = hostile(bare, cancelled, name="liar")
    with (
        Pool(max_attempts=3, **bare.kwargs()) as pool,
        pytest.raises(ChunkFailedError, match="answered 'cancelled'"),
    ):
        pool.map_async(abs, range(4), chunksize=1).get(60)
    seq0 = [seq for _, seq in liar.tasks if seq == 0]
    assert len(seq0) == 3  # max_attempts, then it failed
    assert len(liar.tasks) <= 4 * 3
    print(f"{len(liar.tasks)} round trips for 4 chunks")


def test_a_node_answering_cancelled_gets_no_more_of_the_job(fresh_cluster, hostile):
    """Attack: as above, next to a real node. Answer: after its first such answer the
    node gets no more of the job's chunks, and the map completes on the real node."""
    cluster = fresh_cluster(nodes=1)  # a new node: it takes no more than the attacker
    liar = hostile(cluster, cancelled, name="liar2")
    with Pool(**cluster.kwargs()) as pool:
        assert pool.map_async(abs, range(-20, 0), chunksize=1).get(60) == list(range(20, 0, -1))
    assert liar.tasks and len(liar.tasks) <= PREFETCH
    assert len(set(liar.tasks)) == len(liar.tasks)


# --- 5. numbers and texts from peers ----------------------------------------------------------
def test_numbers_from_peers_are_bounded_and_status_keeps_working(bare, raw):
    """Attack: a chunk number of 4,300 digits (it broke ``achilles status`` for everyone
    while its job lived), a negative one, a job id with escape sequences, and a node
    claiming 10**600 slots. Answer: each is refused as "bad-field" and closed, and
    ``achilles status`` works."""
    ctl = raw(bare)
    ctl.send_msg(m.Submit("victim", 3, 0.0, 0, -1), dumps_function(abs))
    for header in (
        {"t": "chunk", "len": 0, "job": "victim", "seq": 10**4299},
        {"t": "chunk", "len": 0, "job": "victim", "seq": -1},
        {"t": "cancel", "len": 0, "job": "victim\x1b[2J\n"},
    ):
        conn = raw(bare)
        conn.send(_line(header))
        assert conn.error_then_close().code == "bad-field"
    ctl.send(_line({"t": "chunk", "len": 0, "job": "victim", "seq": 10**4299}))
    assert ctl.error_then_close().code == "bad-field"
    node = raw(bare, role=None)
    node.send(node.auth_reply(bare.secret, "node", slots=10**600))
    assert node.error_then_close().code == "bad-field"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "achilles",
            "status",
            "--host",
            "127.0.0.1",
            "--port",
            str(bare.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(ACHILLES_SECRET_KEY=bare.secret),
    )
    assert out.returncode == 0, out.stderr
    assert "node(s)" in out.stdout


def test_texts_from_peers_reach_the_log_escaped(bare, hostile, raw):
    """Attack: a node sends an ErrorFrame and a crash report whose text holds a newline
    and a forged log line, terminal escapes and an OSC title sequence. Answer: the server
    logs them quoted, control characters escaped: no forged line, no escape byte."""
    only_real_nodes(bare)
    liar = hostile(bare, crashed, name="forger")
    liar.raw.send_msg(m.ErrorFrame(FORGED, FORGED))
    ctl = raw(bare)
    ctl.send_msg(m.Submit("job-5", 1, 0.0, 0, 1), dumps_function(abs))
    ctl.send_msg(m.Chunk("job-5", 0), dumps_chunk([1]))
    failed = ctl.next_msg()
    assert failed == m.JobFailed("job-5", 0, m.CRASHED)
    wait_until(lambda: log_lines(bare, "reported:"), 10, what="the ErrorFrame's log line")
    assert bare.server is not None
    out = bare.server.output()
    assert "\x1b" not in out and "\x07" not in out
    assert not [line for line in out.splitlines() if line.startswith("FORGED")]
    assert log_lines(bare, "chunk 0 of job job-5 failed: 'x\\nFORGED LINE")


def test_achilles_status_prints_names_escaped(monkeypatch, no_cluster_config, capsys):
    """A name in a status document (from an older or hostile server) is printed with its
    control characters escaped: it cannot move the cursor or forge a line."""
    from achilles import cli

    doc = {
        "controllers": 1,
        "nodes": [
            {
                "name": "evil\x1b[2J\nnode",
                "slots": 1,
                "inflight": 0,
                "done": 0,
                "last_seen_age": 0.5,
                "draining": False,
            }
        ],
        "jobs": [
            {
                "id": "j\r1",
                "owner": "o\x07wner",
                "done": 0,
                "total": 1,
                "added": 1,
                "chunks_per_s": 0.0,
                "inflight": 0,
                "retries": 0,
                "failed": 0,
            }
        ],
    }
    monkeypatch.setattr("achilles.pool.getClusterStatus", lambda **kwargs: doc)
    monkeypatch.setenv("ACHILLES_SECRET_KEY", "s" * 32)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "evil\\x1b[2J\\nnode" in out and "j\\r1" in out and "o\\x07wner" in out
    assert len(out.splitlines()) == 5
