"""Discrete-event simulation of the swarm: weight distribution (chunk swarming, rarest first, the learner's rationing,
full or delta versions) and rollout flow (sampler generation speed, learner steps, staleness), with churn.

    .venv/bin/python -m scripts.simulate_swarm --calibrate wan.json       # predicted vs measured (bench_wan.py)
    .venv/bin/python -m scripts.simulate_swarm --scale --out docs/SCALE.md # the tables and plot of docs/SCALE.md
    .venv/bin/python -m scripts.simulate_swarm --n 100 --model 1.7B --delta 0.015

The model (one piece of code per mechanism of node/; names follow node/config.py):

* **Links**: every node has an uplink, a downlink (bytes/s) and an access delay; a path's one-way latency is the
  sum of its ends' delays. A transfer of one chunk is a request (one-way), then the bytes: while it moves it gets
  ``min(up[src] / uploads active at src, down[dst] / downloads active at dst)`` (recomputed whenever any transfer
  starts or ends: a fluid, roughly fair share), then the last byte's one-way trip. The learner's uplink is its
  ``--upload-limit``.
* **Fetching** (``VersionFetcher``): a sampler learns of a version at its next heartbeat poll (``poll_interval``),
  pays one round trip for the manifest, then keeps up to ``max_inflight`` chunk requests, ``max_inflight_per_peer``
  per source, over ``max_peers`` neighbours (random samplers working on the same version) plus the learner; each
  free slot at a neighbour takes the rarest chunk it holds (fewest holders among my neighbours); the learner is
  asked for a chunk nobody else is fetching for me. Sources serve ``max_uploads`` chunks at once, 2 per requester,
  else "busy" (retry after 0.5-1.5 s). Client-mode samplers (``--client-fraction``) do not serve.
* **Rationing** (``ChunkRationer``): the learner serves, among the chunks the requester lacks, one it has served
  least, and a chunk again only after ``ration_interval`` (``max(5 s, 2 x size / upload limit)``), else it answers
  "rationed" with the wait.
* **Versions**: full, or with ``--delta F`` a version ``v`` is also published as a delta from ``v-1`` of ``F x`` the
  size; a sampler ``k`` versions behind fetches ``k`` deltas in turn unless ``k F >= 1`` (then the full version).
  A download in progress is finished before moving to the newest version (as the fetcher does).
* **Rollouts**: each sampler generates a group every ``gen_time`` seconds (lognormal across samplers) with the
  newest version it holds when it starts; the group reaches the learner after the one-way latency plus its bytes
  on the uplink. The learner trains a step when ``batch`` groups at most ``max_staleness`` versions old are
  waiting (older ones are dropped), takes ``step_time`` seconds, then publishes the next version.
* **Churn**: sampler sessions and absences are exponential (``--session``, ``--offline``); a sampler that leaves
  drops its transfers (both ways) and keeps its chunks on disk for when it returns.

Chunks: the simulator uses at most ``--max-chunks`` pieces per version (a 16 GB version is simulated as 64 pieces
of 256 MB): the dynamics of swarming depend on the number of pieces only weakly once there are dozens.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

MiB = 1 << 20
Mbit = 1e6 / 8  # bytes/s
MODELS = {"135M": 135e6 * 2, "1.7B": 1.7e9 * 2, "8B": 8.0e9 * 2}  # bf16 bytes


# ---------------------------------------------------------------------------------------------------------------
# parameters


@dataclass
class Links:
    """Per-node link figures: index 0 is the learner, 1..N the samplers."""
    up: np.ndarray      # bytes/s
    down: np.ndarray    # bytes/s
    delay: np.ndarray   # one-way access delay, s


@dataclass
class SimConfig:
    n: int = 10
    size: float = 16 * MiB                 # bytes per full version
    chunk_size: float = MiB
    max_chunks: int = 64
    # fetcher / server knobs (node/config.py defaults)
    max_inflight: int = 8
    max_inflight_per_peer: int = 2
    max_peers: int = 8
    max_uploads: int = 4
    per_requester: int = 2
    poll_interval: float = 1.0
    discovery: float = 1.5                 # s after starting a version before neighbours are known (DHT ChunkHave
                                           # records: announced <= 1/s, read every 0.5-3 s)
    have_lag: float = 0.3                  # a neighbour's new chunk is seen after have_poll + one-way latency
    machine_rate: float = math.inf         # bytes/s all transfers together can move: only for the calibration, where
                                           # every node shares one machine's CPUs (volunteers each have their own)
    request_overhead: float = 0.0          # s of processing per chunk request (both ends), fitted by --calibrate
    ration: bool = True
    ration_interval: Optional[float] = None
    swarming: bool = True
    client_fraction: float = 0.0
    delta: Optional[float] = None          # delta size as a fraction of the full size; None: full versions only
    # rollouts and learner (inf step_time: distribution only)
    step_time: float = math.inf
    batch: int = 64
    gen_time: float = 10.0                 # median seconds per group per sampler
    gen_sigma: float = 0.5                 # lognormal spread of gen_time across samplers
    group_bytes: float = 50e3
    max_staleness: int = 32
    max_pending: int = 8                   # sampler: pause generation while this many groups await an answer
    max_buffered_steps: int = 2            # learner: inbox bound, in steps ("busy" beyond it)
    steps: int = 30                        # learner steps to simulate
    # churn (inf: none)
    session: float = math.inf
    offline: float = 600.0
    horizon: float = 1e6                   # seconds of simulated time at most
    seed: int = 0


def wan_links(n: int, rng: np.random.Generator, learner_up: float = 1000 * Mbit, learner_down: float = 1000 * Mbit,
              learner_delay: float = 0.005) -> Links:
    """Volunteers on home links: uplink lognormal (median 20 Mbit/s, 5-100), downlink median 100 (10-1000),
    access delay uniform 10-150 ms; the learner in a data centre (1 Gbit/s, 5 ms)."""
    up = np.clip(rng.lognormal(math.log(20), 0.7, n), 5, 100) * Mbit
    down = np.clip(rng.lognormal(math.log(100), 0.7, n), 10, 1000) * Mbit
    delay = rng.uniform(0.010, 0.150, n)
    return Links(np.r_[learner_up, up], np.r_[learner_down, down], np.r_[learner_delay, delay])


# ---------------------------------------------------------------------------------------------------------------
# the simulator


def _bits(x: int):
    """Indices of the set bits of ``x``, lowest first."""
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


def _bool_array(x: int, n: int) -> np.ndarray:
    raw = np.frombuffer(x.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


class Obj:
    """A downloadable thing: version ``v`` full, or the delta ``v-1 -> v``."""

    def __init__(self, v: int, delta: bool, size: float, n_nodes: int, max_chunks: int, chunk_size: float):
        self.v, self.delta, self.size = v, delta, size
        self.chunks = max(1, min(max_chunks, int(math.ceil(size / chunk_size))))
        self.chunk_bytes = size / self.chunks
        self.have = np.zeros((n_nodes, self.chunks), dtype=bool)  # for rarity counts
        self.have[0] = True                                   # the learner holds what it published
        self.full = (1 << self.chunks) - 1
        self.bits = [0] * n_nodes                             # the same as Python-int bitmaps (fast tests)
        self.bits[0] = self.full
        self.seen = [0] * n_nodes                             # what the others see of ``bits`` (have_lag)
        self.seen[0] = self.full
        self.holders = np.zeros(self.chunks, dtype=np.int32)  # samplers holding each chunk
        self.served = np.zeros(self.chunks, dtype=np.int64)   # by the learner (rationing)
        self.last_served = np.full(self.chunks, -np.inf)
        self.learner_bytes = 0.0
        self.working: List[int] = []                          # samplers that fetched / are fetching it
        self.watchers: Dict[int, set] = {}                    # node -> samplers that have it as a neighbour


class SwarmSim:
    def __init__(self, cfg: SimConfig, links: Links, initial_version: int = 0):
        self.cfg, self.links = cfg, links
        self.rng = np.random.default_rng(cfg.seed)
        n1 = cfg.n + 1
        self.now = 0.0
        self.heap: List[Tuple[float, int, str, tuple]] = []
        self._seq = 0
        # flows (chunk transfers), preallocated
        cap = n1 * (cfg.max_inflight + 2) + 16
        self.f_src = np.zeros(cap, dtype=np.int64)
        self.f_dst = np.zeros(cap, dtype=np.int64)
        self.f_left = np.zeros(cap)
        self.f_rate = np.zeros(cap)
        self.f_tx = np.zeros(cap, dtype=bool)     # transmitting (past the request latency)
        self.f_used = np.zeros(cap, dtype=bool)
        self.f_meta: List[Optional[Tuple[Obj, int]]] = [None] * cap
        self.f_gen = np.zeros(cap, dtype=np.int64)  # generation counter (stale tx_start events)
        self._free = list(range(cap - 1, -1, -1))
        self._last_advance = 0.0
        self._next_finish = (math.inf, -1)
        # per node
        self.online = np.ones(n1, dtype=bool)
        self.serves = np.ones(n1, dtype=bool)
        n_client = int(round(cfg.client_fraction * cfg.n))
        if n_client:
            self.serves[1 + self.rng.permutation(cfg.n)[:n_client]] = False
        if not cfg.swarming:
            self.serves[1:] = False
        self.uploads = [0] * n1
        self.up_to: Dict[Tuple[int, int], int] = {}             # (src, dst) -> active transfers
        self.held = np.full(n1, initial_version, dtype=np.int64)
        self.known = np.full(n1, initial_version, dtype=np.int64)  # newest version the sampler heard of
        self.cur: List[Optional[Obj]] = [None] * n1
        self.inflight: List[int] = [0] * n1                  # bitmap of chunks being fetched
        self.n_inflight = [0] * n1
        self.per_src: List[Dict[int, int]] = [dict() for _ in range(n1)]
        self.neighbours: List[List[int]] = [[] for _ in range(n1)]
        self.retry_at = np.zeros(n1)
        self.waiting_on: List[set] = [set() for _ in range(n1)]  # samplers told "busy" by each source
        self.discover_at = np.zeros(n1)
        self.manifest_at = np.zeros(n1)
        self.wake_at = np.full(n1, -1.0)  # the one pending "wake" event of each sampler (-1: none)
        # versions
        self.version = initial_version
        self.objs: Dict[Tuple[int, bool], Obj] = {}
        self.published_at: Dict[int, float] = {}
        self.hold_times: Dict[int, Dict[int, float]] = {}  # version -> sampler -> seconds from publish to held
        # rollouts / learner
        self.gen_time = np.r_[0.0, cfg.gen_time * self.rng.lognormal(0.0, cfg.gen_sigma, cfg.n)]
        self.inbox: List[int] = []                          # versions of the accepted groups, oldest first
        self.outbox = [0] * n1
        self.gen_token = [0] * n1
        self.busy = 0
        self.staleness: List[int] = []
        self.dropped = 0
        self.training = False
        self.steps_done = 0
        self.wait_time = 0.0
        self.idle_since = 0.0
        self.done = False

    # --- events -------------------------------------------------------------------------------------------------
    def at(self, t: float, kind: str, *args) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, args))

    def latency(self, a: int, b: int) -> float:
        return float(self.links.delay[a] + self.links.delay[b])

    # --- flows --------------------------------------------------------------------------------------------------
    def _advance(self) -> None:
        dt = self.now - self._last_advance
        if dt > 0:
            m = self.f_used & self.f_tx
            self.f_left[m] -= self.f_rate[m] * dt
        self._last_advance = self.now

    def _recompute(self) -> None:
        m = self.f_used & self.f_tx
        idx = np.flatnonzero(m)
        if not len(idx):
            self._next_finish = (math.inf, -1)
            return
        n1 = self.cfg.n + 1
        src, dst = self.f_src[idx], self.f_dst[idx]
        n_up = np.bincount(src, minlength=n1)
        n_down = np.bincount(dst, minlength=n1)
        rate = np.minimum(self.links.up[src] / n_up[src], self.links.down[dst] / n_down[dst])
        total = float(rate.sum())
        if total > self.cfg.machine_rate:
            rate *= self.cfg.machine_rate / total
        self.f_rate[idx] = rate
        left = np.maximum(self.f_left[idx], 0.0)
        t = left / rate
        k = int(np.argmin(t))
        self._next_finish = (self.now + float(t[k]), int(idx[k]))

    def _start_flow(self, src: int, dst: int, obj: Obj, chunk: int) -> None:
        k = self._free.pop()
        self.f_src[k], self.f_dst[k], self.f_left[k] = src, dst, obj.chunk_bytes
        self.f_tx[k], self.f_used[k] = False, True
        self.f_gen[k] += 1
        self.f_meta[k] = (obj, chunk)
        self.uploads[src] += 1
        self.up_to[(src, dst)] = self.up_to.get((src, dst), 0) + 1
        self.inflight[dst] |= 1 << chunk
        self.n_inflight[dst] += 1
        self.per_src[dst][src] = self.per_src[dst].get(src, 0) + 1
        self.at(self.now + 2 * self.latency(src, dst) + self.cfg.request_overhead, "tx_start", k,
                int(self.f_gen[k]))  # request + first byte

    def _end_flow(self, k: int) -> Tuple[int, int, Obj, int]:
        self._advance()
        src, dst = int(self.f_src[k]), int(self.f_dst[k])
        obj, chunk = self.f_meta[k]
        self.f_used[k], self.f_tx[k] = False, False
        self.f_meta[k] = None
        self._free.append(k)
        self.uploads[src] -= 1
        self.up_to[(src, dst)] -= 1
        self.n_inflight[dst] -= 1
        self.per_src[dst][src] -= 1
        if self.cur[dst] is obj:
            self.inflight[dst] &= ~(1 << chunk)
        self._recompute()
        return src, dst, obj, chunk

    # --- versions -----------------------------------------------------------------------------------------------
    def obj(self, v: int, delta: bool) -> Obj:
        key = (v, delta)
        if key not in self.objs:
            size = self.cfg.size * (self.cfg.delta if delta else 1.0)
            self.objs[key] = Obj(v, delta, size, self.cfg.n + 1, self.cfg.max_chunks, self.cfg.chunk_size)
        return self.objs[key]

    def publish(self) -> None:
        v = self.version
        self.published_at[v] = self.now
        self.hold_times[v] = {}
        self.obj(v, False)
        if self.cfg.delta is not None:
            self.obj(v, True)
        for i in range(1, self.cfg.n + 1):
            self.at(self.now + self.rng.uniform(0, self.cfg.poll_interval) + 2 * self.latency(0, i), "heard", i, v)

    def _next_obj(self, i: int) -> Optional[Obj]:
        target = self.known[i]
        h = self.held[i]
        if target <= h:
            return None
        if self.cfg.delta is not None and (target - h) * self.cfg.delta < 1.0:
            return self.obj(int(h) + 1, True)
        return self.obj(int(target), False)

    def _begin(self, i: int) -> None:
        obj = self._next_obj(i)
        if obj is None:
            return
        self.cur[i] = obj
        self.inflight[i] = 0
        others = [j for j in obj.working if j != i and self.serves[j]]
        if len(others) > self.cfg.max_peers:
            others = list(self.rng.choice(others, self.cfg.max_peers, replace=False))
        self.neighbours[i] = others
        for j in others:
            obj.watchers.setdefault(j, set()).add(i)
        if self.serves[i]:
            # the neighbours find us through our ChunkHave record, as we find them
            for j in others:
                if self.cur[j] is obj and i not in self.neighbours[j] and len(self.neighbours[j]) < self.cfg.max_peers:
                    self.neighbours[j].append(i)
                    obj.watchers.setdefault(i, set()).add(j)
        obj.working.append(i)
        self.manifest_at[i] = self.now + 2 * self.latency(0, i)  # the manifest's round trip
        self.discover_at[i] = self.manifest_at[i] + self.cfg.discovery
        self._schedule_wake(i, self.manifest_at[i])
        self.at(self.discover_at[i], "discovered", i)

    def _complete(self, i: int, obj: Obj) -> None:
        before = int(self.held[i])
        self.held[i] = obj.v
        self.cur[i], self.inflight[i] = None, 0
        for v in range(before + 1, obj.v + 1):
            if v in self.hold_times:
                self.hold_times[v][i] = self.now - self.published_at[v]
        self._begin(i)

    # --- requests -----------------------------------------------------------------------------------------------
    def _wake(self, i: int) -> None:
        """Fill sampler ``i``'s free request slots: neighbours first (rarest chunk each holds), then the learner."""
        obj = self.cur[i]
        cfg = self.cfg
        if obj is None or not self.online[i] or self.n_inflight[i] >= cfg.max_inflight or self.now < self.manifest_at[i]:
            return
        lacking = obj.full & ~(obj.bits[i] | self.inflight[i])
        if not lacking:
            return
        neigh = [j for j in self.neighbours[i] if self.online[j] and obj.seen[j] & lacking] \
            if self.now >= self.discover_at[i] else []
        rarity = None
        for j in neigh:
            while self.n_inflight[i] < cfg.max_inflight and self.per_src[i].get(j, 0) < cfg.max_inflight_per_peer:
                cand = lacking & obj.seen[j]
                if not cand:
                    break
                if self.uploads[j] >= cfg.max_uploads or self.up_to.get((j, i), 0) >= cfg.per_requester:
                    self.waiting_on[j].add(i)  # "busy": asked again as soon as one of j's uploads ends
                    break
                if rarity is None:
                    rarity = obj.have[neigh].sum(axis=0) + self.rng.random(obj.chunks) * 0.5
                c = min(_bits(cand), key=rarity.__getitem__)
                self._start_flow(j, i, obj, c)
                lacking &= ~(1 << c)
        while (lacking and self.n_inflight[i] < cfg.max_inflight
               and self.per_src[i].get(0, 0) < cfg.max_inflight_per_peer and self.now >= self.retry_at[i]):
            if self.uploads[0] >= cfg.max_uploads or self.up_to.get((0, i), 0) >= cfg.per_requester:
                self.waiting_on[0].add(i)
                break
            c, wait = self._ration(obj, _bool_array(lacking, obj.chunks))
            if c is None:
                self.retry_at[i] = self.now + wait
                self._schedule_wake(i, self.retry_at[i])
                break
            obj.learner_bytes += obj.chunk_bytes
            self._start_flow(0, i, obj, c)
            lacking &= ~(1 << c)
        if lacking and self.now < self.retry_at[i]:
            self._schedule_wake(i, self.retry_at[i])  # an earlier wake (a busy neighbour) must not lose this one

    def _ration(self, obj: Obj, lacking: np.ndarray) -> Tuple[Optional[int], float]:
        if not self.cfg.ration:
            idx = np.flatnonzero(lacking)
            return int(idx[np.argmin(obj.served[idx] + self.rng.random(len(idx)) * 0.5)]), 0.0
        interval = self.cfg.ration_interval
        if interval is None:
            interval = max(5.0, 2.0 * obj.size / self.links.up[0])
        eligible = lacking & ((obj.served == 0) | (self.now - obj.last_served >= interval))
        if not eligible.any():
            return None, max(0.2, float(np.min(obj.last_served[lacking] + interval - self.now)))
        idx = np.flatnonzero(eligible)
        c = int(idx[np.argmin(obj.served[idx] + self.rng.random(len(idx)) * 0.5)])
        obj.served[c] += 1
        obj.last_served[c] = self.now
        return c, 0.0

    # --- rollouts and the learner ---------------------------------------------------------------------------------
    def _try_step(self) -> None:
        if self.training or self.done:
            return
        fresh = [v for v in self.inbox if self.version - v <= self.cfg.max_staleness]
        self.dropped += len(self.inbox) - len(fresh)
        self.inbox = fresh
        if len(fresh) < self.cfg.batch:
            return
        batch, self.inbox = fresh[: self.cfg.batch], fresh[self.cfg.batch:]
        self.staleness.extend(self.version - v for v in batch)
        self.wait_time += self.now - self.idle_since
        self.training = True
        self.at(self.now + self.cfg.step_time, "step_done")

    # --- main loop --------------------------------------------------------------------------------------------------
    def run(self) -> "SwarmSim":
        cfg = self.cfg
        if math.isinf(cfg.step_time):  # distribution only: every sampler holds v0, v1 is published at t = 0
            self.version += 1
            self.publish()
        else:
            self.published_at[self.version] = 0.0
            for i in range(1, cfg.n + 1):
                self.at(self.rng.uniform(0, self.gen_time[i]), "gen", i, int(self.held[i]), 0)
        if not math.isinf(cfg.session):
            for i in range(1, cfg.n + 1):
                self.at(self.rng.exponential(cfg.session), "leave", i)
        while not self.done:
            t_heap = self.heap[0][0] if self.heap else math.inf
            t_flow, k = self._next_finish
            if min(t_heap, t_flow) > cfg.horizon or min(t_heap, t_flow) == math.inf:
                break
            if t_flow <= t_heap:
                self.now = t_flow
                src, dst, obj, chunk = self._end_flow(k)
                self._got_chunk(dst, obj, chunk)
                self._wake(dst)
                waiting = self.waiting_on[src]
                if waiting:
                    # each one told "busy" retries after 0.5-1.5 s (retry_after): the freed slot goes to whichever
                    # request reaches src first, on average ~U(0, 1) s + its one-way latency after it freed
                    self.waiting_on[src] = set()
                    for j in waiting:
                        self._schedule_wake(j, self.now + self.rng.random() + self.latency(j, src))
                if src != 0:
                    self._wake_waiting_on(src, obj)
                continue
            t, _, kind, args = heapq.heappop(self.heap)
            self.now = t
            getattr(self, "_on_" + kind)(*args)
        return self

    def _got_chunk(self, i: int, obj: Obj, chunk: int) -> None:
        bit = 1 << chunk
        if obj.bits[i] & bit:
            return
        obj.bits[i] |= bit
        obj.have[i, chunk] = True
        obj.holders[chunk] += 1
        if self.serves[i]:
            self.at(self.now + self.cfg.have_lag + self.links.delay[i], "seen", i, obj, chunk)
        if self.cur[i] is obj and obj.bits[i] == obj.full:
            self._complete(i, obj)
            self._check_done()

    def _wake_waiting_on(self, src: int, obj: Obj) -> None:
        """``src`` has a new chunk or a free upload slot: its neighbours working on ``obj`` may ask it now."""
        offer = obj.seen[src]
        for j in list(obj.watchers.get(src, ())):
            if (self.cur[j] is obj and self.n_inflight[j] < self.cfg.max_inflight
                    and offer & ~(obj.bits[j] | self.inflight[j])):
                self._wake(j)

    def _check_done(self) -> None:
        if math.isinf(self.cfg.step_time) and all(self.held[1:] >= self.version):
            self.done = True

    def _on_tx_start(self, k: int, gen: int) -> None:
        if not self.f_used[k] or self.f_gen[k] != gen:
            return
        self._advance()
        self.f_tx[k] = True
        self._recompute()

    def _schedule_wake(self, i: int, t: float) -> None:
        """At most one pending retry per sampler: the earliest one wins (so retries never multiply)."""
        if self.now <= self.wake_at[i] <= t:
            return
        self.wake_at[i] = t
        self.at(t, "wake", i, t)

    def _on_seen(self, i: int, obj: Obj, chunk: int) -> None:
        obj.seen[i] |= 1 << chunk
        self._wake_waiting_on(i, obj)

    def _on_discovered(self, i: int) -> None:
        self._wake(i)

    def _on_wake(self, i: int, t: float) -> None:
        if self.wake_at[i] != t:
            return  # superseded by an earlier one
        self.wake_at[i] = -1.0
        self._wake(i)

    def _on_heard(self, i: int, v: int) -> None:
        if not self.online[i]:
            return
        self.known[i] = max(self.known[i], v)
        if self.cur[i] is None:
            self._begin(i)

    def _start_gen(self, i: int) -> None:
        """Start the next group, or wait while the outbox is full (``max_pending``: back-pressure) or the learner is
        more than ``max_staleness`` versions ahead (what we would make would be dropped)."""
        if not self.online[i] or self.done:
            return
        if self.outbox[i] >= self.cfg.max_pending or self.known[i] - self.held[i] > self.cfg.max_staleness:
            self.at(self.now + 0.5, "gen_retry", i, self.gen_token[i])
            return
        self.at(self.now + self.gen_time[i], "gen", i, int(self.held[i]), self.gen_token[i])

    def _on_gen_retry(self, i: int, token: int) -> None:
        if token == self.gen_token[i]:
            self._start_gen(i)

    def _on_gen(self, i: int, version: int, token: int) -> None:
        if token != self.gen_token[i] or not self.online[i] or self.done:
            return
        self.outbox[i] += 1
        self._send(i, version, 0.0, 0)
        self._start_gen(i)

    def _send(self, i: int, version: int, wait: float, tries: int) -> None:
        self.at(self.now + wait + self.latency(i, 0) + self.cfg.group_bytes / self.links.up[i], "group", i, version,
                tries)

    def _on_group(self, i: int, version: int, tries: int) -> None:
        if len(self.inbox) >= self.cfg.max_buffered_steps * self.cfg.batch:
            # "busy": the sampler keeps it and retries after an exponential, jittered back-off (retry_min 0.5 s,
            # retry_max 30 s)
            self.busy += 1
            backoff = min(30.0, 0.5 * 2 ** tries) * self.rng.uniform(0.5, 1.5)
            self._send(i, version, self.latency(i, 0) + backoff, tries + 1)
            return
        self.inbox.append(version)
        self.at(self.now + self.latency(i, 0), "acked", i)
        self._try_step()

    def _on_acked(self, i: int) -> None:
        self.outbox[i] -= 1

    def _on_step_done(self) -> None:
        self.training = False
        self.steps_done += 1
        self.version += 1
        self.publish()
        if self.steps_done >= self.cfg.steps:
            self.done = True
            return
        self.idle_since = self.now
        self._try_step()

    def _on_leave(self, i: int) -> None:
        self.online[i] = False
        for k in np.flatnonzero(self.f_used & ((self.f_src == i) | (self.f_dst == i))):
            src, dst, obj, chunk = self._end_flow(int(k))
            if src == 0:
                obj.served[chunk] = max(0, obj.served[chunk] - 1)
                obj.last_served[chunk] = -np.inf
        self.at(self.now + self.rng.exponential(self.cfg.offline), "rejoin", i)

    def _on_rejoin(self, i: int) -> None:
        self.online[i] = True
        self.known[i] = self.version
        if self.cur[i] is not None:
            self.inflight[i] = 0
            self._schedule_wake(i, self.now + 2 * self.latency(0, i))
        else:
            self._begin(i)
        self.gen_token[i] += 1
        self._start_gen(i)
        self.at(self.now + self.rng.exponential(self.cfg.session), "leave", i)

    # --- results ------------------------------------------------------------------------------------------------
    def hold_quantile(self, v: int, q: float) -> float:
        """Seconds from publishing ``v`` until a fraction ``q`` of all samplers held it or newer (inf: not by then)."""
        times = sorted(self.hold_times.get(v, {}).values())
        k = int(math.ceil(q * self.cfg.n)) - 1
        return times[k] if len(times) > k else math.inf

    def learner_upload(self, v: int) -> float:
        return sum(o.learner_bytes for (w, _), o in self.objs.items() if w == v)

    def per_sampler_times(self, v: int) -> np.ndarray:
        out = np.full(self.cfg.n, math.inf)
        for i, t in self.hold_times.get(v, {}).items():
            out[i - 1] = t
        return out


