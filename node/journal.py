"""The write-ahead journal of rollout groups (learner) and the answer log (sampler): what happened to every group.

Learner: ``<state_dir>/journal.jsonl`` (state_dir: RUN_DIR/swarm by default). An accepted group's signed bytes stay
in ``<state_dir>/inbox/<id>.grp`` until a checkpoint covers the step that trained it, so a learner killed at any
instant, or rolled back to its last checkpoint by ``--resume``, trains every acknowledged group once more in the
surviving lineage instead of losing it::

    accepted --(taken: in memory)--> trained in step k of life L --> covered by checkpoint c >= k: bytes deleted
             \\-> dropped (stale, banned, scoring_failed, implausible_logprobs): bytes deleted

One JSON object per line, appended with one write and a flush (it reaches the kernel: any process kill, SIGKILL
included, keeps it); fsync at every checkpoint record (and at every record with the inbox's ``fsync``)::

    {"e": "life", "life": L, "resumed_from": r}        a learner start; r = step of the checkpoint it loaded (0: none)
    {"e": "requeued", "life": L, "ids": [...]}          groups that start put back in the queue (taken, not covered)
    {"e": "accepted", "id": i, "sampler": hex, "seq": s, "digest": hex, "version": v, "t": time}
    {"e": "rejected", "sampler": hex, "seq": s, "digest": hex, "version": v, "reason": r, "t": time}  (claims unverified)
    {"e": "duplicate", "sampler": hex, "seq": s, "digest": hex, "t": time}
    {"e": "trained", "life": L, "step": k, "ids": [...]}  before any checkpoint of step k can exist
    {"e": "dropped", "life": L, "id": i, "reason": r}
    {"e": "checkpoint", "life": L, "step": c}            after the checkpoint (and its LATEST pointer) is on disk
    {"e": "summary", "next_id": n, "totals": {...}}      what compaction folded away (first line after one)

Surviving lineage: step k of life L survives iff k <= r of every later life and, for the last life, k <= its newest
checkpoint. A start (``begin_life``) classifies every group still held: trained in a surviving step -> covered
(deleted); otherwise -> requeued. Rolled-back steps are thus trained again, once, in the new life (or the staleness
rule drops them, recorded as ``dropped`` with reason ``stale``).

Bounded: when the file grows past ``max_bytes`` it is rewritten (temporary file, fsync, rename) as one ``summary``
line with the totals of every group whose fate is final, the life and checkpoint records, and the records of the
groups still held. That costs O(groups held), not O(history); checkpoints never rewrite anything.

Sampler: ``<state_dir>/answers.jsonl``, one line per answer the learner gave (accepted, duplicate, rejected with its
reason: ``busy`` is not recorded), with the group's sequence number, digest and claimed version; folded into one
``summary`` line past ``max_bytes``. ``node/audit.py`` reconciles both sides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
ANSWERS_FILE = "answers.jsonl"
STALE = "stale"
DEFAULT_MAX_BYTES = 64 << 20  # ~300,000 accepted groups between compactions


class JournalError(ValueError):
    """A journal or answer log that cannot be read (one line: the file, the line number, what is wrong)."""


def claims(payload: bytes) -> dict[str, Any]:
    """What a signed group claims to be (sampler key, sequence, version), read without verifying; None where it
    cannot be read (junk)."""
    from protocol.errors import ProtocolError
    from protocol.rollout import read_claims

    try:
        sampler, seq, version = read_claims(payload)
        return {"sampler": sampler.hex(), "seq": seq, "version": version}
    except (ProtocolError, ValueError, TypeError):
        return {"sampler": None, "seq": None, "version": None}


def read_records(path: str, *, strict: bool) -> list[dict]:
    """The JSON objects of a journal file, in order. A torn last line (a kill mid-write) is skipped. A malformed
    line elsewhere raises JournalError when ``strict`` (the audit), else is skipped with a warning (a node)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn:
        log.warning("%s: ignoring a torn last line (%d bytes)", path, len(torn))
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if strict:
                raise JournalError(f"{path}:{n}: malformed record ({exc})") from None
            log.warning("%s:%d: skipping a malformed record (%s)", path, n, exc)
            continue
        out.append(rec)
    return out


