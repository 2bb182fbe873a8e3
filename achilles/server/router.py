"""The server's router: every connection's frames become scheduler events, and the
scheduler's instructions become frames (batched per peer and job). Payloads are routed as
opaque bytes: the server never unpickles anything."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet import protocol, task

from achilles.config import Settings, is_loopback, require_secret, user_config_dir
from achilles.core import scheduler as sch
from achilles.core.monitor import Monitor
from achilles.core.throttle import REPORT_INTERVAL, LoginThrottle
from achilles.errors import ConfigError
from achilles.net import memlink, tls
from achilles.protocol import auth, batching
from achilles.protocol.framing import split
from achilles.protocol.messages import (
    AuthReply,
    Cancel,
    Chunk,
    Chunks,
    Cluster,
    Drain,
    End,
    ErrorFrame,
    Failure,
    Function,
    Heartbeat,
    JobFailed,
    Kill,
    Killed,
    Message,
    NodeInfo,
    NodeStats,
    Output,
    Result,
    Results,
    Status,
    StatusRequest,
    Submit,
    Tasks,
)
from achilles.protocol.text import shown
from achilles.server.protocol import ServerProtocol

log = logging.getLogger("achilles.server")


def function_name(text: str) -> str:
    """A job's function name as a controller sent it, made safe to show anywhere:
    printable characters only (others become ``?``), at most 120."""
    return "".join(c if c.isprintable() else "?" for c in text[:120])


TICK = 1.0
#: what a node's tasks may print, forwarded to callers: bytes per second, and the burst
#: allowed above that rate; output past it is dropped and counted (the caller is told)
OUTPUT_RATE = 256 * 1024
OUTPUT_BURST = 1024 * 1024


class ServerFactory(protocol.Factory):
    protocol = ServerProtocol  # type: ignore[assignment]

    def __init__(self, settings: Settings, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.settings = settings
        self.secret = require_secret(settings, "achilles-server")
        self.clock = clock
        self.open_connections = 0
        self.throttle = LoginThrottle()
        self._plain_warned: set[str] = set()
        self.scheduler = sch.Scheduler()
        #: what the dashboard shows (achilles.web): counters and bounded rings
        self.monitor = Monitor()
        self.ids = itertools.count(1)
        self.peers: dict[int, ServerProtocol] = {}
        self.cluster = Cluster(0, 0)
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = clock
        # Tasks for a node and results for a controller made while handling one read are
        # held here and sent as one batch frame per peer and job (see flush_batches).
        self.reading = 0
        self._batches: dict[int, list[Any]] = {}
        # per node: output bytes it may still send now, when that was reckoned, and the
        # bytes dropped since its last forwarded output
        self._output_budget: dict[int, list[float]] = {}
        self._handlers: dict[type, Callable[[ServerProtocol, Any, bytes], None]] = {
            Submit: self._on_submit,
            Chunk: self._on_chunk,
            Chunks: self._on_chunks,
            Cancel: self._on_cancel,
            End: self._on_end,
            Result: self._on_result,
            Results: self._on_results,
            Kill: self._on_kill,
            StatusRequest: self._on_status,
            Drain: self._on_drain,
            NodeInfo: self._on_node_info,
            NodeStats: self._on_node_stats,
            Failure: self._on_failure,
            Output: self._on_output,
            Heartbeat: self._on_heartbeat,
            ErrorFrame: self._on_error,
        }

    def startFactory(self) -> None:
        if not self._ticker.running:
            self._ticker.start(TICK, now=False)

    def stopFactory(self) -> None:
        if self._ticker.running:
            self._ticker.stop()

    # -- scheduler plumbing -----------------------------------------------------------
    def feed(self, event: Any) -> None:
        for ins in self.scheduler.handle(event, self.clock.seconds()):
            self._execute(ins)
        if not self.reading:  # a timer or a lost connection: nothing else will come
            self.flush_batches()

    def flush_batches(self) -> None:
        """Send the held tasks and results, batched (see :mod:`achilles.protocol.batching`)."""
        batches, self._batches = self._batches, {}
        for peer_id, items in batches.items():
            peer = self.peers.get(peer_id)
            if peer is None:
                continue
            # a peer is either a node (held tasks) or a controller (held results)
            kind = Tasks if isinstance(items[0], sch.SendTask) else Results
            for msg, payload in batching.frames(kind, items):
                peer.send(msg, payload)

    def _hold(self, peer_id: int, ins: Any) -> None:
        self._batches.setdefault(peer_id, []).append(ins)

    def _execute(self, ins: Any) -> None:
        if isinstance(ins, sch.SendTask):
            self._hold(ins.node, ins)
        elif isinstance(ins, sch.ForwardResult):
            self._hold(ins.owner, ins)
        elif isinstance(ins, sch.SendFunction):
            self._send(ins.node, Function(ins.job), ins.payload)
        elif isinstance(ins, sch.CancelOnNode):
            self._send(ins.node, Cancel(ins.job))
        elif isinstance(ins, sch.FailJob):
            log.warning("chunk %d of job %s failed: %s", ins.seq, ins.job, shown(ins.detail, 300))
            self.monitor.event(
                self.clock.seconds(),
                "failure",
                f"chunk {ins.seq} of job {ins.job[:8]} failed for good ({ins.reason})",
            )
            self._send(
                ins.owner, JobFailed(ins.job, ins.seq, ins.reason), ins.detail.encode("utf-8")
            )
        elif isinstance(ins, sch.ClusterChanged):
            self.cluster = Cluster(ins.nodes, ins.slots)
            for peer in list(self.peers.values()):
                if peer.role == "controller":
                    self._send(peer.peer_id, self.cluster)
        elif isinstance(ins, sch.Refuse):
            self._refuse(ins)

    def _refuse(self, ins: sch.Refuse) -> None:
        """Log a refusal and tell the peer (a controller learns that its submit or chunk
        was not taken, instead of waiting for it forever); close a misbehaving peer."""
        refused = self.peers.get(ins.peer)
        log.warning(
            "refused from %s %s: %s",
            refused.role if refused else "peer",
            refused.name if refused else ins.peer,
            ins.reason,
        )
        if refused is None:
            return
        if ins.close:
            self._batches.pop(ins.peer, None)
            refused.fail("refused", ins.reason)
        elif ins.job and refused.role == "controller":  # which job: it fails that one
            self._send(ins.peer, JobFailed(ins.job, ins.seq, "refused"), ins.reason.encode("utf-8"))
        else:
            self._send(ins.peer, ErrorFrame("refused", ins.reason))

    def _send(self, peer_id: int, msg: Message, payload: bytes = b"") -> None:
        """Send one frame to a peer, after whatever is held for it (order is kept)."""
        if peer_id in self._batches:
            self.flush_batches()
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.send(msg, payload)

    def buildProtocol(self, addr: Any) -> ServerProtocol:  # type: ignore[override]
        proto: ServerProtocol = super().buildProtocol(addr)  # type: ignore[assignment]
        proto.clock = self.clock
        return proto

    def _tick(self) -> None:
        """Heartbeats both ways: a peer silent past the timeout is dropped (a frozen or
        cut-off node sends no FIN), which for a node requeues its chunks. And the failed
        logins of the last interval, one line per address."""
        now = self.clock.seconds()
        for host, failures, wait in self.throttle.report(now):
            log.warning(
                "%d failed login(s) from %s in the last %.0f s (wrong secret?)%s",
                failures,
                host,
                REPORT_INTERVAL,
                f"; its next attempt is heard in {wait:.0f} s" if wait else "",
            )
        # Our heartbeats go out at the peers' own cadence, not every tick: with 1,000
        # idle nodes one a second each was most of the idle server's CPU (W8).
        every = min(self.settings.heartbeat_interval, self.settings.heartbeat_timeout / 3)
        for peer in list(self.peers.values()):
            silent = now - peer.last_heard
            if silent > self.settings.heartbeat_timeout:
                log.warning("%s %s lost: no heartbeat for %.1f s", peer.role, peer.name, silent)
                peer.transport.abortConnection()
            elif now - peer.heartbeat_sent >= every - TICK / 2:
                peer.heartbeat_sent = now
                peer.send(Heartbeat())
        self.feed(sch.Tick())  # time limits of the chunks nodes hold

    # -- peers ------------------------------------------------------------------------
    @staticmethod
    def in_memory(peer: ServerProtocol) -> bool:
        """The peer is this process's own (the embedded cluster), not on a socket."""
        return isinstance(peer.transport, memlink.MemoryTransport)

    def plain_accepted(self, host: str) -> None:
        """A plain TCP connection was let in: warn (once per address) if it came from
        another machine (only ``--tls off`` allows that)."""
        if not is_loopback(host) and host not in self._plain_warned:
            self._plain_warned.add(host)
            log.warning(
                "accepted plain TCP (unencrypted) from %s: anyone on the network "
                "path can read and change this traffic",
                host,
            )

    def login_failed(self, host: str, detail: str) -> None:
        """A failed login: logged at once the first time in an interval, then counted."""
        if self.throttle.failed(host, self.clock.seconds()):
            log.warning(
                "login from %s failed: %s (further failures from it are counted "
                "and reported every %.0f s)",
                host,
                detail,
                REPORT_INTERVAL,
            )

    def peer_joined(self, peer: ServerProtocol, msg: AuthReply) -> None:
        self.peers[peer.peer_id] = peer
        log.info("%s %s connected from %s", peer.role, peer.name, peer.peer_desc)
        if peer.role == "node":
            if msg.slots > sch.MAX_SLOTS:
                log.warning(
                    "node %s claims %d slots: it is given work for %d",
                    peer.name,
                    msg.slots,
                    sch.MAX_SLOTS,
                )
            self.monitor.node_joined(peer.peer_id, self.clock.seconds(), peer.peer_desc)
            self.monitor.event(self.clock.seconds(), "node", f"node {peer.name} joined")
            self.feed(sch.NodeJoined(peer.peer_id, msg.slots, peer.name))
        elif peer.role == "controller":
            self._take_over(peer)
            peer.send(self.cluster)

    def _take_over(self, peer: ServerProtocol) -> None:
        """A controller's new connection replaces any we still hold for its session (a
        half-open one behind NAT, or one it gave up on): the old one is dropped first and
        its jobs released, so that the jobs the controller submits again are taken."""
        for old in list(self.peers.values()):
            if old is not peer and old.role == "controller" and old.session == peer.session:
                log.warning(
                    "controller %s reconnected from %s: dropping its old connection from %s",
                    peer.name,
                    peer.peer_desc,
                    old.peer_desc,
                )
                self.peer_lost(old, "replaced by a new connection")
                old.transport.abortConnection()

    def peer_lost(self, peer: ServerProtocol, reason: Any) -> None:
        if self.peers.pop(peer.peer_id, None) is None:
            return
        log.info("%s %s disconnected", peer.role, peer.name)
        self._output_budget.pop(peer.peer_id, None)
        if peer.role == "node":
            node = self.scheduler.nodes.get(peer.peer_id)
            if node is not None and node.inflight:
                log.warning(
                    "node %s lost with %d chunk(s) in flight: requeued",
                    peer.name,
                    len(node.inflight),
                )
            held = len(node.inflight) if node is not None else 0
            now = self.clock.seconds()
            self.monitor.node_lost(peer.peer_id, now, peer.name, node.done if node else 0, held)
            self.monitor.event(
                now,
                "node" if held == 0 else "requeue",
                f"node {peer.name} left" + (f": {held} chunk(s) requeued" if held else ""),
            )
            self.feed(sch.NodeLost(peer.peer_id, "connection closed"))
        elif peer.role == "controller":
            for job in [j for j in self.scheduler.jobs.values() if j.owner == peer.peer_id]:
                self._log_job_end(job.name, peer.peer_id, "cancelled (its controller left)")
            self.feed(sch.OwnerLost(peer.peer_id))

    def message(self, peer: ServerProtocol, msg: Message, payload: bytes) -> None:
        self._handlers[type(msg)](peer, msg, payload)

    # -- handlers ---------------------------------------------------------------------
    def _on_submit(self, peer: ServerProtocol, msg: Submit, payload: bytes) -> None:
        self.monitor.event(
            self.clock.seconds(), "job-start", f"job {msg.job[:8]} started by {peer.name}"
        )
        log.info(
            "job %s submitted by %s (%s chunks)",
            msg.job[:8],
            peer.name,
            msg.total if msg.total >= 0 else "?",
        )
        self.feed(
            sch.JobSubmitted(
                msg.job,
                peer.peer_id,
                payload,
                msg.max_attempts,
                msg.timeout,
                msg.limit,
                msg.total,
                bool(msg.isolated),
                function_name(msg.name),
                msg.items,
            )
        )

    def _log_job_end(self, job_id: str, owner: int, how: str) -> None:
        job = self.scheduler.jobs.get(sch.job_key(owner, job_id))
        if job is not None:
            self.monitor.event(
                self.clock.seconds(),
                "job-end" if how == "finished" else "job-cancel",
                f"job {job_id[:8]} {how}: {job.done} chunks, {job.retries} retries, "
                f"{job.failures} failed",
            )
            log.info(
                "job %s %s: %d chunks done in %.2f s, %d retries",
                job_id[:8],
                how,
                job.done,
                self.clock.seconds() - job.submitted,
                job.retries,
            )

    def _on_chunk(self, peer: ServerProtocol, msg: Chunk, payload: bytes) -> None:
        self.feed(sch.ChunkAdded(msg.job, msg.seq, payload, peer.peer_id))

    def _on_chunks(self, peer: ServerProtocol, msg: Chunks, payload: bytes) -> None:
        self.feed(sch.ChunksAdded(msg.job, msg.seqs, split(payload, msg.sizes), peer.peer_id))

    def _on_cancel(self, peer: ServerProtocol, msg: Cancel, payload: bytes) -> None:
        self._log_job_end(msg.job, peer.peer_id, "cancelled")
        self.feed(sch.JobCancelled(msg.job, peer.peer_id))

    def _on_end(self, peer: ServerProtocol, msg: End, payload: bytes) -> None:
        self._log_job_end(msg.job, peer.peer_id, "finished")
        self.feed(sch.JobEnded(msg.job, peer.peer_id))

    def _on_result(self, peer: ServerProtocol, msg: Result, payload: bytes) -> None:
        self.feed(
            sch.ResultReceived(peer.peer_id, msg.job, msg.seq, msg.status, payload, msg.elapsed)
        )

    def _on_results(self, peer: ServerProtocol, msg: Results, payload: bytes) -> None:
        self.feed(
            sch.ResultsReceived(
                peer.peer_id,
                msg.job,
                msg.seqs,
                msg.statuses,
                split(payload, msg.sizes),
                msg.elapsed,
            )
        )

    def _on_drain(self, peer: ServerProtocol, msg: Drain, payload: bytes) -> None:
        log.info("node %s is leaving", peer.name)
        self.monitor.event(self.clock.seconds(), "node", f"node {peer.name} is leaving")
        self.feed(sch.NodeDraining(peer.peer_id))

    def _on_node_info(self, peer: ServerProtocol, msg: NodeInfo, payload: bytes) -> None:
        """What the node says of itself, for ``achilles status`` (the frame's check
        allows only a safe alphabet, so it is shown as it is)."""
        peer.info = {
            "version": msg.version,
            "python": msg.python,
            "host": msg.host,
            "launcher": msg.launcher,
            "pid": msg.pid,
        }

    def _on_node_stats(self, peer: ServerProtocol, msg: NodeStats, payload: bytes) -> None:
        self.monitor.node_stats(peer.peer_id, msg.cpu, msg.rss)

    def _on_failure(self, peer: ServerProtocol, msg: Failure, payload: bytes) -> None:
        """A node's text summary of a chunk that raised: kept for the dashboard, only
        for a live job (the frame's check bounds its size)."""
        job = self.scheduler.jobs.get(msg.job)
        if job is not None:
            self.monitor.failure(
                self.clock.seconds(),
                msg.kind,
                job.name,
                msg.seq,
                peer.name,
                payload.decode("utf-8", "replace"),
            )

    def _on_output(self, peer: ServerProtocol, msg: Output, payload: bytes) -> None:
        """What a chunk printed: forwarded, unopened, to its job's controller only, and
        only for a chunk this node holds; within the node's byte budget (OUTPUT_RATE,
        OUTPUT_BURST), past which it is dropped and counted in the next one forwarded
        (the first drop of a run is reported at once, as an empty Output)."""
        node = self.scheduler.nodes.get(peer.peer_id)
        job = self.scheduler.jobs.get(msg.job)
        if node is None or job is None or (msg.job, msg.seq) not in node.inflight:
            return  # a cancelled job's, or a chunk taken away: nobody wants it
        now = self.clock.seconds()
        # [bytes it may send now, when reckoned, bytes dropped not yet reported, dropping]
        budget = self._output_budget.setdefault(peer.peer_id, [OUTPUT_BURST, now, 0, 0])
        budget[0] = min(OUTPUT_BURST, budget[0] + (now - budget[1]) * OUTPUT_RATE)
        budget[1] = now
        if len(payload) > budget[0]:
            budget[2] += len(payload) + msg.dropped
            if not budget[3]:  # the first drop of a run: say so now
                budget[3] = 1
                self._send(job.owner, Output(job.name, msg.seq, peer.name, int(budget[2])))
                budget[2] = 0
            return
        budget[0] -= len(payload)
        dropped = msg.dropped + int(budget[2])
        budget[2] = budget[3] = 0
        self._send(job.owner, Output(job.name, msg.seq, peer.name, dropped), payload)

    def _on_kill(self, peer: ServerProtocol, msg: Kill, payload: bytes) -> None:
        nodes = [p for p in self.peers.values() if p.role == "node"]
        log.warning("kill requested by %s: stopping %d node(s)", peer.name, len(nodes))
        for node in nodes:
            node.send(Kill())
        peer.send(Killed(len(nodes)))

    def _on_status(self, peer: ServerProtocol, msg: StatusRequest, payload: bytes) -> None:
        snap = self.scheduler.snapshot()
        now = self.clock.seconds()
        for node in snap["nodes"]:
            proto = self.peers.get(node["id"])
            node["last_seen_age"] = round(now - proto.last_heard, 3) if proto else None
            node["address"] = proto.peer_desc if proto else None
            node.update(proto.info if proto else {})
        snap["controllers"] = sum(1 for p in self.peers.values() if p.role == "controller")
        for job in snap["jobs"]:
            owner = self.peers.get(job["owner"])
            job["owner"] = owner.name if owner else str(job["owner"])
        peer.send(Status(), json.dumps(snap).encode("utf-8"))

    def _on_heartbeat(self, peer: ServerProtocol, msg: Heartbeat, payload: bytes) -> None:
        pass

    def _on_error(self, peer: ServerProtocol, msg: ErrorFrame, payload: bytes) -> None:
        log.warning(
            "%s %s reported: %s %s", peer.role, peer.name, shown(msg.code), shown(msg.detail, 300)
        )


