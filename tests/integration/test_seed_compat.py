"""achilles.lineReceiver.*: the seed's (achilles 0.0.196) names, arguments and result
formats, against real server and node processes."""

from __future__ import annotations

import inspect
import os
import re
import secrets
import subprocess
import sys

import pytest
import tasks
from conftest import Proc, child_env, wait_until

from achilles import ConfigError
from achilles import getClusterStatus as core_status
from achilles.lineReceiver import (
    achilles_controller,
    achilles_main,
    achilles_node,
    achilles_server,
)
from achilles.lineReceiver.achilles_main import (
    getClusterStatus,
    imap,
    imap_unordered,
    killCluster,
    map,
)

SEED_ARGS = list(range(1, 11))
SEED_VALUES = [x**4 for x in SEED_ARGS]  # square, then the callback squares again
ALERT = re.compile(r"ALERT: achilles_server initiated at ([\d.]+):(\d+)")


def one_to_ten():
    """A generator function, passed uncalled as the seed allowed."""
    yield from range(1, 11)


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def _python(code: str, env: dict, cwd, name: str) -> Proc:
    return Proc([sys.executable, "-c", code], env=env, cwd=cwd, name=name)


def _server_port(proc: Proc) -> int:
    match = wait_until(lambda: ALERT.search(proc.output()), 20, what="the ALERT line")
    return int(match.group(2))


# --- names and signatures -----------------------------------------------------------------
def test_seed_names_and_signatures():
    """Every seed entry point is importable with the seed's parameters and defaults."""
    empty = inspect.Parameter.empty
    work = [
        ("func", empty),
        ("args", empty),
        ("callback", None),
        ("chunksize", 1),
        ("host", None),
        ("port", None),
        ("username", None),
        ("secret_key", None),
    ]
    for fn in (map, imap, imap_unordered):
        assert _params(fn) == work, fn.__name__
    conn = [("host", None), ("port", None), ("username", None), ("secret_key", None)]
    assert _params(achilles_server.runAchillesServer) == conn
    assert _params(achilles_server.genConfig) == conn
    assert _params(achilles_main.genConfig) == conn
    assert _params(achilles_node.runAchillesNode) == [("host", None), ("port", None)]
    assert _params(achilles_node.genConfig) == [("host", None), ("port", None)]
    assert _params(killCluster)[0] == ("command_verified", False)
    assert _params(getClusterStatus) == conn
    for name in ("map", "imap", "imap_unordered", "killCluster", "getClusterStatus"):
        assert getattr(achilles_controller, name) is getattr(achilles_main, name)


# --- result formats on two one-worker nodes (packets of 1 * chunksize) ---------------------
def test_map_returns_list_of_packets(cluster):
    """map returns the ordered, unflattened packets of slots * chunksize results."""
    got = map(tasks.square, SEED_ARGS, tasks.square, chunksize=1, **cluster.kwargs())
    assert got == [[v] for v in SEED_VALUES]
    got = map(tasks.square, SEED_ARGS, tasks.square, chunksize=4, **cluster.kwargs())
    assert got == [SEED_VALUES[0:4], SEED_VALUES[4:8], SEED_VALUES[8:]]


def test_imap_yields_ordered_packets(cluster):
    """imap yields {'ARGS_COUNTER', 'RESULT'} packets in order, counter = first arg's index."""
    got = list(imap(tasks.square, SEED_ARGS, tasks.square, chunksize=3, **cluster.kwargs()))
    assert got == [
        {"ARGS_COUNTER": 0, "RESULT": SEED_VALUES[0:3]},
        {"ARGS_COUNTER": 3, "RESULT": SEED_VALUES[3:6]},
        {"ARGS_COUNTER": 6, "RESULT": SEED_VALUES[6:9]},
        {"ARGS_COUNTER": 9, "RESULT": SEED_VALUES[9:]},
    ]


def test_imap_unordered_yields_every_packet_once(cluster):
    """imap_unordered yields the same packets as imap, each once, in any order."""
    got = list(imap_unordered(tasks.square, range(40), chunksize=3, **cluster.kwargs()))
    assert all(set(p) == {"ARGS_COUNTER", "RESULT"} for p in got)
    assert sorted(got, key=lambda p: p["ARGS_COUNTER"]) == list(
        imap(tasks.square, range(40), chunksize=3, **cluster.kwargs())
    )


