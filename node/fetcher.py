"""Downloading one policy version from the learner and from other peers (BitTorrent-style).

:class:`VersionFetcher` fills a preallocated :class:`~node.weights_store.VersionBuffer`:

* **Sources**: the learner, plus up to ``max_peers`` neighbours found through the DHT (their signed
  :class:`protocol.records.ChunkHave` records for this version). Each source's bitmap is refreshed by a direct
  ``have`` request every ``have_poll`` seconds while idle, and for free with every chunk it serves.
* **Rarest first**: a free slot of a neighbour is given the chunk it holds that the fewest known neighbours hold
  (random among ties). The learner is asked for the rarest chunk too, with a bitmap of what we hold or are already
  fetching, and - when it rations - may substitute the chunk it has served least.
* **Bounded**: at most ``max_inflight`` requests, ``max_inflight_per_peer`` per source; every dial, request and
  transfer has a timeout; a failing source backs off exponentially.
* **Verified**: a chunk is streamed into its slot of the buffer (hashed on the fly) and marked held only if its
  SHA-256 matches the one in the signed manifest. A peer that sends a bad chunk (or a wrong length) is blacklisted
  and never asked again.
* **Pipelined**: one keep-alive stream per source carries up to ``max_inflight_per_peer`` requests; answers come
  back in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from collections import deque
from typing import Awaitable, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np


from .weights_store import VersionBuffer, pack_bits, unpack_bits
from .wire import RemoteError, WireError, close_writer, encode_frame, open_stream, recv_header, recv_payload
from .loop import wait_event
from .wire import recv_payload_into, send_frame

logger = logging.getLogger(__name__)


class Blacklist:
    """Peers caught serving bad data; never asked again for ``ttl`` seconds (default: an hour)."""

    def __init__(self, ttl: float = 3600.0):
        self.ttl = ttl
        self._until: Dict[str, Tuple[float, str]] = {}

    def add(self, peer_id, reason: str) -> None:
        key = str(peer_id)
        if key not in self:
            logger.warning("blacklisting peer %s: %s", key, reason)
        self._until[key] = (time.monotonic() + self.ttl, reason)

    def __contains__(self, peer_id) -> bool:
        item = self._until.get(str(peer_id))
        if item is None:
            return False
        if item[0] < time.monotonic():
            del self._until[str(peer_id)]
            return False
        return True

    def entries(self) -> Dict[str, str]:
        return {k: r for k, (t, r) in self._until.items() if t >= time.monotonic()}


@dataclass
class FetchStats:
    bytes_down: int = 0
    chunks_from_learner: int = 0
    chunks_from_peers: int = 0
    bad_chunks: int = 0
    wasted_bytes: int = 0
    failed_requests: int = 0
    rationed: int = 0


@dataclass
class Source:
    peer_id: object
    is_learner: bool = False
    maddrs: List[str] = field(default_factory=list)
    bits: Optional[np.ndarray] = None
    inflight: int = 0
    backoff_until: float = 0.0
    failures: int = 0
    last_have: float = -1e9
    have_task: Optional[asyncio.Task] = None
    dialed: bool = False
    session: Optional[asyncio.Task] = None
    writer: Optional[asyncio.StreamWriter] = None
    pending: Deque[int] = field(default_factory=deque)  # reserved chunk per request on the session, in order
    unsent: List[bytes] = field(default_factory=list)

    def usable(self, now: float) -> bool:
        return now >= self.backoff_until


PeerInfo = Tuple[object, List[str], Optional[np.ndarray]]  # (peer id, multiaddrs, coarse bitmap or None)


class VersionFetcher:
    def __init__(
        self,
        *,
        node,
        proto: str,
        vb: VersionBuffer,
        learner: Optional[Tuple[object, List[str]]],
        discover: Optional[Callable[[], Awaitable[List[PeerInfo]]]],
        config,
        blacklist: Blacklist,
        stats: Optional[FetchStats] = None,
        self_peer_id=None,
    ):
        self.node = node
        self.proto = proto
        self.vb = vb
        self.cfg = config
        self.blacklist = blacklist
        self.stats = stats or FetchStats()
        self.discover = discover if config.swarming else None
        self.self_peer_id = str(self_peer_id) if self_peer_id is not None else None
        self.learner: Optional[Source] = None
        if learner is not None:
            self.learner = Source(peer_id=learner[0], is_learner=True, maddrs=list(learner[1]))
        self.peers: Dict[str, Source] = {}
        # what requests name: the version, or (a delta, node/delta_store.py) also its base version
        self._object = {"v": vb.version} if vb.base is None else {"v": vb.version, "b": vb.base}
        self._inflight = np.zeros(vb.n_chunks, dtype=bool)
        self._total_inflight = 0
        self._tasks: Set[asyncio.Task] = set()
        self._wake: Optional[asyncio.Event] = None
        self._discover_task: Optional[asyncio.Task] = None
        self.last_progress = time.monotonic()
        self.started_at = time.monotonic()

    # ------------------------------------------------------------------------------------------------------------
    def set_learner(self, peer_id, maddrs: Iterable[str]) -> None:
        if self.learner is None or str(self.learner.peer_id) != str(peer_id):
            self.learner = Source(peer_id=peer_id, is_learner=True, maddrs=list(maddrs))
        else:
            self.learner.maddrs = list(maddrs)
            self.learner.dialed = False
            self.learner.backoff_until = 0.0
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> VersionBuffer:
        self._wake = asyncio.Event()
        vb = self.vb
        last_discover = -1e9
        try:
            while not vb.have.all():
                self._wake.clear()
                now = time.monotonic()
                if self.discover is not None and now - last_discover >= self._discover_period():
                    if self._discover_task is None or self._discover_task.done():
                        last_discover = now
                        self._discover_task = asyncio.create_task(self._refresh_peers())
                for src in list(self.peers.values()):
                    if (
                        src.inflight == 0
                        and (src.have_task is None or src.have_task.done())
                        and now - src.last_have >= self.cfg.have_poll
                        and src.usable(now)
                        and not (src.bits is not None and src.bits.all())
                    ):
                        src.have_task = self._spawn(self._poll_have(src))
                self._schedule(now)
                await wait_event(self._wake, self.cfg.have_poll)
            return vb
        finally:
            for t in list(self._tasks):
                t.cancel()
            if self._discover_task is not None:
                self._discover_task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)

    def _discover_period(self) -> float:
        if len(self.peers) < self.cfg.max_peers and time.monotonic() - self.started_at < 10:
            return 0.5
        return 3.0

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ------------------------------------------------------------------------------------------------------------
    def _schedule(self, now: float) -> None:
        cfg = self.cfg
        if self._total_inflight >= cfg.max_inflight:
            return
        need = ~self.vb.have & ~self._inflight
        if not need.any():
            return
        peers = [
            p for p in self.peers.values()
            if p.bits is not None and p.usable(now) and p.inflight < cfg.max_inflight_per_peer
            and p.peer_id not in self.blacklist
        ]
        avail = np.zeros(self.vb.n_chunks, dtype=np.int32)
        for p in self.peers.values():
            if p.bits is not None:
                avail += p.bits
        random.shuffle(peers)
        progress = True
        while progress and self._total_inflight < cfg.max_inflight and peers:
            progress = False
            for p in peers:
                if p.inflight >= cfg.max_inflight_per_peer or self._total_inflight >= cfg.max_inflight:
                    continue
                cand = need & p.bits
                if not cand.any():
                    continue
                idx = np.flatnonzero(cand)
                a = avail[idx]
                best = idx[a == a.min()]
                i = int(best[random.randrange(len(best))])
                need[i] = False
                self._start(p, i)
                progress = True
        src = self.learner
        while (
            src is not None
            and src.usable(now)
            and src.inflight < cfg.max_inflight_per_peer
            and self._total_inflight < cfg.max_inflight
            and need.any()
        ):
            idx = np.flatnonzero(need)
            a = avail[idx]
            best = idx[a == a.min()]
            i = int(best[random.randrange(len(best))])
            need[i] = False
            self._start(src, i)

    def _start(self, src: Source, index: int) -> None:
        """Reserve chunk ``index`` and queue a request for it on ``src``'s session (opened on demand)."""
        src.inflight += 1
        self._total_inflight += 1
        self._inflight[index] = True
        header = {"op": "chunk", **self._object, "d": self.vb.digest, "i": index, "excl": None}
        if src.is_learner:  # what we hold or are fetching elsewhere (not the chunk asked for here)
            busy = self.vb.have | self._inflight
            busy[index] = self.vb.have[index]
            header["excl"] = pack_bits(busy)
        frame = encode_frame(header)
        src.pending.append(index)
        if src.writer is not None:
            src.writer.write(frame)
        else:
            src.unsent.append(frame)
        if src.session is None or src.session.done():
            src.session = self._spawn(self._session(src))

    async def _ensure_dialed(self, src: Source) -> None:
        if not src.dialed and src.maddrs:
            await self.node.connect(src.peer_id, src.maddrs)
        src.dialed = True

    def _fail(self, src: Source, why: str) -> None:
        self.stats.failed_requests += 1
        src.failures += 1
        src.backoff_until = time.monotonic() + min(30.0, 0.25 * 2 ** min(src.failures, 8)) * (0.5 + random.random())
        src.dialed = False
        logger.debug("source %s failed (%d in a row): %s", src.peer_id, src.failures, why)
        if not src.is_learner and src.failures >= 4:
            self.peers.pop(str(src.peer_id), None)

    def _release(self, src: Source, reserved: Optional[int]) -> None:
        if reserved is not None:
            self._inflight[reserved] = False
        src.inflight -= 1
        self._total_inflight -= 1
        self._poke()

    async def _session(self, src: Source) -> None:
        """One keep-alive stream to ``src``: requests are pipelined (``max_inflight_per_peer`` deep), answers come
        back in order and are read here, each straight into its slot of the preallocated buffer."""
        cfg = self.cfg
        writer = None
        try:
            await self._ensure_dialed(src)
            reader, writer = await open_stream(self.node.p2p, src.peer_id, self.proto, timeout=cfg.connect_timeout)
            src.writer = writer
            for frame in src.unsent:
                writer.write(frame)
            src.unsent.clear()
            while src.pending:
                if not await self._read_answer(src, reader):
                    break
                if not src.pending:  # let the scheduler queue more before closing the stream
                    self._poke()
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
        except (WireError, RemoteError, OSError, asyncio.TimeoutError) as e:
            self._fail(src, str(e))
        finally:
            src.writer = None
            src.unsent.clear()
            while src.pending:
                self._release(src, src.pending.popleft())
            if writer is not None:
                await close_writer(writer)

    async def _read_answer(self, src: Source, reader: asyncio.StreamReader) -> bool:
        """Read the answer to ``src.pending[0]``. Returns False if the session should end."""
        cfg = self.cfg
        vb = self.vb
        header, plen = await recv_header(reader, timeout=cfg.rpc_timeout, max_payload=vb.manifest.chunk_size)
        reserved = src.pending.popleft()
        try:
            bits = unpack_bits(header.get("bm"), vb.n_chunks) if header.get("bm") is not None else None
            if bits is not None:
                src.bits = bits
                src.last_have = time.monotonic()
            if header.get("ok") is not True:
                if plen:
                    raise WireError("error answer with a payload")
                self._on_error_answer(src, header)
                return header.get("err") in ("missing", "rationed")
            index = header.get("i")
            if not isinstance(index, int) or not 0 <= index < vb.n_chunks:
                self._bad_peer(src, "answered with an invalid chunk index")
                return False
            start, end = vb.manifest.chunk_range(index)
            if plen != end - start:
                self._bad_peer(src, f"chunk {index} has {plen} bytes, expected {end - start}")
                return False
            if index != reserved:  # the learner substituted another chunk
                if vb.have[index] or self._inflight[index]:
                    await recv_payload(reader, plen, timeout=cfg.stall_timeout)
                    self.stats.wasted_bytes += plen
                    return True
                self._inflight[reserved] = False
                reserved = index
                self._inflight[index] = True
            hasher = hashlib.sha256()
            sink = vb.chunk_writer(index)

            def write(off: int, data: memoryview) -> None:
                sink(off, data)  # into its slot of the preallocated buffer
                hasher.update(data)  # hashed while still in cache (hashlib releases the GIL)

            await recv_payload_into(reader, write, size=plen, timeout=cfg.stall_timeout)
            self.stats.bytes_down += plen
            if hasher.digest() != vb.manifest.chunk_hash(index):  # the SHA-256 in the signed manifest
                self.stats.bad_chunks += 1
                what = f"version {vb.version}" if vb.base is None else f"delta {vb.base}->{vb.version}"
                self._bad_peer(src, f"chunk {index} of {what} does not match its hash")
                return False
            src.failures = 0
            self._accept_chunk(src, index)
            return True
        finally:
            self._release(src, reserved)

    def _accept_chunk(self, src: Source, index: int) -> None:
        vb = self.vb
        vb.mark(index)
        self.last_progress = time.monotonic()
        logger.debug("v%d chunk %d from %s%s (%d/%d)", vb.version, index, src.peer_id,
                     " (learner)" if src.is_learner else "", vb.n_have, vb.n_chunks)
        if src.is_learner:
            self.stats.chunks_from_learner += 1
        else:
            self.stats.chunks_from_peers += 1

    def _on_error_answer(self, src: Source, header) -> None:
        code = header.get("err")
        retry = header.get("retry_after")
        retry = float(retry) if isinstance(retry, (int, float)) and 0 <= retry <= 600 else 1.0
        logger.debug("v%d: %s answered %s (retry after %.1f s)", self.vb.version, src.peer_id, code, retry)
        if code == "rationed":
            self.stats.rationed += 1
            src.backoff_until = time.monotonic() + retry
        elif code == "busy":
            src.backoff_until = time.monotonic() + retry
        elif code == "missing":
            src.backoff_until = time.monotonic() + (max(0.5, retry) if src.is_learner else 0.0)
        elif code == "unknown_version":
            src.bits = None
            src.backoff_until = time.monotonic() + 2.0
        else:
            self._fail(src, f"error answer {code!r}")

    def _bad_peer(self, src: Source, why: str) -> None:
        if src.is_learner:
            logger.error("the learner sent bad data: %s", why)
            self._fail(src, why)
            return
        self.blacklist.add(src.peer_id, why)
        self.peers.pop(str(src.peer_id), None)

    # ------------------------------------------------------------------------------------------------------------
    async def _poll_have(self, src: Source) -> None:
        cfg = self.cfg
        try:
            await self._ensure_dialed(src)
            reader, writer = await open_stream(self.node.p2p, src.peer_id, self.proto, timeout=cfg.connect_timeout)
            try:
                await send_frame(writer, {"op": "have", **self._object}, timeout=cfg.rpc_timeout)
                header, _ = await recv_header(reader, timeout=cfg.rpc_timeout, max_payload=0)
            finally:
                await close_writer(writer)
            src.last_have = time.monotonic()
            if header.get("ok") is True and header.get("d") == self.vb.digest:
                bits = unpack_bits(header.get("bm"), self.vb.n_chunks)
                if bits is not None:
                    src.bits = bits
                    src.failures = 0
            else:
                src.bits = None
            self._poke()
        except (WireError, RemoteError, OSError, asyncio.TimeoutError) as e:
            src.last_have = time.monotonic()
            self._fail(src, str(e))

    async def _refresh_peers(self) -> None:
        try:
            found = await self.discover()
            logger.debug("v%d: discovered %d peers", self.vb.version, len(found))
        except Exception as e:
            logger.debug("peer discovery failed: %s", e)
            return
        random.shuffle(found)
        for peer_id, maddrs, bits in found:
            key = str(peer_id)
            if key == self.self_peer_id or peer_id in self.blacklist:
                continue
            if self.learner is not None and key == str(self.learner.peer_id):
                continue
            src = self.peers.get(key)
            if src is None:
                if len(self.peers) >= self.cfg.max_peers:
                    continue
                src = self.peers[key] = Source(peer_id=peer_id, maddrs=list(maddrs))
            elif maddrs:
                src.maddrs = list(maddrs)
            if bits is not None and len(bits) == self.vb.n_chunks and src.bits is None:
                src.bits = bits
        self._poke()
