"""achilles: ``multiprocessing.Pool`` across every core of a cluster.

    from achilles import Pool          # instead of: from multiprocessing import Pool

Importing achilles starts nothing: the reactor thread starts with the first pool.
"""

from typing import Any

from achilles.errors import (
    AchillesError,
    AuthenticationError,
    ChunkFailedError,
    ConfigError,
    ConnectionLostError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    VersionMismatchError,
)

# The pool (and with it twisted, dill and multiprocessing) loads on first use (PEP 562),
# so that `import achilles.core.scheduler` or a worker's `import achilles.node.worker` do not
# drag it in.
_LAZY = {
    "Pool": "pool.pool",
    "AsyncResult": "pool.results",
    "IMapIterator": "pool.results",
    "map": "oneshot",
    "imap": "oneshot",
    "imap_unordered": "oneshot",
    "killCluster": "admin",
    "getClusterStatus": "admin",
    "genConfig": "config",
    "TimeoutError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"achilles.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'achilles' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AchillesError",
    "AsyncResult",
    "AuthenticationError",
    "ChunkFailedError",
    "ConfigError",
    "ConnectionLostError",
    "IMapIterator",
    "Pool",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TimeoutError",
    "VersionMismatchError",
    "__version__",
    "genConfig",
    "getClusterStatus",
    "imap",
    "imap_unordered",
    "killCluster",
    "map",
]
