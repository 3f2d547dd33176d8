"""`python -m node.learner`: trains a policy on what the swarm delivers, and publishes each new version.

One loop, two sources of rollouts:
    swarm  (default)  signed groups from samplers, verified by protocol/, however stale (up to --max-staleness)
    --online          sampled here, in lockstep with the current policy (zero delay: the paper's online baseline)
Either way the learner recomputes every reward itself, builds `ScoredGroup`s and calls gepo's `train_step`, the one
place where learning happens. The policy version is the number of optimizer steps taken; `--resume` continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import random
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from gepo.config import ADVANTAGE_STDS, AGGREGATIONS, GEPO_GROUPINGS, LOSS_TYPES, LossConfig
from gepo.data import ANSWER_FORMATS, DataConfig, DataError, assign_prompt_index, format_prompt, load_prompts
from gepo.evaluation import evaluate as evaluate_held_out, held_out_split
from gepo.reward_funcs import RewardRunner, resolve_reward_specs
from gepo.rewards import RewardConfig, RewardWorkerError
from gepo.synthetic import PHRASINGS
from node.cli import (ArgumentParser, add_dataclass_args, add_process_args, dataclass_from_args, option,
                      parse_with_recipe, program_name, setup_process)
from node.intake import Intake, IntakeConfig
from node.errors import EXIT_INTERRUPTED, EXIT_USAGE, BootstrapError, ConfigError, ModelLoadError, fail
from node.fault_points import pause_point
from node.metrics import GracefulStop, MetricsWriter, StatusLine, quiet_transformers
from node import policy_setup as ps
from node.policy_setup import PolicyConfig
from node.preflight import DTYPES, check_dataset, check_model, check_swarm_args, parse_device
from node.sampler_stats import SamplerStats
from node.trackers import REPORT_TO_CHOICES, Trackers, wants_tensorboard

if TYPE_CHECKING:
    import torch

    from gepo.data import PromptSet
    from protocol.rollout import RolloutGroup


def _import_training_stack() -> None:
    """torch, transformers and the training code, imported when a Learner is built rather than at start-up, so
    that `--help` and a bad argument answer in about a second. They become this module's globals, as a top-level
    import would make them."""
    global np, torch, generate_groups, ScoredGroup
    global TrainStepConfig, train_step, RunState, latest_checkpoint, load_optimizer, load_run_state, save_checkpoint
    global load_policy, policy_files, policy_tensors, resolve_device, resolve_dtype, run_file
    global QuestionSet, RunInfo, ProtocolError, Reason, prompt_hash, read_sender
    import numpy as np
    import torch

    from gepo.sampling import generate_groups
    from gepo.train_step import ScoredGroup, TrainStepConfig, train_step
    from node.checkpoint import RunState, latest_checkpoint, load_optimizer, load_run_state, save_checkpoint
    from node.model_io import load_policy, policy_files, policy_tensors, resolve_device, resolve_dtype, run_file
    from node.run_info import QuestionSet, RunInfo
    from protocol.errors import ProtocolError, Reason
    from protocol.rollout import prompt_hash, read_sender


log = logging.getLogger("node.learner")


@dataclass
class LearnerConfig:
    model: str | None = option(None, "model folder or hub id (default: the built-in tiny policy)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when there is one)", parse=parse_device)
    dtype: str = option("auto", "compute dtype, autocast over float32 master weights (float16 with loss scaling); "
                                "auto: bf16 on a GPU that has it, else fp32", choices=DTYPES)
    run_dir: str = option("runs/learner", "checkpoints, metrics.jsonl, TensorBoard logs and swarm state")
    resume: bool = option(False, "continue from the newest checkpoint in --run-dir, keeping its version numbering")
    online: bool = option(False, "sample inside the learner in lockstep (zero delay) instead of from the swarm")
    max_steps: int = option(200, "optimizer steps to run (counted across --resume)")
    group_size: int = option(8, "G: completions per prompt")
    groups_per_step: int = option(8, "prompt groups per optimizer step")
    optimizer: str = option("adamw", "adamw or sgd", choices=("adamw", "sgd"))
    lr: float = option(1e-4, "learning rate (the paper used 1e-6 for Qwen3; the tiny policy needs more)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clip (0: off)")
    micro_batch_rows: int = option(16, "rows per forward/backward (gradient accumulation inside a step)")
    max_staleness: int = option(32, "drop groups sampled more than this many versions ago (counted as stale)")
    max_buffered_steps: int = option(2, "accepted groups waiting for training, in steps; beyond it samplers are "
                                        "told to wait (back-pressure keeps rollouts fresh)")
    publish_every: int = option(1, "publish a new version to the swarm every N steps")
    checkpoint_every: int = option(50, "write a checkpoint every N steps (and at the end)")
    eval_every: int = option(20, "held-out evaluation (greedy pass@1, sampled mean@k) every N steps (0: off)")
    eval_size: int = option(200, "held-out problems per evaluation")
    eval_dataset: str | None = option(None, "held-out set: a file or hub id, read with the --data-* field options "
                                            "(unset: --eval-fraction, else the synthetic task's test split)")
    eval_split: str = option("test", "split of --eval-dataset")
    eval_fraction: float = option(0.0, "hold out the last this-fraction of the training set for evaluation and "
                                       "train on the rest (0: off)")
    eval_k: int = option(0, "also sample k completions per held-out problem and report mean@k (0: greedy only)")
    temperature: float = option(1.0, "sampling temperature, imposed on samplers and used by the loss")
    top_p: float = option(1.0, "nucleus sampling mass imposed on samplers")
    top_k: int = option(0, "top-k imposed on samplers (0: off)")
    max_new_tokens: int = option(16, "completion length cap (also the loss's max_completion_length)")
    system_prompt: str | None = option(None, "system prompt for chat-template models")
    accuracy_weight: float = option(1.0, "reward = accuracy_weight * correct + format_weight * well-formed")
    format_weight: float = option(0.0, "weight of the <think>...</think><answer>...</answer> format reward")
    reward: list[str] = option(default_factory=list, metavar="MODULE:FUNCTION[=WEIGHT]", repeat=True,
                               help="a reward function f(prompts, completions, **columns) -> list[float | None], "
                                    "repeatable; MODULE is a dotted import path or a path to a Python file; 'accuracy=W' and "
                                    "'format=W' set the built-ins' weights (docs/REWARDS.md)")
    reward_timeout: float = option(10.0, "seconds a plug-in reward may take per group before its worker is killed "
                                         "(the group then scores None for it; counted)")
    reward_workers: int = option(2, "math-verify worker processes (and as many for reward plug-ins)")
    wait_timeout: float = option(0.0, "swarm mode: give up after this many seconds without any rollout (0: never)")
    seed: int = option(0, "seed for the model-side randomness (online sampling, shuffles)")
    tensorboard: bool = option(True, "also write TensorBoard scalars (--no-tensorboard overrides --report-to)")
    report_to: list[str] = option(default_factory=lambda: ["tensorboard"], choices=REPORT_TO_CHOICES,
                                  help="trackers besides metrics.jsonl, via accelerate (all: every one installed)")
    log_completions_every: int = option(0, "every N steps, a table of sample prompts, completions and rewards to "
                                           "completions.jsonl and the trackers (0: off)")
    log_completions_count: int = option(4, "rows of that table (one completion of each of the latest groups)")


def build_parser() -> argparse.ArgumentParser:
    from node.config import SwarmConfig

    parser = ArgumentParser(
        prog=program_name("node.learner", "gepo-learner"),
        description="The gepo-swarm learner: verifies rollouts from the swarm, trains with GEPO (or another "
                    "objective) and publishes new policy versions.",
    )
    add_process_args(parser)
    add_dataclass_args(parser, LearnerConfig, "learner")
    add_dataclass_args(parser, PolicyConfig, "policy: precision, reference, schedule, LoRA")
    add_dataclass_args(parser, LossConfig, "objective", rename={"loss_type": "loss"},
                       skip=("temperature", "max_completion_length"),
                       choices={"loss_type": LOSS_TYPES, "advantage_std": ADVANTAGE_STDS,
                                "gepo_grouping": GEPO_GROUPINGS, "aggregation": AGGREGATIONS})
    add_dataclass_args(parser, DataConfig, "prompt data", prefix="data_", rename={"source": "dataset"},
                       choices={"answer_format": ANSWER_FORMATS, "phrasing": PHRASINGS})
    add_dataclass_args(parser, IntakeConfig, "checks on what samplers send")
    SwarmConfig.add_argparse_args(parser, role="learner")
    return parser


class Learner:
    """Model, optimizer, prompts, rewards and bookkeeping; `run()` picks the rollout source."""

    def __init__(self, cfg: LearnerConfig, loss: LossConfig, data: DataConfig, swarm_cfg: Any = None,
                 stop: GracefulStop | None = None, intake: IntakeConfig | None = None,
                 policy: PolicyConfig | None = None) -> None:
        _import_training_stack()
        from gepo.precision import Precision

        self.cfg = cfg
        self.policy_cfg = policy = policy or PolicyConfig()
        self.loss = dataclasses.replace(loss, temperature=cfg.temperature, max_completion_length=cfg.max_new_tokens)
        self.intake_cfg = intake or IntakeConfig()
        if not cfg.online and self.loss.delta is None:  # no single group can dominate a step (docs/PROTOCOL.md)
            self.loss = dataclasses.replace(self.loss, delta=self.intake_cfg.max_group_weight)
        self.data_cfg = data
        self.swarm_cfg = swarm_cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.intake = Intake(self.intake_cfg, self.run_dir)
        torch.manual_seed(cfg.seed)

        # Under `accelerate launch` / torchrun (WORLD_SIZE > 1) every rank trains on its share of each step's
        # groups (DDP, or DeepSpeed ZeRO-2 from an accelerate config); only the main rank is on the swarm.
        self.acc = _accelerator(cfg.device, cfg.dtype) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        self.is_main = self.acc is None or self.acc.is_main_process
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one rank speaks for the run
        self.device = str(self.acc.device) if self.acc is not None else resolve_device(cfg.device)
        # Trackers first: a missing or unstartable one is an error before minutes of loading.
        trackers = Trackers(cfg.report_to, self.run_dir, project=swarm_cfg.run_id if swarm_cfg else "gepo",
                            config={**dataclasses.asdict(self.loss), **dataclasses.asdict(cfg)}) if self.is_main else None
        dtype = resolve_dtype(cfg.dtype, self.device) if self.acc is None else ps.accelerator_compute_dtype(self.acc)
        # fp32 master weights with autocast here; under accelerate its mixed_precision (DeepSpeed: its fp32 copy).
        self.precision = Precision.for_device(self.device, dtype) if self.acc is None else Precision()
        self.publish_dtype = ps.resolve_publish_dtype(policy.publish_dtype, self.device, dtype)
        self.state = RunState()
        checkpoint = latest_checkpoint(self.run_dir) if cfg.resume else None
        if cfg.resume and checkpoint is None:  # the version numbering still continues (publish guard below)
            log.warning("--resume: no checkpoint in %s, starting from fresh weights", self.run_dir)
        self.model, self.tokenizer = ps.build_policy(policy, cfg.model, checkpoint, self.device, dtype)
        self.model.config.use_cache = False
        self.optimizer = self._make_optimizer()
        self.lr_scheduler = ps.build_scheduler(policy, self.optimizer, cfg.max_steps)
        if checkpoint:
            load_optimizer(checkpoint, self.optimizer, self.lr_scheduler, accelerator=self.acc,
                           scaler=self.precision.scaler)
            self.state = load_run_state(checkpoint)
            log.info("resumed from %s at step %d, policy version %d", checkpoint, self.state.step,
                     self.state.policy_version)
        from node.publish_guard import PublishGuard  # (here, not in the import block other work edits)

        self.publish_guard = PublishGuard(self.run_dir)
        published = self.publish_guard.highest()  # with or without a checkpoint
        if published is not None and published > self.state.policy_version:
            # Versions after the checkpoint (if any) were shown to the swarm with weights that are now lost:
            # numbering them again would give samplers two different policies under one version.
            log.warning("versions up to %d may have been shown to the swarm already; continuing at version %d",
                        published, published + 1)
            self.state.policy_version = published + 1
        self.counters: Counter = Counter(self.state.counters.get("counters", {}))
        self.rejections: Counter = Counter(self.state.counters.get("rejections", {}))

        # With --eval-fraction the training set (and what samplers are told of it) excludes the held-out slice.
        self.data_cfg, self.prompts, self.eval_prompts = held_out_split(
            data, load_prompts(data), eval_dataset=cfg.eval_dataset, eval_split=cfg.eval_split,
            eval_fraction=cfg.eval_fraction, eval_size=cfg.eval_size)
        if cfg.eval_every <= 0:
            self.eval_prompts = None
        self.prompts, self.prompts_skipped = ps.drop_long_prompts(self.prompts, self.tokenizer, cfg.system_prompt,
                                                                  policy.max_prompt_length)
        self.train_model = self.model
        if self.acc is not None:
            if cfg.groups_per_step % self.acc.num_processes:
                raise ValueError(f"--groups-per-step {cfg.groups_per_step} must be a multiple of the "
                                 f"{self.acc.num_processes} training processes")
            self.train_model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
            self.model = self.acc.unwrap_model(self.train_model)  # generation, evaluation and publishing
            if checkpoint:
                load_optimizer(checkpoint, self.optimizer, accelerator=self.acc, after_prepare=True)
        self.ref_model = (ps.build_reference(policy, self.model, cfg.model, self.device, dtype, self.acc)
                          if self.loss.beta > 0 else None)
        self.rewards = RewardRunner(resolve_reward_specs(cfg.reward, cfg.accuracy_weight, cfg.format_weight),
                                    RewardConfig(num_workers=cfg.reward_workers), timeout_s=cfg.reward_timeout,
                                    plugin_workers=cfg.reward_workers)
        self.rewards.warm_up()
        self.recent_completions: deque[list[Any]] = deque(maxlen=max(1, cfg.log_completions_count))
        self.step_cfg = TrainStepConfig(loss=self.loss, micro_batch_rows=cfg.micro_batch_rows,
                                        max_grad_norm=cfg.max_grad_norm, shuffle_seed=cfg.seed)
        self.metrics = MetricsWriter(self.run_dir if self.is_main else self.run_dir / f"rank{self.acc.process_index}",
                                     tensorboard=cfg.tensorboard and self.is_main and wants_tensorboard(cfg.report_to),
                                     trackers=trackers)
        self.status = StatusLine(quiet=not self.is_main)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._tokenizer_lock = threading.Lock()  # HF tokenizers are not safe to share across threads
        self.sampler_stats = SamplerStats(getattr(swarm_cfg, "sampler_stats_top", 32))  # bounded, written as deltas
        self.last_eval: float | None = None
        self.last_metrics: dict[str, Any] = {}  # the latest step's, for the heartbeat (node.monitor's plots)
        self.swarm = None
        self.adapter_versions = None  # --publish-adapter: node/adapters.py
        if policy.publish_adapter:
            from node.adapters import AdapterVersions

            self.adapter_versions = AdapterVersions(self.publish_dtype)
        self.stop = stop or GracefulStop()
        # Each pushed group's prompt is checked against its digest; caching the 32-byte digest rather than the token
        # ids keeps this bounded cache at ~11 MB instead of ~34 MB (the 30-minute soak's RSS growth, BENCHMARKS).
        self.prompt_digest = functools.lru_cache(maxsize=65536)(lambda i: prompt_hash(self.prompt_ids(i)))

    # ---------------------------------------------------------------------------------------------------------
    # pieces

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    @property
    def version(self) -> int:
        return self.state.policy_version

    def prompt_ids(self, index: int) -> tuple[int, ...]:
        with self._tokenizer_lock:
            return tuple(format_prompt(self.tokenizer, self.prompts[index].question, self.cfg.system_prompt))

    def run_info(self) -> RunInfo:
        return RunInfo(run_id=self.swarm_cfg.run_id if self.swarm_cfg else "online", group_size=self.cfg.group_size,
                       temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                       max_new_tokens=self.cfg.max_new_tokens, system_prompt=self.cfg.system_prompt,
                       prompts=QuestionSet.of(self.data_cfg, self.prompts), max_staleness=self.cfg.max_staleness)

    def score(self, prompt_index: int, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
              logprobs: Sequence[Sequence[float]], version: int) -> tuple[ScoredGroup, list[float]]:
        """The learner's own rewards for a group (a sampler's reward is never used). Returns (group, accuracies)."""
        with self._tokenizer_lock:
            texts = [self.tokenizer.decode(list(c), skip_special_tokens=True) for c in completions]
        example = self.prompts[prompt_index]
        scored = self.rewards.score([example] * len(texts), texts, completions)
        group = ScoredGroup(list(prompt_ids), [list(c) for c in completions], [list(lp) for lp in logprobs],
                            scored.totals, version)
        if self.cfg.log_completions_every > 0 and texts:  # one row per group for the completions table
            self.recent_completions.append([version, example.question, texts[0], scored.totals[0],
                                            *(scored.per_function[n][0] for n in self.rewards.names)])
        return group, scored.accuracy

    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics (gepo.evaluation): greedy pass@1, reward, and mean@k when --eval-k > 0."""
        assert self.eval_prompts is not None
        with self._tokenizer_lock, self.precision.autocast():
            return evaluate_held_out(self.model, self.tokenizer, self.eval_prompts, self.rewards,
                                     max_new_tokens=self.cfg.max_new_tokens, system_prompt=self.cfg.system_prompt,
                                     k=self.cfg.eval_k, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                     top_k=self.cfg.top_k, seed=self.cfg.seed + self.state.step)

    def _my_share(self, items: list) -> list:
        return items if self.acc is None else items[self.acc.process_index :: self.acc.num_processes]

    def train(self, groups: list[ScoredGroup], accuracies: list[float], extra: dict[str, float],
              sharded: bool = False) -> dict[str, float]:
        """One optimizer step on `groups` (all of the step's groups, or this rank's share when `sharded`)."""
        from gepo.plausibility import GroupGuard, PlausibilityConfig

        mine = groups if sharded else self._my_share(groups)
        guard = None if self.cfg.online else GroupGuard(PlausibilityConfig(self.intake_cfg.max_mean_logprob_gap,
                                                                           self.intake_cfg.max_token_logprob_gap))
        metrics = train_step(self.train_model, self.optimizer, mine, self.step_cfg, pad_token_id=self.pad_id,
                             current_version=self.version, step_index=self.state.step, accelerator=self.acc,
                             guard=guard, ref_model=self.ref_model, lr_scheduler=self.lr_scheduler,
                             precision=self.precision)
        self.state.step += 1
        self.state.policy_version += 1
        if guard is not None and guard.rejected and self.acc is None:  # metrics cover the groups trained on
            ends = np.cumsum([0] + [g.size for g in groups])
            accuracies = [a for i in range(len(groups)) if i not in guard.rejected
                          for a in accuracies[ends[i]:ends[i + 1]]]
        if guard is not None and self.is_main:
            self.intake.after_step(self.state.step, self.version, mine, guard.rejected, guard.details)
        if self.swarm is not None:  # write-ahead journal (node/journal.py): before any checkpoint covers this step
            rejected = guard.rejected if guard is not None and self.acc is None else {}
            self.swarm.inbox.trained(self.state.step, {g.tag[2]: rejected.get(i) for i, g in enumerate(groups)
                                                       if g.tag is not None and len(g.tag) > 2})
            pause_point("learner:after_train", self.state.step)
        self.counters["tokens_trained"] += sum(len(c) for i, g in enumerate(mine) for c in g.completion_ids
                                               if guard is None or i not in guard.rejected)
        metrics["accuracy"] = float(np.mean(accuracies)) if accuracies else 0.0
        metrics["policy_version"] = self.version
        if self.policy_cfg.max_prompt_length:
            metrics["prompts_skipped_too_long"] = self.prompts_skipped
        metrics.update(extra)
        metrics.update(self.rewards.step_metrics())
        lags = [self.version - 1 - g.policy_version for i, g in enumerate(groups)
                if guard is None or self.acc is not None or i not in guard.rejected]
        metrics["staleness_hist"] = dict(Counter(lags))
        if self.is_main and self.eval_prompts is not None and (self.state.step % self.cfg.eval_every == 0
                                                               or self.state.step == self.cfg.max_steps):
            metrics.update(self.evaluate())
            self.last_eval = metrics["eval_accuracy"]
        self.metrics.write(self.state.step, metrics)
        every = self.cfg.log_completions_every
        if self.is_main and every > 0 and self.state.step % every == 0 and self.recent_completions:
            self.metrics.write_table(self.state.step, "completions",
                                     ["policy_version", "prompt", "completion", "reward", *self.rewards.names],
                                     list(self.recent_completions))
        self.last_metrics = metrics
        if self.state.step % self.cfg.checkpoint_every == 0 or self.state.step >= self.cfg.max_steps:
            self.checkpoint()
        return metrics

    def checkpoint(self) -> None:
        self.state.counters = {"counters": dict(self.counters), "rejections": dict(self.rejections)}
        save_checkpoint(self.run_dir, self.model, self.tokenizer, self.optimizer, self.state,
                        scheduler=self.lr_scheduler, accelerator=self.acc, scaler=self.precision.scaler)
        if self.swarm is not None:  # the groups trained up to this step are safe in it: their bytes can go
            self.swarm.inbox.covered(self.state.step)

    def close(self) -> None:
        self.intake.close()
        self.rewards.close()
        self.metrics.close()
        self.status.close()
        if self.swarm is not None:
            self.swarm.shutdown()

    # ---------------------------------------------------------------------------------------------------------
    # online mode

    def run_online(self) -> None:
        """Sample with the current policy, score, train: zero staleness by construction."""
        params = self.run_info().sampling_params()
        rng = random.Random(self.cfg.seed + 1_000_003 * self.state.step)
        while self.state.step < self.cfg.max_steps and not self.stop.requested:
            t0 = time.perf_counter()
            # Every rank draws the same indices and samples its own share of them with the (identical) policy.
            indices = self._my_share([rng.randrange(len(self.prompts)) for _ in range(self.cfg.groups_per_step)])
            prompts = [list(self.prompt_ids(i)) for i in indices]
            sampling = dataclasses.replace(params, seed=self.cfg.seed * 7919 + self.state.step)
            with self.precision.autocast():
                generated = generate_groups(self.model, prompts, sampling, eos=self.tokenizer, pad_token_id=self.pad_id)
            self.model.train()
            t_sample = time.perf_counter() - t0
            groups, accuracies = [], []
            for index, gen in zip(indices, generated):
                group, acc = self.score(index, gen.prompt_ids, gen.completion_ids, gen.logprobs, self.version)
                groups.append(group)
                accuracies.extend(acc)
            m = self.train(groups, accuracies, {"sample_time_s": t_sample, "groups_accepted": len(groups)},
                           sharded=True)
            self._status(m)

    # ---------------------------------------------------------------------------------------------------------
    # swarm mode

    def _validate(self, data: bytes) -> RolloutGroup:
        """Runs in the swarm's validation thread for every pushed message; raising rejects it with the reason."""
        if self.intake.is_banned(read_sender(data)):  # before paying for the signature
            raise ProtocolError(Reason.BANNED, "this sampler failed a check and is banned by this learner")
        group = self.validator.validate(data)
        expected = assign_prompt_index(group.sampler, group.seq, len(self.prompts))
        if group.prompt_index != expected:
            self.rejections["prompt_not_assigned"] += 1  # counted here: the validator already passed it
            raise ProtocolError(Reason.PROMPT_MISMATCH,
                                f"sequence {group.seq} was assigned prompt {expected}, not {group.prompt_index}")
        return group

    def _prompt_matches(self, index: int, digest: bytes) -> bool:
        return 0 <= index < len(self.prompts) and self.prompt_digest(index) == digest

    def publish(self) -> None:
        from protocol.records import milli_counters

        adapter = None
        if self.adapter_versions is not None and self.adapter_versions.base is not None:  # --publish-adapter
            (tensors, adapter), files = self.adapter_versions.tensors(self.model), None
        else:
            tensors = ps.published_tensors(self.model, self.publish_dtype)  # master weights (LoRA: merged), rounded
            files = {**policy_files(self.model, self.tokenizer), **run_file(self.run_info().to_json())}
        t0 = time.perf_counter()
        self.swarm.report(step=self.state.step, stale=self.counters["dropped_stale"],  # heartbeat: node.monitor
                          tokens=self.counters["tokens_trained"], banned=len(self.intake.bans.bans),
                          rejected=self.swarm.stats().get("rejected", 0) + self.intake.rejected_total(),
                          **milli_counters(reward_mean=self.last_metrics.get("reward_mean"),
                                           staleness_mean=self.last_metrics.get("staleness_mean"),
                                           eval_accuracy=self.last_eval))
        self.intake.published(self.version, self.model)
        guard = self.publish_guard
        guard.before_visible(self.version)  # write-ahead: a kill from here on never lets this number be reused
        data = self.swarm.publish_state(self.version, tensors, files=files, adapter=adapter,
                                        parent=self.version - self.cfg.publish_every if self.version else None)
        guard.after_visible(self.version)
        if self.adapter_versions is not None:
            from protocol.manifest import manifest_digest

            self.adapter_versions.published(self.version, manifest_digest(data), self.model)
        self.counters["published"] += 1
        log.debug("published version %d in %.2fs", self.version, time.perf_counter() - t0)

    def _broadcast(self, obj: Any) -> Any:
        """The main rank's `obj` on every rank (the step's groups travel this way to the other GPUs)."""
        if self.acc is None:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _follow(self) -> None:
        """Non-main ranks: train on each step's share until the main rank says stop (None)."""
        while (batch := self._broadcast(None)) is not None:
            self.train(*batch)

    def run_swarm(self) -> None:
        if not self.is_main:
            return self._follow()
        try:
            self._lead_swarm()
        finally:
            self._broadcast(None)

    def make_validator(self, run_id: str) -> Any:
        from protocol.validate import RolloutValidator, ValidatorConfig

        self.validator = RolloutValidator(
            ValidatorConfig(run_id=run_id, vocab_size=len(self.tokenizer),
                            max_completion_tokens=self.cfg.max_new_tokens, group_size=self.cfg.group_size,
                            max_staleness=self.cfg.max_staleness),
            current_version=lambda: self.version,
            prompt_check=self._prompt_matches,
        )
        return self.validator

    def _lead_swarm(self) -> None:
        from node.learner_swarm import LearnerSwarm

        self.make_validator(self.swarm_cfg.run_id)
        self.swarm = LearnerSwarm(self.swarm_cfg, validate=self._validate, resumed_from=self.state.step)
        self.swarm.start(print_join=True)
        if self.intake_cfg.verify_fraction > 0 or self.intake_cfg.verify_first > 0:
            self.intake.start_verifier(self.model, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, self.pad_id)
        self.publish()
        pending: list[tuple[ScoredGroup, list[float], str]] = []
        last_rollout = time.monotonic()
        while self.state.step < self.cfg.max_steps and not self.stop.requested:
            # Take only what this step still needs: the rest waits in the bounded inbox, whose "busy" answers
            # hold the samplers back instead of letting a backlog (and its staleness) grow here.
            if banned := self.intake.poll():  # a spot-check failed: what that sampler still has queued goes
                kept = [p for p in pending if p[0].tag[0] not in banned]
                self.intake.counts["dropped_banned"] += len(pending) - len(kept)
                for p in pending:
                    if p[0].tag[0] in banned:
                        self.swarm.inbox.dropped(p[0].tag[2], "banned")
                pending = kept
                for key in banned:  # and its standing in the inbox shares (node/fairness.py)
                    self.swarm.forget_key(bytes.fromhex(key))
            need = max(1, self.cfg.groups_per_step - len(pending))
            pause_point("learner:before_take", self.state.step)
            for accepted in self.swarm.get_rollouts(max_items=need, timeout=0.5):
                last_rollout = time.monotonic()
                if why := self._take(accepted.item, pending, accepted.seq):
                    self.swarm.inbox.dropped(accepted.seq, why)
            if len(pending) >= self.cfg.groups_per_step:
                batch, pending = pending[: self.cfg.groups_per_step], pending[self.cfg.groups_per_step:]
                groups = [g for g, _, _ in batch]
                accuracies = [a for _, acc, _ in batch for a in acc]
                extra = self._swarm_metrics(batch)
                pause_point("learner:before_train", self.state.step + 1, until=lambda: self.stop.requested)
                if self.stop.requested:  # a clean stop: the batch stays held in the inbox for the next life
                    break
                self._broadcast((groups, accuracies, extra))
                m = self.train(groups, accuracies, extra)
                if self.state.step % self.cfg.publish_every == 0 or self.state.step >= self.cfg.max_steps:
                    self.publish()
                self._status(m)
            elif self.cfg.wait_timeout and time.monotonic() - last_rollout > self.cfg.wait_timeout:
                raise TimeoutError(f"no rollout arrived for {self.cfg.wait_timeout:.0f}s; is any sampler attached?")
            else:
                self._status(None)

    def _take(self, group: RolloutGroup, pending: list, entry: int = -1) -> str | None:
        """Drop a group that went stale while it waited (returns why it was dropped); score the rest. ``entry``: the
        group's inbox id (``Accepted.seq``), kept in its tag for the journal."""
        if self.intake.drop_if_banned(group.sampler):
            return "banned"
        sampler = group.sampler.hex()[:8]
        lag = self.version - group.policy_version
        if lag > self.cfg.max_staleness:
            self.counters["dropped_stale"] += 1
            self.sampler_stats[sampler]["stale"] += 1
            return "stale"
        try:
            scored, acc = self.score(group.prompt_index, group.prompt_ids.tolist(),
                                     [c.tolist() for c in group.completions()],
                                     [lp.tolist() for lp in group.completion_logprobs()], group.policy_version)
        except Exception as exc:  # noqa: BLE001 - one group's failure drops that group, never the learner
            self.intake.counts["scoring_failed"] += 1
            log.warning("dropped group #%d of %s: scoring failed: %r", group.seq, sampler, exc)
            return "scoring_failed"
        scored.tag = (group.sampler.hex(), group.seq, entry)
        self.intake.accepted(group)
        self.counters["groups_accepted"] += 1
        stats = self.sampler_stats[sampler]
        stats["accepted"] += 1
        stats["tokens"] += int(group.completion_lens.sum())
        stats["lag_sum"] += lag
        pending.append((scored, acc, sampler))
        return None

    def _swarm_metrics(self, batch: list) -> dict[str, Any]:
        rejections = {k: v for k, v in self.validator.counts().items() if k != "accepted"}
        rejections.update(self.rejections)
        rejections.update(self.intake.rejections())
        swarm = self.swarm.stats()
        per_sampler = Counter(s for _, _, s in batch)
        return {
            "groups_accepted_total": self.counters["groups_accepted"],
            "groups_dropped_stale_total": self.counters["dropped_stale"],
            "rejections": rejections,
            "samplers_in_step": dict(per_sampler),
            **self.sampler_stats.metrics(),  # sampler_delta (+ sampler_totals every 50 lines)
            "bytes_uploaded": swarm.get("bytes_uploaded", 0),
            "inbox": swarm.get("inbox", 0),
            "spot_checks": self.intake.checks(),
        }

    # ---------------------------------------------------------------------------------------------------------

    def _status(self, m: dict[str, Any] | None) -> None:
        ev = f" eval {self.last_eval:.2f}" if self.last_eval is not None else ""
        line = f"step {self.state.step}/{self.cfg.max_steps} v{self.version}{ev}"
        if m is not None:
            line += (f" reward {m['reward_mean']:.2f} loss {m['loss']:+.4f} lag {m.get('staleness_mean', 0):.1f}"
                     f" {m['step_time_s']:.1f}s/step")
        if self.swarm is not None:
            line += (f" | accepted {self.counters['groups_accepted']} stale {self.counters['dropped_stale']}"
                     f" rejected {self._rejected_total()}"
                     f" samplers {len(self.sampler_stats)}")
        self.status.update(line)

    def _rejected_total(self) -> int:
        if not hasattr(self, "validator"):
            return 0
        return (sum(self.validator.rejections.values()) + sum(self.rejections.values())
                + self.intake.rejected_total())

    def run(self) -> None:
        if self.state.step >= self.cfg.max_steps:
            log.info("already at step %d >= --max-steps %d; nothing to do", self.state.step, self.cfg.max_steps)
            return
        if self.is_main and self.eval_prompts is not None and self.state.step == 0:
            before = self.evaluate()
            self.last_eval = before["eval_accuracy"]
            self.metrics.write(0, {**before, "policy_version": 0})
            log.info("held-out accuracy before training: %.3f", self.last_eval)
        if self.cfg.online:
            self.run_online()
        else:
            self.run_swarm()


