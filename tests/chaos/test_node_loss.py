"""A node killed in the middle of a job: its chunks go elsewhere, nothing is lost or
duplicated."""
from __future__ import annotations

import signal

import pytest
from conftest import wait_until

from achilles import Pool

pytestmark = pytest.mark.chaos


def slow_square(x):
    import time
    time.sleep(0.02)
    return x * x


@pytest.mark.parametrize("group", [False, True], ids=["node-process", "process-group"])
def test_sigkill_node_mid_map(fresh_cluster, group):
    """SIGKILL of one of two nodes mid-map still gives the complete, ordered result."""
    cluster = fresh_cluster(nodes=2, processes=1)
    victim = cluster.nodes[0]
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(slow_square, range(300), chunksize=2)
        def victim_busy():
            nodes = cluster.status()["nodes"]
            return any(n["done"] >= 5 for n in nodes) and all(n["inflight"] for n in nodes)

        wait_until(victim_busy, 30, what="both nodes busy")
        victim.signal(signal.SIGKILL, group=group)
        assert result.get(120) == [x * x for x in range(300)]
        assert pool.map(slow_square, range(10)) == [x * x for x in range(10)]
    assert cluster.node_count() == 1
