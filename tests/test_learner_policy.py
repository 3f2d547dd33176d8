"""The learner program with the policy options, end to end: --beta 0.04 with its reference policy (online and from
the swarm), bf16 autocast over fp32 master weights, an LR schedule across --resume, and LoRA adapters that train,
checkpoint, resume and reach a real sampler as a merged policy.

Real processes on loopback, real hivemind nodes, signatures, math-verify and the real tiny policy.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from node.local import LOOPBACK, Proc, join_args
from node.metrics import read_metrics

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def learner_args(run_dir, *extra: str) -> list[str]:
    return ["-m", "node.learner", "--run-dir", str(run_dir), "--run-id", "policy", "--group-size", "4",
            "--groups-per-step", "2", "--eval-every", "0", "--reward-workers", "1", "--no-tensorboard",
            "--torch-threads", "1", *extra]


def steps_in(path) -> list[dict]:
    return [m for m in read_metrics(path) if "loss" in m] if path.is_file() else []


def wait_for_steps(path, n: int, proc: Proc, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while len(steps_in(path)) < n:
        assert proc.popen.poll() is None, proc.tail()
        assert time.monotonic() < deadline, f"fewer than {n} steps in {timeout}s:\n{proc.tail()}"
        time.sleep(0.2)


def expected_linear_lr(step: int, lr: float, warmup: int, total: int) -> float:
    """transformers' linear schedule with warm-up, for the step-th optimizer step (0-based)."""
    if step < warmup:
        return lr * step / warmup
    return lr * max(0.0, (total - step) / (total - warmup))


def test_online_beta_bf16_autocast_and_the_schedule_survive_resume(tmp_path):
    run_dir = tmp_path / "online"
    lr, warmup, total = 1e-3, 3, 10
    args = learner_args(run_dir, "--online", "--beta", "0.04", "--dtype", "bfloat16", "--lr", str(lr),
                        "--lr-scheduler", "linear", "--warmup-steps", str(warmup), "--max-steps", str(total),
                        "--checkpoint-every", "100", "--max-prompt-length", "64",
                        "--data-max-examples", "2000")
    first = Proc(args, tmp_path / "online1.log")
    try:
        wait_for_steps(run_dir / "metrics.jsonl", 4, first)
        assert first.stop(60) == 130, first.tail()  # graceful stop: a checkpoint at the step boundary
    finally:
        first.stop()
    stopped_at = steps_in(run_dir / "metrics.jsonl")[-1]["step"]
    assert 4 <= stopped_at < total
    second = Proc([*args, "--resume"], tmp_path / "online2.log")
    try:
        second.wait_for(rf"resumed from .* at step {stopped_at}, policy version {stopped_at}", timeout=120)
        second.wait_for(r"done: step", timeout=300)
        assert second.popen.wait(30) == 0, second.tail()
    finally:
        second.stop()

    steps = steps_in(run_dir / "metrics.jsonl")
    assert [m["step"] for m in steps] == list(range(1, total + 1))
    # The schedule continues where the checkpoint left it (a fresh scheduler would warm up again from lr 0).
    assert [m["lr"] for m in steps] == pytest.approx([expected_linear_lr(i, lr, warmup, total) for i in range(total)])
    # The reference KL is in every step; the reference stays the starting weights across --resume (reloaded from
    # the checkpoint it would drop back to bf16 noise, the level of step 1, where the policy is the reference).
    kl = [m["kl_ref"] for m in steps]
    assert all(np.isfinite(kl)) and kl[0] < 1e-3
    assert kl[stopped_at] > 10 * kl[0], kl
    assert all(m["prompts_skipped_too_long"] == 0 for m in steps)


