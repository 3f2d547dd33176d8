"""LoRA adapter versions (--publish-adapter): the signed manifest fields, the merge a sampler does (checked against
peft's own merge_and_unload), the rank-2r adapters of a resumed learner, the refusal of a wrong base, and the weight
store keeping a base while adapter versions refer to it. The real tiny policy and real peft; no processes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from node.adapters import AdapterVersions, merge_adapter, state_digest
from node.model_io import policy_tensors
from node.policy_setup import PolicyConfig, build_policy, published_tensors
from node.weights_store import WeightStore
from protocol.adapter import AdapterInfo, adapter_tensor_names, check_base
from protocol.errors import ProtocolError, Reason
from protocol.manifest import build_manifest, decode_manifest, encode_manifest, manifest_digest, torch_state_dict
from tests.test_protocol_manifest import forge, reason_of
from tests.test_protocol_util import LEARNER, RUN

BASE_DIGEST = hashlib.sha256(b"base manifest").digest()


def lora_policy(seed: int = 0):
    torch.manual_seed(seed)
    policy, _ = build_policy(PolicyConfig(lora_r=4, lora_alpha=8), None, None, "cpu", torch.float32)
    return policy


def train_adapters(policy, seed: int) -> None:
    """Stand-in for optimizer steps: every adapter factor moves (B leaves 0, as after the first steps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def adapter_manifest(version=3, **info_kw):
    targets = ("m.q", "m.v")
    tensors = {}
    for t in targets:
        a, b = adapter_tensor_names(t)
        tensors[a], tensors[b] = torch.randn(4, 16).to(torch.bfloat16), torch.randn(8, 4).to(torch.bfloat16)
    info = AdapterInfo(**{"base_version": 0, "base_digest": BASE_DIGEST, "scaling": 2.0, "rank": 4,
                          "targets": targets, **info_kw})
    return build_manifest(tensors, run_id=RUN, version=version, parent=version - 1, chunk_size=4096, adapter=info,
                          created_at=1.0)


def test_adapter_fields_are_signed_and_round_trip():
    m, buf = adapter_manifest()
    data = encode_manifest(m, LEARNER)
    back = decode_manifest(data, learner=LEARNER.public_key)
    assert back.encoding == "lora" and back.adapter == m.adapter
    assert back.adapter.base_version == 0 and back.adapter.base_digest == BASE_DIGEST
    assert back.adapter.scaling == 2.0 and back.adapter.targets == ("m.q", "m.v")
    # the adapter field is inside the signed body: changing it breaks the signature
    tampered = data.replace(BASE_DIGEST, hashlib.sha256(b"other").digest())
    assert reason_of(decode_manifest, tampered) == Reason.BAD_SIGNATURE


@pytest.mark.parametrize("mutate, reason, words", [
    (lambda b: b["adapter"].update(scaling=float("nan")), Reason.MALFORMED, "adapter.scaling"),
    (lambda b: b["adapter"].update(scaling=0.0), Reason.MALFORMED, "adapter.scaling"),
    (lambda b: b["adapter"].update(base_digest=b"x"), Reason.MALFORMED, "adapter.base_digest"),
    (lambda b: b["adapter"].update(rank=5), Reason.SHAPE_MISMATCH, "rank 5"),
    (lambda b: b["adapter"].update(base=3), Reason.SHAPE_MISMATCH, "not after its base"),
    (lambda b: b["adapter"].update(targets=["m.q"]), Reason.SHAPE_MISMATCH, "do not match the targets"),
    (lambda b: b["adapter"].update(targets=["m.q", "m.q"]), Reason.MALFORMED, "twice"),
    (lambda b: b["adapter"].update(extra=1), Reason.MALFORMED, "unexpected fields"),
    (lambda b: b["adapter"].pop("rank"), Reason.MALFORMED, "missing fields"),
    (lambda b: b.pop("adapter"), Reason.MALFORMED, "without an adapter"),
    (lambda b: b.update(encoding="raw"), Reason.MALFORMED, "with an adapter"),
    (lambda b: b["tensors"][0].__setitem__(1, "int16"), Reason.SHAPE_MISMATCH, "not a float dtype"),
])
def test_bad_adapter_fields_get_a_one_line_error(mutate, reason, words):
    m, _ = adapter_manifest()
    body = m.to_body()
    mutate(body)
    with pytest.raises(ProtocolError) as e:
        decode_manifest(forge(body))
    assert e.value.reason == reason and words in str(e.value) and "\n" not in str(e.value)


def test_building_a_bad_adapter_version_is_a_caller_error():
    with pytest.raises(ValueError, match="rank 8"):
        adapter_manifest(rank=8)
    with pytest.raises(ValueError, match="not after its base"):
        adapter_manifest(version=1, base_version=1)


def test_merge_equals_peft_merge_and_unload_to_bf16_rounding():
    policy = lora_policy()
    base = policy_tensors(policy.get_base_model(), dtype=torch.bfloat16,
                          state={k.replace(".base_layer.", "."): v for k, v in
                                 policy.get_base_model().state_dict().items() if "lora_" not in k})
    versions = AdapterVersions(torch.bfloat16)
    versions.published(0, BASE_DIGEST, policy)  # B = 0: the base is the plain model
    assert versions.base.factors is None
    train_adapters(policy, seed=1)
    tensors, info = versions.tensors(policy)
    assert info.rank == 4 and info.scaling == 2.0 and len(info.targets) == 28 and info.base_version == 0
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    merged = merge_adapter(base, tensors, info)

    # peft's merge of the same published numbers: the bf16 base and the bf16 adapters, in float32
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(p.to(torch.bfloat16).float())
    reference = {k: v.to(torch.bfloat16) for k, v in policy.merge_and_unload().state_dict().items()}
    assert set(merged) <= set(reference)
    changed = 0
    for name, t in merged.items():
        r = reference[name]
        assert t.dtype == torch.bfloat16 and t.shape == r.shape, name
        diff = (t.float() - r.float()).abs()
        ulp = r.float().abs().clamp_min(1e-30) * 2.0 ** -7  # one bf16 step at r's magnitude
        assert bool((diff <= ulp).all()), name  # at most one rounding step apart (summation order)
        assert (diff == 0).float().mean() > 0.99, name
        changed += not torch.equal(t, base[name])
    assert changed == 28  # every target moved, nothing else did
    assert {n for n in merged if not torch.equal(merged[n], base[n])} == {f"{t}.weight" for t in info.targets}


def test_a_resumed_learner_publishes_rank_2r_adapters_over_its_merged_base():
    policy = lora_policy()
    train_adapters(policy, seed=2)  # the adapters of a checkpoint at version N
    base = published_tensors(policy, torch.float32)  # the resumed learner's first (full) version: merged at N
    versions = AdapterVersions(torch.float32)
    versions.published(7, BASE_DIGEST, policy)
    assert versions.base.factors is not None
    train_adapters(policy, seed=3)
    tensors, info = versions.tensors(policy)
    assert info.rank == 8 and info.base_version == 7
    merged = merge_adapter(base, tensors, info)
    expected = published_tensors(policy, torch.float32)  # what the learner would publish in full
    for name, t in expected.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-6)


