"""A node cut off from the server without a FIN (its link dropped), in network
namespaces this test creates: detected by heartbeats, its chunks reassigned, and after
the link comes back the node reconnects."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys

import pytest
from conftest import Proc, child_env, wait_until

pytestmark = pytest.mark.chaos


def _netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"achk{secrets.token_hex(3)}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


requires_netns = pytest.mark.skipif(
    not _netns_available(), reason="needs root and `ip netns` to build test hosts"
)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts(request):
    """Two network namespaces joined by a veth pair: 'srv' (10.213.n.1) and 'nod' (.2)."""
    tag = secrets.token_hex(3)
    srv, nod = f"achs{tag}", f"achn{tag}"
    net = random.randrange(1, 250)
    request.addfinalizer(
        lambda: [
            subprocess.run(["ip", "netns", "del", ns], capture_output=True) for ns in (srv, nod)
        ]
    )
    ip("netns", "add", srv)
    ip("netns", "add", nod)
    ip("link", "add", f"vs{tag}", "type", "veth", "peer", "name", f"vn{tag}")
    ip("link", "set", f"vs{tag}", "netns", srv)
    ip("link", "set", f"vn{tag}", "netns", nod)
    ip("-n", srv, "addr", "add", f"10.213.{net}.1/30", "dev", f"vs{tag}")
    ip("-n", nod, "addr", "add", f"10.213.{net}.2/30", "dev", f"vn{tag}")
    for ns, dev in ((srv, f"vs{tag}"), (nod, f"vn{tag}")):
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", dev, "up")
    return {"srv": srv, "nod": nod, "server_ip": f"10.213.{net}.1", "link": (nod, f"vn{tag}")}


CONTROLLER = """
import sys, tasks
from achilles import Pool, getClusterStatus
kw = dict(host="127.0.0.1", port={port}, secret_key="{secret}")
with Pool(**kw) as pool:
    r = pool.map_async(tasks.sleep_then_square, range(200), chunksize=2)
    print("submitted", flush=True)
    sys.stdin.readline()                      # the test cuts the link, then says go
    assert r.get(120) == [x * x for x in range(200)]
    print("complete", flush=True)
"""


@requires_netns
def test_cut_link_node_is_replaced_then_returns(two_hosts, request):
    """Dropping a node's link (no FIN) gets it declared lost by heartbeat, the job
    completes on the other node, and the node rejoins once the link is back."""
    secret = secrets.token_hex(8)
    fast = dict(
        ACHILLES_HEARTBEAT_INTERVAL="0.3",
        ACHILLES_HEARTBEAT_TIMEOUT="2",
        ACHILLES_SECRET_KEY=secret,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=TESTS,
    )
    env = child_env(**fast)

    def in_ns(ns, *args, name):
        proc = Proc(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "achilles", *args], env=env, name=name
        )
        request.addfinalizer(proc.stop)
        return proc

    server = in_ns(two_hosts["srv"], "server", "--host", "0.0.0.0", "--port", "0", name="server")
    port = int(
        wait_until(
            lambda: (
                "listening on" in server.output()
                and server.output().split("listening on 0.0.0.0:")[1].split()[0]
            ),
            20,
            what="server port",
        )
    )
    in_ns(two_hosts["srv"], "node", "--port", str(port), "--processes", "1", name="near")
    in_ns(
        two_hosts["nod"],
        "node",
        "--host",
        two_hosts["server_ip"],
        "--port",
        str(port),
        "--processes",
        "1",
        name="far",
    )

    def status():
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                two_hosts["srv"],
                sys.executable,
                "-m",
                "achilles",
                "status",
                "--json",
                "--port",
                str(port),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return json.loads(out.stdout) if out.returncode == 0 else {"nodes": [], "jobs": []}

    wait_until(lambda: len(status()["nodes"]) == 2, 30, what="both nodes registered")
    ctl = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            two_hosts["srv"],
            sys.executable,
            "-c",
            CONTROLLER.format(port=port, secret=secret),
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    request.addfinalizer(lambda: (ctl.kill(), ctl.wait(10), ctl.stdin.close(), ctl.stdout.close()))
    assert ctl.stdout.readline().strip() == "submitted"
    wait_until(
        lambda: (
            all(n["inflight"] for n in status()["nodes"])
            and sum(n["done"] for n in status()["nodes"]) >= 4
        ),
        30,
        what="both nodes busy",
    )
    ns, dev = two_hosts["link"]
    ip("-n", ns, "link", "set", dev, "down")  # no FIN, no RST: silence
    ctl.stdin.write("go\n")
    ctl.stdin.flush()
    assert ctl.stdout.readline().strip() == "complete"
    assert ctl.wait(30) == 0
    ip("-n", ns, "link", "set", dev, "up")
    wait_until(lambda: len(status()["nodes"]) == 2, 40, what="the cut-off node to rejoin")
