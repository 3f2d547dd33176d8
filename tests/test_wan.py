"""The swarm across an emulated internet: nodes in their own network namespaces, capped links, latency, home NATs.

The picture (scripts/wan_emu): a learner on a public address (10.77.0.10, 20/20 Mbit/s, 10 ms access delay); two
samplers each behind its own home router (nftables masquerade + stateful firewall, no port forwarding), 5 Mbit/s up
and 10 Mbit/s down, 40 ms; a bridge namespace as the internet. Path latency is added by a user-space delaying relay
in every host (netem is absent here), bandwidth by tbf. Nodes are the real swarm processes of
tests/swarm_helpers/node_proc.py; the NATed samplers run with ``--client-mode`` (nobody can dial them).

Cases: a NATed sampler joins, delivers signed rollouts (each reaches the trainer side once) and fetches a version
bit-exact, and the learner sees it only at its router's public address; a bootstrap peer that is down (skipped, and
all of them down is a one-line error); the home link dropping mid-download (``ip link set down``, then up): the
download resumes and completes bit-exact and rollouts written meanwhile are delivered after. Two NATed samplers
cannot exchange chunks directly: see docs/SWARM.md ("NAT") for why the relay case is not run.

Needs root, iproute2 and nftables (``make wan-deps``); skipped, saying which, where they are missing.
"""

from __future__ import annotations

import hashlib
import sys
import time

import pytest

from scripts.wan_emu.topology import Wan, missing_features
from tests.swarm_helpers.node_proc import synthetic_weights
from tests.swarm_helpers.procs import NodeProc, rollouts, settle, wait_until

pytestmark = [pytest.mark.wan, pytest.mark.slow, pytest.mark.timeout(360)]

CHUNK = 256 << 10
DEAD = "/ip4/10.77.0.99/tcp/4001/p2p/QmcNGxaJZJ3ndfMN1GFXrBTSw5ELixtjFzS1BgsaN5yu4y"  # nothing at that address


def sha(version: int, size: int) -> str:
    return hashlib.sha256(synthetic_weights(version, size)).hexdigest()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    reason = missing_features()
    if reason:
        pytest.skip(f"emulated WAN unavailable: {reason}")
    tmp = tmp_path_factory.mktemp("wan")
    emu = Wan(tmp / "net")
    try:
        emu.add_host("L", up_mbit=20, down_mbit=20, delay_ms=10)
        emu.add_host("home1", up_mbit=5, down_mbit=10, delay_ms=40, nat=True)
        emu.add_host("home2", up_mbit=5, down_mbit=10, delay_ms=40, nat=True)
        emu.start()

        def node(host: str, args):
            proc = NodeProc(args, tmp / f"{host}.log", netns=emu.hosts[host].ns)
            emu.procs.append(proc)
            return proc

        learner = node("L", ["learner", "--state", str(tmp / "L"), "--host", emu.hosts["L"].ip, "--port", "4001",
                             "--rpc-timeout", "10"])
        ready = learner.wait_event("ready", 120)
        maddr, key = ready["maddrs"][0], ready["key"]
        t0 = time.monotonic()
        s1 = node("home1", ["sampler", "--state", str(tmp / "s1"), "--host", emu.hosts["home1"].ip, "--peers", maddr,
                            "--learner-key", key, "--client-mode", "--rpc-timeout", "10"])
        # a bootstrap peer that is down comes first in s2's list
        s2 = node("home2", ["sampler", "--state", str(tmp / "s2"), "--host", emu.hosts["home2"].ip, "--peers", DEAD,
                            maddr, "--learner-key", key, "--client-mode", "--rpc-timeout", "10"])
        joined = {"s1": s1.wait_event("joined", 120), "s2": s2.wait_event("joined", 120)}
        yield {"emu": emu, "learner": learner, "s1": s1, "s2": s2, "ready": ready, "joined": joined, "tmp": tmp,
               "join_s": time.monotonic() - t0}
    finally:
        emu.close()


