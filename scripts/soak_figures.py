"""The figures of a churn soak (scripts/soak.py), from what it recorded and what the nodes wrote.

Pure functions over plain data (no processes here): RSS slopes, the version check, restart timings, and the text
report. Kept apart from the process orchestration so each can be read (and tested) on its own.
"""

from __future__ import annotations

import bisect
import json
import re
import statistics
from pathlib import Path
from typing import Any, Iterable

# The learner's log lines that say which version a life starts at (node/learner.py).
RESUMED = re.compile(r"resumed from \S+ at step \d+, policy version (\d+)")
CONTINUING = re.compile(r"continuing at version (\d+)")


def slope_mb_per_min(samples: list[tuple[float, float]], skip_s: float = 60.0, min_span_s: float = 60.0
                     ) -> float | None:
    """Least-squares slope of (seconds, KiB) samples in MB/min, ignoring those before ``skip_s``; None when under
    ``min_span_s`` of samples remain."""
    pts = [(t, kib) for t, kib in samples if t >= skip_s]
    if len(pts) < 3 or pts[-1][0] - pts[0][0] < min_span_s:
        return None
    mt = statistics.fmean(t for t, _ in pts)
    mk = statistics.fmean(k for _, k in pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var == 0:
        return None
    cov = sum((t - mt) * (k - mk) for t, k in pts)
    return cov / var * 60.0 / 1024.0  # KiB/s -> MB/min (MiB, as /proc counts)


def rss_summary(lives: list[dict[str, Any]], skip_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """Per component (``learner``, ``learner/p2pd (libp2p daemon)``, ...): peak RSS, and the slope after the first
    ``skip_s`` s of work (from the life's first accepted group: start-up on a loaded machine can take longer than a
    minute) of the longest life and the median slope over all lives long enough to have one."""
    by_component: dict[str, list[tuple[float, list[tuple[float, float]]]]] = {}
    for life in lives:
        ready = life.get("first_accepted_s")
        if ready is None:  # never got to work: only its peak counts
            ready = float("inf")
        for component, samples in life["rss"].items():
            name = life["node"] if component == "main process" else f"{life['node']}/{component}"
            span = max(0.0, samples[-1][0] - ready) if samples else 0.0
            by_component.setdefault(name, []).append((span, [(t - ready, k) for t, k in samples]))
    out = {}
    for name, runs in sorted(by_component.items()):
        slopes = [(span, slope_mb_per_min(s, skip_s)) for span, s in runs]
        measured = [(span, s) for span, s in slopes if s is not None]
        longest = max(measured, default=None)
        out[name] = {
            "peak_mb": round(max((k for _, s in runs for _, k in s), default=0) / 1024, 1),
            "lives": len(runs),
            "longest_life_min": round(longest[0] / 60, 1) if longest else None,  # from its first accepted group
            "slope_longest_mb_per_min": round(longest[1], 3) if longest else None,
            "slope_median_mb_per_min": round(statistics.median(s for _, s in measured), 3) if measured else None,
        }
    return out


def life_start_version(log_text: str) -> tuple[int, str]:
    """The version a learner life continued at, and why: ``guard`` (the publish guard's markers: above what may
    have been shown), ``checkpoint`` (the checkpoint's own version: its weights are those published under it, if
    any were) or ``fresh``. The guard's line wins over the checkpoint's."""
    for pattern, source in ((CONTINUING, "guard"), (RESUMED, "checkpoint")):
        found = pattern.findall(log_text)
        if found:
            return int(found[-1]), source
    return 0, "fresh"


def check_versions(metrics_rows: Iterable[dict[str, Any]], lives: list[dict[str, Any]]) -> dict[str, Any]:
    """Versions strictly increasing across every trained step of every life (metrics.jsonl is appended across
    lives), and never reused: each learner life starts above the highest version the previous one may have shown
    (its ``publishing_version``/``published_version`` markers read right after the SIGKILL), or exactly at it
    when it resumed from the checkpoint of that very version (the same weights, published again under their own
    number)."""
    versions = [int(r["policy_version"]) for r in metrics_rows if "loss" in r and "policy_version" in r]
    problems = [f"trained version {b} after {a}" for a, b in zip(versions, versions[1:]) if b <= a]
    highest_before = -1
    for prev, life in zip(lives, lives[1:]):
        # only what may have been visible counts: a version trained but killed before its publish began was never
        # shown, and the next life may give its number to other weights
        marker = prev.get("highest_marker_at_end")
        highest_before = max(highest_before, -1 if marker is None else marker)
        start, source = life["start_version"], life.get("start_source", "guard")
        if start < highest_before or (start == highest_before and source != "checkpoint"):
            problems.append(f"learner life {life['life']} started at version {life['start_version']} although "
                            f"version {highest_before} may have been shown already")
    return {"ok": not problems, "trained_steps": len(versions), "first": versions[0] if versions else None,
            "last": versions[-1] if versions else None, "lives": [{k: life.get(k) for k in (
                "life", "start_version", "start_source", "last_trained_version", "highest_marker_at_end", "end")}
                for life in lives],
            "problems": problems[:20]}


def first_after(times: list[float], start: float, end: float | None) -> float | None:
    """The first of the sorted ``times`` in [start, end) (end None: no end)."""
    i = bisect.bisect_left(times, start)
    if i < len(times) and (end is None or times[i] < end):
        return times[i]
    return None


def timing_summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median_s": round(statistics.median(values), 1) if values else None,
            "max_s": round(max(values), 1) if values else None}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a SIGKILL
                continue
    return rows


def report(fig: dict[str, Any]) -> str:
    """The figures as text (what the soak prints; docs/BENCHMARKS.md quotes it)."""
    k, a, r = fig["kills"], fig.get("audit") or {}, fig["restart_to_first_accepted"]
    load = fig["load_average"]
    lines = [
        "",
        f"== churn soak: {fig['config']['minutes']:g} min of churn planned, {fig['churn_s'] / 60:.1f} done (kills "
        f"wait for their target to have a group accepted), {fig['duration_s'] / 60:.1f} min in all, seed "
        f"{fig['config']['seed']} ==",
        f"load average (1 min) during the run: mean {load['mean']}, max {load['max']} on {load['cpus']} CPUs",
        f"kills (SIGKILL): learner {k['learner']}, samplers {k['sampler']} ({k['sampler_while_learner_down']} while "
        f"the learner was down); planned {k['planned_learner']} / {k['planned_sampler']}",
        f"helpers of killed nodes (DHT process, p2pd): exited by themselves in {fig['helpers']['exit_s']['median_s']} "
        f"s median, {fig['helpers']['exit_s']['max_s']} s max; SIGKILLed after the grace: {fig['helpers']['forced']}",
    ]
    if a:
        lines.append(f"groups: sent {a.get('sent')}, acknowledged {a.get('acknowledged')}, trained {a.get('trained')},"
                     f" lost {a.get('lost')}, trained twice {a.get('trained_twice')}, held for the next life "
                     f"{a.get('pending')}, dropped stale "
                     f"{a.get('dropped_stale')}, rejected {a.get('rejected')}, duplicates {a.get('duplicates')}")
    else:
        lines.append(f"groups: no audit ({fig.get('audit_error', 'not run')})")
    lines.append(f"left in the samplers' outboxes at the end (sent, never answered): {fig['outbox_left']}")
    lines.append("restart -> first accepted group: learner {l}; sampler {s}; sampler restarted while the learner was "
                 "down or starting (from its own start) {d}".format(**{key: _fmt_timing(r[name]) for key, name in
                                                        (("l", "learner"), ("s", "sampler"),
                                                         ("d", "sampler_while_learner_down"))}))
    ex = fig["exits"]
    lines.append(f"unexpected exits: {ex['unexpected'] or 'none'}; final exit codes {ex['final']}")
    v = fig["versions"]
    lines.append(f"versions: {v['trained_steps']} trained steps, {v['first']} -> {v['last']}, strictly increasing "
                 f"and never reused: {'yes' if v['ok'] else 'NO: ' + '; '.join(v['problems'])}")
    lines.append(f"RSS per process (MB; slope in MB/min after each life's first minute of work, i.e. from 60 s after "
                 "its first accepted group; 'longest': that life's minutes of work):")
    lines.append(f"  {'process':<44}{'peak':>7}{'lives':>6}{'longest':>9}{'slope':>9}{'median':>9}")
    for name, m in fig["rss"].items():
        lines.append(f"  {name:<44}{m['peak_mb']:>7.0f}{m['lives']:>6}{_num(m['longest_life_min'], ' min'):>9}"
                     f"{_num(m['slope_longest_mb_per_min']):>9}{_num(m['slope_median_mb_per_min']):>9}")
    lines.append(f"result: {'PASS' if not fig['failures'] else 'FAIL: ' + '; '.join(fig['failures'])}")
    return "\n".join(lines)


def _fmt_timing(t: dict[str, Any]) -> str:
    return f"median {t['median_s']} s, max {t['max_s']} s (n={t['n']})" if t["n"] else "n=0"


def _num(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:g}{unit}"
