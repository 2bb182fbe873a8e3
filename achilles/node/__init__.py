"""The node role: a process on each machine that runs chunks on all its cores.

* :mod:`achilles.node.service` — the connection to the server (Twisted).
* :mod:`achilles.node.executor` — runs chunks on a ``multiprocess`` pool of workers and
  watches them (Twisted reactor, multiprocess), doing what the node's sans-IO core
  (:mod:`achilles.core.node_work`) decides.
* :mod:`achilles.node.generation` — one incarnation of that pool, replaced when a worker
  dies.
* :mod:`achilles.node.pipe` — the reactor's non-blocking ends of the pool's pipes.
* :mod:`achilles.node.worker` — the code that runs inside each worker process. The fork
  server imports it, so it imports neither Twisted nor anything that does; nor does
  this file, which is why ``Node`` and ``run_node`` load on first use.
"""

from typing import Any

_LAZY = {
    "Node": "service",
    "NodeProtocol": "service",
    "run_node": "service",
    "Executor": "executor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"achilles.node.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'achilles.node' has no attribute {name!r}")
