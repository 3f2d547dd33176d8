"""Weight versions as deltas, end to end: a learner and samplers as separate OS processes on 127.0.0.1.

Versions are bf16 buffers that change in few elements from one version to the next, mostly the same ones (as RL
versions with fp32 master weights do; ``evolving_weights``), published with a keyframe every 5 versions (v1, v6).
One swarm for the module: v1 -> v10 reach three samplers as step deltas, bit-exact; a fourth sampler stopped at v3
comes back 7 versions behind, and a newcomer joins at v10: each takes the cheapest plan, asserted from the bytes it
fetched against every alternative the learner's delta sizes allow.

Two faults, each with its own processes: a peer serving corrupted delta chunks is caught by the hash in the signed
delta manifest and blacklisted, and a sampler SIGKILLed halfway through a delta resumes from the chunks on disk.
Every process is stopped by PID.
"""

from __future__ import annotations

import hashlib

import pytest

from node.fault_points import ENV
from tests.swarm_helpers.procs import PATIENT_RATION, NodeProc, assert_helpers_exit, stop_all, wait_until

pytestmark = pytest.mark.timeout(300)

SIZE = 4 << 20  # 2 Mi bf16 elements
CHUNK = 256 << 10
DELTA_CHUNK = 256 << 10  # of the XOR stream, before compression: 16 delta chunks
KEYFRAME_EVERY = 5
SETTINGS = ["--set", f"keyframe_every={KEYFRAME_EVERY}", f"delta_chunk_size={DELTA_CHUNK}"]


EVOLVE = {"step": 0.01, "hot": 0.02}  # per version, 1 % of the elements change (of a fixed 2 %): ~1.2 % deltas


def expected_sha(version: int, evolve: dict = EVOLVE) -> str:
    from tests.swarm_helpers.node_proc import evolving_weights

    return hashlib.sha256(evolving_weights(version, SIZE, **evolve)).hexdigest()


def publish(learner: NodeProc, v: int, evolve: dict = EVOLVE) -> dict:
    pub = learner.request("publish", v=v, size=SIZE, chunk=CHUNK, evolve=evolve)
    assert pub["sha"] == expected_sha(v, evolve)
    return pub


def catchup(sampler: NodeProc, v: int) -> dict:
    return sampler.request("stats")["stats"]["catchup"][str(v)]


# The two fault tests come first (pytest runs a file's tests in order): each starts its own processes, and the
# module's shared swarm below, once started, runs until the module's last test is done.


def learner_deltas(learner: NodeProc) -> dict:
    return {(b, v): n for b, v, n in learner.request("stats")["stats"]["deltas"]}


@pytest.mark.slow
def test_peer_serving_corrupt_delta_chunks_is_caught_and_avoided(tmp_path):
    """A sampler serves every delta chunk with one byte flipped (full versions honestly: ``--evil-deltas``). Two
    honest samplers that hold v1 catch up to v2 and v3 by deltas: each chunk from the liar fails the SHA-256 of the
    signed delta manifest, the liar is blacklisted, and both versions are still rebuilt bit-exact."""
    evolve = {"step": 0.1, "hot": 0.2}  # deltas of ~8 % of the version: 16 chunks of ~20 kB
    procs = []
    try:
        learner = NodeProc(["learner", "--state", str(tmp_path / "L"), "--limit", "1e6", "--ration-interval", "3",
                            *SETTINGS], tmp_path / "learner.log")
        procs.append(learner)
        ready = learner.wait_event("ready", 90)
        join = ["--peers", ready["maddrs"][0], "--learner-key", ready["key"]]
        evil = NodeProc(["sampler", "--state", str(tmp_path / "evil"), *join, "--evil-deltas"], tmp_path / "evil.log")
        honest_args = [["sampler", "--state", str(tmp_path / f"h{i}"), *join] for i in range(2)]
        honest = [NodeProc(a, tmp_path / f"h{i}-1.log") for i, a in enumerate(honest_args)]
        procs += [evil, *honest]
        evil_id = evil.wait_event("joined", 120)["peer_id"]
        for h in honest:
            h.wait_event("joined", 120)
        publish(learner, 1, evolve)
        for s in (evil, *honest):
            assert s.wait_event("version", 90, v=1)["sha"] == expected_sha(1, evolve)

        # the honest samplers go offline holding v1; the liar alone follows to v2, then holds every chunk of 1->2
        stop_all(honest)
        publish(learner, 2, evolve)
        assert evil.wait_event("version", 90, v=2)["sha"] == expected_sha(2, evolve)
        size2 = learner_deltas(learner)[(1, 2)]
        n_chunks = SIZE // DELTA_CHUNK
        served_before = evil.request("stats")["stats"]["chunks_served"]

        honest = [NodeProc(a, tmp_path / f"h{i}-2.log") for i, a in enumerate(honest_args)]
        procs += honest
        for h in honest:
            ev = h.wait_event("version", 120, v=2)
            assert ev["sha"] == expected_sha(2, evolve), "a corrupted delta chunk made it into a rebuilt version"
        stats = [h.request("stats")["stats"] for h in honest]
        for st in stats:
            c = st["catchup"]["2"]
            assert c["plan"] == [[1, 2, size2]], f"caught up by {c['plan']}, not by the delta 1->2"
            # every delta chunk verified exactly once; the bad ones it was sent are extra bytes, never a chunk
            assert st["chunks_from_learner"] + st["chunks_from_peers"] == n_chunks, st
            assert c["fetched_bytes"] >= size2
        caught = [i for i, st in enumerate(stats) if st["bad_chunks"] > 0]
        assert caught, "no honest sampler ever asked the corrupting peer"
        for i in caught:
            reason = stats[i]["blacklisted"].get(evil_id, "")
            assert "of delta 1->2 does not match its hash" in reason, stats[i]["blacklisted"]

        # v3 (the delta 2->3): a sampler that caught the liar never asks it again; the liar keeps serving garbage
        publish(learner, 3, evolve)
        assert evil.wait_event("version", 90, v=3)["sha"] == expected_sha(3, evolve)
        for h in honest:
            assert h.wait_event("version", 120, v=3)["sha"] == expected_sha(3, evolve)
        after = [h.request("stats")["stats"] for h in honest]
        size3 = learner_deltas(learner)[(2, 3)]
        for i, st in enumerate(after):
            assert st["catchup"]["3"]["plan"] == [[2, 3, size3]]
            if i in caught:
                assert st["bad_chunks"] == stats[i]["bad_chunks"], "went back to the blacklisted peer"
        # each honest sampler's one session with the liar ended at its first bad answer: at most the requests
        # pipelined on it (max_inflight_per_peer = 2) were ever served, over both deltas
        served = evil.request("stats")["stats"]["chunks_served"] - served_before
        assert 1 <= served <= 2 * len(honest), f"the corrupting peer kept being asked ({served} chunks served)"
    finally:
        stop_all(procs)


