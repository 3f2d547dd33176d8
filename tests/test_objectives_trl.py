"""CISPO (and DAPO) against TRL 1.16's own `GRPOTrainer._compute_loss`, on the same tensors.

TRL is a test-only dependency (pyproject `test` extra). `_compute_loss` is TRL's method, called unmodified on a
trainer object that holds only the state that method reads: TRL's config values, a real `accelerate.Accelerator`
(one CPU process) for its metric reductions, and in place of the model forward (`_get_per_token_logps_and_entropies`)
the learner log-probs under test, so both implementations see exactly the same log-probs. TRL's `old_per_token_logps`
is the ratio's denominator; here it is the sampler's log-probs, the behaviour policy the swarm corrects for.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gepo.config import LossConfig
from gepo.objectives import compute_loss

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")


def _trl_trainer(loss_type: str, epsilon_high: float, learner_logp: torch.Tensor, max_completion_length: int):
    from accelerate import Accelerator

    trainer = grpo_trainer.GRPOTrainer.__new__(grpo_trainer.GRPOTrainer)
    state = {
        "loss_type": loss_type,
        "epsilon_low": 0.2,
        "epsilon_high": epsilon_high,
        "beta": 0.0,
        "importance_sampling_level": "token",
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "use_vllm": False,
        "vllm_importance_sampling_correction": False,
        "aux_loss_enabled": False,
        "_entropy_bonus_enabled": False,
        "max_completion_length": max_completion_length,
        "current_gradient_accumulation_steps": 1,
        "accelerator": Accelerator(cpu=True),
        "model": SimpleNamespace(training=True),
        "args": SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
    }
    for k, v in state.items():
        object.__setattr__(trainer, k, v)
    entropies = torch.zeros_like(learner_logp)
    object.__setattr__(trainer, "_get_per_token_logps_and_entropies",
                       lambda *a, **kw: (learner_logp, entropies, None))  # fmt: skip
    return trainer


def _batch(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = q + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp[0, :2] = q[0, :2] + 2.0  # ratio e^2 = 7.4 on two tokens: TRL's recommended cap of 5 binds
    lengths = torch.tensor([T, T - 2, 3, T, 1, T - 1])[:B]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, q, mask, adv


@pytest.mark.parametrize("loss_type, cap", [("cispo", 5.0), ("cispo", 1.5), ("dapo", 0.2)])
def test_matches_trl_compute_loss(loss_type, cap):
    logp, q, mask, adv = _batch()
    B, T = logp.shape
    if loss_type == "cispo":
        assert (torch.exp(logp - q)[mask] > cap).any()  # the truncation is exercised
        cfg = LossConfig(loss_type="cispo", cispo_max_weight=cap)
    else:
        cfg = LossConfig(loss_type="dapo", epsilon_high=cap)

    trl_leaf = logp.clone().requires_grad_()
    trainer = _trl_trainer(loss_type, cap, trl_leaf, max_completion_length=T)
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": q,
        "num_items_in_batch": mask.sum(),
    }
    trl_loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    trl_loss.backward()

    ours_leaf = logp.clone().requires_grad_()
    ours, metrics = compute_loss(ours_leaf, q, mask, adv, None, cfg)
    ours.backward()

    torch.testing.assert_close(ours, trl_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_leaf.grad, trl_leaf.grad, rtol=1e-12, atol=1e-12)
    if loss_type == "cispo":  # TRL counts truncated tokens with A > 0 only; ours counts every truncated token
        w = torch.exp(logp - q)
        assert trainer._metrics["train"]["cispo_clip_ratio"][0] == pytest.approx(
            ((w > cap) & (adv.unsqueeze(1) > 0))[mask].double().mean().item())  # fmt: skip
        assert metrics["clip_frac_high"] == pytest.approx((w > cap)[mask].double().mean().item())
