"""Weight manifests: layout, round trip (bf16 bit-exact), chunk checks, tampering, signed-but-bad bodies."""

from __future__ import annotations

import hashlib
import json
import struct

import msgpack
import numpy as np
import pytest
import torch

from protocol.errors import ProtocolError, Reason
from protocol.manifest import (
    MANIFEST_DOMAIN,
    PREFIX_BYTES,
    ManifestLimits,
    RawTensor,
    build_manifest,
    decode_manifest,
    encode_manifest,
    file_bytes,
    iter_chunks,
    manifest_digest,
    numpy_tensors,
    read_signer,
    tensor_bytes,
    torch_state_dict,
    verify_buffer,
    verify_chunk,
)
from tests.test_protocol_util import LEARNER, OTHER, RUN

CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}).encode()
TOKENIZER = b'{"model": {"vocab": {"a": 0}}}' * 100


def state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(300, 64, generator=g).to(torch.bfloat16),
        "layers.0.norm": torch.randn(64, generator=g),
        "layers.0.q": torch.randn(64, 64, generator=g).to(torch.float16),
        "step": torch.tensor(7, dtype=torch.int64),  # 0-dim
        "empty": torch.zeros(0, 5),
        "mask": torch.tensor([True, False, True]),
    }


def build(chunk_size=16 << 10, **kw):
    return build_manifest(
        state_dict(), run_id=RUN, version=3, parent=2, chunk_size=chunk_size,
        files={"config.json": CONFIG, "tokenizer.json": TOKENIZER}, meta={"arch": "llama", "layers": 1},
        created_at=1.5, **kw,
    )


def test_round_trip_bf16_bit_exact():
    sd = state_dict()
    m, buf = build()
    data = encode_manifest(m, LEARNER)
    d = decode_manifest(data, learner=LEARNER.public_key, expected_digest=manifest_digest(data))
    assert d.learner == LEARNER.public_key
    assert d.to_body() == m.to_body()
    assert d.version == 3 and d.parent == 2 and d.meta == {"arch": "llama", "layers": 1}
    verify_buffer(d, buf)
    out = torch_state_dict(d, bytes(buf))
    assert list(out) == list(sd)
    for k, t in sd.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape, k
        a, b = out[k].reshape(-1), t.reshape(-1)
        if t.numel():
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a,
                               b.view(torch.uint8) if b.dtype != torch.bool else b), k
    assert tensor_bytes(d, buf, "embed.weight").nbytes == 300 * 64 * 2
    assert file_bytes(d, buf, "config.json") == CONFIG and file_bytes(d, buf, "tokenizer.json") == TOKENIZER
    # zero-copy into a writable buffer
    shared = torch_state_dict(d, buf, copy=False)
    off = d.tensor("layers.0.norm").offset
    buf[off:off + 4] = np.float32(42.0).tobytes()
    assert shared["layers.0.norm"][0].item() == 42.0 and out["layers.0.norm"][0].item() != 42.0


