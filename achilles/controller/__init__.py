"""The controller: the reactor-side client in the user's process.

:class:`Controller` (in :mod:`.client`) owns one connection to a server and the jobs
sent on it; :mod:`.handles` has the jobs as the pool's threads see them. The
bookkeeping between them is the sans-IO :mod:`achilles.core.session`.
"""

from achilles.controller.client import Controller, ControllerProtocol
from achilles.controller.handles import ApplyHandle, Handle, JobHandle

__all__ = ["ApplyHandle", "Controller", "ControllerProtocol", "Handle", "JobHandle"]
