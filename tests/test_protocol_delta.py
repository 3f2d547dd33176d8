"""Weight deltas: bit-exact round trips (bf16/fp16/fp32 with NaN/inf/-0.0), cumulative deltas, signing, and every
way a base, a chunk or a manifest can be wrong being caught with a ProtocolError."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from protocol.delta import (
    CODECS,
    DELTA_DOMAIN,
    apply_delta,
    decode_delta_manifest,
    encode_delta,
    encode_delta_manifest,
    verify_delta_chunk,
)
from protocol.errors import ProtocolError, Reason
from protocol.manifest import MANIFEST_DOMAIN, build_manifest, encode_manifest
from tests.test_protocol_util import LEARNER, OTHER, RUN

CHUNK = 16 << 10
SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-40]


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": (torch.randn(300, 64, generator=g) * 0.02).to(torch.bfloat16),
        "layer.norm": torch.randn(64, generator=g).to(torch.float16),
        "layer.proj": torch.randn(40, 70, generator=g),  # float32
        "layer.bias": torch.randn(7, generator=g).to(torch.bfloat16),  # odd byte count: padding follows
        "empty": torch.zeros(0, 3),
        "mask": torch.arange(33, dtype=torch.uint8),
    }


def step(ts: dict[str, torch.Tensor], seed: int, fraction: float = 0.02) -> dict[str, torch.Tensor]:
    """An RL-like update: a few elements of each float tensor move a little (the rest stay bit-identical)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in ts.items():
        if t.is_floating_point() and t.numel():
            master = t.float()
            moved = torch.rand(t.shape, generator=g) < fraction
            out[name] = (master + moved * torch.randn(t.shape, generator=g) * 0.01 * master.abs().clamp_min(1e-3)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def encode(*args, **kwargs):
    """encode_delta with small chunks, so that the test models span several."""
    kwargs.setdefault("chunk_size", CHUNK)
    return encode_delta(*args, **kwargs)


def version(ts, v: int):
    return build_manifest(ts, run_id=RUN, version=v, parent=v - 1 if v else None, chunk_size=CHUNK,
                          files={"config.json": b'{"hidden_size": 64}'})


def with_specials(ts: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """NaN (several payloads), +-inf, -0.0 and subnormals planted at random places of every float tensor."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in ts.items():
        t = t.clone()
        if t.is_floating_point() and t.numel():
            flat = t.view(-1)
            idx = torch.from_numpy(rng.choice(flat.numel(), size=min(len(SPECIALS), flat.numel()), replace=False))
            flat[idx] = torch.tensor(SPECIALS[:len(idx)], dtype=t.dtype)
            bits = flat.view({2: torch.int16, 4: torch.int32}[t.element_size()])
            nan_payload = {torch.bfloat16: 0x7FC1, torch.float16: 0x7E01, torch.float32: 0x7FC00001}[t.dtype]
            bits[int(rng.integers(flat.numel()))] = nan_payload - (1 << (8 * t.element_size())) * (nan_payload >> (8 * t.element_size() - 1))
        out[name] = t
    return out


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_is_bit_exact_for_every_dtype_and_special_value(codec):
    ts0 = with_specials(tensors(), seed=1)
    ts1 = with_specials(step(ts0, seed=2), seed=3)  # the specials also move between versions
    m0, b0 = version(ts0, 0)
    m1, b1 = version(ts1, 1)
    d, chunks = encode(m0, b0, m1, b1, codec=codec, chunk_size=CHUNK)
    assert (d.base_version, d.version, d.span, d.codec) == (0, 1, 1, codec)
    assert d.n_chunks == -(-m1.total_size // CHUNK) and d.compressed_size == sum(len(c) for c in chunks)
    out = apply_delta(d, b0, chunks)
    assert bytes(out) == bytes(b1)


def test_a_delta_is_small_when_few_elements_change_and_empty_when_none_do():
    m0, b0 = version(tensors(), 0)
    m1, b1 = version(step(tensors(), seed=5, fraction=0.01), 1)
    d, _ = encode(m0, b0, m1, b1)
    assert d.compressed_size < 0.15 * m1.total_size
    same, chunks = encode(m0, b0, dataclasses.replace(m0, version=1), b0)
    assert same.compressed_size < 30 * same.n_chunks and bytes(apply_delta(same, b0, chunks)) == bytes(b0)


def test_a_cumulative_delta_is_encode_from_the_keyframe_and_agrees_with_the_chain():
    versions = [version(tensors(), 0)]
    ts = tensors()
    for v in range(1, 5):
        ts = step(ts, seed=10 + v)
        versions.append(version(ts, v))
    chain = [encode(*versions[v - 1], *versions[v]) for v in range(1, 5)]
    buf = versions[0][1]
    for d, chunks in chain:
        buf = apply_delta(d, buf, chunks)
    cumulative, chunks = encode(*versions[0], *versions[4])
    assert cumulative.span == 4
    assert bytes(apply_delta(cumulative, versions[0][1], chunks)) == bytes(buf) == bytes(versions[4][1])
    # cumulative: about one delta's worth of bytes (changes overlap), less than the chain
    assert cumulative.compressed_size < sum(d.compressed_size for d, _ in chain)


def test_wrong_base_is_detected_before_anything_is_rebuilt():
    m0, b0 = version(tensors(), 0)
    m1, b1 = version(step(tensors(), seed=1), 1)
    m2, b2 = version(step(step(tensors(), seed=1), seed=2), 2)
    d, chunks = encode(m1, b1, m2, b2)
    with pytest.raises(ProtocolError, match="not version 1") as e:
        apply_delta(d, b0, chunks)
    assert e.value.reason is Reason.HASH_MISMATCH
    with pytest.raises(ProtocolError, match="not version 1"):  # a caller's claimed digest is checked too
        apply_delta(d, b0, chunks, base_digest=b"\0" * 32)
    with pytest.raises(ProtocolError, match="bytes, the delta expects"):
        apply_delta(d, b0[:-1], chunks)
    # a forged base digest claim cannot smuggle a wrong base through: the target digest still catches it
    with pytest.raises(ProtocolError, match="does not match its digest"):
        apply_delta(d, b0, chunks, base_digest=d.base_digest)


def test_corrupted_truncated_missing_and_swapped_chunks_are_detected():
    m0, b0 = version(tensors(), 0)
    m1, b1 = version(step(tensors(), seed=1, fraction=0.3), 1)
    d, chunks = encode(m0, b0, m1, b1)
    assert d.n_chunks >= 3
    flipped = bytearray(chunks[1])
    flipped[len(flipped) // 2] ^= 0x10
    cases = {
        "flipped": (chunks[:1] + [bytes(flipped)] + chunks[2:], Reason.HASH_MISMATCH, "does not match its hash"),
        "truncated": (chunks[:1] + [chunks[1][:-1]] + chunks[2:], Reason.MALFORMED, "bytes, expected"),
        "extended": (chunks[:1] + [chunks[1] + b"\0"] + chunks[2:], Reason.OVERSIZE, "bytes, expected"),
        "missing": (chunks[:-1], Reason.MALFORMED, "delta chunks, the manifest lists"),
        "swapped": ([chunks[1], chunks[0]] + chunks[2:], None, "delta chunk 0"),
    }
    for name, (bad, reason, message) in cases.items():
        with pytest.raises(ProtocolError, match=message) as e:
            apply_delta(d, b0, bad)
        assert reason is None or e.value.reason is reason, name
    with pytest.raises(ProtocolError, match="outside"):
        verify_delta_chunk(d, d.n_chunks, chunks[0])


def test_a_signed_manifest_whose_chunks_lie_is_still_caught():
    """A learner (or a bug) that signs hashes of garbage: a chunk that is not zstd, or decompresses to the wrong
    length, or a target digest that does not match, is a ProtocolError, never wrong weights."""
    m0, b0 = version(tensors(), 0)
    m1, b1 = version(step(tensors(), seed=1), 1)
    d, chunks = encode(m0, b0, m1, b1)
    import hashlib

    def resign(bad_chunks, **changes):
        bad = dataclasses.replace(d, chunk_sizes=tuple(len(c) for c in bad_chunks),
                                  chunk_hashes=b"".join(hashlib.sha256(c).digest() for c in bad_chunks), **changes)
        return decode_delta_manifest(encode_delta_manifest(bad, LEARNER), learner=LEARNER.public_key)

    garbage = [b"not a zstd frame at all"] + chunks[1:]
    with pytest.raises(ProtocolError, match="not a valid zstd frame"):
        apply_delta(resign(garbage), b0, garbage)
    import zstandard

    short = [zstandard.ZstdCompressor().compress(b"\0" * 100)] + chunks[1:]
    with pytest.raises(ProtocolError, match="decompresses to 100 bytes"):
        apply_delta(resign(short), b0, short)
    with pytest.raises(ProtocolError, match="does not match its digest"):
        apply_delta(resign(chunks, target_digest=b"\1" * 32), b0, chunks)


def test_manifest_signing_round_trip_and_rejections():
    m0, b0 = version(tensors(), 0)
    m1, b1 = version(step(tensors(), seed=1), 1)
    d, chunks = encode(m0, b0, m1, b1)
    data = encode_delta_manifest(d, LEARNER)
    back = decode_delta_manifest(data, learner=LEARNER.public_key)
    assert back == dataclasses.replace(d, learner=LEARNER.public_key)
    assert bytes(apply_delta(back, b0, chunks)) == bytes(b1)
    with pytest.raises(ProtocolError) as e:
        decode_delta_manifest(data, learner=OTHER.public_key)
    assert e.value.reason is Reason.UNTRUSTED_SIGNER
    tampered = bytearray(data)
    tampered[-40] ^= 1
    with pytest.raises(ProtocolError) as e:
        decode_delta_manifest(bytes(tampered), learner=LEARNER.public_key)
    assert e.value.reason in (Reason.BAD_SIGNATURE, Reason.MALFORMED)
    with pytest.raises(ProtocolError, match="truncated|length mismatch"):
        decode_delta_manifest(data[:-1], learner=LEARNER.public_key)
    # a weight manifest is not a delta manifest and vice versa (distinct magic and signing domain)
    assert MANIFEST_DOMAIN != DELTA_DOMAIN
    with pytest.raises(ProtocolError, match="bad magic"):
        decode_delta_manifest(encode_manifest(m1, LEARNER), learner=LEARNER.public_key)


def test_encode_refuses_what_is_not_a_forward_delta_of_one_layout():
    m0, b0 = version(tensors(), 0)
    m1, b1 = version(step(tensors(), seed=1), 1)
    with pytest.raises(ValueError, match="forward"):
        encode(m1, b1, m0, b0)
    other = dict(tensors())
    other["extra"] = torch.zeros(4)
    mx, bx = version(other, 2)
    with pytest.raises(ValueError, match="different layouts"):
        encode(m0, b0, mx, bx)
    with pytest.raises(ValueError, match="unknown codec"):
        encode(m0, b0, m1, b1, codec="lz4")


def test_fuzz_mutations_never_yield_wrong_weights():
    """Random byte mutations of the serialized manifest, the chunks and the base: each is rejected with a
    ProtocolError, or (a mutation the signature/hash cannot see, e.g. none) gives exactly the target."""
    rng = np.random.default_rng(1234)
    m0, b0 = version(tensors(), 0)
    m1, b1 = version(step(tensors(), seed=1, fraction=0.1), 1)
    d, chunks = encode(m0, b0, m1, b1)
    data = encode_delta_manifest(d, LEARNER)
    target = bytes(b1)
    outcomes = {"rejected": 0, "exact": 0}
    for trial in range(300):
        what = ("manifest", "chunk", "base")[trial % 3]
        mdata, mchunks, base = bytearray(data), list(chunks), bytearray(b0)
        victim = {"manifest": mdata, "base": base}.get(what)
        if victim is None:
            i = int(rng.integers(len(mchunks)))
            victim = bytearray(mchunks[i])
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.integers(3)
            pos = int(rng.integers(len(victim)))
            if kind == 0:
                victim[pos] ^= 1 << int(rng.integers(8))
            elif kind == 1 and what != "base":
                del victim[pos:]
            else:
                victim[pos] = int(rng.integers(256))
        if what == "chunk":
            mchunks[i] = bytes(victim)
        try:
            manifest = decode_delta_manifest(bytes(mdata), learner=LEARNER.public_key)
            out = apply_delta(manifest, base, mchunks)
        except ProtocolError:
            outcomes["rejected"] += 1
            continue
        assert bytes(out) == target, f"trial {trial} ({what}) produced wrong weights"
        outcomes["exact"] += 1
    assert outcomes["rejected"] > 250, outcomes  # unchanged bytes (a write of the same value) may pass, exactly


def test_a_delta_store_drops_deltas_too_old_to_be_the_cheapest_plan():
    """Within its byte budget a DeltaStore still keeps no delta into a version `keep_versions` or more behind the
    newest: a small model's deltas would otherwise fill the whole budget (1 GiB by default) in memory."""
    from node.delta_store import DeltaStore

    def fill(store: DeltaStore) -> list:
        ts = tensors(0)
        base, base_buf = version(ts, 0)
        for v in range(1, 8):
            ts = step(ts, v)
            target, target_buf = version(ts, v)
            delta, chunks = encode(base, base_buf, target, target_buf)
            store.add_delta(delta, encode_delta_manifest(delta, LEARNER), chunks)
            base, base_buf = target, target_buf
        return [vb.key for vb in store.versions()]

    assert fill(DeltaStore(None, keep_bytes=1 << 30, keep_versions=3)) == [(4, 5), (5, 6), (6, 7)]
    assert len(fill(DeltaStore(None, keep_bytes=1 << 30))) == 7  # the byte budget alone keeps them all
