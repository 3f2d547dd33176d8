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
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from gepo.config import LossConfig
from gepo.data import DataConfig, DataError, PromptSet, assign_prompt_index, format_prompt, load_prompts
from gepo.rewards import RewardConfig, RewardScorer
from gepo.sampling import generate_groups, greedy_completions
from gepo.train_step import ScoredGroup, TrainStepConfig, train_step
from node.checkpoint import RunState, latest_checkpoint, load_optimizer, load_run_state, save_checkpoint
from node.dht import BootstrapError, ConfigError
from node.cli import add_dataclass_args, add_process_args, dataclass_from_args, option, parse_with_recipe, setup_process
from node.metrics import GracefulStop, MetricsWriter, StatusLine, quiet_transformers
from node.model_io import ModelLoadError, policy_files, resolve_device, resolve_dtype, run_file
from node import policy_setup as ps
from node.policy_setup import PolicyConfig
from node.run_info import QuestionSet, RunInfo
from protocol.errors import ProtocolError, Reason
from protocol.rollout import RolloutGroup, prompt_hash

log = logging.getLogger("node.learner")


@dataclass
class LearnerConfig:
    model: str | None = option(None, "model folder or hub id (default: the built-in tiny policy)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = option("auto", "compute dtype (autocast over fp32 master weights): float32, bfloat16, float16 "
                                "(with loss scaling) or auto (bf16 on a GPU that has it, else fp32)")
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
    eval_every: int = option(20, "held-out greedy accuracy every N steps (0: off)")
    eval_size: int = option(200, "held-out problems per evaluation")
    temperature: float = option(1.0, "sampling temperature, imposed on samplers and used by the loss")
    top_p: float = option(1.0, "nucleus sampling mass imposed on samplers")
    top_k: int = option(0, "top-k imposed on samplers (0: off)")
    max_new_tokens: int = option(16, "completion length cap (also the loss's max_completion_length)")
    system_prompt: str | None = option(None, "system prompt for chat-template models")
    accuracy_weight: float = option(1.0, "reward = accuracy_weight * correct + format_weight * well-formed")
    format_weight: float = option(0.0, "weight of the <think>...</think><answer>...</answer> format reward")
    reward_workers: int = option(2, "math-verify worker processes")
    wait_timeout: float = option(0.0, "swarm mode: give up after this many seconds without any rollout (0: never)")
    seed: int = option(0, "seed for the model-side randomness (online sampling, shuffles)")
    tensorboard: bool = option(True, "also write TensorBoard scalars")


def build_parser() -> argparse.ArgumentParser:
    from node.config import SwarmConfig

    parser = argparse.ArgumentParser(
        prog="python -m node.learner",
        description="The gepo-swarm learner: verifies rollouts from the swarm, trains with GEPO (or another "
                    "objective) and publishes new policy versions.",
    )
    add_process_args(parser)
    add_dataclass_args(parser, LearnerConfig, "learner")
    add_dataclass_args(parser, PolicyConfig, "policy: precision, reference, schedule, LoRA (node.policy_setup)")
    add_dataclass_args(parser, LossConfig, "objective (gepo.config.LossConfig)", rename={"loss_type": "loss"},
                       skip=("temperature", "max_completion_length"))
    add_dataclass_args(parser, DataConfig, "prompt data (gepo.data.DataConfig)", prefix="data_",
                       rename={"source": "dataset"})
    SwarmConfig.add_argparse_args(parser)
    return parser


