"""In-process connections (``achilles.net.memlink``): registry, delivery, closing, addresses.

No sockets and no real reactor: the reactor is a ``task.Clock`` (``clock.advance(0)``
runs the reactor's next turn), the server side is a registered ``Factory`` and each end
is a ``Protocol`` that records what it was given, in order, as the very objects passed.
Every test unregisters what it registered, so the module-level registry never leaks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from achilles.config import Settings
from achilles.net import memlink as _memlink
from achilles.net.memlink import (
    JOIN_BELOW,
    MemoryEndpoint,
    endpoint_for,
    register,
    unregister,
)
from achilles.server import ServerFactory

HOST = "127.0.0.1"
PORT = 47123  # only ever registered in memory: nothing listens on it


# --- recording protocols and factories ----------------------------------------------------
class Recorder(Protocol):
    """Records connectionMade, every dataReceived (the object itself) and connectionLost."""

    name = "peer"

    def __init__(self) -> None:
        self.made = 0
        self.received: list[bytes] = []
        self.lost: list[Failure] = []
        self.log: list[tuple[Any, ...]] = []  # replaced by a shared log when ordering matters

    def connectionMade(self) -> None:
        self.made += 1
        self.log.append((self.name, "made"))

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.log.append((self.name, "data", data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.append(reason)
        self.log.append((self.name, "lost", reason.type))


class Echo(Recorder):
    """A server that writes back whatever it is given, from inside dataReceived."""

    def dataReceived(self, data: bytes) -> None:
        self.log.append((self.name, "data in", data))
        self.transport.write(data)
        self.log.append((self.name, "data out", data))


class Recording(Factory):
    """A factory that keeps each protocol it built and the address it was built for."""

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.addrs: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        self.built.append(proto)
        self.addrs.append(addr)
        return proto


def fired(d: defer.Deferred[Any]) -> Any:
    """The result a Deferred has already fired with (failing the test if it has not)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def server_factory() -> Iterator[Recording]:
    """A recording server factory registered at (HOST, PORT), unregistered afterwards."""
    factory = Recording.forProtocol(Recorder)
    register(HOST, PORT, factory)
    try:
        yield factory
    finally:
        unregister(HOST, PORT)


def connect(
    clock: task.Clock, server_factory: Recording, client_cls: type[Recorder] = Recorder
) -> tuple[Recorder, Recorder, Recording]:
    """One in-memory connection: (client protocol, server protocol, client factory)."""
    endpoint = endpoint_for(clock, HOST, PORT)
    assert endpoint is not None
    client_factory = Recording.forProtocol(client_cls)
    client = fired(endpoint.connect(client_factory))
    server = server_factory.built[-1]
    client.name, server.name = "client", "server"
    return client, server, client_factory


def shared_log(*protos: Recorder) -> list[tuple[Any, ...]]:
    log: list[tuple[Any, ...]] = []
    for proto in protos:
        proto.log = log
    return log


# --- the registry -------------------------------------------------------------------------
def test_endpoint_for_unregistered_address_is_none(clock: task.Clock) -> None:
    """Nothing registered at an address: endpoint_for returns None."""
    assert endpoint_for(clock, HOST, PORT) is None
    assert endpoint_for(clock, "10.1.2.3", PORT) is None


def test_register_gives_an_endpoint_and_unregister_removes_it(clock: task.Clock) -> None:
    """register makes endpoint_for return a MemoryEndpoint for that exact address only,
    and after unregister it returns None again."""
    factory = Factory.forProtocol(Recorder)
    register(HOST, PORT, factory)
    try:
        endpoint = endpoint_for(clock, HOST, PORT)
        assert isinstance(endpoint, MemoryEndpoint)
        assert endpoint.server_factory is factory
        assert endpoint.reactor is clock
        assert endpoint_for(clock, HOST, PORT + 1) is None
        assert endpoint_for(clock, "10.1.2.3", PORT) is None
    finally:
        unregister(HOST, PORT)
    assert endpoint_for(clock, HOST, PORT) is None


def test_unregister_of_an_unknown_address_is_a_no_op() -> None:
    """unregister of an address never registered neither raises nor touches others."""
    before = dict(_memlink._servers)
    unregister("10.9.9.9", 1)
    assert _memlink._servers == before


