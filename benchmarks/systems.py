"""The systems the benchmarks compare, behind one pool interface.

``mp`` (``multiprocessing.Pool(2)``, the baseline), ``achilles-local`` (the embedded
cluster), ``achilles-cli`` (a server and nodes started with the CLI, through
:mod:`achilles.testing`), and the optional peers loky, Ray and Dask. A system starts,
outside any timing, what its pools need, and stops it again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from achilles.testing import Cluster, proc_table
from benchmarks.procfs import tree_memory

PROCESSES = 2  # every system runs two workers (the project's machines have 2 cores)
#: optional systems, and the modules each one needs
PEERS = {"loky": ["loky"], "ray": ["ray"], "dask": ["dask", "distributed"]}

_PIDFILE: list[str | None] = [None]


def set_pidfile(path: str | None) -> None:
    """Where :func:`register_session` writes (the child gets it from its runner)."""
    _PIDFILE[0] = path


def register_session(pid: int) -> None:
    """Tell the parent runner about a session we started (it cleans up after us)."""
    path = _PIDFILE[0]
    if path:
        with open(path, "a", encoding="ascii") as f:
            f.write(f"{pid}\n")


class PoolAdapter:
    """map / imap / imap_unordered / apply / close, as on ``multiprocessing.Pool``."""

    def __init__(self, pool: Any, close: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self._close = close

    def map(self, fn: Callable[..., Any], items: Any, chunksize: int | None = None) -> list[Any]:
        if chunksize is None:
            return self.pool.map(fn, items)
        return self.pool.map(fn, items, chunksize)

    def imap(self, fn: Callable[..., Any], items: Any, chunksize: int = 1) -> Iterator[Any]:
        return self.pool.imap(fn, items, chunksize)

    def imap_unordered(
        self, fn: Callable[..., Any], items: Any, chunksize: int = 1
    ) -> Iterator[Any]:
        return self.pool.imap_unordered(fn, items, chunksize)

    def apply(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.pool.apply(fn, args)

    def close(self) -> None:
        if self._close is not None:
            self._close()
        else:
            self.pool.terminate()
            self.pool.join()


class System:
    """How to start (outside any timing) and stop what a pool needs, and make pools."""

    name = "?"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def setup(self, nodes: int = 2) -> None:
        pass

    def new_pool(self) -> PoolAdapter:
        raise NotImplementedError

    def memory(self, pool: PoolAdapter | None) -> dict[str, Any]:
        """RSS of the processes that do the work (not the caller)."""
        return {"workers": tree_memory(self._children())}

    def teardown(self) -> None:
        pass

    @staticmethod
    def _children() -> list[int]:
        me = os.getpid()
        return [pid for pid, (ppid, _, _) in proc_table().items() if ppid == me]


class MpSystem(System):
    """multiprocessing.Pool(2): the baseline of every ratio."""

    name = "mp"

    def new_pool(self) -> PoolAdapter:
        import multiprocessing

        return PoolAdapter(multiprocessing.Pool(PROCESSES))

    def memory(self, pool: PoolAdapter | None) -> dict[str, Any]:
        if pool is None:
            return {}
        return {"workers": tree_memory(p.pid for p in pool.pool._pool)}


class AchillesLocalSystem(System):
    """achilles.Pool(2) with nothing configured: the embedded cluster."""

    name = "achilles-local"

    def setup(self, nodes: int = 2) -> None:
        """Refuse to run with anything configured: the pool would not be the embedded one."""
        from achilles.config import user_config_dir

        leftovers = sorted(k for k in os.environ if k.startswith("ACHILLES_"))
        dotenvs = [
            p for p in (".env", os.path.join(user_config_dir(), ".env")) if os.path.exists(p)
        ]
        if leftovers or dotenvs:
            raise RuntimeError(
                f"achilles-local must run with nothing configured; found "
                f"{leftovers or ''} {' '.join(dotenvs)}"
            )
        import achilles  # noqa: F401  (imported outside the timings)

    def new_pool(self) -> PoolAdapter:
        import achilles

        # The embedded server and node run in this process (its reactor thread); the
        # fork server and workers are in this child's process group, which the runner
        # stops.
        pool = achilles.Pool(PROCESSES)
        return PoolAdapter(pool, pool.terminate)

    def memory(self, pool: PoolAdapter | None) -> dict[str, Any]:
        local = getattr(pool.pool, "_local", None) if pool is not None else None
        if local is None:
            return {}
        # The server and the node are in the caller (its RSS); the fork server and the
        # workers are separate processes.
        return {"workers (fork server + workers)": tree_memory(local.pids())}


class AchillesCliSystem(System):
    """``python -m achilles server`` and ``node`` processes (see :mod:`achilles.testing`).

    The nodes run in an empty directory without PYTHONPATH, as on another machine: they
    get ``benchmarks.workloads`` from achilles's shipping of local sources.
    """

    name = "achilles-cli"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.cluster = Cluster(
            os.path.join(workdir, "cluster-cwd"),
            log_dir=os.path.join(workdir, "cluster-logs"),
            log_level="WARNING",
            keep_pythonpath=False,
            on_start=lambda proc: register_session(proc.pid),
        )
        self.cluster_s = float("nan")

    def setup(self, nodes: int = 2) -> None:
        import achilles  # noqa: F401

        t0 = time.perf_counter()
        self.cluster.start_server(timeout=30.0)
        for _ in range(nodes):
            self.cluster.start_node(wait=False)
        self.cluster.wait_nodes()
        self.cluster_s = time.perf_counter() - t0

    def new_pool(self) -> PoolAdapter:
        import achilles

        pool = achilles.Pool(**self.cluster.kwargs())
        return PoolAdapter(pool, pool.terminate)

    def memory(self, pool: PoolAdapter | None) -> dict[str, Any]:
        out = {"nodes": tree_memory(n.pid for n in self.cluster.nodes if n.alive())}
        if self.cluster.server is not None:
            out["server"] = tree_memory([self.cluster.server.pid])
        return out

    def teardown(self) -> None:
        self.cluster.stop()


class AchillesCliTlsSystem(AchillesCliSystem):
    """``achilles-cli`` with every connection in TLS (``ACHILLES_TLS=on``; on loopback it
    is otherwise plain TCP): what TLS costs, on the same work."""

    name = "achilles-cli-tls"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.cluster.extra_env["ACHILLES_TLS"] = "on"
        os.environ["ACHILLES_TLS"] = "on"  # this child's pools and status calls too


class LokySystem(System):
    """loky's reusable executor of 2 workers."""

    name = "loky"

    def new_pool(self) -> PoolAdapter:
        from loky import get_reusable_executor

        ex = get_reusable_executor(max_workers=PROCESSES)
        return PoolAdapter(_ExecutorPool(ex), lambda: ex.shutdown(wait=True, kill_workers=True))


