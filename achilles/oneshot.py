"""The seed's one-call helpers: ``map``, ``imap`` and ``imap_unordered``, each a pool
for one call, with the seed's argument order (``callback`` applied to each result,
then chunk size and the cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from achilles.pool.pool import Pool


def _one_shot(host: Any, port: Any, username: Any, secret_key: Any) -> Pool:
    # imported here: achilles.pool re-exports these helpers, so it may be importing us
    from achilles.pool.pool import Pool

    return Pool(host=host, port=port, username=username, secret_key=secret_key)


def map(
    func: Callable[..., Any],
    args: Iterable[Any],
    callback: Callable[[Any], Any] | None = None,
    chunksize: int | None = None,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> list[Any]:
    """``Pool().map`` in one call; ``callback`` (if given) is applied to each result."""
    with _one_shot(host, port, username, secret_key) as pool:
        results = pool.map(func, args, chunksize)
    return [callback(r) for r in results] if callback else results


def _iterate(
    ordered: bool,
    func: Callable[..., Any],
    args: Iterable[Any],
    callback: Callable[[Any], Any] | None,
    chunksize: int | None,
    conn: tuple[Any, ...],
) -> Iterator[Any]:
    with _one_shot(*conn) as pool:
        it = (
            pool.imap(func, args, chunksize)
            if ordered
            else pool.imap_unordered(func, args, chunksize)
        )
        for r in it:
            yield callback(r) if callback else r


def imap(
    func: Callable[..., Any],
    args: Iterable[Any],
    callback: Callable[[Any], Any] | None = None,
    chunksize: int | None = None,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> Iterator[Any]:
    """``Pool().imap`` as a generator; ``callback`` is applied to each result."""
    return _iterate(True, func, args, callback, chunksize, (host, port, username, secret_key))


def imap_unordered(
    func: Callable[..., Any],
    args: Iterable[Any],
    callback: Callable[[Any], Any] | None = None,
    chunksize: int | None = None,
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    secret_key: str | None = None,
) -> Iterator[Any]:
    """``Pool().imap_unordered`` as a generator; ``callback`` is applied to each result."""
    return _iterate(False, func, args, callback, chunksize, (host, port, username, secret_key))


__all__ = ["imap", "imap_unordered", "map"]