# --- connecting ---------------------------------------------------------------------------
def test_connect_fires_with_the_client_protocol_and_both_sides_are_made(
    clock: task.Clock, server_factory: Recording
) -> None:
    """connect returns a Deferred already fired with the client protocol; each side's
    factory built one protocol, and both had connectionMade once."""
    endpoint = endpoint_for(clock, HOST, PORT)
    assert endpoint is not None
    client_factory = Recording.forProtocol(Recorder)
    d = endpoint.connect(client_factory)
    assert isinstance(d, defer.Deferred)
    client = fired(d)
    assert client_factory.built == [client]
    assert len(server_factory.built) == 1
    server = server_factory.built[0]
    assert client.made == 1 and server.made == 1
    assert client.transport is not None and server.transport is not None
    assert client.transport is not server.transport
    assert client.transport.connected and server.transport.connected
    assert not client.received and not server.received
    assert not client.lost and not server.lost


def test_connect_refused_when_the_server_factory_builds_nothing(clock: task.Clock) -> None:
    """A server factory whose buildProtocol returns None: connect fails with
    ConnectionRefusedError and the client gets no connectionMade."""

    class Refusing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    register(HOST, PORT, Refusing())
    try:
        endpoint = endpoint_for(clock, HOST, PORT)
        assert endpoint is not None
        client_factory = Recording.forProtocol(Recorder)
        d = endpoint.connect(client_factory)
        failures: list[Failure] = []
        d.addErrback(failures.append)
        assert len(failures) == 1 and failures[0].check(ConnectionRefusedError)
        assert all(p.made == 0 for p in client_factory.built)
    finally:
        unregister(HOST, PORT)


def test_transport_addresses_mirror_each_other(
    clock: task.Clock, server_factory: Recording
) -> None:
    """The server transport's peer is the client transport's host and vice versa."""
    client, server, _ = connect(clock, server_factory)
    assert server.transport.getPeer() == client.transport.getHost()
    assert server.transport.getHost() == client.transport.getPeer()
    assert isinstance(client.transport.getPeer(), IPv4Address)
    assert client.transport.getPeer().type == "TCP"


def test_factories_are_given_the_other_sides_address(
    clock: task.Clock, server_factory: Recording
) -> None:
    """The server factory builds for the client's address (a fresh port) and the client
    factory for the registered server address."""
    _, _, client_factory = connect(clock, server_factory)
    assert client_factory.addrs == [IPv4Address("TCP", HOST, PORT)]
    (client_addr,) = server_factory.addrs
    assert client_addr.host == HOST and client_addr.port != PORT


def test_client_transport_peer_is_the_registered_server_address(
    clock: task.Clock, server_factory: Recording
) -> None:
    """The client transport's getPeer() is the registered (host, port) and the server
    transport's getHost() is that same address, as over TCP."""
    client, server, _ = connect(clock, server_factory)
    assert client.transport.getPeer() == IPv4Address("TCP", HOST, PORT)
    assert server.transport.getHost() == IPv4Address("TCP", HOST, PORT)


def test_server_peer_is_the_client_address_and_differs_per_connection(
    clock: task.Clock, server_factory: Recording
) -> None:
    """The server transport's getPeer() is the address its factory built for (the
    client's), whose port differs between two connections."""
    _, first, _ = connect(clock, server_factory)
    _, second, _ = connect(clock, server_factory)
    assert first.transport.getPeer() == server_factory.addrs[0]
    assert second.transport.getPeer() == server_factory.addrs[1]
    assert first.transport.getPeer().port != second.transport.getPeer().port


# --- delivery -----------------------------------------------------------------------------
def test_nothing_is_delivered_before_the_reactor_turns(
    clock: task.Clock, server_factory: Recording
) -> None:
    """Writes are not delivered during write(), only on the reactor's next turn, in
    both directions."""
    client, server, _ = connect(clock, server_factory)
    client.transport.write(b"ping")
    server.transport.write(b"pong")
    assert server.received == [] and client.received == []
    clock.advance(0)
    assert server.received == [b"ping"]
    assert client.received == [b"pong"]


