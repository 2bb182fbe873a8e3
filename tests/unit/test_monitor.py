"""The dashboard's model and HTTP side without processes: the monitor's snapshot costs
the same however many tasks ran, its rings stay bounded, peer text is cut and escaped,
the new frames refuse bad values, and the login and share token rules."""

from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import json
import math
import pathlib
import sys
import traceback
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web import http
from twisted.web.test.requesthelper import DummyRequest

import achilles
from achilles import serialization
from achilles.config import Settings
from achilles.core import monitor as mon
from achilles.core import scheduler as sch
from achilles.errors import ProtocolError
from achilles.protocol import messages as m
from achilles.protocol.summary import error_summary
from achilles.web import site

SECRET = "s3cret-for-the-dashboard-tests-0123456789"


def cluster_with(tasks: int, nodes: int = 3, jobs: int = 2) -> sch.Scheduler:
    """A scheduler whose nodes have run ``tasks`` chunks of each of ``jobs`` jobs."""
    s = sch.Scheduler()
    for n in range(1, nodes + 1):
        s.handle(sch.NodeJoined(n, 2, f"node{n}"), 0.0)
    for j in range(jobs):
        owner = 100 + j
        s.handle(sch.JobSubmitted(f"job{j}", owner, b"f", total=tasks + 10), 0.0)
        seqs = list(range(tasks))
        if seqs:
            s.handle(sch.ChunksAdded(f"job{j}", seqs, [b"x"] * len(seqs), owner), 0.0)
        while any(node.inflight for node in s.nodes.values()):
            for node in list(s.nodes.values()):
                held = list(node.inflight)
                if held:
                    s.handle(
                        sch.ResultsReceived(
                            node.id,
                            held[0][0],
                            [q for _, q in held],
                            [m.OK] * len(held),
                            [b"r"] * len(held),
                            [0.001] * len(held),
                        ),
                        1.0,
                    )
    return s


