"""Mutation fuzzing of every message type (fixed seeds).

Property: a mutated message either decodes to exactly the original content or is rejected with a typed
ProtocolError - no other exception, no hang (pytest-timeout), bounded memory (tracemalloc peak, and length fields
claiming gigabytes are rejected without allocating).

Two attackers are simulated:
* a network attacker without keys: random byte flips, truncations, extensions, insertions/deletions and
  overwritten length fields of valid signed messages (>= 10,000 per message type for rollouts);
* a sampler/learner with a valid key that signs garbage: mutations of the header/body/payload that are re-hashed
  and re-signed, so the parsers behind the signature check are exercised too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
import time
import tracemalloc

import msgpack
import pytest

from protocol.errors import ProtocolError
from protocol.manifest import MANIFEST_DOMAIN, build_manifest, decode_manifest, encode_manifest
from protocol.rollout import PREFIX_BYTES, ROLLOUT_DOMAIN, RolloutGroup, decode_group
from protocol.validate import RolloutValidator, ValidatorConfig
from tests.test_protocol_util import LEARNER, RUN, SAMPLER, VOCAB, signed_group

N_ROLLOUT = 12_000
N_SIGNED_GARBAGE = 3_000
N_MANIFEST = 4_000
N_RECORD = 4_000
HUGE = (10 * 2**30, 2**32 - 1, 2**63 - 1, 2**64 - 1, 2**31, 0)


def mutate(rng: random.Random, data: bytes, length_fields=()) -> bytes:
    """One random mutation that changes the bytes."""
    while True:
        kind = rng.random()
        b = bytearray(data)
        n = len(b)
        if kind < 0.45:  # byte flips, biased towards the prefix/header where the parsing happens
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(min(n, 1024)) if rng.random() < 0.7 else rng.randrange(n)
                b[pos] ^= rng.randint(1, 255)
        elif kind < 0.6:  # truncation
            b = b[: rng.randrange(n)]
        elif kind < 0.72:  # extension
            b += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif kind < 0.82:  # insertion / deletion inside
            pos = rng.randrange(n)
            if rng.random() < 0.5:
                b[pos:pos] = bytes([rng.getrandbits(8)])
            else:
                del b[pos]
        elif length_fields:  # a length field claims something huge (or zero)
            off, fmt = rng.choice(length_fields)
            struct.pack_into(fmt, b, off, rng.choice(HUGE) % (1 << (8 * struct.calcsize(fmt))))
        else:
            b[rng.randrange(n)] ^= 0x80
        out = bytes(b)
        if out != data:
            return out


def check_rejected_or_identical(decode, original, mutated) -> bool:
    try:
        got = decode(mutated)
    except ProtocolError:
        return False
    # anything else propagates and fails the test
    assert got == original, "a mutated message decoded to different content"
    return True


@pytest.mark.timeout(120)
def test_fuzz_rollout_groups_no_key():
    rng = random.Random(1234)
    data = signed_group(G=4, L=64, P=32)
    original = decode_group(data)
    fields = [(4, "<I"), (8, "<Q")]
    tracemalloc.start()
    try:
        accepted = 0
        t0 = time.perf_counter()
        for _ in range(N_ROLLOUT):
            accepted += check_rejected_or_identical(decode_group, original, mutate(rng, data, fields))
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert accepted == 0  # every real change is caught (there is no unauthenticated byte)
    assert peak < 2 * 2**20, f"peak traced memory {peak} bytes for a {len(data)}-byte message"
    assert elapsed < 60


@pytest.mark.timeout(120)
def test_fuzz_rollout_groups_signed_garbage():
    """A sampler with a valid key signs mutated headers/payloads: decoding and validation raise only ProtocolError."""
    rng = random.Random(99)
    data = signed_group(G=4, L=64, P=32)
    header_len = struct.unpack_from("<I", data, 4)[0]
    header = data[PREFIX_BYTES:PREFIX_BYTES + header_len]
    payload = data[PREFIX_BYTES + header_len:]
    validator = RolloutValidator(ValidatorConfig(run_id=RUN, vocab_size=VOCAB), current_version=lambda: 10**9)
    outcomes = {"rejected": 0, "decoded": 0}
    tracemalloc.start()
    try:
        for i in range(N_SIGNED_GARBAGE):
            h, p = header, payload
            if rng.random() < 0.7:
                h = mutate(rng, header)
            else:
                p = mutate(rng, payload)
            fixed_hash = rng.random() < 0.8  # usually the attacker also fixes up the payload hash
            if fixed_hash:
                try:
                    obj = msgpack.unpackb(h, raw=False, strict_map_key=False)
                    if isinstance(obj, dict):
                        obj["payload_hash"] = hashlib.sha256(p).digest()
                        h = msgpack.packb(obj, use_bin_type=True)
                except Exception:
                    pass
            prefix = struct.pack("<3sBIQ32s", b"GSR", 1, len(h), len(p), SAMPLER.public_key)
            msg = prefix + SAMPLER.sign(ROLLOUT_DOMAIN + prefix + h) + h + p
            try:
                g = decode_group(msg)
                assert isinstance(g, RolloutGroup)
                assert len(g.completion_ids) == len(g.logprobs) == int(g.completion_lens.sum())
                outcomes["decoded"] += 1
            except ProtocolError:
                outcomes["rejected"] += 1
            try:
                validator.validate(msg)
            except ProtocolError:
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcomes["rejected"] > N_SIGNED_GARBAGE // 2
    assert peak < 4 * 2**20


@pytest.mark.timeout(60)
def test_huge_length_claims_are_cheap():
    """Length fields claiming 10 GB: rejected quickly, with almost no memory."""
    data = signed_group(G=4, L=64, P=32)
    tracemalloc.start()
    try:
        for off, fmt in ((4, "<I"), (8, "<Q")):
            for v in HUGE[:-1]:
                b = bytearray(data)
                struct.pack_into(fmt, b, off, v % (1 << (8 * struct.calcsize(fmt))))
                with pytest.raises(ProtocolError):
                    decode_group(bytes(b))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**10


@pytest.mark.timeout(120)
def test_fuzz_manifests():
    import numpy as np

    rng = random.Random(7)
    tensors = {f"layer{i}.w": np.arange(i * 10, dtype=np.float32).reshape(i, 10) for i in range(1, 6)}
    m, _ = build_manifest(tensors, run_id=RUN, version=2, parent=1, chunk_size=4096,
                          files={"config.json": b"{}"}, created_at=5.0)
    data = encode_manifest(m, LEARNER)
    original = decode_manifest(data, learner=LEARNER.public_key)

    def dec(b):
        return decode_manifest(b, learner=LEARNER.public_key)

    accepted = sum(check_rejected_or_identical(dec, original, mutate(rng, data, [(4, "<I")])) for _ in range(N_MANIFEST))
    assert accepted == 0
    # signed garbage bodies
    body = data[104:]
    for _ in range(N_MANIFEST // 4):
        b = mutate(rng, body)
        prefix = struct.pack("<3sBI32s", b"GSM", 1, len(b), LEARNER.public_key)
        msg = prefix + LEARNER.sign(MANIFEST_DOMAIN + prefix + b) + b
        try:
            dec(msg)
        except ProtocolError:
            pass


@pytest.mark.timeout(120)
def test_fuzz_dht_records():
    from hivemind.dht.validation import DHTRecord

    from protocol.records import (
        ChunkHave,
        Ed25519OwnerValidator,
        dht_key_id,
        encode_record,
        owner_subkey,
    )

    rng = random.Random(5)
    rec = ChunkHave.from_indices(run_id=RUN, peer_id="peer", version=3, n_chunks=100, have=range(0, 100, 7),
                                 multiaddrs=("/ip4/127.0.0.1/tcp/1",), time=1.0)
    writer = Ed25519OwnerValidator(RUN, SAMPLER)
    reader = Ed25519OwnerValidator(RUN, learner=LEARNER.public_key)
    base = DHTRecord(dht_key_id(rec.dht_key), owner_subkey(SAMPLER.public_key),
                     msgpack.packb(encode_record(rec), use_bin_type=True), time.time() + 60)
    good = dataclasses.replace(base, value=writer.sign_value(base))
    assert reader.check(good) == rec
    ok = 0
    for i in range(N_RECORD):
        field = rng.choice(("value", "value", "subkey", "key", "expiration_time"))
        if field == "expiration_time":
            mutated = dataclasses.replace(good, expiration_time=good.expiration_time + rng.choice((1, -1, 1e9)) * rng.random())
        else:
            mutated = dataclasses.replace(good, **{field: mutate(rng, getattr(good, field))})
        try:
            got = reader.check(mutated)
            assert got == rec
            ok += 1
        except ProtocolError:
            pass
        assert reader.validate(mutated) in (True, False)
    assert ok == 0
    # signed garbage inner values: the owner signs arbitrary bytes
    for i in range(N_RECORD // 4):
        inner = mutate(rng, encode_record(rec))
        r = DHTRecord(good.key, good.subkey, msgpack.packb(inner, use_bin_type=True), good.expiration_time)
        r = dataclasses.replace(r, value=writer.sign_value(r))
        try:
            reader.check(r)
        except ProtocolError:
            pass
