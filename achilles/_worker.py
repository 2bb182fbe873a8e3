"""What runs inside a node's pool worker processes.

The node hands each worker a chunk as **bytes** (multiprocess's own pickler is dill's
pure-Python one, so we keep it away from user data); the worker loads the job's code
(once per job, cached), unpickles the arguments, runs them, and returns result bytes
that go back to the server unopened. Before running, it reports ``(pid, job, seq)`` so
the node knows which chunk died with a worker, or which worker to kill on a timeout.
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from collections import OrderedDict
from typing import Any

from achilles.errors import SerializationError
from achilles.protocol.messages import ERROR, OK
from achilles.serialization import dumps_chunk, dumps_exception, loads_chunk, loads_function

_report: Any = None
_node_name = "?"
_jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
_MAX_JOBS = 16


def init(report_queue: Any, node_name: str) -> None:
    """Pool initializer: default signal dispositions, and the channel for start reports."""
    global _report, _node_name
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides; Ctrl-C hits the group
    _report = report_queue
    _node_name = node_name


def _runtime(job: str, bundle: bytes) -> dict[str, Any]:
    rt = _jobs.get(job)
    if rt is not None:
        _jobs.move_to_end(job)
        return rt
    rt = loads_function(bundle)
    if rt["initializer"] is not None:
        rt["initializer"](*rt["initargs"])
    _jobs[job] = rt
    while len(_jobs) > _MAX_JOBS:
        _jobs.popitem(last=False)
    return rt


def forget(job: str) -> None:
    _jobs.pop(job, None)


def _error(exc: BaseException, tb: str | None = None) -> tuple[str, bytes, float]:
    return ERROR, dumps_exception(exc, tb or traceback.format_exc()), 0.0


def run_chunk(job: str, seq: int, bundle: bytes, payload: bytes) -> tuple[str, bytes, float]:
    """Run one chunk; return ``(status, payload, seconds)``; never raises an Exception."""
    if _report is not None:
        _report.put((os.getpid(), job, seq))
    start = time.perf_counter()
    try:
        rt = _runtime(job, bundle)
    except ImportError as exc:
        msg = f"{exc} (on node {_node_name}; install it there)"
        return _error(type(exc)(msg, name=exc.name))
    except Exception as exc:
        return _error(SerializationError(
            f"cannot load the job's function on node {_node_name}: "
            f"{exc.__class__.__name__}: {exc}"))
    try:
        args = loads_chunk(payload, rt["main"])
    except Exception as exc:
        return _error(SerializationError(
            f"cannot unpickle arguments of chunk {seq} on node {_node_name}: "
            f"{exc.__class__.__name__}: {exc}"))
    fn, mode = rt["fn"], rt["mode"]
    try:
        if mode == "map":
            results = [fn(a) for a in args]
        elif mode == "star":
            results = [fn(*a) for a in args]
        else:
            results = [fn(*a, **k) for a, k in args]
    except Exception as exc:
        return _error(exc)
    elapsed = time.perf_counter() - start
    try:
        return OK, dumps_chunk(results, by_reference=True), elapsed
    except Exception as exc:
        return _error(SerializationError(
            f"cannot pickle the results of chunk {seq} on node {_node_name}: {exc}"))
