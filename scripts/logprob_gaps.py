"""How far honest sampler log-probs drift from the learner's own, by lag: the data behind gepo/plausibility.py's bounds.

Runs the staleness simulator (gepo/staleness.py: the real train_step fed with groups sampled from versions up to
--max-lag old) and, before each step, recomputes the learner's log-probs of every completion with the current
weights, exactly as train_step does, and records per row mean_t |p - q| and max_t |p - q| against the sampler's q.

    python -m scripts.logprob_gaps --max-lag 64 --steps 200 --out runs/gaps.jsonl
    python -m scripts.logprob_gaps --summarise runs/gaps*.jsonl
    python -m scripts.logprob_gaps --dtype bfloat16 ...   # the learner computes p in bf16, samplers in fp32

Prints the gap quantiles per lag bucket and the number of rows (and groups) beyond the bounds.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from gepo.plausibility import PlausibilityConfig, row_gaps
from gepo.staleness import StalenessConfig, run_staleness
from gepo.train_step import _collate, _Row, completion_logits
from gepo.logprobs import token_logprobs

BUCKETS = ((0, 0), (1, 4), (5, 16), (17, 32), (33, 48), (49, 64), (65, 10**9))


def learner_gaps(model, groups, temperature: float, dtype: torch.dtype) -> list[tuple[list[float], list[float]]]:
    """Per group: mean and max |p - q| of each row, p from `model` in the train_step layout (one forward)."""
    rows = [_Row(g.prompt_ids, c, lp, 0.0, gi) for gi, g in enumerate(groups)
            for c, lp in zip(g.completion_ids, g.sampler_logprobs)]
    batch = _collate(rows, 0, next(model.parameters()).device)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logp = token_logprobs(completion_logits(model, batch), batch["completion_ids"], temperature)
    mean_gap, max_gap = row_gaps(logp, batch["sampler_logprobs"], batch["completion_mask"])
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in groups]
    for r, row in enumerate(rows):
        out[row.group][0].append(float(mean_gap[r]))
        out[row.group][1].append(float(max_gap[r]))
    return out


def measure(cfg: StalenessConfig, dtype: torch.dtype = torch.float32, sink=None) -> list[dict]:
    """One record per group: lag, and its rows' mean and max gaps (also written to `sink` as JSON lines)."""
    from gepo.rewards import RewardConfig, RewardScorer
    from gepo.tiny_policy import load_tiny_policy

    records: list[dict] = []
    model, tokenizer = load_tiny_policy(cfg.policy_path)

    def on_step(t, groups, history) -> None:
        for g, (mean_gap, max_gap) in zip(groups, learner_gaps(model, groups, cfg.temperature, dtype)):
            records.append({"lag": t - g.policy_version, "mean": mean_gap, "max": max_gap})
            if sink is not None:
                sink.write(json.dumps(records[-1]) + "\n")
        if sink is not None:
            sink.flush()

    # generous timeouts: this is a measurement, often run on a busy machine
    scorer = RewardScorer(RewardConfig(num_workers=1, timeout_s=30.0, startup_timeout_s=600.0))
    try:
        run_staleness(cfg, model=model, tokenizer=tokenizer, scorer=scorer, on_step=on_step)
    finally:
        scorer.close()
    return records


def summarise(records: list[dict], bounds: PlausibilityConfig) -> dict:
    by_bucket: dict[str, dict] = {}
    for lo, hi in BUCKETS:
        sel = [r for r in records if lo <= r["lag"] <= hi]
        if not sel:
            continue
        means = np.array([m for r in sel for m in r["mean"]])
        maxes = np.array([m for r in sel for m in r["max"]])
        by_bucket[f"{lo}-{hi}"] = {
            "groups": len(sel), "rows": int(len(means)),
            "mean_gap_p50": float(np.median(means)), "mean_gap_p99": float(np.quantile(means, 0.99)),
            "mean_gap_max": float(means.max()),
            "token_gap_p50": float(np.median(maxes)), "token_gap_p99": float(np.quantile(maxes, 0.99)),
            "token_gap_max": float(maxes.max()),
        }
    false_positive_groups = sum(
        any(m > bounds.max_mean_gap for m in r["mean"]) or any(x > bounds.max_token_gap for x in r["max"])
        for r in records)
    return {"groups": len(records), "max_lag_seen": max(r["lag"] for r in records), "buckets": by_bucket,
            "bounds": {"max_mean_gap": bounds.max_mean_gap, "max_token_gap": bounds.max_token_gap},
            "groups_beyond_bounds": false_positive_groups}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.logprob_gaps", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-lag", type=int, default=64)
    p.add_argument("--delay-kind", default="weibull", choices=("fixed", "lognormal", "weibull"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4, help="(the learner's default is 1e-4: 3e-4 drifts faster)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--groups-per-batch", type=int, default=2, help="groups sampled with one version (one lag)")
    p.add_argument("--out", default=None, help="JSON lines, one per group, written as the run goes")
    p.add_argument("--summarise", nargs="*", default=None, metavar="FILE", help="only summarise these --out files")
    a = p.parse_args(argv)
    if a.summarise is not None:
        records = [json.loads(line) for path in a.summarise for line in open(path) if line.strip()]
        print(json.dumps(summarise(records, PlausibilityConfig()), indent=1))
        return 0
    torch.set_num_threads(1)
    cfg = StalenessConfig(max_lag=a.max_lag, delay_kind=a.delay_kind, steps=a.steps, lr=a.lr,
                          groups_per_batch=a.groups_per_batch,
                          group_size=a.group_size, groups_per_step=a.groups_per_step,
                          max_new_tokens=a.max_new_tokens, eval_every=10**6, eval_size=50, seed=a.seed)
    with open(a.out, "w") if a.out else open("/dev/null", "w") as sink:
        records = measure(cfg, getattr(torch, a.dtype), sink)
    summary = summarise(records, PlausibilityConfig())
    summary.update(dtype=a.dtype, lr=a.lr, delay_kind=a.delay_kind, steps=a.steps)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
