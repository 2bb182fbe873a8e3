"""The benchmark runner: ``python -m benchmarks [--quick] [--only W1,W4] [--systems ...]``.

The parent process (``main``) calibrates W2, then runs every (system, workload) pair in
a fresh child process (``python -m benchmarks --child SPEC``) with a time limit, reads
the child's figures from a JSON file the child rewrites after every case (so a child
killed at its time limit still reports what it finished), prints a table with ratios
against ``multiprocessing.Pool(2)`` measured in the same run, and writes everything to
``benchmarks/results/<timestamp>.json``.

Every process started here (children, CLI servers and nodes) runs in its own session
and is stopped by PID: SIGTERM to it, then SIGKILL to its process group. A child
writes the PID of every session it starts to a file its parent reads, so nothing
survives a child killed at its time limit.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROCESSES = 2  # every system runs two workers (the project's machines have 2 cores)

SYSTEMS = ["mp", "achilles-local", "achilles-cli"]
PEERS = {"loky": ["loky"], "ray": ["ray"], "dask": ["dask", "distributed"]}
WORKLOADS = ["S", "W1", "W2", "W3", "W4", "W5", "W6", "W7"]
OTHER_LOAD_WARN = 0.3  # cores used by other processes during a child: flagged in the notes
ONLY_ON = {"W6": {"achilles-cli"}, "W7": {"achilles-cli"}}

FULL = dict(reps=3, timeout=300.0, w1_items=1_000_000, w2_tasks=400, w2_task_ms=10.0,
            w3_args=64, w3_mib=4, w4_calls=300, w5_items=2_000_000, w5_chunksize=10_000,
            w6_nodes=[1, 2, 4, 8], w6_chunks=2000, w7_tasks=400)
QUICK = dict(reps=1, timeout=60.0, w1_items=200_000, w2_tasks=100, w2_task_ms=10.0,
             w3_args=16, w3_mib=4, w4_calls=50, w5_items=200_000, w5_chunksize=10_000,
             w6_nodes=[1, 2], w6_chunks=200, w7_tasks=100)


# =====================================================================================
# /proc readings
# =====================================================================================
def _status_kib(pid: int | str, *keys: str) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def self_mib(key: str) -> float:
    """VmRSS or VmHWM of this process, MiB."""
    return _status_kib("self", key).get(key, 0) / 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) for every process, from /proc/<pid>/stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def tree_memory(roots: Iterable[int]) -> dict[str, Any]:
    """Summed VmRSS and VmHWM (MiB) of the live processes under ``roots`` (inclusive).

    Forked workers share pages, which each one's RSS counts: an upper bound.
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    rss = hwm = 0
    count = 0
    for pid in seen:
        if table[pid][2] == "Z":
            continue
        kib = _status_kib(pid, "VmRSS", "VmHWM")
        if kib:
            count += 1
            rss += kib.get("VmRSS", 0)
            hwm += kib.get("VmHWM", 0)
    return {"rss_mib": round(rss / 1024, 1), "peak_mib": round(hwm / 1024, 1), "procs": count}


