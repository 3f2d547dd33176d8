"""Rollout groups: the unit a sampler sends to the learner (one prompt and its G completions).

Wire format v1 (all integers little-endian; see docs/PROTOCOL.md)::

    offset  size  field
    0       3     magic  b"GSR"
    3       1     format version (1)
    4       4     header_len   u32
    8       8     payload_len  u64
    16      32    sampler Ed25519 public key
    48      64    Ed25519 signature over  DOMAIN || bytes[0:48] || header
    112     H     header: msgpack map (signed; carries sha256(payload))
    112+H   P     payload: raw tensors, concatenated in header["tensors"] order, no padding

    DOMAIN = b"gepo-swarm/rollout/v1\\x00"

Payload tensors (v1, exactly these, in this order)::

    prompt_ids       int32   [P]   prompt token ids
    completion_lens  int32   [G]   length of each completion
    completion_ids   int32   [T]   all completions concatenated, T = sum(completion_lens)
    logprobs         float32 [T]   sampler's per-token log-probs of completion_ids

:func:`decode_group` authenticates (signature, payload hash) and checks structure against :class:`Limits`; semantic
checks that need learner state (vocabulary, policy version, replay, prompt reference, allow-list) live in
:class:`protocol.validate.RolloutValidator`.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import List, Optional, Sequence

import numpy as np

from ._wire import HASH_BYTES, U63, as_bytes, digest, packb, req_bin, req_float, req_int, req_list, req_map, req_str
from ._wire import unpackb
from .errors import ProtocolError, Reason
from .identity import Identity, verify_signature

__all__ = [
    "ROLLOUT_MAGIC",
    "ROLLOUT_VERSION",
    "ROLLOUT_DOMAIN",
    "PREFIX_BYTES",
    "Limits",
    "SamplingParams",
    "RolloutGroup",
    "encode_group",
    "decode_group",
    "read_sender",
    "read_claims",
    "wire_size",
    "prompt_hash",
    "raw_tensor_bytes",
]

ROLLOUT_MAGIC = b"GSR"
ROLLOUT_VERSION = 1
ROLLOUT_DOMAIN = b"gepo-swarm/rollout/v1\x00"
_PREFIX = struct.Struct("<3sBIQ32s64s")
PREFIX_BYTES = _PREFIX.size  # 112
_SIGNED_PREFIX = 48  # magic, version, header_len, payload_len, public key
assert PREFIX_BYTES == 112

_TOKEN_DTYPE = np.dtype("<i4")
_LOGPROB_DTYPE = np.dtype("<f4")
#: (name, wire dtype name, numpy dtype) of the v1 payload tensors, in payload order
_TENSORS = (
    ("prompt_ids", "int32", _TOKEN_DTYPE),
    ("completion_lens", "int32", _TOKEN_DTYPE),
    ("completion_ids", "int32", _TOKEN_DTYPE),
    ("logprobs", "float32", _LOGPROB_DTYPE),
)
_HEADER_KEYS = frozenset(
    {
        "run",
        "seq",
        "policy_version",
        "prompt_index",
        "prompt_hash",
        "sampling",
        "started_at",
        "finished_at",
        "reward",
        "tensors",
        "payload_hash",
    }
)
_SAMPLING_KEYS = frozenset({"temperature", "top_p", "top_k", "max_tokens"})
MAX_RUN_ID_BYTES = 128


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upper bounds enforced while decoding, before anything is allocated. Defaults are generous; the learner
    should pass tighter ones from its config (``RolloutValidator`` derives them from its own settings)."""

    max_message_bytes: int = 64 << 20
    max_header_bytes: int = 16 << 10
    max_group_size: int = 1024
    max_prompt_tokens: int = 1 << 16
    max_completion_tokens: int = 1 << 16  # per completion

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive int")


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters the completions were generated with. ``top_k`` <= 0 means disabled (-1 or 0)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 512

    def _to_wire(self) -> dict:
        return {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "max_tokens": int(self.max_tokens),
        }

    @classmethod
    def _from_wire(cls, obj) -> "SamplingParams":
        m = req_map(obj, _SAMPLING_KEYS, "sampling")
        return cls(
            temperature=req_float(m["temperature"], "sampling.temperature", 0.0, 1e6),
            top_p=req_float(m["top_p"], "sampling.top_p", 0.0, 1.0),
            top_k=req_int(m["top_k"], "sampling.top_k", -1, 1 << 31),
            max_tokens=req_int(m["max_tokens"], "sampling.max_tokens", 1, 1 << 31),
        )