def _truncate_torn_tail(path: str) -> None:
    """Cut a partial last line so that the next append starts on a line of its own."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# ---------------------------------------------------------------------------------------------------------------------
# reading a learner journal (shared by the learner's restart and the audit)


def _rewrite_jsonl(path: str, records: list[dict], current: Any) -> tuple[Any, int]:
    """Replace the append-only file at `path` (open as `current`) by `records`, atomically and durably (compaction).
    Returns the reopened append handle and the new size."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    current.close()
    os.replace(tmp, path)
    return open(path, "a"), os.path.getsize(path)


@dataclass
class GroupFate:
    id: int
    sampler: Optional[str]
    seq: Optional[int]
    digest: str
    version: Optional[int]
    trained: list[tuple[int, int]] = field(default_factory=list)  # (life, step)
    dropped: Optional[str] = None

    def example(self, **extra: Any) -> dict[str, Any]:
        return {"sampler": self.sampler, "seq": self.seq, "digest": self.digest, "version": self.version,
                "id": self.id, "trained": [list(t) for t in self.trained], **extra}


@dataclass
class JournalState:
    """Everything one learner journal says, in a form both the learner and the audit use."""

    lives: dict[int, int] = field(default_factory=dict)  # life -> resumed_from
    checkpoints: dict[int, int] = field(default_factory=dict)  # life -> newest checkpoint step it wrote
    groups: dict[int, GroupFate] = field(default_factory=dict)  # id -> fate
    rejected: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    summary: Counter = field(default_factory=Counter)  # totals folded by compaction
    summary_dropped: Counter = field(default_factory=Counter)
    summary_rejected: Counter = field(default_factory=Counter)
    # one past the highest group id ever issued (kept through compaction): ids are never reused across lives, or
    # the audit would take a later life's group for an earlier one with the same id and call the earlier one lost
    next_id: int = 0

    @classmethod
    def from_records(cls, records: Iterable[dict], *, path: str = "journal", strict: bool = False) -> "JournalState":
        st = cls()
        for n, rec in enumerate(records, 1):
            try:
                st._apply(rec)
            except (KeyError, TypeError, ValueError) as exc:
                if strict:
                    raise JournalError(f"{path}: record {n} ({str(rec)[:80]}): missing or bad field {exc}") from None
                log.warning("%s: skipping record %d: %r", path, n, exc)
        return st

    def _apply(self, rec: dict) -> None:
        e = rec["e"]
        if e == "life":
            self.lives[int(rec["life"])] = int(rec["resumed_from"])
        elif e == "accepted":
            i = int(rec["id"])
            self.next_id = max(self.next_id, i + 1)
            self.groups[i] = GroupFate(i, rec.get("sampler"), rec.get("seq"), str(rec["digest"]), rec.get("version"))
        elif e == "trained":
            life, step = int(rec["life"]), int(rec["step"])
            for i in rec["ids"]:
                g = self.groups.get(int(i))
                if g is not None and (life, step) not in g.trained:  # idempotent: compaction may repeat a record
                    g.trained.append((life, step))
        elif e == "dropped":
            g = self.groups.get(int(rec["id"]))
            if g is not None:
                g.dropped = str(rec["reason"])
        elif e == "checkpoint":
            life = int(rec["life"])
            self.checkpoints[life] = max(self.checkpoints.get(life, 0), int(rec["step"]))
        elif e == "rejected":
            self.rejected.append(rec)
        elif e == "duplicate":
            self.duplicates.append(rec)
        elif e == "summary":
            t = rec["totals"]
            self.summary = Counter({k: int(v) for k, v in t.items() if isinstance(v, int)})
            self.summary_dropped = Counter({k: int(v) for k, v in t.get("dropped", {}).items()})
            self.summary_rejected = Counter({k: int(v) for k, v in t.get("rejected_by_reason", {}).items()})
            self.next_id = max(self.next_id, int(rec.get("next_id", 0)))
        elif e == "requeued":
            pass  # informational: a requeued group's fate is told by its later trained/dropped records
        else:
            raise ValueError(f"unknown record kind {e!r}")

    @property
    def last_life(self) -> int:
        return max(self.lives) if self.lives else 0

    def final_cut(self, on_disk: Optional[int] = None) -> int:
        """The end of the surviving lineage: the newest checkpoint of the last life (or on disk), else where it
        resumed."""
        last = self.last_life
        cut = max(self.lives.get(last, 0), self.checkpoints.get(last, 0))
        return max(cut, on_disk) if on_disk is not None else cut

    def cut_of(self, life: int, final_cut: int) -> int:
        """The highest step of ``life`` that survives: no later life resumed below it."""
        return min([r for later, r in self.lives.items() if later > life] + [final_cut])

    def surviving(self, g: GroupFate, final_cut: int) -> list[tuple[int, int]]:
        return [(life, step) for life, step in g.trained if step <= self.cut_of(life, final_cut)]

    def outcome(self, g: GroupFate, final_cut: int, held: bool) -> str:
        """trained | trained_twice | dropped:<reason> | pending (still held) | lost."""
        n = len(self.surviving(g, final_cut))
        if n >= 2:
            return "trained_twice"
        if n == 1:
            return "trained"
        if g.dropped is not None:
            return f"dropped:{g.dropped}"
        return "pending" if held else "lost"


