"""Weight manifests: what a policy version's weights look like and how to check every chunk of them.

The learner lays out a version's tensors (raw bytes, 64-byte aligned, zero padding) followed by the model config
and tokenizer files in one flat byte buffer, cuts the buffer into fixed-size chunks, and publishes a signed
manifest listing the tensor table, the file table and one SHA-256 per chunk. Samplers fetch chunks from any peer,
check each chunk against the manifest (:func:`verify_chunk`) and rebuild tensors (:func:`tensor_bytes`,
:func:`numpy_tensors`, :func:`torch_state_dict`) and files (:func:`file_bytes`) - nothing comes from a model hub.

Wire format v1 (see docs/PROTOCOL.md)::

    offset  size  field
    0       3     magic b"GSM"
    3       1     format version (1)
    4       4     body_len u32 LE
    8       32    learner Ed25519 public key
    40      64    Ed25519 signature over  DOMAIN || bytes[0:40] || body
    104     B     body: msgpack map

    DOMAIN = b"gepo-swarm/manifest/v1\\x00"

Dtypes travel by name (:data:`DTYPE_SIZES`); bfloat16 and float8 stay raw bytes end to end. ``encoding`` is
``"raw"`` for a full version, ``"lora"`` for a LoRA adapter version (its tensors are the adapter factors over a
base version named in the signed ``adapter`` field: :mod:`protocol.adapter`); decoders reject encodings they do not
know with ``UNKNOWN_VERSION``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from ._wire import HASH_BYTES, U63, as_bytes, digest, packb, req_bin, req_float, req_int, req_list, req_map, req_str
from ._wire import unpackb
from .adapter import ADAPTER_ENCODING, AdapterInfo, check_adapter_tensors, decode_adapter, validate_adapter
from .errors import ProtocolError, Reason
from .identity import Identity, verify_signature

__all__ = [
    "MANIFEST_MAGIC",
    "MANIFEST_VERSION",
    "MANIFEST_DOMAIN",
    "DTYPE_SIZES",
    "ManifestLimits",
    "RawTensor",
    "TensorEntry",
    "FileEntry",
    "WeightManifest",
    "build_manifest",
    "encode_manifest",
    "decode_manifest",
    "sign_envelope",
    "open_envelope",
    "manifest_digest",
    "read_signer",
    "verify_chunk",
    "verify_buffer",
    "tensor_bytes",
    "numpy_tensors",
    "torch_state_dict",
    "file_bytes",
]

MANIFEST_MAGIC = b"GSM"
MANIFEST_VERSION = 1
MANIFEST_DOMAIN = b"gepo-swarm/manifest/v1\x00"
_PREFIX = struct.Struct("<3sBI32s64s")
PREFIX_BYTES = _PREFIX.size  # 104
_SIGNED_PREFIX = 40
assert PREFIX_BYTES == 104

#: dtype name -> bytes per element. Names match torch's (``str(torch.bfloat16) == "torch.bfloat16"``).
DTYPE_SIZES: Dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
}
#: dtype name -> numpy dtype, for the dtypes numpy has (not bfloat16 / float8).
NUMPY_DTYPES: Dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in DTYPE_SIZES
    if name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
}
ENCODINGS = ("raw", ADAPTER_ENCODING)
ALIGNMENT = 64
MAX_NAME_BYTES = 512
MAX_NDIM = 8
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_BODY_KEYS = frozenset(
    {
        "run",
        "version",
        "parent",
        "created_at",
        "encoding",
        "base_digest",
        "tensors",
        "files",
        "total_size",
        "chunk_size",
        "chunk_hashes",
        "meta",
    }
)


@dataclasses.dataclass(frozen=True)
class ManifestLimits:
    max_manifest_bytes: int = 16 << 20
    max_total_bytes: int = 1 << 40  # 1 TiB of weights
    max_tensors: int = 1 << 16
    max_files: int = 64
    max_chunks: int = 1 << 20
    min_chunk_size: int = 4 << 10
    max_chunk_size: int = 256 << 20
    max_meta_entries: int = 64


DEFAULT_MANIFEST_LIMITS = ManifestLimits()


@dataclasses.dataclass(frozen=True)
class RawTensor:
    """A tensor given as raw little-endian bytes (e.g. bf16 without torch)."""

    dtype: str
    shape: Tuple[int, ...]
    data: bytes


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A file (model config, tokenizer) stored in the buffer at ``[offset, offset+size)`` with its SHA-256."""

    name: str
    offset: int
    size: int
    sha256: bytes


