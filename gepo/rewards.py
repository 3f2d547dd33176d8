"""Rewards: is a completion's final answer right, and is it in the `<think>…</think><answer>…</answer>` format.

The learner recomputes every reward itself with this module, so it must be correct, safe on hostile text, and
bounded in time. Accuracy goes through math-verify (gold first), in a small pool of worker processes, because
math-verify can run for ever on some inputs (`9^{9^{9^9}}` is a C-level big-integer power no signal interrupts) and
its own SIGALRM timeouts fail off the main thread. The parent waits on each check with a deadline; on expiry it kills
and replaces that worker and scores the item 0.0 with `timed_out=True`.

What counts as the answer (extraction order):
 1. The answer region of the completion: the content of the last complete `<answer>…</answer>` block; else the text
    after the last `</think>`; else the whole completion. Stray tag tokens are removed from it.
 2. Only the last `max_answer_chars` characters of that region are kept (default 1000): the final answer sits at its
    end, and the cap bounds the text math-verify ever sees, however long the completion (10 MB costs a few `rfind`s).
 3. Within the region math-verify's priorities apply: `\\boxed{}` first, then "final answer is …", then "answer: …",
    then any LaTeX math ($…$, \\(…\\), \\[…\\]), then the last plain number or expression. Among equals the
    rightmost wins; two boxed answers parse as a set, which matches no single-number gold.
 Light normalisation first: full-width characters → ASCII, U+2212 minus → "-", `\\$` dropped outside math mode ("\\$18"
 is otherwise unparseable), and a region that is bare LaTeX without prose (`\\dfrac{1}{2}`, `2\\sqrt{2}` inside the
 answer tags) is wrapped in `$…$`, because math-verify does not see bare LaTeX (it reads `2\\sqrt{2}` as 2).

Golds: the text after the last `####` if present (raw GSM8K answers), thousands separators removed, and bare LaTeX
wrapped in `$…$` like answers.

Semantics kept from math-verify, deliberately:
 - Percentages: `10%` and `10\\%` match gold 10 and also gold 0.1. GSM8K golds drop the % sign, so "10%" for a
   "what percent" question must count as right; the reverse (answer 0.1 for gold 10) is still wrong.
 - Floats compare after rounding to 6 decimals (0.333333 matches 1/3); integers compare exactly.
 - "1,000", "$18", "18 dollars", "x = 5", "\\frac{1}{2}" vs 0.5 all match as one would expect.
One rule added on top (`RewardConfig.literal_answers`, on by default): when the gold is a number, the answer must be
written as a number (integer, decimal, fraction a/b, percentage, with a sign), not an unevaluated expression.
Otherwise math-verify scores "23 + 45" as right for gold 68, and on the synthetic task ("What is 23 + 45?") a policy
learns to copy the question instead of computing. `x = 68` and `23 + 45 = 68` still count.

Fast path: when the region is a plain integer/decimal (or one in `\\boxed{}`) and so is the gold, the check is done in
the calling process with `decimal.Decimal`; it is restricted to numbers where that provably agrees with math-verify
(integers up to 15 digits; decimals up to 15 digits with at most 6 after the point); the tests compare the two on
a thousand random pairs.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any, Iterator, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "RewardConfig",
    "RewardResult",
    "RewardScorer",
    "RewardWorkerError",
    "ScorerStats",
    "accuracy_reward",
    "answer_region",
    "format_reward",
    "score_completions",
]


# --------------------------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class RewardConfig:
    """How rewards are computed and bounded.

    total = accuracy_weight * accuracy + format_weight * format.
    timeout_s: wall-clock bound on one math-verify check in a worker (parse + verify of one completion). Checks take
        1-5 ms; the margin is for busy machines, where a legitimate check must not be cut off.
    max_answer_chars: only the last this-many characters of the answer region are parsed (golds: the first).
    num_workers: worker processes; checks of one `score` call are spread over them.
    literal_answers: when the gold is a number, the answer must be a number too (see the module docstring).
    fast_path: score plain-number answers against plain-number golds in-process, without a worker.
    start_method: "forkserver" (default: math-verify is preloaded in the fork server, so replacing a killed worker
        takes ~0.25 s instead of ~0.6 s) or "spawn". Never "fork": the parent may have threads.
    worker_memory_mb: address space each worker may add to what it maps at start (RLIMIT_AS), so a runaway check
        fails with MemoryError instead of exhausting the machine before its deadline; None for no limit.
    startup_timeout_s: how long a fresh worker may take to import and self-check math-verify before it counts as broken.
    launch_timeout_s: how long starting the process may take (through the fork server: until the server has forked
        it; the first start of a process includes the server's own import of math-verify). Past it the fork server
        is taken as stuck, killed (the next start launches a fresh one) and RewardWorkerError raised.
    """

    accuracy_weight: float = 1.0
    format_weight: float = 0.0
    timeout_s: float = 3.0
    max_answer_chars: int = 1000
    num_workers: int = 2
    literal_answers: bool = True
    fast_path: bool = True
    start_method: str = "forkserver"
    worker_memory_mb: int | None = 4096
    startup_timeout_s: float = 60.0
    launch_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_answer_chars <= 0:
            raise ValueError(f"max_answer_chars must be positive, got {self.max_answer_chars}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {self.start_method!r}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be positive, got {self.startup_timeout_s}")
        if self.launch_timeout_s <= 0:
            raise ValueError(f"launch_timeout_s must be positive, got {self.launch_timeout_s}")


@dataclass(frozen=True)
class RewardResult:
    accuracy: float  # 1.0 if the final answer matches the gold, else 0.0
    format: float  # 1.0 if the completion is exactly <think>…</think><answer>…</answer>, else 0.0
    total: float  # the weighted sum the learner trains on
    timed_out: bool = False  # the check ran past its bound (or its worker died); accuracy was set to 0.0


@dataclass
class ScorerStats:
    checks: int = 0  # completions scored
    fast_path: int = 0  # of which decided in-process (plain numbers, or nothing to parse)
    pool: int = 0  # of which sent to a worker
    timeouts: int = 0  # worker checks that ran past timeout_s (worker killed and replaced)
    crashes: int = 0  # workers that died during a check (also scored 0.0, timed_out=True)
    respawns: int = 0  # workers started to replace a killed or dead one


# --------------------------------------------------------------------------------------------------------------------
# Format reward


_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 if `completion` is `<think>…</think><answer>…</answer>`: one of each tag, in that order, a non-blank
    answer, nothing but whitespace before, between the blocks, or after. The thinking may be empty."""
    _require_str(completion, "completion")
    # Counting first keeps the regex linear on hostile input and rejects nested or repeated tags.
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _FORMAT_RE.fullmatch(completion)
    return 1.0 if match is not None and match.group(2).strip() else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Text preparation (parent side; cheap string work only)


_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_MATH_DELIMITERS = ("\\boxed", "\\(", "\\[")
_TEXT_COMMAND_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{[^{}]*\}")
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_PROSE_WORD_RE = re.compile(r"[A-Za-z]{2,}")
# Plain numbers on which Decimal equality equals math-verify's verdict: math-verify compares integers exactly and
# floats after rounding to 6 decimals at their own precision, so stay inside both limits (see _fast_safe).
_NUMBER = r"-?\d{1,15}(?:\.\d{1,6})?"
_FAST_ANSWER_RE = re.compile(rf"\s*(?:\\boxed\{{\s*({_NUMBER})\s*\}}|({_NUMBER}))\s*")
_FAST_GOLD_RE = re.compile(rf"\s*({_NUMBER})\s*")


def _require_str(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")


def answer_region(completion: str, max_chars: int = 1000) -> str:
    """The part of `completion` that holds its final answer (see the module docstring), at most `max_chars` long."""
    _require_str(completion, "completion")
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        region = completion[start + len("<answer>") : end]
    else:
        think_end = completion.rfind("</think>")
        region = completion[think_end + len("</think>") :] if think_end >= 0 else completion
    region = region[-max_chars:]
    for tag in _TAGS:
        region = region.replace(tag, " ")
    return region


# Full-width ASCII (ｆｕｌｌ－ｗｉｄｔｈ ４２) -> ASCII, the minus sign U+2212 -> "-". Not full NFKC: it would also turn
# superscripts into digits ("5²" into "52").
_CHAR_MAP = {0xFF01 + i: 0x21 + i for i in range(94)} | {0x2212: ord("-"), 0x3000: ord(" ")}


def _normalize(text: str) -> str:
    text = text.translate(_CHAR_MAP)
    if "\\$" in text and not _UNESCAPED_DOLLAR_RE.search(text):
        text = text.replace("\\$", " ")
    return text.strip()


def _is_bare_latex(text: str) -> bool:
    """LaTeX with no delimiters and no prose, e.g. `\\dfrac{1}{2}`: math-verify needs it wrapped in $…$."""
    if "\\" not in text or "$" in text or any(d in text for d in _MATH_DELIMITERS):
        return False
    words = _LATEX_COMMAND_RE.sub(" ", _TEXT_COMMAND_RE.sub(" ", text))
    return _PROSE_WORD_RE.search(words) is None


def _parse_input(text: str) -> str:
    return f"${text}$" if _is_bare_latex(text) else text


def _prepare_answer(completion: str, max_chars: int) -> str:
    return _parse_input(_normalize(answer_region(completion, max_chars)))


def _prepare_gold(gold: str, max_chars: int) -> str:
    text = gold.rsplit("####", 1)[1] if "####" in gold else gold
    text = _normalize(text[:max_chars])
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    return _parse_input(text)


def _fast_accuracy(answer: str, gold: str) -> float | None:
    """The verdict for a plain-number answer and gold, or None when the check needs math-verify."""
    gold_match = _FAST_GOLD_RE.fullmatch(gold)
    if gold_match is None:
        return None
    answer_match = _FAST_ANSWER_RE.fullmatch(answer)
    if answer_match is None:
        return None
    number, gold_number = answer_match.group(1) or answer_match.group(2), gold_match.group(1)
    if not (_fast_safe(number) and _fast_safe(gold_number)):
        return None
    return 1.0 if Decimal(number) == Decimal(gold_number) else 0.0


def _fast_safe(number: str) -> bool:
    # sympy gives a decimal the precision of its digit count, and Floats of different precision can compare unequal
    # after rounding ("841091874734440.8370" vs "…440.837"); within 15 digits they agree with Decimal.
    return "." not in number or sum(ch.isdigit() for ch in number) <= 15


# --------------------------------------------------------------------------------------------------------------------
# Worker side: math-verify, its own timeouts off (the parent enforces the bound by killing the process)


_gold_cache: dict[str, list[Any]] = {}
_GOLD_CACHE_SIZE = 512


def _extraction_config() -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _is_number_literal(expr: Any) -> bool:
    """A number as written: 68, -3, 0.5, 3/4 (unreduced 6/8 too), -\\frac{1}{2}, 10%, not 23 + 45 or 2*34."""
    from sympy import Integer, Mul, Number, Pow, Rational, UnevaluatedExpr

    if isinstance(expr, Number):
        return True
    if not isinstance(expr, Mul):
        return False
    values = denominators = percents = signs = 0
    for arg in expr.args:
        if arg == Integer(-1) and signs == 0:
            signs += 1
        elif isinstance(arg, Number):
            values += 1
        elif isinstance(arg, Pow) and isinstance(arg.base, Integer) and arg.exp == Integer(-1):
            denominators += 1
        elif arg == UnevaluatedExpr(Rational(1, 100)):
            percents += 1
        else:
            return False
    return values <= 1 and denominators <= 1 and percents <= 1 and values + signs >= 1


def _literal_candidates(parsed: list[Any]) -> list[Any]:
    """The parsed answers allowed against a numeric gold: strings (compared verbatim) and number literals; for an
    equation, its right-hand side decides, as math-verify itself unwraps `x = 5` to 5."""
    from math_verify.grader import is_relation, take_last_relation

    kept = []
    for item in parsed:
        value = item
        if not isinstance(item, str) and is_relation(item):
            value = take_last_relation(item).rhs  # "x = 23 + 45 = 68" -> 68, as verify() unwraps it
        if isinstance(item, str) or _is_number_literal(value):
            kept.append(item)
    return kept


def _parse_gold(gold: str) -> list[Any]:
    from math_verify import parse

    parsed = _gold_cache.get(gold)
    if parsed is None:
        parsed = parse(gold, extraction_config=_extraction_config(), parsing_timeout=None)
        if len(_gold_cache) >= _GOLD_CACHE_SIZE:
            _gold_cache.clear()
        _gold_cache[gold] = parsed
    return parsed


def _check(answer: str, gold: str, literal_answers: bool) -> tuple[float, bool]:
    """(accuracy, gold_parsed) for one prepared answer and gold; never raises."""
    from math_verify import parse, verify

    try:
        gold_parsed = _parse_gold(gold)
        if not gold_parsed:
            return 0.0, False
        parsed = parse(answer, extraction_config=_extraction_config(), parsing_timeout=None)
        if literal_answers and any(not isinstance(g, str) and _is_number_literal(g) for g in gold_parsed):
            parsed = _literal_candidates(parsed)
        if not parsed:
            return 0.0, True
        return (1.0 if verify(gold_parsed, parsed, timeout_seconds=None) else 0.0), True
    except Exception:  # noqa: BLE001 - hostile text must score 0, whatever sympy raises
        return 0.0, True


def _worker_setup(memory_mb: int | None) -> None:
    # Ctrl-C in the terminal reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_mb is not None:
        _limit_address_space(memory_mb)
    # math-verify warns once that its timeouts are off; that is the design here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _limit_address_space(extra_mb: int) -> None:
    """Cap the address space at what the worker already maps plus `extra_mb`: relative, because the worker may have
    re-imported a parent script that maps gigabytes (CUDA libraries), and a cap below that would fail every check."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + int(extra_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):  # not Linux: no cap, the deadline still holds
        pass


def _cpu_bound_next_check(cpu_seconds: float) -> None:
    """Have the kernel kill this worker (SIGXCPU) if the next check burns more than `cpu_seconds` of CPU.

    The parent kills a stuck worker long before that; this is for a worker whose parent was SIGKILLed mid-check.
    Nothing else would stop it: no signal handler runs inside a C-level big-integer power, and the fork server,
    its OS parent, stays up as long as the worker does."""
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(usage.ru_utime + usage.ru_stime + cpu_seconds) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ImportError, OSError, ValueError):
        pass


_WARM_UP = [
    ("1", "1"),
    ("\\boxed{\\frac{1}{2}}", "$0.5$"),
    ("$\\sqrt{8}$", "$2\\sqrt{2}$"),
    ("10\\%", "10"),
    ("x = 5", "5"),
]


def _worker_main(conn: Connection, memory_mb: int | None, cpu_seconds: float) -> None:
    """Serve batches of (job_id, answer, gold, literal_answers); reply per item so the parent can time each one."""
    _worker_setup(memory_mb)
    # First uses load parsers and sympy submodules lazily (0.5-1 s each on a busy machine); pay that before
    # declaring readiness, so it never counts against a check's deadline.
    verdicts = [_check(answer, gold, True)[0] for answer, gold in _WARM_UP]
    if verdicts != [1.0] * len(_WARM_UP):  # a broken install or memory cap would otherwise score everything 0
        conn.send(("broken", f"self-check verdicts {verdicts}, expected all 1.0"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for job_id, answer, gold, literal_answers in batch:
            _cpu_bound_next_check(cpu_seconds)
            accuracy, gold_ok = _check(answer, gold, literal_answers)
            conn.send((job_id, accuracy, gold_ok))


# --------------------------------------------------------------------------------------------------------------------
# Parent side: the worker pool


class RewardWorkerError(RuntimeError):
    """The reward workers cannot be started or the scorer is closed (not raised for any answer text)."""


def _context(start_method: str) -> multiprocessing.context.BaseContext:
    if start_method == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Only takes effect if the process's fork server has not started yet; then respawns are a fork away.
        ctx.set_forkserver_preload(["math_verify", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _start_process(process: multiprocessing.process.BaseProcess, timeout_s: float) -> None:
    """`process.start()`, bounded in time. Through the fork server, start() blocks until the server has forked the
    child and sent its pid; a fork server that is stopped, swapped out or stuck in its preload imports would block
    the learner for ever, with no deadline of ours running yet. On expiry the stuck fork server is killed, so that
    the blocked start() sees EOF and the next start launches a fresh server (multiprocessing does that itself)."""
    failure: list[BaseException] = []

    def start() -> None:
        try:
            process.start()
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            failure.append(e)

    thread = threading.Thread(target=start, name="gepo-reward-worker-start", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        killed = _kill_fork_server()
        thread.join(5)
        raise RewardWorkerError(
            f"a reward worker process was not started within {timeout_s:g} s: the multiprocessing fork server did "
            f"not answer{' (killed; the next try starts a fresh one)' if killed else ''}")
    if failure:
        raise RewardWorkerError(f"a reward worker process could not be started: {failure[0]!r}") from failure[0]


def _kill_fork_server() -> bool:
    """SIGKILL this process's multiprocessing fork server (private state: there is no public handle on it)."""
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return False
    logger.warning("the multiprocessing fork server (pid %d) did not fork a reward worker in time; killing it", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return False
    return True


class _Worker:
    """A worker process and the parent's end of its pipe. `target(conn, worker_memory_mb, cpu_seconds, *extra)` is
    what it runs (math-verify checks by default; gepo.reward_funcs runs reward plug-ins with it)."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, config: RewardConfig, target: Any = None,
                 extra: tuple = (), timeout_s: float | None = None, name: str = "gepo-reward-worker") -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        # CPU backstop for orphans: well past the wall-clock deadline, so it never fires while the parent lives.
        cpu_seconds = 5 * (timeout_s or config.timeout_s) + 5
        self.process = ctx.Process(
            target=target or _worker_main,
            args=(child_conn, config.worker_memory_mb, cpu_seconds, *extra),
            name=name,
            daemon=True,
        )
        try:
            _start_process(self.process, config.launch_timeout_s)
        finally:
            child_conn.close()  # so the parent sees EOF if the worker dies
        self.conn = parent_conn
        self.ready = False

    def stop(self, graceful: bool = True) -> None:
        if graceful and self.process.is_alive():
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
            self.process.join(0.5)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in list(workers):
        try:
            worker.stop()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
    workers.clear()


@dataclass
class _Job:
    index: int  # position in the score() call
    answer: str
    gold: str


@dataclass
class _Lane:
    """One worker's share of one score() call."""

    worker: _Worker
    jobs: deque[_Job]
    sent: bool = False
    deadline: float = 0.0


@dataclass
class _Outcome:
    accuracy: float
    timed_out: bool = False


class RewardScorer:
    """Scores groups of completions against golds; thread-safe, bounded in time per completion.

    with RewardScorer(RewardConfig(format_weight=0.5)) as scorer:
        results = scorer.score(completions, [gold] * len(completions))

    One `score` call spreads its checks over up to `num_workers` idle workers (one message each way per worker, then
    one small reply per check); concurrent calls from other threads share the pool. `score` blocks: from asyncio,
    `await asyncio.to_thread(scorer.score, ...)`. Workers start lazily (or with `warm_up()`), through forkserver or
    spawn, so as with any such multiprocessing code a script must guard its entry point with
    `if __name__ == "__main__":`. It cannot run inside a daemonic process (those may not have children).
    """

    def __init__(self, config: RewardConfig | None = None) -> None:
        self.config = config or RewardConfig()
        self._lock = threading.Lock()
        self._stats = ScorerStats()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []  # every live worker, idle or lent to a call
        self._ctx: multiprocessing.context.BaseContext | None = None
        self._closed = False
        self._warned_golds: set[str] = set()
        # Kill the workers if the scorer is dropped without close() (the list is shared, not the scorer).
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    # ---- public API

    def score(self, completions: Sequence[str], golds: Sequence[str]) -> list[RewardResult]:
        """One RewardResult per completion; golds[i] is the gold answer of completions[i]."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        for i, (c, g) in enumerate(zip(completions, golds)):
            _require_str(c, f"completions[{i}]")
            _require_str(g, f"golds[{i}]")
        cfg = self.config
        # Reported even when it carries no weight: it is linear-time and useful to monitor.
        formats = [format_reward(c) for c in completions]
        outcomes: dict[int, _Outcome] = {}
        jobs: list[_Job] = []
        for i, (c, g) in enumerate(zip(completions, golds)):
            answer = _prepare_answer(c, cfg.max_answer_chars)
            gold = _prepare_gold(g, cfg.max_answer_chars)
            fast = _fast_accuracy(answer, gold) if cfg.fast_path else None
            if fast is not None:
                outcomes[i] = _Outcome(fast)
            elif not answer or not gold:
                outcomes[i] = _Outcome(0.0)
            else:
                jobs.append(_Job(i, answer, gold))
        if jobs:
            outcomes.update(self._run_jobs(jobs))
        with self._lock:
            self._stats.checks += len(completions)
            self._stats.pool += len(jobs)
            self._stats.fast_path += len(completions) - len(jobs)
        return [self._result(outcomes[i], formats[i]) for i in range(len(completions))]

    @property
    def stats(self) -> ScorerStats:
        with self._lock:
            return ScorerStats(**vars(self._stats))

    def warm_up(self) -> None:
        """Start the workers and wait until they are ready, rather than at the first check that needs one (the first
        scorer of a process takes ~2 s: the fork server imports math-verify; later ones ~0.2 s)."""
        self._run_jobs([_Job(-1 - k, "1", "1") for k in range(self.config.num_workers)])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        _stop_all(workers)
        with self._lock:
            self._workers.clear()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals

    def _result(self, outcome: _Outcome, fmt: float) -> RewardResult:
        total = self.config.accuracy_weight * outcome.accuracy + self.config.format_weight * fmt
        return RewardResult(outcome.accuracy, fmt, total, outcome.timed_out)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise RewardWorkerError("RewardScorer is closed")
            if self._ctx is not None:
                return
            self._ctx = _context(self.config.start_method)
        self._refill()
        logger.info("started %d reward workers (%s)", self.config.num_workers, self._ctx.get_start_method())

    def _refill(self) -> None:
        """Start workers until the pool has its size again: a replacement that could not be started leaves a gap,
        and with no worker left every later call would wait for an idle one for ever."""
        with self._lock:
            while len(self._workers) < self.config.num_workers:
                if self._closed:
                    raise RewardWorkerError("RewardScorer is closed")
                assert self._ctx is not None
                worker = _Worker(self._ctx, self.config)  # RewardWorkerError if it cannot be started in time
                self._workers.append(worker)
                self._idle.put(worker)

    def _new_worker(self, old: _Worker) -> _Worker:
        """Replace a killed, dead or stuck worker, keeping the pool size constant."""
        old.stop(graceful=False)
        with self._lock:
            if old in self._workers:
                self._workers.remove(old)
            if self._closed:
                raise RewardWorkerError("RewardScorer is closed")
            assert self._ctx is not None
            worker = _Worker(self._ctx, self.config)
            self._workers.append(worker)
            self._stats.respawns += 1
        return worker

    def _acquire(self, wanted: int) -> list[_Worker]:
        """At least one worker (waiting for it if all are lent out), and up to `wanted` if idle.

        Taking only one blocking keeps concurrent callers from deadlocking on each other's partial sets."""
        self._refill()
        while True:
            if self._closed:
                raise RewardWorkerError("RewardScorer is closed")
            try:
                workers = [self._idle.get(timeout=0.2)]
                break
            except queue.Empty:
                self._refill()
                continue
        while len(workers) < wanted:
            try:
                workers.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return workers

    def _run_jobs(self, jobs: list[_Job]) -> dict[int, _Outcome]:
        self._ensure_started()
        workers = self._acquire(min(self.config.num_workers, len(jobs)))
        lanes = [_Lane(w, deque(chunk)) for w, chunk in zip(workers, _split(jobs, len(workers)))]
        outcomes: dict[int, _Outcome] = {}
        try:
            for lane in lanes:
                self._start_lane(lane)
            self._drive(lanes, outcomes)
        finally:
            self._release(lanes)
        return outcomes

    def _release(self, lanes: list[_Lane]) -> None:
        for lane in lanes:
            worker = lane.worker
            if lane.jobs and lane.sent:  # left mid-batch (an exception): its replies would reach the next caller
                try:
                    worker = self._new_worker(worker)
                except RewardWorkerError:
                    continue
            with self._lock:
                alive = worker in self._workers
            if alive:
                self._idle.put(worker)

    def _start_lane(self, lane: _Lane) -> None:
        now = time.monotonic()
        if not lane.worker.ready:
            lane.deadline = now + self.config.startup_timeout_s
            return
        payload = [(job.index, job.answer, job.gold, self.config.literal_answers) for job in lane.jobs]
        try:
            if not lane.worker.process.is_alive():
                raise BrokenPipeError("worker exited while idle")
            lane.worker.conn.send(payload)
        except (OSError, ValueError):
            # Died while idle (killed from outside, OOM): no check of ours caused it, so replace it and retry.
            with self._lock:
                self._stats.crashes += 1
            logger.warning("reward worker %d was dead before its batch; replaced", lane.worker.process.pid)
            lane.worker = self._new_worker(lane.worker)
            self._start_lane(lane)
            return
        lane.sent = True
        lane.deadline = now + self.config.timeout_s

    def _drive(self, lanes: list[_Lane], outcomes: dict[int, _Outcome]) -> None:
        """Collect replies until every lane is done, killing workers whose current check passes its deadline."""
        while True:
            active = [lane for lane in lanes if lane.jobs]
            if not active:
                return
            wait_s = max(0.0, min(lane.deadline for lane in active) - time.monotonic())
            by_conn = {lane.worker.conn: lane for lane in active}
            for conn in wait_connections(list(by_conn), timeout=wait_s):
                self._on_message(by_conn[conn], outcomes)
            now = time.monotonic()
            for lane in active:
                if lane.jobs and now >= lane.deadline:
                    self._on_deadline(lane, outcomes)

    def _on_message(self, lane: _Lane, outcomes: dict[int, _Outcome]) -> None:
        try:
            message = lane.worker.conn.recv()
        except (EOFError, OSError):
            self._fail_current(lane, outcomes, crashed=True)
            return
        if message[0] == "ready":
            lane.worker.ready = True
            self._start_lane(lane)
            return
        if message[0] == "broken":
            self._startup_failed(lane, f"failed its self-check ({message[1]})")
        job_id, accuracy, gold_ok = message
        job = lane.jobs.popleft()
        if job.index != job_id:  # cannot happen with one lane per worker; refuse to mis-assign rewards if it does
            raise RewardWorkerError(f"reward worker replied for job {job_id}, expected {job.index}")
        outcomes[job.index] = _Outcome(accuracy)
        if not gold_ok:
            self._warn_gold(job.gold)
        lane.deadline = time.monotonic() + self.config.timeout_s

    def _on_deadline(self, lane: _Lane, outcomes: dict[int, _Outcome]) -> None:
        if not lane.worker.ready:
            self._startup_failed(lane, f"did not start within {self.config.startup_timeout_s:g} s")
        self._fail_current(lane, outcomes, crashed=False)

    def _startup_failed(self, lane: _Lane, what: str) -> None:
        """Infrastructure failure, not an answer's fault: raise rather than silently score zeros. The worker is
        replaced first, so the pool keeps its size and a later call tries again."""
        exitcode = lane.worker.process.exitcode
        lane.worker = self._new_worker(lane.worker)
        raise RewardWorkerError(f"a reward worker {what} (exit code {exitcode}); is math-verify installed?")

    def _fail_current(self, lane: _Lane, outcomes: dict[int, _Outcome], crashed: bool) -> None:
        """Score the check in progress 0.0, replace the worker, and hand it the rest of the lane."""
        if not lane.worker.ready:
            self._startup_failed(lane, "died while starting")
        job = lane.jobs.popleft()
        outcomes[job.index] = _Outcome(0.0, timed_out=True)
        with self._lock:
            if crashed:
                self._stats.crashes += 1
            else:
                self._stats.timeouts += 1
            counts = (self._stats.timeouts, self._stats.crashes)
        what = "died during" if crashed else f"ran past {self.config.timeout_s:g} s on"
        logger.warning(
            "reward worker %s a check (answer %r…); scored 0.0, worker replaced (%d timeouts, %d crashes so far)",
            what, job.answer[:80], *counts,
        )  # fmt: skip
        lane.worker = self._new_worker(lane.worker)
        lane.sent = False
        self._start_lane(lane)

    def _warn_gold(self, gold: str) -> None:
        with self._lock:
            if gold in self._warned_golds or len(self._warned_golds) > 1000:
                return
            self._warned_golds.add(gold)
        logger.warning("gold answer %r could not be parsed by math-verify; every completion scores 0 on it", gold[:200])


def _split(jobs: list[_Job], parts: int) -> Iterator[list[_Job]]:
    """Contiguous, near-equal chunks (one per worker)."""
    size, extra = divmod(len(jobs), parts)
    start = 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        yield jobs[start:end]
        start = end


# --------------------------------------------------------------------------------------------------------------------
# Module-level convenience: one shared scorer with the default config


_default: RewardScorer | None = None
_default_lock = threading.Lock()


def _default_scorer() -> RewardScorer:
    global _default
    with _default_lock:
        if _default is None:
            _default = RewardScorer()
            atexit.register(_default.close)
        return _default


def score_completions(
    completions: Sequence[str], golds: Sequence[str], config: RewardConfig | None = None
) -> list[RewardResult]:
    """One-off scoring: the shared default scorer, or a temporary one for a non-default `config`."""
    if config is None:
        return _default_scorer().score(completions, golds)
    with RewardScorer(config) as scorer:
        return scorer.score(completions, golds)


def accuracy_reward(completion: str, gold: str) -> float:
    """1.0 if the final answer of `completion` matches `gold` (shared default scorer), else 0.0."""
    return _default_scorer().score([completion], [gold])[0].accuracy