def load_journal(path: str, *, strict: bool) -> JournalState:
    return JournalState.from_records(read_records(path, strict=strict), path=path, strict=strict)


# ---------------------------------------------------------------------------------------------------------------------
# the learner's journal


class GroupJournal:
    """Owned by :class:`node.inbox.DurableInbox` (``journal=True``). Thread-safe: the swarm thread appends accepted /
    rejected / duplicate records, the trainer thread trained / dropped / checkpoint ones."""

    def __init__(self, directory: str, *, max_bytes: int = DEFAULT_MAX_BYTES, fsync: bool = False) -> None:
        self.path = os.path.join(directory, JOURNAL_FILE)
        self.max_bytes = int(max_bytes)
        self.fsync = fsync
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(self.path):
            _truncate_torn_tail(self.path)
            self.state = load_journal(self.path, strict=False)
        else:
            self.state = JournalState()
        self.life = self.state.last_life + 1
        self.live: dict[int, GroupFate] = {}  # groups whose bytes are held: not yet covered or dropped
        self._file = open(self.path, "a")
        self._size = os.path.getsize(self.path)
        self.compactions = 0

    # --- appending ----------------------------------------------------------------------------------------------
    def _append(self, rec: dict, *, sync: bool = False) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        self._file.write(line)
        self._file.flush()
        if sync or self.fsync:
            os.fsync(self._file.fileno())
        self._size += len(line)

    def begin_life(self, resumed_from: int, on_disk: Iterable[int]) -> tuple[list[int], list[int]]:
        """A learner start that loaded the checkpoint of step ``resumed_from`` (0: none), with the inbox files
        ``on_disk`` (ids). Returns (ids to queue again, ids whose bytes can go). A file the journal has no
        ``accepted`` record of (killed between the two writes) is queued: the caller records it with
        :meth:`accepted`."""
        with self._lock:
            st = self.state
            st.lives[self.life] = int(resumed_from)
            self._append({"e": "life", "life": self.life, "resumed_from": int(resumed_from), "t": time.time()},
                         sync=True)
            cut = st.final_cut()
            requeue, delete = [], []
            for i in sorted(set(on_disk)):
                g = st.groups.get(i)
                if g is None:
                    requeue.append(i)
                    continue
                fate = st.outcome(g, cut, held=True)
                if fate == "pending":  # never trained, or trained only in rolled-back steps
                    requeue.append(i)
                    self.live[i] = g
                else:
                    if fate == "trained_twice":
                        log.error("journal: group %d (%s #%s) was trained in two surviving steps %s", i,
                                  str(g.sampler)[:8], g.seq, st.surviving(g, cut))
                    delete.append(i)  # covered by the checkpoint just loaded, or dropped
            if requeue:
                self._append({"e": "requeued", "life": self.life, "ids": requeue})
            # Only what is held stays in memory; the rest is in the file until a compaction folds it.
            st.groups = {}
            return requeue, delete

    def accepted(self, i: int, item: Any, digest: bytes, t: float) -> None:
        g = GroupFate(i, _hex(getattr(item, "sampler", None)), getattr(item, "seq", None), digest.hex(),
                      getattr(item, "policy_version", None))
        with self._lock:
            self.live[i] = g
            self._append({"e": "accepted", "id": i, "sampler": g.sampler, "seq": g.seq, "digest": g.digest,
                          "version": g.version, "t": round(t, 3)})
            self._maybe_compact()

    def answered(self, status: str, payload: bytes, digest: bytes, reason: Optional[str] = None) -> None:
        """A group answered ``rejected`` (with its reason) or ``duplicate`` at intake."""
        rec = {"e": status, **claims(payload), "digest": digest.hex(), "t": round(time.time(), 3)}
        if reason is not None:
            rec["reason"] = reason
        with self._lock:
            self._append(rec)
            self._maybe_compact()

    def trained(self, step: int, fates: dict[int, Optional[str]]) -> list[int]:
        """Step ``step`` trained the groups ``{id: None}`` and dropped ``{id: reason}`` (train_step's checks):
        recorded before the learner can checkpoint that step. Returns the dropped ids (their bytes can go)."""
        with self._lock:
            ids = [i for i, why in fates.items() if why is None and i in self.live]
            if ids:
                self._append({"e": "trained", "life": self.life, "step": int(step), "ids": ids})
                for i in ids:
                    self.live[i].trained.append((self.life, int(step)))
            return [i for i, why in fates.items() if why is not None and self._drop(i, why)]

    def dropped(self, i: int, reason: str) -> bool:
        """Record a drop; True when the group's bytes can go."""
        with self._lock:
            return self._drop(i, reason)

    def _drop(self, i: int, reason: str) -> bool:
        if self.live.pop(i, None) is None:
            return False
        self._append({"e": "dropped", "life": self.life, "id": i, "reason": reason})
        return True

    def checkpoint(self, step: int) -> list[int]:
        """The checkpoint of ``step`` is on disk: returns the ids it covers (their bytes can go)."""
        with self._lock:
            self.state.checkpoints[self.life] = int(step)
            self._append({"e": "checkpoint", "life": self.life, "step": int(step)}, sync=True)
            covered = [i for i, g in self.live.items() if any(life == self.life and k <= step for life, k in g.trained)]
            for i in covered:
                del self.live[i]
            self._maybe_compact()
            return covered

    # --- bounding -----------------------------------------------------------------------------------------------
    def _maybe_compact(self) -> None:
        if self._size > self.max_bytes:
            self._compact()

    def _compact(self) -> None:
        """Fold every group whose fate is final into the totals of one summary line; keep lives, checkpoints and
        the records of the groups still held. O(held groups + file), once per ``max_bytes`` of appends."""
        self._file.flush()
        st = load_journal(self.path, strict=False)
        cut = st.final_cut()
        totals = Counter(st.summary)
        dropped, rejected = Counter(st.summary_dropped), Counter(st.summary_rejected)
        for i, g in st.groups.items():
            if i in self.live:
                continue
            fate = st.outcome(g, cut, held=False)
            totals["acknowledged"] += 1
            if fate.startswith("dropped:"):
                dropped[fate[8:]] += 1
            else:
                totals[fate] += 1
                if fate == "trained_twice":
                    totals["trained"] += 1
        for rec in st.rejected:
            rejected[str(rec.get("reason"))] += 1
        totals["duplicates"] += len(st.duplicates)
        lines = [{"e": "summary", "next_id": st.next_id,  # held groups' ids are in it: they have accepted records
                  "totals": {**totals, "dropped": dict(dropped), "rejected_by_reason": dict(rejected)}}]
        lines += [{"e": "life", "life": life, "resumed_from": r} for life, r in sorted(st.lives.items())]
        lines += [{"e": "checkpoint", "life": life, "step": c} for life, c in sorted(st.checkpoints.items())]
        by_step: dict[tuple[int, int], list[int]] = {}
        for i, g in sorted(self.live.items()):
            lines.append({"e": "accepted", "id": i, "sampler": g.sampler, "seq": g.seq, "digest": g.digest,
                          "version": g.version})
            for t in g.trained:
                by_step.setdefault(t, []).append(i)
        lines += [{"e": "trained", "life": life, "step": k, "ids": ids} for (life, k), ids in sorted(by_step.items())]
        self._file, self._size = _rewrite_jsonl(self.path, lines, self._file)
        self.compactions += 1
        log.info("journal compacted to %d bytes (%d groups held)", self._size, len(self.live))

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