def calls_in(fn: Any) -> int:
    """How many Python function calls ``fn()`` makes (a measure of its work)."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_snapshot_work_does_not_depend_on_the_number_of_tasks() -> None:
    """The same nodes and jobs after 100 or 20,000 chunks: the snapshot makes exactly as
    many calls (it reads counters, never walks per-task history)."""
    few, many = cluster_with(100), cluster_with(20_000)
    assert sum(j.done for j in many.jobs.values()) > 100 * sum(j.done for j in few.jobs.values())
    costs = []
    for s in (few, many):
        monitor = mon.Monitor()
        monitor.snapshot(s, 10.0, {}, {})  # first sight of each node and job
        costs.append(calls_in(lambda s=s, mo=monitor: mo.snapshot(s, 11.0, {}, {})))
    assert costs[0] == costs[1]


def test_rings_are_bounded() -> None:
    """Events, failure kinds, samples per kind and lost nodes stay within their caps."""
    monitor = mon.Monitor()
    for i in range(5000):
        monitor.event(float(i), "job-start", "x" * 10_000)
        monitor.failure(float(i), f"Kind{i}", "j", i, "n", "t" * 100_000)
        monitor.node_lost(i, float(i), "n", 0, 1)
    assert len(monitor.events) == mon.EVENTS
    assert all(len(text) < 400 for _, _, text in monitor.events)
    assert len(monitor.failures) == mon.FAILURE_KINDS + 1  # and the "other types"
    assert monitor.failures[mon.OTHER].count == 5000 - mon.FAILURE_KINDS
    assert all(len(g.samples) <= mon.FAILURE_SAMPLES for g in monitor.failures.values())
    assert all(len(s["traceback"]) < mon.TEXT_MAX + 50 for s in monitor.failures["Kind0"].samples)
    assert len(monitor.lost) == mon.LOST_NODES
    assert monitor.failures_total == 5000 and monitor.chunks_requeued == 5000


def test_snapshot_rates_eta_and_stragglers() -> None:
    """Rates come from counter deltas between snapshots; a node holding chunks that
    finished none for long is a straggler."""
    s = cluster_with(0, nodes=2, jobs=1)
    s.handle(sch.ChunksAdded("job0", list(range(8)), [b"x"] * 8, 100), 0.0)
    monitor = mon.Monitor()
    monitor.snapshot(s, 0.0, {}, {100: "alice"})
    node1 = s.nodes[1]
    held = [q for _, q in node1.inflight]
    s.handle(sch.ResultsReceived(1, "100-job0", held, [m.OK] * len(held), [b"r"] * len(held),
                                 [0.1] * len(held)), 2.0)  # fmt: skip
    snap = monitor.snapshot(s, 2.0, {1: 1.5}, {100: "alice"})
    job = snap["jobs"][0]
    assert job["owner"] == "alice" and job["done"] == len(held)
    assert job["rate"] == pytest.approx(len(held) / 2.0)
    assert job["eta"] == pytest.approx((10 - len(held)) / job["rate"], rel=0.01)
    assert job["items"] is None and job["items_rate"] is None  # length not said
    s.jobs["100-job0"].items = 40  # 10 chunks of 4 items
    job = monitor.snapshot(s, 4.0, {}, {100: "alice"})["jobs"][0]
    assert job["items"] == 40 and job["items_rate"] == pytest.approx(job["rate"] * 4)
    nodes = {n["name"]: n for n in snap["nodes"]}
    assert nodes["node1"]["rate"] == pytest.approx(len(held) / 2.0)
    assert nodes["node1"]["heard"] == 0.5
    snap = monitor.snapshot(s, 60.0, {}, {})
    assert [x["name"] for x in snap["stragglers"]] == ["node2"]


@pytest.mark.parametrize(
    "cpu, rss",
    [(math.nan, 1), (math.inf, 1), (-5.0, 1), (1e12, 1), (1.0, -2), (1.0, 2**60)],
)
def test_node_stats_frame_refuses_bad_values(cpu: float, rss: int) -> None:
    """NodeStats: NaN, infinities, negatives and absurd sizes are a protocol error."""
    with pytest.raises(ProtocolError):
        m.NodeStats(cpu, rss).check(0)
    m.NodeStats(-1.0, -1).check(0)  # unknown (not Linux) is fine


def test_failure_frame_is_bounded() -> None:
    """Failure: its text and kind have caps, its job id and chunk number the usual checks."""
    m.Failure("j1", 0, "ValueError").check(m.FAILURE_TEXT_MAX)
    for bad, n in [
        (m.Failure("j1", 0, "V" * (m.FAILURE_KIND_MAX + 1)), 0),
        (m.Failure("j1", 0, "V"), m.FAILURE_TEXT_MAX + 1),
        (m.Failure("<j>", 0, "V"), 0),
        (m.Failure("j1", -1, "V"), 0),
    ]:
        with pytest.raises(ProtocolError):
            bad.check(n)


class Weird(Exception):
    pass


def test_error_summary_reads_without_unpickling() -> None:
    """The type name and traceback come from the pickle's opcodes; a class that does not
    exist here (it would fail to unpickle) is read all the same; junk gives nothing."""
    try:
        raise Weird("line one\nline <two>: more")
    except Weird as exc:
        payload = serialization.dumps_exception(exc, traceback.format_exc())
    kind, text = error_summary(payload.replace(b"Weird", b"Wxird"))
    assert kind.endswith("Wxird") and "line <two>: more" in text
    assert error_summary(b"\x80\x05junk") == ("", "")
    big = "x" * 100_000
    try:
        raise ValueError(big)
    except ValueError as exc:
        kind, text = error_summary(serialization.dumps_exception(exc, traceback.format_exc()))
    assert kind == "ValueError" and len(text.encode()) <= m.FAILURE_TEXT_MAX


HOSTILE_JOB = {
    "id": "a",
    "owner": 'x"}\nfake_metric 1\\',
    **dict.fromkeys(("done", "inflight", "retries", "failures"), 0),
    "total": None,
}


def test_metrics_labels_are_escaped() -> None:
    """A label value with quotes, backslashes and newlines stays one well-formed sample."""
    monitor = mon.Monitor()
    snap = {
        "nodes": [],
        "jobs": [
            {
                "id": "a",
                "owner": 'x"}\nfake_metric 1\\',
                "done": 1,
                "total": None,
                "inflight": 0,
                "retries": 0,
                "failures": 0,
            }
        ],
        "totals": {"slots": 0, "busy": 0},
    }
    text = site.metrics_text(snap, monitor)
    assert "\nfake_metric" not in text
    assert 'owner="x\\"}\\nfake_metric 1\\\\"' in text


def test_parse_address() -> None:
    """``off``, ``PORT``, ``HOST:PORT`` and ``[v6]:PORT``."""
    assert site.parse_address("off") is None
    assert site.parse_address("8999") == ("127.0.0.1", 8999)
    assert site.parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert site.parse_address("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError):
        site.parse_address("host:99999")


# --- the HTTP side, over Twisted's DummyRequest -----------------------------------------
class FakeFactory:
    def __init__(self) -> None:
        from achilles.core.throttle import LoginThrottle

        self.scheduler = sch.Scheduler()
        self.monitor = mon.Monitor()
        self.peers: dict[int, Any] = {}
        self.throttle = LoginThrottle()


def dashboard() -> site.Dashboard:
    return site.Dashboard(FakeFactory(), Settings(secret_key=SECRET), Clock(), secure=True)


def request(
    dash: site.Dashboard,
    path: str,
    method: str = "GET",
    client: str = "10.1.2.3",
    body: bytes = b"",
    host: str = "dash.example",
    **headers: str,
) -> DummyRequest:
    req = DummyRequest(path.lstrip("/").split("/") if path != "/" else [b""])
    req.postpath = [p.encode() for p in path.lstrip("/").split("/")]
    req.prepath = []
    req.path = path.encode()
    req.method = method.encode()
    req.client = IPv4Address("TCP", client, 40000)
    req.requestHeaders.setRawHeaders(b"host", [host.encode()])
    for key, value in headers.items():
        req.requestHeaders.setRawHeaders(key.encode(), [value.encode()])
    if "token=" in path:
        query = path.split("?", 1)[1]
        req.args = {b"token": [query.split("=", 1)[1].encode()]}
        req.postpath = [b""]
    req.content = __import__("io").BytesIO(body)
    req.getRequestHostname = lambda: host.encode()  # type: ignore[method-assign]
    # the real Request's cookie formatting (DummyRequest has none)
    req.cookies = []
    req.addCookie = functools.partial(http.Request.addCookie, req)
    return req


def render(dash: site.Dashboard, req: DummyRequest) -> tuple[int, bytes]:
    from twisted.web.resource import getChildForRequest

    res = getChildForRequest(site.Root(dash), req)
    out = res.render(req)
    body = out if isinstance(out, bytes) else b"".join(req.written)
    return req.responseCode or 200, body


def test_login_wrong_secret_refused_right_one_sets_a_cookie() -> None:
    """Off loopback: refused without a login; a wrong HMAC is refused; the right one
    sets an HttpOnly, SameSite=Strict, Secure cookie that opens the page; nonces are
    single-use; the secret is in no response."""
    dash = dashboard()
    assert render(dash, request(dash, "/metrics"))[0] == 401
    nonce = json.loads(render(dash, request(dash, "/login/challenge", "POST"))[1])["nonce"]
    wrong = hmac.new(b"guess", b"achilles-dashboard-login:" + nonce.encode(), hashlib.sha256)
    req = request(dash, "/login", "POST", body=json.dumps(
        {"nonce": nonce, "digest": wrong.hexdigest()}).encode())  # fmt: skip
    code, body = render(dash, req)
    assert code == 403 and not req.cookies
    nonce = json.loads(render(dash, request(dash, "/login/challenge", "POST"))[1])["nonce"]
    body = json.dumps({"nonce": nonce, "digest": site.login_digest(SECRET, nonce)}).encode()
    req = request(dash, "/login", "POST", body=body)
    code, reply = render(dash, req)
    assert code == 200 and len(req.cookies) == 1
    cookie = req.cookies[0].decode()
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" in cookie
    assert SECRET not in cookie and SECRET.encode() not in reply
    assert render(dash, request(dash, "/login", "POST", body=body))[0] == 403  # replayed
    session = cookie.split(";")[0].split("=", 1)[1]
    req = request(dash, "/metrics")
    req.received_cookies = {b"achilles_session": session.encode()}
    code, text = render(dash, req)
    assert code == 200 and b"achilles_nodes 0" in text and SECRET.encode() not in text


def test_loopback_is_open_but_not_to_a_rebinding_page() -> None:
    """From loopback naming loopback: open. From loopback naming another host (DNS
    rebinding): a login is needed. The share token opens it and is read-only."""
    dash = dashboard()
    assert render(dash, request(dash, "/metrics", client="127.0.0.1", host="127.0.0.1"))[0] == 200
    assert render(dash, request(dash, "/metrics", client="127.0.0.1", host="localhost"))[0] == 200
    assert (
        render(dash, request(dash, "/metrics", client="127.0.0.1", host="evil.example"))[0] == 401
    )
    token = site.share_token(SECRET)
    assert SECRET not in token
    req = request(dash, "/metrics", Authorization=f"Bearer {token}")
    assert render(dash, req)[0] == 200
    req = request(dash, "/metrics", Authorization="Bearer " + "0" * 40)
    assert render(dash, req)[0] == 401


def test_page_assets_use_text_not_markup() -> None:
    """The page's script never assigns markup (innerHTML, outerHTML, insertAdjacentHTML,
    document.write) and loads nothing from another origin; the CSP forbids inline code."""
    static = pathlib.Path(achilles.__file__).parent / "web" / "static"
    for name in ("app.js", "login.js", "index.html", "login.html"):
        text = (static / name).read_text()
        for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "http"):
            assert bad not in text.replace("https://", "").replace("http-equiv", ""), (name, bad)
    assert b"script-src 'self'" in site._HEADERS[b"Content-Security-Policy"]


def test_web_is_imported_by_no_lower_layer() -> None:
    """achilles.web sits on top of the server: core, protocol, net, node, server and
    controller never import it (the CLI starts it; a pool's notebook link reads it)."""
    root = pathlib.Path(achilles.__file__).parent
    for layer in ("core", "protocol", "net", "node", "server", "controller"):
        for path in (root / layer).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith("achilles.web"), path
