"""Drop-in fidelity: the same code run against ``multiprocessing.Pool`` and
``achilles.Pool`` (an embedded cluster, and a cluster started with the CLI) must see the
same results, the same exceptions at the same places, and the same side effects.

Each test runs one function of a pool against every kind of pool and compares what it
observed with what multiprocessing's pool observed."""

from __future__ import annotations

import gc
import multiprocessing
import os
import textwrap
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import tasks
from conftest import ROOT, child_env, run_python

import achilles

KINDS = ["embedded", "cli"]


def nothing_configured(monkeypatch: Any, tmp_path: Any) -> None:
    """No ACHILLES_* variables and no .env: Pool() starts an embedded cluster."""
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def make_pool(request, tmp_path, monkeypatch) -> Callable[..., Any]:
    """make_pool(kind, processes=2, **options): a pool of that kind, terminated after the
    test whatever happens."""
    made: list[Any] = []

    def make(kind: str, processes: int = 2, **options: Any) -> Any:
        if kind == "mp":
            pool = multiprocessing.get_context("forkserver").Pool(processes, **options)
        elif kind == "embedded":
            nothing_configured(monkeypatch, tmp_path)
            pool = achilles.Pool(processes, **options)
        else:
            cluster = request.getfixturevalue("cluster")
            pool = achilles.Pool(processes, **options, **cluster.kwargs())
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.terminate()


def drain(it: Any) -> list[Any]:
    """Call next() until StopIteration, recording each value or exception (type, text,
    whether it has a cause), so that iteration after an exception is seen too."""
    seen: list[Any] = []
    for _ in range(1000):
        try:
            seen.append(("ok", it.next(timeout=60)))
        except StopIteration:
            return seen
        except Exception as exc:  # the point: what raises, and where
            seen.append(("raised", type(exc).__name__, str(exc), exc.__cause__ is not None))
    raise AssertionError("the iterator never ended")


def compare(
    make_pool: Callable[..., Any], kind: str, observe: Callable[[Any], Any], **options: Any
) -> Any:
    """What ``observe(pool)`` sees with multiprocessing's pool and with ours: equal."""
    expected = observe(make_pool("mp", **options))
    got = observe(make_pool(kind, **options))
    assert got == expected
    return got


# --- a task that raises does not stop the others (item 9) -------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_imap_raises_in_place_and_goes_on(make_pool, kind):
    """imap raises a task's error at its position, then yields the later results."""
    seen = compare(make_pool, kind, lambda p: drain(p.imap(tasks.fail_on, range(8))))
    assert seen[5] == ("raised", "Boom", "bad value 5", True)
    assert seen[6:] == [("ok", 6), ("ok", 7)]


@pytest.mark.parametrize("kind", KINDS)
def test_imap_unordered_raises_and_goes_on(make_pool, kind):
    """imap_unordered yields every other result besides the one error."""

    def observe(pool: Any) -> Any:
        return sorted(drain(pool.imap_unordered(tasks.fail_on, range(8))), key=repr)

    compare(make_pool, kind, observe)


@pytest.mark.parametrize("kind", KINDS)
def test_map_runs_every_task_then_raises(make_pool, kind, tmp_path):
    """map raises a task's error only after every other task ran (their side effects
    happen), and map_async calls error_callback with it."""

    def observe(pool: Any) -> Any:
        marks = tmp_path / f"marks-{id(pool)}"
        marks.mkdir()
        args = [(str(marks), x, 2) for x in range(6)]
        with pytest.raises(tasks.Boom, match="bad value 2") as info:
            pool.starmap(tasks.mark_or_fail, args, chunksize=1)
        cause = info.value.__cause__
        called: list[Any] = []
        result = pool.starmap_async(
            tasks.mark_or_fail, args, chunksize=1, error_callback=called.append
        )
        result.wait(60)
        return (
            sorted(os.listdir(marks)),
            type(cause).__name__ if cause else None,
            [type(e).__name__ for e in called],
            result.successful(),
        )

    compare(make_pool, kind, observe)


# --- an exception of the input itself (item 8) ------------------------------------------
def failing_input(n: int = 5):
    yield from range(n)
    raise ValueError("the input broke")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_input_error_reaches_imap_at_its_position(make_pool, kind, method):
    """An input generator that raises: imap first yields the results before it, then
    raises its exception (with no remote cause), then ends."""

    def observe(pool: Any) -> Any:
        seen = drain(getattr(pool, method)(tasks.square, failing_input()))
        return seen if method == "imap" else sorted(seen, key=repr)

    seen = compare(make_pool, kind, observe)
    assert ("raised", "ValueError", "the input broke", False) in seen


@pytest.mark.parametrize("kind", KINDS)
def test_input_error_raised_by_map(make_pool, kind):
    """map over an input that raises raises that exception, with no remote cause."""

    def observe(pool: Any) -> Any:
        with pytest.raises(ValueError, match="the input broke") as info:
            pool.map(tasks.square, failing_input())
        return info.value.__cause__

    compare(make_pool, kind, observe)


