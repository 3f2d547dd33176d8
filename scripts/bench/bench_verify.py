"""Spot-check cost as a share of learner time, and the honest log-prob differences the tolerances are set from.

    .venv/bin/python -m scripts.bench.bench_verify [--model DIR] [--steps 6] [--groups-per-step 8] [--group-size 8]

1. Calibration: honest groups are sampled (fp32, KV-cache generation, as a sampler does) and re-scored the way the
   spot-check does (one fp32 prefill): the per-token and per-completion-mean |difference|. Then the same with the
   sampler in bf16 (the model cast to bfloat16) against the fp32 check.
2. Cost: median CPU time (process, all threads) and wall time of one learner step (train_step on groups_per_step
   groups), of one spot-check (load_state_dict of the claimed version from the cache + one prefill + the checks)
   and of caching one version at publish. The cost at fraction f is
       (f * groups_per_step * check + cache_add) / step
   (every check counted with a weight load: the worst case, the verifier loads only when the version changes).
3. Live: blocks of the same steps without, with (the real background Verifier fed at f = 0.2, a version cached
   per step, its queue drained inside the block) and again without it: wall time with / mean without - 1.
Ratios are measured in the same run; the machine is shared, so they matter more than the absolute times.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import numpy as np
import torch

from gepo.config import LossConfig
from gepo.data import DataConfig, format_prompt, load_prompts
from gepo.sampling import SamplingParams, generate_groups
from gepo.spot_check import spot_check
from gepo.train_step import ScoredGroup, TrainStepConfig, train_step
from node.verify import SamplingRules, VerifyJob, Verifier, VersionCache

FRACTIONS = (0.01, 0.05, 0.2)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def sample(model, tokenizer, prompts, params) -> list[ScoredGroup]:
    with torch.no_grad():
        gens = generate_groups(model, prompts, params, eos=tokenizer, pad_token_id=tokenizer.pad_token_id)
    return [ScoredGroup(g.prompt_ids, g.completion_ids, [[min(0.0, x) for x in r] for r in g.logprobs],
                        [float(i % 2) for i in range(g.size)], 0) for g in gens]


def gaps(model, groups) -> dict[str, float]:
    tok, row = [], []
    for g in groups:
        r = spot_check(model, g.prompt_ids, g.completion_ids, g.sampler_logprobs)
        tok.append(r.max_gap)
        row.append(r.mean_gap)
    return {"groups": len(groups), "token_gap_max": max(tok), "token_gap_p99": float(np.quantile(tok, 0.99)),
            "mean_gap_max": max(row), "mean_gap_p99": float(np.quantile(row, 0.99))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the tiny policy)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--calibration-groups", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model is None:
        from gepo.tiny_policy import load_tiny_policy

        model, tokenizer = load_tiny_policy()
    else:
        from node.model_io import load_policy

        model, tokenizer = load_policy(a.model, "cpu", torch.float32)
    model.config.use_cache = False
    questions = [ex.question for ex in load_prompts(DataConfig(source="synthetic", split="train", size=4096))]
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [format_prompt(tokenizer, rng.choice(questions)) for _ in range(n)]

    params = SamplingParams(max_new_tokens=a.max_new_tokens, n=a.group_size, seed=1)
    result: dict = {"model": a.model or "tiny-policy", "groups_per_step": a.groups_per_step,
                    "group_size": a.group_size, "max_new_tokens": a.max_new_tokens, "threads": a.threads}

    # 1. calibration
    model.eval()
    honest = sample(model, tokenizer, prompts(a.calibration_groups), params)
    result["fp32_vs_fp32"] = gaps(model, honest)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    result["bf16_sampler_vs_fp32"] = gaps(model, sample(bf16, tokenizer, prompts(a.calibration_groups), params))
    del bf16
    print(json.dumps({k: result[k] for k in ("fp32_vs_fp32", "bf16_sampler_vs_fp32")}, indent=1), flush=True)

    # 2. cost of each piece
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cfg = TrainStepConfig(loss=LossConfig(max_completion_length=a.max_new_tokens, delta=4.0))
    step_groups = [sample(model, tokenizer, prompts(a.groups_per_step), params) for _ in range(a.steps + 1)]
    cache = VersionCache(4)
    verifier_model = copy.deepcopy(model).eval()
    steps, checks, adds = [], [], []
    for i, groups in enumerate(step_groups):
        _, w, c = timed(lambda: train_step(model, opt, groups, cfg, pad_token_id=tokenizer.pad_token_id))
        _, wa, ca = timed(lambda: cache.add(i, model))
        g = groups[0]

        def check():
            verifier_model.load_state_dict(cache.get(i), strict=False)
            return spot_check(verifier_model, g.prompt_ids, g.completion_ids, g.sampler_logprobs)

        _, wc, cc = timed(check)
        if i:  # the first of each is warm-up
            steps.append((w, c))
            adds.append((wa, ca))
            checks.append((wc, cc))
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    result["step_s"] = {"wall": med(steps, 0), "cpu": med(steps, 1)}
    result["check_s"] = {"wall": med(checks, 0), "cpu": med(checks, 1)}
    result["cache_add_s"] = {"wall": med(adds, 0), "cpu": med(adds, 1)}
    result["cost_share_cpu"] = {
        str(f): (f * a.groups_per_step * result["check_s"]["cpu"] + result["cache_add_s"]["cpu"])
        / result["step_s"]["cpu"] for f in FRACTIONS}
    print(json.dumps({k: result[k] for k in ("step_s", "check_s", "cache_add_s", "cost_share_cpu")}, indent=1),
          flush=True)

    # 3. live: blocks of steps without / with the background verifier (its queue drained inside the block)
    verifier = Verifier(model, VersionCache(4), SamplingRules(), pad_token_id=tokenizer.pad_token_id)
    pick = random.Random(1)
    rate = 0.2  # 4x the default 5 % for a measurable load; the share at 5 % is a quarter of it

    def block(use: bool) -> float:
        t0 = time.perf_counter()
        for i, groups in enumerate(step_groups):
            train_step(model, opt, groups, cfg, pad_token_id=tokenizer.pad_token_id)
            if use:
                verifier.cache.add(i, model)
                for g in groups:
                    if pick.random() < rate:
                        verifier.submit(VerifyJob(b"x" * 32, i, i, g.prompt_ids, g.completion_ids,
                                                  g.sampler_logprobs))
        while use and (verifier.pending() or verifier.done < submitted()):
            time.sleep(0.01)
        return time.perf_counter() - t0

    submitted = lambda: verifier.done + verifier.pending()  # noqa: E731 (every job is either done or queued)
    without_a, with_v, without_b = block(False), block(True), block(False)
    verifier.close()
    base = (without_a + without_b) / 2
    result["live_block_wall_s"] = {"without": base, "with_verifier_at_0.2": with_v, "checks": verifier.done,
                                   "verifier_busy_s": round(verifier.busy_s, 3)}
    result["live_extra_share_at_0.2"] = with_v / base - 1
    print(json.dumps({k: result[k] for k in ("live_block_wall_s", "live_extra_share_at_0.2")}, indent=1), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
