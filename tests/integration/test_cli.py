"""The command line: achilles-server / achilles-node / achilles kill / status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import Proc, child_env, wait_until

import achilles
from achilles import Pool


def test_console_scripts_installed():
    """pip install puts achilles-server and achilles-node on PATH."""
    assert shutil.which("achilles-server") and shutil.which("achilles-node")


def test_server_prints_port_and_stops_on_sigint(tmp_path):
    """The server prints where it listens, and SIGINT stops it with exit code 0."""
    proc = Proc(
        ["achilles-server", "--port", "0"],
        env=child_env(ACHILLES_SECRET_KEY="k"),
        cwd=tmp_path,
        name="server",
    )
    try:
        wait_until(lambda: "listening on 127.0.0.1:" in proc.output(), 20)
        proc.signal(signal.SIGINT)
        assert proc.popen.wait(10) == 0
    finally:
        proc.stop()


def test_server_without_secret_refuses(tmp_path):
    """A server with no secret exits non-zero with a message that says how to give one."""
    out = subprocess.run(
        [sys.executable, "-m", "achilles", "server", "--port", "0"],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "ACHILLES_SECRET_KEY" in out.stderr


def test_node_with_wrong_secret_keeps_retrying_and_says_why(cluster, tmp_path):
    """A node with the wrong secret is refused. It cannot check the server's proof on
    that refusal (it lacks the secret), so whoever sent it might not be the server: the
    node does not exit for good, it logs the refusal and retries with backoff."""
    proc = Proc(
        [sys.executable, "-m", "achilles", "node", "--port", str(cluster.port)],
        env=child_env(ACHILLES_SECRET_KEY="wrong"),
        cwd=tmp_path,
        name="badnode",
    )
    try:
        wait_until(
            lambda: proc.output().count("auth-failed") >= 2,
            30,
            what="two refused attempts",
            alive=proc.alive,
        )
        assert "wrong secret" in proc.output() and proc.alive()
        assert cluster.node_count() == 2  # only the cluster's own
    finally:
        proc.stop()


def test_controller_with_wrong_secret_raises(cluster):
    """A Pool with the wrong secret raises AuthenticationError within a few tries."""
    with pytest.raises(achilles.AuthenticationError, match="wrong secret"):
        Pool(host="127.0.0.1", port=cluster.port, secret_key="wrong")


def test_settings_from_dotenv(cluster, tmp_path, monkeypatch):
    """genConfig writes a .env that a Pool started in that directory finds."""
    for key in list(os.environ):
        if key.startswith("ACHILLES_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    path = achilles.genConfig("127.0.0.1", cluster.port, secret_key=cluster.secret)
    assert path == str(tmp_path / ".env")
    with Pool() as pool:
        assert pool._local is None
        assert pool.map(abs, [-3]) == [3]


def test_status_json(cluster, tmp_path):
    """achilles status --json lists the nodes with their slots."""
    out = subprocess.run(
        [sys.executable, "-m", "achilles", "status", "--json", "--port", str(cluster.port)],
        env=cluster.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert [n["slots"] for n in status["nodes"]] == [1, 1]


def test_kill_cluster(fresh_cluster, tmp_path):
    """achilles kill --yes stops every node; the server keeps running."""
    cluster = fresh_cluster(nodes=2)
    out = subprocess.run(
        [sys.executable, "-m", "achilles", "kill", "--yes", "--port", str(cluster.port)],
        env=cluster.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "2 node(s)" in out.stdout
    for node in cluster.nodes:
        assert node.popen.wait(20) == 0
    assert cluster.server.alive() and cluster.node_count() == 0


def test_kill_cluster_refuses_without_terminal(cluster):
    """killCluster() without command_verified refuses in a process with no terminal."""
    out = subprocess.run(
        [sys.executable, "-c", f"import achilles; achilles.killCluster(port={cluster.port})"],
        env=cluster.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "command_verified=True" in out.stderr
    assert cluster.node_count() == 2


def test_job_waits_for_a_node(fresh_cluster):
    """A job submitted while no node is connected waits, then runs when one joins."""
    cluster = fresh_cluster(nodes=0)
    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(abs, [-1, -2, -3])
        assert not result.ready()
        cluster.start_node()
        assert result.get(30) == [1, 2, 3]
