"""The sampler's persistent, bounded outbox of signed rollout groups.

Each group is one file ``<dir>/<seq:016d>.grp`` written atomically (temporary file, fsync, rename) *before*
:meth:`Outbox.put` returns, and deleted only once the learner has answered for it (accepted, duplicate or
rejected). A sampler killed at any moment therefore neither loses a group nor re-sends one the learner
acknowledged... except the one in flight at the kill, which the learner recognises as a duplicate (it keeps a
ledger of what it accepted) and acknowledges without counting twice.

Bounded by ``max_items`` and ``max_bytes``; :meth:`put` waits up to ``timeout`` seconds for room, then raises
:class:`OutboxFull`. Without a directory the outbox lives in memory (tests, throwaway samplers).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple


class OutboxFull(Exception):
    """The outbox reached its item or byte limit and no room freed up within the timeout."""


class Outbox:
    def __init__(self, directory: Optional[str], max_items: int = 10_000, max_bytes: int = 2 * 1024**3,
                 fsync: bool = True):
        self.directory = directory
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self.fsync = fsync
        self._index: "OrderedDict[int, int]" = OrderedDict()  # seq -> size, oldest first
        self._memory: dict = {}
        self._bytes = 0
        self._next_seq = 0
        self._cond = threading.Condition()
        self._listeners: List[Callable[[], None]] = []
        if directory:
            os.makedirs(directory, exist_ok=True)
            self._load()

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, f"{seq:016d}.grp")

    def _load(self) -> None:
        items = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):
                os.unlink(path)
                continue
            if not name.endswith(".grp"):
                continue
            try:
                seq = int(name[:-4])
            except ValueError:
                continue
            items.append((seq, os.path.getsize(path)))
        for seq, size in sorted(items):
            self._index[seq] = size
            self._bytes += size
        self._next_seq = (max(self._index) + 1) if self._index else 0

    # ------------------------------------------------------------------------------------------------------------
    def add_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` is called (from the putting thread) after every successful put."""
        self._listeners.append(fn)

    def put(self, payload: bytes, timeout: float = 0.0) -> int:
        """Persist ``payload``; returns its outbox sequence number. Raises OutboxFull after ``timeout`` seconds."""
        payload = bytes(payload)
        size = len(payload)
        if size > self.max_bytes:
            raise OutboxFull(f"a {size}-byte group is larger than the whole outbox ({self.max_bytes} bytes)")
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while len(self._index) >= self.max_items or self._bytes + size > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutboxFull(
                        f"outbox full ({len(self._index)} groups, {self._bytes} bytes); the learner is not taking "
                        "rollouts fast enough or is unreachable"
                    )
                self._cond.wait(left)
            seq = self._next_seq
            self._next_seq += 1
            # reserve room now so concurrent puts respect the bounds
            self._bytes += size
            self._index[seq] = -1
        try:
            if self.directory:
                tmp = self._path(seq) + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(payload)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, self._path(seq))
            else:
                self._memory[seq] = payload
        except BaseException:
            with self._cond:
                self._index.pop(seq, None)
                self._bytes -= size
                self._cond.notify_all()
            raise
        with self._cond:
            self._index[seq] = size
        for fn in list(self._listeners):
            fn()
        return seq

    def peek(self, max_items: int) -> List[Tuple[int, bytes]]:
        """Up to ``max_items`` of the oldest groups, as ``(seq, payload)``; nothing is removed."""
        with self._cond:
            seqs = [s for s, size in self._index.items() if size >= 0][:max_items]
        out = []
        for seq in seqs:
            if self.directory:
                try:
                    with open(self._path(seq), "rb") as f:
                        out.append((seq, f.read()))
                except FileNotFoundError:
                    continue
            else:
                data = self._memory.get(seq)
                if data is not None:
                    out.append((seq, data))
        return out

    def remove(self, seq: int) -> None:
        """The learner answered for ``seq``: forget it for good."""
        with self._cond:
            size = self._index.pop(seq, None)
            if size is None:
                return
            self._bytes -= max(size, 0)
            self._memory.pop(seq, None)
            if self.directory:
                try:
                    os.unlink(self._path(seq))
                except FileNotFoundError:
                    pass
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._index)

    @property
    def nbytes(self) -> int:
        with self._cond:
            return self._bytes
