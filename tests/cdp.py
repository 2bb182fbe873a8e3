"""Headless Chromium driven over the Chrome DevTools protocol, with the standard library
only (a WebSocket client of ~60 lines: no CDP package to install). Used by the dashboard
tests and docs/screenshot.py.

The browser runs as an :class:`achilles.testing.Proc` (its own session, stopped by PID
with its process group); ``with Browser() as b`` stops it on the way out.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import urllib.request
from typing import Any

from achilles.testing import Proc, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or ""
_LISTENING = re.compile(r"DevTools listening on (ws://[^\s]+)")


class WebSocket:
    """A blocking client WebSocket (RFC 6455): text frames out, whole messages in."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        assert m, url
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode("ascii")
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "the browser closed the WebSocket handshake"
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "the browser closed the WebSocket"
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, text: str) -> None:
        data = text.encode("utf-8")
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            if b0 & 0x0F in (0x9, 0xA):  # ping, pong: not ours to answer here
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode("utf-8")

    def close(self) -> None:
        self.sock.close()


class Browser:
    """A headless Chromium and one page of it."""

    def __init__(self, width: int = 1400, height: int = 1000, *args: str) -> None:
        assert CHROMIUM, "no chromium"
        self.profile = tempfile.mkdtemp(prefix="achilles-chromium-")
        self.proc = Proc(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                *args,
                "about:blank",
            ],
            env=dict(os.environ),
            cwd=self.profile,
            name="chromium",
        )
        self.ids = itertools.count(1)
        self.ws: WebSocket | None = None
        try:
            m = wait_until(
                lambda: _LISTENING.search(self.proc.output()),
                30,
                what="chromium's DevTools port",
                alive=self.proc.alive,
            )
            port = int(re.search(r":(\d+)/", m.group(1)).group(1))  # type: ignore[union-attr]
            targets = wait_until(
                lambda: [
                    t
                    for t in json.loads(
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5)
                        .read()
                        .decode()
                    )
                    if t.get("type") == "page"
                ],
                30,
                what="chromium's page",
            )
            self.ws = WebSocket(targets[0]["webSocketDebuggerUrl"])
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; its result (events in between are skipped)."""
        assert self.ws is not None
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == n:
                assert "error" not in reply, reply
                return reply.get("result", {})  # type: ignore[no-any-return]

    def navigate(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.proc.stop()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
