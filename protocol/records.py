"""DHT records (tiny, signed, schema-checked) and the Ed25519 owner-subkey validator for hivemind's DHT.

Every record lives under a DHT key derived from the run id (:meth:`dht_key`) and under the SUBKEY that names its
owner: the owner's printable public key ``"ed25519:<hex>"``. hivemind validators see the key only as a hash, so
ownership is expressed in the subkey (as hivemind's ``RSASignatureValidator`` does with ``[owner:...]``).

Storing (node layer)::

    validator = Ed25519OwnerValidator(run_id, identity, learner=learner_public_key)
    dht = hivemind.DHT(..., record_validators=[validator])
    rec = SamplerStatus(run_id=run_id, peer_id=..., policy_version=7, counters={"sent": 3}, time=get_dht_time())
    dht.store(rec.dht_key, subkey=identity.public_key_str, value=encode_record(rec),
              expiration_time=get_dht_time() + 60, return_future=True).result(timeout=10)

Reading::

    res = dht.get(SamplerStatus.key_for(run_id), latest=True, return_future=True).result(timeout=10)
    statuses = records_from_get(res, SamplerStatus)      # {owner public key: SamplerStatus}

The DHT value is ``encode_record(rec)`` (bytes; hivemind wraps it in msgpack) followed by a 64-byte Ed25519
signature appended by :meth:`Ed25519OwnerValidator.sign_value` over
``DOMAIN || key_id || subkey || value || expiration`` (length-prefixed). Values are capped at
:data:`MAX_RECORD_BYTES` (hivemind hangs on large values).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import struct
import time
from collections import Counter
from typing import Any, ClassVar, Collection, Dict, Mapping, Optional, Tuple, Type, Union

import msgpack
import numpy as np
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from ._wire import HASH_BYTES, packb, req_bin, req_float, req_int, req_list, req_map, req_str, unpackb
from .errors import ProtocolError, Reason
from .identity import (
    PUBLIC_KEY_PREFIX,
    SIGNATURE_BYTES,
    Identity,
    parse_public_key,
    short_key,
    verify_signature,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "RECORD_DOMAIN",
    "LearnerHeartbeat",
    "SamplerStatus",
    "ChunkHave",
    "Record",
    "RECORD_TYPES",
    "encode_record",
    "decode_record",
    "dht_key_id",
    "owner_subkey",
    "shard_for",
    "record_signing_bytes",
    "Ed25519OwnerValidator",
    "parse_dht_entry",
    "records_from_get",
]

logger = logging.getLogger(__name__)

#: Maximum size of an encoded record (before hivemind's msgpack wrapping and our 64-byte signature).
MAX_RECORD_BYTES = 4096
RECORD_DOMAIN = b"gepo-swarm/dht-record/v1\x00"
KEY_PREFIX = "gepo"
MAX_MULTIADDRS = 8
MAX_MULTIADDR_LEN = 256
MAX_PEER_ID_LEN = 128
MAX_COUNTERS = 16
MAX_BITMAP_BYTES = 2048  # 16384 chunks (64 GiB at 4 MiB chunks)
MAX_SHARDS = 256
_RECORD_VERSION = 1


def _req_multiaddrs(v: Any) -> Tuple[str, ...]:
    return tuple(req_str(a, "multiaddrs[]", MAX_MULTIADDR_LEN, 1) for a in req_list(v, "multiaddrs", MAX_MULTIADDRS))


def _check_run(run_id: str) -> str:
    return req_str(run_id, "run", 128, 1)


def _req_counters(c: Any) -> Dict[str, int]:
    if type(c) is not dict or len(c) > MAX_COUNTERS:
        raise ProtocolError(Reason.MALFORMED, f"counters must be a map of at most {MAX_COUNTERS} entries")
    return {req_str(k, "counter name", 32, 1): req_int(v, "counter value") for k, v in c.items()}


def milli_counters(**values: Optional[float]) -> Dict[str, int]:
    """Fractional progress numbers as heartbeat counters, which are non-negative integers on the wire: ``x`` becomes
    ``x_milli`` = round(1000 * value). A value that is None, not finite, negative or too large is left out rather
    than sent (a counter outside [0, 2**63) would make every reader drop the whole heartbeat)."""
    out = {}
    for name, value in values.items():
        if value is not None and math.isfinite(value) and 0 <= value < 2**53 / 1000:
            out[f"{name}_milli"] = int(round(1000 * value))
    return out


@dataclasses.dataclass(frozen=True)
class LearnerHeartbeat:
    """The learner's announcement of its latest policy version. Only the learner key may write it."""

    KIND: ClassVar[str] = "learner"
    run_id: str
    peer_id: str  # libp2p peer id, base58
    policy_version: int
    manifest_digest: bytes  # sha256 of the signed manifest (protocol.manifest.manifest_digest)
    manifest_size: int  # bytes of the signed manifest
    weights_size: int  # bytes of the flat weight buffer (manifest.total_size)
    multiaddrs: Tuple[str, ...] = ()
    time: float = 0.0
    #: optional progress counters (step, accepted, rejected, ..., and fractions in thousandths such as
    #: ``reward_mean_milli``, see :func:`milli_counters`; at most 16). Omitted from the encoding when empty,
    #: so a heartbeat without counters is byte-for-byte what readers that predate the field accept.
    counters: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "multiaddrs", tuple(self.multiaddrs))
        object.__setattr__(self, "counters", dict(self.counters))

    @staticmethod
    def key_for(run_id: str) -> str:
        return f"{KEY_PREFIX}/{run_id}/learner"

    @property
    def dht_key(self) -> str:
        return self.key_for(self.run_id)

    def _fields(self) -> dict:
        return {
            "peer": self.peer_id,
            "pv": self.policy_version,
            "md": self.manifest_digest,
            "ms": self.manifest_size,
            "ws": self.weights_size,
            "ma": list(self.multiaddrs),
            "t": float(self.time),
            **({"c": dict(self.counters)} if self.counters else {}),
        }

    @classmethod
    def _parse(cls, run_id: str, m: dict) -> "LearnerHeartbeat":
        return cls(
            run_id=run_id,
            peer_id=req_str(m["peer"], "peer", MAX_PEER_ID_LEN, 1),
            policy_version=req_int(m["pv"], "pv"),
            manifest_digest=req_bin(m["md"], "md", HASH_BYTES),
            manifest_size=req_int(m["ms"], "ms"),
            weights_size=req_int(m["ws"], "ws"),
            multiaddrs=_req_multiaddrs(m["ma"]),
            time=req_float(m["t"], "t"),
            counters=_req_counters(m["c"]) if "c" in m else {},
        )

    _KEYS: ClassVar[frozenset] = frozenset({"peer", "pv", "md", "ms", "ws", "ma", "t"})
    _OPTIONAL: ClassVar[frozenset] = frozenset({"c"})


