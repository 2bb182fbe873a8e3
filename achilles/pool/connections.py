"""The connections pools share: one :class:`~achilles.controller.Controller` per
cluster (host, port, user, secret, TLS CA), counted by the pools using it, and closed
by the last one. A forked child starts with none of its parent's.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from achilles.controller import Controller
from achilles.net import reactor as _reactor

_controllers: dict[tuple[Any, ...], Controller] = {}
#: guards ``_controllers`` and the controllers' ``users`` counts. Held only for those
#: few lines, never while waiting for the reactor thread (which may take it) and never
#: taken by a finaliser (which runs wherever the garbage collector does).
_controllers_lock = threading.Lock()


def _controller(settings: Any) -> Controller:
    """The connection to this cluster, shared by the pools that use it (counted)."""
    key = (
        settings.host,
        settings.port,
        settings.username,
        settings.secret_key,
        settings.tls_ca,
        settings.tls,
    )
    with _controllers_lock:
        ctl = _controllers.get(key)
        if ctl is not None and ctl.fatal is None:
            ctl.users += 1
            return ctl
    made = _reactor.call_blocking(Controller, settings, _reactor.ensure_started())
    with _controllers_lock:
        ctl = _controllers.get(key)
        if ctl is None or ctl.fatal is not None:  # else another pool made one meanwhile
            ctl = _controllers[key] = made
        ctl.users += 1
    if ctl is not made:
        _reactor.call_soon(made.close)
    return ctl


def _release_controller(ctl: Controller) -> None:
    """A pool is done with the connection; the last one closes it (no reconnecting to a
    cluster nobody uses any more)."""
    with _controllers_lock:
        ctl.users -= 1
        if ctl.users > 0:
            return
        for key, value in list(_controllers.items()):
            if value is ctl:
                del _controllers[key]
    try:
        if _reactor.in_reactor_thread():
            ctl.close()
        else:
            _reactor.call_blocking(ctl.close, timeout=5)
    except Exception:  # closing is best effort: the server may be gone already
        pass


#: what a forked child inherited from its parent: kept, never used or collected (a
#: collected copy could write to the parent's connections or stop its workers)
_orphans: list[Any] = []


def _after_fork_in_child() -> None:
    """A forked child's pools make their own connections."""
    global _controllers_lock
    _orphans.extend(_controllers.values())
    _controllers.clear()
    _controllers_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
