"""Peers that die, freeze or restart in the middle of a job: every result arrives
exactly once, nothing hangs, and the cluster keeps serving."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
import tasks
from conftest import wait_until

import achilles
from achilles import Pool

pytestmark = pytest.mark.chaos

SEED = int(os.environ.get("ACHILLES_CHAOS_SEED", random.randrange(1 << 30)))


@pytest.fixture
def rng():
    print(f"chaos seed {SEED} (set ACHILLES_CHAOS_SEED to repeat)")
    return random.Random(SEED)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def pool_workers(node_pid: int) -> list[int]:
    """A node's pool workers: the children of its forkserver (grandchildren of the node)."""
    return [w for c in children(node_pid) for w in children(c)]


def busy(cluster, done: int = 3) -> bool:
    nodes = cluster.status()["nodes"]
    return sum(n["done"] for n in nodes) >= done and all(n["inflight"] for n in nodes)


EXPECTED = [x * x for x in range(240)]


@pytest.mark.parametrize("group", [False, True], ids=["node-process", "process-group"])
def test_sigkill_node_mid_map(fresh_cluster, rng, group):
    """SIGKILL of one of two nodes (or its whole process group) mid-map still gives the
    complete, ordered result, and later jobs run."""
    cluster = fresh_cluster(nodes=2, processes=1)
    victim = cluster.nodes[rng.randrange(2)]
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(tasks.sleep_then_square, range(240), chunksize=2)
        wait_until(lambda: busy(cluster, rng.randrange(2, 20)), 30, what="both nodes busy")
        victim.signal(signal.SIGKILL, group=group)
        assert result.get(120) == EXPECTED
        assert pool.map(tasks.square, range(10)) == [x * x for x in range(10)]
    assert cluster.node_count() == 1


def test_sigkill_pool_worker(fresh_cluster, rng):
    """SIGKILL of a node's pool worker mid-map: the node replaces its pool, the chunk is
    retried, the result is complete, and the node stays in the cluster."""
    cluster = fresh_cluster(nodes=1, processes=2)
    node = cluster.nodes[0]
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(tasks.sleep_then_square, range(240), chunksize=2)
        wait_until(lambda: busy(cluster, rng.randrange(2, 20)), 30, what="node busy")
        workers = wait_until(lambda: pool_workers(node.pid), 10, what="worker pids")
        os.kill(rng.choice(workers), signal.SIGKILL)
        assert result.get(120) == EXPECTED
        assert pool.map(tasks.square, range(10)) == [x * x for x in range(10)]
    assert node.alive() and cluster.node_count() == 1


def test_frozen_node_is_dropped_and_comes_back(fresh_cluster, rng):
    """A node frozen with SIGSTOP is declared lost after the heartbeat timeout and its
    chunks reassigned; after SIGCONT it reconnects and gets new work."""
    cluster = fresh_cluster(nodes=0)
    cluster.server.stop()
    cluster.start_server(port=0, ACHILLES_HEARTBEAT_TIMEOUT="2")
    fast = dict(ACHILLES_HEARTBEAT_INTERVAL="0.3", ACHILLES_HEARTBEAT_TIMEOUT="2")
    frozen = cluster.start_node(1, **fast)
    cluster.start_node(1, **fast)
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(tasks.sleep_then_square, range(240), chunksize=2)
        wait_until(lambda: busy(cluster, rng.randrange(2, 20)), 30, what="both nodes busy")
        frozen.signal(signal.SIGSTOP)
        try:
            assert result.get(120) == EXPECTED
            assert cluster.node_count() == 1
        finally:
            frozen.signal(signal.SIGCONT)
        wait_until(lambda: cluster.node_count() == 2, 30, what="the frozen node to return")
        pids = set(pool.map(tasks.pid, range(40), chunksize=1))
        assert len(pids) == 2  # both nodes' workers took part


