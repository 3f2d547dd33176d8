"""Weight versions as deltas, end to end: a learner and samplers as separate OS processes on 127.0.0.1.

Versions are bf16 buffers that change in few elements from one version to the next, mostly the same ones (as RL
versions with fp32 master weights do; ``evolving_weights``), published with a keyframe every 5 versions (v1, v6).
One swarm for the module: v1 -> v10 reach three samplers as step deltas, bit-exact; a fourth sampler stopped at v3
comes back 7 versions behind, and a newcomer joins at v10: each takes the cheapest plan, asserted from the bytes it
fetched against every alternative the learner's delta sizes allow. Every process is stopped by PID.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.swarm_helpers.procs import NodeProc, stop_all

pytestmark = pytest.mark.timeout(300)

SIZE = 4 << 20  # 2 Mi bf16 elements
CHUNK = 256 << 10
DELTA_CHUNK = 256 << 10  # of the XOR stream, before compression: 16 delta chunks
KEYFRAME_EVERY = 5
SETTINGS = ["--set", f"keyframe_every={KEYFRAME_EVERY}", f"delta_chunk_size={DELTA_CHUNK}"]


def expected_sha(version: int) -> str:
    from tests.swarm_helpers.node_proc import evolving_weights

    return hashlib.sha256(evolving_weights(version, SIZE)).hexdigest()


def publish(learner: NodeProc, v: int) -> dict:
    pub = learner.request("publish", v=v, size=SIZE, chunk=CHUNK, evolve={"step": 0.01, "hot": 0.02})
    assert pub["sha"] == expected_sha(v)
    return pub


def catchup(sampler: NodeProc, v: int) -> dict:
    return sampler.request("stats")["stats"]["catchup"][str(v)]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deltas")
    procs = []
    try:
        learner = NodeProc(["learner", "--state", str(tmp / "L"), "--limit", "8e6", *SETTINGS], tmp / "learner.log")
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

    sizes = {(b, v): n for b, v, n in learner.request("stats")["stats"]["deltas"]}
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
