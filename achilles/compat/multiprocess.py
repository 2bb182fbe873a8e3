"""The ``multiprocess`` internals achilles relies on, in one place (pinned by
``tests/unit/test_compat_multiprocess.py``; the upper bound on multiprocess in
``setup.py`` is the newest release those tests passed on).

* ``Pool`` hooks, overridden by :class:`Pool`: the ``Process`` staticmethod (its
  ``self.Process`` is what the worker handler thread starts workers with),
  ``_setup_queues`` (sets ``_inqueue``/``_outqueue``/``_quick_put``/``_quick_get``),
  ``_get_sentinels``, ``_help_stuff_finish(inqueue, task_handler, size)``,
  ``_cache.notifier`` and ``_change_notifier._reader``.
* Pool state: ``_pool`` (its live workers), ``_worker_handler._state`` and
  ``pool.TERMINATE`` (no more replacements), ``_inqueue._rlock``/``_outqueue._wlock``.
* ``pool.worker`` closes ``inqueue._writer`` and ``outqueue._reader`` in a worker, which
  is why :class:`achilles.node.worker.PickleQueue` has those names.
* A process's ``_popen.returncode``: its exit code once someone polled it, read without
  a system call (:func:`exit_code`).
* ``popen_forkserver.Popen``: :func:`forkserver_context` copies its ``_launch``, without
  two keys of the preparation data, and serialises its ``poll`` (the node's reactor and
  the pool's worker handler thread both poll a worker whose sentinel became readable;
  the second to read it would get EOF, and record exit code 255).
* The forkserver's ``_forkserver_pid`` and other per-process fields
  (:func:`forkserver_pid`, :func:`forget_forkserver`).

No Twisted here: the fork server preloads this module, and every worker unpickles the
process classes :func:`forkserver_context` makes.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections import deque
from typing import Any

import multiprocess.pool as mp_pool


class _NoNotifier:
    def put(self, obj: Any) -> None:
        pass


class Pool(mp_pool.Pool):
    """``multiprocess.Pool`` for its workers and their upkeep, with its pipes driven
    by the node's reactor (see :mod:`achilles.node.pipe`) instead of its helper threads.

    * The pipes are ``queue_class(ctx)`` (the node's pickles with the C pickler).
    * The result-handler thread exits at once (its ``get`` returns the sentinel): the
      reactor reads the result pipe. The task handler is never given a task: the
      reactor writes the task pipe. Neither writes to a pipe on teardown (``put`` is a
      no-op on the parent's side), so a full pipe cannot hang a teardown.
    * The worker handler waits on worker exits and its change notifier only: the
      stock one also woke (and spun, holding the GIL) while a result sat in the pipe,
      9-15 ms of CPU per one-item chunk when it was measured.
    * Every worker it starts, the first ones and the replacements of retired ones, is
      also put in ``started``, for the node to watch: the handler reaps an exited
      worker from ``_pool`` at once, sooner than the node's watch would see it there.
    """

    def __init__(self, *args: Any, queue_class: Any, **kwargs: Any) -> None:
        started: deque[Any] = deque()  # appended by the worker handler thread
        self.started = started
        self._queue_class = queue_class

        def process(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            worker = ctx.Process(*args, **kwargs)
            started.append(worker)
            return worker

        # Shadows the stock staticmethod, called the same way (the handler thread keeps
        # it: a closure, so that it does not keep the pool object alive)
        self.Process = process
        super().__init__(*args, **kwargs)
        # The task cache wakes the worker handler each time it empties; ours is unused.
        self._cache.notifier = _NoNotifier()

    def _get_sentinels(self) -> list[Any]:
        return [self._change_notifier._reader]

    def _setup_queues(self) -> None:
        self._inqueue = self._queue_class(self._ctx)
        self._outqueue = self._queue_class(self._ctx)
        self._outqueue.parent_side = True  # not pickled: the workers' copies still put
        self._quick_put = lambda obj: None
        self._quick_get = lambda: None

    @staticmethod
    def _help_stuff_finish(inqueue: Any, task_handler: Any, size: int) -> None:
        """The stock one reads leftover tasks from the task pipe, which here may end in
        half a message (and block it forever); the workers are killed anyway."""

    # -- what the node reads and changes from outside --------------------------------
    def task_fd(self) -> int:
        """The parent's (writing) end of the task pipe."""
        return int(self._inqueue._writer.fileno())

    def result_fd(self) -> int:
        """The parent's (reading) end of the result pipe."""
        return int(self._outqueue._reader.fileno())

    def workers(self) -> list[Any]:
        """The workers the pool holds now (an exited one until its handler reaps it)."""
        return list(self._pool)

    def stop_replacing(self) -> None:
        """Have the worker handler start no replacement for a worker that exits: an
        attribute write only, so any thread may call it."""
        self._worker_handler._state = mp_pool.TERMINATE

    def replace_queue_locks(self) -> None:
        """A worker killed inside ``get()``/``put()`` keeps a queue lock forever; the
        parent's copies of those locks are replaced so the pool can still be torn down."""
        self._inqueue._rlock = self._ctx.Lock()
        self._outqueue._wlock = self._ctx.Lock()


def exit_code(process: Any) -> int | None:
    """A worker's exit code if it was polled since it exited (None before): no system
    call, for the node's periodic look at every worker."""
    popen = process._popen
    return None if popen is None else popen.returncode


def reap(process: Any) -> int | None:
    """Poll a worker (of a :func:`forkserver_context`) whose sentinel is readable: its
    exit code. Safe in any thread: its ``poll`` takes a lock."""
    code: int | None = process.exitcode
    return code


def forkserver_context(drop: tuple[str, ...]) -> Any:
    """A forkserver context whose new processes are not told the ``drop`` keys of the
    parent's preparation data (:func:`multiprocess.spawn.get_preparation_data`), and
    whose processes may be polled from several threads."""
    from multiprocess import context as mp_context
    from multiprocess import forkserver, popen_forkserver, spawn, util
    from multiprocess.context import reduction, set_spawning_popen

    class Popen(popen_forkserver.Popen):
        def __init__(self, process_obj: Any) -> None:
            self._poll_lock = threading.Lock()  # one poll at a time (see the docstring)
            super().__init__(process_obj)

        def poll(self, flag: int = os.WNOHANG) -> int | None:
            with self._poll_lock:
                return super().poll(flag)

        def _launch(self, process_obj: Any) -> None:
            # popen_forkserver.Popen._launch, without the ``drop`` keys
            prep_data = spawn.get_preparation_data(process_obj._name)
            for key in drop:
                prep_data.pop(key, None)
            buf = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(prep_data, buf)
                reduction.dump(process_obj, buf)
            finally:
                set_spawning_popen(None)
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)
            parent_w = os.dup(w)  # the child's sentinel of this parent
            self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = forkserver.read_signed(self.sentinel)

    class Process(mp_context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:  # noqa: N802 (multiprocess's name)
            return Popen(process_obj)

    class Context(mp_context.ForkServerContext):
        pass

    ctx = Context()
    ctx.Process = Process
    ctx.Popen = Popen  # (for the tests)
    return ctx


def forkserver_pid() -> int | None:
    """The pid of this process's fork server, if it started one."""
    from multiprocess import forkserver

    return forkserver._forkserver._forkserver_pid


def forget_forkserver() -> None:
    """In a forked child: drop the parent's fork server (its pid is not this process's
    child) without stopping it; the next use starts one of this process's own."""
    module = sys.modules.get("multiprocess.forkserver")
    server = getattr(module, "_forkserver", None)
    if server is None:
        return
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        try:
            os.close(alive)  # our copy only: the parent's fork server lives on
        except OSError:
            pass
    server._forkserver_alive_fd = None
    server._forkserver_pid = None
    server._forkserver_address = None
    server._lock = threading.Lock()