@dataclasses.dataclass(frozen=True)
class WeightManifest:
    run_id: str
    version: int
    parent: Optional[int]
    created_at: float
    tensors: Tuple[TensorEntry, ...]
    files: Tuple[FileEntry, ...]
    total_size: int
    chunk_size: int
    chunk_hashes: bytes  # n_chunks * 32 bytes, concatenated
    encoding: str = "raw"
    base_digest: Optional[bytes] = None  # reserved for delta encodings: digest of the parent's manifest
    meta: Mapping[str, Union[str, int, float, bool]] = dataclasses.field(default_factory=dict)
    learner: bytes = b""  # signer public key (set by decode_manifest / encode_manifest)
    adapter: Optional[AdapterInfo] = None  # encoding "lora": the base version the adapter tensors apply to

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_hashes) // HASH_BYTES

    def chunk_range(self, index: int) -> Tuple[int, int]:
        """``(start, end)`` byte range of chunk ``index`` in the buffer (the last chunk may be shorter)."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} outside [0, {self.n_chunks})")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.total_size)

    def chunk_hash(self, index: int) -> bytes:
        self.chunk_range(index)
        return self.chunk_hashes[index * HASH_BYTES:(index + 1) * HASH_BYTES]

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_body(self) -> dict:
        return {
            "run": self.run_id,
            "version": self.version,
            "parent": self.parent,
            "created_at": float(self.created_at),
            "encoding": self.encoding,
            "base_digest": self.base_digest,
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset] for t in self.tensors],
            "files": [[f.name, f.offset, f.size, f.sha256] for f in self.files],
            "total_size": self.total_size,
            "chunk_size": self.chunk_size,
            "chunk_hashes": self.chunk_hashes,
            "meta": dict(self.meta),
            **({} if self.adapter is None else {"adapter": self.adapter.to_body()}),
        }


# ---------------------------------------------------------------------------------------------------------------------
# building (learner side)
# ---------------------------------------------------------------------------------------------------------------------
def _tensor_to_raw(name: str, t: Any) -> RawTensor:
    if isinstance(t, RawTensor):
        if t.dtype not in DTYPE_SIZES:
            raise ValueError(f"{name}: unknown dtype {t.dtype!r}")
        shape = tuple(int(s) for s in t.shape)
        if len(t.data) != math.prod(shape) * DTYPE_SIZES[t.dtype]:
            raise ValueError(f"{name}: {len(t.data)} bytes do not match dtype/shape")
        return RawTensor(t.dtype, shape, bytes(t.data))
    if type(t).__module__.startswith("torch"):  # torch.Tensor / Parameter, without importing torch here
        import torch  # noqa: PLC0415  (only reached when the caller already uses torch)

        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"{name}: unsupported torch dtype {t.dtype}")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return RawTensor(dtype, tuple(t.shape), raw)
    a = np.asarray(t)
    dtype = a.dtype.name
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"{name}: unsupported numpy dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype])
    return RawTensor(dtype, tuple(a.shape), a.tobytes())


def _align(x: int, a: int = ALIGNMENT) -> int:
    return (x + a - 1) // a * a


def build_manifest(
    tensors: Mapping[str, Any],
    *,
    run_id: str,
    version: int,
    parent: Optional[int] = None,
    chunk_size: int = 4 << 20,
    files: Optional[Mapping[str, bytes]] = None,
    meta: Optional[Mapping[str, Union[str, int, float, bool]]] = None,
    created_at: Optional[float] = None,
    adapter: Optional[AdapterInfo] = None,
) -> Tuple[WeightManifest, bytearray]:
    """Lay out ``tensors`` (name -> numpy array / torch tensor / :class:`RawTensor`, in mapping order) and ``files``
    (name -> bytes: config.json, tokenizer.json, ...) in one flat buffer; return the unsigned manifest and the
    buffer. Sign and serialize with :func:`encode_manifest`. With ``adapter`` the version is a LoRA adapter
    version (encoding ``"lora"``): ``tensors`` are its factors (:mod:`protocol.adapter`)."""
    files = dict(files or {})
    entries: List[TensorEntry] = []
    raws: List[RawTensor] = []
    off = 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME_BYTES:
            raise ValueError(f"bad tensor name {name!r}")
        raw = _tensor_to_raw(name, t)
        off = _align(off)
        entries.append(TensorEntry(name, raw.dtype, raw.shape, off))
        raws.append(raw)
        off += len(raw.data)
    fentries: List[FileEntry] = []
    for name, data in files.items():
        if not isinstance(name, str) or not _FILE_NAME_RE.match(name):
            raise ValueError(f"bad file name {name!r} (plain file names only: [A-Za-z0-9._-], no leading dot)")
        off = _align(off)
        data = bytes(data)
        fentries.append(FileEntry(name, off, len(data), digest(data)))
        off += len(data)
    total = off
    buf = bytearray(total)
    for e, raw in zip(entries, raws):
        buf[e.offset:e.offset + len(raw.data)] = raw.data
    for fe, data in zip(fentries, files.values()):
        buf[fe.offset:fe.offset + fe.size] = data
    mv = memoryview(buf)
    hashes = b"".join(digest(mv[i:i + chunk_size]) for i in range(0, total, chunk_size))
    m = WeightManifest(
        run_id=run_id,
        version=int(version),
        parent=None if parent is None else int(parent),
        created_at=time.time() if created_at is None else float(created_at),
        tensors=tuple(entries),
        files=tuple(fentries),
        total_size=total,
        chunk_size=int(chunk_size),
        chunk_hashes=hashes,
        meta=dict(meta or {}),
        encoding="raw" if adapter is None else ADAPTER_ENCODING,
        adapter=adapter,
    )
    _validate_manifest(m, DEFAULT_MANIFEST_LIMITS, exc=ValueError)
    return m, buf


def encode_manifest(manifest: WeightManifest, identity: Identity) -> bytes:
    """Sign and serialize. The result's :func:`manifest_digest` is what the learner announces in its heartbeat."""
    if manifest.learner and manifest.learner != identity.public_key:
        raise ValueError("manifest.learner is set to a different key than the signing identity")
    _validate_manifest(manifest, DEFAULT_MANIFEST_LIMITS, exc=ValueError)
    return sign_envelope(MANIFEST_MAGIC, MANIFEST_DOMAIN, packb(manifest.to_body()), identity)


