"""The learner's side of the swarm: heartbeat, rollout intake, weight publishing and (rationed) chunk serving.

Synchronous, thread-safe facade over a background event loop (see :mod:`node.loop`)::

    swarm = LearnerSwarm(cfg, identity, validate=validator.validate, decode=decode_group).start()
    print(swarm.join_command())
    swarm.publish_state(version=1, tensors=model.state_dict())          # or publish(v, manifest_bytes, buffer)
    for acc in swarm.get_rollouts(max_items=64, timeout=1.0):           # accepted, validated, deduplicated
        train_on(acc.item)
    swarm.shutdown()

Rollout intake (``gepo-swarm/<run>/rollouts/1``): a sampler streams frames ``{op: "push"}`` + signed group, and
gets one answer per group: ``{status: accepted | duplicate | rejected | busy, reason, retry_after, version}``.
``duplicate`` means "already accepted earlier" (the ledger survives restarts); ``rejected`` carries the
:class:`protocol.errors.Reason` value; ``busy`` (inbox full, validator failure) means "keep it, retry later".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import random
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional

from protocol.adapter import AdapterInfo
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.manifest import build_manifest, decode_manifest, encode_manifest
from protocol.records import MAX_BITMAP_BYTES, Ed25519OwnerValidator
from protocol.rollout import read_sender

from .chunk_server import ChunkRationer, ChunkServer
from .config import SwarmConfig
from .delta_publish import DeltaPublisher
from .delta_store import DeltaStore
from .dht import SwarmNode, join_command
from .fairness import InboxShares, KeyHistory, PushStreams
from .loop import snapshot, wait_event
from .inbox import Accepted, DurableInbox
from .ratelimit import TokenBucket
from .records import store_heartbeat
from .weights_store import WeightStore
from .wire import WireError, guarded_handler, proto_name, recv_header, recv_payload, send_frame

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
MAX_HAVE_CHUNKS = 8 * MAX_BITMAP_BYTES  # chunks a ChunkHave record can describe (16384)


class LearnerSwarm:
    """
    :param config: transport settings (:class:`node.config.SwarmConfig`).
    :param identity: the learner's Ed25519 identity (default: ``Identity.load_or_create(config.key_path)``).
    :param validate: ``validate(signed_bytes) -> item``; raise :class:`ProtocolError` to reject (the reason is sent
        back). E.g. ``protocol.validate.RolloutValidator(...).validate``. Runs in one worker thread.
    :param decode: rebuilds an item from signed bytes when reloading the durable inbox after a restart (default:
        ``validate``).
    :param claimed_key: ``claimed_key(signed_bytes) -> key``, read WITHOUT verifying (default: the rollout
        format's :func:`protocol.rollout.read_sender`): lets a group whose key has no room in the inbox be answered
        ``busy`` before paying for validation. After validation the key is the item's ``sampler`` attribute (the
        sender's peer id for items without one). See :mod:`node.fairness` for how the inbox is shared.
    :param resumed_from: a trainer that checkpoints (the learner program) gives the step of the checkpoint it
        loaded (0: none): the inbox then keeps the write-ahead journal (:mod:`node.journal`) and holds each group
        until the trainer reports a checkpoint covering it (``inbox.trained`` / ``inbox.covered``). None: a taken
        group is gone from the inbox.
    """

    def __init__(
        self,
        config: SwarmConfig,
        identity: Optional[Identity] = None,
        *,
        validate: Callable[[bytes], Any],
        decode: Optional[Callable[[bytes], Any]] = None,
        claimed_key: Optional[Callable[[bytes], Any]] = read_sender,
        resumed_from: Optional[int] = None,
    ):
        self.config = config
        if identity is None:
            identity = Identity.load_or_create(config.key_path) if config.key_path else Identity.generate()
        self.identity = identity
        self.validate = validate
        self.decode = decode or validate
        self.claimed_key = claimed_key
        self.node = SwarmNode(
            config, record_validators=[Ed25519OwnerValidator(config.run_id, identity, learner=identity.public_key)]
        )
        self.loop = self.node.loop
        self.store = WeightStore(None, keep=config.keep_versions)
        self.deltas = DeltaStore(None, keep_bytes=config.delta_keep_bytes, keep_versions=2 * config.keyframe_every)
        self.delta_publisher = DeltaPublisher(self.identity, keyframe_every=config.keyframe_every,
                                              chunk_size=config.delta_chunk_size) if config.weight_deltas else None
        self.limiter = TokenBucket(config.upload_limit)
        self.rationer = (ChunkRationer(config.ration_interval, config.upload_limit, hoard_grace=config.hoard_grace)
                         if config.ration else None)
        self.chunk_server = ChunkServer(
            self.store, self.limiter, max_uploads=config.max_uploads, rpc_timeout=config.rpc_timeout,
            stall_timeout=config.stall_timeout, rationer=self.rationer, deltas=self.deltas,
            keepalive=2 * config.rpc_timeout,
            max_streams_per_peer=config.max_chunk_streams_per_peer,
            requests_per_peer=config.chunk_requests_per_peer,
        )
        self.resumed_from = resumed_from
        self.inbox = DurableInbox(config.state_dir, maxsize=config.inbox_size, journal=resumed_from is not None)
        self._validator_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout-validate")
        self.counters: Counter = Counter()
        self.rejections: Counter = Counter()
        self.maddrs: List[str] = []
        self.history = KeyHistory(config.max_tracked_keys)
        self.shares = InboxShares(config.inbox_size, self.history, fresh_share=config.fresh_key_share,
                                  trusted_after=config.trusted_after)
        self.streams = PushStreams(config.max_push_streams, config.max_push_streams_per_peer,
                                   config.push_idle_timeout)
        self._tasks: List[asyncio.Task] = []
        self._hb_wake: Optional[asyncio.Event] = None
        self._lock = threading.Lock()
        self._started = False
        self.version: Optional[int] = None
        self._reported: Dict[str, int] = {}
        self._created = time.monotonic()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return str(self.node.peer_id)

    @property
    def public_key_str(self) -> str:
        return self.identity.public_key_str

    def start(self, print_join: bool = True) -> "LearnerSwarm":
        with self._lock:
            if self._started:
                return self
            self.node.start()
            try:
                reloaded = self.inbox.reload(self.decode, resumed_from=self.resumed_from or 0)
                for acc in self.inbox.pending():
                    self.shares.put(_key_of(acc))
                if reloaded:
                    logger.info("reloaded %d accepted rollout groups %s", reloaded,
                                "not trained in a checkpointed step" if self.inbox.journal else
                                "the trainer had not taken yet")
                self.loop.run(self._astart(), self.config.call_timeout)
            except BaseException:
                self.node.shutdown()
                raise
            self._started = True
        if print_join:
            print(self.join_banner(), flush=True)
        return self

    async def _astart(self) -> None:
        p2p = self.node.p2p
        run = self.config.run_id
        await p2p.add_binary_stream_handler(
            proto_name(run, "weights"), guarded_handler("weights", self.chunk_server.handle)
        )
        await p2p.add_binary_stream_handler(proto_name(run, "rollouts"), guarded_handler("rollouts", self._push))
        self.maddrs = await self.node.visible_maddrs()
        self._hb_wake = asyncio.Event()
        await self._store_heartbeat()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))

    def join_command(self, program: str = "python -m node.sampler") -> str:
        return join_command(self.maddrs, self.public_key_str, self.config.run_id, program)

    def join_banner(self) -> str:
        lines = [
            f"[gepo-swarm] learner peer id : {self.peer_id}",
            f"[gepo-swarm] learner key     : {self.public_key_str}",
            "[gepo-swarm] reachable at    : " + (" ".join(self.maddrs) or "(no address)"),
            "[gepo-swarm] samplers join with:",
            "    " + self.join_command(),
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------------------
    # heartbeat

    async def _store_heartbeat(self) -> bool:
        vb = self.store.get(self.version) if self.version is not None else None
        ok = await store_heartbeat(
            self.node, self.identity, run_id=self.config.run_id, peer_id=self.peer_id,
            version=None if vb is None else vb.version, manifest_digest=None if vb is None else vb.digest,
            manifest_size=0 if vb is None else len(vb.manifest_bytes),
            weights_size=0 if vb is None else vb.total_size, maddrs=self.maddrs, ttl=self.config.heartbeat_ttl,
            counters=self._heartbeat_counters(),
        )
        self.counters["heartbeats"] += 1
        if not ok:
            self.counters["heartbeat_store_failed"] += 1
        return ok

    def report(self, **counters: int) -> None:
        """Progress counters (e.g. ``step=12, stale=3``) for the heartbeat record, next to the swarm's own accepted /
        rejected / duplicate / busy counts and uptime (what ``python -m node.monitor`` shows). Sent with the next
        heartbeat (every ``publish()`` and every ``heartbeat_ttl / 3``)."""
        self._reported = {**self._reported, **{k: int(v) for k, v in counters.items()}}

    def _heartbeat_counters(self) -> Dict[str, int]:
        c = self.counters
        return {"accepted": c["accepted"], "rejected": c["rejected"], "duplicate": c["duplicate"], "busy": c["busy"],
                "up_s": int(time.monotonic() - self._created), **self._reported}

    async def _heartbeat_loop(self) -> None:
        period = max(0.5, self.config.heartbeat_ttl / 3)
        while True:
            await wait_event(self._hb_wake, period)
            self._hb_wake.clear()
            try:
                await self._store_heartbeat()
            except Exception as e:  # never let the heartbeat die
                logger.warning("heartbeat failed: %r", e)

    # ------------------------------------------------------------------------------------------------------------
    # publishing

    def publish(self, version: int, manifest_bytes: bytes, buffer) -> None:
        """Make ``version`` available: ``manifest_bytes`` is the signed manifest (``encode_manifest``), ``buffer``
        the flat weight bytes it describes (kept by reference: do not modify it afterwards). Returns once the
        heartbeat announcing it is stored (bounded by ``dht_timeout``)."""
        manifest = decode_manifest(manifest_bytes, learner=self.identity.public_key)
        if manifest.version != version:
            raise ValueError(f"manifest is for version {manifest.version}, not {version}")
        if manifest.run_id != self.config.run_id:
            raise ValueError(f"manifest is for run {manifest.run_id!r}, not {self.config.run_id!r}")
        publisher = self.delta_publisher  # the deltas into this version (node/delta_publish.py), encoded here
        keyframe, deltas = publisher.encode(manifest, buffer) if publisher is not None else (False, [])

        async def _publish():
            self.store.add_complete(manifest, manifest_bytes, buffer)
            for d in deltas:
                self.deltas.add_delta(d.manifest, d.manifest_bytes, d.chunks)
            if keyframe:
                self.store.pin(version)
            if self.version is None or version >= self.version:
                self.version = version
            await self._store_heartbeat()

        self.loop.run(_publish(), self.config.call_timeout)
        if publisher is not None:
            for key in publisher.commit(manifest, buffer, keyframe, deltas):
                self.loop.call_soon(self.deltas.drop, key)
            self.counters["delta_encode_ms"] += int(1000 * publisher.last_encode_s)
        self.counters["published"] += 1

    def publish_state(
        self,
        version: int,
        tensors: Mapping[str, Any],
        *,
        files: Optional[Mapping[str, bytes]] = None,
        meta: Optional[Mapping[str, Any]] = None,
        parent: Optional[int] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        adapter: Optional[AdapterInfo] = None,
    ) -> bytes:
        """Lay out ``tensors`` (+ ``files``) with :func:`protocol.manifest.build_manifest`, sign, publish.
        Returns the signed manifest bytes. The chunk size is raised (powers of two) if the version would otherwise
        have more chunks than a :class:`protocol.records.ChunkHave` bitmap can describe. With ``adapter``,
        ``tensors`` are a LoRA adapter version's factors over that base version (:mod:`protocol.adapter`)."""
        while True:
            manifest, buf = build_manifest(
                tensors, run_id=self.config.run_id, version=version, parent=parent, chunk_size=chunk_size,
                files=files, meta=meta, adapter=adapter,
            )
            if manifest.n_chunks <= MAX_HAVE_CHUNKS:
                break
            chunk_size *= 2
        data = encode_manifest(manifest, self.identity)
        self.publish(version, data, buf)
        return data

    # ------------------------------------------------------------------------------------------------------------
    # rollouts

    def get_rollouts(self, max_items: int = 64, timeout: float = 0.0) -> List[Accepted]:
        """Accepted groups, oldest first (at most ``max_items``; waits up to ``timeout`` s for the first)."""
        taken = self.inbox.get(max_items, timeout)
        for acc in taken:
            self.shares.taken(_key_of(acc))
        return taken

    def forget_key(self, key: bytes) -> None:
        """Drop a sampler key's accepted history (e.g. after banning it): it is back in the fresh-key pool."""
        self.loop.call_soon(self.history.forget, key)

    async def _push(self, peer_id, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        slot = self.streams.open(str(peer_id), writer.close)
        if slot is None:
            self.counters["push_streams_refused"] += 1
            delay = self.streams.tarpit_delay(str(peer_id))
            if delay:  # over its own cap: make an impatient reopener wait for its answer
                self.streams.tarpitted += 1
                try:
                    await asyncio.sleep(delay)
                finally:
                    self.streams.tarpitted -= 1
            await send_frame(writer, {"status": "busy", "retry_after": 2.0, "version": self.version},
                             timeout=cfg.rpc_timeout)
            writer.close()  # no lingering: a refused stream must cost as little as possible
            return
        try:
            while not slot.closed_by_us:
                # a stream lives on accepted groups only: junk, rejected or refused frames do not extend it
                left = cfg.push_idle_timeout - slot.idle_for()
                try:
                    header, plen = await recv_header(reader, timeout=max(0.05, min(cfg.rpc_timeout, left)),
                                                     max_payload=1 << 40)
                except WireError as e:
                    if e.eof:
                        return
                    if self.streams.expired(slot):
                        writer.close()  # hang up now: no lingering for a stream that delivers nothing
                        return
                    raise
                if header.get("op") != "push":
                    await send_frame(writer, {"status": "rejected", "reason": "bad_request"}, timeout=cfg.rpc_timeout)
                    return
                if plen > cfg.max_group_bytes:
                    self.rejections["oversize"] += 1
                    await send_frame(
                        writer, {"status": "rejected", "reason": "oversize", "version": self.version,
                                 "detail": f"{plen} bytes > {cfg.max_group_bytes}"}, timeout=cfg.rpc_timeout,
                    )
                    return
                payload = await recv_payload(reader, plen, timeout=cfg.stall_timeout)
                answer = await self._accept(payload, str(peer_id))
                if answer["status"] == "accepted":
                    slot.delivered()
                answer["version"] = self.version
                await send_frame(writer, answer, timeout=cfg.rpc_timeout)
                if self.streams.expired(slot):
                    writer.close()
                    return
        finally:
            self.streams.release(slot)

    async def _accept(self, payload: bytes, sender: str) -> Dict[str, Any]:
        digest = hashlib.sha256(payload).digest()
        if self.inbox.seen(digest):
            self.counters["duplicate"] += 1
            self.inbox.answered("duplicate", payload, digest)
            return {"status": "duplicate"}
        if self.inbox.full():
            self.counters["busy"] += 1
            return {"status": "busy", "retry_after": 1.0}
        if self.claimed_key is not None:  # no room for this key: say so before paying for validation
            try:
                claimed = self.claimed_key(payload)
            except ProtocolError as e:
                return self._rejected(e, payload, digest)
            except Exception:
                claimed = None
            if claimed is not None and not self.shares.admits(claimed):
                return self._busy_share(claimed)
        loop = asyncio.get_running_loop()
        try:
            item = await asyncio.wait_for(
                loop.run_in_executor(self._validator_pool, self.validate, payload), self.config.rpc_timeout
            )
        except ProtocolError as e:
            return self._rejected(e, payload, digest)
        except asyncio.TimeoutError:
            self.counters["busy"] += 1
            return {"status": "busy", "retry_after": 5.0}
        except Exception as e:
            logger.exception("the rollout validator failed (the group is kept by the sender): %r", e)
            self.counters["validator_errors"] += 1
            return {"status": "busy", "retry_after": 5.0}
        accepted = Accepted(item, payload, digest, sender, time.time())
        key = _key_of(accepted)
        if not self.shares.admits(key):  # others took the room while this one was validated
            return self._busy_share(key)
        self.shares.put(key)
        if not self.inbox.put(accepted):
            self.shares.taken(key)
            self.counters["duplicate"] += 1
            self.inbox.answered("duplicate", payload, digest)
            return {"status": "duplicate"}
        self.history.accepted(key)
        self.counters["accepted"] += 1
        return {"status": "accepted"}

    def _rejected(self, e: ProtocolError, payload: bytes, digest: bytes) -> Dict[str, Any]:
        reason = getattr(e.reason, "value", str(e.reason))
        self.rejections[reason] += 1
        self.counters["rejected"] += 1
        self.inbox.answered("rejected", payload, digest, reason)
        return {"status": "rejected", "reason": reason, "detail": str(e.detail)[:200]}

    def _busy_share(self, key) -> Dict[str, Any]:
        self.counters["busy"] += 1
        trusted = self.shares.is_trusted(key)
        self.counters["busy_share" if trusted else "busy_fresh"] += 1
        return {"status": "busy", "retry_after": 1.0 if trusted else 2.0 + random.random()}

    # ------------------------------------------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Counters for logs/metrics (a snapshot; safe to call from any thread)."""
        s = self.chunk_server.stats
        return {
            "version": self.version,
            **snapshot(self.counters),
            "rejections": snapshot(self.rejections),
            "inbox": self.inbox.qsize(),
            "bytes_uploaded": self.limiter.total_bytes,
            "chunks_served": s.chunks_served,
            "upload_by_version": snapshot(self.chunk_server.bytes_by_version),
            "upload_by_delta": snapshot(self.chunk_server.bytes_by_delta),
            "deltas": [[vb.base, vb.version, vb.total_size] for vb in self.deltas.deltas(complete_only=True)],
            "keyframe": self.store.pinned,
            "busy_answers": s.busy,
            "rationed_answers": s.rationed,
            "hoard_waivers": self.rationer.hoard_waivers if self.rationer is not None else 0,
            "chunk_requests_limited": s.limited,
            **self.shares.snapshot(),
            **self.streams.snapshot(),
        }

    def shutdown(self) -> None:
        with self._lock:
            if not self._started:
                return
            self._started = False

        async def _stop():
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            self.loop.run(_stop(), 5)
        except Exception:
            pass
        self.node.shutdown()
        self._validator_pool.shutdown(wait=False, cancel_futures=True)
        self.inbox.close()
        self.store.close()
        self.deltas.close()

    def __enter__(self) -> "LearnerSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _key_of(accepted: Accepted) -> Any:
    """The sampler key a group counts against: the authenticated ``sampler`` of the item, else the sender peer."""
    key = getattr(accepted.item, "sampler", None)
    return bytes(key) if key else accepted.sender
