"""How code, data and exceptions cross the wire (dill for code, C pickle for data)."""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from achilles.errors import RemoteError, SerializationError
from achilles.serialization import (
    dumps_chunk,
    dumps_exception,
    dumps_function,
    loads_chunk,
    loads_exception,
    loads_function,
)


def module_level_square(x: int) -> int:
    return x * x


class NeedsTwoArgs(Exception):
    """Its args are one string, so unpickling calls __init__ with one argument and fails."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"code {code}: {what}")


def round_trip(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    return loads_function(dumps_function(fn, **kwargs))


# --- functions ----------------------------------------------------------------------------
def test_lambda_round_trip() -> None:
    """A lambda survives dumps_function/loads_function and still computes."""
    bundle = round_trip(lambda x: x + 1)
    assert bundle["fn"](41) == 42
    assert bundle["mode"] == "map"


def test_closure_round_trip() -> None:
    """A closure keeps its captured values."""

    def make(offset: int) -> Callable[[int], int]:
        return lambda x: x + offset

    assert round_trip(make(100))["fn"](1) == 101


def test_module_level_function_round_trip() -> None:
    """A module-level function round-trips, with the initializer and mode around it."""
    bundle = round_trip(
        module_level_square, mode="star", initializer=module_level_square, initargs=(3,)
    )
    assert bundle["fn"](7) == 49
    assert (bundle["mode"], bundle["initargs"]) == ("star", (3,))
    assert bundle["initializer"](2) == 4


def test_non_callable_refused() -> None:
    """dumps_function refuses something that is not callable."""
    with pytest.raises(TypeError):
        dumps_function(42)  # type: ignore[arg-type]


def test_unserialisable_function_is_serialization_error() -> None:
    """A function whose closure holds an unpicklable object is a SerializationError naming it."""
    gen = (i for i in range(3))

    def uses_generator(x: int) -> int:
        return x + next(gen)

    with pytest.raises(SerializationError, match="uses_generator"):
        dumps_function(uses_generator)


# --- data chunks --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "items",
    [
        [1, 2.5, "three", b"four", None, True],
        [(1, 2), {"k": [1, 2]}, {3, 4}, frozenset({5})],
        list(range(1000)),
        [],
    ],
)
def test_plain_data_round_trip_uses_c_pickle(items: list[Any]) -> None:
    """Plain data round-trips, and the bytes are ordinary pickle protocol 5."""
    data = dumps_chunk(items)
    assert loads_chunk(data) == items
    assert pickle.loads(data) == items
    assert data[:2] == b"\x80\x05"


def test_dill_fallback_for_what_pickle_refuses() -> None:
    """A lambda inside a list, which pickle refuses, is pickled by dill and still loads."""
    items = [lambda x: x * 3, 1]
    with pytest.raises(Exception):
        pickle.dumps(items)
    loaded = loads_chunk(dumps_chunk(items))
    assert loaded[0](5) == 15 and loaded[1] == 1


def test_by_reference_data_round_trip() -> None:
    """Results pickled by reference round-trip too."""
    items = [{"a": 1}, (2, 3)]
    assert loads_chunk(dumps_chunk(items, by_reference=True)) == items


def test_unpicklable_chunk_raises_pickles_own_error() -> None:
    """Something neither pickle nor dill can serialise raises pickle's own exception (as
    multiprocessing would), with a note naming what was tried."""
    with pytest.raises(TypeError, match="generator") as info:
        dumps_chunk([(i for i in range(3))])
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "cannot pickle the arguments" in note and "dill" in note
    with pytest.raises(TypeError) as info:
        dumps_chunk([(i for i in range(3))], by_reference=True)
    assert "cannot pickle the results" in " ".join(info.value.__notes__)


# --- exceptions ---------------------------------------------------------------------------
def test_exception_round_trip_keeps_type_and_message() -> None:
    """A picklable exception comes back with its type, message and the traceback text."""
    exc, tb = loads_exception(dumps_exception(ValueError("bad value 7"), "Traceback: ..."))
    assert type(exc) is ValueError and str(exc) == "bad value 7"
    assert tb == "Traceback: ..."


def test_exception_chain_and_traceback_are_dropped() -> None:
    """The exception's own traceback and context are not shipped (they may not pickle)."""
    try:
        try:
            raise KeyError("inner")
        except KeyError:
            raise RuntimeError("outer")  # noqa: B904 (the implicit context is the point)
    except RuntimeError as caught:
        exc, _ = loads_exception(dumps_exception(caught, "tb"))
    assert type(exc) is RuntimeError and exc.__context__ is None and exc.__cause__ is None


