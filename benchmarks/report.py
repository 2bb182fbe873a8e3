"""The benchmarks' report: the table of figures with their ratios to mp, memory and
outside load, the targets of the benchmark specification with their verdicts, and the
JSON document of the whole run."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from typing import Any

from benchmarks import scale_report
from benchmarks.procfs import meminfo_kib
from benchmarks.systems import PROCESSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
OTHER_LOAD_WARN = 0.3  # cores used by other processes during a child: flagged in the notes

# (key, label, unit, ratio against mp?)
FIGURES: list[tuple[str, str, str, bool]] = [
    ("S.s", "S  start-up to first result", "s", True),
    ("S.cluster_s", "S  CLI server + 2 nodes registered", "s", False),
    ("W1.default.s", "W1 default chunking", "s", True),
    ("W1.default.items_per_s", "W1 default chunking", "items/s", True),
    ("W1.cs10000.s", "W1 chunksize=10000", "s", True),
    ("W1.cs10000.items_per_s", "W1 chunksize=10000", "items/s", True),
    ("W2.cs1.s", "W2 chunksize=1", "s", True),
    ("W2.cs1.eff", "W2 chunksize=1 efficiency", "", True),
    ("W2.default.s", "W2 default chunking", "s", True),
    ("W2.default.eff", "W2 default efficiency", "", True),
    ("W3.len.mib_s", "W3 len", "MiB/s", True),
    ("W3.echo.mib_s", "W3 echo", "MiB/s", True),
    ("W4.p50_us", "W4 apply latency p50", "us", True),
    ("W4.p90_us", "W4 apply latency p90", "us", True),
    ("W5.s", "W5 imap wall", "s", True),
    ("W5.first_s", "W5 time to first result", "s", True),
    ("W5.peak_rss_mib", "W5 caller peak RSS", "MiB", True),
    ("W5.rss_growth_mib", "W5 caller RSS growth", "MiB", True),
    ("W5.pulled_frac", "W5 input pulled at 1st result", "frac", False),
]
W6_FIGS = [
    ("chunks_per_s", "", "chunks/s"),
    ("server_us_per_chunk", " server CPU (stat)", "us/chunk"),
    ("server_us_per_chunk_sched", " server CPU (schedstat)", "us/chunk"),
]
W7_FIGS: list[tuple[str, str, str, bool]] = [
    ("W7.undisturbed_s", "W7 W2 cs=1 via imap_unordered", "s", False),
    ("W7.killed_s", "W7 same, 1 of 2 nodes killed at 50%", "s", False),
    ("W7.kill_at_s", "W7 ... the kill happened at", "s", False),
    ("W7.ratio", "W7 killed / undisturbed (ideal 1.5)", "x", False),
]


def fmt(v: float | None, unit: str = "") -> str:
    """A figure with a precision that suits its size ("-" for none or NaN)."""
    if v is None or v != v:
        return "-"
    if unit == "frac":
        return f"{v:.2f}"
    a = abs(v)
    if a >= 10_000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def figure_rows(params: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Every row of the table, W6 with one group per node count."""
    rows = list(FIGURES)
    for n in params["w6_nodes"]:
        for key, what, unit in W6_FIGS:
            rows.append((f"W6.{n}.{key}", f"W6 {n} node{'s' if n > 1 else ''}{what}", unit, False))
    return rows + W7_FIGS + scale_report.rows(params)


def add_ratios(runs: list[dict[str, Any]], params: dict[str, Any]) -> None:
    """Each figure's ratio to mp's median in this run, and its label and unit."""
    meta = {key: (label, unit) for key, label, unit, _ in figure_rows(params)}
    base = {r["workload"]: r for r in runs if r["system"] == "mp"}
    for run in runs:
        ref = base.get(run["workload"])
        for key, fig in run["figures"].items():
            fig["label"], fig["unit"] = meta.get(key, (key, ""))
            mp = ref["figures"].get(key, {}).get("median") if ref else None
            fig["ratio_vs_mp"] = (fig["median"] / mp) if mp and fig["median"] is not None else None


def render_table(runs: list[dict[str, Any]], systems: list[str], params: dict[str, Any]) -> str:
    """The figures, one row each, one column per system; rows with nothing are left out."""
    by = {(r["system"], r["workload"]): r for r in runs}
    header = ["figure", "unit", *systems]
    lines = []
    for key, label, unit, with_ratio in figure_rows(params):
        workload = key.split(".")[0]
        cells, any_value = [], False
        for s in systems:
            cell, has_value = _cell(by.get((s, workload)), s, key, unit, with_ratio)
            cells.append(cell)
            any_value = any_value or has_value
        if any_value:
            lines.append([label, unit if unit != "frac" else "", *cells])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    for row in lines:
        out.append(
            "  ".join(
                [
                    row[0].ljust(widths[0]),
                    row[1].ljust(widths[1]),
                    *(c.rjust(w) for c, w in zip(row[2:], widths[2:])),
                ]
            )
        )
    return "\n".join(out)


