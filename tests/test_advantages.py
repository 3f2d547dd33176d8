"""Group-relative advantages against hand-computed values."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gepo.advantages import group_advantages, group_index


def _ref(rewards: list[float], groups: list[int], std: str, eps: float = 1e-4) -> list[float]:
    """Independent loop implementation."""
    out = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        centred = r - sum(members) / len(members)
        if len(set(members)) == 1:
            centred = 0.0
        if std == "none":
            out.append(centred)
        elif std == "group":
            s = statistics.stdev(members) if len(members) > 1 else 0.0
            out.append(centred / (s + eps))
        else:
            out.append(centred / (batch_std + eps))
    return out


def test_hand_computed_group_std():
    # Group 0: rewards 1, 0, 0, 1 -> mean 0.5, Bessel std sqrt(1/3); group 1: 1, 0 -> mean 0.5, std sqrt(1/2).
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(rewards, groups, std="group")
    s0, s1 = math.sqrt(1 / 3), math.sqrt(1 / 2)
    expected = [0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4),
                0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4)]  # fmt: skip
    torch.testing.assert_close(adv, torch.tensor(expected))
    centred = group_advantages(rewards, groups, std="none")
    torch.testing.assert_close(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.5, -0.5]))


@pytest.mark.parametrize("std", ["group", "batch", "none"])
def test_matches_loop_reference_with_variable_unordered_groups(std):
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(11, generator=g, dtype=torch.float64)
    groups = torch.tensor([7, 2, 7, 9, 2, 7, 2, 9, 40, 7, 2])  # sizes 4, 4, 2, 1; not adjacent; sparse ids
    adv = group_advantages(rewards, groups, std=std)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, torch.tensor(_ref(rewards.tolist(), groups.tolist(), std), dtype=torch.float64))


def test_singleton_and_constant_groups_are_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 3.0, 1.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    for std in ("group", "batch", "none"):
        adv = group_advantages(rewards, groups, std=std)
        assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0], std
        assert adv[4] < 0 < adv[5]
    assert group_advantages(torch.tensor([5.0]), torch.tensor([0])).tolist() == [0.0]


def test_batch_std_uses_all_rewards():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(rewards, groups, std="batch")
    s = statistics.stdev([1.0, 0.0, 3.0, 3.0])
    torch.testing.assert_close(adv, torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0]))


def test_group_index_dense():
    idx, n = group_index(torch.tensor([5, 3, 5, 11]))
    assert n == 3 and idx.tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize(
    "rewards, groups, std, match",
    [
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), "group", "row 1"),
        (torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]), "group", "row 1"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 0]), "group", "shape"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), "group", "integer"),
        (torch.tensor([]), torch.tensor([], dtype=torch.long), "group", "empty"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), "auto", "std must be"),
        (torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long), "group", r"\(B,\)"),
    ],
)
def test_bad_input(rewards, groups, std, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, groups, std=std)