def test_server_restart_mid_job(fresh_cluster, rng):
    """SIGKILL the server mid-job and start it again on the same port: nodes and the
    controller reconnect, unfinished chunks are re-sent, the result is exactly once."""
    cluster = fresh_cluster(nodes=2, processes=1)
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(tasks.sleep_then_square, range(240), chunksize=2)
        wait_until(lambda: busy(cluster, rng.randrange(2, 30)), 30, what="both nodes busy")
        port = cluster.port
        cluster.server.signal(signal.SIGKILL)
        cluster.server.popen.wait(10)
        cluster.start_server(port=port)
        assert result.get(120) == EXPECTED
        wait_until(lambda: cluster.node_count() == 2, 30, what="nodes to reconnect")
        assert pool.map(tasks.square, range(10)) == [x * x for x in range(10)]


def test_server_gone_for_good(fresh_cluster, monkeypatch):
    """If the server does not come back within the reconnect timeout, the caller gets
    ConnectionLostError instead of a hang."""
    monkeypatch.setenv("ACHILLES_RECONNECT_TIMEOUT", "2")
    cluster = fresh_cluster(nodes=1)
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(tasks.sleep_for, [30.0])
        wait_until(lambda: cluster.status()["nodes"][0]["inflight"], 20, what="work started")
        cluster.server.signal(signal.SIGKILL)
        with pytest.raises(achilles.ConnectionLostError, match="cannot reach"):
            result.get(60)
        with pytest.raises(achilles.ConnectionLostError):
            pool.map(tasks.square, [1])


CONTROLLER = """
import sys, tasks
from achilles import Pool
with Pool(host="127.0.0.1", port={port}, secret_key="{secret}") as pool:
    r = pool.map_async(tasks.sleep_for, [30.0] * 8, chunksize=1)
    print("submitted", flush=True)
    r.get()
"""


def test_controller_killed_frees_the_nodes(cluster, tmp_path):
    """When a controller dies mid-job its jobs are cancelled and the nodes freed for the
    next caller."""
    code = CONTROLLER.format(port=cluster.port, secret=cluster.secret)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=tests_dir),
        cwd=tmp_path,
    )
    try:
        wait_until(
            lambda: all(n["inflight"] for n in cluster.status()["nodes"]),
            30,
            what="the controller's job to occupy the nodes",
        )
        proc.kill()
        proc.wait(10)
        wait_until(lambda: not cluster.status()["jobs"], 10, what="its job to be cancelled")
        with Pool(**cluster.kwargs()) as pool:
            # both workers would be asleep for 30 s if the dead job still held them
            assert pool.map_async(tasks.square, range(4), chunksize=1).get(10) == [0, 1, 4, 9]
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_exception_ends_the_job_once_every_task_ran(cluster):
    """A task that raises does not stop its job (as with multiprocessing, the other
    tasks run); map raises it at the end, and the server forgets the job: the next job
    gets both workers at once."""
    with Pool(**cluster.kwargs()) as pool:
        with pytest.raises(tasks.Boom):
            pool.map(tasks.fail_at_five, range(8), chunksize=1)
        wait_until(lambda: not cluster.status()["jobs"], 5, what="the job to be dropped")
        assert pool.map_async(tasks.square, range(4), chunksize=1).get(10) == [0, 1, 4, 9]


def test_slow_consumer_bounds_buffering(cluster):
    """A caller that stops iterating imap stops the input being read, and the server holds
    at most the job's window of chunks."""
    pulled = []

    def source():
        for i in range(100_000):
            pulled.append(i)
            yield i

    with Pool(**cluster.kwargs()) as pool:
        it = pool.imap(tasks.square, source(), chunksize=10)
        assert next(it) == 0

        def settled():
            jobs = cluster.status()["jobs"]
            return jobs and jobs[0]["inflight"] == 0 and jobs[0]["queued"] == 0

        wait_until(settled, 20, what="the job to drain its window")
        window = it._handle.core.window
        assert len(pulled) <= (window + 2) * 10
        job = cluster.status()["jobs"][0]
        assert job["done"] <= window + 1
        assert list(it) == [x * x for x in range(1, 100_000)]
