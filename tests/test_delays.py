"""The paper's delay model reproduces the figures quoted for its Qwen3-1.7B recipe."""

import numpy as np
import pytest

from gepo.delays import DelayModel


def test_lognormal_matches_the_papers_recipe_figures():
    # algorithms.md: [60 s, 1920 s] gives mean ~142 s, median 60 s, max 1920 s.
    x = DelayModel("lognormal", 60, 1920).sample(np.random.default_rng(0), 200_000)
    assert np.median(x) == 60.0
    assert np.mean(x) == pytest.approx(142, rel=0.02)
    assert x.min() == 60.0 and x.max() == 1920.0


@pytest.mark.parametrize("kind", ["lognormal", "weibull"])
def test_central_mass_lies_in_the_bounds_before_the_offset(kind):
    d = DelayModel(kind, 60, 1920, offset=0.0)
    rng = np.random.default_rng(1)
    if kind == "lognormal":
        mu, sigma = d.lognormal_params()
        t = rng.lognormal(mu, sigma, 400_000)
    else:
        k, scale = d.weibull_params()
        t = scale * rng.weibull(k, 400_000)
    assert np.mean((t >= 60) & (t <= 1920)) == pytest.approx(0.995, abs=0.001)


def test_weibull_has_the_heavier_tail():
    rng = np.random.default_rng(2)
    logn = DelayModel("lognormal", 60, 1920).sample(rng, 50_000)
    weib = DelayModel("weibull", 60, 1920).sample(rng, 50_000)
    assert np.mean(weib) > np.mean(logn)


def test_fixed_none_and_determinism():
    assert DelayModel("none").sample(np.random.default_rng(0)) == 0.0
    assert DelayModel("fixed", lower=5).sample(np.random.default_rng(0)) == 5.0
    a = DelayModel("weibull", 1, 64, offset=0).sample(np.random.default_rng(7), 10)
    b = DelayModel("weibull", 1, 64, offset=0).sample(np.random.default_rng(7), 10)
    assert np.array_equal(a, b)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="kind"):
        DelayModel("gamma")
    with pytest.raises(ValueError, match="lower < upper"):
        DelayModel("lognormal", 100, 50)
