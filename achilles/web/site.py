"""The dashboard's HTTP side: the page and its assets, the event stream, ``/metrics``,
the login, and who may see any of it.

Access: a request from this machine that names this machine in its ``Host`` header (a
DNS-rebinding page names another) is let in. Any other needs a session cookie, got by
proving the cluster secret (``/login``: the page computes an HMAC of a single-use
nonce, so the secret never crosses the wire), or the read-only share token
(``achilles dashboard --share``; derived from the secret, so changing the secret
revokes it) as ``?token=`` (which then sets the cookie) or ``Authorization: Bearer``.
Off loopback the dashboard is served over TLS with the server's certificate unless TLS
is off.

Cost: one snapshot (O(nodes + jobs), see :mod:`achilles.core.monitor`) per second,
built only while at least one page is connected, and sent to every watcher.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from importlib import resources
from typing import Any

from twisted.internet import task
from twisted.web import resource, server

from achilles.compat.twisted import nothing_buffered
from achilles.config import Settings, is_loopback
from achilles.protocol.text import shown

log = logging.getLogger("achilles.web")

DEFAULT_PORT = 8999
#: seconds between two snapshots sent to the watchers
INTERVAL = 1.0
#: most event streams open at once (each costs a write per second)
MAX_WATCHERS = 64
#: most sessions and pending login nonces kept (the oldest go first)
MAX_SESSIONS = 256
MAX_NONCES = 256
SESSION_TTL = 12 * 3600.0
NONCE_TTL = 120.0
COOKIE = "achilles_session"
#: what the page's login proves: HMAC-SHA256(secret, LOGIN_CONTEXT + nonce)
LOGIN_CONTEXT = "achilles-dashboard-login:"
SHARE_CONTEXT = b"achilles-dashboard-share"
#: largest request body read (a login)
BODY_MAX = 4096

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "login.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "login.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}


def share_token(secret: str) -> str:
    """The read-only share token of a cluster secret (revoked by changing the secret)."""
    return hmac.new(secret.encode("utf-8"), SHARE_CONTEXT, hashlib.sha256).hexdigest()[:40]


def login_digest(secret: str, nonce: str) -> str:
    """What the login page sends for ``nonce``: hex HMAC-SHA256 of it under the secret."""
    msg = (LOGIN_CONTEXT + nonce).encode("utf-8")
    return hmac.new(secret.encode("utf-8"), msg, hashlib.sha256).hexdigest()


def parse_address(value: str, default_host: str = "127.0.0.1") -> tuple[str, int] | None:
    """``off``, ``PORT`` or ``HOST:PORT`` (``[v6]:PORT``) to (host, port); None for off.

    Raises:
        ValueError: not one of those.
    """
    value = value.strip()
    if value.lower() in ("off", "no", "false", "0", "none"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = default_host, value
    host = host.strip("[]") or default_host
    number = int(port)
    if not 0 <= number < 65536:
        raise ValueError(f"port {number} out of range")
    return host, number


def _label(value: str) -> str:
    """A Prometheus label value, escaped (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(snap: dict[str, Any], monitor: Any) -> str:
    """The snapshot in the Prometheus text exposition format (0.0.4)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            out.append(f"{name}{labels} {value:g}" if labels else f"{name} {value:g}")

    nodes, jobs = snap["nodes"], snap["jobs"]

    def per_node(key: str) -> list[tuple[str, float]]:
        return [(f'{{node="{_label(n["name"])}"}}', n[key]) for n in nodes]

    def per_job(key: str) -> list[tuple[str, float]]:
        return [
            (f'{{job="{_label(j["id"])}",owner="{_label(j["owner"])}"}}', j[key] or 0) for j in jobs
        ]

    metric("achilles_nodes", "gauge", "Nodes connected.", [("", len(nodes))])
    metric("achilles_slots", "gauge", "Worker slots of the connected nodes.",
           [("", snap["totals"]["slots"])])  # fmt: skip
    metric("achilles_slots_busy", "gauge", "Slots running a chunk.",
           [("", snap["totals"]["busy"])])  # fmt: skip
    metric("achilles_jobs", "gauge", "Jobs the server holds.", [("", len(jobs))])
    metric("achilles_jobs_started_total", "counter", "Jobs submitted.",
           [("", monitor.jobs_started)])  # fmt: skip
    metric("achilles_jobs_finished_total", "counter", "Jobs that ended with every result.",
           [("", monitor.jobs_finished)])  # fmt: skip
    metric("achilles_jobs_cancelled_total", "counter", "Jobs cancelled.",
           [("", monitor.jobs_cancelled)])  # fmt: skip
    metric("achilles_chunks_requeued_total", "counter", "Chunks requeued from lost nodes.",
           [("", monitor.chunks_requeued)])  # fmt: skip
    metric("achilles_task_failures_total", "counter", "Chunks that raised.",
           [("", monitor.failures_total)])  # fmt: skip
    metric("achilles_node_slots", "gauge", "A node's worker slots.", per_node("slots"))
    metric("achilles_node_busy_slots", "gauge", "A node's slots running a chunk.",
           per_node("busy"))  # fmt: skip
    metric("achilles_node_queued_chunks", "gauge", "Chunks queued on a node.",
           per_node("queued"))  # fmt: skip
    metric("achilles_node_chunks_done_total", "counter", "Chunks a node finished.",
           per_node("done"))  # fmt: skip
    metric("achilles_node_chunks_per_second", "gauge", "A node's recent rate.",
           per_node("rate"))  # fmt: skip
    metric("achilles_node_cpu_percent", "gauge", "CPU of a node and its workers (-1: unknown).",
           per_node("cpu"))  # fmt: skip
    metric("achilles_node_rss_bytes", "gauge", "Resident memory of a node and its workers.",
           per_node("rss"))  # fmt: skip
    metric("achilles_job_chunks_done", "gauge", "A job's chunks finished.", per_job("done"))
    metric("achilles_job_chunks_total", "gauge", "A job's chunks (0: not known yet).",
           per_job("total"))  # fmt: skip
    metric("achilles_job_chunks_in_flight", "gauge", "A job's chunks on nodes.",
           per_job("inflight"))  # fmt: skip
    metric("achilles_job_retries", "gauge", "A job's chunks retried.", per_job("retries"))
    metric("achilles_job_failures", "gauge", "A job's chunks that failed.",
           per_job("failures"))  # fmt: skip
    return "\n".join(out) + "\n"


class Dashboard:
    """The state behind the resources: the server's factory, sessions, watchers."""

    def __init__(self, factory: Any, settings: Settings, clock: Any, secure: bool) -> None:
        self.factory = factory
        self.secret = settings.secret_key or ""
        self.clock = clock
        self.secure = secure  # served over TLS: the cookie is Secure
        self.sessions: dict[str, float] = {}  # session id -> expiry
        self.nonces: dict[str, float] = {}  # login nonce -> expiry
        self.watchers: set[Any] = set()
        self._pump = task.LoopingCall(self._push)
        self._pump.clock = clock

    # -- what there is to see ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        f = self.factory
        heard, owners = {}, {}
        for peer_id, peer in f.peers.items():
            if peer.role == "node":
                heard[peer_id] = peer.last_heard
            elif peer.role == "controller":
                owners[peer_id] = peer.name
        snap: dict[str, Any] = f.monitor.snapshot(f.scheduler, self.clock.seconds(), heard, owners)
        for node in snap["nodes"]:
            peer = f.peers.get(node["id"])
            info = getattr(peer, "info", None) or {}
            node["host"] = str(info.get("host", ""))
            node["version"] = str(info.get("version", ""))
            node["python"] = str(info.get("python", ""))
        snap["wall"] = time.time()
        return snap

    def add_watcher(self, request: Any) -> None:
        self.watchers.add(request)
        request.notifyFinish().addBoth(lambda _: self._drop(request))
        if not self._pump.running:
            self._pump.start(INTERVAL, now=True)
        else:
            self._send(request, self._encode(self.snapshot()))

    def _drop(self, request: Any) -> None:
        self.watchers.discard(request)
        if not self.watchers and self._pump.running:
            self._pump.stop()

    @staticmethod
    def _encode(snap: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(snap, separators=(",", ":")).encode("utf-8") + b"\n\n"

    @staticmethod
    def _send(request: Any, data: bytes) -> None:
        """Write a snapshot, unless the last one is still unsent (a reader that does not
        keep up skips seconds instead of growing the server's buffers)."""
        transport = getattr(getattr(request, "channel", None), "transport", None)
        try:
            if transport is not None and not nothing_buffered(transport):
                return
        except AttributeError:  # TLS: Twisted's TLS layer has its own buffers
            pass
        request.write(data)

    def _push(self) -> None:
        """Once a second while someone watches: one snapshot for all of them."""
        if not self.watchers:
            return
        data = self._encode(self.snapshot())
        for request in list(self.watchers):
            self._send(request, data)

    # -- who may see it ----------------------------------------------------------------
    def allowed(self, request: Any) -> bool:
        now = self.clock.seconds()
        if _local(request):
            return True
        cookie = getattr(request, "received_cookies", {}).get(COOKIE.encode("ascii"))
        if cookie:
            expiry = self.sessions.get(cookie.decode("ascii", "replace"))
            if expiry is not None and expiry > now:
                return True
        token = _token(request)
        return bool(token and self.secret and hmac.compare_digest(token, share_token(self.secret)))

    def new_nonce(self) -> str:
        now = self.clock.seconds()
        self._expire(self.nonces, now, MAX_NONCES)
        nonce = secrets.token_hex(16)
        self.nonces[nonce] = now + NONCE_TTL
        return nonce

    def login(self, host: str, nonce: str, digest: str) -> str | None:
        """A new session id if ``digest`` proves the secret for a nonce we gave out."""
        now = self.clock.seconds()
        throttle = self.factory.throttle
        if throttle.delay(host, now) > 0:
            return None
        expiry = self.nonces.pop(nonce, None)
        ok = (
            bool(self.secret)
            and expiry is not None
            and expiry > now
            and hmac.compare_digest(digest, login_digest(self.secret, nonce))
        )
        if not ok:
            if throttle.failed(host, now):
                log.warning("dashboard login from %s failed (wrong secret?)", shown(host))
            return None
        throttle.succeeded(host)
        return self.start_session()

    def start_session(self) -> str:
        now = self.clock.seconds()
        self._expire(self.sessions, now, MAX_SESSIONS)
        session = secrets.token_urlsafe(32)
        self.sessions[session] = now + SESSION_TTL
        return session

    def set_cookie(self, request: Any, session: str) -> None:
        request.addCookie(
            COOKIE,
            session,
            path="/",
            httpOnly=True,
            secure=self.secure,
            sameSite="strict",
            max_age=str(int(SESSION_TTL)),
        )

    @staticmethod
    def _expire(table: dict[str, float], now: float, most: int) -> None:
        for key in [k for k, t in table.items() if t <= now]:
            del table[key]
        while len(table) >= most:
            del table[next(iter(table))]


def _local(request: Any) -> bool:
    """From this machine, to a name of this machine (a DNS-rebinding page is not)."""
    client = request.getClientAddress()
    host = getattr(client, "host", "")
    if not is_loopback(host):
        return False
    name = (request.getRequestHostname() or b"").decode("ascii", "replace")
    return is_loopback(name) or name in ("", "[::1]")


def _token(request: Any) -> str:
    auth = (request.getHeader(b"authorization") or b"").decode("ascii", "replace")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    values = request.args.get(b"token")
    return values[0].decode("ascii", "replace") if values else ""


def _common(request: Any) -> None:
    for key, value in _HEADERS.items():
        request.setHeader(key, value)


def _asset(name: str) -> bytes:
    return resources.files("achilles.web").joinpath("static", name).read_bytes()


class _Leaf(resource.Resource):
    isLeaf = True  # noqa: N815 (Twisted Web)

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self.dash = dash


class Root(resource.Resource):
    """``/``, its assets, ``/events``, ``/snapshot.json``, ``/metrics``, ``/login``."""

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self.dash = dash
        self.assets = {name: (_asset(name), kind) for name, kind in _STATIC.items()}

    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802 (Twisted Web)
        name = path.decode("ascii", "replace")
        if name == "login" and not request.postpath:
            return _Login(self.dash)
        if name == "login" and request.postpath == [b"challenge"]:
            return _Challenge(self.dash)
        if name in ("login.js", "style.css"):
            return _Asset(self.dash, *self.assets[name], public=True)
        if not self.dash.allowed(request):
            return _Denied(self.dash)
        if name in ("", "index.html"):
            if request.args.get(b"token"):  # a share link: a cookie, then a clean URL
                self.dash.set_cookie(request, self.dash.start_session())
                return _Redirect(self.dash)
            return _Asset(self.dash, *self.assets["index.html"])
        if name in self.assets:
            return _Asset(self.dash, *self.assets[name])
        if name == "events":
            return _Events(self.dash)
        if name == "snapshot.json":
            return _Snapshot(self.dash)
        if name == "metrics":
            return _Metrics(self.dash)
        return resource.NoResource()

    def render(self, request: Any) -> bytes:  # "/" with no trailing path
        return self.getChild(b"", request).render(request)


class _Asset(_Leaf):
    def __init__(self, dash: Dashboard, body: bytes, kind: str, public: bool = False) -> None:
        super().__init__(dash)
        self.body, self.kind = body, kind

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted Web)
        _common(request)
        request.setHeader(b"Content-Type", self.kind.encode("ascii"))
        return self.body


class _Redirect(_Leaf):
    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted Web)
        _common(request)
        request.redirect(b"/")
        return b""


