"""Where a node keeps policy versions: one preallocated buffer per version plus which chunks are verified.

* The learner publishes complete versions from memory (:meth:`WeightStore.add_complete`, zero-copy).
* A sampler downloads into a preallocated, memory-mapped file ``<weights_dir>/v<version>.bin`` next to the signed
  manifest ``v<version>.manifest``. A chunk is marked held only after its SHA-256 matched the manifest. When the
  last chunk is in, a ``v<version>.complete`` marker is written.
* After a restart, :meth:`WeightStore.load` reopens every version on disk and re-hashes it chunk by chunk (a crash
  can leave a half-written chunk; it simply is not marked and is fetched again) - that is how an interrupted
  download resumes. (The ``.complete`` marker is informative only; about 1 s per GB of hashing at start-up.)
* Only the newest ``keep`` complete versions are kept (older files are deleted; a partial download older than the
  newest complete version is abandoned).

Bitmaps are LSB-first (bit i of byte i//8 = chunk i), the same layout as :class:`protocol.records.ChunkHave`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import mmap
import os
import threading
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from protocol.adapter import base_of
from protocol.manifest import WeightManifest, manifest_digest, verify_chunk
from protocol.errors import ProtocolError

logger = logging.getLogger(__name__)


def pack_bits(have: np.ndarray) -> bytes:
    return np.packbits(have, bitorder="little").tobytes()


def unpack_bits(data: bytes, n: int) -> Optional[np.ndarray]:
    """LSB-first bitmap -> bool array of length n, or None if the bitmap has the wrong size."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != (n + 7) // 8:
        return None
    return np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8), bitorder="little")[:n].astype(bool)


class VersionBuffer:
    """One version: signed manifest bytes, decoded manifest, a writable buffer, and the verified-chunk map."""

    def __init__(
        self,
        manifest: WeightManifest,
        manifest_bytes: bytes,
        buffer,
        *,
        complete: bool,
        path: Optional[str] = None,
        mm: Optional[mmap.mmap] = None,
    ):
        self.manifest = manifest  # a WeightManifest, or a node.delta_store.DeltaLayout (same chunk interface)
        self.manifest_bytes = bytes(manifest_bytes)
        self.digest = manifest_digest(self.manifest_bytes)
        self.version = manifest.version
        self.base: Optional[int] = getattr(manifest, "base_version", None)  # a delta's base version
        self.key = self.version if self.base is None else (self.base, self.version)
        self.n_chunks = manifest.n_chunks
        self.total_size = manifest.total_size
        self.buffer = memoryview(buffer).cast("B") if buffer is not None else memoryview(bytearray(0))
        self.have = np.full(self.n_chunks, bool(complete), dtype=bool)
        self.complete = bool(complete)
        self.path = path
        self._mm = mm
        self._fd: Optional[int] = os.open(path, os.O_RDWR) if (path is not None and mm is not None) else None
        self._listeners: List[Callable[[int], None]] = []

    @property
    def n_have(self) -> int:
        return int(self.have.sum())

    def bitmap(self) -> bytes:
        return pack_bits(self.have)

    def held_bytes(self) -> int:
        """Bytes of the verified chunks (what a resumed download no longer needs)."""
        return sum(e - s for s, e in map(self.manifest.chunk_range, np.flatnonzero(self.have).tolist()))

    def chunk_view(self, index: int) -> memoryview:
        start, end = self.manifest.chunk_range(index)
        return self.buffer[start:end]

    def chunk_writer(self, index: int) -> Callable[[int, memoryview], None]:
        """``write(offset_in_chunk, data)`` for filling chunk ``index``. File-backed buffers use ``pwrite`` (cheaper
        than first-touch page faults through the mapping; the mapping sees the same page cache)."""
        start, end = self.manifest.chunk_range(index)
        if self._fd is not None:
            fd = self._fd

            def write(off: int, data: memoryview) -> None:
                if start + off + len(data) > end:
                    raise ValueError("write past the end of the chunk")
                view = data
                while len(view):
                    n = os.pwrite(fd, view, start + off)
                    off += n
                    view = view[n:]

            return write
        buf = self.buffer

        def write_mem(off: int, data: memoryview) -> None:
            if start + off + len(data) > end:
                raise ValueError("write past the end of the chunk")
            buf[start + off : start + off + len(data)] = data

        return write_mem

    def verify_and_mark(self, index: int) -> None:
        """Check the bytes now in chunk ``index``'s slot against the manifest; mark it held. Raises ProtocolError."""
        verify_chunk(self.manifest, index, self.chunk_view(index))
        self.mark(index)

    def mark(self, index: int) -> None:
        if not self.have[index]:
            self.have[index] = True
            for fn in list(self._listeners):
                try:
                    fn(index)
                except Exception:  # pragma: no cover
                    logger.debug("chunk listener failed", exc_info=True)

    def add_listener(self, fn: Callable[[int], None]) -> None:
        self._listeners.append(fn)

    def readonly_view(self) -> memoryview:
        return self.buffer.toreadonly()

    def close(self) -> bool:
        """Release the mapping. Returns False if the caller still holds views of it (then it stays mapped)."""
        self._listeners.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is None:
            return True
        try:
            self.buffer.release()
        except Exception:
            return False
        try:
            self._mm.close()
        except BufferError:
            return False
        self._mm = None
        return True


