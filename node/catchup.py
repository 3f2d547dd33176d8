"""How a sampler reaches a new policy version: the cheapest plan of full versions and deltas, then fetch and apply.

A sampler holding versions ``H`` (maybe none) that wants version ``v`` asks the learner what it holds (``deltas``
op of node/chunk_server.py: every delta ``b -> w`` with its compressed size and manifest digest, every full version
with its size) and picks, by the bytes still to download, the cheapest path to ``v`` (:func:`cheapest_plan`) among

* a chain of step deltas ``u -> u+1 -> ... -> v`` from a held version u,
* a cumulative delta ``k -> v`` from the keyframe k (held, reached by a chain, or fetched in full first),
* the full version ``v``,

and any mix of them (a shortest path over versions: the edges are the deltas and the full versions). Bytes already
held from an interrupted download (a partial delta or version on disk) are not counted again, so a download killed
midway resumes on the same plan. Each delta is fetched exactly like a version (node/fetcher.py: from every peer that
announces it and the learner, rarest first, each chunk checked against the signed delta manifest, a peer that
sends a bad chunk blacklisted), applied (protocol.delta.apply_delta: base and result digests checked), and the
result is checked chunk by chunk against the signed manifest of v that the learner's heartbeat announced before it
is stored and used. What was fetched stays in the node's stores, served to others (node/delta_store.py budget).

Docs: docs/SWARM.md, "Catching up with deltas".
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import msgpack

from protocol.delta import apply_delta, decode_delta_manifest
from protocol.manifest import WeightManifest, verify_chunk

from .delta_store import DeltaLayout
from .fault_points import pause_point
from .fetcher import VersionFetcher
from .weights_store import VersionBuffer
from .wire import RemoteError, WireError, close_writer, open_stream, proto_name, recv_frame, send_frame

logger = logging.getLogger(__name__)

MAX_LISTING_BYTES = 4 << 20
FAILED_DELTA_TTL = 120.0  # seconds a delta that could not be fetched is left out of plans


@dataclasses.dataclass(frozen=True)
class Step:
    """Fetch the full version ``version`` (``base`` None) or the delta ``base -> version``: ``size`` bytes still to
    download, ``digest`` the SHA-256 of its signed manifest."""

    version: int
    base: Optional[int]
    size: int
    digest: bytes = b""

    def as_list(self) -> List[Any]:
        return [self.base, self.version, self.size]


@dataclasses.dataclass(frozen=True)
class Plan:
    target: int
    start: Optional[int]  # the held version the first delta applies to (None: the plan starts with a full version)
    steps: Tuple[Step, ...]

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.steps)

    @property
    def uses_deltas(self) -> bool:
        return any(s.base is not None for s in self.steps)

    def describe(self) -> str:
        parts = [f"v{self.start}" if self.start is not None else "nothing"]
        parts += [f"full v{s.version}" if s.base is None else f"delta {s.base}->{s.version}" for s in self.steps]
        return " => ".join(parts) + f" ({self.bytes} bytes)"


def cheapest_plan(target: int, held: Iterable[int], fulls: Iterable[Step], deltas: Iterable[Step]) -> Optional[Plan]:
    """The plan that downloads the fewest bytes to reach ``target`` (ties: fewer steps), or None if none does.

    ``held``: complete versions at hand (cost 0); ``fulls``: full versions that can be fetched; ``deltas``: deltas that
    can be fetched. Every edge goes forward in version, so one pass in version order is a shortest-path search."""
    into: Dict[int, List[Step]] = {}
    for d in deltas:
        if d.base is not None and d.base < d.version <= target:
            into.setdefault(d.version, []).append(d)
    full_at = {f.version: f for f in fulls if f.version <= target}
    held = {h for h in held if h <= target}
    best: Dict[int, Tuple[int, int, Optional[Step]]] = {}  # version -> (bytes, steps, last step)
    for w in sorted(held | set(full_at) | set(into)):
        cands = [(0, 0, None)] if w in held else []
        if w in full_at:
            cands.append((full_at[w].size, 1, full_at[w]))
        for d in into.get(w, ()):
            if d.base in best:
                b = best[d.base]
                cands.append((b[0] + d.size, b[1] + 1, d))
        if cands:
            best[w] = min(cands, key=lambda c: (c[0], c[1]))
    if target not in best:
        return None
    steps: List[Step] = []
    w: Optional[int] = target
    while w is not None and best[w][2] is not None:
        step = best[w][2]
        steps.append(step)
        w = step.base
    return Plan(target=target, start=w, steps=tuple(reversed(steps)))


def parse_listing(payload: bytes) -> Tuple[List[Step], List[Step], Optional[int]]:
    """``(fulls, deltas, keyframe)`` from a ``deltas`` answer; malformed entries are skipped."""
    try:
        m = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=len(payload),
                            max_str_len=len(payload), max_array_len=1 << 16, max_map_len=16)
    except Exception:
        return [], [], None
    if not isinstance(m, dict):
        return [], [], None

    def ints(*xs) -> bool:
        return all(type(x) is int and 0 <= x < 1 << 63 for x in xs)

    fulls, deltas = [], []
    for e in m.get("fulls") or []:
        if isinstance(e, list) and len(e) == 3 and ints(e[0], e[1]) and isinstance(e[2], bytes) and len(e[2]) == 32:
            fulls.append(Step(version=e[0], base=None, size=e[1], digest=e[2]))
    for e in m.get("deltas") or []:
        if (isinstance(e, list) and len(e) == 4 and ints(e[0], e[1], e[2]) and e[0] < e[1]
                and isinstance(e[3], bytes) and len(e[3]) == 32):
            deltas.append(Step(version=e[1], base=e[0], size=e[2], digest=e[3]))
    k = m.get("keyframe")
    return fulls, deltas, k if ints(k) else None


class CatchUp:
    """Plans and runs one sampler's way to each new version. Lives in the sampler's swarm loop
    (:class:`node.sampler_swarm.SamplerSwarm` owns it)."""

    def __init__(self, swarm):
        self.swarm = swarm
        self.failed: Dict[Tuple[int, int], float] = {}  # delta -> monotonic time it failed
        self.keyframe: Optional[int] = None  # the learner's keyframe, as last listed
        #: version -> {"plan": [[base, version, bytes], ...], "planned_bytes", "fetched_bytes", "seconds", "apply_s"}
        self.log: Dict[int, Dict[str, Any]] = {}
        self.last_apply_s = 0.0  # of the last run: applying the deltas and storing the result (verified)

    # --- planning -------------------------------------------------------------------------------------------------
    async def listing(self) -> Tuple[List[Step], List[Step], Optional[int]]:
        """What the learner holds (nothing if it does not answer: then only the full version is planned)."""
        sw = self.swarm
        cfg = sw.config
        peer = sw._learner_peer()  # noqa: SLF001
        if peer is None:
            return [], [], None
        writer = None
        try:
            await sw.node.connect(*peer)
            reader, writer = await open_stream(sw.node.p2p, peer[0], proto_name(cfg.run_id, "weights"),
                                               timeout=cfg.connect_timeout)
            await send_frame(writer, {"op": "deltas"}, timeout=cfg.rpc_timeout)
            header, payload = await recv_frame(reader, timeout=cfg.rpc_timeout, max_payload=MAX_LISTING_BYTES)
            if header.get("ok") is not True:
                return [], [], None
            return parse_listing(payload)
        except (WireError, RemoteError, OSError, asyncio.TimeoutError) as e:
            logger.info("the learner did not list its deltas (%s): planning with full versions only", e)
            return [], [], None
        finally:
            if writer is not None:
                await close_writer(writer)

    async def plan(self, manifest: WeightManifest, digest: bytes) -> Plan:
        """The cheapest plan to ``manifest``'s version (the full version when the learner lists no deltas)."""
        sw = self.swarm
        target = manifest.version
        fulls, deltas, self.keyframe = await self.listing()
        now = time.monotonic()
        self.failed = {k: t for k, t in self.failed.items() if now - t < FAILED_DELTA_TTL}
        held = [vb.version for vb in sw.store.versions() if vb.complete and vb.version < target]
        fulls = [f for f in fulls if f.version < target] + [Step(target, None, manifest.total_size, digest)]
        fulls = [dataclasses.replace(f, size=f.size - self._partial(sw.store.get(f.version), f.digest))
                 for f in fulls]
        deltas = [dataclasses.replace(d, size=d.size - self._partial(sw.deltas.get((d.base, d.version)), d.digest))
                  for d in deltas if (d.base, d.version) not in self.failed]
        plan = cheapest_plan(target, held, fulls, deltas)
        assert plan is not None  # the full target is always an option
        logger.info("version %d: %s", target, plan.describe())
        return plan

    @staticmethod
    def _partial(vb: Optional[VersionBuffer], digest: bytes) -> int:
        """Bytes of an interrupted download of the same object already verified on disk."""
        return vb.held_bytes() if vb is not None and not vb.complete and vb.digest == digest else 0

    # --- running --------------------------------------------------------------------------------------------------
    async def run(self, plan: Plan, manifest: WeightManifest, manifest_bytes: bytes) -> VersionBuffer:
        """Fetch and apply ``plan``'s steps; store the target version (verified chunk by chunk against its signed
        manifest) and return it."""
        sw = self.swarm
        loop = asyncio.get_running_loop()
        version, buffer, buffer_digest = plan.start, None, None
        self.last_apply_s = 0.0
        for step in plan.steps:
            if step.base is None:  # a full version (a keyframe the following cumulative delta starts from)
                if step.version == self.keyframe:
                    sw.store.pin(step.version)
                await sw.download_version(step.version, step.digest)
                version, buffer, buffer_digest = step.version, None, None
                continue
            dvb = await self._fetch_delta(step)
            if buffer is None or version != step.base:
                base = sw.store.get(step.base)
                if base is None or not base.complete:
                    raise RuntimeError(f"version {step.base} the delta {step.base}->{step.version} applies to is gone")
                buffer, buffer_digest = base.readonly_view(), None
            chunks = [dvb.chunk_view(i) for i in range(dvb.n_chunks)]
            t0 = time.monotonic()
            buffer = await loop.run_in_executor(None, functools.partial(
                apply_delta, dvb.manifest.delta, buffer, chunks, base_digest=buffer_digest))
            self.last_apply_s += time.monotonic() - t0
            version, buffer_digest = step.version, dvb.manifest.delta.target_digest
        t0 = time.monotonic()
        vb = sw.store.open_download(manifest, manifest_bytes)
        await loop.run_in_executor(None, _write_verified, vb, buffer)
        self.last_apply_s += time.monotonic() - t0  # applying and storing: CPU, not the network
        for i in range(vb.n_chunks):
            vb.mark(i)
        return vb

    async def _fetch_delta(self, step: Step) -> VersionBuffer:
        """Download one delta (resuming a partial one on disk); raises after ``2 x stall_timeout`` without progress."""
        sw = self.swarm
        cfg = sw.config
        key = (step.base, step.version)
        try:
            data = await sw.get_manifest(step.version, step.digest, base=step.base)
            delta = decode_delta_manifest(data, learner=sw.trusted_key, expected_digest=step.digest)
            if delta.run_id != cfg.run_id or (delta.base_version, delta.version) != key:
                raise ValueError(f"delta manifest is for run {delta.run_id!r}, {delta.base_version}->{delta.version}")
            dvb = sw.deltas.open_download(DeltaLayout(delta), data)
            if not dvb.have.all():
                dvb.add_listener(lambda _i: (sw.wake_announcer(), _half_fetched(dvb)))
                sw.wake_announcer()
                fetcher = VersionFetcher(
                    node=sw.node, proto=proto_name(cfg.run_id, "weights"), vb=dvb, learner=sw._learner_peer(),  # noqa
                    discover=lambda: sw.discover(step.version, step.base), config=cfg, blacklist=sw.blacklist,
                    stats=sw.fetch_stats, self_peer_id=sw.peer_id,
                )
                await sw.run_fetcher(fetcher, stall=max(10.0, 2 * cfg.stall_timeout))
            sw.deltas.finalize(key)
            return dvb
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed[key] = time.monotonic()
            raise


def _half_fetched(dvb: VersionBuffer) -> None:
    if dvb.n_have == dvb.n_chunks // 2:
        pause_point("delta:half_fetched", dvb.version)  # test-only (node/fault_points.py): a kill mid-delta


def _write_verified(vb: VersionBuffer, buffer) -> None:
    """Copy a rebuilt version into its (file) buffer, each chunk checked against the signed manifest first."""
    mv = memoryview(buffer).cast("B")
    for i in range(vb.n_chunks):
        start, end = vb.manifest.chunk_range(i)
        verify_chunk(vb.manifest, i, mv[start:end])
        vb.chunk_writer(i)(0, mv[start:end])
