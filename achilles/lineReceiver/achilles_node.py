"""The seed's ``runAchillesNode`` and ``genConfig``: an :class:`achilles.node.Node`, blocking."""

from __future__ import annotations

import threading
from typing import Any

from achilles.config import resolve
from achilles.lineReceiver.achilles_server import _logging, _no_secret
from achilles.lineReceiver.achilles_server import genConfig as _gen_config
from achilles.node import Node


class _GreetingNode(Node):
    """A Node that prints the seed's greeting each time it is connected and authenticated."""

    def connected(self, proto: Any) -> None:
        super().connected(proto)
        print(
            f"GREETING: Welcome! This node ({self.name}, {self.processes} worker(s)) "
            f"is connection {proto.peer_id} of the achilles_server.\n",
            flush=True,
        )
        print(
            f"Connected to achilles_server running at {self.settings.host}:{self.settings.port}",
            flush=True,
        )
        print(f"CLIENT_ID: {proto.peer_id}", flush=True)


def runAchillesNode(host: str | None = None, port: int | None = None) -> int:
    """Run a node with every core (``ACHILLES_PROCESSES`` to use fewer) until stopped.

    The server's address: arguments > ``ACHILLES_*`` environment > ``.env`` in the working
    directory > 127.0.0.1:9999; the secret: ``ACHILLES_SECRET_KEY`` or ``.env``. The node
    reconnects if the server is not up yet or goes away.

    Returns:
        The exit code: 0 after ``killCluster()``, 2 if the server refused this node.

    Raises:
        ConfigError: no secret, or an invalid setting.
    """
    settings = resolve(host=host, port=port)
    if not settings.secret_key:
        raise _no_secret("runAchillesNode", argument=False)
    from achilles.net.reactor import reactor as global_reactor

    reactor = global_reactor()
    _logging(settings.log_level)
    node = _GreetingNode(settings, reactor, on_stop=lambda code: reactor.callLater(0, reactor.stop))
    reactor.callWhenRunning(node.start)
    reactor.addSystemEventTrigger("before", "shutdown", node.executor.close)
    reactor.run(installSignalHandlers=threading.current_thread() is threading.main_thread())
    return node.exit_code


def genConfig(host: str | None = None, port: int | None = None) -> str:
    """Write the server's address to ``.env`` in the working directory; return its path."""
    return _gen_config(host, port)


__all__ = ["genConfig", "runAchillesNode"]
