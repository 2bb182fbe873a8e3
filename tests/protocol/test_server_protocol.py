"""The server's Twisted shell in memory: handshake, limits, timers and hostile input.

No sockets and no reactor: every connection is a ``ServerProtocol`` built by
``ServerFactory.buildProtocol`` over a ``StringTransport``, time is a ``task.Clock``, and
what the server writes is decoded with the sans-IO ``Decoder``. A real transport calls
``connectionLost`` some time after ``loseConnection``; :meth:`Net.settle` does that here.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import wire
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from wire import Decoder, encode_bytes

from achilles.config import Settings
from achilles.core.scheduler import job_key
from achilles.net.connection import PYTHON
from achilles.protocol import auth
from achilles.protocol import messages as m
from achilles.protocol.framing import MAX_HEADER_LENGTH, PREAUTH_MAX_HEADER_LENGTH, Frame
from achilles.server import TICK, ServerFactory, ServerProtocol

SECRET = "in-memory cluster secret \u2603"
MAX_PAYLOAD = 4096  # small, so that "over the limit" is cheap to build


# --- an in-memory network around one factory ----------------------------------------------
class Peer:
    """One connection to the server, seen from the peer's side of a StringTransport."""

    _ports = itertools.count(40000)

    def __init__(self, net: Net) -> None:
        self.net = net
        addr = IPv4Address("TCP", "10.0.0.9", next(self._ports))
        self.transport = StringTransport(peerAddress=addr)
        self.proto: ServerProtocol = net.factory.buildProtocol(addr)
        self.lost = False
        self._decoder = Decoder()
        self.log: list[Frame] = []  # every frame the server sent, in order
        self.proto.makeConnection(self.transport)
        first = self.received()
        self.challenge = first[0].msg if first and isinstance(first[0].msg, m.Challenge) else None
        self.role = ""
        self.reply_line = b""

    def received(self) -> list[Frame]:
        """Frames the server wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        frames = self._decoder.feed(data)
        self.log.extend(frames)
        return frames

    def messages(self, *types: type) -> list[m.Message]:
        """New messages, leaving out heartbeats and cluster-size pushes unless asked for."""
        skip = () if types else (m.Heartbeat, m.Cluster)
        return [
            f.msg
            for f in self.received()
            if (isinstance(f.msg, types) if types else not isinstance(f.msg, skip))
        ]

    def feed(self, data: bytes) -> None:
        """Bytes from the peer; an exception escaping dataReceived fails the test."""
        self.proto.dataReceived(data)
        self.net.settle()

    def send(self, msg: m.Message, payload: bytes = b"") -> None:
        self.feed(encode_bytes(msg, payload))

    def auth_reply(
        self,
        role: str = "controller",
        secret: str = SECRET,
        version: int = m.PROTOCOL_VERSION,
        python: str = PYTHON,
        username: str = "achilles",
        slots: int = 1,
        name: str = "peer",
        session: str | None = None,
    ) -> m.AuthReply:
        assert self.challenge is not None
        return wire.auth_reply(
            self.challenge.nonce,
            secret,
            role,
            username,
            name,
            slots,
            version,
            python,
            session=session,
        )

    def authenticate(self, role: str = "controller", **kwargs: Any) -> m.Welcome:
        reply = self.auth_reply(role, **kwargs)
        self.reply_line = encode_bytes(reply)
        self.feed(self.reply_line)
        welcome = self.messages(m.Welcome)
        assert len(welcome) == 1, self.log
        self.role = role
        return welcome[0]  # type: ignore[return-value]

    def key(self, job: str) -> str:
        """The server's key for this controller's ``job``: what nodes are sent."""
        return job_key(self.proto.peer_id, job)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def error(self) -> m.ErrorFrame:
        """The error frame the server sent before closing (the last one it wrote)."""
        self.received()
        errors = [f.msg for f in self.log if isinstance(f.msg, m.ErrorFrame)]
        assert errors, f"no error frame; the server sent {self.log}"
        return errors[-1]  # type: ignore[return-value]

    def close(self) -> None:
        """The peer goes away."""
        self.transport.loseConnection()
        self.net.settle()


class Net:
    """A ServerFactory on a Clock, and the peers connected to it."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("max_payload", MAX_PAYLOAD)
        self.settings = Settings(secret_key=SECRET, **settings)
        self.clock = task.Clock()
        self.factory = ServerFactory(self.settings, clock=self.clock)
        self.peers: list[Peer] = []
        self.victim = ""  # a job's key, set by a setup

    def connect(self) -> Peer:
        peer = Peer(self)
        self.peers.append(peer)
        return peer

    def peer(self, role: str, **kwargs: Any) -> Peer:
        """An authenticated peer of ``role``, with its welcome frames read."""
        peer = self.connect()
        peer.authenticate(role, **kwargs)
        peer.received()
        return peer

    def settle(self) -> None:
        """Deliver connectionLost for every connection the server (or peer) closed."""
        for peer in self.peers:
            if peer.transport.disconnecting and not peer.lost:
                peer.lost = True
                peer.proto.connectionLost(Failure(ConnectionDone()))

    def advance(self, seconds: float, step: float = TICK) -> None:
        while seconds > 1e-9:
            self.clock.advance(min(step, seconds))
            seconds -= step
            self.settle()

    def live(self, role: str) -> list[Peer]:
        return [p for p in self.peers if p.role == role and not p.lost]