def test_callback_applied_to_each_result(cluster):
    """The callback is applied to every result element, in all three functions."""
    kw = dict(chunksize=2, **cluster.kwargs())
    assert map(tasks.square, [1, 2, 3], str, **kw) == [["1", "4"], ["9"]]
    assert [p["RESULT"] for p in imap(tasks.square, [1, 2, 3], str, **kw)] == [["1", "4"], ["9"]]
    assert sorted(
        v for p in imap_unordered(tasks.square, [1, 2, 3], str, **kw) for v in p["RESULT"]
    ) == ["1", "4", "9"]


def test_lists_are_packets_and_chunksize_unused(cluster):
    """Arguments that are lists are one packet each, counted by list, whatever chunksize."""
    args = [[1, 2, 3], [4], [], [5, 6]]
    expected = [[1, 4, 9], [16], [], [25, 36]]
    for chunksize in (1, 5):
        assert map(tasks.square, args, chunksize=chunksize, **cluster.kwargs()) == expected
    assert list(imap(tasks.square, args, **cluster.kwargs())) == [
        {"ARGS_COUNTER": i, "RESULT": r} for i, r in enumerate(expected)
    ]
    got = list(imap_unordered(tasks.square, args, **cluster.kwargs()))
    assert sorted(got, key=lambda p: p["ARGS_COUNTER"]) == [
        {"ARGS_COUNTER": i, "RESULT": r} for i, r in enumerate(expected)
    ]


def test_generator_object_and_generator_function(cluster):
    """A generator object and an uncalled generator function both work as args."""
    kw = dict(chunksize=5, **cluster.kwargs())
    expected = [SEED_VALUES[:5], SEED_VALUES[5:]]
    assert map(tasks.square, (x for x in SEED_ARGS), tasks.square, **kw) == expected
    assert map(tasks.square, one_to_ten, tasks.square, **kw) == expected
    assert [p["RESULT"] for p in imap(tasks.square, one_to_ten, tasks.square, **kw)] == expected
    assert sorted(
        p["ARGS_COUNTER"] for p in imap_unordered(tasks.square, tasks.numbers(10), **kw)
    ) == [0, 5]


def test_empty_args_and_task_errors(cluster):
    """No arguments give no packets; a task's exception reaches the caller as itself."""
    assert map(tasks.square, [], **cluster.kwargs()) == []
    assert (
        next(iter(imap_unordered(tasks.square, one_to_ten(), chunksize=20, **cluster.kwargs())))[
            "ARGS_COUNTER"
        ]
        == 0
    )
    with pytest.raises(tasks.Boom, match="bad value 5"):
        list(imap_unordered(tasks.fail_at_five, range(8), **cluster.kwargs()))
    with pytest.raises(ValueError, match="chunksize"):
        map(tasks.square, [1], chunksize=0, **cluster.kwargs())


def test_readme_example_on_a_two_worker_node(fresh_cluster):
    """With 2-worker (and 1-worker) nodes and chunksize=4, packets hold 8 results, as the
    seed README's 8-core example shows."""
    cluster = fresh_cluster(nodes=1, processes=2)
    cluster.start_node(1)  # packet size follows the largest node
    kw = dict(chunksize=4, **cluster.kwargs())
    readme = [[1, 16, 81, 256, 625, 1296, 2401, 4096], [6561, 10000]]
    assert map(tasks.square, SEED_ARGS, tasks.square, **kw) == readme
    assert list(imap(tasks.square, SEED_ARGS, tasks.square, **kw)) == [
        {"ARGS_COUNTER": 0, "RESULT": readme[0]},
        {"ARGS_COUNTER": 8, "RESULT": readme[1]},
    ]
    assert sorted(
        imap_unordered(tasks.square, SEED_ARGS, tasks.square, **kw), key=lambda p: p["ARGS_COUNTER"]
    ) == [{"ARGS_COUNTER": 0, "RESULT": readme[0]}, {"ARGS_COUNTER": 8, "RESULT": readme[1]}]


def test_status_and_kill_cluster(fresh_cluster):
    """getClusterStatus lists the nodes; killCluster(command_verified=True) stops them."""
    cluster = fresh_cluster(nodes=1, processes=1)
    assert len(getClusterStatus(**cluster.kwargs())["nodes"]) == 1
    assert killCluster(command_verified=True, **cluster.kwargs()) == 1
    assert cluster.nodes[0].popen.wait(20) == 0


