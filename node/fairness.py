"""Fair limits on the learner's rollout intake: no single peer (or flood of fresh keys) can starve the others.

Three pieces, all bookkeeping only (the networking stays in :mod:`node.learner_swarm`):

* :class:`KeyHistory` - per sampler key, how many of its groups the learner accepted (passed ``validate``). An LRU
  of at most ``max_keys`` entries: a flood of fresh keys evicts other fresh keys (count 1) long before it could
  evict an established sampler, because every accepted group moves its key to the young end.
* :class:`InboxShares` - who may put a validated group into the bounded inbox. Keys with fewer than
  ``trusted_after`` accepted groups ("fresh") share a small pool (``fresh_share`` of the inbox, at least one slot)
  and may have at most one group waiting each; the rest of the inbox belongs to established keys, split between the
  keys that have groups waiting or asked for room in the last ``ACTIVE_WINDOW`` s, in proportion to their history
  (capped at ``WEIGHT_CAP``), each share at least one slot: a key over its share is told ``busy`` while one under
  it takes the next slot that frees. Under a full trainer, the inbox's occupancy is the throughput share (the trainer
  takes FIFO), so however many fresh keys push, they get at most the pool's share of training, and an established
  sampler keeps at least its weighted share of the rest.
* :class:`PushStreams` - the learner's push-stream slots: at most ``max_total`` at once and ``max_per_peer`` per
  libp2p peer; a stream that delivered no accepted group for ``idle_timeout`` s is closed (junk frames, rejected or
  refused groups do not keep it alive); when every slot is taken, a newcomer evicts the stream that has gone
  longest without an accepted group, provided that is more than ``evict_grace`` s. A peer over its own cap is
  answered only after ``TARPIT_SECONDS`` (up to ``MAX_TARPITTED`` such streams at once, then at once): an attacker
  that reopens as soon as it is refused costs the learner a few refusals a second, not hundreds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional

#: an established key's weight in the inbox split is its accepted-group count, capped here: a key that delivered
#: 64 groups counts as much as one that delivered 64,000, so a veteran cannot lock newcomers out for ever
WEIGHT_CAP = 64
#: an established key that asked for room this recently counts as competing for it (even if it got none)
ACTIVE_WINDOW = 10.0
MAX_ACTIVE_KEYS = 4096
TARPIT_SECONDS = 5.0
MAX_TARPITTED = 256


class KeyHistory:
    """Accepted-group counts per sampler key, bounded (least recently accepted keys are forgotten first)."""

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max(1, int(max_keys))
        self._counts: "OrderedDict[Hashable, int]" = OrderedDict()
        self.forgotten = 0

    def accepted(self, key: Hashable) -> int:
        n = self._counts.pop(key, 0) + 1
        self._counts[key] = n
        while len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)
            self.forgotten += 1
        return n

    def count(self, key: Hashable) -> int:
        return self._counts.get(key, 0)

    def forget(self, key: Hashable) -> None:
        """Drop a key's standing (e.g. the learner banned it): it starts again in the fresh pool."""
        self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)


