"""The child side of the benchmarks: the workload cases S, W1-W7, and ``child_main``.

A child (``python -m benchmarks --child SPEC``) sets up one system, runs the cases of
one workload against it and records every figure with :class:`Recorder`, which
rewrites the child's JSON file after every case: a child killed at its time limit
still reports what it finished. Results are checked after the clock stops; a wrong
result is an error of its case, never a time.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from achilles.testing import Cluster
from benchmarks.procfs import cpu_seconds, reset_peak_rss, self_mib
from benchmarks.systems import (
    PROCESSES,
    SYSTEM_CLASSES,
    AchillesCliSystem,
    PoolAdapter,
    System,
    set_pidfile,
)

MiB = 1024 * 1024


class WrongResult(Exception):
    """A result that differs from the expected one: an error of its case."""


def check(ok: bool, what: str) -> None:
    """Raise WrongResult(what) unless ok (checked after the clock stops)."""
    if not ok:
        raise WrongResult(what)


class Recorder:
    """The child's results, rewritten to disk after every case."""

    def __init__(self, path: str, skip: list[str]) -> None:
        self.path = path
        self.skip = set(skip)
        self.data: dict[str, Any] = {
            "figures": {},
            "errors": {},
            "memory": {},
            "notes": [],
            "done": [],
            "current": None,
            "finished": False,
        }
        self.flush()

    def flush(self) -> None:
        """Rewrite the JSON file (atomically: the runner may read it any time)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, default=str)
        os.replace(tmp, self.path)

    def cases(self, names: Iterable[str]) -> Iterator[str]:
        """The names not to skip (done, or hung, in an earlier child)."""
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
        except Exception as exc:  # every failure is a finding
            self.data["errors"][case] = (
                f"{type(exc).__name__}: {exc}\n" + traceback.format_exc(limit=8)[-1500:]
            )
        self.data["done"].append(case)
        self.data["current"] = None
        self.flush()

    def figure(self, key: str, reps: list[float]) -> None:
        """Record every repetition of a figure, and flush."""
        self.data["figures"][key] = {"reps": [float(r) for r in reps]}
        self.flush()

    def note(self, text: str) -> None:
        """A remark for the report (written with the next flush)."""
        self.data["notes"].append(text)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall s, result) of fn()."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_s(system: System, params: dict[str, Any], rec: Recorder) -> None:
    """S: pool construction to the first apply result, and the CLI cluster start-up."""
    from benchmarks.workloads import trivial

    def case() -> None:
        times = []
        for _ in range(params["reps"]):
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
    """A new pool and its first apply(fn, (1,)) (what S times)."""
    pool = system.new_pool()
    return pool, pool.apply(fn, (1,))


def run_w1(pool: PoolAdapter, params: dict[str, Any], rec: Recorder) -> None:
    """W1: map(square, range(n)) with the default chunking and chunksize=10000."""
    from benchmarks.workloads import square

    n = params["w1_items"]
    expected = [x * x for x in range(n)]

    def case(label: str, chunksize: int | None) -> None:
        times = []
        for _ in range(params["reps"]):
            dt, r = timed(lambda: pool.map(square, range(n), chunksize))
            check(
                r == expected,
                f"map(square, range({n}), chunksize={chunksize}) "
                f"differs from the squares (len {len(r)})",
            )
            del r
            times.append(dt)
        rec.figure(f"W1.{label}.s", times)
        rec.figure(f"W1.{label}.items_per_s", [n / t for t in times])

    for name in rec.cases(["default", "cs10000"]):
        rec.run(name, partial(case, name, None if name == "default" else 10_000))


def run_w2(pool: PoolAdapter, params: dict[str, Any], rec: Recorder) -> None:
    """W2: map of ~10 ms CPU tasks, chunksize 1 and default; wall and efficiency."""
    from benchmarks.workloads import burn

    iters, checksum, serial = params["w2_iters"], params["w2_checksum"], params["w2_serial_s"]
    tasks = [(i, iters) for i in range(params["w2_tasks"])]
    expected = [(i, checksum) for i in range(params["w2_tasks"])]
    ideal = serial / PROCESSES

    def case(label: str, chunksize: int | None) -> None:
        times = []
        for _ in range(params["reps"]):
            dt, r = timed(lambda: pool.map(burn, tasks, chunksize))
            check(r == expected, f"map(burn, ..., chunksize={chunksize}) gave wrong results")
            times.append(dt)
        rec.figure(f"W2.{label}.s", times)
        rec.figure(f"W2.{label}.eff", [ideal / t for t in times])

    for name in rec.cases(["cs1", "default"]):
        rec.run(name, partial(case, name, 1 if name == "cs1" else None))


def run_w3(pool: PoolAdapter, params: dict[str, Any], rec: Recorder) -> None:
    """W3: map over large bytes arguments, one way (len) and both ways (echo)."""
    from benchmarks.workloads import blob, echo, length

    size = params["w3_mib"] * MiB
    args = [blob(i, size) for i in range(params["w3_args"])]
    total_mib = len(args) * size / MiB

    def case(label: str) -> None:
        times = []
        for _ in range(params["reps"]):
            if label == "len":
                dt, r = timed(lambda: pool.map(length, args))
                check(r == [size] * len(args), f"len results {r[:3]}... not all {size}")
            else:
                dt, r = timed(lambda: pool.map(echo, args))
                check(
                    len(r) == len(args) and all(a == b for a, b in zip(r, args)),
                    "echo did not return every argument unchanged and in order",
                )
            del r
            times.append(dt)
        rec.figure(f"W3.{label}.s", times)
        rec.figure(f"W3.{label}.mib_s", [total_mib / t for t in times])

    for name in rec.cases(["len", "echo"]):
        rec.run(name, partial(case, name))


def run_w4(pool: PoolAdapter, params: dict[str, Any], rec: Recorder) -> None:
    """W4: latency of sequential apply(trivial, (1,)) calls, p50 / p90 / mean."""
    from benchmarks.workloads import trivial

    calls = params["w4_calls"]

    def case() -> None:
        p50s, p90s, means = [], [], []
        for _ in range(params["reps"]):
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


def _w5_once(
    pool: PoolAdapter, n: int, cs: int, expected: tuple[int, int], resettable: bool
) -> tuple[bool, dict[str, float]]:
    """One W5 repetition: its figures, and whether the peak RSS could still be reset."""
    from benchmarks.workloads import Pulled, small_ints, square

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
    check(
        (k, w) == expected and pulled.count == n,
        f"got {k} results (weighted sum {'ok' if w == expected[1] else 'wrong'}), "
        f"input pulled {pulled.count} of {n}",
    )
    return resettable, {
        "s": wall,
        "first_s": first,
        "pulled_at_first": at_first,
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - before,
    }


def run_w5(pool: PoolAdapter, params: dict[str, Any], rec: Recorder) -> None:
    """W5: imap over a lazy generator: wall, first result, input pulled, caller RSS."""
    from benchmarks.workloads import w5_expected

    n, cs = params["w5_items"], params["w5_chunksize"]
    expected = w5_expected(n)

    def case() -> None:
        reps: dict[str, list[float]] = {}
        resettable = True
        for _ in range(params["reps"]):
            resettable, one = _w5_once(pool, n, cs, expected, resettable)
            for key, value in one.items():
                reps.setdefault(key, []).append(value)
        for key in ("s", "first_s", "pulled_at_first"):
            rec.figure(f"W5.{key}", reps[key])
        rec.figure("W5.pulled_frac", [p / n for p in reps["pulled_at_first"]])
        for key in ("peak_rss_mib", "rss_growth_mib"):
            rec.figure(f"W5.{key}", reps[key])
        if not resettable:
            rec.note(
                "VmHWM could not be reset: W5 peak is the lifetime peak, growth is "
                "the rise of the lifetime peak"
            )

    for name in rec.cases(["imap"]):
        rec.run(name, case)


def run_w6(system: System, pool: PoolAdapter, params: dict[str, Any], rec: Recorder) -> None:
    """W6: routing of one-item chunks through the server as nodes are added."""
    from benchmarks.workloads import noop

    assert isinstance(system, AchillesCliSystem)
    cluster = system.cluster
    assert cluster.server is not None
    server = cluster.server.pid
    m = params["w6_chunks"]

    def case(nodes: int) -> None:
        while len(cluster.nodes) < nodes:
            cluster.start_node(wait=False)
        cluster.wait_nodes()
        check(pool.map(noop, range(4 * nodes), 1) == [None] * 4 * nodes, "warm-up")
        rates, us_stat, us_sched = [], [], []
        for _ in range(params["reps"]):
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

    for name in rec.cases([f"{n}nodes" for n in params["w6_nodes"]]):
        rec.run(name, partial(case, int(name[:-5])))


def _w7_once(
    pool: PoolAdapter,
    cluster: Cluster,
    tasks: list[tuple[int, int]],
    expected: list[tuple[int, int]],
    kill: bool,
    kill_at: list[float],
) -> float:
    """W2 (chunksize 1) through ``imap_unordered``; with ``kill``, the last node is
    SIGKILLed when half of the results are in. Returns the wall time."""
    from benchmarks.workloads import burn

    ntasks = len(tasks)
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
    check(
        sorted(results) == expected,
        f"{len(results)} results, {len(set(results))} distinct, of {ntasks} tasks",
    )
    return wall


def run_w7(system: System, pool: PoolAdapter, params: dict[str, Any], rec: Recorder) -> None:
    """W7: W2 through imap_unordered, undisturbed and with a node killed halfway."""
    assert isinstance(system, AchillesCliSystem)
    cluster = system.cluster
    iters, checksum, serial = params["w2_iters"], params["w2_checksum"], params["w2_serial_s"]
    ntasks = params["w7_tasks"]
    tasks = [(i, iters) for i in range(ntasks)]
    expected = [(i, checksum) for i in range(ntasks)]
    serial = serial * ntasks / params["w2_tasks"]
    kill_at: list[float] = []

    def case() -> None:
        calm, killed, ratios = [], [], []
        for _ in range(params["reps"]):
            cluster.wait_nodes()  # both nodes registered, nothing stale
            a = _w7_once(pool, cluster, tasks, expected, False, kill_at)
            b = _w7_once(pool, cluster, tasks, expected, True, kill_at)
            calm.append(a)
            killed.append(b)
            ratios.append(b / a)
            cluster.nodes = [n for n in cluster.nodes if n.alive()]
            cluster.wait_nodes()  # the killed one is gone from the server
            cluster.start_node(wait=False)
        cluster.wait_nodes()
        rec.figure("W7.undisturbed_s", calm)
        rec.figure("W7.undisturbed_eff", [serial / PROCESSES / t for t in calm])
        rec.figure("W7.killed_s", killed)
        rec.figure("W7.ratio", ratios)
        rec.figure("W7.kill_at_s", kill_at)

    for name in rec.cases(["kill"]):
        rec.run(name, case)


def warm_up(pool: PoolAdapter) -> None:
    """One apply and one small map, so that no case pays for a cold pool."""
    from benchmarks.workloads import square, trivial

    check(pool.apply(trivial, (1,)) == 2, "warm-up apply")
    check(pool.map(square, range(1000)) == [x * x for x in range(1000)], "warm-up map")


WORKLOAD_RUNNERS: dict[str, Callable[[PoolAdapter, dict[str, Any], Recorder], None]] = {
    "W1": run_w1,
    "W2": run_w2,
    "W3": run_w3,
    "W4": run_w4,
    "W5": run_w5,
}


def _run_scale(system: System, workload: str, params: dict[str, Any], rec: Recorder) -> None:
    """W8, W9 and the soak: the CLI cluster's server, with the nodes each one brings."""
    from benchmarks import scale, soak

    assert isinstance(system, AchillesCliSystem)
    scale.setup_server_only(system)
    rec.data["current"] = None
    if workload == "soak":
        for _ in range(2):
            system.cluster.start_node(wait=False)
        system.cluster.wait_nodes()
        soak.run_soak(system, params, rec)
    else:
        {"W8": scale.run_w8, "W9": scale.run_w9}[workload](system, params, rec)
    rec.data["memory"].update(system.memory(None))