@pytest.mark.slow
def test_sampler_killed_mid_delta_resumes(tmp_path):
    """A sampler at v1 is SIGKILLed with half of the delta 1->2 downloaded (the test-only pause point
    ``delta:half_fetched`` holds it there); restarted on the same state it keeps the verified delta chunks on disk,
    fetches only the rest (asserted to the byte from the chunks found on disk) and rebuilds v2 bit-exact."""
    from protocol.delta import decode_delta_manifest, verify_delta_chunk
    from protocol.errors import ProtocolError

    evolve = {"step": 0.3, "hot": 0.6}  # a large delta (~14 % of the version), 16 chunks
    procs = []
    try:
        learner = NodeProc(["learner", "--state", str(tmp_path / "L"), "--limit", "4e6", *SETTINGS],
                           tmp_path / "learner.log")
        procs.append(learner)
        ready = learner.wait_event("ready", 90)
        args = ["sampler", "--state", str(tmp_path / "s"), "--peers", ready["maddrs"][0], "--learner-key",
                ready["key"]]
        s = NodeProc(args, tmp_path / "s-1.log", env={ENV: "delta:half_fetched@2"})
        procs.append(s)
        s.wait_event("joined", 120)
        publish(learner, 1, evolve)
        assert s.wait_event("version", 90, v=1)["sha"] == expected_sha(1, evolve)
        publish(learner, 2, evolve)
        size = learner_deltas(learner)[(1, 2)]
        wait_until(lambda: "paused at delta:half_fetched (version 2)" in s.log_text(), 60, "half of the delta 1->2")
        assert_helpers_exit(s.crash())

        # what the killed sampler left on disk: the signed delta manifest and the chunks it had verified
        stem = tmp_path / "s" / "weights" / "deltas" / f"d{1:012d}-{2:012d}"
        delta = decode_delta_manifest(stem.with_suffix(".manifest").read_bytes(),
                                       learner=bytes.fromhex(ready["key"].split(":")[1]))
        data = stem.with_suffix(".bin").read_bytes()
        offsets = [sum(delta.chunk_sizes[:i]) for i in range(delta.n_chunks + 1)]
        kept = []
        for i in range(delta.n_chunks):
            try:
                verify_delta_chunk(delta, i, data[offsets[i]:offsets[i + 1]])
                kept.append(i)
            except ProtocolError:
                pass
        assert delta.compressed_size == size and delta.n_chunks == SIZE // DELTA_CHUNK
        assert len(kept) == delta.n_chunks // 2, f"killed with chunks {kept} of the delta on disk"
        left = size - sum(delta.chunk_sizes[i] for i in kept)

        s2 = NodeProc(args, tmp_path / "s-2.log")
        procs.append(s2)
        s2.wait_event("joined", 120)
        ev = s2.wait_event("version", 90, v=2)
        assert ev["sha"] == expected_sha(2, evolve)
        assert f"found stored delta (1, 2): {len(kept)}/{delta.n_chunks} chunks" in s2.log_text()
        c = ev["stats"]["catchup"]["2"]
        assert c["plan"] == [[1, 2, left]], f"resumed by {c['plan']}, not by the rest of the delta 1->2"
        assert c["fetched_bytes"] == ev["stats"]["bytes_down"] == left, (
            f"fetched {c['fetched_bytes']} bytes after the restart; {left} of the {size}-byte delta were missing")
    finally:
        stop_all(procs)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deltas")
    procs = []
    try:
        learner = NodeProc(["learner", "--state", str(tmp / "L"), "--limit", "8e6", *PATIENT_RATION, *SETTINGS],
                           tmp / "learner.log")
        procs.append(learner)
        ready = learner.wait_event("ready", 90)
        join = ["--peers", ready["maddrs"][0], "--learner-key", ready["key"]]
        samplers = [NodeProc(["sampler", "--state", str(tmp / f"s{i}"), *join], tmp / f"s{i}.log") for i in range(4)]
        procs += samplers
        for s in samplers:
            s.wait_event("joined", 120)
        yield {"learner": learner, "samplers": samplers, "join": join, "tmp": tmp, "procs": procs}
    finally:
        stop_all(procs)


