"""Controller-side job bookkeeping: window, dedup, reorder, chunk sizes."""

from __future__ import annotations

import multiprocessing.pool
import types

import pytest

from achilles.core.job import (
    CHUNK_BYTES,
    FAILED,
    RAISED,
    AdaptiveChunker,
    Job,
    Outcome,
    default_chunksize,
    window_for,
)
from achilles.core.pace import MAX_PREFETCH, PREFETCH, QUEUED_WORK
from achilles.protocol.messages import CRASHED, ERROR, OK, TIMEOUT


def filled(ordered: bool = True, window: int = 10, chunks: int = 4, per_chunk: int = 3) -> Job:
    job = Job(ordered=ordered, window=window)
    for i in range(chunks):
        assert job.add(per_chunk) == i
    return job


def res(seq: int) -> bytes:
    return f"r{seq}".encode()


# --- window and backpressure --------------------------------------------------------------
def test_can_add_false_at_window_and_true_after_take() -> None:
    """Adding stops at `window` outstanding chunks and resumes once the caller takes one."""
    job = Job(ordered=True, window=2)
    assert job.can_add()
    job.add(1)
    assert job.can_add()
    job.add(1)
    assert not job.can_add()
    job.on_result(0, OK, res(0))
    assert not job.can_add()  # a result alone does not free the window: it is still owed
    assert [o.seq for o in job.take()] == [0]
    assert job.can_add()
    assert job.outstanding == 1


def test_window_is_at_least_one() -> None:
    """A window of zero or less still allows one chunk."""
    job = Job(ordered=False, window=0)
    assert job.window == 1 and job.can_add()
    job.add(1)
    assert not job.can_add()


def test_failure_does_not_stop_adding() -> None:
    """A failed chunk does not stop the job: chunks are still added below the window
    (multiprocessing runs a job's other tasks after one raised)."""
    job = filled(window=100, chunks=2)
    job.on_result(1, ERROR, b"exc")
    assert job.can_add()


def test_raised_input_takes_its_place_in_order() -> None:
    """A chunk whose input raised before it was sent is ready at once, in its position,
    after the results of the chunks before it, and the job can go on."""
    job = filled(ordered=True, chunks=2, per_chunk=3)
    boom = ValueError("input")
    seq = job.add_raised(boom)
    assert seq == 2 and job.items == 6
    assert job.take() == []  # chunks 0 and 1 first
    job.on_result(0, OK, res(0))
    job.on_result(1, OK, res(1))
    assert job.take() == [
        Outcome(0, OK, res(0), 0, 3),
        Outcome(1, OK, res(1), 3, 3),
        Outcome(2, RAISED, b"", 6, 0, boom),
    ]
    job.close_input()
    assert job.complete() and job.finished()


def test_complete_before_the_results_are_taken() -> None:
    """complete() is true once every outcome is in, whether or not the caller took it."""
    job = filled(chunks=2)
    job.close_input()
    job.on_result(0, OK, res(0))
    assert not job.complete()
    job.on_result(1, OK, res(1))
    assert job.complete() and not job.finished()


# --- results ------------------------------------------------------------------------------
def test_duplicate_result_is_dropped() -> None:
    """A second result for the same chunk is refused and never delivered twice."""
    job = filled(ordered=False)
    assert job.on_result(1, OK, res(1)) is True
    assert job.on_result(1, OK, b"again") is False
    assert [(o.seq, o.payload) for o in job.take()] == [(1, res(1))]
    assert job.on_result(1, OK, b"after take") is False
    assert job.take() == []


def test_unknown_result_is_dropped() -> None:
    """A result for a chunk that was never added is refused."""
    job = filled(chunks=2)
    assert job.on_result(7, OK, b"?") is False
    assert job.take() == []


def test_ordered_take_gives_contiguous_in_order_outcomes() -> None:
    """An ordered job hands out only the in-order prefix of results that have arrived."""
    job = filled(ordered=True, chunks=4, per_chunk=3)
    job.on_result(2, OK, res(2))
    job.on_result(1, OK, res(1))
    assert job.take() == []  # chunk 0 is missing
    job.on_result(0, OK, res(0))
    assert job.take() == [
        Outcome(0, OK, res(0), 0, 3),
        Outcome(1, OK, res(1), 3, 3),
        Outcome(2, OK, res(2), 6, 3),
    ]
    job.on_result(3, OK, res(3))
    assert job.take() == [Outcome(3, OK, res(3), 9, 3)]
    assert job.consumed == 4


def test_unordered_take_gives_all_arrived() -> None:
    """An unordered job hands out every result that has arrived, whatever its position."""
    job = filled(ordered=False, chunks=4)
    job.on_result(3, OK, res(3))
    job.on_result(1, OK, res(1))
    assert sorted(o.seq for o in job.take()) == [1, 3]
    assert job.take() == []
    job.on_result(0, OK, res(0))
    assert [o.seq for o in job.take()] == [0]