@dataclasses.dataclass(frozen=True)
class SamplerStatus:
    """A sampler's status line: the policy version it samples with and its counters (sent/accepted/...)."""

    KIND: ClassVar[str] = "sampler"
    run_id: str
    peer_id: str
    policy_version: int
    counters: Mapping[str, int] = dataclasses.field(default_factory=dict)
    time: float = 0.0
    shard: int = 0  # spreads many samplers over several DHT keys (see shard_for)

    def __post_init__(self):
        object.__setattr__(self, "counters", dict(self.counters))

    @staticmethod
    def key_for(run_id: str, shard: int = 0) -> str:
        return f"{KEY_PREFIX}/{run_id}/samplers/{shard}"

    @property
    def dht_key(self) -> str:
        return self.key_for(self.run_id, self.shard)

    def _fields(self) -> dict:
        return {
            "peer": self.peer_id,
            "pv": self.policy_version,
            "c": dict(self.counters),
            "t": float(self.time),
            "sh": self.shard,
        }

    @classmethod
    def _parse(cls, run_id: str, m: dict) -> "SamplerStatus":
        counters = _req_counters(m["c"])
        return cls(
            run_id=run_id,
            peer_id=req_str(m["peer"], "peer", MAX_PEER_ID_LEN, 1),
            policy_version=req_int(m["pv"], "pv"),
            counters=counters,
            time=req_float(m["t"], "t"),
            shard=req_int(m["sh"], "sh", 0, MAX_SHARDS - 1),
        )

    _KEYS: ClassVar[frozenset] = frozenset({"peer", "pv", "c", "t", "sh"})


