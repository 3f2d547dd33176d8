"""gepo-swarm wire protocol: identities, signed rollout groups, weight manifests, DHT records, validation.

Pure encoding / crypto / validation - no networking. See docs/PROTOCOL.md for the formats and the threat model.

Modules:
    protocol.errors    ProtocolError, Reason
    protocol.identity  Identity, parse_public_key, format_public_key, verify_signature
    protocol.rollout   RolloutGroup, SamplingParams, Limits, encode_group, decode_group, read_sender, wire_size
    protocol.manifest  WeightManifest, build_manifest, encode_manifest, decode_manifest, verify_chunk, ...
    protocol.adapter   AdapterInfo, check_base: LoRA adapter versions (the signed ``adapter`` field of a manifest)
    protocol.records   LearnerHeartbeat, SamplerStatus, ChunkHave, Ed25519OwnerValidator, ... (imports hivemind)
    protocol.validate  RolloutValidator, ValidatorConfig, ReplayWindow, PromptTable

``protocol.records`` is imported lazily (it imports hivemind, ~2 s); everything else is light.
"""

from __future__ import annotations

from .errors import ProtocolError, Reason
from .identity import Identity, IdentityFileError, format_public_key, parse_public_key, short_key, verify_signature
from .manifest import (
    WeightManifest,
    build_manifest,
    decode_manifest,
    encode_manifest,
    manifest_digest,
    verify_chunk,
)
from .rollout import Limits, RolloutGroup, SamplingParams, decode_group, encode_group
from .validate import PromptTable, RolloutValidator, ValidatorConfig

_LAZY = {
    "Ed25519OwnerValidator",
    "LearnerHeartbeat",
    "SamplerStatus",
    "ChunkHave",
    "encode_record",
    "decode_record",
    "records_from_get",
}

__all__ = [
    "ProtocolError",
    "Reason",
    "Identity",
    "IdentityFileError",
    "format_public_key",
    "parse_public_key",
    "short_key",
    "verify_signature",
    "WeightManifest",
    "build_manifest",
    "decode_manifest",
    "encode_manifest",
    "manifest_digest",
    "verify_chunk",
    "Limits",
    "RolloutGroup",
    "SamplingParams",
    "decode_group",
    "encode_group",
    "PromptTable",
    "RolloutValidator",
    "ValidatorConfig",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import records

        return getattr(records, name)
    raise AttributeError(f"module 'protocol' has no attribute {name!r}")
