"""Pins the multiprocess internals that :mod:`achilles.compat.multiprocess` uses: if an
upgrade moves one, this fails by name (and setup.py's upper bound on multiprocess is the
newest release it passed on). No process is started: the pool's workers are stand-ins."""

from __future__ import annotations

import ast
import inspect
import os
import time
from collections.abc import Iterator
from typing import Any

import multiprocess
import multiprocess.pool as mp_pool
import pytest
from multiprocess import context as mp_context
from multiprocess import forkserver, popen_fork, popen_forkserver, process, spawn, util

from achilles.compat import multiprocess as compat
from achilles.node import worker as _worker


def params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def wait_for(pred: Any, timeout: float = 5.0) -> None:
    """Poll a condition a pool thread makes true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)  # sync-ok: the poll interval of a deadline wait


class FakeProcess:
    """A worker that is never started: what Pool reads and calls on one."""

    def __init__(self, pid: int, **kwargs: Any) -> None:
        self.pid = pid
        self.kwargs = kwargs
        self.name = "Process-1"
        self.daemon = False
        self.exitcode: int | None = None
        self.started = False

    def start(self) -> None:
        self.started = True

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return self.exitcode is None

    def terminate(self) -> None:
        self.exitcode = -15


class FakeContext:
    """The fork context's locks and queues (no resource tracker), fake processes."""

    def __init__(self) -> None:
        self.real = multiprocess.get_context("fork")
        self.made: list[FakeProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> FakeProcess:
        p = FakeProcess(1000 + len(self.made), **kwargs)
        self.made.append(p)
        return p

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[compat.Pool]:
    """A compat.Pool of two stand-in workers, its threads running; terminated after."""
    finishes: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        compat.Pool, "_help_stuff_finish", staticmethod(lambda *a: finishes.append(a))
    )
    p = compat.Pool(2, context=FakeContext(), queue_class=_worker.PickleQueue)
    p.finishes = finishes
    try:
        yield p
    finally:
        p.terminate()
        for q in (p._inqueue, p._outqueue, p._change_notifier):
            q.close()


# --- the Pool subclass's hooks -------------------------------------------------------------
def test_pool_hooks_exist_with_their_signatures() -> None:
    """The methods compat.Pool overrides exist on multiprocess's Pool, called the same way."""
    assert params(mp_pool.Pool.__init__) == [
        "self",
        "processes",
        "initializer",
        "initargs",
        "maxtasksperchild",
        "context",
    ]
    assert isinstance(inspect.getattr_static(mp_pool.Pool, "Process"), staticmethod)
    assert params(mp_pool.Pool.Process) == ["ctx", "args", "kwds"]
    assert params(mp_pool.Pool._setup_queues) == ["self"]
    assert params(mp_pool.Pool._get_sentinels) == ["self"]
    assert isinstance(inspect.getattr_static(mp_pool.Pool, "_help_stuff_finish"), staticmethod)
    assert params(mp_pool.Pool._help_stuff_finish) == ["inqueue", "task_handler", "size"]
    assert isinstance(mp_pool.TERMINATE, str)


def test_pool_starts_its_workers_through_the_process_hook(pool: compat.Pool) -> None:
    """Every worker the pool starts goes through ``self.Process`` into ``started``, and
    the pool's list of workers is ``_pool``."""
    made = pool._ctx.made
    assert len(made) == 2 and all(p.started for p in made)
    assert list(pool.started) == made
    assert pool.workers() == made
    assert made[0].kwargs["target"] is mp_pool.worker
    inqueue, outqueue = made[0].kwargs["args"][:2]
    assert (inqueue, outqueue) == (pool._inqueue, pool._outqueue)


def test_worker_handler_replaces_an_exited_worker_through_the_hook(pool: compat.Pool) -> None:
    """The worker handler thread, woken through ``_change_notifier``, reaps an exited
    worker from ``_pool`` and starts its replacement with the same closure."""
    made = pool._ctx.made
    made[0].exitcode = 0
    pool._change_notifier.put(None)
    wait_for(lambda: len(made) == 3)
    assert list(pool.started) == made and pool.workers() == made[1:]


