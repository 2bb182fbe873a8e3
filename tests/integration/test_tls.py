"""Safe on a hostile network with only the secret: TLS with the server's own certificate
bound into the HMAC handshake, men in the middle caught, refusals that only a server
with the secret can make final, and the server's own start-up defences.

Real servers and nodes on 127.0.0.1 (``ACHILLES_TLS=on`` forces TLS on loopback, where
it is otherwise off), attacked through :mod:`relay` and raw sockets.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import tasks
from relay import Relay

from achilles import Pool
from achilles.protocol import auth
from achilles.testing import Cluster, Proc, empty_config_home, isolated_env, wait_until

TLS_ON = {"ACHILLES_TLS": "on"}


@pytest.fixture
def tls_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A server that accepts only TLS, and one node speaking TLS to it (this process's
    status calls and pools speak TLS too)."""
    monkeypatch.setenv("ACHILLES_TLS", "on")
    with Cluster(env=TLS_ON) as cluster:
        cluster.start_server()
        cluster.start_node()
        yield cluster


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for r in made:
        r.close()


def node_through(cluster: Cluster, port: int, **env: str) -> Proc:
    """A node of this cluster's secret that connects to ``port`` (a relay, say)."""
    return cluster._spawn("node", "relayed-node", ["--port", str(port), "--processes", "1"], env)


def test_map_over_tls_with_nothing_but_the_secret(tls_cluster: Cluster) -> None:
    """No certificate was made or copied by anyone: the server made its own (kept 0600
    in its config directory), and node and controller ran a map over TLS."""
    with Pool(**tls_cluster.kwargs()) as pool:
        assert pool.map(tasks.square, range(20)) == [x * x for x in range(20)]
    pem = os.path.join(empty_config_home(), "achilles", "server-tls.pem")
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600
    assert "accepted plain TCP" not in tls_cluster.server.output()  # type: ignore[union-attr]


def test_certificate_is_kept_and_reused() -> None:
    """A second server with the same config directory shows the same certificate."""
    fingerprints = []
    for _ in range(2):
        with Cluster(env=TLS_ON) as cluster:
            cluster.start_server()
            ctx = _any_cert_context()
            with (
                socket.create_connection(("127.0.0.1", cluster.port), 10) as raw,
                ctx.wrap_socket(raw) as tls_sock,
            ):
                der = tls_sock.getpeercert(binary_form=True)
            assert der
            fingerprints.append(auth.fingerprint(der))
    assert fingerprints[0] == fingerprints[1]


def _any_cert_context() -> Any:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_plain_tcp_is_refused_by_a_tls_only_server_and_the_node_keeps_trying(
    tls_cluster: Cluster,
) -> None:
    """A node told to use plain TCP is refused ("tls-required"). The refusal comes before
    the handshake proves anything, so the node does not give up: it retries."""
    node = node_through(tls_cluster, tls_cluster.port, ACHILLES_TLS="off")
    try:
        wait_until(
            lambda: node.output().count("tls-required") >= 2,
            30,
            what="two refused attempts",
            alive=node.alive,
        )
        assert "did not prove it knows the secret; retrying" in node.output()
        assert node.alive()
        assert "refused plain TCP" in tls_cluster.server.output()  # type: ignore[union-attr]
    finally:
        node.stop()


def test_a_relay_that_only_forwards_tls_is_harmless(
    tls_cluster: Cluster, relays: list[Relay]
) -> None:
    """A relay that passes the encrypted bytes on (it cannot read them) changes nothing:
    a node through it registers and works."""
    relay = Relay(tls_cluster.port)
    relays.append(relay)
    node = node_through(tls_cluster, relay.port, **TLS_ON)
    try:
        wait_until(lambda: tls_cluster.node_count() == 2, 30, alive=node.alive)
    finally:
        node.stop()


def test_man_in_the_middle_with_its_own_certificate_is_caught(
    tls_cluster: Cluster, relays: list[Relay]
) -> None:
    """An attacker that ends TLS on both sides (to read and change the traffic) shows the
    node its own certificate. The node's proof covers the fingerprint it saw, which is
    not the server's: the server refuses it, the node cannot check that refusal (it does
    not verify against what it saw), so it keeps retrying, and never runs anything for
    the attacker. The relay read the handshake, and nothing more."""
    relay = Relay(tls_cluster.port, terminate_tls=True)
    relays.append(relay)
    node = node_through(tls_cluster, relay.port, **TLS_ON)
    try:
        wait_until(
            lambda: node.output().count("auth-failed") >= 2,
            30,
            what="two refused handshakes",
            alive=node.alive,
        )
        assert tls_cluster.node_count() == 1  # only the honest node
        assert node.alive()
        assert {h["t"] for _, h in relay.seen} <= {"hello", "challenge", "auth", "error"}
    finally:
        node.stop()


