"""Readings from /proc for the benchmarks: memory (RSS, peak), CPU time of processes
and of the whole machine, and the process table. Linux only, standard library only."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from typing import Any

from achilles.testing import proc_table

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int | str, *keys: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status, KiB (those that could be read)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_mib(pid: int) -> float:
    """One process's VmRSS, MiB (NaN if it cannot be read)."""
    kib = _status_kib(pid, "VmRSS").get("VmRSS")
    return float("nan") if kib is None else kib / 1024


def self_mib(key: str) -> float:
    """VmRSS or VmHWM of this process, MiB."""
    return _status_kib("self", key).get(key, 0) / 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tree_memory(roots: Iterable[int]) -> dict[str, Any]:
    """Summed VmRSS and VmHWM (MiB) of the live processes under ``roots`` (inclusive).

    Forked workers share pages, which each one's RSS counts: an upper bound.
    """
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    rss = hwm = 0
    count = 0
    for pid in seen:
        if table[pid][2] == "Z":
            continue
        kib = _status_kib(pid, "VmRSS", "VmHWM")
        if kib:
            count += 1
            rss += kib.get("VmRSS", 0)
            hwm += kib.get("VmHWM", 0)
    return {"rss_mib": round(rss / 1024, 1), "peak_mib": round(hwm / 1024, 1), "procs": count}


def cpu_busy() -> tuple[float, float]:
    """(busy CPU s of the whole machine, of which stolen by the hypervisor), /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


class TreeCpu:
    """CPU s used by a process and all its descendants, sampled from /proc.

    Each sample records every descendant's own utime+stime, keyed by (pid, start time);
    the total is the sum of the last values seen. This counts descendants that die
    without being reaped by the tree (a node's workers after SIGKILL of its group),
    which RUSAGE_CHILDREN misses; it misses at most one interval of a process's life.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[tuple[int, str], float] = {}

    def sample(self) -> None:
        """Record the CPU time of the root and of every descendant alive now."""
        table = proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            try:
                with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            self.seen[(pid, fields[19])] = (int(fields[11]) + int(fields[12])) / CLK_TCK

    def total(self) -> float:
        """CPU s of the tree, as last seen for each process."""
        return sum(self.seen.values())


def children_cpu() -> float:
    """CPU s used by this process's waited-for descendants (RUSAGE_CHILDREN)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime+stime from /proc/<pid>/stat in s, on-CPU time from schedstat in s).

    stat counts clock ticks (10 ms); schedstat (summed over threads) is in ns.
    """
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    sched = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                sched += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        sched = -1
    return ticks / CLK_TCK, (sched / 1e9 if sched >= 0 else float("nan"))


def meminfo_kib(key: str) -> int:
    """A line of /proc/meminfo (``MemTotal``...), KiB; 0 when absent."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0
