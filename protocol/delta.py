"""Weight deltas: a policy version as the lossless difference from an earlier one, chunked, hashed and signed.

With fp32 master weights and a bf16 published copy, most bf16 elements are bit-identical between consecutive RL
versions. A delta XORs the target version's weight buffer (the flat buffer of its :class:`WeightManifest`) with the
base version's, splits each tensor's XOR into byte planes (all first bytes of the elements, then all second bytes,
...: the planes that hold sign and exponent are almost all zero), cuts that stream into fixed-size chunks and
compresses every chunk on its own with zstd. The signed :class:`DeltaManifest` lists each compressed chunk's size
and SHA-256 and the SHA-256 of the base and of the reconstructed target buffer; :func:`apply_delta` checks all of
them, so what it returns is the target version bit for bit or it raises :class:`ProtocolError`.

The base may be any earlier version: the delta from the previous version (``encode_delta(v-1, v)``) and a
cumulative delta from a keyframe (``encode_delta(k, v)``) are the same thing with another base. A sampler at u
reaches v either by a chain of deltas or by one cumulative delta; which is cheaper is read off the manifests'
``compressed_size``.

Wire format v1: the envelope of protocol/manifest.py (:func:`protocol.manifest.sign_envelope`) with magic
``b"GSD"`` and domain ``b"gepo-swarm/delta/v1\\x00"``, body a msgpack map (docs/PROTOCOL.md, "Weight deltas").
Codecs (``codec`` field): ``"xor-planes-zstd"`` (the default: the smallest per CPU second in
scripts/bench/bench_deltas.py) and ``"xor-zstd"`` (XOR without plane splitting).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ._wire import HASH_BYTES, U63, as_bytes, digest, packb, req_bin, req_float, req_int, req_list, req_map, req_str
from ._wire import unpackb
from .errors import ProtocolError, Reason
from .identity import Identity
from .manifest import DTYPE_SIZES, MAX_NAME_BYTES, MAX_NDIM, TensorEntry, WeightManifest, open_envelope, sign_envelope

__all__ = [
    "DELTA_MAGIC",
    "DELTA_DOMAIN",
    "CODECS",
    "DEFAULT_CODEC",
    "DeltaLimits",
    "DeltaManifest",
    "encode_delta",
    "apply_delta",
    "verify_delta_chunk",
    "encode_delta_manifest",
    "decode_delta_manifest",
]

DELTA_MAGIC = b"GSD"
DELTA_DOMAIN = b"gepo-swarm/delta/v1\x00"
CODECS = ("xor-planes-zstd", "xor-zstd")
DEFAULT_CODEC = "xor-planes-zstd"
DEFAULT_LEVEL = 1
DEFAULT_CHUNK_SIZE = 4 << 20
_BODY_KEYS = frozenset({"run", "base_version", "version", "created_at", "codec", "base_digest", "target_digest",
                        "tensors", "total_size", "chunk_size", "chunk_sizes", "chunk_hashes"})


@dataclasses.dataclass(frozen=True)
class DeltaLimits:
    max_manifest_bytes: int = 16 << 20
    max_total_bytes: int = 1 << 40
    max_tensors: int = 1 << 16
    max_chunks: int = 1 << 20
    min_chunk_size: int = 4 << 10
    max_chunk_size: int = 256 << 20


DEFAULT_DELTA_LIMITS = DeltaLimits()


def _zstd():
    import zstandard  # noqa: PLC0415  (a core dependency; imported here so protocol/ imports without it)

    return zstandard


def _max_compressed(raw_size: int) -> int:
    """zstd's worst case for ``raw_size`` input bytes (ZSTD_COMPRESSBOUND) plus the frame header."""
    return raw_size + (raw_size >> 8) + 128