def run_job(net: Net, job: str, args: bytes = b"ARGS") -> None:
    """A controller submits a one-chunk job, a node runs it, the controller gets the result.

    A fresh node joins first (the others may be busy); whatever node the scheduler picks
    answers, and the result must reach the controller."""
    net.peer("node", name="helper-node")
    for p in net.peers:
        if not p.lost:
            p.received()
    ctl = net.peer("controller")
    ctl.send(submit(job), b"FUNCTION " + job.encode())
    ctl.send(m.Chunk(job, 0), args)
    tasks = [
        (p, f)
        for p in net.live("node")
        for f in p.received()
        if isinstance(f.msg, m.Task) and f.msg.job == ctl.key(job)
    ]
    assert len(tasks) == 1, f"chunk not dispatched exactly once: {tasks}"
    node, frame = tasks[0]
    assert frame.payload == args
    node.send(m.Result(ctl.key(job), 0, m.OK, 0.01), b"RESULT " + args)
    results = ctl.messages(m.Result)
    assert results == [m.Result(job, 0, m.OK, 0.01)]
    assert ctl.log[-1].payload == b"RESULT " + args
    ctl.send(m.End(job))
    ctl.close()


def assert_still_serving(net: Net) -> None:
    """A newcomer authenticates and a job runs end to end on the same factory."""
    assert net.factory.open_connections == sum(1 for p in net.peers if not p.lost)
    run_job(net, f"after-{len(net.peers)}")


def submit(job: str) -> m.Submit:
    return m.Submit(job=job, max_attempts=3, timeout=0.0, limit=0, total=1)


def line(header: dict[str, Any]) -> bytes:
    return json.dumps(header).encode() + b"\n"


# --- handshake ----------------------------------------------------------------------------
def test_new_connection_gets_only_a_fresh_challenge() -> None:
    """A new connection is sent one Challenge (fresh 256-bit nonce, versions) and nothing else."""
    net = Net()
    a, b = net.connect(), net.connect()
    for peer in (a, b):
        assert [f.msg for f in peer.log] == [peer.challenge]
        assert peer.challenge.version == m.PROTOCOL_VERSION
        assert peer.challenge.python == PYTHON
        assert len(bytes.fromhex(peer.challenge.nonce)) == auth.NONCE_BYTES
    assert a.challenge.nonce != b.challenge.nonce
    assert not a.closed and not b.closed


@pytest.mark.parametrize("role", m.ROLES)
def test_handshake_welcomes_with_server_proof(role: str) -> None:
    """A peer with the secret is welcomed with the server's proof, bound to the peer's nonce."""
    net = Net()
    peer = net.connect()
    reply = peer.auth_reply(role)
    peer.feed(encode_bytes(reply))
    [welcome] = peer.messages(m.Welcome)
    t = wire.transcript(peer.challenge.nonce, reply)
    auth.verify(auth.server_digest(SECRET, t, welcome.peer_id), welcome.digest, "the server")
    assert welcome.peer_id in net.factory.peers and not peer.closed
    sent = b"".join(encode_bytes(f.msg, f.payload) for f in peer.log) + encode_bytes(reply)
    for form in (SECRET.encode(), SECRET.encode().hex().encode()):
        assert form not in sent


def test_server_compares_digests_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server checks a peer's proof with hmac.compare_digest."""
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    net = Net()
    peer = net.connect()
    reply = peer.auth_reply("node")
    peer.feed(encode_bytes(reply))
    assert peer.messages(m.Welcome)
    expected = auth.peer_digest(SECRET, wire.transcript(peer.challenge.nonce, reply))
    assert (expected.encode(), reply.digest.encode()) in calls


@pytest.mark.parametrize("role", m.ROLES)
def test_wrong_secret_is_refused(role: str) -> None:
    """A peer proving another secret gets auth-failed, is closed, and never registers."""
    net = Net()
    peer = net.connect()
    peer.feed(encode_bytes(peer.auth_reply(role, secret="not the secret")))
    err = peer.error()
    assert err.code == "auth-failed" and "ACHILLES_SECRET_KEY" in err.detail
    assert peer.closed and not net.factory.peers
    assert not any(isinstance(f.msg, m.Welcome) for f in peer.log)
    assert_still_serving(net)


def test_replayed_auth_reply_is_refused() -> None:
    """An AuthReply recorded from a successful handshake fails on a new connection."""
    net = Net()
    first = net.connect()
    first.authenticate("controller")
    second = net.connect()
    second.feed(first.reply_line)
    assert second.error().code == "auth-failed"
    assert second.closed
    assert not any(isinstance(f.msg, m.Welcome) for f in second.log)


def test_proof_for_one_role_does_not_pass_as_another() -> None:
    """A digest computed for role node does not authenticate a peer claiming role admin."""
    net = Net()
    peer = net.connect()
    reply = peer.auth_reply("node")
    forged = m.AuthReply(
        "admin",
        reply.username,
        reply.nonce,
        reply.digest,
        reply.version,
        reply.python,
        reply.slots,
        reply.name,
        reply.session,
    )
    peer.send(forged)
    assert peer.error().code == "auth-failed" and peer.closed


