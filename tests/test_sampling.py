"""gepo.sampling on the shipped tiny policy: shapes, EOS, log-prob convention, determinism, greedy, length cap."""

from __future__ import annotations

import pytest
import torch

from gepo.data import format_prompt
from gepo.sampling import (
    GeneratedGroup,
    SamplingParams,
    generate_group,
    generate_groups,
    greedy_completions,
    parse_integer_answer,
    resolve_eos_ids,
)
from gepo.tiny_policy import load_tiny_policy

QUESTIONS = ["What is 23 + 45?", "What is 7 + 8?", "What is 90 + 19?", "What is (12 * 3) - 4?"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy():
    model, tokenizer = load_tiny_policy()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(policy):
    _, tokenizer = policy
    return [format_prompt(tokenizer, q) for q in QUESTIONS]


def _fresh_logprobs(model, prompt, completion, temperature):
    """log_softmax(logits / T) of an unpadded forward over prompt + completion, at the completion tokens."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_shapes_and_eos(policy, prompts):
    model, tokenizer = policy
    params = SamplingParams(n=5, max_new_tokens=8, seed=1)
    groups = generate_groups(model, prompts, params, eos=tokenizer)
    assert len(groups) == len(prompts)
    eos = tokenizer.eos_token_id
    for group, prompt in zip(groups, prompts):
        assert isinstance(group, GeneratedGroup)
        assert group.prompt_ids == prompt
        assert group.size == 5 and len(group.logprobs) == 5 and len(group.finished) == 5
        for ids, lps, fin in zip(group.completion_ids, group.logprobs, group.finished):
            assert 1 <= len(ids) <= 8
            assert len(lps) == len(ids)
            assert all(lp <= 0.0 for lp in lps)
            assert eos not in ids[:-1], "nothing may follow EOS"
            assert fin == (ids[-1] == eos)
            if not fin:
                assert len(ids) == 8, "an unfinished completion must have hit max_new_tokens"
            assert tokenizer.pad_token_id not in ids
    # the warm-started policy answers and stops: most completions end with EOS
    finished = [f for g in groups for f in g.finished]
    assert sum(finished) >= len(finished) // 2
    assert groups[0].num_tokens == sum(len(c) for c in groups[0].completion_ids)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.8, 0, 0.9), (1.0, 3, 0.8)]
)
def test_logprobs_match_fresh_forward(policy, prompts, temperature, top_k, top_p):
    """Returned log-probs are log_softmax(logits / T) of the full distribution, whatever the top-k/top-p filter."""
    model, tokenizer = policy
    params = SamplingParams(n=4, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    groups = generate_groups(model, prompts, params, eos=tokenizer)
    for group in groups:
        for ids, lps in zip(group.completion_ids, group.logprobs):
            expected = _fresh_logprobs(model, group.prompt_ids, ids, temperature)
            assert torch.allclose(torch.tensor(lps), expected, atol=1e-4), (ids, lps, expected.tolist())


def test_filtering_restricts_the_support(policy, prompts):
    model, tokenizer = policy
    params = SamplingParams(n=16, max_new_tokens=6, temperature=2.0, top_k=2, seed=0)
    group = generate_group(model, tokenizer, prompts[0], params)
    ids = torch.tensor([list(prompts[0]) + group.completion_ids[0]])
    # every sampled token is among the 2 most likely at its step
    for ids_row in group.completion_ids:
        full = torch.tensor([list(prompts[0]) + ids_row])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(prompts[0]) - 1 : -1]
        top2 = logits.topk(2, dim=-1).indices
        assert all(tok in top2[i].tolist() for i, tok in enumerate(ids_row))
    assert ids.shape[1] > len(prompts[0])


def test_seed_determinism_and_global_rng_untouched(policy, prompts):
    model, tokenizer = policy
    params = SamplingParams(n=6, max_new_tokens=8, temperature=1.5, seed=123)
    state = torch.get_rng_state()
    a = generate_groups(model, prompts, params, eos=tokenizer)
    b = generate_groups(model, prompts, params, eos=tokenizer)
    assert torch.equal(state, torch.get_rng_state()), "a seeded call must not draw from the global RNG"
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    c = generate_groups(model, prompts, SamplingParams(n=6, max_new_tokens=8, temperature=1.5, seed=124), eos=tokenizer)
    assert [g.completion_ids for g in a] != [g.completion_ids for g in c]


def test_top_k_1_is_greedy(policy, prompts):
    model, tokenizer = policy
    groups = generate_groups(model, prompts, SamplingParams(n=3, top_k=1, max_new_tokens=10, seed=0), eos=tokenizer)
    texts = greedy_completions(model, tokenizer, QUESTIONS, max_new_tokens=10)
    for group, prompt, text in zip(groups, prompts, texts):
        assert all(c == group.completion_ids[0] for c in group.completion_ids)
        # HF's own greedy decoding of the unpadded prompt agrees
        out = model.generate(
            input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=10, top_k=None, top_p=None,
            temperature=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        hf = out[0, len(prompt) :].tolist()
        ours = group.completion_ids[0]
        assert hf[: len(ours)] == ours
        assert tokenizer.decode(ours, skip_special_tokens=True) == text


def test_padding_does_not_change_a_prompt(policy, prompts):
    """A short prompt decodes the same alone as batched with longer (so left-padded) ones."""
    model, tokenizer = policy
    short = min(prompts, key=len)
    params = SamplingParams(n=2, top_k=1, max_new_tokens=8)
    alone = generate_group(model, tokenizer, short, params)
    batched = generate_groups(model, [max(prompts, key=len), short], params, eos=tokenizer)[1]
    assert alone.completion_ids == batched.completion_ids
    assert torch.allclose(torch.tensor(alone.logprobs), torch.tensor(batched.logprobs), atol=1e-4)


@pytest.mark.parametrize("cap", [1, 2])
def test_max_new_tokens_respected(policy, prompts, cap):
    model, tokenizer = policy
    groups = generate_groups(model, prompts, SamplingParams(n=4, max_new_tokens=cap, seed=0), eos=tokenizer)
    for g in groups:
        for ids, fin in zip(g.completion_ids, g.finished):
            assert 1 <= len(ids) <= cap
            assert fin == (ids[-1] == tokenizer.eos_token_id)
            assert fin or len(ids) == cap


def test_max_batch_rows_and_eos_resolution(policy, prompts):
    model, tokenizer = policy
    params = SamplingParams(n=4, top_k=1, max_new_tokens=6)
    whole = generate_groups(model, prompts, params)  # EOS from the model's generation config
    chunked = generate_groups(model, prompts, params, eos=[tokenizer.eos_token_id], max_batch_rows=5)
    assert [g.completion_ids for g in whole] == [g.completion_ids for g in chunked]
    assert resolve_eos_ids(tokenizer) == (tokenizer.eos_token_id,)
    assert resolve_eos_ids(None, model) == (tokenizer.eos_token_id,)
    assert resolve_eos_ids((5, 7)) == (5, 7)
    assert generate_groups(model, [], params) == []


def test_params_validation_and_parsing():
    with pytest.raises(ValueError):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(n=0)
    assert parse_integer_answer("68") == 68
    assert parse_integer_answer(" -12 apples") == -12
    assert parse_integer_answer("1,024") == 1024
    assert parse_integer_answer("no number") is None
