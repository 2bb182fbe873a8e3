"""What the dashboard shows of the cluster, kept as it happens at a cost that does not
grow with the number of tasks: counters the scheduler keeps anyway, bounded rings (the
last EVENTS events, the last FAILURE_SAMPLES failures of each of at most FAILURE_KINDS
exception types), and each node's last self-report. :meth:`Monitor.snapshot` builds the
view in O(nodes + jobs), and the server calls it only while someone watches.

Every text here may come from a peer (node names, exception types and tracebacks): it is
stored cut short, and the page shows it as text, never as markup.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from achilles.core.scheduler import Scheduler

#: events kept for the log
EVENTS = 200
#: exception types grouped; a failure of a type past these counts under OTHER
FAILURE_KINDS = 32
#: failures kept per type (the newest; each with its traceback text): the page shows one
FAILURE_SAMPLES = 1
#: nodes remembered after they were lost (shown as "lost")
LOST_NODES = 16
#: longest text kept from a peer: an event's, a traceback's
TEXT_MAX = 4096
OTHER = "(other types)"
#: a node holding chunks that finished none for this long (and this many times the
#: cluster's typical chunk time) is listed as a straggler
STRAGGLER_AFTER = 10.0


def cut(text: str, limit: int = TEXT_MAX) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


@dataclass
class _Node:
    """What the monitor keeps of one node beyond the scheduler's state."""

    address: str = ""
    joined: float = 0.0
    cpu: float = -1.0
    rss: int = -1
    #: the node's done counter and the time at the last snapshot, for its rate
    prev_done: int = 0
    prev_at: float = 0.0
    rate: float = 0.0
    last_finished: float = 0.0  # when its done counter last moved (seen by a snapshot)


@dataclass
class _Kind:
    count: int = 0
    samples: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=FAILURE_SAMPLES))