@pytest.mark.parametrize(
    "field,value,theirs,ours",
    [
        ("python", "3.10", "Python 3.10", f"Python {PYTHON}"),
        ("python", "2.7", "Python 2.7", f"Python {PYTHON}"),
        (
            "version",
            m.PROTOCOL_VERSION + 1,
            f"protocol {m.PROTOCOL_VERSION + 1}",
            f"speaks {m.PROTOCOL_VERSION}",
        ),
        ("version", 0, "protocol 0", f"speaks {m.PROTOCOL_VERSION}"),
    ],
)
def test_version_skew_is_refused_naming_both_versions(
    field: str, value: Any, theirs: str, ours: str
) -> None:
    """An AuthReply claiming another Python or protocol version is refused, naming both."""
    net = Net()
    peer = net.connect()
    peer.feed(encode_bytes(peer.auth_reply("node", **{field: value})))
    err = peer.error()
    assert err.code == "version-mismatch"
    assert theirs in err.detail and ours in err.detail, err.detail
    assert peer.closed and not net.factory.peers


def test_handshake_timeout_drops_a_silent_peer() -> None:
    """A connection that never authenticates gets an error frame at handshake_timeout
    (not before), and is aborted a second later if its close has not completed (a peer
    that does not read); one whose close completed is left alone (aborting it was the
    "'NoneType' object has no attribute 'shutdown'" traceback on TLS)."""
    net = Net(handshake_timeout=2.0)
    silent, partial = net.connect(), net.connect()
    partial.feed(b'{"t":"auth","role":"no')  # half a header line, then nothing
    net.advance(1.99, step=1.99)
    assert not silent.closed and not partial.closed
    silent.lost = True  # its close will not complete: the harness delivers no connectionLost
    net.advance(0.02)
    for peer in (silent, partial):
        assert peer.error().code == "handshake-timeout"  # told why, and closing
        assert peer.transport.disconnecting
    net.advance(1.01)
    assert silent.transport.disconnected  # cut off, as it did not go
    assert not partial.transport.disconnected  # gone already: not touched again
    silent.proto.connectionLost(Failure(ConnectionDone()))
    assert net.factory.open_connections == 0
    assert_still_serving(net)


def test_authenticated_peer_outlives_the_handshake_timeout() -> None:
    """Once authenticated, the handshake timer is cancelled."""
    net = Net(handshake_timeout=1.0)
    peer = net.peer("admin")
    net.advance(10.0, step=0.5)
    assert not peer.closed
    assert not net.clock.getDelayedCalls()


# --- limits ---------------------------------------------------------------------------------
def _padded(header: bytes, length: int) -> bytes:
    """A JSON header line padded with spaces (legal JSON) to exactly ``length`` bytes."""
    assert header.endswith(b"}") and len(header) <= length
    return header[:-1] + b" " * (length - len(header)) + b"}"


def test_preauth_header_limit_is_exact() -> None:
    """Before auth a header of PREAUTH_MAX_HEADER_LENGTH bytes is read; one more is refused."""
    net = Net()
    ok = net.connect()
    ok.feed(_padded(encode_bytes(ok.auth_reply("node"))[:-1], PREAUTH_MAX_HEADER_LENGTH) + b"\n")
    assert ok.messages(m.Welcome)
    over = net.connect()
    over.feed(
        _padded(encode_bytes(over.auth_reply("node"))[:-1], PREAUTH_MAX_HEADER_LENGTH + 1) + b"\n"
    )
    assert over.error().code == "header-too-long" and over.closed


def test_header_limit_rises_after_auth() -> None:
    """After auth a header of MAX_HEADER_LENGTH bytes is accepted, and one more refused."""
    net = Net()
    peer = net.peer("admin")
    peer.feed(_padded(b'{"t":"hb","len":0}', MAX_HEADER_LENGTH) + b"\n")
    assert not peer.closed
    peer.feed(_padded(b'{"t":"hb","len":0}', MAX_HEADER_LENGTH + 1) + b"\n")
    assert peer.error().code == "header-too-long" and peer.closed


def test_payload_limit_comes_from_settings() -> None:
    """A payload of max_payload bytes is routed; one byte more is refused from its header."""
    net = Net(max_payload=100)
    ctl = net.peer("controller")
    ctl.send(submit("j"), b"F" * 100)
    assert not ctl.closed
    ctl.feed(encode_bytes(m.Chunk("j", 0), b"A" * 101)[:60])  # the header, and no more
    assert ctl.error().code == "payload-too-large" and ctl.closed


def test_connection_cap_refuses_extra_connections() -> None:
    """Past max_connections a new connection gets too-many-connections; a freed slot is reused."""
    net = Net(max_connections=2)
    a, b = net.connect(), net.connect()
    extra = net.connect()
    assert a.challenge and b.challenge and extra.challenge is None
    assert extra.error().code == "too-many-connections" and extra.closed
    net.settle()
    a.close()
    again = net.connect()
    assert again.challenge is not None and not again.closed
    for peer in (b, again):
        peer.close()
    assert net.factory.open_connections == 0


def test_many_dropped_connections_leave_nothing_behind() -> None:
    """600 connections opened and dropped leave no count, peer or timer behind."""
    net = Net()
    for i in range(600):
        peer = net.connect()
        if i % 3 == 0:
            peer.feed(b'{"t":"au')  # half a header
        elif i % 3 == 1:
            peer.feed(b"\x00\xff\n")  # garbage: the server closes it
        peer.close()
        net.peers.remove(peer)
    assert net.factory.open_connections == 0 and not net.factory.peers
    assert not net.clock.getDelayedCalls()
    assert_still_serving(net)


