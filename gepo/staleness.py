"""Staleness simulator: the learner's real training step fed with groups sampled from older policy versions.

A heterogeneous swarm hands the learner rollouts made with whatever weights each sampler last loaded. This module
reproduces that in one process, deterministically: at optimizer step t (the learner holds version t; version 0 is the
starting policy, version t the policy after t updates) each of the step's groups is given a lag k drawn from the
GEPO paper's delay model, is sampled from the kept copy of version t - k, tagged `policy_version = t - k`, scored by
the real `RewardScorer`, and the step is taken by the real `gepo.train_step.train_step`. Nothing here computes a
loss or a gradient.

Lags (`StalenessConfig.delay_kind`, bounds in versions):
  "none"                   lag 0 for every group: online training.
  "fixed"                  lag = delay_lower if given, else max_lag, for every group.
  "lognormal" / "weibull"  the paper's delay model (`gepo.delays.DelayModel`) in units of versions:
                           d = clip(T - delay_offset, delay_lower, delay_upper), T lognormal / Weibull with 99.5% of
                           its mass in [delay_lower, delay_upper]; lag = min(round(d), max_lag).
                           Defaults: delay_upper = max_lag, delay_lower = max_lag / 7, delay_offset = 0.
  max_lag = 0 means online whatever the kind.

How "maximum latency" maps to the paper. The paper's latency table (accuracy vs maximum latency 0/8/16/32/64 steps)
reports average lags 0/3.0/6.3/13.2/26.5, i.e. about 0.4 x the maximum. Its official learner waits while its step
minus the newest sampled step exceeds a window (max_diff_step) and its samplers reload weights after delays drawn
from the lognormal model; the realised lag is bounded by the window. Here the window is `max_lag` (lags are capped
at it) and the delay model is expressed directly in versions. The one free choice is the lower bound of the 99.5%
interval: with delay_lower = max_lag / 7 (offset 0) the lognormal model gives mean lags 3.2/6.4/12.8/25.6 for
max_lag 8/16/32/64 (medians 3/6/12/24), matching the paper's column to within ~0.4 versions. The seconds recipe
scaled to versions (lower = 60/1920 x max_lag, offset = 400/1920 x max_lag) would give means of only 0.4/0.9/2.4/4.7,
far from the paper's table, so it is not the default (`recipe_delay_bounds` gives it). Weibull with the same bounds
has more mass near the maximum (means 4.6/9.3/18.6/37.1): harder, as in the paper.

Realised vs drawn: a lag cannot reach before version 0, so at step t the realised lag is min(drawn, t); during the
first max_lag steps of a run lags are truncated (every sampler still holds the starting weights). Summaries report
both the drawn and the realised distribution.

Versions kept: the whole lag schedule is drawn up front from the seed, so the history knows exactly which versions
will ever be sampled from and until which step; it snapshots (CPU state dicts) only those and drops each after its
last use; a group of the current version is sampled from the learner's own weights. At most max_lag versions are
held (about 3.5 MB each for the 0.87M-parameter tiny policy, 270 MB for a 135M model in bf16).

A pretrained model (`policy_path` = any transformers causal-LM folder, e.g. SmolLM2-135M-Instruct): prompts go
through its chat template with `system_prompt`, `publish_dtype="bfloat16"` samples every group from the fp32 master
rounded to bf16 (what samplers receive; kept versions are stored in bf16, on disk with `snapshot_dir`),
`eval_scoring="reward"` judges its prose answers by the reward's last number, and `compute_dtype` runs the
learner's passes under autocast over the fp32 master (bf16 is ~6x slower than fp32 on CPUs without bf16 units).

Determinism: prompts, lags and sampling seeds derive from `seed` alone (sampling uses a private generator per
(step, version)); the same seed, code and torch thread count give the same metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from gepo.config import LOSS_TYPES, LossConfig
from gepo.data import DataConfig, format_prompt, load_prompts
from gepo.delays import DelayModel
from gepo.train_step import ScoredGroup, TrainStepConfig, train_step

logger = logging.getLogger(__name__)

__all__ = [
    "LAG_KINDS",
    "StalenessConfig",
    "PolicyHistory",
    "draw_lag_schedule",
    "realised_lags",
    "recipe_delay_bounds",
    "run_staleness",
    "summarize",
    "lag_histogram",
]

LAG_KINDS = ("none", "fixed", "lognormal", "weibull")
EVAL_OFFSET = 1200  # test problems 0..1199 were used by the tiny policy's warm start (200 to stop, 1000 held out)
DEFAULT_LOWER_FRACTION = 1.0 / 7.0  # delay_lower = max_lag / 7: matches the paper's avg-lag column (see above)


def recipe_delay_bounds(max_lag: int) -> tuple[float, float, float]:
    """(lower, upper, offset) of the Qwen3-1.7B recipe, [60 s, 1920 s] offset 400 s, scaled so upper = max_lag."""
    s = max_lag / 1920.0
    return 60.0 * s, float(max_lag), 400.0 * s


@dataclass
class StalenessConfig:
    """One simulated run: the loss, the staleness, the task, the optimizer and the evaluation."""

    # --- the loss (everything else of LossConfig through loss_overrides; its max_completion_length and temperature
    # are always taken from max_new_tokens and temperature below, so the learner matches the sampler)
    loss_type: str = "gepo"
    loss_overrides: dict = field(default_factory=dict)

    # --- staleness, in policy versions (one version per optimizer step)
    max_lag: int = 0
    """Maximum lag (the paper's "maximum latency"): no group is older than current - max_lag. 0 = online."""
    delay_kind: str = "lognormal"
    """none | fixed | lognormal | weibull (see the module docstring)."""
    delay_lower: float | None = None
    """Lower bound of the delay model's 99.5% interval (lognormal/weibull; default max_lag / 7), or the fixed lag
    (fixed; default max_lag)."""
    delay_upper: float | None = None
    """Upper bound of the 99.5% interval and clip (default max_lag)."""
    delay_offset: float = 0.0
    """Subtracted from T before clipping (the paper's 400 s; 0 by default in version units)."""

    # --- batch and optimisation
    steps: int = 150
    groups_per_step: int = 8
    group_size: int = 8
    groups_per_batch: int = 2
    """Groups made by one sampler with one version (a sampler's batch); one lag is drawn per batch. The paper's
    learner takes 4 sampler batches (of 8 prompts) per step; 8 groups per step in batches of 2 keep those 4 batches.
    1 = an independent lag per group."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    micro_batch_rows: int = 64

    # --- sampling (the samplers' and the learner's temperature; max_new_tokens is the loss's M)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8

    # --- task and policy
    difficulty: int = 2
    """Synthetic arithmetic difficulty (the shipped tiny policy is warm-started on 2)."""
    phrasing: str = "expression"
    """Synthetic task phrasing: "expression" ("What is 3 + 5?") or "word" (short word problems; gepo.data)."""
    policy_path: str | None = None
    """A model folder: a tiny policy or any transformers causal LM (e.g. models/smollm2-135m-instruct, see
    docs/SMOLLM2.md); None = the shipped gepo/assets/tiny-policy/."""
    system_prompt: str | None = None
    """The system turn of a chat model's prompts (gepo.data.format_prompt), for sampling and evaluation alike."""
    train_size: int = 100_000

    # --- precision (the real-model learner's: fp32 master weights, samplers hold the published copy)
    publish_dtype: str = "float32"
    """The dtype versions are published in. "bfloat16": every group, the current version's included, is sampled
    from the master weights rounded to bf16, as samplers receive them; the learner's log-probs stay its own."""
    compute_dtype: str = "float32"
    """The learner's forward/backward dtype over its fp32 master weights (gepo.precision.Precision, autocast)."""

    # --- evaluation
    eval_every: int = 25
    eval_size: int = 400
    """Greedy held-out accuracy on the first eval_size problems of split "test" (the same set for every run)."""
    eval_scoring: str = "first_integer"
    """How a greedy answer is judged: "first_integer" (the first integer of the text: the tiny policy's answers are
    bare numbers) or "reward" (the run's RewardScorer accuracy: the last number through math-verify, which a chat
    model's prose answers need)."""
    eval_batch_size: int = 0
    """Problems per greedy generation batch; 0 = all at once (fine for the tiny policy, too much memory for a
    135M model's 200 problems)."""
    collapse_fraction: float = 0.5
    """A run has collapsed when its last evaluation is below this fraction of the starting accuracy, or a step's loss
    or gradient was not finite; it "dipped" when any evaluation fell below it (it may have recovered)."""

    seed: int = 0
    reward_workers: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.delay_kind not in LAG_KINDS:
            raise ValueError(f"delay_kind must be one of {LAG_KINDS}, got {self.delay_kind!r}")
        for name in ("max_lag", "steps", "groups_per_step", "group_size", "groups_per_batch", "eval_every", "eval_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_lag" else 1):
                raise ValueError(f"StalenessConfig.{name} must be an int >= {0 if name == 'max_lag' else 1}, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.collapse_fraction <= 1:
            raise ValueError(f"collapse_fraction must be in [0, 1], got {self.collapse_fraction}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"StalenessConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        batch = self.eval_batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ValueError(f"StalenessConfig.eval_batch_size must be an int >= 0, got {self.eval_batch_size!r}")
        for key in ("loss_type", "max_completion_length", "temperature"):
            if key in self.loss_overrides:
                raise ValueError(f"loss_overrides may not set {key!r}: it is taken from the simulator's own fields")
        self.loss_config()  # validate the overrides now
        self.delay_model()  # and the delay bounds

    # ---- derived objects

    def loss_config(self) -> LossConfig:
        return LossConfig(
            loss_type=self.loss_type,
            max_completion_length=self.max_new_tokens,
            temperature=self.temperature,
            **self.loss_overrides,
        )

    def train_step_config(self) -> TrainStepConfig:
        return TrainStepConfig(
            loss=self.loss_config(),
            micro_batch_rows=self.micro_batch_rows,
            max_grad_norm=self.max_grad_norm,
            shuffle_seed=self.seed,
        )

    def delay_model(self) -> DelayModel:
        """The delay model in versions (before rounding and the cap at max_lag)."""
        if self.max_lag == 0 or self.delay_kind == "none":
            return DelayModel("none")
        if self.delay_kind == "fixed":
            lag = self.max_lag if self.delay_lower is None else self.delay_lower
            return DelayModel("fixed", lower=float(lag))
        upper = float(self.max_lag if self.delay_upper is None else self.delay_upper)
        lower = float(upper * DEFAULT_LOWER_FRACTION if self.delay_lower is None else self.delay_lower)
        return DelayModel(self.delay_kind, lower=lower, upper=upper, offset=float(self.delay_offset))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StalenessConfig:
        return cls(**d)

    def fingerprint(self) -> str:
        """A short hash of everything that determines the run (for result files and resume). Fields added after the
        first sweeps count only when set away from their default, so earlier result files keep their names."""
        d = self.to_dict()
        defaults = {f.name: f.default for f in fields(self)}
        for name in _ADDED_LATER:
            if d[name] == defaults[name]:
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def published_dtype(self) -> torch.dtype:
        return getattr(torch, self.publish_dtype)


_CHOICES = {
    "phrasing": ("expression", "word"),
    "publish_dtype": ("float32", "bfloat16", "float16"),
    "compute_dtype": ("float32", "bfloat16", "float16"),
    "eval_scoring": ("first_integer", "reward"),
}
# StalenessConfig fields that did not exist when the first sweeps were recorded (see `fingerprint`)
_ADDED_LATER = ("phrasing", "system_prompt", "publish_dtype", "compute_dtype", "eval_scoring", "eval_batch_size")


# --------------------------------------------------------------------------------------------------------------------
# lags


def _rng(seed: int, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"gepo-staleness:{purpose}:{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def draw_lag_schedule(cfg: StalenessConfig) -> np.ndarray:
    """(steps, groups_per_step) int lags as drawn: round(delay) capped at max_lag (not yet capped at the step).

    One draw per sampler batch (groups_per_batch consecutive groups of a step share it; a last, smaller batch when
    groups_per_step is not a multiple)."""
    model = cfg.delay_model()
    batches = -(-cfg.groups_per_step // cfg.groups_per_batch)
    d = np.asarray(model.sample(_rng(cfg.seed, "lags"), cfg.steps * batches), dtype=np.float64)
    lags = np.minimum(np.rint(d), cfg.max_lag).astype(np.int64).reshape(cfg.steps, batches)
    return np.repeat(lags, cfg.groups_per_batch, axis=1)[:, : cfg.groups_per_step]


def realised_lags(drawn: np.ndarray) -> np.ndarray:
    """Lags as realised: at step t no group can be older than version 0, so lag = min(drawn, t)."""
    steps = np.arange(drawn.shape[0])[:, None]
    return np.minimum(drawn, steps)


def lag_histogram(lags: Sequence[int] | np.ndarray, max_lag: int) -> list[int]:
    """Counts of lag 0..max_lag."""
    return np.bincount(np.asarray(lags, dtype=np.int64).ravel(), minlength=max_lag + 1)[: max_lag + 1].tolist()


# --------------------------------------------------------------------------------------------------------------------
# policy-version history


class PolicyHistory:
    """CPU snapshots of the policy versions that will still be sampled from.

    `last_use` maps each version that will ever be needed to the last step that samples from it (from the pre-drawn
    lag schedule); `record` keeps a version only if it is in that map, and `release(step)` drops every version whose
    last use is before `step`. Without a schedule (`last_use=None`) it keeps a sliding window of `window` versions.

    dtype: snapshots are stored rounded to it (the published dtype: bf16 halves the memory of a kept version, and
    is exactly what a sampler would hold); None keeps each tensor's own dtype. spill_dir: snapshots are written
    there (one file per version, deleted on release) instead of kept in memory, for models whose kept versions do
    not fit in RAM (SmolLM2 in bf16: 270 MB per version, up to max_lag + 1 of them).
    """

    def __init__(self, last_use: dict[int, int] | None = None, window: int | None = None, *,
                 dtype: torch.dtype | None = None, spill_dir: str | Path | None = None) -> None:  # fmt: skip
        if last_use is None and window is None:
            raise ValueError("give last_use (a lag schedule) or a window")
        self._last_use = last_use
        self._window = window
        self._dtype = dtype
        self._spill = Path(spill_dir) if spill_dir is not None else None
        if self._spill is not None:
            self._spill.mkdir(parents=True, exist_ok=True)
        self._snapshots: dict[int, dict[str, torch.Tensor] | Path] = {}
        self.peak = 0

    @classmethod
    def from_schedule(cls, versions: np.ndarray, **kwargs: Any) -> PolicyHistory:
        """versions: (steps, groups) version sampled by each group at each step. A group of step t with version t is
        sampled from the live model, so only versions used at a later step than their own are kept."""
        last_use: dict[int, int] = {}
        for step, row in enumerate(versions):
            for v in row:
                if int(v) < step:
                    last_use[int(v)] = step  # steps ascend: the last write is the last use
        return cls(last_use=last_use, **kwargs)

    def needed(self, version: int) -> bool:
        return self._last_use is None or version in self._last_use

    def record(self, version: int, model: torch.nn.Module) -> None:
        if not self.needed(version):
            return
        snapshot = snapshot_state(model, self._dtype)
        if self._spill is not None:
            path = self._spill / f"version-{version}.pt"
            torch.save(snapshot, path)
            self._snapshots[version] = path
        else:
            self._snapshots[version] = snapshot
        if self._window is not None:
            for old in [v for v in self._snapshots if v <= version - self._window]:
                self._drop(old)
        self.peak = max(self.peak, len(self._snapshots))

    def get(self, version: int) -> dict[str, torch.Tensor]:
        try:
            kept = self._snapshots[version]
        except KeyError:
            raise KeyError(f"policy version {version} is not kept (kept: {sorted(self._snapshots)})") from None
        return torch.load(kept, weights_only=True, mmap=True) if isinstance(kept, Path) else kept

    def release(self, step: int) -> None:
        """Drop the versions no step >= `step` will sample from."""
        if self._last_use is None:
            return
        for v in [v for v in self._snapshots if self._last_use.get(v, -1) < step]:
            self._drop(v)

    def close(self) -> None:
        """Drop every snapshot (and its file)."""
        for v in list(self._snapshots):
            self._drop(v)

    def _drop(self, version: int) -> None:
        kept = self._snapshots.pop(version)
        if isinstance(kept, Path):
            kept.unlink(missing_ok=True)

    @property
    def versions(self) -> list[int]:
        return sorted(self._snapshots)

    def __len__(self) -> int:
        return len(self._snapshots)


def snapshot_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict, floating-point tensors rounded to `dtype` when given. Tied tensors (one
    tensor under two names, e.g. SmolLM2's embedding and output layer) stay one tensor."""
    copies: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in copies:
            t = tensor.detach()
            to = dtype if dtype is not None and t.is_floating_point() else t.dtype
            copies[key] = t.to("cpu", dtype=to, copy=True)
        out[name] = copies[key]
    return out


# --------------------------------------------------------------------------------------------------------------------
# the simulation


def _sampling_seed(seed: int, step: int, version: int) -> int:
    digest = hashlib.sha256(f"gepo-staleness:sample:{seed}:{step}:{version}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _p95(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.percentile(finite, 95)) if finite else float("nan")


def run_staleness(
    cfg: StalenessConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    scorer: Any = None,
    progress: Callable[[dict], None] | None = None,
    on_step: Callable[[int, list[ScoredGroup], PolicyHistory], None] | None = None,
    snapshot_dir: str | Path | None = None,
) -> dict:
    """Run one simulated training run and return {"config", "steps", "evals", "summary"} (JSON-serialisable).

    model/tokenizer: the starting policy (default: `load_tiny_policy(cfg.policy_path)`); the model is trained in
    place. scorer: a `RewardScorer` to use (default: a new one, closed at the end). progress: called with each
    evaluation record ({"step", "accuracy", ...}) as it happens. on_step: called as on_step(t, groups, history)
    with each step's scored groups just before `train_step` (for inspection and tests; it must not modify them).
    snapshot_dir: keep the policy versions still to be sampled from as files there rather than in memory
    (`PolicyHistory`'s spill_dir; it does not change the results).

    steps[i]: the train_step metrics of step i plus "lags" and "versions" (one per group) and "reward_mean".
    evals: [{"step", "accuracy"}] on split "test" problems EVAL_OFFSET.. (never seen by the warm start), at step 0, every eval_every steps and after the last step.
    """
    from gepo.precision import Precision
    from gepo.rewards import RewardConfig, RewardScorer
    from gepo.sampling import SamplingParams, evaluate_accuracy, generate_groups, greedy_completions

    t_start = time.perf_counter()
    if model is None or tokenizer is None:
        from gepo.tiny_policy import load_tiny_policy

        model, tokenizer = load_tiny_policy(cfg.policy_path)  # any transformers causal-LM folder
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    own_scorer = scorer is None
    if own_scorer:
        # a generous start-up limit: sweeps run niced on loaded machines, where importing math-verify in a fresh
        # process can take over a minute (the default 60 s then fails the whole cell)
        scorer = RewardScorer(RewardConfig(num_workers=cfg.reward_workers, startup_timeout_s=600.0))

    # prompts: the train stream is drawn by the run's seed; the eval set is fixed (the same for every run)
    task = DataConfig(source="synthetic", difficulty=cfg.difficulty, phrasing=cfg.phrasing)
    train_set = load_prompts(dataclasses.replace(task, split="train", size=cfg.train_size))
    # skip the test problems the tiny policy's warm start looked at (its stopping rule and its held-out check)
    test_set = load_prompts(dataclasses.replace(task, split="test", size=EVAL_OFFSET + cfg.eval_size))
    eval_problems = [_EvalProblem(test_set[i].question, int(test_set[i].answer)) for i in range(EVAL_OFFSET, len(test_set))]
    prompt_index = _rng(cfg.seed, "prompts").integers(0, len(train_set), size=(cfg.steps, cfg.groups_per_step))

    drawn = draw_lag_schedule(cfg)
    lags = realised_lags(drawn)
    versions = np.arange(cfg.steps)[:, None] - lags
    published = cfg.publish_dtype != "float32"
    history = PolicyHistory.from_schedule(versions, dtype=cfg.published_dtype() if published else None,
                                          spill_dir=snapshot_dir)  # fmt: skip
    precision = Precision.for_device("cpu", getattr(torch, cfg.compute_dtype))

    tcfg = cfg.train_step_config()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    # the sampling copy: for stale versions, and for every version when samplers hold a rounded copy
    sampler = copy.deepcopy(model) if published or (cfg.max_lag > 0 and cfg.delay_kind != "none") else None
    if sampler is not None:
        sampler.eval()
        for p in sampler.parameters():
            p.requires_grad_(False)
    pad_id = tokenizer.pad_token_id
    prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(question: str) -> list[int]:
        ids = prompt_cache.get(question)
        if ids is None:
            ids = prompt_cache[question] = format_prompt(tokenizer, question, cfg.system_prompt)
        return ids

    evals: list[dict] = []

    def evaluate(step: int) -> None:
        batch = cfg.eval_batch_size or len(eval_problems)
        if cfg.eval_scoring == "reward":
            texts = greedy_completions(model, tokenizer, [p.question for p in eval_problems], batch_size=batch,
                                       max_new_tokens=cfg.max_new_tokens, system_prompt=cfg.system_prompt)
            results = scorer.score(texts, [str(p.answer) for p in eval_problems])
            acc = float(np.mean([r.accuracy for r in results]))
        else:
            acc = evaluate_accuracy(model, tokenizer, eval_problems, batch_size=batch,
                                    max_new_tokens=cfg.max_new_tokens)  # fmt: skip
        record = {"step": step, "accuracy": acc, "elapsed_s": round(time.perf_counter() - t_start, 2)}
        evals.append(record)
        if progress is not None:
            progress(record)

    steps: list[dict] = []
    try:
        history.record(0, model)
        evaluate(0)
        for t in range(cfg.steps):
            examples = [train_set[int(i)] for i in prompt_index[t]]
            step_versions = [int(v) for v in versions[t]]
            groups: list[ScoredGroup | None] = [None] * cfg.groups_per_step
            t_sample = time.perf_counter()
            for v in sorted(set(step_versions)):
                members = [g for g, gv in enumerate(step_versions) if gv == v]
                if v == t and published:
                    sampler.load_state_dict(snapshot_state(model, cfg.published_dtype()))
                    policy = sampler  # the current version as samplers receive it
                elif v == t:
                    policy = model  # the current version: sample from the learner's own weights
                else:
                    sampler.load_state_dict(history.get(v))
                    policy = sampler
                params = SamplingParams(
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=cfg.top_k,
                    max_new_tokens=cfg.max_new_tokens,
                    n=cfg.group_size,
                    seed=_sampling_seed(cfg.seed, t, v),
                )
                generated = generate_groups(
                    policy, [prompt_ids(examples[g].question) for g in members], params, eos=tokenizer, pad_token_id=pad_id
                )
                for g, gen in zip(members, generated):
                    groups[g] = (gen, v)  # type: ignore[assignment]
            sample_s = time.perf_counter() - t_sample
            # score every completion of the step in one call
            texts, golds = [], []
            for g, (gen, _) in enumerate(groups):  # type: ignore[misc]
                texts += [tokenizer.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
                golds += [examples[g].answer] * gen.size
            results = scorer.score(texts, golds)
            scored, k = [], 0
            for gen, v in groups:  # type: ignore[misc]
                rewards = [r.total for r in results[k : k + gen.size]]
                k += gen.size
                scored.append(ScoredGroup(gen.prompt_ids, gen.completion_ids, gen.logprobs, rewards, policy_version=v))
            if on_step is not None:
                on_step(t, scored, history)
            try:
                metrics = train_step(model, optimizer, scored, tcfg, pad_token_id=pad_id, current_version=t, step_index=t,
                                     precision=precision)  # fmt: skip
            except ValueError as e:  # compute_loss refuses a non-finite loss: the update is skipped
                optimizer.zero_grad(set_to_none=True)
                metrics = {"error": str(e)[:300], "skipped_nonfinite": 1.0, "grad_norm": float("nan"),
                           "reward_mean": float(np.mean([r.total for r in results]))}  # fmt: skip
            metrics.update(
                step=t,
                lags=[int(x) for x in lags[t]],
                drawn_lags=[int(x) for x in drawn[t]],
                versions=[g.policy_version for g in scored],
                sample_s=round(sample_s, 4),
            )
            steps.append(metrics)
            history.release(t + 1)
            history.record(t + 1, model)  # the policy after this update is version t + 1
            if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
                evaluate(t + 1)
    finally:
        history.close()
        if own_scorer:
            scorer.close()

    result = {"config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "steps": steps, "evals": evals}
    result["summary"] = summarize(result, drawn=drawn, history_peak=history.peak,
                                  wall_s=time.perf_counter() - t_start)  # fmt: skip
    return result


@dataclass(frozen=True)
class _EvalProblem:
    question: str
    answer: int


def summarize(result: dict, *, drawn: np.ndarray | None = None, history_peak: int | None = None,
              wall_s: float | None = None) -> dict:  # fmt: skip
    """Per-run numbers the sweep reports: accuracies, lags, weight variance, grad-norm p95, collapse."""
    cfg = StalenessConfig.from_dict(result["config"])
    steps, evals = result["steps"], result["evals"]
    accs = [e["accuracy"] for e in evals]
    initial, best, last = accs[0], max(accs), accs[-1]
    all_lags = [x for s in steps for x in s["lags"]]
    threshold = cfg.collapse_fraction * initial
    nonfinite = [s["step"] for s in steps if s.get("skipped_nonfinite", 0.0) > 0]
    dip_evals = [e["step"] for e in evals if e["accuracy"] < threshold]
    collapsed = bool(nonfinite) or last < threshold
    collapse_step = None
    if collapsed:  # the first non-finite step, or the first evaluation of the final run below the threshold
        tail = len(evals)
        while tail > 0 and evals[tail - 1]["accuracy"] < threshold:
            tail -= 1
        candidates = nonfinite[:1] + ([evals[tail]["step"]] if tail < len(evals) else [])
        collapse_step = min(candidates)
    iw_var = [s["iw_var"] for s in steps if "iw_var" in s and math.isfinite(s["iw_var"])]
    summary = {
        "initial_accuracy": initial,
        "best_accuracy": best,
        "best_step": evals[accs.index(best)]["step"],
        "last_accuracy": last,
        "best_last_gap": best - last,
        "lag_mean": float(np.mean(all_lags)) if all_lags else 0.0,
        "lag_max": int(max(all_lags)) if all_lags else 0,
        "lag_hist": lag_histogram(all_lags, cfg.max_lag),
        "iw_var_mean": float(np.mean(iw_var)) if iw_var else float("nan"),
        "iw_var_p95": _p95(iw_var),
        "grad_norm_p95": _p95([s["grad_norm"] for s in steps]),
        "grad_norm_mean": float(np.nanmean([s["grad_norm"] for s in steps])) if steps else float("nan"),
        "reward_first10": float(np.mean([s["reward_mean"] for s in steps[:10]])) if steps else float("nan"),
        "reward_last10": float(np.mean([s["reward_mean"] for s in steps[-10:]])) if steps else float("nan"),
        "clip_frac_mean": float(np.mean([s.get("clip_frac_low", 0) + s.get("clip_frac_high", 0) for s in steps]))
        if steps
        else 0.0,
        "mask_frac_mean": float(np.mean([s.get("mask_frac", 0.0) for s in steps])) if steps else 0.0,
        "nonfinite_steps": len(nonfinite),
        "collapsed": collapsed,
        "collapse_step": collapse_step,
        "dipped": bool(dip_evals),
        "min_accuracy": min(accs),
    }
    if drawn is not None:
        summary["drawn_lag_mean"] = float(drawn.mean())
        summary["drawn_lag_max"] = int(drawn.max())
        summary["drawn_lag_hist"] = lag_histogram(drawn, cfg.max_lag)
    if history_peak is not None:
        summary["versions_kept_peak"] = history_peak
    if wall_s is not None:
        summary["wall_s"] = round(wall_s, 2)
    return summary


def save_result(result: dict, path: str | Path) -> None:
    """Write a run's result as JSON atomically (a finished cell is either complete on disk or absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, allow_nan=True) + "\n")
    tmp.replace(path)