def test_a_wrong_base_is_refused():
    m, buf = adapter_manifest()
    base_tensors = {"m.q.weight": torch.zeros(8, 16, dtype=torch.bfloat16),
                    "m.v.weight": torch.zeros(8, 16, dtype=torch.bfloat16)}
    base, base_buf = build_manifest(base_tensors, run_id=RUN, version=0, chunk_size=4096)
    check_base(m.adapter, 3, m.tensors, 0, BASE_DIGEST, base.tensors)  # the named base: accepted
    other = hashlib.sha256(b"another base").digest()
    with pytest.raises(ProtocolError) as e:
        check_base(m.adapter, 3, m.tensors, 0, other, base.tensors)
    assert e.value.reason == Reason.HASH_MISMATCH and "refused" in str(e.value)
    assert BASE_DIGEST.hex()[:12] in str(e.value) and other.hex()[:12] in str(e.value)
    with pytest.raises(ProtocolError, match="applies to base version 0"):
        check_base(m.adapter, 3, m.tensors, 1, BASE_DIGEST, base.tensors)
    wrong_shape, _ = build_manifest({**base_tensors, "m.v.weight": torch.zeros(16, 8)}, run_id=RUN, version=0,
                                    chunk_size=4096)
    with pytest.raises(ProtocolError) as e:
        check_base(m.adapter, 3, m.tensors, 0, BASE_DIGEST, wrong_shape.tensors)
    assert e.value.reason == Reason.SHAPE_MISMATCH and "m.v" in str(e.value)
    # the merge itself works on what passed the check
    merged = merge_adapter(torch_state_dict(base, base_buf), torch_state_dict(m, buf), m.adapter)
    a, b = torch_state_dict(m, buf)["m.q.lora_A"], torch_state_dict(m, buf)["m.q.lora_B"]
    assert torch.equal(merged["m.q.weight"], (2.0 * (b.float() @ a.float())).to(torch.bfloat16))


def test_the_weight_store_keeps_a_base_while_adapter_versions_refer_to_it():
    store = WeightStore(None, keep=2)
    base, base_buf = build_manifest({"m.q.weight": torch.zeros(8, 16), "m.v.weight": torch.zeros(8, 16)},
                                    run_id=RUN, version=0, chunk_size=4096)
    base_bytes = encode_manifest(base, LEARNER)
    store.add_complete(base, base_bytes, base_buf)
    for v in range(1, 5):
        m, buf = adapter_manifest(version=v, base_digest=manifest_digest(base_bytes))
        store.add_complete(m, encode_manifest(m, LEARNER), buf)
    assert [vb.version for vb in store.versions()] == [0, 3, 4]
    full, full_buf = build_manifest({"x": torch.zeros(4)}, run_id=RUN, version=5, chunk_size=4096)
    store.add_complete(full, encode_manifest(full, LEARNER), full_buf)
    m6, buf6 = build_manifest({"x": torch.ones(4)}, run_id=RUN, version=6, chunk_size=4096)
    store.add_complete(m6, encode_manifest(m6, LEARNER), buf6)
    assert [vb.version for vb in store.versions()] == [5, 6]  # no adapter version refers to the base any more


def test_state_digest_names_the_weights():
    a = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    assert state_digest(a) == state_digest(dict(reversed(list(a.items()))))
    assert state_digest(a) != state_digest({**a, "w": torch.ones(2, 2).to(torch.bfloat16)})
    assert state_digest(a) != state_digest({**a, "b": torch.tensor([0.0, 1e-30])})


def test_publish_adapter_without_lora_is_a_one_line_usage_error(tmp_path):
    import subprocess
    import sys

    from node.local import REPO

    out = subprocess.run([sys.executable, "-m", "node.learner", "--publish-adapter", "--online", "--run-dir",
                          str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and "--publish-adapter needs --lora-r > 0" in errors[0], out.stderr[-2000:]