# --- heartbeats -----------------------------------------------------------------------------
def test_silent_authenticated_peer_is_dropped_at_heartbeat_timeout() -> None:
    """An authenticated peer that stops talking is aborted by the factory's tick."""
    net = Net(heartbeat_timeout=3.0)
    net.factory.startFactory()
    try:
        silent, chatty = net.peer("controller"), net.peer("admin")
        for _ in range(3):
            net.advance(TICK)
            chatty.send(m.Heartbeat())
        assert not silent.closed
        net.advance(TICK)
        chatty.send(m.Heartbeat())
        assert silent.closed and silent.transport.disconnected
        assert not chatty.closed
        assert chatty.messages(m.Heartbeat)  # the server's own, sent every tick
    finally:
        net.factory.stopFactory()


def test_half_frame_then_stall_after_auth_is_dropped() -> None:
    """A peer that sends half a frame's payload and stalls is dropped at heartbeat timeout."""
    net = Net(heartbeat_timeout=3.0)
    net.factory.startFactory()
    try:
        ctl = net.peer("controller")
        ctl.send(submit("j"), b"F")
        ctl.feed(encode_bytes(m.Chunk("j", 0), b"x" * 100)[:-50])
        net.advance(3 * TICK)
        assert not ctl.closed
        net.advance(2 * TICK)
        assert ctl.closed and ctl.transport.disconnected
        assert not net.factory.scheduler.jobs  # its job went with it
        assert_still_serving(net)
    finally:
        net.factory.stopFactory()


def test_stalled_node_is_dropped_and_its_chunk_requeued() -> None:
    """A node that goes silent holding a chunk is dropped, and the chunk runs on another node."""
    net = Net(heartbeat_timeout=3.0)
    net.factory.startFactory()
    try:
        stalled = net.peer("node", name="stalled")
        ctl = net.peer("controller")
        ctl.send(submit("j"), b"F")
        ctl.send(m.Chunk("j", 0), b"A")
        assert [f.msg for f in stalled.received() if isinstance(f.msg, m.Task)]
        fresh = net.peer("node", name="fresh")
        for _ in range(5):
            net.advance(TICK)
            for peer in (ctl, fresh):
                peer.send(m.Heartbeat())
        assert stalled.closed
        tasks = [f for f in fresh.received() if isinstance(f.msg, m.Task)]
        assert [(f.msg.job, f.msg.seq, f.payload) for f in tasks] == [(ctl.key("j"), 0, b"A")]
    finally:
        net.factory.stopFactory()


# --- nothing is unpickled ---------------------------------------------------------------------
UNPICKLED: list[str] = []


def _record(what: str) -> str:
    UNPICKLED.append(what)
    return what


