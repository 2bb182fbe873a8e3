"""Security against real processes: the secret on the wire, hostile raw sockets, limits,
insecure mode, TLS and version skew.

Raw sockets speak the wire protocol by hand (``Raw``); a recording TCP proxy
(``TcpProxy``) sits between real peers and a real server. After every hostile input a
real ``Pool`` job must still complete on the same server.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import wire
from conftest import Cluster, Proc, child_env, wait_until
from wire import Raw, encode_bytes

import achilles
from achilles import Pool
from achilles.net.connection import PYTHON
from achilles.protocol import messages as m
from achilles.protocol.framing import (
    MAX_HEADER_LENGTH,
    MAX_PAYLOAD_LENGTH,
    PREAUTH_MAX_HEADER_LENGTH,
)

JOB = list(range(-40, 0))
EXPECTED = [abs(x) for x in JOB]


def line(header: dict[str, Any]) -> bytes:
    return json.dumps(header).encode() + b"\n"


def still_serving(cluster: Cluster, pool: Pool, nodes: int = 2) -> None:
    """The server process is alive, its nodes are registered, and a Pool job completes."""
    assert cluster.server is not None and cluster.server.alive()
    assert pool.map_async(abs, JOB, chunksize=4).get(60) == EXPECTED
    assert cluster.node_count() == nodes


def log_count(proc: Proc, pattern: str) -> int:
    return len(re.findall(pattern, proc.output()))


@pytest.fixture(scope="module")
def pool(cluster: Cluster) -> Any:
    """A Pool on the module's cluster, connected before any hostile input arrives."""
    with Pool(**cluster.kwargs()) as p:
        assert p.map(abs, JOB) == EXPECTED
        yield p


