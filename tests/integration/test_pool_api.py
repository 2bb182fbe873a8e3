"""The whole Pool interface against a server and two nodes started with the CLI,
checked against multiprocessing.Pool on the same inputs."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import tasks

import achilles
from achilles import Pool


@pytest.fixture(scope="module")
def mp_pool():
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool(cluster):
    with Pool(**cluster.kwargs()) as p:
        yield p


INPUTS = [list(range(50)), range(7), [], [3]]


@pytest.mark.parametrize("chunksize", [None, 1, 3, 1000])
@pytest.mark.parametrize("data", INPUTS, ids=["list50", "range7", "empty", "one"])
def test_map_equals_multiprocessing(pool, mp_pool, data, chunksize):
    """map returns the same flat, ordered list as multiprocessing.Pool.map."""
    assert pool.map(tasks.square, data, chunksize) == mp_pool.map(tasks.square, data, chunksize)


def test_map_generator(pool, mp_pool):
    """map accepts a generator and reads it to the end."""
    assert pool.map(tasks.square, tasks.numbers(123)) == mp_pool.map(
        tasks.square, tasks.numbers(123)
    )


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_imap_in_order(pool, mp_pool, chunksize):
    """imap yields results in input order."""
    expected = list(mp_pool.imap(tasks.square, range(40), chunksize or 1))
    assert list(pool.imap(tasks.square, range(40), chunksize)) == expected


@pytest.mark.parametrize("chunksize", [None, 1, 5])
def test_imap_unordered_same_set(pool, mp_pool, chunksize):
    """imap_unordered yields every result once, in any order."""
    expected = sorted(mp_pool.imap_unordered(tasks.square, range(40), chunksize or 1))
    assert sorted(pool.imap_unordered(tasks.square, tasks.numbers(40), chunksize)) == expected


def test_imap_empty(pool):
    """imap over nothing yields nothing."""
    assert list(pool.imap(tasks.square, [])) == []
    assert list(pool.imap_unordered(tasks.square, iter([]))) == []


def test_imap_next_timeout(pool):
    """IMapIterator.next(timeout) raises multiprocessing.TimeoutError when nothing came."""
    it = pool.imap(tasks.sleep_for, [2.0])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    assert it.next(timeout=30) == 2.0


def test_starmap(pool, mp_pool):
    """starmap unpacks each item as arguments, like multiprocessing."""
    args = [(i, i + 1) for i in range(30)]
    assert pool.starmap(tasks.add, args) == mp_pool.starmap(tasks.add, args)
    assert pool.starmap_async(tasks.add, args, 4).get(30) == mp_pool.starmap(tasks.add, args)


def test_apply_and_kwargs(pool, mp_pool):
    """apply passes positional and keyword arguments."""
    assert pool.apply(tasks.kwargs_echo, (1, 2), {"c": 3}) == mp_pool.apply(
        tasks.kwargs_echo, (1, 2), {"c": 3}
    )
    assert pool.apply(tasks.square, (9,)) == 81


def test_async_results_and_callbacks(pool):
    """map_async/apply_async call callback with the result, and report ready/successful."""
    got = []
    event = threading.Event()
    r = pool.map_async(tasks.square, range(10), callback=lambda v: (got.append(v), event.set()))
    assert r.get(30) == [x * x for x in range(10)]
    assert event.wait(5) and got == [r.get()]
    assert r.ready() and r.successful()
    a = pool.apply_async(tasks.square, (4,), callback=got.append)
    assert a.get(30) == 16
    a.wait()
    assert got[-1] == 16


def test_successful_before_ready_raises(pool):
    """successful() on an unfinished result raises ValueError, as in multiprocessing."""
    r = pool.apply_async(tasks.sleep_for, (1.0,))
    with pytest.raises(ValueError):
        r.successful()
    assert r.get(30) == 1.0


def test_get_timeout(pool):
    """get(timeout) raises multiprocessing.TimeoutError and the result still arrives."""
    r = pool.apply_async(tasks.sleep_for, (1.0,))
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.05)
    assert r.get(30) == 1.0


def test_task_exception_same_type_with_remote_traceback(pool):
    """A task's exception is re-raised as its own type, the remote traceback as cause."""
    with pytest.raises(tasks.Boom, match="bad value 5") as info:
        pool.map(tasks.fail_at_five, range(10), chunksize=2)
    assert isinstance(info.value.__cause__, achilles.RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)
    assert pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]  # still usable


