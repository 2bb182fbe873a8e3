"""The soak benchmark: many mixed jobs against one server and two nodes, with the
server's and the nodes' memory and open file descriptors read every ``soak_every``
jobs (``python -m benchmarks --soak``; see docs/benchmarks.md).

The mix, by job number: ``map`` (two sizes), ``imap`` over a generator, ``imap_unordered``,
bursts of ``apply_async``, a single ``apply``, ``map_async``, a ``map`` whose task 7
raises, an ``imap`` dropped after three results (its job is cancelled), and every
``soak_kill_every`` jobs a controller in another process that is SIGKILLed while its
job runs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from achilles.testing import HOST, Cluster, Proc, proc_table, wait_until
from benchmarks.procfs import rss_mib, tree_memory
from benchmarks.systems import AchillesCliSystem, PoolAdapter, register_session

#: seconds a checkpoint waits for the nodes' process trees to settle
SETTLE_S = 5.0
#: worker processes per node (the CLI system's nodes run ``--processes 1``)
WORKERS = 1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DOOMED = """
import os, sys
import achilles
from benchmarks.workloads import sleepy
pool = achilles.Pool(host=sys.argv[1], port=int(sys.argv[2]),
                     secret_key=os.environ["ACHILLES_SECRET_KEY"])
it = pool.imap(sleepy, range(100000), 1)
next(it)
print("running", flush=True)
for _ in it:
    pass
"""


def _gen(n: int) -> Iterator[int]:
    yield from range(n)


def _jobs(pool: Any) -> list[Callable[[], None]]:
    """The mix (one callable per kind; each checks its results)."""
    from benchmarks.workloads import fail_at_7, noop, square, trivial

    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(f"soak: {what} gave wrong results")

    def map_small() -> None:
        expect(pool.map(square, range(40), 4) == [x * x for x in range(40)], "map")

    def map_ones() -> None:
        expect(pool.map(noop, range(16), 1) == [None] * 16, "map chunksize 1")

    def imap_gen() -> None:
        expect(list(pool.imap(square, _gen(60), 6)) == [x * x for x in range(60)], "imap")

    def imap_unordered() -> None:
        got = sorted(pool.imap_unordered(square, range(30), 3))
        expect(got == sorted(x * x for x in range(30)), "imap_unordered")

    def apply_burst() -> None:
        rs = [pool.apply_async(trivial, (k,)) for k in range(8)]
        expect([r.get(60) for r in rs] == [k + 1 for k in range(8)], "apply burst")

    def apply_one() -> None:
        expect(pool.apply(trivial, (1,)) == 2, "apply")

    def map_async() -> None:
        expect(pool.map_async(square, range(20)).get(60) == [x * x for x in range(20)], "map_async")

    def failing() -> None:
        try:
            pool.map(fail_at_7, range(20), 2)
        except ValueError:
            return
        raise AssertionError("soak: the failing job did not raise")

    def cancelled() -> None:
        it = pool.imap(square, _gen(1_000_000), 10)
        expect([next(it) for _ in range(3)] == [0, 1, 4], "cancelled imap")
        del it  # dropped before its end: the job is cancelled

    return [
        map_small,
        imap_gen,
        apply_burst,
        failing,
        imap_unordered,
        cancelled,
        map_ones,
        apply_one,
        map_async,
        map_small,
    ]


def _doomed_controller(cluster: Cluster) -> None:
    """A controller in another process that is SIGKILLed while its job runs."""
    env = cluster.env(PYTHONPATH=ROOT)
    proc = Proc(
        [sys.executable, "-c", _DOOMED, HOST, str(cluster.port)], env=env, cwd=ROOT, name="doomed"
    )
    register_session(proc.pid)
    try:
        wait_until(
            lambda: "running" in proc.output(),
            60,
            0.02,
            "the doomed controller's job",
            alive=proc.alive,
        )
    finally:
        proc.kill_group()


def _fds(pids: list[int]) -> int:
    """Open file descriptors of these processes and everything under them."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo, total = list(pids), 0
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def _settled(cluster: Cluster, procs: int) -> int:
    """Wait (up to SETTLE_S) until the nodes' trees have ``procs`` processes: a node
    replacing a pool generation (a cancelled job, a failing one, a controller lost
    mid-job) has one worker too many or too few for a moment, and a dozen descriptors
    more or less, which is no leak. Returns the count seen last."""
    nodes = [n.pid for n in cluster.nodes]
    seen = [tree_memory(nodes)["procs"]]

    def calm() -> bool:
        seen[0] = tree_memory(nodes)["procs"]
        return seen[0] == procs

    try:
        wait_until(calm, SETTLE_S, 0.02, "the nodes' pool generations to settle")
    except AssertionError:
        pass  # measured as it is; the count is in the record
    return seen[0]


