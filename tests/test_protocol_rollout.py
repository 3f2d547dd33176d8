"""Rollout groups: round trip, wire layout, tamper detection, typed rejection of signed-but-malformed messages."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from protocol.errors import ProtocolError, Reason
from protocol.rollout import (
    PREFIX_BYTES,
    Limits,
    RolloutGroup,
    SamplingParams,
    decode_group,
    encode_group,
    prompt_hash,
    raw_tensor_bytes,
    read_sender,
    wire_size,
)
from tests.test_protocol_util import OTHER, SAMPLER, forge_group, make_group, resign_group, signed_group, split_group


def reason_of(fn, *a, **kw) -> Reason:
    with pytest.raises(ProtocolError) as ei:
        fn(*a, **kw)
    return ei.value.reason


@pytest.mark.parametrize("reward", [True, False])
@pytest.mark.parametrize("ragged", [True, False])
def test_round_trip(reward, ragged):
    g = make_group(reward=reward, ragged=ragged)
    data = encode_group(g, SAMPLER)
    d = decode_group(data)
    assert d.sampler == SAMPLER.public_key
    g.sampler = SAMPLER.public_key
    assert d == g
    assert d.prompt_ids.dtype == np.int32 and d.logprobs.dtype == np.float32
    assert d.prompt_ids.flags.writeable and d.prompt_ids.flags.aligned
    assert [len(c) for c in d.completions()] == list(g.completion_lens)
    for a, b in zip(d.completion_logprobs(), g.completion_logprobs()):
        assert a.tobytes() == b.tobytes()
    assert d.prompt_hash == prompt_hash(g.prompt_ids)
    # encoding is deterministic
    assert encode_group(d, SAMPLER) == data


def test_round_trip_edge_shapes():
    # one completion, one prompt token, an empty completion among others
    g = RolloutGroup.from_completions(
        run_id="r", seq=0, policy_version=0, prompt_index=0, prompt_ids=[7],
        completions=[[1, 2, 3], [], [4]], logprobs=[[-0.1, -0.2, -0.3], [], [0.0]],
    )
    d = decode_group(encode_group(g, SAMPLER))
    assert [c.tolist() for c in d.completions()] == [[1, 2, 3], [], [4]]
    assert d.reward is None
    big = make_group(seq=2**63 - 1, policy_version=2**63 - 1, prompt_index=2**63 - 1, G=1, L=1, P=1)
    assert decode_group(encode_group(big, SAMPLER)).seq == 2**63 - 1


def test_wire_layout_and_overhead():
    g = make_group(ragged=False)
    data = encode_group(g, SAMPLER)
    assert data[:4] == b"GSR\x01"
    assert read_sender(data) == SAMPLER.public_key
    assert wire_size(data[:16]) == len(data)
    raw = raw_tensor_bytes(g)
    assert raw == 4 * (128 + 2 * 8 * 512)
    overhead = (len(data) - raw) / raw
    assert overhead < 0.05, overhead  # issue requirement: <= ~5% over the raw tensors


def test_encode_rejects_bad_groups():
    g = make_group()
    with pytest.raises(ValueError):
        encode_group(RolloutGroup(**{**g.__dict__, "logprobs": g.logprobs[:-1]}), SAMPLER)
    with pytest.raises(ValueError):
        encode_group(RolloutGroup(**{**g.__dict__, "run_id": ""}), SAMPLER)
    with pytest.raises(ValueError):
        encode_group(RolloutGroup(**{**g.__dict__, "seq": -1}), SAMPLER)
    with pytest.raises(ValueError):
        encode_group(RolloutGroup(**{**g.__dict__, "prompt_ids": g.prompt_ids.astype(np.float32)}), SAMPLER)
    with pytest.raises(ValueError):
        encode_group(RolloutGroup(**{**g.__dict__, "sampler": OTHER.public_key}), SAMPLER)
    with pytest.raises(ValueError):
        encode_group(RolloutGroup(**{**g.__dict__, "reward": [1.0]}), SAMPLER)
    with pytest.raises(ValueError):  # a completion longer than max_tokens
        encode_group(RolloutGroup(**{**g.__dict__, "sampling": SamplingParams(max_tokens=10)}), SAMPLER)


# --- tampering with a valid message (no key) -------------------------------------------------------------------------
REGIONS = {
    "magic": 0,
    "version": 3,
    "header_len": 4,
    "payload_len": 8,
    "sampler_key": 20,
    "signature": 60,
    "header": PREFIX_BYTES + 20,
    "payload_first": None,  # filled below
    "payload_last": -1,
}


@pytest.mark.parametrize("region", list(REGIONS))
def test_tamper_each_region(region):
    data = bytearray(signed_group())
    header_len = struct.unpack_from("<I", data, 4)[0]
    pos = REGIONS[region] if region != "payload_first" else PREFIX_BYTES + header_len
    data[pos] ^= 0x01
    r = reason_of(decode_group, bytes(data))
    expected = {
        "magic": Reason.MALFORMED,
        "version": Reason.UNKNOWN_VERSION,
        "header_len": Reason.OVERSIZE,  # +1 bit makes it > max_header_bytes? else length mismatch
        "payload_len": Reason.MALFORMED,
        "sampler_key": Reason.BAD_SIGNATURE,
        "signature": Reason.BAD_SIGNATURE,
        "header": Reason.BAD_SIGNATURE,
        "payload_first": Reason.HASH_MISMATCH,
        "payload_last": Reason.HASH_MISMATCH,
    }[region]
    if region == "header_len":
        assert r in (Reason.OVERSIZE, Reason.MALFORMED)
    else:
        assert r == expected


def test_truncation_and_extension():
    data = signed_group()
    for n in (0, 1, 3, 15, 16, 111, 112, 200, len(data) - 1):
        assert reason_of(decode_group, data[:n]) in (Reason.MALFORMED, Reason.OVERSIZE)
    assert reason_of(decode_group, data + b"\x00") == Reason.MALFORMED
    assert reason_of(decode_group, b"") == Reason.MALFORMED
    assert reason_of(decode_group, "not bytes") == Reason.MALFORMED


def test_signature_by_other_key_is_rejected():
    data = bytearray(signed_group())
    # swap in another sampler key: the signature no longer verifies
    data[16:48] = OTHER.public_key
    assert reason_of(decode_group, bytes(data)) == Reason.BAD_SIGNATURE
    # an invalid curve point as key
    data[16:48] = b"\xff" * 32
    assert reason_of(decode_group, bytes(data)) == Reason.BAD_SIGNATURE


def test_huge_length_claims_do_not_allocate():
    data = bytearray(signed_group())
    ten_gb = 10 * 2**30
    d1 = bytearray(data)
    struct.pack_into("<Q", d1, 8, ten_gb)
    assert reason_of(decode_group, bytes(d1)) == Reason.OVERSIZE
    with pytest.raises(ProtocolError) as ei:
        wire_size(bytes(d1[:16]))
    assert ei.value.reason == Reason.OVERSIZE
    d2 = bytearray(data)
    struct.pack_into("<I", d2, 4, 0xFFFFFFFF)
    assert reason_of(decode_group, bytes(d2)) == Reason.OVERSIZE
    # limits large enough to let the claim through the limit check: the exact-length check stops it
    big = Limits(max_message_bytes=2**62, max_header_bytes=2**31)
    assert reason_of(decode_group, bytes(d1), big) == Reason.MALFORMED
    # a signed header claiming 10 GB worth of tokens with a tiny payload
    header, payload = split_group(signed_group())
    header["tensors"][2][2] = [ten_gb]
    header["tensors"][3][2] = [ten_gb]
    assert reason_of(decode_group, forge_group(header, payload), big) in (Reason.OVERSIZE, Reason.SHAPE_MISMATCH)


def test_limits_enforced():
    data = signed_group()
    assert reason_of(decode_group, data, Limits(max_message_bytes=1000)) == Reason.OVERSIZE
    assert reason_of(decode_group, data, Limits(max_group_size=4)) == Reason.OVERSIZE
    assert reason_of(decode_group, data, Limits(max_prompt_tokens=100)) == Reason.OVERSIZE
    assert reason_of(decode_group, data, Limits(max_header_bytes=100)) == Reason.OVERSIZE
    # max_completion_tokens: the group has 8 completions of <= 512 tokens; the total exceeds 8*100
    assert reason_of(decode_group, data, Limits(max_completion_tokens=100)) == Reason.OVERSIZE
    ok = signed_group(ragged=False, L=100)
    assert reason_of(decode_group, ok, Limits(max_completion_tokens=99)) in (Reason.OVERSIZE, Reason.SHAPE_MISMATCH)


# --- signed by a real key but malformed: the decoder must still give typed errors -----------------------------------
def test_unknown_version_and_magic():
    header, payload = split_group(signed_group())
    assert reason_of(decode_group, forge_group(header, payload, version=2)) == Reason.UNKNOWN_VERSION
    assert reason_of(decode_group, forge_group(header, payload, magic=b"XYZ")) == Reason.MALFORMED


@pytest.mark.parametrize(
    "updates, reason",
    [
        ({"run": 5}, Reason.MALFORMED),
        ({"run": ""}, Reason.MALFORMED),
        ({"seq": -1}, Reason.MALFORMED),
        ({"seq": True}, Reason.MALFORMED),
        ({"policy_version": 1.5}, Reason.MALFORMED),
        ({"prompt_hash": b"\x00" * 32}, Reason.PROMPT_MISMATCH),
        ({"prompt_hash": b"\x00" * 31}, Reason.MALFORMED),
        ({"payload_hash": b"\x00" * 32}, Reason.HASH_MISMATCH),
        ({"sampling": {"temperature": 1.0}}, Reason.MALFORMED),
        ({"sampling": {"temperature": float("nan"), "top_p": 1.0, "top_k": -1, "max_tokens": 512}}, Reason.MALFORMED),
        ({"started_at": float("inf")}, Reason.MALFORMED),
        ({"reward": [1.0]}, Reason.SHAPE_MISMATCH),
        ({"reward": [float("nan")] * 8}, Reason.MALFORMED),
        ({"reward": "x"}, Reason.MALFORMED),
        ({"extra": 1}, Reason.MALFORMED),
        ({"tensors": []}, Reason.SHAPE_MISMATCH),
        ({"tensors": "x"}, Reason.MALFORMED),
    ],
)
def test_signed_but_bad_header(updates, reason):
    assert reason_of(decode_group, resign_group(signed_group(), **updates)) == reason


def test_signed_but_bad_tensor_table():
    data = signed_group()
    header, payload = split_group(data)

    def with_table(mutate):
        h = {**header, "tensors": [list(map(lambda x: list(x) if isinstance(x, list) else x, t)) for t in header["tensors"]]}
        mutate(h["tensors"])
        return forge_group(h, payload)

    def dtype(t):
        t[3][1] = "float16"

    def name(t):
        t[0][0] = "prompt"

    def ndim(t):
        t[0][2] = [2, 64]

    def lp_count(t):
        t[3][2] = [t[3][2][0] - 1]

    def sizes(t):  # consistent counts but they do not add up to payload_len
        t[0][2] = [t[0][2][0] - 1]

    assert reason_of(decode_group, with_table(dtype)) == Reason.DTYPE_MISMATCH
    assert reason_of(decode_group, with_table(name)) == Reason.MALFORMED
    assert reason_of(decode_group, with_table(ndim)) == Reason.SHAPE_MISMATCH
    assert reason_of(decode_group, with_table(lp_count)) == Reason.SHAPE_MISMATCH
    assert reason_of(decode_group, with_table(sizes)) == Reason.SHAPE_MISMATCH


def test_signed_but_inconsistent_lengths():
    g = make_group(ragged=True)  # lens 512, 475, 438, ...; max_tokens 512
    data = encode_group(g, SAMPLER)
    header, payload = split_group(data)
    P, G = len(g.prompt_ids), g.group_size
    lens = np.frombuffer(payload, dtype="<i4", count=G, offset=4 * P).copy()

    def with_lens(new):
        p = bytearray(payload)
        p[4 * P:4 * (P + G)] = np.asarray(new, dtype="<i4").tobytes()
        h = {**header, "payload_hash": hashlib.sha256(bytes(p)).digest()}
        return forge_group(h, bytes(p))

    bad = lens.copy()
    bad[0] -= 1
    assert reason_of(decode_group, with_lens(bad)) == Reason.SHAPE_MISMATCH  # sum differs
    bad = lens.copy()
    bad[0], bad[1] = -1, bad[1] + 1
    assert reason_of(decode_group, with_lens(bad)) == Reason.SHAPE_MISMATCH  # negative length
    bad = lens.copy()
    bad[0], bad[1] = bad[0] + 1, bad[1] - 1  # 513 > max_tokens 512
    assert reason_of(decode_group, with_lens(bad)) == Reason.SHAPE_MISMATCH
    # a consistent change decodes fine (it is what this sampler signed): boundaries between completions move
    ok = lens.copy()
    ok[0], ok[1] = ok[0] - 10, ok[1] + 10
    d = decode_group(with_lens(ok))
    assert d.completion_lens.tolist() == ok.tolist()
    assert d.completion_ids.tobytes() == g.completion_ids.tobytes()


def test_header_not_msgpack_or_not_map():
    header, payload = split_group(signed_group())
    assert reason_of(decode_group, forge_group(None, payload, header_bytes=b"\xc1")) == Reason.MALFORMED
    assert reason_of(decode_group, forge_group(None, payload, header_bytes=b"\x91\x01")) == Reason.MALFORMED
    assert reason_of(decode_group, forge_group(None, payload, header_bytes=b"\x80\x00")) == Reason.MALFORMED  # extra
    assert reason_of(decode_group, forge_group(None, payload, header_bytes=b"\xc7\x01\x05\x00")) == Reason.MALFORMED
    # deep nesting
    assert reason_of(decode_group, forge_group(None, payload, header_bytes=b"\x91" * 5000 + b"\x00")) == Reason.MALFORMED
    # a container claiming 2**32-1 entries in a tiny header
    assert reason_of(decode_group, forge_group(None, payload, header_bytes=b"\xdd\xff\xff\xff\xff")) == Reason.MALFORMED


def test_memoryview_and_bytearray_inputs():
    data = signed_group()
    assert decode_group(bytearray(data)) == decode_group(data)
    assert decode_group(memoryview(data)) == decode_group(data)
    assert decode_group(np.frombuffer(data, dtype=np.uint8).data) == decode_group(data)
