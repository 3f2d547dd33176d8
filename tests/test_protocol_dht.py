"""The Ed25519 owner validator inside real hivemind DHT nodes on 127.0.0.1.

Three nodes: the learner (honest writer), a sampler (honest writer and reader) and an attacker whose node runs a
validator that accepts everything and signs whatever it is told to with the attacker's key. The attacker stores
forged records (an overwrite of the learner's and of the sampler's subkeys, a bad signature, a heartbeat under its
own subkey); honest readers must get back only the honest records - and the attacker's own, correctly signed status.
"""

from __future__ import annotations

import time

import pytest

hivemind = pytest.importorskip("hivemind")
from hivemind.utils import get_dht_time  # noqa: E402

from protocol.records import (  # noqa: E402
    Ed25519OwnerValidator,
    LearnerHeartbeat,
    SamplerStatus,
    encode_record,
    record_signing_bytes,
    records_from_get,
)
from tests.test_protocol_util import LEARNER, OTHER, RUN, SAMPLER  # noqa: E402

TIMEOUT = 20
ATTACKER = OTHER


class AttackerValidator(Ed25519OwnerValidator):
    """Runs on the attacker's node: stores anything locally and signs every record with the attacker's key, so the
    attacker's node will happily serve forged records to others."""

    def __init__(self, mode: str = "sign-with-own-key"):
        super().__init__(RUN, ATTACKER)
        self.mode = mode

    def validate(self, record) -> bool:
        return True

    def sign_value(self, record) -> bytes:
        if record.subkey.endswith(b"bad-signature"):  # marker handled below: garbage signature
            return record.value + b"\x07" * 64
        msg = record_signing_bytes(record.key, record.subkey, record.value, record.expiration_time)
        return record.value + self._identity.sign(msg)

    def strip_value(self, record) -> bytes:
        return record.value[:-64]


def make_dht(validators, initial_peers=None):
    return hivemind.DHT(
        initial_peers=initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        client_mode=False,
        nat_port_map=False,
        auto_nat=False,
        use_relay=False,
        record_validators=validators,
    )


@pytest.fixture(scope="module")
def swarm():
    nodes = []
    try:
        learner = make_dht([Ed25519OwnerValidator(RUN, LEARNER, learner=LEARNER.public_key)])
        nodes.append(learner)
        peers = [str(a) for a in learner.get_visible_maddrs()]
        sampler = make_dht([Ed25519OwnerValidator(RUN, SAMPLER, learner=LEARNER.public_key)], peers)
        nodes.append(sampler)
        attacker = make_dht([AttackerValidator()], peers)
        nodes.append(attacker)
        yield learner, sampler, attacker
    finally:
        for n in nodes:
            try:
                n.shutdown()
            except Exception:  # pragma: no cover
                pass


def store(dht, rec, subkey, ttl=60.0, value=None):
    return dht.store(
        rec.dht_key, subkey=subkey, value=encode_record(rec) if value is None else value,
        expiration_time=get_dht_time() + ttl, return_future=True,
    ).result(timeout=TIMEOUT)


def get_records(dht, key, record_type):
    res = dht.get(key, latest=True, return_future=True).result(timeout=TIMEOUT)
    return records_from_get(res, record_type, learner=LEARNER.public_key), res


def heartbeat(pv, peer="learner-peer"):
    return LearnerHeartbeat(run_id=RUN, peer_id=peer, policy_version=pv, manifest_digest=bytes([pv]) * 32,
                            manifest_size=1000, weights_size=10**6, multiaddrs=(), time=get_dht_time())


def status(pv, peer, shard=0):
    return SamplerStatus(run_id=RUN, peer_id=peer, policy_version=pv, counters={"sent": pv}, time=get_dht_time(),
                         shard=shard)


@pytest.mark.timeout(180)
def test_forged_records_are_not_returned_to_honest_readers(swarm):
    learner, sampler, attacker = swarm
    hb_key = LearnerHeartbeat.key_for(RUN)
    st_key = SamplerStatus.key_for(RUN)

    # honest writes, read back by the other honest node (positive control)
    assert store(learner, heartbeat(7), LEARNER.public_key_str)
    assert store(sampler, status(7, "sampler-peer"), SAMPLER.public_key_str)
    hbs, _ = get_records(sampler, hb_key, LearnerHeartbeat)
    assert hbs == {LEARNER.public_key: heartbeat(7)} or hbs[LEARNER.public_key].policy_version == 7

    # --- the attacker's writes ---
    # 1. overwrite the learner's subkey with a newer-expiring heartbeat announcing a fake version
    store(attacker, heartbeat(99, "attacker-peer"), LEARNER.public_key_str, ttl=120)
    # 2. a heartbeat under its own subkey, correctly signed by its own key (not the learner's key)
    store(attacker, heartbeat(98, "attacker-peer"), ATTACKER.public_key_str, ttl=120)
    # 3. overwrite the honest sampler's status subkey
    store(attacker, status(0, "attacker-peer"), SAMPLER.public_key_str, ttl=120)
    # 4. a record with a garbage signature under a subkey marked for it (not a valid owner subkey either)
    store(attacker, status(1, "attacker-peer"), ATTACKER.public_key_str[:-13] + "bad-signature", ttl=120)
    # 5. its own, correctly signed status: a legitimate record that honest nodes must accept
    store(attacker, status(3, "attacker-peer"), ATTACKER.public_key_str, ttl=120)

    # the attacker's node itself holds and serves the forgeries (proof that they exist in the DHT) ...
    raw = attacker.get(hb_key, latest=True, return_future=True).result(timeout=TIMEOUT)
    forged = records_from_get(raw, LearnerHeartbeat)
    assert forged[LEARNER.public_key].policy_version == 99 and forged[ATTACKER.public_key].policy_version == 98

    # ... but honest readers see only honest data, whichever node they ask through
    deadline = time.monotonic() + 30
    while True:
        for reader in (sampler, learner):
            hbs, res = get_records(reader, hb_key, LearnerHeartbeat)
            assert set(hbs) == {LEARNER.public_key}, hbs
            assert hbs[LEARNER.public_key].policy_version == 7
            assert set(res.value) == {LEARNER.public_key_str}  # forged subkeys not even present
            sts, res = get_records(reader, st_key, SamplerStatus)
            assert sts.get(SAMPLER.public_key) is not None and sts[SAMPLER.public_key].policy_version == 7
            assert all(s.peer_id != "attacker-peer" or owner == ATTACKER.public_key for owner, s in sts.items())
            assert set(res.value) <= {SAMPLER.public_key_str, ATTACKER.public_key_str}
        # the attacker's legitimate own status becomes visible (via the honest nodes that stored it)
        if ATTACKER.public_key in sts:
            assert sts[ATTACKER.public_key].policy_version == 3
            break
        assert time.monotonic() < deadline, "attacker's valid own record never became visible"
        time.sleep(0.5)

    # the honest owner can still update its own record afterwards
    assert store(learner, heartbeat(8), LEARNER.public_key_str, ttl=180)
    hbs, _ = get_records(sampler, hb_key, LearnerHeartbeat)
    assert hbs[LEARNER.public_key].policy_version == 8