class Tripwire:
    """Unpickling this calls _record: proof that someone unpickled it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record, ("unpickled",))


def test_server_routes_pickles_without_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Function and argument pickles pass the server as opaque bytes and are never loaded."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the server unpickled something")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    bomb = pickle.dumps(Tripwire())
    net = Net(max_payload=1 << 20)
    early = net.connect()
    early.feed(encode_bytes(m.Chunk("j", 0), bomb))  # a payload before auth
    assert early.error().code == "payload-before-auth" and early.closed
    run_job(net, "pickled", args=bomb)
    ctl = net.peer("controller")
    ctl.send(submit("j2"), bomb)
    functions = [f for p in net.live("node") for f in p.received() if isinstance(f.msg, m.Function)]
    ctl.send(m.Chunk("j2", 0), bomb)
    functions += [
        f for p in net.live("node") for f in p.received() if isinstance(f.msg, m.Function)
    ]
    assert [f.payload for f in functions] == [bomb]
    assert UNPICKLED == []


# --- results from nodes ---------------------------------------------------------------------
def _two_jobs_on_two_nodes(net: Net) -> dict[str, Any]:
    """Controllers A and B each run a one-chunk job; each chunk lands on a different node."""
    n1, n2 = net.peer("node", name="n1"), net.peer("node", name="n2")
    a, b = net.peer("controller"), net.peer("controller")
    a.send(submit("job-a"), b"FA")
    a.send(m.Chunk("job-a", 0), b"A0")
    b.send(submit("job-b"), b"FB")
    b.send(m.Chunk("job-b", 0), b"B0")
    holder = {}
    for node in (n1, n2):
        for f in node.received():
            if isinstance(f.msg, m.Task):
                holder[f.msg.job] = node
    ka, kb = a.key("job-a"), b.key("job-b")
    assert set(holder) == {ka, kb} and holder[ka] is not holder[kb]
    return {"a": a, "b": b, "node_a": holder[ka], "node_b": holder[kb], "ka": ka, "kb": kb}


def test_forged_result_for_another_nodes_chunk_is_not_forwarded() -> None:
    """A node's result for a chunk running on another node never reaches that job's owner."""
    net = Net()
    s = _two_jobs_on_two_nodes(net)
    s["node_a"].send(m.Result(s["kb"], 0, m.OK, 0.0), b"FORGED")
    assert s["b"].messages(m.Result) == []
    s["node_b"].send(m.Result(s["kb"], 0, m.OK, 0.0), b"REAL")
    assert s["b"].messages(m.Result) == [m.Result("job-b", 0, m.OK, 0.0)]
    assert s["b"].log[-1].payload == b"REAL"


def test_result_for_another_nodes_chunk_is_refused() -> None:
    """A node reporting a chunk of another job that it was never given is refused and closed."""
    net = Net()
    s = _two_jobs_on_two_nodes(net)
    s["node_a"].send(m.Result(s["kb"], 0, m.OK, 0.0), b"FORGED")
    assert s["node_a"].error().code == "refused"
    assert s["node_a"].closed
    assert_still_serving(net)


def test_late_result_for_an_ended_job_is_dropped_quietly() -> None:
    """A node's result for a job it was told to drop (a normal race after Cancel or End)
    is dropped, not fatal."""
    net = Net()
    node = net.peer("node")
    ctl = net.peer("controller")
    ctl.send(submit("gone"), b"F")
    ctl.send(m.Chunks("gone", [0, 1], [1, 1]), b"AB")
    ctl.send(m.Cancel("gone"))
    node.send(m.Result(ctl.key("gone"), 1, m.OK, 0.0), b"LATE")
    assert not node.closed
    assert [type(f.msg) for f in node.received()] == [m.Function, m.Tasks, m.Cancel]
    assert ctl.messages(m.Result, m.Results) == []
    assert_still_serving(net)


def test_result_for_a_job_the_node_never_had_is_refused() -> None:
    """A node's result naming a job id it was never sent (a controller's own id, which
    nodes never see) gets the node refused and closed."""
    net = Net()
    node = net.peer("node")
    node.send(m.Result("made-up", 0, m.OK, 0.0), b"FORGED")
    assert node.error() == m.ErrorFrame(
        "refused", "result for chunk 0 of job made-up, which it was not given"
    )
    assert node.closed
    assert_still_serving(net)


# --- batch frames -----------------------------------------------------------------------------
def test_chunks_batch_reaches_the_node_as_one_tasks_frame() -> None:
    """Chunks sent in one Chunks frame are queued one by one and dispatched to the node in
    one Tasks frame (after the function), each with its own payload."""
    net = Net()
    node = net.peer("node", slots=2)  # room for 2 * PREFETCH = 4 chunks
    ctl = net.peer("controller")
    ctl.send(submit("j"), b"F")
    ctl.send(m.Chunks("j", [0, 1, 2], [2, 0, 4]), b"A0A2\nB")
    frames = node.received()
    assert [type(f.msg) for f in frames] == [m.Function, m.Tasks]
    assert frames[1].msg == m.Tasks(ctl.key("j"), [0, 1, 2], [2, 0, 4], 0.0)
    assert frames[1].payload == b"A0A2\nB"


def test_results_batch_is_forwarded_as_one_frame_and_frees_its_slots() -> None:
    """A node's Results frame reaches the owner as one Results frame, and the slots it
    frees are refilled with the queued chunks in one Tasks frame."""
    net = Net()
    node = net.peer("node", slots=1)
    ctl = net.peer("controller")
    ctl.send(submit("j"), b"F")
    ctl.send(m.Chunks("j", list(range(5)), [1] * 5), b"abcde")
    [_fn, tasks] = node.received()
    assert tasks.msg.seqs == [0, 1]
    node.send(m.Results(ctl.key("j"), [0, 1], [2, 1], [m.OK, m.OK], [0.5, 0.25]), b"RaR")
    [results] = [f for f in ctl.received() if isinstance(f.msg, m.Results)]
    assert results.msg == m.Results("j", [0, 1], [2, 1], [m.OK, m.OK], [0.5, 0.25])
    assert results.payload == b"RaR"
    [more] = node.received()
    assert more.msg == m.Tasks(ctl.key("j"), [2, 3], [1, 1], 0.0) and more.payload == b"cd"


def test_results_batch_with_a_forged_item_is_refused_after_the_good_ones() -> None:
    """Items before a bad one in a Results frame count; the bad one gets the node refused
    and closed; the items after it are not forwarded."""
    net = Net()
    s = _two_jobs_on_two_nodes(net)
    s["a"].send(m.Chunk("job-a", 1), b"A1")
    s["node_a"].received()
    s["node_a"].send(m.Results(s["ka"], [0, 5, 1], [1, 1, 1], [m.OK] * 3, [0.0] * 3), b"xyz")
    assert s["a"].messages(m.Result) == [m.Result("job-a", 0, m.OK, 0.0)]
    assert s["node_a"].error().code == "refused" and s["node_a"].closed
    assert_still_serving(net)


def test_held_tasks_go_before_a_later_frame_to_the_same_node() -> None:
    """Chunks and a Cancel handled in one read reach the node in that order: held tasks
    are written before any other frame to the same peer."""
    net = Net()
    node = net.peer("node", slots=1)
    ctl = net.peer("controller")
    ctl.send(submit("j"), b"F")
    node.received()
    ctl.feed(encode_bytes(m.Chunk("j", 0), b"a") + encode_bytes(m.Cancel("j")))
    assert [type(f.msg) for f in node.received()] == [m.Function, m.Task, m.Cancel]


# --- the hostile-input matrix -----------------------------------------------------------------
def _auth_line(peer: Peer, **changes: Any) -> bytes:
    header = json.loads(encode_bytes(peer.auth_reply("node")))
    header.update(changes)
    return line(header)


def _signed_line(peer: Peer, role: str = "node", **changes: Any) -> bytes:
    """An AuthReply proven with the secret over what it claims (a peer that knows the
    secret but is refused for another reason)."""
    return encode_bytes(peer.auth_reply(role, **changes))


def _job_for_node(net: Net) -> None:
    """Setup: a job with one chunk in flight on the (only) hostile node."""
    ctl = net.peer("controller")
    ctl.send(submit("victim"), b"F")
    ctl.send(m.Chunk("victim", 0), b"A")
    net.victim = ctl.key("victim")


def victim(make: Callable[[str], m.Message]) -> Callable[[Peer], bytes]:
    """A node's frame about the victim job (by the key the server gave it)."""
    return lambda peer: encode_bytes(make(peer.net.victim), b"R")


