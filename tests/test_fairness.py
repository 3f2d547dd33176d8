"""Fair limits (node/fairness.py, the rationer's hoarding waiver, node/sampler_stats.py): no single peer or flood of
fresh keys starves an honest sampler.

Bookkeeping first (one process, milliseconds), then real hivemind nodes as OS processes on 127.0.0.1: a learner
and an honest sampler from tests/swarm_helpers/node_proc, attackers from scripts/bench/attackers (each its own
libp2p peer): a slowloris peer's streams are closed and the honest sampler gets through; a fresh-key flood cannot
take an established sampler's inbox share; a peer's weight requests are capped and a peer that takes every first
copy of a version does not make the honest sampler wait out the ration interval. Every process is stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import numpy as np
import pytest

from node.chunk_server import HOARD_GRACE_S, ChunkRationer
from node.fairness import InboxShares, KeyHistory, PeerRateLimiter, PushStreams
from node.sampler_stats import SamplerStats, fold_sampler_stats
from tests.swarm_helpers.procs import NodeProc, stop_all, wait_until

RUN = "swarm-test"


# ------------------------------------------------------------------------------------------------- bookkeeping
def test_fresh_keys_share_a_small_pool_and_established_keys_keep_theirs():
    history = KeyHistory(max_keys=1000)
    shares = InboxShares(16, history, fresh_share=0.0625, trusted_after=4)
    for _ in range(50):
        history.accepted(b"honest")
    for _ in range(10):
        history.accepted(b"newer")
    fresh_in = 0
    for i in range(20_000):  # the flood: every key new, each tries once
        key = b"sybil%d" % i
        if shares.admits(key):
            shares.put(key)
            history.accepted(key)
            fresh_in += 1
    assert fresh_in == shares.fresh_pool == 1
    assert history.count(b"honest") == 50  # 20,000 fresh keys went through a 1,000-key LRU: the veteran stayed
    honest_in = 0
    while shares.admits(b"honest", now=0.0):
        shares.put(b"honest")
        honest_in += 1
    assert honest_in == shares.trusted_room == 15  # alone among established keys: all of their room
    assert not shares.admits(b"newer", now=1.0)  # the room is full ...
    shares.taken(b"honest")
    shares.taken(b"sybil0")
    assert shares.fresh_total == 0 and shares.trusted_total == 14
    # ... and the slot that frees goes to the key under its share (it asked: it competes), not to the one over it;
    # the split follows the (capped) history, 50 vs 10
    assert shares.quota(b"honest") == (15 * 50) // 60 == 12 and shares.quota(b"newer") == (15 * 10) // 60 == 2
    assert not shares.admits(b"honest", now=2.0) and shares.admits(b"newer", now=2.0)
    # a key that stopped asking stops competing
    assert shares.quota(b"honest") == 12
    shares.admits(b"honest", now=20.0)
    assert shares.quota(b"honest") == 15


def test_push_streams_per_peer_cap_idle_close_and_eviction():
    closed = []
    streams = PushStreams(max_total=4, max_per_peer=2, idle_timeout=10.0, evict_grace=2.0)
    a1 = streams.open("A", lambda: closed.append("a1"), now=0.0)
    a2 = streams.open("A", lambda: closed.append("a2"), now=0.0)
    assert a1 and a2 and streams.open("A", lambda: None, now=0.0) is None  # per-peer cap
    b1 = streams.open("B", lambda: closed.append("b1"), now=1.0)
    b2 = streams.open("B", lambda: closed.append("b2"), now=1.0)
    assert len(streams) == 4
    assert streams.open("C", lambda: None, now=1.5) is None  # everyone is younger than the grace: refused
    b1.delivered(now=4.0)
    b2.delivered(now=4.0)
    c1 = streams.open("C", lambda: closed.append("c1"), now=5.0)  # A's have gone 5 s without a group: one goes
    assert c1 is not None and closed == ["a1"] and a1.closed_by_us and streams.evicted == 1
    assert not streams.expired(b1, now=13.9) and streams.expired(b1, now=14.1)  # 10 s after its last group
    for s in (a2, b1, b2, c1):
        streams.release(s)
    assert len(streams) == 0 and streams.snapshot()["push_peers"] == 0


def test_sampler_stats_stay_bounded_and_fold_back_exactly():
    stats = SamplerStats(top_n=8, full_every=10)
    records = []
    for i in range(20_000):
        for key in ("honest", f"sybil{i}"):
            stats[key]["accepted"] += 1
            stats[key]["tokens"] += 3
        if i % 50 == 0:
            records.append(stats.metrics())
    records.append(stats.metrics())
    assert len(stats._entries) <= 4 * 8  # memory: 32 keys at most, whatever came
    assert len(stats) >= 20_000
    assert max(len(json.dumps(r)) for r in records) < 2_000  # every metrics line stays small
    assert all(len(r["sampler_delta"]) <= 9 for r in records)
    folded = fold_sampler_stats(records)
    assert folded["honest"] == {"accepted": 20_000, "tokens": 60_000}
    assert sum(v["accepted"] for v in folded.values()) == 40_000  # nothing lost: the rest is in "others"
    assert stats.totals()["honest"]["accepted"] == 20_000 and len(stats.totals()) <= 9


def test_rationer_serves_what_a_hoarder_took_without_waiting():
    r = ChunkRationer(interval=60.0, upload_limit=None)
    r.register(1, 16, 16 << 20)
    one = np.zeros(16, dtype=bool)
    for i in range(16):  # the thief asks for every chunk by index, first
        ask = one.copy()
        ask[i] = True
        assert r.choose(1, ask, i, now=0.0, requester="thief") == (i, 0.0)
    honest = np.ones(16, dtype=bool)
    # within the grace a hoarder gets to pass its copies on, the answer is "rationed, retry when the grace ends"
    assert r.choose(1, honest, None, now=1.0, requester="honest") == (None, HOARD_GRACE_S - 1.0)
    got = [r.choose(1, honest, None, now=HOARD_GRACE_S, requester="honest")[0] for _ in range(16)]
    assert sorted(got) == list(range(16)) and r.hoard_waivers == 16
    # two honest peers that split a version between them are not hoarders: the second copy waits as before
    r2 = ChunkRationer(interval=60.0, upload_limit=None)
    r2.register(1, 16, 16 << 20)
    for i in range(16):
        r2.choose(1, honest, None, now=0.0, requester="AB"[i % 2])
    assert r2.choose(1, honest, None, now=1.0, requester="C")[0] is None and r2.hoard_waivers == 0


def test_peer_rate_limiter():
    lim = PeerRateLimiter(10.0, burst_s=2.0, max_peers=2)
    assert sum(lim.allow("A", now=0.0) for _ in range(100)) == 20  # a burst of 2 s' worth
    assert lim.allow("B", now=0.0) and lim.allow("A", now=0.15) and not lim.allow("A", now=0.15)
    assert PeerRateLimiter(None).allow("A") and lim.limited == 81


# ------------------------------------------------------------------------------------------------- real nodes
def start_learner(procs: list, tmp, *args: str):
    learner = NodeProc(["learner", "--state", str(tmp / "L"), *args], tmp / "learner.log")
    procs.append(learner)
    ready = learner.wait_event("ready", 90)
    return learner, ready["maddrs"][0], ready["key"]


def start_sampler(procs: list, tmp, maddr, key, *args: str, name: str = "s"):
    s = NodeProc(["sampler", "--state", str(tmp / name), "--peers", maddr, "--learner-key", key, *args],
                 tmp / f"{name}.log")
    procs.append(s)
    joined = s.wait_event("joined", 120)
    return s, joined["key"].split(":")[1]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """One learner for the module, with small limits so the attacks bite quickly: 8 push streams (4 per peer),
    3 s without an accepted group closes a stream, a 16-group inbox (1 slot for fresh keys, established after 4
    groups) drained at 10 groups/s, a 60 s ration interval, 20 weight requests/s per peer. The honest sampler is
    started by the first test that needs it (:func:`honest`), so the ration thief can be first at version 1."""
    tmp = tmp_path_factory.mktemp("fair")
    procs: list = []
    try:
        learner, maddr, key = start_learner(
            procs, tmp, "--take-rate", "10", "--ration-interval", "60",
            "--set", "max_push_streams=8", "max_push_streams_per_peer=4", "push_idle_timeout=3", "inbox_size=16",
            "trusted_after=4", "chunk_requests_per_peer=20")
        yield {"learner": learner, "maddr": maddr, "key": key, "tmp": tmp, "procs": procs}
    finally:
        stop_all(procs)


def honest(swarm):
    """The module's honest sampler and its key (started on first use)."""
    if "sampler" not in swarm:
        swarm["sampler"], swarm["skey"] = start_sampler(swarm["procs"], swarm["tmp"], swarm["maddr"], swarm["key"])
    return swarm["sampler"], swarm["skey"]