def prompt_hash(prompt_ids) -> bytes:
    """SHA-256 of the prompt token ids as little-endian int32 - the prompt reference hash."""
    arr = np.ascontiguousarray(prompt_ids, dtype=_TOKEN_DTYPE)
    return digest(arr.data)


@dataclasses.dataclass(eq=False)
class RolloutGroup:
    """One prompt and its G completions, as sent by a sampler.

    Ragged completions are stored concatenated: completion ``i`` is
    ``completion_ids[offsets[i]:offsets[i+1]]`` with ``offsets = [0, *cumsum(completion_lens)]``; use
    :meth:`completions` / :meth:`completion_logprobs` for per-completion views. Arrays decoded from the wire are
    fresh, writable, aligned numpy arrays (int32 / float32).

    ``reward`` is the sampler's own per-completion reward: informational only, the learner never trusts it.
    ``sampler`` is the sender's 32-byte public key: set by :func:`decode_group` from the authenticated message;
    :func:`encode_group` fills it from the signing identity.
    """

    run_id: str
    seq: int
    policy_version: int
    prompt_index: int
    prompt_ids: np.ndarray  # int32 [P]
    completion_ids: np.ndarray  # int32 [T]
    completion_lens: np.ndarray  # int32 [G]
    logprobs: np.ndarray  # float32 [T]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    started_at: float = 0.0
    finished_at: float = 0.0
    reward: Optional[List[float]] = None
    sampler: bytes = b""

    # --- convenience ---------------------------------------------------------------------------------------------
    @classmethod
    def from_completions(
        cls,
        *,
        run_id: str,
        seq: int,
        policy_version: int,
        prompt_index: int,
        prompt_ids: Sequence[int],
        completions: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float]],
        sampling: SamplingParams = SamplingParams(),
        started_at: float = 0.0,
        finished_at: float = 0.0,
        reward: Optional[Sequence[float]] = None,
    ) -> "RolloutGroup":
        """Build from per-completion lists (or arrays) of token ids and log-probs."""
        if len(completions) != len(logprobs):
            raise ValueError("completions and logprobs must have the same number of items")
        lens = np.array([len(c) for c in completions], dtype=_TOKEN_DTYPE)
        for c, lp in zip(completions, logprobs):
            if len(c) != len(lp):
                raise ValueError("each completion needs exactly one log-prob per token")
        ids = (
            np.concatenate([_as_int32(c) for c in completions]) if completions else np.zeros(0, _TOKEN_DTYPE)
        )
        lps = (
            np.concatenate([np.asarray(lp, dtype=_LOGPROB_DTYPE).reshape(-1) for lp in logprobs])
            if logprobs
            else np.zeros(0, _LOGPROB_DTYPE)
        )
        return cls(
            run_id=run_id,
            seq=seq,
            policy_version=policy_version,
            prompt_index=prompt_index,
            prompt_ids=_as_int32(prompt_ids),
            completion_ids=ids.astype(_TOKEN_DTYPE, copy=False),
            completion_lens=lens,
            logprobs=lps,
            sampling=sampling,
            started_at=float(started_at),
            finished_at=float(finished_at),
            reward=None if reward is None else [float(r) for r in reward],
        )

    @property
    def group_size(self) -> int:
        return int(len(self.completion_lens))

    @property
    def prompt_hash(self) -> bytes:
        return prompt_hash(self.prompt_ids)

    @property
    def offsets(self) -> np.ndarray:
        """int64 [G+1] start offsets of each completion in ``completion_ids`` (last = total tokens)."""
        out = np.zeros(len(self.completion_lens) + 1, dtype=np.int64)
        np.cumsum(self.completion_lens, out=out[1:])
        return out

    def completions(self) -> List[np.ndarray]:
        o = self.offsets
        return [self.completion_ids[o[i]:o[i + 1]] for i in range(len(o) - 1)]

    def completion_logprobs(self) -> List[np.ndarray]:
        o = self.offsets
        return [self.logprobs[o[i]:o[i + 1]] for i in range(len(o) - 1)]

    def raw_tensor_bytes(self) -> int:
        return raw_tensor_bytes(self)

    def __eq__(self, other: object) -> bool:
        """Exact content equality (bitwise for arrays, so NaN payloads compare too)."""
        if not isinstance(other, RolloutGroup):
            return NotImplemented
        return (
            self.run_id == other.run_id
            and self.seq == other.seq
            and self.policy_version == other.policy_version
            and self.prompt_index == other.prompt_index
            and self.sampling == other.sampling
            and _same_float(self.started_at, other.started_at)
            and _same_float(self.finished_at, other.finished_at)
            and _same_reward(self.reward, other.reward)
            and self.sampler == other.sampler
            and _same_array(self.prompt_ids, other.prompt_ids, _TOKEN_DTYPE)
            and _same_array(self.completion_ids, other.completion_ids, _TOKEN_DTYPE)
            and _same_array(self.completion_lens, other.completion_lens, _TOKEN_DTYPE)
            and _same_array(self.logprobs, other.logprobs, _LOGPROB_DTYPE)
        )

    __hash__ = None  # mutable