@dataclasses.dataclass(frozen=True)
class ChunkHave:
    """Which chunks of weight version ``version`` a peer has and serves. Bit i (LSB-first) = chunk i.

    With ``base`` set, the chunks are those of the delta ``base -> version`` (protocol.delta), announced under their
    own key; ``base`` is omitted from the encoding when None, so a full-version record is what older readers accept."""

    KIND: ClassVar[str] = "have"
    run_id: str
    peer_id: str
    version: int
    n_chunks: int
    bitmap: bytes  # ceil(n_chunks / 8) bytes, unused high bits zero
    multiaddrs: Tuple[str, ...] = ()
    time: float = 0.0
    shard: int = 0
    base: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "multiaddrs", tuple(self.multiaddrs))
        object.__setattr__(self, "bitmap", bytes(self.bitmap))

    @staticmethod
    def key_for(run_id: str, version: int, shard: int = 0, base: Optional[int] = None) -> str:
        what = version if base is None else f"{base}-{version}"
        return f"{KEY_PREFIX}/{run_id}/have/{what}/{shard}"

    @property
    def dht_key(self) -> str:
        return self.key_for(self.run_id, self.version, self.shard, self.base)

    @classmethod
    def from_indices(cls, *, run_id: str, peer_id: str, version: int, n_chunks: int, have, **kw) -> "ChunkHave":
        bits = np.zeros(n_chunks, dtype=bool)
        idx = np.asarray(list(have), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_chunks):
            raise ValueError("chunk index out of range")
        bits[idx] = True
        return cls(run_id=run_id, peer_id=peer_id, version=version, n_chunks=n_chunks,
                   bitmap=np.packbits(bits, bitorder="little").tobytes(), **kw)

    def has(self, index: int) -> bool:
        return 0 <= index < self.n_chunks and bool(self.bitmap[index >> 3] >> (index & 7) & 1)

    def indices(self) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(self.bitmap, dtype=np.uint8), bitorder="little")[: self.n_chunks]
        return np.flatnonzero(bits)

    @property
    def complete(self) -> bool:
        return len(self.indices()) == self.n_chunks

    def _fields(self) -> dict:
        return {
            "peer": self.peer_id,
            "v": self.version,
            "n": self.n_chunks,
            "bm": self.bitmap,
            "ma": list(self.multiaddrs),
            "t": float(self.time),
            "sh": self.shard,
            **({} if self.base is None else {"b": self.base}),
        }

    @classmethod
    def _parse(cls, run_id: str, m: dict) -> "ChunkHave":
        n = req_int(m["n"], "n", 0, 8 * MAX_BITMAP_BYTES)
        bm = req_bin(m["bm"], "bm", max_size=MAX_BITMAP_BYTES)
        if len(bm) != (n + 7) // 8:
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"bitmap of {len(bm)} bytes for {n} chunks")
        if n % 8 and bm[-1] >> (n % 8):
            raise ProtocolError(Reason.MALFORMED, "bitmap has bits set beyond n_chunks")
        version = req_int(m["v"], "v")
        base = req_int(m["b"], "b") if "b" in m else None
        if base is not None and base >= version:
            raise ProtocolError(Reason.MALFORMED, f"delta base {base} is not before version {version}")
        return cls(
            run_id=run_id,
            peer_id=req_str(m["peer"], "peer", MAX_PEER_ID_LEN, 1),
            version=version,
            n_chunks=n,
            bitmap=bm,
            multiaddrs=_req_multiaddrs(m["ma"]),
            time=req_float(m["t"], "t"),
            shard=req_int(m["sh"], "sh", 0, MAX_SHARDS - 1),
            base=base,
        )

    _KEYS: ClassVar[frozenset] = frozenset({"peer", "v", "n", "bm", "ma", "t", "sh"})
    _OPTIONAL: ClassVar[frozenset] = frozenset({"b"})