def test_swarm_lora_with_beta_trains_checkpoints_resumes_and_publishes_the_merged_policy(tmp_path):
    from node.policy_setup import PolicyConfig, build_policy, published_tensors
    from protocol.manifest import decode_manifest, torch_state_dict

    run_dir = tmp_path / "lora"
    # --max-staleness 0: step k trains on groups sampled with version k - 1, so the sampler must have downloaded
    # every version but the last (the learner exits after publishing it); checkpoints every step keep the last two.
    # The resumed run allows a lag of 1: a version the sampler was still downloading when the first learner exited
    # is not always completed after the restart (a swarm-layer limit), and version 4 then needs groups from 2.
    lora = ["--lora-r", "4", "--lora-alpha", "8", "--beta", "0.04", "--lr", "3e-3", "--publish-dtype", "bfloat16",
            "--checkpoint-every", "1", "--max-staleness", "0"]
    procs: list[Proc] = []

    def sampler_tensors(version: int) -> dict[str, torch.Tensor]:
        weights = tmp_path / "s" / "weights"
        manifest = decode_manifest((weights / f"v{version:012d}.manifest").read_bytes())
        return torch_state_dict(manifest, (weights / f"v{version:012d}.bin").read_bytes())

    def merged_checkpoint(step: int) -> dict[str, torch.Tensor]:
        policy, _ = build_policy(PolicyConfig(lora_r=4, lora_alpha=8), None,
                                 run_dir / "checkpoints" / f"step-{step:06d}", "cpu", torch.float32)
        return published_tensors(policy, torch.bfloat16)

    try:
        learner = Proc(learner_args(run_dir, *lora, "--max-steps", "3", *LOOPBACK), tmp_path / "learner1.log")
        procs.append(learner)
        join = join_args(learner, timeout=300)
        port = re.search(r"/tcp/(\d+)/", " ".join(join)).group(1)
        sampler = Proc(["-m", "node.sampler", *join, "--state-dir", str(tmp_path / "s"), "--batch-prompts", "2",
                        "--torch-threads", "1", *LOOPBACK], tmp_path / "s.log")
        procs.append(sampler)
        learner.wait_for(r"LoRA r=4: \d+ trainable parameters", timeout=10)
        learner.wait_for(r"done: step 3", timeout=300)
        assert learner.popen.wait(60) == 0, learner.tail()
        assert re.search(r"version 2 ready", sampler.output), sampler.tail()

        steps = steps_in(run_dir / "metrics.jsonl")
        assert [m["policy_version"] for m in steps] == [1, 2, 3]
        assert steps[0]["kl_ref"] == 0.0  # LoRA starts as the identity and the reference is its base
        assert steps[-1]["kl_ref"] > 0
        saved = run_dir / "checkpoints" / "step-000003" / "model"
        assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
        # What the sampler downloaded and verified is the merged policy rounded once to bf16, under plain names.
        received = sampler_tensors(2)
        expected = merged_checkpoint(2)
        assert set(received) == set(expected) and not any("lora" in name for name in received)
        for name, t in expected.items():
            assert received[name].dtype == torch.bfloat16 and torch.equal(received[name], t), name

        # Resume on the same port and identity: the adapters continue, new versions reach the same sampler.
        host = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]
        resumed = Proc(learner_args(run_dir, *lora, "--max-steps", "5", "--resume", "--max-staleness", "1", *host,
                                    *LOOPBACK[2:]),
                       tmp_path / "learner2.log")
        procs.append(resumed)
        resumed.wait_for(r"resumed from .* at step 3, policy version 3", timeout=120)
        resumed.wait_for(r"done: step 5", timeout=300)
        assert resumed.popen.wait(60) == 0, resumed.tail()
        assert re.search(r"version 4 ready", sampler.output), sampler.tail()
        after = steps_in(run_dir / "metrics.jsonl")[3:]
        assert [m["policy_version"] for m in after] == [4, 5]
        assert all(m["kl_ref"] > 0 for m in after)
        received, expected = sampler_tensors(4), merged_checkpoint(4)
        for name, t in expected.items():
            assert torch.equal(received[name], t), name
        assert any(not torch.equal(expected[n], merged_checkpoint(5)[n]) for n in expected)  # it kept training
        assert sampler.popen.poll() is None, sampler.tail()
    finally:
        for p in procs:
            p.stop()