def test_without_cluster_packets_follow_local_cores(no_cluster_config):
    """With no cluster configured, map runs on the local cluster in packets of its cores."""
    cores = os.cpu_count() or 1
    args = list(range(2 * cores + 1))
    assert map(tasks.square, args) == [
        [x * x for x in args[i : i + cores]] for i in range(0, len(args), cores)
    ]


# --- the server and node programs ---------------------------------------------------------
def test_run_achilles_server_prints_alert_and_accepts_nodes(tmp_path):
    """runAchillesServer(port=0) prints the seed's lines with the bound port; a node joins."""
    secret = secrets.token_hex(8)
    env = child_env(ACHILLES_SECRET_KEY=secret, PYTHONUNBUFFERED="1")
    server = _python(
        "from achilles.lineReceiver.achilles_server import runAchillesServer; "
        "runAchillesServer(port=0)",
        env,
        tmp_path,
        "seed-server",
    )
    node = None
    try:
        port = _server_port(server)
        assert "Listening for connections..." in server.output()
        node = Proc(
            [sys.executable, "-m", "achilles", "node", "--port", str(port), "--processes", "1"],
            env=env,
            cwd=tmp_path,
            name="node-for-seed-server",
        )
        wait_until(
            lambda: core_status(port=port, secret_key=secret)["nodes"],
            20,
            what="the node to register",
        )
    finally:
        if node is not None:
            node.stop()
        server.stop()


def test_run_achilles_node_connects_and_greets(cluster, tmp_path):
    """runAchillesNode(host, port) prints the greeting and the Connected line, and serves."""
    env = {**cluster.env(), "ACHILLES_PROCESSES": "1"}
    node = _python(
        "from achilles.lineReceiver.achilles_node import runAchillesNode; "
        f"runAchillesNode(host='127.0.0.1', port={cluster.port})",
        env,
        tmp_path,
        "seed-node",
    )
    try:
        wait_until(
            lambda: (
                f"Connected to achilles_server running at 127.0.0.1:{cluster.port}" in node.output()
            ),
            20,
            what="the Connected line",
        )
        assert "GREETING: Welcome!" in node.output()
        assert "CLIENT_ID: " in node.output()
        wait_until(lambda: cluster.node_count() == 3, 20, what="the node to register")
    finally:
        node.stop()
        wait_until(lambda: cluster.node_count() == 2, 20, what="the node to leave")


def test_run_achilles_node_without_secret_refuses(tmp_path):
    """runAchillesNode with no secret anywhere exits at once, saying how to supply one."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from achilles.lineReceiver.achilles_node import runAchillesNode; runAchillesNode()",
        ],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "runAchillesNode needs the cluster secret" in out.stderr
    assert "ACHILLES_SECRET_KEY" in out.stderr and ".env" in out.stderr


def test_run_achilles_server_without_secret_refuses(no_cluster_config):
    """runAchillesServer with no secret anywhere raises ConfigError naming the ways to give one."""
    with pytest.raises(ConfigError, match="ACHILLES_SECRET_KEY"):
        achilles_server.runAchillesServer(port=0)


def test_gen_config_then_run_server_without_arguments(tmp_path, monkeypatch, capsys):
    """genConfig(host, port, username, secret_key) writes .env; runAchillesServer() uses it."""
    monkeypatch.chdir(tmp_path)
    secret = secrets.token_hex(8)
    path = achilles_server.genConfig("127.0.0.1", 0, "foo", secret)
    assert path == str(tmp_path / ".env")
    assert path in capsys.readouterr().out
    server = _python(
        "from achilles.lineReceiver.achilles_server import runAchillesServer; runAchillesServer()",
        child_env(PYTHONUNBUFFERED="1"),
        tmp_path,
        "seed-server-dotenv",
    )
    try:
        port = _server_port(server)
        assert port != 0
        assert core_status(port=port, secret_key=secret)["nodes"] == []
    finally:
        server.stop()


def test_node_gen_config_writes_only_the_address(tmp_path, monkeypatch, capsys):
    """The node's genConfig(host, port) writes the address and no credentials."""
    monkeypatch.chdir(tmp_path)
    path = achilles_node.genConfig("10.0.0.5", 9999)
    assert path in capsys.readouterr().out
    text = (tmp_path / ".env").read_text()
    assert "ACHILLES_HOST=10.0.0.5" in text and "ACHILLES_PORT=9999" in text
    assert "SECRET" not in text and "USERNAME" not in text
