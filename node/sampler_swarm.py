"""The sampler's side of the swarm: find and trust the learner, deliver rollouts, fetch and share weights.

Synchronous, thread-safe facade over a background event loop (see :mod:`node.loop`)::

    swarm = SamplerSwarm(cfg).start()                     # joins, finds the learner (--learner-key or TOFU)
    v = swarm.wait_for_version(timeout=600)               # newest complete local version
    manifest, buf = swarm.get_weights(v)                  # read-only view; torch_state_dict(manifest, buf)
    swarm.submit(encode_group(group, swarm.identity))     # persisted in the outbox, delivered in background
    swarm.shutdown()

Background tasks (all in the swarm loop): the learner watcher (reads the signed heartbeat every
``poll_interval``), the sender (outbox -> learner with back-off), the version manager (starts a
:class:`~node.fetcher.VersionFetcher` when the learner announces a version newer than what we hold), the announcer
(signed ``ChunkHave`` records for what we hold, ``SamplerStatus`` status line), and the chunk server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from hivemind.p2p import PeerID

from protocol.errors import ProtocolError
from protocol.identity import Identity, parse_public_key, format_public_key
from protocol.delta import decode_delta_manifest
from protocol.manifest import WeightManifest, decode_manifest
from protocol.records import Ed25519OwnerValidator, LearnerHeartbeat

from .catchup import CatchUp
from .chunk_server import ChunkServer
from .delta_store import DeltaLayout, DeltaStore
from .config import SwarmConfig
from .dht import SwarmNode, tcp_port_open
from .loop import snapshot, wait_event
from .fetcher import Blacklist, FetchStats, VersionFetcher
from .journal import AnswerLog
from .outbox import Outbox, OutboxFull
from .ratelimit import TokenBucket
from .records import read_haves, read_heartbeats, store_have, store_status
from .weights_store import VersionBuffer, WeightStore, unpack_bits
from .wire import (
    RemoteError,
    WireError,
    close_writer,
    guarded_handler,
    open_stream,
    proto_name,
    recv_frame,
    send_frame,
)

logger = logging.getLogger(__name__)

__all__ = ["SamplerSwarm", "LearnerInfo", "OutboxFull"]

TRUST_FILE = "trusted_learner.txt"
PUSH_BATCH = 32
STATUS_MIN_INTERVAL = 5.0  # seconds between status records when report() changes them (else every ttl / 3)
SUPERSEDED_STALL_S = 3.0  # seconds without progress before abandoning a download the learner no longer serves
MAX_ANNOUNCED_DELTAS = 16  # the deltas (into the newest versions) whose have-records a sampler keeps alive
REJOIN_MIN, REJOIN_MAX = 1.0, 30.0  # back-off between re-dials of the bootstrap peers while the learner is unreachable


@dataclass
class LearnerInfo:
    key: bytes
    peer_id: str
    version: Optional[int]  # None until the learner has published weights
    manifest_digest: bytes
    weights_size: int
    maddrs: Tuple[str, ...]
    time: float


class SamplerSwarm:
    """
    :param config: transport settings; ``learner_key`` pins the learner (else trust on first use).
    :param identity: the sampler's Ed25519 identity (default: ``Identity.load_or_create(config.key_path)``,
        or a fresh in-memory one without ``key_path``).
    :param on_version: ``fn(version)`` called (in the swarm loop thread - keep it quick) when a version is ready.
    """

    def __init__(
        self,
        config: SwarmConfig,
        identity: Optional[Identity] = None,
        *,
        on_version: Optional[Callable[[int], None]] = None,
        keep_trying: bool = False,
    ):
        self.config = config
        if identity is None:
            identity = Identity.load_or_create(config.key_path) if config.key_path else Identity.generate()
        self.identity = identity
        self.on_version = on_version
        self.trusted_key: Optional[bytes] = parse_public_key(config.learner_key) if config.learner_key else None
        if self.trusted_key is None:
            self.trusted_key = self._load_trust_file()
        self.pinned = config.learner_key is not None
        self.untrusted_learners: List[str] = []  # learners announcing, none of them the trusted one
        self.node = SwarmNode(
            config,
            record_validators=[
                Ed25519OwnerValidator(config.run_id, identity, learner=self.trusted_key if self.pinned else None)
            ],
            require_bootstrap=not keep_trying,
        )
        self.loop = self.node.loop
        self.store = WeightStore(config.weights_dir, keep=config.keep_versions)
        self.deltas = DeltaStore(os.path.join(config.weights_dir, "deltas") if config.weights_dir else None,
                                 keep_bytes=config.delta_keep_bytes, keep_versions=2 * config.keyframe_every)
        self.catchup = CatchUp(self)  # how a new version is reached: full, or deltas (node/catchup.py)
        self.outbox = Outbox(config.outbox_dir, config.max_outbox_items, config.max_outbox_bytes)
        self.answers = AnswerLog(config.state_dir, identity.public_key)  # for node.audit (node/journal.py)
        self.limiter = TokenBucket(config.upload_limit)
        self.chunk_server = ChunkServer(
            self.store, self.limiter, max_uploads=config.max_uploads, rpc_timeout=config.rpc_timeout,
            stall_timeout=config.stall_timeout, keepalive=2 * config.rpc_timeout, deltas=self.deltas,
            max_streams_per_peer=config.max_chunk_streams_per_peer, requests_per_peer=config.chunk_requests_per_peer,
        )
        self.serving = config.swarming and not config.client_mode
        self.blacklist = Blacklist()
        self.fetch_stats = FetchStats()
        self.counters: Counter = Counter()
        self.rejections: Counter = Counter()
        self.learner: Optional[LearnerInfo] = None
        self.maddrs: List[str] = []
        self.ready: "queue.Queue[int]" = queue.Queue()
        self._ready_cond = threading.Condition()
        self._fetcher: Optional[VersionFetcher] = None
        self._fetch_task: Optional[asyncio.Task] = None
        self._fetch_version: Optional[int] = None
        self._tasks: List[asyncio.Task] = []
        self._send_wake: Optional[asyncio.Event] = None
        self._manager_wake: Optional[asyncio.Event] = None
        self._watch_wake: Optional[asyncio.Event] = None
        self._announce_wake: Optional[asyncio.Event] = None
        self._store_loaded = False
        self._send_failing = False
        # monotonic time since which the learner has been unreachable (None: it answers); set until first found
        self._unreachable_since: Optional[float] = time.monotonic()
        self._record_changed_at = 0.0  # monotonic time the learner record last advanced
        self._lock = threading.Lock()
        self._started = False
        self.version_times: Dict[int, float] = {}
        self.outbox.add_listener(self._on_outbox_put)
        self._reported: Dict[str, int] = {}
        self._reported_version: Optional[int] = None
        self._status_dirty = False
        self._created = time.monotonic()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return str(self.node.peer_id)

    @property
    def public_key_str(self) -> str:
        return self.identity.public_key_str

    @property
    def learner_key(self) -> Optional[str]:
        return None if self.trusted_key is None else format_public_key(self.trusted_key)

    def start(self, wait_for_learner: Optional[float] = None,
              on_waiting: Optional[Callable[[float], None]] = None) -> "SamplerSwarm":
        """Join the swarm and start the background tasks. With ``wait_for_learner``, also wait up to that many
        seconds for the learner's heartbeat (raises TimeoutError if none). Built with ``keep_trying=True``, a start
        while every bootstrap peer is down does not raise BootstrapError: the node starts alone and re-dials them
        with back-off (``REJOIN_MIN`` doubling to ``REJOIN_MAX`` s) until the learner's record is found
        (``wait_for_learner=math.inf`` waits for that). ``on_waiting(seconds_unreachable)`` is called in the calling
        thread about 20 times a second while waiting (a status line; it may raise to give up)."""
        with self._lock:
            if not self._started:
                self.node.start()
                try:
                    if self.trusted_key is not None:
                        self._load_store()
                    self.loop.run(self._astart(), self.config.call_timeout)
                except BaseException:
                    self.node.shutdown()
                    raise
                self._started = True
        if wait_for_learner:
            deadline = time.monotonic() + wait_for_learner
            while self.learner is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no learner heartbeat found within {wait_for_learner:.0f} s")
                if on_waiting is not None:
                    on_waiting(self.unreachable_for() or 0.0)
                time.sleep(0.05)
        return self

    async def _astart(self) -> None:
        run = self.config.run_id
        if self.serving:
            await self.node.p2p.add_binary_stream_handler(
                proto_name(run, "weights"), guarded_handler("weights", self.chunk_server.handle)
            )
        self.maddrs = await self.node.visible_maddrs()
        self._send_wake = asyncio.Event()
        self._manager_wake = asyncio.Event()
        self._watch_wake = asyncio.Event()
        self._announce_wake = asyncio.Event()
        if len(self.outbox):
            self._send_wake.set()
        for coro in (self._watch_loop(), self._send_loop(), self._manager_loop(), self._announce_loop()):
            self._tasks.append(asyncio.create_task(coro))

    # ------------------------------------------------------------------------------------------------------------
    # trust

    def _trust_path(self) -> Optional[str]:
        return os.path.join(self.config.state_dir, TRUST_FILE) if self.config.state_dir else None

    def _load_trust_file(self) -> Optional[bytes]:
        path = self._trust_path()
        if path and os.path.exists(path):
            try:
                key = parse_public_key(open(path).read().strip())
                logger.info("trusting the learner key remembered in %s: %s", path, format_public_key(key))
                return key
            except ProtocolError as e:
                logger.warning("ignoring %s: %s", path, e)
        return None

    def _trust_on_first_use(self, key: bytes) -> None:
        self.trusted_key = key
        text = format_public_key(key)
        msg = (
            "\n" + "!" * 100 + "\n"
            f"WARNING: no --learner-key given: trusting the first learner found, {text}\n"
            "WARNING: anyone can announce a learner. To be sure, restart with\n"
            f"WARNING:     --learner-key {text}\n" + "!" * 100
        )
        logger.warning(msg)
        print(msg, file=sys.stderr, flush=True)
        path = self._trust_path()
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text + "\n")

    def _load_store(self) -> None:
        if self._store_loaded:
            return
        self._store_loaded = True
        self.store.load(lambda data: decode_manifest(data, learner=self.trusted_key))
        self.deltas.load(lambda data: DeltaLayout(decode_delta_manifest(data, learner=self.trusted_key)))
        latest = self.store.latest_version()
        if latest is not None:
            self._set_ready(latest, announce=False)

    # ------------------------------------------------------------------------------------------------------------
    # learner discovery

    def unreachable_for(self) -> Optional[float]:
        """Seconds since the learner stopped answering (or since start, until it is first found); None while it
        answers."""
        since = self._unreachable_since
        return None if since is None else time.monotonic() - since

    def _learner_suspect(self) -> bool:
        """The learner may have restarted: deliveries fail, or its record stopped advancing (it is re-stored every
        ``heartbeat_ttl / 3``)."""
        stale_after = self.config.heartbeat_ttl / 2 + self.config.poll_interval
        return self._send_failing or time.monotonic() - self._record_changed_at > stale_after

    async def _watch_loop(self) -> None:
        """Re-read the learner record every ``poll_interval``. When it is missing or suspect, dial the learner's
        last address at once on every poll (a learner restarted on its address is found within one poll) and the
        bootstrap peers with back-off (a learner that moved, or a start while everything was down), or at once when
        a bootstrap peer's TCP port that was closed opens."""
        backoff, next_rejoin = REJOIN_MIN, 0.0
        bootstrap_open: Optional[bool] = None  # last probe of the bootstrap peers' TCP ports
        while True:
            try:
                found = await self._poll_learner()
                if found and not self._learner_suspect():
                    backoff, next_rejoin = REJOIN_MIN, 0.0
                else:
                    reached = 0
                    peer = self._learner_peer()
                    if peer is not None and await tcp_port_open(peer[1]) is not False:  # see tcp_port_open
                        reached = await self.node.reach([peer])
                    opened = False
                    if not reached and self.node.bootstrap_peers:  # a port that just opened: re-dial at once
                        was, bootstrap_open = bootstrap_open, await tcp_port_open(
                            [str(m) for m, _ in self.node.bootstrap_peers])
                        opened = bootstrap_open is True and was is False
                        if opened:  # the peer is starting: its DHT and learner record follow within seconds
                            backoff = REJOIN_MIN
                    if not reached and self.node.bootstrap_peers and (opened or time.monotonic() >= next_rejoin):
                        closed = bootstrap_open is False  # then no libp2p dial: it would only grow the backoff
                        logger.info("learner %s; %s (next try in %.0f s)",
                                    "record not found" if not found else "not answering",
                                    "the bootstrap peers' ports are closed" if closed
                                    else "re-dialing the bootstrap peers", backoff)
                        if not closed:
                            reached = await self.node.rejoin()
                        next_rejoin = time.monotonic() + backoff
                        backoff = min(REJOIN_MAX, backoff * 2)
                    if reached:
                        await self._poll_learner()  # read the (new) record through the peers just reached
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("learner lookup failed: %r", e)
            await wait_event(self._watch_wake, self.config.poll_interval)
            self._watch_wake.clear()

    async def _poll_learner(self) -> bool:
        # A remembered (not pinned) key reads every heartbeat, to say so when the learner now signs with another.
        pin = self.trusted_key if self.pinned else None
        records = await read_heartbeats(self.node, self.config.run_id, learner=pin)
        if self.trusted_key is not None:
            rec = records.get(self.trusted_key)
            if rec is None:
                self.untrusted_learners = [format_public_key(k) for k in records]
                return False
            key = self.trusted_key
        else:
            if not records:
                return False
            key, rec = max(records.items(), key=lambda kv: kv[1].time)
            self._trust_on_first_use(key)
            self._load_store()
        self._update_learner(key, rec)
        return True

    def _update_learner(self, key: bytes, rec: LearnerHeartbeat) -> None:
        old = self.learner
        has_weights = rec.manifest_size > 0
        info = LearnerInfo(
            key=key, peer_id=rec.peer_id, version=rec.policy_version if has_weights else None,
            manifest_digest=rec.manifest_digest, weights_size=rec.weights_size, maddrs=tuple(rec.multiaddrs),
            time=rec.time,
        )
        if old is not None and info.time < old.time:
            return  # an older copy of the record
        if old is None or info.time > old.time:
            self._record_changed_at = time.monotonic()
            if old is None:
                self._unreachable_since = None
        self.learner = info
        if self._send_failing and (old is None or info.time > old.time):
            self._send_wake.set()  # the learner is alive (again): retry now rather than after the back-off
        if old is None or old.peer_id != info.peer_id or old.maddrs != info.maddrs:
            logger.info("learner %s at %s", info.peer_id, " ".join(info.maddrs))
            self._send_wake.set()
            if self._fetcher is not None:
                self._fetcher.set_learner(PeerID.from_base58(info.peer_id), info.maddrs)
        if info.version is not None and (old is None or old.version != info.version):
            self._manager_wake.set()

    def _learner_peer(self) -> Optional[Tuple[PeerID, List[str]]]:
        info = self.learner
        if info is None:
            return None
        return PeerID.from_base58(info.peer_id), list(info.maddrs)

    # ------------------------------------------------------------------------------------------------------------
    # rollouts

    def submit(self, payload: bytes, timeout: float = 0.0) -> int:
        """Persist a signed group in the outbox for delivery; returns its outbox sequence number.
        Raises :class:`OutboxFull` if there is no room within ``timeout`` seconds."""
        if len(payload) > self.config.max_group_bytes:
            raise ValueError(f"group of {len(payload)} bytes exceeds max_group_bytes={self.config.max_group_bytes}")
        seq = self.outbox.put(payload, timeout=timeout)
        self.counters["submitted"] += 1
        return seq

    def _on_outbox_put(self) -> None:
        if self._send_wake is not None:
            self.loop.call_soon(self._send_wake.set)

    async def _send_loop(self) -> None:
        cfg = self.config
        backoff = cfg.retry_min
        while True:
            if not len(self.outbox) or self.learner is None:
                self._send_wake.clear()
                await wait_event(self._send_wake, 5.0)
                continue
            try:
                retry_after = await self._deliver_batch()
                backoff = cfg.retry_min
                self._send_failing = False
                self._unreachable_since = None
                if retry_after:
                    await asyncio.sleep(retry_after)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.counters["send_failures"] += 1
                delay = backoff * (0.5 + random.random())
                logger.info("delivering rollouts failed (%s); retrying in %.1f s", e, delay)
                backoff = min(cfg.retry_max, backoff * 2)
                if not self._send_failing and self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()
                self._send_failing = True
                self._send_wake.clear()
                self._watch_wake.set()  # re-read the heartbeat: the learner may have moved or restarted
                await wait_event(self._send_wake, delay)  # a fresh heartbeat cuts the back-off short

    async def _deliver_batch(self) -> float:
        """Send up to PUSH_BATCH groups over one stream; returns a server-requested pause (0 if none)."""
        cfg = self.config
        batch = self.outbox.peek(PUSH_BATCH)
        if not batch:
            return 0.0
        peer = self._learner_peer()
        if peer is None:
            return 1.0
        peer_id, maddrs = peer
        if self._send_failing and await tcp_port_open(maddrs) is False:  # no libp2p dial (and its backoff) in vain
            raise WireError(f"the learner's port is closed ({' '.join(maddrs)})")
        await self.node.connect(peer_id, maddrs)
        reader, writer = await open_stream(self.node.p2p, peer_id, proto_name(cfg.run_id, "rollouts"),
                                           timeout=cfg.connect_timeout)
        try:
            for seq, payload in batch:
                try:
                    await send_frame(writer, {"op": "push"}, payload, timeout=cfg.stall_timeout)
                except WireError:
                    pass  # the learner may have answered and closed (e.g. oversize); read its answer below
                answer, _ = await recv_frame(reader, timeout=cfg.rpc_timeout, max_payload=0)
                status = answer.get("status")
                v = answer.get("version")
                if isinstance(v, int) and self.learner is not None and (self.learner.version or -1) < v:
                    self._watch_wake.set()  # the learner has a newer version than its record we read
                if status in ("accepted", "duplicate"):
                    self.answers.record(status, payload)  # before the outbox forgets the group
                    self.outbox.remove(seq)
                    self.counters[status] += 1
                elif status == "rejected":
                    reason = str(answer.get("reason", "unknown"))[:64]
                    self.answers.record(status, payload, reason)
                    self.outbox.remove(seq)
                    self.counters["rejected"] += 1
                    self.rejections[reason] += 1
                    logger.warning("the learner rejected rollout group #%d: %s %s", seq, reason,
                                   str(answer.get("detail", ""))[:200])
                elif status == "busy":
                    self.counters["busy"] += 1
                    ra = answer.get("retry_after")
                    return float(ra) if isinstance(ra, (int, float)) and 0 < ra <= 60 else 1.0
                else:
                    raise WireError(f"unexpected answer {str(status)[:32]!r}")
        finally:
            await close_writer(writer)
        return 0.0

    # ------------------------------------------------------------------------------------------------------------
    # weights

    async def _manager_loop(self) -> None:
        while True:
            await wait_event(self._manager_wake, 2.0)
            self._manager_wake.clear()
            try:
                self._maybe_start_fetch()
            except Exception as e:  # pragma: no cover
                logger.warning("version manager: %r", e)

    def _maybe_start_fetch(self) -> None:
        info = self.learner
        if info is None or info.version is None or self.trusted_key is None:
            return
        target = info.version
        local = self.store.latest_version()
        if local is not None and local >= target:
            return
        if self._fetch_task is not None and not self._fetch_task.done():
            f = self._fetcher
            current = self._fetch_version
            if current == target:
                return
            idle = time.monotonic() - f.last_progress if f is not None else 0.0
            # Once the learner has published keep_versions newer versions it no longer holds this one, and peers
            # drop it as they move on: a download that stops moving then will not finish, so switch quickly.
            superseded = current is None or target - current >= self.config.keep_versions
            stalled = idle > (SUPERSEDED_STALL_S if superseded else max(30.0, 2 * self.config.stall_timeout))
            if not stalled:
                return  # finish the current download first (guarantees progress when versions come fast)
            logger.info("download of version %s stalled; switching to version %d", current, target)
            self._fetch_task.cancel()
        self._fetch_version = target
        self._fetcher = None  # the previous download's fetcher says nothing about this one's progress
        self._fetch_task = asyncio.create_task(self._fetch(target, info.manifest_digest))

    async def _fetch(self, version: int, digest: bytes) -> None:
        t0 = time.monotonic()
        bytes0 = self.fetch_stats.bytes_down
        try:
            data = await self.get_manifest(version, digest)
            manifest = self._decode_manifest(data, version, digest)
            if manifest.adapter is not None:  # a LoRA adapter version: its base first (fetched once, then kept)
                await self._ensure_base(manifest)
            plan = await self.catchup.plan(manifest, digest) if self.config.weight_deltas else None
            if plan is not None and plan.uses_deltas:
                vb = await self.catchup.run(plan, manifest, data)
                self.store.finalize(version)
            else:
                vb = await self._download(manifest, data)
            if self.catchup.keyframe is not None:
                self.store.pin(self.catchup.keyframe)  # kept for deltas that start from it (if held)
            self.deltas.discard_partial(version)
            self.version_times[version] = time.monotonic() - t0
            if plan is not None:
                self.catchup.log[version] = {
                    "plan": [s.as_list() for s in plan.steps], "planned_bytes": plan.bytes,
                    "fetched_bytes": self.fetch_stats.bytes_down - bytes0, "seconds": round(time.monotonic() - t0, 3),
                    "apply_s": round(self.catchup.last_apply_s, 3) if plan.uses_deltas else 0.0}
            logger.info("version %d ready (%d bytes, %.2f s, %d bytes fetched)", version, vb.total_size,
                        time.monotonic() - t0, self.fetch_stats.bytes_down - bytes0)
            self._set_ready(version)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.counters["fetch_failures"] += 1
            logger.warning("fetching version %d failed: %r; will retry", version, e)
            await asyncio.sleep(1.0)
        finally:
            self._fetcher = None
            self._manager_wake.set()

    def _decode_manifest(self, data: bytes, version: int, digest: bytes) -> WeightManifest:
        manifest = decode_manifest(data, learner=self.trusted_key, expected_digest=digest)
        if manifest.run_id != self.config.run_id or manifest.version != version:
            raise ValueError(f"manifest is for run {manifest.run_id!r} version {manifest.version}")
        return manifest

    async def _ensure_base(self, manifest: WeightManifest) -> None:
        """Hold the full base version an adapter version names (by the SHA-256 of its signed manifest)."""
        info = manifest.adapter
        held = self.store.get(info.base_version)
        if held is not None and held.complete and held.digest == info.base_digest:
            return
        logger.info("version %d is a LoRA adapter over base version %d: fetching the base", manifest.version,
                    info.base_version)
        await self.download_version(info.base_version, info.base_digest)

    async def download_version(self, version: int, digest: bytes) -> VersionBuffer:
        """Fetch the full version whose signed manifest has SHA-256 ``digest`` (resuming a partial one on disk)."""
        data = await self.get_manifest(version, digest)
        return await self._download(self._decode_manifest(data, version, digest), data)

    async def _download(self, manifest: WeightManifest, data: bytes) -> VersionBuffer:
        version = manifest.version
        vb = self.store.open_download(manifest, data)
        vb.add_listener(lambda _i: self._announce_wake.set())
        self._announce_wake.set()
        if not vb.have.all():
            fetcher = VersionFetcher(
                node=self.node, proto=proto_name(self.config.run_id, "weights"), vb=vb,
                learner=self._learner_peer(), discover=lambda: self.discover(version), config=self.config,
                blacklist=self.blacklist, stats=self.fetch_stats, self_peer_id=self.peer_id,
            )
            await self.run_fetcher(fetcher)
        return self.store.finalize(version)

    async def run_fetcher(self, fetcher: VersionFetcher, stall: Optional[float] = None) -> VersionBuffer:
        """Run a download (the manager watches ``self._fetcher``'s progress); with ``stall``, give up with
        TimeoutError after that many seconds without a verified chunk."""
        self._fetcher = fetcher
        if stall is None:
            return await fetcher.run()
        task = asyncio.ensure_future(fetcher.run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    return task.result()
                if time.monotonic() - fetcher.last_progress > stall:
                    raise TimeoutError(f"no progress for {stall:.0f} s downloading {fetcher.vb.key}")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def wake_announcer(self) -> None:
        if self._announce_wake is not None:
            self._announce_wake.set()

    async def get_manifest(self, version: int, digest: bytes, base: Optional[int] = None) -> bytes:
        """The signed manifest of ``version`` (with ``base``: of the delta ``base -> version``) whose SHA-256 is
        ``digest``, from the learner or a peer that holds it."""
        cfg = self.config
        sources: List[Tuple[PeerID, List[str]]] = []
        learner = self._learner_peer()
        if learner is not None:
            sources.append(learner)
        deadline = time.monotonic() + cfg.call_timeout * 4
        attempt = 0
        while time.monotonic() < deadline:
            if attempt > 0 or not sources:
                found = await self.discover(version, base)
                sources = ([learner] if learner else []) + [(p, m) for p, m, _ in found if p not in self.blacklist]
            for peer_id, maddrs in sources:
                try:
                    await self.node.connect(peer_id, maddrs)
                    reader, writer = await open_stream(self.node.p2p, peer_id, proto_name(cfg.run_id, "weights"),
                                                       timeout=cfg.connect_timeout)
                    try:
                        await send_frame(writer, {"op": "manifest", "v": version, "b": base}, timeout=cfg.rpc_timeout)
                        header, data = await recv_frame(reader, timeout=cfg.rpc_timeout,
                                                        max_payload=cfg.max_manifest_bytes)
                    finally:
                        await close_writer(writer)
                    if header.get("ok") is True and header.get("d") == digest:
                        return data
                except (WireError, RemoteError, OSError, asyncio.TimeoutError) as e:
                    logger.debug("manifest %d from %s failed: %s", version, peer_id, e)
            attempt += 1
            await asyncio.sleep(min(5.0, 0.5 * attempt))
        what = f"version {version}" if base is None else f"delta {base}->{version}"
        raise TimeoutError(f"could not get the manifest of {what}")

    async def discover(self, version: int, base: Optional[int] = None):
        """Peers announcing chunks of ``version`` (with ``base``: of the delta ``base -> version``)."""
        haves = await read_haves(self.node, self.config.run_id, version, base)
        out = []
        for owner, rec in haves.items():
            if owner == self.identity.public_key:
                continue
            try:
                pid = PeerID.from_base58(rec.peer_id)
            except Exception:
                continue
            bits = unpack_bits(rec.bitmap, rec.n_chunks)
            out.append((pid, list(rec.multiaddrs), bits))
        return out

    def _set_ready(self, version: int, announce: bool = True) -> None:
        with self._ready_cond:
            self._ready_cond.notify_all()
        self.ready.put(version)
        self.counters["versions"] += 1
        if self._announce_wake is not None:
            self._announce_wake.set()
        if self.on_version is not None:
            try:
                self.on_version(version)
            except Exception:
                logger.exception("on_version callback failed")

    # ------------------------------------------------------------------------------------------------------------
    # announcements

    async def _announce_loop(self) -> None:
        cfg = self.config
        last_sent: Dict[int, Tuple[int, float]] = {}
        last_status = -1e9
        while True:
            wait = cfg.peer_record_ttl / 3
            if self._status_dirty:
                wait = min(wait, max(0.05, last_status + STATUS_MIN_INTERVAL - time.monotonic()))
            await wait_event(self._announce_wake, wait)
            self._announce_wake.clear()
            now = time.monotonic()
            try:
                if self.serving:
                    for vb in self.store.versions() + self.deltas.deltas()[-MAX_ANNOUNCED_DELTAS:]:
                        n = vb.n_have  # announced from the start (n = 0): peers find each other at once
                        prev = last_sent.get(vb.key)
                        if prev is None or now - prev[1] >= cfg.peer_record_ttl / 3 or (
                            prev[0] != n and now - prev[1] >= 1.0
                        ):
                            await store_have(
                                self.node, self.identity, run_id=cfg.run_id, peer_id=self.peer_id,
                                version=vb.version, n_chunks=vb.n_chunks, bitmap=vb.bitmap(), maddrs=self.maddrs,
                                ttl=cfg.peer_record_ttl, base=vb.base,
                            )
                            last_sent[vb.key] = (n, now)
                if now - last_status >= cfg.peer_record_ttl / 3 or (
                    self._status_dirty and now - last_status >= STATUS_MIN_INTERVAL
                ):
                    last_status = now
                    self._status_dirty = False
                    version = self._reported_version
                    await store_status(
                        self.node, self.identity, run_id=cfg.run_id, peer_id=self.peer_id,
                        version=self.store.latest_version() if version is None else version,
                        counters=self._status_counters(), ttl=cfg.peer_record_ttl,
                    )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.debug("announce failed: %r", e)
            if self._fetcher is not None:
                await asyncio.sleep(1.0)  # at most one have-record update per second while downloading
                self._announce_wake.set()
            elif self._fetch_task is not None and not self._fetch_task.done():
                await asyncio.sleep(0.05)

    def _status_counters(self) -> Dict[str, int]:
        c = self.counters
        return {
            "submitted": c["submitted"], "accepted": c["accepted"] + c["duplicate"], "rejected": c["rejected"],
            "outbox": len(self.outbox), "versions": c["versions"],
            "up_mb": self.limiter.total_bytes >> 20, "down_mb": self.fetch_stats.bytes_down >> 20,
            "up_s": int(time.monotonic() - self._created), **self._reported,
        }

    def report(self, version: Optional[int] = None, **counters: int) -> None:
        """What the program does, for the signed status record (``python -m node.monitor`` shows it): the policy
        version it samples with (default: the newest version held) and extra counters (e.g. ``tokens=...``).
        Published within ``STATUS_MIN_INTERVAL`` seconds; safe to call from any thread."""
        if version is not None:
            self._reported_version = int(version)
        self._reported = {**self._reported, **{k: int(v) for k, v in counters.items()}}
        self._status_dirty = True
        if self._announce_wake is not None:
            self.loop.call_soon(self._announce_wake.set)

    # ------------------------------------------------------------------------------------------------------------
    # weights API for the program

    def latest_version(self) -> Optional[int]:
        """Newest version held completely (verified), or None."""
        return self.store.latest_version()

    def wait_for_version(self, min_version: Optional[int] = None, timeout: float = 0.0) -> Optional[int]:
        """Block until a complete version ``>= min_version`` (any, if None) is held; returns it, or None on
        timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._ready_cond:
            while True:
                v = self.store.latest_version()
                if v is not None and (min_version is None or v >= min_version):
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._ready_cond.wait(min(left, 0.5))

    def get_weights(self, version: Optional[int] = None) -> Tuple[WeightManifest, memoryview]:
        """``(manifest, read-only buffer)`` of a complete version (default: newest). Convert with
        ``protocol.manifest.torch_state_dict(manifest, buffer)`` (copies). Raises KeyError if not held."""
        vb = self.store.latest_complete() if version is None else self.store.get(version)
        if vb is None or not vb.complete:
            raise KeyError(f"version {version} is not held completely")
        return vb.manifest, vb.readonly_view()

    def learner_version(self) -> Optional[int]:
        """The newest version the learner announced (None before its first publish or before it was found)."""
        return None if self.learner is None else self.learner.version

    def stats(self) -> Dict[str, Any]:
        """Counters for a status line / metrics (a snapshot; safe to call from any thread)."""
        f = self.fetch_stats
        return {
            **snapshot(self.counters),
            "rejections": snapshot(self.rejections),
            "outbox": len(self.outbox),
            "version": self.store.latest_version(),
            "learner_version": self.learner_version(),
            "bytes_down": f.bytes_down,
            "chunks_from_learner": f.chunks_from_learner,
            "chunks_from_peers": f.chunks_from_peers,
            "bad_chunks": f.bad_chunks,
            "blacklisted": self.blacklist.entries(),
            "bytes_uploaded": self.limiter.total_bytes,
            "chunks_served": self.chunk_server.stats.chunks_served,
            "version_times": snapshot(self.version_times),
            "catchup": snapshot(self.catchup.log),  # version -> plan, planned_bytes, fetched_bytes (node/catchup.py)
            "deltas_held": [[vb.base, vb.version, vb.n_have, vb.n_chunks] for vb in self.deltas.deltas()],
            "delta_bytes_uploaded": sum(self.chunk_server.bytes_by_delta.values()),
        }

    def shutdown(self) -> None:
        with self._lock:
            if not self._started:
                return
            self._started = False

        async def _stop():
            tasks = list(self._tasks) + ([self._fetch_task] if self._fetch_task else [])
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.loop.run(_stop(), 5)
        except Exception:
            pass
        self.node.shutdown()
        self.store.close()
        self.answers.close()
        self.deltas.close()

    def __enter__(self) -> "SamplerSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
