"""Mixed precision, the reference policy, LR schedules, LoRA and the prompt-length limit, on the real tiny policy.

In process and on CPU: fp32 master weights under bf16 autocast keep an lr-1e-6 update that bf16 weights lose; the
published weights are those master weights rounded once; LoRA adapters train, checkpoint, resume and publish as a
merged plain model a sampler loads; the scheduler and the optimizer continue exactly where a checkpoint left them.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from gepo.config import LossConfig
from gepo.precision import Precision
from gepo.train_step import TrainStepConfig, train_step
from node.model_io import load_policy, model_from_manifest, policy_files, policy_tensors
from node.policy_setup import (AdaptersOff, PolicyConfig, build_policy, build_reference, build_scheduler,
                               drop_long_prompts, published_tensors)
from protocol.manifest import build_manifest
from scripts.bench.bench_precision import fixed_groups, run_modes

pytestmark = pytest.mark.timeout(600)

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="LoRA needs the optional extra: pip install -e '.[peft]'")

# Loss trajectory tolerance of bf16 autocast against fp32, at lr 1e-6 on the fixed batch below. Measured: the
# per-step losses differ by <= 1.4e-3 (bf16 rounding of the logits; the losses themselves fall by ~1e-3 per step),
# and the least-squares slopes of the 10 losses by 4 %.
STEP_TOLERANCE = 3e-3
SLOPE_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = load_policy(None)
    groups = fixed_groups(model, tokenizer, prompts=4, group_size=4, max_new_tokens=8)
    return model, tokenizer, groups


def test_bf16_autocast_over_fp32_master_weights_keeps_lr_1e6_updates(tiny, tmp_path, one_thread):
    model, tokenizer, groups = tiny
    runs = run_modes(model, groups, tokenizer.pad_token_id, steps=10, lr=1e-6)
    fp32, amp, pure = runs["fp32"], runs["bf16-amp"], runs["bf16-pure"]
    assert all(p.dtype == torch.float32 for p in amp.model.parameters())  # the master weights
    assert amp.fraction_changed() >= 0.99, amp.fraction_changed()
    assert fp32.fraction_changed() >= 0.99
    # The old path, AdamW on bf16 weights: almost every update is below bf16's rounding step and lost.
    assert pure.fraction_changed() < 0.10, pure.fraction_changed()

    # The loss follows the fp32 run within the stated tolerance, step by step and in its trend.
    diffs = np.abs(np.array(amp.losses) - np.array(fp32.losses))
    assert diffs.max() <= STEP_TOLERANCE, (amp.losses, fp32.losses)
    slope_fp32 = np.polyfit(np.arange(10), fp32.losses, 1)[0]
    slope_amp = np.polyfit(np.arange(10), amp.losses, 1)[0]
    assert slope_fp32 < 0, fp32.losses  # the batch's loss falls
    assert abs(slope_amp - slope_fp32) <= SLOPE_TOLERANCE * abs(slope_fp32), (slope_amp, slope_fp32)
    slope_pure = np.polyfit(np.arange(10), pure.losses, 1)[0]
    assert abs(slope_pure - slope_fp32) > SLOPE_TOLERANCE * abs(slope_fp32)  # the check can fail

    # Published weights: the master weights rounded to the publish dtype, bit for bit, as a sampler loads them.
    tensors = published_tensors(amp.model, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    manifest, buffer = build_manifest(tensors, run_id="amp", version=10, files=policy_files(amp.model, tokenizer),
                                      chunk_size=1 << 20)
    sampler_model, _ = model_from_manifest(manifest, buffer, tmp_path / "sampler", dtype=torch.bfloat16)
    sampler_params = dict(sampler_model.named_parameters())
    for name, master in amp.model.named_parameters():
        assert torch.equal(sampler_params[name], master.detach().to(torch.bfloat16)), name


def test_fp16_compute_scales_the_loss_and_skips_an_overflowing_step(tiny, one_thread):
    model, tokenizer, groups = tiny
    policy = copy.deepcopy(model)
    precision = Precision.for_device("cpu", torch.float16)
    assert precision.scaler is not None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    cfg = TrainStepConfig(loss=LossConfig(loss_type="grpo"), micro_batch_rows=16)
    probe = policy.model.layers[0].mlp.down_proj.weight
    before = probe.detach().clone()
    m = train_step(policy, optimizer, groups, cfg, pad_token_id=tokenizer.pad_token_id, precision=precision)
    assert m["skipped_nonfinite"] == 0 and np.isfinite(m["grad_norm"]) and m["grad_norm"] < 100  # unscaled norm
    assert not torch.equal(before, probe.detach())
    # A scale that overflows fp16 gradients: the step is skipped, the weights stay, the scale comes down.
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    after_first = probe.detach().clone()
    m = train_step(policy, optimizer, groups, cfg, pad_token_id=tokenizer.pad_token_id, precision=precision)
    assert m["skipped_nonfinite"] == 1
    assert torch.equal(after_first, probe.detach())
    assert precision.scaler.get_scale() < 2.0**100


def test_reference_is_frozen_in_the_compute_dtype_and_kl_appears(tiny, one_thread):
    model, tokenizer, groups = tiny
    cfg = PolicyConfig()
    ref = build_reference(cfg, model, None, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    assert not ref.training
    policy = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    step = TrainStepConfig(loss=LossConfig(loss_type="grpo", beta=0.04), micro_batch_rows=16)
    precision = Precision.for_device("cpu", torch.bfloat16)
    kls = [train_step(policy, optimizer, groups, step, pad_token_id=tokenizer.pad_token_id, ref_model=ref,
                      precision=precision, step_index=i)["kl_ref"] for i in range(3)]
    assert kls[0] < 1e-3 < kls[2], kls  # the policy starts at the reference (bf16 noise only), then moves away
    with pytest.raises(ValueError, match="vocabulary"):
        other = copy.deepcopy(model)
        other.resize_token_embeddings(model.config.vocab_size + 8)
        build_reference(cfg, other, None, "cpu", torch.float32)


def test_fp16_loss_scale_and_growth_tracker_survive_a_checkpoint(tiny, tmp_path, one_thread):
    """--resume with --dtype float16 continues with the scale the run had found, not GradScaler's initial 65536
    (which would overflow, and skip, the first steps again after every restart)."""
    from node.checkpoint import RunState, latest_checkpoint, load_optimizer, save_checkpoint

    model, tokenizer, groups = tiny
    policy = copy.deepcopy(model)
    precision = Precision.for_device("cpu", torch.float16)
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    cfg = TrainStepConfig(loss=LossConfig(loss_type="grpo"), micro_batch_rows=16)
    skipped = []
    for _ in range(4):  # overflowing steps halve the scale; finite ones count towards growth (every 3rd)
        m = train_step(policy, optimizer, groups, cfg, pad_token_id=tokenizer.pad_token_id, precision=precision)
        skipped.append(m["skipped_nonfinite"])
    saved = precision.scaler.state_dict()
    # measured: 2 skipped, then 2 finite steps (scale 2**18, growth tracker 2); the state moved, so the test can fail
    assert 0 < sum(skipped) < 4 and saved["scale"] < 2.0**20 and saved["_growth_tracker"] > 0, (skipped, saved)
    save_checkpoint(tmp_path, policy, tokenizer, optimizer, RunState(step=6, policy_version=6),
                    scaler=precision.scaler)

    resumed = Precision.for_device("cpu", torch.float16)  # what the learner builds before loading a checkpoint
    assert resumed.scaler.get_scale() != saved["scale"]
    load_optimizer(latest_checkpoint(tmp_path), torch.optim.AdamW(copy.deepcopy(model).parameters(), lr=1e-4),
                   scaler=resumed.scaler)
    assert resumed.scaler.state_dict() == saved  # scale, growth tracker, factors and interval
    assert resumed.scaler.get_scale() == saved["scale"]


def test_scheduler_warms_up_decays_and_restores_from_a_checkpoint(tiny, tmp_path):
    from node.checkpoint import RunState, latest_checkpoint, load_optimizer, save_checkpoint

    model, tokenizer, _ = tiny
    cfg = PolicyConfig(lr_scheduler="linear", warmup_steps=2)

    def fresh():
        opt = torch.optim.AdamW(copy.deepcopy(model).parameters(), lr=1e-3)
        return opt, build_scheduler(cfg, opt, max_steps=6)

    optimizer, scheduler = fresh()
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])  # transformers: (N - s) / (N - warmup)

    optimizer, scheduler = fresh()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    save_checkpoint(tmp_path, model, tokenizer, optimizer, RunState(step=3, policy_version=3), scheduler=scheduler)
    optimizer, scheduler = fresh()
    load_optimizer(latest_checkpoint(tmp_path), optimizer, scheduler)
    resumed = []
    for _ in range(3):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == pytest.approx(lrs[3:])
    with pytest.raises(ValueError):
        PolicyConfig(warmup_steps=-1)


@needs_peft
def test_lora_trains_checkpoints_resumes_and_publishes_the_merged_policy(tiny, tmp_path, one_thread):
    from node.checkpoint import RunState, latest_checkpoint, load_optimizer, save_checkpoint

    _, tokenizer, groups = tiny
    cfg = PolicyConfig(lora_r=4, lora_alpha=8, lr_scheduler="cosine")
    step_cfg = TrainStepConfig(loss=LossConfig(loss_type="grpo", beta=0.04), micro_batch_rows=16)

    def setup(checkpoint=None):
        torch.manual_seed(1)
        policy, _ = build_policy(cfg, None, checkpoint, "cpu", torch.float32)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        sched = build_scheduler(cfg, opt, max_steps=4)
        if checkpoint is not None:
            load_optimizer(checkpoint, opt, sched)
        return policy, opt, sched

    def step(policy, opt, sched, i):
        return train_step(policy, opt, groups, step_cfg, pad_token_id=tokenizer.pad_token_id, step_index=i,
                          ref_model=build_reference(cfg, policy, None, "cpu", torch.float32), lr_scheduler=sched)

    policy, opt, sched = setup()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    metrics = [step(policy, opt, sched, i) for i in range(2)]
    assert metrics[0]["kl_ref"] == 0.0  # LoRA starts as the identity: the policy is its base
    assert metrics[1]["kl_ref"] > 0  # the reference is the base with the adapters off
    assert all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    assert isinstance(build_reference(cfg, policy, None, "cpu", torch.float32), AdaptersOff)

    # Checkpoint: the adapters only; resuming continues exactly like the uninterrupted run.
    save_checkpoint(tmp_path, policy, tokenizer, opt, RunState(step=2, policy_version=2), scheduler=sched)
    checkpoint = latest_checkpoint(tmp_path)
    assert (checkpoint / "model" / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model" / "model.safetensors").exists()
    resumed, ropt, rsched = setup(checkpoint)
    for (name, a), b in zip(policy.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    uninterrupted = step(policy, opt, sched, 2)
    continued = step(resumed, ropt, rsched, 2)
    assert continued["lr"] == uninterrupted["lr"] and continued["loss"] == pytest.approx(uninterrupted["loss"])
    for (name, a), b in zip(policy.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7), name
    with pytest.raises(ValueError, match="LoRA adapters"):
        build_policy(PolicyConfig(), None, checkpoint, "cpu", torch.float32)

    # Publishing: the merged policy under the plain model's names, equal to peft's own merge, loaded by a sampler.
    tensors = published_tensors(policy, torch.float32)
    plain, _ = load_policy(None)
    assert list(tensors) == list(policy_tensors(plain))
    merged = copy.deepcopy(policy).merge_and_unload()
    for name, t in policy_tensors(merged).items():
        assert torch.allclose(tensors[name], t, atol=1e-6), name
    manifest, buffer = build_manifest(tensors, run_id="lora", version=3, files=policy_files(policy, tokenizer),
                                      chunk_size=1 << 20)
    sampler_model, _ = model_from_manifest(manifest, buffer, tmp_path / "sampler")
    ids = torch.tensor([list(groups[0].prompt_ids) + list(groups[0].completion_ids[0])])
    policy.eval()
    with torch.no_grad():
        assert torch.allclose(sampler_model(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-4)


@needs_peft
def test_lora_config_errors_are_clear():
    with pytest.raises(ValueError, match="lora-dropout"):
        PolicyConfig(lora_r=4, lora_dropout=1.5)
    with pytest.raises(ValueError, match="lora-target-modules"):
        build_policy(PolicyConfig(lora_r=4, lora_target_modules=["no_such_module"]), None, None, "cpu", torch.float32)


def test_long_prompts_are_skipped_counted_and_samplers_get_the_kept_questions(tiny):
    from gepo.data import DataConfig, DataError, TablePromptSet, format_prompt, load_prompts
    from node.run_info import QuestionSet

    _, tokenizer, _ = tiny
    questions = [f"Tom has {n} apples" + " and more" * (n % 7) + f". How many are left after {n} go?"
                 for n in range(40)]
    prompts = TablePromptSet("apples", questions, [str(n) for n in range(40)])
    lengths = [len(format_prompt(tokenizer, q)) for q in questions]
    limit = int(np.median(lengths))
    kept, skipped = drop_long_prompts(prompts, tokenizer, None, limit)
    assert skipped == sum(n > limit for n in lengths) > 0 and len(kept) == len(prompts) - skipped
    assert all(len(format_prompt(tokenizer, ex.question)) <= limit for ex in kept)
    assert [ex.answer for ex in kept] == [str(i) for i, n in enumerate(lengths) if n <= limit]
    assert drop_long_prompts(prompts, tokenizer, None, max(lengths)) == (prompts, 0)
    with pytest.raises(DataError, match="every prompt"):
        drop_long_prompts(prompts, tokenizer, None, 3)
    # The synthetic set travels as its parameters; a filtered subset of it as its questions, in the learner's order.
    data = DataConfig(source="synthetic", difficulty=1, max_examples=50)
    synthetic = load_prompts(data)
    assert QuestionSet.of(data, synthetic).questions is None
    subset = TablePromptSet("subset", [ex.question for ex in synthetic][::2], [ex.answer for ex in synthetic][::2])
    sent = QuestionSet.of(data, subset)
    assert [sent[i] for i in range(len(subset))] == [ex.question for ex in subset]


def test_help_documents_the_new_flags():
    from node.learner import build_parser

    text = " ".join(build_parser().format_help().split())
    for flag in ("--publish-dtype", "--ref-model", "--lr-scheduler", "--warmup-steps", "--gradient-checkpointing",
                 "--max-prompt-length", "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules"):
        assert flag in text, flag
    assert "{constant,linear,cosine}" in text and "{auto,float32,bfloat16,float16}" in text
    assert "(default: 'constant')" in text and "(default: ['all-linear'])" in text
