"""One learner update: the single place where learning happens.

The networked learner, its online mode and the staleness simulator all call `train_step`. It takes scored rollout
groups (one prompt and its G completions each, with the sampler's log-probs and the learner's own rewards), computes
group advantages over the whole step, recomputes the learner's log-probs in micro-batches, accumulates gradients of
the configured objective, clips and steps the optimizer.

Micro-batch layout (prompt left-padded, completion right-padded, so every completion starts at one column P):

    input_ids  (B, P + L)   [pad pad p0 p1 p2 | c0 c1 c2 pad]
    positions  (B, P + L)   counted over real tokens only, so left padding does not shift them
    logits     (B, L, V)    only the L positions that predict completion tokens are materialised
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from gepo.advantages import group_advantages
from gepo.config import LossConfig
from gepo.logprobs import token_entropy, token_logprobs
from gepo.objectives import compute_loss
from gepo.plausibility import TRAIN_ERROR, GroupGuard
from protocol.group_rules import group_problem
from gepo.precision import Precision


@dataclass
class ScoredGroup:
    """One prompt's G completions, verified and scored by the learner.

    prompt_ids:        (P,) prompt token ids
    completion_ids:    G lists of (L_i,) sampled token ids (EOS included when generation stopped)
    sampler_logprobs:  G lists of (L_i,) log q of each sampled token, temperature-scaled, as the sampler drew it
    rewards:           (G,) rewards the learner computed itself
    policy_version:    version of the policy the completions were sampled with
    """

    prompt_ids: Sequence[int]
    completion_ids: Sequence[Sequence[int]]
    sampler_logprobs: Sequence[Sequence[float]]
    rewards: Sequence[float]
    policy_version: int = 0

    tag: Any = None
    """Who sent it (the learner's records use it); the trainer ignores it."""

    def __post_init__(self) -> None:
        if len(self.rewards) != len(self.completion_ids):
            raise ValueError(f"group has {len(self.completion_ids)} completions but {len(self.rewards)} rewards")
        if not all(math.isfinite(r) for r in self.rewards):
            raise ValueError(f"rewards must be finite; got {list(self.rewards)[:8]}")
        # the one definition of a valid group intake applies too (protocol/group_rules.py)
        problem = group_problem(self.prompt_ids, self.completion_ids, self.sampler_logprobs)
        if problem is not None:
            raise ValueError(f"{problem[0].value}: {problem[1]}")

    @property
    def size(self) -> int:
        return len(self.completion_ids)


@dataclass
class TrainStepConfig:
    """How one optimizer step is computed (the objective itself lives in `loss`)."""

    loss: LossConfig = field(default_factory=LossConfig)
    micro_batch_rows: int = 16
    """Rows per forward/backward. Groups are kept whole for GEPO's per-prompt grouping, so a micro-batch may exceed
    this when one group alone is larger."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 disables clipping (the norm is still reported)."""
    shuffle_seed: int = 0
    """Seeds the row shuffle used by GEPO's official micro_batch grouping."""

    def __post_init__(self) -> None:
        if self.micro_batch_rows < 1:
            raise ValueError(f"micro_batch_rows must be >= 1, got {self.micro_batch_rows}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class _Row:
    prompt: Sequence[int]
    completion: Sequence[int]
    sampler_logprobs: Sequence[float]
    advantage: float
    group: int


def _plan_micro_batches(rows: list[_Row], cfg: TrainStepConfig, step_index: int) -> list[list[_Row]]:
    """Split the step's rows into micro-batches.

    With GEPO's default per-prompt grouping (and for every other loss, which is indifferent) a group never straddles
    two micro-batches. The official code's grouping instead shuffles rows and lets each block of rows form a group.
    """
    loss = cfg.loss
    if loss.loss_type == "gepo" and loss.gepo_grouping == "micro_batch":
        rows = rows[:]
        random.Random(f"{cfg.shuffle_seed}:{step_index}").shuffle(rows)
        return [rows[i : i + cfg.micro_batch_rows] for i in range(0, len(rows), cfg.micro_batch_rows)]
    batches: list[list[_Row]] = []
    current: list[_Row] = []
    for group_rows in _rows_by_group(rows):
        if current and len(current) + len(group_rows) > cfg.micro_batch_rows:
            batches.append(current)
            current = []
        current.extend(group_rows)
    if current:
        batches.append(current)
    return batches


def _rows_by_group(rows: list[_Row]) -> list[list[_Row]]:
    by_group: dict[int, list[_Row]] = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row)
    return list(by_group.values())


def _collate(rows: list[_Row], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch in the layout described in the module docstring."""
    p = max(len(r.prompt) for r in rows)
    l = max(len(r.completion) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, p + l), pad_id, dtype=torch.long)
    attention = torch.zeros((b, p + l), dtype=torch.long)
    completion = torch.full((b, l), pad_id, dtype=torch.long)
    mask = torch.zeros((b, l), dtype=torch.bool)
    sampler_lp = torch.zeros((b, l), dtype=torch.float32)
    for i, r in enumerate(rows):
        n_p, n_c = len(r.prompt), len(r.completion)
        input_ids[i, p - n_p : p] = torch.as_tensor(r.prompt, dtype=torch.long)
        input_ids[i, p : p + n_c] = torch.as_tensor(r.completion, dtype=torch.long)
        attention[i, p - n_p : p + n_c] = 1
        completion[i, :n_c] = input_ids[i, p : p + n_c]
        mask[i, :n_c] = True
        sampler_lp[i, :n_c] = torch.as_tensor(r.sampler_logprobs, dtype=torch.float32)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "position_ids": position_ids.to(device),
        "completion_ids": completion.to(device),
        "completion_mask": mask.to(device),
        "sampler_logprobs": sampler_lp.to(device),
        "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=device),
        "group_ids": torch.tensor([r.group for r in rows], dtype=torch.long, device=device),
    }


def completion_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L, V) logits at the positions that predict the completion tokens; nothing else is materialised."""
    l = batch["completion_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=l + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]


@torch.no_grad()
def recompute_logprobs(model: torch.nn.Module, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
                       temperature: float = 1.0, pad_token_id: int = 0) -> list[list[float]]:
    """log_softmax(logits / temperature) at each completion token, from one forward in the learner's layout.

    What a sampler whose engine does not report these (vLLM) attaches to its completions.
    """
    rows = [_Row(prompt_ids, c, [0.0] * len(c), 0.0, 0) for c in completions]
    batch = _collate(rows, pad_token_id, next(model.parameters()).device)
    lp = token_logprobs(completion_logits(model, batch), batch["completion_ids"], temperature)
    return [lp[i, : len(c)].float().cpu().tolist() for i, c in enumerate(completions)]


def _backward(loss: torch.Tensor, accelerator: Any | None, amp: Precision) -> None:
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        amp.backward(loss)  # scaled for fp16


def _keep_rows(batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in batch.items()}


def _renormalise(params: list[torch.Tensor], rows: list[_Row], kept_ids: set[int], by_tokens: bool) -> None:
    """Scale the gradient as if the step had been normalised by the rows (dapo: tokens) it kept, not all of them
    (exact for grpo, dr_grpo, dapo, gspo and gepo, which divide by step-wide counts; close for bnpo and delta_l,
    which normalise per micro-batch)."""
    size = (lambda r: len(r.completion)) if by_tokens else (lambda r: 1)
    total = sum(size(r) for r in rows)
    kept = sum(size(r) for r in rows if r.group in kept_ids)
    if kept:
        for p in params:
            p.grad.mul_(total / kept)


def _merge_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Combine micro-batch metrics: losses add up, maxima take the max, the rest is a row-weighted mean."""
    total_rows = sum(n for _, n in parts)
    merged: dict[str, float] = {}
    for key in parts[0][0]:
        values = [(m[key], n) for m, n in parts if key in m]
        if key == "loss" or key.startswith("num_"):
            merged[key] = sum(v for v, _ in values)
        elif key.endswith("_max"):
            merged[key] = max(v for v, _ in values)
        else:
            merged[key] = sum(v * n for v, n in values) / max(total_rows, 1)
    return merged


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[ScoredGroup],
    cfg: TrainStepConfig,
    *,
    pad_token_id: int = 0,
    ref_model: torch.nn.Module | None = None,
    current_version: int | None = None,
    lr_scheduler: Any | None = None,
    accelerator: Any | None = None,
    step_index: int = 0,
    guard: GroupGuard | None = None,
    precision: Precision | None = None,
) -> dict[str, float]:
    """Perform one optimizer update on `groups` and return its metrics.

    Advantages are computed over the whole step (so "batch" std scaling sees every row); the loss of each micro-batch
    is normalised by step-wide row and token counts, so the accumulated gradient equals the full-batch gradient.
    With an `accelerate.Accelerator`, backward and clipping go through it and gradient sync happens only on the last
    micro-batch.

    With a `guard` (gepo/plausibility.py), groups whose sampler log-probs contradict the learner's own, and groups of
    a micro-batch whose loss raises ValueError, are dropped (listed in `guard.rejected` with the reason) and the step
    goes on with the rest; the gradient is rescaled to the rows kept and the metrics cover only those.
    `precision` runs the forward passes in its compute dtype over float32 master weights (autocast, and loss
    scaling for fp16); under an accelerator its own mixed_precision does that instead.
    """
    if not groups:
        raise ValueError("train_step needs at least one group")
    loss_cfg = cfg.loss
    if loss_cfg.beta > 0 and ref_model is None:
        raise ValueError("loss.beta > 0 needs a ref_model")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    amp = precision or Precision()  # float32: no autocast, no scaling

    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    group_ids = torch.tensor([gi for gi, g in enumerate(groups) for _ in range(g.size)], dtype=torch.long)
    advantages = group_advantages(rewards, group_ids, loss_cfg.resolved_advantage_std())
    rows: list[_Row] = []
    k = 0
    for gi, g in enumerate(groups):
        for ids, lps in zip(g.completion_ids, g.sampler_logprobs):
            rows.append(_Row(g.prompt_ids, ids, lps, float(advantages[k]), gi))
            k += 1

    chunk = loss_cfg.logprob_chunk_rows
    micro_batches = _plan_micro_batches(rows, cfg, step_index)
    step_rows = len(rows)
    step_tokens = sum(len(r.completion) for r in rows)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    parts: list[tuple[dict[str, float], int]] = []
    for mb_index, mb_rows in enumerate(micro_batches):
        batch = _collate(mb_rows, pad_token_id, device)
        last = mb_index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if accelerator is None or last else accelerator.no_sync(model)
        with sync:
            with amp.autocast():
                logits = completion_logits(model, batch)
            logp = token_logprobs(logits, batch["completion_ids"], loss_cfg.temperature, chunk)
            if guard is not None:
                keep = guard.screen(logp, batch["sampler_logprobs"], batch["completion_mask"], batch["group_ids"])
                if not keep.all():
                    batch, logits, logp = _keep_rows(batch, keep), logits[keep], logp[keep]
                    mb_rows = [r for r, k in zip(mb_rows, keep.tolist()) if k]
                if not mb_rows:  # still a backward, so that DDP's gradient sync happens on every rank
                    _backward(logp.sum() * 0.0, accelerator, amp)
                    continue
            ref_logp = None
            if loss_cfg.beta > 0:
                with torch.no_grad(), amp.autocast():
                    ref_logits = completion_logits(ref_model, batch)
                    ref_logp = token_logprobs(ref_logits, batch["completion_ids"], loss_cfg.temperature, chunk)
            try:
                loss, metrics = compute_loss(
                    logp,
                    batch["sampler_logprobs"],
                    batch["completion_mask"],
                    batch["advantages"],
                    batch["group_ids"],
                    loss_cfg,
                    ref_logp,
                    step_rows=step_rows,
                    step_tokens=step_tokens,
                    num_micro_batches=len(micro_batches),
                )
            except ValueError as e:
                if guard is None:
                    raise
                guard.reject(batch["group_ids"].tolist(), TRAIN_ERROR, str(e)[:200])
                _backward(logp.sum() * 0.0, accelerator, amp)
                continue
            mask = batch["completion_mask"]
            entropy = token_entropy(logits.detach(), mask, loss_cfg.temperature, chunk)
            metrics["entropy"] = float(entropy.sum() / mask.sum())
            _backward(loss, accelerator, amp)
        del logits, logp, loss
        parts.append((metrics, len(mb_rows)))

    params = [p for p in model.parameters() if p.grad is not None]
    kept = [g for gi, g in enumerate(groups) if guard is None or gi not in guard.rejected]
    if len(kept) < len(groups):
        _renormalise(params, rows, kept_ids={gi for gi in range(len(groups)) if gi not in guard.rejected},
                     by_tokens=loss_cfg.resolved_aggregation() == "dapo")
    clip_to = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses (a scheduler moves it on below)
    amp.unscale_(optimizer)
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(params, clip_to)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_to)
    grad_norm = float(grad_norm)
    if not math.isfinite(grad_norm) or not kept:
        # A non-finite gradient would poison the weights that get published to the whole swarm: skip the update
        # (and with every group dropped there is nothing to learn from: no momentum or weight-decay step either).
        optimizer.zero_grad(set_to_none=True)
        amp.skip()
        skipped = float(bool(kept))
    else:
        amp.step(optimizer)
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        skipped = 0.0

    metrics = _merge_metrics(parts) if parts else {"loss": 0.0}
    kept_rewards = torch.tensor([r for g in kept for r in g.rewards], dtype=torch.float32)
    metrics.update(
        grad_norm=grad_norm,
        skipped_nonfinite=skipped,
        reward_mean=float(kept_rewards.mean()) if kept else 0.0,
        reward_std=float(kept_rewards.std(unbiased=False)) if kept else 0.0,
        num_groups=float(len(kept)),
        num_rows=float(sum(g.size for g in kept)),
        num_tokens=float(sum(len(c) for g in kept for c in g.completion_ids)),
        num_micro_batches=float(len(micro_batches)),
        lr=lr,
        step_time_s=time.perf_counter() - t0,
    )
    if guard is not None:
        metrics["num_rejected_groups"] = float(len(groups) - len(kept))
    if current_version is not None and kept:
        lags = torch.tensor([current_version - g.policy_version for g in kept], dtype=torch.float32)
        metrics.update(staleness_mean=float(lags.mean()), staleness_max=float(lags.max()))
    return metrics
