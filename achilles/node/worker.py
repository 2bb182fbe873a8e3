"""What runs inside a node's pool worker processes.

The node hands each worker a chunk as **bytes** (multiprocess's own pickler is dill's
pure-Python one, so we keep it away from user data); the worker loads the job's code
(once per job, cached), unpickles the arguments, runs them, and returns result bytes
that go back to the server unopened. While it runs a chunk, its slot in a shared
:class:`SlotTable` names the chunk, so the node knows which chunk died with a worker,
or which worker to kill on a timeout.

A pool's ``maxtasksperchild`` (its bundle's ``maxtasks``) is honoured here: a worker
counts the chunks (tasks) it ran per pool, and once one pool's count reaches that
pool's limit, the worker retires after that chunk's result is sent. It reads no further
task (its next ``get`` returns the worker loop's sentinel, so no task is lost), frees its
slot and exits with code 0; the pool's worker handler starts a fresh worker, which
claims the freed slot, and the node tells this retirement from a crash by the freed slot.

A job of a pool that forwards task output (its pool id ends with :data:`OUTPUT_TAG`)
runs its chunks with ``sys.stdout`` and ``sys.stderr`` (where ``warnings`` write) swapped
for an in-memory capture, kept to :data:`OUTPUT_CHARS` characters a chunk; what a chunk
printed goes back with its result as a fourth element (:func:`run_chunk`), and nothing
at all when it printed nothing, so a silent task costs two attribute swaps.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any

from achilles.errors import ResultEncodingError, SerializationError
from achilles.protocol.messages import ERROR, OK, OUTPUT_TAG
from achilles.serialization import (
    dumps_chunk,
    dumps_exception,
    loads_chunk,
    loads_function,
)

_slots: SlotTable | None = None
_slot = -1
_node_name = "?"
_jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
_MAX_JOBS = 16
_initialized: set[str] = set()  # pools whose initializer ran in this worker
_tasks: dict[str, int] = {}  # chunks run here, per pool that has a maxtasksperchild
_retiring = False  # a pool's maxtasksperchild was reached: take no further task

#: most characters of one chunk's output that are kept (the rest is counted, dropped)
OUTPUT_CHARS = 32 * 1024


class _Capture:
    """A text stream that keeps what a task writes, in order, up to OUTPUT_CHARS a
    chunk; both of a worker's captures share one list (so stdout and stderr keep their
    interleaving) and one budget."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, stream: str) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        global _out_size, _out_dropped
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        n = len(text)
        room = OUTPUT_CHARS - _out_size
        if n > room:
            _out_dropped += n - max(room, 0)
            text = text[: max(room, 0)]
        if text:
            _out.append((self.stream, text))
            _out_size += len(text)
        return n

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


_out: list[tuple[str, str]] = []
_out_size = 0
_out_dropped = 0
_captures = (_Capture("out"), _Capture("err"))


def _take_output() -> bytes | None:
    """What the chunk just run printed, as an Output frame's payload (consecutive pieces
    of one stream joined), or None if nothing; the capture is emptied."""
    global _out_size, _out_dropped
    if not _out and not _out_dropped:
        return None
    pieces: list[list[Any]] = []
    for stream, text in _out:
        if pieces and pieces[-1][0] == stream:
            pieces[-1][1] += text
        else:
            pieces.append([stream, text])
    if _out_dropped:
        pieces.append(["cut", _out_dropped])
    _out.clear()
    _out_size = _out_dropped = 0
    return json.dumps(pieces).encode("utf-8")


class SlotTable:
    """Shared memory a node and its pool workers use to say who runs what.

    Each live worker of a pool generation owns one slot: its pid, and while it runs a
    chunk, the job's number (0: idle), the sequence number and the start time
    (``time.monotonic``, the same clock in every process of the machine). A worker that
    retires (``maxtasksperchild``) frees its slot (pid 0) for its replacement; a worker
    that dies any other way keeps it, so its pid still names what it was running.
    """

    def __init__(self, index: Any, pids: Any, jobs: Any, seqs: Any, starts: Any) -> None:
        self.index, self.pids, self.jobs, self.seqs, self.starts = index, pids, jobs, seqs, starts

    @classmethod
    def create(cls, ctx: Any, n: int) -> SlotTable:
        # of ``index`` only the lock is used now (it guards claims and releases)
        return cls(
            ctx.Value("i", 0),
            ctx.Array("q", n, lock=False),
            ctx.Array("q", n, lock=False),
            ctx.Array("q", n, lock=False),
            ctx.Array("d", n, lock=False),
        )

    def claim(self) -> int:
        """A new worker takes a free slot (-1 if none is: a replacement for a worker that
        died without freeing its own, in a generation the node is about to replace)."""
        pid = os.getpid()
        with self.index.get_lock():
            for i in range(len(self.pids)):
                if not self.pids[i]:
                    self.pids[i] = pid
                    return i
        return -1

    def release(self, i: int) -> None:
        """A retiring worker frees its slot ``i`` (it is not running a chunk)."""
        with self.index.get_lock():
            self.jobs[i] = 0
            self.pids[i] = 0

    def busy(self) -> list[tuple[int, int, int, float]]:
        return [
            (self.pids[i], self.jobs[i], self.seqs[i], self.starts[i])
            for i in range(len(self.pids))
            if self.jobs[i]
        ]

    def __reduce__(self) -> tuple[Any, ...]:
        return (SlotTable, (self.index, self.pids, self.jobs, self.seqs, self.starts))


