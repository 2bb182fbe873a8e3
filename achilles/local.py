"""The embedded local cluster: what ``Pool()`` runs when no cluster is configured.

A server on 127.0.0.1 (port 0, a random secret) and a node with ``processes`` workers,
both run by this process's achilles reactor thread, the one its controller already
uses. The workers are still separate processes, forked from a fork server (never from
this process, so they inherit neither its threads nor its signal handlers); they ignore
SIGINT, so a Ctrl-C meant for the caller does not kill them mid-job.

In-process rather than a child process running the server and the node, because:

* start-up: a child interpreter spent about 1 s importing Twisted and achilles again
  before it could listen (S was 1.1-1.6 s; the target is 1.5 s);
* latency: every hop between processes is a wake-up, about 100 us on these machines,
  and the child put two more on each chunk's path (controller to server and back).

Nothing is left behind when the caller dies: the fork server exits when this process
does, and a worker exits when its task pipe's writer (this process) is gone.
"""

from __future__ import annotations

import atexit
import os
import secrets
import sys
import weakref
from typing import Any

from achilles.config import Settings
from achilles.errors import AchillesError
from achilles.net import reactor as _reactor

START_TIMEOUT = 30.0
_live: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


class LocalCluster:
    def __init__(self, processes: int, max_attempts: int = 3) -> None:
        from achilles.node import worker as _worker

        self.secret = secrets.token_hex(16)
        self.processes = processes
        self._node: Any = None
        self._listener: Any = None
        self._factory: Any = None
        _worker.context()  # the fork server: the slow part, here and not in the reactor
        try:
            self.port = _reactor.call_blocking(
                self._start, _reactor.ensure_started(), timeout=START_TIMEOUT
            )
        except Exception as exc:
            self.stop()
            raise AchillesError(f"the embedded achilles cluster did not start: {exc}") from exc
        _live.add(self)
        self.settings = Settings(
            host="127.0.0.1",
            port=self.port,
            secret_key=self.secret,
            processes=processes,
            max_attempts=max_attempts,
        )

    def _start(self, reactor: Any) -> int:
        """In the reactor thread: listen, then start the node, which connects to it."""
        from achilles import node, server
        from achilles.net import memlink as _memlink

        settings = Settings(
            host="127.0.0.1", port=0, secret_key=self.secret, processes=self.processes
        )
        self._listener = server.listen(settings, reactor)
        self._factory = self._listener.factory
        port: int = self._listener.getHost().port
        _memlink.register("127.0.0.1", port, self._factory)  # our node and controllers
        self._node = node.Node(
            Settings(host="127.0.0.1", port=port, secret_key=self.secret, processes=self.processes),
            reactor,
        )
        self._node.start()
        return port

    def worker_pids(self) -> list[int]:
        """The node's worker processes (of its current pool)."""
        node = self._node
        if node is None or node.executor.closed:
            return []
        return [p.pid for p in node.executor.gen.procs if p.pid]

    def pids(self) -> list[int]:
        """The processes doing the work: the fork server and the node's workers."""
        from achilles.compat import multiprocess as compat

        server = compat.forkserver_pid()
        return ([server] if server else []) + self.worker_pids()

    def _stop(self) -> None:
        """In the reactor thread: kill the workers, stop listening, drop the peers."""
        from achilles.net import memlink as _memlink

        if self._node is not None:
            self._node.stop()
        if self._listener is not None:
            _memlink.unregister("127.0.0.1", self._listener.getHost().port)
            self._listener.stopListening()
        if self._factory is not None:
            for peer in list(self._factory.peers.values()):
                peer.transport.abortConnection()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the node (its workers are killed, by PID) and the server."""
        _live.discard(self)
        try:
            if _reactor.in_reactor_thread():
                self._stop()
            else:
                _reactor.call_blocking(self._stop, timeout=timeout)
        except Exception:  # the reactor is gone (interpreter exit): kill what is left
            self.kill_workers()
        self._node = self._listener = self._factory = None

    def kill_workers(self) -> None:
        """SIGKILL the node's workers, by PID, from any thread: no lock, no wait (a
        finaliser and the exit handler use it). The node starts no new pool after it;
        ``stop`` still has to be called to close the rest."""
        node = self._node
        if node is not None:
            node.executor.kill_workers()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_live):
        cluster.kill_workers()


#: a forked child's copies of its parent's clusters: kept, never used or collected
_orphans: list[Any] = []


def _after_fork_in_child() -> None:
    """A forked child starts with no embedded cluster and no fork server of its own:
    its parent's are not its to use or stop (the fork server's pid is not its child,
    and at exit it must not kill its parent's workers)."""
    global _live
    _orphans.extend(_live)
    _live = weakref.WeakSet()
    from achilles.net import memlink as _memlink

    _memlink._servers.clear()
    if "multiprocess.forkserver" in sys.modules:  # (then compat is loaded too, as a rule)
        from achilles.compat import multiprocess as compat

        compat.forget_forkserver()


os.register_at_fork(after_in_child=_after_fork_in_child)