def test_exception_that_does_not_round_trip_becomes_remote_error() -> None:
    """An exception whose __init__ needs two args becomes RemoteError with its name and text."""
    exc, tb = loads_exception(dumps_exception(NeedsTwoArgs(3, "disk full"), "tb text"))
    assert isinstance(exc, RemoteError)
    assert exc.type_name == "NeedsTwoArgs"
    assert exc.message == "code 3: disk full"
    assert str(exc) == "NeedsTwoArgs: code 3: disk full"
    assert tb == "tb text"


def test_unloadable_exception_bytes_become_serialization_error() -> None:
    """Exception bytes that cannot be unpickled give a SerializationError, not a crash."""
    exc, tb = loads_exception(b"not a pickle")
    assert isinstance(exc, SerializationError) and tb == ""


# --- local modules shipped by source ------------------------------------------------------
MODULE_SOURCE = textwrap.dedent("""
    FACTOR = 7

    def helper(x):
        return x * FACTOR

    def work(x):
        return helper(x) + 1
""")

CHILD = textwrap.dedent("""
    import importlib.util, sys
    name = sys.argv[1]
    assert importlib.util.find_spec(name) is None, "the child must not see the module file"
    from achilles.serialization import loads_function
    bundle = loads_function(sys.stdin.buffer.read())
    print(bundle["fn"](3))
""")


def test_local_module_is_shipped_by_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A function from a local module runs in a process that does not have the module file."""
    name = "achilles_test_shipped_mod"
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / f"{name}.py").write_text(MODULE_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(src_dir))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(name)
        data = dumps_function(module.work)
    finally:
        sys.modules.pop(name, None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, name],
        input=data,
        capture_output=True,
        cwd=elsewhere,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().strip() == "22"


def test_bundle_reused_until_its_source_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same function gives the very same bundle on the next call; an edit of its
    module's file (seen by mtime and size) gives a new one carrying the new source."""
    name = "achilles_test_cached_mod"
    path = tmp_path / f"{name}.py"
    path.write_text(MODULE_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(name)
        first = dumps_function(module.work, "apply")
        assert dumps_function(module.work, "apply") is first
        assert dumps_function(module.work, "map") is not first  # another mode: its own
        path.write_text(MODULE_SOURCE + "\nEXTRA = 1\n", encoding="utf-8")
        second = dumps_function(module.work, "apply")
    finally:
        sys.modules.pop(name, None)
    assert second != first
    assert "EXTRA = 1" in loads_function_sources(second)[name]


def test_bundle_follows_a_changed_main_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defining a new function in ``__main__`` (as a notebook cell does) makes the next
    bundle ship it: a cached bundle is only reused while ``__main__`` holds the same
    objects."""
    main = sys.modules["__main__"]
    before = dumps_function(abs, "apply")
    assert dumps_function(abs, "apply") is before

    def cell_function(x: int) -> int:
        return x

    cell_function.__module__ = "__main__"
    monkeypatch.setattr(main, "achilles_cell_function", cell_function, raising=False)
    after = dumps_function(abs, "apply")
    assert after is not before


def loads_function_sources(data: bytes) -> dict[str, str]:
    """The shipped module sources of a bundle (its first part)."""
    import pickle

    return pickle.loads(data)[0]  # type: ignore[no-any-return]