def listen(settings: Settings, reactor: Any = None) -> Any:
    """Start listening; return the listening port (``.getHost().port`` is the real port).

    One port speaks TLS (with the server's own certificate unless ``--tls-cert`` names
    one) and plain TCP, told apart by a connection's first byte (see
    :mod:`achilles.net.tls`).

    Raises:
        ConfigError: no secret (unless insecure on loopback), or TLS half-configured.
    """
    if reactor is None:
        from twisted.internet import reactor
    if settings.insecure and not settings.secret_key and not is_loopback(settings.host):
        raise ConfigError(
            "insecure mode (no secret) is only allowed on a loopback address, "
            f"not on {settings.host!r}"
        )
    if settings.insecure and not settings.secret_key:
        log.warning("INSECURE: no secret; any local process can use this server")
    elif settings.secret_key and auth.secret_bits(settings.secret_key) < auth.WEAK_SECRET_BITS:
        log.warning(
            "the secret is short or repetitive (about %d bits): anyone who can reach "
            "this port may guess it; `achilles secret` prints a strong one",
            auth.secret_bits(settings.secret_key),
        )
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError(
            "TLS needs both --tls-cert (ACHILLES_TLS_CERT) and --tls-key (ACHILLES_TLS_KEY)"
        )
    factory = ServerFactory(settings, clock=reactor)
    limit = raise_descriptor_limit(settings.max_connections)
    if limit < settings.max_connections:
        log.warning(
            "this process may open only %d files: serving at most %d connections, "
            "not %d (raise `ulimit -n`)",
            limit + RESERVED_FDS,
            limit,
            settings.max_connections,
        )
        factory.settings = replace(settings, max_connections=limit)
    unified = tls.UnifiedFactory(
        factory,
        tls.ServerTLS(settings, user_config_dir()),
        settings.tls == "off",
        reactor,
        settings.handshake_timeout,
        factory.settings.max_connections,
    )
    if settings.tls == "on":
        unified.allow_plain_loopback = False
    return reactor.listenTCP(settings.port, unified, backlog=BACKLOG, interface=settings.host)


#: descriptors kept for everything but connections (log files, the pool's pipes, ...)
RESERVED_FDS = 64
#: pending connections the kernel queues for us (a burst of nodes reconnecting at once)
BACKLOG = 1024


def raise_descriptor_limit(wanted: int) -> int:
    """Raise the soft limit on open files to the hard one; return how many connections
    fit in it (before this, a soft 1024 ran out before the 1024-connection cap and the
    peers past it got a silent EOF)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + RESERVED_FDS)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(1, min(wanted, soft - RESERVED_FDS))