def taken_by(learner: NodeProc, key: str, seqs) -> set:
    return {ev["seq"] for ev in learner.history if ev.get("event") == "rollout" and ev["sampler"] == key
            and ev["seq"] in seqs}


def raw_peers(loop, n: int, maddr: str):
    """``n`` bare libp2p peers in this process (each its own peer id), connected to the node at ``maddr``."""
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

    peer_id = maddr.rsplit("/p2p/", 1)[1]
    target = PeerID.from_base58(peer_id)

    async def make():
        out = []
        for _ in range(n):
            p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
            out.append(p2p)
            await p2p._client.connect(target, [Multiaddr(maddr).decapsulate(Multiaddr(f"/p2p/{peer_id}"))])
        return out

    return loop.run(make(), 60), target


def close_peers(loop, peers, tasks=()) -> None:
    async def close():
        for t in tasks:
            t.cancel()
        for p2p in peers:
            await p2p.shutdown()

    loop.run(close(), 20)


@pytest.mark.timeout(180)
def test_weight_requests_are_capped_per_peer_and_a_ration_thief_does_not_delay_others(swarm):
    from node.loop import LoopThread
    from node.wire import encode_frame, proto_name, recv_frame
    from scripts.bench.attackers import steal

    learner, maddr, key = swarm["learner"], swarm["maddr"], swarm["key"]
    size, chunk = 1 << 20, 64 << 10
    peers = []
    loop = LoopThread().start()
    stolen = Counter()
    try:
        assert "sampler" not in swarm, "this test must run first: nobody else may have asked for version 1"
        learner.request("publish", v=1, size=size, chunk=chunk)
        peers, target = raw_peers(loop, 2, maddr)
        # the thief takes every first copy of v1 before anybody else asks
        loop.run(steal(peers[0], target, RUN, 1, None, 4, 20.0, stolen), 60)

        async def flood_have():  # another peer asks 100 times at once
            _, r, w = await peers[1].call_binary_stream_handler(target, proto_name(RUN, "weights"))
            w.write(b"".join(encode_frame({"op": "have", "v": 1}) for _ in range(100)))
            answers = [(await recv_frame(r, timeout=10, max_payload=0))[0] for _ in range(100)]
            w.close()
            return answers

        answers = loop.run(flood_have(), 60)
        ok = sum(a.get("ok") is True for a in answers)
        limited = sum(a.get("err") == "busy" and a.get("msg") == "request rate limit" for a in answers)
        t0 = time.monotonic()
        sampler, _ = honest(swarm)  # joins now: the learner is its only source
        sampler.wait_event("version", 60, v=1)
        honest_s = time.monotonic() - t0
        st = learner.request("stats")["stats"]
    finally:
        close_peers(loop, peers)
        loop.stop()
    assert stolen["chunks_stolen"] == size // chunk, stolen
    assert 40 <= ok <= 45 and ok + limited == 100, (ok, limited)  # a burst of 2 s' worth, the rest told busy
    assert st["chunk_requests_limited"] >= 55
    # without the waiver the honest sampler would wait out the 60 s ration interval for every chunk
    assert honest_s < 45, honest_s