# --- defaults (item 10) -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_imap_producer_waits_for_consumer(make_pool, kind):
    """imap's default chunksize is 1: an input that yields an item only after the result
    of the one before it was consumed does not deadlock."""

    def observe(pool: Any) -> Any:
        consumed = [threading.Event() for _ in range(21)]
        consumed[0].set()

        def produce():
            for i in range(20):
                if not consumed[i].wait(20):
                    raise RuntimeError(f"deadlock: result {i - 1} never came")
                yield i

        out = []
        for i, value in enumerate(pool.imap(abs, produce())):
            out.append(value)
            consumed[i + 1].set()
        return out

    assert compare(make_pool, kind, observe) == list(range(20))


@pytest.mark.parametrize("kind", KINDS)
def test_imap_next_timeout_with_default_chunksize(make_pool, kind):
    """With the default chunksize, a finished result is not held back by a slow one
    after it, and next(timeout) on the slow one raises multiprocessing.TimeoutError."""

    def observe(pool: Any) -> Any:
        it = pool.imap(tasks.sleep_for, [0.0, 30.0])
        first = it.next(timeout=20)
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.2)
        return first

    compare(make_pool, kind, observe)


@pytest.mark.parametrize("kind", KINDS)
def test_join_before_reading_imap(make_pool, kind):
    """close() and join() before an imap is read: join waits for every task and the
    results are all there afterwards."""

    def observe(pool: Any) -> Any:
        it = pool.imap(tasks.square, range(60))
        unordered = pool.imap_unordered(tasks.square, iter(range(30)))
        pool.close()
        pool.join()
        return list(it), sorted(unordered)

    compare(make_pool, kind, observe)


@pytest.mark.parametrize("kind", KINDS)
def test_progress_bar_over_a_generator(make_pool, kind, capsys):
    """progress=True on imap and imap_unordered over a generator shows a bar with no
    total and gives the results."""
    pool = make_pool(kind)
    assert list(pool.imap(tasks.square, iter(range(5)), progress=True)) == [0, 1, 4, 9, 16]
    assert sorted(pool.imap_unordered(tasks.square, iter(range(5)), progress=True)) == [
        0,
        1,
        4,
        9,
        16,
    ]
    assert "5item" in capsys.readouterr().err.replace(" ", "")


# --- pool lifetime: hangs, leaks, warnings, fork (items 1-4) ------------------------------
def _cluster_args(kind: str, request: Any) -> str:
    if kind == "embedded":
        return ""
    cluster = request.getfixturevalue("cluster")
    return f"port={cluster.port}, secret_key={cluster.secret!r}"


