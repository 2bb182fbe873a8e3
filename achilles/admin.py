"""Cluster administration from Python: ``killCluster`` and ``getClusterStatus``.

Each call opens its own short connection with the ``admin`` role, asks, and closes it.
"""

from __future__ import annotations

import sys
from typing import Any

from achilles.config import require_secret, resolve
from achilles.controller import Controller
from achilles.net import reactor as _reactor


def _admin_call(
    method: str,
    host: Any,
    port: Any,
    username: Any,
    secret_key: Any,
    tls_ca: Any = None,
    timeout: float = 30.0,
    tls: str | None = None,
) -> Any:
    """Run ``Controller.<method>()`` on a fresh admin connection; its reply."""
    settings = resolve(
        host=host, port=port, username=username, secret_key=secret_key, tls_ca=tls_ca, tls=tls
    )
    require_secret(settings, method)
    reactor = _reactor.ensure_started()
    ctl = _reactor.call_blocking(Controller, settings, reactor, "admin")
    try:
        return _reactor.call_blocking(getattr(ctl, method), timeout=timeout)
    finally:
        _reactor.call_soon(ctl.close)


def _confirm(prompt: str) -> bool:
    """Ask the user (a terminal or a notebook); refuse where nobody can answer."""
    interactive = sys.stdin is not None and (sys.stdin.isatty() or "ipykernel" in sys.modules)
    if not interactive:
        raise RuntimeError(
            "killCluster() needs confirmation, and this process cannot ask "
            "for it (no terminal): pass command_verified=True"
        )
    return input(prompt).strip().lower() in ("y", "yes")


def killCluster(
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
    command_verified: bool = False,
    tls_ca: str | None = None,
    tls: str | None = None,
) -> int:
    """Stop every node of the cluster (the server and this process keep running).

    Asks for confirmation unless ``command_verified=True``. Returns how many nodes were
    told to stop (0 if the confirmation was declined).

    Raises:
        RuntimeError: no ``command_verified=True`` and no terminal or notebook to ask in.
        ConnectionLostError: the server cannot be reached (said at once, with the
            address and the reason).
    """
    if not command_verified and not _confirm("achilles: stop every node of the cluster? [y/N] "):
        print("achilles: killCluster cancelled")
        return 0
    nodes: int = _admin_call("kill", host, port, username, secret_key, tls_ca, tls=tls)
    return nodes


def getClusterStatus(
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
    tls_ca: str | None = None,
    tls: str | None = None,
) -> dict[str, Any]:
    """The cluster's nodes and jobs, as a dict (what ``achilles status --json`` prints).
    ``tls``: "auto", "on" or "off" (see ``ACHILLES_TLS``)."""
    status: dict[str, Any] = _admin_call(
        "status", host, port, username, secret_key, tls_ca, tls=tls
    )
    return status


__all__ = ["getClusterStatus", "killCluster"]
