"""The learner's side of rollout delivery: a ledger of what it accepted and a bounded, durable inbox.

* **Ledger**: the SHA-256 of every accepted signed group, appended to ``<dir>/accepted.log`` before the sender is
  answered. A group whose digest is in the ledger is answered ``duplicate`` (the sender drops it) and is never
  queued twice - across learner restarts too. The newest ``max_ids`` digests are remembered (the file is compacted
  when it grows past twice that).
* **Inbox**: accepted groups wait in ``<dir>/inbox/<seq>.grp`` until the training loop takes them
  (:meth:`DurableInbox.get`); a learner killed before its trainer consumed them finds them again on restart.
  At most ``maxsize`` groups wait; beyond that the sender is told ``busy`` and retries later (back-pressure).
* **Journal** (``journal=True``, the learner program): a taken group's file is kept until a checkpoint covers the
  step that trained it, and every group's fate is recorded in ``<dir>/journal.jsonl`` (:mod:`node.journal`), so a
  restart from an older checkpoint trains the rolled-back groups again (:meth:`reload` with ``resumed_from``).

Without a directory both live in memory only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional

logger = logging.getLogger(__name__)


@dataclass
class Accepted:
    """One accepted rollout group as the training loop receives it."""

    item: Any  # what the validate function returned (e.g. a protocol.rollout.RolloutGroup)
    payload: bytes  # the signed bytes as received
    digest: bytes  # sha256(payload)
    sender: str  # libp2p peer id of the sampler that delivered it ("" after a reload)
    received_at: float
    seq: int = -1


class DurableInbox:
    def __init__(self, directory: Optional[str], maxsize: int = 4096, max_ids: int = 1_000_000,
                 fsync: bool = False, journal: bool = False):
        self.directory = directory
        self.maxsize = int(maxsize)
        self.max_ids = int(max_ids)
        self.fsync = fsync
        self._seen: "OrderedDict[bytes, None]" = OrderedDict()
        self._queue: Deque[Accepted] = deque()
        self._cond = threading.Condition()
        self._next_seq = 0
        self._log = None
        self._log_lines = 0
        self._pending_files: List[str] = []
        self.journal = None
        if directory:
            os.makedirs(os.path.join(directory, "inbox"), exist_ok=True)
            self._load_ledger()
            if journal:
                from node.journal import GroupJournal

                self.journal = GroupJournal(directory, fsync=fsync)
                # an id the journal knows (a group dropped or trained in a lost step: no file left) is never reissued
                self._next_seq = max(self._next_seq, self.journal.state.next_id)

    # --- persistence ----------------------------------------------------------------------------------------------
    def _ledger_path(self) -> str:
        return os.path.join(self.directory, "accepted.log")

    def _item_path(self, seq: int) -> str:
        return os.path.join(self.directory, "inbox", f"{seq:016d}.grp")

    def _load_ledger(self) -> None:
        path = self._ledger_path()
        if os.path.exists(path):
            with open(path, "r") as f:
                for line in f:
                    line = line.strip()
                    if len(line) == 64:
                        try:
                            self._remember(bytes.fromhex(line))
                            self._log_lines += 1
                        except ValueError:
                            continue
        self._log = open(path, "a")
        seqs = []
        for name in os.listdir(os.path.join(self.directory, "inbox")):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.directory, "inbox", name))
            elif name.endswith(".grp"):
                try:
                    seqs.append(int(name[:-4]))
                except ValueError:
                    pass
        self._pending_files = [self._item_path(s) for s in sorted(seqs)]
        self._next_seq = max(seqs) + 1 if seqs else 0

    def reload(self, decode: Callable[[bytes], Any], resumed_from: int = 0) -> int:
        """Queue the groups a previous run accepted but its trainer never took (with the journal: or took, but in
        steps after ``resumed_from``, the step of the checkpoint this run loaded). ``decode`` rebuilds the item
        from the signed bytes (it should not re-apply replay checks: the ledger already vouches for these)."""
        n = 0
        known = set()
        if self.journal is not None:
            ids = [int(os.path.basename(p)[:-4]) for p in self._pending_files]
            requeue, covered = self.journal.begin_life(resumed_from, ids)
            for i in covered:  # trained in a step the loaded checkpoint holds, or dropped
                _unlink(self._item_path(i))
            known = set(requeue) & set(self.journal.live)
            self._pending_files = [self._item_path(i) for i in requeue]
        for path in self._pending_files:
            try:
                with open(path, "rb") as f:
                    payload = f.read()
                item = decode(payload)
            except Exception as e:
                logger.warning("dropping inbox file %s: %s", path, e)
                seq = int(os.path.basename(path)[:-4])
                if seq in known:  # acknowledged, e.g. stale by now (the ProtocolError's reason): counted as such
                    self.journal.dropped(seq, getattr(getattr(e, "reason", None), "value", None) or "unreadable")
                _unlink(path)
                continue
            seq = int(os.path.basename(path)[:-4])
            digest = hashlib.sha256(payload).digest()
            with self._cond:
                if digest not in self._seen:  # killed between writing the item and the ledger line
                    self._remember(digest)
                    self._log.write(digest.hex() + "\n")
                    self._log.flush()
                if self.journal is not None and seq not in known:  # ... or between the item and its journal line
                    self.journal.accepted(seq, item, digest, time.time())
                self._queue.append(Accepted(item, payload, digest, "", time.time(), seq))
                self._cond.notify_all()
            n += 1
        self._pending_files = []
        return n

    def _remember(self, digest: bytes) -> None:
        self._seen[digest] = None
        self._seen.move_to_end(digest)
        while len(self._seen) > self.max_ids:
            self._seen.popitem(last=False)

    def _compact(self) -> None:
        tmp = self._ledger_path() + ".tmp"
        with open(tmp, "w") as f:
            for d in self._seen:
                f.write(d.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._log.close()
        os.replace(tmp, self._ledger_path())
        self._log = open(self._ledger_path(), "a")
        self._log_lines = len(self._seen)

    # --- learner RPC side -----------------------------------------------------------------------------------------
    def seen(self, digest: bytes) -> bool:
        with self._cond:
            return digest in self._seen

    def full(self) -> bool:
        with self._cond:
            return len(self._queue) >= self.maxsize

    def put(self, accepted: Accepted) -> bool:
        """Record and queue an accepted group. Returns False if it was already in the ledger."""
        with self._cond:
            if accepted.digest in self._seen:
                return False
            seq = self._next_seq
            self._next_seq += 1
            accepted.seq = seq
            if self.directory:
                path = self._item_path(seq)
                with open(path + ".tmp", "wb") as f:
                    f.write(accepted.payload)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(path + ".tmp", path)
                self._log.write(accepted.digest.hex() + "\n")
                self._log.flush()
                if self.fsync:
                    os.fsync(self._log.fileno())
                self._log_lines += 1
                if self.journal is not None:  # before the sender is answered "accepted"
                    self.journal.accepted(seq, accepted.item, accepted.digest, accepted.received_at)
            self._remember(accepted.digest)
            if self.directory and self._log_lines > 2 * self.max_ids:
                self._compact()
            self._queue.append(accepted)
            self._cond.notify_all()
            return True

    # --- trainer side ---------------------------------------------------------------------------------------------
    def get(self, max_items: int, timeout: float) -> List[Accepted]:
        """Up to ``max_items`` accepted groups, oldest first; waits up to ``timeout`` s for the first one."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            out = []
            while self._queue and len(out) < max_items:
                out.append(self._queue.popleft())
        if self.directory and self.journal is None:  # with the journal: kept until a checkpoint covers them
            for a in out:
                _unlink(self._item_path(a.seq))
        return out

    # --- the journal's trainer side (no-ops without it) ------------------------------------------------------------
    def answered(self, status: str, payload: bytes, digest: bytes, reason: Optional[str] = None) -> None:
        """Record a ``rejected`` or ``duplicate`` answer."""
        if self.journal is not None:
            self.journal.answered(status, payload, digest, reason)

    def trained(self, step: int, fates: Dict[int, Optional[str]]) -> None:
        """Step ``step`` trained ``{id: None}`` and dropped ``{id: reason}`` (ids: ``Accepted.seq``)."""
        if self.journal is not None:
            for i in self.journal.trained(step, fates):
                _unlink(self._item_path(i))

    def dropped(self, seq: int, reason: str) -> None:
        """A taken group will never be trained (stale, banned, ...): its bytes can go."""
        if self.journal is not None and self.journal.dropped(seq, reason):
            _unlink(self._item_path(seq))

    def covered(self, step: int) -> None:
        """A checkpoint of ``step`` is on disk: the groups trained up to it are safe in it."""
        if self.journal is not None:
            for i in self.journal.checkpoint(step):
                _unlink(self._item_path(i))

    def pending(self) -> List[Accepted]:
        """A snapshot of the groups waiting for the trainer, oldest first."""
        with self._cond:
            return list(self._queue)

    def qsize(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            if self._log is not None:
                self._log.close()
                self._log = None
        if self.journal is not None:
            self.journal.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
