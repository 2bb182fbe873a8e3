"""Task functions for the integration tests: a local module (not installed), so the
nodes, which run in another directory, receive it by source."""

from __future__ import annotations

import os
import time


class Boom(Exception):
    """A task's own exception type; the caller must get this very class back."""


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on(x: int, bad: int = 5) -> int:
    if x == bad:
        raise Boom(f"bad value {x}")
    return x


def fail_at_five(x: int) -> int:
    return fail_on(x, 5)


def slow_square(x: int) -> int:
    time.sleep(0.05)  # sync-ok: the task's own work, run on a node
    return x * x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)  # sync-ok: the task's own work, run on a node
    return seconds


def pid(_: object = None) -> int:
    return os.getpid()


def shift(p: Point) -> Point:
    return Point(p.x + 1, p.y + 1)


def kwargs_echo(a: int, b: int = 0, *, c: int = 0) -> tuple[int, int, int]:
    return a, b, c


_initialized: list[int] = []


def remember(value: int) -> None:
    _initialized.append(value)


def initialized(_: object) -> list[int]:
    return list(_initialized)


def numbers(n: int):
    yield from range(n)


# --- hostile tasks for the crash table ------------------------------------------------
def exit_three(x: int) -> int:
    if x == 3:
        import sys

        sys.exit(3)
    return x


def hard_exit(x: int) -> int:
    if x == 3:
        os._exit(0)
    return x


def segfault(x: int) -> int:
    if x == 3:
        import faulthandler

        faulthandler._sigsegv()
    return x


def huge_allocation(x: int) -> int:
    if x == 3:
        return len(bytearray(1 << 62))
    return x


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this object refuses to be pickled")


def unpicklable_result(x: int) -> object:
    return Unpicklable() if x == 3 else x


class TwoArgError(Exception):
    """Pickles, but cannot be unpickled (its __init__ needs two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"two-arg error {a} {b}")


def raise_two_arg(x: int) -> int:
    if x == 3:
        raise TwoArgError(1, 2)
    return x


def _explode() -> None:
    raise RuntimeError("exploded while unpickling")


class CrashAtUnpickle:
    """Pickles fine on the caller; blows up when a worker unpickles it."""

    def __reduce__(self):
        return (_explode, ())


def identity(x: object) -> object:
    return x


def sleep_then_square(x: int, seconds: float = 0.05) -> int:
    time.sleep(seconds)  # sync-ok: the task's own work, run on a node
    return x * x


def mark_and_sleep(path: str, seconds: float) -> str:
    """Record that it started (a file), then sleep."""
    with open(os.path.join(path, f"{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    time.sleep(seconds)  # sync-ok: the task's own work, run on a node
    return path


def mark_or_fail(path: str, x: int, bad: int) -> int:
    """Leave a side effect (a file named ``x``), then raise Boom if ``x == bad``."""
    with open(os.path.join(path, str(x)), "w"):
        pass
    if x == bad:
        raise Boom(f"bad value {x}")
    return x


class RefusesPickling:
    """An argument whose pickling raises RuntimeError (pickle's and dill's alike)."""

    def __reduce__(self):
        raise RuntimeError("this object refuses to be pickled")


def boom_here(x: int) -> int:
    raise ValueError(f"boom {x}")  # the line a remote traceback must show


def rendezvous(arg: tuple[str, int, int]) -> tuple[bool, int]:
    """Meet ``n`` tasks that run at the same time: mark this one started (a file in
    ``folder``), then wait (at most 20 s) until all ``n`` have; return whether they met,
    and this worker's node pid (its parent)."""
    folder, n, i = arg
    open(os.path.join(folder, f"started-{i}"), "w").close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if len(os.listdir(folder)) >= n:
            return True, os.getppid()
        time.sleep(0.01)  # sync-ok: the task's own wait, run on a node
    return False, os.getppid()
