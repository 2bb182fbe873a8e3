"""Feeding a job: its plan (chunk size and count), its chunks, the thread that pickles
and sends them within the job's window, and ``map``'s collection of the results.

A job's input is read by one thread per job, which pickles chunks and blocks on the
job's window (:meth:`achilles.core.job.Job.can_add`), so a generator is read lazily;
for ``map`` the same thread collects the results. Chunks go to the reactor thread
(``Controller.send_chunk``), which holds each until its result is in.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, cast

from achilles.controller import Controller, Handle, JobHandle
from achilles.core.job import RAISED, Outcome, default_chunksize
from achilles.net import reactor as _reactor
from achilles.pool.results import ApplyResult, _exception, _NoBar
from achilles.protocol.messages import OK
from achilles.serialization import dumps_chunk, loads_chunk

#: a chunk to send: (its items, its pickled bytes, or what reading or pickling raised)
_Made = tuple[list[Any], bytes, BaseException | None]


def _item_bytes(iterable: Any, n: int) -> int:
    """The pickled size of a sequence's first item (0 if it cannot be told cheaply)."""
    if n == 0 or not hasattr(iterable, "__getitem__") or isinstance(iterable, dict):
        return 0
    try:
        first = iterable[0]
        if isinstance(first, (bytes, bytearray, str)):
            return len(first)
        if isinstance(first, (int, float, bool)) or first is None:
            return 0  # small: no cap
        return len(dumps_chunk([first]))
    except Exception:  # not indexable after all, or not picklable: found out later
        return 0


def plan(
    iterable: Iterable[Any], chunksize: int | str | None, processes: int
) -> tuple[int | None, int, int | None]:
    """(fixed chunk size or None for adaptive, chunk count or -1, item count or None).
    ``chunksize`` None or "auto": chosen for the input and the cluster's ``processes``."""
    size = None if chunksize == "auto" else cast("int | None", chunksize)
    if size is not None and size < 1:
        raise ValueError(f"Chunksize must be 1+, not {size:n}")
    n = len(iterable) if isinstance(iterable, Sized) else None
    if size is None and n is not None:
        size = default_chunksize(n, processes, _item_bytes(iterable, n))
    total = -(-n // size) if n is not None and size else -1
    return size, total, n


def chunks(
    iterable: Iterable[Any], chunksize: int | None, handle: JobHandle
) -> Iterator[list[Any]]:
    """The input in chunks: of ``chunksize``, or of the job's adaptive size."""
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, chunksize or handle.chunker.size))
        if not chunk:
            return
        yield chunk


def _make(source: Iterator[list[Any]]) -> _Made | None:
    """The next chunk, pickled; None at the end of the input."""
    try:
        chunk = next(source)
    except StopIteration:
        return None
    except Exception as exc:  # raised by the input itself
        return [], b"", exc
    try:
        return chunk, dumps_chunk(chunk), None
    except Exception as exc:
        return chunk, b"", exc


def _room(handle: JobHandle, collect: Callable[[list[Outcome]], None] | None) -> bool:
    """Wait (holding ``cond``) until the window has room; False if the job stopped.
    ``collect``: take the job's outcomes meanwhile (``map``'s own thread)."""
    while not handle.core.can_add():
        if handle.error or handle.cancelled:
            return False
        if collect is not None:
            outs = handle.take()
            if outs:
                collect(outs)
                continue
        handle.cond.wait()
    return not (handle.error or handle.cancelled)


def feed(
    ctl: Controller,
    handle: JobHandle,
    source: Iterator[list[Any]],
    collect: Callable[[list[Outcome]], None] | None = None,
) -> None:
    """Pickle and send chunks within the window (runs in the job's thread).

    As multiprocessing does, an input that raises while being read ends the input
    with that exception in the next position, and a chunk that cannot be pickled
    is that exception in its position; neither stops the chunks already sent."""
    core = handle.core
    while True:
        made = _make(source)
        if made is None:
            break
        chunk, payload, failure = made
        with handle.cond:
            if not _room(handle, collect):
                return
            if failure is not None:
                core.add_raised(failure, len(chunk))
                handle.cond.notify_all()
                if not chunk:
                    break  # the input raised: it ends here
                continue
            seq = core.add(len(chunk), time.monotonic(), len(payload))
        _reactor.call_soon(ctl.send_chunk, handle, seq, payload)
    with handle.cond:
        core.close_input()
        handle.cond.notify_all()


class _MapCollector:
    """``map``'s results as they come: parts by position, and the errors. As
    multiprocessing's map, the first error that arrived wins, except that an error of
    the input itself comes first (multiprocessing's map would not have started)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.parts: dict[int, list[Any]] = {}
        self.errors: list[BaseException] = []

    def __call__(self, outs: list[Outcome]) -> None:
        for out in outs:
            if out.status == OK:
                if not self.errors:  # else the results are not wanted
                    self.parts[out.start] = loads_chunk(out.payload)
            elif out.status == RAISED and not out.count:
                self.errors.insert(0, _exception(out))
            else:
                self.errors.append(_exception(out))
            self.bar.update(out.count)

    def values(self) -> list[Any]:
        return [x for start in sorted(self.parts) for x in self.parts[start]]


def _collect_rest(handle: JobHandle, collect: _MapCollector) -> None:
    """After the input: every outcome, until the job is finished."""
    with handle.cond:
        while True:
            outs = handle.take()
            if outs:
                collect(outs)
            elif handle.error is not None:
                raise handle.error
            elif handle.cancelled:
                raise ValueError("Pool terminated")
            elif handle.core.finished():
                return
            else:
                handle.cond.wait()


def run_map(
    ctl: Controller,
    handle: JobHandle,
    iterable: Iterable[Any],
    chunksize: int | None,
    result: ApplyResult,
    bar: Any,
    job_done: Callable[[Handle, bool], None],
) -> None:
    """Feed the job and collect its results (the job's thread). As multiprocessing's
    map, it waits for every task even after one raised, then raises the first error."""
    collect = _MapCollector(bar)
    try:
        feed(ctl, handle, chunks(iterable, chunksize, handle), collect)
        _collect_rest(handle, collect)
    except BaseException as exc:
        bar.close()
        job_done(handle, True)
        result._set(False, exc)
        return
    bar.close()
    job_done(handle, False)
    if collect.errors:
        result._set(False, collect.errors[0])
    else:
        result._set(True, collect.values())


def progress_bar(progress: Any, total: int | None) -> Any:
    """A tqdm bar when asked for, else a no-op: the widget bar in a notebook that has
    ipywidgets, the text bar elsewhere (and, quietly, in a notebook without them)."""
    if not progress:
        return _NoBar()
    options = {"total": total, "unit": "item", "smoothing": 0.1}
    if isinstance(progress, dict):
        options.update(progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto's "IProgress not found" and such
        try:
            from tqdm.auto import tqdm

            return tqdm(**options)
        except Exception:  # the widget bar cannot be shown here
            from tqdm.std import tqdm as text_tqdm

            return text_tqdm(**options)
