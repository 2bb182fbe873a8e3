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
    time.sleep(0.05)
    return x * x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
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