class Monitor:
    """Fed by the server's shell (``event``, ``node_*``, ``failure``); read with
    :meth:`snapshot`."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, str, str]] = deque(maxlen=EVENTS)
        self.nodes: dict[int, _Node] = {}
        self.lost: deque[dict[str, Any]] = deque(maxlen=LOST_NODES)
        self.failures: dict[str, _Kind] = {}
        self.failures_total = 0
        #: per job key: its done counter and time at the last snapshot, and its rate
        self._jobs: dict[str, tuple[int, float, float]] = {}
        #: for /metrics: totals that outlive jobs
        self.jobs_started = 0
        self.jobs_finished = 0
        self.jobs_cancelled = 0
        self.chunks_requeued = 0
        self.snapshots = 0

    # -- feeding ----------------------------------------------------------------------
    def event(self, now: float, kind: str, text: str) -> None:
        """One line of the event log (``kind``: node, job, requeue, failure)."""
        self.events.append((now, kind, cut(text, 300)))
        if kind == "job-start":
            self.jobs_started += 1
        elif kind == "job-end":
            self.jobs_finished += 1
        elif kind == "job-cancel":
            self.jobs_cancelled += 1

    def node_joined(self, node: int, now: float, address: str) -> None:
        self.nodes[node] = _Node(address=cut(address, 100), joined=now, prev_at=now)

    def node_lost(self, node: int, now: float, name: str, done: int, requeued: int) -> None:
        info = self.nodes.pop(node, None)
        self.chunks_requeued += requeued
        self.lost.append(
            {
                "name": name,
                "address": info.address if info else "",
                "done": done,
                "lost_at": now,
            }
        )

    def node_stats(self, node: int, cpu: float, rss: int) -> None:
        info = self.nodes.get(node)
        if info is not None:
            info.cpu, info.rss = cpu, rss

    def failure(self, now: float, kind: str, job: str, seq: int, node: str, text: str) -> None:
        """A chunk raised (the node's summary: type name and traceback text)."""
        self.failures_total += 1
        kind = cut(kind, 128) or "(unknown)"
        group = self.failures.get(kind)
        if group is None:
            if len(self.failures) >= FAILURE_KINDS:
                kind = OTHER
                group = self.failures.setdefault(OTHER, _Kind())
            else:
                group = self.failures[kind] = _Kind()
        group.count += 1
        group.samples.append(
            {"at": now, "job": job, "seq": seq, "node": node, "traceback": cut(text)}
        )

    def job_gone(self, key: str) -> None:
        self._jobs.pop(key, None)

    # -- reading ----------------------------------------------------------------------
    def snapshot(
        self,
        scheduler: Scheduler,
        now: float,
        last_heard: dict[int, float],
        owners: dict[int, str],
    ) -> dict[str, Any]:
        """The dashboard's view: O(nodes + jobs + the rings), never O(tasks).

        Args:
            scheduler: the server's scheduler (its counters are read, never changed).
            now: the time.
            last_heard: per node id, when the server last heard from it.
            owners: per controller id, its name.
        """
        self.snapshots += 1
        nodes: list[dict[str, Any]] = []
        for n in scheduler.nodes.values():
            info = self.nodes.get(n.id)
            if info is None:
                info = self.nodes[n.id] = _Node(joined=now, prev_at=now)
            dt = now - info.prev_at
            if dt >= 0.5:  # a rate over at least half a second (several watchers)
                info.rate = (n.done - info.prev_done) / dt
                if n.done != info.prev_done:
                    info.last_finished = now
                info.prev_done, info.prev_at = n.done, now
            inflight = len(n.inflight)
            nodes.append(
                {
                    "id": n.id,
                    "name": n.name,
                    "address": info.address,
                    "slots": n.slots,
                    "busy": min(inflight, n.slots),
                    "queued": max(0, inflight - n.slots),
                    "done": n.done,
                    "rate": round(info.rate, 2),
                    "cpu": round(info.cpu, 1),
                    "rss": info.rss,
                    "heard": round(now - last_heard.get(n.id, now), 1),
                    "state": "leaving" if n.draining else "ready",
                    "idle_for": round(now - max(info.last_finished, info.joined), 1),
                }
            )
        jobs: list[dict[str, Any]] = []
        seen: set[str] = set()
        for j in scheduler.jobs.values():
            seen.add(j.id)
            prev_done, prev_at, rate = self._jobs.get(j.id, (j.done, j.submitted, 0.0))
            if now - prev_at >= 0.5:
                rate = (j.done - prev_done) / (now - prev_at)
                prev_done, prev_at = j.done, now
            self._jobs[j.id] = (prev_done, prev_at, rate)
            total = j.total if j.total >= 0 else None
            left = (total - j.done) if total is not None else None
            jobs.append(
                {
                    "id": j.name,
                    "function": j.function_name,
                    "owner": owners.get(j.owner, str(j.owner)),
                    "done": j.done,
                    "total": total,
                    "added": j.added,
                    "queued": len(j.queue),
                    "inflight": len(j.inflight),
                    "retries": j.retries,
                    "failures": j.failures,
                    "elapsed": round(now - j.submitted, 1),
                    "rate": round(rate, 2),
                    # items per second: chunks per second times the job's items per
                    # chunk (exact for a fixed chunk size but for its last chunk)
                    "items": j.items if j.items >= 0 else None,
                    "items_rate": (
                        round(rate * j.items / total, 2) if j.items >= 0 and total else None
                    ),
                    "eta": round(left / rate, 1) if left is not None and rate > 0 else None,
                }
            )
        for key in [k for k in self._jobs if k not in seen]:
            del self._jobs[key]
        return {
            "now": now,
            "nodes": nodes,
            "lost": [dict(n, ago=round(now - n["lost_at"], 1)) for n in self.lost],
            "jobs": jobs,
            "stragglers": self._stragglers(nodes),
            "failures": [
                {"kind": kind, "count": g.count, "samples": list(g.samples)}
                for kind, g in sorted(self.failures.items(), key=lambda kv: -kv[1].count)
            ],
            "events": [{"at": at, "kind": k, "text": t} for at, k, t in self.events],
            "totals": {
                "slots": sum(n["slots"] for n in nodes),
                "busy": sum(n["busy"] for n in nodes),
                "rate": round(sum(n["rate"] for n in nodes), 2),
                "failures": self.failures_total,
            },
        }

    @staticmethod
    def _stragglers(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Nodes that hold chunks but finished none for a long while, compared with the
        others' typical time per chunk (per slot)."""
        rates = sorted(n["rate"] / n["slots"] for n in nodes if n["rate"] > 0)
        typical = 1.0 / rates[len(rates) // 2] if rates else 0.0  # s per chunk per slot
        after = max(STRAGGLER_AFTER, 5 * typical)
        return [
            {"name": n["name"], "holding": n["busy"] + n["queued"], "idle_for": n["idle_for"]}
            for n in nodes
            if n["busy"] and n["rate"] == 0 and n["idle_for"] > after
        ]
