"""Reward functions as plug-ins, with TRL's signature, run by a bounded pool of worker processes.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, called with keywords as TRL's
GRPOTrainer calls it:
    prompts       the question texts of the rows (strings: our prompt data is not conversational)
    completions   the completion texts (strings), one per row
    completion_ids the completion token ids, one list per row
    **columns     the prompt's dataset columns, one value per row (e.g. `question`, `answer` as in the file), plus
                  `gold_answer`: the gold answer the built-in accuracy compares against ("72" for a GSM8K answer
                  ending in "#### 72"). Accept `**kwargs`: more columns may be passed than a function names.
It returns one value per completion; None means "not applicable to this row". As in TRL, the total reward of a row
is the weighted sum over functions of the values that are not None (nansum), 0.0 if all are None.

`--reward module:function[=weight]` names one (repeatable); module is a dotted import path (`my_pkg.rewards`) or a
path to a .py file (`rewards/brevity.py`). The built-in rewards are functions of the same kind,
`gepo.reward_funcs:accuracy_reward` and `gepo.reward_funcs:format_reward` (short names `accuracy` and `format`);
`--accuracy-weight` / `--format-weight` are their weights unless a `--reward accuracy=W` / `format=W` overrides them.

Isolation: the built-ins are scored by gepo.rewards' RewardScorer (math-verify in its own bounded worker pool, one
deadline per completion). Every other function runs in a `RewardFunctionPool` worker process, one call per scored
group with a deadline (`timeout_s`). A call that raises, returns the wrong length or type, or kills its process
scores None for that group, logs one line and is counted; one that runs past its deadline has its worker killed
and replaced. The learner never crashes or waits longer than the deadline because of a plug-in. A module that
cannot be imported is reported at start-up (RewardLoadError, a ValueError) before any training.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any, Callable, Iterable, Mapping, Sequence

from gepo.rewards import (RewardConfig, RewardScorer, RewardWorkerError, _context, _cpu_bound_next_check, _Worker,
                          _worker_setup, format_reward as _format_one, score_completions)

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_REWARDS",
    "RewardLoadError",
    "RewardFunctionPool",
    "RewardRunner",
    "RewardSpec",
    "ScoredCompletions",
    "accuracy_reward",
    "format_reward",
    "load_reward_function",
    "resolve_reward_specs",
]

FAILURE_KINDS = ("error", "bad_output", "timeout", "crash")


# --------------------------------------------------------------------------------------------------------------------
# The built-in rewards, as plug-ins (usable with TRL too)


def _completion_text(completion: Any) -> str:
    """A completion as text: a string, or TRL's conversational form [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def accuracy_reward(prompts: Sequence[Any], completions: Sequence[Any], gold_answer: Sequence[str],
                    **kwargs: Any) -> list[float]:
    """1.0 where the completion's final answer matches `gold_answer` (math-verify; see gepo/rewards.py), else 0.0."""
    results = score_completions([_completion_text(c) for c in completions], [str(g) for g in gold_answer])
    return [r.accuracy for r in results]


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where the completion is exactly <think>…</think><answer>…</answer>, else 0.0."""
    return [_format_one(_completion_text(c)) for c in completions]


BUILTIN_REWARDS = {"accuracy": "gepo.reward_funcs:accuracy_reward", "format": "gepo.reward_funcs:format_reward"}
_BUILTIN_BY_TARGET = {target: name for name, target in BUILTIN_REWARDS.items()}


# --------------------------------------------------------------------------------------------------------------------
# Specs and loading


class RewardLoadError(ValueError):
    """A --reward spec is malformed, or its module or function cannot be loaded."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward function and its weight. `target` is "module:function" (module a dotted path or a .py file)."""

    target: str
    weight: float = 1.0

    @property
    def builtin(self) -> str | None:
        """"accuracy" or "format" for the built-in rewards, else None."""
        return _BUILTIN_BY_TARGET.get(self.target)

    @property
    def name(self) -> str:
        return self.builtin or self.target.rsplit(":", 1)[1]

    @classmethod
    def parse(cls, text: str) -> "RewardSpec":
        """`module:function[=weight]`, or a built-in's short name `accuracy[=weight]` / `format[=weight]`."""
        if not isinstance(text, str) or not text.strip():
            raise RewardLoadError(f"--reward: expected module:function[=weight], got {text!r}")
        target, weight = text.strip(), 1.0
        if "=" in target:
            target, _, weight_text = target.rpartition("=")
            try:
                weight = float(weight_text)
            except ValueError:
                raise RewardLoadError(f"--reward {text!r}: weight {weight_text!r} is not a number") from None
        return cls._make(target.strip(), weight, text)

    @classmethod
    def _make(cls, target: str, weight: Any, text: Any) -> "RewardSpec":
        target = BUILTIN_REWARDS.get(target, target)
        module, _, function = target.rpartition(":")
        if not module or not function.isidentifier():
            raise RewardLoadError(f"--reward {text!r}: expected module:function[=weight] (module a dotted import "
                                  f"path or a .py file), or one of {sorted(BUILTIN_REWARDS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardLoadError(f"--reward {text!r}: weight must be a finite number, got {weight!r}")
        return cls(target, float(weight))


def resolve_reward_specs(rewards: Any, accuracy_weight: float = 1.0, format_weight: float = 0.0) -> list[RewardSpec]:
    """The run's reward functions: the built-ins with the shorthand weights, overridden by `--reward accuracy=W` /
    `format=W`, then the plug-ins in the order given. `rewards` is what the flag or a recipe gives: a list of
    "module:function[=weight]" strings, one such string, or a mapping {"module:function": weight}."""
    if rewards is None:
        items: list[RewardSpec] = []
    elif isinstance(rewards, str):
        items = [RewardSpec.parse(rewards)]
    elif isinstance(rewards, Mapping):
        items = [RewardSpec._make(str(k).strip(), v, f"{k}={v}") for k, v in rewards.items()]
    elif isinstance(rewards, Iterable):
        items = [RewardSpec.parse(r) for r in rewards]
    else:
        raise RewardLoadError(f"reward: expected a list of module:function[=weight], got {type(rewards).__name__}")
    builtins = {"accuracy": accuracy_weight, "format": format_weight}
    user: list[RewardSpec] = []
    for spec in items:
        if spec.builtin is not None:
            builtins[spec.builtin] = spec.weight
        elif spec.target in {s.target for s in user}:
            raise RewardLoadError(f"--reward {spec.target} is given twice")
        else:
            user.append(spec)
    return [RewardSpec(BUILTIN_REWARDS[n], w) for n, w in builtins.items()] + user


def load_reward_function(target: str) -> Callable[..., Any]:
    """The function `target` ("module:function") names; module is a dotted import path or a path to a .py file."""
    module_ref, _, function = target.rpartition(":")
    try:
        if module_ref.endswith(".py") or os.sep in module_ref:
            path = os.path.abspath(module_ref)
            if not os.path.isfile(path):
                raise RewardLoadError(f"reward module file not found: {module_ref}")
            name = "gepo_user_reward_" + os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise RewardLoadError(f"cannot load reward module {module_ref}: not a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # so pickling and dataclasses inside it work
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
    except RewardLoadError:
        raise
    except BaseException as e:  # noqa: BLE001 - a user module may raise anything (even SystemExit) at import
        raise RewardLoadError(f"cannot import reward module {module_ref}: {_one_line(e)}") from None
    func = getattr(module, function, None)
    if not callable(func):
        raise RewardLoadError(f"reward module {module_ref} has no function {function!r}")
    return func


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text[:300] + "…" if len(text) > 300 else text


class _BadOutput(Exception):
    pass


def _check_output(values: Any, n: int) -> list[float | None]:
    """`values` as n floats or Nones (NaN counts as None, as TRL stores None as NaN); _BadOutput otherwise."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # numpy arrays and tensors
    if not isinstance(values, (list, tuple)):
        raise _BadOutput(f"returned {type(values).__name__}, expected a list of {n} floats or None")
    if len(values) != n:
        raise _BadOutput(f"returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if hasattr(v, "item") and not isinstance(v, (int, float)):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _BadOutput(f"value {i} is {type(v).__name__}, expected a float or None")
        if math.isnan(v):
            out.append(None)
        elif math.isinf(v):
            raise _BadOutput(f"value {i} is {v}")
        else:
            out.append(float(v))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Worker pool for plug-in functions


def _pool_worker_main(conn: Connection, memory_mb: int | None, cpu_seconds: float, targets: list[str]) -> None:
    """Import every plug-in, say ready (or why not), then serve (call_id, function index, prompts, completions,
    kwargs) calls one at a time, replying (call_id, "ok", values) or (call_id, kind, one-line message)."""
    _worker_setup(memory_mb)
    try:
        funcs = [load_reward_function(t) for t in targets]
    except RewardLoadError as e:
        conn.send(("broken", str(e)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        call_id, index, prompts, completions, kwargs = message
        _cpu_bound_next_check(cpu_seconds)
        try:
            values = funcs[index](prompts=prompts, completions=completions, **kwargs)
            reply = (call_id, "ok", _check_output(values, len(completions)))
        except _BadOutput as e:
            reply = (call_id, "bad_output", str(e))
        except BaseException as e:  # noqa: BLE001 - whatever user code raises is that call's failure
            reply = (call_id, "error", _one_line(e))
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable value slipped through
            conn.send((call_id, "error", f"reply could not be sent: {_one_line(e)}"))


def _pool_worker(ctx: Any, targets: list[str], config: RewardConfig, timeout_s: float) -> _Worker:
    return _Worker(ctx, config, target=_pool_worker_main, extra=(targets,), timeout_s=timeout_s,
                   name="gepo-reward-plugin")


@dataclass
class _Call:
    call_id: int
    index: int  # which function
    payload: tuple  # (prompts, completions, kwargs)


@dataclass
class _PoolLane:
    """One worker's share of one run() call."""

    worker: _Worker
    calls: deque
    deadline: float = 0.0


class RewardFunctionPool:
    """Worker processes that call plug-in reward functions under a deadline; thread-safe (calls serialize).

    `run(calls)` takes (function index, prompts, completions, kwargs) tuples and returns, per call, ("ok", values)
    or (kind, message) with kind one of "error", "bad_output", "timeout", "crash".
    """

    def __init__(self, targets: Sequence[str], config: RewardConfig, timeout_s: float, num_workers: int = 1) -> None:
        if timeout_s <= 0:
            raise ValueError(f"reward timeout must be positive, got {timeout_s}")
        self.targets = list(targets)
        self.config = config
        self.timeout_s = timeout_s
        self.num_workers = max(1, num_workers)
        self._lock = threading.Lock()
        self._ctx = _context(config.start_method)
        self._workers: list[_Worker] = []
        self._closed = False
        self._next_id = 0

    def warm_up(self) -> None:
        """Start the workers and wait until each has imported every plug-in; RewardLoadError if one cannot."""
        with self._lock:
            self._start()
            for worker in self._workers:
                problem = self._ready(worker)
                if problem is not None:
                    raise RewardLoadError(problem)

    def run(self, calls: Sequence[tuple[int, list, list, dict]]) -> list[tuple[str, Any]]:
        with self._lock:
            self._start()
            jobs = []
            for index, prompts, completions, kwargs in calls:
                self._next_id += 1
                jobs.append(_Call(self._next_id, index, (prompts, completions, kwargs)))
            if not jobs:
                return []
            lanes = [_PoolLane(w, deque()) for w in self._workers[: min(len(jobs), self.num_workers)]]
            for k, job in enumerate(jobs):
                lanes[k % len(lanes)].calls.append(job)
            results: dict[int, tuple[str, Any]] = {}
            try:
                self._drive(lanes, results)
            except BaseException:
                # A replacement that cannot be started (RewardWorkerError) leaves calls in flight on other lanes:
                # their replies must not reach the next run, so those workers go too; _start refills the pool.
                for lane in lanes:
                    self._drop(lane.worker)
                raise
            return [results[job.call_id] for job in jobs]

    def _drive(self, lanes: list[_PoolLane], results: dict[int, tuple[str, Any]]) -> None:
        """Send each lane's calls one at a time and collect the replies, killing a worker past its deadline."""
        for lane in lanes:
            self._send_next(lane, results)
        while any(lane.calls for lane in lanes):
            active = [lane for lane in lanes if lane.calls]
            wait_s = max(0.0, min(lane.deadline for lane in active) - time.monotonic())
            by_conn = {lane.worker.conn: lane for lane in active}
            for conn in wait_connections(list(by_conn), timeout=wait_s):
                self._on_reply(by_conn[conn], results)
            now = time.monotonic()
            for lane in active:
                if lane.calls and now >= lane.deadline:
                    call = lane.calls.popleft()
                    results[call.call_id] = ("timeout", f"ran past {self.timeout_s:g} s; its worker was killed")
                    self._replace(lane)
                    self._send_next(lane, results)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for worker in self._workers:
                try:
                    worker.stop()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
            self._workers.clear()

    # ---- internals

    def _start(self) -> None:
        if self._closed:
            raise RewardWorkerError("the reward function pool is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(_pool_worker(self._ctx, self.targets, self.config, self.timeout_s))

    def _ready(self, worker: _Worker) -> str | None:
        """None once `worker` has imported the plug-ins, else why it cannot (within the start-up timeout)."""
        if worker.ready:
            return None
        if not worker.conn.poll(self.config.startup_timeout_s):
            return (f"a reward plug-in worker did not start within {self.config.startup_timeout_s:g} s "
                    f"(importing {', '.join(self.targets)})")
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return (f"a reward plug-in worker died while importing {', '.join(self.targets)} "
                    f"(exit code {worker.process.exitcode})")
        if message[0] == "broken":
            return message[1]
        worker.ready = True
        return None

    def _send_next(self, lane: _PoolLane, results: dict[int, tuple[str, Any]]) -> None:
        """Send the lane's next call; calls that cannot be sent fail at once (and get a fresh worker)."""
        while lane.calls:
            call = lane.calls[0]
            problem, kind = self._ready(lane.worker), "crash"
            if problem is None:
                try:
                    lane.worker.conn.send((call.call_id, call.index, *call.payload))
                    lane.deadline = time.monotonic() + self.timeout_s
                    return
                except Exception as e:  # noqa: BLE001 - a dead worker (OSError) or an unpicklable column
                    problem, kind = f"could not send the call: {_one_line(e)}", "error"
            lane.calls.popleft()
            results[call.call_id] = (kind, problem)
            self._replace(lane)  # never reuse a pipe that may hold part of a message

    def _on_reply(self, lane: _PoolLane, results: dict[int, tuple[str, Any]]) -> None:
        call = lane.calls.popleft()
        try:
            call_id, kind, value = lane.worker.conn.recv()
        except (EOFError, OSError):
            lane.worker.process.join(1)  # reap it, for its exit code
            results[call.call_id] = ("crash", f"its worker died (exit code {lane.worker.process.exitcode})")
            self._replace(lane)
            self._send_next(lane, results)
            return
        if call.call_id != call_id:  # cannot happen with one call in flight per worker; never mis-assign rewards
            raise RewardWorkerError(f"reward plug-in worker replied for call {call_id}, expected {call.call_id}")
        results[call_id] = (kind, value)
        self._send_next(lane, results)

    def _replace(self, lane: _PoolLane) -> None:
        self._drop(lane.worker)  # first: if the new one cannot be started, no stopped worker stays in the pool
        lane.worker = _pool_worker(self._ctx, self.targets, self.config, self.timeout_s)
        self._workers.append(lane.worker)

    def _drop(self, worker: _Worker) -> None:
        worker.stop(graceful=False)
        if worker in self._workers:
            self._workers.remove(worker)


# --------------------------------------------------------------------------------------------------------------------
# The runner the learner uses


@dataclass
class ScoredCompletions:
    """Rewards of a batch of completions (aligned lists)."""

    totals: list[float]  # the weighted nansum the learner trains on
    accuracy: list[float]  # the built-in accuracy, whatever its weight (0/1)
    per_function: dict[str, list[float | None]]  # each function's values, None where not applicable or failed
    failures: dict[str, str]  # function name -> one-line reason, for the functions that failed on this batch


class RewardRunner:
    """Scores completions with every reward function of the run.

    with RewardRunner(resolve_reward_specs(["rewards.py:brevity=0.5"])) as rewards:
        scored = rewards.score(examples, completions)   # examples[i]: the PromptExample of completions[i]
    """

    def __init__(self, specs: Sequence[RewardSpec], config: RewardConfig | None = None, timeout_s: float = 10.0,
                 plugin_workers: int = 1, warn_limit: int = 5) -> None:
        self.specs = list(specs)
        weights = {s.builtin: s.weight for s in self.specs if s.builtin}
        config = dataclasses.replace(config or RewardConfig(), accuracy_weight=weights.get("accuracy", 0.0),
                                     format_weight=weights.get("format", 0.0))
        self.scorer = RewardScorer(config)
        self.plugins = [s for s in self.specs if s.builtin is None]
        names = [s.name for s in self.specs]
        self.names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.pool = (RewardFunctionPool([s.target for s in self.plugins], config, timeout_s, plugin_workers)
                     if self.plugins else None)
        self.warn_limit = warn_limit
        self._lock = threading.Lock()
        self.failures: dict[str, Counter] = defaultdict(Counter)  # name -> kind -> count, since start
        self._sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [sum, count] since last drain

    def warm_up(self) -> None:
        self.scorer.warm_up()
        if self.pool is not None:
            self.pool.warm_up()

    def score(self, examples: Sequence[Any], completions: Sequence[str],
              completion_ids: Sequence[Sequence[int]] | None = None, record: bool = True) -> ScoredCompletions:
        """Rewards for completions[i] of the prompt examples[i] (a gepo.data.PromptExample). `record`: count the
        values in `step_metrics()` (training rollouts; evaluation passes False)."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        results = self.scorer.score(list(completions), [ex.answer for ex in examples])
        per_function: dict[str, list[float | None]] = {}
        plugin_names = [n for n, s in zip(self.names, self.specs) if s.builtin is None]
        for name, spec in zip(self.names, self.specs):
            if spec.builtin == "accuracy":
                per_function[name] = [r.accuracy for r in results]
            elif spec.builtin == "format":
                per_function[name] = [r.format for r in results]
        failures: dict[str, str] = {}
        if self.pool is not None:
            prompts = [ex.question for ex in examples]
            kwargs = {**_columns(examples), "completion_ids": [list(c) for c in completion_ids]
                      if completion_ids is not None else None}
            calls = [(i, prompts, list(completions), kwargs) for i in range(len(self.plugins))]
            outcomes = self.pool.run(calls)
            for name, (kind, value) in zip(plugin_names, outcomes):
                if kind == "ok":
                    per_function[name] = value
                else:
                    per_function[name] = [None] * len(completions)
                    failures[name] = value
                    self._count_failure(name, kind, value)
        totals = [r.total for r in results]  # the built-ins' weighted sum
        for name, spec in zip(self.names, self.specs):
            if spec.builtin is None:
                for i, v in enumerate(per_function[name]):
                    if v is not None:
                        totals[i] += spec.weight * v
        with self._lock:
            for name, values in per_function.items() if record else ():
                acc = self._sums[name]
                for v in values:
                    if v is not None:
                        acc[0] += v
                        acc[1] += 1
        return ScoredCompletions(totals, [r.accuracy for r in results], per_function, failures)

    def step_metrics(self) -> dict[str, Any]:
        """Per-function mean reward since the last call (None values excluded; null if all were None) and the
        failure counts since start, for the metrics line."""
        with self._lock:
            means = {n: (s / c if c else None) for n, (s, c) in ((n, self._sums[n]) for n in self.names)}
            self._sums.clear()
            out: dict[str, Any] = {"rewards": means}
            if self.pool is not None:
                out["reward_failures"] = {n: {k: self.failures[n][k] for k in FAILURE_KINDS}
                                          for n, s in zip(self.names, self.specs) if s.builtin is None}
                out["reward_timeouts_total"] = sum(c["timeout"] for c in self.failures.values())
                out["reward_errors_total"] = sum(sum(c.values()) for c in self.failures.values())
            return out

    def close(self) -> None:
        self.scorer.close()
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count_failure(self, name: str, kind: str, message: str) -> None:
        with self._lock:
            self.failures[name][kind] += 1
            n = sum(self.failures[name].values())
        if n <= self.warn_limit or n % 100 == 0:
            logger.warning("reward %s failed (%s): %s; scored None for this group (%d failures so far%s)", name, kind,
                           message, n, "; further ones logged every 100th" if n == self.warn_limit else "")


def _columns(examples: Sequence[Any]) -> dict[str, list[Any]]:
    """The rows' dataset columns as TRL passes them: one list per column, one value per completion."""
    rows = [{"question": ex.question, "answer": ex.answer, **getattr(ex, "columns", {}), "gold_answer": ex.answer}
            for ex in examples]
    keys = list(rows[0]) if rows else []
    return {k: [row.get(k) for row in rows] for k in keys}