Record = Union[LearnerHeartbeat, SamplerStatus, ChunkHave]
RECORD_TYPES: Dict[str, Type] = {c.KIND: c for c in (LearnerHeartbeat, SamplerStatus, ChunkHave)}


def encode_record(rec: Record) -> bytes:
    """Record -> compact msgpack bytes (the value to pass to ``dht.store``). ValueError if invalid or too large."""
    if type(rec) not in RECORD_TYPES.values():
        raise TypeError(f"not a record: {type(rec).__name__}")
    data = packb({"k": rec.KIND, "fv": _RECORD_VERSION, "run": rec.run_id, **rec._fields()})
    try:
        back = decode_record(data)
    except ProtocolError as e:
        raise ValueError(f"invalid {type(rec).__name__}: {e}") from None
    if back != rec:
        raise ValueError(f"{type(rec).__name__} does not survive a round trip (check field types)")
    return data


def decode_record(data) -> Record:
    """msgpack bytes -> record. Raises ProtocolError (MALFORMED / OVERSIZE / UNKNOWN_VERSION / SHAPE_MISMATCH)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, "record must be bytes")
    if len(data) > MAX_RECORD_BYTES:
        raise ProtocolError(Reason.OVERSIZE, f"record is {len(data)} bytes > {MAX_RECORD_BYTES}")
    m = unpackb(data, "record")
    if type(m) is not dict:
        raise ProtocolError(Reason.MALFORMED, "record must be a map")
    if m.get("fv") != _RECORD_VERSION or type(m.get("fv")) is not int:
        raise ProtocolError(Reason.UNKNOWN_VERSION, "unknown record format version")
    cls = RECORD_TYPES.get(m.get("k")) if type(m.get("k")) is str else None
    if cls is None:
        raise ProtocolError(Reason.MALFORMED, "unknown record kind")
    req_map(m, cls._KEYS | {"k", "fv", "run"}, f"{cls.KIND} record", getattr(cls, "_OPTIONAL", frozenset()))
    return cls._parse(_check_run(m["run"]), m)


def dht_key_id(key: str) -> bytes:
    """The 20-byte id hivemind derives from a DHT key (``DHTID.generate(source=key).to_bytes()``)."""
    return hashlib.sha1(msgpack.packb(key, use_bin_type=True)).digest()


def owner_subkey(public_key: bytes) -> bytes:
    """The serialized subkey (as the validator sees it) for an owner's public key."""
    return msgpack.packb(PUBLIC_KEY_PREFIX + bytes(public_key).hex(), use_bin_type=True)


def shard_for(public_key: bytes, n_shards: int) -> int:
    """Deterministic shard of an owner, for spreading many owners over ``n_shards`` keys."""
    if not 1 <= n_shards <= MAX_SHARDS:
        raise ValueError(f"n_shards must be in [1, {MAX_SHARDS}]")
    return int.from_bytes(hashlib.sha256(bytes(public_key)).digest()[:4], "little") % n_shards


def record_signing_bytes(key_id: bytes, subkey: bytes, value: bytes, expiration_time: float) -> bytes:
    """What the owner signs: every field of hivemind's DHTRecord, length-prefixed, domain-separated."""
    return b"".join(
        (
            RECORD_DOMAIN,
            struct.pack("<H", len(key_id)),
            key_id,
            struct.pack("<H", len(subkey)),
            subkey,
            struct.pack("<I", len(value)),
            value,
            struct.pack("<d", expiration_time),
        )
    )


def _owner_of(subkey: bytes) -> Optional[bytes]:
    """Owner public key named by a serialized subkey, or None if the subkey does not name an owner."""
    if not subkey or len(subkey) > 128:
        return None
    try:
        s = msgpack.unpackb(subkey, raw=False, max_ext_len=0)
    except Exception:
        return None
    if type(s) is not str or not s.startswith(PUBLIC_KEY_PREFIX):
        return None
    pk = parse_public_key(s)  # ProtocolError(MALFORMED) for a botched owner subkey
    if owner_subkey(pk) != subkey:
        raise ProtocolError(Reason.MALFORMED, "owner subkey is not in canonical form")
    return pk


