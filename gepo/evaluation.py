"""Held-out evaluation on any prompt data: which problems, and greedy pass@1 / sampled mean@k on them.

Which problems (`held_out_split`):
  --eval-dataset SOURCE   a separate set (file or hub id), read with the training set's field options
                          (question/answer fields, answer format) from its split --eval-split.
  --eval-fraction F       the last ceil(F x N) problems of the training set (file order, after --data-max-examples);
                          training then uses only the first N - ceil(F x N). The tail rather than a hash-chosen
                          subset because then the training set is again "the first n problems": for the synthetic
                          task that is one parameter (max_examples) that samplers receive in run.json, so learner
                          and samplers keep agreeing on prompt i without shipping an index list. Shuffle a file that
                          is sorted (by difficulty, say) before using it.
  neither                 the synthetic task's own test split (as before); no evaluation for other data.
At most `eval_size` problems are evaluated (the first ones of the held-out set).

What is measured (`evaluate`), scored by the learner's own RewardRunner (all its reward functions):
  eval_accuracy (= eval_pass@1)  mean built-in accuracy of one greedy completion per problem
  eval_reward                    mean total reward of the greedy completions
  eval_mean@k / eval_reward_mean@k  mean accuracy / total reward over k sampled completions per problem, at the run's
                                 sampling temperature, top-p and top-k (only when k > 0)
  eval_rewards                   per reward function, the mean over the greedy completions
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from gepo.data import DataConfig, DataError, PromptExample, PromptSet, format_prompt, load_prompts

__all__ = ["PromptSlice", "held_out_split", "evaluate"]


class PromptSlice(PromptSet):
    """Examples start..stop-1 of another PromptSet, re-indexed from 0."""

    def __init__(self, base: PromptSet, start: int, stop: int, label: str) -> None:
        if not 0 <= start < stop <= len(base):
            raise DataError(f"{base.name}: empty or invalid slice [{start}:{stop}]")
        self._base, self._start, self._len = base, start, stop - start
        self.name = f"{base.name} {label}"

    def __len__(self) -> int:
        return self._len

    def _get(self, index: int) -> PromptExample:
        return dataclasses.replace(self._base[self._start + index], index=index)


def held_out_split(data: DataConfig, prompts: PromptSet, *, eval_dataset: str | None = None,
                   eval_split: str = "test", eval_fraction: float = 0.0, eval_size: int = 200
                   ) -> tuple[DataConfig, PromptSet, PromptSet | None]:
    """(training config, training prompts, held-out prompts or None) for the options in the module docstring.

    The training config is what samplers are told (run.json): with --eval-fraction its max_examples shrinks to the
    training slice, so `QuestionSet.of(config, prompts)` describes exactly the prompts the learner trains on."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if eval_dataset and eval_fraction:
        raise DataError("give --eval-dataset or --eval-fraction, not both")
    if eval_size < 1:
        raise DataError(f"--eval-size must be at least 1, got {eval_size}")
    if eval_dataset:
        eval_cfg = dataclasses.replace(data, source=eval_dataset, split=eval_split, max_examples=eval_size)
        return data, prompts, load_prompts(eval_cfg)
    if eval_fraction:
        n = len(prompts)
        held = math.ceil(eval_fraction * n)
        if held >= n:
            raise DataError(f"--eval-fraction {eval_fraction} of {n} problems leaves none to train on")
        train_cfg = dataclasses.replace(data, max_examples=n - held)
        held_out = PromptSlice(prompts, n - held, min(n, n - held + eval_size), f"held out [{n - held}:]")
        # Synthetic prompts are generated, so their first n - held are the set with max_examples = n - held:
        # loaded that way, samplers are told its parameters (run.json stays small) instead of every question.
        train = (load_prompts(train_cfg) if data.source == "synthetic"
                 else PromptSlice(prompts, 0, n - held, f"[:{n - held}]"))
        return train_cfg, train, held_out
    if data.source == "synthetic":
        return data, prompts, load_prompts(dataclasses.replace(data, split="test", max_examples=eval_size))
    return data, prompts, None


def evaluate(model: Any, tokenizer: Any, prompts: PromptSet, rewards: Any, *, max_new_tokens: int,
             system_prompt: str | None = None, k: int = 0, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Greedy pass@1 (and sampled mean@k when k > 0) on `prompts`, scored by `rewards` (a RewardRunner)."""
    from gepo.sampling import SamplingParams, generate_groups, greedy_completions

    examples = list(prompts)
    texts = greedy_completions(model, tokenizer, [ex.question for ex in examples], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, system_prompt=system_prompt)
    greedy = rewards.score(examples, texts, record=False)
    accuracy = _mean(greedy.accuracy)
    out: dict[str, Any] = {
        "eval_accuracy": accuracy,
        "eval_pass@1": accuracy,
        "eval_reward": _mean(greedy.totals),
        "eval_rewards": {name: _mean([v for v in values if v is not None]) for name, values in
                         greedy.per_function.items()},
        "eval_size": len(examples),
    }
    if k > 0:
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                n=k, seed=seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        accuracies: list[float] = []
        totals: list[float] = []
        for start in range(0, len(examples), max(1, batch_size // k)):
            chunk = examples[start : start + max(1, batch_size // k)]
            ids = [format_prompt(tokenizer, ex.question, system_prompt) for ex in chunk]
            groups = generate_groups(model, ids, params, eos=tokenizer, pad_token_id=pad_id)
            rows: list[PromptExample] = []
            completions: list[str] = []
            for ex, group in zip(chunk, groups):
                rows += [ex] * len(group.completion_ids)
                completions += [tokenizer.decode(list(c), skip_special_tokens=True) for c in group.completion_ids]
            scored = rewards.score(rows, completions, record=False)
            accuracies += scored.accuracy
            totals += scored.totals
        out[f"eval_mean@{k}"] = _mean(accuracies)
        out[f"eval_reward_mean@{k}"] = _mean(totals)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