def test_both_directions_deliver_in_order_across_turns(
    clock: task.Clock, server_factory: Recording
) -> None:
    """What each side writes over several turns arrives at the other in write order."""
    client, server, _ = connect(clock, server_factory)
    for i in range(3):
        client.transport.write(b"c%d" % i)
        server.transport.write(b"s%d" % i)
        clock.advance(0)
    assert server.received == [b"c0", b"c1", b"c2"]
    assert client.received == [b"s0", b"s1", b"s2"]


def test_small_writes_in_one_turn_arrive_joined(
    clock: task.Clock, server_factory: Recording
) -> None:
    """Several small write/writeSequence pieces in one turn arrive as one dataReceived,
    in order; empty pieces are ignored."""
    client, server, _ = connect(clock, server_factory)
    client.transport.write(b"a")
    client.transport.write(b"")
    client.transport.writeSequence([b"b", b"", b"cd"])
    client.transport.write(b"e")
    clock.advance(0)
    assert server.received == [b"abcde"]


def test_empty_writes_deliver_nothing(clock: task.Clock, server_factory: Recording) -> None:
    """write(b"") and writeSequence of empty pieces give the peer no dataReceived."""
    client, server, _ = connect(clock, server_factory)
    client.transport.write(b"")
    client.transport.writeSequence([])
    client.transport.writeSequence([b"", b""])
    clock.advance(0)
    assert server.received == []


def test_header_and_large_payload_arrive_as_two_calls_uncopied(
    clock: task.Clock, server_factory: Recording
) -> None:
    """writeSequence([small header, payload of JOIN_BELOW bytes]) arrives as two
    dataReceived calls, the second being the very payload object written."""
    client, server, _ = connect(clock, server_factory)
    header = b'{"t":"x","len":%d}\n' % JOIN_BELOW
    payload = b"\x07" * JOIN_BELOW
    client.transport.writeSequence([header, payload])
    clock.advance(0)
    assert len(server.received) == 2
    assert server.received[0] == header
    assert server.received[1] is payload


def test_large_pieces_split_runs_of_small_ones(
    clock: task.Clock, server_factory: Recording
) -> None:
    """Small pieces on either side of a large one are joined into their own runs, and the
    large one (and one just under JOIN_BELOW, which is joined) keep the write order."""
    client, server, _ = connect(clock, server_factory)
    big = b"B" * (JOIN_BELOW + 1)
    under = b"u" * (JOIN_BELOW - 1)
    client.transport.writeSequence([b"h1", b"h2", big, under, b"t"])
    client.transport.write(b"z")
    clock.advance(0)
    assert len(server.received) == 3
    assert server.received[0] == b"h1h2"
    assert server.received[1] is big
    assert server.received[2] == under + b"tz"


def test_consecutive_large_pieces_each_arrive_on_their_own(
    clock: task.Clock, server_factory: Recording
) -> None:
    """Two large writes in one turn arrive as two calls, each the object written."""
    client, server, _ = connect(clock, server_factory)
    first, second = b"1" * JOIN_BELOW, b"2" * (2 * JOIN_BELOW)
    client.transport.write(first)
    client.transport.write(second)
    clock.advance(0)
    assert len(server.received) == 2
    assert server.received[0] is first and server.received[1] is second


def test_write_from_inside_data_received_is_not_reentrant(clock: task.Clock) -> None:
    """An echo server's write from inside dataReceived is delivered after that
    dataReceived returned, by a later reactor call, never re-entrantly."""
    factory = Recording.forProtocol(Echo)
    register(HOST, PORT, factory)
    try:
        client, server, _ = connect(clock, factory)
        log = shared_log(client, server)
        client.transport.write(b"hi")
        clock.advance(0)
        assert log == [
            ("server", "data in", b"hi"),
            ("server", "data out", b"hi"),
            ("client", "data", b"hi"),
        ]
        client.transport.write(b"again")
        clock.advance(0)
        assert client.received == [b"hi", b"again"]
    finally:
        unregister(HOST, PORT)


