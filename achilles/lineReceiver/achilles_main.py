"""The seed's ``map``/``imap``/``imap_unordered``/``killCluster``, over :class:`achilles.Pool`.

The seed returned results in *packets*, and so do these functions:

* ``map`` returns the ordered list of packets' result lists (not flattened);
* ``imap`` yields ``{'ARGS_COUNTER': i, 'RESULT': [...]}`` in input order, and
  ``imap_unordered`` yields the same dictionaries as packets complete.
  ``ARGS_COUNTER`` is the index of the packet's first argument.

Packet rule. The seed handed each node ``cpu_count * chunksize`` consecutive arguments
and returned them as one packet. Here the pool does the distribution (with
``chunksize`` arguments per task, so a node with ``C`` workers holds ``C * chunksize``
arguments at a time, as in the seed), and the packets are formed from its results: a
packet is ``slots * chunksize`` consecutive arguments, where ``slots`` is the largest
worker count of the connected nodes (``getClusterStatus()``; the machine's core count
when no node is connected yet, or when no cluster is configured and ``Pool`` runs its
local one with every core). When the arguments are themselves lists (judged by the
first one, as the seed did), each list is one packet, ``func`` is applied to each of
its elements, and ``chunksize`` is not used; ``ARGS_COUNTER`` is then the list's index.

``args`` may be a list, a list of lists, any iterable (a generator object), or a
generator function (called with no arguments); it is read lazily, in this process.
``callback`` is applied in this process to each result before it is returned, as the
seed's controller did.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from achilles.config import cluster_configured
from achilles.lineReceiver.achilles_server import genConfig
from achilles.pool import Pool
from achilles.pool import getClusterStatus as _get_cluster_status
from achilles.pool import killCluster as _kill_cluster

Packet = dict  # {'ARGS_COUNTER': int, 'RESULT': list}
_END = object()


class _Layout:
    """Where each packet lies in the flat stream of arguments the pool is given.

    Appended to by the pool's feeder thread, read by the caller: a packet's entry is
    complete before its first argument is handed to the pool, so any result received
    belongs to a packet that is already recorded (appends are atomic; lists only grow).
    """

    def __init__(self) -> None:
        self.counters: list[int] = []  # ARGS_COUNTER of each packet
        self.sizes: list[int] = []
        self.starts: list[int] = []  # flat index of each packet's first argument

    def add(self, counter: int, start: int, size: int) -> None:
        self.counters.append(counter)
        self.sizes.append(size)
        self.starts.append(start)


def _peek(args: Any) -> tuple[Any, Iterator[Any]]:
    if inspect.isgeneratorfunction(args) or (callable(args) and not hasattr(args, "__iter__")):
        args = args()
    it = iter(args)
    first = next(it, _END)
    return first, (it if first is _END else itertools.chain([first], it))


def _flat(first: Any, it: Iterator[Any], per_packet: int, layout: _Layout) -> Iterator[Any]:
    """The arguments one by one, recording each packet before its first argument."""
    start = 0
    if isinstance(first, list):
        for n, packet in enumerate(it):
            if not isinstance(packet, list):
                raise TypeError(
                    f"argument {n} is a {type(packet).__name__}, not a list: the first "
                    f"argument is a list, so every argument must be one (a packet)"
                )
            layout.add(n, start, len(packet))
            start += len(packet)
            yield from packet
        return
    while True:
        packet = list(itertools.islice(it, per_packet))
        if not packet:
            return
        layout.add(start, start, len(packet))
        start += len(packet)
        yield from packet


def _packet(
    layout: _Layout, k: int, values: list[Any], callback: Callable[[Any], Any] | None
) -> Packet:
    if callback is not None:
        values = [callback(v) for v in values]
    return {"ARGS_COUNTER": layout.counters[k], "RESULT": values}


def _in_order(
    results: Iterable[Any], layout: _Layout, callback: Callable[[Any], Any] | None
) -> Iterator[Packet]:
    """Cut the pool's ordered results into packets, each yielded once complete."""
    k, buf = 0, []  # type: int, list[Any]
    for value in results:
        while k < len(layout.sizes) and len(buf) == layout.sizes[k]:  # empty packets
            yield _packet(layout, k, buf, callback)
            k, buf = k + 1, []
        buf.append(value)
        while k < len(layout.sizes) and len(buf) == layout.sizes[k]:
            yield _packet(layout, k, buf, callback)
            k, buf = k + 1, []
    for rest in range(k, len(layout.sizes)):  # after the last result: empty packets
        yield _packet(layout, rest, buf, callback)
        buf = []