class Ed25519OwnerValidator(RecordValidatorBase):
    """hivemind record validator: only the owner named in the subkey may write that subkey, every value is a
    schema-checked record belonging to this run and to the DHT key it is stored under.

    Semantics follow hivemind's ``RSASignatureValidator``: the signature covers key, subkey, value and expiration
    time, so a record cannot be moved to another key/subkey, altered, or have its lifetime extended; a replayed old
    record loses to the owner's newer one (hivemind keeps the latest expiration per subkey).

    :param run_id: records of other runs are rejected.
    :param identity: this node's identity; records stored under ``identity.public_key_str`` are signed with it.
        Omit on nodes that only validate.
    :param learner: the learner's public key; if given, only it may write :class:`LearnerHeartbeat` records.
        Always set it in production (without it any key could announce a heartbeat under its own subkey).
    :param max_ttl: reject records expiring more than this many seconds in the future (plus clock slack).
    :param allow_unprotected: accept records whose subkey names no owner (unsigned). Off by default: on a gepo-swarm
        DHT every record is ours and signed.
    :param allowed_owners: if given, only these public keys (and ``learner``) may write records at all - closes the
        door on Sybil floods of subkeys in permissioned swarms.
    """

    def __init__(
        self,
        run_id: str,
        identity: Optional[Identity] = None,
        *,
        learner: Optional[bytes] = None,
        max_ttl: float = 3600.0,
        clock_slack: float = 300.0,
        allow_unprotected: bool = False,
        allowed_owners: Optional[Collection[bytes]] = None,
    ):
        _check_run(run_id)
        self.run_id = run_id
        self._identity = identity
        self._own_subkey = owner_subkey(identity.public_key) if identity is not None else None
        self.learner = None if learner is None else bytes(learner)
        self.max_ttl = float(max_ttl)
        self.clock_slack = float(clock_slack)
        self.allow_unprotected = allow_unprotected
        self.allowed_owners = None
        if allowed_owners is not None:
            self.allowed_owners = frozenset(bytes(k) for k in allowed_owners) | (
                {self.learner} if self.learner is not None else set())
        self._key_ids: Dict[str, bytes] = {}
        #: rejections by reason, in the process running the validator (the DHT's child process, for hivemind.DHT)
        self.rejections: Counter = Counter()

    # --- hivemind interface --------------------------------------------------------------------------------------
    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
            return True
        except ProtocolError as e:
            self.rejections[e.reason] += 1
            logger.debug("rejected DHT record: %s", e)
            return False
        except Exception as e:  # never let a bug in here break hivemind's loop
            self.rejections[Reason.MALFORMED] += 1
            logger.debug("rejected DHT record (unexpected %s)", type(e).__name__)
            return False

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._identity is None or record.subkey != self._own_subkey:
            return record.value
        msg = record_signing_bytes(record.key, record.subkey, record.value, record.expiration_time)
        return record.value + self._identity.sign(msg)

    def strip_value(self, record: DHTRecord) -> bytes:
        try:
            protected = _owner_of(record.subkey) is not None
        except ProtocolError:
            protected = True
        return record.value[:-SIGNATURE_BYTES] if protected else record.value

    @property
    def priority(self) -> int:
        return 10  # like RSASignatureValidator: check signatures before anything that deserializes values

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False

    # --- typed check ---------------------------------------------------------------------------------------------
    def check(self, record: DHTRecord, now: Optional[float] = None) -> Optional[Record]:
        """Validate a raw DHT record (value = serialized value + signature). Returns the parsed record (None for an
        accepted unprotected record) or raises ProtocolError with the reason."""
        owner = _owner_of(record.subkey)
        if owner is None:
            if self.allow_unprotected:
                return None
            raise ProtocolError(Reason.MALFORMED, "record subkey names no owner (unsigned record)")
        if self.allowed_owners is not None and owner not in self.allowed_owners:
            raise ProtocolError(Reason.UNTRUSTED_SIGNER, f"{short_key(owner)} is not an allowed record owner")
        value = record.value
        if len(value) > MAX_RECORD_BYTES + 8 + SIGNATURE_BYTES:
            raise ProtocolError(Reason.OVERSIZE, f"DHT value of {len(value)} bytes")
        if len(value) <= SIGNATURE_BYTES:
            raise ProtocolError(Reason.MALFORMED, "DHT value too short to carry a signature")
        body, sig = value[:-SIGNATURE_BYTES], value[-SIGNATURE_BYTES:]
        exp = record.expiration_time
        if type(exp) not in (float, int) or not math.isfinite(exp):
            raise ProtocolError(Reason.BAD_EXPIRATION, "expiration time is not finite")
        if not verify_signature(owner, record_signing_bytes(record.key, record.subkey, body, float(exp)), sig):
            raise ProtocolError(Reason.BAD_SIGNATURE, f"record signature by {short_key(owner)} does not verify")
        now = time.time() if now is None else now
        if exp > now + self.max_ttl + self.clock_slack:
            raise ProtocolError(Reason.BAD_EXPIRATION, f"expires {exp - now:.0f}s from now > max_ttl {self.max_ttl}")
        inner = unpackb(body, "DHT value")
        if type(inner) is not bytes:
            raise ProtocolError(Reason.MALFORMED, "DHT value must be an encoded record (bytes)")
        rec = decode_record(inner)
        if rec.run_id != self.run_id:
            raise ProtocolError(Reason.WRONG_RUN, "record belongs to another run")
        if self._key_id(rec.dht_key) != record.key:
            raise ProtocolError(Reason.KEY_MISMATCH, f"{rec.KIND} record stored under a foreign key")
        if isinstance(rec, LearnerHeartbeat) and self.learner is not None and owner != self.learner:
            raise ProtocolError(Reason.UNTRUSTED_SIGNER, f"heartbeat owned by {short_key(owner)}, not the learner")
        return rec

    def _key_id(self, key: str) -> bytes:
        kid = self._key_ids.get(key)
        if kid is None:
            if len(self._key_ids) >= 4096:
                self._key_ids.clear()
            kid = self._key_ids[key] = dht_key_id(key)
        return kid

    def __getstate__(self):  # hivemind may pickle validators; the counter/cache need not travel
        state = self.__dict__.copy()
        state["_key_ids"] = {}
        state["rejections"] = Counter()
        return state