def test_echo_is_scheduled_not_delivered_within_the_write(clock: task.Clock) -> None:
    """While the echo server is still in dataReceived, its reply is a pending reactor
    call and the client has received nothing."""
    seen: list[tuple[int, int]] = []

    class Watching(Echo):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            seen.append((len(client.received), len(clock.getDelayedCalls())))

    factory = Recording.forProtocol(Watching)
    register(HOST, PORT, factory)
    try:
        client, _, _ = connect(clock, factory)
        client.transport.write(b"hi")
        clock.advance(0)
        assert seen == [(0, 1)]
        assert client.received == [b"hi"]
        assert clock.getDelayedCalls() == []
    finally:
        unregister(HOST, PORT)


# --- closing ------------------------------------------------------------------------------
def test_lose_connection_delivers_first_then_both_sides_lose_once(
    clock: task.Clock, server_factory: Recording
) -> None:
    """loseConnection delivers what was written, then each side gets connectionLost
    once, with ConnectionDone."""
    client, server, _ = connect(clock, server_factory)
    log = shared_log(client, server)
    client.transport.write(b"last")
    client.transport.loseConnection()
    assert client.transport.disconnecting
    assert log == [] and client.transport.connected
    clock.advance(0)
    assert server.received == [b"last"]
    assert log[0] == ("server", "data", b"last")
    assert sorted(log[1:]) == [
        ("client", "lost", ConnectionDone),
        ("server", "lost", ConnectionDone),
    ]
    assert len(client.lost) == 1 and client.lost[0].check(ConnectionDone)
    assert len(server.lost) == 1 and server.lost[0].check(ConnectionDone)
    assert not client.transport.connected and not server.transport.connected
    clock.advance(0)
    assert len(client.lost) == 1 and len(server.lost) == 1
    assert clock.getDelayedCalls() == []


def test_lose_connection_from_the_server_side(clock: task.Clock, server_factory: Recording) -> None:
    """The server's loseConnection delivers its last write to the client, then closes
    both sides once."""
    client, server, _ = connect(clock, server_factory)
    server.transport.writeSequence([b"bye", b"\n"])
    server.transport.loseConnection()
    clock.advance(0)
    assert client.received == [b"bye\n"]
    assert [f.type for f in client.lost] == [ConnectionDone]
    assert [f.type for f in server.lost] == [ConnectionDone]


def test_writes_after_lose_connection_are_dropped(
    clock: task.Clock, server_factory: Recording
) -> None:
    """write and writeSequence after loseConnection deliver nothing."""
    client, server, _ = connect(clock, server_factory)
    client.transport.write(b"kept")
    client.transport.loseConnection()
    client.transport.write(b"dropped")
    client.transport.writeSequence([b"also", b"dropped", b"x" * JOIN_BELOW])
    clock.advance(0)
    assert server.received == [b"kept"]
    assert len(server.lost) == 1 and len(client.lost) == 1


def test_abort_connection_drops_undelivered_writes(
    clock: task.Clock, server_factory: Recording
) -> None:
    """abortConnection drops what was not delivered yet, and each side gets
    connectionLost once, with ConnectionLost."""
    client, server, _ = connect(clock, server_factory)
    client.transport.write(b"never")
    client.transport.writeSequence([b"h", b"x" * JOIN_BELOW])
    client.transport.abortConnection()
    client.transport.write(b"after")
    clock.advance(0)
    assert server.received == []
    assert len(client.lost) == 1 and client.lost[0].check(ConnectionLost)
    assert len(server.lost) == 1 and server.lost[0].check(ConnectionLost)
    assert not client.transport.connected and not server.transport.connected


def test_abort_also_drops_what_the_peer_wrote_in_that_turn(
    clock: task.Clock, server_factory: Recording
) -> None:
    """After the client aborts, what the server writes in the same turn is never
    delivered to the client."""
    client, server, _ = connect(clock, server_factory)
    client.transport.abortConnection()
    server.transport.write(b"too late")
    clock.advance(0)
    assert client.received == []
    assert len(client.lost) == 1 and len(server.lost) == 1


def test_a_second_close_is_a_no_op(clock: task.Clock, server_factory: Recording) -> None:
    """loseConnection or abortConnection again, before or after the close took effect,
    gives no second connectionLost and leaves no call pending."""
    client, server, _ = connect(clock, server_factory)
    client.transport.write(b"x")
    client.transport.loseConnection()
    client.transport.loseConnection()
    clock.advance(0)
    assert server.received == [b"x"]
    client.transport.loseConnection()
    client.transport.abortConnection()
    server.transport.loseConnection()
    server.transport.abortConnection()
    clock.advance(0)
    assert len(client.lost) == 1 and len(server.lost) == 1
    assert clock.getDelayedCalls() == []


