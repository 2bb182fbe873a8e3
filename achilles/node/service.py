"""The node's connection: a client of the server (reconnecting with backoff) that hands
the chunks it receives to the :class:`~achilles.node.executor.Executor` and sends their
results back, grouped per job."""

from __future__ import annotations

import logging
import os
import platform
import random
import signal
import socket
from collections.abc import Callable
from typing import Any, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import task
from twisted.internet.interfaces import IProtocolFactory

from achilles import __version__
from achilles.config import Settings, require_secret
from achilles.net import memlink
from achilles.net.connection import (
    TRANSIENT_REFUSALS,
    ClientFactory,
    ClientProtocol,
    ReportingEndpoint,
    client_endpoint,
    describe_connect_error,
)
from achilles.node.executor import Executor
from achilles.node.stats import ProcessTreeStats
from achilles.protocol import auth, batching
from achilles.protocol.framing import split
from achilles.protocol.messages import (
    ERROR,
    OUTPUT_MAX,
    Cancel,
    Drain,
    ErrorFrame,
    Failure,
    Function,
    Kill,
    Message,
    NodeInfo,
    NodeStats,
    Output,
    Results,
    Task,
    Tasks,
)
from achilles.protocol.summary import error_summary
from achilles.protocol.text import shown

log = logging.getLogger("achilles.node")

#: seconds between a node's NodeStats frames (or its heartbeat interval, if shorter)
STATS_INTERVAL = 2.0
#: a NodeStats frame that says nothing new waits: up to this many seconds, unless CPU
#: moved by STATS_CPU percentage points or memory by STATS_RSS bytes
STATS_QUIET = 10.0
STATS_CPU = 1.0
STATS_RSS = 1024 * 1024
#: most Failure summaries a node sends per second
FAILURES_PER_S = 10


class NodeProtocol(ClientProtocol):
    role = "node"
    owner: Node

    def messageReceived(self, msg: Message, payload: bytes) -> None:
        _NODE_HANDLERS.get(type(msg), _ignore)(self.owner, msg, payload)


def _on_task(node: Node, msg: Task, payload: bytes) -> None:
    node.executor.submit(msg.job, msg.seq, payload, msg.timeout)


def _on_tasks(node: Node, msg: Tasks, payload: bytes) -> None:
    node.executor.submit_many(msg.job, msg.seqs, split(payload, msg.sizes), msg.timeout)


def _on_function(node: Node, msg: Function, payload: bytes) -> None:
    node.executor.function(msg.job, payload)


def _on_cancel(node: Node, msg: Cancel, payload: bytes) -> None:
    node.executor.cancel(msg.job)


def _on_kill(node: Node, msg: Kill, payload: bytes) -> None:
    log.warning("kill received from the server: stopping")
    node.stop(exit_code=0)


def _on_error(node: Node, msg: ErrorFrame, payload: bytes) -> None:
    log.error("server says: %s %s", msg.code, shown(msg.detail, 200))


def _ignore(node: Node, msg: Message, payload: bytes) -> None:
    """Frames that ask nothing of a node (heartbeats; anything else is dropped, as a
    node always did)."""


#: frame type -> handler: one dispatch, by table, as in the server and the controller
_NODE_HANDLERS: dict[type, Callable[[Node, Any, bytes], None]] = {
    Task: _on_task,
    Tasks: _on_tasks,
    Function: _on_function,
    Cancel: _on_cancel,
    Kill: _on_kill,
    ErrorFrame: _on_error,
}


