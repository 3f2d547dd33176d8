"""Where a node keeps weight deltas (:mod:`protocol.delta`): the compressed chunks of each delta, back to back.

A delta ``base -> version`` is stored and swarmed like a version (:class:`~node.weights_store.VersionBuffer`): its
chunk ``i`` is compressed chunk ``i`` of the signed :class:`~protocol.delta.DeltaManifest`, whose SHA-256 and length
the manifest lists. :class:`DeltaLayout` gives a delta manifest the chunk interface of a weight manifest
(``chunk_range``, ``chunk_hash``, ``n_chunks``, ``total_size``), so the chunk server, the fetcher and the resume
logic are the ones full versions use.

* The learner keeps its deltas in memory (:meth:`DeltaStore.add_complete`).
* A sampler downloads into ``<weights_dir>/deltas/d<base>-<version>.bin`` next to the signed manifest; chunks are
  persisted as they are verified, and :meth:`DeltaStore.load` re-hashes them after a restart (a killed download
  resumes where it stopped).
* Complete deltas are kept while they fit in ``keep_bytes`` (``--delta-keep-bytes``), those into the newest version
  first: what other peers, catching up, may still ask for. The deltas into the newest version are always kept.
  Deltas into versions ``keep_versions`` or more behind the newest are dropped even within the budget: a peer that
  far behind is served more cheaply by the keyframe and a cumulative delta, and without this bound a small model's
  deltas filled the whole 1 GiB budget (the learner's RSS grew 32 MB/min for 15 minutes in a 30-minute soak).
"""

from __future__ import annotations

import logging
import re
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from protocol.delta import DeltaManifest

from .weights_store import VersionBuffer, WeightStore

logger = logging.getLogger(__name__)

DeltaKey = Tuple[int, int]  # (base version, version)
_NAME = re.compile(r"^d(\d{12})-(\d{12})$")


class DeltaLayout:
    """A delta manifest seen as a chunked buffer: chunk ``i`` is compressed chunk ``i``, stored back to back."""

    def __init__(self, delta: DeltaManifest):
        self.delta = delta
        self.version = delta.version
        self.base_version = delta.base_version
        self.n_chunks = delta.n_chunks
        self.total_size = delta.compressed_size
        self.chunk_size = max(delta.chunk_sizes, default=0)  # the largest chunk: what one answer may carry
        self._offsets = np.concatenate([[0], np.cumsum(np.asarray(delta.chunk_sizes, dtype=np.int64))])

    def chunk_range(self, index: int) -> Tuple[int, int]:
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} outside [0, {self.n_chunks})")
        return int(self._offsets[index]), int(self._offsets[index + 1])

    def chunk_hash(self, index: int) -> bytes:
        return self.delta.chunk_hash(index)


class DeltaStore(WeightStore):
    """Deltas keyed by ``(base, version)``, kept within a byte budget. Thread-safe (the WeightStore machinery)."""

    def __init__(self, directory: Optional[str] = None, keep_bytes: int = 1 << 30,
                 keep_versions: Optional[int] = None):
        super().__init__(directory, keep=1)
        self.keep_bytes = max(0, int(keep_bytes))
        self.keep_versions = None if keep_versions is None else max(1, int(keep_versions))

    @staticmethod
    def _key(manifest) -> Any:
        return (manifest.base_version, manifest.version)

    @staticmethod
    def _name(key) -> str:
        return f"d{key[0]:012d}-{key[1]:012d}"

    @staticmethod
    def _parse_name(stem: str) -> Any:
        m = _NAME.match(stem)
        return None if m is None else (int(m.group(1)), int(m.group(2)))

    # --- queries --------------------------------------------------------------------------------------------------
    def deltas(self, complete_only: bool = False) -> List[VersionBuffer]:
        """Held deltas, newest target version last."""
        with self._lock:
            items = [vb for vb in self._versions.values() if vb.complete or not complete_only]
        return sorted(items, key=lambda vb: (vb.version, vb.base))

    def chunks(self, key: DeltaKey) -> Sequence[memoryview]:
        vb = self.get(key)
        if vb is None or not vb.complete:
            raise KeyError(f"delta {key} is not held completely")
        return [vb.chunk_view(i) for i in range(vb.n_chunks)]

    def held_bytes(self) -> int:
        with self._lock:
            return sum(vb.total_size for vb in self._versions.values() if vb.complete)

    # --- learner side ---------------------------------------------------------------------------------------------
    def add_delta(self, delta: DeltaManifest, manifest_bytes: bytes, chunks: Sequence[bytes]) -> VersionBuffer:
        """Register a delta the learner just encoded (its chunks joined into one buffer)."""
        return self.add_complete(DeltaLayout(delta), manifest_bytes, bytearray(b"".join(chunks)))

    def drop(self, key: DeltaKey) -> None:
        with self._lock:
            if key in self._versions:
                self._drop(key)

    def discard_partial(self, up_to_version: int, keep: Sequence[DeltaKey] = ()) -> None:
        """Drop incomplete downloads of deltas into ``up_to_version`` or older (no longer wanted), except ``keep``."""
        with self._lock:
            for key, vb in list(self._versions.items()):
                if not vb.complete and key[1] <= up_to_version and key not in keep:
                    self._drop(key)

    # --- housekeeping ---------------------------------------------------------------------------------------------
    def _prune(self) -> None:
        done = sorted((vb for vb in self._versions.values() if vb.complete), key=lambda vb: (vb.version, vb.base))
        newest = done[-1].version if done else None
        budget = self.keep_bytes
        for vb in reversed(done):
            if vb.version == newest:
                budget -= vb.total_size  # always kept: the deltas into the newest version
            elif vb.total_size <= budget and (self.keep_versions is None
                                              or newest - vb.version < self.keep_versions):
                budget -= vb.total_size
            else:
                logger.debug("dropping delta %s (over the %d-byte budget or %s versions old)", vb.key, self.keep_bytes,
                             self.keep_versions)
                self._drop(vb.key)
        self._zombies = [z for z in self._zombies if not z.close()]