def _accelerator(device: str, dtype: str) -> Any:
    from accelerate import Accelerator

    from node.policy_setup import accelerate_mixed_precision

    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=accelerate_mixed_precision(dtype, "cpu" if cpu else "cuda"))


def main(argv: list[str] | None = None) -> int:
    """Exit status: node/errors.py (0 done, 2 usage, 3 no sampler/peer reachable, 130 interrupted)."""
    from node.config import SwarmConfig

    args = parse_with_recipe(build_parser(), argv)
    try:  # every flag is checked before torch, the model or the swarm load
        cfg = dataclass_from_args(LearnerConfig, args)
        loss = dataclass_from_args(LossConfig, args)
        data = dataclass_from_args(DataConfig, args, prefix="data_")
        intake = dataclass_from_args(IntakeConfig, args)
        policy = dataclass_from_args(PolicyConfig, args)
        swarm_cfg = SwarmConfig.from_args(args)
        if not cfg.resume:
            check_model(cfg.model)
        check_dataset(data.source)
        if not cfg.online:
            check_swarm_args(swarm_cfg.peers, swarm_cfg.host_maddrs, swarm_cfg.announce_maddrs)
    except (ValueError, DataError) as exc:  # ConfigError is a ValueError
        return fail(exc, EXIT_USAGE)
    setup_process(args)
    quiet_transformers()
    stop = GracefulStop().install()
    if swarm_cfg.state_dir is None:
        swarm_cfg = swarm_cfg.replace(state_dir=str(Path(cfg.run_dir) / "swarm"))
    swarm_cfg = swarm_cfg.with_defaults_for_state_dir()
    swarm_cfg = swarm_cfg.replace(inbox_size=min(swarm_cfg.inbox_size, cfg.max_buffered_steps * cfg.groups_per_step))
    try:
        learner = Learner(cfg, loss, data, swarm_cfg, stop=stop, intake=intake, policy=policy)
    except (ValueError, DataError, ModelLoadError) as exc:  # a bad --model, --dataset or objective setting
        return fail(exc, EXIT_USAGE)
    except RewardWorkerError as exc:  # the reward workers could not be started (bounded by their start-up timeout)
        return fail(exc)
    try:
        learner.run()
        if stop.requested:
            log.info("stopped at step %d; writing a checkpoint", learner.state.step)
            learner.checkpoint()
            return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        log.warning("aborted at step %d without a checkpoint", learner.state.step)
        return EXIT_INTERRUPTED
    except (ConfigError, TimeoutError, BootstrapError) as exc:
        return fail(exc)
    finally:
        learner.close()
    log.info("done: step %d, policy version %d", learner.state.step, learner.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