def _as_completed(
    pairs: Iterable[tuple[int, Any]], layout: _Layout, callback: Callable[[Any], Any] | None
) -> Iterator[Packet]:
    """Assemble ``(flat index, result)`` pairs into packets, yielded as they complete."""
    partial: dict[int, dict[int, Any]] = {}
    for index, value in pairs:
        k = bisect.bisect_right(layout.starts, index) - 1
        got = partial.setdefault(k, {})
        got[index - layout.starts[k]] = value
        if len(got) == layout.sizes[k]:
            del partial[k]
            yield _packet(layout, k, [got[i] for i in range(len(got))], callback)
    for k, size in enumerate(layout.sizes):
        if size == 0:
            yield _packet(layout, k, [], callback)


def _indexed(func: Callable[[Any], Any]) -> Callable[[tuple[int, Any]], tuple[int, Any]]:
    # wraps() gives the wrapper func's __module__, so the pool ships that module's source
    # to nodes that lack it, exactly as it would for func itself.
    @functools.wraps(func)
    def run(item: tuple[int, Any]) -> tuple[int, Any]:
        return item[0], func(item[1])

    return run


def _slots_per_node(conn: dict[str, Any]) -> int:
    if not cluster_configured(**conn):
        return os.cpu_count() or 1  # Pool() runs a local node with every core
    nodes = _get_cluster_status(**conn)["nodes"]
    return max((n["slots"] for n in nodes), default=0) or os.cpu_count() or 1


def _packets(
    func: Callable[[Any], Any],
    args: Any,
    callback: Callable[[Any], Any] | None,
    chunksize: int,
    conn: dict[str, Any],
    mode: str,
) -> Iterator[Packet]:
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize must be an int of at least 1, not {chunksize!r}")
    first, it = _peek(args)
    if first is _END:
        return
    layout = _Layout()
    with Pool(**conn) as pool:
        lists = isinstance(first, list)
        per_packet = 0 if lists else _slots_per_node(conn) * chunksize
        flat = _flat(first, it, per_packet, layout)
        size = None if lists else chunksize  # lists: one packet at a time, pool's chunks
        if mode == "map":
            yield from _in_order(pool.map(func, flat, size), layout, callback)
        elif mode == "imap":
            yield from _in_order(pool.imap(func, flat, size), layout, callback)
        else:
            yield from _as_completed(
                pool.imap_unordered(_indexed(func), enumerate(flat), size), layout, callback
            )


def map(
    func: Callable[[Any], Any],
    args: Any,
    callback: Callable[[Any], Any] | None = None,
    chunksize: int = 1,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> list[list[Any]]:
    """Apply ``func`` to every argument on the cluster; return the list of packets' results.

    Example (a node with 8 workers): ``map(square, range(1, 11))`` returns
    ``[[1, 4, ..., 64], [81, 100]]``.
    """
    conn = dict(host=host, port=port, username=username, secret_key=secret_key)
    return [p["RESULT"] for p in _packets(func, args, callback, chunksize, conn, "map")]


def imap(
    func: Callable[[Any], Any],
    args: Any,
    callback: Callable[[Any], Any] | None = None,
    chunksize: int = 1,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> Iterator[Packet]:
    """Yield ``{'ARGS_COUNTER': i, 'RESULT': [...]}`` packets in input order."""
    conn = dict(host=host, port=port, username=username, secret_key=secret_key)
    return _packets(func, args, callback, chunksize, conn, "imap")


def imap_unordered(
    func: Callable[[Any], Any],
    args: Any,
    callback: Callable[[Any], Any] | None = None,
    chunksize: int = 1,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> Iterator[Packet]:
    """Yield ``{'ARGS_COUNTER': i, 'RESULT': [...]}`` packets as they complete."""
    conn = dict(host=host, port=port, username=username, secret_key=secret_key)
    return _packets(func, args, callback, chunksize, conn, "imap_unordered")


def killCluster(
    command_verified: bool = False,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> int:
    """Stop every node (asks first unless ``command_verified=True``); return how many."""
    return _kill_cluster(
        host=host,
        port=port,
        username=username,
        secret_key=secret_key,
        command_verified=command_verified,
    )


def getClusterStatus(
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> dict[str, Any]:
    """The cluster's nodes and jobs, as :func:`achilles.getClusterStatus` returns them."""
    return _get_cluster_status(host=host, port=port, username=username, secret_key=secret_key)


__all__ = ["genConfig", "getClusterStatus", "imap", "imap_unordered", "killCluster", "map"]