@dataclasses.dataclass(frozen=True)
class DeltaManifest:
    """Version ``version`` as a delta against ``base_version`` (the previous version, or a keyframe).

    ``tensors``/``total_size`` are the layout of both versions' weight buffers (a delta needs the same layout;
    a changed layout is published as a full version). Chunk ``i`` is the zstd frame of bytes
    ``[i*chunk_size, (i+1)*chunk_size)`` of the transformed XOR stream; ``chunk_sizes[i]`` is its compressed
    length and ``chunk_hashes`` its SHA-256. ``base_digest``/``target_digest``: SHA-256 of the full base and
    target buffers.
    """

    run_id: str
    base_version: int
    version: int
    created_at: float
    codec: str
    base_digest: bytes
    target_digest: bytes
    tensors: Tuple[TensorEntry, ...]
    total_size: int
    chunk_size: int
    chunk_sizes: Tuple[int, ...]
    chunk_hashes: bytes
    learner: bytes = b""

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_sizes)

    @property
    def span(self) -> int:
        """Versions this delta crosses: 1 for a delta from the previous version, more for a cumulative one."""
        return self.version - self.base_version

    @property
    def compressed_size(self) -> int:
        """Bytes a peer downloads for this delta (chunks only; the manifest itself is extra)."""
        return sum(self.chunk_sizes)

    def raw_range(self, index: int) -> Tuple[int, int]:
        """``(start, end)`` of chunk ``index`` in the (uncompressed) stream."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} outside [0, {self.n_chunks})")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.total_size)

    def chunk_hash(self, index: int) -> bytes:
        self.raw_range(index)
        return self.chunk_hashes[index * HASH_BYTES:(index + 1) * HASH_BYTES]

    def to_body(self) -> dict:
        return {
            "run": self.run_id,
            "base_version": self.base_version,
            "version": self.version,
            "created_at": float(self.created_at),
            "codec": self.codec,
            "base_digest": self.base_digest,
            "target_digest": self.target_digest,
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset] for t in self.tensors],
            "total_size": self.total_size,
            "chunk_size": self.chunk_size,
            "chunk_sizes": list(self.chunk_sizes),
            "chunk_hashes": self.chunk_hashes,
        }


# ---------------------------------------------------------------------------------------------------------------------
# the transform: XOR, then byte planes per tensor (its own inverse up to the plane order)
# ---------------------------------------------------------------------------------------------------------------------
def _planes(tensors: Sequence[TensorEntry], stream: np.ndarray, *, inverse: bool,
            out: Optional[np.ndarray] = None) -> np.ndarray:
    """Byte-plane split (or its inverse) of every multi-byte tensor's bytes in ``stream``, into ``out`` (a new array
    if None; never ``stream`` itself); other bytes (alignment padding, files, 1-byte dtypes) are copied as they are.

    One strided slice assignment per plane: numpy's ``reshape(n, size).T.reshape(-1)`` does the same transpose
    byte by byte, 2x slower forward and ~25x slower for the inverse (4.7 s for SmolLM2's 269 MB, the bulk of
    apply_delta's time)."""
    out = np.empty_like(stream) if out is None else out
    split = sorted((t for t in tensors if DTYPE_SIZES[t.dtype] > 1 and t.numel), key=lambda t: t.offset)
    done = 0  # bytes outside the split tensors are copied as they are
    for t in split:
        out[done:t.offset] = stream[done:t.offset]
        done = t.offset + t.nbytes
    out[done:] = stream[done:]
    for t in split:
        size = DTYPE_SIZES[t.dtype]
        region = stream[t.offset:t.offset + t.nbytes]
        elements = out[t.offset:t.offset + t.nbytes].reshape(t.numel, size)  # interleaved: one row per element
        source = region.reshape(t.numel, size)
        for k in range(size):
            plane = slice(k * t.numel, (k + 1) * t.numel)
            if inverse:
                elements[:, k] = region[plane]
            else:
                out[t.offset + plane.start:t.offset + plane.stop] = source[:, k]
    return out


def _xor(a: memoryview, b: memoryview, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``a ^ b`` as uint8, 8 bytes at a time (uint8 XOR is ~4x slower), into ``out`` if given (it may be ``a``'s or
    ``b``'s own array: the operation is element-wise)."""
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    out = np.empty(len(x), dtype=np.uint8) if out is None else out
    words = len(x) // 8 * 8
    if words:
        np.bitwise_xor(x[:words].view(np.uint64), y[:words].view(np.uint64), out=out[:words].view(np.uint64))
    np.bitwise_xor(x[words:], y[words:], out=out[words:])
    return out


def _same_layout(base: WeightManifest, target: WeightManifest) -> None:
    if base.total_size != target.total_size or base.tensors != target.tensors or (
        [(f.name, f.offset, f.size) for f in base.files] != [(f.name, f.offset, f.size) for f in target.files]
    ):
        raise ValueError(f"versions {base.version} and {target.version} have different layouts: publish a full version")


# ---------------------------------------------------------------------------------------------------------------------
# encode (learner) / apply (sampler)
# ---------------------------------------------------------------------------------------------------------------------
def encode_delta(
    base: WeightManifest,
    base_buffer,
    target: WeightManifest,
    target_buffer,
    *,
    codec: str = DEFAULT_CODEC,
    level: int = DEFAULT_LEVEL,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    created_at: Optional[float] = None,
    base_digest: Optional[bytes] = None,
    target_digest: Optional[bytes] = None,
) -> Tuple[DeltaManifest, List[bytes]]:
    """The delta that turns ``base``'s buffer into ``target``'s: (unsigned manifest, compressed chunks).

    ``base`` is any earlier version with the same layout: the previous version gives the per-step delta, a
    keyframe gives the cumulative delta keyframe -> target. Sign with :func:`encode_delta_manifest`.
    ``base_digest`` / ``target_digest``: the buffers' SHA-256 when the caller has them (the learner hashes each
    version once, not once per delta it takes part in: 0.3-0.4 s each for a 269 MB version)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (known: {CODECS})")
    if not base.version < target.version:
        raise ValueError(f"a delta goes forward: base version {base.version} >= target {target.version}")
    if not DEFAULT_DELTA_LIMITS.min_chunk_size <= chunk_size <= DEFAULT_DELTA_LIMITS.max_chunk_size:
        raise ValueError(f"chunk_size {chunk_size} outside the limits")
    _same_layout(base, target)
    bmv, tmv = as_bytes(base_buffer, "base buffer"), as_bytes(target_buffer, "target buffer")
    if len(bmv) != base.total_size or len(tmv) != target.total_size:
        raise ValueError("a buffer's length differs from its manifest's total_size")
    stream = _xor(bmv, tmv)
    if codec == "xor-planes-zstd":
        stream = _planes(target.tensors, stream, inverse=False)
    compressor = _zstd().ZstdCompressor(level=level)
    chunks = [compressor.compress(stream[i:i + chunk_size].data) for i in range(0, target.total_size, chunk_size)]
    m = DeltaManifest(
        run_id=target.run_id,
        base_version=base.version,
        version=target.version,
        created_at=time.time() if created_at is None else float(created_at),
        codec=codec,
        base_digest=digest(bmv) if base_digest is None else base_digest,
        target_digest=digest(tmv) if target_digest is None else target_digest,
        tensors=target.tensors,
        total_size=target.total_size,
        chunk_size=int(chunk_size),
        chunk_sizes=tuple(len(c) for c in chunks),
        chunk_hashes=b"".join(digest(c) for c in chunks),
    )
    _validate(m, DEFAULT_DELTA_LIMITS, exc=ValueError)
    return m, chunks


def verify_delta_chunk(manifest: DeltaManifest, index: int, data) -> None:
    """Raise ``ProtocolError`` unless ``data`` is exactly compressed chunk ``index`` (call on every chunk received
    from a peer before using or re-serving it)."""
    if type(index) is not int or not 0 <= index < manifest.n_chunks:
        raise ProtocolError(Reason.MALFORMED, f"delta chunk index {index!r} outside [0, {manifest.n_chunks})")
    mv = as_bytes(data, "delta chunk")
    expected = manifest.chunk_sizes[index]
    if len(mv) != expected:
        reason = Reason.OVERSIZE if len(mv) > expected else Reason.MALFORMED
        raise ProtocolError(reason, f"delta chunk {index} is {len(mv)} bytes, expected {expected}")
    if digest(mv) != manifest.chunk_hash(index):
        raise ProtocolError(Reason.HASH_MISMATCH, f"delta chunk {index} does not match its hash")


def apply_delta(manifest: DeltaManifest, base_buffer, chunks: Sequence, *, base_digest: Optional[bytes] = None) -> bytearray:
    """The target version's buffer, rebuilt from the base version's buffer and the delta's chunks, checked bit for
    bit against ``manifest.target_digest``. Raises ``ProtocolError`` when the base is not the manifest's base
    (HASH_MISMATCH), a chunk is missing, truncated or altered, or the result differs from the target.

    ``base_digest``: the base buffer's SHA-256 when the caller already verified it (skips rehashing the base)."""
    bmv = as_bytes(base_buffer, "base buffer")
    if len(bmv) != manifest.total_size:
        raise ProtocolError(Reason.MALFORMED, f"base buffer is {len(bmv)} bytes, the delta expects {manifest.total_size}")
    if (digest(bmv) if base_digest is None else base_digest) != manifest.base_digest:
        raise ProtocolError(Reason.HASH_MISMATCH,
                            f"the base buffer is not version {manifest.base_version} this delta applies to")
    if len(chunks) != manifest.n_chunks:
        raise ProtocolError(Reason.MALFORMED, f"{len(chunks)} delta chunks, the manifest lists {manifest.n_chunks}")
    zstd = _zstd()
    decompressor = zstd.ZstdDecompressor()
    stream = np.empty(manifest.total_size, dtype=np.uint8)
    out = bytearray(manifest.total_size)  # the result, filled in place (no copy of the whole version at the end)
    result = np.frombuffer(out, dtype=np.uint8)
    for i, chunk in enumerate(chunks):
        verify_delta_chunk(manifest, i, chunk)
        start, end = manifest.raw_range(i)
        try:
            raw = decompressor.decompress(as_bytes(chunk, "delta chunk"), max_output_size=end - start)
        except zstd.ZstdError as e:
            raise ProtocolError(Reason.MALFORMED, f"delta chunk {i} is not a valid zstd frame ({e})") from None
        if len(raw) != end - start:
            raise ProtocolError(Reason.MALFORMED, f"delta chunk {i} decompresses to {len(raw)} bytes, expected {end - start}")
        stream[start:end] = np.frombuffer(raw, dtype=np.uint8)
    if manifest.codec == "xor-planes-zstd":
        stream = _planes(manifest.tensors, stream, inverse=True, out=result)
    _xor(stream, bmv, out=result)
    if digest(out) != manifest.target_digest:
        raise ProtocolError(Reason.HASH_MISMATCH, f"version {manifest.version} rebuilt from the delta does not match its digest")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# signing and decoding
# ---------------------------------------------------------------------------------------------------------------------
def encode_delta_manifest(manifest: DeltaManifest, identity: Identity) -> bytes:
    """Sign and serialize (the same envelope and key as the weight manifests, another magic and domain)."""
    if manifest.learner and manifest.learner != identity.public_key:
        raise ValueError("manifest.learner is set to a different key than the signing identity")
    _validate(manifest, DEFAULT_DELTA_LIMITS, exc=ValueError)
    return sign_envelope(DELTA_MAGIC, DELTA_DOMAIN, packb(manifest.to_body()), identity)


def decode_delta_manifest(
    data,
    *,
    learner: Optional[bytes] = None,
    expected_digest: Optional[bytes] = None,
    limits: DeltaLimits = DEFAULT_DELTA_LIMITS,
) -> DeltaManifest:
    """Authenticate and decode a delta manifest (``learner``: the trusted key; ``expected_digest``: the announced
    SHA-256 of the serialized manifest)."""
    signer, body = open_envelope(data, magic=DELTA_MAGIC, domain=DELTA_DOMAIN, what="delta manifest",
                                 learner=learner, expected_digest=expected_digest, max_bytes=limits.max_manifest_bytes)
    b = req_map(unpackb(body, "delta manifest body"), _BODY_KEYS, "delta manifest body")
    codec = req_str(b["codec"], "codec", 64)
    if codec not in CODECS:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"unsupported delta codec {codec[:32]!r}")
    tensors = []
    for i, e in enumerate(req_list(b["tensors"], "tensors", limits.max_tensors)):
        e = req_list(e, f"tensors[{i}]", 4, 4)
        dtype = req_str(e[1], f"tensors[{i}].dtype", 32)
        if dtype not in DTYPE_SIZES:
            raise ProtocolError(Reason.DTYPE_MISMATCH, f"tensors[{i}]: unknown dtype {dtype!r}")
        shape = tuple(req_int(s, f"tensors[{i}].shape") for s in req_list(e[2], f"tensors[{i}].shape", MAX_NDIM))
        tensors.append(TensorEntry(req_str(e[0], f"tensors[{i}].name", MAX_NAME_BYTES, 1), dtype, shape,
                                   req_int(e[3], f"tensors[{i}].offset")))
    m = DeltaManifest(
        run_id=req_str(b["run"], "run", 128, 1),
        base_version=req_int(b["base_version"], "base_version"),
        version=req_int(b["version"], "version"),
        created_at=req_float(b["created_at"], "created_at"),
        codec=codec,
        base_digest=req_bin(b["base_digest"], "base_digest", HASH_BYTES),
        target_digest=req_bin(b["target_digest"], "target_digest", HASH_BYTES),
        tensors=tuple(tensors),
        total_size=req_int(b["total_size"], "total_size"),
        chunk_size=req_int(b["chunk_size"], "chunk_size", 1),
        chunk_sizes=tuple(req_int(c, "chunk_sizes[]", 1, U63)
                          for c in req_list(b["chunk_sizes"], "chunk_sizes", limits.max_chunks)),
        chunk_hashes=req_bin(b["chunk_hashes"], "chunk_hashes"),
        learner=signer,
    )
    _validate(m, limits)
    return m


def _validate(m: DeltaManifest, limits: DeltaLimits, exc=None) -> None:
    """Structural checks shared by encode (``exc=ValueError``: caller bug) and decode (ProtocolError)."""
    def fail(reason: Reason, msg: str):
        raise (exc(msg) if exc is not None else ProtocolError(reason, msg))

    if not m.base_version < m.version:
        fail(Reason.MALFORMED, f"base_version {m.base_version} is not before version {m.version}")
    if m.total_size > limits.max_total_bytes:
        fail(Reason.OVERSIZE, f"total_size {m.total_size} > limit {limits.max_total_bytes}")
    if not limits.min_chunk_size <= m.chunk_size <= limits.max_chunk_size:
        fail(Reason.MALFORMED, f"chunk_size {m.chunk_size} outside [{limits.min_chunk_size}, {limits.max_chunk_size}]")
    n = math.ceil(m.total_size / m.chunk_size)
    if n > limits.max_chunks or len(m.chunk_sizes) != n or len(m.chunk_hashes) != n * HASH_BYTES:
        fail(Reason.SHAPE_MISMATCH, f"{len(m.chunk_sizes)} chunk sizes / {len(m.chunk_hashes)} hash bytes for "
                                    f"{n} chunks of {m.chunk_size} in {m.total_size} bytes")
    for i, size in enumerate(m.chunk_sizes):
        start = i * m.chunk_size
        if size > _max_compressed(min(m.chunk_size, m.total_size - start)):
            fail(Reason.OVERSIZE, f"chunk {i}: {size} compressed bytes exceed zstd's bound")
    end = 0
    for t in sorted(m.tensors, key=lambda t: t.offset):
        if t.offset < end or t.offset + t.nbytes > m.total_size:
            fail(Reason.MALFORMED, f"tensor {t.name!r} overlaps another or lies outside the buffer")
        end = t.offset + t.nbytes
