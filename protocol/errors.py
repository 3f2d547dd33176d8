"""Typed protocol errors.

Every rejection by the protocol layer is a :class:`ProtocolError` whose ``reason`` is one :class:`Reason` code, so
callers can count rejections by reason (``collections.Counter(e.reason for e in ...)``) and decide what to do
(e.g. ban a sampler after repeated ``BAD_SIGNATURE``, but not after ``STALE``).

Decoders raise nothing else on hostile input: no ``ValueError``/``KeyError``/``struct.error``/``msgpack`` errors
escape them. Encoders, on the other hand, raise ``ValueError``/``TypeError`` for programming errors in the caller's
own data (e.g. mismatched array lengths) - those are bugs, not attacks.
"""

from __future__ import annotations

import enum

__all__ = ["Reason", "ProtocolError"]


class Reason(str, enum.Enum):
    """Why a message or record was rejected. The string values are stable (use them as metric labels)."""

    #: Ed25519 signature does not verify (or the public key is not a valid point).
    BAD_SIGNATURE = "bad_signature"
    #: A content hash (payload, chunk, file, manifest digest) does not match the bytes.
    HASH_MISMATCH = "hash_mismatch"
    #: Unknown magic / wire-format version / encoding.
    UNKNOWN_VERSION = "unknown_version"
    #: A size exceeds a configured limit or the bytes actually present (truncation, extension, huge length claims).
    OVERSIZE = "oversize"
    #: Structurally invalid: bad msgpack, missing/extra/mistyped field, out-of-range value.
    MALFORMED = "malformed"
    #: Tensor shapes / counts are inconsistent (e.g. log-probs count differs from completion token count).
    SHAPE_MISMATCH = "shape_mismatch"
    #: A tensor has a dtype other than the one the format requires.
    DTYPE_MISMATCH = "dtype_mismatch"
    #: A token id is negative or >= the vocabulary size.
    TOKEN_OUT_OF_VOCAB = "token_out_of_vocab"
    #: A log-prob is NaN, infinite, or positive (beyond the configured tolerance).
    BAD_LOGPROBS = "bad_logprobs"
    #: The (sampler, sequence number) pair was already accepted, or is older than the replay window.
    REPLAY = "replay"
    #: The policy version is newer than the learner's current version.
    FUTURE_VERSION = "future_version"
    #: The policy version is older than the accepted staleness window.
    STALE = "stale"
    #: The prompt token ids do not match their hash, or the (index, hash) reference does not match the dataset.
    PROMPT_MISMATCH = "prompt_mismatch"
    #: The message belongs to another run id.
    WRONG_RUN = "wrong_run"
    #: The signer is not on the allow-list (or a learner-only record is signed by someone else).
    UNTRUSTED_SIGNER = "untrusted_signer"
    #: A DHT record is stored under a key it does not belong to.
    KEY_MISMATCH = "key_mismatch"
    #: A DHT record's expiration time is too far in the future.
    BAD_EXPIRATION = "bad_expiration"
    #: The sampler failed a check of its log-probs or completions earlier and is banned by this learner.
    BANNED = "banned"


class ProtocolError(Exception):
    """A message or record was rejected. ``reason`` is a :class:`Reason`; ``detail`` is a human-readable hint.

    ``detail`` may quote sizes and field names but never echoes large attacker-controlled content.
    """

    __slots__ = ("reason", "detail")

    def __init__(self, reason: Reason, detail: str = ""):
        if not isinstance(reason, Reason):
            raise TypeError(f"reason must be a Reason, got {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(reason, detail)

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value

    def __repr__(self) -> str:
        return f"ProtocolError({self.reason.name}, {self.detail!r})"

    def __reduce__(self):  # picklable (e.g. across the DHT's forked process or a multiprocessing pool)
        return (ProtocolError, (self.reason, self.detail))