def test_layout_alignment_and_numpy_views():
    m, buf = build()
    assert all(t.offset % 64 == 0 for t in m.tensors) and all(f.offset % 64 == 0 for f in m.files)
    assert m.total_size == len(buf) and m.n_chunks == -(-len(buf) // m.chunk_size)
    views = numpy_tensors(m, bytes(buf))
    assert views["layers.0.norm"].dtype == np.float32 and views["layers.0.norm"].shape == (64,)
    assert views["embed.weight"].dtype == np.uint16  # raw bf16 bits
    assert np.array_equal(views["embed.weight"], state_dict()["embed.weight"].view(torch.int16).numpy().view(np.uint16))


def test_numpy_and_raw_inputs():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = RawTensor("bfloat16", (2,), b"\x80\x3f\x00\x40")  # 1.0, 2.0 in bf16
    m, buf = build_manifest({"a": arr, "b": raw, "c": np.arange(3, dtype=">i4")}, run_id=RUN, version=0,
                            chunk_size=4096)
    d = decode_manifest(encode_manifest(m, LEARNER), learner=LEARNER.public_key)
    v = numpy_tensors(d, buf)
    assert np.array_equal(v["a"], arr) and v["c"].tolist() == [0, 1, 2]
    assert torch_state_dict(d, buf)["b"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        build_manifest({"x": np.zeros(2, dtype=np.complex64)}, run_id=RUN, version=0)
    with pytest.raises(ValueError):
        build_manifest({}, run_id=RUN, version=0, files={"../evil": b""})
    with pytest.raises(ValueError):
        build_manifest({}, run_id=RUN, version=1, parent=1)
    with pytest.raises(ValueError):
        build_manifest({"a": RawTensor("bfloat16", (3,), b"\x00")}, run_id=RUN, version=0)


def test_chunks_verify_and_reject_bad_chunks():
    m, buf = build()
    assert m.n_chunks >= 3
    for i, chunk in iter_chunks(m, buf):
        verify_chunk(m, i, chunk)
    s, e = m.chunk_range(1)
    bad = bytearray(buf[s:e])
    bad[17] ^= 0xFF
    cases = [
        (1, bytes(bad), Reason.HASH_MISMATCH),
        (1, bytes(buf[s:e - 1]), Reason.MALFORMED),
        (1, bytes(buf[s:e]) + b"\x00", Reason.OVERSIZE),
        (2, bytes(buf[s:e]), Reason.HASH_MISMATCH),  # right size, wrong index
        (m.n_chunks, b"", Reason.MALFORMED),
        (-1, b"", Reason.MALFORMED),
        ("1", b"", Reason.MALFORMED),
    ]
    for idx, data, reason in cases:
        with pytest.raises(ProtocolError) as ei:
            verify_chunk(m, idx, data)
        assert ei.value.reason == reason, (idx, reason)
    last = m.n_chunks - 1
    s, e = m.chunk_range(last)
    assert e == m.total_size and e - s <= m.chunk_size
    verify_chunk(m, last, buf[s:e])
    tampered = bytearray(buf)
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError) as ei:
        verify_buffer(m, tampered)
    assert ei.value.reason == Reason.HASH_MISMATCH
    with pytest.raises(ProtocolError) as ei:
        file_bytes(m, tampered, "tokenizer.json")
    assert ei.value.reason == Reason.HASH_MISMATCH


def reason_of(fn, *a, **kw):
    with pytest.raises(ProtocolError) as ei:
        fn(*a, **kw)
    return ei.value.reason


def test_tamper_and_impostor():
    m, _ = build()
    data = encode_manifest(m, LEARNER)
    assert read_signer(data) == LEARNER.public_key
    for pos in (0, 3, 4, 10, 50, PREFIX_BYTES + 5, len(data) - 1):
        t = bytearray(data)
        t[pos] ^= 1
        assert reason_of(decode_manifest, bytes(t)) in (
            Reason.MALFORMED, Reason.UNKNOWN_VERSION, Reason.BAD_SIGNATURE, Reason.OVERSIZE)
    # an impostor learner signs a perfectly valid manifest with its own key
    fake = encode_manifest(m, OTHER)
    assert decode_manifest(fake).learner == OTHER.public_key  # valid in itself...
    assert reason_of(decode_manifest, fake, learner=LEARNER.public_key) == Reason.UNTRUSTED_SIGNER  # ...not trusted
    # ... or keeps the learner's key in the prefix: the signature fails
    t = bytearray(fake)
    t[8:40] = LEARNER.public_key
    assert reason_of(decode_manifest, bytes(t), learner=LEARNER.public_key) == Reason.BAD_SIGNATURE
    # the digest announced in the heartbeat pins the exact manifest
    assert reason_of(decode_manifest, data, expected_digest=b"\x00" * 32) == Reason.HASH_MISMATCH
    assert reason_of(decode_manifest, data[:-1]) == Reason.MALFORMED
    assert reason_of(decode_manifest, data + b"\x00") == Reason.MALFORMED
    assert reason_of(decode_manifest, data, limits=ManifestLimits(max_manifest_bytes=100)) == Reason.OVERSIZE
    big = bytearray(data)
    struct.pack_into("<I", big, 4, 0xFFFFFFFF)
    assert reason_of(decode_manifest, bytes(big)) == Reason.MALFORMED


def forge(body: dict, identity=LEARNER) -> bytes:
    b = msgpack.packb(body, use_bin_type=True)
    prefix = struct.pack("<3sBI32s", b"GSM", 1, len(b), identity.public_key)
    return prefix + identity.sign(MANIFEST_DOMAIN + prefix + b) + b


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b.update(encoding="xor-delta"), Reason.UNKNOWN_VERSION),
        (lambda b: b.update(base_digest=b"\x00" * 32), Reason.MALFORMED),
        (lambda b: b["tensors"][0].__setitem__(1, "complex32"), Reason.DTYPE_MISMATCH),
        (lambda b: b["tensors"][0].__setitem__(2, [10**12, 10**12]), Reason.SHAPE_MISMATCH),
        (lambda b: b["tensors"][1].__setitem__(3, 0), Reason.SHAPE_MISMATCH),  # overlaps tensor 0
        (lambda b: b["tensors"][1].__setitem__(0, b["tensors"][0][0]), Reason.MALFORMED),  # duplicate name
        (lambda b: b["tensors"][0].__setitem__(2, [1] * 9), Reason.OVERSIZE),
        (lambda b: b["files"][0].__setitem__(0, "../../.bashrc"), Reason.MALFORMED),
        (lambda b: b["files"][0].__setitem__(2, 10**9), Reason.SHAPE_MISMATCH),
        (lambda b: b.update(chunk_hashes=b["chunk_hashes"][:-1]), Reason.SHAPE_MISMATCH),
        (lambda b: b.update(chunk_size=1), Reason.MALFORMED),
        (lambda b: b.update(total_size=2**50), Reason.OVERSIZE),
        (lambda b: b.update(parent=3), Reason.MALFORMED),
        (lambda b: b.update(version=-1), Reason.MALFORMED),
        (lambda b: b.update(meta={"k": [1]}), Reason.MALFORMED),
        (lambda b: b.update(meta={"k": float("nan")}), Reason.MALFORMED),
        (lambda b: b.pop("meta"), Reason.MALFORMED),
        (lambda b: b.update(extra=1), Reason.MALFORMED),
        (lambda b: b.update(tensors={}), Reason.MALFORMED),
    ],
)
def test_signed_but_bad_body(mutate, reason):
    m, _ = build()
    body = m.to_body()
    mutate(body)
    assert reason_of(decode_manifest, forge(body)) == reason


def test_chunk_hash_is_sha256_of_chunk():
    m, buf = build()
    s, e = m.chunk_range(0)
    assert m.chunk_hash(0) == hashlib.sha256(bytes(buf[s:e])).digest()
    with pytest.raises(IndexError):
        m.chunk_range(m.n_chunks)