class PickleQueue:
    """The pool's task and result pipes, with the C pickler instead of dill's.

    ``multiprocess``'s queues pickle every message with dill's pure-Python pickler:
    85 us for a task tuple and 39 us for a result here, against 3 us with the C
    pickler. What crosses these pipes is ours (``run_chunk``, ints, bytes, an
    exception from the pool itself), so the C pickler takes it; dill stays as the
    fallback, and ``pickle.loads`` reads what either wrote.
    """

    #: set on the node's own copy: the node reads this queue in its reactor, and the
    #: pool's teardown must not write into it (a full pipe would hang the teardown)
    parent_side = False

    def __init__(self, ctx: Any) -> None:
        from multiprocess import connection

        self._reader, self._writer = connection.Pipe(duplex=False)
        self._rlock = ctx.Lock()
        self._wlock = ctx.Lock()
        self._poll = self._reader.poll

    def __getstate__(self) -> tuple[Any, ...]:
        return (self._reader, self._writer, self._rlock, self._wlock)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._reader, self._writer, self._rlock, self._wlock = state
        self._poll = self._reader.poll

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    def empty(self) -> bool:
        return not self._poll()

    def get(self) -> Any:
        if _retiring:  # in a worker that has run its pool's maxtasksperchild: read no
            _retire()  # further task, free the slot; None stops the worker loop
            return None
        with self._rlock:
            data = self._reader.recv_bytes()
        return pickle.loads(data)

    def put(self, obj: Any) -> None:
        if self.parent_side:
            return
        data = dumps_message(obj)
        with self._wlock:
            self._writer.send_bytes(data)


def dumps_message(obj: Any) -> bytes:
    """A pool message with the C pickler, or dill's for what it refuses."""
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        from multiprocess.reduction import ForkingPickler

        return bytes(ForkingPickler.dumps(obj))


_context: Any = None

#: what a new process is told about the parent's ``__main__`` (it would run it again)
_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")


def context() -> Any:
    """The forkserver context a node's pools come from. Call it early: starting the fork
    server (a fresh interpreter that preloads this module) then overlaps with the rest
    of the node's start-up. Its workers never inherit the node's signal handlers.

    Unlike the stock forkserver context, its workers do not re-run the parent's
    ``__main__`` (as ``__mp_main__``): the node may live in the user's own process (the
    embedded cluster), whose script need not have an ``if __name__ == "__main__"``
    guard, and workers get ``__main__`` code shipped with each job anyway."""
    global _context
    from multiprocess import forkserver

    from achilles.compat import multiprocess as compat

    if _context is None:
        _context = compat.forkserver_context(drop=_MAIN_KEYS)
    # every worker unpickles the context's process classes, which live in compat
    _context.set_forkserver_preload(["achilles.node.worker", compat.__name__])
    forkserver.ensure_running()
    return _context


def init(slots: SlotTable, node_name: str, node_pid: int = 0) -> None:
    """Pool initializer: default signal dispositions, and this worker's slot."""
    global _slots, _slot, _node_name
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides; Ctrl-C hits the group
    if node_pid:
        _die_with_node(node_pid)
    _slots = slots
    _slot = slots.claim()
    _node_name = node_name


def _count(rt: dict[str, Any]) -> None:
    """One more chunk of a pool with a ``maxtasksperchild`` ran here: at that many, this
    worker retires (see :func:`_retire`)."""
    global _retiring
    pool = rt["pool"]
    n = _tasks[pool] = _tasks.get(pool, 0) + 1
    if n >= rt["maxtasks"]:
        _retiring = True


def _retire() -> None:
    """Free this worker's slot before it exits (code 0): its replacement claims it, and
    the node, finding the exited pid in no slot, knows it retired and did not crash."""
    if _slots is not None and _slot >= 0:
        _slots.release(_slot)