class WeightStore:
    """The newest ``keep`` versions of this node, in memory (learner) or on disk (samplers). Thread-safe."""

    def __init__(self, directory: Optional[str] = None, keep: int = 2):
        self.directory = directory
        self.keep = max(1, int(keep))
        self._versions: Dict[Any, VersionBuffer] = {}
        self.pinned: Optional[int] = None  # a version kept besides the newest `keep` (the keyframe deltas start from)
        self._lock = threading.RLock()
        self._zombies: List[VersionBuffer] = []
        if directory:
            os.makedirs(directory, exist_ok=True)

    # --- keys and paths (node.delta_store.DeltaStore names its objects differently) -------------------------------
    @staticmethod
    def _key(manifest) -> Any:
        return manifest.version

    @staticmethod
    def _name(key) -> str:
        return f"v{key:012d}"

    @staticmethod
    def _parse_name(stem: str) -> Any:
        """The key a file name stem names (``None``: not one of ours)."""
        return int(stem[1:]) if stem.startswith("v") and stem[1:].isdigit() else None

    def _path(self, key, ext: str) -> str:
        return os.path.join(self.directory, f"{self._name(key)}.{ext}")

    def pin(self, version: Optional[int]) -> None:
        """Keep ``version`` (when complete) besides the newest ``keep``: the keyframe others' deltas start from."""
        with self._lock:
            self.pinned = version
            self._prune()

    # --- queries --------------------------------------------------------------------------------------------------
    def get(self, version: int) -> Optional[VersionBuffer]:
        with self._lock:
            return self._versions.get(version)

    def versions(self) -> List[VersionBuffer]:
        with self._lock:
            return [self._versions[v] for v in sorted(self._versions)]

    def latest_complete(self) -> Optional[VersionBuffer]:
        with self._lock:
            done = [vb for vb in self._versions.values() if vb.complete]
            return max(done, key=lambda vb: vb.version) if done else None

    def latest_version(self) -> Optional[int]:
        vb = self.latest_complete()
        return None if vb is None else vb.version

    # --- learner side ---------------------------------------------------------------------------------------------
    def add_complete(self, manifest: WeightManifest, manifest_bytes: bytes, buffer) -> VersionBuffer:
        """Register a complete version held in memory (the learner's freshly built buffer; not copied)."""
        mv = memoryview(buffer).cast("B")
        if len(mv) != manifest.total_size:
            raise ValueError(f"buffer has {len(mv)} bytes, manifest says {manifest.total_size}")
        vb = VersionBuffer(manifest, manifest_bytes, mv, complete=True)
        with self._lock:
            old = self._versions.get(vb.key)
            self._versions[vb.key] = vb
            if old is not None and old is not vb:
                self._retire(old)
            self._prune()
        return vb

    # --- sampler side ---------------------------------------------------------------------------------------------
    def open_download(self, manifest: WeightManifest, manifest_bytes: bytes) -> VersionBuffer:
        """Preallocate (or reopen, resuming) the buffer for ``manifest``'s version."""
        with self._lock:
            key = self._key(manifest)
            vb = self._versions.get(key)
            if vb is not None and vb.digest == manifest_digest(manifest_bytes):
                return vb
            if vb is not None:  # same version number, other manifest: start over
                self._drop(key)
            vb = self._open(manifest, manifest_bytes, complete=False, verify_existing=False)
            self._versions[key] = vb
            return vb

    def _open(self, manifest: WeightManifest, manifest_bytes: bytes, *, complete: bool, verify_existing: bool
              ) -> VersionBuffer:
        if not self.directory:
            return VersionBuffer(manifest, manifest_bytes, bytearray(manifest.total_size), complete=complete)
        v = self._key(manifest)
        mpath = self._path(v, "manifest")
        if not os.path.exists(mpath) or _read(mpath) != bytes(manifest_bytes):
            _atomic_write(mpath, bytes(manifest_bytes))
            for ext in ("bin", "complete"):
                _unlink(self._path(v, ext))
        path = self._path(v, "bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != manifest.total_size:
                os.ftruncate(fd, manifest.total_size)  # sparse preallocation
            mm = mmap.mmap(fd, manifest.total_size) if manifest.total_size else None
        finally:
            os.close(fd)
        buf = mm if mm is not None else bytearray(0)
        vb = VersionBuffer(manifest, manifest_bytes, buf, complete=complete, path=path, mm=mm)
        if verify_existing and not complete:
            for i in range(vb.n_chunks):
                try:
                    verify_chunk(manifest, i, vb.chunk_view(i))
                    vb.have[i] = True
                except ProtocolError:
                    pass
            if vb.have.all():
                vb.complete = True
                _atomic_write(self._path(v, "complete"), vb.digest)
        return vb

    def flush(self, version) -> None:
        """Write a version's mapped pages to disk (slow for big versions: call from a worker thread)."""
        vb = self.get(version)
        if vb is not None and vb._mm is not None:  # noqa: SLF001
            try:
                vb._mm.flush()  # noqa: SLF001
            except (ValueError, OSError):  # closed meanwhile
                pass

    def finalize(self, version) -> VersionBuffer:
        """All chunks verified: write the completion marker, prune older versions. The data pages are left to the
        kernel's write-back (no msync on the hot path): :meth:`load` re-verifies every version anyway, so a power
        loss can cost a re-download but never a corrupt version."""
        with self._lock:
            vb = self._versions[version]
            if not vb.have.all():
                raise RuntimeError(f"version {version} is not complete ({vb.n_have}/{vb.n_chunks} chunks)")
            if self.directory and vb.path:
                _atomic_write(self._path(version, "complete"), vb.digest)
            vb.complete = True
            self._prune()
            return vb

    def load(self, decode: Callable[[bytes], WeightManifest]) -> List[VersionBuffer]:
        """Reopen versions found on disk. ``decode`` authenticates a manifest (signature, trusted learner) and
        raises ProtocolError for one to discard. Partial downloads are re-verified chunk by chunk."""
        if not self.directory:
            return []
        found = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".manifest"):
                continue
            version = self._parse_name(name[:-len(".manifest")])
            if version is None:
                continue
            data = _read(os.path.join(self.directory, name))
            try:
                manifest = decode(data)
                if self._key(manifest) != version:
                    raise ValueError(f"file name says {version}, manifest says {self._key(manifest)}")
            except Exception as e:
                logger.warning("discarding stored version %s: %s", version, e)
                self._delete_files(version)
                continue
            vb = self._open(manifest, data, complete=False, verify_existing=True)  # every chunk re-hashed
            with self._lock:
                self._versions[version] = vb
            found.append(vb)
            logger.info("found stored %s %s: %d/%d chunks%s", "version" if vb.base is None else "delta", version,
                        vb.n_have, vb.n_chunks, " (complete)" if vb.complete else "")
        with self._lock:
            self._prune()
        return found

    # --- housekeeping ---------------------------------------------------------------------------------------------
    def _prune(self) -> None:
        done = sorted(v for v, vb in self._versions.items() if vb.complete)
        keep_done = set(done[-self.keep:]) | {self.pinned}
        # the base versions of kept LoRA adapter versions (protocol/adapter.py) stay while those refer to them
        bases = {base_of(vb.manifest) for v, vb in self._versions.items() if v in keep_done or not vb.complete}
        keep_done |= bases - {None}
        newest = done[-1] if done else None
        for v in list(self._versions):
            vb = self._versions[v]
            if vb.complete and v not in keep_done:
                self._drop(v)
            elif not vb.complete and newest is not None and v < newest and v != self.pinned and v not in bases:
                self._drop(v)
        self._zombies = [z for z in self._zombies if not z.close()]

    def _retire(self, vb: VersionBuffer) -> None:
        if not vb.close():
            self._zombies.append(vb)

    def _drop(self, version: int) -> None:
        vb = self._versions.pop(version, None)
        if vb is not None:
            self._retire(vb)
        if self.directory:
            self._delete_files(version)

    def _delete_files(self, version: int) -> None:
        for ext in ("complete", "manifest"):
            _unlink(self._path(version, ext))
        _unlink_later(self._path(version, "bin"))

    def close(self) -> None:
        with self._lock:
            for vb in self._versions.values():
                if vb._mm is not None:  # noqa: SLF001
                    try:
                        vb._mm.flush()  # noqa: SLF001
                    except Exception:
                        pass
                self._retire(vb)
            self._versions.clear()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_deleter: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _unlink_later(path: str) -> None:
    """Delete in a background thread: unlinking a multi-GB file blocks for a while (the swarm loop must not)."""
    global _deleter
    if _deleter is None:
        _deleter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weights-delete")
    _deleter.submit(_unlink, path)
