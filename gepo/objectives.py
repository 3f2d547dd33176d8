"""Policy-optimization losses: GRPO, BNPO, Dr.GRPO, DAPO, GSPO, GEPO, ∆L, TIS, CISPO and M2PO (and IcePop masking),
as small pure functions.

Notation (docs/OBJECTIVES.md has the full story): p = learner (current) policy, q = sampler (behaviour, possibly
many versions stale) policy, logp / sampler_logp their per-token log-probs of the sampled completion (B, T),
mask (B, T) the completion tokens, L_i = tokens of row i, A_i = advantage of row i.

Every loss but TIS and CISPO is the PPO form per unit u (a token, or a row for sequence-level types):
    l_u = -min(w'_u A, clip(w_u, 1 - eps_low, 1 + eps_high) A),   w'_u = min(w_u, delta) if delta else w_u
(M2PO: the clip range comes from a second-moment budget each call), aggregated per loss type. TIS and CISPO put a
detached, truncated weight on the policy-gradient term: -sg(min(w, C)) A p/sg(p) and -sg(min(w, C)) A log p. `compute_loss` is written so that an optimizer step split into micro-batches gives, summed,
the loss of the whole step (pass step_rows / step_tokens / num_micro_batches); bnpo and ∆L normalise per
micro-batch as TRL and the official GEPO code do, so for them the sum equals the full-batch loss only when the
micro-batches have equal normalisers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gepo.advantages import group_index
from gepo.config import LossConfig
from protocol.group_rules import LOGPROB_SLACK

# Sampler log-probs above this are not log-probs: the one tolerance intake applies too (protocol/group_rules.py).
_LOGP_SLACK = LOGPROB_SLACK

# Log importance weights are capped here before exp. Beyond it the weight is e^40 ~ 2e17 and carries no gradient:
# without the cap, exp overflows float32 past 88, inf * 0 gives NaN gradients (even through clipping or delta, as
# clamp's zero gradient meets exp's infinite one), and such a ratio only comes from corrupt or absurdly stale data.
MAX_LOG_WEIGHT = 40.0


# --------------------------------------------------------------------------------------------------- helpers


def _row_sum(x: Tensor, mask: Tensor) -> Tensor:
    """sum_t x[b, t] over the mask, (B,). torch.where, not x * mask: padding may hold inf/NaN."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def _row_mean(x: Tensor, mask: Tensor) -> Tensor:
    return _row_sum(x, mask) / mask.sum(-1)


def _segment_logsumexp(x: Tensor, idx: Tensor, n: int) -> Tensor:
    """log sum_{j: idx_j = g} exp(x_j) for each g, (n,). Max-shifted so nothing under- or overflows."""
    gmax = torch.full((n,), -torch.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, idx, x.detach(), "amax")
    s = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, idx, torch.exp(x - gmax[idx]))
    return gmax + s.log()


def _exp_capped(log_weight: Tensor) -> Tensor:
    return torch.exp(torch.clamp(log_weight, max=MAX_LOG_WEIGHT))


def k3(log_ratio: Tensor) -> Tensor:
    """Schulman's k3 KL estimator exp(d) - d - 1 for d = log(other / sampled-from); >= 0, unbiased for KL."""
    return torch.expm1(log_ratio) - log_ratio