@pytest.mark.parametrize("fail", ["error", "on_failed"])
def test_failure_at_k_is_delivered_in_position(fail: str) -> None:
    """A failed chunk k is delivered after chunks 0..k-1, in order."""
    job = filled(ordered=True, chunks=4, per_chunk=2)
    if fail == "error":
        assert job.on_result(2, ERROR, b"exc")
        expected = Outcome(2, ERROR, b"exc", 4, 2)
    else:
        assert job.on_failed(2, "worker died")
        expected = Outcome(2, FAILED, b"worker died", 4, 2)
    assert job.take() == []
    job.on_result(1, OK, res(1))
    job.on_result(0, OK, res(0))
    assert job.take() == [Outcome(0, OK, res(0), 0, 2), Outcome(1, OK, res(1), 2, 2), expected]


def test_finished_after_closed_input_fully_consumed() -> None:
    """finished() is true only once input is closed and every chunk was taken."""
    job = filled(chunks=2)
    job.on_result(0, OK, res(0))
    job.on_result(1, OK, res(1))
    assert not job.finished()  # input still open
    job.close_input()
    assert not job.finished()  # results not taken yet
    job.take()
    assert job.finished()


def test_empty_closed_job_is_finished() -> None:
    """A job whose input was empty is finished as soon as its input is closed."""
    job = Job(ordered=True, window=4)
    job.close_input()
    assert job.finished()


def test_failure_keeps_the_servers_reason() -> None:
    """A chunk the server gave up on keeps the reason it gave (its last status there),
    which is what the pool's exception is chosen by; other outcomes have none."""
    job = filled(ordered=False, chunks=3)
    assert job.on_failed(0, "ran past its time limit", TIMEOUT)
    assert job.on_failed(1, "worker died", CRASHED)
    job.on_result(2, OK, res(2))
    assert sorted((o.seq, o.status, o.reason) for o in job.take()) == [
        (0, FAILED, TIMEOUT),
        (1, FAILED, CRASHED),
        (2, OK, ""),
    ]


def test_position_gives_argument_range_of_pending_chunk() -> None:
    """position(seq) is the [start, stop) range of a pending chunk's arguments, else None."""
    job = Job(ordered=True, window=10)
    job.add(5)
    job.add(2)
    job.add(4)
    assert job.position(0) == (0, 5)
    assert job.position(1) == (5, 7)
    assert job.position(2) == (7, 11)
    assert job.position(3) is None
    job.on_result(1, OK, b"")
    assert job.position(1) is None
    assert job.items == 11 and job.added == 3


# --- chunk sizes --------------------------------------------------------------------------
def cpython_chunksize(n_items: int, slots: int) -> int:
    """Ask CPython's own Pool._map_async which chunksize it would pick, without a pool."""
    fake = types.SimpleNamespace(
        _check_running=lambda: None,
        _pool=[None] * slots,
        _cache={},
        _taskqueue=types.SimpleNamespace(put=lambda item: None),
        _guarded_task_generation=lambda *args: None,
    )
    result = multiprocessing.pool.Pool._map_async(
        fake, abs, range(n_items), multiprocessing.pool.mapstar
    )  # type: ignore[arg-type]
    return int(result._chunksize)


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 8, 13])
def test_default_chunksize_matches_cpython(slots: int) -> None:
    """default_chunksize picks what multiprocessing.Pool.map picks for the same sizes."""
    for n_items in [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 33, 100, 101, 999, 1000, 12345]:
        chunksize, extra = divmod(n_items, slots * 4)
        expected = chunksize + (1 if extra else 0)
        assert default_chunksize(n_items, slots) == expected, n_items
        assert cpython_chunksize(n_items, slots) == expected, n_items


def test_default_chunksize_edge_cases() -> None:
    """No items or no slots still give a usable chunksize of at least one."""
    assert default_chunksize(0, 4) == 1
    assert default_chunksize(10, 0) == default_chunksize(10, 1) == 3


def test_window_widens_while_chunks_are_short() -> None:
    """Chunks much shorter than QUEUED_WORK widen the window (by the Pace's depth over
    PREFETCH, at most MAX_PREFETCH / PREFETCH times); long chunks bring it back."""
    job = Job(ordered=True, window=4)
    job.observe(20e-6)
    assert job.window == 4 * MAX_PREFETCH // PREFETCH
    for _ in range(30):
        job.observe(QUEUED_WORK / 3.5)  # depth 4: twice the base
    assert job.window == 4 * 2
    for _ in range(30):
        job.observe(1.0)
    assert job.window == 4 == job.base_window


