"""Spot-check of one rollout group against the policy version it claims: the math, no threads, no networking.

The learner keeps the weights of its recent versions. Given the version a group claims, one prefill of the prompt
and its completions gives log_softmax(logits / T) at every sampled token; an honest sampler's log-probs equal it up
to numerics (fp32 vs fp32 kernels, or a bf16 sampler against the learner's fp32: see docs/PROTOCOL.md for the
measured differences and the tolerances set from them). The same logits say whether each sampled token was possible
at all under the run's top-k / top-p (a token the filters remove cannot be sampled, whatever its log-prob).

A group fails with one reason:
    logprob_mismatch      max_t |claimed - recomputed| > token_tolerance, or the row mean > mean_tolerance
    impossible_token      a token outside the top-k, or outside the top-p nucleus (beyond nucleus_slack)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from gepo.plausibility import SPOT_MEAN_TOLERANCE, SPOT_TOKEN_TOLERANCE
from gepo.train_step import _collate, _Row, completion_logits

LOGPROB_MISMATCH = "logprob_mismatch"
IMPOSSIBLE_TOKEN = "impossible_token"


@dataclass
class SpotCheckConfig:
    token_tolerance: float = SPOT_TOKEN_TOLERANCE
    """Largest |claimed - recomputed| log-prob of one token (nats)."""
    mean_tolerance: float = SPOT_MEAN_TOLERANCE
    """Largest mean over a completion's tokens of |claimed - recomputed| (nats per token)."""
    nucleus_slack: float = 0.02
    """A token is inside the top-p nucleus when the mass of the tokens strictly more likely than it is < top_p + slack
    (the sampler's own numerics may put a borderline token on either side)."""
    rank_slack: int = 1
    """Top-k: a token's rank (0 = most likely) must be < top_k + rank_slack (ties and numerics at the k-th logit)."""


@dataclass
class SpotCheckResult:
    ok: bool
    reason: str = ""
    detail: str = ""
    max_gap: float = 0.0
    mean_gap: float = 0.0


@torch.no_grad()
def spot_check(model: torch.nn.Module, prompt_ids: Sequence[int], completions: Sequence[Sequence[int]],
               claimed_logprobs: Sequence[Sequence[float]], *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, config: SpotCheckConfig = SpotCheckConfig(), pad_token_id: int = 0
               ) -> SpotCheckResult:
    """Compare a group's claimed log-probs with `model`'s (the claimed version), and check every token possible."""
    rows = [_Row(prompt_ids, c, lp, 0.0, 0) for c, lp in zip(completions, claimed_logprobs)]
    batch = _collate(rows, pad_token_id, next(model.parameters()).device)
    scaled = completion_logits(model, batch).float() / temperature  # (B, L, V)
    tokens, mask = batch["completion_ids"], batch["completion_mask"]
    logp_all = torch.log_softmax(scaled, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    gap = torch.where(mask, (logp - batch["sampler_logprobs"]).abs(), torch.zeros(()))
    row_mean = gap.sum(-1) / mask.sum(-1)
    max_gap, mean_gap = float(gap.max()), float(row_mean.max())
    result = SpotCheckResult(True, max_gap=max_gap, mean_gap=mean_gap)
    if max_gap > config.token_tolerance or mean_gap > config.mean_tolerance:
        r, t = divmod(int(gap.argmax()), gap.shape[1])
        return SpotCheckResult(False, LOGPROB_MISMATCH,
                               f"log-probs differ from version's by up to {max_gap:.3g} (row {r}, token {t}; "
                               f"worst row mean {mean_gap:.3g}; tolerances {config.token_tolerance:g} / "
                               f"{config.mean_tolerance:g})", max_gap, mean_gap)
    # A token is impossible when the filters would have removed it: strictly more-likely tokens fill the top-k, or
    # their mass already reaches top_p.
    token_scaled = scaled.gather(-1, tokens.unsqueeze(-1))
    higher = scaled > token_scaled  # (B, L, V)
    if top_k and top_k > 0:
        rank = higher.sum(-1)
        bad = mask & (rank >= top_k + config.rank_slack)
        if bad.any():
            r, t = bad.nonzero()[0].tolist()
            return SpotCheckResult(False, IMPOSSIBLE_TOKEN, f"token {t} of completion {r} has rank {int(rank[r, t])} "
                                                            f"outside top-k {top_k}", max_gap, mean_gap)
    if top_p < 1.0:
        mass_before = torch.where(higher, logp_all.exp(), torch.zeros(())).sum(-1)
        bad = mask & (mass_before >= top_p + config.nucleus_slack)
        if bad.any():
            r, t = bad.nonzero()[0].tolist()
            return SpotCheckResult(False, IMPOSSIBLE_TOKEN, f"token {t} of completion {r} lies outside the top-p "
                                                            f"{top_p:g} nucleus (mass before it "
                                                            f"{float(mass_before[r, t]):.3f})", max_gap, mean_gap)
    return result
