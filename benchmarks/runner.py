"""The benchmark runner: ``python -m benchmarks [--quick] [--only W1,W4] [--systems ...]``.

The parent process (``main``) calibrates W2, then runs every (system, workload) pair in
a fresh child process (``python -m benchmarks --child SPEC``, see :mod:`benchmarks.cases`)
with a time limit, reads the child's figures from a JSON file the child rewrites after
every case (so a child killed at its time limit still reports what it finished), prints
a table with ratios against ``multiprocessing.Pool(2)`` measured in the same run
(:mod:`benchmarks.report`), and writes everything to
``benchmarks/results/<timestamp>.json``.

Every process started here (children, CLI servers and nodes) runs in its own session,
with an environment in which nothing of achilles is configured (no ``ACHILLES_*``
variable, no user ``.env``: :func:`achilles.testing.isolated_env`), and is stopped by
PID: SIGTERM to it, then SIGKILL to its process group. A child writes the PID of every
session it starts to a file its parent reads, so nothing survives a child killed at its
time limit.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from achilles.testing import isolated_env, stop_process
from benchmarks.cases import child_main
from benchmarks.procfs import TreeCpu, children_cpu, cpu_busy
from benchmarks.report import (
    RESULTS_DIR,
    ROOT,
    add_ratios,
    evaluate_targets,
    failures,
    machine_info,
    run_notes,
    summary,
    tree_digest,
    write_json,
)
from benchmarks.systems import PEERS, PROCESSES, SYSTEM_CLASSES

SYSTEMS = ["mp", "achilles-local", "achilles-cli"]
WORKLOADS = ["S", "W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9"]
#: run only when asked for (``--soak`` or ``--only soak``): minutes
ON_REQUEST = ["soak"]
ONLY_ON = {w: {"achilles-cli"} for w in ("W6", "W7", "W8", "W9", "soak")}

FULL = dict(
    reps=3,
    timeout=300.0,
    w1_items=1_000_000,
    w2_tasks=400,
    w2_task_ms=10.0,
    w3_args=64,
    w3_mib=4,
    w4_calls=300,
    w5_items=2_000_000,
    w5_chunksize=10_000,
    w6_nodes=[1, 2, 4, 8],
    w6_chunks=2000,
    w7_tasks=400,
    w8_nodes=[1, 10, 100, 1000],
    w8_chunks=20000,
    w8_idle_s=10.0,
    w9_delays_ms=[0, 0.5, 2, 10],
    soak_jobs=10_000,
    soak_every=500,
    soak_kill_every=250,
    soak_warmup=1000,
)
QUICK = dict(
    reps=1,
    timeout=60.0,
    w1_items=200_000,
    w2_tasks=100,
    w2_task_ms=10.0,
    w3_args=16,
    w3_mib=4,
    w4_calls=50,
    w5_items=200_000,
    w5_chunksize=10_000,
    w6_nodes=[1, 2],
    w6_chunks=200,
    w7_tasks=100,
    w8_nodes=[1, 10, 100],
    w8_chunks=2000,
    w8_idle_s=5.0,
    w9_delays_ms=[0, 2, 10],
    soak_jobs=1000,
    soak_every=100,
    soak_kill_every=100,
    soak_warmup=200,
)


def cases_of(workload: str, params: dict[str, Any]) -> list[str]:
    """The cases of a workload, in the order a child runs them."""
    return {
        "S": ["startup"],
        "W1": ["default", "cs10000"],
        "W2": ["cs1", "default"],
        "W3": ["len", "echo"],
        "W4": ["apply"],
        "W5": ["imap"],
        "W6": [f"{n}nodes" for n in params["w6_nodes"]],
        "W7": ["kill"],
        "W8": [f"{n}nodes" for n in params["w8_nodes"]],
        "W9": ["interleaved"],
        "soak": ["soak"],
    }[workload]


def calibrate(params: dict[str, Any]) -> dict[str, Any]:
    """Iterations for a task of ~w2_task_ms, and the serial time of all W2 tasks.

    The serial time is measured once, in batches of 10 tasks, as CPU time
    (``process_time``), and taken as the number of tasks times the fastest batch's time
    per task: the single-core speed with the least interference from other load (the
    machines are shared), so that load during calibration does not make the tasks
    shorter than intended or push efficiencies above 1. The wall time of the whole
    serial pass is kept in the JSON too.
    """
    from benchmarks.workloads import burn, calibrate_burn

    iters = calibrate_burn(params["w2_task_ms"] / 1000)
    checksum = burn((0, iters))[1]
    n = params["w2_tasks"]
    per_task = []
    t_all = time.perf_counter()
    for start in range(0, n, 10):
        batch = range(start, min(n, start + 10))
        t0 = time.process_time()
        for i in batch:
            burn((i, iters))
        per_task.append((time.process_time() - t0) / len(batch))
    elapsed = time.perf_counter() - t_all
    serial = min(per_task) * n
    return {
        "w2_iters": iters,
        "w2_checksum": checksum,
        "w2_serial_s": serial,
        "w2_serial_wall_s": elapsed,
        "w2_task_ms_measured": serial / n * 1000,
        "w2_task_ms_median": statistics.median(per_task) * 1000,
    }


def _tail(path: str, n: int = 2500) -> str:
    """The last n characters of a log file ("" if unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _write_spec(
    system: str, workload: str, params: dict[str, Any], skip: list[str]
) -> dict[str, Any]:
    """A fresh work directory with the child's spec file (and an empty cwd: no .env)."""
    workdir = tempfile.mkdtemp(prefix=f"achilles-bench-{system}-{workload}-")
    os.makedirs(os.path.join(workdir, "cwd"))
    spec = {
        "system": system,
        "workload": workload,
        "params": params,
        "skip": skip,
        "out": os.path.join(workdir, "out.json"),
        "pidfile": os.path.join(workdir, "sessions"),
        "workdir": workdir,
    }
    with open(os.path.join(workdir, "spec.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return spec


def _child_env() -> dict[str, str]:
    """Nothing of achilles configured, and the repository importable."""
    return isolated_env(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    )


def _watch_child(
    spec: dict[str, Any], timeout: float, merged: dict[str, Any]
) -> tuple[bool, int | None]:
    """Run the child to its end or its time limit, then stop its session.

    Adds its wall time, its CPU time and the CPU time the rest of the machine used
    meanwhile to ``merged``. Returns (timed out, exit code).
    """
    workdir = spec["workdir"]
    t0 = time.perf_counter()
    busy0, steal0 = cpu_busy()
    own0 = children_cpu()
    with open(os.path.join(workdir, "child.log"), "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", "--child", os.path.join(workdir, "spec.json")],
            cwd=os.path.join(workdir, "cwd"),
            env=_child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    tree = TreeCpu(child.pid)
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        tree.sample()
        try:
            child.wait(0.25)  # the sampling interval of a deadline wait
        except subprocess.TimeoutExpired:
            pass
    timed_out = child.poll() is None
    stop_process(child.pid, popen=child)
    wall = time.perf_counter() - t0
    busy1, steal1 = cpu_busy()
    merged["child_wall_s"] += wall
    own = max(children_cpu() - own0, tree.total())
    merged["own_cpu_s"] = merged.get("own_cpu_s", 0.0) + own
    merged["other_cpu_s"] = merged.get("other_cpu_s", 0.0) + max(0.0, (busy1 - busy0) - own)
    merged["steal_s"] = merged.get("steal_s", 0.0) + steal1 - steal0
    return timed_out, child.returncode


def _stop_sessions(spec: dict[str, Any], timed_out: bool, merged: dict[str, Any]) -> None:
    """Stop every session the child started; note those a finished child left behind."""
    try:
        with open(spec["pidfile"], encoding="ascii") as f:
            sessions = [int(x) for x in f.read().split()]
    except OSError:
        sessions = []
    leaked = [pid for pid in sessions if stop_process(pid) and not timed_out]
    if leaked:
        merged["notes"].append(
            f"sessions still alive after the child exited (stopped by the runner): {leaked}"
        )


def _merge_output(spec: dict[str, Any], merged: dict[str, Any]) -> dict[str, Any]:
    """Add what the child recorded to ``merged``; return the child's record."""
    try:
        with open(spec["out"], encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {
            "figures": {},
            "errors": {},
            "memory": {},
            "notes": [],
            "done": [],
            "current": None,
            "finished": False,
        }
    for key, fig in data["figures"].items():
        merged["figures"].setdefault(key, {"reps": []})["reps"].extend(fig["reps"])
    merged["errors"].update(data["errors"])
    merged["memory"].update(data["memory"])
    merged["notes"].extend(data["notes"])
    merged["teardown_s"] = data.get("teardown_s")
    if "soak" in data:
        merged["soak"] = data["soak"]
    return data


def _judge(
    spec: dict[str, Any],
    data: dict[str, Any],
    timed_out: bool,
    code: int | None,
    timeout: float,
    cases: list[str],
    skip: list[str],
    merged: dict[str, Any],
) -> list[str] | None:
    """Record a timeout or a crash; return the cases to skip in a fresh child when the
    child hung in a case and some remain, else None."""
    log = os.path.join(spec["workdir"], "child.log")
    done = list(data.get("done", []))
    if timed_out:
        current = data.get("current") or ("setup" if not done else "between cases")
        merged["errors"][current] = (
            f"timeout: the child was still in {current!r} after {timeout:g} s and was killed"
        )
        merged["log_tail"] = _tail(log)
        skip = skip + done + ([current] if current in cases else [])
        if current in cases and any(c not in skip for c in cases):
            return skip  # a fresh child for the cases after the one that hung
    elif not data.get("finished"):
        merged["errors"]["crash"] = f"the child exited with code {code} before finishing"
        merged["log_tail"] = _tail(log)
    elif merged["errors"]:
        merged["log_tail"] = _tail(log)
    return None


def run_child(
    system: str, workload: str, params: dict[str, Any], timeout: float, reps: int | None = None
) -> dict[str, Any]:
    """Run one (system, workload) in fresh children until every case is done or failed."""
    params = dict(params, reps=reps or params["reps"])
    cases = cases_of(workload, params)
    merged: dict[str, Any] = {
        "system": system,
        "workload": workload,
        "figures": {},
        "errors": {},
        "memory": {},
        "notes": [],
        "attempts": 0,
        "child_wall_s": 0.0,
    }
    skip: list[str] | None = []
    while skip is not None:
        merged["attempts"] += 1
        spec = _write_spec(system, workload, params, skip)
        timed_out, code = _watch_child(spec, timeout, merged)
        _stop_sessions(spec, timed_out, merged)
        data = _merge_output(spec, merged)
        skip = _judge(spec, data, timed_out, code, timeout, cases, skip, merged)
        shutil.rmtree(spec["workdir"], ignore_errors=True)
    merged["other_load_cores"] = merged["other_cpu_s"] / max(merged["child_wall_s"], 1e-9)
    for fig in merged["figures"].values():
        fig["median"] = statistics.median(fig["reps"]) if fig["reps"] else None
    merged["status"] = (
        "timeout"
        if any(str(e).startswith("timeout") for e in merged["errors"].values())
        else "error"
        if merged["errors"]
        else "ok"
    )
    return merged


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of python -m benchmarks."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "achilles benchmark suite: workloads S, W1-W9 and the soak of docs/benchmarks.md, each "
            "system in a "
            "fresh child process, figures with ratios against multiprocessing.Pool(2)."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one repetition, smaller sizes (see README): under two minutes",
    )
    p.add_argument("--only", help=f"comma-separated workloads ({','.join(WORKLOADS + ON_REQUEST)})")
    p.add_argument(
        "--systems", help=f"comma-separated systems ({','.join(SYSTEMS)}, {','.join(PEERS)})"
    )
    p.add_argument(
        "--peers", action="store_true", help="also run loky, ray and dask where importable"
    )
    p.add_argument("--reps", type=int, help="repetitions per figure (default 3, quick 1)")
    p.add_argument(
        "--timeout", type=float, help="time limit of each child process, s (default 300, quick 60)"
    )
    p.add_argument("--w5-items", type=int, help="W5 input size (default 2000000)")
    p.add_argument(
        "--w8-nodes", help="W8 node counts, comma-separated (default 1,10,100,1000; quick 1,10,100)"
    )
    p.add_argument(
        "--soak", action="store_true", help="add the soak (10,000 jobs: minutes; quick 1,000)"
    )
    p.add_argument("--soak-jobs", type=int, help="jobs in the soak (default 10000)")
    p.add_argument("--w9-delays", help="W9 one-way delays, ms (default 0,0.5,2,10)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<timestamp>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The sizes of this run: full or quick, with the options that override them."""
    params: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.reps:
        params["reps"] = args.reps
    if args.timeout:
        params["timeout"] = args.timeout
    if args.w5_items:
        params["w5_items"] = args.w5_items
    if args.w8_nodes:
        params["w8_nodes"] = [int(n) for n in args.w8_nodes.split(",")]
    if args.w9_delays:
        params["w9_delays_ms"] = [float(d) for d in args.w9_delays.split(",")]
    if args.soak_jobs:
        params["soak_jobs"] = args.soak_jobs
        params["soak_every"] = max(1, min(params["soak_every"], args.soak_jobs // 10))
        params["soak_warmup"] = min(params["soak_warmup"], args.soak_jobs // 5)
    return params


def _workloads(args: argparse.Namespace) -> list[str]:
    """The workloads asked for (``--only``), checked."""
    known = WORKLOADS + ON_REQUEST
    if args.only:
        workloads = [w.strip().upper() for w in args.only.split(",")]
        workloads = ["soak" if w == "SOAK" else w for w in workloads]
    else:
        workloads = WORKLOADS + (["soak"] if args.soak else [])
    for w in workloads:
        if w not in known:
            raise SystemExit(f"unknown workload {w!r}; choose from {','.join(known)}")
    return workloads


def _systems(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The systems to run (``--systems``, ``--peers``), and notes on peers not installed."""
    systems = list(SYSTEMS) if not args.systems else [s.strip() for s in args.systems.split(",")]
    if args.peers:
        systems += [p for p in PEERS if p not in systems]
    skipped = []
    for s in list(systems):
        if s not in SYSTEM_CLASSES:
            raise SystemExit(f"unknown system {s!r}; choose from {','.join(SYSTEM_CLASSES)}")
        missing = [m for m in PEERS.get(s, []) if importlib.util.find_spec(m) is None]
        if missing:
            systems.remove(s)
            skipped.append(f"{s}: not installed (no module {', '.join(missing)}); skipped")
    for note in skipped:
        print(f"note: {note}", file=sys.stderr)
    if "mp" not in systems:
        print("note: mp is not among the systems: no ratios", file=sys.stderr)
    return systems, skipped


def _calibrate_w2(params: dict[str, Any]) -> dict[str, Any]:
    """Calibrate W2's tasks (W2 and W7 use them) and add the result to ``params``."""
    print(
        f"calibrating W2: {params['w2_tasks']} tasks of ~{params['w2_task_ms']:g} ms ...",
        file=sys.stderr,
        flush=True,
    )
    calib = calibrate(params)
    params.update(calib)
    print(
        f"  {calib['w2_iters']} iterations per task, {params['w2_tasks']} tasks serially "
        f"{calib['w2_serial_s']:.2f} s (ideal on {PROCESSES} workers "
        f"{calib['w2_serial_s'] / PROCESSES:.2f} s)",
        file=sys.stderr,
        flush=True,
    )
    return calib


def _run_startup(system: str, params: dict[str, Any]) -> dict[str, Any]:
    """S: each start-up in a fresh process (no state carried over), merged into one run."""
    run: dict[str, Any] | None = None
    for _ in range(params["reps"]):
        one = run_child(system, "S", params, params["timeout"], reps=1)
        if run is None:
            run = one
            continue
        for key, fig in one["figures"].items():
            run["figures"].setdefault(key, {"reps": []})["reps"].extend(fig["reps"])
        run["errors"].update(one["errors"])
        run["notes"].extend(one["notes"])
        for k in ("child_wall_s", "own_cpu_s", "other_cpu_s", "steal_s"):
            run[k] += one[k]
        run["other_load_cores"] = run["other_cpu_s"] / max(run["child_wall_s"], 1e-9)
        run["attempts"] += one["attempts"]
        if one["status"] != "ok":
            run["status"] = one["status"]
            run["log_tail"] = one.get("log_tail")
    assert run is not None
    for fig in run["figures"].values():
        fig["median"] = statistics.median(fig["reps"]) if fig["reps"] else None
    return run


def run_plan(
    workloads: list[str], systems: list[str], params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every (workload, system) pair that applies, one after another, with progress."""
    plan = [(w, s) for w in workloads for s in systems if s in ONLY_ON.get(w, {s})]
    runs = []
    for i, (w, s) in enumerate(plan, 1):
        print(f"[{i:>2}/{len(plan)}] {w:<3} {s:<15}", end=" ", file=sys.stderr, flush=True)
        run = _run_startup(s, params) if w == "S" else run_child(s, w, params, params["timeout"])
        runs.append(run)
        errs = "; ".join(f"{k}: {str(v).splitlines()[0]}" for k, v in run["errors"].items())
        print(
            f"{run['status']:<7} {run['child_wall_s']:6.1f} s  other load "
            f"{run['other_load_cores']:.2f} cores" + (f"  {errs}" if errs else ""),
            file=sys.stderr,
            flush=True,
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or, with ``--child``, one child); 1 if any figure failed."""
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    params = _params(args)
    workloads = _workloads(args)
    systems, skipped = _systems(args)
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    digest_before = tree_digest(os.path.join(ROOT, "achilles"))
    calib = _calibrate_w2(params) if {"W2", "W7", "W9"} & set(workloads) else {}

    t_all = time.perf_counter()
    runs = run_plan(workloads, systems, params)
    add_ratios(runs, params)
    targets = evaluate_targets(runs, params)
    shown = [s for s in systems if any(r["system"] == s for r in runs)]
    digest_after = tree_digest(os.path.join(ROOT, "achilles"))
    table = summary(
        runs,
        shown,
        params,
        calib,
        args.quick,
        started,
        targets,
        run_notes(runs, skipped, (digest_before, digest_after)),
    )
    print(table)

    out = args.out or os.path.join(RESULTS_DIR, f"{started:%Y%m%d-%H%M%S}.json")
    write_json(
        out,
        {
            "date": started.isoformat(),
            "argv": sys.argv[1:] if argv is None else argv,
            "mode": "quick" if args.quick else "full",
            "params": params,
            "systems": shown,
            "workloads": workloads,
            "skipped": skipped,
            "machine": machine_info(),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "achilles_digest": {"before": digest_before, "after": digest_after},
            "total_wall_s": time.perf_counter() - t_all,
            "calibration": calib,
            "runs": runs,
            "targets": targets,
            "table": table,
        },
    )
    print(
        f"\nresults: {os.path.relpath(out, os.getcwd())}  "
        f"(total {time.perf_counter() - t_all:.0f} s)",
        file=sys.stderr,
    )
    return 1 if failures(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
