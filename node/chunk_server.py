"""Serving policy versions to other peers: manifests, have-bitmaps and chunks, over one stream protocol.

Handler ``gepo-swarm/<run>/weights/1``; each stream carries one request frame and one answer frame:

==========  =========================================  ===========================================================
op          request header                             answer
==========  =========================================  ===========================================================
manifest    ``v`` (None: newest complete)              ``{ok, v, d}`` + signed manifest bytes
have        ``v``                                      ``{ok, v, d, bm, complete, versions}``
chunk       ``v``, ``d`` (manifest digest), ``i``      ``{ok, v, i, bm}`` + the chunk's bytes, or an error:
            (None: "you choose"), ``excl`` (bitmap     ``unknown_version`` / ``missing`` (with ``bm``) /
            of chunks the requester has or is          ``rationed`` / ``busy`` (with ``retry_after``)
            already fetching)
deltas      (nothing)                                  ``{ok}`` + msgpack ``{deltas: [[base, v, size, digest]], fulls:
                                                       [[v, size, digest]], keyframe}``: what this node holds
==========  =========================================  ===========================================================

A request with ``b`` (an int) is about the delta ``b -> v`` (:mod:`node.delta_store`) instead of the full version
``v``: ``manifest`` answers its signed delta manifest, ``have``/``chunk`` its compressed chunks, exactly as for a
version (``d`` is then the delta manifest's digest).

Every answer to a chunk request carries the server's current bitmap (``bm``): an active downloader learns what its
sources hold for free ("have" messages piggy-backed on the data). At most ``max_uploads`` chunks are sent at once
(others wait up to a few seconds, then get ``busy``) and every byte goes through the node's upload
:class:`~node.ratelimit.TokenBucket`.

:class:`ChunkRationer` (learner only) makes the learner a "super-seed": a request without an index gets the chunk
served least so far that the requester lacks, and a chunk is served again only after ``interval`` seconds, so each
chunk leaves the learner about once per interval however many samplers ask; the samplers copy it among themselves.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import msgpack
import numpy as np

from .fairness import PeerRateLimiter
from .ratelimit import TokenBucket
from .weights_store import WeightStore, unpack_bits
from .wire import WireError, error_header, recv_header, send_frame

logger = logging.getLogger(__name__)


MAX_TRACKED_PEERS = 1024  # per version, for the rationer's "who took how many copies" (hoarding) count
#: default seconds (``--hoard-grace``) a hoarder (below) has to pass on a chunk before the learner serves that chunk
#: again regardless: an honest peer that happened to fetch most first copies (the first to ask, or a small version or
#: delta that one peer gets in a burst) shares them within this time; without the grace its copies were re-served at
#: once to everybody, and the learner, not the samplers, uploaded most bytes (issue 13's "samplers served 28 %" in
#: make demo).
HOARD_GRACE_S = 2.0
RATIONED_OBJECTS = 16  # versions and deltas whose serve counts the rationer keeps (the newest ones)
MAX_LISTED = 2048  # deltas / versions named in one `deltas` answer (newest first)


def _recency(key) -> Tuple[int, int]:
    """Sort key of a served object: a version ``v`` or a delta ``(base, v)``, newest target version last."""
    return (key, -1) if isinstance(key, int) else (key[1], key[0])


class ChunkRationer:
    """Per-version, per-chunk serve counts and times for the learner's "super-seeding"."""

    def __init__(self, interval: Optional[float], upload_limit: Optional[float], min_interval: float = 5.0,
                 hoard_grace: float = HOARD_GRACE_S):
        self.fixed_interval = interval
        self.hoard_grace = float(hoard_grace)
        self.upload_limit = upload_limit
        self.min_interval = min_interval
        self._state: Dict[int, Tuple[np.ndarray, np.ndarray, float]] = {}
        # version -> chunk -> peers it was served to (bounded), and re-serves granted per peer
        self._served_to: Dict[int, Dict[int, List[str]]] = {}
        self._resends: Dict[int, Counter] = {}
        # version -> chunks served to each peer (at most MAX_TRACKED_PEERS peers per version)
        self._copies_to: Dict[int, Counter] = {}
        self.hoard_waivers = 0

    def interval_for(self, total_size: int) -> float:
        if self.fixed_interval is not None:
            return float(self.fixed_interval)
        rate = self.upload_limit or 50e6
        return max(self.min_interval, 2.0 * total_size / rate)

    def register(self, version: int, n_chunks: int, total_size: int) -> None:
        if version not in self._state:
            self._state[version] = (
                np.zeros(n_chunks, dtype=np.int64),
                np.full(n_chunks, -np.inf),
                self.interval_for(total_size),
            )
            self._served_to[version] = defaultdict(list)
            self._resends[version] = Counter()
            self._copies_to[version] = Counter()
            for v in sorted(self._state, key=_recency)[:-RATIONED_OBJECTS]:
                del self._state[v]
                self._served_to.pop(v, None)
                self._resends.pop(v, None)
                self._copies_to.pop(v, None)

    def _hoarders(self, version: int, requester: str, n_chunks: int) -> set:
        """Peers that took more than 1.5 x an equal share of this version's copies from us (the requester counted
        as one of the sharers): a chunk that went only to them does not count as seeded. Two peers that split a
        version between them are not hoarders when a third arrives; one that took every copy is."""
        copies = self._copies_to[version]
        n_peers = len(copies) + (requester not in copies)
        if n_peers < 2:
            return set()
        share = -(-3 * n_chunks // (2 * n_peers))
        return {p for p, n in copies.items() if n > share and p != requester}

    def choose(
        self,
        version: int,
        lacking: np.ndarray,
        requested: Optional[int],
        now: Optional[float] = None,
        requester: Optional[str] = None,
    ) -> Tuple[Optional[int], float]:
        """Pick the chunk to send (marking it served) or return ``(None, retry_after)``.

        ``lacking``: chunks the requester neither holds nor is fetching elsewhere. A chunk already served *to this
        requester* that it still lacks was evidently lost on the way (a broken transfer): it may be served to it
        again at once, up to a small per-requester budget."""
        counts, last, interval = self._state[version]
        now = time.monotonic() if now is None else now
        eligible = lacking & ((counts == 0) | (now - last >= interval))
        grace_wait = np.inf
        if requester is not None and not eligible.any() and lacking.any():
            # "ration stealing": a peer that fetches every first copy and shares none must not make everybody
            # else wait out the interval. A chunk whose every copy went to such hoarders is served again once the
            # hoarders had ``hoard_grace`` s to pass it on (as an honest peer does).
            hoarders = self._hoarders(version, requester, len(counts))
            if hoarders:
                served_to = self._served_to[version]
                hoarded = [i for i in np.flatnonzero(lacking).tolist()
                           if requester not in served_to.get(i, ()) and set(served_to.get(i, ())) <= hoarders]
                grace = min(self.hoard_grace, interval / 2)
                if hoarded:
                    grace_wait = float(np.min(last[hoarded] + grace - now))
                hoarded = [i for i in hoarded if now - last[i] >= grace]
                if hoarded:
                    self.hoard_waivers += 1
                    eligible = np.zeros_like(lacking)
                    eligible[hoarded] = True
        if requester is not None and not eligible.any() and lacking.any():
            served_to = self._served_to[version]
            budget = max(2, len(counts) // 8)
            lost = [i for i in np.flatnonzero(lacking).tolist() if requester in served_to.get(i, ())]
            if lost and self._resends[version][requester] < budget:
                self._resends[version][requester] += 1
                eligible = np.zeros_like(lacking)
                eligible[lost] = True
        if not eligible.any():
            if not lacking.any():
                return None, 0.0
            wait = min(float(np.min(last[lacking] + interval - now)), grace_wait)
            return None, max(0.2, wait)
        cand = np.flatnonzero(eligible)
        best = cand[counts[cand] == counts[cand].min()]
        if requested is not None and requested in set(best.tolist()):
            index = int(requested)
        else:
            index = int(best[random.randrange(len(best))])
        counts[index] += 1
        last[index] = now
        if requester is not None:
            peers = self._served_to[version][index]
            peers.append(requester)
            del peers[:-8]
            copies = self._copies_to[version]
            if requester in copies or len(copies) < MAX_TRACKED_PEERS:
                copies[requester] += 1
        return index, 0.0

    def unserve(self, version: int, index: int, requester: Optional[str] = None) -> None:
        st = self._state.get(version)
        if st is not None and st[0][index] > 0:
            st[0][index] -= 1
            st[1][index] = -np.inf
            copies = self._copies_to.get(version)
            if requester is not None and copies is not None and copies.get(requester, 0) > 0:
                copies[requester] -= 1

    def served_counts(self, version: int) -> Optional[np.ndarray]:
        st = self._state.get(version)
        return None if st is None else st[0].copy()


@dataclass
class UploadStats:
    bytes_up: int = 0
    chunks_served: int = 0
    requests: int = 0
    busy: int = 0
    rationed: int = 0
    failed: int = 0
    limited: int = 0  # requests answered busy because their peer exceeded its request rate


class ChunkServer:
    """Answers the weights protocol from a :class:`WeightStore`. Create one per node; register :meth:`handle`."""

    def __init__(
        self,
        store: WeightStore,
        limiter: TokenBucket,
        *,
        max_uploads: int = 4,
        rpc_timeout: float = 10.0,
        stall_timeout: float = 15.0,
        rationer: Optional[ChunkRationer] = None,
        deltas: Optional[WeightStore] = None,
        slot_wait: float = 5.0,
        keepalive: float = 30.0,
        max_streams: int = 256,
        max_streams_per_peer: int = 8,
        max_uploads_per_peer: int = 2,
        requests_per_peer: Optional[float] = None,
    ):
        self.store = store
        self.deltas = deltas  # a node.delta_store.DeltaStore: the deltas this node serves (None: none)
        self.limiter = limiter
        self.rationer = rationer
        self.rpc_timeout = rpc_timeout
        self.stall_timeout = stall_timeout
        self.slot_wait = slot_wait
        self.max_uploads = max_uploads
        self.keepalive = keepalive
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self.max_uploads_per_peer = max_uploads_per_peer
        self._peer_uploads: Counter = Counter()
        self.request_rate = PeerRateLimiter(requests_per_peer)
        self._streams = 0
        self._peer_streams: Counter = Counter()
        self._slots: Optional[asyncio.Semaphore] = None
        self.stats = UploadStats()
        self.bytes_by_version: Dict[int, int] = defaultdict(int)
        self.bytes_by_delta: Dict[str, int] = defaultdict(int)  # "base-version" -> bytes uploaded
        #: test hook: ``tamper(key, index, data) -> bytes`` replaces the bytes sent for a chunk (key: a version, or
        #: ``(base, version)`` for a delta)
        self.tamper: Optional[Callable[[int, int, memoryview], bytes]] = None

    async def handle(self, peer_id, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the requests of one stream in order until the peer closes it (or is idle for ``keepalive`` s)."""
        peer = str(peer_id)
        if self._streams >= self.max_streams or self._peer_streams[peer] >= self.max_streams_per_peer:
            await self._reply(writer, error_header("busy", retry_after=1.0 + random.random()))
            return
        self._streams += 1
        self._peer_streams[peer] += 1
        try:
            timeout = self.rpc_timeout
            while True:
                try:
                    header, _ = await recv_header(reader, timeout=timeout, max_payload=0)
                except WireError as e:
                    if e.eof or "sent nothing" in str(e):
                        return
                    raise
                timeout = self.keepalive
                op = header.get("op")
                self.stats.requests += 1
                if not self.request_rate.allow(peer):
                    self.stats.limited += 1
                    await self._reply(writer, error_header("busy", "request rate limit",
                                                           retry_after=0.5 + random.random()))
                    continue
                if op == "chunk":
                    await self._chunk(header, writer, peer)
                elif op == "have":
                    await self._have(header, writer)
                elif op == "manifest":
                    await self._manifest(header, writer)
                elif op == "deltas":
                    await self._listing(writer)
                else:
                    await self._reply(writer, error_header("bad_request", f"unknown op {str(op)[:32]!r}"))
                    return
        finally:
            self._streams -= 1
            self._peer_streams[peer] -= 1
            if not self._peer_streams[peer]:
                del self._peer_streams[peer]

    async def _reply(self, writer, header, payload=None, version=None) -> None:
        """``version``: the key of the object served (a version, or a delta's ``(base, version)``), for the stats."""
        by_delta = isinstance(version, tuple)
        name = f"{version[0]}-{version[1]}" if by_delta else version

        def count(n: int) -> None:
            self.stats.bytes_up += n
            if version is not None:
                (self.bytes_by_delta if by_delta else self.bytes_by_version)[name] += n

        await send_frame(writer, header, payload, timeout=self.stall_timeout, limiter=self.limiter, counter=count)

    def _versions(self):
        return [[vb.version, vb.complete] for vb in self.store.versions()]

    def _object(self, header):
        """The version (or, with ``b``, the delta) a request is about, or None."""
        v, b = header.get("v"), header.get("b")
        if type(v) is not int:
            return None
        if b is None:
            return self.store.get(v)
        if type(b) is not int or self.deltas is None:
            return None
        return self.deltas.get((b, v))

    async def _manifest(self, header, writer) -> None:
        vb = self.store.latest_complete() if header.get("v") is None and header.get("b") is None else self._object(header)
        if vb is None:
            await self._reply(writer, error_header("unknown_version", versions=self._versions()))
            return
        await self._reply(writer, {"ok": True, "v": vb.version, "d": vb.digest}, vb.manifest_bytes, vb.key)

    async def _listing(self, writer) -> None:
        """What this node holds completely, for a sampler planning how to catch up (node/catchup.py)."""
        deltas = [] if self.deltas is None else self.deltas.deltas(complete_only=True)
        listing = {
            "deltas": [[vb.base, vb.version, vb.total_size, vb.digest] for vb in deltas[-MAX_LISTED:]],
            "fulls": [[vb.version, vb.total_size, vb.digest] for vb in self.store.versions() if vb.complete][-MAX_LISTED:],
            "keyframe": self.store.pinned,
        }
        await self._reply(writer, {"ok": True}, msgpack.packb(listing, use_bin_type=True))

    async def _have(self, header, writer) -> None:
        vb = self._object(header)
        if vb is None:
            await self._reply(writer, error_header("unknown_version", versions=self._versions()))
            return
        await self._reply(
            writer,
            {"ok": True, "v": vb.version, "d": vb.digest, "bm": vb.bitmap(), "complete": vb.complete,
             "versions": self._versions()},
        )

    async def _chunk(self, header, writer, requester: str = "") -> None:
        digest, index = header.get("d"), header.get("i")
        vb = self._object(header)
        if vb is None or (digest is not None and digest != vb.digest):
            await self._reply(writer, error_header("unknown_version", versions=self._versions()))
            return
        if index is not None and (not isinstance(index, int) or not 0 <= index < vb.n_chunks):
            await self._reply(writer, error_header("bad_request", "chunk index out of range"))
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_uploads)
        if self._peer_uploads[requester] >= self.max_uploads_per_peer:
            self.stats.busy += 1
            await self._reply(writer, error_header("busy", retry_after=0.5 + random.random(), bm=vb.bitmap()))
            return
        self._peer_uploads[requester] += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.slot_wait)
        except asyncio.TimeoutError:
            self._peer_uploads[requester] -= 1
            self.stats.busy += 1
            await self._reply(writer, error_header("busy", retry_after=0.5 + random.random(), bm=vb.bitmap()))
            return
        chosen = None
        try:
            excl = unpack_bits(header.get("excl"), vb.n_chunks) if header.get("excl") is not None else None
            lacking = vb.have.copy() if excl is None else (vb.have & ~excl)
            if self.rationer is not None and vb.complete:
                self.rationer.register(vb.key, vb.n_chunks, vb.total_size)
                if excl is None and index is not None:  # a plain request for one chunk
                    lacking[:] = False
                    lacking[index] = vb.have[index]
                # with ``excl`` the requested index is only a preference: the rationer may substitute
                chosen, retry_after = self.rationer.choose(vb.key, lacking, index, requester=requester or None)
                if chosen is None:
                    self.stats.rationed += 1
                    code = "rationed" if lacking.any() else "missing"
                    await self._reply(writer, error_header(code, retry_after=retry_after, bm=vb.bitmap()))
                    return
                index = chosen
            elif index is None:
                cand = np.flatnonzero(lacking)
                if not len(cand):
                    await self._reply(writer, error_header("missing", bm=vb.bitmap()))
                    return
                index = int(cand[random.randrange(len(cand))])
            elif not vb.have[index]:
                await self._reply(writer, error_header("missing", bm=vb.bitmap()))
                return
            data = vb.chunk_view(index)
            if self.tamper is not None:
                data = self.tamper(vb.key, index, data)
            await self._reply(writer, {"ok": True, "v": vb.version, "i": index, "bm": vb.bitmap()}, data, vb.key)
            self.stats.chunks_served += 1
        except BaseException:
            self.stats.failed += 1
            if chosen is not None and self.rationer is not None:
                self.rationer.unserve(vb.key, chosen, requester or None)
            raise
        finally:
            self._slots.release()
            self._peer_uploads[requester] -= 1
            if self._peer_uploads[requester] <= 0:
                del self._peer_uploads[requester]
