"""The report's rows and targets for W8, W9 and the soak (round 2 of
docs/benchmarks.md), and the round-2 targets of the hot path (W4, W5, S)."""

from __future__ import annotations

from typing import Any

W8_FIGS = [
    ("chunks_per_s", "", "chunks/s"),
    ("server_us_per_chunk", " server CPU", "us/chunk"),
    ("server_rss_mib", " server RSS", "MiB"),
    ("idle_cpu_pct", " idle server CPU", "% core"),
]
W9_FIGS = [
    ("w2_cs1_eff", "W2 cs=1 efficiency", ""),
    ("w2_default_eff", "W2 default efficiency", ""),
    ("w2_cs1_cpu_eff", "W2 cs=1 eff. (tasks' CPU)", ""),
    ("w2_default_cpu_eff", "W2 default eff. (tasks' CPU)", ""),
    ("w1_default_s", "W1 default", "s"),
    ("w1_cs10000_s", "W1 cs=10000", "s"),
]
SOAK_FIGS: list[tuple[str, str, str, bool]] = [
    ("soak.server_rss_growth_mib", "soak server RSS growth after warm-up", "MiB", False),
    ("soak.nodes_rss_growth_mib", "soak nodes' RSS growth after warm-up", "MiB", False),
    ("soak.daemons_rss_growth_mib", "soak ... node processes alone", "MiB", False),
    ("soak.server_fds_delta", "soak server open fds, end - start", "", False),
    ("soak.nodes_fds_delta", "soak nodes' open fds, end - start", "", False),
    ("soak.daemons_fds_delta", "soak ... node processes alone", "", False),
    ("soak.first_block_s", "soak first block after warm-up", "s", False),
    ("soak.last_block_s", "soak last block", "s", False),
    ("soak.slowdown", "soak last / first block", "x", False),
]