def gepo_groups(group_ids: Tensor | None, batch_rows: int, cfg: LossConfig, device=None) -> tuple[Tensor, int]:
    """Dense group index (B,) and group count for GEPO's denominator.

    "prompt": the given group_ids. "micro_batch": consecutive blocks of cfg.gepo_micro_batch_rows rows (the last
    block may be shorter), as the official code sums over each shuffled per-device batch.
    """
    if cfg.gepo_grouping == "micro_batch":
        idx = torch.arange(batch_rows, device=device) // cfg.gepo_micro_batch_rows
        return idx, -(-batch_rows // cfg.gepo_micro_batch_rows)
    if group_ids is None:
        raise ValueError("GEPO with gepo_grouping='prompt' needs group_ids (the prompt of each row)")
    return group_index(group_ids)


def delta_l_weights(lengths: Tensor, alpha: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """∆L's x_i = L_i^-alpha / sum_j L_j^-alpha over the rows given, (B,) in dtype; they sum to 1.

    Computed in log space (a softmax of -alpha log L) so long completions and large alpha never underflow.
    """
    return torch.softmax(-alpha * lengths.to(dtype).log(), dim=0)


# ------------------------------------------------------------------------------------------ importance weights


def importance_weights(
    logp: Tensor, sampler_logp: Tensor, mask: Tensor, group_ids: Tensor | None, cfg: LossConfig
) -> tuple[Tensor, str]:
    """Importance weight of the learner against the sampler, at the loss type's level.

    logp, sampler_logp: (B, T); mask: (B, T) bool; group_ids: (B,) integer (only GEPO with prompt grouping reads it).
    Returns (weights, level):
      "token"    (grpo, bnpo, dr_grpo, dapo, delta_l): (B, T) r_it = exp(logp_it - q_it); 1 at padding.
      "sequence" (gspo): (B,) s_i = exp(mean_t logp_it - mean_t q_it).
      "group"    (gepo): (B,) w_i = p̄_i / (sum_j q̄_j^2 / sum_j q̄_j), sums over i's group, with
                 p̄_i = exp(mean_t logp_it), q̄_j = exp(mean_t q_jt); the denominator is computed in log space
                 (p̄ and q̄ of long completions underflow: exp(-1.5 x 1000)) and carries no gradient.
    Gradient flows to logp only; the sampler's log-probs are data. Log-weights above MAX_LOG_WEIGHT (40) are capped
    there (no gradient beyond) so that nothing overflows.
    """
    q = sampler_logp.detach()
    level = cfg.weight_level()
    if level == "token":
        return _exp_capped(torch.where(mask, logp - q, torch.zeros_like(logp))), level
    mean_logp = _row_mean(logp, mask)
    mean_q = _row_mean(q, mask)
    if level == "sequence":
        return _exp_capped(mean_logp - mean_q), level
    idx, n = gepo_groups(group_ids, logp.shape[0], cfg, device=logp.device)
    log_denominator = _segment_logsumexp(2 * mean_q, idx, n) - _segment_logsumexp(mean_q, idx, n)
    return _exp_capped(mean_logp - log_denominator[idx].detach()), level


def ppo_unit_loss(w: Tensor, adv: Tensor, cfg: LossConfig, low: float | None = None,
                  high: float | None = None) -> Tensor:  # fmt: skip
    """-min(w' A, clip(w, low, high) A), w' = min(w, delta) when delta is set. Broadcasts.

    low / high default to 1 - eps_low / 1 + eps_high (M2PO passes its own)."""
    low = 1 - cfg.epsilon_low if low is None else low
    high = 1 + cfg.epsilon_high if high is None else high
    clipped = torch.clamp(w, low, high)
    unclipped = torch.clamp(w, max=cfg.delta) if cfg.delta is not None else w
    return -torch.minimum(unclipped * adv, clipped * adv)


def m2po_log_bound(log_ratio: Tensor, adv: Tensor, mask: Tensor, budget: float) -> float:
    """M2PO's clip bound tau (the ratio is clipped to [e^-tau, e^tau]), as the reference code computes it.

    Only the tokens the PPO clip acts on count ("harmful" in the reference: A > 0 with p > q, A < 0 with p < q).
    With d the log-ratio, if mean(d^2) over them is within the budget there is no clip (tau = inf). Otherwise, with
    v = the sorted d^2 and k the first index at which capping every v at v_k gives sum_i min(v_i, v_k) >= budget * n,
    tau^2 = v_{k-1} (tau = 0 when k = 0): the largest breakpoint whose capped second moment is below the budget.
    log_ratio: (B, T); adv: (B,); mask: (B, T). Not differentiated (the bound is a constant of the step).
    """
    with torch.no_grad():
        d = log_ratio.detach()
        # the reference's tolerances: |A| > 1e-12, ratio beyond 1 +- 1e-12
        pos = (adv > 1e-12).unsqueeze(1) & (d.exp() > 1.0 + 1e-12)
        neg = (adv < -1e-12).unsqueeze(1) & (d.exp() < 1.0 - 1e-12)
        v = (d[mask & (pos | neg)].double() ** 2).sort().values
        n = v.numel()
        if n == 0 or float(v.mean()) <= budget + 1e-12:
            return math.inf
        capped = v.cumsum(0) + (v - 1e-12) * torch.arange(n - 1, -1, -1, dtype=v.dtype, device=v.device)
        k = int((capped >= budget * n - 1e-12).nonzero()[0])
        return 0.0 if k == 0 else math.sqrt(max(float(v[k - 1]) - 1e-12, 0.0))


def token_unit_loss(logp: Tensor, q: Tensor, w: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig):
    """Per-token policy loss (B, T) of a token-level type, and booleans (B, T) of the tokens whose weight was clipped
    or truncated below / above, and masked (IcePop). logp carries the gradient; q: sampler log-probs;
    w = exp(logp - q) (B, T); adv (B,).

      grpo, bnpo, dr_grpo, dapo, delta_l:  -min(w' A, clip(w, 1 - eps_low, 1 + eps_high) A)
      m2po:   the same with clip(w, e^-tau, e^tau), tau = m2po_log_bound(...) of this call (no clip within budget)
      tis:    -sg(min(w, tis_cap)) A p/sg(p)        (value -min(w, C) A; gradient -min(w, C) A grad log p)
      cispo:  -sg(min(w, cispo_max_weight)) A log p (TRL's loss_type="cispo")
    IcePop (cfg.icepop): tokens with w outside [icepop_low, icepop_high] get loss 0 and no gradient.
    """
    a = adv.unsqueeze(1)
    wd = w.detach()
    no = torch.zeros_like(mask)
    if cfg.loss_type in ("tis", "cispo"):
        cap = cfg.tis_cap if cfg.loss_type == "tis" else cfg.cispo_max_weight
        weight = torch.clamp(wd, max=cap)
        pg = torch.exp(logp - logp.detach()) if cfg.loss_type == "tis" else logp
        per_token = -weight * a * pg
        low, high = no, wd > cap
    else:
        if cfg.loss_type == "m2po":
            tau = m2po_log_bound(logp.detach() - q, adv, mask, cfg.m2po_budget)
            lo, hi = math.exp(-tau), math.exp(tau) if math.isfinite(tau) else math.inf
        else:
            lo, hi = 1 - cfg.epsilon_low, 1 + cfg.epsilon_high
        per_token = ppo_unit_loss(w, a, cfg, lo, hi)
        low, high = (wd < lo) & (a < 0), (wd > hi) & (a > 0)
    masked = no
    if cfg.icepop:
        masked = (wd < cfg.icepop_low) | (wd > cfg.icepop_high)
        per_token = torch.where(masked, torch.zeros((), dtype=per_token.dtype, device=per_token.device), per_token)
    return per_token, low & mask, high & mask, masked & mask


# -------------------------------------------------------------------------------------------------- validation


def _first_bad_row(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0]) if bad.dim() == 2 else int(bad.nonzero()[0])


def _validate(logp, sampler_logp, mask, advantages, group_ids, ref_logp, cfg) -> None:
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig; got {type(cfg).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T); got shape {tuple(logp.shape)}")
    B, T = logp.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty batch: logp has shape {(B, T)}")
    for name, x in (("sampler_logp", sampler_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {(B, T)}; got {tuple(x.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool; got {mask.dtype}")
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be (B,) = ({B},); got {tuple(advantages.shape)}")
    if group_ids is not None and group_ids.shape != (B,):
        raise ValueError(f"group_ids must be (B,) = ({B},); got {tuple(group_ids.shape)}")
    if not logp.is_floating_point() or not sampler_logp.is_floating_point():
        raise ValueError("logp and sampler_logp must be floating point")

    empty = mask.sum(-1) == 0
    if empty.any():
        raise ValueError(f"row {_first_bad_row(empty)} has no completion tokens (all masked)")
    bad = ~torch.isfinite(advantages)
    if bad.any():
        raise ValueError(f"advantage of row {_first_bad_row(bad)} is {advantages[bad][0].item()}; must be finite")
    for name, x in (("logp", logp), ("sampler_logp", sampler_logp), ("ref_logp", ref_logp)):
        if x is None:
            continue
        bad = mask & ~torch.isfinite(x.detach())
        if bad.any():
            r, t = bad.nonzero()[0].tolist()
            raise ValueError(f"{name} of row {r}, token {t} is {x[r, t].item()}; log-probs must be finite")
    bad = mask & (sampler_logp > _LOGP_SLACK)
    if bad.any():
        r, t = bad.nonzero()[0].tolist()
        raise ValueError(
            f"sampler_logp of row {r}, token {t} is {sampler_logp[r, t].item()} > 0: not a log-probability "
            "(probabilities or logits sent by mistake?)"
        )


# --------------------------------------------------------------------------------------------------- the loss


def compute_loss(
    logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    group_ids: Tensor | None,
    cfg: LossConfig,
    ref_logp: Tensor | None = None,
    *,
    step_rows: int | None = None,
    step_tokens: int | None = None,
    num_micro_batches: int = 1,
) -> tuple[Tensor, dict[str, float]]:
    """The policy loss of one (micro-)batch and its metrics.

    logp: (B, T) learner log-probs (carry the gradient). sampler_logp: (B, T) the sampler's log-probs of the same
    tokens, at the same temperature. mask: (B, T) bool, True on completion tokens; every row needs one. advantages:
    (B,). group_ids: (B,) integer prompt id per row (GEPO with prompt grouping needs it; others ignore it; may be
    None then). ref_logp: (B, T) reference-policy log-probs, needed when cfg.beta > 0.

    When an optimizer step is split into micro-batches, pass for every micro-batch
      step_rows:  rows in the whole step (grpo, dr_grpo, gspo, gepo and both KL terms divide by it),
      step_tokens: completion tokens in the whole step (dapo divides by it),
      num_micro_batches: bnpo and ∆L divide their per-micro-batch normalised loss by it (TRL / official code),
    and the micro-batch losses sum to the step's loss (for bnpo and ∆L, when the micro-batches have equal token
    counts / equal sum of L^-alpha). Defaults: this batch alone, i.e. the textbook loss. GEPO's group denominator
    is computed within this call, so keep each prompt's rows (or micro_batch blocks) inside one micro-batch.

    Returns (loss, metrics): scalar loss in logp's float dtype (at least float32), and floats
    loss, iw_mean, iw_var, iw_max (over the weight's units: tokens, or rows for gspo/gepo), clip_frac_low,
    clip_frac_high (TRL's: w < 1 - eps_low with A < 0; w > 1 + eps_high with A > 0; M2PO with its own bounds;
    TIS/CISPO: high = share of tokens whose weight was truncated, low = 0), mask_frac (IcePop: share of tokens
    masked), log_ratio_m2 (token mean of (log p - log q)^2, M2PO's second moment over all tokens), kl_ref,
    kl_sampler (k3, token means; computed even when their coefficient is 0), adv_mean, adv_std, adv_abs_max,
    num_tokens.
    Raises ValueError on malformed input, naming the row, rather than returning a NaN loss.
    """
    _validate(logp, sampler_logp, mask, advantages, group_ids, ref_logp, cfg)
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError("cfg.beta > 0 needs ref_logp")
    B = logp.shape[0]
    lengths = mask.sum(-1)  # (B,) long
    n_tokens = int(lengths.sum())
    step_rows = B if step_rows is None else step_rows
    step_tokens = n_tokens if step_tokens is None else step_tokens
    if step_rows < B:
        raise ValueError(f"step_rows ({step_rows}) is smaller than this micro-batch's rows ({B})")
    if step_tokens < n_tokens:
        raise ValueError(f"step_tokens ({step_tokens}) is smaller than this micro-batch's tokens ({n_tokens})")
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1; got {num_micro_batches}")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Padding may hold anything (inf, NaN); replace it so no 0 * inf ever reaches a sum or a gradient.
    logp = torch.where(mask, logp.to(dtype), zero)
    q = torch.where(mask, sampler_logp.detach().to(dtype), zero)
    adv = advantages.detach().to(dtype)

    w, level = importance_weights(logp, q, mask, group_ids, cfg)
    agg = cfg.resolved_aggregation()
    M = cfg.max_completion_length

    # Reference KL, k3 per token: exp(ref - logp) - (ref - logp) - 1.
    kl_ref = k3(torch.where(mask, ref_logp.detach().to(dtype), zero) - logp) if ref_logp is not None else None

    if level == "token":
        per_token, clipped_low, clipped_high, masked = token_unit_loss(logp, q, w, adv, mask, cfg)
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl_ref
        if agg == "grpo":
            loss = _row_mean(per_token, mask).sum() / step_rows
        elif agg == "bnpo":
            loss = _row_sum(per_token, mask).sum() / n_tokens / num_micro_batches
        elif agg == "dr_grpo":
            loss = _row_sum(per_token, mask).sum() / (step_rows * M)
        elif agg == "dapo":
            loss = _row_sum(per_token, mask).sum() / step_tokens
        elif agg == "delta_l":
            x = delta_l_weights(lengths, cfg.delta_l_alpha, dtype)
            loss = (_row_sum(per_token, mask) * x).sum() / M / num_micro_batches
        else:  # pragma: no cover - LossConfig validates
            raise AssertionError(agg)
        w_units = w[mask]
        clipped_low, clipped_high, masked = clipped_low[mask], clipped_high[mask], masked[mask]
    else:
        per_row = ppo_unit_loss(w, adv, cfg)
        if cfg.beta > 0:
            per_row = per_row + cfg.beta * _row_mean(kl_ref, mask)
        loss = per_row.sum() / step_rows
        w_units = w
        wd = w.detach()
        clipped_low = (wd < 1 - cfg.epsilon_low) & (adv < 0)
        clipped_high = (wd > 1 + cfg.epsilon_high) & (adv > 0)
        masked = torch.zeros_like(clipped_low)

    kl_sampler = k3(q - logp)  # exp(q - p) - (q - p) - 1 per token
    if cfg.sampler_kl_coef > 0:
        loss = loss + cfg.sampler_kl_coef * _row_mean(kl_sampler, mask).sum() / step_rows

    with torch.no_grad():
        wd = w_units.detach()
        stats = torch.stack(
            [
                loss.detach(),
                wd.mean(),
                wd.var(unbiased=False),
                wd.max(),
                clipped_low.to(dtype).mean(),
                clipped_high.to(dtype).mean(),
                masked.to(dtype).mean(),
                _row_sum((logp.detach() - q) ** 2, mask).sum() / n_tokens,
                _row_sum(kl_ref, mask).sum() / n_tokens if kl_ref is not None else zero,
                _row_sum(kl_sampler, mask).sum() / n_tokens,
                adv.mean(),
                adv.std(unbiased=False),
                adv.abs().max(),
            ]
        ).tolist()
    names = ("loss", "iw_mean", "iw_var", "iw_max", "clip_frac_low", "clip_frac_high", "mask_frac", "log_ratio_m2",
             "kl_ref", "kl_sampler", "adv_mean", "adv_std", "adv_abs_max")  # fmt: skip
    metrics = dict(zip(names, stats))
    metrics["num_tokens"] = float(n_tokens)
    if not math.isfinite(metrics["loss"]):
        row_max = w.detach() if level != "token" else torch.where(mask, w.detach(), zero).amax(-1)
        raise ValueError(
            f"loss is {metrics['loss']}: it overflowed (largest importance weight {metrics['iw_max']}, in row "
            f"{int(row_max.argmax())}; largest |advantage| {metrics['adv_abs_max']}). Set cfg.delta to cap the "
            "weight, or drop the batch."
        )
    return loss, metrics