# ---------------------------------------------------------------------------------------------------------------
# scenarios


# Assumptions for the predictions (one learner node, volunteers with one consumer GPU each, vLLM): seconds per
# learner step of ``batch`` = 64 groups, median seconds for a sampler to generate one group (8 completions x 512
# tokens), with the lognormal spread ``gen_sigma`` across samplers.
MODEL_TIMES = {"135M": (10.0, 4.0), "1.7B": (30.0, 15.0), "8B": (90.0, 50.0)}
DELTA = 0.015  # bf16 delta per version, a fraction of the full size (docs/../notes: 0.8-1.9 % measured here)


def scenario(n: int, model: str, delta: Optional[float], continuous: bool, seed: int = 0, **kw) -> SimConfig:
    size = MODELS[model]
    step, gen = MODEL_TIMES[model]
    max_chunks = 16 if n >= 1000 else 32
    base = SimConfig(n=n, size=size, chunk_size=MiB, max_chunks=max_chunks,  # deltas get their own pieces
                     delta=delta, poll_interval=1.0, seed=seed)
    if continuous:
        base = replace(base, step_time=step, gen_time=gen, steps=60 if n < 1000 else 40, session=3600.0,
                       offline=600.0)
    return replace(base, **kw)


def run_scenario(cfg: SimConfig) -> Dict[str, float]:
    rng = np.random.default_rng(cfg.seed + 1000)
    sim = SwarmSim(cfg, wan_links(cfg.n, rng)).run()
    out: Dict[str, float] = {"sim_time": sim.now}
    if math.isinf(cfg.step_time):
        v = sim.version
        out.update(t50=sim.hold_quantile(v, 0.5), t90=sim.hold_quantile(v, 0.9), t100=sim.hold_quantile(v, 1.0),
                   learner_upload=sim.learner_upload(v) / cfg.size)
        return out
    versions = [v for v in sim.published_at if v >= 1 and v < sim.version]
    t90 = [sim.hold_quantile(v, 0.9) for v in versions]
    reached = [t for t in t90 if math.isfinite(t)]
    st = np.array(sim.staleness) if sim.staleness else np.array([np.nan])
    total = sim.now
    waited = sim.wait_time + ((sim.now - sim.idle_since) if not sim.training and not sim.done else 0.0)
    out.update(steps=sim.steps_done, wait_fraction=waited / total if total else math.nan,
               staleness_median=float(np.median(st)), staleness_p90=float(np.percentile(st, 90)),
               staleness_max=float(np.max(st)), staleness_hist=np.bincount(st.astype(int)).tolist()
               if np.isfinite(st).all() else [],
               dropped=sim.dropped, busy=sim.busy, trained=len(sim.staleness),
               t90_median=statistics.median(reached) if reached else math.inf,
               t90_reached=f"{len(reached)}/{len(t90)}",
               learner_upload=sum(sim.learner_upload(v) for v in versions) / len(versions) / cfg.size if versions
               else math.nan)  # mean per published version
    return out


