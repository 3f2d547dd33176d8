"""Per-sampler statistics of the learner, bounded in memory and in the metrics file whatever the number of keys.

A Sybil flood brings thousands of keys; keeping and writing a counter set for each (as the learner once did:
1.5 KB -> 33 KB per metrics line after 564 keys) grows without bound. :class:`SamplerStats` keeps at most
``4 x top_n`` keys (the one with the fewest accepted groups, least recently updated among equals, is merged into
the ``others`` bucket when a new key needs room) and reports

* ``delta()``: what changed since the previous call, under the key if it is among the ``top_n`` keys with the most
  accepted groups, else under ``others`` - at most ``top_n + 1`` entries, usually only the step's few samplers;
* ``totals()``: the ``top_n`` keys and ``others`` in full.

The learner writes ``sampler_delta`` on every metrics line and ``sampler_totals`` every ``full_every`` lines
(:meth:`metrics`); :func:`fold_sampler_stats` rebuilds the totals from a metrics file (the last snapshot plus the
deltas after it). Every counter is additive, so the sum over all entries is exact; a key that climbs into the top N
finds its earlier counts in ``others``.

Usage mirrors a ``defaultdict(Counter)``: ``stats[key]["accepted"] += 1``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterable, Mapping, Optional

OTHERS = "others"


class _Entry(Counter):
    """One key's counters; every change is also recorded in the owner's pending delta."""

    def __init__(self, owner: "SamplerStats", key: str):
        super().__init__()
        self._owner = owner
        self._key = key
        self.touched = 0

    def __setitem__(self, field: str, value: int) -> None:
        change = value - self.get(field, 0)
        super().__setitem__(field, value)
        self._owner._record(self._key, field, change)


class SamplerStats:
    def __init__(self, top_n: int = 32, capacity: Optional[int] = None, full_every: int = 50):
        self.top_n = max(1, int(top_n))
        self.capacity = max(self.top_n, int(capacity) if capacity else 4 * self.top_n)
        self.full_every = max(1, int(full_every))
        self._entries: Dict[str, _Entry] = {}
        self.others: Counter = Counter()
        self._pending: Dict[str, Counter] = {}
        self._clock = 0
        self._lines = 0
        self.keys_seen = 0  # key insertions (a key evicted and seen again counts twice)

    def __getitem__(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.capacity:
                self._evict()
            entry = self._entries[key] = _Entry(self, key)
            self.keys_seen += 1
        self._clock += 1
        entry.touched = self._clock
        return entry

    def __len__(self) -> int:
        return self.keys_seen

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _evict(self) -> None:
        victim = min(self._entries.values(), key=lambda e: (e.get("accepted", 0), e.touched))
        del self._entries[victim._key]
        self.others.update(victim)
        pending = self._pending.pop(victim._key, None)
        if pending:
            self._pending.setdefault(OTHERS, Counter()).update(pending)

    def _record(self, key: str, field: str, change: int) -> None:
        if change:
            self._pending.setdefault(key, Counter())[field] += change

    def _top_keys(self) -> list:
        ranked = sorted(self._entries.values(), key=lambda e: (-e.get("accepted", 0), -e.touched))
        return [e._key for e in ranked[: self.top_n]]

    def totals(self) -> Dict[str, Dict[str, int]]:
        top = set(self._top_keys())
        out = {k: dict(e) for k, e in self._entries.items() if k in top}
        others = Counter(self.others)
        for k, e in self._entries.items():
            if k not in top:
                others.update(e)
        if others:
            out[OTHERS] = dict(others)
        return out

    def delta(self) -> Dict[str, Dict[str, int]]:
        top = set(self._top_keys())
        out: Dict[str, Counter] = {}
        for key, changes in self._pending.items():
            out.setdefault(key if key in top else OTHERS, Counter()).update(changes)
        self._pending = {}
        return {k: dict(v) for k, v in out.items()}

    def metrics(self) -> Dict[str, Any]:
        """The entries for one metrics line: always ``sampler_delta``, every ``full_every`` lines (the first one
        included) ``sampler_totals`` too (the state after that line's delta)."""
        out: Dict[str, Any] = {"sampler_delta": self.delta()}
        if self._lines % self.full_every == 0:
            out["sampler_totals"] = self.totals()
        self._lines += 1
        return out


def fold_sampler_stats(records: Iterable[Mapping[str, Any]]) -> Dict[str, Dict[str, int]]:
    """Per-sampler totals from metrics records (oldest first): the last ``sampler_totals`` plus later deltas."""
    totals: Dict[str, Counter] = {}
    for r in records:
        if "sampler_totals" in r:
            totals = {k: Counter(v) for k, v in r["sampler_totals"].items()}
        elif "sampler_delta" in r:
            for k, v in r["sampler_delta"].items():
                totals.setdefault(k, Counter()).update(v)
    return {k: dict(v) for k, v in totals.items()}
