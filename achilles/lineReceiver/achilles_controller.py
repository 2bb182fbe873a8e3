"""The seed's controller module: its ``map`` / ``imap`` / ``imap_unordered`` entry points.

The seed's ``AchillesController`` protocol class is not reproduced: the controller is
:class:`achilles.Pool`'s business now. These are the same objects as in
:mod:`achilles.lineReceiver.achilles_main`.
"""

from __future__ import annotations

from achilles.lineReceiver.achilles_main import (
    genConfig,
    getClusterStatus,
    imap,
    imap_unordered,
    killCluster,
    map,
)

__all__ = ["genConfig", "getClusterStatus", "imap", "imap_unordered", "killCluster", "map"]
