"""Storing and reading the swarm's signed DHT records (formats and signatures: :mod:`protocol.records`).

* ``gepo/<run>/learner`` - :class:`~protocol.records.LearnerHeartbeat`, one subkey per learner key.
* ``gepo/<run>/have/<version>/<shard>`` - :class:`~protocol.records.ChunkHave`: which chunks of a version a peer
  holds and serves (how peers find each other for a version); ``HAVE_SHARDS`` keys per version spread the subkeys.
  ``gepo/<run>/have/<base>-<version>/<shard>``: the same for the delta ``base -> version``.
* ``gepo/<run>/samplers/<shard>`` - :class:`~protocol.records.SamplerStatus`: a sampler's status line.

Every record is stored under the owner's subkey ``ed25519:<hex>`` and signed by
:class:`~protocol.records.Ed25519OwnerValidator` in the DHT process. All calls are bounded (``SwarmNode``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Optional, Sequence

from hivemind.utils import get_dht_time

from protocol.identity import Identity
from protocol.records import (
    MAX_COUNTERS,
    MAX_MULTIADDRS,
    ChunkHave,
    LearnerHeartbeat,
    SamplerStatus,
    encode_record,
    records_from_get,
    shard_for,
)

logger = logging.getLogger(__name__)

HAVE_SHARDS = 4
STATUS_SHARDS = 4
NO_DIGEST = b"\x00" * 32


def trim_maddrs(maddrs: Sequence[str]) -> List[str]:
    return [str(m) for m in maddrs if len(str(m)) <= 256][:MAX_MULTIADDRS]


def clip_counters(counters: Optional[Dict[str, int]]) -> Dict[str, int]:
    """Counters as a record carries them: at most MAX_COUNTERS names of <= 32 characters, values >= 0."""
    return {k[:32]: max(0, int(v)) for k, v in list((counters or {}).items())[:MAX_COUNTERS]}


async def store_record(node, identity: Identity, record, ttl: float) -> bool:
    return await node.dht_store(
        record.dht_key, identity.public_key_str, encode_record(record), get_dht_time() + ttl
    )


async def store_heartbeat(
    node, identity: Identity, *, run_id: str, peer_id: str, version: Optional[int], manifest_digest: Optional[bytes],
    manifest_size: int, weights_size: int, maddrs: Sequence[str], ttl: float, counters: Optional[Dict[str, int]] = None,
) -> bool:
    rec = LearnerHeartbeat(
        run_id=run_id,
        peer_id=peer_id,
        policy_version=int(version or 0),
        manifest_digest=manifest_digest or NO_DIGEST,
        manifest_size=int(manifest_size if version is not None else 0),
        weights_size=int(weights_size if version is not None else 0),
        multiaddrs=tuple(trim_maddrs(maddrs)),
        time=float(get_dht_time()),
        counters=clip_counters(counters),
    )
    return await store_record(node, identity, rec, ttl)


async def read_heartbeats(node, run_id: str, learner: Optional[bytes] = None) -> Dict[bytes, LearnerHeartbeat]:
    value = await node.dht_get(LearnerHeartbeat.key_for(run_id), latest=True)
    return records_from_get(value, LearnerHeartbeat, learner=learner)


async def store_have(
    node, identity: Identity, *, run_id: str, peer_id: str, version: int, n_chunks: int, bitmap: bytes,
    maddrs: Sequence[str], ttl: float, base: Optional[int] = None,
) -> bool:
    """``base``: the record is about the delta ``base -> version`` (its own DHT keys), not the full version."""
    rec = ChunkHave(
        run_id=run_id, peer_id=peer_id, version=version, n_chunks=n_chunks, bitmap=bitmap,
        multiaddrs=tuple(trim_maddrs(maddrs)), time=float(get_dht_time()),
        shard=shard_for(identity.public_key, HAVE_SHARDS), base=base,
    )
    return await store_record(node, identity, rec, ttl)


async def read_haves(node, run_id: str, version: int, base: Optional[int] = None) -> Dict[bytes, ChunkHave]:
    values = await asyncio.gather(
        *(node.dht_get(ChunkHave.key_for(run_id, version, s, base), latest=True) for s in range(HAVE_SHARDS))
    )
    out: Dict[bytes, ChunkHave] = {}
    for value in values:
        for owner, rec in records_from_get(value, ChunkHave).items():
            if rec.version == version and rec.base == base:
                out[owner] = rec
    return out


async def store_status(
    node, identity: Identity, *, run_id: str, peer_id: str, version: Optional[int], counters: Dict[str, int],
    ttl: float,
) -> bool:
    rec = SamplerStatus(
        run_id=run_id, peer_id=peer_id, policy_version=int(version or 0),
        counters=clip_counters(counters),
        time=float(get_dht_time()), shard=shard_for(identity.public_key, STATUS_SHARDS),
    )
    return await store_record(node, identity, rec, ttl)


async def read_statuses(node, run_id: str) -> Dict[bytes, SamplerStatus]:
    values = await asyncio.gather(
        *(node.dht_get(SamplerStatus.key_for(run_id, s), latest=True) for s in range(STATUS_SHARDS))
    )
    out: Dict[bytes, SamplerStatus] = {}
    for value in values:
        out.update(records_from_get(value, SamplerStatus))
    return out
