"""LoRA adapter versions: a policy version published as low-rank factors over a full base version.

With ``--publish-adapter`` the learner publishes one full version (the **base**, fetched once) and then, for every
later version, a weight manifest with ``encoding: "lora"`` whose tensors are only the adapters: for each target
module ``t`` (a linear layer of the plain model, e.g. ``model.layers.0.self_attn.q_proj``) the factors
``t.lora_A`` (rank x in) and ``t.lora_B`` (out x rank). The signed ``adapter`` map of the manifest body
(:class:`AdapterInfo`) names the base version, the SHA-256 of the base's signed weight manifest (what the heartbeat
would announce for it: it commits to every byte of the base), the scaling and the targets. The version's policy is

    W_t = round(float32(W_base_t) + scaling * float32(B_t) @ float32(A_t))     (round: to W_base_t's dtype)

for every target, every other tensor as in the base (node/adapters.py computes it). Checks here are structural
(:func:`decode_adapter`, :func:`check_adapter_tensors`) or against the base actually held (:func:`check_base`);
each failure is one :class:`ProtocolError` with a one-line message. No torch, no networking.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

from ._wire import HASH_BYTES, req_bin, req_float, req_int, req_list, req_map, req_str
from .errors import ProtocolError, Reason

__all__ = ["ADAPTER_ENCODING", "AdapterInfo", "decode_adapter", "validate_adapter", "check_adapter_tensors",
           "check_base", "adapter_tensor_names", "base_of"]

ADAPTER_ENCODING = "lora"
_KEYS = frozenset({"base", "base_digest", "scaling", "rank", "targets"})
MAX_TARGETS = 1 << 14
MAX_RANK = 1 << 16
MAX_TARGET_NAME = 500  # leaves room for ".lora_A" within a tensor name's 512 bytes
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What an adapter version is relative to (the signed ``adapter`` map of its manifest body)."""

    base_version: int
    base_digest: bytes  # SHA-256 of the base version's signed weight manifest
    scaling: float  # lora_alpha / r (peft's per-layer scaling; the same for every target)
    rank: int
    targets: Tuple[str, ...]  # module names of the plain model; W_t is the tensor "<t>.weight"

    def to_body(self) -> dict:
        return {"base": self.base_version, "base_digest": self.base_digest, "scaling": float(self.scaling),
                "rank": self.rank, "targets": list(self.targets)}

    def describe(self) -> str:
        return (f"LoRA r={self.rank} x{self.scaling:g} on {len(self.targets)} modules over base version "
                f"{self.base_version} ({self.base_digest.hex()[:12]})")


def adapter_tensor_names(target: str) -> Tuple[str, str]:
    return f"{target}.lora_A", f"{target}.lora_B"


def decode_adapter(obj: Any) -> AdapterInfo:
    """The ``adapter`` map of a manifest body; ProtocolError(MALFORMED) for anything off."""
    b = req_map(obj, _KEYS, "adapter")
    targets = tuple(req_str(t, f"adapter.targets[{i}]", MAX_TARGET_NAME, 1)
                    for i, t in enumerate(req_list(b["targets"], "adapter.targets", MAX_TARGETS)))
    info = AdapterInfo(base_version=req_int(b["base"], "adapter.base"),
                       base_digest=req_bin(b["base_digest"], "adapter.base_digest", HASH_BYTES),
                       scaling=req_float(b["scaling"], "adapter.scaling"),
                       rank=req_int(b["rank"], "adapter.rank", 1, MAX_RANK), targets=targets)
    validate_adapter(info)
    return info


def validate_adapter(info: AdapterInfo, exc=None) -> None:
    """Field checks shared by encode (``exc=ValueError``) and decode (ProtocolError)."""
    def fail(msg: str):
        raise (exc(msg) if exc is not None else ProtocolError(Reason.MALFORMED, msg))

    if type(info.base_version) is not int or info.base_version < 0:
        fail("adapter.base must be a version number")
    if type(info.base_digest) is not bytes or len(info.base_digest) != HASH_BYTES:
        fail(f"adapter.base_digest must be {HASH_BYTES} bytes")
    if type(info.scaling) is not float or not math.isfinite(info.scaling) or info.scaling == 0.0:
        fail(f"adapter.scaling must be a finite non-zero float, got {info.scaling!r}")
    if type(info.rank) is not int or not 1 <= info.rank <= MAX_RANK:
        fail(f"adapter.rank must be in [1, {MAX_RANK}], got {info.rank!r}")
    if not info.targets:
        fail("adapter.targets is empty")
    if len(set(info.targets)) != len(info.targets):
        fail("adapter.targets lists a module twice")


def check_adapter_tensors(info: AdapterInfo, version: int, tensors: Sequence[Any], exc=None) -> None:
    """The tensor table of an adapter version (entries with ``name``, ``dtype``, ``shape``) must be exactly
    ``<t>.lora_A`` (rank x in) and ``<t>.lora_B`` (out x rank) of every target, in a float dtype."""
    def fail(msg: str):
        raise (exc(msg) if exc is not None else ProtocolError(Reason.SHAPE_MISMATCH, msg))

    if version <= info.base_version:
        fail(f"adapter version {version} is not after its base version {info.base_version}")
    by_name = {t.name: t for t in tensors}
    expected = {n for t in info.targets for n in adapter_tensor_names(t)}
    if set(by_name) != expected:
        extra = sorted(set(by_name) - expected)[:2]
        missing = sorted(expected - set(by_name))[:2]
        fail(f"adapter version {version}: tensors do not match the targets (missing {missing}, unexpected {extra})")
    for target in info.targets:
        a, b = (by_name[n] for n in adapter_tensor_names(target))
        if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
            fail(f"adapter {target[:64]!r}: dtype {a.dtype}/{b.dtype} is not a float dtype")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != info.rank or b.shape[1] != info.rank:
            fail(f"adapter {target[:64]!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not "
                 f"(rank x in) / (out x rank) with rank {info.rank}")


def check_base(info: AdapterInfo, version: int, adapter_tensors: Sequence[Any], base_version: int,
               base_digest: bytes, base_tensors: Sequence[Any]) -> None:
    """The held base (its version, the SHA-256 of its signed manifest, its tensor table) must be the one the adapter
    version names, with a float ``<t>.weight`` of the shape of ``lora_B @ lora_A`` for every target: else
    HASH_MISMATCH / SHAPE_MISMATCH, and the adapter version is refused."""
    if base_version != info.base_version or base_digest != info.base_digest:
        raise ProtocolError(Reason.HASH_MISMATCH,
                            f"adapter version {version} applies to base version {info.base_version} "
                            f"({info.base_digest.hex()[:12]}), not to the held version {base_version} "
                            f"({base_digest.hex()[:12]}): refused")
    adapter = {t.name: t for t in adapter_tensors}
    base = {t.name: t for t in base_tensors}
    for target in info.targets:
        w = base.get(f"{target}.weight")
        if w is None:
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"adapter version {version}: the base has no tensor "
                                                       f"{target[:64]!r}.weight")
        a, b = (adapter[n] for n in adapter_tensor_names(target))
        if w.dtype not in FLOAT_DTYPES or tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise ProtocolError(Reason.SHAPE_MISMATCH,
                                f"adapter version {version}: {target[:64]!r} lora_B @ lora_A is "
                                f"{[b.shape[0], a.shape[1]]}, the base weight is {w.dtype} {list(w.shape)}")


def base_of(manifest: Any) -> Optional[int]:
    """The base version an (adapter) manifest needs, or None for a full version."""
    info = getattr(manifest, "adapter", None)
    return None if info is None else info.base_version