def _other_controllers_job(net: Net) -> None:
    """Setup: another controller's job exists, with no chunk given to anyone."""
    ctl = net.peer("controller")
    ctl.send(submit("not-yours"), b"F")


@dataclass
class Row:
    id: str
    role: str | None  # None: sent before authenticating
    make: Callable[[Peer], bytes]
    codes: tuple[str, ...]
    setup: Callable[[Net], None] | None = None


def raw(data: bytes) -> Callable[[Peer], bytes]:
    return lambda peer: data


def msg(message: m.Message, payload: bytes = b"") -> Callable[[Peer], bytes]:
    return lambda peer: encode_bytes(message, payload)


HOSTILE: list[Row] = [
    # before authentication
    Row("garbage-bytes", None, raw(b"\x00\x01\xfe\xff\x16\x03\x01 garbage\r\n"), ("bad-json",)),
    Row(
        "endless-header-no-newline",
        None,
        raw(b"A" * (PREAUTH_MAX_HEADER_LENGTH + 1)),
        ("header-too-long",),
    ),
    Row("http-request", None, raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ("bad-json",)),
    Row("json-not-object", None, raw(b'["t", "auth"]\n'), ("not-object",)),
    Row("header-without-type", None, raw(b'{"len": 0}\n'), ("bad-type",)),
    Row("wrong-field-types", None, lambda p: _auth_line(p, slots="all"), ("bad-field",)),
    Row("missing-field", None, raw(line({"t": "auth", "role": "node"})), ("bad-field",)),
    Row("unknown-type", None, raw(line({"t": "exec", "len": 0})), ("unknown-type",)),
    Row(
        "negative-length",
        None,
        raw(line({"t": "chunk", "len": -1, "job": "j", "seq": 0})),
        ("bad-length",),
    ),
    Row("payload-before-auth", None, msg(m.Chunk("j", 0), b"12345"), ("payload-before-auth",)),
    Row(
        "huge-payload-before-auth",
        None,
        raw(
            line(
                {
                    "t": "submit",
                    "len": 1 << 40,
                    "job": "j",
                    "max_attempts": 1,
                    "timeout": 0.0,
                    "limit": 0,
                    "total": 1,
                }
            )
        ),
        ("payload-before-auth",),
    ),
    Row("status-before-auth", None, msg(m.StatusRequest()), ("not-authenticated",)),
    Row("kill-before-auth", None, msg(m.Kill()), ("not-authenticated",)),
    Row("heartbeat-before-auth", None, msg(m.Heartbeat()), ("not-authenticated",)),
    Row("server-frame-from-peer", None, msg(m.Welcome("00" * 32, 1)), ("not-authenticated",)),
    Row("unknown-role", None, lambda p: _signed_line(p, role="root"), ("bad-role",)),
    Row("wrong-digest", None, lambda p: _auth_line(p, digest="00" * 32), ("auth-failed",)),
    Row("non-ascii-digest", None, lambda p: _auth_line(p, digest="\u00e9" * 64), ("auth-failed",)),
    Row(
        "lone-surrogate-nonce",
        None,
        lambda p: _auth_line(p, nonce="\ud800"),
        ("bad-field", "auth-failed"),
    ),
    Row(
        "lone-surrogate-username",
        None,
        lambda p: _auth_line(p, username="\udfff"),
        ("bad-field", "auth-failed"),
    ),
    Row("other-python", None, lambda p: _signed_line(p, python="3.99"), ("version-mismatch",)),
    Row("other-protocol", None, lambda p: _signed_line(p, version=99), ("version-mismatch",)),
    Row("slots-of-601-digits", None, lambda p: _auth_line(p, slots=10**600), ("bad-field",)),
    # after authentication
    Row(
        "endless-header-after-auth",
        "controller",
        raw(b"A" * (MAX_HEADER_LENGTH + 1)),
        ("header-too-long",),
    ),
    Row("not-json-after-auth", "controller", raw(b"{oops}\n"), ("bad-json",)),
    Row(
        "wrong-types-after-auth",
        "controller",
        raw(
            line(
                {
                    "t": "submit",
                    "len": 0,
                    "job": "j",
                    "max_attempts": "3",
                    "timeout": 0,
                    "limit": 0,
                    "total": 1,
                }
            )
        ),
        ("bad-field",),
    ),
    Row(
        "unknown-type-after-auth",
        "controller",
        raw(line({"t": "shell", "cmd": "id"})),
        ("unknown-type",),
    ),
    Row(
        "payload-over-limit",
        "controller",
        lambda p: encode_bytes(m.Chunk("j", 0), b"x" * (MAX_PAYLOAD + 1)),
        ("payload-too-large",),
    ),
    Row(
        "negative-length-after-auth",
        "controller",
        raw(line({"t": "chunk", "len": -7, "job": "j", "seq": 0})),
        ("bad-length",),
    ),
    Row(
        "payload-on-payloadless-frame",
        "controller",
        raw(line({"t": "cancel", "len": 3, "job": "j"}) + b"abc"),
        ("unexpected-payload",),
    ),
    Row(
        "seq-of-4300-digits",
        "controller",
        raw(line({"t": "chunk", "len": 0, "job": "j", "seq": 10**4299})),
        ("bad-field",),
    ),
    Row(
        "negative-seq",
        "controller",
        raw(line({"t": "chunk", "len": 0, "job": "j", "seq": -1})),
        ("bad-field",),
    ),
    Row(
        "job-id-with-escapes",
        "controller",
        raw(
            line(
                {
                    "t": "submit",
                    "len": 0,
                    "job": "j\n\x1b[2J",
                    "max_attempts": 3,
                    "timeout": 0,
                    "limit": 0,
                    "total": 1,
                }
            )
        ),
        ("bad-field",),
    ),
    Row("job-id-too-long", "controller", msg(submit("j" * 65)), ("bad-field",)),
    Row(
        "sizes-over-64-bits",
        "node",
        raw(
            line(
                {
                    "t": "results",
                    "len": 0,
                    "job": "j",
                    "seqs": [0],
                    "sizes": [2**64],
                    "statuses": ["ok"],
                    "elapsed": [0.0],
                }
            )
        ),
        ("bad-field",),
    ),
    Row(
        "controller-sends-result",
        "controller",
        msg(m.Result("j", 0, m.OK, 0.0), b"R"),
        ("not-allowed",),
    ),
    Row("controller-sends-task", "controller", msg(m.Task("j", 0, 0.0), b"T"), ("not-allowed",)),
    Row("controller-authenticates-again", "controller", lambda p: p.reply_line, ("not-allowed",)),
    Row("node-sends-submit", "node", msg(submit("j"), b"F"), ("not-allowed",)),
    Row("node-sends-chunk", "node", msg(m.Chunk("j", 0), b"A"), ("not-allowed",)),
    Row("node-sends-kill", "node", msg(m.Kill()), ("not-allowed",)),
    Row("node-asks-status", "node", msg(m.StatusRequest()), ("not-allowed",)),
    Row("admin-sends-chunk", "admin", msg(m.Chunk("j", 0), b"A"), ("not-allowed",)),
    Row("admin-sends-result", "admin", msg(m.Result("j", 0, m.OK, 0.0), b"R"), ("not-allowed",)),
    Row(
        "result-for-chunk-never-given",
        "node",
        victim(lambda job: m.Result(job, 99, m.OK, 0.0)),
        ("refused",),
        setup=_job_for_node,
    ),
    Row(
        "result-for-another-controllers-job",
        "node",
        msg(m.Result("not-yours", 0, m.OK, 0.0), b"R"),
        ("refused",),
        setup=_other_controllers_job,
    ),
    Row(
        "result-with-unknown-status",
        "node",
        victim(lambda job: m.Result(job, 0, "pwned", 0.0)),
        ("refused",),
        setup=_job_for_node,
    ),
]


