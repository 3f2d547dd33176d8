"""Token-bucket upload limiter shared by every chunk server of a node.

One :class:`TokenBucket` per process caps the bytes/s that this node writes into its libp2p streams (all uploads
together). Waiters are served in FIFO order; the bucket allows a small burst so that a 256 KiB piece is never split.
``rate=None`` disables limiting but still counts bytes.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Optional

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    """'20MB' / '20 MB/s' / '1.5GiB' / '1048576' -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    s = str(text).strip().lower().replace(" ", "")
    if s.endswith("/s"):
        s = s[:-2]
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 20MB, 512KiB, 1.5GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class TokenBucket:
    """Async token bucket in bytes.

    :param rate: bytes per second, or ``None``/``0`` for unlimited.
    :param burst: bucket capacity in bytes (default: 50 ms worth of ``rate``, at least 256 KiB).
    """

    def __init__(self, rate: Optional[float], burst: Optional[int] = None):
        self.rate = float(rate) if rate else None
        if burst is None:
            burst = max(256 * 1024, int((self.rate or 0) * 0.05))
        self.burst = int(burst)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock: Optional[asyncio.Lock] = None
        self.total_bytes = 0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent (FIFO among waiters), then account for them."""
        self.total_bytes += nbytes
        if self.rate is None or nbytes <= 0:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = time.monotonic()
            self._refill(now)
            self._tokens -= nbytes
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
