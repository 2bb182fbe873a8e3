"""apply/apply_async share one long-lived job per function on a real cluster, and each
call stands alone: a call that raises or whose worker dies fails only itself."""

from __future__ import annotations

import pytest
import tasks
from conftest import wait_until

from achilles import ChunkFailedError, Pool
from achilles.pool import MAX_APPLY_JOBS


def _jobs(cluster) -> list[dict]:
    return cluster.status()["jobs"]


def _no_jobs_left(cluster) -> None:
    wait_until(lambda: not _jobs(cluster), 10, what="every job ended on the server")


def test_applies_of_one_function_share_one_job(cluster):
    """Twenty applies of one function are one job on the server; another function adds a
    second; closing the pool ends both."""
    _no_jobs_left(cluster)
    with Pool(**cluster.kwargs()) as pool:
        assert [pool.apply(tasks.square, (i,)) for i in range(20)] == [i * i for i in range(20)]
        jobs = _jobs(cluster)
        assert len(jobs) == 1 and jobs[0]["done"] == 20
        assert pool.apply(tasks.add, (2, 3)) == 5
        assert len(_jobs(cluster)) == 2
    _no_jobs_left(cluster)


def test_apply_that_raises_leaves_its_job_serving(cluster):
    """A call that raises gets the task's own exception; the next call of the same
    function, in the same job, succeeds."""
    with Pool(**cluster.kwargs()) as pool:
        with pytest.raises(tasks.Boom, match="bad value 5") as info:
            pool.apply(tasks.fail_on, (5,))
        assert "Traceback" in str(info.value.__cause__)
        assert pool.apply(tasks.fail_on, (4,)) == 4
        assert [j["failed"] for j in _jobs(cluster)] == [1]  # one call failed; the job serves on


def test_apply_whose_worker_dies_fails_alone(cluster):
    """A call whose worker dies on every attempt fails with ChunkFailedError; the calls
    around it, of the same function, return their results."""
    with Pool(**cluster.kwargs(), max_attempts=2) as pool:
        before = pool.apply_async(tasks.hard_exit, (1,))
        with pytest.raises(ChunkFailedError, match="attempt 2 of 2"):
            pool.apply(tasks.hard_exit, (3,))
        assert before.get(30) == 1
        assert pool.apply(tasks.hard_exit, (2,)) == 2


def test_many_apply_async_in_flight_then_join(cluster):
    """Thirty apply_async calls in flight at once all return, and join after close waits
    for them and ends their job."""
    pool = Pool(**cluster.kwargs())
    try:
        results = [pool.apply_async(tasks.sleep_then_square, (i, 0.01)) for i in range(30)]
        pool.close()
        pool.join(60)
        assert all(r.ready() for r in results)
        assert [r.get(0) for r in results] == [i * i for i in range(30)]
    finally:
        pool.terminate()
    _no_jobs_left(cluster)


def test_terminate_fails_pending_applies(cluster):
    """terminate() fails the calls still pending with 'Pool terminated'."""
    pool = Pool(**cluster.kwargs())
    pending = pool.apply_async(tasks.sleep_for, (30.0,))
    pool.terminate()
    with pytest.raises(ValueError, match="Pool terminated"):
        pending.get(10)
    _no_jobs_left(cluster)


def test_least_recently_used_apply_jobs_end(cluster):
    """A pool keeps at most MAX_APPLY_JOBS apply jobs open; older ones end on the server."""
    with Pool(**cluster.kwargs()) as pool:
        functions = [eval(f"lambda x: x + {k}") for k in range(MAX_APPLY_JOBS + 3)]
        assert [pool.apply(f, (1,)) for f in functions] == [
            1 + k for k in range(MAX_APPLY_JOBS + 3)
        ]
        wait_until(
            lambda: len(_jobs(cluster)) == MAX_APPLY_JOBS, 10, what="the oldest apply jobs ended"
        )
        assert pool.apply(functions[0], (5,)) == 5  # comes back as a new job
    _no_jobs_left(cluster)
