"""Faults, with real processes on 127.0.0.1: a peer serving corrupted chunks, a sampler killed mid-download, and
the learner killed and restarted while samplers keep producing rollouts (and one of them is killed too).

"Killed" means SIGKILL of the node's main process: its forked DHT process notices and takes the libp2p daemon
down with it (checked here), so the restarted node can reuse its identity and port. Every process a test starts
is stopped by PID in ``finally``.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.swarm_helpers.procs import NodeProc, assert_helpers_exit, free_port, rollouts, settle, stop_all, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHUNK = 256 << 10


def expected_sha(version: int, size: int) -> str:
    from tests.swarm_helpers.node_proc import synthetic_weights

    return hashlib.sha256(synthetic_weights(version, size)).hexdigest()


def test_corrupt_peer_is_caught_and_avoided(tmp_path):
    size = 4 << 20
    procs = []
    try:
        learner = NodeProc(["learner", "--state", str(tmp_path / "L"), "--limit", "1e6", "--ration-interval", "3"],
                           tmp_path / "learner.log")
        procs.append(learner)
        ready = learner.wait_event("ready", 90)
        join = ["--peers", ready["maddrs"][0], "--learner-key", ready["key"]]
        evil = NodeProc(["sampler", "--state", str(tmp_path / "evil"), *join, "--evil"], tmp_path / "evil.log")
        procs.append(evil)
        evil_id = evil.wait_event("joined", 120)["peer_id"]
        learner.request("publish", v=1, size=size, chunk=CHUNK)
        assert evil.wait_event("version", 60, v=1)["sha"] == expected_sha(1, size)

        honest = [NodeProc(["sampler", "--state", str(tmp_path / f"h{i}"), *join], tmp_path / f"h{i}.log")
                  for i in range(2)]
        procs += honest
        for h in honest:
            ev = h.wait_event("version", 120, v=1)
            assert ev["sha"] == expected_sha(1, size), "a corrupted chunk made it into a finished version"
        stats = [h.request("stats")["stats"] for h in honest]
        caught = [i for i, st in enumerate(stats) if st["bad_chunks"] > 0]
        assert caught, "no honest sampler ever asked the corrupting peer"
        for i in caught:
            assert evil_id in stats[i]["blacklisted"], stats[i]["blacklisted"]
            assert stats[i]["chunks_from_learner"] + stats[i]["chunks_from_peers"] == size // CHUNK

        # v2: a sampler that caught the peer never asks it again; it (also) has v2 and keeps serving garbage
        learner.request("publish", v=2, size=size, chunk=CHUNK)
        assert evil.wait_event("version", 60, v=2)["sha"] == expected_sha(2, size)
        for h in honest:
            assert h.wait_event("version", 120, v=2)["sha"] == expected_sha(2, size)
        after = [h.request("stats")["stats"] for h in honest]
        for i in caught:
            assert after[i]["bad_chunks"] == stats[i]["bad_chunks"], "went back to the blacklisted peer"
        # each honest sampler's one session with the peer ended at its first bad answer: at most the requests
        # pipelined on it (max_inflight_per_peer = 2) were ever served, over both versions
        served = evil.request("stats")["stats"]["chunks_served"]
        assert 1 <= served <= 2 * len(honest), f"the corrupting peer kept being asked ({served} chunks served)"
    finally:
        stop_all(procs)


def test_sampler_killed_mid_download_resumes(tmp_path):
    size = 8 << 20
    procs = []
    try:
        learner = NodeProc(["learner", "--state", str(tmp_path / "L"), "--limit", "2e6"], tmp_path / "learner.log")
        procs.append(learner)
        ready = learner.wait_event("ready", 90)
        args = ["sampler", "--state", str(tmp_path / "s"), "--peers", ready["maddrs"][0], "--learner-key",
                ready["key"]]
        s = NodeProc(args, tmp_path / "s-1.log")
        procs.append(s)
        s.wait_event("joined", 120)
        learner.request("publish", v=1, size=size, chunk=CHUNK)
        got = wait_until(lambda: (lambda b: b if b >= size // 4 else 0)(s.request("stats")["stats"]["bytes_down"]),
                         60, "a quarter of the download", interval=0.05)
        assert got < size, "the download finished before the kill"
        helpers = s.crash()
        assert_helpers_exit(helpers)

        s2 = NodeProc(args, tmp_path / "s-2.log")
        procs.append(s2)
        s2.wait_event("joined", 120)
        ev = s2.wait_event("version", 90, v=1)
        assert ev["sha"] == expected_sha(1, size)
        assert ev["stats"]["bytes_down"] <= size - got + 2 * CHUNK, "the restarted sampler fetched everything again"
        assert "found stored version 1" in s2.log_text()
    finally:
        stop_all(procs)


def test_learner_restart_keeps_identity_and_outboxes_deliver_exactly_once(tmp_path):
    port = free_port()
    procs = []
    try:
        largs = ["learner", "--state", str(tmp_path / "L"), "--port", str(port)]
        learner1 = NodeProc(largs, tmp_path / "learner-1.log")
        procs.append(learner1)
        ready = learner1.wait_event("ready", 90)
        maddr, key = ready["maddrs"][0], ready["key"]
        sargs = [["sampler", "--state", str(tmp_path / f"s{i}"), "--peers", maddr] + (
            ["--learner-key", key] if i < 2 else []) for i in range(3)]  # s2 trusts on first use
        samplers = [NodeProc(a, tmp_path / f"s{i}-1.log") for i, a in enumerate(sargs)]
        procs += samplers
        keys = [s.wait_event("joined", 120)["key"].split(":")[1] for s in samplers]

        for s in samplers:
            s.request("submit", start=0, n=10)
        settle(learner1, samplers)
        assert rollouts(learner1) == {(k, q): 1 for k in keys for q in range(10)}

        # the learner crashes; samplers keep producing into their outboxes
        assert_helpers_exit(learner1.crash())
        for s in samplers:
            s.request("submit", start=10, n=10)
        # ... and one sampler crashes too, with its undelivered groups on disk
        assert samplers[1].request("stats")["stats"]["outbox"] == 10
        assert_helpers_exit(samplers[1].crash())

        learner2 = NodeProc(largs, tmp_path / "learner-2.log")
        procs.append(learner2)
        ready2 = learner2.wait_event("ready", 90)
        assert ready2["peer_id"] == ready["peer_id"] and ready2["key"] == key
        assert ready2["maddrs"][0] == maddr
        samplers[1] = NodeProc(sargs[1], tmp_path / "s1-2.log")
        procs.append(samplers[1])
        assert samplers[1].wait_event("joined", 120)["key"].split(":")[1] == keys[1]

        # s0 and s2 reconnect by themselves, s1 after its restart: every group exactly once, across both learners
        st = settle(learner2, samplers)
        assert rollouts(learner1, learner2) == {(k, q): 1 for k in keys for q in range(20)}
        assert st.get("accepted", 0) == 30 and st.get("rejected", 0) == 0, st
    finally:
        stop_all(procs)
