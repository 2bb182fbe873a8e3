"""A node's executor: runs chunks on a persistent process pool and watches its workers.

What to run, when, and what a death or a time limit means is decided by the node's
sans-IO core, :class:`achilles.core.node_work.NodeWork`; this shell feeds it events (the
server's chunks and cancellations, the pool's results, its workers' exits, a periodic
tick) and carries out its instructions (the pipes, the spooled code, killing and
starting pool generations).

The pool is a ``multiprocess.Pool`` from a ``forkserver`` context: its workers are
forked from a clean server process, never from this one, so they do not inherit the
reactor's signal handlers (the original achilles forked inside the reactor and its
nodes hung in ``join()``).

``multiprocess.Pool`` (like CPython's) hangs when a worker dies: the task is lost, and a
worker killed while holding a queue lock blocks the others. So the node watches its
workers (the loky way): each worker names the chunk it runs in a shared slot table;
the reactor reads each worker's sentinel, and looks at the slot table every
WATCH_INTERVAL for chunks past their time limit (and for workers the pool started
meanwhile). When a worker exits, or a chunk passes its time limit, or a running job is
cancelled, the node kills that whole pool generation and starts a fresh one. The chunk
the dead worker was running is reported as crashed (the server counts attempts); the
other running chunks are resubmitted locally.

A worker that retires (a pool's ``maxtasksperchild``, see :mod:`achilles.node.worker`) is
no crash: it exits with code 0 between chunks, after freeing its slot. The pool's own
worker handler reaps it and starts a replacement, which the node then watches too.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import task

from achilles.core.node_work import (
    AllCancelled,
    ChunksArrived,
    Closing,
    DropFunction,
    Event,
    Flush,
    FunctionArrived,
    Instruction,
    Item,
    JobCancelled,
    NodeWork,
    PoolRestarted,
    Report,
    RestartPool,
    ResultsRead,
    SendToPool,
    Shutdown,
    StoreFunction,
    Tick,
    WorkersDied,
)
from achilles.node import worker as _worker
from achilles.node.generation import Generation

log = logging.getLogger("achilles.node")

#: how often the current pool's time limits and new workers are looked at (seconds)
WATCH_INTERVAL = 0.1


class Executor:
    """Runs chunks on the pool; calls ``on_result(job, seq, status, payload, elapsed)``
    for each outcome, then ``on_flush()`` after each burst of them, and
    ``on_output(job, seq, payload)`` for what a chunk printed, before its outcome."""

    #: set from another thread when the workers were killed on the way out (an embedded
    #: cluster whose pool was collected): no new pool generation is started
    abandoned = False

    def __init__(
        self,
        processes: int,
        on_result: Callable[..., None],
        reactor: Any,
        name: str,
        on_flush: Callable[[], None] = lambda: None,
        on_output: Callable[[str, int, bytes], None] = lambda job, seq, output: None,
    ) -> None:
        self.processes = processes
        self.on_result = on_result
        self.on_output = on_output  # (job, seq, payload): what a chunk printed
        self.on_flush = on_flush  # after a burst of on_result calls: send them on
        self.reactor = reactor
        self.name = name
        self.ctx = _worker.context()
        self.work = NodeWork(processes, name)
        # a job's code: bytes, or for a large bundle the path of its spooled copy
        self.bundles: dict[str, bytes | str] = {}
        self._spool = ""  # a private directory, made when first needed
        self.gen = self._generation(self.work.generation)
        self._watcher = task.LoopingCall(self._watch)
        self._watcher.clock = reactor
        self._watcher.start(WATCH_INTERVAL, now=False)

    def _generation(self, number: int) -> Generation:
        return Generation(
            number, self.ctx, self.processes, self.name, self.reactor, self._results, self._exited
        )

    # -- the core's state, read by the node ------------------------------------------
    @property
    def waiting(self) -> deque[Item]:
        return self.work.waiting

    @property
    def running(self) -> dict[tuple[str, int], Item]:
        return self.work.running

    @property
    def done(self) -> int:
        return self.work.done

    @property
    def closed(self) -> bool:
        return self.work.closed

    # -- events in ---------------------------------------------------------------------
    def function(self, job: str, bundle: bytes) -> None:
        """A job's code, from the server."""
        self._handle(FunctionArrived(job, bundle))

    def submit(self, job: str, seq: int, payload: bytes, timeout: float) -> None:
        """One chunk, from the server."""
        self._handle(ChunksArrived(job, (seq,), (payload,), timeout))

    def submit_many(
        self, job: str, seqs: Sequence[int], payloads: Sequence[bytes], timeout: float
    ) -> None:
        """Several chunks of one job (a batch frame), from the server."""
        self._handle(ChunksArrived(job, seqs, payloads, timeout))

    def cancel(self, job: str) -> None:
        """Drop a job: its waiting chunks, its running ones (their workers are killed)."""
        self._handle(JobCancelled(job))

    def cancel_all(self) -> None:
        """Drop every job (the server connection was lost)."""
        self._handle(AllCancelled())

    def close(self) -> None:
        """Kill the workers; no new pool is started after this."""
        self._handle(Closing())

    def kill_workers(self) -> None:
        """SIGKILL the workers, from any thread, taking no lock and waiting for nothing
        (a finaliser and the exit handler call it); no worker or pool replaces them.
        ``close`` must still follow, in the reactor thread, to release the rest."""
        self.abandoned = True
        self.gen.kill_workers()

    def _results(self, gen: Generation, messages: list[bytes]) -> None:
        """Everything one read of a pool's result pipe brought."""
        self._handle(ResultsRead(gen.number, self._outputs(gen.outcomes(messages))))

    def _outputs(self, outcomes: list[Any]) -> list[Any]:
        """Send on what chunks printed (a fifth element of their outcome, see
        ``worker.run_chunk``) before their results, and return the bare outcomes."""
        if all(len(o) == 5 for o in outcomes):
            return outcomes
        bare = []
        for o in outcomes:
            if len(o) > 5:
                self.on_output(o[0], o[1], o[5])
                o = o[:5]
            bare.append(o)
        return bare

    def _exited(self, gen: Generation) -> None:
        """A worker's sentinel says it exited: look now, not at the next tick."""
        if gen is self.gen and not self.closed:
            self._watch()

    def _watch(self) -> None:
        """A look at the workers (periodic, or a sentinel's): exits, then the busy slots
        (time limits)."""
        gen = self.gen
        exits = gen.exits()
        if exits:
            self._handle(
                WorkersDied(gen.number, time.monotonic(), exits, gen.slot_pids(), gen.running())
            )
        else:
            self._handle(Tick(time.monotonic(), gen.running()))

    # -- instructions out --------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        self._execute(self.work.handle(event))

    def _execute(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, SendToPool):  # the per-chunk ones first
                self.gen.send(
                    (ins.job, ins.seq),
                    (ins.number, ins.job, ins.seq, self.bundles[ins.job], ins.payload),
                )
            elif isinstance(ins, Report):
                self.on_result(ins.job, ins.seq, ins.status, ins.payload, ins.elapsed)
            elif isinstance(ins, Flush):
                self.on_flush()
            else:
                _EXECUTE[type(ins)](self, ins)

    def _store(self, ins: StoreFunction) -> None:
        """Every task carries its job's code to the workers (any worker may take any
        task; each loads it once), so all but a small one go in a file the workers read
        instead: a ``__main__`` whose functions refer to big globals made a 10 MB bundle
        that was copied through the pipe with every chunk, and even a few kilobytes
        (shipped module sources) cost a pickling and a copy per chunk."""
        self.bundles[ins.job] = self._spooled(ins.number, ins.bundle) if ins.spool else ins.bundle

    def _spooled(self, number: int, bundle: bytes) -> str:
        if not self._spool:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._spool = tempfile.mkdtemp(prefix="achilles-node-", dir=shm)
        path = os.path.join(self._spool, f"job-{number}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bundle)
        return path

    def _drop(self, ins: DropFunction) -> None:
        path = self.bundles.pop(ins.job, None)
        if isinstance(path, str):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _restart(self, ins: RestartPool) -> None:
        """Kill this pool generation and start another; the core then says what becomes
        of the chunks that were running in it."""
        if ins.reason:
            log.warning("node %s: %s; restarting its pool", self.name, ins.reason)
        if self.abandoned:
            return  # the workers were killed on the way out; close() follows
        old = self.gen
        # results its workers wrote before it went are not lost
        outcomes = self._outputs(old.outcomes(old.results.read_available()[0]))
        old.kill()
        self.gen = self._generation(ins.generation)
        self._handle(PoolRestarted(old.number, outcomes))

    def _shutdown(self, ins: Shutdown) -> None:
        if self._watcher.running:
            self._watcher.stop()
        self.gen.kill()
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)


_EXECUTE: dict[type, Callable[[Executor, Any], None]] = {
    StoreFunction: Executor._store,
    DropFunction: Executor._drop,
    RestartPool: Executor._restart,
    Shutdown: Executor._shutdown,
}
