"""W8 (many simulated nodes) and W9 (latency between nodes and the server): the child
side. Both run on the ``achilles-cli`` system's server and say in their output that
they are simulations (see :mod:`benchmarks.simnodes` and :mod:`benchmarks.relay` for
what is and is not simulated)."""

from __future__ import annotations

import re
import sys
import time
from functools import partial
from typing import Any

from achilles.testing import HOST, Cluster, Proc, wait_until
from benchmarks.procfs import cpu_seconds, rss_mib
from benchmarks.systems import PROCESSES, AchillesCliSystem, PoolAdapter, register_session

_LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


def _helper(cluster: Cluster, module: str, args: list[str], name: str) -> Proc:
    """``python -m benchmarks.<module>`` in its own session, with the cluster's
    environment (its secret) and this repository importable."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = cluster.env(PYTHONPATH=root)
    proc = Proc([sys.executable, "-m", module, *args], env=env, cwd=root, name=name)
    register_session(proc.pid)
    return proc


def start_simnodes(cluster: Cluster, nodes: int, slots: int = 1, work_ms: float = 0.0) -> Proc:
    """N simulated nodes in one process, connected and registered."""
    sim = _helper(
        cluster,
        "benchmarks.simnodes",
        ["--port", str(cluster.port), "--nodes", str(nodes), "--slots", str(slots)]
        + ["--work-ms", str(work_ms)],
        f"simnodes{nodes}",
    )
    wait_until(
        lambda: f"ready {nodes}" in sim.output(),
        60 + nodes / 10,
        0.05,
        f"{nodes} simulated nodes to connect",
        alive=sim.alive,
    )
    wait_until(
        lambda: len(cluster.status()["nodes"]) == nodes,
        60,
        0.1,
        f"the server to list {nodes} nodes",
    )
    return sim


def run_w8(system: AchillesCliSystem, params: dict[str, Any], rec: Any) -> None:
    """W8: chunks/s, server CPU per chunk, server RSS and idle CPU with N simulated nodes."""
    from benchmarks.workloads import noop

    cluster = system.cluster
    assert cluster.server is not None
    server = cluster.server.pid
    m = params["w8_chunks"]
    rec.note(
        "W8 is a simulation: N node connections from one process (benchmarks/simnodes.py), "
        "answering no-op chunks at once, 1 slot each; server and nodes share 2 cores"
    )

    def case(nodes: int) -> None:
        sim = start_simnodes(cluster, nodes)
        pool = None
        try:
            pool = PoolAdapter(_pool(cluster))
            warm = min(m, 4 * nodes)
            if pool.map(noop, range(warm), 1) != [None] * warm:
                raise AssertionError("warm-up map gave wrong results")
            time.sleep(0.5)  # let the warm-up's last frames settle (not a synchronisation)
            c0, t0 = cpu_seconds(server), time.perf_counter()
            time.sleep(params["w8_idle_s"])  # the measurement itself: idle CPU over a window
            c1, t1 = cpu_seconds(server), time.perf_counter()
            rec.figure(f"W8.{nodes}.idle_cpu_pct", [(c1[1] - c0[1]) / (t1 - t0) * 100])
            rates, us = [], []
            for _ in range(params["reps"]):
                a, t = cpu_seconds(server), time.perf_counter()
                r = pool.map(noop, range(m), 1)
                dt, b = time.perf_counter() - t, cpu_seconds(server)
                if r != [None] * m:
                    raise AssertionError("map(noop, ..., chunksize=1) gave wrong results")
                rates.append(m / dt)
                us.append((b[1] - a[1]) / m * 1e6)
            rec.figure(f"W8.{nodes}.chunks_per_s", rates)
            rec.figure(f"W8.{nodes}.server_us_per_chunk", us)
            rec.figure(f"W8.{nodes}.server_rss_mib", [rss_mib(server)])
        finally:
            if pool is not None:
                pool.close()
            sim.stop()
            wait_until(lambda: not cluster.status()["nodes"], 60, 0.1, "the nodes to be gone")

    for name in rec.cases([f"{n}nodes" for n in params["w8_nodes"]]):
        rec.run(name, partial(case, int(name[:-5])))


def _pool(cluster: Cluster) -> Any:
    import achilles

    return achilles.Pool(**cluster.kwargs())


def start_relay(cluster: Cluster, delay_ms: float) -> tuple[Proc, int]:
    """A delaying relay to the cluster's server; returns it and its port."""
    relay = _helper(
        cluster,
        "benchmarks.relay",
        ["--target", str(cluster.port), "--delay-ms", str(delay_ms)],
        f"relay{delay_ms:g}",
    )
    match = wait_until(
        lambda: _LISTENING.search(relay.output()), 30, 0.02, "the relay's port", alive=relay.alive
    )
    return relay, int(match.group(1))