def _cell(
    run: dict[str, Any] | None, system: str, key: str, unit: str, with_ratio: bool
) -> tuple[str, bool]:
    """One system's cell of a figure's row, and whether it shows anything."""
    if run is None:
        return "", False
    fig = run["figures"].get(key)
    err = (
        run["errors"].get(_case_of(key))
        or run["errors"].get("setup")
        or (run["errors"].get("crash") if fig is None else None)
    )
    if fig is None or fig.get("median") is None:
        if not err:
            return "", False
        return ("TIMEOUT" if str(err).startswith("timeout") else "ERROR"), True
    cell = fmt(fig["median"], unit)
    if with_ratio and system != "mp" and fig.get("ratio_vs_mp") is not None:
        cell += f" ({fig['ratio_vs_mp']:.2f}x)"
    if err:
        cell += " !"
    return cell, True


def _case_of(key: str) -> str:
    """The case that produces a figure (to find its error)."""
    parts = key.split(".")
    w = parts[0]
    scaled = scale_report.case_of(key)
    if scaled is not None:
        return scaled
    if w in ("W1", "W2", "W3"):
        return parts[1]
    if w == "W6":
        return f"{parts[1]}nodes"
    return {"S": "startup", "W4": "apply", "W5": "imap", "W7": "kill"}[w]


def render_memory(runs: list[dict[str, Any]], systems: list[str]) -> str:
    """Peak RSS of the caller and of the worker side, per run."""
    lines = [
        "memory at the end of each workload, MiB: caller peak RSS | worker side "
        "peak RSS (sum of VmHWM over the processes doing the work)"
    ]
    for run in runs:
        if run["system"] not in systems or not run["memory"]:
            continue
        mem = run["memory"]
        parts = []
        if "caller" in mem:
            parts.append(f"caller {fmt(mem['caller']['peak_mib'])}")
        for name, m in mem.items():
            if name != "caller" and isinstance(m, dict) and "peak_mib" in m:
                parts.append(
                    f"{name} {fmt(m['peak_mib'])} ({m['procs']} procs, now {fmt(m['rss_mib'])})"
                )
        lines.append(f"  {run['workload']:<3} {run['system']:<15} " + "; ".join(parts))
    return "\n".join(lines)


def render_load(runs: list[dict[str, Any]], systems: list[str]) -> str:
    """Cores used by other processes while each child ran (see README)."""
    by = {(r["system"], r["workload"]): r for r in runs}
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    width = max(len(s) for s in systems)
    lines = [
        "outside load: cores used by other processes while each child ran "
        f"(> {OTHER_LOAD_WARN} makes its figures unreliable)",
        "  " + " " * (width + 2) + "  ".join(w.rjust(5) for w in workloads),
    ]
    for s in systems:
        cells = [f"{by[(s, w)]['other_load_cores']:.2f}" if (s, w) in by else "" for w in workloads]
        lines.append(f"  {s:<{width}}  " + "  ".join(c.rjust(5) for c in cells))
    return "\n".join(lines)


# (label, key, kind, target, stretch, systems or None)
TARGETS: list[tuple[str, str, str, float, float, set[str] | None]] = [
    ("W1 default: time <= 2.0x mp (stretch 1.3x)", "W1.default.s", "ratio_le", 2.0, 1.3, None),
    ("W1 cs=10000: time <= 2.0x mp (1.3x)", "W1.cs10000.s", "ratio_le", 2.0, 1.3, None),
    ("W2 cs=1: efficiency >= 0.90x mp (0.97x)", "W2.cs1.eff", "ratio_ge", 0.90, 0.97, None),
    ("W2 default: efficiency >= 0.90x mp (0.97x)", "W2.default.eff", "ratio_ge", 0.90, 0.97, None),
    ("W3 len: MiB/s >= 0.5x mp (0.8x)", "W3.len.mib_s", "ratio_ge", 0.5, 0.8, None),
    ("W3 echo: MiB/s >= 0.5x mp (0.8x)", "W3.echo.mib_s", "ratio_ge", 0.5, 0.8, None),
    ("W4 p50 <= 1000 us (500 us)", "W4.p50_us", "le", 1000, 500, None),
    ("W5: time <= 2.0x mp (1.3x)", "W5.s", "ratio_le", 2.0, 1.3, None),
    ("W5: caller RSS growth <= 30 MiB", "W5.rss_growth_mib", "le", 30, 30, None),
    ("S embedded cluster <= 1.5 s (0.5 s)", "S.s", "le", 1.5, 0.5, {"achilles-local"}),
    (
        "W6: server CPU <= 50 us/chunk at every node count (20)",
        "W6.*.server_us_per_chunk",
        "le",
        50,
        20,
        {"achilles-cli"},
    ),
    ("W7: killed <= 1.5x undisturbed (1.25x)", "W7.ratio", "le", 1.5, 1.25, {"achilles-cli"}),
]