# ---------------------------------------------------------------------------------------------------------------------
# reader helpers
# ---------------------------------------------------------------------------------------------------------------------
def parse_dht_entry(subkey: Any, value: Any) -> Tuple[bytes, Record]:
    """One ``(subkey, value)`` pair as returned by ``DHT.get`` (signature already checked and stripped by the
    validator) -> (owner public key, record). Raises ProtocolError."""
    if type(subkey) is not str:
        raise ProtocolError(Reason.MALFORMED, "subkey is not an owner key")
    owner = parse_public_key(subkey)
    if not isinstance(value, (bytes, bytearray)):
        raise ProtocolError(Reason.MALFORMED, "value is not an encoded record")
    return owner, decode_record(bytes(value))


def records_from_get(result: Any, record_type: Optional[Type] = None, *, learner: Optional[bytes] = None
                     ) -> Dict[bytes, Record]:
    """Parse the result of ``DHT.get(key, latest=True)`` (a ``ValueWithExpiration`` of ``{subkey:
    ValueWithExpiration}``, or None) into ``{owner public key: record}``. Entries that do not parse, are of another
    type, or (for heartbeats, if ``learner`` is given) are not owned by the learner are skipped."""
    out: Dict[bytes, Record] = {}
    if result is None:
        return out
    entries = getattr(result, "value", result)
    if not isinstance(entries, dict):
        return out
    for subkey, item in entries.items():
        value = getattr(item, "value", item)
        try:
            owner, rec = parse_dht_entry(subkey, value)
        except ProtocolError:
            continue
        if record_type is not None and type(rec) is not record_type:
            continue
        if learner is not None and isinstance(rec, LearnerHeartbeat) and owner != learner:
            continue
        out[owner] = rec
    return out
