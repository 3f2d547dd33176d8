"""`make demo`: a whole swarm on this machine, in a few minutes.

A learner and three samplers on 127.0.0.1, the built-in tiny policy on the synthetic arithmetic task, GEPO. One
sampler simulates a slow, far-away volunteer with the GEPO paper's lognormal delays, so its rollouts arrive many
versions stale. The samplers fetch every new version from the learner and from each other. At the end: a summary
table and a plot (reward, held-out accuracy and staleness over learner steps) in the run directory.

Ctrl-C stops every process this script started (by PID) and still prints what was done.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

from node.local import LOOPBACK, Proc, join_args, stop_all
from node.metrics import read_metrics
from node.sampler_stats import fold_sampler_stats

RECIPE = "recipes/tiny-demo.yaml"
ONE_THREAD = ["--torch-threads", "1"]  # four processes share the cores: more threads would spin at OpenMP barriers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=None, help="where logs, metrics and the plot go (default: runs/demo-<time>)")
    p.add_argument("--steps", type=int, default=None, help="learner steps (default: the recipe's max_steps)")
    p.add_argument("--loss", default="gepo", help="objective: grpo, bnpo, dr_grpo, dapo, gspo, gepo or delta_l")
    p.add_argument("--recipe", default=RECIPE, help=f"learner recipe (default: {RECIPE})")
    p.add_argument("--samplers", type=int, default=3, help="samplers to start (the last one is the slow one)")
    p.add_argument("--slow-samplers", type=int, default=1,
                   help="how many of them (the last ones) simulate a slow volunteer; 0: none (default: 1)")
    p.add_argument("--slow-delay", nargs=2, type=float, default=(2.0, 20.0), metavar=("LOWER", "UPPER"),
                   help="the slow sampler's delay bounds in seconds (lognormal, as in the paper, offset 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--learner-args", default="", help="extra learner flags, one string (e.g. \"--lr 2e-6\")")
    p.add_argument("--sampler-args", default="", help="extra flags for every sampler, one string")
    return p.parse_args(argv)


def sampler_summary(state_dir: Path) -> dict:
    path = state_dir / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def status(learner_metrics: Path, t0: float) -> str:
    records = read_metrics(learner_metrics) if learner_metrics.is_file() else []
    steps = [r for r in records if "loss" in r]
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    if not steps:
        return f"[{time.time() - t0:5.0f}s] waiting for the first rollouts..."
    last = steps[-1]
    acc = f"{evals[0]:.2f} -> {evals[-1]:.2f}" if evals else "-"
    return (f"[{time.time() - t0:5.0f}s] step {last['step']} v{last['policy_version']}  reward {last['reward_mean']:.2f}"
            f"  held-out acc {acc}  lag {last.get('staleness_mean', 0):.1f} (max {last.get('staleness_max', 0):.0f})"
            f"  accepted {last.get('groups_accepted_total', 0)} stale {last.get('groups_dropped_stale_total', 0)}")


def summarize(run_dir: Path, samplers: list[tuple[str, Path]]) -> str:
    records = read_metrics(run_dir / "learner" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    lines = ["", "== gepo-swarm demo =="]
    if evals:
        lines.append(f"held-out accuracy  {evals[0][1]:.3f} (step {evals[0][0]}) -> {evals[-1][1]:.3f} "
                     f"(step {evals[-1][0]})   change {100 * (evals[-1][1] - evals[0][1]):+.1f} points")
    if steps:
        last = steps[-1]
        lines.append(f"final policy version {last['policy_version']} after {last['step']} learner steps; "
                     f"rejections {last.get('rejections', {}) or 'none'}")
    learner_up = steps[-1].get("bytes_uploaded", 0) if steps else 0
    totals_by_key = fold_sampler_stats(steps)
    lines.append("")
    lines.append(f"{'sampler':<18}{'key':<10}{'version':>8}{'sent':>7}{'accepted':>10}{'mean lag':>10}{'stale':>7}"
                 f"{'rejected':>10}{'MB down':>9}{'MB up':>7}")
    total_up = 0
    for name, state_dir in samplers:
        s = sampler_summary(state_dir)
        key = str(s.get("public_key", "")).removeprefix("ed25519:")[:8]
        rejected = s.get("rejections", {}) or {}
        totals = totals_by_key.get(key, {})
        stale = totals.get("stale", 0) + rejected.get("stale", 0)
        lag = f"{totals['lag_sum'] / totals['accepted']:.1f}" if totals.get("accepted") else "-"
        total_up += s.get("bytes_uploaded", 0)
        lines.append(f"{name:<18}{key:<10}{s.get('policy_version', '-')!s:>8}{s.get('sent', 0):>7}"
                     f"{s.get('accepted', 0):>10}{lag:>10}{stale:>7}{sum(rejected.values()) - rejected.get('stale', 0):>10}"
                     f"{s.get('bytes_down', 0) / 2**20:>9.1f}{s.get('bytes_uploaded', 0) / 2**20:>7.1f}")
    moved = learner_up + total_up
    if moved:
        lines.append("")
        lines.append(f"weights moved: {moved / 2**20:.1f} MB, {100 * total_up / moved:.0f}% of it served by samplers "
                     f"to each other (learner uploaded {learner_up / 2**20:.1f} MB)")
    return "\n".join(lines)


def plot(run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "learner" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    if not steps:
        return None
    evals = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    x = [r["step"] for r in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    top.plot(x, [r["reward_mean"] for r in steps], color="tab:blue", alpha=0.5, label="rollout reward (mean)")
    if evals:
        top.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="tab:green",
                 label="held-out greedy accuracy")
    top.set_ylabel("reward / accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="lower right")
    top.set_title("gepo-swarm demo: tiny policy, GEPO, learner + samplers on loopback")
    bottom.plot(x, [r.get("staleness_mean", 0) for r in steps], color="tab:orange", label="mean lag of the step's groups")
    bottom.plot(x, [r.get("staleness_max", 0) for r in steps], color="tab:red", alpha=0.6, label="max lag")
    bottom.set_xlabel("learner step (= policy version)")
    bottom.set_ylabel("staleness (versions)")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    out = run_dir / "demo.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    samplers: list[tuple[str, Path]] = []
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.time()
    print(f"run directory: {run_dir}", flush=True)
    try:
        learner_cmd = ["-m", "node.learner", "--config", args.recipe, "--run-dir", str(run_dir / "learner"),
                       "--run-id", "demo", "--loss", args.loss, *ONE_THREAD, *LOOPBACK]
        if args.steps:
            learner_cmd += ["--max-steps", str(args.steps)]
        learner_cmd += shlex.split(args.learner_args)
        learner = Proc(learner_cmd, run_dir / "learner.log")
        procs.append(learner)
        # a real model's learner first loads it and runs the step-0 held-out evaluation: minutes on a loaded CPU
        join = join_args(learner, timeout=min(args.timeout, 1800))
        print("learner up; samplers join with: python -m node.sampler " + " ".join(join), flush=True)
        for i in range(args.samplers):
            slow = args.samplers > 1 and i >= args.samplers - args.slow_samplers
            name = f"sampler-{i + 1}" + (" (slow)" if slow else "")
            state_dir = run_dir / f"sampler-{i + 1}"
            extra = (["--simulate-delay", "lognormal", "--delay-lower", str(args.slow_delay[0]), "--delay-upper",
                      str(args.slow_delay[1]), "--delay-offset", "0"] if slow else [])
            procs.append(Proc(["-m", "node.sampler", *join, "--state-dir", str(state_dir), "--batch-prompts", "4",
                               "--seed", str(i), *ONE_THREAD, *LOOPBACK, *extra, *shlex.split(args.sampler_args)],
                              run_dir / f"sampler-{i + 1}.log"))
            samplers.append((name, state_dir))
        tty = sys.stdout.isatty()
        last_print = 0.0
        while learner.popen.poll() is None:
            if time.time() - t0 > args.timeout:
                print(f"\ntimeout after {args.timeout:.0f}s; stopping", flush=True)
                break
            line = status(run_dir / "learner" / "metrics.jsonl", t0)
            if tty:
                print("\r\x1b[2K" + line, end="", flush=True)
            elif time.time() - last_print > 15:
                print(line, flush=True)
                last_print = time.time()
            time.sleep(1.0)
        print(("\n" if tty else "") + status(run_dir / "learner" / "metrics.jsonl", t0), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process", flush=True)
    finally:
        # samplers first (together): they write their stats on the way out, after finishing their batch (a minute
        # for a real model on a loaded CPU); then the learner, which finishes its step and checkpoints
        stop_all(procs[1:], timeout=120)
        if procs:
            procs[0].stop(timeout=120)
    if procs and procs[0].popen.returncode not in (0, 130, None) and not interrupted:
        print(f"the learner failed (exit {procs[0].popen.returncode}); its log: {run_dir / 'learner.log'}")
        print(procs[0].tail(20))
        return 1
    print(summarize(run_dir, samplers))
    picture = plot(run_dir)
    if picture:
        print(f"\nplot: {picture}")
    print(f"logs and metrics: {run_dir}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
