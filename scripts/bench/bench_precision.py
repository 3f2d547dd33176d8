"""Benchmark mixed precision: does a small update survive, and what does a step cost?

    .venv/bin/python -m scripts.bench.bench_precision                              # the tiny policy
    flock /tmp/smollm2.lock .venv/bin/python -m scripts.bench.bench_precision --model models/smollm2-135m-instruct

Three ways to train the same policy on the same fixed batch (the policy's own samples of synthetic sums, rewards
fixed so every group has non-zero advantages), --steps AdamW steps at --lr (default: the paper's 1e-6), GRPO:

    fp32         float32 weights, float32 compute (the reference)
    bf16-amp     float32 master weights and AdamW state, bf16 compute through torch.autocast (the learner's path)
    bf16-pure    bf16 weights stepped directly by AdamW (the learner's old `--dtype bfloat16` path)

Reported per mode: the fraction of trainable weights that changed after the last step (of the weights the optimizer
holds: the fp32 master for bf16-amp), the loss of each step, and the median step time (wall and process CPU) with
its ratio to fp32. The modes are stepped round-robin, one step each in turn, so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gepo.config import LossConfig
from gepo.data import format_prompt
from gepo.precision import Precision
from gepo.sampling import SamplingParams, generate_groups
from gepo.synthetic import SyntheticArithmetic
from gepo.train_step import ScoredGroup, TrainStepConfig, train_step

MODES = ("fp32", "bf16-amp", "bf16-pure")
SYSTEM = "You are a helpful assistant. Give the final answer as a number at the end."


def fixed_groups(model: Any, tokenizer: Any, prompts: int = 4, group_size: int = 4, max_new_tokens: int = 8,
                 system_prompt: str | None = None, difficulty: int = 2) -> list[ScoredGroup]:
    """The policy's own samples for `prompts` synthetic sums, with rewards that differ inside every group."""
    problems = SyntheticArithmetic(difficulty, 0, "train", 1000)
    ids = [format_prompt(tokenizer, problems[i].question, system_prompt) for i in range(prompts)]
    params = SamplingParams(n=group_size, temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    generated = generate_groups(model, ids, params, eos=tokenizer, pad_token_id=tokenizer.pad_token_id)
    rewards = [float(i % 2 == 0) for i in range(group_size)]
    return [ScoredGroup(g.prompt_ids, g.completion_ids, g.logprobs, rewards) for g in generated]


@dataclass
class Run:
    """One way of training a copy of the policy: its model, optimizer, precision and what it measured."""

    mode: str
    model: Any
    optimizer: torch.optim.Optimizer
    precision: Precision | None
    start: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, mode: str, policy: Any, lr: float) -> "Run":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        model = copy.deepcopy(policy)
        if mode == "bf16-pure":
            model = model.to(torch.bfloat16)
        precision = Precision.for_device("cpu", torch.bfloat16) if mode == "bf16-amp" else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return cls(mode, model, optimizer, precision, start)

    def step(self, groups: list[ScoredGroup], cfg: TrainStepConfig, pad_id: int, index: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = train_step(self.model, self.optimizer, groups, cfg, pad_token_id=pad_id, step_index=index,
                             precision=self.precision)
        self.wall_s.append(time.perf_counter() - t0)
        self.cpu_s.append(time.process_time() - c0)
        self.losses.append(float(metrics["loss"]))

    def fraction_changed(self) -> float:
        changed = total = 0
        for name, p in self.model.named_parameters():
            if name in self.start:
                changed += int((p.detach() != self.start[name]).sum())
                total += p.numel()
        return changed / total


def run_modes(policy: Any, groups: list[ScoredGroup], pad_id: int, *, modes=MODES, steps: int = 10,
              lr: float = 1e-6, micro_batch_rows: int = 16) -> dict[str, Run]:
    """`steps` AdamW steps of every mode on `groups`, round-robin."""
    cfg = TrainStepConfig(loss=LossConfig(loss_type="grpo"), micro_batch_rows=micro_batch_rows, max_grad_norm=1.0)
    runs = {m: Run.of(m, policy, lr) for m in modes}
    for i in range(steps):
        for run in runs.values():
            run.step(groups, cfg, pad_id, i)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the built-in tiny policy)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from node.model_io import load_policy

    policy, tokenizer = load_policy(args.model)
    chat = args.model is not None  # a real chat model: its system prompt, single-digit sums
    groups = fixed_groups(policy, tokenizer, args.prompts, args.group_size, args.max_new_tokens,
                          SYSTEM if chat else None, difficulty=1 if chat else 2)
    rows = sum(g.size for g in groups)
    tokens = sum(len(c) for g in groups for c in g.completion_ids)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"model {args.model or 'tiny'} ({n_params / 1e6:.2f}M parameters), {rows} completions, {tokens} completion "
          f"tokens per step, {args.steps} AdamW steps at lr {args.lr:g}, {args.threads} thread(s)")
    runs = run_modes(policy, groups, tokenizer.pad_token_id, steps=args.steps, lr=args.lr, micro_batch_rows=rows)

    base_wall = statistics.median(runs["fp32"].wall_s)
    base_cpu = statistics.median(runs["fp32"].cpu_s)
    out: dict[str, Any] = {"model": args.model or "tiny", "params": n_params, "rows": rows, "tokens": tokens,
                           "steps": args.steps, "lr": args.lr, "modes": {}}
    print("| mode | weights changed | step wall s | vs fp32 | step CPU s | vs fp32 | loss first → last |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode, run in runs.items():
        wall, cpu = statistics.median(run.wall_s), statistics.median(run.cpu_s)
        changed = run.fraction_changed()
        out["modes"][mode] = {"fraction_changed": changed, "wall_s": wall, "cpu_s": cpu, "losses": run.losses}
        print(f"| {mode} | {100 * changed:.2f} % | {wall:.3f} | {wall / base_wall:.2f}x | {cpu:.3f} | "
              f"{cpu / base_cpu:.2f}x | {run.losses[0]:+.5f} → {run.losses[-1]:+.5f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