# ---------------------------------------------------------------------------------------------------------------
# calibration against scripts/bench/bench_wan.py


def _bench_links(bench: Dict[str, object], baseline: bool) -> Links:
    from scripts.bench.bench_wan import GOODPUT, parse_links

    lu, ld, lms = parse_links(bench["learner_link"])[0]
    links = parse_links(bench["links"])
    if baseline:
        links = [(1e6, 1e6, 0.0)] * len(links)
    return Links(np.r_[lu * Mbit * GOODPUT, [u * Mbit * GOODPUT for u, _, _ in links]],
                 np.r_[ld * Mbit * GOODPUT, [d * Mbit * GOODPUT for _, d, _ in links]],
                 np.r_[lms / 1000, [m / 1000 for _, _, m in links]])


def _simulate_bench(bench: Dict[str, object], links: Links, seeds: int, overhead: float):
    out = []
    for seed in range(seeds):
        cfg = SimConfig(n=len(links.up) - 1, size=bench["size"], chunk_size=bench["chunk_size"], max_chunks=1 << 16,
                        poll_interval=0.25, seed=seed, request_overhead=overhead)
        sim = SwarmSim(cfg, links).run()
        out.append((sim.per_sampler_times(sim.version), sim.learner_upload(sim.version) / bench["size"]))
    return out


