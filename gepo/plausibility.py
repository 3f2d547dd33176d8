"""Bounded influence of the sampler's log-probs: drop groups whose claimed log-probs the learner's own contradict.

The sampler's log-probs q enter the loss only through the importance weight p/q, so a sampler that lies about them
steers the update: q = -41 on every token makes the weight e^40 and, with a negative advantage, one group owns the
step's gradient. The learner computes its own log-probs p of every completion in `train_step` anyway. An honest q is
the same policy a few versions back, so |p - q| stays small; `GroupGuard.screen` drops (with a counted reason) every
group with a row whose

    mean_t |p_t - q_t|  > max_mean_gap      (per sequence: scaled / shifted / replaced log-probs)
    max_t  |p_t - q_t|  > max_token_gap     (per token: -41 on one token, a spliced-in foreign token)

The defaults are several times the largest gap honest staleness reaches at lag 64 (docs/PROTOCOL.md, "Threat
model", has the measured distribution and the command that measures it: scripts/logprob_gaps.py). What passes can
still bias the weight within the bound; the dual-clip delta (the learner's --max-group-weight) bounds what any one
row contributes to the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: node/intake.py reads the bounds without it
    import torch

IMPLAUSIBLE = "implausible_logprobs"
TRAIN_ERROR = "train_error"


# Measured honest maxima (tiny policy, lags 0-64, docs/PROTOCOL.md) are a fraction of these.
MAX_MEAN_GAP = 10.0
MAX_TOKEN_GAP = 20.0
# Spot-check tolerances (gepo/spot_check.py: same version, so only numerics differ): a few times the largest
# difference measured between a bf16 sampler and the fp32 check, SmolLM2-135M (docs/PROTOCOL.md).
SPOT_TOKEN_TOLERANCE = 1.0
SPOT_MEAN_TOLERANCE = 0.25


@dataclass
class PlausibilityConfig:
    max_mean_gap: float = MAX_MEAN_GAP
    """Largest mean_t |log p - log q| of a row (nats per token)."""
    max_token_gap: float = MAX_TOKEN_GAP
    """Largest |log p - log q| of any one token (nats)."""


def row_gaps(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_t |p - q|, max_t |p - q|) per row, (B,) each, over the mask (float32, no gradient)."""
    import torch

    gap = torch.where(mask, (logp.detach().float() - sampler_logp.float()).abs(), torch.zeros((), device=logp.device))
    return gap.sum(-1) / mask.sum(-1).clamp(min=1), gap.amax(-1)


@dataclass
class GroupGuard:
    """Collects, over one `train_step`, which groups were dropped and why, and the gaps it saw.

    rejected: group index (into train_step's `groups`) -> reason. gaps: (group, mean gap, max gap) of every row
    screened, for measuring the honest distribution.
    """

    config: PlausibilityConfig = field(default_factory=PlausibilityConfig)
    keep_gaps: bool = False
    rejected: dict[int, str] = field(default_factory=dict)
    details: dict[int, str] = field(default_factory=dict)
    gaps: list[tuple[int, float, float]] = field(default_factory=list)

    def reject(self, groups, reason: str, detail: str = "") -> None:
        for g in groups:
            self.rejected.setdefault(int(g), reason)
            self.details.setdefault(int(g), detail)

    def screen(self, logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
               group_ids: torch.Tensor) -> torch.Tensor:
        """(B,) bool: rows to keep. A row out of bounds drops every row of its group in this batch."""
        import torch

        mean_gap, max_gap = row_gaps(logp, sampler_logp, mask)
        cfg = self.config
        bad = (mean_gap > cfg.max_mean_gap) | (max_gap > cfg.max_token_gap) | ~torch.isfinite(mean_gap)
        if self.keep_gaps:
            self.gaps += zip(group_ids.tolist(), mean_gap.tolist(), max_gap.tolist())
        for r in bad.nonzero().flatten().tolist():
            self.reject([group_ids[r]], IMPLAUSIBLE, f"row gap mean {float(mean_gap[r]):.3g} / max "
                                                     f"{float(max_gap[r]):.3g} nats (bounds {cfg.max_mean_gap:g} / "
                                                     f"{cfg.max_token_gap:g})")
        dropped = torch.tensor(sorted(self.rejected), dtype=group_ids.dtype, device=group_ids.device)
        return ~torch.isin(group_ids, dropped)
