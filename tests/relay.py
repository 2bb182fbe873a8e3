"""A man in the middle for tests: a relay on 127.0.0.1 between clients and a real server.

It forwards bytes both ways, and can (i) terminate TLS on each side with a certificate of
its own (what an attacker on the network path would do to read the traffic), and (ii)
rewrite the handshake's header lines (to try role escalation). One thread per
connection direction; :meth:`Relay.close` stops them all (a fixture calls it).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from typing import Any

Rewrite = Callable[[str, dict[str, Any]], dict[str, Any]]


class Relay:
    def __init__(
        self, server_port: int, terminate_tls: bool = False, rewrite: Rewrite | None = None
    ) -> None:
        self.server_port = server_port
        self.rewrite = rewrite
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.seen: list[tuple[str, dict[str, Any]]] = []  # handshake frames, both ways
        self._closing = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server_ctx = self._client_ctx = None
        if terminate_tls:
            self._server_ctx, self._client_ctx = _tls_contexts()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server_port), 5)
                if self._server_ctx is not None and self._client_ctx is not None:
                    client = self._server_ctx.wrap_socket(client, server_side=True)
                    upstream = self._client_ctx.wrap_socket(upstream)
            except (OSError, ssl.SSLError):
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [client, upstream]
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, way), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        """Forward ``src`` to ``dst``; header lines are parsed (and maybe rewritten)
        until the handshake is over (the first frame with a payload, or the welcome)."""
        buf, parsing = b"", True
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not parsing:
                    dst.sendall(data)
                    continue
                buf += data
                if buf[:1] == b"\x16":  # a TLS record: not ours to read
                    parsing = False
                while parsing and b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        header = json.loads(line)
                    except ValueError:  # not our protocol's text (TLS we did not end)
                        dst.sendall(line + b"\n")
                        parsing = False
                        break
                    self.seen.append((way, header))
                    if self.rewrite is not None:
                        header = self.rewrite(way, header)
                    dst.sendall(json.dumps(header, separators=(",", ":")).encode() + b"\n")
                    if header.get("t") in ("welcome", "error") or header.get("len"):
                        parsing = False
                if not parsing and buf:
                    dst.sendall(buf)
                    buf = b""
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closing = True
        self.listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The attacker's own certificate to show clients, and a client side that accepts
    any server certificate."""
    from achilles.net.tls import _new_certificate

    pem = _new_certificate()
    fd, path = tempfile.mkstemp(suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(path)
    os.unlink(path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client