def test_pool_queues_are_ours_and_its_result_handler_exits(pool: compat.Pool) -> None:
    """``_setup_queues`` installs our queues (their fds are the pipes the reactor
    drives); the result handler thread exits at once; the cache's notifier is silenced
    and the worker handler waits on ``_change_notifier._reader`` only."""
    assert isinstance(pool._inqueue, _worker.PickleQueue)
    assert pool.task_fd() == pool._inqueue._writer.fileno()
    assert pool.result_fd() == pool._outqueue._reader.fileno()
    assert pool._outqueue.parent_side and not pool._inqueue.parent_side
    wait_for(lambda: not pool._result_handler.is_alive())
    assert isinstance(pool._cache.notifier, compat._NoNotifier)
    assert pool._get_sentinels() == [pool._change_notifier._reader]


def test_stop_replacing_sets_the_worker_handlers_state(pool: compat.Pool) -> None:
    """``_worker_handler._state`` is what the handler loop checks: TERMINATE stops it."""
    assert pool._worker_handler._state == mp_pool.RUN
    pool.stop_replacing()
    assert pool._worker_handler._state == mp_pool.TERMINATE


def test_queue_locks_are_replaceable(pool: compat.Pool) -> None:
    """The locks a killed worker may hold are ``_inqueue._rlock`` and ``_outqueue._wlock``."""
    old = (pool._inqueue._rlock, pool._outqueue._wlock)
    pool.replace_queue_locks()
    assert pool._inqueue._rlock is not old[0] and pool._outqueue._wlock is not old[1]
    assert pool._inqueue._rlock.acquire(False)
    pool._inqueue._rlock.release()


def test_terminate_calls_our_help_stuff_finish(pool: compat.Pool) -> None:
    """Teardown goes through ``_help_stuff_finish(inqueue, task_handler, size)``."""
    pool.terminate()
    assert [a[0] for a in pool.finishes] == [pool._inqueue]


def test_worker_loop_closes_the_queue_ends_it_does_not_use() -> None:
    """multiprocess's worker closes ``inqueue._writer`` and ``outqueue._reader`` when the
    queue has them (which is why PickleQueue names its ends so), then reads with
    ``get`` until the None sentinel."""
    closed: list[str] = []

    class End:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            closed.append(self.name)

    class Queue:
        def __init__(self) -> None:
            self._reader, self._writer = End("reader"), End("writer")

        def get(self) -> None:
            return None

        def put(self, obj: Any) -> None:
            raise AssertionError("no task, no result")

    inqueue, outqueue = Queue(), Queue()
    mp_pool.worker(inqueue, outqueue)
    assert closed == ["writer", "reader"]


# --- processes -----------------------------------------------------------------------------
class _NoLaunchPopen(popen_fork.Popen):
    def _launch(self, process_obj: Any) -> None:
        pass


def test_exit_code_is_the_popens_returncode() -> None:
    """A process has ``_popen`` (None until started) whose ``returncode`` is None until
    the process was reaped."""
    p = multiprocess.get_context("fork").Process(target=abs)
    assert p._popen is None and compat.exit_code(p) is None
    popen = _NoLaunchPopen(p)
    assert popen.returncode is None
    p._popen = popen
    assert compat.exit_code(p) is None
    popen.returncode = -9
    assert compat.exit_code(p) == -9
    p._popen = None


def test_forkserver_launch_is_what_forkserver_context_copies() -> None:
    """``popen_forkserver.Popen._launch`` still does, in order, what our copy does; the
    helpers it calls exist as called."""
    assert params(popen_forkserver.Popen._launch) == ["self", "process_obj"]
    source = inspect.getsource(popen_forkserver.Popen._launch)
    steps = [
        "spawn.get_preparation_data(process_obj._name)",
        "set_spawning_popen(self)",
        "reduction.dump(prep_data, buf)",
        "reduction.dump(process_obj, buf)",
        "set_spawning_popen(None)",
        "forkserver.connect_to_new_process(self._fds)",
        "os.dup(w)",
        "util.Finalize(self, util.close_fds,",
        "f.write(buf.getbuffer())",
        "forkserver.read_signed(self.sentinel)",
    ]
    at = [source.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), dict(zip(steps, at))
    assert params(forkserver.connect_to_new_process) == ["fds"]
    assert params(forkserver.read_signed) == ["fd"]
    assert params(spawn.get_preparation_data) == ["name"]
    assert params(mp_context.set_spawning_popen) == ["popen"]
    assert callable(mp_context.reduction.dump) and callable(util.close_fds)
    assert params(util.Finalize.__init__)[:4] == ["self", "obj", "callback", "args"]