def rows(params: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The table's rows for W8, W9 and the soak."""
    out = []
    for n in params.get("w8_nodes", []):
        for key, what, unit in W8_FIGS:
            out.append(
                (f"W8.{n}.{key}", f"W8 {n} sim. node{'s' if n > 1 else ''}{what}", unit, False)
            )
    for d in ["direct"] + [f"{d:g}" for d in params.get("w9_delays_ms", [])]:
        for key, what, unit in W9_FIGS:
            where = "direct" if d == "direct" else f"relay +{d} ms"
            out.append((f"W9.{d}.{key}", f"W9 {where}: {what}", unit, False))
    return out + SOAK_FIGS


def case_of(key: str) -> str | None:
    """The case that produces a W8/W9/soak figure (None for other workloads)."""
    parts = key.split(".")
    if parts[0] == "W8":
        return f"{parts[1]}nodes"
    if parts[0] == "W9":
        return "interleaved"
    if parts[0] == "soak":
        return "soak"
    return None


def _median(run: dict[str, Any], key: str) -> float | None:
    fig = run["figures"].get(key) or {}
    return fig.get("median")


def _entry(label: str, system: str, value: float | None, ok: bool | None) -> dict[str, Any]:
    verdict = "no figure" if ok is None else "target" if ok else "MISSED"
    return {"target": label, "system": system, "value": value, "verdict": verdict}


def targets(runs: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Round 2's targets, judged (``target`` or ``MISSED``: these have no stretch)."""
    out: list[dict[str, Any]] = []
    for run in runs:
        s, w = run["system"], run["workload"]
        if not s.startswith("achilles"):
            continue
        if w == "W8":
            out += _w8(run, params)
        elif w == "W9":
            out += _w9(run, params)
        elif w == "soak":
            out += _soak(run)
        elif w == "W4":
            p50 = _median(run, "W4.p50_us")
            limit = 500 if s == "achilles-local" else 1000
            out.append(
                _entry(
                    f"round 2: W4 p50 <= {limit} us", s, p50, None if p50 is None else p50 <= limit
                )
            )
        elif w == "W5":
            r = (run["figures"].get("W5.s") or {}).get("ratio_vs_mp")
            out.append(_entry("round 2: W5 <= 1.3x mp", s, r, None if r is None else r <= 1.3))
        elif w == "S" and s == "achilles-local":
            v = _median(run, "S.s")
            out.append(
                _entry("round 2: S embedded <= 0.3 s", s, v, None if v is None else v <= 0.3)
            )
    return out


def _w8(run: dict[str, Any], params: dict[str, Any]) -> list[dict[str, Any]]:
    s = run["system"]
    ns = [n for n in params["w8_nodes"] if _median(run, f"W8.{n}.server_us_per_chunk") is not None]
    if not ns:
        return [_entry("W8: server CPU <= 25 us/chunk", s, None, None)]
    us = [_median(run, f"W8.{n}.server_us_per_chunk") or 0.0 for n in ns]
    top = max(ns)
    spread = max(us) / max(min(us), 1e-9)
    idle = _median(run, f"W8.{top}.idle_cpu_pct")
    rss = _median(run, f"W8.{top}.server_rss_mib")
    return [
        _entry(
            f"W8: server CPU <= 25 us/chunk at N={','.join(map(str, ns))} (worst)",
            s,
            max(us),
            max(us) <= 25,
        ),
        _entry(
            f"W8: CPU per chunk flat, max/min <= 1.2 (N {min(ns)}..{top})", s, spread, spread <= 1.2
        ),
        _entry(
            f"W8: idle server CPU < 2 % of a core at N={top}",
            s,
            idle,
            None if idle is None else idle < 2,
        ),
        _entry(
            f"W8: server RSS <= 150 MiB at N={top}", s, rss, None if rss is None else rss <= 150
        ),
    ]


def _w9(run: dict[str, Any], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Each W9 target against two baselines: the relay adding 0 ms (the delay alone)
    and the direct connection (the delay and the relay's own cost)."""
    s, out = run["system"], []
    checks = [
        ("w2_cs1_eff", "10", "efficiency at +10 ms >= 0.95x", lambda r: r >= 0.95),
        ("w2_default_eff", "10", "efficiency at +10 ms >= 0.95x", lambda r: r >= 0.95),
        ("w2_cs1_cpu_eff", "10", "efficiency at +10 ms >= 0.95x", lambda r: r >= 0.95),
        ("w2_default_cpu_eff", "10", "efficiency at +10 ms >= 0.95x", lambda r: r >= 0.95),
        ("w1_default_s", "2", "time at +2 ms <= 1.5x", lambda r: r <= 1.5),
        ("w1_cs10000_s", "2", "time at +2 ms <= 1.5x", lambda r: r <= 1.5),
    ]
    for key, delay, what, ok in checks:
        for base_case, base_name in (("0", "relay +0 ms"), ("direct", "direct")):
            base, far = _median(run, f"W9.{base_case}.{key}"), _median(run, f"W9.{delay}.{key}")
            r = far / base if base and far else None
            label = f"W9: {key.rsplit('_', 1)[0]} {what} {base_name}"
            out.append(_entry(label, s, r, None if r is None else ok(r)))
    return out


def _soak(run: dict[str, Any]) -> list[dict[str, Any]]:
    s = run["system"]
    checks = [
        ("soak.server_rss_growth_mib", "soak: server RSS growth < 5 MiB after warm-up", 5.0),
        ("soak.nodes_rss_growth_mib", "soak: nodes' RSS growth < 5 MiB after warm-up", 5.0),
        ("soak.daemons_rss_growth_mib", "soak: node processes' RSS growth < 5 MiB", 5.0),
        ("soak.server_fds_delta", "soak: server fds back to baseline (delta <= 0)", 0.0),
        ("soak.nodes_fds_delta", "soak: nodes' fds back to baseline (delta <= 0)", 0.0),
        ("soak.daemons_fds_delta", "soak: node processes' fds back to baseline", 0.0),
        ("soak.slowdown", "soak: last block <= 1.2x the first after warm-up", 1.2),
    ]
    out = []
    for key, label, limit in checks:
        v = _median(run, key)
        ok = None if v is None else (v < limit if "growth" in key else v <= limit)
        out.append(_entry(label, s, v, ok))
    return out