def sign_envelope(magic: bytes, domain: bytes, body: bytes, identity: Identity) -> bytes:
    """The signed envelope every learner-published manifest travels in (weight manifests here, delta manifests in
    :mod:`protocol.delta`): ``magic(3) | format version | body_len | learner key | Ed25519 sig | body``, the
    signature over ``domain || bytes[0:40] || body``. ``domain`` keeps one kind of manifest from being replayed
    as another."""
    signed_prefix = struct.pack("<3sBI32s", magic, MANIFEST_VERSION, len(body), identity.public_key)
    sig = identity.sign(domain + signed_prefix + body)
    return b"".join((signed_prefix, sig, body))


def open_envelope(
    data,
    *,
    magic: bytes,
    domain: bytes,
    what: str,
    learner: Optional[bytes],
    expected_digest: Optional[bytes],
    max_bytes: int,
) -> Tuple[bytes, memoryview]:
    """Check an envelope made by :func:`sign_envelope` (size, magic, format version, length, announced digest,
    signer, signature) and return ``(signer, body)``; raise ``ProtocolError`` on the first thing that is wrong."""
    mv = as_bytes(data, what)
    n = len(mv)
    if n > max_bytes:
        raise ProtocolError(Reason.OVERSIZE, f"{what} is {n} bytes > limit {max_bytes}")
    _check_magic(mv, magic, what)
    if n < PREFIX_BYTES:
        raise ProtocolError(Reason.MALFORMED, f"truncated: {n} bytes < {PREFIX_BYTES}-byte prefix")
    _, _, body_len, signer, sig = _PREFIX.unpack_from(mv, 0)
    if PREFIX_BYTES + body_len != n:
        raise ProtocolError(Reason.MALFORMED, f"length mismatch: prefix announces {PREFIX_BYTES + body_len}, got {n}")
    if expected_digest is not None and digest(mv) != expected_digest:
        raise ProtocolError(Reason.HASH_MISMATCH, f"{what} digest differs from the announced one")
    if learner is not None and signer != learner:
        raise ProtocolError(Reason.UNTRUSTED_SIGNER, f"{what} is not signed by the learner")
    body = mv[PREFIX_BYTES:]
    if not verify_signature(signer, b"".join((domain, mv[:_SIGNED_PREFIX], body)), sig):
        raise ProtocolError(Reason.BAD_SIGNATURE, f"{what} signature does not verify")
    return bytes(signer), body


