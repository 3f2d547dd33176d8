"""What a valid rollout group is: the one definition that intake (protocol/validate.py) and the trainer
(gepo/train_step.py's ScoredGroup, gepo/objectives.py) both apply, so that what intake accepts the trainer accepts.

A group is valid when
  - it has a non-empty prompt and at least one completion, every completion with >= 1 token;
  - every completion has exactly one log-prob per token;
  - every token id lies in [0, vocab_size) (when the vocabulary is known) and no completion is longer than
    max_completion_tokens (when given);
  - every log-prob is finite and <= LOGPROB_SLACK.

numpy only (no torch): the protocol layer imports it, and so does gepo.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import ProtocolError, Reason

__all__ = ["LOGPROB_SLACK", "group_problem", "check_group"]

#: Largest sampler log-prob accepted. Exactly 0 is legitimate (a certain token); the slack absorbs rounding in an
#: inference engine's log-softmax (vLLM and bf16 kernels report up to a few 1e-5 above 0).
LOGPROB_SLACK = 1e-4


def group_problem(
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    *,
    vocab_size: Optional[int] = None,
    max_completion_tokens: Optional[int] = None,
) -> Optional[tuple[Reason, str]]:
    """None for a valid group, else (reason, one-line detail) for the first rule it breaks."""
    if len(prompt_ids) == 0:
        return Reason.SHAPE_MISMATCH, "empty prompt"
    if len(completions) == 0:
        return Reason.SHAPE_MISMATCH, "a group needs at least one completion"
    if len(logprobs) != len(completions):
        return Reason.SHAPE_MISMATCH, f"{len(completions)} completions but {len(logprobs)} log-prob rows"
    for i, (ids, lps) in enumerate(zip(completions, logprobs)):
        if len(ids) == 0:
            return Reason.SHAPE_MISMATCH, f"completion {i} is empty"
        if len(ids) != len(lps):
            return Reason.SHAPE_MISMATCH, f"completion {i} has {len(ids)} tokens but {len(lps)} log-probs"
        if max_completion_tokens is not None and len(ids) > max_completion_tokens:
            return Reason.OVERSIZE, f"completion {i} has {len(ids)} tokens > {max_completion_tokens}"
    if vocab_size is not None:
        for name, ids in (("prompt", prompt_ids), *((f"completion {i}", c) for i, c in enumerate(completions))):
            arr = np.asarray(ids, dtype=np.int64)
            if arr.min() < 0 or arr.max() >= vocab_size:
                return Reason.TOKEN_OUT_OF_VOCAB, f"{name} has a token id outside [0, {vocab_size})"
    for i, lps in enumerate(logprobs):
        arr = np.asarray(lps, dtype=np.float64)
        lo, hi = arr.min(), arr.max()  # NaN propagates and fails both comparisons
        if not (lo > -np.inf and hi <= LOGPROB_SLACK):
            return Reason.BAD_LOGPROBS, (f"completion {i}: log-probs must be finite and <= {LOGPROB_SLACK:g} "
                                         f"(got min {lo:.4g}, max {hi:.4g})")
    return None


def check_group(*args, **kwargs) -> None:
    """`group_problem`, raising ProtocolError(reason, detail) when the group is invalid."""
    problem = group_problem(*args, **kwargs)
    if problem is not None:
        raise ProtocolError(*problem)
