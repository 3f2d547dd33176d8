"""LoRA adapter versions end to end: a real learner (tiny policy, --lora-r 4 --publish-adapter) and a real sampler on
loopback, real hivemind, signatures, math-verify and peft. The base version travels once in full; every later
version travels as its adapters only (the sampler's and the learner's byte counters say so), and the sampler
generates with base + scaling * B @ A: its accepted groups carry adapter versions, and the weights its model holds
are bit for bit the merge of the learner's checkpointed adapters, which is the learner's own merged policy to bf16
rounding. Every process is stopped by its PID."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from node.adapters import AdapterVersions, lora_factors, merge_adapter, state_digest
from node.fault_points import ENV
from node.local import LOOPBACK, Proc, join_args
from node.metrics import read_metrics
from node.policy_setup import PolicyConfig, build_policy, published_tensors
from protocol.manifest import decode_manifest, manifest_digest, torch_state_dict

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

LORA = PolicyConfig(lora_r=4, lora_alpha=8)
PAUSE_AT = 4  # the learner trains steps 1-3, publishes version 3, then waits before step 4 (test-only pause point)


def held(state_dir, version: int):
    weights = state_dir / "weights"
    data = (weights / f"v{version:012d}.manifest").read_bytes()
    return decode_manifest(data), (weights / f"v{version:012d}.bin").read_bytes(), manifest_digest(data)


def sequence(state_dir) -> int:
    """Sequence numbers a sampler has taken (node/sampler.py SequenceCounter: 2 per batch here, before generating)."""
    try:
        return int((state_dir / "sequence.txt").read_text())
    except (OSError, ValueError):
        return 0


def wait_until(condition, proc: Proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.tail()
        time.sleep(0.2)


def test_adapter_versions_reach_samplers_which_generate_with_the_merged_weights(tmp_path):
    run_dir = tmp_path / "learner"
    # --max-staleness 0: step k trains on groups sampled with version k - 1, so the first sampler must have fetched,
    # merged and generated with adapter versions 1 and 2. A second sampler joins late, while the learner waits at
    # version 3: it fetches the base once, then version 3's adapters.
    env = {**os.environ, ENV: f"learner:before_train@{PAUSE_AT}"}
    learner = Proc(["-m", "node.learner", "--run-dir", str(run_dir), "--run-id", "adapters", "--group-size", "4",
                    "--groups-per-step", "2", "--eval-every", "0", "--reward-workers", "1", "--no-tensorboard",
                    "--torch-threads", "1", "--lora-r", "4", "--lora-alpha", "8", "--publish-adapter",
                    "--publish-dtype", "bfloat16", "--lr", "3e-3", "--checkpoint-every", "1", "--max-staleness", "0",
                    "--max-steps", "10", *LOOPBACK], tmp_path / "learner.log", env=env)
    procs = [learner]

    def sampler(name: str) -> Proc:
        proc = Proc(["-m", "node.sampler", *join, "--state-dir", str(tmp_path / name), "--batch-prompts", "2",
                     "--torch-threads", "1", *LOOPBACK], tmp_path / f"{name}.log")
        procs.append(proc)
        return proc

    try:
        join = join_args(learner, timeout=300)
        first = sampler("first")
        learner.wait_for(r"version 0 is the base; later versions carry only the LoRA adapters", timeout=120)
        learner.wait_for(rf"paused at learner:before_train \(version {PAUSE_AT}\)", timeout=300)
        late = sampler("late")
        late.wait_for(r"version 3 is a LoRA adapter over base version 0: fetching the base", timeout=180)
        late.wait_for(r"policy version 3: LoRA r=4 x2 on 28 modules over base version 0 \([0-9a-f]{12}\), merged",
                      timeout=180)
        wait_until(lambda: sequence(tmp_path / "late") >= 4, late)  # a second batch started: the first is sent
        first.wait_for(r"policy version 2: LoRA r=4 x2 on 28 modules over base version 0", timeout=10)
        for proc in (first, late):
            assert proc.stop(60) in (0, 130), proc.tail()  # SIGTERM: each writes stats.json on the way out
        assert learner.stop(60) == 130, learner.tail()  # a clean stop at the pause point
    finally:
        for p in procs:
            p.stop()

    # The first sampler generated with adapter versions: every step trained on groups of the version before it.
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["policy_version"] for m in steps] == list(range(1, PAUSE_AT))
    assert all(set(m["staleness_hist"]) == {"0"} for m in steps), [m["staleness_hist"] for m in steps]

    fresh, _ = build_policy(LORA, None, None, "cpu", torch.float32)  # B = 0: the base is the plain model
    base_state = published_tensors(fresh, torch.bfloat16)
    for name in ("first", "late"):
        check_sampler(tmp_path / name, run_dir, fresh, base_state, late=name == "late")
    uploaded = steps[-1]["bytes_uploaded"]  # the learner's upload counter: the base and v1, v2 for the first sampler
    base, _, _ = held(tmp_path / "first", 0)
    assert base.total_size <= uploaded < base.total_size + 2 * (held(tmp_path / "first", 1)[0].total_size + (16 << 10))


def check_sampler(state_dir, run_dir, fresh, base_state, late: bool) -> None:
    stats = json.loads((state_dir / "stats.json").read_text())
    used = stats["policy_version"]
    assert used == 3 if late else used >= 2
    base, base_buf, base_digest = held(state_dir, 0)
    adapter, adapter_buf, _ = held(state_dir, used)
    assert base.encoding == "raw" and base.adapter is None
    assert adapter.encoding == "lora" and adapter.adapter.base_version == 0
    assert adapter.adapter.base_digest == base_digest and adapter.adapter.rank == 4 and not adapter.files

    # Bytes on the wire: the base once in full, then per version at most the adapter's size (a delta between
    # adapter versions may be smaller). The full policy is ~20x larger than its r=4 adapters.
    adapter_bytes = adapter.total_size
    assert base.total_size > 10 * adapter_bytes
    catchup = {int(v): c for v, c in stats["catchup"].items()}
    assert stats["sent"] >= 2  # groups generated with `used`
    if late:  # version 3 only: its base, then its adapters
        assert list(catchup) == [3] and stats["bytes_down"] == base.total_size + adapter_bytes, stats
    else:
        adapter_versions = sorted(v for v in catchup if v >= 1)
        assert adapter_versions[:2] == [1, 2], catchup
        for v in adapter_versions:
            assert 0 < catchup[v]["fetched_bytes"] <= adapter_bytes, (v, catchup[v])
        assert stats["bytes_down"] <= base.total_size + len(adapter_versions) * adapter_bytes
    # What travelled is the learner's checkpointed adapters, rounded once to bf16, over the plain model...
    assert all(torch.equal(t, base_state[n]) for n, t in torch_state_dict(base, base_buf).items())
    trained, _ = build_policy(LORA, None, run_dir / "checkpoints" / f"step-{used:06d}", "cpu", torch.float32)
    versions = AdapterVersions(torch.bfloat16)
    versions.published(0, base_digest, fresh)
    tensors, info = versions.tensors(trained)
    assert info == adapter.adapter
    received = torch_state_dict(adapter, adapter_buf)
    assert received.keys() == tensors.keys() and all(torch.equal(received[n], t) for n, t in tensors.items())
    # ...the sampler's model holds exactly their merge (in its float32)...
    merged = merge_adapter(base_state, tensors, info)
    assert stats["merged_digest"] == state_digest({n: t.float() for n, t in merged.items()})
    # ...and that is the learner's own merged policy (float32 base and master adapters) to bf16 rounding: the
    # sampler's base and factors were rounded to bf16 first, so an element may be a bf16 step of |W|, of the
    # result or of scaling * |B| @ |A| apart.
    learner_merged = published_tensors(trained, torch.bfloat16)
    factors, scaling = lora_factors(trained)
    moved = 0
    for name, t in learner_merged.items():
        diff = (merged[name].float() - t.float()).abs()
        step = t.float().abs() + base_state[name].float().abs()
        if name.removesuffix(".weight") in factors:
            a, b = factors[name.removesuffix(".weight")]
            step = step + scaling * (b.abs() @ a.abs())
        assert bool((diff <= step * 2.0 ** -7).all()), name
        moved += not torch.equal(t, base_state[name])
    assert moved > 0  # it trained