def manifest_digest(data) -> bytes:
    """SHA-256 of the serialized (signed) manifest: the content address announced in the learner heartbeat."""
    return digest(as_bytes(data, "manifest"))


# ---------------------------------------------------------------------------------------------------------------------
# decoding (sampler side)
# ---------------------------------------------------------------------------------------------------------------------
def read_signer(data) -> bytes:
    """The learner key a manifest claims, unverified."""
    mv = as_bytes(data, "manifest")
    _check_magic(mv)
    if len(mv) < _SIGNED_PREFIX:
        raise ProtocolError(Reason.MALFORMED, "truncated manifest prefix")
    return bytes(mv[8:40])


def _check_magic(mv, magic: bytes = MANIFEST_MAGIC, what: str = "weight manifest") -> None:
    if len(mv) < 4 or bytes(mv[:3]) != magic:
        raise ProtocolError(Reason.MALFORMED, f"not a {what} (bad magic)")
    if mv[3] != MANIFEST_VERSION:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"{what} format version {mv[3]} (supported: {MANIFEST_VERSION})")


def decode_manifest(
    data,
    *,
    learner: Optional[bytes] = None,
    expected_digest: Optional[bytes] = None,
    limits: ManifestLimits = DEFAULT_MANIFEST_LIMITS,
) -> WeightManifest:
    """Authenticate and decode a manifest.

    ``learner``: the trusted learner public key; a manifest signed by anyone else is rejected with
    ``UNTRUSTED_SIGNER`` (always pass it outside tests). ``expected_digest``: the digest announced in the learner's
    heartbeat (``HASH_MISMATCH`` if different).
    """
    signer, body_bytes = open_envelope(data, magic=MANIFEST_MAGIC, domain=MANIFEST_DOMAIN, what="manifest",
                                       learner=learner, expected_digest=expected_digest,
                                       max_bytes=limits.max_manifest_bytes)

    b = req_map(unpackb(body_bytes, "manifest body"), _BODY_KEYS, "manifest body", optional=frozenset({"adapter"}))
    encoding = req_str(b["encoding"], "encoding", 64)
    if encoding not in ENCODINGS:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"unsupported weight encoding {encoding[:32]!r}")
    parent = b["parent"]
    base_digest = b["base_digest"]
    tensors = []
    for i, e in enumerate(req_list(b["tensors"], "tensors", limits.max_tensors)):
        e = req_list(e, f"tensors[{i}]", 4, 4)
        name = req_str(e[0], f"tensors[{i}].name", MAX_NAME_BYTES, 1)
        dtype = req_str(e[1], f"tensors[{i}].dtype", 32)
        if dtype not in DTYPE_SIZES:
            raise ProtocolError(Reason.DTYPE_MISMATCH, f"tensors[{i}]: unknown dtype {dtype!r}")
        shape = tuple(req_int(s, f"tensors[{i}].shape", 0, U63) for s in req_list(e[2], f"tensors[{i}].shape", MAX_NDIM))
        tensors.append(TensorEntry(name, dtype, shape, req_int(e[3], f"tensors[{i}].offset")))
    files = []
    for i, e in enumerate(req_list(b["files"], "files", limits.max_files)):
        e = req_list(e, f"files[{i}]", 4, 4)
        name = req_str(e[0], f"files[{i}].name", 128, 1)
        files.append(
            FileEntry(
                name,
                req_int(e[1], f"files[{i}].offset"),
                req_int(e[2], f"files[{i}].size"),
                req_bin(e[3], f"files[{i}].sha256", HASH_BYTES),
            )
        )
    meta = b["meta"]
    m = WeightManifest(
        run_id=req_str(b["run"], "run", 128, 1),
        version=req_int(b["version"], "version"),
        parent=None if parent is None else req_int(parent, "parent"),
        created_at=req_float(b["created_at"], "created_at"),
        tensors=tuple(tensors),
        files=tuple(files),
        total_size=req_int(b["total_size"], "total_size"),
        chunk_size=req_int(b["chunk_size"], "chunk_size", 1),
        chunk_hashes=req_bin(b["chunk_hashes"], "chunk_hashes"),
        encoding=encoding,
        base_digest=None if base_digest is None else req_bin(base_digest, "base_digest", HASH_BYTES),
        meta=meta,
        learner=bytes(signer),
        adapter=decode_adapter(b["adapter"]) if "adapter" in b else None,
    )
    _validate_manifest(m, limits)
    return m