def run_w9(system: AchillesCliSystem, params: dict[str, Any], rec: Any) -> None:
    """W9: W2 and W1 with the two nodes connected directly, then behind a relay adding
    0, 0.5, 2, 10 ms one way (0: what the relay itself costs).

    The cases are interleaved: each repetition runs every case once, in turn, with
    fresh nodes (so each case's round trip is measured anew), and the relays stay up
    throughout. The machine's speed drifts between minutes by more than the effect
    looked for; interleaved, every case meets the same drift."""
    from benchmarks.workloads import burn_timed, square

    cluster = system.cluster
    iters, checksum, serial = params["w2_iters"], params["w2_checksum"], params["w2_serial_s"]
    tasks = [(i, iters) for i in range(params["w2_tasks"])]
    expected2 = [(i, checksum) for i in range(params["w2_tasks"])]
    n1 = params["w1_items"]
    expected1 = [x * x for x in range(n1)]
    ideal = serial / PROCESSES
    rec.note(
        "W9 is a simulation: the nodes reach the server through benchmarks/relay.py on "
        "loopback, which holds each read for the delay (about 1 ms timer resolution); "
        "the cases are interleaved, each repetition running every case in turn"
    )
    names = ["direct"] + [f"{d:g}" for d in params["w9_delays_ms"]]
    figs: dict[str, dict[str, list[float]]] = {name: {} for name in names}

    def measure(port: int, out: dict[str, list[float]]) -> None:
        server_port, pool = cluster.port, None
        try:
            cluster.port = port  # the nodes connect through the relay
            for _ in range(2):
                cluster.start_node(wait=False)
            cluster.port = server_port
            cluster.wait_nodes()
            pool = PoolAdapter(_pool(cluster))
            pool.map(square, range(1000))
            for label, cs in (("w2_cs1", 1), ("w2_default", None)):
                t = time.perf_counter()
                r = pool.map(burn_timed, tasks, cs)
                wall = time.perf_counter() - t
                out.setdefault(f"{label}_eff", []).append(ideal / wall)
                # the same against the CPU the tasks took in this run: what the cluster
                # lost, without the machine's drift in speed
                cpu = sum(x[2] for x in r)
                out.setdefault(f"{label}_cpu_eff", []).append(cpu / PROCESSES / wall)
                if [x[:2] for x in r] != expected2:
                    raise AssertionError(f"W2 ({label}) gave wrong results")
            for label, cs in (("w1_default", None), ("w1_cs10000", 10_000)):
                t = time.perf_counter()
                r = pool.map(square, range(n1), cs)
                out.setdefault(f"{label}_s", []).append(time.perf_counter() - t)
                if r != expected1:
                    raise AssertionError(f"W1 ({label}) gave wrong results")
                del r
        finally:
            cluster.port = server_port
            if pool is not None:
                pool.close()
            for node in cluster.nodes:
                node.stop()
            cluster.nodes = []
            wait_until(lambda: not cluster.status()["nodes"], 60, 0.1, "the nodes to be gone")

    def case() -> None:
        relays: dict[str, tuple[Proc, int]] = {}
        try:
            for d in params["w9_delays_ms"]:
                relays[f"{d:g}"] = start_relay(cluster, d)
            for _ in range(params["reps"]):
                for name in names:
                    measure(cluster.port if name == "direct" else relays[name][1], figs[name])
                    for key, reps in figs[name].items():
                        rec.figure(f"W9.{name}.{key}", reps)
        finally:
            for relay, _ in relays.values():
                relay.stop()

    for name in rec.cases(["interleaved"]):
        rec.run(name, case)


def setup_server_only(system: AchillesCliSystem) -> None:
    """The CLI cluster's server alone (W8, W9 and the soak bring their own nodes)."""
    import achilles  # noqa: F401  (imported outside the timings)

    system.cluster.start_server(timeout=30.0)
    assert system.cluster.port and HOST