def calibrate(path: str, seeds: int = 10) -> Dict[str, object]:
    """Simulate bench_wan's distribution phases with its links, sizes and learner limit. One parameter is fitted,
    on the same-run baseline (uncapped samplers, no delay): ``request_overhead``, the seconds of processing each
    chunk request costs on this loaded machine (bisection until the simulated baseline matches the measured one);
    the capped, delayed WAN run is then predicted with it, and without it (the network alone)."""
    from scripts.bench.bench_wan import parse_links

    bench = json.loads(Path(path).read_text())
    runs = bench["distribution"]["runs"]
    base_all = statistics.median(max(r["times"]) for r in bench["distribution_base"]["runs"])
    base_links = _bench_links(bench, baseline=True)
    lo, hi = 0.0, 3.0
    for _ in range(14):
        mid = (lo + hi) / 2
        t = statistics.median(float(ts.max()) for ts, _ in _simulate_bench(bench, base_links, seeds, mid))
        lo, hi = (mid, hi) if t < base_all else (lo, mid)
    overhead = (lo + hi) / 2
    wan_links_ = _bench_links(bench, baseline=False)
    result: Dict[str, object] = {
        "links": parse_links(bench["links"]), "request_overhead": overhead, "baseline_measured": base_all,
        "measured": np.median(np.array([r["times"] for r in runs]), axis=0).tolist(),
        "measured_all": statistics.median(max(r["times"]) for r in runs),
        "measured_upload": statistics.median(r["upload"] for r in runs) / bench["size"], "size": bench["size"]}
    for key, value in (("predicted", overhead), ("network_only", 0.0)):
        sims = _simulate_bench(bench, wan_links_, seeds, value)
        result[key] = np.median(np.array([t for t, _ in sims]), axis=0).tolist()
        result[key + "_all"] = statistics.median(float(t.max()) for t, _ in sims)
        result[key + "_upload"] = statistics.median(u for _, u in sims)
    return result