@pytest.mark.timeout(180)
def test_slowloris_streams_are_closed_and_the_honest_sampler_gets_through(swarm):
    from node.loop import LoopThread
    from scripts.bench.attackers import slowloris

    learner, maddr = swarm["learner"], swarm["maddr"]
    sampler, skey = honest(swarm)
    peers, tasks = [], []
    loop = LoopThread().start()
    counters, lifetimes = [Counter(), Counter()], [[], []]
    before = learner.request("stats")["stats"]
    try:
        # two slowloris peers (separate peer ids) try to hold 12 streams each: junk every second, far inside
        # the learner's 5 s read timeout, so only "no accepted group for 3 s" can close them
        peers, target = raw_peers(loop, 2, maddr)

        async def attack():
            return [asyncio.ensure_future(slowloris(p2p, target, RUN, 12, 1.0, c, lt))
                    for p2p, c, lt in zip(peers, counters, lifetimes)]

        tasks = loop.run(attack(), 30)
        wait_until(lambda: learner.request("stats")["stats"].get("push_streams", 0) >= 8, 60, "the slots to fill")
        t0 = time.monotonic()
        sampler.request("submit", start=0, n=20)
        wait_until(lambda: taken_by(learner, skey, range(20)) == set(range(20)), 60, "the honest groups")
        honest_s = time.monotonic() - t0
        time.sleep(4)  # let every slowloris stream reach its idle limit at least once
        st = learner.request("stats")["stats"]
    finally:
        close_peers(loop, peers, tasks)
        loop.stop()
    assert honest_s < 45, honest_s
    assert st["push_idle_closed"] - before.get("push_idle_closed", 0) >= 8, st
    assert st["push_refused_peer_cap"] > before.get("push_refused_peer_cap", 0), st
    assert st["accepted"] - before.get("accepted", 0) == 20 and st["rejections"].get("malformed", 0) > 0
    for c, lt in zip(counters, lifetimes):
        assert c.get("closed_by_learner", 0) >= 4 and c.get("refused", 0) > 0, c
        assert lt and sorted(lt)[len(lt) // 2] < 3 + 1 + 3, lifetimes  # idle limit + one frame interval + slack


@pytest.mark.timeout(180)
def test_fresh_key_flood_cannot_take_an_established_samplers_share(swarm):
    """The trainer takes 10 groups/s from a 16-group inbox: the inbox is full and its split is the share."""
    from node.loop import LoopThread
    from scripts.bench.attackers import sybil, synthetic_groups

    learner, maddr = swarm["learner"], swarm["maddr"]
    sampler, skey = honest(swarm)
    peers, tasks = [], []
    loop = LoopThread().start()
    flood = Counter()
    try:
        sampler.request("submit", start=200, n=8)  # the honest sampler's history
        wait_until(lambda: taken_by(learner, skey, range(200, 208)) == set(range(200, 208)), 60,
                   "the honest history")
        peers, target = raw_peers(loop, 1, maddr)

        async def attack():
            return [asyncio.ensure_future(sybil(peers[0], target, RUN, 20_000, 4, 0.0, flood, synthetic_groups(RUN)))]

        tasks = loop.run(attack(), 30)
        wait_until(lambda: flood.get("busy", 0) > 50, 60, "the flood to hit the inbox")
        sampler.request("submit", start=100, n=60)
        wait_until(lambda: taken_by(learner, skey, range(100, 160)) == set(range(100, 160)), 90,
                   "the honest groups during the flood")
        st = learner.request("stats")["stats"]
    finally:
        close_peers(loop, peers, tasks)
        loop.stop()
    takes = [ev for ev in learner.history if ev.get("event") == "rollout"]
    during = [i for i, ev in enumerate(takes) if ev["sampler"] == skey and 100 <= ev["seq"] < 160]
    window = Counter("honest" if ev["sampler"] == skey else "sybil" for ev in takes[during[0]:during[-1] + 1])
    assert window["honest"] == 60
    assert window["sybil"] <= 0.25 * (window["honest"] + window["sybil"]), window  # pool: 1 of 16 slots
    assert flood.get("busy", 0) > 10 * flood.get("accepted", 0), flood  # the flood was mostly turned away
    assert st["busy_fresh"] > 0 and st["fresh_queued"] <= st["fresh_pool"] == 1, st
