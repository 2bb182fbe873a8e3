"""What a node measures of itself for the dashboard: the CPU time and resident memory of
the node process and every process under it (its fork server and pool workers), read
from /proc. Linux only: elsewhere :meth:`ProcessTreeStats.sample` says -1 (unknown)."""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: most processes counted under the node (a fork bomb in a task must not make this slow)
MAX_PROCESSES = 4096


def _stat(pid: int) -> tuple[int, int] | None:
    """(utime + stime in ticks, rss in pages) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[11]) + int(fields[12]), int(fields[21])
    except (IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def tree(root: int) -> list[int]:
    """``root`` and every process under it (at most MAX_PROCESSES)."""
    found: list[int] = []
    todo = [root]
    while todo and len(found) < MAX_PROCESSES:
        pid = todo.pop()
        found.append(pid)
        todo.extend(_children(pid))
    return found


class ProcessTreeStats:
    """CPU percent (of one core) between two samples, and resident bytes now, of a
    process and its descendants. A process that exits between samples takes its CPU time
    with it: the percentage is never negative, only briefly low."""

    def __init__(self, root: int | None = None) -> None:
        self.root = os.getpid() if root is None else root
        self.available = os.path.exists(f"/proc/{self.root}/stat")
        self._cpu: dict[int, int] = {}
        self._at = time.monotonic()

    def sample(self) -> tuple[float, int]:
        """(cpu percent since the last sample, rss bytes); (-1, -1) if unknown."""
        if not self.available:
            return -1.0, -1
        now = time.monotonic()
        cpu: dict[int, int] = {}
        rss = 0
        used = 0
        for pid in tree(self.root):
            stat = _stat(pid)
            if stat is None:
                continue
            ticks, pages = stat
            cpu[pid] = ticks
            rss += pages * _PAGE
            used += max(0, ticks - self._cpu.get(pid, ticks))
        elapsed = now - self._at
        self._cpu, self._at = cpu, now
        percent = 100.0 * used / _TICKS / elapsed if elapsed > 0 else 0.0
        return round(percent, 1), rss
