"""How long `--help` takes for every node program (a new user's first command), as a subprocess each time.

    .venv/bin/python -m scripts.bench.bench_help [--runs 5] [--baseline DIR] [--json out.json]

Each figure is the median wall time over ``--runs`` fresh interpreter starts of ``python -m <program> --help``;
``python -c pass`` is timed in the same run as the floor (interpreter start-up), so the ratio against it is what
to compare on a loaded machine. ``--baseline DIR`` (another checkout, e.g. ``git archive <commit> | tar -x -C DIR``)
times the same commands there too, alternating run by run with this checkout so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("node.learner", "node.sampler", "node.monitor")


def time_once(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, timeout=120)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_help", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="starts per program (the median is reported)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to time the same way")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    trees = {"this": REPO_ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                **{f"python -m {prog} --help": [sys.executable, "-m", prog, "--help"] for prog in PROGRAMS}}
    times: dict[str, dict[str, list[float]]] = {t: {c: [] for c in commands} for t in trees}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            for tree, root in trees.items():
                times[tree][name].append(time_once(cmd, root))
    medians = {t: {c: statistics.median(v) for c, v in per.items()} for t, per in times.items()}
    for tree, per in medians.items():
        floor = per["python -c pass"]
        print(f"{tree} ({trees[tree]}):")
        for name, seconds in per.items():
            print(f"  {name:<34} {seconds:6.2f} s  ({seconds / floor:5.1f}x interpreter start)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "median_s": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