class Node:
    """Connects to the server (reconnecting with backoff) and feeds the executor."""

    def __init__(
        self,
        settings: Settings,
        reactor: Any = None,
        on_stop: Callable[[int], None] | None = None,
        launcher: str = "",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.reactor = reactor
        self.secret = require_secret(settings, "achilles-node")
        self.processes = settings.processes or os.cpu_count() or 1
        self.name = settings.name or auth.safe_name(socket.gethostname())
        self.launcher = launcher
        self.proto: NodeProtocol | None = None
        self._outbox: list[batching.Piece] = []
        self._stats = ProcessTreeStats()
        self._stats_call = task.LoopingCall(self._send_stats)
        self._stats_call.clock = reactor
        self._stats_sent = (float("-inf"), 0.0, 0)  # (when, cpu, rss) of the last NodeStats
        self._failure_window: list[float] = [0.0, 0]  # [second it began, summaries sent]
        self.exit_code = 0
        self.on_stop = on_stop
        self.executor = Executor(
            self.processes,
            self._result,
            reactor,
            self.name,
            on_flush=self._send_results,
            on_output=self._output,
        )
        endpoint: Any = ReportingEndpoint(client_endpoint(reactor, settings), self._attempt_failed)
        self._connect_failure = ""  # why the last attempt to connect failed
        factory = ClientFactory(
            NodeProtocol,
            self,
            secret=self.secret,
            clock=reactor,
            username=settings.username,
            slots=self.processes,
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_timeout=settings.heartbeat_timeout,
            name=self.name,
        )
        # cast: zope's @implementer is invisible to mypy without its plugin
        self.service = ClientService(
            endpoint,
            cast(IProtocolFactory, factory),
            clock=reactor,
            retryPolicy=self._retry_policy(
                backoffPolicy(initialDelay=0.2, maxDelay=5.0, jitter=random.Random().random)
            ),
        )

    def _attempt_failed(self, reason: Any) -> None:
        self._connect_failure = describe_connect_error(reason)

    def _retry_policy(self, policy: Callable[[int], float]) -> Callable[[int], float]:
        """The backoff, saying for each failed attempt why and when the next one is
        (``ClientService`` retries in silence)."""

        def delay(attempt: int) -> float:
            seconds = policy(attempt)
            if self._connect_failure:
                log.warning(
                    "cannot connect to the server at %s:%d: %s; next attempt in %.1f s",
                    self.settings.host,
                    self.settings.port,
                    self._connect_failure,
                    seconds,
                )
                self._connect_failure = ""
            return seconds

        return delay

    def start(self) -> None:
        log.info(
            "node %s with %d worker(s) connecting to %s:%d",
            self.name,
            self.processes,
            self.settings.host,
            self.settings.port,
        )
        self.service.startService()
        # the embedded cluster's node has no dashboard to report to
        if memlink.endpoint_for(self.reactor, self.settings.host, self.settings.port) is None:
            self._stats_call.start(min(STATS_INTERVAL, self.settings.heartbeat_interval), now=False)

    def connected(self, proto: NodeProtocol) -> None:
        self.proto = proto
        self._stats_sent = (float("-inf"), 0.0, 0)  # a new server hears them at once
        proto.send(
            NodeInfo(
                __version__,
                platform.python_version(),
                auth.safe_name(socket.gethostname()),
                self.launcher,
                os.getpid(),
            )
        )
        log.info(
            "connected to achilles server at %s:%d as node %d",
            self.settings.host,
            self.settings.port,
            proto.peer_id,
        )

    def disconnected(self, proto: NodeProtocol) -> None:
        if self.proto is proto and not self.executor.closed:
            self.proto = None
            self._outbox.clear()
            log.warning("lost the server; dropping work in hand and reconnecting")
            self.executor.cancel_all()

    def refused(self, err: ErrorFrame, proven: bool = True) -> None:
        """Only a refusal the server proved (it knows the secret) stops the node; any
        other is retried with backoff (it may come from whoever holds the port)."""
        if err.code in TRANSIENT_REFUSALS or not proven:
            log.warning("refused (%s: %s); retrying", err.code, err.detail[:200])
            return
        log.error("the server refused this node: %s", err.detail)
        self.stop(exit_code=2)

    def _send_stats(self) -> None:
        """CPU and memory of this node and its workers, for the server's dashboard: when
        they moved (by STATS_CPU points or STATS_RSS bytes), else every STATS_QUIET s
        (with 1,000 idle nodes, a frame from each every 2 s was half the idle server's
        CPU: W8 in docs/benchmarks.md)."""
        if self.proto is not None:
            cpu, rss = self._stats.sample()
            now = self.reactor.seconds()
            when, last_cpu, last_rss = self._stats_sent
            if (
                now - when < STATS_QUIET
                and abs(cpu - last_cpu) < STATS_CPU
                and abs(rss - last_rss) < STATS_RSS
            ):
                return
            self._stats_sent = (now, cpu, rss)
            self.proto.send(NodeStats(cpu, rss))

    def _failure(self, job: str, seq: int, payload: bytes) -> None:
        """A chunk raised: a text summary for the dashboard (type name and traceback,
        read from the pickle's opcodes, never unpickled), at most FAILURES_PER_S a
        second (a job whose every chunk raises costs this node little)."""
        now = self.reactor.seconds()
        if now - self._failure_window[0] >= 1.0:
            self._failure_window = [now, 0]
        if self._failure_window[1] >= FAILURES_PER_S or self.proto is None:
            return
        self._failure_window[1] += 1
        kind, text = error_summary(payload)
        self.proto.send(Failure(job, seq, kind), text.encode("utf-8"))

    def _result(self, job: str, seq: int, status: str, payload: bytes, elapsed: float) -> None:
        """Held until the executor's burst is over (``_send_results``): results read
        from the pool together leave together, in one frame per job."""
        if status == ERROR:
            self._failure(job, seq, payload)
        if self.proto is not None:
            self._outbox.append(batching.Piece(job, seq, payload, status, elapsed))

    def _output(self, job: str, seq: int, payload: bytes) -> None:
        """What a chunk printed: sent at once, so before its result (held until the
        burst ends); the server stamps the node's name on it and routes it to the job's
        controller."""
        if self.proto is not None and len(payload) <= OUTPUT_MAX:
            self.proto.send(Output(job, seq, "", 0), payload)

    def _send_results(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        proto = self.proto
        if proto is None:
            return  # the server requeues what this connection held
        for msg, payload in batching.frames(Results, outbox):
            proto.send(msg, payload)

    def leave(self, deadline: float = 30.0) -> None:
        """Leave gracefully (SIGTERM): take no new work, finish the chunks in hand (for at
        most ``deadline`` s; the server requeues whatever is left), then stop."""
        if self.proto is None or not (self.executor.running or self.executor.waiting):
            return self.stop()
        log.warning(
            "leaving: finishing %d chunk(s) in hand, then stopping",
            len(self.executor.running) + len(self.executor.waiting),
        )
        self.proto.send(Drain())
        give_up = self.reactor.callLater(deadline, self.stop)

        def check() -> None:
            if not (self.executor.running or self.executor.waiting) or self.proto is None:
                if give_up.active():
                    give_up.cancel()
                self.stop()
            else:
                self.reactor.callLater(0.05, check)

        check()

    def stop(self, exit_code: int = 0) -> None:
        if self.executor.closed:
            return
        self._send_results()  # a leaving node's last results must not be lost
        self.exit_code = exit_code
        self.service.stopService()
        if self._stats_call.running:
            self._stats_call.stop()
        self.executor.close()
        if self.on_stop is not None:
            self.on_stop(exit_code)


def run_node(settings: Settings, launcher: str = "") -> int:
    """Run a node until it is killed or told to stop; return the exit code. ``launcher``
    says how it was started ("up", "systemd"; shown by ``achilles status``)."""
    from twisted.internet import reactor as installed

    reactor: Any = installed  # (mypy takes the module attribute for an interface)
    node = Node(
        settings,
        reactor,
        on_stop=lambda code: reactor.callLater(0, reactor.stop),
        launcher=launcher,
    )
    reactor.callWhenRunning(node.start)
    reactor.callWhenRunning(_graceful_sigterm, node)
    reactor.addSystemEventTrigger("before", "shutdown", node.executor.close)
    reactor.run()
    return node.exit_code


def _graceful_sigterm(node: Node) -> None:
    """First SIGTERM: leave gracefully; a second one: stop now (SIGINT always does)."""
    leaving = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal leaving
        if leaving:
            node.reactor.callFromThread(node.stop)
        else:
            leaving = True
            node.reactor.callFromThread(node.leave)

    signal.signal(signal.SIGTERM, on_term)