def test_error_callback(pool):
    """map_async's error_callback receives the task's exception."""
    errors = []
    r = pool.map_async(tasks.fail_at_five, range(10), error_callback=errors.append)
    r.wait(30)
    assert r.ready() and not r.successful()
    assert isinstance(errors[0], tasks.Boom)


def test_imap_raises_at_position(pool):
    """imap yields the results before a failing item, then raises its exception."""
    it = pool.imap(tasks.fail_at_five, range(10), chunksize=1)
    seen = []
    with pytest.raises(tasks.Boom):
        for x in it:
            seen.append(x)
    assert seen == [0, 1, 2, 3, 4]


def test_lambdas_closures_and_classes(pool):
    """Lambdas, closures and user classes travel to nodes and back as the same types."""
    k = 10
    assert pool.map(lambda x: x + k, range(5)) == [10, 11, 12, 13, 14]
    out = pool.map(tasks.shift, [tasks.Point(1, 2), tasks.Point(3, 4)])
    assert out == [tasks.Point(2, 3), tasks.Point(4, 5)]
    assert all(type(p) is tasks.Point for p in out)


def test_initializer_runs_in_worker(cluster):
    """initializer(*initargs) runs in each worker before its first task of the pool."""
    with Pool(initializer=tasks.remember, initargs=(42,), **cluster.kwargs()) as p:
        assert all(r == [42] for r in p.map(tasks.initialized, range(8), chunksize=1))


def test_closed_pool_refuses_work(cluster):
    """A closed pool raises ValueError on new work; join before close raises too."""
    p = Pool(**cluster.kwargs())
    with pytest.raises(ValueError):
        p.join()
    r = p.map_async(tasks.square, range(10))
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(tasks.square, [1])
    p.join()
    assert r.get(1) == [x * x for x in range(10)]


def test_argument_validation(cluster):
    """processes < 1, a non-callable initializer and a maxtasksperchild that is not a
    positive int are refused clearly, with multiprocessing's exception types."""
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0, **cluster.kwargs())
    with pytest.raises(TypeError, match="initializer"):
        Pool(2, initializer=3, **cluster.kwargs())
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="maxtasksperchild"):
            Pool(2, maxtasksperchild=bad, **cluster.kwargs())


def test_unpicklable_argument_is_a_clear_error(pool):
    """An argument neither pickle nor dill can serialise raises pickle's own error, as
    multiprocessing does, and the pool stays usable."""
    with pytest.raises(TypeError, match="generator"):
        pool.map(tasks.square, [(i for i in range(3))])
    assert pool.map(tasks.square, [2]) == [4]


def test_concurrent_pools_share_the_cluster(cluster):
    """Several pools used from several threads at once all get complete results."""
    results = {}

    def run(i):
        with Pool(**cluster.kwargs()) as p:
            results[i] = p.map(tasks.slow_square, range(i, i + 8), chunksize=1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: [x * x for x in range(i, i + 8)] for i in range(3)}


def test_processes_caps_concurrency(cluster):
    """Against a cluster, processes=1 runs at most one chunk of the pool at a time."""
    with Pool(1, **cluster.kwargs()) as p:
        pids = p.map(tasks.pid, range(6), chunksize=1)
    assert len(pids) == 6


def test_imap_iteration_mixes_next_and_for(pool):
    """next(), a for loop that breaks, and another for loop over one imap share one
    position: every result comes once, in order."""
    it = pool.imap(tasks.square, range(30), 4)
    got = [next(it), it.next(timeout=30)]
    for x in it:
        got.append(x)
        if len(got) == 10:
            break
    got.extend(it)
    assert got == [x * x for x in range(30)]
    with pytest.raises(StopIteration):
        next(it)
