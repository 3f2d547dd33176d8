"""Group-relative advantages: each completion's reward against the other completions of the same prompt."""

from __future__ import annotations

import torch
from torch import Tensor

STD_MODES = ("group", "batch", "none")


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer group ids (B,) to dense indices 0..n_groups-1 (B,), and n_groups.

    Rows of one group need not be adjacent, and groups may differ in size.
    """
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be (B,); got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor; got {group_ids.dtype}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_advantages(rewards: Tensor, group_ids: Tensor, std: str = "group", eps: float = 1e-4) -> Tensor:
    """A_i = (R_i - mean of R over i's group) / (scale + eps), as TRL's GRPOTrainer.

    rewards: (B,) float. group_ids: (B,) integer, equal for the completions of one prompt (any order, any sizes).
    std: "group" divides by the Bessel-corrected std of the group's rewards (TRL's default), "batch" by the
        Bessel-corrected std of all B rewards (TRL's scale_rewards="batch"), "none" only mean-centres
        (Dr.GRPO; the GEPO paper for GEPO).
    Returns (B,) float32 (float64 for float64 rewards).

    A group whose rewards are all equal gets exactly zero advantage (it carries no learning signal; the eps only
    avoids 0/0). A singleton group gets 0: there is nothing to compare it with.
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {', '.join(STD_MODES)}; got {std!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,); got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must have rewards' shape {tuple(rewards.shape)}; got {tuple(group_ids.shape)}")
    if rewards.numel() == 0:
        raise ValueError("empty batch: no rewards")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.to(dtype)
    bad = ~torch.isfinite(r)
    if bad.any():
        raise ValueError(f"reward of row {int(bad.nonzero()[0])} is {r[bad][0].item()}; rewards must be finite")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps}")

    idx, n_groups = group_index(group_ids)
    count = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(0, idx, r) / count
    centred = r - mean[idx]
    # An exactly-equal group must give exactly 0, not rounding noise amplified by 1/eps: snap the centring error
    # of constant groups (it can be nonzero in float, e.g. mean of three 0.1s).
    gmax = torch.full((n_groups,), -torch.inf, dtype=dtype, device=r.device).scatter_reduce(0, idx, r, "amax")
    gmin = torch.full((n_groups,), torch.inf, dtype=dtype, device=r.device).scatter_reduce(0, idx, r, "amin")
    centred = torch.where((gmax == gmin)[idx], torch.zeros_like(centred), centred)
    if std == "none":
        return centred
    if std == "group":
        sq = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(0, idx, centred.square())
        # Bessel: n - 1; a singleton has centred = 0, so any finite scale gives 0.
        scale = (sq / (count - 1).clamp(min=1)).sqrt()[idx]
    else:
        scale = r.std() if r.numel() > 1 else torch.zeros((), dtype=dtype, device=r.device)
    return centred / (scale + eps)