@pytest.mark.parametrize("row", HOSTILE, ids=[r.id for r in HOSTILE])
def test_hostile_input_gets_error_frame_and_close(row: Row) -> None:
    """Each hostile input gets an error frame with its code and a close; others keep working."""
    net = Net()
    bystander = net.peer("admin")  # an innocent peer connected throughout
    peer = net.connect()
    if row.role is not None:
        peer.authenticate(row.role, name="hostile")
        peer.received()
    if row.setup is not None:
        row.setup(net)
    peer.feed(row.make(peer))
    assert peer.error().code in row.codes
    assert peer.closed and peer.lost
    assert peer.proto.peer_id not in net.factory.peers
    bystander.send(m.StatusRequest())
    assert bystander.messages(m.Status) and not bystander.closed
    assert_still_serving(net)


# --- authenticated peers that misbehave (issue 12) ------------------------------------------
def _tasks(node: Peer) -> list[Frame]:
    return [f for f in node.received() if isinstance(f.msg, (m.Task, m.Tasks))]


def test_job_ids_cannot_be_squatted_by_another_controller() -> None:
    """Another controller submitting a job id in use gets a job of its own: both run,
    each owner gets only its own results, and nobody is refused."""
    net = Net()
    node = net.peer("node", slots=2)
    owner, squatter = net.peer("controller"), net.peer("controller")
    owner.send(submit("j"), b"F-OWNER")
    squatter.send(submit("j"), b"F-SQUAT")
    owner.send(m.Chunk("j", 0), b"MINE")
    squatter.send(m.Chunk("j", 0), b"THEIRS")
    got = {f.msg.job: f.payload for f in _tasks(node)}
    assert got == {owner.key("j"): b"MINE", squatter.key("j"): b"THEIRS"}
    node.send(m.Result(owner.key("j"), 0, m.OK, 0.0), b"FOR-OWNER")
    assert owner.messages() == [m.Result("j", 0, m.OK, 0.0)]
    assert owner.log[-1].payload == b"FOR-OWNER"
    assert squatter.messages() == []
    assert not any(isinstance(f.msg, m.ErrorFrame) for p in (owner, squatter) for f in p.log)


def test_new_connection_with_a_live_session_takes_over() -> None:
    """A controller's new connection with the session of one the server still holds
    (half-open) drops the old one first, releasing its jobs as if it had left; the job
    the controller submits again is accepted and runs."""
    net = Net()
    node = net.peer("node")
    old = net.peer("controller")
    old.send(submit("j"), b"F")
    old.send(m.Chunk("j", 0), b"A")
    assert _tasks(node)
    new = net.peer("controller", session=old.proto.session)
    assert old.closed and old.transport.disconnected and old.lost  # aborted
    assert [f.msg for f in node.received()] == [m.Cancel(old.key("j"))]
    new.send(submit("j"), b"F")
    new.send(m.Chunk("j", 0), b"A")
    assert [(f.msg.job, f.payload) for f in _tasks(node)] == [(new.key("j"), b"A")]
    assert new.messages() == [] and not new.closed
    assert list(net.factory.scheduler.jobs) == [new.key("j")]