@pytest.mark.timeout(120)
def test_honest_node_refuses_forged_store_directly(swarm):
    """The store RPC itself is refused by honest nodes: the attacker's forged write ends up only on its own node."""
    learner, sampler, attacker = swarm
    key = SamplerStatus.key_for(RUN, shard=5)
    ok = store(attacker, status(0, "attacker-peer", shard=5), SAMPLER.public_key_str, ttl=60)
    # the attacker's own node accepted it (its validator accepts everything); honest ones did not
    mine = attacker.get(key, latest=True, return_future=True).result(timeout=TIMEOUT)
    assert SAMPLER.public_key_str in mine.value
    for reader in (learner, sampler):
        res = reader.get(key, latest=True, return_future=True).result(timeout=TIMEOUT)
        assert res is None or SAMPLER.public_key_str not in res.value
    assert ok in (True, False)  # hivemind's store() result is not trustworthy with mixed validators


@pytest.mark.timeout(180)
def test_one_bad_entry_does_not_hide_the_pinned_learner():
    """Several entries under the heartbeat key, one of them another key's heartbeat and one malformed: a sampler
    pinned to the learner's key must still find the learner's. hivemind rejects a whole dictionary value when one
    entry fails validation, so the copy that held all three used to answer "nothing" to the pinned sampler.

    Node ids are chosen so that the only copy is on one node that accepts everything (as a node without
    --learner-key, or a lying one, would), with the learner storing on the single nearest node: what a large swarm
    looks like to a key whose nearest replicas are other samplers' nodes."""
    from hivemind.dht.routing import DHTID

    from node.dht import SwarmDHT

    hb_key = LearnerHeartbeat.key_for(RUN)
    key_id = DHTID.generate(source=hb_key)

    def far(i):  # far from the key: never the nearest replica
        return DHTID(key_id ^ (1 << 159 - i))

    def node(cls, validators, node_id, peers=None):
        return cls(initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=False,
                   nat_port_map=False, auto_nat=False, use_relay=False, record_validators=validators,
                   node_id=node_id, num_replicas=1)

    nodes = []
    try:
        replica = node(hivemind.DHT, [AttackerValidator()], DHTID(key_id ^ 1))  # the nearest node to the key
        nodes.append(replica)
        peers = [str(a) for a in replica.get_visible_maddrs()]
        learner = node(hivemind.DHT, [Ed25519OwnerValidator(RUN, LEARNER, learner=LEARNER.public_key)], far(0), peers)
        nodes.append(learner)
        pinned = node(SwarmDHT, [Ed25519OwnerValidator(RUN, SAMPLER, learner=LEARNER.public_key)], far(1), peers)
        nodes.append(pinned)

        assert store(learner, heartbeat(7), LEARNER.public_key_str) is not None
        store(replica, heartbeat(98, "other-key-peer"), ATTACKER.public_key_str)  # signed by its own (other) key
        store(replica, heartbeat(99, "malformed-peer"), ATTACKER.public_key_str[:-13] + "bad-signature")
        raw = replica.get(hb_key, latest=True, return_future=True).result(timeout=TIMEOUT)
        assert len(raw.value) == 3  # the three entries sit together on the one replica
        assert learner.get(hb_key, latest=True, return_future=True).result(timeout=TIMEOUT) is None  # no own copy

        hbs, res = get_records(pinned, hb_key, LearnerHeartbeat)  # what the pinned sampler's lookup does
        assert set(hbs) == {LEARNER.public_key}, res
        assert hbs[LEARNER.public_key].policy_version == 7
        assert set(res.value) == {LEARNER.public_key_str}  # the other entries were dropped, one by one
    finally:
        for n in nodes:
            try:
                n.shutdown()
            except Exception:  # pragma: no cover
                pass