def _same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b)


def _same_reward(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(_same_float(x, y) for x, y in zip(a, b))


def _same_array(a, b, dt) -> bool:
    a = np.asarray(a)
    b = np.asarray(b)
    return a.dtype == dt and b.dtype == dt and a.shape == b.shape and a.tobytes() == b.tobytes()


def _as_int32(x) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, _TOKEN_DTYPE)
    if a.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {a.dtype}")
    a = a.reshape(-1)
    if a.dtype != _TOKEN_DTYPE:
        if a.min() < -(1 << 31) or a.max() >= (1 << 31):
            raise ValueError("token id does not fit in int32")
        a = a.astype(_TOKEN_DTYPE)
    return np.ascontiguousarray(a)


def raw_tensor_bytes(group: RolloutGroup) -> int:
    """Bytes of the raw tensors (prompt ids + completion ids + log-probs), the baseline for wire overhead."""
    return 4 * (len(group.prompt_ids) + len(group.completion_ids) + len(group.logprobs))


# ---------------------------------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------------------------------
def _check_for_encode(g: RolloutGroup) -> tuple:
    """Validate the caller's own group (ValueError on bugs) and return the four arrays in payload order."""
    if not isinstance(g.run_id, str) or not 0 < len(g.run_id.encode()) <= MAX_RUN_ID_BYTES:
        raise ValueError(f"run_id must be a non-empty str of at most {MAX_RUN_ID_BYTES} UTF-8 bytes")
    for name in ("seq", "policy_version", "prompt_index"):
        v = getattr(g, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= U63:
            raise ValueError(f"{name} must be an int in [0, 2**63)")
    arrays = []
    for (name, _, dt), src in zip(
        _TENSORS, (g.prompt_ids, g.completion_lens, g.completion_ids, g.logprobs)
    ):
        a = np.asarray(src)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D")
        if a.dtype != dt:
            if dt.kind == "i" and a.dtype.kind in "iu" or dt.kind == "f" and a.dtype.kind == "f" or a.size == 0:
                a = _as_int32(a) if dt.kind == "i" else a.astype(dt)
            else:
                raise ValueError(f"{name} must have dtype {dt}, got {a.dtype}")
        arrays.append(np.ascontiguousarray(a))
    p, lens, ids, lps = arrays
    if len(p) == 0:
        raise ValueError("prompt_ids must not be empty")
    if len(lens) == 0:
        raise ValueError("a group needs at least one completion")
    if (lens < 0).any() or int(lens.sum(dtype=np.int64)) != len(ids):
        raise ValueError("completion_lens must be >= 0 and sum to len(completion_ids)")
    if len(lps) != len(ids):
        raise ValueError("logprobs must have one entry per completion token")
    if int(lens.max()) > int(g.sampling.max_tokens):
        raise ValueError("a completion is longer than sampling.max_tokens")
    if g.reward is not None and len(g.reward) != len(lens):
        raise ValueError("reward must have one entry per completion")
    return p, lens, ids, lps


def encode_group(group: RolloutGroup, identity: Identity) -> bytes:
    """Serialize and sign ``group`` with the sampler's ``identity``. Raises ValueError for an invalid group."""
    if group.sampler and group.sampler != identity.public_key:
        raise ValueError("group.sampler is set to a different key than the signing identity")
    arrays = _check_for_encode(group)
    payload = b"".join(a.data for a in arrays)
    header = packb(
        {
            "run": group.run_id,
            "seq": int(group.seq),
            "policy_version": int(group.policy_version),
            "prompt_index": int(group.prompt_index),
            "prompt_hash": digest(arrays[0].data),
            "sampling": group.sampling._to_wire(),
            "started_at": float(group.started_at),
            "finished_at": float(group.finished_at),
            "reward": None if group.reward is None else [float(r) for r in group.reward],
            "tensors": [[name, wname, [len(a)]] for (name, wname, _), a in zip(_TENSORS, arrays)],
            "payload_hash": digest(payload),
        }
    )
    signed_prefix = struct.pack("<3sBIQ32s", ROLLOUT_MAGIC, ROLLOUT_VERSION, len(header), len(payload),
                                identity.public_key)
    signature = identity.sign(ROLLOUT_DOMAIN + signed_prefix + header)
    return b"".join((signed_prefix, signature, header, payload))


# ---------------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------------
def _check_magic(mv) -> None:
    if len(mv) < 4 or bytes(mv[:3]) != ROLLOUT_MAGIC:
        raise ProtocolError(Reason.MALFORMED, "not a rollout group (bad magic)")
    if mv[3] != ROLLOUT_VERSION:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"rollout format version {mv[3]} (supported: {ROLLOUT_VERSION})")


