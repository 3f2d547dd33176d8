"""One typed config for the policy-optimization loss (see docs/OBJECTIVES.md for every formula)."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "gepo", "delta_l", "tis", "cispo", "m2po")
TOKEN_LEVEL_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "delta_l", "tis", "cispo", "m2po")  # weight per token
# Token-level types whose per-token term is not the PPO clip of the sampler ratio: a detached, truncated weight
# times the policy-gradient term (TIS, CISPO). They ignore epsilon_low / epsilon_high / delta.
TRUNCATED_IS_TYPES = ("tis", "cispo")
SEQUENCE_LEVEL_TYPES = ("gspo", "gepo")  # one weight (and one loss term) per row
ADVANTAGE_STDS = ("auto", "group", "batch", "none")
GEPO_GROUPINGS = ("prompt", "micro_batch")
AGGREGATIONS = ("auto", "delta_l")

# Std scaling each type uses when advantage_std="auto": the GEPO paper removes it for GEPO, Dr.GRPO removes it by
# design, and the official scripts run ∆L with scale_rewards=False; the rest keep TRL's default (group std).
_AUTO_ADVANTAGE_STD = {
    "grpo": "group",
    "bnpo": "group",
    "dapo": "group",
    "gspo": "group",
    "gepo": "none",
    "dr_grpo": "none",
    "delta_l": "none",
    # verl's GRPO advantage (TIS, M2PO reference code) and TRL's default (CISPO) divide by the group std
    "tis": "group",
    "cispo": "group",
    "m2po": "group",
}
# Aggregation of the newer token-level types: a token mean over the whole step (TRL's num_items_in_batch for CISPO;
# verl's "token-mean" for TIS and M2PO, which equals it when the step is one micro-batch).
_AUTO_AGGREGATION = {"tis": "dapo", "cispo": "dapo", "m2po": "dapo"}


@dataclass
class LossConfig:
    """Everything `gepo.objectives.compute_loss` and `gepo.logprobs` need to know. Validated on construction."""

    loss_type: str = "gepo"
    """One of grpo, bnpo, dr_grpo, dapo, gspo, gepo, delta_l, tis, cispo, m2po. Fixes the importance-weight level
    (token for grpo, bnpo, dr_grpo, dapo, delta_l, tis, cispo, m2po; sequence for gspo; group for gepo) and the default
    aggregation (tis, cispo, m2po: dapo's token mean over the step)."""

    epsilon_low: float = 0.2
    """PPO clip: the weight is clipped below at 1 - epsilon_low. The official GEPO code uses 0.2 for every method."""

    epsilon_high: float = 0.2
    """PPO clip: the weight is clipped above at 1 + epsilon_high (DAPO's clip-higher uses e.g. 0.28)."""

    delta: float | None = None
    """Optional cap on the *unclipped* weight (TRL's delta, two-sided clipping): bounds the loss when A < 0 and the
    weight explodes. None disables it. Must exceed 1 + epsilon_high, or it would cut into the trust region."""

    advantage_std: str = "auto"
    """Std scaling of group-relative advantages: "group" (TRL's default), "batch", "none", or "auto" (group for grpo,
    bnpo, dapo, gspo; none for gepo, dr_grpo, delta_l)."""

    gepo_grouping: str = "prompt"
    """GEPO's group for the expectation in the weight's denominator: "prompt" (the paper: the G completions of one
    prompt) or "micro_batch" (the official code: each consecutive block of gepo-micro-batch-rows rows of the already
    shuffled batch, usually mixing prompts)."""

    gepo_micro_batch_rows: int = 8
    """Block size for gepo-grouping micro_batch (8 in the official code: per-device batch of 8 rows)."""

    aggregation: str = "auto"
    """"auto": each loss type's own aggregation. "delta_l": ∆L normalization instead; only for token-level types.
    The loss delta_l means token-level weights with ∆L aggregation whatever this says."""

    delta_l_alpha: float = 1.0
    """∆L exponent: x_i ∝ L_i^-alpha. 1 is minimum variance (∆L paper default); 0.75 was used for math and is
    hard-coded in the official GEPO code; 0 reproduces Dr.GRPO's weighting."""

    max_completion_length: int = 256
    """M: Dr.GRPO's constant normaliser (rows x M) and ∆L's 1/M. Must equal the sampler's generation limit."""

    tis_cap: float = 2.0
    """TIS (Yao et al.; verl's rollout_is_threshold): the detached token weight min(p/q, tis_cap) multiplies the
    policy-gradient term. 2.0 is the default of the TIS blog and of verl."""

    cispo_max_weight: float = 5.0
    """CISPO: the detached token weight min(p/q, cispo_max_weight) multiplies A log p. This is TRL's epsilon_high
    for loss_type="cispo" (an absolute cap, not 1 + eps), ScaleRL's eps_max, recommended 5.0 by TRL."""

    m2po_budget: float = 0.04
    """M2PO: the second-moment budget tau_M2 on the log-ratio of the tokens the PPO clip acts on (A > 0 with p > q,
    A < 0 with p < q); 0.04 in the paper and every reference script."""

    icepop: bool = False
    """IcePop-style masking for token-level types: tokens whose ratio p/q lies outside [icepop_low, icepop_high]
    contribute neither loss nor gradient (and are still counted by the aggregation's denominator)."""

    icepop_low: float = 0.5
    """IcePop's alpha (Ling team: 0.5)."""

    icepop_high: float = 5.0
    """IcePop's beta (Ling team: 5.0)."""

    beta: float = 0.0
    """Reference-policy KL coefficient (k3 estimator, per token). 0 in every GEPO recipe, and then no reference model
    is needed."""

    sampler_kl_coef: float = 0.0
    """Coefficient of a KL(sampler || learner) penalty (k3 per token, mean per row, then over rows). The official
    heterogeneous learner uses 0.005 ("cppo_beta"), which the paper found best; 0 disables it."""

    temperature: float = 1.0
    """Log-probs are taken from logits / temperature. Must equal the sampler's temperature, or the ratio is biased."""

    logprob_chunk_rows: int = 128
    """Token positions whose logits are upcast to float32 at once when log-probs and entropies are taken: the
    memory/speed trade-off of log-prob extraction. Extra memory besides the gradient buffer is ~2-3 x chunk x vocab x
    4 bytes (128 x 32k vocab: ~40 MB); on a GPU a larger chunk (512-2048) saves kernel launches."""

    def __post_init__(self) -> None:
        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {', '.join(allowed)}; got {value!r}")

        for name in ("epsilon_low", "epsilon_high", "delta_l_alpha", "beta", "sampler_kl_coef", "temperature",
                     "tis_cap", "cispo_max_weight", "m2po_budget", "icepop_low", "icepop_high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"LossConfig.{name} must be a number; got {value!r}")
        if self.delta is not None and (isinstance(self.delta, bool) or not isinstance(self.delta, (int, float))):
            raise ValueError(f"LossConfig.delta must be a number or None; got {self.delta!r}")
        if not isinstance(self.icepop, bool):
            raise ValueError(f"LossConfig.icepop must be a bool; got {self.icepop!r}")
        one_of("loss_type", LOSS_TYPES)
        one_of("advantage_std", ADVANTAGE_STDS)
        one_of("gepo_grouping", GEPO_GROUPINGS)
        one_of("aggregation", AGGREGATIONS)
        if self.aggregation == "delta_l" and self.loss_type in SEQUENCE_LEVEL_TYPES:
            raise ValueError(
                f"aggregation='delta_l' weights token-summed losses and needs a token-level loss type "
                f"({', '.join(TOKEN_LEVEL_TYPES)}); {self.loss_type} has one term per row"
            )
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"epsilon_low must be in [0, 1) so that 1 - epsilon_low > 0; got {self.epsilon_low}")
        if not self.epsilon_high >= 0.0:
            raise ValueError(f"epsilon_high must be >= 0; got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1.0 + self.epsilon_high:
            raise ValueError(
                f"delta caps the unclipped weight and must exceed 1 + epsilon_high = {1.0 + self.epsilon_high}; "
                f"got {self.delta} (use None to disable it)"
            )
        for name in ("gepo_micro_batch_rows", "max_completion_length", "logprob_chunk_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LossConfig.{name} must be a positive int; got {value!r}")
        if not self.delta_l_alpha >= 0.0:
            raise ValueError(f"delta_l_alpha must be >= 0; got {self.delta_l_alpha}")
        if not self.beta >= 0.0:
            raise ValueError(f"beta must be >= 0; got {self.beta}")
        if not self.sampler_kl_coef >= 0.0:
            raise ValueError(f"sampler_kl_coef must be >= 0; got {self.sampler_kl_coef}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        for name in ("tis_cap", "cispo_max_weight", "m2po_budget"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.delta is not None and self.loss_type in TRUNCATED_IS_TYPES:
            raise ValueError(f"delta caps the PPO term's unclipped weight; {self.loss_type} has no PPO term "
                             f"(its weight is capped by {'tis_cap' if self.loss_type == 'tis' else 'cispo_max_weight'})")
        if self.icepop:
            if self.loss_type in SEQUENCE_LEVEL_TYPES:
                raise ValueError(f"icepop masks tokens and needs a token-level loss type; {self.loss_type} has one "
                                 "weight per row")
            if not 0.0 <= self.icepop_low < 1.0 < self.icepop_high:
                raise ValueError(f"icepop needs 0 <= icepop_low < 1 < icepop_high (the on-policy ratio 1 is kept); "
                                 f"got [{self.icepop_low}, {self.icepop_high}]")

    def resolved_advantage_std(self) -> str:
        """The std scaling actually used: "group", "batch" or "none" ("auto" resolved by loss type)."""
        if self.advantage_std == "auto":
            return _AUTO_ADVANTAGE_STD[self.loss_type]
        return self.advantage_std

    def resolved_aggregation(self) -> str:
        """The aggregation actually used: the loss type's own name, or "delta_l"."""
        if self.loss_type == "delta_l" or self.aggregation == "delta_l":
            return "delta_l"
        return _AUTO_AGGREGATION.get(self.loss_type, self.loss_type)

    def weight_level(self) -> str:
        """Where the importance weight lives: "token", "sequence" (gspo) or "group" (gepo)."""
        return {"gspo": "sequence", "gepo": "group"}.get(self.loss_type, "token")
