"""Shared builders for the protocol tests (imported by the other tests/test_protocol_*.py modules)."""

from __future__ import annotations

import numpy as np

from protocol.identity import Identity
from protocol.rollout import RolloutGroup, SamplingParams, encode_group

RUN = "run-test"
VOCAB = 50_000
# deterministic keys so that failures are reproducible
SAMPLER = Identity.from_seed(bytes(range(32)))
LEARNER = Identity.from_seed(bytes(range(100, 132)))
OTHER = Identity.from_seed(bytes(range(200, 232)))


def make_group(
    *,
    seq: int = 1,
    policy_version: int = 5,
    prompt_index: int = 3,
    G: int = 8,
    L: int = 512,
    P: int = 128,
    ragged: bool = True,
    seed: int = 0,
    reward=True,
    run_id: str = RUN,
) -> RolloutGroup:
    rng = np.random.default_rng(seed)
    lens = [int(L - (i * 37) % max(1, L // 2)) if ragged else L for i in range(G)]
    return RolloutGroup.from_completions(
        run_id=run_id,
        seq=seq,
        policy_version=policy_version,
        prompt_index=prompt_index,
        prompt_ids=rng.integers(0, VOCAB, P),
        completions=[rng.integers(0, VOCAB, n) for n in lens],
        logprobs=[-rng.exponential(1.0, n).astype(np.float32) for n in lens],
        sampling=SamplingParams(temperature=0.8, top_p=0.95, top_k=-1, max_tokens=L),
        started_at=1_700_000_000.25,
        finished_at=1_700_000_003.5,
        reward=[float(i % 2) for i in range(G)] if reward else None,
    )


def signed_group(identity: Identity = SAMPLER, **kw) -> bytes:
    return encode_group(make_group(**kw), identity)


def test_helpers_are_deterministic():
    assert signed_group() == signed_group()
    assert make_group(seed=1) != make_group(seed=2)


# --- crafting signed-but-malicious messages (a sampler with a valid key that sends garbage) ----------------------
import struct  # noqa: E402

import msgpack  # noqa: E402

from protocol.rollout import PREFIX_BYTES, ROLLOUT_DOMAIN  # noqa: E402


def split_group(data: bytes):
    """-> (header dict, payload bytes) of a valid message."""
    header_len = struct.unpack_from("<I", data, 4)[0]
    header = msgpack.unpackb(data[PREFIX_BYTES:PREFIX_BYTES + header_len], raw=False)
    return header, data[PREFIX_BYTES + header_len:]


def forge_group(header, payload: bytes, identity: Identity = SAMPLER, *, version: int = 1, header_bytes=None,
                payload_len=None, magic=b"GSR") -> bytes:
    """Assemble and sign an arbitrary header/payload exactly like encode_group does."""
    hb = msgpack.packb(header, use_bin_type=True) if header_bytes is None else header_bytes
    plen = len(payload) if payload_len is None else payload_len
    prefix = struct.pack("<3sBIQ32s", magic, version, len(hb), plen, identity.public_key)
    sig = identity.sign(ROLLOUT_DOMAIN + prefix + hb)
    return prefix + sig + hb + payload


def resign_group(data: bytes, identity: Identity = SAMPLER, **header_updates) -> bytes:
    """Change header fields of a valid message, fix the payload hash, and re-sign."""
    import hashlib

    header, payload = split_group(data)
    header.update(header_updates)
    if "payload_hash" not in header_updates:
        header["payload_hash"] = hashlib.sha256(payload).digest()
    return forge_group(header, payload, identity)
