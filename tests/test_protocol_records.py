"""DHT record schemas and the Ed25519 owner-subkey validator, exercised directly (no network)."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord

from protocol.errors import ProtocolError, Reason
from protocol.records import (
    MAX_RECORD_BYTES,
    ChunkHave,
    Ed25519OwnerValidator,
    LearnerHeartbeat,
    SamplerStatus,
    decode_record,
    dht_key_id,
    encode_record,
    owner_subkey,
    records_from_get,
    shard_for,
)
from tests.test_protocol_util import LEARNER, OTHER, RUN, SAMPLER

PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
MADDRS = ("/ip4/127.0.0.1/tcp/31337/p2p/" + PEER,)


def heartbeat(**kw):
    return LearnerHeartbeat(**{"run_id": RUN, "peer_id": PEER, "policy_version": 7, "manifest_digest": b"\x11" * 32,
                               "manifest_size": 12345, "weights_size": 270_000_000, "multiaddrs": MADDRS,
                               "time": 1e9, **kw})


def status(**kw):
    return SamplerStatus(**{"run_id": RUN, "peer_id": PEER, "policy_version": 6,
                            "counters": {"sent": 10, "accepted": 9, "rejected": 1}, "time": 1e9, **kw})


def have(**kw):
    args = {"run_id": RUN, "peer_id": PEER, "version": 7, "n_chunks": 70, "have": [0, 1, 5, 69],
            "multiaddrs": MADDRS, "time": 1e9}
    args.update(kw)
    return ChunkHave.from_indices(**args)


ALL = [heartbeat, status, have]


def dht_record(rec, identity, *, exp=None, validator=None, key=None, subkey=None):
    """Build the DHTRecord exactly as hivemind would when `identity`'s node stores `rec`."""
    exp = time.time() + 60 if exp is None else exp
    v = validator or Ed25519OwnerValidator(RUN, identity)
    r = DHTRecord(
        key=dht_key_id(rec.dht_key) if key is None else key,
        subkey=owner_subkey(identity.public_key) if subkey is None else subkey,
        value=msgpack.packb(encode_record(rec), use_bin_type=True),
        expiration_time=exp,
    )
    return dataclasses.replace(r, value=v.sign_value(r))


@pytest.mark.parametrize("make", ALL)
def test_record_round_trip_and_size(make):
    rec = make()
    data = encode_record(rec)
    assert decode_record(data) == rec
    assert len(data) < 512  # tiny: far below hivemind's large-value trouble
    assert rec.dht_key.startswith(f"gepo/{RUN}/")


def test_chunk_have_bitmap():
    h = have()
    assert h.has(0) and h.has(69) and not h.has(2) and not h.has(70) and not h.has(-1)
    assert h.indices().tolist() == [0, 1, 5, 69] and not h.complete
    full = have(n_chunks=16, have=range(16))
    assert full.complete and full.bitmap == b"\xff\xff"
    assert have(n_chunks=0, have=[]).bitmap == b""
    big = have(n_chunks=16384, have=range(0, 16384, 3))
    assert len(encode_record(big)) < MAX_RECORD_BYTES
    with pytest.raises(ValueError):
        encode_record(have(n_chunks=16385, have=[]))
    with pytest.raises(ValueError):
        have(have=[70])


def test_dht_key_id_matches_hivemind():
    for key in ("gepo/run/learner", "gepo/x/have/3/0", "ключ"):
        assert dht_key_id(key) == DHTID.generate(source=key).to_bytes()


def test_encode_rejects_invalid_records():
    with pytest.raises(ValueError):
        encode_record(heartbeat(manifest_digest=b"short"))
    with pytest.raises(ValueError):
        encode_record(status(counters={f"c{i}": i for i in range(17)}))
    with pytest.raises(ValueError):
        encode_record(heartbeat(multiaddrs=["/ip4/1.2.3.4/tcp/1"] * 9))
    with pytest.raises(ValueError):
        encode_record(status(policy_version=-1))
    with pytest.raises(ValueError):
        encode_record(status(shard=256))
    with pytest.raises(TypeError):
        encode_record({"k": "learner"})


