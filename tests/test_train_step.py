"""The learner's training step on a real (tiny, randomly initialised) transformers model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gepo.config import LossConfig
from gepo.logprobs import token_logprobs
from gepo.train_step import (ScoredGroup, TrainStepConfig, _collate, _Row, completion_logits, recompute_logprobs,
                             train_step)

VOCAB = 40


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def sampled_groups(model, n_groups: int = 3, g: int = 4, seed: int = 1, version: int = 0) -> list[ScoredGroup]:
    """Groups whose sampler log-probs are the model's own (on-policy), with varied prompt and completion lengths."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for gi in range(n_groups):
        prompt = torch.randint(1, VOCAB, (3 + gi,), generator=gen).tolist()
        completions, rewards = [], []
        for j in range(g):
            length = 2 + (j + gi) % 4
            completions.append(torch.randint(1, VOCAB, (length,), generator=gen).tolist())
            rewards.append(float((j + gi) % 2))
        groups.append(ScoredGroup(prompt, completions, [[0.0] * len(c) for c in completions], rewards, version))
    return [with_logprobs_of(model, grp) for grp in groups]


def with_logprobs_of(model, group: ScoredGroup) -> ScoredGroup:
    logprobs = recompute_logprobs(model, group.prompt_ids, group.completion_ids)
    return ScoredGroup(group.prompt_ids, group.completion_ids, logprobs, group.rewards, group.policy_version)


def test_collate_left_pads_prompts_so_completions_share_a_column():
    rows = [_Row([5, 6], [7, 8, 9], [-1.0] * 3, 1.0, 0), _Row([5, 6, 7, 8], [9], [-2.0], -1.0, 1)]
    b = _collate(rows, 0, torch.device("cpu"))
    assert b["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 0, 0]]
    assert b["position_ids"][0, 2:5].tolist() == [0, 1, 2]
    assert b["completion_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert b["sampler_logprobs"][1].tolist() == [-2.0, 0.0, 0.0]


def test_left_padding_does_not_change_logprobs():
    """A row's log-probs must not depend on how much padding its micro-batch needed."""
    model = tiny_model()
    model.eval()
    alone = _collate([_Row([5, 6], [7, 8], [0.0, 0.0], 0.0, 0)], 0, torch.device("cpu"))
    padded = _collate(
        [_Row([5, 6], [7, 8], [0.0, 0.0], 0.0, 0), _Row([1, 2, 3, 4, 5], [6, 7, 8, 9], [0.0] * 4, 0.0, 1)],
        0,
        torch.device("cpu"),
    )
    with torch.no_grad():
        a = token_logprobs(completion_logits(model, alone), alone["completion_ids"])
        p = token_logprobs(completion_logits(model, padded), padded["completion_ids"])
    torch.testing.assert_close(a[0], p[0, :2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["gepo", "grpo", "gspo", "dr_grpo", "dapo", "bnpo", "delta_l"])
def test_training_step_lowers_the_loss_on_a_fixed_batch(loss_type):
    model = tiny_model()
    groups = sampled_groups(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfg = TrainStepConfig(loss=LossConfig(loss_type=loss_type, max_completion_length=8), micro_batch_rows=4)
    losses = [train_step(model, opt, groups, cfg, step_index=i)["loss"] for i in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("loss_type", ["gepo", "grpo", "gspo", "dr_grpo", "dapo"])
def test_micro_batching_gives_the_full_batch_update(loss_type):
    """Step-wide normalisers make accumulated micro-batch gradients equal to one full-batch gradient."""
    base = tiny_model()
    groups = sampled_groups(base, n_groups=4, g=3)
    results = []
    for rows in (3, 100):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        cfg = TrainStepConfig(loss=LossConfig(loss_type=loss_type, max_completion_length=8), micro_batch_rows=rows)
        m = train_step(model, opt, groups, cfg)
        results.append((m, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (m_small, p_small), (m_full, p_full) = results
    assert m_small["num_micro_batches"] == 4 and m_full["num_micro_batches"] == 1
    assert m_small["loss"] == pytest.approx(m_full["loss"], rel=1e-4, abs=1e-6)
    torch.testing.assert_close(p_small, p_full, atol=1e-5, rtol=1e-4)


def test_gepo_micro_batch_grouping_runs_and_differs_from_prompt_grouping():
    base = tiny_model()
    groups = sampled_groups(base, n_groups=4, g=4)
    losses = {}
    for grouping in ("prompt", "micro_batch"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_cfg = LossConfig(loss_type="gepo", gepo_grouping=grouping, gepo_micro_batch_rows=8)
        losses[grouping] = train_step(model, opt, groups, TrainStepConfig(loss=loss_cfg, micro_batch_rows=8))["loss"]
    assert losses["prompt"] != pytest.approx(losses["micro_batch"], rel=1e-6)


def test_reference_kl_needs_a_reference_model_and_is_zero_against_itself():
    model = tiny_model()
    groups = sampled_groups(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = TrainStepConfig(loss=LossConfig(loss_type="grpo", beta=0.04))
    with pytest.raises(ValueError, match="ref_model"):
        train_step(model, opt, groups, cfg)
    m = train_step(model, opt, groups, cfg, ref_model=copy.deepcopy(model))
    assert m["kl_ref"] == pytest.approx(0.0, abs=1e-6)


def test_metrics_report_staleness_and_counts():
    model = tiny_model()
    groups = sampled_groups(model, n_groups=2, g=4, version=3) + sampled_groups(model, n_groups=1, g=4, version=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    m = train_step(model, opt, groups, TrainStepConfig(), current_version=8)
    assert m["num_groups"] == 3 and m["num_rows"] == 12
    assert m["staleness_max"] == 5 and m["staleness_mean"] == pytest.approx((5 + 5 + 1) / 3)
    for key in ("loss", "grad_norm", "entropy", "iw_mean", "iw_var", "iw_max", "clip_frac_low", "clip_frac_high"):
        assert key in m and m[key] == m[key], key  # present and not NaN


def test_bad_groups_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="at least one completion"):
        ScoredGroup([1, 2], [], [], [], 0)
    with pytest.raises(ValueError, match="log-probs"):
        ScoredGroup([1, 2], [[3, 4]], [[-1.0]], [1.0], 0)
    with pytest.raises(ValueError, match="empty"):
        ScoredGroup([1, 2], [[]], [[]], [1.0], 0)
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one group"):
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [], TrainStepConfig())
    # the rules intake applies (protocol/group_rules.py): NaN or positive log-probs never reach the loss
    with pytest.raises(ValueError, match="bad_logprobs"):
        ScoredGroup([1, 2], [[3, 4], [5, 6]], [[-1.0, float("nan")], [-1.0, -1.0]], [1.0, 0.0], 0)
    with pytest.raises(ValueError, match="bad_logprobs"):
        ScoredGroup([1, 2], [[3, 4]], [[-1.0, 2e-4]], [1.0], 0)
    # ... and what intake accepts (a log-prob within the slack above 0) trains
    slack = ScoredGroup([1, 2], [[3, 4], [5, 6]], [[-1.0, 5e-5], [-1.0, -1.0]], [1.0, 0.0], 0)
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [slack], TrainStepConfig())
