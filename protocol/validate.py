"""Learner-side validation of incoming rollout groups, with rejection counts by reason.

::

    validator = RolloutValidator(
        ValidatorConfig(run_id="run-1", vocab_size=49152, max_staleness=8, group_size=8),
        current_version=lambda: learner.policy_version,
        prompt_check=PromptTable(dataset_prompt_token_ids),
    )
    try:
        group = validator.validate(message_bytes)      # authenticated, checked, replay-protected
    except ProtocolError as e:
        log.info("rejected rollout: %s", e)            # validator.rejections[e.reason] was incremented

``validate`` is thread-safe. It never raises anything but :class:`ProtocolError` for hostile input; exceptions from
the caller's own callbacks (other than ``LookupError`` from ``prompt_check``) propagate.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict
from typing import Callable, Collection, Dict, Optional, Sequence


from .errors import ProtocolError, Reason
from .group_rules import check_group
from .identity import short_key
from .rollout import Limits, RolloutGroup, decode_group, prompt_hash, read_sender

__all__ = ["ValidatorConfig", "RolloutValidator", "ReplayWindow", "PromptTable"]


@dataclasses.dataclass
class ValidatorConfig:
    run_id: str
    vocab_size: int
    max_prompt_tokens: int = 8192
    max_completion_tokens: int = 8192  # per completion
    max_group_size: int = 256
    #: if set, every group must have exactly this many completions (GEPO's G)
    group_size: Optional[int] = None
    #: accept ``current - max_staleness <= policy_version <= current``; None accepts any past version
    max_staleness: Optional[int] = None
    #: if set, only these 32-byte sampler keys are accepted (checked before paying for signature verification)
    allowed_samplers: Optional[Collection[bytes]] = None
    #: per-sampler anti-replay window (sequence numbers); older ones are rejected as REPLAY
    replay_window: int = 4096
    #: replay state is kept for at most this many samplers (least recently seen evicted)
    max_tracked_samplers: int = 65536
    max_header_bytes: int = 16 << 10

    def limits(self) -> Limits:
        worst = 112 + self.max_header_bytes + 4 * (
            self.max_prompt_tokens + self.max_group_size * (1 + 2 * self.max_completion_tokens)
        )
        return Limits(
            max_message_bytes=worst,
            max_header_bytes=self.max_header_bytes,
            max_group_size=self.max_group_size,
            max_prompt_tokens=self.max_prompt_tokens,
            max_completion_tokens=self.max_completion_tokens,
        )


class ReplayWindow:
    """Bounded per-sampler anti-replay state (the IPsec/DTLS sliding window).

    For each sampler: the highest accepted sequence number and a ``window``-bit mask of which of the ``window``
    numbers below it were accepted. Sequence numbers may arrive out of order within the window; anything older
    than ``highest - window`` is rejected. Memory: O(window bits) per sampler, at most ``max_samplers`` samplers
    (least recently active evicted; an evicted sampler's state restarts empty, so its old messages could be
    replayed once - bound that with ``max_staleness`` or an allow-list no larger than ``max_samplers``).
    """

    def __init__(self, window: int = 4096, max_samplers: int = 65536):
        if window < 1 or max_samplers < 1:
            raise ValueError("window and max_samplers must be >= 1")
        self.window = window
        self.max_samplers = max_samplers
        self._state: "OrderedDict[bytes, list]" = OrderedDict()
        self._full = (1 << window) - 1
        self.evicted = 0

    def check(self, sampler: bytes, seq: int) -> None:
        """Raise ProtocolError(REPLAY) if (sampler, seq) was seen or is too old; does not record it."""
        st = self._state.get(sampler)
        if st is None:
            return
        highest, mask = st
        if seq > highest:
            return
        d = highest - seq
        if d >= self.window:
            raise ProtocolError(Reason.REPLAY, f"seq {seq} is older than the replay window (highest {highest})")
        if mask >> d & 1:
            raise ProtocolError(Reason.REPLAY, f"duplicate seq {seq} from {short_key(sampler)}")

    def record(self, sampler: bytes, seq: int) -> None:
        """Check and mark (sampler, seq) as seen."""
        self.check(sampler, seq)
        st = self._state.get(sampler)
        if st is None:
            if len(self._state) >= self.max_samplers:
                self._state.popitem(last=False)
                self.evicted += 1
            self._state[sampler] = [seq, 1]
            return
        self._state.move_to_end(sampler)
        highest, mask = st
        if seq > highest:
            shift = seq - highest
            st[1] = ((mask << shift) | 1) & self._full if shift < self.window else 1
            st[0] = seq
        else:
            st[1] = mask | (1 << (highest - seq))

    def __len__(self) -> int:
        return len(self._state)


class PromptTable:
    """``prompt_check`` callback built from the learner's dataset: prompt index -> SHA-256 of its token ids."""

    def __init__(self, prompts: Optional[Sequence[Sequence[int]]] = None, *, hashes: Optional[Sequence[bytes]] = None):
        if (prompts is None) == (hashes is None):
            raise ValueError("give either prompts or hashes")
        self.hashes = list(hashes) if hashes is not None else [prompt_hash(p) for p in prompts]

    def __call__(self, prompt_index: int, p_hash: bytes) -> bool:
        return 0 <= prompt_index < len(self.hashes) and self.hashes[prompt_index] == p_hash


