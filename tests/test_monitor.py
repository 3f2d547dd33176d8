"""`python -m node.monitor`: the swarm view from a peers address.

The end-to-end test runs a real learner and two real samplers (the tiny policy) on loopback as OS processes and the
monitor as a subprocess, and reads what it prints. The table/rate logic is also checked on hand-made records.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from node.local import LOOPBACK, REPO, Proc, join_args
from node.monitor import RateTracker, render_table, snapshot
from protocol.identity import Identity
from protocol.records import LearnerHeartbeat, SamplerStatus

pytestmark = pytest.mark.timeout(300)

DEAD = "/ip4/127.0.0.1/tcp/9/p2p/QmePnUA6qkWQqWEVyLoAETKNBXxdwQ7Ej1d5RErd1RVYFr"


def monitor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.monitor", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_snapshot_rates_lag_and_table():
    learner, s1, s2 = Identity.generate(), Identity.generate(), Identity.generate()
    peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"

    def hb(t, step, accepted):
        return LearnerHeartbeat(run_id="r", peer_id=peer, policy_version=step, manifest_digest=b"\x01" * 32,
                                manifest_size=10, weights_size=2**20, time=t,
                                counters={"step": step, "accepted": accepted, "rejected": 1, "up_s": 100})

    def st(t, version, sent, tokens):
        return SamplerStatus(run_id="r", peer_id=peer, policy_version=version, time=t,
                             counters={"submitted": sent, "accepted": sent - 1, "rejected": 0, "tokens": tokens,
                                       "up_s": 50})

    tracker = RateTracker()
    first = snapshot("r", {learner.public_key: hb(1000.0, 10, 40)},
                     {s1.public_key: st(1000.0, 9, 20, 400), s2.public_key: st(999.0, 7, 10, 100)}, 1001.0, tracker)
    assert first["learner"]["steps_per_s"] == pytest.approx(10 / 100)  # seen once: average since start
    assert first["learner"]["rate"] == "average"
    by_version = {s["version"]: s for s in first["samplers"]}
    assert by_version[9]["lag"] == 1 and by_version[7]["lag"] == 3
    assert by_version[9]["groups_per_s"] == pytest.approx(20 / 50)

    second = snapshot("r", {learner.public_key: hb(1010.0, 15, 60)},
                      {s1.public_key: st(1010.0, 14, 30, 600), s2.public_key: st(999.0, 7, 10, 100)}, 1011.0, tracker)
    ln = second["learner"]
    assert ln["steps_per_s"] == pytest.approx(0.5) and ln["groups_per_s"] == pytest.approx(2.0)
    assert ln["rate"] == "window 10s"
    fresh = next(s for s in second["samplers"] if s["version"] == 14)
    assert fresh["groups_per_s"] == pytest.approx(1.0) and fresh["tokens_per_s"] == pytest.approx(20.0)
    assert fresh["lag"] == 1
    silent = next(s for s in second["samplers"] if s["version"] == 7)
    assert silent["age_s"] == pytest.approx(12.0) and silent["lag"] == 8

    # The rate spans every record within the window, not just the last two.
    third = snapshot("r", {learner.public_key: hb(1020.0, 20, 80)}, {}, 1021.0, tracker)
    assert third["learner"]["steps_per_s"] == pytest.approx(10 / 20) and third["learner"]["rate"] == "window 20s"
    assert third["samplers"] == []

    table = render_table(second)
    assert "version 15" in table and "step 15" in table and "2 sampler(s)" in table
    assert s1.public_key_str[8:20] in table and s2.public_key_str[8:20] in table
    assert "no heartbeat" in render_table(snapshot("r", {}, {}, 0.0, RateTracker()))


def test_help_documents_every_flag():
    out = monitor("--help", timeout=60)
    assert out.returncode == 0
    for flag in ("--peers", "--run-id", "--learner-key", "--interval", "--once", "--count", "--json", "--wait"):
        assert flag in out.stdout
    assert "(default:" in out.stdout


@pytest.mark.parametrize("args, code, message", [
    (["--peers", DEAD, "--once", "--bootstrap-timeout", "3", *LOOPBACK], 3, "could be reached"),
    (["--peers", "not-a-multiaddr", "--once"], 2, "--peers 'not-a-multiaddr': a multiaddr starts with '/'"),
    (["--once"], 2, "--peers is required"),
])
def test_bad_or_unreachable_peers_give_a_one_line_error(args, code, message):
    started = time.monotonic()
    out = monitor(*args, timeout=90)
    assert out.returncode == code, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_monitor_shows_a_live_swarm(tmp_path):
    procs: list[Proc] = []
    try:
        learner = Proc(["-m", "node.learner", "--run-dir", str(tmp_path / "learner"), "--run-id", "mon",
                        "--group-size", "4", "--groups-per-step", "2", "--max-steps", "1000", "--eval-every", "0",
                        "--reward-workers", "1", "--no-tensorboard", "--torch-threads", "1",
                        # no group may be rejected as stale however the queues grow: rejected == 0 is asserted below
                        "--max-staleness", "100000", *LOOPBACK], tmp_path / "learner.log")
        procs.append(learner)
        join = join_args(learner)
        peers = join[join.index("--peers") + 1]
        key = join[join.index("--learner-key") + 1]
        for i in range(2):
            procs.append(Proc(["-m", "node.sampler", *join, "--state-dir", str(tmp_path / f"s{i}"),
                               "--batch-prompts", "2", "--torch-threads", "1", *LOOPBACK], tmp_path / f"s{i}.log"))
        learner.wait_for(r"step ([3-9]|[1-9]\d+)/1000", timeout=180)  # any step >= 3

        # JSON lines, three snapshots: versions, lag and counters, and rates from successive records.
        out = monitor("--peers", peers, "--run-id", "mon", "--learner-key", key, "--json", "--count", "3",
                      "--interval", "3", *LOOPBACK)
        assert out.returncode == 0, out.stderr[-3000:]
        snaps = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(snaps) == 3
        last = snaps[-1]
        ln = last["learner"]
        assert ln["key"] == key and ln["pinned"] and ln["other_heartbeats"] == 0
        assert ln["version"] >= 3 and ln["step"] >= 3
        assert ln["accepted"] >= 2 * ln["step"]  # every step trained on 2 accepted groups
        assert ln["rejected"] == 0 and ln["steps_per_s"] > 0 and ln["tokens"] > 0
        assert len(last["samplers"]) == 2, last
        for s in last["samplers"]:
            assert 0 <= s["version"] <= ln["version"] and s["lag"] == ln["version"] - s["version"]
            assert s["sent"] >= s["accepted"] >= 1 and s["rejected"] == 0
            assert s["tokens"] > 0 and s["groups_per_s"] > 0 and s["tokens_per_s"] > 0
        assert any(s["rate"].startswith("window") for snap in snaps[1:] for s in snap["samplers"]), snaps
        assert snaps[-1]["learner"]["step"] >= snaps[0]["learner"]["step"]

        # The table, once.
        out = monitor("--peers", peers, "--run-id", "mon", "--once", *LOOPBACK)
        assert out.returncode == 0, out.stderr[-3000:]
        version = int(re.search(r"version (\d+)", out.stdout).group(1))
        assert version >= ln["version"]
        assert "2 sampler(s)" in out.stdout and "(unpinned)" in out.stdout
        for s in last["samplers"]:
            assert s["key"][8:20] in out.stdout

        # A run id nobody uses: no learner, a clear error.
        out = monitor("--peers", peers, "--run-id", "nobody", "--once", "--wait", "2", *LOOPBACK)
        assert out.returncode == 3 and "no learner heartbeat" in out.stderr and "Traceback" not in out.stderr
    finally:
        for p in procs:
            p.stop()
