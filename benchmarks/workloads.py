"""The workload functions of the benchmark suite (S, W1-W7; see README.md here).

Every system runs exactly these functions, imported from this module: the same bodies
for ``multiprocessing.Pool``, achilles and the peers. Only the standard library is
used here, so that achilles can ship this file by source to nodes that do not have it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

MiB = 1024 * 1024


# --- W1, W5 (and warm-up) -------------------------------------------------------------
def square(x: int) -> int:
    """W1 and W5: ``x * x``."""
    return x * x


# --- W2, W7 ---------------------------------------------------------------------------
def burn(task: tuple[int, int]) -> tuple[int, int]:
    """W2: burn CPU in a pure-Python loop of ``iters`` steps; return ``(i, checksum)``.

    The checksum depends only on ``iters``, so the expected result of every task is
    known after running one of them.
    """
    i, iters = task
    acc = 0
    for k in range(iters):
        acc = (acc + k * k) % 1000003
    return i, acc


def burn_timed(task: tuple[int, int]) -> tuple[int, int, float]:
    """W9: ``burn``, and the CPU seconds it took in its worker, so that a run's
    efficiency can also be judged against the CPU its tasks really took (the machine's
    speed drifts between runs by more than the effects W9 looks for)."""
    cpu = time.process_time()
    i, acc = burn(task)
    return i, acc, time.process_time() - cpu


def calibrate_burn(task_s: float, probe_s: float = 0.05) -> int:
    """How many ``burn`` iterations take about ``task_s`` s of CPU on this machine now.

    CPU time (``process_time``) and the fastest of 10 probes: the machines are
    shared, and other load must not make the tasks shorter than intended.
    """
    iters = 1000
    while True:
        t0 = time.process_time()
        burn((0, iters))
        dt = time.process_time() - t0
        if dt >= probe_s:
            break
        iters *= 2
    samples = []
    for _ in range(10):
        t0 = time.process_time()
        burn((0, iters))
        samples.append(time.process_time() - t0)
    per_iter = min(samples) / iters
    return max(1, int(task_s / per_iter))


# --- W3 -------------------------------------------------------------------------------
def length(data: bytes) -> int:
    """W3 ``len``: the argument's length (the data travels one way)."""
    return len(data)


def echo(data: bytes) -> bytes:
    """W3 ``echo``: the argument itself (the data travels both ways)."""
    return data


def blob(i: int, size: int) -> bytes:
    """A distinct, incompressible-looking ``size``-byte argument (deterministic in i)."""
    return random.Random(i).randbytes(size)


# --- W4, S ----------------------------------------------------------------------------
def trivial(x: int) -> int:
    """W4 and S: a trivial function."""
    return x + 1


# --- W5 -------------------------------------------------------------------------------
class Pulled:
    """Counts how many items a generator has yielded (read from the caller)."""

    def __init__(self) -> None:
        self.count = 0


def small_ints(n: int, pulled: Pulled) -> Iterator[int]:
    """W5 input: ``n`` small ints, counting in ``pulled`` how many were taken."""
    for i in range(n):
        pulled.count += 1
        yield i % 1000


def w5_expected(n: int) -> tuple[int, int]:
    """(count, weighted sum) that consuming ``imap(square, small_ints(n))`` must give.

    The weighted sum ``sum(k * r_k)`` over positions k = 1..n is order-sensitive.
    """
    # Item i (position k = i + 1) is r = i % 1000; the positions holding r are
    # r + 1 + 1000 j for j < J_r, so their sum is J_r (r + 1) + 1000 J_r (J_r - 1) / 2.
    whole, rest = divmod(n, 1000)
    w = 0
    for r in range(1000):
        j = whole + (1 if r < rest else 0)
        w += r * r * (j * (r + 1) + 1000 * j * (j - 1) // 2)
    return n, w


# --- W6 -------------------------------------------------------------------------------
def noop(x: int) -> None:
    """W6: nothing; the chunk's round trip through the server is all there is."""
    return None


# --- soak -----------------------------------------------------------------------------
def fail_at_7(x: int) -> int:
    """Soak: raises for 7, else returns ``x`` (a job with a failing task)."""
    if x == 7:
        raise ValueError("soak: 7 fails on purpose")
    return x


def sleepy(x: int) -> int:
    """Soak: 10 ms asleep (a job its controller abandons by dying)."""
    time.sleep(0.01)
    return x
