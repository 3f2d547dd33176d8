"""Lying samplers against the learner's checks, in one process: the real tiny policy, real train_step, real files.

(tests/test_intake_nodes.py runs the same liars as separate sampler processes against a real learner.)
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from gepo.config import LossConfig
from gepo.data import format_prompt
from gepo.plausibility import IMPLAUSIBLE, TRAIN_ERROR, GroupGuard, PlausibilityConfig
from gepo.sampling import SamplingParams, generate_groups
from gepo.spot_check import IMPOSSIBLE_TOKEN, LOGPROB_MISMATCH, spot_check
from gepo.tiny_policy import load_tiny_policy
from gepo.train_step import ScoredGroup, TrainStepConfig, train_step
from node.intake import BANS_FILE, Intake, IntakeConfig
from protocol.errors import ProtocolError, Reason
from protocol.group_rules import LOGPROB_SLACK, group_problem

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return load_tiny_policy()


def honest_groups(model, tokenizer, n: int = 6, g: int = 4, seed: int = 0, **sampling) -> list[ScoredGroup]:
    prompts = [format_prompt(tokenizer, f"{3 + i} + {4 * i}") for i in range(n)]
    params = SamplingParams(max_new_tokens=12, n=g, seed=seed, **sampling)
    gens = generate_groups(model, prompts, params, eos=tokenizer, pad_token_id=tokenizer.pad_token_id)
    return [ScoredGroup(x.prompt_ids, x.completion_ids, x.logprobs, [float(j % 2) for j in range(g)], 0, tag=("s", i))
            for i, x in enumerate(gens)]


def other_model(model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(123)
    return AutoModelForCausalLM.from_config(model.config).eval()


def lie(group: ScoredGroup, how) -> ScoredGroup:
    lps = [[min(0.0, float(how(np.array(row))[t])) for t in range(len(row))] for row in group.sampler_logprobs]
    return ScoredGroup(group.prompt_ids, group.completion_ids, lps, group.rewards, group.policy_version,
                       tag=("liar", 0))


LIES = {  # beyond the plausibility bounds (scaled log-probs of confident tokens stay inside: the spot-check's job)
    "minus_41": lambda q: np.full_like(q, -41.0),
    "shifted_-15": lambda q: q - 15,
    "replaced": lambda q: -np.random.default_rng(0).uniform(0, 30, q.shape),
}


def test_the_one_definition_of_a_valid_group():
    assert group_problem([1], [[2, 3]], [[-1.0, LOGPROB_SLACK]]) is None
    assert group_problem([1], [[2, 3]], [[-1.0, 2 * LOGPROB_SLACK]])[0] is Reason.BAD_LOGPROBS
    assert group_problem([1], [[2], []], [[-1.0], []])[0] is Reason.SHAPE_MISMATCH
    assert group_problem([1], [[2, 7]], [[-1.0, -1.0]], vocab_size=5)[0] is Reason.TOKEN_OUT_OF_VOCAB
    assert group_problem([1], [[2, 3]], [[-1.0, -1.0]], max_completion_tokens=1)[0] is Reason.OVERSIZE
    for bad in ([[2], []], [[-1.0], []]), ([[2, 3]], [[-1.0, 3e-4]]):  # what intake refuses the trainer refuses
        with pytest.raises(ValueError):
            ScoredGroup([1], bad[0], bad[1], [0.0] * len(bad[0]))


def test_lying_logprobs_are_dropped_and_the_step_goes_on(policy):
    model, tokenizer = policy
    model = copy.deepcopy(model)
    groups = honest_groups(model, tokenizer)
    for i, how in enumerate(LIES.values(), start=1):
        groups[i] = lie(groups[i], how)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    guard = GroupGuard()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainStepConfig(loss=LossConfig(max_completion_length=12))
    m = train_step(model, opt, groups, cfg, pad_token_id=tokenizer.pad_token_id, guard=guard, current_version=0)
    assert guard.rejected == {1: IMPLAUSIBLE, 2: IMPLAUSIBLE, 3: IMPLAUSIBLE}, guard.details
    assert m["num_groups"] == 3 and m["num_rejected_groups"] == 3 and m["num_rows"] == 12
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] < 100, m  # an honest-sized gradient, no 1e17
    assert m["iw_max"] < 10, m  # metrics exclude the rejected rows
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained on the rest


def test_a_group_whose_loss_fails_is_dropped_not_fatal(policy):
    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    groups = honest_groups(model, tokenizer, n=3)
    guard = GroupGuard(PlausibilityConfig(max_mean_gap=1e9, max_token_gap=1e9))
    cfg = TrainStepConfig(micro_batch_rows=4)  # one group per micro-batch
    with pytest.raises(ValueError, match="finite"):  # a broken reward is refused when the group is scored
        ScoredGroup(groups[1].prompt_ids, groups[1].completion_ids, groups[1].sampler_logprobs, [math.nan] * 4)
    # finite rewards whose advantages overflow: compute_loss raises for that micro-batch, its group is dropped
    groups[1] = ScoredGroup(groups[1].prompt_ids, groups[1].completion_ids, groups[1].sampler_logprobs,
                            [3e38, 3e38, 3e38, -3e38], 0)
    m = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), groups, cfg,
                   pad_token_id=tokenizer.pad_token_id, guard=guard)
    assert guard.rejected == {1: TRAIN_ERROR} and m["num_groups"] == 2
    with pytest.raises(ValueError):  # without a guard (the simulator, tests) errors still surface
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), groups, cfg,
                   pad_token_id=tokenizer.pad_token_id)


def test_every_group_rejected_takes_no_step(policy):
    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    groups = [lie(g, LIES["minus_41"]) for g in honest_groups(model, tokenizer, n=2)]
    before = [p.detach().clone() for p in model.parameters()]
    m = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), groups,
                   TrainStepConfig(), pad_token_id=tokenizer.pad_token_id, guard=(guard := GroupGuard()))
    assert len(guard.rejected) == 2 and m["num_groups"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_spot_check_passes_honest_groups_and_catches_small_lies(policy):
    model, tokenizer = policy
    for sampling in ({}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 0.7}):
        for g in honest_groups(model, tokenizer, n=4, seed=3, **sampling):
            r = spot_check(model, g.prompt_ids, g.completion_ids, g.sampler_logprobs, **sampling)
            assert r.ok, (sampling, r)
    g = honest_groups(model, tokenizer, n=1, seed=4)[0]
    for how in (lambda q: q - 0.5, lambda q: q * 3 - 0.4):  # shifted, scaled: inside the plausibility bounds
        liar = lie(g, how)
        r = spot_check(model, g.prompt_ids, liar.completion_ids, liar.sampler_logprobs)
        assert not r.ok and r.reason == LOGPROB_MISMATCH
    # completions of another model (the tiny architecture, differently seeded), with its own consistent log-probs
    g = honest_groups(other_model(model), tokenizer, n=1, seed=5)[0]
    r = spot_check(model, g.prompt_ids, g.completion_ids, g.sampler_logprobs)
    assert not r.ok and r.reason == LOGPROB_MISMATCH, r
    # a token the run's top-k never allows, with its true log-prob
    g = honest_groups(model, tokenizer, n=1, seed=6, temperature=3.0)[0]  # high temperature: unlikely tokens
    r = spot_check(model, g.prompt_ids, g.completion_ids, g.sampler_logprobs, temperature=3.0, top_k=1)
    assert not r.ok and r.reason == IMPOSSIBLE_TOKEN, r


def test_bans_persist_with_the_trained_groups_of_the_sampler(tmp_path):
    intake = Intake(IntakeConfig(), tmp_path)
    liar, honest = "ab" * 32, "cd" * 32
    groups = [ScoredGroup([1], [[2]], [[-1.0]], [0.0], 3, tag=(liar, 10)),
              ScoredGroup([1], [[2]], [[-1.0]], [0.0], 3, tag=(honest, 11)),
              ScoredGroup([1], [[2]], [[-1.0]], [0.0], 3, tag=(liar, 12))]
    intake.after_step(1, 4, groups, {}, {})
    intake.after_step(2, 5, groups, {2: IMPLAUSIBLE}, {2: "gap"})
    assert intake.is_banned(bytes.fromhex(liar)) and not intake.is_banned(honest)
    assert intake.rejections() == {IMPLAUSIBLE: 1, f"ban_{IMPLAUSIBLE}": 1}
    again = Intake(IntakeConfig(), tmp_path)  # a restarted learner
    assert again.is_banned(liar) and again.rejections() == {f"ban_{IMPLAUSIBLE}": 1}
    assert again.drop_if_banned(liar) and again.counts["dropped_banned"] == 1
    (rec,) = [json.loads(line) for line in (tmp_path / BANS_FILE).read_text().splitlines()]
    assert rec["reason"] == IMPLAUSIBLE
    assert rec["trained_groups"] == [{"seq": 10, "policy_version": 3, "step": 1},
                                     {"seq": 12, "policy_version": 3, "step": 1},
                                     {"seq": 10, "policy_version": 3, "step": 2}]


def test_validator_refuses_what_the_trainer_would():
    from protocol.rollout import RolloutGroup, encode_group
    from protocol.validate import RolloutValidator, ValidatorConfig
    from tests.test_protocol_util import SAMPLER

    def push(completions, logprobs, seq):
        g = RolloutGroup.from_completions(run_id="r", seq=seq, policy_version=0, prompt_index=0, prompt_ids=[1, 2],
                                          completions=completions, logprobs=logprobs)
        return v.validate(encode_group(g, SAMPLER))

    v = RolloutValidator(ValidatorConfig(run_id="r", vocab_size=100), current_version=lambda: 0)
    with pytest.raises(ProtocolError) as e:
        push([[3], []], [np.array([-1.0], np.float32), np.array([], np.float32)], 1)
    assert e.value.reason is Reason.SHAPE_MISMATCH
    with pytest.raises(ProtocolError) as e:
        push([[3, 4]], [np.array([-1.0, 3e-4], np.float32)], 2)
    assert e.value.reason is Reason.BAD_LOGPROBS
    g = push([[3, 4]], [np.array([-1.0, 5e-5], np.float32)], 3)  # the slack both accept
    ScoredGroup(g.prompt_ids.tolist(), [c.tolist() for c in g.completions()],
                [lp.tolist() for lp in g.completion_logprobs()], [0.0])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_no_false_positives_over_2000_honest_groups_up_to_max_staleness():
    """Honest stale groups from the staleness simulator (the real train_step, lags up to the learner's default
    --max-staleness 32) never exceed the plausibility bounds."""
    from gepo.staleness import StalenessConfig
    from scripts.logprob_gaps import measure, summarise

    cfg = StalenessConfig(max_lag=32, delay_kind="weibull", steps=42, groups_per_step=50, group_size=2,
                          groups_per_batch=25, max_new_tokens=8, lr=1e-4, eval_every=10**6, eval_size=20, seed=3)
    records = measure(cfg)
    summary = summarise(records, PlausibilityConfig())
    assert summary["groups"] >= 2000 and summary["max_lag_seen"] >= 24, summary
    assert summary["groups_beyond_bounds"] == 0, summary
