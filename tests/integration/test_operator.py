"""The operator's view and interactive use: status, progress bars, logging, Ctrl-C,
graceful node leave."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import tasks
from conftest import wait_until

from achilles import Pool

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_status_table_shows_nodes_and_job_progress(cluster, tmp_path):
    """`achilles status` lists nodes (address, busy slots apart from queued chunks, as the
    README says) and a running job with its function, progress and owner."""
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(tasks.sleep_for, [0.3] * 12, chunksize=1)
        wait_until(
            lambda: (
                any(j["done"] for j in cluster.status()["jobs"])
                and any(n["busy"] for n in cluster.status()["nodes"])
            ),
            20,
        )
        out = subprocess.run(
            [sys.executable, "-m", "achilles", "status", "--port", str(cluster.port)],
            env=cluster.env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        result.get(60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2 node(s)") and "1 job(s)" in lines[0]
    job_line = next(line for line in lines if "/12" in line)
    assert "PROGRESS" in out.stdout and "CHUNKS/S" in out.stdout and ":" in job_line
    assert "tasks.sleep_for" in job_line  # the job's function, by name
    header = lines[1].split()
    assert header[:6] == ["NODE", "ADDRESS", "SLOTS", "BUSY", "QUEUED", "DONE"]
    for row in (line.split() for line in lines[2:4]):
        assert re.fullmatch(r"127\.0\.0\.1:\d+", row[1]), row
        slots, busy, queued = int(row[2]), int(row[3]), int(row[4])
        assert busy <= slots and queued >= 0


def test_progress_bar(cluster, tmp_path):
    """map(..., progress=True) draws a tqdm bar that reaches the item count."""
    code = (
        "import tasks\nfrom achilles import Pool\n"
        f"with Pool(host='127.0.0.1', port={cluster.port}, secret_key='{cluster.secret}')"
        " as p:\n"
        "    assert p.map(tasks.square, range(50), progress=True) == "
        "[x * x for x in range(50)]\n"
        "    assert list(p.imap(tasks.square, range(7), progress={'desc': 'sq'})) == "
        "[x * x for x in range(7)]\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=TESTS),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "50/50" in out.stderr and "sq: 100%" in out.stderr and "7/7" in out.stderr


INTERRUPT = """
import os, signal, threading, tasks
from achilles import Pool, getClusterStatus
kw = dict(host="127.0.0.1", port={port}, secret_key="{secret}")
with Pool(**kw) as pool:
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        pool.map(tasks.sleep_for, [30.0] * 4, chunksize=1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    assert pool.map(tasks.square, range(4)) == [0, 1, 4, 9]   # pool still usable
    print("usable", flush=True)
"""


def test_keyboard_interrupt_cancels_the_job(cluster, tmp_path):
    """Ctrl-C during map raises KeyboardInterrupt, cancels the job on the cluster (the
    next job gets the workers at once) and leaves the pool usable."""
    code = INTERRUPT.format(port=cluster.port, secret=cluster.secret)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=TESTS),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["interrupted", "usable"]


def test_server_logs_connections_and_jobs(cluster):
    """The server logs, with timestamps, node connections and each job's start and end."""
    with Pool(**cluster.kwargs()) as pool:
        pool.map(tasks.square, range(20), chunksize=5)
    wait_until(lambda: " finished: 4 chunks done" in cluster.server.output(), 10)
    log = cluster.server.output()
    assert " INFO achilles.server: node " in log and " connected from " in log
    assert "submitted by" in log and "(4 chunks)" in log


def test_node_leaves_gracefully_on_sigterm(fresh_cluster):
    """SIGTERM makes a node stop taking work, finish its chunks and exit 0; the server
    shows it leaving, and the job completes."""
    cluster = fresh_cluster(nodes=2, processes=1)
    leaving = cluster.nodes[0]
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(tasks.sleep_for, [0.5] * 12, chunksize=1)
        wait_until(lambda: all(n["inflight"] for n in cluster.status()["nodes"]), 20)
        leaving.signal(signal.SIGTERM)
        wait_until(
            lambda: any(n["draining"] for n in cluster.status()["nodes"]) or not leaving.alive(),
            10,
            what="the node to announce it is leaving",
        )
        assert leaving.popen.wait(30) == 0
        assert result.get(60) == [0.5] * 12
    assert "leaving: finishing" in leaving.output()
