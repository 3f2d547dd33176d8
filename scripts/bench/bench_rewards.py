"""Benchmark reward checks: checks/s through `RewardScorer` for integer and fraction answers.

    .venv/bin/python -m scripts.bench.bench_rewards [--runs 5] [--groups 64] [--group-size 16] [--cores 2]

Each run scores --groups groups of --group-size completions (one `score` call per group, as the learner does; one
gold per group, half the completions right); the figure is completions scored per second, median of --runs runs
after one warm-up run, and the CPU time per check of the parent and its workers together (which does not depend on
what else the machine runs). The process is pinned to --cores CPUs before the workers start (they inherit it), so
parent and workers share those cores. Cases:

  integer, fast path   "<think>…</think><answer>42</answer>" vs "42": decided in the calling process
  integer, workers     the same with fast_path=False: math-verify in the worker pool
  integer in prose     "… so the answer is 42." vs a raw GSM8K gold "…#### 42": always math-verify
  fraction             "\\boxed{\\frac{3}{4}}" vs "0.75": always math-verify
  math-verify, 1 proc  the integer case through math-verify directly in this process (no pool): the baseline
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import time
from typing import Callable

from gepo.rewards import RewardConfig, RewardScorer

Case = tuple[list[list[str]], list[list[str]]]  # groups of completions, groups of golds


def _groups(make: Callable[[random.Random, int, bool], tuple[str, str]], groups: int, size: int, seed: int) -> Case:
    """Groups as the learner sees them: one prompt, so one gold, per group; half the completions right."""
    rng = random.Random(seed)
    completions, golds = [], []
    for _ in range(groups):
        value = rng.randint(1, 99_999)
        pairs = [make(rng, value, i % 2 == 0) for i in range(size)]
        completions.append([c for c, _ in pairs])
        golds.append([g for _, g in pairs])
    return completions, golds


def _integer(rng: random.Random, value: int, right: bool) -> tuple[str, str]:
    answer = value if right else value + rng.randint(1, 9)
    return f"<think>Adding up the parts.</think><answer>{answer}</answer>", str(value)


def _integer_prose(rng: random.Random, value: int, right: bool) -> tuple[str, str]:
    answer = value if right else value + rng.randint(1, 9)
    return (
        f"She buys {rng.randint(2, 9)} boxes at {rng.randint(2, 20)} dollars each, so the answer is {answer}.",
        f"Cost: <<{value}={value}>>{value}\n#### {value}",
    )


def _fraction(rng: random.Random, value: int, right: bool) -> tuple[str, str]:
    num, den = value % 97 + 1, (2, 4, 5, 8, 10, 20, 25)[value % 7]
    answer_num = num if right else num + rng.randint(1, 3)
    return f"The result is \\boxed{{\\frac{{{answer_num}}}{{{den}}}}}.", f"{num / den:g}"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc); 0.0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


Measure = tuple[float, float]  # (checks per wall-clock second, CPU microseconds per check, all processes)


def _time_scorer(scorer: RewardScorer, case: Case) -> Measure:
    pids = [w.process.pid for w in scorer._workers]  # the workers exist: warmed up before timing
    cpu0 = time.process_time() + sum(_cpu_seconds(p) for p in pids)
    start = time.perf_counter()
    scored = 0
    for completions, golds in zip(*case):
        scored += len(scorer.score(completions, golds))
    wall = time.perf_counter() - start
    cpu = time.process_time() + sum(_cpu_seconds(p) for p in pids) - cpu0
    return scored / wall, cpu / scored * 1e6


def _time_math_verify(case: Case) -> Measure:
    from gepo.rewards import _check, _prepare_answer, _prepare_gold

    cpu0, start = time.process_time(), time.perf_counter()
    scored = 0
    for completions, golds in zip(*case):
        for c, g in zip(completions, golds):
            _check(_prepare_answer(c, 1000), _prepare_gold(g, 1000), True)
            scored += 1
    return scored / (time.perf_counter() - start), (time.process_time() - cpu0) / scored * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--cores", type=int, default=2, help="CPUs to pin to (0: no pinning)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    if args.cores and hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[: args.cores])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    g, n = args.groups, args.group_size
    cases = {
        "integer": _groups(_integer, g, n, 0),
        "integer in prose": _groups(_integer_prose, g, n, 1),
        "fraction": _groups(_fraction, g, n, 2),
    }
    fast = RewardScorer(RewardConfig(num_workers=2))
    pool = RewardScorer(RewardConfig(num_workers=2, fast_path=False))
    runs: dict[str, list[Measure]] = {}
    plan: list[tuple[str, Callable[[], Measure]]] = [
        ("integer, fast path", lambda: _time_scorer(fast, cases["integer"])),
        ("integer, workers", lambda: _time_scorer(pool, cases["integer"])),
        ("integer in prose, workers", lambda: _time_scorer(pool, cases["integer in prose"])),
        ("fraction, workers", lambda: _time_scorer(pool, cases["fraction"])),
        ("math-verify in-process, integer (baseline)", lambda: _time_math_verify(cases["integer"])),
        ("math-verify in-process, fraction (baseline)", lambda: _time_math_verify(cases["fraction"])),
    ]
    try:
        fast.warm_up()
        pool.warm_up()
        # Round-robin over the cases, so machine noise hits all of them alike; the first round is warm-up.
        for round_ in range(args.runs + 1):
            for name, fn in plan:
                measure = fn()
                if round_:
                    runs.setdefault(name, []).append(measure)
        assert fast.stats.timeouts == pool.stats.timeouts == 0
        assert fast.stats.respawns == pool.stats.respawns == 0
    finally:
        fast.close()
        pool.close()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"reward checks/s on {cores} cores, groups of {n}, {g} groups per run, median of {args.runs} runs")
    print(f"(load average at the end: {load:.1f}; CPU µs/check counts the parent and its workers)")
    print(f"{'case':46} {'checks/s':>10} {'min':>10} {'max':>10} {'CPU µs/check':>14}")
    for name, measures in runs.items():
        rates = [rate for rate, _ in measures]
        cpu = statistics.median(c for _, c in measures)
        print(f"{name:46} {statistics.median(rates):10,.0f} {min(rates):10,.0f} {max(rates):10,.0f} {cpu:14,.0f}")
    if args.json:
        figures = {
            name: {
                "checks_per_s": statistics.median(rate for rate, _ in m),
                "cpu_us_per_check": statistics.median(cpu for _, cpu in m),
                "runs": m,
            }
            for name, m in runs.items()
        }
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "group_size": n, "groups": g, "figures": figures}, f, indent=2)


if __name__ == "__main__":
    main()