def test_role_escalation_through_a_relay_is_refused(relays: list[Relay]) -> None:
    """The attack the old "|".join transcript allowed, on plain TCP: a relay hands an
    admin client (``achilles status``) a server nonce ending in "|Z|controller|u" and
    would replay its proof as a controller. The client refuses the malformed nonce; and
    a relay that instead rewrites the role in the client's AuthReply gets "auth-failed"
    from the server (the role is in the proof). No controller session either way."""
    with Cluster() as cluster:
        cluster.start_server()

        def crafted_nonce(way: str, header: dict[str, Any]) -> dict[str, Any]:
            if way == "down" and header.get("t") == "challenge":
                header["nonce"] += "|Z|controller|u"
            return header

        def as_controller(way: str, header: dict[str, Any]) -> dict[str, Any]:
            if way == "up" and header.get("t") == "auth":
                header["role"], header["username"] = "controller", "u"
            return header

        for rewrite, refusal in ((crafted_nonce, "bad-nonce"), (as_controller, "auth-failed")):
            relay = Relay(cluster.port, rewrite=rewrite)
            relays.append(relay)
            out = subprocess.run(
                [sys.executable, "-m", "achilles", "status", "--port", str(relay.port)],
                env=isolated_env(
                    ACHILLES_SECRET_KEY=cluster.secret, ACHILLES_RECONNECT_TIMEOUT="3"
                ),
                capture_output=True,
                text=True,
                timeout=60,
                cwd=cluster.workdir,
            )
            assert out.returncode != 0
            codes = [h.get("code") for way, h in relay.seen if h.get("t") == "error"]
            assert refusal in codes, (codes, out.stderr[-2000:])
        assert "controller u connected" not in cluster.server.output()  # type: ignore


def _fake_server(code: str, detail: str) -> tuple[socket.socket, list[int]]:
    """Whoever holds the port: answers every connection's Hello with a refusal, and
    counts the connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = [0]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            seen[0] += 1
            with conn:
                conn.recv(1024)
                conn.sendall(
                    b'{"t":"error","len":0,"code":"%s","detail":"%s","proof":""}\n'
                    % (code.encode(), detail.encode())
                )

    threading.Thread(target=serve, daemon=True).start()
    return listener, seen


def test_a_refusal_from_an_unproven_server_is_not_final() -> None:
    """A stand-in on the server's port (during a restart, or an attacker) says
    "auth-failed": before, the node exited with code 2 for good. Now it logs it and
    retries with backoff."""
    listener, seen = _fake_server("auth-failed", "wrong secret key")
    port = listener.getsockname()[1]
    node = Proc(
        [sys.executable, "-m", "achilles", "node", "--port", str(port), "--processes", "1"],
        env=isolated_env(ACHILLES_SECRET_KEY="s" * 32),
        name="lied-to-node",
    )
    try:
        wait_until(lambda: seen[0] >= 3, 30, what="three attempts", alive=node.alive)
        assert node.alive()
        assert "did not prove it knows the secret; retrying" in node.output()
    finally:
        node.stop()
        listener.close()


def test_a_refusal_the_server_proves_is_final(cluster: Any) -> None:
    """A node that knows the secret but runs another Python is refused with the server's
    proof: that refusal is final (exit code 2), as before."""
    code = (
        "import achilles.net.connection as c; c.PYTHON = '3.1'; "
        "from achilles.cli import main; import sys; "
        f"sys.exit(main(['node', '--port', '{cluster.port}', '--processes', '1']))"
    )
    node = Proc(
        [sys.executable, "-c", code],
        env=isolated_env(ACHILLES_SECRET_KEY=cluster.secret),
        name="old-python",
    )
    try:
        assert node.popen.wait(30) == 2
        assert "Python version mismatch" in node.output()
    finally:
        node.stop()


def test_weak_secret_is_warned_about_and_a_strong_one_offered() -> None:
    """The server warns at start about a short secret; ``achilles secret`` prints one
    of about 256 bits."""
    with Cluster(env={"ACHILLES_SECRET_KEY": "hunter2"}) as cluster:
        cluster.secret = "hunter2"
        cluster.start_server()
        assert "the secret is short or repetitive" in cluster.server.output()  # type: ignore
    out = subprocess.run(
        [sys.executable, "-m", "achilles", "secret"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=isolated_env(),
    )
    secret = out.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)
    assert auth.secret_bits(secret) > 2 * auth.WEAK_SECRET_BITS


def _soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.parametrize("soft,hard,expect_warning", [(256, 4096, False), (256, 512, True)])
def test_server_raises_its_descriptor_limit(soft: int, hard: int, expect_warning: bool) -> None:
    """Under a soft ``ulimit -n`` the server raises it to the hard limit; where even that
    is below its connection cap, it serves fewer connections and says so (before, peers
    past the limit got a silent EOF)."""
    with Cluster() as cluster:
        server = Proc(
            [
                "prlimit",
                f"--nofile={soft}:{hard}",
                "--",
                sys.executable,
                "-m",
                "achilles",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
            env=cluster.env(),
            cwd=cluster.workdir,
            name="limited-server",
        )
        try:
            wait_until(lambda: "listening on" in server.output(), 20, alive=server.alive)
            assert _soft_nofile(server.pid) == hard
            assert ("serving at most" in server.output()) == expect_warning
        finally:
            server.stop()
