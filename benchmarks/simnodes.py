"""Simulated nodes for W8: one process holding N authenticated node connections.

``python -m benchmarks.simnodes --port P --nodes N [--slots S] [--work-ms W]`` (the
secret in ``ACHILLES_SECRET_KEY``) connects N nodes to a real ``achilles-server`` on
127.0.0.1 with the real protocol: each connection is an
:class:`achilles.net.connection.ClientProtocol` (the same handshake, proofs, framing,
batching and keepalive as a real node; nothing of the wire format is re-implemented
here). A simulated node announces ``S`` slots, sends heartbeats at the real node's
interval and, unless ``--no-stats``, a ``NodeStats`` frame at the real node's cadence
(what the server hears from idle real nodes), and answers every task with a no-op
result (one ``None`` per argument, as a real worker would return for ``noop``) after
``W`` ms of simulated work per chunk, ``S`` chunks at a time. Results read in one go
leave in one frame per job, as a real node sends them.

What it does not simulate: worker processes (no pickling of the function, no pool,
no CPU spent on the work: work time is a timer), separate machines (every connection
shares this process's one core and the loopback interface) and reconnection (a lost
connection is counted, not retried).

It prints ``ready N`` once every node is authenticated, then runs until SIGTERM or
SIGINT. The soft limit on open files is raised to the hard one first (``ulimit -n``):
1,000 connections need more than the usual 1,024 descriptors on both sides.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import signal
import sys
from collections import deque
from typing import Any

#: the real node's heartbeat cadence (achilles.config's default)
HEARTBEAT_INTERVAL = 5.0
#: connections opened at once while connecting (the server's handshake timeout is 5 s)
CONNECT_WAVE = 100


def raise_nofile(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (up to the hard limit);
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _noop_result(payload: bytes, cache: dict[int, bytes]) -> bytes:
    """The result chunk a worker returns for ``noop`` over this argument chunk: one
    ``None`` per argument (cached by size: equal sizes mean equal lengths here)."""
    out = cache.get(len(payload))
    if out is None:
        out = cache[len(payload)] = pickle.dumps([None] * len(pickle.loads(payload)), 5)
    return out


class Farm:
    """The simulated nodes of this process, and what they have done."""

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.work_s = args.work_ms / 1000
        self.ready = 0
        self.lost = 0
        self.refusals: list[str] = []
        self.chunks = 0
        self.results: dict[int, bytes] = {}
        self.protocols: list[Any] = []

    # the owner interface of ClientProtocol: connected / refused / disconnected
    def connected(self, proto: Any) -> None:
        self.ready += 1
        if self.ready == self.args.nodes:
            print(f"ready {self.ready}", flush=True)
        if not self.args.no_stats:
            # staggered as real nodes are: each started its clock when it started
            self.reactor.callLater((proto.number % 20) / 20 * 2.0, proto.start_stats)

    def refused(self, err: Any, proven: bool) -> None:
        self.refusals.append(f"{err.code}: {err.detail[:200]}")
        print(f"refused {err.code}: {err.detail[:200]}", file=sys.stderr, flush=True)

    def disconnected(self, proto: Any) -> None:
        if proto.stats_call.running:
            proto.stats_call.stop()
        if not self.stopping:
            self.lost += 1
            print(f"lost node {proto.number}", file=sys.stderr, flush=True)

    stopping = False


def make_protocol_class() -> type:
    """The simulated node's protocol (imported late: Twisted loads only in the process
    that runs nodes)."""
    from twisted.internet import task

    from achilles.net.connection import ClientProtocol
    from achilles.node.service import STATS_INTERVAL, STATS_QUIET
    from achilles.protocol import batching
    from achilles.protocol.framing import split
    from achilles.protocol.messages import OK, NodeStats, Results, Task, Tasks

    class SimNode(ClientProtocol):
        role = "node"
        number = 0
        farm: Farm

        def connectionMade(self) -> None:
            super().connectionMade()
            self.waiting: deque[tuple[str, int, bytes]] = deque()
            self.running = 0
            self.outbox: list[batching.Piece] = []
            self.stats_call = task.LoopingCall(self._stats)
            self.stats_sent = float("-inf")
            self.stats_call.clock = self.clock

        def start_stats(self) -> None:
            if self.connected and not self.stats_call.running:
                self.stats_call.start(STATS_INTERVAL, now=True)

        def _stats(self) -> None:
            # a real node's rule (achilles.node.service): figures that did not move wait
            # up to STATS_QUIET s; a simulated node's figures never move
            now = self.clock.seconds()
            if now - self.stats_sent >= STATS_QUIET - STATS_INTERVAL / 2:
                self.stats_sent = now
                self.send(NodeStats(1.0, 40 * 1024 * 1024))

        def messageReceived(self, msg: Any, payload: bytes) -> None:
            if isinstance(msg, Task):
                self.waiting.append((msg.job, msg.seq, payload))
            elif isinstance(msg, Tasks):
                for seq, part in zip(msg.seqs, split(payload, msg.sizes)):
                    self.waiting.append((msg.job, seq, part))
            else:
                return  # Function, Cancel, Heartbeat: nothing to do for a no-op node
            self._start_work()

        def read_done(self) -> None:
            self._send_results()

        def _start_work(self) -> None:
            farm = self.farm
            while self.waiting and self.running < self.slots:
                job, seq, payload = self.waiting.popleft()
                if farm.work_s <= 0:
                    self._finish(job, seq, payload, 0.0)
                else:
                    self.running += 1
                    farm.reactor.callLater(farm.work_s, self._done, job, seq, payload)

        def _done(self, job: str, seq: int, payload: bytes) -> None:
            self.running -= 1
            self._finish(job, seq, payload, self.farm.work_s)
            self._start_work()
            self._send_results()

        def _finish(self, job: str, seq: int, payload: bytes, elapsed: float) -> None:
            self.farm.chunks += 1
            result = _noop_result(payload, self.farm.results)
            self.outbox.append(batching.Piece(job, seq, result, OK, max(elapsed, 1e-5)))

        def _send_results(self) -> None:
            if self.outbox and self.transport is not None:
                outbox, self.outbox = self.outbox, []
                for frame, payload in batching.frames(Results, outbox):
                    self.send(frame, payload)

    return SimNode


def run(args: argparse.Namespace) -> int:
    """Connect the nodes in waves, then serve until a signal."""
    limit = raise_nofile(args.nodes + 256)
    if limit < args.nodes + 64:
        print(f"open-file limit {limit} is too low for {args.nodes} nodes", file=sys.stderr)
        return 2
    from twisted.internet import endpoints
    from twisted.internet import reactor as installed

    from achilles.net.connection import ClientFactory

    reactor: Any = installed
    secret = os.environ.get("ACHILLES_SECRET_KEY", "")
    farm = Farm(reactor, args)
    cls = make_protocol_class()
    cls.farm = farm
    numbers = iter(range(args.nodes))

    class Factory(ClientFactory):
        def buildProtocol(self, addr: Any) -> Any:
            proto = super().buildProtocol(addr)
            proto.number = next(numbers)
            farm.protocols.append(proto)
            return proto

    factory = Factory(
        cls,
        farm,
        secret=secret,
        clock=reactor,
        slots=args.slots,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        name="",
    )

    def connect_wave(start: int) -> None:
        end = min(args.nodes, start + CONNECT_WAVE)
        for _ in range(start, end):
            endpoint = endpoints.TCP4ClientEndpoint(reactor, args.host, args.port, timeout=30)
            endpoint.connect(factory).addErrback(failed)
        if end < args.nodes:
            wait_for_wave(end)

    def failed(reason: Any) -> None:
        farm.refusals.append(f"connect: {reason.getErrorMessage()[:200]}")
        print(f"cannot connect: {reason.getErrorMessage()[:200]}", file=sys.stderr, flush=True)

    def wait_for_wave(end: int) -> None:
        if farm.ready + len(farm.refusals) >= end:
            connect_wave(end)
        else:
            reactor.callLater(0.02, wait_for_wave, end)

    def stop(signum: int, frame: Any) -> None:
        farm.stopping = True
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.callWhenRunning(connect_wave, 0)
    reactor.run(installSignalHandlers=False)
    print(
        f"done: {farm.chunks} chunks answered, {farm.lost} connections lost, "
        f"{len(farm.refusals)} refused",
        flush=True,
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.simnodes",
        description="N simulated achilles nodes in one process (W8); secret in ACHILLES_SECRET_KEY",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--slots", type=int, default=1, help="slots each node announces")
    p.add_argument("--work-ms", type=float, default=0.0, help="simulated work per chunk")
    p.add_argument("--no-stats", action="store_true", help="send no NodeStats frames")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("simulated nodes connect to loopback only")
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))
