"""The server: authenticates peers, and runs the scheduler's instructions.

* :mod:`achilles.server.protocol` — one connection: the handshake, then its frames.
* :mod:`achilles.server.router` — :class:`ServerFactory`: all connections share one
  :class:`~achilles.core.scheduler.Scheduler` through it; ``listen``.
"""

from achilles.protocol.text import SHOWN_MAX, shown
from achilles.server.protocol import ALLOWED, ServerProtocol
from achilles.server.router import TICK, ServerFactory, listen

__all__ = ["ALLOWED", "SHOWN_MAX", "TICK", "ServerFactory", "ServerProtocol", "listen", "shown"]
