"""Stress: many rounds of random faults under several concurrent jobs. On demand only:

    ACHILLES_STRESS_ROUNDS=30 python -m pytest -o faulthandler_timeout=0 -m stress -s \
        tests/chaos/test_stress.py

Each round runs three jobs at once (map, imap, imap_unordered) on a server and three
nodes, and injects one fault at a random moment: a node SIGKILLed (a fresh node joins
after), a pool worker SIGKILLed, a node frozen with SIGSTOP past the heartbeat timeout,
or the server SIGKILLed and restarted on its port. It counts lost and duplicated
results and hangs (all must be 0), and times the recovery from each node loss.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time

import pytest
import tasks
from conftest import wait_until
from test_node_loss import pool_workers

from achilles import Pool

pytestmark = [pytest.mark.stress, pytest.mark.chaos]

ROUNDS = int(os.environ.get("ACHILLES_STRESS_ROUNDS", "20"))
SEED = int(os.environ.get("ACHILLES_CHAOS_SEED", random.randrange(1 << 30)))
N = 120
FAULTS = ("kill-node", "kill-worker", "freeze-node", "restart-server")


def test_stress(fresh_cluster, monkeypatch):
    """Rounds of random faults under concurrent jobs lose, duplicate and hang nothing."""
    rng = random.Random(SEED)
    print(f"\nstress seed {SEED}, {ROUNDS} rounds")
    monkeypatch.setenv("ACHILLES_RECONNECT_TIMEOUT", "60")
    fast = dict(ACHILLES_HEARTBEAT_INTERVAL="0.3", ACHILLES_HEARTBEAT_TIMEOUT="2")
    cluster = fresh_cluster(nodes=0)
    cluster.server.stop()
    cluster.start_server(port=0, ACHILLES_HEARTBEAT_TIMEOUT="2")
    for _ in range(3):
        cluster.start_node(1, **fast)
    stats = collections.Counter()
    faults = collections.Counter()
    recovery: dict[str, list[float]] = collections.defaultdict(list)
    with Pool(**cluster.kwargs()) as pool:
        for round_no in range(ROUNDS):
            fault = rng.choice(FAULTS)
            faults[fault] += 1
            outputs: dict[str, list] = {}
            errors: list[BaseException] = []
            cs = rng.choice([1, 2, 5])

            def run(kind):
                try:
                    if kind == "map":
                        outputs[kind] = pool.map(tasks.sleep_then_square, range(N), cs)
                    elif kind == "imap":
                        outputs[kind] = list(pool.imap(tasks.sleep_then_square, range(N), cs))
                    else:
                        outputs[kind] = list(
                            pool.imap_unordered(tasks.sleep_then_square, range(N), cs)
                        )
                except BaseException as exc:  # reported below, never swallowed
                    errors.append(exc)

            threads = [
                threading.Thread(target=run, args=(k,), daemon=True)
                for k in ("map", "imap", "unordered")
            ]
            for t in threads:
                t.start()
            wait_until(
                lambda: (
                    sum(n["done"] for n in cluster.status()["nodes"])
                    >= stats["done_before"] + rng.randrange(1, 30)
                ),
                60,
                what="progress",
            )
            live = [n for n in cluster.nodes if n.alive()]
            start = time.monotonic()
            if fault == "kill-node":
                victim = rng.choice(live)
                victim.signal(signal.SIGKILL, group=True)
                wait_until(lambda: cluster.node_count() == len(live) - 1, 30)
                recovery["node killed: detected after s"].append(time.monotonic() - start)
                cluster.start_node(1, **fast)
            elif fault == "kill-worker":
                victim = rng.choice(live)
                workers = pool_workers(victim.pid)
                if workers:
                    os.kill(rng.choice(workers), signal.SIGKILL)
            elif fault == "freeze-node":
                victim = rng.choice(live)
                victim.signal(signal.SIGSTOP)
                wait_until(lambda: cluster.node_count() == len(live) - 1, 30)
                recovery["node frozen: detected after s"].append(time.monotonic() - start)
                victim.signal(signal.SIGCONT)
                wait_until(lambda: cluster.node_count() == len(live), 30)
            else:
                port = cluster.port
                cluster.server.signal(signal.SIGKILL)
                cluster.server.popen.wait(10)
                cluster.start_server(port=port, ACHILLES_HEARTBEAT_TIMEOUT="2")
                wait_until(lambda: cluster.node_count() == len(live), 60)
                recovery["server restarted: nodes back after s"].append(time.monotonic() - start)
            for t in threads:
                t.join(120)
            stats["hangs"] += sum(t.is_alive() for t in threads)
            stats["errors"] += len(errors)
            expected = [x * x for x in range(N)]
            for kind, out in outputs.items():
                got = collections.Counter(out)
                stats["lost"] += sum((collections.Counter(expected) - got).values())
                stats["duplicated"] += sum((got - collections.Counter(expected)).values())
                stats["wrong order"] += kind != "unordered" and out != expected
                stats["jobs completed"] += 1
            stats["done_before"] = sum(n["done"] for n in cluster.status()["nodes"])
            print(
                f"round {round_no + 1}: {fault}, chunksize {cs}, "
                f"{len(outputs)} jobs complete, errors {errors or 0}"
            )
    summary = {
        "seed": SEED,
        "rounds": ROUNDS,
        "faults": dict(faults),
        "jobs completed": stats["jobs completed"],
        "results lost": stats["lost"],
        "results duplicated": stats["duplicated"],
        "hangs": stats["hangs"],
        "errors": stats["errors"],
        "wrong order": stats["wrong order"],
        "recovery (median s)": {k: round(sorted(v)[len(v) // 2], 2) for k, v in recovery.items()},
    }
    print(json.dumps(summary, indent=2))
    assert (
        stats["lost"],
        stats["duplicated"],
        stats["hangs"],
        stats["errors"],
        stats["wrong order"],
    ) == (0, 0, 0, 0, 0)
    assert stats["jobs completed"] == 3 * ROUNDS
