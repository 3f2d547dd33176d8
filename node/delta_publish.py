"""The learner's side of weight deltas: which deltas each published version gets, and keyframes.

For each version v the learner publishes (besides the full version, as always):

* the **step delta** ``prev -> v`` from the version published before it (every version but the first);
* between keyframes, the **cumulative delta** ``k -> v`` from the last keyframe k (not when k is ``prev``: that is the
  step delta). A keyframe is the first version, every ``keyframe_every``-th version after the previous keyframe, and
  any version whose tensor layout differs from its predecessor's (no delta can cross a layout change).

The learner keeps the keyframe's full buffer next to the newest versions (``WeightStore.pin``) and the deltas within
``--delta-keep-bytes`` (:class:`node.delta_store.DeltaStore`), so that a sampler at any recent version can pick the
cheapest way to the newest one (node/catchup.py). Encoding is CPU work done in the publishing thread, not in the
swarm loop. See docs/SWARM.md, "Catching up with deltas".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import List, Optional, Tuple

from protocol._wire import digest
from protocol.delta import DeltaManifest, encode_delta, encode_delta_manifest
from protocol.identity import Identity
from protocol.manifest import WeightManifest
from protocol.records import MAX_BITMAP_BYTES

logger = logging.getLogger(__name__)

MAX_DELTA_CHUNKS = 8 * MAX_BITMAP_BYTES  # chunks a ChunkHave record can describe


@dataclasses.dataclass
class EncodedDelta:
    manifest: DeltaManifest
    manifest_bytes: bytes  # signed (protocol.delta.encode_delta_manifest)
    chunks: List[bytes]
    cumulative: bool  # from the keyframe (else from the previous version)


@dataclasses.dataclass
class _Version:
    manifest: WeightManifest
    buffer: memoryview
    digest: bytes  # SHA-256 of the buffer, hashed once per version (every delta names its base's and target's)


class DeltaPublisher:
    """Encodes and signs the deltas into each version the learner publishes; remembers the previous version and the
    keyframe (references to their buffers, which the learner never modifies after publishing)."""

    def __init__(self, identity: Identity, *, keyframe_every: int, chunk_size: int):
        self.identity = identity
        self.keyframe_every = max(1, int(keyframe_every))
        self.chunk_size = int(chunk_size)
        self.prev: Optional[_Version] = None
        self.keyframe: Optional[_Version] = None
        self.since_keyframe = 0
        self.cumulative: List[Tuple[int, int]] = []  # keys of the cumulative deltas published, oldest first
        self.last_encode_s = 0.0
        self._last_held: Optional[_Version] = None

    def encode(self, manifest: WeightManifest, buffer) -> Tuple[bool, List[EncodedDelta]]:
        """``(is_keyframe, deltas into manifest.version)``. Call :meth:`commit` once the version is published."""
        prev, key = self.prev, self.keyframe
        if prev is None or key is None or prev.manifest.version >= manifest.version:
            return True, []  # the first version (or one republished after a restart)
        t0 = time.perf_counter()
        target = self._held(manifest, buffer)
        deltas = []
        step = self._encode(prev, target, cumulative=False)
        keyframe = step is None or self.since_keyframe + 1 >= self.keyframe_every  # None: the layout changed
        if step is not None and step.manifest.compressed_size < manifest.total_size:
            deltas.append(step)
        if not keyframe and key.manifest.version < prev.manifest.version:
            cum = self._encode(key, target, cumulative=True)
            if cum is not None and cum.manifest.compressed_size < manifest.total_size:
                deltas.append(cum)
        self.last_encode_s = time.perf_counter() - t0
        logger.debug("version %d: %s, deltas %s in %.2f s", manifest.version, "keyframe" if keyframe else "",
                     [(d.manifest.base_version, d.manifest.compressed_size) for d in deltas], self.last_encode_s)
        return keyframe, deltas

    def commit(self, manifest: WeightManifest, buffer, keyframe: bool, deltas: List[EncodedDelta]
               ) -> List[Tuple[int, int]]:
        """Remember the version just published; returns the cumulative deltas now superseded (to drop: only those
        into the two newest versions are kept, a sampler wants the newest version)."""
        held = self._held(manifest, buffer)
        self.prev = held
        if keyframe:
            self.keyframe, self.since_keyframe = held, 0
        else:
            self.since_keyframe += 1
        self.cumulative += [(d.manifest.base_version, d.manifest.version) for d in deltas if d.cumulative]
        stale, self.cumulative = self.cumulative[:-2], self.cumulative[-2:]
        return stale

    def _held(self, manifest: WeightManifest, buffer) -> _Version:
        """The version as this publisher keeps it (hashed once: encode and commit see the same version)."""
        if self._last_held is None or self._last_held.manifest is not manifest:
            mv = memoryview(buffer).cast("B")
            self._last_held = _Version(manifest, mv, digest(mv))
        return self._last_held

    def _encode(self, base: _Version, target: _Version, *, cumulative: bool) -> Optional[EncodedDelta]:
        manifest = target.manifest
        chunk = self.chunk_size
        while -(-manifest.total_size // chunk) > MAX_DELTA_CHUNKS:
            chunk *= 2
        try:
            m, chunks = encode_delta(base.manifest, base.buffer, manifest, target.buffer, chunk_size=chunk,
                                     base_digest=base.digest, target_digest=target.digest)
        except ValueError as e:  # a layout change: this version becomes a keyframe
            logger.info("no delta %d -> %d: %s", base.manifest.version, manifest.version, e)
            return None
        return EncodedDelta(m, encode_delta_manifest(m, self.identity), chunks, cumulative)
