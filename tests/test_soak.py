"""A short churn soak (scripts/soak.py) with the real programs: a learner and 3 samplers on 127.0.0.1, the learner
SIGKILLed twice and samplers four times (one of them while the learner is down), every one restarted with the same
state; then a drain, a clean stop and the audit (python -m node.audit). No acknowledged group may be lost or trained
twice, no node may exit by itself, and no version number may be reused.

About 2-2.5 minutes on a quiet 2-core machine (longer under load: the soak's own timeouts are generous). The soak
stops every process it started by PID, also when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from node.local import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SHORT_SOAK = ["--minutes", "1.0", "--seed", "3", "--samplers", "3", "--learner-kills", "2", "--sampler-kills", "4",
              "--kills-while-learner-down", "1", "--learner-down-min", "3", "--learner-down-max", "6",
              "--sampler-down-min", "1", "--sampler-down-max", "4", "--rss-every", "2"]


def test_short_churn_soak_loses_nothing_and_trains_nothing_twice(tmp_path):
    out, figures = tmp_path / "soak", tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "scripts.soak", *SHORT_SOAK, "--out", str(out), "--json",
                           str(figures)], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=1400)
    print(done.stdout[-6000:])
    assert figures.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    fig = json.loads(figures.read_text())
    kills = fig["kills"]
    assert kills["learner"] >= 2 and kills["sampler"] >= 4 and kills["sampler_while_learner_down"] >= 1, kills
    audit = fig["audit"]
    assert audit is not None, fig["audit_error"]
    assert audit["acknowledged"] > 0 and audit["trained"] > 0, audit
    assert audit["lost"] == 0, audit
    assert audit["trained_twice"] == 0, audit
    assert fig["exits"]["unexpected"] == [], fig["exits"]
    assert fig["versions"]["ok"], fig["versions"]
    assert fig["restart_to_first_accepted"]["learner"]["n"] >= 2, fig["restart_to_first_accepted"]
    # every node's main process was sampled (a helper caught while exiting may show a few KiB: 0.0 MB rounded)
    nodes = {"learner", "sampler-1", "sampler-2", "sampler-3"}
    assert nodes <= set(fig["rss"]) and all(fig["rss"][n]["peak_mb"] > 0 for n in nodes), fig["rss"]
    assert done.returncode == 0, fig["failures"]


# The soak's own arithmetic, without processes (fast).

def test_rss_slope_ignores_the_first_minute_and_needs_a_minute_of_samples():
    from scripts.soak_figures import rss_summary, slope_mb_per_min

    grow = [(t, 100_000 + (50_000 if t < 60 else 0) + 1024 * 2 * t / 60) for t in range(0, 300, 5)]  # 2 MB/min
    assert slope_mb_per_min(grow) == pytest.approx(2.0, rel=1e-6)
    assert slope_mb_per_min(grow[:20]) is None  # under a minute after the first one
    life = {"node": "sampler-1", "first_accepted_s": 30.0, "rss": {"main process": grow, "p2pd (libp2p daemon)":
                                                                      [(t, 80_000) for t in range(0, 300, 5)]}}
    summary = rss_summary([life])
    assert summary["sampler-1/p2pd (libp2p daemon)"]["slope_longest_mb_per_min"] == 0
    assert summary["sampler-1"]["slope_longest_mb_per_min"] == pytest.approx(2.0, rel=1e-3)


def test_version_check_catches_a_life_that_starts_at_a_shown_version():
    from scripts.soak_figures import check_versions, life_start_version

    log = ("INFO node.learner: resumed from runs/x/checkpoints/step-000010 at step 10, policy version 10\n"
           "WARNING node.learner: versions up to 13 may have been shown to the swarm already; continuing at version 14\n")
    assert life_start_version(log) == (14, "guard")
    assert life_start_version(log.splitlines()[0]) == (10, "checkpoint")
    rows = [{"loss": 0.0, "policy_version": v} for v in (1, 2, 3, 15, 16)]
    lives = [{"life": 1, "start_version": 0, "last_trained_version": 3, "highest_marker_at_end": 3},
             {"life": 2, "start_version": 14, "last_trained_version": 16, "highest_marker_at_end": None}]
    assert check_versions(rows, lives)["ok"]
    reused = [dict(lives[0], highest_marker_at_end=14), lives[1]]
    assert not check_versions(rows, reused)["ok"]
    assert not check_versions(rows + [{"loss": 0.0, "policy_version": 16}], lives)["ok"]
    # resuming from the checkpoint of the very version last shown publishes the same weights under it again: fine
    same = [dict(lives[0], highest_marker_at_end=14), dict(lives[1], start_source="checkpoint")]
    assert check_versions(rows, same)["ok"]


def test_plan_has_the_requested_kills_and_help_shows_every_default():
    import random

    from scripts.soak import SoakConfig, build_parser, make_plan

    cfg = SoakConfig(minutes=30, learner_kills=6, sampler_kills=24, kills_while_learner_down=4).resolved()
    plan = make_plan(cfg, random.Random(0))
    assert len(plan.learner_kills) == 6 and sum(k for _, _, k in plan.learner_kills) == 4
    assert len(plan.sampler_kills) == 20 and all(0 <= t <= 30 * 60 for t, _ in plan.sampler_kills)
    times = [t for t, _, _ in plan.learner_kills]
    downs = [d for _, d, _ in plan.learner_kills]
    assert all(a + da < b for a, da, b in zip(times, downs, times[1:]))  # learner downtimes never overlap
    help_text = build_parser().format_help()
    assert help_text.count("(default:") == len(SoakConfig.__dataclass_fields__)