def test_nat_sampler_joins_delivers_and_fetches(wan):
    emu, learner, s1 = wan["emu"], wan["learner"], wan["s1"]
    assert wan["ready"]["maddrs"][0].startswith("/ip4/10.77.0.10/tcp/4001/p2p/")
    assert wan["joined"]["s1"]["learner_key"] == wan["ready"]["key"]
    key1 = wan["joined"]["s1"]["key"].split(":")[1]
    s1.request("submit", start=0, n=5)
    settle(learner, [s1])
    assert {k: n for k, n in rollouts(learner).items() if k[0] == key1} == {(key1, q): 1 for q in range(5)}
    size = 2 << 20
    pub = learner.request("publish", v=1, size=size, chunk=CHUNK)
    assert pub["sha"] == sha(1, size)
    assert s1.wait_event("version", 120, v=1)["sha"] == pub["sha"]
    # NAT for real: the learner sees the sampler only as its router's public address, the router masqueraded its
    # connections, and the sampler's own address cannot be reached from the internet.
    seen = emu.peers_seen_by("L")
    assert emu.hosts["home1"].public_ip in seen and emu.hosts["home1"].ip not in seen, seen
    assert emu.nat_packets("home1") > 0
    probe = emu.run_in("L", sys.executable, "-c",
                       f"import socket; socket.create_connection(('{emu.hosts['home1'].ip}', 22), timeout=3)",
                       check=False)
    assert probe.returncode != 0 and ("unreachable" in probe.stderr or "timed out" in probe.stderr), probe.stderr


def test_bootstrap_peer_down(wan):
    emu, learner, s2 = wan["emu"], wan["learner"], wan["s2"]
    log = s2.log_text()
    assert "10.77.0.99" in log and "is unreachable" in log and "skipping" in log
    assert wan["joined"]["s2"]["learner_key"] == wan["ready"]["key"]
    key2 = wan["joined"]["s2"]["key"].split(":")[1]
    s2.request("submit", start=0, n=2)
    settle(learner, [s2])
    assert {k: n for k, n in rollouts(learner).items() if k[0] == key2} == {(key2, 0): 1, (key2, 1): 1}
    # every bootstrap peer down: a one-line error within seconds, not a hang
    t0 = time.monotonic()
    lone = NodeProc(["sampler", "--state", str(wan["tmp"] / "lone"), "--host", emu.hosts["home2"].ip, "--peers",
                     DEAD, "--client-mode"], wan["tmp"] / "lone.log", netns=emu.hosts["home2"].ns)
    emu.procs.append(lone)
    lone.popen.wait(90)
    assert lone.popen.returncode != 0
    assert "none of the bootstrap peers could be reached" in lone.log_text()
    assert time.monotonic() - t0 < 90


def test_link_drops_mid_transfer(wan):
    emu, learner, s1 = wan["emu"], wan["learner"], wan["s1"]
    key1 = wan["joined"]["s1"]["key"].split(":")[1]
    size = 8 << 20  # ~7 s at 10 Mbit/s
    before = s1.request("stats")["stats"]["bytes_down"]
    pub = learner.request("publish", v=2, size=size, chunk=CHUNK)
    wait_until(lambda: s1.request("stats")["stats"]["bytes_down"] - before > 2 << 20, 60, "the download to start")
    emu.set_link("home1", up=False)
    try:
        s1.request("submit", start=100, n=3)  # written to the outbox while the link is down
        time.sleep(8)  # longer than the sampler's rpc/stall timeouts: its streams die
        mid = s1.request("stats")["stats"]
        assert mid["version"] != 2 and mid["outbox"] == 3
    finally:
        emu.set_link("home1", up=True)
    ev = s1.wait_event("version", 180, v=2)
    assert ev["sha"] == pub["sha"] == sha(2, size)
    settle(learner, [s1])
    got = {k: n for k, n in rollouts(learner).items() if k[0] == key1 and k[1] >= 100}
    assert got == {(key1, q): 1 for q in (100, 101, 102)}
