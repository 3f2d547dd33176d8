"""Benchmark reward plug-ins: what running user reward functions in the bounded worker pool costs per group.

    .venv/bin/python -m scripts.bench.bench_reward_plugins [--runs 5] [--groups 64] [--group-size 16]

One `RewardRunner.score` call per group of --group-size completions (as the learner scores each rollout group);
the figure is groups scored per second, median of --runs runs after a warm-up run, for: the built-ins alone
(accuracy through the fast path + format; the baseline), plus one trivial plug-in (a length penalty), plus four.
The ratio to the baseline, measured in the same run, is the steadier number on a shared machine. Also: the time to
replace a plug-in worker after a timeout (kill + start + import), median of --runs; the learner pays this per
timed-out call, plus re-importing its own main module in the child (see docs/REWARDS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from gepo.data import PromptExample
from gepo.reward_funcs import RewardRunner, resolve_reward_specs
from gepo.rewards import RewardConfig

PLUGINS = '''
import time

def brevity(prompts, completions, **kwargs):
    return [-len(c) / 1000 for c in completions]

def slow(prompts, completions, **kwargs):
    time.sleep(3600)
'''


def _groups(groups: int, size: int) -> list[tuple[list[PromptExample], list[str]]]:
    out = []
    for g in range(groups):
        example = PromptExample(g, f"What is {g} + {g}?", str(2 * g), {"question": f"What is {g} + {g}?"})
        completions = [f"<think>add</think><answer>{2 * g + (i % 2)}</answer>" for i in range(size)]
        out.append(([example] * size, completions))
    return out


def _rate(runner: RewardRunner, groups: list, runs: int) -> float:
    rates = []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        for examples, completions in groups:
            runner.score(examples, completions)
        if run:  # the first run warms up
            rates.append(len(groups) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    groups = _groups(args.groups, args.group_size)
    config = RewardConfig(num_workers=1)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plugin = Path(tmp) / "bench_plugins.py"
        plugin.write_text(PLUGINS)
        four = []
        for k in range(4):  # four distinct targets: one module file each
            path = Path(tmp) / f"bench_plugins_{k}.py"
            path.write_text(PLUGINS)
            four.append(f"{path}:brevity")
        cases = {"built-ins only": [], "+ 1 plug-in": [f"{plugin}:brevity"], "+ 4 plug-ins": four}
        for name, rewards in cases.items():
            with RewardRunner(resolve_reward_specs(rewards), config, plugin_workers=1) as runner:
                runner.warm_up()
                results[name] = _rate(runner, groups, args.runs)
        replace_s = []
        with RewardRunner(resolve_reward_specs([f"{plugin}:slow"]), config, timeout_s=0.2) as runner:
            runner.warm_up()
            examples, completions = groups[0]
            for _ in range(args.runs):
                t0 = time.perf_counter()
                runner.score(examples, completions)  # times out after 0.2 s; the worker is killed and replaced
                runner.pool.warm_up()  # wait until the replacement is ready
                replace_s.append(time.perf_counter() - t0 - 0.2)
    base = results["built-ins only"]
    print(f"{args.groups} groups x {args.group_size} completions, median of {args.runs} runs")
    for name, rate in results.items():
        print(f"  {name:16s} {rate:8.1f} groups/s  {rate / base:5.2f}x the built-ins alone")
    print(f"  worker replaced after a timeout in {statistics.median(replace_s):.2f} s (median)")
    if args.json:
        Path(args.json).write_text(json.dumps({"groups_per_s": results,
                                               "replace_s": statistics.median(replace_s)}, indent=2))


if __name__ == "__main__":
    main()