def test_default_chunksize_caps_the_bytes_of_a_chunk() -> None:
    """Large items get smaller chunks (about CHUNK_BYTES of arguments each, at least one
    item); small items keep multiprocessing's choice."""
    mib = 1024 * 1024
    assert 4 * mib == CHUNK_BYTES
    assert default_chunksize(64, 2, item_bytes=4 * mib) == 1  # W3: was 8, i.e. 32 MiB
    assert default_chunksize(64, 2, item_bytes=10 * mib) == 1
    assert default_chunksize(64, 2, item_bytes=mib) == 4
    assert default_chunksize(1_000_000, 2, item_bytes=30) == 125_000  # the cap is far off
    assert default_chunksize(64, 2, item_bytes=0) == default_chunksize(64, 2) == 8


def test_pool_measures_the_first_item_for_automatic_chunks() -> None:
    """Pool's estimate of an item's size: length for bytes and text, pickled size for
    other objects, nothing for plain numbers, iterators or an empty input."""
    from achilles.pool import _item_bytes

    assert _item_bytes([b"x" * 1000, b""], 2) == 1000
    assert _item_bytes(["abc"], 1) == 3
    assert _item_bytes([1, 2, 3], 3) == 0
    assert 1000 < _item_bytes([list(range(500))], 1) < 3000
    assert _item_bytes(range(10), 10) == 0
    assert _item_bytes([], 0) == 0
    assert _item_bytes({"a": 1}, 1) == 0  # a dict is iterated over its keys, not indexed
    assert _item_bytes([(x for x in ())], 1) == 0  # unpicklable: the real pickling says so


def test_adaptive_chunker_grows_at_most_twice_per_step() -> None:
    """Fast chunks double the size each step, never more."""
    chunker = AdaptiveChunker(target=1.0, maximum=10**6)
    sizes = []
    for _ in range(6):
        chunker.observe(chunker.size, 1e-6)  # wants a huge chunk
        sizes.append(chunker.size)
    assert sizes == [2, 4, 8, 16, 32, 64]
    chunker.observe(1, 0.0)  # instantaneous: still only doubles
    assert chunker.size == 128


def test_adaptive_chunker_shrinks_for_slow_chunks() -> None:
    """A chunk slower than the target shrinks the size to match the measured rate."""
    chunker = AdaptiveChunker(target=0.1, maximum=1000)
    for _ in range(8):
        chunker.observe(chunker.size, 1e-6)
    assert chunker.size == 256
    chunker.observe(256, 2.56)  # 0.01 s per item: 10 items make 0.1 s
    assert chunker.size == 10
    chunker.observe(10, 100.0)  # far too slow: never below one
    assert chunker.size == 1


def test_adaptive_chunker_respects_maximum() -> None:
    """The size never exceeds `maximum`."""
    chunker = AdaptiveChunker(target=1.0, maximum=5)
    for _ in range(10):
        chunker.observe(chunker.size, 0.0)
        assert chunker.size <= 5
    assert chunker.size == 5


def test_adaptive_chunker_ignores_empty_chunks() -> None:
    """An observation of zero items changes nothing."""
    chunker = AdaptiveChunker()
    chunker.observe(0, 5.0)
    assert chunker.size == 1


@pytest.mark.parametrize(
    "slots,limit,expected",
    [(1, 0, 4), (2, 0, 6), (10, 0, 30), (10, 3, 9), (10, 1, 4), (2, 50, 6), (0, 0, 4)],
)
def test_window_for(slots: int, limit: int, expected: int) -> None:
    """window_for is three chunks per usable slot, at least four, capped by the job limit."""
    assert window_for(slots, limit) == expected


def test_pool_chooses_the_exception_by_the_servers_reason() -> None:
    """A chunk the server gave up on after a timeout raises multiprocessing's
    TimeoutError, after crashes a ChunkFailedError naming its arguments: by the reason
    the server gave, whatever the text says."""
    from achilles.errors import ChunkFailedError
    from achilles.pool.results import _exception

    text = b"worker died (time limit of its own making)"
    timed_out = _exception(Outcome(4, FAILED, b"ran past its time limit", 8, 2, reason=TIMEOUT))
    crashed = _exception(Outcome(4, FAILED, text, 8, 2, reason=CRASHED))
    assert isinstance(timed_out, multiprocessing.TimeoutError)
    assert str(timed_out) == "chunk 4 (arguments 8 to 9) failed: ran past its time limit"
    assert isinstance(crashed, ChunkFailedError)
    assert not isinstance(crashed, multiprocessing.TimeoutError)
    assert str(crashed).startswith("chunk 4 (arguments 8 to 9) failed: worker died")


def test_window_is_bounded_whatever_the_cluster_claims() -> None:
    """Slots come from nodes: a window sized from them is capped, so a node claiming
    10**9 slots cannot make an imap read an endless generator into memory."""
    from achilles.core.job import MAX_WINDOW, Job, window_for

    assert window_for(10**9) == MAX_WINDOW
    assert window_for(2) == 6 and window_for(0) == 4
    job = Job(ordered=True, window=window_for(10**9))
    for _ in range(50):
        job.observe(0.000001)  # very short chunks: the window grows, up to the cap
    assert job.window <= MAX_WINDOW