def test_versions_reach_samplers_as_deltas_bit_exact(swarm):
    learner, samplers = swarm["learner"], swarm["samplers"]
    stale = samplers[3]
    for v in range(1, 11):
        pub = publish(learner, v)
        following = samplers if v <= 3 else samplers[:3]
        for s in following:
            assert s.wait_event("version", 90, v=v)["sha"] == pub["sha"], f"{s.args[2]} holds a corrupted v{v}"
        if v == 3:
            stale.stop()  # graceful: it keeps v1 (keyframe), v2, v3 on disk and comes back in the next test
    stats = learner.request("stats")["stats"]
    assert stats["keyframe"] == 6
    sizes = {(b, v): n for b, v, n in stats["deltas"]}
    for v in range(2, 11):
        step = sizes[(v - 1, v)]
        assert step < SIZE * 0.03, f"the delta into v{v} is {step / SIZE:.1%} of the version"
        for s in samplers[:3]:
            c = catchup(s, v)
            assert c["plan"] == [[v - 1, v, step]], f"{s.args[2]} reached v{v} by {c['plan']}"
            assert c["fetched_bytes"] == step, f"{s.args[2]} fetched {c['fetched_bytes']} bytes for a {step}-byte delta"
        # no chunk of the full version left the learner (its manifest did: every sampler rebuilt it from the delta)
        assert stats["upload_by_version"].get(str(v), 0) < CHUNK // 8
        assert stats["upload_by_delta"][f"{v - 1}-{v}"] <= 2 * step, (stats["upload_by_delta"], stats["hoard_waivers"])
    s0 = samplers[0].request("stats")["stats"]
    assert s0["bad_chunks"] == 0 and not s0["blacklisted"]
    assert sum(s.request("stats")["stats"]["delta_bytes_uploaded"] for s in samplers[:3]) > 0, \
        "samplers never passed delta chunks to each other"


def test_stale_sampler_and_newcomer_take_the_cheapest_plan(swarm):
    learner, tmp, join = swarm["learner"], swarm["tmp"], swarm["join"]
    back = NodeProc(swarm["samplers"][3].args, tmp / "s3-back.log")
    newcomer = NodeProc(["sampler", "--state", str(tmp / "new"), *join], tmp / "new.log")
    swarm["procs"] += [back, newcomer]
    for s in (back, newcomer):
        assert s.wait_event("version", 120, v=10)["sha"] == expected_sha(10)
    assert "found stored version 3" in back.log_text()

    sizes = learner_deltas(learner)
    chain = {(v - 1, v): sizes[(v - 1, v)] for v in range(4, 11)}
    cumulative = sizes[(6, 10)]
    to_keyframe = sum(chain[(v - 1, v)] for v in range(4, 7))
    options = {  # every way from v3 (and the keyframe v1 it kept) to v10 the learner's deltas allow
        "chain 3->10": sum(chain.values()),
        "chain 3->6, cumulative 6->10": to_keyframe + cumulative,
        "full v6, cumulative 6->10": SIZE + cumulative,
        "full v10": SIZE,
    }
    assert min(options, key=options.get) == "chain 3->6, cumulative 6->10", options
    c = catchup(back, 10)
    assert c["plan"] == [[3, 4, chain[(3, 4)]], [4, 5, chain[(4, 5)]], [5, 6, chain[(5, 6)]], [6, 10, cumulative]]
    assert c["fetched_bytes"] == c["planned_bytes"] == options["chain 3->6, cumulative 6->10"]

    # a newcomer holds nothing: the full v10 beats the keyframe v6 plus the cumulative delta
    c = catchup(newcomer, 10)
    assert c["plan"] == [[None, 10, SIZE]] and c["fetched_bytes"] == SIZE
