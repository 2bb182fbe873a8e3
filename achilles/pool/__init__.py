"""The blocking public API: ``Pool`` as in ``multiprocessing.pool``, across a cluster.

    pool.py         Pool: the map family, apply, lifecycle
    results.py      ApplyResult (AsyncResult), IMapIterator: what the calls return
    feeding.py      a job's plan and chunks, the thread that feeds it, map's collector
    connections.py  the connections pools share (one per cluster), and fork handling

The seed-style one-call ``map``/``imap``/``imap_unordered`` live in
:mod:`achilles.oneshot`, ``killCluster``/``getClusterStatus`` in :mod:`achilles.admin`;
both are re-exported here, where they always were.
"""

from achilles.config import cluster_configured as _cluster_configured


def _start_fork_server_early() -> None:
    """Nothing configured: the first Pool will be the embedded cluster, whose workers
    come from a fork server, a fresh interpreter that takes ~0.1 s to start. Started
    when ``Pool`` is first imported, it starts while this process imports Twisted
    (~0.15 s) instead of after (the embedded start-up, S, see docs/benchmarks.md). Not
    in a child process (a pool's worker importing the user's module, a process of
    ``multiprocessing``): those rarely make a pool, and a fork server each would be a
    process per worker. A pool given ``host=`` then leaves it idle; it exits with us."""
    import multiprocessing

    if multiprocessing.parent_process() is not None or _cluster_configured():
        return
    try:
        import multiprocess

        if multiprocess.parent_process() is not None:
            return
        from achilles.node import worker

        worker.context()
    except Exception:  # the Pool tries again, and says what is wrong
        pass


_start_fork_server_early()

from achilles.admin import getClusterStatus, killCluster
from achilles.errors import SerializationError
from achilles.oneshot import imap, imap_unordered, map
from achilles.pool.connections import _controllers as _controllers
from achilles.pool.feeding import _item_bytes as _item_bytes
from achilles.pool.pool import MAX_APPLY_JOBS as MAX_APPLY_JOBS
from achilles.pool.pool import Pool
from achilles.pool.results import ApplyResult, AsyncResult, IMapIterator, MapResult
from achilles.pool.results import IMapUnorderedIterator as IMapUnorderedIterator

__all__ = [
    "ApplyResult",
    "AsyncResult",
    "IMapIterator",
    "MapResult",
    "Pool",
    "SerializationError",
    "getClusterStatus",
    "imap",
    "imap_unordered",
    "killCluster",
    "map",
]