def wire_size(prefix, limits: Limits = DEFAULT_LIMITS) -> int:
    """Total message size announced by the first 16 bytes, checked against ``limits`` (for stream readers: read
    16 bytes, call this, then read exactly ``wire_size - 16`` more). Unauthenticated until :func:`decode_group`."""
    mv = as_bytes(prefix, "rollout prefix")
    if len(mv) < 16:
        raise ProtocolError(Reason.MALFORMED, "need at least 16 bytes to read the rollout size")
    _check_magic(mv)
    header_len, payload_len = struct.unpack_from("<IQ", mv, 4)
    _check_sizes(header_len, payload_len, limits)
    return PREFIX_BYTES + header_len + payload_len


def _check_sizes(header_len: int, payload_len: int, limits: Limits) -> None:
    if header_len > limits.max_header_bytes:
        raise ProtocolError(Reason.OVERSIZE, f"header_len {header_len} > limit {limits.max_header_bytes}")
    if PREFIX_BYTES + header_len + payload_len > limits.max_message_bytes:
        raise ProtocolError(
            Reason.OVERSIZE, f"message size {PREFIX_BYTES + header_len + payload_len} > limit {limits.max_message_bytes}"
        )


def read_sender(data) -> bytes:
    """The sampler public key claimed by a message, WITHOUT verifying anything (for cheap allow-list checks before
    paying for signature verification)."""
    mv = as_bytes(data, "rollout group")
    _check_magic(mv)
    if len(mv) < _SIGNED_PREFIX:
        raise ProtocolError(Reason.MALFORMED, "truncated rollout prefix")
    return bytes(mv[16:48])