class RolloutValidator:
    """Authenticates, decodes and checks rollout groups for the learner; counts outcomes by reason.

    :param current_version: returns the learner's current policy version (called once per message).
    :param prompt_check: ``(prompt_index, prompt_hash) -> bool``; False (or a ``LookupError``) -> PROMPT_MISMATCH.
        None skips the dataset check (the prompt ids are still checked against their hash in the signed header).
    """

    def __init__(
        self,
        config: ValidatorConfig,
        *,
        current_version: Callable[[], int],
        prompt_check: Optional[Callable[[int, bytes], bool]] = None,
    ):
        if config.vocab_size <= 0 or config.vocab_size > (1 << 31):
            raise ValueError("vocab_size must be in [1, 2**31]")
        self.config = config
        self.limits = config.limits()
        self._current_version = current_version
        self._prompt_check = prompt_check
        self._allowed = None if config.allowed_samplers is None else frozenset(bytes(k) for k in config.allowed_samplers)
        self.replay = ReplayWindow(config.replay_window, config.max_tracked_samplers)
        self._lock = threading.Lock()
        #: rejections by reason
        self.rejections: Counter = Counter()
        self.accepted = 0

    def counts(self) -> Dict[str, int]:
        """``{"accepted": n, "<reason>": n, ...}`` for logging/metrics."""
        with self._lock:
            out = {"accepted": self.accepted}
            out.update({r.value: n for r, n in self.rejections.items()})
            return out

    def validate(self, data) -> RolloutGroup:
        """Return the accepted group or raise ProtocolError (counted in ``rejections``)."""
        try:
            group = self._validate(data)
        except ProtocolError as e:
            with self._lock:
                self.rejections[e.reason] += 1
            raise
        return group

    def _validate(self, data) -> RolloutGroup:
        cfg = self.config
        if self._allowed is not None and read_sender(data) not in self._allowed:
            raise ProtocolError(Reason.UNTRUSTED_SIGNER, "sampler is not on the allow-list")
        g = decode_group(data, self.limits)
        with self._lock:
            self.replay.check(g.sampler, g.seq)  # cheap early exit; re-checked atomically on commit
        if g.run_id != cfg.run_id:
            raise ProtocolError(Reason.WRONG_RUN, f"run {g.run_id[:64]!r} != {cfg.run_id!r}")
        current = int(self._current_version())
        if g.policy_version > current:
            raise ProtocolError(Reason.FUTURE_VERSION, f"policy version {g.policy_version} > current {current}")
        if cfg.max_staleness is not None and g.policy_version < current - cfg.max_staleness:
            raise ProtocolError(
                Reason.STALE, f"policy version {g.policy_version} older than {current} - {cfg.max_staleness}"
            )
        if cfg.group_size is not None and g.group_size != cfg.group_size:
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"group of {g.group_size} completions, expected {cfg.group_size}")
        # the one definition of a valid group the trainer applies too (protocol/group_rules.py)
        check_group(g.prompt_ids, g.completions(), g.completion_logprobs(), vocab_size=cfg.vocab_size,
                    max_completion_tokens=cfg.max_completion_tokens)
        if self._prompt_check is not None:
            try:
                ok = self._prompt_check(g.prompt_index, g.prompt_hash)
            except LookupError:
                ok = False
            if not ok:
                raise ProtocolError(Reason.PROMPT_MISMATCH, f"prompt {g.prompt_index} does not match the dataset")
        with self._lock:
            self.replay.record(g.sampler, g.seq)
            self.accepted += 1
        return g