class _Denied(_Leaf):
    """Not allowed: a page gets the login page, anything else a 401."""

    def render(self, request: Any) -> bytes:
        _common(request)
        path = request.path
        if request.method == b"GET" and path in (b"/", b"/index.html"):
            request.redirect(b"/login")
            return b""
        request.setResponseCode(401)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"log in at /login, or give the share token\n"


class _Login(_Leaf):
    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted Web)
        _common(request)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return _asset("login.html")

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 (Twisted Web)
        _common(request)
        request.setHeader(b"Content-Type", b"application/json")
        body = _body(request)
        try:
            data = json.loads(body)
            nonce, digest = str(data["nonce"])[:64], str(data["digest"])[:128]
        except (ValueError, KeyError, TypeError):
            request.setResponseCode(400)
            return b'{"ok":false}'
        session = self.dash.login(request.getClientAddress().host, nonce, digest)
        if session is None:
            request.setResponseCode(403)
            return b'{"ok":false}'
        self.dash.set_cookie(request, session)
        return b'{"ok":true}'


class _Challenge(_Leaf):
    def render_POST(self, request: Any) -> bytes:  # noqa: N802 (Twisted Web)
        _common(request)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"nonce": self.dash.new_nonce()}).encode("ascii")


def _body(request: Any) -> bytes:
    length = int(request.getHeader(b"content-length") or 0)
    if length > BODY_MAX:
        return b""
    return request.content.read(BODY_MAX)


