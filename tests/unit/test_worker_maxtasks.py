"""maxtasksperchild inside a worker: the bundle carries it, the worker counts a pool's
chunks, retires without reading another task, and frees its slot for a replacement."""

from __future__ import annotations

import multiprocess
import pytest

from achilles.node import worker as _worker
from achilles.protocol.messages import OK
from achilles.serialization import (
    dumps_chunk,
    dumps_function,
    loads_chunk,
    loads_function,
)


def test_bundle_carries_maxtasks():
    """dumps_function's maxtasks reaches the worker's runtime dict (None by default)."""
    assert loads_function(dumps_function(abs, "map", None, (), "p1", maxtasks=3))["maxtasks"] == 3
    assert loads_function(dumps_function(abs, "map", None, (), "p1"))["maxtasks"] is None


def test_bundle_cache_keys_on_maxtasks():
    """Two pools differing only in maxtasksperchild get different bundles."""
    assert dumps_function(abs, "map", None, (), "p2", maxtasks=1) != dumps_function(
        abs, "map", None, (), "p2", maxtasks=2
    )


def test_slot_table_reuses_freed_slots():
    """A released slot is claimed again; a full table answers -1."""
    table = _worker.SlotTable.create(multiprocess.get_context("spawn"), 2)
    assert [table.claim(), table.claim(), table.claim()] == [0, 1, -1]
    table.release(0)
    assert table.pids[0] == 0
    assert table.claim() == 0


@pytest.fixture
def worker_state(monkeypatch):
    """This process stands in for a pool worker owning slot 0 of a fresh table."""
    table = _worker.SlotTable.create(multiprocess.get_context("spawn"), 1)
    slot = table.claim()
    for name, value in [
        ("_slots", table),
        ("_slot", slot),
        ("_jobs", type(_worker._jobs)()),
        ("_tasks", {}),
        ("_initialized", set()),
        ("_retiring", False),
    ]:
        monkeypatch.setattr(_worker, name, value)
    return table


def _run(job: str, bundle: bytes, x: int) -> int:
    status, payload, _ = _worker.run_chunk(1, job, 0, bundle, dumps_chunk([x]))
    assert status == OK, payload
    return loads_chunk(payload)[0]


def test_worker_retires_after_its_pools_maxtasks(worker_state):
    """Two chunks of a pool with maxtasks=2 (and any number of another pool's) make the
    worker retire: not before the second, and only then."""
    limited = dumps_function(abs, "map", None, (), "limited", maxtasks=2)
    unlimited = dumps_function(abs, "map", None, (), "unlimited")
    assert _run("a", limited, -1) == 1
    for x in range(5):
        assert _run("b", unlimited, -x) == x
    assert not _worker._retiring
    assert _run("a", limited, -2) == 2
    assert _worker._retiring


def test_retiring_worker_reads_no_task_and_frees_its_slot(worker_state):
    """A retiring worker's get returns the sentinel without taking the waiting task, and
    its slot is free for the replacement."""
    queue = _worker.PickleQueue(multiprocess.get_context("spawn"))
    try:
        queue._writer.send_bytes(_worker.dumps_message(("task", 1)))
        _worker._retiring = True
        assert queue.get() is None
        assert list(worker_state.pids) == [0]
        _worker._retiring = False
        assert queue.get() == ("task", 1)  # still there for another worker
    finally:
        queue.close()
