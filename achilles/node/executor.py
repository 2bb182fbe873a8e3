"""A node's executor: runs chunks on a persistent process pool and watches its workers.

The pool is a ``multiprocess.Pool`` from a ``forkserver`` context: its workers are
forked from a clean server process, never from this one, so they do not inherit the
reactor's signal handlers (the original achilles forked inside the reactor and its
nodes hung in ``join()``).

``multiprocess.Pool`` (like CPython's) hangs when a worker dies: the task is lost, and a
worker killed while holding a queue lock blocks the others. So the node watches its
workers (the loky way): each worker reports ``(pid, job, seq)`` before running a chunk;
when a worker's exit code appears, or a chunk passes its time limit, or a running job
is cancelled, the node kills that whole pool generation and starts a fresh one. The
chunk the dead worker was running is reported as crashed (the server counts attempts);
the other running chunks are resubmitted locally.

A worker that retires (a pool's ``maxtasksperchild``, see :mod:`achilles.node.worker`) is
no crash: it exits with code 0 between chunks, after freeing its slot. The pool's own
worker handler reaps it and starts a replacement, which the node then watches too.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import multiprocess.pool as mp_pool
from twisted.internet import task

from achilles.core.pace import Pace
from achilles.node import worker as _worker
from achilles.node.pipe import PipeReader, PipeWriter
from achilles.protocol.messages import CRASHED, OK, TIMEOUT

log = logging.getLogger("achilles.node")

WATCH_INTERVAL = 0.1
#: job code bundles larger than this reach the workers through a file (see function)
SPOOL_ABOVE = 4 * 1024


def _signal_name(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"signal {-code} {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@dataclass(eq=False)
class Item:
    job: str
    seq: int
    payload: bytes
    timeout: float
    gen: "Generation | None" = None
    cancelled: bool = False
    reruns: int = 0  # times it was running when its pool was replaced, unblamed


#: an unblamed chunk that keeps being caught in pool restarts is reported as crashed after
#: this many local reruns, so the server's attempt count bounds it (never forever)
MAX_LOCAL_RERUNS = 2


class _NoNotifier:
    def put(self, obj: Any) -> None:
        pass


class _Pool(mp_pool.Pool):
    """``multiprocess.Pool`` for its workers and their upkeep, with its pipes driven
    by the node's reactor (see :mod:`achilles.node.pipe`) instead of its helper threads.

    * The pipes pickle with the C pickler (see :class:`_worker.PickleQueue`).
    * The result-handler thread exits at once (its ``get`` returns the sentinel): the
      reactor reads the result pipe. The task handler is never given a task: the
      reactor writes the task pipe. Neither writes to a pipe on teardown (``put`` is a
      no-op on this side), so a full pipe cannot hang a teardown.
    * The worker handler waits on worker exits and its change notifier only: the
      stock one also woke (and spun, holding the GIL) while a result sat in the pipe,
      9-15 ms of CPU per one-item chunk when it was measured.
    * Every worker it starts, the first ones and the replacements of retired ones, is
      also put in ``started``, for the node to watch: the handler reaps an exited
      worker from ``_pool`` at once, sooner than the node's watch would see it there.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        started: deque[Any] = deque()  # appended by the worker handler thread
        self.started = started

        def process(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            worker = ctx.Process(*args, **kwargs)
            started.append(worker)
            return worker

        # Shadows the stock staticmethod, called the same way (the handler thread keeps
        # it: a closure, so that it does not keep the pool object alive)
        self.Process = process  # type: ignore[method-assign]
        super().__init__(*args, **kwargs)
        # The task cache wakes the worker handler each time it empties; ours is unused.
        self._cache.notifier = _NoNotifier()

    def _get_sentinels(self) -> list[Any]:
        return [self._change_notifier._reader]

    def _setup_queues(self) -> None:
        self._inqueue = _worker.PickleQueue(self._ctx)
        self._outqueue = _worker.PickleQueue(self._ctx)
        self._outqueue.parent_side = True  # not pickled: the workers' copies still put
        self._quick_put = lambda obj: None
        self._quick_get = lambda: None

    @staticmethod
    def _help_stuff_finish(inqueue: Any, task_handler: Any, size: int) -> None:
        """The stock one reads leftover tasks from the task pipe, which here may end in
        half a message (and block it forever); the workers are killed anyway."""


class Generation:
    """One incarnation of the pool: its workers, the slot table they write to, and
    the reactor's ends of its task and result pipes.

    Each worker of this generation owns a slot: its pid, and while it runs a chunk, the
    chunk's job number, sequence number and start time (a monotonic clock shared by
    every process). Shared memory, not messages: it costs no thread, pipe or reactor
    wake-up per chunk, and it is still readable after the worker died. A worker retired
    by ``maxtasksperchild`` frees its slot for the replacement the pool starts.
    """

    def __init__(self, ctx: Any, processes: int, name: str, reactor: Any,
                 on_results: Callable[["Generation", list[bytes]], None]) -> None:
        self.ctx = ctx
        self.slots = _worker.SlotTable.create(ctx, processes)
        self.pool = _Pool(processes, initializer=_worker.init,
                          initargs=(self.slots, name, os.getpid()), context=ctx)
        self.procs: list[Any] = []  # its workers, but for retired ones (see dead)
        self._adopt()
        self.tasks = PipeWriter(reactor, self.pool._inqueue._writer.fileno())
        self.results = PipeReader(reactor, self.pool._outqueue._reader.fileno(),
                                  partial(on_results, self))
        self.keys: dict[int, tuple[str, int]] = {}  # task number -> (job, seq)
        self._numbers = itertools.count(1)

    def send(self, key: tuple[str, int], args: tuple[Any, ...]) -> None:
        """Give the workers one chunk, as the task that multiprocess's worker loop reads:
        (job, index, function, args, kwargs), with our task number as its job."""
        number = next(self._numbers)
        self.keys[number] = key
        self.tasks.send(_worker.dumps_message((number, 0, _worker.run_chunk, args, {})))

    def _adopt(self) -> None:
        """Watch the workers the pool started since the last look."""
        started = self.pool.started
        while started:
            self.procs.append(started.popleft())

    def dead(self) -> list[Any]:
        """The workers that died, retired ones excepted: a worker that exited with code 0
        after freeing its slot (which it does only between chunks, to retire) is no
        longer watched, and the replacement the pool started for it is. Once per watch,
        not per chunk; no system call."""
        self._adopt()
        dead, keep, pids = [], [], None
        for p in self.procs:
            # returncode is set by the pool's own handler thread when it reaps a worker;
            # reading it here (not calling poll) avoids racing that thread for the
            # sentinel.
            code = p._popen.returncode if p._popen is not None else None
            if code == 0:
                if pids is None:
                    pids = set(self.slots.pids)
                if p.pid not in pids:
                    continue  # retired
            if code is not None:
                dead.append(p)
            keep.append(p)
        self.procs = keep
        return dead

    def running(self) -> list[tuple[int, int, int, float]]:
        """(pid, job number, seq, start) of every worker running a chunk now."""
        return self.slots.busy()

    def kill(self) -> None:
        """SIGKILL every worker, stop using its pipes, free the locks a dead worker may
        hold, tear down."""
        self.tasks.stop()
        self.results.stop()
        self.kill_workers()
        # A worker killed inside get()/put() keeps a queue lock forever; the parent's
        # copies of those locks are replaced so the pool can still be torn down.
        self.pool._inqueue._rlock = self.ctx.Lock()
        self.pool._outqueue._wlock = self.ctx.Lock()
        threading.Thread(target=self._terminate, daemon=True,
                         name="achilles-pool-teardown").start()

    def kill_workers(self) -> None:
        """SIGKILL every worker, and have the pool start no replacement: signals and
        attribute writes only, so any thread may call it."""
        self.pool._worker_handler._state = mp_pool.TERMINATE
        for p in set(self.procs) | set(self.pool._pool):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass

    def _terminate(self) -> None:
        try:
            self.pool.terminate()
        except Exception:  # a broken pool must not take the node down
            log.debug("pool teardown failed", exc_info=True)


class Executor:
    """Runs chunks on the pool; calls ``on_result(job, seq, status, payload, elapsed)``."""

    #: set from another thread when the workers were killed on the way out (an embedded
    #: cluster whose pool was collected): no new pool generation is started
    abandoned = False

    def kill_workers(self) -> None:
        """SIGKILL the workers, from any thread, taking no lock and waiting for nothing
        (a finaliser and the exit handler call it); no worker or pool replaces them.
        ``close`` must still follow, in the reactor thread, to release the rest."""
        self.abandoned = True
        self.gen.kill_workers()

    def __init__(self, processes: int, on_result: Callable[..., None], reactor: Any,
                 name: str, on_flush: Callable[[], None] = lambda: None) -> None:
        self.processes = processes
        self.on_result = on_result
        self.on_flush = on_flush  # after a burst of on_result calls: send them on
        self.reactor = reactor
        self.name = name
        self.ctx = _worker.context()
        # a job's code: bytes, or for a large bundle the path of its spooled copy
        self.bundles: dict[str, bytes | str] = {}
        self._spool = ""  # a private directory, made when first needed
        self.job_numbers: dict[str, int] = {}  # the slot table holds numbers, not ids
        self._next_number = itertools.count(1)
        self.waiting: deque[Item] = deque()
        self.running: dict[tuple[str, int], Item] = {}
        self.done = 0
        self.pace = Pace()  # how many chunks per worker to keep in the pool
        self.closed = False
        self.gen = self._generation()
        self._watcher = task.LoopingCall(self._watch)
        self._watcher.clock = reactor
        self._watcher.start(WATCH_INTERVAL, now=False)

    def _generation(self) -> Generation:
        return Generation(self.ctx, self.processes, self.name, self.reactor,
                          self._results)

    # -- work in -----------------------------------------------------------------------
    def function(self, job: str, bundle: bytes) -> None:
        """A job's code. Every task carries it to the workers (any worker may take any
        task; each loads it once), so all but a small one go in a file the workers read
        instead: a ``__main__`` whose functions refer to big globals made a 10 MB bundle
        that was copied through the pipe with every chunk, and even a few kilobytes
        (shipped module sources) cost a pickling and a copy per chunk."""
        if job not in self.job_numbers:
            self.job_numbers[job] = next(self._next_number)
        self._unspool(job)
        self.bundles[job] = self._spooled(job, bundle) if len(bundle) > SPOOL_ABOVE \
            else bundle

    def _spooled(self, job: str, bundle: bytes) -> str:
        if not self._spool:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._spool = tempfile.mkdtemp(prefix="achilles-node-", dir=shm)
        path = os.path.join(self._spool, f"job-{self.job_numbers[job]}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bundle)
        return path

    def _unspool(self, job: str) -> None:
        path = self.bundles.pop(job, None)
        if isinstance(path, str):
            try:
                os.unlink(path)
            except OSError:
                pass

    def submit(self, job: str, seq: int, payload: bytes, timeout: float) -> None:
        self.waiting.append(Item(job, seq, payload, timeout))
        self._fill()

    def _fill(self) -> None:
        # Two chunks per worker inside the pool (more while chunks are very short, as
        # the server does): a worker that finishes picks up the next at once instead of
        # idling while its result travels through the reactor, and results that finish
        # together leave together. A chunk not yet started is never blamed (its slot is
        # not busy) when a pool dies.
        while self.waiting and len(self.running) < self.pace.depth * self.processes:
            item = self.waiting.popleft()
            bundle = self.bundles.get(item.job)
            if bundle is None:
                continue  # job cancelled meanwhile
            item.gen = self.gen
            key = (item.job, item.seq)
            self.running[key] = item
            self.gen.send(key, (self.job_numbers[item.job], item.job, item.seq, bundle,
                                item.payload))

    # -- results, read from the pool's result pipe by the reactor ----------------------
    def _results(self, gen: Generation, messages: list[bytes]) -> None:
        """Everything one read of the result pipe brought; then the freed room is
        filled and the results are sent on."""
        self._take(gen, messages)
        self._fill()
        self.on_flush()

    def _take(self, gen: Generation, messages: list[bytes]) -> None:
        """(task number, index, (ok, value)) per chunk, as multiprocess's worker loop
        writes it."""
        for data in messages:
            message = pickle.loads(data)
            if message is None:  # a sentinel of the pool's own teardown
                continue
            number, _, (ok, value) = message
            key = gen.keys.pop(number, None)
            if key is None:
                continue
            if not ok:  # the pool machinery failed, not the task (run_chunk never raises)
                value = (CRASHED, f"pool error on node {self.name}: {value!r}".encode(),
                         0.0)
            self._done(gen, key, value)

    def _done(self, gen: Generation, key: tuple[str, int], result: Any) -> None:
        item = self.running.get(key)
        if item is None or item.gen is not gen:
            return  # from a torn-down generation: its chunk was rerun or reported
        del self.running[key]
        if not item.cancelled:
            status, payload, elapsed = result
            self.done += 1
            if status == OK:
                self.pace.observe(elapsed)
            self.on_result(item.job, item.seq, status, payload, elapsed)

    # -- watching ----------------------------------------------------------------------
    def _watch(self) -> None:
        gen = self.gen
        dead = {p.pid: _signal_name(p._popen.returncode) for p in gen.dead()}
        numbers = {n: job for job, n in self.job_numbers.items()}
        now = time.monotonic()
        blamed: dict[tuple[str, int], bytes] = {}
        status: dict[tuple[str, int], str] = {}
        for pid, number, seq, started in gen.running():
            key = (numbers.get(number, ""), seq)
            item = self.running.get(key)
            if item is None:
                continue
            if pid in dead:
                status[key] = CRASHED
                blamed[key] = (f"worker pid {pid} died ({dead[pid]}) running chunk {seq} "
                               f"of job {item.job} on node {self.name}").encode()
            elif item.timeout > 0 and now - started > item.timeout:
                dead[pid] = "time limit"
                status[key] = TIMEOUT
                blamed[key] = (f"chunk {seq} of job {item.job} ran past its time limit "
                               f"of {item.timeout:g} s on node {self.name}; its worker "
                               f"was killed").encode()
        if dead:
            log.warning("node %s: %s; restarting its pool", self.name, ", ".join(
                f"worker {pid} {why}" for pid, why in dead.items()))
            self._rebuild(blamed, status)

    def _rebuild(self, blamed: dict[tuple[str, int], bytes] | None = None,
                 status: dict[tuple[str, int], str] | None = None) -> None:
        """Kill this pool generation and start another. The chunk a dead worker was
        running is reported (the server counts its attempts); the others run again."""
        if self.closed or self.abandoned:
            return
        old = self.gen
        # results its workers wrote before it went are not lost (and no new chunk is
        # given to a pool about to be killed)
        self._take(old, old.results.read_available()[0])
        old.kill()
        self.gen = self._generation()
        blamed, status = blamed or {}, status or {}
        for key, item in list(self.running.items()):
            if item.gen is not old:
                continue
            del self.running[key]
            if item.cancelled:
                continue
            if key in blamed:
                self.on_result(item.job, item.seq, status[key], blamed[key], 0.0)
            elif item.reruns >= MAX_LOCAL_RERUNS:
                self.on_result(item.job, item.seq, CRASHED, (
                    f"chunk {item.seq} of job {item.job} was running on node {self.name} "
                    f"when its pool had to be restarted, {item.reruns + 1} times").encode(),
                    0.0)
            else:
                item.reruns += 1
                self.waiting.appendleft(item)
        self._fill()
        self.on_flush()

    def cancel(self, job: str) -> None:
        """Drop a job: its waiting chunks, its running ones (their workers are killed)."""
        self._unspool(job)
        self.job_numbers.pop(job, None)
        self.waiting = deque(i for i in self.waiting if i.job != job)
        hit = False
        for item in self.running.values():
            if item.job == job:
                item.cancelled = hit = True
        if hit:
            self._rebuild()

    def cancel_all(self) -> None:
        for job in list(self.bundles):
            self._unspool(job)
        self.job_numbers.clear()
        self.waiting.clear()
        if self.running:
            for item in self.running.values():
                item.cancelled = True
            self._rebuild()

    def close(self) -> None:
        """Kill the workers; no new pool is started after this."""
        if self.closed:
            return
        self.closed = True
        if self._watcher.running:
            self._watcher.stop()
        self.gen.kill()
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)
