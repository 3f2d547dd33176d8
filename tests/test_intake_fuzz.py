"""Fuzz: mutated but validly signed groups through a real learner's intake, scoring and training step.

The learner is the real `node.learner.Learner` (tiny policy, real RewardScorer with math-verify, real validator,
real spot-check thread); only the network is left out: each message goes through the same `_validate` (what the
swarm's validation thread calls), `_take` and `train` the swarm loop uses. Every group is sampled for its assigned
prompt by the learner's own policy, mutated at the field level (log-probs, tokens, lengths, versions, prompt, group
size), then re-encoded and re-signed with a real key — so the signature is valid and only the semantics are hostile.
Property: nothing but ProtocolError escapes intake, nothing at all escapes scoring or training, the learner keeps
taking steps, and the honest sampler between the attackers is never banned.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gepo.config import LossConfig
from gepo.data import DataConfig, assign_prompt_index
from gepo.sampling import generate_groups
from node.intake import IntakeConfig
from node.learner import Learner, LearnerConfig
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.rollout import RolloutGroup, encode_group

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

N_MUTATED = 240
RUN = "fuzz"


def mutate(rng: random.Random, comps: list[list[int]], lps: list[list[float]], vocab: int) -> str:
    """Change the group in place in one random way; returns the kind of change."""
    i = rng.randrange(len(comps))
    kind = rng.choice(["lp_value", "lp_all", "lp_scale", "lp_shift", "empty", "truncate_lp", "extend", "token",
                       "oov", "drop", "dup", "slack"])
    if kind == "lp_value":
        t = rng.randrange(len(lps[i]))
        lps[i][t] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e-3, 2e-4, 5e-5, -41.0, -1e4,
                                -rng.uniform(0, 60)])
    elif kind == "lp_all":
        v = rng.choice([-41.0, -50.0, -1e-4, -20.0, 0.0])
        lps[i] = [v] * len(lps[i])
    elif kind == "lp_scale":
        f = rng.choice([0.0, 0.5, 3.0, 100.0])
        lps[i] = [x * f for x in lps[i]]
    elif kind == "lp_shift":
        d = rng.choice([-0.3, -1.0, -8.0])
        lps[i] = [x + d for x in lps[i]]
    elif kind == "empty":
        comps[i], lps[i] = [], []
    elif kind == "truncate_lp":  # one log-prob short: the encoder refuses (a caller bug, not a message)
        lps[i] = lps[i][:-1]
    elif kind == "extend":
        n = rng.randint(1, 40)
        comps[i] = comps[i] + [rng.randrange(vocab) for _ in range(n)]
        lps[i] = lps[i] + [-rng.uniform(0, 5) for _ in range(n)]
    elif kind == "token":  # a token the policy did not sample, with a made-up log-prob
        t = rng.randrange(len(comps[i]))
        comps[i][t] = rng.randrange(vocab)
    elif kind == "oov":
        comps[i][rng.randrange(len(comps[i]))] = rng.choice([vocab, vocab + 7, -1, 2**31 - 1])
    elif kind == "drop":
        del comps[i], lps[i]
    elif kind == "dup":
        comps.append(list(comps[i]))
        lps.append(list(lps[i]))
    elif kind == "slack":
        t = max(range(len(lps[i])), key=lambda k: lps[i][k])
        lps[i][t] = min(1e-4, lps[i][t] + 1e-4)
    return kind


@pytest.fixture
def learner(tmp_path):
    torch.set_num_threads(1)
    cfg = LearnerConfig(run_dir=str(tmp_path / "learner"), group_size=4, groups_per_step=4, eval_every=0,
                        reward_workers=1, tensorboard=False, max_new_tokens=12, max_staleness=4)
    lrn = Learner(cfg, LossConfig(), DataConfig(), intake=IntakeConfig(verify_first=2, verify_fraction=0.1))
    lrn.make_validator(RUN)
    lrn.intake.start_verifier(lrn.model, cfg.temperature, cfg.top_k, cfg.top_p, lrn.pad_id)
    lrn.intake.published(lrn.version, lrn.model)
    yield lrn
    lrn.close()


def test_mutated_signed_groups_never_stop_the_learner(learner):
    rng = random.Random(0)
    honest = Identity.from_seed(bytes(range(32)))
    seqs = {honest.public_key: 0}
    vocab = len(learner.tokenizer)
    params = learner.run_info().sampling_params()
    pending: list = []
    kinds, outcomes = [], {"rejected": 0, "taken": 0}

    def push(identity: Identity, kind_rng: random.Random | None) -> None:
        seq = seqs.get(identity.public_key, 0)
        seqs[identity.public_key] = seq + 1
        index = assign_prompt_index(identity.public_key, seq, len(learner.prompts))
        prompt = list(learner.prompt_ids(index))
        with torch.no_grad():
            (gen,) = generate_groups(learner.model, [prompt], params.__class__(**{**params.__dict__, "seed": seq}),
                                     eos=learner.tokenizer, pad_token_id=learner.pad_id)
        comps = [list(c) for c in gen.completion_ids]
        lps = [[min(0.0, x) for x in row] for row in gen.logprobs]
        version = learner.version
        if kind_rng is not None:
            kind = mutate(kind_rng, comps, lps, vocab)
            if kind_rng.random() < 0.1:
                version = kind_rng.choice([learner.version + 1, learner.version - 10, -1 + 0 * version])
                kind += "+version"
            kinds.append(kind)
        try:
            group = RolloutGroup.from_completions(run_id=RUN, seq=seq, policy_version=max(version, 0),
                                                  prompt_index=index, prompt_ids=prompt, completions=comps,
                                                  logprobs=[np.asarray(x, np.float32) for x in lps])
            data = encode_group(group, identity)
        except (ValueError, TypeError, OverflowError):
            return  # the encoder refuses it: an honest client cannot even build that message
        try:
            accepted = learner._validate(data)
        except ProtocolError:
            outcomes["rejected"] += 1
            return
        learner._take(accepted, pending)
        outcomes["taken"] += 1

    steps_before = learner.state.step
    for n in range(N_MUTATED):
        push(Identity.from_seed(rng.randbytes(32)), rng)  # a fresh attacker key each time: every group is checked
        if n % 3 == 0:
            push(honest, None)
        for key in learner.intake.poll():
            pending = [p for p in pending if p[0].tag[0] != key]
        while len(pending) >= learner.cfg.groups_per_step:
            batch, pending = pending[: learner.cfg.groups_per_step], pending[learner.cfg.groups_per_step:]
            m = learner.train([g for g, _, _ in batch], [a for _, acc, _ in batch for a in acc], {})
            assert np.isfinite(m["grad_norm"]), m
            learner.intake.published(learner.version, learner.model)
    steps = learner.state.step - steps_before
    assert steps >= 15, (steps, outcomes, learner.intake.rejections())
    assert outcomes["rejected"] >= 30 and outcomes["taken"] >= 60, outcomes
    assert not learner.intake.is_banned(honest.public_key), learner.intake.bans.bans.get(honest.public_key.hex())
    rejections = {**learner.validator.counts(), **learner.intake.rejections()}
    for reason in ("shape_mismatch", "bad_logprobs", "token_out_of_vocab", "implausible_logprobs"):
        assert rejections.get(reason, 0) >= 1, (reason, rejections)
    assert len(set(kinds)) >= 10