def _hex(key: Any) -> Optional[str]:
    if key is None:
        return None
    return bytes(key).hex() if isinstance(key, (bytes, bytearray, memoryview)) else str(key)


# ---------------------------------------------------------------------------------------------------------------------
# the sampler's answer log


class AnswerLog:
    """``<state_dir>/answers.jsonl``: every answer the learner gave this sampler (busy excepted)."""

    def __init__(self, directory: Optional[str], sampler: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = os.path.join(directory, ANSWERS_FILE) if directory else None
        self.max_bytes = int(max_bytes)
        self._file = None
        self._size = 0
        if self.path:
            os.makedirs(directory, exist_ok=True)
            if os.path.exists(self.path):
                _truncate_torn_tail(self.path)
            self._file = open(self.path, "a")
            self._size = os.path.getsize(self.path)
            self._write({"a": "start", "sampler": sampler.hex(), "t": round(time.time(), 3)})

    def _write(self, rec: dict) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        self._file.write(line)
        self._file.flush()
        self._size += len(line)

    def record(self, status: str, payload: bytes, reason: Optional[str] = None) -> None:
        if self._file is None:
            return
        c = claims(payload)
        rec = {"a": status, "seq": c["seq"], "digest": hashlib.sha256(payload).hexdigest(), "version": c["version"],
               "t": round(time.time(), 3)}
        if reason is not None:
            rec["reason"] = reason
        self._write(rec)
        if self._size > self.max_bytes:
            self._compact()

    def _compact(self) -> None:
        totals: Counter = Counter()
        rejected: Counter = Counter()
        sampler = None
        for rec in read_records(self.path, strict=False):
            a = rec.get("a")
            if a == "summary":
                totals.update({k: v for k, v in rec.get("totals", {}).items() if isinstance(v, int)})
                rejected.update(rec.get("totals", {}).get("rejected_by_reason", {}))
            elif a == "start":
                sampler = rec.get("sampler")
            elif a in ("accepted", "duplicate"):
                totals[a] += 1
            elif a == "rejected":
                totals[a] += 1
                rejected[str(rec.get("reason"))] += 1
        summary = {"a": "summary", "totals": {**totals, "rejected_by_reason": dict(rejected)}}
        self._file, self._size = _rewrite_jsonl(self.path, [{"a": "start", "sampler": sampler}, summary], self._file)

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