def test_a_session_is_taken_over_only_by_a_controller() -> None:
    """Nodes and admins of one process share a session: they never replace a controller
    or each other."""
    net = Net()
    ctl = net.peer("controller")
    session = ctl.proto.session
    a, b = net.peer("admin", session=session), net.peer("node", session=session)
    c = net.peer("node", session=session)
    assert not any(p.closed for p in (ctl, a, b, c))


def test_refused_submit_and_chunk_are_told_to_the_controller() -> None:
    """A controller's refused Submit or Chunk is answered with a JobFailed "refused" for
    that job (seq -1: the job itself), the reason as its payload (it used to be only
    logged, and the caller waited forever); the connection stays up."""
    net = Net()
    ctl = net.peer("controller")
    ctl.send(submit("j"), b"F")
    ctl.send(submit("j"), b"F")
    ctl.send(m.Chunk("nope", 4), b"A")
    ctl.send(m.Chunks("other", [1, 2], [1, 1]), b"AB")
    got = [
        (f.msg, f.payload)
        for f in ctl.received()
        if not isinstance(f.msg, (m.Heartbeat, m.Cluster))
    ]
    assert got == [
        (m.JobFailed("j", -1, "refused"), b"job j exists already"),
        (m.JobFailed("nope", 4, "refused"), b"chunk 4 for unknown job nope"),
        (m.JobFailed("other", 1, "refused"), b"chunk 1 for unknown job other"),
    ]
    assert not ctl.closed
    assert_still_serving(net)


def test_status_shows_job_ids_and_owner_names_never_sessions() -> None:
    """``achilles status`` shows the id the controller chose and its owner's name; the
    session token and the server's key appear nowhere."""
    net = Net()
    net.peer("node")
    ctl = net.peer("controller", name="alice")
    ctl.send(submit("j"), b"F")
    ctl.send(m.Chunk("j", 0), b"A")
    admin = net.peer("admin")
    admin.send(m.StatusRequest())
    admin.received()
    [status] = [f for f in admin.log if isinstance(f.msg, m.Status)]
    doc = json.loads(status.payload)
    assert [(j["id"], j["owner"]) for j in doc["jobs"]] == [("j", "alice")]
    assert ctl.proto.session.encode() not in status.payload
    assert ctl.key("j").encode() not in status.payload


def test_node_claiming_too_many_slots_is_capped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node advertising 10**9 slots counts as MAX_SLOTS, with a warning naming it."""
    from achilles.core.scheduler import MAX_SLOTS

    net = Net()
    with caplog.at_level(logging.WARNING, logger="achilles.server"):
        net.peer("node", slots=10**9, name="greedy")
    assert net.factory.scheduler.nodes[net.peers[0].proto.peer_id].slots == MAX_SLOTS
    assert net.factory.cluster == m.Cluster(1, MAX_SLOTS)
    assert "node greedy claims 1000000000 slots: it is given work for 1024" in caplog.text


def test_the_servers_ticker_takes_away_a_chunk_held_past_the_time_limit() -> None:
    """With the factory's 1 s ticker running, a node that holds a chunk of a job with a
    1 s limit past the 2 s grace, while heartbeating, is sent Cancel and the chunk runs
    on another node."""
    net = Net(heartbeat_timeout=30.0)
    net.factory.startFactory()
    try:
        holder = net.peer("node", name="holder")
        ctl = net.peer("controller")
        ctl.send(m.Submit("j", 3, 1.0, 0, 1), b"F")
        ctl.send(m.Chunk("j", 0), b"A")
        assert _tasks(holder)
        other = net.peer("node", name="other")
        for _ in range(3):
            net.advance(TICK)
            holder.send(m.Heartbeat())
        assert _tasks(other) == []
        net.advance(TICK)
        assert [f.msg for f in holder.received() if not isinstance(f.msg, m.Heartbeat)] == [
            m.Cancel(ctl.key("j"))
        ]
        assert [(f.msg.job, f.payload) for f in _tasks(other)] == [(ctl.key("j"), b"A")]
        assert not holder.closed
    finally:
        net.factory.stopFactory()


def test_peer_text_is_escaped_in_the_servers_log(caplog: pytest.LogCaptureFixture) -> None:
    """An ErrorFrame's code and detail from a peer, and a node's failure text, reach the
    log quoted, with control characters escaped (no forged lines, no terminal escapes)."""
    net = Net()
    node = net.peer("node")
    ctl = net.peer("controller")
    ctl.send(m.Submit("j", 1, 0.0, 0, 1), b"F")
    ctl.send(m.Chunk("j", 0), b"A")
    forged = "x\n2026-01-01 INFO achilles.server: all is well\x1b[2J"
    with caplog.at_level(logging.INFO, logger="achilles.server"):
        node.send(m.ErrorFrame(forged, forged))
        node.send(m.Result(ctl.key("j"), 0, m.CRASHED, 0.0), forged.encode())
    lines = [r.getMessage() for r in caplog.records]
    assert any("reported" in t for t in lines) and any("failed" in t for t in lines)
    for text in lines:
        assert "\n" not in text and "\x1b" not in text, text
    assert ctl.messages(m.JobFailed) == [m.JobFailed("j", 0, m.CRASHED)]
