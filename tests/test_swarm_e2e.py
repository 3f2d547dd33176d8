"""The swarm transport end to end: a learner and three samplers as separate OS processes on 127.0.0.1.

One swarm for the module (starting hivemind nodes costs seconds): joining (pinned key, trust on first use, a dead
bootstrap peer, the learner found through the DHT by a sampler that was given only another sampler's address),
rollout delivery (accept and reject, each group exactly once), weight versions v1 -> v2 -> v3 reaching every sampler
bit-exact with the learner's upload bounded, and silent/slow clients that must not stall the learner. Every process
is stopped by PID when the module ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from tests.swarm_helpers.procs import PATIENT_RATION, NodeProc, rollouts, settle, stop_all

pytestmark = pytest.mark.timeout(240)

SIZE = 4 << 20
CHUNK = 256 << 10
DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmcNGxaJZJ3ndfMN1GFXrBTSw5ELixtjFzS1BgsaN5yu4y"


def expected_sha(version: int, size: int = SIZE) -> str:
    from tests.swarm_helpers.node_proc import synthetic_weights

    return hashlib.sha256(synthetic_weights(version, size)).hexdigest()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm")
    procs = []
    try:
        learner = NodeProc(["learner", "--state", str(tmp / "L"), "--limit", "8e6", *PATIENT_RATION],
                           tmp / "learner.log")
        procs.append(learner)
        ready = learner.wait_event("ready", 90)
        maddr, key = ready["maddrs"][0], ready["key"]
        s0 = NodeProc(["sampler", "--state", str(tmp / "s0"), "--peers", maddr, "--learner-key", key, "--limit", "8e6"],
                      tmp / "s0.log")
        s1 = NodeProc(["sampler", "--state", str(tmp / "s1"), "--peers", maddr, "--limit", "8e6"], tmp / "s1.log")
        procs += [s0, s1]
        joined = [s0.wait_event("joined", 120), s1.wait_event("joined", 120)]
        # s2 knows a dead peer and s0, not the learner: it must find the learner's address in the DHT
        s2 = NodeProc(["sampler", "--state", str(tmp / "s2"), "--peers", DEAD_PEER, joined[0]["maddrs"][0],
                       "--learner-key", key, "--limit", "8e6"], tmp / "s2.log")
        procs.append(s2)
        joined.append(s2.wait_event("joined", 120))
        yield {"learner": learner, "samplers": [s0, s1, s2], "ready": ready, "joined": joined, "tmp": tmp}
    finally:
        stop_all(procs)


def test_join_command_and_discovery(swarm):
    ready = swarm["ready"]
    join = ready["join"]
    assert ready["maddrs"] and all(m.startswith("/ip4/127.0.0.1/tcp/") for m in ready["maddrs"])
    assert f"--peers {ready['maddrs'][0]}" in join and f"--learner-key {ready['key']}" in join
    assert ready["peer_id"] in ready["maddrs"][0]
    banner = swarm["learner"].output
    assert "samplers join with" in banner and join in banner and ready["key"] in banner
    for j in swarm["joined"]:
        assert j["learner_key"] == ready["key"]
        assert j["maddrs"] and all(m.startswith("/ip4/127.0.0.1/tcp/") for m in j["maddrs"])
    s0, s1, s2 = swarm["samplers"]
    assert "trusting the first learner found" in s1.log_text()  # TOFU: loud warning
    assert "trusting the first learner found" not in s0.log_text()
    s2_log = s2.log_text()
    assert "is unreachable" in s2_log and "skipping" in s2_log  # dead bootstrap peer skipped, not fatal
    assert ready["peer_id"] not in " ".join(s2.args)  # s2 was never told where the learner is ...
    assert f"learner {ready['peer_id']} at /ip4/127.0.0.1/" in s2_log  # ... and found it through the DHT


def test_rollouts_accepted_once_and_rejected_with_reason(swarm):
    learner = swarm["learner"]
    s0, s1, s2 = swarm["samplers"]
    keys = {i: j["key"].split(":")[1] for i, j in enumerate(swarm["joined"])}
    before = learner.request("stats")["stats"]
    s0.request("submit", start=0, n=5)
    s1.request("submit", start=0, n=3)
    s2.request("submit", start=0, n=2, bad=True)
    after = settle(learner, [s0, s1, s2])
    want = {(keys[0], q) for q in range(5)} | {(keys[1], q) for q in range(3)}
    got = {k: n for k, n in rollouts(learner).items() if k[1] < 100}  # seqs >= 100: other tests
    assert got == {k: 1 for k in want}  # each accepted group reaches the trainer exactly once; none rejected does
    assert after.get("accepted", 0) - before.get("accepted", 0) == 8
    assert after.get("rejected", 0) - before.get("rejected", 0) == 2
    assert after["rejections"].get("bad_signature", 0) - before["rejections"].get("bad_signature", 0) == 2
    st2 = s2.request("stats")["stats"]  # the sampler is told why
    assert st2["rejected"] == 2 and st2["rejections"] == {"bad_signature": 2} and st2.get("accepted", 0) == 0
    for s, n in ((s0, 5), (s1, 3)):
        st = s.request("stats")["stats"]
        assert st["accepted"] == n and st.get("rejected", 0) == 0


def test_versions_reach_every_sampler_bit_exact(swarm):
    learner = swarm["learner"]
    samplers = swarm["samplers"]
    for v in (1, 2, 3):
        pub = learner.request("publish", v=v, size=SIZE, chunk=CHUNK)
        assert pub["sha"] == expected_sha(v)
        for s in samplers:
            ev = s.wait_event("version", 90, v=v)
            assert ev["sha"] == pub["sha"], f"sampler {s.args} holds corrupted version {v}"
    stats = learner.request("stats")["stats"]
    for v in (1, 2, 3):
        uploaded = stats["upload_by_version"][str(v)]
        assert uploaded <= 2 * SIZE, f"learner uploaded {uploaded / SIZE:.2f} x the weights for v{v}"
    from_peers = sum(s.request("stats")["stats"]["chunks_from_peers"] for s in samplers)
    assert from_peers > 0, "samplers never exchanged chunks"
    # each sampler keeps the last two versions on disk, and the keyframe (v1, the first version: --keyframe-every
    # 10) that a newcomer's cumulative delta starts from
    tmp = swarm["tmp"]
    for i in range(3):
        kept = sorted(p.name for p in (tmp / f"s{i}" / "weights").glob("*.bin"))
        assert kept == ["v000000000001.bin", "v000000000002.bin", "v000000000003.bin"], kept


def test_silent_and_slow_clients_do_not_stall_the_learner(swarm):
    """A peer that opens streams and then says nothing, or asks and never reads, costs the learner bounded
    waits only: other samplers keep delivering and downloading meanwhile, and the learner drops those streams."""
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

    from node.loop import LoopThread
    from node.wire import encode_frame, proto_name

    learner, samplers = swarm["learner"], swarm["samplers"]
    ready = swarm["ready"]
    run = "swarm-test"
    loop = LoopThread().start()

    async def open_silent():
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
        peer = PeerID.from_base58(ready["peer_id"])
        maddr = Multiaddr(ready["maddrs"][0]).decapsulate(Multiaddr(f"/p2p/{ready['peer_id']}"))
        await p2p._client.connect(peer, [maddr])
        streams = []
        for _ in range(6):  # say nothing at all
            _, r, w = await p2p.call_binary_stream_handler(peer, proto_name(run, "rollouts"))
            streams.append((r, w))
        for _ in range(6):  # ask for a chunk, never read the answer
            _, r, w = await p2p.call_binary_stream_handler(peer, proto_name(run, "weights"))
            w.write(encode_frame({"op": "chunk", "v": 3, "d": None, "i": 0, "excl": None}))
            streams.append((r, w))
        _, r, w = await p2p.call_binary_stream_handler(peer, proto_name(run, "rollouts"))
        w.write(b"\x00\x00\x00\x10")  # half a frame prefix, then silence
        streams.append((r, w))
        return p2p, streams

    async def closed_by_learner(streams, timeout):
        async def eof(r):
            try:
                while await asyncio.wait_for(r.read(1 << 20), timeout):
                    pass
                return True
            except asyncio.TimeoutError:
                return False

        return await asyncio.gather(*(eof(r) for r, _ in streams))

    p2p = None
    try:
        p2p, streams = loop.run(open_silent(), 60)
        t0 = time.monotonic()
        s0 = samplers[0]
        s0.request("submit", start=100, n=3)
        key0 = swarm["joined"][0]["key"].split(":")[1]
        got = set()
        while len(got) < 3:
            ev = learner.wait_event("rollout", 30)
            if ev["sampler"] == key0:
                got.add(ev["seq"])
        assert got == {100, 101, 102}
        pub = learner.request("publish", v=4, size=SIZE, chunk=CHUNK)
        for s in samplers:
            assert s.wait_event("version", 90, v=4)["sha"] == pub["sha"]
        assert time.monotonic() - t0 < 60
        # the learner hangs up on every silent stream after its rpc/stall/keep-alive timeouts (5/5/10 s here)
        closed = loop.run(closed_by_learner(streams, 30), 60)
        assert all(closed), [i for i, c in enumerate(closed) if not c]
    finally:
        if p2p is not None:
            loop.run(p2p.shutdown(), 10)
        loop.stop()
