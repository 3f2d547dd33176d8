"""Restarts, with real processes on 127.0.0.1: samplers wait for a learner that is down (and find a restarted one
within about one heartbeat poll), `--exit-on-unreachable` keeps the old exit-3 behaviour, and a learner SIGKILLed
inside publish never reuses a version number for other weights.

Every process a test starts is stopped by PID in ``finally`` (see tests/swarm_helpers/procs.py, node/local.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hivemind.p2p import P2P, PeerID

from node.local import LOOPBACK, REPO, Proc
from node.metrics import read_metrics
from protocol.identity import Identity
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
        wait_until(lambda: sampler.log_text().count("learner record not found") >= 2, 30,
                   "the sampler to retry the bootstrap peers")
        assert sampler.popen.poll() is None, sampler.tail()

        learner = NodeProc(largs, tmp_path / "learner-2.log")
        procs.append(learner)
        learner.wait_event("ready", 90)
        # back-off: found at most 30 s after the learner came up (here a few)
        key = sampler.wait_event("joined", 60)["key"].split(":")[1]
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


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_exit_on_unreachable_exits_3_with_one_line(tmp_path):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmePnUA6qkWQqWEVyLoAETKNBXxdwQ7Ej1d5RErd1RVYFr"
    out = run_cli("-m", "node.sampler", "--peers", dead, "--state-dir", str(tmp_path / "s"), "--exit-on-unreachable",
                  *LOOPBACK)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 3 and len(errors) == 1, out.stderr[-3000:]
    assert "bootstrap" in errors[0] and "Traceback" not in out.stderr, out.stderr[-3000:]


def learner_cmd(run_dir, port: int, *extra: str) -> list[str]:
    return ["-m", "node.learner", "--run-dir", str(run_dir), "--run-id", "restart", "--group-size", "4",
            "--groups-per-step", "2", "--eval-every", "0", "--reward-workers", "1", "--no-tensorboard",
            "--torch-threads", "1", "--max-steps", "1000", "--checkpoint-every", "1000", "--max-staleness", "4",
            *LOOPBACK, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", *extra]


def paused(point: str) -> dict[str, str]:
    return {**os.environ, "GEPO_TEST_PAUSE_AT": point}


@pytest.mark.timeout(600)  # three model-loading programs: minutes on a loaded 2-core machine
def test_learner_killed_inside_publish_never_reuses_a_version(tmp_path):
    """The real programs: a sampler started while the learner is down waits for it; the learner is SIGKILLed after
    version 2 became visible but before it was recorded as published; restarted (--resume, no checkpoint: only the
    markers remember what the swarm saw), it continues at version 3, and the sampler, which stayed up, delivers to it
    again. An observer that holds every version it sees (SHA-256 of the weights) never sees two weight sets under one
    number."""
    port = free_port()
    run_dir = tmp_path / "learner"
    procs = []
    try:
        # The learner's identities exist before its first start (as after an earlier life), so the sampler can be
        # given the join arguments while the learner is down.
        (run_dir / "swarm").mkdir(parents=True)
        P2P.generate_identity(str(run_dir / "swarm" / "p2p_identity.key"))
        peer_id = PeerID.from_identity((run_dir / "swarm" / "p2p_identity.key").read_bytes()).to_base58()
        key = Identity.load_or_create(str(run_dir / "swarm" / "ed25519.key")).public_key_str
        maddr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"
        join = ["--run-id", "restart", "--peers", maddr, "--learner-key", key]

        sampler = Proc(["-m", "node.sampler", *join, "--state-dir", str(tmp_path / "s"), "--batch-prompts", "2",
                        "--torch-threads", "1", *LOOPBACK], tmp_path / "sampler.log")
        observer = NodeProc(["sampler", "--state", str(tmp_path / "obs"), "--run-id", "restart", "--peers", maddr,
                             "--learner-key", key, "--keep-trying", "--no-swarming"], tmp_path / "observer.log")
        procs += [sampler, observer]
        sampler.wait_for(r"learner unreachable since \d+ s, retrying", 120)
        assert sampler.popen.poll() is None, sampler.tail()

        # First life: trains on the waiting sampler's rollouts; killed inside the publish of version 2.
        first = Proc(learner_cmd(run_dir, port, "--resume"), tmp_path / "learner-1.log",
                     env=paused("publish:after_visible@2"))
        procs.append(first)
        first.wait_for(r"paused at publish:after_visible \(version 2\)", 300)
        v2 = observer.wait_event("version", 60, v=2)["sha"]
        first.kill()
        assert (run_dir / "publishing_version").read_text() == "2"
        assert (run_dir / "published_version").read_text() == "1"

        # Second life: continues above 2; the sampler stayed up and delivers again (a new version needs its groups).
        second = Proc(learner_cmd(run_dir, port, "--resume"), tmp_path / "learner-2.log")
        procs.append(second)
        second.wait_for(r"continuing at version 3", 120)
        second.wait_for(r"samplers join with", 120)  # its swarm is up
        t0 = time.monotonic()
        wait_until(lambda: any(ev.get("event") == "version" and ev["v"] >= 4 for ev in observer.history), 120,
                   "a version trained on groups delivered to the restarted learner")
        print(f"restarted learner: version 4 (trained on the sampler's groups) held {time.monotonic() - t0:.1f} s "
              f"after its swarm was up")
        assert sampler.popen.poll() is None, sampler.tail()

        shas: dict[int, set[str]] = {}
        for ev in observer.history:
            if ev.get("event") == "version":
                shas.setdefault(ev["v"], set()).add(ev["sha"])
        assert shas[2] == {v2}
        assert all(len(s) == 1 for s in shas.values()), shas
        assert int((run_dir / "published_version").read_text()) >= 4
        # every step of both lives trained and published a new number (the first life's 1 and 2, then 4, 5, ...)
        versions = [m["policy_version"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
        assert versions[:2] == [1, 2] and all(b > a for a, b in zip(versions, versions[1:])), versions
    finally:
        stop_all(procs)
