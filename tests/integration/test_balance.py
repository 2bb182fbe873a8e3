"""Load balancing is pull-based: a node with more workers is given proportionally more."""

from __future__ import annotations

import collections

import tasks

from achilles import Pool


def test_node_with_twice_the_workers_runs_twice_the_chunks_at_once(fresh_cluster, tmp_path):
    """A 2-worker and a 1-worker node: three chunks that can only finish if all three run
    at the same time do finish, so the 2-worker node was given two of them and the
    1-worker node one (slots, not round robin, which would queue two on the small node
    and make them wait for each other). No timing is measured."""
    cluster = fresh_cluster(nodes=0)
    cluster.start_node(processes=2)
    cluster.start_node(processes=1)
    with Pool(**cluster.kwargs()) as pool:
        met = pool.map(tasks.rendezvous, [(str(tmp_path), 3, i) for i in range(3)], chunksize=1)
    assert all(ok for ok, _ in met), met
    per_node = sorted(collections.Counter(node for _, node in met).values())
    assert per_node == [1, 2], met
