"""Load balancing is pull-based: a node with more workers gets proportionally more."""
from __future__ import annotations

import tasks

from achilles import Pool


def test_node_with_twice_the_workers_does_about_twice_the_work(fresh_cluster):
    """With a 2-worker and a 1-worker node, the 2-worker node runs about 2/3 of the
    chunks (pull-based slots, not round robin)."""
    cluster = fresh_cluster(nodes=0)
    cluster.start_node(processes=2)
    cluster.start_node(processes=1)
    with Pool(**cluster.kwargs()) as pool:
        assert pool.map(tasks.sleep_then_square, range(90), chunksize=1) == \
            [x * x for x in range(90)]
    done = sorted(n["done"] for n in cluster.status()["nodes"])
    share = done[1] / sum(done)
    assert 0.55 <= share <= 0.8, done
