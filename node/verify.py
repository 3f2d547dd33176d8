"""Spot-checks off the training path: a bounded cache of recent versions' weights and a background verifier thread.

The learner hands `Verifier.submit` the groups it picked for checking (node/intake.py decides which) and, at every
publish, the weights of the version (`Verifier.add_version`: one CPU copy, kept in an LRU of --verify-cache-versions
versions). The thread takes jobs in arrival order, loads the claimed version into its own CPU fp32 copy of the
model (only when the version changes), runs `gepo.spot_check.spot_check` (one prefill) and posts a `Verdict`.
Nothing here blocks the caller: the job queue is bounded and a full queue drops the job (counted).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from gepo.spot_check import SpotCheckConfig, SpotCheckResult, spot_check

log = logging.getLogger("node.verify")

UNAVAILABLE = "version_not_cached"


@dataclass
class VerifyJob:
    sampler: bytes
    seq: int
    version: int
    prompt_ids: Sequence[int]
    completions: Sequence[Sequence[int]]
    logprobs: Sequence[Sequence[float]]


@dataclass
class Verdict:
    job: VerifyJob
    result: SpotCheckResult
    seconds: float = 0.0


class VersionCache:
    """CPU copies of the newest `capacity` published versions' state dicts (least recently added evicted)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._items: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, version: int, model: torch.nn.Module) -> None:
        state = {k: v.detach().to("cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                 for k, v in model.state_dict().items()}
        with self._lock:
            self._items[version] = state
            self._items.move_to_end(version)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, version: int) -> dict[str, torch.Tensor] | None:
        with self._lock:
            return self._items.get(version)

    def __contains__(self, version: int) -> bool:
        with self._lock:
            return version in self._items

    def versions(self) -> list[int]:
        with self._lock:
            return list(self._items)


@dataclass
class SamplingRules:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class Verifier:
    """The background thread. `submit` and `verdicts` are non-blocking and thread-safe."""

    def __init__(self, model: torch.nn.Module, cache: VersionCache, rules: SamplingRules,
                 check: SpotCheckConfig = SpotCheckConfig(), *, pad_token_id: int = 0, max_queue: int = 256,
                 threads: int = 0) -> None:
        self.model = copy.deepcopy(model).to("cpu", torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache, self.rules, self.check, self.pad_id = cache, rules, check, pad_token_id
        self.jobs: queue.Queue[VerifyJob | None] = queue.Queue(maxsize=max_queue)
        self.results: queue.Queue[Verdict] = queue.Queue()
        self.loaded: int | None = None
        self.busy_s = 0.0  # time spent checking (for the benchmark and the status line)
        self.done = 0
        self.dropped_busy = 0
        self._thread = threading.Thread(target=self._run, name="verifier", daemon=True)
        self._thread.start()

    def submit(self, job: VerifyJob) -> bool:
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            self.dropped_busy += 1
            return False

    def verdicts(self) -> list[Verdict]:
        out = []
        while True:
            try:
                out.append(self.results.get_nowait())
            except queue.Empty:
                return out

    def pending(self) -> int:
        return self.jobs.qsize()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            t0 = time.perf_counter()
            try:
                result = self._check(job)
            except Exception as exc:  # noqa: BLE001 - a broken check must not kill the thread (nor ban anyone)
                log.warning("spot-check of %s #%d failed to run: %r", job.sampler.hex()[:8], job.seq, exc)
                result = SpotCheckResult(True, "check_error", str(exc)[:200])
            dt = time.perf_counter() - t0
            self.busy_s += dt
            self.done += 1
            self.results.put(Verdict(job, result, dt))

    def _check(self, job: VerifyJob) -> SpotCheckResult:
        if self.loaded != job.version:
            state = self.cache.get(job.version)
            if state is None:
                return SpotCheckResult(True, UNAVAILABLE, f"version {job.version} is not in the cache")
            self.model.load_state_dict(state, strict=False)
            self.loaded = job.version
        r = self.rules
        return spot_check(self.model, job.prompt_ids, job.completions, job.logprobs, temperature=r.temperature,
                          top_k=r.top_k, top_p=r.top_p, config=self.check, pad_token_id=self.pad_id)

    def close(self, timeout: float = 5.0) -> None:
        try:
            while True:  # drop what is still queued: nothing waits for those verdicts any more
                self.jobs.get_nowait()
        except queue.Empty:
            pass
        self.jobs.put(None)
        self._thread.join(timeout)