class _Events(_Leaf):
    """Server-sent events: the snapshot as one ``data:`` line a second."""

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (Twisted Web)
        _common(request)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        if len(self.dash.watchers) >= MAX_WATCHERS:
            request.setResponseCode(503)
            return b""
        request.write(b"retry: 2000\n\n")
        self.dash.add_watcher(request)
        return server.NOT_DONE_YET


class _Snapshot(_Leaf):
    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted Web)
        _common(request)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.dash.snapshot()).encode("utf-8")


class _Metrics(_Leaf):
    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted Web)
        _common(request)
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return metrics_text(self.dash.snapshot(), self.dash.factory.monitor).encode("utf-8")


class _QuietSite(server.Site):
    """No access log: a share token in a query string must not land in a log."""

    def log(self, request: Any) -> None:
        pass


def start(factory: Any, settings: Settings, address: str, reactor: Any = None) -> Any:
    """Serve the dashboard of ``factory``'s server at ``address`` (``[HOST:]PORT`` or
    ``off``); return the listening port, or None if off or the port is taken (a warning
    is logged: the server runs on without it)."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        parsed = parse_address(address)
    except ValueError:
        log.warning("--dashboard %s is not [HOST:]PORT or off: no dashboard", shown(address))
        return None
    if parsed is None:
        return None
    host, port = parsed
    local = is_loopback(host)
    if not local and not settings.secret_key:
        log.warning("no dashboard on %s: off loopback it needs the cluster secret", host)
        return None
    secure = not local and settings.tls != "off"
    dash = Dashboard(factory, settings, reactor, secure)
    site = _QuietSite(Root(dash))
    site.displayTracebacks = False
    try:
        if secure:
            from achilles.config import user_config_dir
            from achilles.net import tls

            options = tls.ServerTLS(settings, user_config_dir()).options
            listening = reactor.listenSSL(port, site, options, interface=host)
        else:
            listening = reactor.listenTCP(port, site, interface=host)
    except Exception as err:  # taken, or no such address: the cluster matters more
        log.warning("no dashboard: cannot listen on %s:%d (%s)", host, port, err)
        return None
    real = listening.getHost()
    scheme = "https" if secure else "http"
    shown_host = f"[{real.host}]" if ":" in real.host else real.host
    log.info("dashboard on %s://%s:%d/", scheme, shown_host, real.port)
    listening.dashboard = dash
    listening.url = f"{scheme}://{shown_host}:{real.port}/"
    return listening


def dashboard_url(settings: Settings) -> str | None:
    """The URL of the dashboard the settings describe (for ``achilles dashboard``), or
    None if it is off. A dashboard on every interface is reached at the server's host."""
    parsed = parse_address(settings.dashboard)
    if parsed is None:
        return None
    host, port = parsed
    if host in ("0.0.0.0", "::", ""):
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    scheme = "http" if is_loopback(host) or settings.tls == "off" else "https"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/"