def _validate_manifest(m: WeightManifest, limits: ManifestLimits, exc=None) -> None:
    """Structural checks shared by encode (``exc=ValueError``: caller bug) and decode (ProtocolError)."""
    def fail(reason: Reason, msg: str):
        if exc is not None:
            raise exc(msg)
        raise ProtocolError(reason, msg)

    if not isinstance(m.run_id, str) or not 0 < len(m.run_id.encode()) <= 128:
        fail(Reason.MALFORMED, "run_id must be 1..128 bytes")
    if type(m.version) is not int or not 0 <= m.version <= U63:
        fail(Reason.MALFORMED, "version must be an int in [0, 2**63)")
    if m.parent is not None and (type(m.parent) is not int or not 0 <= m.parent < m.version):
        fail(Reason.MALFORMED, "parent must be None or an older version")
    if m.encoding not in ENCODINGS:
        fail(Reason.UNKNOWN_VERSION, f"unsupported encoding {m.encoding!r}")
    if m.base_digest is not None:
        fail(Reason.MALFORMED, "base_digest is only meaningful for delta encodings")
    if (m.encoding == ADAPTER_ENCODING) != (m.adapter is not None):
        fail(Reason.MALFORMED, f"encoding {m.encoding!r} with{'' if m.adapter is not None else 'out'} an adapter field")
    if not limits.min_chunk_size <= m.chunk_size <= limits.max_chunk_size:
        fail(Reason.MALFORMED, f"chunk_size {m.chunk_size} outside [{limits.min_chunk_size}, {limits.max_chunk_size}]")
    if m.total_size > limits.max_total_bytes:
        fail(Reason.OVERSIZE, f"total_size {m.total_size} > limit {limits.max_total_bytes}")
    n_chunks = -(-m.total_size // m.chunk_size)
    if n_chunks > limits.max_chunks:
        fail(Reason.OVERSIZE, f"{n_chunks} chunks > limit {limits.max_chunks}")
    if len(m.chunk_hashes) != n_chunks * HASH_BYTES:
        fail(Reason.SHAPE_MISMATCH, f"{len(m.chunk_hashes)} bytes of chunk hashes for {n_chunks} chunks")
    if len(m.tensors) > limits.max_tensors or len(m.files) > limits.max_files:
        fail(Reason.OVERSIZE, "too many tensors or files")
    spans = []
    names = set()
    for t in m.tensors:
        if t.name in names:
            fail(Reason.MALFORMED, f"duplicate tensor name {t.name[:64]!r}")
        names.add(t.name)
        if t.dtype not in DTYPE_SIZES:
            fail(Reason.DTYPE_MISMATCH, f"unknown dtype {t.dtype!r}")
        if len(t.shape) > MAX_NDIM:
            fail(Reason.SHAPE_MISMATCH, f"{t.name[:64]!r}: more than {MAX_NDIM} dims")
        nbytes = t.nbytes  # python ints: no overflow
        if t.offset + nbytes > m.total_size:
            fail(Reason.SHAPE_MISMATCH, f"tensor {t.name[:64]!r} extends past total_size")
        spans.append((t.offset, nbytes))
    fnames = set()
    for f in m.files:
        if not _FILE_NAME_RE.match(f.name) or f.name in fnames:
            fail(Reason.MALFORMED, f"bad or duplicate file name {f.name[:64]!r}")
        fnames.add(f.name)
        if f.offset + f.size > m.total_size:
            fail(Reason.SHAPE_MISMATCH, f"file {f.name!r} extends past total_size")
        spans.append((f.offset, f.size))
    spans.sort()
    end = 0
    for off, size in spans:
        if off < end:
            fail(Reason.SHAPE_MISMATCH, "tensors/files overlap")
        end = max(end, off + size)
    meta = m.meta
    if type(meta) is not dict or len(meta) > limits.max_meta_entries:
        fail(Reason.MALFORMED, f"meta must be a map of at most {limits.max_meta_entries} entries")
    for k, v in meta.items():
        if type(k) is not str or len(k) > 64:
            fail(Reason.MALFORMED, "meta keys must be strings of at most 64 chars")
        if type(v) not in (str, int, float, bool) or (type(v) is str and len(v) > 1024):
            fail(Reason.MALFORMED, f"meta[{k!r}] must be str(<=1024)/int/float/bool")
        if type(v) is int and not -(1 << 63) <= v <= U63:
            fail(Reason.MALFORMED, f"meta[{k!r}] int out of range")
        if type(v) is float and not math.isfinite(v):
            fail(Reason.MALFORMED, f"meta[{k!r}] float must be finite")
    if m.adapter is not None:
        validate_adapter(m.adapter, exc=exc)
        check_adapter_tensors(m.adapter, m.version, m.tensors, exc=exc)


# ---------------------------------------------------------------------------------------------------------------------
# chunks and tensors
# ---------------------------------------------------------------------------------------------------------------------
def verify_chunk(manifest: WeightManifest, index: int, data) -> None:
    """Raise ``ProtocolError`` unless ``data`` is exactly chunk ``index`` (OVERSIZE/MALFORMED for a wrong length,
    HASH_MISMATCH for wrong content). Call on every chunk received from a peer before using or re-serving it."""
    if type(index) is not int or not 0 <= index < manifest.n_chunks:
        raise ProtocolError(Reason.MALFORMED, f"chunk index {index!r} outside [0, {manifest.n_chunks})")
    mv = as_bytes(data, "chunk")
    start, end = manifest.chunk_range(index)
    if len(mv) != end - start:
        reason = Reason.OVERSIZE if len(mv) > end - start else Reason.MALFORMED
        raise ProtocolError(reason, f"chunk {index} is {len(mv)} bytes, expected {end - start}")
    if digest(mv) != manifest.chunk_hash(index):
        raise ProtocolError(Reason.HASH_MISMATCH, f"chunk {index} does not match its hash")


def verify_buffer(manifest: WeightManifest, buffer) -> None:
    """Check a complete buffer (every chunk)."""
    mv = as_bytes(buffer, "weights buffer")
    if len(mv) != manifest.total_size:
        raise ProtocolError(Reason.MALFORMED, f"buffer is {len(mv)} bytes, expected {manifest.total_size}")
    for i in range(manifest.n_chunks):
        s, e = manifest.chunk_range(i)
        verify_chunk(manifest, i, mv[s:e])


def tensor_bytes(manifest: WeightManifest, buffer, name: str) -> memoryview:
    """Zero-copy view of one tensor's raw little-endian bytes in ``buffer``."""
    mv = as_bytes(buffer, "weights buffer")
    if len(mv) != manifest.total_size:
        raise ProtocolError(Reason.MALFORMED, f"buffer is {len(mv)} bytes, expected {manifest.total_size}")
    t = manifest.tensor(name)
    return mv[t.offset:t.offset + t.nbytes]


def numpy_tensors(manifest: WeightManifest, buffer) -> Dict[str, np.ndarray]:
    """name -> numpy view (read-only if ``buffer`` is bytes). bfloat16/float8 tensors come back as uint16/uint8
    views of their raw bits (numpy has no such dtypes); use :func:`torch_state_dict` for real bf16 tensors."""
    out = {}
    for t in manifest.tensors:
        raw = tensor_bytes(manifest, buffer, t.name)
        dt = NUMPY_DTYPES.get(t.dtype) or np.dtype("<u2" if DTYPE_SIZES[t.dtype] == 2 else "u1")
        out[t.name] = np.frombuffer(raw, dtype=dt).reshape(t.shape)
    return out


def torch_state_dict(manifest: WeightManifest, buffer, *, copy: bool = True) -> Dict[str, Any]:
    """name -> torch.Tensor with the manifest's dtype and shape (bf16 stays bf16, bit for bit). Imports torch
    lazily. With ``copy=False`` tensors share ``buffer``'s memory (buffer must be writable, e.g. a bytearray)."""
    import torch  # noqa: PLC0415
    import warnings

    mv = as_bytes(buffer, "weights buffer")
    if len(mv) != manifest.total_size:
        raise ProtocolError(Reason.MALFORMED, f"buffer is {len(mv)} bytes, expected {manifest.total_size}")
    out = {}
    for t in manifest.tensors:
        dt = getattr(torch, t.dtype)
        if t.numel == 0:
            out[t.name] = torch.empty(t.shape, dtype=dt)
            continue
        with warnings.catch_warnings():  # frombuffer warns about read-only buffers; we clone in that case
            warnings.simplefilter("ignore")
            x = torch.frombuffer(mv, dtype=dt, count=t.numel, offset=t.offset).reshape(t.shape)
        out[t.name] = x.clone() if copy or mv.readonly else x
    return out


def file_bytes(manifest: WeightManifest, buffer, name: str) -> bytes:
    """The bytes of file ``name`` (e.g. ``"tokenizer.json"``), checked against its SHA-256."""
    mv = as_bytes(buffer, "weights buffer")
    if len(mv) != manifest.total_size:
        raise ProtocolError(Reason.MALFORMED, f"buffer is {len(mv)} bytes, expected {manifest.total_size}")
    f = manifest.file(name)
    data = bytes(mv[f.offset:f.offset + f.size])
    if digest(data) != f.sha256:
        raise ProtocolError(Reason.HASH_MISMATCH, f"file {name!r} does not match its hash")
    return data


def iter_chunks(manifest: WeightManifest, buffer) -> Iterator[Tuple[int, memoryview]]:
    """(index, bytes) for each chunk of a complete buffer (for serving)."""
    mv = as_bytes(buffer, "weights buffer")
    for i in range(manifest.n_chunks):
        s, e = manifest.chunk_range(i)
        yield i, mv[s:e]