def _run(kind: str, request: Any, body: str, timeout: float = 90) -> str:
    """Run ``body`` in a fresh interpreter with POOL() making a pool of this kind (or
    multiprocessing's, for kind "mp"); return its output, asserting it succeeded."""
    if kind == "mp":
        head = "import multiprocessing\nPOOL = multiprocessing.Pool\n"
    else:
        args = _cluster_args(kind, request)
        head = (
            f"import functools, achilles\n"
            f"POOL = functools.partial(achilles.Pool{', ' + args if args else ''})\n"
        )
    code = head + textwrap.dedent(body)
    proc = run_python(
        code, timeout=timeout, cwd=ROOT, env=child_env(PYTHONPATH=os.path.join(ROOT, "tests"))
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


COLLECTED_WHILE_CONSTRUCTING = """
    def abandon():
        pool = POOL(1)  # kept alive by the frame, which the traceback cycle holds
        try:
            raise RuntimeError
        except RuntimeError as e:
            err = e  # a traceback cycle: the pool is freed by the cyclic collector
        return err

    if __name__ == "__main__":
        for _ in range(60):
            abandon()
        with POOL(1) as q:
            print(q.map(abs, [-1]))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_no_deadlock_when_collector_frees_a_pool(kind, request):
    """Pools freed by the cyclic garbage collector while another pool is being made do
    not deadlock it."""
    assert (
        _run(kind, request, COLLECTED_WHILE_CONSTRUCTING, timeout=120)
        == _run("mp", request, COLLECTED_WHILE_CONSTRUCTING)
        == "[1]\n"
    )


ABANDONED_AFTER_APPLY = """
    import gc, os, time, warnings
    warnings.simplefilter("ignore", ResourceWarning)

    def workers():
        # this process's descendants, less the fork server and resource tracker that
        # multiprocess shares between all pools of the process (as its forkserver
        # context does)
        keep = set()
        for name in ("multiprocess.forkserver", "multiprocess.resource_tracker"):
            mod = sys.modules.get(name)
            for attr in ("_forkserver", "_resource_tracker"):
                obj = getattr(mod, attr, None)
                keep.add(getattr(obj, "_forkserver_pid", None) or getattr(obj, "_pid", None))
        from achilles.testing import proc_table
        parents = {p: pp for p, (pp, _, state) in proc_table().items() if state != "Z"}
        found, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {p for p, pp in parents.items() if pp in frontier} - found
            found |= frontier
        return found - keep

    import sys
    if __name__ == "__main__":
        for i in range(10):
            p = POOL(1)
            p.apply(abs, (-1,))
            p = None
        gc.collect()
        deadline = time.monotonic() + 10
        while workers() and time.monotonic() < deadline:
            time.sleep(0.05)  # sync-ok: a deadline wait for the processes to go
        import achilles.pool
        print(len(workers()), len(getattr(achilles.pool, "_controllers", ())))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_abandoned_pools_release_their_workers(kind, request):
    """Pools that used apply and that nobody references are collected and leave no
    worker process and no connection behind."""
    assert (
        _run(kind, request, ABANDONED_AFTER_APPLY)
        == _run("mp", request, ABANDONED_AFTER_APPLY)
        == "0 0\n"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_resource_warning_for_an_unclosed_running_pool(kind, request, monkeypatch, tmp_path):
    """A running pool that is garbage-collected gives a ResourceWarning, as
    multiprocessing's does."""
    if kind == "embedded":
        nothing_configured(monkeypatch, tmp_path)
        options: dict[str, Any] = {}
    else:
        options = request.getfixturevalue("cluster").kwargs()

    def observe(make: Callable[[], Any]) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pool = make()
            del pool
            gc.collect()
        return [w.category.__name__ for w in caught if "unclosed running" in str(w.message)]

    assert (
        observe(lambda: multiprocessing.Pool(1))
        == observe(lambda: achilles.Pool(1, **options))
        == ["ResourceWarning"]
    )


FORKED_CHILD = """
    import functools, multiprocessing, os
    print = functools.partial(print, flush=True)  # a forked child must not print it again

    def child(queue):
        with POOL(1) as pool:
            queue.put(pool.map(abs, [-1, -2]))

    if __name__ == "__main__":
        with POOL(1) as parent:
            print(parent.map(abs, [-3]))
            pid = os.fork()
            if pid == 0:
                try:
                    with POOL(1) as pool:
                        ok = pool.map(abs, [-4]) == [4]
                    os._exit(0 if ok else 3)
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    os._exit(4)
            print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            ctx = multiprocessing.get_context("fork")
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(queue,))
            proc.start()
            print(queue.get(timeout=60))
            proc.join(60)
            print("process exit", proc.exitcode)
            print(parent.map(abs, [-5]))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_pool_in_a_forked_child(kind, request):
    """A process that used a pool forks (os.fork, multiprocessing's fork context): the
    child makes and uses a pool of its own, and the parent's pool still works after."""
    assert (
        _run(kind, request, FORKED_CHILD)
        == _run("mp", request, FORKED_CHILD)
        == "[3]\nchild exit 0\n[1, 2]\nprocess exit 0\n[5]\n"
    )


# --- exceptions: the same types (items 5-7) -----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_argument_raises_the_pickling_error(make_pool, kind):
    """An argument that cannot be pickled raises pickle's own exception type, from map
    and from apply_async's get(), which also calls error_callback with it."""

    def observe(pool: Any) -> Any:
        with pytest.raises(RuntimeError, match="refuses to be pickled"):
            pool.map(tasks.identity, [1, tasks.RefusesPickling()], chunksize=1)
        called: list[Any] = []
        result = pool.apply_async(
            tasks.identity, (tasks.RefusesPickling(),), error_callback=called.append
        )
        with pytest.raises(RuntimeError, match="refuses to be pickled"):
            result.get(60)
        return [type(e).__name__ for e in called]

    compare(make_pool, kind, observe)


@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_result_is_a_maybe_encoding_error(make_pool, kind):
    """A result that cannot be pickled raises multiprocessing's MaybeEncodingError, with
    its .exc and .value, and error_callback gets it."""
    from multiprocessing.pool import MaybeEncodingError

    def observe(pool: Any) -> Any:
        called: list[Any] = []
        result = pool.map_async(tasks.unpicklable_result, [3], error_callback=called.append)
        with pytest.raises(MaybeEncodingError) as info:
            result.get(60)
        err = info.value
        return (
            isinstance(called[0], MaybeEncodingError),
            "Error sending result" in str(err),
            "Unpicklable" in err.value,
            bool(err.exc),
        )

    assert compare(make_pool, kind, observe) == (True, True, True, True)


@pytest.mark.parametrize("kind", KINDS)
def test_remote_traceback_shows_source_lines(make_pool, kind):
    """A task's exception has a multiprocessing.pool.RemoteTraceback as cause, whose text
    names the task's real file and shows its source line (the module is shipped by
    source to CLI nodes)."""
    from multiprocessing.pool import RemoteTraceback

    def observe(pool: Any) -> Any:
        with pytest.raises(ValueError, match="boom 3") as info:
            pool.apply(tasks.boom_here, (3,))
        cause = info.value.__cause__
        text = str(cause)
        return (
            isinstance(cause, RemoteTraceback),
            tasks.__file__ in text,
            'raise ValueError(f"boom {x}")' in text,
        )

    assert compare(make_pool, kind, observe) == (True, True, True)