class InboxShares:
    """Admission to the bounded inbox by sampler key (see the module docstring). Thread-safe: the swarm's event
    loop admits and puts, the trainer's thread reports what it took."""

    def __init__(self, capacity: int, history: KeyHistory, *, fresh_share: float = 0.0625, trusted_after: int = 8,
                 fresh_per_key: int = 1):
        self.capacity = max(1, int(capacity))
        self.history = history
        self.trusted_after = max(0, int(trusted_after))
        self.fresh_per_key = max(1, int(fresh_per_key))
        self.fresh_pool = min(self.capacity, max(1, round(self.capacity * float(fresh_share))))
        self.trusted_room = max(1, self.capacity - self.fresh_pool)
        self._fresh: Dict[Hashable, int] = {}  # queued groups admitted as fresh, per key
        self._trusted: Dict[Hashable, int] = {}  # queued groups admitted as established, per key
        self._asked: "OrderedDict[Hashable, float]" = OrderedDict()  # established keys that asked lately
        self.fresh_total = 0
        self.trusted_total = 0
        self._lock = threading.Lock()

    def is_trusted(self, key: Hashable) -> bool:
        return self.history.count(key) >= self.trusted_after

    def weight(self, key: Hashable) -> int:
        return max(1, min(self.history.count(key), WEIGHT_CAP))

    def quota(self, key: Hashable) -> int:
        """Slots ``key`` may hold now: its weighted share of the established room among the competing keys."""
        competing = set(self._trusted) | set(self._asked)
        competing.discard(key)
        total = self.weight(key) + sum(self.weight(k) for k in competing)
        return max(1, (self.trusted_room * self.weight(key)) // total)

    def admits(self, key: Hashable, now: Optional[float] = None) -> bool:
        with self._lock:
            return self._admits(key, time.monotonic() if now is None else now)

    def _admits(self, key: Hashable, now: float) -> bool:
        if self.is_trusted(key):
            self._asked.pop(key, None)
            self._asked[key] = now
            while self._asked and (len(self._asked) > MAX_ACTIVE_KEYS
                                   or next(iter(self._asked.values())) < now - ACTIVE_WINDOW):
                self._asked.popitem(last=False)
            return self.trusted_total < self.trusted_room and self._trusted.get(key, 0) < self.quota(key)
        return self.fresh_total < self.fresh_pool and self._fresh.get(key, 0) < self.fresh_per_key

    def put(self, key: Hashable) -> None:
        """A group of ``key`` entered the inbox (call right after :meth:`admits` said yes, or for reloaded groups)."""
        with self._lock:
            self._put(key)

    def _put(self, key: Hashable) -> None:
        if self.is_trusted(key):
            self._trusted[key] = self._trusted.get(key, 0) + 1
            self.trusted_total += 1
        else:
            self._fresh[key] = self._fresh.get(key, 0) + 1
            self.fresh_total += 1

    def taken(self, key: Hashable) -> None:
        """The trainer took a group of ``key`` out of the inbox (its oldest, admitted fresh if any was)."""
        with self._lock:
            self._taken(key)

    def _taken(self, key: Hashable) -> None:
        for table in (self._fresh, self._trusted):
            n = table.get(key, 0)
            if n:
                if n == 1:
                    del table[key]
                else:
                    table[key] = n - 1
                if table is self._fresh:
                    self.fresh_total -= 1
                else:
                    self.trusted_total -= 1
                return

    def snapshot(self) -> Dict[str, int]:
        return {"fresh_queued": self.fresh_total, "trusted_queued": self.trusted_total,
                "fresh_pool": self.fresh_pool, "keys_waiting": len(self._fresh) + len(self._trusted),
                "keys_competing": len(self._asked),
                "keys_known": len(self.history)}


@dataclass(eq=False)
class PushSlot:
    """One open push stream: who holds it and when it last delivered an accepted group."""

    peer: str
    opened: float
    close: Callable[[], None]
    last_valid: float = field(default=0.0)
    closed_by_us: bool = False

    def __post_init__(self) -> None:
        self.last_valid = self.opened

    def delivered(self, now: Optional[float] = None) -> None:
        self.last_valid = time.monotonic() if now is None else now

    def idle_for(self, now: Optional[float] = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_valid


class PushStreams:
    """The learner's push-stream slots (see the module docstring). Event-loop only."""

    def __init__(self, max_total: int = 64, max_per_peer: int = 4, idle_timeout: float = 15.0,
                 evict_grace: float = 2.0):
        self.max_total = max(1, int(max_total))
        self.max_per_peer = max(1, int(max_per_peer))
        self.idle_timeout = float(idle_timeout)
        self.evict_grace = float(evict_grace)
        self._slots: List[PushSlot] = []
        self._per_peer: Dict[str, int] = {}
        self.refused_peer_cap = 0
        self.tarpitted = 0  # refused streams being held before their answer right now
        self.refused_full = 0
        self.evicted = 0
        self.idle_closed = 0

    def __len__(self) -> int:
        return len(self._slots)

    def open(self, peer: str, close: Callable[[], None], now: Optional[float] = None) -> Optional[PushSlot]:
        """A slot for a new stream of ``peer`` (``close()`` closes that stream), or None: refuse it ("busy")."""
        now = time.monotonic() if now is None else now
        if self._per_peer.get(peer, 0) >= self.max_per_peer:
            self.refused_peer_cap += 1
            return None
        if len(self._slots) >= self.max_total:
            victim = max(self._slots, key=lambda s: s.idle_for(now))
            if victim.idle_for(now) <= self.evict_grace:
                self.refused_full += 1
                return None
            self.evict(victim)
        slot = PushSlot(peer, now, close)
        self._slots.append(slot)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return slot

    def evict(self, slot: PushSlot) -> None:
        self.evicted += 1
        slot.closed_by_us = True
        self.release(slot)
        try:
            slot.close()
        except Exception:  # pragma: no cover - closing an already broken stream
            pass

    def expired(self, slot: PushSlot, now: Optional[float] = None) -> bool:
        """True (and counted) once ``slot`` went ``idle_timeout`` s without an accepted group: close it."""
        if slot.idle_for(now) > self.idle_timeout:
            self.idle_closed += 1
            return True
        return False

    def tarpit_delay(self, peer: str) -> float:
        """How long to hold a stream refused for ``peer``'s own cap before answering (0: answer now)."""
        return TARPIT_SECONDS if self._per_peer.get(peer, 0) >= self.max_per_peer and \
            self.tarpitted < MAX_TARPITTED else 0.0

    def release(self, slot: PushSlot) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
            n = self._per_peer.get(slot.peer, 0) - 1
            if n > 0:
                self._per_peer[slot.peer] = n
            else:
                self._per_peer.pop(slot.peer, None)

    def snapshot(self) -> Dict[str, int]:
        return {"push_streams": len(self._slots), "push_peers": len(self._per_peer),
                "push_refused_peer_cap": self.refused_peer_cap, "push_refused_full": self.refused_full,
                "push_evicted": self.evicted, "push_idle_closed": self.idle_closed}


class PeerRateLimiter:
    """Requests per second per peer (a token bucket each, bursts of ``burst_s`` seconds' worth), for the weight
    server. At most ``max_peers`` buckets are kept; the least recently seen peer's is dropped first (it comes back
    full, which only ever favours a peer that stayed away). ``rate`` <= 0 or None: unlimited."""

    def __init__(self, rate: Optional[float], burst_s: float = 2.0, max_peers: int = 4096):
        self.rate = float(rate) if rate and rate > 0 else None
        self.capacity = max(1.0, (self.rate or 0.0) * burst_s)
        self.max_peers = max(1, int(max_peers))
        self._buckets: "OrderedDict[str, tuple]" = OrderedDict()
        self.limited = 0

    def allow(self, peer: str, now: Optional[float] = None) -> bool:
        if self.rate is None:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(peer, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        if not ok:
            self.limited += 1
        return ok