def test_heartbeat_counters_are_optional():
    """Counters travel under "c" only when there are some: a heartbeat without them encodes exactly as before the
    field existed, and a heartbeat with them round-trips and is bounded like a sampler status."""
    plain = msgpack.unpackb(encode_record(heartbeat()), raw=False)
    assert "c" not in plain
    rec = heartbeat(counters={"step": 12, "accepted": 96, "rejected": 1})
    assert decode_record(encode_record(rec)) == rec
    assert msgpack.unpackb(encode_record(rec), raw=False)["c"] == {"step": 12, "accepted": 96, "rejected": 1}
    with pytest.raises(ValueError):
        encode_record(heartbeat(counters={f"c{i}": i for i in range(17)}))
    with pytest.raises(ValueError):
        encode_record(heartbeat(counters={"step": -1}))
    bad = {**plain, "c": [1, 2]}
    with pytest.raises(ProtocolError) as ei:
        decode_record(msgpack.packb(bad, use_bin_type=True))
    assert ei.value.reason == Reason.MALFORMED


@pytest.mark.parametrize(
    "obj, reason",
    [
        ({"k": "learner", "fv": 2}, Reason.UNKNOWN_VERSION),
        ({"k": "nope", "fv": 1}, Reason.MALFORMED),
        ([1, 2], Reason.MALFORMED),
        ({"k": "have", "fv": 1, "run": RUN, "peer": "p", "v": 1, "n": 9, "bm": b"\xff", "ma": [], "t": 0.0, "sh": 0},
         Reason.SHAPE_MISMATCH),
        ({"k": "have", "fv": 1, "run": RUN, "peer": "p", "v": 1, "n": 9, "bm": b"\xff\x02", "ma": [], "t": 0.0,
          "sh": 0}, Reason.MALFORMED),  # bit 9 set beyond n_chunks
        ({"k": "sampler", "fv": 1, "run": RUN, "peer": "p", "pv": 1, "c": {}, "t": 0.0}, Reason.MALFORMED),
    ],
)
def test_decode_record_errors(obj, reason):
    with pytest.raises(ProtocolError) as ei:
        decode_record(msgpack.packb(obj, use_bin_type=True))
    assert ei.value.reason == reason
    with pytest.raises(ProtocolError) as ei:
        decode_record(b"\x00" * (MAX_RECORD_BYTES + 1))
    assert ei.value.reason == Reason.OVERSIZE


def check_reason(validator, record) -> Reason:
    with pytest.raises(ProtocolError) as ei:
        validator.check(record)
    assert validator.validate(record) is False
    return ei.value.reason


def test_validator_accepts_signed_records_and_strips():
    reader = Ed25519OwnerValidator(RUN, learner=LEARNER.public_key)
    for make, who in ((heartbeat, LEARNER), (status, SAMPLER), (have, SAMPLER), (have, LEARNER)):
        r = dht_record(make(), who)
        assert reader.validate(r)
        assert reader.check(r) == make()
        stripped = reader.strip_value(r)
        assert decode_record(msgpack.unpackb(stripped)) == make()
    assert sum(reader.rejections.values()) == 0


def test_validator_rejections():
    reader = Ed25519OwnerValidator(RUN, learner=LEARNER.public_key, max_ttl=600)
    good = dht_record(status(), SAMPLER)
    # value / signature tampering
    assert check_reason(reader, dataclasses.replace(good, value=good.value[:-1] + bytes([good.value[-1] ^ 1]))) == Reason.BAD_SIGNATURE
    flipped = bytearray(good.value)
    flipped[5] ^= 1
    assert check_reason(reader, dataclasses.replace(good, value=bytes(flipped))) == Reason.BAD_SIGNATURE
    # lifetime extension by a third party: expiration is signed
    assert check_reason(reader, dataclasses.replace(good, expiration_time=good.expiration_time + 1)) == Reason.BAD_SIGNATURE
    # moving a record to another key or another owner's subkey
    assert check_reason(reader, dataclasses.replace(good, key=dht_key_id("gepo/x/learner"))) == Reason.BAD_SIGNATURE
    assert check_reason(reader, dataclasses.replace(good, subkey=owner_subkey(OTHER.public_key))) == Reason.BAD_SIGNATURE
    # OTHER writes into SAMPLER's subkey, signing with its own key
    forged = dht_record(status(peer_id="attacker"), OTHER, subkey=owner_subkey(SAMPLER.public_key),
                        validator=_SignAnything(OTHER))
    assert check_reason(reader, forged) == Reason.BAD_SIGNATURE
    # correctly signed by the owner, but stored under a key it does not belong to
    assert check_reason(reader, dht_record(status(), SAMPLER, key=dht_key_id(LearnerHeartbeat.key_for(RUN)))) \
        == Reason.KEY_MISMATCH
    # a sampler announcing a heartbeat under the learner key, under its own subkey
    assert check_reason(reader, dht_record(heartbeat(), SAMPLER)) == Reason.UNTRUSTED_SIGNER
    # other run
    assert check_reason(reader, dht_record(status(run_id="other"), SAMPLER)) == Reason.WRONG_RUN
    # too far in the future (never-expiring squatting)
    assert check_reason(reader, dht_record(status(), SAMPLER, exp=time.time() + 10**6)) == Reason.BAD_EXPIRATION
    assert check_reason(reader, dht_record(status(), SAMPLER, exp=float("inf"))) == Reason.BAD_EXPIRATION
    # unsigned / unprotected records
    unsigned = DHTRecord(dht_key_id(status().dht_key), DHTProtocol.IS_REGULAR_VALUE, b"\xc4\x01x", time.time() + 5)
    assert check_reason(reader, unsigned) == Reason.MALFORMED
    assert Ed25519OwnerValidator(RUN, allow_unprotected=True).validate(unsigned)
    # a subkey that looks like an owner but is not canonical / not a key
    assert check_reason(reader, dataclasses.replace(good, subkey=msgpack.packb("ed25519:zz"))) == Reason.MALFORMED
    # short / huge values
    assert check_reason(reader, dataclasses.replace(good, value=b"\x00" * 10)) == Reason.MALFORMED
    assert check_reason(reader, dataclasses.replace(good, value=b"\x00" * 100_000)) == Reason.OVERSIZE
    assert reader.rejections[Reason.BAD_SIGNATURE] == 6