def calibration_table(c: Dict[str, object]) -> str:
    rows = [f"Fitted on the same-run baseline (uncapped samplers, no delay; all hold it after "
            f"{c['baseline_measured']:.1f} s): request_overhead = {c['request_overhead'] * 1000:.0f} ms per chunk.", "",
            "| sampler link (up/down Mbit/s @ access ms) | measured (median) | predicted | predicted / measured | "
            "network only (overhead 0) |", "|---|---|---|---|---|"]
    for i, ((u, d, m), meas, pred, net) in enumerate(zip(c["links"], c["measured"], c["predicted"],
                                                         c["network_only"])):
        rows.append(f"| s{i} {u:g}/{d:g} @ {m:g} | {meas:.1f} s | {pred:.1f} s | {pred / meas:.2f} | {net:.1f} s |")
    rows.append(f"| **all six hold it** | **{c['measured_all']:.1f} s** | **{c['predicted_all']:.1f} s** | "
                f"**{c['predicted_all'] / c['measured_all']:.2f}** | {c['network_only_all']:.1f} s |")
    rows.append(f"| learner upload per version | {c['measured_upload']:.2f} x | {c['predicted_upload']:.2f} x | "
                f"{c['predicted_upload'] / c['measured_upload']:.2f} | {c['network_only_upload']:.2f} x |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# the tables and plot of docs/SCALE.md


def fmt_t(t: float) -> str:
    if not math.isfinite(t):
        return "not reached"
    return f"{t:.0f} s" if t < 600 else f"{t / 60:.0f} min"


def scale(ns: List[int], models: List[str], out_json: str, plot: Optional[str]) -> Dict[str, object]:
    results: Dict[str, object] = {}
    for model in models:
        for n in ns:
            for label, delta in (("full", None), ("delta", DELTA)):
                for kind in ("distribution", "continuous"):
                    t0 = time.time()
                    r = run_scenario(scenario(n, model, delta, kind == "continuous"))
                    r["wall_s"] = time.time() - t0
                    results[f"{model}|{n}|{label}|{kind}"] = r
                    print(f"{model:5s} N={n:5d} {label:5s} {kind:12s} " + ", ".join(
                        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                        if k != "staleness_hist"), flush=True)
                    Path(out_json).write_text(json.dumps(results, indent=1))
    if plot:
        make_plot(results, ns, models, plot)
    return results


def tables(results: Dict[str, object], ns: List[int], models: List[str]) -> str:
    """The markdown tables of docs/SCALE.md from a --scale JSON."""
    out = ["| model (bf16 size) | N | full: 90 % hold it | full: learner upload | delta 1.5 %: 90 % hold it | "
           "delta: learner upload (x full size) |", "|---|---:|---:|---:|---:|---:|"]
    for model in models:
        for n in ns:
            if f"{model}|{n}|delta|distribution" not in results:
                continue
            f, d = (results[f"{model}|{n}|{k}|distribution"] for k in ("full", "delta"))
            out.append(f"| {model} ({MODELS[model] / 1e9:.2g} GB) | {n} | {fmt_t(f['t90'])} | "
                       f"{f['learner_upload']:.1f} x | {fmt_t(d['t90'])} | {d['learner_upload']:.3f} x |")
    out += ["", "| model | N | versions | learner waits | staleness median / p90 / max | groups dropped stale | "
            "realised 90 % hold time (median) | learner upload per version |", "|---|---:|---|---:|---|---:|---:|---:|"]
    for model in models:
        for n in ns:
            for kind in ("full", "delta"):
                r = results.get(f"{model}|{n}|{kind}|continuous")
                if r is None:
                    continue
                out.append(f"| {model} | {n} | {kind} | {100 * r['wait_fraction']:.0f} % | "
                           f"{r['staleness_median']:.0f} / {r['staleness_p90']:.0f} / {r['staleness_max']:.0f} | "
                           f"{r['dropped']} of {r['dropped'] + r['trained']} | {fmt_t(r['t90_median'])} "
                           f"({r['t90_reached']} reached) | {r['learner_upload']:.2f} x |")
    return "\n".join(out)


def make_plot(results: Dict[str, object], ns: List[int], models: List[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colours = {"135M": "tab:blue", "1.7B": "tab:orange", "8B": "tab:red"}
    for model in models:
        for label, style in (("full", "-"), ("delta", "--")):
            def series(kind: str, key: str):
                pts = [(n, results[f"{model}|{n}|{label}|{kind}"][key]) for n in ns
                       if f"{model}|{n}|{label}|{kind}" in results]
                return [n for n, _ in pts], [v for _, v in pts]

            axes[0].plot(*series("distribution", "t90"), style, marker="o", color=colours[model],
                         label=f"{model} {label}")
            axes[1].plot(*series("continuous", "wait_fraction"), style, marker="o", color=colours[model])
            axes[2].plot(*series("continuous", "staleness_p90"), style, marker="o", color=colours[model])
            axes[2].plot(*series("continuous", "staleness_median"), style, marker=".", color=colours[model],
                         alpha=0.4)
    axes[0].set(xscale="log", yscale="log", xlabel="samplers N", ylabel="seconds",
                title="time until 90 % of samplers hold a new version")
    axes[1].set(xscale="log", xlabel="samplers N", ylabel="fraction of time", ylim=(-0.02, 1.02),
                title="learner waiting for rollouts")
    axes[2].set(xscale="log", xlabel="samplers N", ylabel="versions",
                title="staleness the learner sees (p90; faint: median)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    axes[2].axhline(32, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibrate", metavar="BENCH_JSON", help="compare with a bench_wan.py --json result")
    p.add_argument("--scale", action="store_true", help="the N x model grid of docs/SCALE.md")
    p.add_argument("--ns", default="10,100,1000")
    p.add_argument("--models", default="135M,1.7B,8B")
    p.add_argument("--json", default="simulate_swarm.json", help="--scale: where the figures go")
    p.add_argument("--plot", default=None, help="--scale: PNG path")
    p.add_argument("--tables", metavar="SCALE_JSON", help="print the markdown tables of a --scale JSON (and --plot)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--model", default="1.7B", choices=sorted(MODELS))
    p.add_argument("--delta", type=float, default=None, help="delta size fraction (default: full versions)")
    p.add_argument("--continuous", action="store_true", help="learner steps and rollouts, not one version")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.calibrate:
        print(calibration_table(calibrate(a.calibrate)))
    elif a.tables:
        results = json.loads(Path(a.tables).read_text())
        ns, models = [int(x) for x in a.ns.split(",")], a.models.split(",")
        print(tables(results, ns, models))
        if a.plot:
            make_plot(results, ns, models, a.plot)
    elif a.scale:
        scale([int(x) for x in a.ns.split(",")], a.models.split(","), a.json, a.plot)
    else:
        t0 = time.time()
        r = run_scenario(scenario(a.n, a.model, a.delta, a.continuous, seed=a.seed))
        print(json.dumps(r, indent=1), f"\n({time.time() - t0:.1f} s)", file=sys.stdout)


if __name__ == "__main__":
    main()