def _checkpoint(cluster: Cluster, done: int, block_s: float, procs: int) -> dict[str, float]:
    assert cluster.server is not None
    nodes = [n.pid for n in cluster.nodes]
    count = _settled(cluster, procs) if procs else 0
    tree = tree_memory(nodes)
    return {
        "jobs": done,
        "block_s": block_s,
        "server_rss_mib": tree_memory([cluster.server.pid])["rss_mib"],
        "nodes_rss_mib": tree["rss_mib"],
        "nodes_procs": count or tree["procs"],
        "daemons_rss_mib": round(sum(rss_mib(pid) for pid in nodes), 1),
        "server_fds": _fds([cluster.server.pid]),
        "nodes_fds": _fds(nodes),
        "daemons_fds": sum(_own_fds(pid) for pid in nodes),
    }


def _own_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def run_soak(system: AchillesCliSystem, params: dict[str, Any], rec: Any) -> None:
    """The soak: ``soak_jobs`` mixed jobs; memory and descriptors every ``soak_every``."""
    cluster = system.cluster
    total, every, kill_every = params["soak_jobs"], params["soak_every"], params["soak_kill_every"]
    warm = params["soak_warmup"]

    def case() -> None:
        pool = PoolAdapter(_pool(cluster))
        try:
            kinds = _jobs(pool.pool)
            for job in kinds:  # each kind once before the baseline
                job()
            # the steady process count: each node, its resource tracker, its fork
            # server and its workers
            procs = _settled(cluster, len(cluster.nodes) * (3 + WORKERS))
            points = [_checkpoint(cluster, 0, 0.0, procs)]
            t_block = time.perf_counter()
            for i in range(1, total + 1):
                if i % kill_every == 0:
                    _doomed_controller(cluster)
                else:
                    kinds[i % len(kinds)]()
                if i % every == 0:
                    now = time.perf_counter()
                    points.append(_checkpoint(cluster, i, now - t_block, procs))
                    t_block = now
                    rec.data.setdefault("soak", {})["points"] = points
                    rec.flush()
        finally:
            pool.close()
        _judge(points, warm, rec)

    for name in rec.cases(["soak"]):
        rec.run(name, case)


def _judge(points: list[dict[str, float]], warm: int, rec: Any) -> None:
    """The figures: growth after warm-up, descriptors against the baseline, and the
    last block's time against the first after warm-up."""
    base = next((p for p in points if p["jobs"] >= warm), points[-1])
    last = points[-1]
    blocks = [p for p in points if p["jobs"] > warm]
    rec.figure("soak.server_rss_growth_mib", [last["server_rss_mib"] - base["server_rss_mib"]])
    rec.figure("soak.nodes_rss_growth_mib", [last["nodes_rss_mib"] - base["nodes_rss_mib"]])
    rec.figure("soak.daemons_rss_growth_mib", [last["daemons_rss_mib"] - base["daemons_rss_mib"]])
    rec.figure("soak.server_fds_delta", [last["server_fds"] - points[0]["server_fds"]])
    rec.figure("soak.nodes_fds_delta", [last["nodes_fds"] - points[0]["nodes_fds"]])
    rec.figure("soak.daemons_fds_delta", [last["daemons_fds"] - points[0]["daemons_fds"]])
    if blocks:
        rec.figure("soak.first_block_s", [blocks[0]["block_s"]])
        rec.figure("soak.last_block_s", [blocks[-1]["block_s"]])
        rec.figure("soak.slowdown", [blocks[-1]["block_s"] / blocks[0]["block_s"]])


def _pool(cluster: Cluster) -> Any:
    import achilles

    return achilles.Pool(**cluster.kwargs())
