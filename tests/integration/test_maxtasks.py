"""maxtasksperchild is honoured as multiprocessing.Pool honours it: a worker that has run
that many of a pool's tasks (chunks) is replaced by a fresh one, with nothing retried or
reported crashed, on the embedded cluster and on a cluster started with the CLI."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import Counter
from typing import Any

import pytest
import tasks
from conftest import wait_until

import achilles
from achilles import Pool

RESTART = "restarting its pool"  # what a node logs when it replaces its pool generation
DEADLINE = 60  # seconds a map may take; a worker that is never replaced would hang it


def _mp_run(method: str, maxtasks: int | None, *args: Any, **kwargs: Any) -> Any:
    with multiprocessing.get_context("forkserver").Pool(
        2,
        maxtasksperchild=maxtasks,
        initializer=kwargs.pop("initializer", None),
        initargs=kwargs.pop("initargs", ()),
    ) as pool:
        return getattr(pool, method)(*args, **kwargs)


class Mode:
    """Makes pools of one kind of cluster, and counts the node's pool restarts since
    the test began (a retirement must not be one)."""

    def __init__(self, name: str, request: Any) -> None:
        self.name = name
        self.pools: list[Pool] = []
        if name == "embedded":
            request.getfixturevalue("no_cluster_config")
            self.caplog = request.getfixturevalue("caplog")
            self.caplog.set_level(logging.WARNING, logger="achilles.node")
            self.kwargs: dict[str, Any] = {}
        else:
            self.cluster = request.getfixturevalue("cluster")
            self.kwargs = self.cluster.kwargs()
            self.marks = [len(node.output()) for node in self.cluster.nodes]

    def pool(self, **kwargs: Any) -> Pool:
        pool = Pool(2, **kwargs) if self.name == "embedded" else Pool(**self.kwargs, **kwargs)
        self.pools.append(pool)
        return pool

    def restarts(self) -> int:
        if self.name == "embedded":
            return sum(RESTART in r.getMessage() for r in self.caplog.records)
        return sum(
            node.output()[mark:].count(RESTART)
            for node, mark in zip(self.cluster.nodes, self.marks)
        )

    def close(self) -> None:
        for pool in self.pools:
            pool.terminate()


@pytest.fixture(params=["embedded", "cli"])
def mode(request):
    m = Mode(request.param, request)
    yield m
    m.close()


def test_one_task_per_child_gives_a_fresh_worker_per_task(mode):
    """With maxtasksperchild=1 every one-item chunk runs in its own worker process, as
    in multiprocessing."""
    expected = _mp_run("map", 1, tasks.pid, range(8), chunksize=1)
    pool = mode.pool(maxtasksperchild=1, max_attempts=1)
    pids = pool.map_async(tasks.pid, range(8), chunksize=1).get(DEADLINE)
    assert len(set(expected)) == 8
    assert len(set(pids)) == 8 and os.getpid() not in pids
    assert mode.restarts() == 0


def test_two_tasks_per_child(mode):
    """With maxtasksperchild=2 no worker runs more than two of the pool's chunks."""
    expected = _mp_run("map", 2, tasks.pid, range(8), chunksize=1)
    pool = mode.pool(maxtasksperchild=2, max_attempts=1)
    pids = pool.map_async(tasks.pid, range(8), chunksize=1).get(DEADLINE)
    assert max(Counter(expected).values()) <= 2
    assert max(Counter(pids).values()) <= 2 and len(set(pids)) >= 4
    assert mode.restarts() == 0


def test_without_maxtasksperchild_workers_are_reused(mode):
    """With maxtasksperchild=None the same two workers run every chunk."""
    expected = _mp_run("map", None, tasks.pid, range(8), chunksize=1)
    pool = mode.pool()
    pids = pool.map_async(tasks.pid, range(8), chunksize=1).get(DEADLINE)
    assert len(set(expected)) <= 2 and len(set(pids)) <= 2
    assert mode.restarts() == 0


