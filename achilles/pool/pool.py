"""The blocking public API: ``Pool`` as in ``multiprocessing.pool``, across a cluster.

A job's input is fed by one thread per job (:mod:`achilles.pool.feeding`); results
arrive in the reactor thread (:mod:`achilles.controller`) and are waited for in
:mod:`achilles.pool.results`. Every wait has an optional timeout and nothing here ever
runs in the reactor thread.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from achilles.config import cluster_configured, require_secret, resolve
from achilles.controller import ApplyHandle, Controller, Handle, JobHandle
from achilles.controller.handles import Settle
from achilles.controller.output import wanted as _output_wanted
from achilles.core.job import Outcome, window_for
from achilles.local import LocalCluster
from achilles.net import reactor as _reactor
from achilles.pool import feeding
from achilles.pool.connections import _controller, _release_controller
from achilles.pool.results import ApplyResult, IMapIterator, _values
from achilles.protocol.messages import OUTPUT_TAG
from achilles.serialization import dumps_chunk, dumps_function

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
#: functions whose apply jobs a pool keeps open (the least recently used ends)
MAX_APPLY_JOBS = 8


def _check_arguments(
    processes: int | None,
    initializer: Callable[..., Any] | None,
    maxtasksperchild: int | None,
    task_timeout: float | None,
) -> None:
    """multiprocessing's checks of Pool's arguments, with its messages."""
    if processes is not None and processes < 1:
        raise ValueError("Number of processes must be at least 1")
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if maxtasksperchild is not None and (
        not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
    ):
        raise ValueError("maxtasksperchild must be a positive int or None")
    if task_timeout is not None and task_timeout <= 0:
        raise ValueError("task_timeout must be a positive number of seconds or None")


class Pool:
    """A drop-in ``multiprocessing.Pool`` whose workers are every core of a cluster.

    With a cluster configured (arguments, ``ACHILLES_*`` environment, or ``.env``), it
    uses that cluster; otherwise it starts an embedded one on this machine with
    ``processes`` workers (default: every core), stopped by ``close``/``terminate``.

    Args:
        processes: local: worker count; cluster: the most of this pool's chunks that
            run at once (None: every slot of the cluster).
        initializer, initargs: run in each worker before its first task of a job.
        maxtasksperchild: a worker that has run this many of this pool's tasks (chunks)
            is replaced by a fresh one, as in multiprocessing (None: never).
        context: accepted for compatibility; nodes choose their own start method.
        host, port, username, secret_key: the cluster (else environment, .env).
        max_attempts: tries of a chunk whose worker or node dies before the job fails.
        task_timeout: seconds a chunk may run before its worker is killed (None: no limit).
        tls_ca: PEM CA file to verify a TLS server with (turns TLS on).
        forward_output: show what tasks print (stdout, stderr, warnings) here, each
            line prefixed with its node's name (None: when stdout is a terminal or a
            notebook; False: never, it then goes where the node's output goes).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        secret_key: str | None = None,
        max_attempts: int | None = None,
        task_timeout: float | None = None,
        tls_ca: str | None = None,
        forward_output: bool | None = None,
    ) -> None:
        self._state = TERMINATE  # until constructed, __del__ has nothing to do
        _check_arguments(processes, initializer, maxtasksperchild, task_timeout)
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasks = maxtasksperchild
        self._output = _output_wanted(forward_output)
        # the workers capture a job's output when its pool id says so (OUTPUT_TAG)
        self._id = os.urandom(8).hex() + (OUTPUT_TAG if self._output else "")
        self._pid = os.getpid()  # a forked child's copy of this pool is not its to use
        self._local: LocalCluster | None = None
        explicit: dict[str, Any] = dict(
            host=host, port=port, username=username, secret_key=secret_key
        )
        settings = resolve(**explicit, max_attempts=max_attempts, tls_ca=tls_ca)
        if cluster_configured(**explicit):
            require_secret(settings, "Pool")
            self._limit = processes or 0
        else:
            self._local = LocalCluster(processes or os.cpu_count() or 1, settings.max_attempts)
            settings = self._local.settings
            self._limit = 0
        self._settings = settings
        self._max_attempts = settings.max_attempts
        self._timeout = float(task_timeout or 0.0)
        self._jobs: set[Handle] = set()
        self._apply_jobs: OrderedDict[bytes, ApplyHandle] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._ctl_held: Controller | None = None
        try:
            self._ctl = self._ctl_held = _controller(settings)
            _reactor.call_blocking(self._ctl.when_ready, timeout=settings.reconnect_timeout)
        except BaseException:
            self._shutdown()
            raise
        self._state = RUN

    # -- helpers ----------------------------------------------------------------------
    @property
    def _processes(self) -> int:
        if self._local is not None:
            return self._settings.processes or 1
        slots = self._ctl.cluster.slots or 1
        return min(slots, self._limit) if self._limit else slots

    def _check_running(self) -> None:
        if self._pid != os.getpid():
            raise ValueError(
                f"this Pool belongs to process {self._pid}, which forked this "
                "one; make a new Pool in this process"
            )
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _function(self, func: Callable[..., Any], mode: str) -> bytes:
        return dumps_function(
            func, mode, self._initializer, self._initargs, self._id, maxtasks=self._maxtasks
        )

    def _new_job(
        self,
        func: Callable[..., Any],
        mode: str,
        ordered: bool,
        total: int = -1,
        items: int | None = None,
    ) -> JobHandle:
        self._check_running()
        function = self._function(func, mode)
        handle = JobHandle(
            function,
            ordered,
            window_for(self._processes),
            self._max_attempts,
            self._timeout,
            self._limit,
            total,
            name=function_name(func),
            items=-1 if items is None else items,
        )
        if self._output:
            handle.output_context = contextvars.copy_context()
        with self._jobs_lock:
            self._jobs.add(handle)
        _reactor.call_soon(self._ctl.submit, handle)
        return handle

    def _job_done(self, handle: Handle, cancel: bool) -> None:
        with self._jobs_lock:
            if handle not in self._jobs:
                return
            self._jobs.discard(handle)
            if self._apply_jobs.get(handle.function) is handle:
                del self._apply_jobs[handle.function]
        with handle.cond:
            handle.cancelled = cancel or handle.cancelled
            handle.cond.notify_all()
        _reactor.call_soon(self._ctl.cancel if cancel else self._ctl.end, handle)

    def _start_thread(self, target: Callable[..., None], *args: Any) -> None:
        threading.Thread(target=target, args=args, daemon=True, name="achilles-job").start()

    # -- map family -------------------------------------------------------------------
    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        mode: str,
        chunksize: int | None,
        callback: Any,
        error_callback: Any,
        progress: Any = False,
    ) -> ApplyResult:
        size, total, n = feeding.plan(iterable, chunksize, self._processes)
        result = ApplyResult(callback, error_callback, self)
        bar = feeding.progress_bar(progress, n)
        handle = self._new_job(func, mode, ordered=False, total=total, items=n)
        result._handle = handle
        self._start_thread(
            feeding.run_map, self._ctl, handle, iterable, size, result, bar, self._job_done
        )
        return result

    def _wait(self, result: ApplyResult) -> Any:
        """get() for the blocking calls; Ctrl-C (KeyboardInterrupt) cancels the job on
        the cluster and leaves the pool usable (an apply call's job only if no other
        call shares it)."""
        try:
            return result.get()
        except KeyboardInterrupt:
            handle = result._handle
            if handle is not None:
                if handle.interrupt(result._seq):
                    self._job_done(handle, cancel=True)
                else:  # an apply call whose job serves other calls: not sent again
                    _reactor.call_soon(self._ctl.forget_call, handle, result._seq)
            raise

    def map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Any = None,
        error_callback: Any = None,
        *,
        progress: Any = False,
    ) -> ApplyResult:
        """``map`` without waiting: an ApplyResult of the list of results."""
        return self._map_async(func, iterable, "map", chunksize, callback, error_callback, progress)

    def map(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        progress: Any = False,
    ) -> list[Any]:
        """Apply ``func`` to every item, in parallel on the cluster; results in order.

        ``progress=True`` shows a tqdm bar (items done, rate, ETA); a dict is passed to
        tqdm as options."""
        return self._wait(self._map_async(func, iterable, "map", chunksize, None, None, progress))

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Any = None,
        error_callback: Any = None,
        *,
        progress: Any = False,
    ) -> ApplyResult:
        """``starmap`` without waiting: an ApplyResult of the list of results."""
        return self._map_async(
            func, iterable, "star", chunksize, callback, error_callback, progress
        )

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        progress: Any = False,
    ) -> list[Any]:
        """Like map, with each item unpacked as arguments: ``func(*item)``."""
        return self._wait(self._map_async(func, iterable, "star", chunksize, None, None, progress))

    def _imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | str | None,
        ordered: bool,
        progress: Any,
    ) -> IMapIterator:
        size, total, n = feeding.plan(iterable, chunksize, self._processes)
        bar = feeding.progress_bar(progress, n)
        handle = self._new_job(func, "map", ordered, total=total, items=n)
        it = IMapIterator(handle, self, bar)

        def feed() -> None:
            try:
                feeding.feed(self._ctl, handle, feeding.chunks(iterable, size, handle))
            except BaseException as exc:  # not the input's: KeyboardInterrupt and such
                handle.fail(exc)

        self._start_thread(feed)
        return it

    def imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | str | None = 1,
        *,
        progress: Any = False,
    ) -> IMapIterator:
        """Lazy ``map``: results in input order, as they come; input read as needed.

        ``chunksize`` defaults to 1, as in multiprocessing (each result is yielded as
        soon as it and those before it are in); ``chunksize="auto"`` (or None) picks
        one from the input's length and the cluster, or from the measured speed of the
        function for a generator: far faster for short tasks. Also an async iterator:
        ``async for x in ...``."""
        return self._imap(func, iterable, chunksize, True, progress)

    def imap_unordered(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | str | None = 1,
        *,
        progress: Any = False,
    ) -> IMapIterator:
        """Like imap, in the order results finish."""
        return self._imap(func, iterable, chunksize, False, progress)

    # -- apply ------------------------------------------------------------------------
    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Any = None,
        error_callback: Any = None,
    ) -> ApplyResult:
        """``apply`` without waiting: an ApplyResult of ``func(*args, **kwds)``."""
        self._check_running()
        result = ApplyResult(callback, error_callback, self)
        function = self._function(func, "apply")
        try:
            payload = dumps_chunk([(tuple(args), dict(kwds or {}))])
        except Exception as exc:  # as multiprocessing: the result raises it, at get()
            result._set(False, exc)
            return result

        def settle(outcome: Outcome | BaseException) -> None:  # in the reactor thread
            try:
                if isinstance(outcome, BaseException):  # the connection failed
                    raise outcome
                result._set(True, _values(outcome)[0])
            except BaseException as exc:
                result._set(False, exc)

        handle, seq = self._apply_call(function, settle, function_name(func))
        result._handle, result._seq = handle, seq
        # one frame, written from this thread when it can be, else one hop to the reactor
        # thread: each hop costs a wake-up and a GIL hand-over
        if not self._ctl.send_call_now(handle, seq, payload):
            _reactor.call_soon(self._ctl.send_call, handle, seq, payload)
        return result

    def _apply_call(
        self, function: bytes, settle: Settle, name: str = ""
    ) -> tuple[ApplyHandle, int]:
        """Add a call to the apply job of this function (made on first use; the least
        recently used beyond MAX_APPLY_JOBS ends once its calls are done)."""
        idle: list[ApplyHandle] = []
        with self._jobs_lock:
            handle = self._apply_jobs.get(function)
            if handle is None or handle.error is not None or handle.cancelled:
                handle = ApplyHandle(
                    function, self._max_attempts, self._timeout, self._limit, name=name
                )
                handle.on_idle = _retire_weakly(weakref.ref(self))
                self._apply_jobs[function] = handle
                self._jobs.add(handle)
                while len(self._apply_jobs) > MAX_APPLY_JOBS:
                    old = self._apply_jobs.popitem(last=False)[1]
                    old.retiring = True
                    with old.cond:
                        if not old.calls:
                            idle.append(old)
            else:
                self._apply_jobs.move_to_end(function)
            if self._output:  # the latest call's context (its notebook cell)
                handle.output_context = contextvars.copy_context()
            seq = handle.add(settle)
        for old in idle:
            self._retire(old)
        return handle, seq

    def _retire(self, handle: ApplyHandle) -> None:
        self._job_done(handle, cancel=False)

    def apply(
        self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        """Run ``func(*args, **kwds)`` on the cluster and return its result."""
        return self._wait(self.apply_async(func, args, kwds))

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """No more tasks; ``join`` waits for the submitted ones."""
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self) -> None:
        """Stop now: cancel every job (their results raise), stop an embedded cluster."""
        if self._pid != os.getpid():  # a forked child's copy: the parent's to stop
            self._state = TERMINATE
            return
        if self._state == TERMINATE and not self._jobs and self._ctl_held is None:
            return
        self._state = TERMINATE
        with self._jobs_lock:
            jobs = list(self._jobs)
        for handle in jobs:
            handle.fail(ValueError("Pool terminated"))
            self._job_done(handle, cancel=True)
        self._shutdown()

    def join(self, timeout: float | None = None) -> None:
        """Wait for every submitted task to have run (after close or terminate).

        As with multiprocessing, that includes the tasks of an ``imap`` nobody reads
        yet: its input is then read to the end and its results wait in memory."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._pid != os.getpid():
            return
        with self._jobs_lock:
            jobs = list(self._jobs)
        for handle in jobs:
            if handle.wait_done(timeout, functools.partial(self._gone, handle)):
                self._job_done(handle, cancel=False)
        self._shutdown()

    def _gone(self, handle: Handle) -> bool:
        return handle not in self._jobs

    def _shutdown(self) -> None:
        ctl, self._ctl_held = self._ctl_held, None
        if ctl is not None:
            _release_controller(ctl)
        if self._local is not None:
            local, self._local = self._local, None
            local.stop()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        """A pool nobody references any more: warn if it was still running (as
        multiprocessing does), and release what it holds, without taking a lock or
        waiting (a finaliser runs wherever the garbage collector runs)."""
        if getattr(self, "_state", TERMINATE) == RUN:
            _warn(f"unclosed running achilles pool {self!r}", ResourceWarning, source=self)
        ctl, local = getattr(self, "_ctl_held", None), getattr(self, "_local", None)
        if ctl is None and local is None:
            return
        self._state = TERMINATE
        self._ctl_held = self._local = None
        if self._pid != os.getpid():
            return  # a forked child's copy: the parent's to stop
        try:
            if local is not None:
                local.kill_workers()  # at once: signals only
            _reactor.call_from_finalizer(_release, ctl, list(self._jobs), local)
        except Exception:  # interpreter exit: the exit handlers kill what is left
            pass

    def __repr__(self) -> str:
        where = (
            "local" if self._local is not None else f"{self._settings.host}:{self._settings.port}"
        )
        return f"<achilles.Pool state={self._state} cluster={where}>"

    def _repr_html_(self) -> str:
        """In a notebook: the pool, and a link to its cluster's live dashboard."""
        from html import escape

        from achilles.config import is_loopback
        from achilles.web.site import dashboard_url, parse_address

        head = escape(repr(self))
        if self._local is not None:
            return f"<code>{head}</code> (embedded cluster: no dashboard)"
        s = self._settings
        try:
            url = dashboard_url(s)
            where = parse_address(s.dashboard)
        except ValueError:
            return f"<code>{head}</code>"
        if url is None or where is None:
            return f"<code>{head}</code> (dashboard off)"
        if is_loopback(where[0]) and not is_loopback(s.host):  # on the server's loopback
            port = where[1]
            tunnel = f"ssh -L {port}:127.0.0.1:{port} {s.host}"
            return (
                f"<code>{head}</code> dashboard: on {escape(s.host)}'s loopback "
                f"(<code>{escape(tunnel)}</code>, then "
                f'<a href="http://127.0.0.1:{port}/" target="_blank">'
                f"http://127.0.0.1:{port}/</a>)"
            )
        return (
            f'<code>{head}</code> <a href="{escape(url, quote=True)}" target="_blank">'
            f"dashboard: {escape(url)}</a>"
        )


def _retire_weakly(ref: weakref.ref[Pool]) -> Callable[[ApplyHandle], None]:
    """An apply job's ``on_idle``: ends the job through its pool, if the pool is still
    there. Weak: the controller holds the job, and must not keep the pool alive."""

    def retire(handle: ApplyHandle) -> None:
        pool = ref()
        if pool is not None:
            pool._retire(handle)

    return retire


def _release(ctl: Controller | None, jobs: list[Handle], local: LocalCluster | None) -> None:
    """In the reactor thread: what a collected pool held. Its jobs are cancelled, its
    connection released, its embedded cluster stopped."""
    for handle in jobs:
        handle.fail(ValueError("Pool terminated"))
        with handle.cond:
            handle.cancelled = True
        if ctl is not None:
            ctl.cancel(handle)
    if ctl is not None:
        _release_controller(ctl)
    if local is not None:
        local.stop()


def function_name(func: Any) -> str:
    """What the server shows of a job's function: its module and qualified name."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if name is None:
        name = type(func).__qualname__  # a partial, a callable object
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else str(name)