# --- a recording proxy ---------------------------------------------------------------------------
class TcpProxy:
    """Forwards 127.0.0.1:<port> to the server, recording every byte in both directions."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[dict[str, bytearray]] = []
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._socks: list[socket.socket] = [self.listener]
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.05):
                if key.data is None:
                    self._accept()
                else:
                    self._pump(key.fileobj, *key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        rec = {"c2s": bytearray(), "s2c": bytearray()}
        self.conns.append(rec)
        self._socks += [client, upstream]
        self._sel.register(client, selectors.EVENT_READ, (upstream, rec["c2s"]))
        self._sel.register(upstream, selectors.EVENT_READ, (client, rec["s2c"]))

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if data:
            record += data
            try:
                dst.sendall(data)
                return
            except OSError:
                pass
        for s in (src, dst):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self._socks:
            s.close()
        self._sel.close()


@pytest.fixture
def proxy() -> Any:
    """A factory of recording proxies, all stopped at the end of the test."""
    made: list[TcpProxy] = []

    def make(upstream: int) -> TcpProxy:
        made.append(TcpProxy(upstream))
        return made[-1]

    yield make
    for p in made:
        p.stop()


def secret_forms(secret: str) -> list[bytes]:
    raw = secret.encode("utf-8")
    forms = [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw)]
    try:
        forms += [bytes.fromhex(secret)]  # the conftest secret is itself hex
    except ValueError:
        pass
    return forms


# --- 1. the secret never crosses the wire; recorded handshakes do not replay -------------------
def test_secret_never_crosses_the_wire_and_handshakes_do_not_replay(fresh_cluster, proxy):
    """Node, controller, status and kill traffic never carries the secret; a replay fails."""
    cluster = fresh_cluster(nodes=0)
    tap = proxy(cluster.port)
    node = Proc(
        [sys.executable, "-m", "achilles", "node", "--port", str(tap.port), "--processes", "1"],
        env=cluster.env(),
        cwd=cluster.workdir,
        name="proxied-node",
    )
    cluster.nodes.append(node)  # stopped with the cluster
    wait_until(lambda: cluster.node_count() == 1, 20, what="the proxied node")
    marker = "plain-text-argument-7f3a"
    via_proxy = dict(host="127.0.0.1", port=tap.port, secret_key=cluster.secret)
    with Pool(**via_proxy) as pool:
        assert pool.map(str.upper, [marker]) == [marker.upper()]
    assert len(achilles.getClusterStatus(**via_proxy)["nodes"]) == 1
    assert achilles.killCluster(command_verified=True, **via_proxy) == 1
    assert node.popen.wait(20) == 0
    tap.stop()

    assert len(tap.conns) >= 4  # node, controller, status, kill
    wire = b"".join(bytes(c["c2s"]) + bytes(c["s2c"]) for c in tap.conns)
    for form in secret_forms(cluster.secret):
        assert form not in wire, f"the secret crossed the wire as {form!r}"
    assert marker.encode() in wire  # without TLS, data is readable: the capture is real
    for output in (cluster.server.output(), node.output()):
        assert cluster.secret not in output

    # each peer's second line, after its Hello
    controller_lines = [bytes(c["c2s"]).split(b"\n", 2)[1] for c in tap.conns]
    replies = [ln for ln in controller_lines if json.loads(ln).get("t") == "auth"]
    assert len(replies) == len(tap.conns)  # every peer authenticated with an AuthReply
    for recorded in replies:
        raw = Raw(cluster.port)
        raw.challenge()
        raw.send(recorded + b"\n")
        err = raw.error_then_close()
        assert err.code == "auth-failed"
        assert not any(isinstance(f.msg, m.Welcome) for f in raw.frames)
        raw.close()
    assert cluster.server.alive()


# --- 2. before authentication a raw socket learns nothing ---------------------------------------
def test_raw_socket_without_secret_learns_only_the_challenge(cluster, pool):
    """An unauthenticated socket gets a Challenge; asking for anything else closes it."""
    raw = Raw(cluster.port)
    challenge = raw.challenge()
    assert challenge.python == PYTHON and challenge.version == m.PROTOCOL_VERSION
    raw.send(encode_bytes(m.StatusRequest()))
    err = raw.error_then_close()
    assert err.code == "not-authenticated"
    assert [type(f.msg) for f in raw.frames] == [m.Challenge, m.ErrorFrame]
    raw.close()
    still_serving(cluster, pool)


# --- 4. the hostile-input matrix over real sockets -----------------------------------------------
@dataclass
class Row:
    id: str
    role: str | None  # None: sent before authenticating
    make: Callable[[Raw, str], bytes]  # (connection, secret) -> bytes to send
    codes: tuple[str, ...]
    says: tuple[str, ...] = ()  # text the error detail must contain
    other_job: bool = False  # another controller has a job when the row runs


def raw(data: bytes) -> Callable[[Raw, str], bytes]:
    return lambda conn, secret: data


def reply(**changes: Any) -> Callable[[Raw, str], bytes]:
    """A correct node AuthReply for this connection, with some header fields replaced."""

    def make(conn: Raw, secret: str) -> bytes:
        return line({**json.loads(conn.auth_reply(secret, "node")), **changes})

    return make


def signed(**claims: Any) -> Callable[[Raw, str], bytes]:
    """An AuthReply proven with the secret over what it claims: a peer that knows the
    secret, refused for something else (and told so with the server's proof)."""

    def make(conn: Raw, secret: str) -> bytes:
        claims.setdefault("role", "node")
        return wire.encode_bytes(wire.auth_reply(conn.nonce, secret, name="raw-socket", **claims))

    return make


SUBMIT = {
    "t": "submit",
    "job": "j",
    "max_attempts": 3,
    "timeout": 0,
    "limit": 0,
    "total": 1,
    "isolated": 0,
    "name": "f",
    "items": -1,
}
ROWS: list[Row] = [
    Row(
        "garbage-bytes", None, raw(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\xff\xfe\n"), ("bad-json",)
    ),
    Row(
        "endless-header-no-newline",
        None,
        raw(b"A" * (PREAUTH_MAX_HEADER_LENGTH + 100)),
        ("header-too-long",),
    ),
    Row("http-request", None, raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ("bad-json",)),
    Row("json-not-object", None, raw(b"[1, 2, 3]\n"), ("not-object",)),
    Row("wrong-field-types", None, reply(slots="all", version="1"), ("bad-field",)),
    Row("unknown-type", None, raw(line({"t": "exec", "len": 0})), ("unknown-type",)),
    Row("negative-length", None, raw(line({**SUBMIT, "len": -1})), ("bad-length",)),
    Row(
        "payload-before-auth",
        None,
        raw(line({**SUBMIT, "len": 5}) + b"12345"),
        ("payload-before-auth",),
    ),
    Row("status-before-auth", None, raw(encode_bytes(m.StatusRequest())), ("not-authenticated",)),
    Row("unknown-role", None, signed(role="root"), ("bad-role",)),
    Row("wrong-digest", None, reply(digest="00" * 32), ("auth-failed",)),
    Row("lone-surrogate-in-nonce", None, reply(nonce="\ud800"), ("bad-field", "auth-failed")),
    Row(
        "other-python",
        None,
        signed(python="3.99"),
        ("version-mismatch",),
        says=("Python 3.99", f"Python {PYTHON}"),
    ),
    Row(
        "other-protocol",
        None,
        signed(version=m.PROTOCOL_VERSION + 1),
        ("version-mismatch",),
        says=(f"protocol {m.PROTOCOL_VERSION + 1}", f"speaks {m.PROTOCOL_VERSION}"),
    ),
    Row(
        "endless-header-after-auth",
        "controller",
        raw(b"A" * (MAX_HEADER_LENGTH + 100)),
        ("header-too-long",),
    ),
    Row("not-json-after-auth", "controller", raw(b"{oops\n"), ("bad-json",)),
    Row(
        "wrong-types-after-auth",
        "controller",
        raw(line({**SUBMIT, "max_attempts": "3"})),
        ("bad-field",),
    ),
    Row(
        "unknown-type-after-auth",
        "controller",
        raw(line({"t": "shell", "len": 0})),
        ("unknown-type",),
    ),
    Row(
        "payload-over-limit",
        "controller",
        raw(line({"t": "chunk", "len": MAX_PAYLOAD_LENGTH + 1, "job": "j", "seq": 0})),
        ("payload-too-large",),
    ),
    Row(
        "negative-length-after-auth",
        "controller",
        raw(line({"t": "chunk", "len": -5, "job": "j", "seq": 0})),
        ("bad-length",),
    ),
    Row(
        "controller-sends-result",
        "controller",
        raw(encode_bytes(m.Result("j", 0, m.OK, 0.0), b"R")),
        ("not-allowed",),
    ),
    Row("node-sends-submit", "node", raw(line({**SUBMIT, "len": 1}) + b"F"), ("not-allowed",)),
    Row("admin-sends-chunk", "admin", raw(encode_bytes(m.Chunk("j", 0), b"A")), ("not-allowed",)),
    Row(
        "node-result-for-a-job-it-was-never-given",
        "node",
        raw(encode_bytes(m.Result("other-job", 3, m.OK, 0.0), b"FORGED")),
        ("refused",),
        other_job=True,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input_over_a_socket(cluster, pool, row: Row):
    """Each hostile input gets its error frame and a close; a Pool job still completes."""
    owner = None
    if row.other_job:  # another controller's job, with no chunk given to anyone
        owner = Raw(cluster.port)
        owner.authenticate(cluster.secret, "controller")
        owner.send(line({**SUBMIT, "job": "other-job", "len": 1}) + b"F")
    conn = Raw(cluster.port)
    if row.role is None:
        conn.challenge()
    else:
        conn.authenticate(cluster.secret, row.role)
    conn.send(row.make(conn, cluster.secret))
    err = conn.error_then_close()
    assert err.code in row.codes, err
    for text in row.says:
        assert text in err.detail, err.detail
    conn.close()
    if owner is not None:
        owner.close()
    still_serving(cluster, pool)


def test_thousands_of_connections_opened_and_dropped(cluster, pool):
    """2000 connections opened and dropped (some mid-header, some reset) leave the server
    serving, with its running job finished and its file descriptors back where they were."""
    fds = lambda: len(os.listdir(f"/proc/{cluster.server.pid}/fd"))
    before = fds()
    running = pool.map_async(abs, range(-3000, 0), chunksize=5)
    linger_reset = struct.pack("ii", 1, 0)
    deadline = time.monotonic() + 60
    for i in range(2000):
        assert time.monotonic() < deadline, f"flood stalled after {i} connections"
        s = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
        if i % 4 == 1:
            s.sendall(b'{"t":"auth","ro')  # half a header
        elif i % 4 == 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_reset)  # RST, not FIN
        elif i % 4 == 3:
            s.sendall(b'{"t":"hello","len":0}\n')  # the peer speaks first
            s.recv(1)  # wait for the challenge to start arriving
        s.close()
    assert running.get(60) == [abs(x) for x in range(-3000, 0)]
    wait_until(lambda: fds() <= before + 2, 20, what="the server's descriptors to drain")
    still_serving(cluster, pool)


# --- stalls, on a server with short timeouts -----------------------------------------------------
@pytest.fixture(scope="module")
def tight(request, tmp_path_factory) -> Cluster:
    """A server with a 1 s handshake timeout and a 2 s heartbeat timeout, and one node."""
    c = Cluster(request, str(tmp_path_factory.mktemp("tight")))
    request.addfinalizer(c.stop)
    c.start_server(ACHILLES_HANDSHAKE_TIMEOUT="1", ACHILLES_HEARTBEAT_TIMEOUT="2")
    c.start_node(1, ACHILLES_HEARTBEAT_INTERVAL="0.3")
    return c


@pytest.fixture
def tight_pool(tight, monkeypatch) -> Any:
    """A Pool on the tight server that heartbeats often enough not to be dropped itself."""
    monkeypatch.setenv("ACHILLES_HEARTBEAT_INTERVAL", "0.3")
    with Pool(**tight.kwargs()) as p:
        yield p


def test_stalled_handshake_is_dropped(tight, tight_pool):
    """Connections that stall mid-header or say nothing are dropped at the handshake timeout."""
    silent, partial = Raw(tight.port), Raw(tight.port)
    silent.challenge()
    partial.challenge()
    partial.send(b'{"t":"auth","role":"node","user')
    started = time.monotonic()
    for conn in (silent, partial):
        conn.until_closed()
        assert not any(isinstance(f.msg, m.Welcome) for f in conn.frames)
        conn.close()
    assert time.monotonic() - started < 10
    wait_until(lambda: log_count(tight.server, r"did not authenticate") >= 2, 10)
    still_serving(tight, tight_pool, nodes=1)


def test_stalled_authenticated_peer_is_dropped(tight, tight_pool):
    """An authenticated peer that sends half a frame and stalls is dropped at heartbeat timeout."""
    conn = Raw(tight.port)
    conn.authenticate(tight.secret, "controller")
    conn.send(line({"t": "chunk", "len": 1000, "job": "j", "seq": 0}) + b"x" * 100)
    conn.until_closed()
    conn.close()
    wait_until(
        lambda: log_count(tight.server, r"controller raw-socket lost: no heartbeat") >= 1, 10
    )
    still_serving(tight, tight_pool, nodes=1)


# --- the connection cap ---------------------------------------------------------------------------
CAP = 4


@pytest.fixture(scope="module")
def capped(request, tmp_path_factory) -> Cluster:
    """A server that accepts at most CAP connections, and one node."""
    c = Cluster(request, str(tmp_path_factory.mktemp("capped")))
    request.addfinalizer(c.stop)
    c.start_server(ACHILLES_MAX_CONNECTIONS=str(CAP))
    c.start_node(1)
    return c


def fill(cluster: Cluster) -> list[Raw]:
    """Authenticated admin sockets until the server refuses one with too-many-connections."""
    held: list[Raw] = []
    for _ in range(CAP + 1):
        conn = Raw(cluster.port)
        first = conn.next_msg()
        if isinstance(first, m.Challenge):
            conn.nonce = first.nonce
            conn.send(conn.auth_reply(cluster.secret, "admin"))
            assert isinstance(conn.next_msg(), m.Welcome)
            held.append(conn)
            continue
        assert isinstance(first, m.ErrorFrame) and first.code == "too-many-connections", first
        conn.until_closed()
        conn.close()
        return held
    raise AssertionError(f"the server accepted more than {CAP} connections")


def test_connection_cap_refuses_extra_connections(capped):
    """Past ACHILLES_MAX_CONNECTIONS a connection gets too-many-connections; freed slots return."""
    held = fill(capped)
    assert 1 <= len(held) <= CAP - 1  # the node holds one slot
    assert log_count(capped.server, r"over 4 connections") >= 1
    for conn in held:
        conn.close()
    wait_until(lambda: _status_ok(capped), 20, what="a free slot")
    with Pool(**capped.kwargs()) as pool:
        still_serving(capped, pool, nodes=1)


def _status_ok(cluster: Cluster) -> bool:
    try:
        return cluster.node_count() == 1
    except achilles.AchillesError:
        return False


def test_peer_refused_at_the_cap_retries_instead_of_giving_up(capped):
    """A node turned away because the server is full keeps retrying and joins once a slot frees."""
    held = fill(capped)
    refusals = log_count(capped.server, r"over 4 connections")
    late = capped.start_node(1, wait=False)
    wait_until(
        lambda: log_count(capped.server, r"over 4 connections") > refusals or not late.alive(),
        20,
        what="the late node to be turned away",
    )
    for conn in held:
        conn.close()
    wait_until(lambda: not late.alive() or _nodes(capped) == 2, 30, what="the late node")
    assert late.alive(), f"the node gave up for good:\n{late.output()[-600:]}"


def _nodes(cluster: Cluster) -> int:
    try:
        return cluster.node_count()
    except achilles.AchillesError:
        return -1


# --- 3. starting without a secret, insecure loopback mode, secrets in argv -----------------------
def test_insecure_loopback_server_runs_without_secret(tmp_path):
    """--insecure-loopback starts a secret-less server on 127.0.0.1 and warns that it is open."""
    proc = Proc(
        [sys.executable, "-m", "achilles", "server", "--port", "0", "--insecure-loopback"],
        env=child_env(),
        cwd=tmp_path,
        name="insecure",
    )
    try:
        match = wait_until(
            lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.output()),
            20,
            what="the insecure server",
        )
        assert "INSECURE" in proc.output()
        conn = Raw(int(match.group(1)))
        conn.authenticate("", "admin")
        conn.close()
    finally:
        proc.stop()


def test_insecure_mode_is_refused_off_loopback(tmp_path):
    """--insecure-loopback on a non-loopback address exits non-zero without listening."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "achilles",
            "server",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--insecure-loopback",
        ],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "loopback" in out.stderr and "listening" not in out.stdout


def test_secret_on_the_command_line_warns_on_stderr(cluster, tmp_path):
    """A --secret-key argument makes the command warn on stderr, without echoing the secret."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "achilles",
            "status",
            "--json",
            "--port",
            str(cluster.port),
            "--secret-key",
            cluster.secret,
        ],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "warning" in out.stderr and "ACHILLES_SECRET_KEY" in out.stderr
    assert "warning" not in out.stdout and json.loads(out.stdout)["nodes"]
    assert cluster.secret not in out.stderr + out.stdout


# --- 6. TLS ---------------------------------------------------------------------------------------
def _write_ca(tmp: Any, name: str) -> tuple[Any, Any, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, str(path)


def _write_server_cert(tmp: Any, ca_key: Any, ca_cert: Any) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def tls(request, tmp_path_factory) -> dict[str, Any]:
    """A TLS-only server (certificate from a test CA, IP SAN 127.0.0.1: a user's own PKI)
    and one node trusting it."""
    tmp = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert, ca = _write_ca(tmp, "test-ca")
    _, _, other_ca = _write_ca(tmp, "other-ca")
    cert, key = _write_server_cert(tmp, ca_key, ca_cert)
    c = Cluster(request, str(tmp_path_factory.mktemp("tlsnode")))
    request.addfinalizer(c.stop)
    c.start_server(ACHILLES_TLS_CERT=cert, ACHILLES_TLS_KEY=key, ACHILLES_TLS="on")
    c.start_node(1, wait=False, ACHILLES_TLS_CA=ca)
    wait_until(
        lambda: (
            len(achilles.getClusterStatus(port=c.port, secret_key=c.secret, tls_ca=ca)["nodes"])
            == 1
        ),
        30,
        what="TLS node",
    )
    return {"cluster": c, "ca": ca, "other_ca": other_ca}


def test_tls_job_completes_and_is_encrypted(tls, proxy):
    """Over TLS a job completes, and the recorded bytes hold neither its data nor the secret."""
    c = tls["cluster"]
    tap = proxy(c.port)
    marker = "tls-protected-argument-91b2"
    with Pool(host="127.0.0.1", port=tap.port, secret_key=c.secret, tls_ca=tls["ca"]) as p:
        assert p.map(str.upper, [marker]) == [marker.upper()]
    tap.stop()
    c2s = bytes(tap.conns[0]["c2s"])
    assert c2s[:1] == b"\x16"  # a TLS handshake record, not a JSON header
    wire = b"".join(bytes(x["c2s"]) + bytes(x["s2c"]) for x in tap.conns)
    assert marker.encode() not in wire and marker.upper().encode() not in wire
    for form in secret_forms(c.secret):
        assert form not in wire


def _raises_within(seconds: float, **pool_kwargs: Any) -> BaseException:
    started = time.monotonic()
    with pytest.raises(achilles.AchillesError) as info:
        Pool(**pool_kwargs)
    assert time.monotonic() - started < seconds
    return info.value


def test_plain_client_cannot_use_a_tls_server(tls, monkeypatch):
    """A client speaking plain TCP never authenticates to a TLS-only server and gives up
    in time."""
    monkeypatch.setenv("ACHILLES_TLS", "off")
    monkeypatch.setenv("ACHILLES_RECONNECT_TIMEOUT", "1")
    c = tls["cluster"]
    _raises_within(30, host="127.0.0.1", port=c.port, secret_key=c.secret, username="plain-client")
    assert c.server.alive()


def test_client_with_another_ca_is_refused(tls, monkeypatch):
    """A client trusting another CA rejects the server's certificate and raises in time."""
    monkeypatch.setenv("ACHILLES_RECONNECT_TIMEOUT", "1")
    c = tls["cluster"]
    _raises_within(
        30,
        host="127.0.0.1",
        port=c.port,
        secret_key=c.secret,
        username="other-ca-client",
        tls_ca=tls["other_ca"],
    )
    assert c.server.alive()


def test_pool_asking_for_tls_never_reuses_a_plain_connection(cluster, pool, tls, monkeypatch):
    """A Pool with tls_ca does not ride an existing plain-text connection to the same server."""
    monkeypatch.setenv("ACHILLES_RECONNECT_TIMEOUT", "1")
    assert pool.map(abs, [-1]) == [1]  # a plain connection to this server is open
    _raises_within(30, **cluster.kwargs(), tls_ca=tls["ca"])