def read_claims(data, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, int, int]:
    """(sampler key, sequence number, policy version) a message claims, WITHOUT verifying anything (for the audit
    records of groups that were rejected or answered "duplicate"). Raises ProtocolError when they cannot be read."""
    mv = as_bytes(data, "rollout group")
    _check_magic(mv)
    if len(mv) < PREFIX_BYTES:
        raise ProtocolError(Reason.MALFORMED, "truncated rollout prefix")
    header_len, payload_len = struct.unpack_from("<IQ", mv, 4)
    _check_sizes(header_len, payload_len, limits)
    if len(mv) < PREFIX_BYTES + header_len:
        raise ProtocolError(Reason.MALFORMED, "truncated rollout header")
    h = req_map(unpackb(mv[PREFIX_BYTES:PREFIX_BYTES + header_len], "rollout header"), _HEADER_KEYS, "rollout header")
    return bytes(mv[16:48]), req_int(h["seq"], "seq"), req_int(h["policy_version"], "policy_version")


def decode_group(data, limits: Limits = DEFAULT_LIMITS) -> RolloutGroup:
    """Authenticate and decode a rollout group. Raises :class:`ProtocolError` (and nothing else) on any problem.

    Checks, in order: magic/version, declared sizes vs ``limits`` and vs the bytes present (exact length), Ed25519
    signature, header schema, tensor table (names, dtypes, shapes vs ``limits``), payload SHA-256, completion
    lengths, prompt hash, reward/sampling consistency. Nothing is allocated from a length field before it has been
    checked against the bytes actually present.
    """
    mv = as_bytes(data, "rollout group")
    n = len(mv)
    if n > limits.max_message_bytes:
        raise ProtocolError(Reason.OVERSIZE, f"message is {n} bytes > limit {limits.max_message_bytes}")
    _check_magic(mv)
    if n < PREFIX_BYTES:
        raise ProtocolError(Reason.MALFORMED, f"truncated: {n} bytes < {PREFIX_BYTES}-byte prefix")
    _, _, header_len, payload_len, sampler, signature = _PREFIX.unpack_from(mv, 0)
    _check_sizes(header_len, payload_len, limits)
    if PREFIX_BYTES + header_len + payload_len != n:
        raise ProtocolError(
            Reason.MALFORMED, f"length mismatch: prefix announces {PREFIX_BYTES + header_len + payload_len}, got {n}"
        )
    h0 = PREFIX_BYTES
    p0 = h0 + header_len
    header_bytes = mv[h0:p0]
    if not verify_signature(sampler, b"".join((ROLLOUT_DOMAIN, mv[:_SIGNED_PREFIX], header_bytes)), signature):
        raise ProtocolError(Reason.BAD_SIGNATURE, "rollout group signature does not verify")

    # ---- authenticated from here on: errors below are a (buggy or malicious) signer's fault -----------------------
    h = req_map(unpackb(header_bytes, "rollout header"), _HEADER_KEYS, "rollout header")
    run_id = req_str(h["run"], "run", MAX_RUN_ID_BYTES, 1)
    seq = req_int(h["seq"], "seq")
    policy_version = req_int(h["policy_version"], "policy_version")
    prompt_index = req_int(h["prompt_index"], "prompt_index")
    p_hash = req_bin(h["prompt_hash"], "prompt_hash", HASH_BYTES)
    payload_hash = req_bin(h["payload_hash"], "payload_hash", HASH_BYTES)
    sampling = SamplingParams._from_wire(h["sampling"])
    started_at = req_float(h["started_at"], "started_at")
    finished_at = req_float(h["finished_at"], "finished_at")

    # tensor table: exactly the v1 tensors, in order, 1-D
    table = req_list(h["tensors"], "tensors", len(_TENSORS), len(_TENSORS))
    counts = []
    for i, ((name, wname, _), entry) in enumerate(zip(_TENSORS, table)):
        e = req_list(entry, f"tensors[{i}]", 3, 3)
        if e[0] != name:
            raise ProtocolError(Reason.MALFORMED, f"tensors[{i}] must be {name!r}")
        if e[1] != wname:
            raise ProtocolError(Reason.DTYPE_MISMATCH, f"{name} must be {wname}, got {str(e[1])[:16]!r}")
        shape = req_list(e[2], f"{name}.shape", 8)
        if len(shape) != 1:
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"{name} must be 1-D")
        counts.append(req_int(shape[0], f"{name}.shape[0]", 0, U63))
    n_prompt, n_group, n_tok, n_lp = counts
    if n_prompt == 0:
        raise ProtocolError(Reason.SHAPE_MISMATCH, "empty prompt")
    if n_prompt > limits.max_prompt_tokens:
        raise ProtocolError(Reason.OVERSIZE, f"prompt has {n_prompt} tokens > limit {limits.max_prompt_tokens}")
    if n_group == 0:
        raise ProtocolError(Reason.SHAPE_MISMATCH, "group has no completions")
    if n_group > limits.max_group_size:
        raise ProtocolError(Reason.OVERSIZE, f"group size {n_group} > limit {limits.max_group_size}")
    if n_tok > n_group * min(limits.max_completion_tokens, sampling.max_tokens):
        raise ProtocolError(Reason.OVERSIZE, f"{n_tok} completion tokens exceed group size x max tokens")
    if n_lp != n_tok:
        raise ProtocolError(Reason.SHAPE_MISMATCH, f"{n_lp} log-probs for {n_tok} completion tokens")
    if 4 * (n_prompt + n_group + n_tok + n_lp) != payload_len:
        raise ProtocolError(Reason.SHAPE_MISMATCH, "tensor table does not add up to payload_len")

    payload = mv[p0:]
    if digest(payload) != payload_hash:
        raise ProtocolError(Reason.HASH_MISMATCH, "payload sha256 does not match the signed header")

    # One copy of the payload into an aligned buffer, then zero-copy views into it.
    buf = np.frombuffer(payload, dtype=np.uint8).copy()
    o1 = 4 * n_prompt
    o2 = o1 + 4 * n_group
    o3 = o2 + 4 * n_tok
    prompt_ids = buf[:o1].view(_TOKEN_DTYPE)
    lens = buf[o1:o2].view(_TOKEN_DTYPE)
    ids = buf[o2:o3].view(_TOKEN_DTYPE)
    lps = buf[o3:].view(_LOGPROB_DTYPE)

    max_len = min(limits.max_completion_tokens, sampling.max_tokens)
    if int(lens.min()) < 0 or int(lens.max()) > max_len:
        raise ProtocolError(Reason.SHAPE_MISMATCH, f"completion length outside [0, {max_len}]")
    if int(lens.sum(dtype=np.int64)) != n_tok:
        raise ProtocolError(Reason.SHAPE_MISMATCH, "completion lengths do not sum to the completion token count")
    if digest(buf[:o1].data) != p_hash:
        raise ProtocolError(Reason.PROMPT_MISMATCH, "prompt token ids do not match prompt_hash")

    reward = h["reward"]
    if reward is not None:
        reward = req_list(reward, "reward", n_group, n_group)
        for r in reward:
            if type(r) is not float or not math.isfinite(r):
                raise ProtocolError(Reason.MALFORMED, "reward entries must be finite floats")

    return RolloutGroup(
        run_id=run_id,
        seq=seq,
        policy_version=policy_version,
        prompt_index=prompt_index,
        prompt_ids=prompt_ids,
        completion_ids=ids,
        completion_lens=lens,
        logprobs=lps,
        sampling=sampling,
        started_at=started_at,
        finished_at=finished_at,
        reward=reward,
        sampler=bytes(sampler),
    )
