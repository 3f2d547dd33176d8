"""Internal helpers shared by the wire formats: bounded msgpack, strict schema checks, hashing.

Everything here raises :class:`~protocol.errors.ProtocolError` on bad input and nothing else.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, FrozenSet, Optional

import msgpack

from .errors import ProtocolError, Reason

HASH_BYTES = 32
HASH_NAME = "sha256"
U63 = (1 << 63) - 1


def digest(data) -> bytes:
    """SHA-256 of a bytes-like object (the one content hash used everywhere in the protocol)."""
    return hashlib.sha256(data).digest()


def _no_ext(code, data):
    raise ValueError("msgpack ext types are not allowed")


def packb(obj: Any) -> bytes:
    """Deterministic msgpack for our own schemas (str keys, bin for bytes, float64 floats)."""
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)


def unpackb(buf, what: str, max_len: Optional[int] = None) -> Any:
    """Strict, bounded msgpack decode. Container and string sizes are bounded by ``max_len`` (default: the buffer
    length), so a length field claiming gigabytes cannot allocate more than a small multiple of the input."""
    n = len(buf)
    limit = n if max_len is None else min(n, max_len)
    try:
        return msgpack.unpackb(
            buf,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except Exception as e:  # ExtraData, OutOfData, FormatError, StackError, UnicodeDecodeError, ValueError, ...
        raise ProtocolError(Reason.MALFORMED, f"{what}: invalid msgpack ({type(e).__name__})") from None


def req_map(obj: Any, keys: FrozenSet[str], what: str, optional: FrozenSet[str] = frozenset()) -> Dict[str, Any]:
    """``obj`` must be a map whose key set is ``keys`` plus any subset of ``optional`` - nothing missing, nothing extra."""
    if type(obj) is not dict:
        raise ProtocolError(Reason.MALFORMED, f"{what}: expected a map")
    ks = obj.keys()
    if not (keys <= ks) or not (ks <= (keys | optional)):
        missing = sorted(keys - ks)
        extra = sorted(str(k)[:32] for k in ks - keys - optional)[:4]
        raise ProtocolError(Reason.MALFORMED, f"{what}: missing fields {missing} / unexpected fields {extra}")
    return obj


def req_int(v: Any, what: str, lo: int = 0, hi: int = U63) -> int:
    if type(v) is not int:  # excludes bool
        raise ProtocolError(Reason.MALFORMED, f"{what}: expected an integer")
    if not lo <= v <= hi:
        raise ProtocolError(Reason.MALFORMED, f"{what}: {v} outside [{lo}, {hi}]")
    return v


def req_float(v: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if type(v) is not float:
        raise ProtocolError(Reason.MALFORMED, f"{what}: expected a float")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ProtocolError(Reason.MALFORMED, f"{what}: {v!r} not finite or outside [{lo}, {hi}]")
    return v


def req_str(v: Any, what: str, max_bytes: int, min_bytes: int = 0) -> str:
    if type(v) is not str:
        raise ProtocolError(Reason.MALFORMED, f"{what}: expected a string")
    n = len(v.encode("utf-8"))
    if not min_bytes <= n <= max_bytes:
        raise ProtocolError(Reason.MALFORMED, f"{what}: length {n} outside [{min_bytes}, {max_bytes}]")
    return v


def req_bin(v: Any, what: str, size: Optional[int] = None, max_size: Optional[int] = None) -> bytes:
    if type(v) is not bytes:
        raise ProtocolError(Reason.MALFORMED, f"{what}: expected bytes")
    if size is not None and len(v) != size:
        raise ProtocolError(Reason.MALFORMED, f"{what}: expected {size} bytes, got {len(v)}")
    if max_size is not None and len(v) > max_size:
        raise ProtocolError(Reason.OVERSIZE, f"{what}: {len(v)} bytes > limit {max_size}")
    return v


def req_list(v: Any, what: str, max_len: int, length: Optional[int] = None) -> list:
    if type(v) is not list:
        raise ProtocolError(Reason.MALFORMED, f"{what}: expected an array")
    if length is not None and len(v) != length:
        raise ProtocolError(Reason.SHAPE_MISMATCH, f"{what}: expected {length} items, got {len(v)}")
    if len(v) > max_len:
        raise ProtocolError(Reason.OVERSIZE, f"{what}: {len(v)} items > limit {max_len}")
    return v


def as_bytes(data: Any, what: str):
    """Accept bytes / bytearray / memoryview (C-contiguous); return a 1-D unsigned-byte memoryview."""
    if isinstance(data, bytes):
        return memoryview(data)
    if isinstance(data, (bytearray, memoryview)):
        mv = memoryview(data)
        if not mv.c_contiguous:
            raise ProtocolError(Reason.MALFORMED, f"{what}: buffer is not contiguous")
        return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv
    raise ProtocolError(Reason.MALFORMED, f"{what}: expected bytes, got {type(data).__name__}")
