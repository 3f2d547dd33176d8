"""Benchmark: the honest sampler's trained groups/s with a slowloris peer, a ration thief or a Sybil flood running,
against none (issue 14's starvation attacks; target: >= 90 % of the unattacked rate under each).

    flock /tmp/bench.lock .venv/bin/python -m scripts.bench.bench_attacks --rounds 3 --window 40

One real learner (`python -m node.learner`, the tiny policy, --data-size prompts) and one honest sampler
(`python -m node.sampler`) on 127.0.0.1 run for the whole benchmark; after a warm-up (the honest key earns its
history) each round measures, for every attack in turn, a window with no attacker and a window with the attacker
process (scripts/bench/attackers.py, its own libp2p peer id) running - baseline and attacked windows interleaved,
so a machine whose load drifts affects both alike. The attacker is started before its window and given
--settle seconds to reach full strength; it is stopped by PID after it.

Rate: groups of the honest sampler's key that the learner trained on (the `samplers_in_step` field of its
metrics.jsonl lines, which carry a time stamp) in the window, divided by the window's length. Ratio: attacked rate
over the mean of the baseline windows right before and after it (the first and last baselines count once).
Reported: per attack the median ratio over rounds, and every window's rate.

slowloris  --loris-streams (default 80, more than the learner's 64 slots) streams with a 4-byte junk push every
           --loris-every (4) s, reopened 1 s after the learner closes or refuses it.
thief      every chunk of each new version asked from the learner first (polls its heartbeat every 50 ms).
sybil      --sybil-keys (20,000) fresh keys pushing real completions of the policy (generated once for every
           prompt), validly signed with the prompt the learner assigns, at up to --sybil-rate groups/s (default
           600; the issue's flood was 33,215 keys in 60 s, 550/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from node.local import LOOPBACK, JsonProc, Proc, join_args

ATTACKS = ("slowloris", "thief", "sybil")


def node_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def read_steps(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "samplers_in_step" in r:
                out.append(r)
    except FileNotFoundError:
        pass
    return out


def honest_rate(metrics: Path, key8: str, t0: float, t1: float) -> tuple[float, int]:
    steps = [r for r in read_steps(metrics) if t0 <= r["time"] < t1]
    n = sum(r["samplers_in_step"].get(key8, 0) for r in steps)
    return n / (t1 - t0), n


def attacker_args(kind: str, a: argparse.Namespace) -> list[str]:
    if kind == "slowloris":
        return ["--streams", str(a.loris_streams), "--every", str(a.loris_every)]
    if kind == "sybil":
        return ["--keys", str(a.sybil_keys), "--streams", "8", "--groups", "model",
                "--pace", str(8.0 / a.sybil_rate) if a.sybil_rate > 0 else "0"]
    return []


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, from " + ",".join(ATTACKS))
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each: baseline + attacked window per attack)")
    ap.add_argument("--window", type=float, default=40.0, help="seconds per measured window")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds an attacker runs before its window")
    ap.add_argument("--warmup-steps", type=int, default=20, help="learner steps before the first window")
    ap.add_argument("--data-size", type=int, default=512, help="prompts of the synthetic task (the Sybil "
                    "pre-generates completions for all of them)")
    ap.add_argument("--groups-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--loris-streams", type=int, default=80)
    ap.add_argument("--loris-every", type=float, default=4.0)
    ap.add_argument("--sybil-keys", type=int, default=20_000)
    ap.add_argument("--sybil-rate", type=float, default=600.0, help="groups/s the Sybil pushes at most (0: no cap)")
    ap.add_argument("--learner-args", default="", help="extra learner flags, e.g. '--max-push-streams-per-peer 64'")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each start-up event")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep logs and metrics here")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    a = ap.parse_args(argv)
    attacks = [x for x in a.attacks.split(",") if x]
    for x in attacks:
        if x not in ATTACKS:
            ap.error(f"unknown attack {x!r}")
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = node_env()
    run = "benchatk"
    procs: list[Proc] = []
    windows: list[dict[str, Any]] = []
    try:
        learner = Proc(["-m", "node.learner", "--run-dir", str(tmp / "learner"), "--run-id", run,
                        "--max-steps", "1000000", "--groups-per-step", str(a.groups_per_step), "--group-size",
                        str(a.group_size), "--eval-every", "0", "--data-size", str(a.data_size), "--wait-timeout", "0", "--reward-workers", "1",
                        *LOOPBACK, *a.learner_args.split()], tmp / "learner.log", env)
        procs.append(learner)
        join = join_args(learner, a.timeout)
        maddr = join[join.index("--peers") + 1]
        sampler = Proc(["-m", "node.sampler", *join, "--state-dir", str(tmp / "sampler"), *LOOPBACK],
                       tmp / "sampler.log", env)
        procs.append(sampler)
        key8 = sampler.wait_for(r"joined as ed25519:([0-9a-f]{8})", a.timeout).group(1)
        metrics = tmp / "learner" / "metrics.jsonl"
        deadline = time.monotonic() + a.timeout
        while len(read_steps(metrics)) < a.warmup_steps:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the learner did not reach {a.warmup_steps} steps:\n{learner.tail()}")
            time.sleep(1)
        print(f"warm: honest key {key8}, {len(read_steps(metrics))} steps", flush=True)

        def window(attack: str | None, rnd: int) -> None:
            att = None
            if attack is not None:
                att = JsonProc(["-m", "scripts.bench.attackers", attack, "--peers", maddr, "--run-id", run,
                                *attacker_args(attack, a)], tmp / f"{attack}-{rnd}.log", env)
                procs.append(att)
                att.wait_event("ready", a.timeout)
                time.sleep(a.settle)
            t0 = time.time()
            time.sleep(a.window)
            t1 = time.time()
            time.sleep(3.0)  # the last steps of the window reach metrics.jsonl
            rate, n = honest_rate(metrics, key8, t0, t1)
            w = {"round": rnd, "attack": attack, "rate": rate, "groups": n, "t0": t0, "t1": t1}
            if att is not None:
                try:
                    w["attacker"] = att.request("stats", 30)
                except Exception as e:  # noqa: BLE001
                    w["attacker"] = {"error": repr(e)}
                att.stop()
                procs.remove(att)
                time.sleep(3.0)  # what it left queued drains before the next baseline
            windows.append(w)
            print(f"round {rnd} {attack or 'none':<9} honest {rate:5.2f} groups/s ({n} groups)"
                  + (f"  attacker {json.dumps(w['attacker'].get('counters', w['attacker']))[:300]}" if att else ""),
                  flush=True)

        for rnd in range(a.rounds):
            for attack in attacks:
                window(None, rnd)
                window(attack, rnd)
        window(None, a.rounds)
    finally:
        for p in procs:
            p.stop()

    base = [(i, w) for i, w in enumerate(windows) if w["attack"] is None]
    results: dict[str, Any] = {}
    for attack in attacks:
        ratios = []
        for i, w in enumerate(windows):
            if w["attack"] != attack:
                continue
            near = [b["rate"] for j, b in base if j in (i - 1, i + 1)]
            ref = statistics.mean(near) if near else float("nan")
            w["ratio"] = w["rate"] / ref if ref else float("nan")
            ratios.append(w["ratio"])
        results[attack] = {"median_ratio": statistics.median(ratios) if ratios else None, "ratios": ratios,
                           "rates": [w["rate"] for w in windows if w["attack"] == attack]}
    baseline_rates = [w["rate"] for _, w in base]
    print("\n== honest sampler under attack (trained groups/s; ratio = attacked / neighbouring baselines) ==")
    print(f"baseline: median {statistics.median(baseline_rates):.2f} groups/s over {len(baseline_rates)} windows "
          f"({', '.join(f'{r:.2f}' for r in baseline_rates)})")
    for attack, r in results.items():
        print(f"{attack:<10} median ratio {r['median_ratio']:.2f}  ratios {', '.join(f'{x:.2f}' for x in r['ratios'])}"
              f"  rates {', '.join(f'{x:.2f}' for x in r['rates'])}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "host": platform.node(), "load": os.getloadavg(),
                                            "baseline": baseline_rates, "results": results, "windows": windows},
                                           indent=1, default=str))
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
