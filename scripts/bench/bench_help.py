"""How long `--help` takes for every node program (a new user's first command), as a subprocess each time.

    .venv/bin/python -m scripts.bench.bench_help [--runs 5] [--json out.json]

Each figure is the median wall time over ``--runs`` fresh interpreter starts of ``python -m <program> --help``;
``python -c pass`` is timed in the same run as the floor (interpreter start-up), so the ratio against it is what
to compare on a loaded machine.
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


def time_command(argv: list[str], runs: int) -> float:
    """Median wall seconds of `argv` (must exit 0) over `runs` starts."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL, timeout=120)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_help", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="starts per program (the median is reported)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    results = {"python -c pass": time_command([sys.executable, "-c", "pass"], args.runs)}
    for prog in PROGRAMS:
        results[f"python -m {prog} --help"] = time_command([sys.executable, "-m", prog, "--help"], args.runs)
    floor = results["python -c pass"]
    for name, seconds in results.items():
        print(f"{name:<34} {seconds:6.2f} s  ({seconds / floor:5.1f}x interpreter start)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "median_s": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