def evaluate_targets(runs: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS` judged on every achilles run it applies to."""
    out = []
    for label, key, kind, target, stretch, only in TARGETS:
        for run in runs:
            if not run["system"].startswith("achilles") or (only and run["system"] not in only):
                continue
            if key.split(".")[0] != run["workload"]:
                continue
            value, label_x = _target_value(run, label, key, kind, params)
            out.append(
                {
                    "target": label_x,
                    "system": run["system"],
                    "value": value,
                    "verdict": _verdict(value, kind, target, stretch),
                }
            )
    return out + scale_report.targets(runs, params)


def _target_value(
    run: dict[str, Any], label: str, key: str, kind: str, params: dict[str, Any]
) -> tuple[float | None, str]:
    """The value a target is judged on, and its label (W6: the worst node count, with
    the spread max/min)."""
    if "*" not in key:
        fig = run["figures"].get(key) or {}
        return (fig.get("ratio_vs_mp") if kind.startswith("ratio") else fig.get("median")), label
    figs = [run["figures"].get(key.replace("*", str(n))) for n in params["w6_nodes"]]
    vals = [f["median"] for f in figs if f and f.get("median") is not None]
    if not vals:
        return None, label
    return max(vals), f"{label}; spread max/min {max(vals) / max(min(vals), 1e-9):.2f}"


def _verdict(value: float | None, kind: str, target: float, stretch: float) -> str:
    """``stretch``, ``target`` or ``MISSED`` (``no figure`` without a value)."""
    if value is None:
        return "no figure"
    v = value

    def meets(limit: float) -> bool:
        return v <= limit if kind.endswith("le") else v >= limit

    return "stretch" if meets(stretch) else "target" if meets(target) else "MISSED"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (machine, Python, achilles, git)."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "python_full": sys.version,
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = models[0] if models else None
        info["mem_total_mib"] = round(meminfo_kib("MemTotal") / 1024)
    except OSError:
        pass
    try:
        import achilles

        info["achilles_version"] = achilles.__version__
    except Exception:  # achilles not importable: the rest still describes the machine
        pass
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "achilles"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["git_head"] = head
        info["achilles_tree_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def tree_digest(path: str) -> str:
    """A digest of every .py file under ``path``: did achilles change during the run?"""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                h.update(full.encode())
                try:
                    with open(full, "rb") as f:
                        h.update(f.read())
                except OSError:
                    pass
    return h.hexdigest()[:16]


def summary(
    runs: list[dict[str, Any]],
    shown: list[str],
    params: dict[str, Any],
    calib: dict[str, Any],
    quick: bool,
    started: datetime.datetime,
    targets: list[dict[str, Any]],
    notes: list[str],
) -> str:
    """The printed report: heading, table, memory, outside load, targets, failures, notes."""
    lines = [
        f"achilles benchmarks, {started:%Y-%m-%d %H:%M %Z}, "
        f"{'quick' if quick else 'full'} run: median of {params['reps']} "
        f"(S: {params['reps']} fresh processes), {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; (x) = ratio to mp in this run"
    ]
    if calib:
        lines.append(
            f"W2: {params['w2_tasks']} tasks of {calib['w2_task_ms_measured']:.1f} ms "
            f"of CPU (median batch {calib['w2_task_ms_median']:.1f} ms), "
            f"serially {calib['w2_serial_s']:.2f} s; efficiency = "
            f"({calib['w2_serial_s']:.2f} s / {PROCESSES}) / wall"
        )
    lines += [
        "",
        render_table(runs, shown, params),
        "",
        render_memory(runs, shown),
        "",
        render_load(runs, shown),
    ]
    if targets:
        lines += ["", "targets (docs/benchmarks.md): stretch / target = met, MISSED = not met"]
        for t in targets:
            v = "-" if t["value"] is None else fmt(t["value"])
            lines.append(f"  {t['verdict']:<9} {t['system']:<15} {t['target']}: {v}")
    failed = failures(runs)
    if failed:
        lines += ["", "failures:"]
        for s, w, k, v in failed:
            lines.append(f"  {w} {s} [{k}]: {str(v).splitlines()[0]}")
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def failures(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, Any]]:
    """(system, workload, case, error) of every figure that failed."""
    return [(r["system"], r["workload"], k, v) for r in runs for k, v in r["errors"].items()]


def run_notes(
    runs: list[dict[str, Any]], skipped: list[str], digests: tuple[str, str]
) -> list[str]:
    """Skipped systems, the children's notes, outside load, and sources changed meanwhile."""
    notes = skipped + [f"{r['workload']} {r['system']}: {n}" for r in runs for n in r["notes"]]
    loaded = [
        f"{r['workload']} {r['system']} {r['other_load_cores']:.2f}"
        for r in runs
        if r["other_load_cores"] > OTHER_LOAD_WARN
    ]
    if loaded:
        notes.append(
            f"measured while other processes used more than {OTHER_LOAD_WARN} "
            f"core on average (CPU not used by the benchmark's own processes): " + ", ".join(loaded)
        )
    if digests[1] != digests[0]:
        notes.append(
            "the achilles/ sources changed during this run: the figures mix "
            "versions (each child imports achilles afresh)"
        )
    return notes


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write the run's JSON document (every repetition, the machine, the table)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
