"""Failure modes of a task, as a table (loky's crash_cases): each row says what the
task does, and what the caller must get. After every row the cluster must still work."""

from __future__ import annotations

import multiprocessing.pool

import pytest
import tasks

import achilles
from achilles import Pool

pytestmark = pytest.mark.chaos

# (id, function, exception the caller gets, text its message must contain)
CRASH_CASES = [
    ("raises", tasks.fail_at_five, tasks.Boom, "bad value 5"),
    ("sys.exit", tasks.exit_three, achilles.ChunkFailedError, "exit code 3"),
    ("os._exit", tasks.hard_exit, achilles.ChunkFailedError, "exit code 0"),
    ("segfault", tasks.segfault, achilles.ChunkFailedError, "SIGSEGV"),
    ("memory", tasks.huge_allocation, MemoryError, None),
    (
        "unpicklable-result",
        tasks.unpicklable_result,
        multiprocessing.pool.MaybeEncodingError,
        "Error sending result",
    ),
    (
        "unpicklable-exception",
        tasks.raise_two_arg,
        achilles.RemoteError,
        "TwoArgError: two-arg error 1 2",
    ),
]


@pytest.fixture(scope="module")
def pool(cluster):
    with Pool(max_attempts=2, **cluster.kwargs()) as p:
        yield p


@pytest.mark.parametrize("name,func,exc,text", CRASH_CASES, ids=[c[0] for c in CRASH_CASES])
def test_crash_case(pool, name, func, exc, text):
    """The caller gets the expected error, and the cluster serves the next job."""
    with pytest.raises(exc, match=text) as info:
        pool.map(func, range(8), chunksize=2)
    if exc is achilles.ChunkFailedError:
        # the chunk holding argument 3 is chunk 1, arguments 2 to 3, tried max_attempts
        assert info.value.seq == 1 and (info.value.start, info.value.stop) == (2, 4)
        assert "chunk 1 (arguments 2 to 3)" in str(info.value)
        assert "attempt 2 of 2" in str(info.value)
    assert pool.map(tasks.square, range(6)) == [x * x for x in range(6)]


def test_argument_that_crashes_at_unpickle(pool):
    """An argument that fails to unpickle on the worker is a SerializationError."""
    with pytest.raises(achilles.SerializationError, match="exploded while unpickling"):
        pool.map(tasks.identity, [1, tasks.CrashAtUnpickle(), 3])
    assert pool.map(tasks.identity, [1, 2]) == [1, 2]


def test_unpicklable_function(pool):
    """A function dill cannot serialise fails at submission, naming it."""
    import threading

    lock = threading.Lock()
    gen = (i for i in range(3))

    def uses_generator(x):
        return next(gen) + x if lock else x

    with pytest.raises(achilles.SerializationError, match="uses_generator"):
        pool.map(uses_generator, [1])
    assert pool.apply(tasks.square, (3,)) == 9


def test_unpicklable_argument(pool):
    """An argument neither pickle nor dill can serialise raises pickle's own error."""
    with pytest.raises(TypeError, match="generator"):
        pool.map(tasks.identity, [(i for i in range(3))])


def test_imap_poison_names_chunk(pool):
    """imap yields what precedes a poison chunk, then raises ChunkFailedError for it."""
    got = []
    with pytest.raises(achilles.ChunkFailedError, match="chunk 3"):
        for x in pool.imap(tasks.hard_exit, range(6), chunksize=1):
            got.append(x)
    assert got == [0, 1, 2]


def test_task_timeout(cluster):
    """A task past task_timeout has its worker killed; after max_attempts the job fails
    with a multiprocessing.TimeoutError-compatible error naming the chunk."""
    import multiprocessing

    with Pool(task_timeout=0.5, max_attempts=2, **cluster.kwargs()) as p:
        with pytest.raises(multiprocessing.TimeoutError, match=r"chunk 0 .*time limit"):
            p.map(tasks.sleep_for, [30.0])
        assert p.map(tasks.sleep_for, [0.01, 0.02]) == [0.01, 0.02]