class _ExecutorPool:
    """A concurrent.futures executor seen as a Pool (loky's own defaults: chunksize 1)."""

    def __init__(self, ex: Any) -> None:
        self.ex = ex

    def map(self, fn: Callable[..., Any], items: Any, chunksize: int = 1) -> list[Any]:
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def imap(self, fn: Callable[..., Any], items: Any, chunksize: int = 1) -> Iterator[Any]:
        return self.ex.map(fn, items, chunksize=chunksize)  # submits the whole input

    imap_unordered = imap

    def apply(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.ex.submit(fn, *args).result()


class RaySystem(System):
    """ray.util.multiprocessing.Pool(2)."""

    name = "ray"

    def new_pool(self) -> PoolAdapter:
        import ray
        from ray.util.multiprocessing import Pool

        pool = Pool(PROCESSES)

        def close() -> None:
            pool.terminate()
            ray.shutdown()

        return PoolAdapter(pool, close)


def _batch(fn: Callable[..., Any], chunk: list[Any]) -> list[Any]:
    """Run fn over a user-made batch (Dask has no chunksize of its own)."""
    return [fn(x) for x in chunk]


class _DaskPool:
    """Dask futures seen as a Pool: one task per item, or user-made batches."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def map(self, fn: Callable[..., Any], items: Any, chunksize: int | None = None) -> list[Any]:
        items = list(items)
        if chunksize is None:
            return self.client.gather(self.client.map(fn, items, pure=False))
        batches = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        parts = self.client.gather(
            self.client.map(_batch, [fn] * len(batches), batches, pure=False)
        )
        return [x for part in parts for x in part]

    def imap(self, fn: Callable[..., Any], items: Any, chunksize: int = 1) -> Iterator[Any]:
        """Batches of ``chunksize`` with a window of 4 per worker, in order."""
        from collections import deque

        it = iter(items)
        window: deque[Any] = deque()
        while True:
            while len(window) < 4 * PROCESSES:
                chunk = [x for _, x in zip(range(chunksize), it)]
                if not chunk:
                    break
                window.append(self.client.submit(_batch, fn, chunk, pure=False))
            if not window:
                return
            yield from window.popleft().result()

    imap_unordered = imap

    def apply(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.client.submit(fn, *args, pure=False).result()


class DaskSystem(System):
    """A Dask LocalCluster of 2 one-thread worker processes."""

    name = "dask"

    def new_pool(self) -> PoolAdapter:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=PROCESSES, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()

        return PoolAdapter(_DaskPool(client), close)


SYSTEM_CLASSES: dict[str, type[System]] = {
    c.name: c
    for c in (
        MpSystem,
        AchillesLocalSystem,
        AchillesCliSystem,
        AchillesCliTlsSystem,
        LokySystem,
        RaySystem,
        DaskSystem,
    )
}
