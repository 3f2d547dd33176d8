"""scripts/simulate_swarm.py against answers known in closed form (a second or two in all)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scripts.simulate_swarm import MiB, Links, Mbit, SimConfig, SwarmSim, run_scenario, scenario


def one_link(n: int, up: float, down: float, delay: float) -> Links:
    """The learner (uplink ``up``) and ``n`` samplers (downlink ``down``), every access delay ``delay``."""
    return Links(np.r_[up, np.full(n, 1e12)], np.r_[1e12, np.full(n, down)], np.full(n + 1, delay))


def test_one_sampler_one_chunk_is_size_over_bandwidth_plus_three_round_trips():
    # heartbeat (DHT get: one round trip), manifest (one), the chunk (request + first byte: one), then the bytes
    size, rate, delay = 8 * MiB, 10 * Mbit, 0.05
    cfg = SimConfig(n=1, size=size, chunk_size=size, poll_interval=0.0, discovery=0.0)
    sim = SwarmSim(cfg, one_link(1, rate, 1e12, delay)).run()
    rtt = 4 * delay
    assert sim.per_sampler_times(1)[0] == pytest.approx(size / rate + 3 * rtt, rel=1e-9)
    assert sim.learner_upload(1) == pytest.approx(size)


def test_downlink_is_the_bottleneck_when_slower():
    size = 4 * MiB
    cfg = SimConfig(n=1, size=size, chunk_size=size, poll_interval=0.0)
    sim = SwarmSim(cfg, one_link(1, 100 * Mbit, 5 * Mbit, 0.0)).run()
    assert sim.per_sampler_times(1)[0] == pytest.approx(size / (5 * Mbit), rel=1e-9)


def test_two_samplers_share_the_learner_uplink():
    # no swarming, no rationing, fast downlinks: both finish at 2 x size / up (one chunk each, in parallel)
    size, up = 4 * MiB, 10 * Mbit
    cfg = SimConfig(n=2, size=size, chunk_size=size, poll_interval=0.0, swarming=False, ration=False)
    sim = SwarmSim(cfg, one_link(2, up, 1e12, 0.0)).run()
    assert sim.per_sampler_times(1) == pytest.approx([2 * size / up] * 2, rel=1e-9)
    assert sim.learner_upload(1) == pytest.approx(2 * size)


def test_swarming_beats_the_learner_alone_and_rationing_bounds_its_upload():
    n, size, up = 8, 32 * MiB, 20 * Mbit
    links = Links(np.r_[up, np.full(n, 20 * Mbit)], np.r_[1e12, np.full(n, 200 * Mbit)], np.full(n + 1, 0.01))
    swarm = SwarmSim(SimConfig(n=n, size=size, poll_interval=0.0), links).run()
    alone = SwarmSim(SimConfig(n=n, size=size, poll_interval=0.0, swarming=False, ration=False), links).run()
    # the learner alone must send n copies; swarming gets close to the fluid bound n S / (u_L + n u)
    assert alone.hold_quantile(1, 1.0) >= n * size / up
    assert swarm.hold_quantile(1, 1.0) < 0.5 * alone.hold_quantile(1, 1.0)
    assert swarm.hold_quantile(1, 1.0) >= n * size / (up + n * 20 * Mbit)
    assert swarm.learner_upload(1) <= 2.0 * size
    assert alone.learner_upload(1) == pytest.approx(n * size)


def test_deltas_are_fetched_instead_of_full_versions():
    full = run_scenario(scenario(10, "135M", None, False))
    delta = run_scenario(scenario(10, "135M", 0.015, False))
    assert delta["t90"] < 0.2 * full["t90"]
    assert delta["learner_upload"] < 0.1  # in units of the full size


def test_learner_waits_when_samplers_are_too_few():
    # 10 samplers at 4 s a group make 2.5 groups/s; a 64-group step then takes 25.6 s of collection against
    # 10 s of training: the learner waits (25.6 - 10) / 25.6 = 61 % of the time.
    r = run_scenario(scenario(10, "135M", 0.015, True, gen_sigma=0.0, session=math.inf))
    assert r["wait_fraction"] == pytest.approx(1 - 10 / 25.6, abs=0.05)
    assert r["staleness_max"] <= 32
