"""The scale benchmarks' harness pieces work (W8's simulated nodes, W9's relay, the
runner's W8 and soak at toy sizes). Behaviour only: the figures are the benchmarks'
business, never a test's."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import achilles
from achilles.testing import Proc, isolated_env, stop_process, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _helper(request: Any, cluster: Any, module: str, *args: str) -> Proc:
    proc = Proc(
        [sys.executable, "-m", module, *args],
        env=cluster.env(PYTHONPATH=ROOT),
        cwd=ROOT,
        name=module.rsplit(".", 1)[-1],
    )
    request.addfinalizer(proc.stop)
    return proc


def test_simulated_nodes_register_and_answer_a_map(request: Any, fresh_cluster: Any) -> None:
    """Three simulated nodes in one process authenticate, the server lists them, and a
    map of no-op chunks through them returns one None per item."""
    from benchmarks.workloads import noop

    cluster = fresh_cluster(nodes=0)
    sim = _helper(
        request, cluster, "benchmarks.simnodes", "--port", str(cluster.port), "--nodes", "3"
    )
    wait_until(lambda: "ready 3" in sim.output(), 60, what="3 simulated nodes", alive=sim.alive)
    wait_until(lambda: len(cluster.status()["nodes"]) == 3, 30, what="the server to list 3")
    with achilles.Pool(**cluster.kwargs()) as pool:
        assert pool.map(noop, range(30), 1) == [None] * 30
    sim.stop()
    done = re.search(r"done: (\d+) chunks answered, (\d+) connections lost", sim.output())
    assert done is not None and int(done.group(1)) >= 30 and done.group(2) == "0"


def _echo_server(request: Any) -> int:
    """A loopback echo server in a thread; its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    request.addfinalizer(listener.close)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def test_relay_adds_its_delay_each_way_and_keeps_the_bytes(request: Any) -> None:
    """Through a relay with 25 ms one way, an echo takes at least 50 ms and comes back
    unchanged and in order (a lower bound only: the machine may add more)."""
    echo = _echo_server(request)
    relay = Proc(
        [sys.executable, "-m", "benchmarks.relay", "--target", str(echo), "--delay-ms", "25"],
        env=isolated_env(PYTHONPATH=ROOT),
        cwd=ROOT,
        name="relay",
    )
    request.addfinalizer(relay.stop)
    port = int(
        wait_until(
            lambda: re.search(r"listening on [\d.]+:(\d+)", relay.output()),
            30,
            what="the relay's port",
            alive=relay.alive,
        ).group(1)
    )
    payload = bytes(range(256)) * 400  # 100 KiB: several reads
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        t0 = time.perf_counter()
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
        round_trip = time.perf_counter() - t0
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += conn.recv(65536)
    assert round_trip >= 0.050
    assert got == payload


def test_runner_runs_w8_and_the_soak_at_toy_sizes(tmp_path: Any) -> None:
    """``python -m benchmarks`` runs W8 (2 simulated nodes) and the soak (30 jobs) on the
    CLI cluster, records their figures and judges their targets."""
    out = tmp_path / "run.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--only",
        "W8,soak",
        "--systems",
        "achilles-cli",
        "--w8-nodes",
        "2",
        "--soak-jobs",
        "30",
        "--out",
        str(out),
    ]
    child = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=isolated_env(PYTHONPATH=ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = child.communicate(timeout=300)
    finally:
        stop_process(child.pid, popen=child)
    assert child.returncode == 0, output.decode(errors="replace")[-3000:]
    doc = json.loads(out.read_text())
    figures = {k for run in doc["runs"] for k in run["figures"]}
    assert {"W8.2.server_us_per_chunk", "W8.2.idle_cpu_pct", "soak.slowdown"} <= figures
    judged = {t["target"] for t in doc["targets"]}
    assert any(t.startswith("W8: server CPU") for t in judged)
    assert any(t.startswith("soak: server RSS") for t in judged)