def _die_with_node(node_pid: int) -> None:
    """Exit as soon as the node's process is gone, even in the middle of a task.

    A worker's parent is the fork server, which outlives the node as long as any of its
    children do (they hold its "alive" pipe), and a worker only sees its task pipe close
    when it asks for its next task, however long the current one runs. So one thread
    waits on a pidfd of the node (Linux >= 5.3; elsewhere the task pipe still closes)."""
    try:
        fd = os.pidfd_open(node_pid)
    except (AttributeError, OSError):
        return

    def watch() -> None:
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="achilles-node-watch").start()


def _runtime(job: str, bundle: bytes | str) -> dict[str, Any]:
    """The job's loaded code (once per job per worker); ``bundle`` is its bytes, or the
    path of the file the node spooled a large one to."""
    rt = _jobs.get(job)
    if rt is not None:
        _jobs.move_to_end(job)
        return rt
    if isinstance(bundle, str):
        with open(bundle, "rb") as f:
            bundle = f.read()
    rt = loads_function(bundle)
    if rt["initializer"] is not None and rt["pool"] not in _initialized:
        rt["initializer"](*rt["initargs"])
        _initialized.add(rt["pool"])
    _jobs[job] = rt
    while len(_jobs) > _MAX_JOBS:
        _jobs.popitem(last=False)
    return rt


def _error(exc: BaseException, tb: str | None = None) -> tuple[str, bytes, float]:
    return ERROR, dumps_exception(exc, tb or traceback.format_exc()), 0.0


def run_chunk(
    number: int, job: str, seq: int, bundle: bytes | str, payload: bytes
) -> tuple[Any, ...]:
    """Run one chunk; return ``(status, payload, seconds)``, plus what it printed if its
    pool forwards output and it printed anything; never raises an Exception.

    While it runs, this worker's slot names the chunk (so the node knows what died with
    it, or what ran too long)."""
    slots, i = _slots, _slot
    if slots is not None and i >= 0:
        slots.seqs[i] = seq
        slots.starts[i] = time.monotonic()
        slots.jobs[i] = number  # written last: it marks the slot busy
    rt = _jobs.get(job) or _load(job, bundle)
    if rt is not None and rt["pool"].endswith(OUTPUT_TAG):
        result = _run_captured(job, seq, bundle, payload)
    else:
        result = _run(job, seq, bundle, payload)
    # Not in a `finally`: a task that calls sys.exit() must leave its chunk named in the
    # slot when the worker dies, or the node could not tell which chunk killed it.
    if slots is not None and i >= 0:
        slots.jobs[i] = 0
    rt = _jobs.get(job)  # the job's loaded code (absent: it failed to load)
    if rt is not None and rt["maxtasks"]:
        _count(rt)
    return result


def _load(job: str, bundle: bytes | str) -> dict[str, Any] | None:
    """A job's code on its first chunk here (None if it cannot be loaded: ``_run``
    tries again and says why)."""
    try:
        return _runtime(job, bundle)
    except Exception:
        return None


def _run_captured(job: str, seq: int, bundle: bytes | str, payload: bytes) -> tuple[Any, ...]:
    """``_run`` with the task's stdout and stderr captured; the output, if any, is a
    fourth element of the outcome."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _captures
    try:
        result = _run(job, seq, bundle, payload)
    finally:
        sys.stdout, sys.stderr = saved
    output = _take_output()
    return result if output is None else (*result, output)


def _run(job: str, seq: int, bundle: bytes | str, payload: bytes) -> tuple[str, bytes, float]:
    start = time.perf_counter()
    try:
        rt = _runtime(job, bundle)
    except ImportError as exc:
        msg = f"{exc} (on node {_node_name}; install it there)"
        return _error(type(exc)(msg, name=exc.name))
    except Exception as exc:
        return _error(
            SerializationError(
                f"cannot load the job's function on node {_node_name}: "
                f"{exc.__class__.__name__}: {exc}"
            )
        )
    try:
        args = loads_chunk(payload, rt["main"])
    except Exception as exc:
        return _error(
            SerializationError(
                f"cannot unpickle arguments of chunk {seq} on node {_node_name}: "
                f"{exc.__class__.__name__}: {exc}"
            )
        )
    fn, mode = rt["fn"], rt["mode"]
    try:
        if mode == "map":
            results = [fn(a) for a in args]
        elif mode == "star":
            results = [fn(*a) for a in args]
        else:
            results = [fn(*a, **k) for a, k in args]
    except Exception as exc:
        return _error(exc)
    elapsed = time.perf_counter() - start
    try:
        return OK, dumps_chunk(results, by_reference=True), elapsed
    except Exception as exc:  # multiprocessing's MaybeEncodingError, with its str
        return _error(ResultEncodingError(exc, results))