def cpu_busy() -> tuple[float, float]:
    """(busy CPU s of the whole machine, of which stolen by the hypervisor), /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


class TreeCpu:
    """CPU s used by a process and all its descendants, sampled from /proc.

    Each sample records every descendant's own utime+stime, keyed by (pid, start time);
    the total is the sum of the last values seen. This counts descendants that die
    without being reaped by the tree (a node's workers after SIGKILL of its group),
    which RUSAGE_CHILDREN misses; it misses at most one interval of a process's life.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[tuple[int, str], float] = {}

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            try:
                with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            self.seen[(pid, fields[19])] = (int(fields[11]) + int(fields[12])) / CLK_TCK

    def total(self) -> float:
        return sum(self.seen.values())


def children_cpu() -> float:
    """CPU s used by this process's waited-for descendants (RUSAGE_CHILDREN)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def group_members(pgid: int) -> list[int]:
    return [pid for pid, (_, g, state) in _proc_table().items() if g == pgid and state != "Z"]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime+stime from /proc/<pid>/stat in s, on-CPU time from schedstat in s).

    stat counts clock ticks (10 ms); schedstat (summed over threads) is in ns.
    """
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    sched = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                sched += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        sched = -1
    return ticks / CLK_TCK, (sched / 1e9 if sched >= 0 else float("nan"))


# =====================================================================================
# Processes: started in their own session, stopped by PID
# =====================================================================================
def wait_until(pred: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05, alive: Callable[[], bool] | None = None) -> Any:
    """Poll ``pred`` until it returns something truthy; raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"process died while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # the poll interval of a deadline wait


def register_session(pid: int) -> None:
    """Tell the parent runner about a session we started (it cleans up after us)."""
    path = _PIDFILE[0]
    if path:
        with open(path, "a", encoding="ascii") as f:
            f.write(f"{pid}\n")


_PIDFILE: list[str | None] = [None]


def stop_group(pid: int, timeout: float = 5.0, popen: subprocess.Popen | None = None) -> bool:
    """SIGTERM ``pid``, wait, then SIGKILL its process group. True if anything was left."""
    left = False
    alive = (popen.poll() is None) if popen is not None else bool(group_members(pid))
    if alive:
        left = True
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            if popen is not None:
                popen.wait(timeout)
            else:
                wait_until(lambda: not group_members(pid), timeout, f"group {pid} to exit")
        except (subprocess.TimeoutExpired, RuntimeError):
            pass
    if group_members(pid):
        left = True
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            wait_until(lambda: not group_members(pid), timeout, f"group {pid} to die")
        except RuntimeError:
            pass
    if popen is not None:
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    return left


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any ACHILLES_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env.update(extra)
    return env


class Proc:
    """A CLI process in its own session, output to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: str, log: str) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                          start_new_session=True)
        self.pid = self.popen.pid
        register_session(self.pid)

    def output(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_group(self) -> None:
        """SIGKILL the process and everything in its group (a machine dying)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def stop(self) -> None:
        stop_group(self.pid, popen=self.popen)


class CliCluster:
    """``python -m achilles server`` and ``node`` processes on 127.0.0.1, a free port.

    Nodes run in an empty directory without PYTHONPATH, as on another machine: they
    get ``benchmarks.workloads`` from achilles's shipping of local sources.
    """

    def __init__(self, workdir: str) -> None:
        self.secret = secrets.token_hex(16)
        self.cwd = os.path.join(workdir, "cluster-cwd")
        self.logs = os.path.join(workdir, "cluster-logs")
        os.makedirs(self.cwd, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        self.server: Proc | None = None
        self.nodes: list[Proc] = []
        self.port = 0
        self._started = 0

    def _env(self) -> dict[str, str]:
        env = clean_env(ACHILLES_SECRET_KEY=self.secret, PYTHONUNBUFFERED="1",
                        ACHILLES_LOG_LEVEL="WARNING")
        env.pop("PYTHONPATH", None)
        return env

    def start_server(self, timeout: float = 30.0) -> None:
        self.server = Proc([sys.executable, "-m", "achilles", "server", "--host", "127.0.0.1",
                            "--port", "0"], self._env(), self.cwd,
                           os.path.join(self.logs, "server.log"))
        server = self.server
        match = wait_until(lambda: re.search(r"listening on [\d.]+:(\d+)", server.output()),
                           timeout, "the server's port", alive=server.alive)
        self.port = int(match.group(1))

    def start_node(self) -> Proc:
        self._started += 1
        node = Proc([sys.executable, "-m", "achilles", "node", "--host", "127.0.0.1",
                     "--port", str(self.port), "--processes", "1"], self._env(), self.cwd,
                    os.path.join(self.logs, f"node{self._started}.log"))
        self.nodes.append(node)
        return node

    def status(self) -> dict[str, Any]:
        from achilles import getClusterStatus
        return getClusterStatus(host="127.0.0.1", port=self.port, secret_key=self.secret)

    def node_pids(self) -> set[int]:
        return {int(n["name"].rsplit(":", 1)[1]) for n in self.status()["nodes"]}

    def wait_nodes(self, timeout: float = 60.0) -> None:
        """Wait until exactly the live nodes we started are registered."""
        want = {n.pid for n in self.nodes if n.alive()}
        wait_until(lambda: self.node_pids() == want, timeout,
                   f"{len(want)} node(s) to be registered", interval=0.1,
                   alive=lambda: self.server is not None and self.server.alive())

    def kwargs(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "secret_key": self.secret}

    def stop(self) -> None:
        for proc in [*self.nodes, *([self.server] if self.server else [])]:
            proc.stop()


# =====================================================================================
# Systems: one pool interface over multiprocessing, achilles and the peers
# =====================================================================================
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

    def imap_unordered(self, fn: Callable[..., Any], items: Any,
                       chunksize: int = 1) -> Iterator[Any]:
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
        return [pid for pid, (ppid, _, _) in _proc_table().items() if ppid == me]


class MpSystem(System):
    name = "mp"

    def new_pool(self) -> PoolAdapter:
        import multiprocessing
        return PoolAdapter(multiprocessing.Pool(PROCESSES))

    def memory(self, pool: PoolAdapter | None) -> dict[str, Any]:
        if pool is None:
            return {}
        return {"workers": tree_memory(p.pid for p in pool.pool._pool)}


class AchillesLocalSystem(System):
    name = "achilles-local"

    def setup(self, nodes: int = 2) -> None:
        leftovers = sorted(k for k in os.environ if k.startswith("ACHILLES_"))
        if leftovers or os.path.exists(".env"):
            raise RuntimeError(f"achilles-local must run with nothing configured; found "
                               f"{leftovers or ''} {'.env' if os.path.exists('.env') else ''}")
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
    name = "achilles-cli"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.cluster = CliCluster(workdir)
        self.cluster_s = float("nan")

    def setup(self, nodes: int = 2) -> None:
        import achilles  # noqa: F401
        t0 = time.perf_counter()
        self.cluster.start_server()
        for _ in range(nodes):
            self.cluster.start_node()
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


class LokySystem(System):
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
    return [fn(x) for x in chunk]


class _DaskPool:
    """Dask futures seen as a Pool: one task per item, or user-made batches."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def map(self, fn: Callable[..., Any], items: Any, chunksize: int | None = None) -> list[Any]:
        items = list(items)
        if chunksize is None:
            return self.client.gather(self.client.map(fn, items, pure=False))
        batches = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
        parts = self.client.gather(self.client.map(_batch, [fn] * len(batches), batches,
                                                   pure=False))
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
    name = "dask"

    def new_pool(self) -> PoolAdapter:
        from distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=PROCESSES, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()
        return PoolAdapter(_DaskPool(client), close)


SYSTEM_CLASSES: dict[str, type[System]] = {
    c.name: c for c in (MpSystem, AchillesLocalSystem, AchillesCliSystem, LokySystem,
                        RaySystem, DaskSystem)}


# =====================================================================================
# Child side: the workloads
# =====================================================================================
class WrongResult(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise WrongResult(what)


class Recorder:
    """The child's results, rewritten to disk after every case."""

    def __init__(self, path: str, skip: list[str]) -> None:
        self.path = path
        self.skip = set(skip)
        self.data: dict[str, Any] = {"figures": {}, "errors": {}, "memory": {}, "notes": [],
                                     "done": [], "current": None, "finished": False}
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, default=str)
        os.replace(tmp, self.path)

    def cases(self, names: Iterable[str]) -> Iterator[str]:
        for name in names:
            if name not in self.skip:
                yield name

    def run(self, case: str, fn: Callable[[], None]) -> None:
        """Run one case; an exception or a wrong result is recorded, not raised."""
        self.data["current"] = case
        self.flush()
        try:
            fn()
        except WrongResult as exc:
            self.data["errors"][case] = f"wrong result: {exc}"
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            self.data["errors"][case] = (f"{type(exc).__name__}: {exc}\n"
                                         + traceback.format_exc(limit=8)[-1500:])
        self.data["done"].append(case)
        self.data["current"] = None
        self.flush()

    def figure(self, key: str, reps: list[float]) -> None:
        self.data["figures"][key] = {"reps": [float(r) for r in reps]}
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_s(system: System, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import trivial

    def case() -> None:
        times = []
        for _ in range(P["reps"]):
            dt, (pool, r) = timed(lambda: _start_and_call(system, trivial))
            pool.close()
            check(r == trivial(1), f"apply(trivial, (1,)) returned {r!r}")
            times.append(dt)
        rec.figure("S.s", times)
    for name in rec.cases(["startup"]):
        rec.run(name, case)
    if isinstance(system, AchillesCliSystem):
        rec.figure("S.cluster_s", [system.cluster_s])


def _start_and_call(system: System, fn: Callable[[int], int]) -> tuple[PoolAdapter, Any]:
    pool = system.new_pool()
    return pool, pool.apply(fn, (1,))


def run_w1(pool: PoolAdapter, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import square
    n = P["w1_items"]
    expected = [x * x for x in range(n)]

    def case(label: str, chunksize: int | None) -> None:
        times = []
        for _ in range(P["reps"]):
            dt, r = timed(lambda: pool.map(square, range(n), chunksize))
            check(r == expected, f"map(square, range({n}), chunksize={chunksize}) "
                                 f"differs from the squares (len {len(r)})")
            del r
            times.append(dt)
        rec.figure(f"W1.{label}.s", times)
        rec.figure(f"W1.{label}.items_per_s", [n / t for t in times])
    for name in rec.cases(["default", "cs10000"]):
        rec.run(name, lambda: case(name, None if name == "default" else 10_000))


def run_w2(pool: PoolAdapter, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import burn
    iters, checksum, serial = P["w2_iters"], P["w2_checksum"], P["w2_serial_s"]
    tasks = [(i, iters) for i in range(P["w2_tasks"])]
    expected = [(i, checksum) for i in range(P["w2_tasks"])]
    ideal = serial / PROCESSES

    def case(label: str, chunksize: int | None) -> None:
        times = []
        for _ in range(P["reps"]):
            dt, r = timed(lambda: pool.map(burn, tasks, chunksize))
            check(r == expected, f"map(burn, ..., chunksize={chunksize}) gave wrong results")
            times.append(dt)
        rec.figure(f"W2.{label}.s", times)
        rec.figure(f"W2.{label}.eff", [ideal / t for t in times])
    for name in rec.cases(["cs1", "default"]):
        rec.run(name, lambda: case(name, 1 if name == "cs1" else None))


def run_w3(pool: PoolAdapter, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import blob, echo, length
    size = P["w3_mib"] * MiB
    args = [blob(i, size) for i in range(P["w3_args"])]
    total_mib = len(args) * size / MiB

    def case(label: str) -> None:
        times = []
        for _ in range(P["reps"]):
            if label == "len":
                dt, r = timed(lambda: pool.map(length, args))
                check(r == [size] * len(args), f"len results {r[:3]}... not all {size}")
            else:
                dt, r = timed(lambda: pool.map(echo, args))
                check(len(r) == len(args) and all(a == b for a, b in zip(r, args)),
                      "echo did not return every argument unchanged and in order")
            del r
            times.append(dt)
        rec.figure(f"W3.{label}.s", times)
        rec.figure(f"W3.{label}.mib_s", [total_mib / t for t in times])
    for name in rec.cases(["len", "echo"]):
        rec.run(name, lambda: case(name))


def run_w4(pool: PoolAdapter, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import trivial
    calls = P["w4_calls"]

    def case() -> None:
        p50s, p90s, means = [], [], []
        for _ in range(P["reps"]):
            lat, results = [], []
            for _ in range(calls):
                t0 = time.perf_counter()
                results.append(pool.apply(trivial, (1,)))
                lat.append(time.perf_counter() - t0)
            check(results == [2] * calls, "apply(trivial, (1,)) did not always return 2")
            lat.sort()
            p50s.append(statistics.median(lat) * 1e6)
            p90s.append(lat[min(len(lat) - 1, int(0.9 * len(lat)))] * 1e6)
            means.append(statistics.fmean(lat) * 1e6)
        rec.figure("W4.p50_us", p50s)
        rec.figure("W4.p90_us", p90s)
        rec.figure("W4.mean_us", means)
    for name in rec.cases(["apply"]):
        rec.run(name, case)


def run_w5(pool: PoolAdapter, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import Pulled, small_ints, square, w5_expected
    n, cs = P["w5_items"], P["w5_chunksize"]
    expected = w5_expected(n)

    def case() -> None:
        walls, firsts, pulled_first, peaks, growths = [], [], [], [], []
        resettable = True
        for _ in range(P["reps"]):
            pulled = Pulled()
            gen = small_ints(n, pulled)
            resettable = reset_peak_rss() and resettable
            before = self_mib("VmRSS") if resettable else self_mib("VmHWM")
            t0 = time.perf_counter()
            it = iter(pool.imap(square, gen, cs))
            r = next(it)
            first = time.perf_counter() - t0
            at_first = pulled.count
            k, w = 1, r
            for r in it:  # consumed one by one
                k += 1
                w += k * r
            wall = time.perf_counter() - t0
            peak = self_mib("VmHWM")
            del it, gen
            check((k, w) == expected and pulled.count == n,
                  f"got {k} results (weighted sum {'ok' if w == expected[1] else 'wrong'}), "
                  f"input pulled {pulled.count} of {n}")
            walls.append(wall)
            firsts.append(first)
            pulled_first.append(at_first)
            peaks.append(peak)
            growths.append(peak - before)
        rec.figure("W5.s", walls)
        rec.figure("W5.first_s", firsts)
        rec.figure("W5.pulled_at_first", pulled_first)
        rec.figure("W5.pulled_frac", [p / n for p in pulled_first])
        rec.figure("W5.peak_rss_mib", peaks)
        rec.figure("W5.rss_growth_mib", growths)
        if not resettable:
            rec.note("VmHWM could not be reset: W5 peak is the lifetime peak, growth is "
                     "the rise of the lifetime peak")
    for name in rec.cases(["imap"]):
        rec.run(name, case)


def run_w6(system: System, pool: PoolAdapter, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import noop
    assert isinstance(system, AchillesCliSystem)
    cluster = system.cluster
    assert cluster.server is not None
    server = cluster.server.pid
    m = P["w6_chunks"]

    def case(nodes: int) -> None:
        while len(cluster.nodes) < nodes:
            cluster.start_node()
        cluster.wait_nodes()
        check(pool.map(noop, range(4 * nodes), 1) == [None] * 4 * nodes, "warm-up")
        rates, us_stat, us_sched = [], [], []
        for _ in range(P["reps"]):
            cpu0 = cpu_seconds(server)
            dt, r = timed(lambda: pool.map(noop, range(m), 1))
            cpu1 = cpu_seconds(server)
            check(r == [None] * m, "map(noop, ..., chunksize=1) gave wrong results")
            rates.append(m / dt)
            us_stat.append((cpu1[0] - cpu0[0]) / m * 1e6)
            us_sched.append((cpu1[1] - cpu0[1]) / m * 1e6)
        rec.figure(f"W6.{nodes}.chunks_per_s", rates)
        rec.figure(f"W6.{nodes}.server_us_per_chunk", us_stat)
        rec.figure(f"W6.{nodes}.server_us_per_chunk_sched", us_sched)
        rec.data["memory"][f"W6 {nodes} nodes"] = system.memory(pool)
    for name in rec.cases([f"{n}nodes" for n in P["w6_nodes"]]):
        rec.run(name, lambda: case(int(name[:-5])))


def run_w7(system: System, pool: PoolAdapter, P: dict[str, Any], rec: Recorder) -> None:
    from benchmarks.workloads import burn
    assert isinstance(system, AchillesCliSystem)
    cluster = system.cluster
    iters, checksum, serial = P["w2_iters"], P["w2_checksum"], P["w2_serial_s"]
    ntasks = P["w7_tasks"]
    tasks = [(i, iters) for i in range(ntasks)]
    expected = [(i, checksum) for i in range(ntasks)]
    serial = serial * ntasks / P["w2_tasks"]

    kill_at: list[float] = []

    def run(kill: bool) -> float:
        results = []
        victim = cluster.nodes[-1]
        t0 = time.perf_counter()
        for r in pool.imap_unordered(burn, tasks, 1):
            results.append(r)
            if kill and len(results) == ntasks // 2:
                kill_at.append(time.perf_counter() - t0)
                victim.kill_group()  # SIGKILL the node and its workers, as a machine dies
        wall = time.perf_counter() - t0
        check(not kill or not victim.alive(), "the node to kill was still alive")
        check(sorted(results) == expected,
              f"{len(results)} results, {len(set(results))} distinct, of {ntasks} tasks")
        return wall

    def case() -> None:
        calm, killed, ratios = [], [], []
        for _ in range(P["reps"]):
            cluster.wait_nodes()  # both nodes registered, nothing stale
            a = run(kill=False)
            b = run(kill=True)
            calm.append(a)
            killed.append(b)
            ratios.append(b / a)
            cluster.nodes = [n for n in cluster.nodes if n.alive()]
            cluster.wait_nodes()  # the killed one is gone from the server
            cluster.start_node()
        cluster.wait_nodes()
        rec.figure("W7.undisturbed_s", calm)
        rec.figure("W7.undisturbed_eff", [serial / PROCESSES / t for t in calm])
        rec.figure("W7.killed_s", killed)
        rec.figure("W7.ratio", ratios)
        rec.figure("W7.kill_at_s", kill_at)
    for name in rec.cases(["kill"]):
        rec.run(name, case)


def warm_up(pool: PoolAdapter) -> None:
    from benchmarks.workloads import square, trivial
    check(pool.apply(trivial, (1,)) == 2, "warm-up apply")
    check(pool.map(square, range(1000)) == [x * x for x in range(1000)], "warm-up map")


def child_main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    _PIDFILE[0] = spec["pidfile"]
    P = spec["params"]
    rec = Recorder(spec["out"], spec["skip"])
    workload = spec["workload"]
    system = SYSTEM_CLASSES[spec["system"]](spec["workdir"])
    pool = None
    rec.data["current"] = "setup"
    rec.flush()
    try:
        system.setup(nodes=1 if workload == "W6" else 2)
        rec.data["current"] = None
        if workload == "S":
            run_s(system, P, rec)
        else:
            pool = system.new_pool()
            warm_up(pool)
            if workload == "W6":
                run_w6(system, pool, P, rec)
            elif workload == "W7":
                run_w7(system, pool, P, rec)
            else:
                {"W1": run_w1, "W2": run_w2, "W3": run_w3, "W4": run_w4,
                 "W5": run_w5}[workload](pool, P, rec)
            rec.data["memory"].update(system.memory(pool))
        rec.data["memory"]["caller"] = {
            "rss_mib": round(self_mib("VmRSS"), 1),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    except Exception as exc:  # noqa: BLE001
        rec.data["errors"]["setup"] = (f"{type(exc).__name__}: {exc}\n"
                                       + traceback.format_exc(limit=8)[-1500:])
    finally:
        rec.data["current"] = "teardown"
        rec.flush()
        t0 = time.perf_counter()
        if pool is not None:
            try:
                pool.close()
            except Exception as exc:  # noqa: BLE001
                rec.data["errors"]["teardown"] = f"pool.close(): {type(exc).__name__}: {exc}"
        try:
            system.teardown()
        except Exception as exc:  # noqa: BLE001
            rec.data["errors"]["teardown"] = f"{type(exc).__name__}: {exc}"
        rec.data["teardown_s"] = time.perf_counter() - t0
        rec.data["current"] = None
        rec.data["finished"] = True
        rec.flush()
    return 0


# =====================================================================================
# Parent side
# =====================================================================================
def cases_of(workload: str, P: dict[str, Any]) -> list[str]:
    return {"S": ["startup"], "W1": ["default", "cs10000"], "W2": ["cs1", "default"],
            "W3": ["len", "echo"], "W4": ["apply"], "W5": ["imap"],
            "W6": [f"{n}nodes" for n in P["w6_nodes"]], "W7": ["kill"]}[workload]


def calibrate(P: dict[str, Any]) -> dict[str, Any]:
    """Iterations for a task of ~w2_task_ms, and the serial time of all W2 tasks.

    The serial time is measured once, in batches of 10 tasks, as CPU time
    (``process_time``), and taken as the number of tasks times the fastest batch's time
    per task: the single-core speed with the least interference from other load (the
    machines are shared), so that load during calibration does not make the tasks
    shorter than intended or push efficiencies above 1. The wall time of the whole
    serial pass is kept in the JSON too.
    """
    from benchmarks.workloads import burn, calibrate_burn
    iters = calibrate_burn(P["w2_task_ms"] / 1000)
    checksum = burn((0, iters))[1]
    n = P["w2_tasks"]
    per_task = []
    t_all = time.perf_counter()
    for start in range(0, n, 10):
        batch = range(start, min(n, start + 10))
        t0 = time.process_time()
        for i in batch:
            burn((i, iters))
        per_task.append((time.process_time() - t0) / len(batch))
    elapsed = time.perf_counter() - t_all
    serial = min(per_task) * n
    return {"w2_iters": iters, "w2_checksum": checksum, "w2_serial_s": serial,
            "w2_serial_wall_s": elapsed, "w2_task_ms_measured": serial / n * 1000,
            "w2_task_ms_median": statistics.median(per_task) * 1000}


def tree_digest(path: str) -> str:
    """A digest of every .py file under ``path``: did achilles change during the run?"""
    import hashlib
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                h.update(full.encode())
                try:
                    with open(full, "rb") as f:
                        h.update(f.read())
                except OSError:
                    pass
    return h.hexdigest()[:16]


def _tail(path: str, n: int = 2500) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def run_child(system: str, workload: str, P: dict[str, Any], timeout: float,
              reps: int | None = None) -> dict[str, Any]:
    """Run one (system, workload) in fresh children until every case is done or failed."""
    params = dict(P, reps=reps or P["reps"])
    cases = cases_of(workload, params)
    merged: dict[str, Any] = {"system": system, "workload": workload, "figures": {},
                              "errors": {}, "memory": {}, "notes": [], "attempts": 0,
                              "child_wall_s": 0.0}
    skip: list[str] = []
    while True:
        merged["attempts"] += 1
        workdir = tempfile.mkdtemp(prefix=f"achilles-bench-{system}-{workload}-")
        cwd = os.path.join(workdir, "cwd")  # empty: no .env
        os.makedirs(cwd)
        spec = {"system": system, "workload": workload, "params": params, "skip": skip,
                "out": os.path.join(workdir, "out.json"),
                "pidfile": os.path.join(workdir, "sessions"), "workdir": workdir}
        spec_path = os.path.join(workdir, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        log = os.path.join(workdir, "child.log")
        env = clean_env(PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(
                            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        t0 = time.perf_counter()
        busy0, steal0 = cpu_busy()
        own0 = children_cpu()
        with open(log, "wb") as out:
            child = subprocess.Popen([sys.executable, "-m", "benchmarks", "--child", spec_path],
                                     cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        tree = TreeCpu(child.pid)
        deadline = time.monotonic() + timeout
        while child.poll() is None and time.monotonic() < deadline:
            tree.sample()
            try:
                child.wait(0.25)  # the sampling interval of a deadline wait
            except subprocess.TimeoutExpired:
                pass
        timed_out = child.poll() is None
        stop_group(child.pid, popen=child)
        wall = time.perf_counter() - t0
        busy1, steal1 = cpu_busy()
        merged["child_wall_s"] += wall
        own = max(children_cpu() - own0, tree.total())
        merged["own_cpu_s"] = merged.get("own_cpu_s", 0.0) + own
        merged["other_cpu_s"] = merged.get("other_cpu_s", 0.0) + max(
            0.0, (busy1 - busy0) - own)
        merged["steal_s"] = merged.get("steal_s", 0.0) + steal1 - steal0
        leaked = []
        try:
            with open(spec["pidfile"], encoding="ascii") as f:
                sessions = [int(x) for x in f.read().split()]
        except OSError:
            sessions = []
        for pid in sessions:
            if stop_group(pid) and not timed_out:
                leaked.append(pid)
        if leaked:
            merged["notes"].append(f"sessions still alive after the child exited (stopped "
                                   f"by the runner): {leaked}")
        try:
            with open(spec["out"], encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {"figures": {}, "errors": {}, "memory": {}, "notes": [], "done": [],
                    "current": None, "finished": False}
        for key, fig in data["figures"].items():
            merged["figures"].setdefault(key, {"reps": []})["reps"].extend(fig["reps"])
        merged["errors"].update(data["errors"])
        merged["memory"].update(data["memory"])
        merged["notes"].extend(data["notes"])
        merged["teardown_s"] = data.get("teardown_s")
        done = list(data.get("done", []))
        if timed_out:
            current = data.get("current") or ("setup" if not done else "between cases")
            merged["errors"][current] = (f"timeout: the child was still in {current!r} "
                                         f"after {timeout:g} s and was killed")
            merged["log_tail"] = _tail(log)
            skip = skip + done + ([current] if current in cases else [])
            if current in cases and any(c not in skip for c in cases):
                shutil.rmtree(workdir, ignore_errors=True)
                continue  # a fresh child for the cases after the one that hung
        elif not data.get("finished"):
            merged["errors"]["crash"] = (f"the child exited with code {child.returncode} "
                                         f"before finishing")
            merged["log_tail"] = _tail(log)
        elif merged["errors"]:
            merged["log_tail"] = _tail(log)
        shutil.rmtree(workdir, ignore_errors=True)
        break
    merged["other_load_cores"] = merged["other_cpu_s"] / max(merged["child_wall_s"], 1e-9)
    for fig in merged["figures"].values():
        fig["median"] = statistics.median(fig["reps"]) if fig["reps"] else None
    merged["status"] = ("timeout" if any(str(e).startswith("timeout") for e in
                                         merged["errors"].values())
                        else "error" if merged["errors"] else "ok")
    return merged


# --- presentation ----------------------------------------------------------------------
# (key, label, unit, ratio against mp?)
FIGURES: list[tuple[str, str, str, bool]] = [
    ("S.s", "S  start-up to first result", "s", True),
    ("S.cluster_s", "S  CLI server + 2 nodes registered", "s", False),
    ("W1.default.s", "W1 default chunking", "s", True),
    ("W1.default.items_per_s", "W1 default chunking", "items/s", True),
    ("W1.cs10000.s", "W1 chunksize=10000", "s", True),
    ("W1.cs10000.items_per_s", "W1 chunksize=10000", "items/s", True),
    ("W2.cs1.s", "W2 chunksize=1", "s", True),
    ("W2.cs1.eff", "W2 chunksize=1 efficiency", "", True),
    ("W2.default.s", "W2 default chunking", "s", True),
    ("W2.default.eff", "W2 default efficiency", "", True),
    ("W3.len.mib_s", "W3 len", "MiB/s", True),
    ("W3.echo.mib_s", "W3 echo", "MiB/s", True),
    ("W4.p50_us", "W4 apply latency p50", "us", True),
    ("W4.p90_us", "W4 apply latency p90", "us", True),
    ("W5.s", "W5 imap wall", "s", True),
    ("W5.first_s", "W5 time to first result", "s", True),
    ("W5.peak_rss_mib", "W5 caller peak RSS", "MiB", True),
    ("W5.rss_growth_mib", "W5 caller RSS growth", "MiB", True),
    ("W5.pulled_frac", "W5 input pulled at 1st result", "frac", False),
]
W6_FIGS = [("chunks_per_s", "", "chunks/s"),
           ("server_us_per_chunk", " server CPU (stat)", "us/chunk"),
           ("server_us_per_chunk_sched", " server CPU (schedstat)", "us/chunk")]
W7_FIGS: list[tuple[str, str, str, bool]] = [
    ("W7.undisturbed_s", "W7 W2 cs=1 via imap_unordered", "s", False),
    ("W7.killed_s", "W7 same, 1 of 2 nodes killed at 50%", "s", False),
    ("W7.kill_at_s", "W7 ... the kill happened at", "s", False),
    ("W7.ratio", "W7 killed / undisturbed (ideal 1.5)", "x", False),
]


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or v != v:
        return "-"
    if unit == "frac":
        return f"{v:.2f}"
    a = abs(v)
    if a >= 10_000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def figure_rows(P: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    rows = list(FIGURES)
    for n in P["w6_nodes"]:
        for key, what, unit in W6_FIGS:
            rows.append((f"W6.{n}.{key}", f"W6 {n} node{'s' if n > 1 else ''}{what}", unit,
                         False))
    return rows + W7_FIGS


def add_ratios(runs: list[dict[str, Any]], P: dict[str, Any]) -> None:
    """Each figure's ratio to mp's median in this run, and its label and unit."""
    meta = {key: (label, unit) for key, label, unit, _ in figure_rows(P)}
    base = {r["workload"]: r for r in runs if r["system"] == "mp"}
    for run in runs:
        ref = base.get(run["workload"])
        for key, fig in run["figures"].items():
            fig["label"], fig["unit"] = meta.get(key, (key, ""))
            mp = ref["figures"].get(key, {}).get("median") if ref else None
            fig["ratio_vs_mp"] = (fig["median"] / mp) if mp and fig["median"] is not None \
                else None


def render_table(runs: list[dict[str, Any]], systems: list[str], P: dict[str, Any]) -> str:
    by = {(r["system"], r["workload"]): r for r in runs}
    header = ["figure", "unit", *systems]
    lines = []
    for key, label, unit, with_ratio in figure_rows(P):
        workload = key.split(".")[0]
        cells, any_value = [], False
        for s in systems:
            run = by.get((s, workload))
            if run is None:
                cells.append("")
                continue
            fig = run["figures"].get(key)
            case = _case_of(key)
            err = run["errors"].get(case) or run["errors"].get("setup") \
                or (run["errors"].get("crash") if fig is None else None)
            if fig is None or fig.get("median") is None:
                cells.append(("TIMEOUT" if str(err).startswith("timeout") else "ERROR")
                             if err else "")
                any_value = any_value or bool(err)
                continue
            any_value = True
            cell = fmt(fig["median"], unit)
            if with_ratio and s != "mp" and fig.get("ratio_vs_mp") is not None:
                cell += f" ({fig['ratio_vs_mp']:.2f}x)"
            if err:
                cell += " !"
            cells.append(cell)
        if any_value:
            lines.append([label, unit if unit != "frac" else "", *cells])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    for row in lines:
        out.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                              *(c.rjust(w) for c, w in zip(row[2:], widths[2:]))]))
    return "\n".join(out)


def _case_of(key: str) -> str:
    parts = key.split(".")
    w = parts[0]
    if w in ("W1", "W2", "W3"):
        return parts[1]
    if w == "W6":
        return f"{parts[1]}nodes"
    return {"S": "startup", "W4": "apply", "W5": "imap", "W7": "kill"}[w]


def render_memory(runs: list[dict[str, Any]], systems: list[str]) -> str:
    lines = ["memory at the end of each workload, MiB: caller peak RSS | worker side "
             "peak RSS (sum of VmHWM over the processes doing the work)"]
    for run in runs:
        if run["system"] not in systems or not run["memory"]:
            continue
        mem = run["memory"]
        parts = []
        if "caller" in mem:
            parts.append(f"caller {fmt(mem['caller']['peak_mib'])}")
        for name, m in mem.items():
            if name != "caller" and isinstance(m, dict) and "peak_mib" in m:
                parts.append(f"{name} {fmt(m['peak_mib'])} ({m['procs']} procs, now "
                             f"{fmt(m['rss_mib'])})")
        lines.append(f"  {run['workload']:<3} {run['system']:<15} " + "; ".join(parts))
    return "\n".join(lines)


def render_load(runs: list[dict[str, Any]], systems: list[str]) -> str:
    """Cores used by other processes while each child ran (see README)."""
    by = {(r["system"], r["workload"]): r for r in runs}
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    width = max(len(s) for s in systems)
    lines = ["outside load: cores used by other processes while each child ran "
             f"(> {OTHER_LOAD_WARN} makes its figures unreliable)",
             "  " + " " * (width + 2) + "  ".join(w.rjust(5) for w in workloads)]
    for s in systems:
        cells = [f"{by[(s, w)]['other_load_cores']:.2f}" if (s, w) in by else "" for w in workloads]
        lines.append(f"  {s:<{width}}  " + "  ".join(c.rjust(5) for c in cells))
    return "\n".join(lines)


# (label, key, kind, target, stretch, systems or None)
TARGETS: list[tuple[str, str, str, float, float, set[str] | None]] = [
    ("W1 default: time <= 2.0x mp (stretch 1.3x)", "W1.default.s", "ratio_le", 2.0, 1.3, None),
    ("W1 cs=10000: time <= 2.0x mp (1.3x)", "W1.cs10000.s", "ratio_le", 2.0, 1.3, None),
    ("W2 cs=1: efficiency >= 0.90x mp (0.97x)", "W2.cs1.eff", "ratio_ge", 0.90, 0.97, None),
    ("W2 default: efficiency >= 0.90x mp (0.97x)", "W2.default.eff", "ratio_ge", 0.90, 0.97,
     None),
    ("W3 len: MiB/s >= 0.5x mp (0.8x)", "W3.len.mib_s", "ratio_ge", 0.5, 0.8, None),
    ("W3 echo: MiB/s >= 0.5x mp (0.8x)", "W3.echo.mib_s", "ratio_ge", 0.5, 0.8, None),
    ("W4 p50 <= 1000 us (500 us)", "W4.p50_us", "le", 1000, 500, None),
    ("W5: time <= 2.0x mp (1.3x)", "W5.s", "ratio_le", 2.0, 1.3, None),
    ("W5: caller RSS growth <= 30 MiB", "W5.rss_growth_mib", "le", 30, 30, None),
    ("S embedded cluster <= 1.5 s (0.5 s)", "S.s", "le", 1.5, 0.5, {"achilles-local"}),
    ("W6: server CPU <= 50 us/chunk at every node count (20)", "W6.*.server_us_per_chunk",
     "le", 50, 20, {"achilles-cli"}),
    ("W7: killed <= 1.5x undisturbed (1.25x)", "W7.ratio", "le", 1.5, 1.25, {"achilles-cli"}),
]


def evaluate_targets(runs: list[dict[str, Any]], P: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, key, kind, target, stretch, only in TARGETS:
        for run in runs:
            if not run["system"].startswith("achilles") or (only and run["system"] not in only):
                continue
            if key.split(".")[0] != run["workload"]:
                continue
            if "*" in key:
                figs = [run["figures"].get(key.replace("*", str(n))) for n in P["w6_nodes"]]
                vals = [f["median"] for f in figs if f and f.get("median") is not None]
                value = max(vals) if vals else None
                if vals:
                    label_x = f"{label}; spread max/min {max(vals) / max(min(vals), 1e-9):.2f}"
                else:
                    label_x = label
            else:
                fig = run["figures"].get(key) or {}
                value = fig.get("ratio_vs_mp") if kind.startswith("ratio") else fig.get("median")
                label_x = label
            if value is None:
                verdict = "no figure"
            else:
                le = kind.endswith("le")
                meets = (lambda lim: value <= lim) if le else (lambda lim: value >= lim)
                verdict = "stretch" if meets(stretch) else "target" if meets(target) \
                    else "MISSED"
            out.append({"target": label_x, "system": run["system"], "value": value,
                        "verdict": verdict})
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0], "python_full": sys.version,
        "implementation": platform.python_implementation(), "platform": platform.platform(),
        "machine": platform.machine(), "hostname": platform.node(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = models[0] if models else None
        info["mem_total_mib"] = round(_status_meminfo("MemTotal") / 1024)
    except OSError:
        pass
    try:
        import achilles
        info["achilles_version"] = achilles.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "achilles"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_head"] = head
        info["achilles_tree_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _status_meminfo(key: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "achilles benchmark suite: workloads S, W1-W7 of BENCHMARKS.md, each system in a "
        "fresh child process, figures with ratios against multiprocessing.Pool(2)."))
    p.add_argument("--quick", action="store_true",
                   help="one repetition, smaller sizes (see README): under two minutes")
    p.add_argument("--only", help=f"comma-separated workloads ({','.join(WORKLOADS)})")
    p.add_argument("--systems", help=f"comma-separated systems ({','.join(SYSTEMS)}, "
                                     f"{','.join(PEERS)})")
    p.add_argument("--peers", action="store_true",
                   help="also run loky, ray and dask where importable")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 3, quick 1)")
    p.add_argument("--timeout", type=float,
                   help="time limit of each child process, s (default 300, quick 60)")
    p.add_argument("--w5-items", type=int, help="W5 input size (default 2000000)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<timestamp>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    P: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.reps:
        P["reps"] = args.reps
    if args.timeout:
        P["timeout"] = args.timeout
    if args.w5_items:
        P["w5_items"] = args.w5_items
    workloads = WORKLOADS if not args.only else [w.strip().upper() for w in args.only.split(",")]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {','.join(WORKLOADS)}")
    systems = list(SYSTEMS) if not args.systems else [s.strip() for s in args.systems.split(",")]
    if args.peers:
        systems += [p for p in PEERS if p not in systems]
    skipped = []
    for s in list(systems):
        if s not in SYSTEM_CLASSES:
            raise SystemExit(f"unknown system {s!r}; choose from {','.join(SYSTEM_CLASSES)}")
        missing = [m for m in PEERS.get(s, []) if importlib.util.find_spec(m) is None]
        if missing:
            systems.remove(s)
            skipped.append(f"{s}: not installed (no module {', '.join(missing)}); skipped")
    for note in skipped:
        print(f"note: {note}", file=sys.stderr)
    if "mp" not in systems:
        print("note: mp is not among the systems: no ratios", file=sys.stderr)

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    digest_before = tree_digest(os.path.join(ROOT, "achilles"))
    calib: dict[str, Any] = {}
    if {"W2", "W7"} & set(workloads):
        print(f"calibrating W2: {P['w2_tasks']} tasks of ~{P['w2_task_ms']:g} ms ...",
              file=sys.stderr, flush=True)
        calib = calibrate(P)
        P.update(calib)
        print(f"  {calib['w2_iters']} iterations per task, {P['w2_tasks']} tasks serially "
              f"{calib['w2_serial_s']:.2f} s (ideal on {PROCESSES} workers "
              f"{calib['w2_serial_s'] / PROCESSES:.2f} s)", file=sys.stderr, flush=True)

    plan = [(w, s) for w in workloads for s in systems if s in ONLY_ON.get(w, {s})]
    runs = []
    t_all = time.perf_counter()
    for i, (w, s) in enumerate(plan, 1):
        print(f"[{i:>2}/{len(plan)}] {w:<3} {s:<15}", end=" ", file=sys.stderr, flush=True)
        if w == "S":  # each start-up in a fresh process: no state carried over
            run: dict[str, Any] | None = None
            for _ in range(P["reps"]):
                one = run_child(s, w, P, P["timeout"], reps=1)
                if run is None:
                    run = one
                else:
                    for key, fig in one["figures"].items():
                        run["figures"].setdefault(key, {"reps": []})["reps"].extend(fig["reps"])
                    run["errors"].update(one["errors"])
                    run["notes"].extend(one["notes"])
                    for k in ("child_wall_s", "own_cpu_s", "other_cpu_s", "steal_s"):
                        run[k] += one[k]
                    run["other_load_cores"] = run["other_cpu_s"] / max(run["child_wall_s"], 1e-9)
                    run["attempts"] += one["attempts"]
                    if one["status"] != "ok":
                        run["status"] = one["status"]
                        run["log_tail"] = one.get("log_tail")
            assert run is not None
            for fig in run["figures"].values():
                fig["median"] = statistics.median(fig["reps"]) if fig["reps"] else None
        else:
            run = run_child(s, w, P, P["timeout"])
        runs.append(run)
        errs = "; ".join(f"{k}: {str(v).splitlines()[0]}" for k, v in run["errors"].items())
        print(f"{run['status']:<7} {run['child_wall_s']:6.1f} s  other load "
              f"{run['other_load_cores']:.2f} cores" + (f"  {errs}" if errs else ""),
              file=sys.stderr, flush=True)
    add_ratios(runs, P)
    targets = evaluate_targets(runs, P)

    shown = [s for s in systems if any(r["system"] == s for r in runs)]
    lines = [f"achilles benchmarks, {started:%Y-%m-%d %H:%M %Z}, "
             f"{'quick' if args.quick else 'full'} run: median of {P['reps']} "
             f"(S: {P['reps']} fresh processes), {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; (x) = ratio to mp in this run"]
    if calib:
        lines.append(f"W2: {P['w2_tasks']} tasks of {calib['w2_task_ms_measured']:.1f} ms "
                     f"of CPU (median batch {calib['w2_task_ms_median']:.1f} ms), "
                     f"serially {calib['w2_serial_s']:.2f} s; efficiency = "
                     f"({calib['w2_serial_s']:.2f} s / {PROCESSES}) / wall")
    lines += ["", render_table(runs, shown, P), "", render_memory(runs, shown), "",
              render_load(runs, shown)]
    if targets:
        lines += ["", "targets (BENCHMARKS.md): stretch / target = met, MISSED = not met"]
        for t in targets:
            v = "-" if t["value"] is None else fmt(t["value"])
            lines.append(f"  {t['verdict']:<9} {t['system']:<15} {t['target']}: {v}")
    failures = [(r["system"], r["workload"], k, v) for r in runs for k, v in r["errors"].items()]
    if failures:
        lines += ["", "failures:"]
        for s, w, k, v in failures:
            lines.append(f"  {w} {s} [{k}]: {str(v).splitlines()[0]}")
    digest_after = tree_digest(os.path.join(ROOT, "achilles"))
    notes = skipped + [f"{r['workload']} {r['system']}: {n}" for r in runs for n in r["notes"]]
    loaded = [f"{r['workload']} {r['system']} {r['other_load_cores']:.2f}" for r in runs
              if r["other_load_cores"] > OTHER_LOAD_WARN]
    if loaded:
        notes.append(f"measured while other processes used more than {OTHER_LOAD_WARN} "
                     f"core on average (CPU not used by the benchmark's own processes): "
                     + ", ".join(loaded))
    if digest_after != digest_before:
        notes.append("the achilles/ sources changed during this run: the figures mix "
                     "versions (each child imports achilles afresh)")
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    table = "\n".join(lines)
    print(table)

    out = args.out or os.path.join(RESULTS_DIR, f"{started:%Y%m%d-%H%M%S}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc = {
        "date": started.isoformat(), "argv": sys.argv[1:] if argv is None else argv,
        "mode": "quick" if args.quick else "full", "params": P, "systems": shown,
        "workloads": workloads, "skipped": skipped, "machine": machine_info(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "achilles_digest": {"before": digest_before, "after": digest_after},
        "total_wall_s": time.perf_counter() - t_all, "calibration": calib, "runs": runs,
        "targets": targets, "table": table,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nresults: {os.path.relpath(out, os.getcwd())}  "
          f"(total {time.perf_counter() - t_all:.0f} s)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