@pytest.mark.parametrize("chunksize", [1, 3])
def test_results_are_correct_and_nothing_is_retried(mode, chunksize):
    """Many chunks through retiring workers all give multiprocessing's results, with one
    attempt allowed per chunk and no pool restart on the node."""
    pool = mode.pool(maxtasksperchild=1, max_attempts=1)
    assert pool.map_async(tasks.square, range(150), chunksize).get(DEADLINE) == _mp_run(
        "map", 1, tasks.square, range(150), chunksize
    )
    assert sorted(pool.imap_unordered(tasks.square, range(40))) == sorted(x * x for x in range(40))
    assert [pool.apply_async(tasks.add, (i, 1)).get(DEADLINE) for i in range(5)] == [1, 2, 3, 4, 5]
    assert mode.restarts() == 0


def test_initializer_runs_in_every_replacement(mode):
    """A replacement worker runs the initializer before its first task, as in
    multiprocessing."""
    kwargs = dict(initializer=tasks.remember, initargs=(7,))
    expected = _mp_run("map", 1, tasks.initialized, range(6), chunksize=1, **kwargs)
    pool = mode.pool(maxtasksperchild=1, max_attempts=1, **kwargs)
    assert expected == [[7]] * 6
    assert pool.map_async(tasks.initialized, range(6), chunksize=1).get(DEADLINE) == expected


def test_worker_exiting_mid_task_is_still_a_crash(mode):
    """A task that exits its worker with code 0 is reported crashed, not taken for a
    retirement, and the pool keeps working."""
    pool = mode.pool(maxtasksperchild=1, max_attempts=2)
    with pytest.raises(achilles.ChunkFailedError, match="exit code 0"):
        pool.map_async(tasks.hard_exit, range(8), chunksize=2).get(DEADLINE)
    assert mode.restarts() >= 1
    assert pool.map_async(tasks.square, range(10), chunksize=1).get(DEADLINE) == [
        x * x for x in range(10)
    ]


def test_other_pool_on_the_same_workers_is_undisturbed(cluster):
    """A pool without maxtasksperchild sharing the node workers with a retiring one gets
    every result, with no error and no pool restart."""
    marks = [len(node.output()) for node in cluster.nodes]
    with (
        Pool(**cluster.kwargs(), maxtasksperchild=1, max_attempts=1) as retiring,
        Pool(**cluster.kwargs(), max_attempts=1) as steady,
    ):
        pids = retiring.map_async(tasks.pid, range(60), chunksize=1)
        squares = steady.map_async(tasks.square, range(300), chunksize=1)
        adds = [steady.apply_async(tasks.add, (i, i)) for i in range(20)]
        assert squares.get(DEADLINE) == [x * x for x in range(300)]
        assert [a.get(DEADLINE) for a in adds] == [2 * i for i in range(20)]
        assert len(set(pids.get(DEADLINE))) == 60
    assert not any(RESTART in node.output()[mark:] for node, mark in zip(cluster.nodes, marks))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped while being read
        return True


def test_retired_and_replacement_workers_all_exit(no_cluster_config):
    """On the embedded cluster, retired workers are gone, the node watches the
    replacements, and closing the pool stops them too."""
    with Pool(2, maxtasksperchild=1) as pool:
        pids = pool.map_async(tasks.pid, range(10), chunksize=1).get(DEADLINE)
        wait_until(lambda: all(_gone(p) for p in pids), 10, what="the retired workers")
        watched = wait_until(
            lambda: (
                [p for p in pool._local.worker_pids() if not _gone(p)]
                if len(pool._local.worker_pids()) == 2
                else None
            ),
            10,
            what="the node to watch the replacements",
        )
        assert not set(watched) & set(pids)
    wait_until(lambda: all(_gone(p) for p in watched), 10, what="the workers to exit")