def test_both_sides_closing_in_one_turn_lose_once_each(
    clock: task.Clock, server_factory: Recording
) -> None:
    """Both sides calling loseConnection in the same turn: each gets connectionLost once."""
    client, server, _ = connect(clock, server_factory)
    client.transport.loseConnection()
    server.transport.loseConnection()
    clock.advance(0)
    assert len(client.lost) == 1 and len(server.lost) == 1
    assert clock.getDelayedCalls() == []


def test_the_peer_cannot_receive_after_close(clock: task.Clock, server_factory: Recording) -> None:
    """Once closed, writes from either side reach nobody and schedule nothing."""
    client, server, _ = connect(clock, server_factory)
    client.transport.loseConnection()
    clock.advance(0)
    assert server.transport.disconnecting and not server.transport.connected
    server.transport.write(b"to nobody")
    server.transport.writeSequence([b"a", b"b" * JOIN_BELOW])
    client.transport.write(b"from nobody")
    assert clock.getDelayedCalls() == []
    clock.advance(0)
    assert client.received == [] and server.received == []
    assert len(client.lost) == 1 and len(server.lost) == 1


def test_close_from_inside_data_received_stops_further_delivery(clock: task.Clock) -> None:
    """A server that aborts while reading gets connectionLost once, and the client's
    later writes are not delivered to it."""

    class Closing(Recorder):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self.transport.abortConnection()

    factory = Recording.forProtocol(Closing)
    register(HOST, PORT, factory)
    try:
        client, server, _ = connect(clock, factory)
        client.transport.write(b"one")
        clock.advance(0)
        client.transport.write(b"two")
        clock.advance(0)
        assert server.received == [b"one"]
        assert len(server.lost) == 1 and server.lost[0].check(ConnectionLost)
        assert len(client.lost) == 1
    finally:
        unregister(HOST, PORT)


# --- end to end with the real server protocol --------------------------------------------
def test_real_server_sends_its_challenge_in_memory(clock: task.Clock) -> None:
    """A registered achilles ServerFactory: after connect and one turn the client has
    the server's challenge frame, a JSON header line of type "challenge"."""
    factory = ServerFactory(Settings(host=HOST, port=0, secret_key="s" * 32), clock=clock)
    register(HOST, PORT, factory)
    try:
        endpoint = endpoint_for(clock, HOST, PORT)
        assert endpoint is not None
        client = fired(endpoint.connect(Factory.forProtocol(Recorder)))
        assert client.received == []
        clock.advance(0)
        data = b"".join(client.received)
        assert data.startswith(b'{"t":"challenge"')
        header = json.loads(data.split(b"\n", 1)[0])
        assert header["t"] == "challenge"
        assert factory.open_connections == 1
        client.transport.loseConnection()
        clock.advance(0)
        assert factory.open_connections == 0
        assert len(client.lost) == 1
    finally:
        unregister(HOST, PORT)


def test_exception_in_data_received_drops_the_link(clock: task.Clock) -> None:
    """A protocol whose dataReceived raises loses the connection (both sides told once),
    as Twisted does over a socket, instead of the error escaping into the reactor."""

    class Raising(Protocol):
        def dataReceived(self, data: bytes) -> None:
            raise RuntimeError("bug")

        def connectionLost(self, reason: object = None) -> None:
            lost.append("server")

    class Client(Protocol):
        def connectionLost(self, reason: object = None) -> None:
            lost.append("client")

    lost: list[str] = []
    _memlink.register(HOST, PORT + 1, Factory.forProtocol(Raising))
    try:
        endpoint = _memlink.endpoint_for(clock, HOST, PORT + 1)
        assert endpoint is not None
        client = endpoint.connect(Factory.forProtocol(Client))
        proto = client.result
        proto.transport.write(b"boom")
        clock.advance(0)
        assert sorted(lost) == ["client", "server"]
        assert not proto.transport.connected
    finally:
        _memlink.unregister(HOST, PORT + 1)