class _SignAnything(Ed25519OwnerValidator):
    """An attacker's validator: signs every record with its own key, whatever the subkey says."""

    def __init__(self, identity):
        super().__init__(RUN, identity)

    def sign_value(self, record):
        from protocol.records import record_signing_bytes

        return record.value + self._identity.sign(
            record_signing_bytes(record.key, record.subkey, record.value, record.expiration_time))


def test_allowed_owners():
    v = Ed25519OwnerValidator(RUN, learner=LEARNER.public_key, allowed_owners=[SAMPLER.public_key])
    assert v.validate(dht_record(status(), SAMPLER))
    assert v.validate(dht_record(heartbeat(), LEARNER))  # the learner is always allowed
    assert check_reason(v, dht_record(status(), OTHER)) == Reason.UNTRUSTED_SIGNER


def test_sign_value_only_signs_own_subkey():
    v = Ed25519OwnerValidator(RUN, SAMPLER)
    r = DHTRecord(b"k" * 20, owner_subkey(OTHER.public_key), b"v", 1.0)
    assert v.sign_value(r) == b"v"
    assert Ed25519OwnerValidator(RUN).sign_value(dataclasses.replace(r, subkey=owner_subkey(SAMPLER.public_key))) == b"v"


def test_works_inside_composite_validator_with_rsa():
    """Our validator composes with hivemind's own (priority ordering, no merging)."""
    comp = CompositeValidator([Ed25519OwnerValidator(RUN, SAMPLER), RSASignatureValidator()])
    rec = status()
    r = DHTRecord(dht_key_id(rec.dht_key), owner_subkey(SAMPLER.public_key),
                  msgpack.packb(encode_record(rec), use_bin_type=True), time.time() + 30)
    signed = dataclasses.replace(r, value=comp.sign_value(r))
    assert comp.validate(signed)
    assert msgpack.unpackb(comp.strip_value(signed)) == encode_record(rec)


def test_records_from_get_and_shards():
    class VWE:  # duck-typed hivemind ValueWithExpiration
        def __init__(self, value, expiration_time=0.0):
            self.value, self.expiration_time = value, expiration_time

    result = VWE({
        SAMPLER.public_key_str: VWE(encode_record(status())),
        OTHER.public_key_str: VWE(encode_record(heartbeat())),  # heartbeat not by the learner
        LEARNER.public_key_str: VWE(encode_record(heartbeat())),
        "junk": VWE(b"\x00"),
        LEARNER.public_key_str[:-1] + "0": VWE(b"not a record"),
    })
    assert records_from_get(result, SamplerStatus) == {SAMPLER.public_key: status()}
    assert records_from_get(result, LearnerHeartbeat, learner=LEARNER.public_key) == {LEARNER.public_key: heartbeat()}
    assert len(records_from_get(result)) == 3
    assert records_from_get(None) == {}
    shards = {shard_for(bytes([i]) * 32, 4) for i in range(64)}
    assert shards == {0, 1, 2, 3}
    assert status(shard=3).dht_key == f"gepo/{RUN}/samplers/3"
    assert have(shard=2).dht_key == f"gepo/{RUN}/have/7/2"