def _run_workload(
    system: System, workload: str, params: dict[str, Any], rec: Recorder, pools: list[PoolAdapter]
) -> None:
    """Set the system up and run the workload's cases; the pool made goes to ``pools``."""
    if workload in ("W8", "W9", "soak"):
        return _run_scale(system, workload, params, rec)
    system.setup(nodes=1 if workload == "W6" else 2)
    rec.data["current"] = None
    if workload == "S":
        run_s(system, params, rec)
    else:
        pool = system.new_pool()
        pools.append(pool)
        warm_up(pool)
        if workload == "W6":
            run_w6(system, pool, params, rec)
        elif workload == "W7":
            run_w7(system, pool, params, rec)
        else:
            WORKLOAD_RUNNERS[workload](pool, params, rec)
        rec.data["memory"].update(system.memory(pool))
    rec.data["memory"]["caller"] = {
        "rss_mib": round(self_mib("VmRSS"), 1),
        "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _teardown(system: System, pool: PoolAdapter | None, rec: Recorder) -> None:
    """Close the pool and stop the system; failures are recorded, not raised."""
    rec.data["current"] = "teardown"
    rec.flush()
    t0 = time.perf_counter()
    if pool is not None:
        try:
            pool.close()
        except Exception as exc:  # recorded: the runner reports it
            rec.data["errors"]["teardown"] = f"pool.close(): {type(exc).__name__}: {exc}"
    try:
        system.teardown()
    except Exception as exc:  # recorded: the runner reports it
        rec.data["errors"]["teardown"] = f"{type(exc).__name__}: {exc}"
    rec.data["teardown_s"] = time.perf_counter() - t0
    rec.data["current"] = None
    rec.data["finished"] = True
    rec.flush()


def child_main(spec_path: str) -> int:
    """Run one (system, workload) as the runner's spec file says, recording as it goes."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    set_pidfile(spec["pidfile"])
    rec = Recorder(spec["out"], spec["skip"])
    system = SYSTEM_CLASSES[spec["system"]](spec["workdir"])
    pools: list[PoolAdapter] = []
    rec.data["current"] = "setup"
    rec.flush()
    try:
        _run_workload(system, spec["workload"], spec["params"], rec, pools)
    except Exception as exc:  # recorded: the runner reports it
        rec.data["errors"]["setup"] = (
            f"{type(exc).__name__}: {exc}\n" + traceback.format_exc(limit=8)[-1500:]
        )
    finally:
        _teardown(system, pools[0] if pools else None, rec)
    return 0
