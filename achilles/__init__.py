"""achilles: ``multiprocessing.Pool`` across every core of a cluster.

    from achilles import Pool          # instead of: from multiprocessing import Pool

Importing achilles starts nothing: the reactor thread starts with the first pool.
"""
from achilles.config import genConfig
from achilles.errors import (AchillesError, AuthenticationError, ChunkFailedError, ConfigError,
                             ConnectionLostError, NodeLostError, ProtocolError, RemoteError,
                             RemoteTraceback, SerializationError, TimeoutError,
                             VersionMismatchError)
from achilles.pool import (AsyncResult, IMapIterator, Pool, getClusterStatus, imap,
                           imap_unordered, killCluster, map)

__version__ = "0.1.0"

__all__ = [
    "Pool", "AsyncResult", "IMapIterator", "map", "imap", "imap_unordered", "killCluster",
    "getClusterStatus", "genConfig", "AchillesError", "AuthenticationError",
    "ChunkFailedError", "ConfigError", "ConnectionLostError", "NodeLostError",
    "ProtocolError", "RemoteError", "RemoteTraceback", "SerializationError", "TimeoutError",
    "VersionMismatchError", "__version__",
]
