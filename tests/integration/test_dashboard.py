"""The server's web dashboard and /metrics, against a real server and nodes: the page
rendered by headless Chromium (driven over the DevTools protocol, see tests/cdp.py),
/metrics parsed, and the login of a dashboard served off loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from cdp import CHROMIUM, Browser
from conftest import Cluster, child_env, wait_until
from tasks import sleep_then_square

from achilles import Pool

_DASHBOARD = re.compile(r"dashboard on (https?://\S+)")
HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


class HostileError(Exception):
    """An exception whose text is markup."""


def raise_hostile(x: int) -> int:
    raise HostileError(HOSTILE + f" {x}")


#: an exception type whose name is markup (no spaces: it survives as the type name)
HOSTILE_KIND = "<img/src=x/onerror=document.title=1>"


def raise_hostile_kind(x: int) -> int:
    raise type(HOSTILE_KIND, (Exception,), {})(x)


def start(request: Any, tmp_path_factory: Any, address: str, nodes: int = 2) -> tuple[Cluster, str]:
    """A cluster whose server serves its dashboard at ``address``; and the URL."""
    cluster = Cluster(request, str(tmp_path_factory.mktemp("nodecwd")))
    request.addfinalizer(cluster.stop)
    server = cluster.start_server(ACHILLES_DASHBOARD=address)
    url = wait_until(
        lambda: _DASHBOARD.search(server.output()), 20, what="the dashboard", alive=server.alive
    ).group(1)
    for _ in range(nodes):
        cluster.start_node(1)
    return cluster, url


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's own certificate (no CA in a test)
    req = urllib.request.Request(url, headers=headers, method="GET")
    return _open(req, ctx)


def post(url: str, body: bytes = b"", **headers: str) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    return _open(req, ctx)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def _open(req: urllib.request.Request, ctx: ssl.SSLContext) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format to {name: [(labels, value)]}; every sample has its TYPE."""
    typed: set[str] = set()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.e+-]+|NaN)$")
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        m = sample.match(line)
        assert m, f"not a sample line: {line!r}"
        assert m.group(1) in typed, f"{m.group(1)} has no TYPE"
        labels = dict(label.findall(m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return out


@pytest.mark.skipif(
    not CHROMIUM, reason="Debian's chromium is not installed (apt-get install chromium)"
)
def test_page_in_chromium(request: Any, tmp_path_factory: Any) -> None:
    """Headless Chromium shows the nodes, a job's progress advancing without a reload, a
    failure with its traceback, and peer text (an exception's markup) only as text."""
    cluster, url = start(request, tmp_path_factory, "127.0.0.1:0")
    browser = Browser()
    request.addfinalizer(browser.close)
    browser.navigate(url)
    wait_until(
        lambda: browser.js("document.querySelectorAll('#nodes tr[data-node]').length") == 2,
        20,
        what="two nodes on the page",
    )
    browser.js("window.__same_page = 1")  # gone if the page reloads

    with Pool(**cluster.kwargs()) as pool:
        result = pool.map_async(sleep_then_square, range(160), chunksize=1)
        seen: set[str] = set()

        def progress() -> bool:
            label = browser.js(
                "(document.querySelector('#jobs tr[data-job] .label') || {}).textContent || ''"
            )
            if label:
                seen.add(label.split(" ")[0])
            return len(seen) >= 3

        wait_until(progress, 30, what="the job's progress to advance on the page")
        function = browser.js(
            "document.querySelector('#jobs tr[data-job] td:nth-child(2)').textContent"
        )
        assert function.endswith("sleep_then_square"), function
        speed = browser.js(
            "document.querySelector('#jobs tr[data-job] td:nth-child(5)').textContent"
        )
        assert speed.endswith("items/s"), speed  # the job's length is known
        assert result.get(timeout=60) == [x * x for x in range(160)]
        with pytest.raises(HostileError):
            pool.map(raise_hostile, [7])
        with pytest.raises(Exception):  # whatever type arrives
            pool.map(raise_hostile_kind, [8])

    wait_until(
        lambda: browser.js("document.querySelectorAll('#failures .failure').length") >= 2,
        20,
        what="the failure on the page",
    )
    kinds = browser.js("[...document.querySelectorAll('#failures .kind')].map(e => e.textContent)")
    assert any(k.endswith("HostileError") for k in kinds), kinds
    assert any(k.endswith(HOSTILE_KIND) for k in kinds), kinds  # as text
    pre = browser.js("document.querySelector('#failures pre').textContent")
    assert HOSTILE in pre and "raise_hostile" in pre  # the remote traceback, as text
    assert browser.js("document.querySelectorAll('img, #failures script').length") == 0
    assert browser.js("document.title") == "achilles dashboard"
    events = browser.js("document.getElementById('events').textContent")
    assert "started" in events and "finished" in events
    assert browser.js("window.__same_page") == 1
    assert int(browser.js("document.body.dataset.updates")) >= 3
    nodes = browser.js(
        "[...document.querySelectorAll('#nodes tr[data-node]')]"
        ".map(r => [...r.cells].map(c => c.textContent))"
    )
    assert sum(int(n[4]) for n in nodes) >= 161  # chunks done, over both nodes
    assert all(n[9] == "ready" for n in nodes)


def test_metrics_and_snapshot(request: Any, tmp_path_factory: Any) -> None:
    """/metrics parses as Prometheus text and agrees with the work done; /snapshot.json
    holds no function code, arguments or results."""
    cluster, url = start(request, tmp_path_factory, "127.0.0.1:0")
    with Pool(**cluster.kwargs()) as pool:
        assert pool.map(sleep_then_square, range(20), chunksize=1) == [x * x for x in range(20)]
        with pytest.raises(HostileError):
            pool.map(raise_hostile, [1])
        # a notebook shows a link to the dashboard its settings name (the default here)
        assert 'href="http://127.0.0.1:8999/"' in pool._repr_html_()
    status, headers, body = get(url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    metrics = parse_metrics(body.decode())
    assert metrics["achilles_nodes"][0][1] == 2
    assert metrics["achilles_slots"][0][1] == 2
    done = metrics["achilles_node_chunks_done_total"]
    assert {labels["node"] for labels, _ in done} and sum(v for _, v in done) == 21
    assert metrics["achilles_jobs_started_total"][0][1] == 2
    assert metrics["achilles_task_failures_total"][0][1] == 1
    rss = [v for _, v in metrics["achilles_node_rss_bytes"]]
    wait_until(
        lambda: all(
            v > 0
            for _, v in parse_metrics(get(url + "metrics")[2].decode())["achilles_node_rss_bytes"]
        ),
        20,
        what="the nodes' memory reports",
    )
    assert len(rss) == 2
    snap = json.loads(get(url + "snapshot.json")[2])
    text = json.dumps(snap)
    assert "sleep_then_square" not in text, text  # code
    assert not re.search(r"(?<![\d.])361(?![\d.])", text), text  # results (19 * 19)


#: an address (TEST-NET-1) put on the loopback interface when this machine has no other
SPARE_ADDRESS = "192.0.2.77"


@pytest.fixture
def off_loopback(request: Any) -> str:
    """An address of this machine that is not loopback: its own, or (as root) one added
    to the loopback interface for the test and removed after it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
            address = s.getsockname()[0]
        if not address.startswith("127."):
            return address
    except OSError:
        pass
    add = ["ip", "addr", "add", f"{SPARE_ADDRESS}/32", "dev", "lo"]
    if os.geteuid() != 0 or subprocess.run(add, capture_output=True).returncode:
        pytest.fail("needs an address that is not loopback: none here, and cannot add one")
    request.addfinalizer(
        lambda: subprocess.run(["ip", "addr", "del", f"{SPARE_ADDRESS}/32", "dev", "lo"])
    )
    return SPARE_ADDRESS


def test_login_off_loopback(request: Any, tmp_path_factory: Any, off_loopback: str) -> None:
    """Off loopback: served over TLS; nothing without a login; a wrong secret is refused;
    the right one (an HMAC of a nonce, never the secret) gets an HttpOnly, SameSite=Strict
    cookie that works; the share token works; the secret is never sent back."""
    cluster, url = start(request, tmp_path_factory, f"{off_loopback}:0", nodes=1)
    assert url.startswith("https://")
    status, headers, _ = get(url)
    assert status == 302 and headers["Location"].endswith("/login")
    assert get(url + "metrics")[0] == 401
    assert get(url + "events")[0] == 401

    def nonce() -> str:
        return str(json.loads(post(url + "login/challenge")[2])["nonce"])

    def digest(secret: str, n: str) -> str:
        msg = ("achilles-dashboard-login:" + n).encode()
        return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()

    n = nonce()
    body = json.dumps({"nonce": n, "digest": digest("wrong secret", n)}).encode()
    status, headers, _ = post(url + "login", body, **{"Content-Type": "application/json"})
    assert status == 403 and "Set-Cookie" not in headers

    n = nonce()
    body = json.dumps({"nonce": n, "digest": digest(cluster.secret, n)}).encode()
    status, headers, reply = post(url + "login", body, **{"Content-Type": "application/json"})
    assert status == 200, reply
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Secure" in cookie
    session = cookie.split(";")[0]
    # the nonce was single-use
    assert post(url + "login", body, **{"Content-Type": "application/json"})[0] == 403
    status, _, page = get(url, Cookie=session)
    assert status == 200 and b"achilles dashboard" in page
    status, _, metrics = get(url + "metrics", Cookie=session)
    assert status == 200 and b"achilles_nodes 1" in metrics
    assert get(url + "metrics", Cookie="achilles_session=forged")[0] == 401

    token = hmac.new(cluster.secret.encode(), b"achilles-dashboard-share", hashlib.sha256)
    share = token.hexdigest()[:40]
    assert get(url + "metrics", Authorization=f"Bearer {share}")[0] == 200
    status, headers, _ = get(url + f"?token={share}")
    assert status == 302 and "HttpOnly" in headers["Set-Cookie"]

    log = cluster.server.output() if cluster.server else ""
    assert cluster.secret not in log and share not in log


@pytest.mark.skipif(not CHROMIUM, reason="no chromium (Debian: apt-get install chromium)")
def test_login_page_in_chromium(request: Any, tmp_path_factory: Any, off_loopback: str) -> None:
    """The login page's own HMAC (plain JavaScript SHA-256): a wrong secret is refused on
    the page, the right one opens the dashboard."""
    cluster, url = start(request, tmp_path_factory, f"{off_loopback}:0", nodes=1)
    # the server's own certificate: no CA to trust it by in a test
    browser = Browser(1200, 800, "--ignore-certificate-errors")
    request.addfinalizer(browser.close)
    browser.navigate(url)
    wait_until(
        lambda: browser.js("location.pathname + document.readyState") == "/logincomplete",
        20,
        what="the login page",
    )

    def submit(secret: str) -> None:
        browser.js(
            f"document.getElementById('secret').value = {json.dumps(secret)};"
            "document.getElementById('login').requestSubmit()"
        )

    submit("not the secret")
    wait_until(
        lambda: "Refused" in browser.js("document.getElementById('error').textContent"),
        20,
        what="the refusal on the page",
    )
    submit(cluster.secret)
    wait_until(
        lambda: (
            browser.js(
                "location.pathname === '/' && "
                "document.querySelectorAll('#nodes tr[data-node]').length"
            )
            == 1
        ),
        20,
        what="the dashboard after the login",
    )
    assert browser.js("document.cookie") == ""  # HttpOnly: no script sees the session


def test_dashboard_port_taken_is_a_warning(request: Any, tmp_path_factory: Any) -> None:
    """A dashboard port already in use: one warning, and the server runs on without it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cluster = Cluster(request, str(tmp_path_factory.mktemp("nodecwd")))
        request.addfinalizer(cluster.stop)
        server = cluster.start_server(ACHILLES_DASHBOARD=f"127.0.0.1:{port}")
        cluster.start_node(1)
        wait_until(lambda: "no dashboard" in server.output(), 20, what="the warning")
        with Pool(**cluster.kwargs()) as pool:
            assert pool.map(abs, [-1, -2]) == [1, 2]
        assert "dashboard on" not in server.output()


def test_dashboard_off(request: Any, tmp_path_factory: Any) -> None:
    """``--dashboard off`` (ACHILLES_DASHBOARD=off) opens no dashboard."""
    cluster = Cluster(request, str(tmp_path_factory.mktemp("nodecwd")))
    request.addfinalizer(cluster.stop)
    server = cluster.start_server(ACHILLES_DASHBOARD="off")
    cluster.start_node(1)
    assert "dashboard" not in server.output()


def test_watchers_share_one_snapshot(request: Any, tmp_path_factory: Any) -> None:
    """Two event streams at once get the same snapshots (one built per second)."""
    _, url = start(request, tmp_path_factory, "127.0.0.1:0", nodes=1)
    got: list[list[bytes]] = [[], []]

    def read(i: int) -> None:
        with urllib.request.urlopen(url + "events", timeout=10) as resp:
            while len(got[i]) < 3:
                line = resp.readline()
                if line.startswith(b"data: "):
                    got[i].append(line)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(len(g) == 3 for g in got)
    snaps = [json.loads(g[-1][6:]) for g in got]
    assert snaps[0]["nodes"][0]["name"] == snaps[1]["nodes"][0]["name"]


def test_dashboard_command_prints_the_url() -> None:
    """``achilles dashboard --no-browser`` prints the URL; ``--share`` adds the token."""
    env = child_env(ACHILLES_DASHBOARD="127.0.0.1:8123", ACHILLES_SECRET_KEY="k" * 40)
    out = subprocess.run(
        [sys.executable, "-m", "achilles", "dashboard", "--no-browser"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "http://127.0.0.1:8123/", out
    out = subprocess.run(
        [sys.executable, "-m", "achilles", "dashboard", "--no-browser", "--share"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    token = hmac.new(b"k" * 40, b"achilles-dashboard-share", hashlib.sha256).hexdigest()[:40]
    assert out.stdout.strip() == f"http://127.0.0.1:8123/?token={token}", out
