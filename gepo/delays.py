"""The GEPO paper's model of heterogeneous sampler delays.

In the official heterogeneous runs a sampler reloads the learner's weights only when the time since its last reload
exceeds a delay d drawn before each batch:

    d = clip(T - offset, lower, upper),   offset = 400 s,

with T lognormal (or Weibull) whose parameters are solved so that `mass` = 99.5% of T's probability lies in
[lower, upper]. For the Qwen3-1.7B recipe, [60 s, 1920 s], this gives a median of 60 s, a mean of about 142 s and a
maximum of 1920 s (tests/test_delays.py checks these against the notes). Weibull delays have a heavier right tail
and were harder for every method in the paper.

The sampler node uses this for `--simulate-delay`, and the staleness simulator converts delays to policy versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

DELAY_KINDS = ("none", "fixed", "lognormal", "weibull")


@dataclass(frozen=True)
class DelayModel:
    """A distribution of delays in seconds (or any unit: the simulator uses policy versions)."""

    kind: str = "none"
    lower: float = 60.0
    upper: float = 1920.0
    offset: float = 400.0
    mass: float = 0.995

    def __post_init__(self) -> None:
        if self.kind not in DELAY_KINDS:
            raise ValueError(f"delay kind must be one of {DELAY_KINDS}, got {self.kind!r}")
        if self.kind in ("lognormal", "weibull"):
            if not 0 < self.lower < self.upper:
                raise ValueError(f"need 0 < lower < upper, got lower={self.lower}, upper={self.upper}")
            if not 0 < self.mass < 1:
                raise ValueError(f"mass must be in (0, 1), got {self.mass}")
        if self.kind == "fixed" and self.lower < 0:
            raise ValueError(f"a fixed delay must be >= 0, got {self.lower}")

    def _tail(self) -> float:
        return (1.0 - self.mass) / 2.0

    def lognormal_params(self) -> tuple[float, float]:
        """(mu, sigma) of log T with the `mass` central interval equal to [lower, upper]."""
        z = NormalDist().inv_cdf(1.0 - self._tail())
        lo, hi = math.log(self.lower), math.log(self.upper)
        return (lo + hi) / 2.0, (hi - lo) / (2.0 * z)

    def weibull_params(self) -> tuple[float, float]:
        """(shape k, scale lambda) with F(lower) = tail and F(upper) = 1 - tail."""
        tail = self._tail()
        k = math.log(math.log(tail) / math.log(1.0 - tail)) / math.log(self.upper / self.lower)
        scale = self.lower / (-math.log(1.0 - tail)) ** (1.0 / k)
        return k, scale

    def sample(self, rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
        """Draw delays; `rng` is a numpy Generator so runs are reproducible under a seed."""
        n = 1 if size is None else size
        if self.kind == "none":
            out = np.zeros(n)
        elif self.kind == "fixed":
            out = np.full(n, float(self.lower))
        else:
            if self.kind == "lognormal":
                mu, sigma = self.lognormal_params()
                t = rng.lognormal(mu, sigma, n)
            else:
                k, scale = self.weibull_params()
                t = scale * rng.weibull(k, n)
            out = np.clip(t - self.offset, self.lower, self.upper)
        return float(out[0]) if size is None else out