def test_forkserver_popen_keeps_fds_and_the_context_takes_our_process() -> None:
    """``Popen.__init__`` makes ``_fds`` before ``_launch``; a context's ``Process``
    is the class whose ``_Popen`` starts a process."""

    class Probe(popen_forkserver.Popen):
        def _launch(self, process_obj: Any) -> None:
            self.fds_at_launch = list(self._fds)

    assert Probe(None).fds_at_launch == []
    assert isinstance(inspect.getattr_static(mp_context.ForkServerProcess, "_Popen"), staticmethod)
    ctx = compat.forkserver_context(drop=_worker._MAIN_KEYS)
    assert isinstance(ctx, mp_context.ForkServerContext)
    assert issubclass(ctx.Process, mp_context.ForkServerProcess)
    assert issubclass(ctx.Process, process.BaseProcess)


def test_forkserver_popen_polls_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our Popen's ``poll`` holds its lock around multiprocess's, which reads the exit
    code from the sentinel once, then returns the one it recorded; ``reap`` polls
    through the public ``exitcode``."""
    assert params(popen_forkserver.Popen.poll) == ["self", "flag"]
    assert inspect.signature(popen_forkserver.Popen.poll).parameters["flag"].default == os.WNOHANG
    popen: Any = compat.forkserver_context(drop=_worker._MAIN_KEYS).Popen
    r, w = os.pipe()

    class Probe(popen):
        def _launch(self, process_obj: Any) -> None:
            forkserver.write_signed(w, -9)  # as the fork server does when a child exits
            os.close(w)
            self.sentinel = r

    held: list[bool] = []
    stock = popen_forkserver.Popen.poll

    def spy(self: Any, flag: int = os.WNOHANG) -> Any:
        held.append(self._poll_lock.locked())
        return stock(self, flag)

    monkeypatch.setattr(popen_forkserver.Popen, "poll", spy)
    proc = multiprocess.get_context("fork").Process(target=abs)
    try:
        proc._popen = Probe(proc)
        assert compat.exit_code(proc) is None  # not polled yet
        assert compat.reap(proc) == -9 and compat.reap(proc) == -9  # (the pipe is at EOF)
        assert compat.exit_code(proc) == -9
        assert held == [True, True]
    finally:
        proc._popen = None
        os.close(r)


def test_sentinel_of_an_unstarted_process_raises() -> None:
    """A worker the pool's handler thread has not finished starting has no sentinel yet
    (the node adopts it at a later look)."""
    with pytest.raises(ValueError):
        multiprocess.get_context("fork").Process(target=abs).sentinel  # noqa: B018


def test_preparation_data_names_main_by_the_keys_we_drop() -> None:
    """The keys that tell a new process to re-run the parent's ``__main__`` are the two
    we drop, and this process (pytest's ``__main__``) gets one of them."""
    source = inspect.getsource(spawn.get_preparation_data)
    assert all(f"d['{key}']" in source for key in _worker._MAIN_KEYS)
    assert set(spawn.get_preparation_data("probe")) & set(_worker._MAIN_KEYS)


# --- the fork server's per-process state ---------------------------------------------------
def test_forkserver_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """``forkserver._forkserver`` holds the pid, the "alive" fd, the address and a lock;
    forgetting them (in a forked child) closes only our copy of the fd."""
    server = forkserver.ForkServer()
    assert {"_forkserver_pid", "_forkserver_alive_fd", "_forkserver_address", "_lock"} <= set(
        vars(server)
    )
    monkeypatch.setattr(forkserver, "_forkserver", server)
    r, w = os.pipe()
    server._forkserver_pid, server._forkserver_alive_fd = 4321, w
    server._forkserver_address = "/nowhere"
    old_lock = server._lock
    try:
        assert compat.forkserver_pid() == 4321
        compat.forget_forkserver()
        assert (
            server._forkserver_pid,
            server._forkserver_alive_fd,
            server._forkserver_address,
        ) == (None, None, None)
        assert server._lock is not old_lock
        assert os.read(r, 1) == b""  # the write end is closed: the reader sees EOF
        assert compat.forkserver_pid() is None
    finally:
        os.close(r)


def test_compat_imports_no_twisted_and_no_achilles() -> None:
    """The module runs inside the fork server (through achilles.node.worker): it imports
    neither Twisted nor any achilles module that might."""
    tree = ast.parse(inspect.getsource(compat))
    names = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    names += [
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    ]
    assert [n for n in names if n.split(".")[0] in ("twisted", "achilles")] == []
