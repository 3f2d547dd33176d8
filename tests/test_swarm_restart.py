"""Restarts, with real processes on 127.0.0.1: samplers wait for a learner that is down (and find a restarted one
within about one heartbeat poll), `--exit-on-unreachable` keeps the old exit-3 behaviour, and a learner SIGKILLed
inside publish never reuses a version number for other weights.

Every process a test starts is stopped by PID in ``finally`` (see tests/swarm_helpers/procs.py, node/local.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from node.local import LOOPBACK, REPO, Proc, join_args
from tests.swarm_helpers.procs import NodeProc, free_port, rollouts, settle, stop_all, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_sampler_waits_for_a_down_learner_and_finds_a_restarted_one_at_once(tmp_path):
    port = free_port()
    procs = []
    try:
        largs = ["learner", "--state", str(tmp_path / "L"), "--port", str(port), "--poll", "1.0"]
        first = NodeProc(largs, tmp_path / "learner-1.log")
        procs.append(first)
        ready = first.wait_event("ready", 90)
        first.stop()  # the learner is down when the sampler starts

        sampler = NodeProc(["sampler", "--state", str(tmp_path / "s"), "--peers", ready["maddrs"][0], "--learner-key",
                            ready["key"], "--poll", "1.0", "--keep-trying"], tmp_path / "s.log")
        procs.append(sampler)
        sampler.wait_event("waiting", 90)
        wait_until(lambda: sampler.log_text().count("re-dialing the bootstrap peers") >= 2, 30,
                   "the sampler to retry the bootstrap peers")
        assert sampler.popen.poll() is None, sampler.tail()

        learner = NodeProc(largs, tmp_path / "learner-2.log")
        procs.append(learner)
        learner.wait_event("ready", 90)
        key = sampler.wait_event("joined", 60)["key"].split(":")[1]  # back-off: at most 30 s after the learner came up (here a few)
        sampler.request("submit", start=0, n=5)
        settle(learner, [sampler])

        # The learner crashes while groups wait; the sampler stays up and delivers to the restarted learner.
        learner.crash()
        sampler.request("submit", start=5, n=5)
        time.sleep(2.0)  # deliveries fail meanwhile
        assert sampler.request("stats")["stats"]["outbox"] == 5
        restarted = NodeProc(largs, tmp_path / "learner-3.log")
        procs.append(restarted)
        restarted.wait_event("ready", 90)
        t0 = time.monotonic()
        wait_until(lambda: sampler.request("stats")["stats"]["outbox"] == 0, 30, "delivery to the restarted learner")
        delivered_s = time.monotonic() - t0
        # ... and reads the restarted learner's record (not only its old address): a new version reaches it
        restarted.request("publish", v=1, size=1 << 20, chunk=256 << 10)
        sampler.wait_event("version", 30, v=1)
        found_s = time.monotonic() - t0
        print(f"restarted learner: delivered after {delivered_s:.1f} s, version 1 held after {found_s:.1f} s")
        assert delivered_s < 15, f"took {delivered_s:.1f} s to deliver to the restarted learner"
        st = settle(restarted, [sampler])
        assert rollouts(learner, restarted) == {(key, q): 1 for q in range(10)}
        assert st.get("accepted", 0) == 5, st
    finally:
        stop_all(procs)
