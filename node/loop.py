"""A dedicated asyncio event loop in a background thread, driven from synchronous code.

The learner and sampler programs run torch in their main thread; every network object of the swarm (the libp2p
daemon client, stream handlers, the fetcher and sender tasks) lives in ONE event loop owned by this thread. The
synchronous facades (:class:`node.learner_swarm.LearnerSwarm`, :class:`node.sampler_swarm.SamplerSwarm`) call into it
with :meth:`LoopThread.run`, which always takes a timeout: a stalled network call can never hang the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """Owns an asyncio loop running forever in a daemon thread.

    ``run(coro, timeout)`` blocks the calling thread until the coroutine finishes or ``timeout`` seconds pass (the
    coroutine is then cancelled and :class:`TimeoutError` raised). Calling ``run`` from the loop thread itself is a
    programming error (it would deadlock) and raises :class:`RuntimeError`.
    """

    def __init__(self, name: str = "gepo-swarm-loop"):
        self.loop = asyncio.new_event_loop()
        self._name = name
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()

    def start(self) -> "LoopThread":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.wait(pending, timeout=2))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except Exception:  # pragma: no cover - best effort at exit
                logger.debug("error while closing the swarm loop", exc_info=True)
            self.loop.close()

    @property
    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.loop.is_closed()

    def submit(self, coro: Awaitable[T]) -> "concurrent.futures.Future[T]":
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        if not self.is_running:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise RuntimeError("the swarm event loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait at most ``timeout`` seconds for its result."""
        if self.in_loop_thread:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise RuntimeError("LoopThread.run() called from the loop thread itself (would deadlock); await instead")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"swarm call did not finish within {timeout:.1f} s") from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Thread-safe ``loop.call_soon``."""
        if self.is_running:
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        if self.is_running:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop_thread:
            self._thread.join(timeout)


def snapshot(mapping: Mapping) -> Dict:
    """A copy of a dict/Counter that another thread (the swarm loop) may be updating."""
    for _ in range(10):
        try:
            return dict(mapping)
        except RuntimeError:  # changed size during iteration
            continue
    return {}


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """``event.wait()`` bounded by ``timeout``; True if set. (No extra task on Python >= 3.11.)"""
    if event.is_set():
        return True
    try:
        if hasattr(asyncio, "timeout"):
            async with asyncio.timeout(timeout):
                await event.wait()
        else:  # pragma: no cover - Python 3.10
            await asyncio.wait_for(event.wait(), timeout)
        return True
    except (asyncio.TimeoutError, TimeoutError):
        return False