class Learner:
    """Model, optimizer, prompts, rewards and bookkeeping; `run()` picks the rollout source."""

    def __init__(self, cfg: LearnerConfig, loss: LossConfig, data: DataConfig, swarm_cfg: Any = None,
                 stop: GracefulStop | None = None, policy: PolicyConfig | None = None) -> None:
        from gepo.precision import Precision

        self.cfg = cfg
        self.policy_cfg = policy = policy or PolicyConfig()
        self.loss = dataclasses.replace(loss, temperature=cfg.temperature, max_completion_length=cfg.max_new_tokens)
        self.data_cfg = data
        self.swarm_cfg = swarm_cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)

        # Under `accelerate launch` / torchrun (WORLD_SIZE > 1) every rank trains on its share of each step's
        # groups (DDP, or DeepSpeed ZeRO-2 from an accelerate config); only the main rank is on the swarm.
        self.acc = _accelerator(cfg.device, cfg.dtype) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        self.is_main = self.acc is None or self.acc.is_main_process
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one rank speaks for the run
        self.device = str(self.acc.device) if self.acc is not None else resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device) if self.acc is None else ps.accelerator_compute_dtype(self.acc)
        # fp32 master weights with autocast here; under accelerate its mixed_precision (DeepSpeed: its fp32 copy).
        self.precision = Precision.for_device(self.device, dtype) if self.acc is None else Precision()
        self.publish_dtype = ps.resolve_publish_dtype(policy.publish_dtype, self.device, dtype)
        self.state = RunState()
        checkpoint = latest_checkpoint(self.run_dir) if cfg.resume else None
        if cfg.resume and checkpoint is None:
            log.warning("--resume: no checkpoint in %s, starting fresh", self.run_dir)
        self.model, self.tokenizer = ps.build_policy(policy, cfg.model, checkpoint, self.device, dtype)
        self.model.config.use_cache = False
        self.optimizer = self._make_optimizer()
        self.lr_scheduler = ps.build_scheduler(policy, self.optimizer, cfg.max_steps)
        if checkpoint:
            load_optimizer(checkpoint, self.optimizer, self.lr_scheduler, accelerator=self.acc)
            self.state = load_run_state(checkpoint)
            log.info("resumed from %s at step %d, policy version %d", checkpoint, self.state.step,
                     self.state.policy_version)
            published = self._last_published()
            if published is not None and published > self.state.policy_version:
                # Versions after the checkpoint were published with weights that are now lost: numbering them
                # again would give samplers two different policies under one version.
                log.warning("versions up to %d were published after this checkpoint; continuing at version %d",
                            published, published + 1)
                self.state.policy_version = published + 1
        self.counters: Counter = Counter(self.state.counters.get("counters", {}))
        self.rejections: Counter = Counter(self.state.counters.get("rejections", {}))

        self.prompts: PromptSet = load_prompts(data)
        self.prompts, self.prompts_skipped = ps.drop_long_prompts(self.prompts, self.tokenizer, cfg.system_prompt,
                                                                  policy.max_prompt_length)
        self.eval_prompts: PromptSet | None = None
        if cfg.eval_every > 0 and data.source == "synthetic":
            self.eval_prompts = load_prompts(dataclasses.replace(data, split="test", max_examples=cfg.eval_size))
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
        self.scorer = RewardScorer(RewardConfig(accuracy_weight=cfg.accuracy_weight, format_weight=cfg.format_weight,
                                                num_workers=cfg.reward_workers))
        self.scorer.warm_up()
        self.step_cfg = TrainStepConfig(loss=self.loss, micro_batch_rows=cfg.micro_batch_rows,
                                        max_grad_norm=cfg.max_grad_norm, shuffle_seed=cfg.seed)
        self.metrics = MetricsWriter(self.run_dir if self.is_main else self.run_dir / f"rank{self.acc.process_index}",
                                     tensorboard=cfg.tensorboard and self.is_main)
        self.status = StatusLine(quiet=not self.is_main)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._tokenizer_lock = threading.Lock()  # HF tokenizers are not safe to share across threads
        self.sampler_stats: dict[str, Counter] = defaultdict(Counter)
        self.last_eval: float | None = None
        self.swarm = None
        self.stop = stop or GracefulStop()
        self.prompt_ids = functools.lru_cache(maxsize=65536)(self._prompt_ids)

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

    def _prompt_ids(self, index: int) -> tuple[int, ...]:
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
        gold = self.prompts[prompt_index].answer
        results = self.scorer.score(texts, [gold] * len(texts))
        group = ScoredGroup(list(prompt_ids), [list(c) for c in completions], [list(lp) for lp in logprobs],
                            [r.total for r in results], version)
        return group, [r.accuracy for r in results]

    def evaluate(self) -> float:
        assert self.eval_prompts is not None
        questions = [ex.question for ex in self.eval_prompts]
        with self._tokenizer_lock, self.precision.autocast():
            texts = greedy_completions(self.model, self.tokenizer, questions, max_new_tokens=self.cfg.max_new_tokens,
                                       system_prompt=self.cfg.system_prompt)
        results = self.scorer.score(texts, [ex.answer for ex in self.eval_prompts])
        return sum(r.accuracy for r in results) / len(results)

    def _my_share(self, items: list) -> list:
        return items if self.acc is None else items[self.acc.process_index :: self.acc.num_processes]

    def train(self, groups: list[ScoredGroup], accuracies: list[float], extra: dict[str, float],
              sharded: bool = False) -> dict[str, float]:
        """One optimizer step on `groups` (all of the step's groups, or this rank's share when `sharded`)."""
        mine = groups if sharded else self._my_share(groups)
        metrics = train_step(self.train_model, self.optimizer, mine, self.step_cfg, pad_token_id=self.pad_id,
                             current_version=self.version, step_index=self.state.step, accelerator=self.acc,
                             ref_model=self.ref_model, lr_scheduler=self.lr_scheduler, precision=self.precision)
        self.state.step += 1
        self.state.policy_version += 1
        self.counters["tokens_trained"] += sum(len(c) for g in mine for c in g.completion_ids)
        metrics["accuracy"] = float(np.mean(accuracies)) if accuracies else 0.0
        metrics["policy_version"] = self.version
        if self.policy_cfg.max_prompt_length:
            metrics["prompts_skipped_too_long"] = self.prompts_skipped
        metrics.update(extra)
        lags = [self.version - 1 - g.policy_version for g in groups]
        metrics["staleness_hist"] = dict(Counter(lags))
        if self.is_main and self.eval_prompts is not None and (self.state.step % self.cfg.eval_every == 0
                                                               or self.state.step == self.cfg.max_steps):
            self.last_eval = self.evaluate()
            metrics["eval_accuracy"] = self.last_eval
        self.metrics.write(self.state.step, metrics)
        if self.state.step % self.cfg.checkpoint_every == 0 or self.state.step >= self.cfg.max_steps:
            self.checkpoint()
        return metrics

    def checkpoint(self) -> None:
        self.state.counters = {"counters": dict(self.counters), "rejections": dict(self.rejections)}
        save_checkpoint(self.run_dir, self.model, self.tokenizer, self.optimizer, self.state,
                        scheduler=self.lr_scheduler, accelerator=self.acc)

    def close(self) -> None:
        self.scorer.close()
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
        group = self.validator.validate(data)
        expected = assign_prompt_index(group.sampler, group.seq, len(self.prompts))
        if group.prompt_index != expected:
            self.rejections["prompt_not_assigned"] += 1  # counted here: the validator already passed it
            raise ProtocolError(Reason.PROMPT_MISMATCH,
                                f"sequence {group.seq} was assigned prompt {expected}, not {group.prompt_index}")
        return group

    def _prompt_matches(self, index: int, digest: bytes) -> bool:
        return 0 <= index < len(self.prompts) and prompt_hash(self.prompt_ids(index)) == digest

    def _last_published(self) -> int | None:
        marker = self.run_dir / "published_version"
        return int(marker.read_text()) if marker.is_file() else None

    def publish(self) -> None:
        tensors = ps.published_tensors(self.model, self.publish_dtype)  # master weights (LoRA: merged), rounded
        files = {**policy_files(self.model, self.tokenizer), **run_file(self.run_info().to_json())}
        t0 = time.perf_counter()
        self.swarm.report(step=self.state.step, stale=self.counters["dropped_stale"],  # heartbeat: node.monitor
                          tokens=self.counters["tokens_trained"])
        self.swarm.publish_state(self.version, tensors, files=files,
                                 parent=self.version - self.cfg.publish_every if self.version else None)
        self.counters["published"] += 1
        marker = self.run_dir / "published_version"
        marker.with_suffix(".tmp").write_text(str(self.version))
        os.replace(marker.with_suffix(".tmp"), marker)
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

    def _lead_swarm(self) -> None:
        from node.learner_swarm import LearnerSwarm
        from protocol.validate import RolloutValidator, ValidatorConfig

        self.validator = RolloutValidator(
            ValidatorConfig(run_id=self.swarm_cfg.run_id, vocab_size=len(self.tokenizer),
                            max_completion_tokens=self.cfg.max_new_tokens, group_size=self.cfg.group_size,
                            max_staleness=self.cfg.max_staleness, logprob_tolerance=1e-4),
            current_version=lambda: self.version,
            prompt_check=self._prompt_matches,
        )
        self.swarm = LearnerSwarm(self.swarm_cfg, validate=self._validate)
        self.swarm.start(print_join=True)
        self.publish()
        pending: list[tuple[ScoredGroup, list[float], str]] = []
        last_rollout = time.monotonic()
        while self.state.step < self.cfg.max_steps and not self.stop.requested:
            # Take only what this step still needs: the rest waits in the bounded inbox, whose "busy" answers
            # hold the samplers back instead of letting a backlog (and its staleness) grow here.
            need = max(1, self.cfg.groups_per_step - len(pending))
            for accepted in self.swarm.get_rollouts(max_items=need, timeout=0.5):
                last_rollout = time.monotonic()
                self._take(accepted.item, pending)
            if len(pending) >= self.cfg.groups_per_step:
                batch, pending = pending[: self.cfg.groups_per_step], pending[self.cfg.groups_per_step:]
                groups = [g for g, _, _ in batch]
                accuracies = [a for _, acc, _ in batch for a in acc]
                extra = self._swarm_metrics(batch)
                self._broadcast((groups, accuracies, extra))
                m = self.train(groups, accuracies, extra)
                if self.state.step % self.cfg.publish_every == 0 or self.state.step >= self.cfg.max_steps:
                    self.publish()
                self._status(m)
            elif self.cfg.wait_timeout and time.monotonic() - last_rollout > self.cfg.wait_timeout:
                raise TimeoutError(f"no rollout arrived for {self.cfg.wait_timeout:.0f}s; is any sampler attached?")
            else:
                self._status(None)

    def _take(self, group: RolloutGroup, pending: list) -> None:
        """Drop a group that went stale while it waited; score the rest."""
        sampler = group.sampler.hex()[:8]
        lag = self.version - group.policy_version
        if lag > self.cfg.max_staleness:
            self.counters["dropped_stale"] += 1
            self.sampler_stats[sampler]["stale"] += 1
            return
        scored, acc = self.score(group.prompt_index, group.prompt_ids.tolist(),
                                 [c.tolist() for c in group.completions()],
                                 [lp.tolist() for lp in group.completion_logprobs()], group.policy_version)
        self.counters["groups_accepted"] += 1
        stats = self.sampler_stats[sampler]
        stats["accepted"] += 1
        stats["tokens"] += int(group.completion_lens.sum())
        stats["lag_sum"] += lag
        pending.append((scored, acc, sampler))

    def _swarm_metrics(self, batch: list) -> dict[str, Any]:
        rejections = {k: v for k, v in self.validator.counts().items() if k != "accepted"}
        rejections.update(self.rejections)
        swarm = self.swarm.stats()
        per_sampler = Counter(s for _, _, s in batch)
        return {
            "groups_accepted_total": self.counters["groups_accepted"],
            "groups_dropped_stale_total": self.counters["dropped_stale"],
            "rejections": rejections,
            "samplers_in_step": dict(per_sampler),
            "sampler_totals": {k: dict(v) for k, v in self.sampler_stats.items()},
            "bytes_uploaded": swarm.get("bytes_uploaded", 0),
            "inbox": swarm.get("inbox", 0),
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
        return sum(self.validator.rejections.values()) + sum(self.rejections.values())

    def run(self) -> None:
        if self.state.step >= self.cfg.max_steps:
            log.info("already at step %d >= --max-steps %d; nothing to do", self.state.step, self.cfg.max_steps)
            return
        if self.is_main and self.eval_prompts is not None and self.state.step == 0:
            self.last_eval = self.evaluate()
            self.metrics.write(0, {"eval_accuracy": self.last_eval, "policy_version": 0})
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
    from node.config import SwarmConfig

    parser = build_parser()
    args = parse_with_recipe(parser, argv)
    setup_process(args)
    quiet_transformers()
    stop = GracefulStop().install()
    try:
        cfg = dataclass_from_args(LearnerConfig, args)
        loss = dataclass_from_args(LossConfig, args)
        data = dataclass_from_args(DataConfig, args, prefix="data_")
        policy = dataclass_from_args(PolicyConfig, args)
        swarm_cfg = SwarmConfig.from_args(args)
        if swarm_cfg.state_dir is None:
            swarm_cfg = swarm_cfg.replace(state_dir=str(Path(cfg.run_dir) / "swarm"))
        swarm_cfg = swarm_cfg.with_defaults_for_state_dir()
        swarm_cfg = swarm_cfg.replace(inbox_size=min(swarm_cfg.inbox_size, cfg.max_buffered_steps * cfg.groups_per_step))
        learner = Learner(cfg, loss, data, swarm_cfg, stop=stop, policy=policy)
    except (ValueError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        learner.run()
        if stop.requested:
            log.info("stopped at step %d; writing a checkpoint", learner.state.step)
            learner.checkpoint()
            return 130
    except KeyboardInterrupt:
        log.warning("aborted at step %d without a checkpoint", learner.state.step)
        return 130
    except (TimeoutError, ConfigError, BootstrapError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        learner.close()
    log.info("done: step %d, policy version %d", learner.state.step, learner.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
