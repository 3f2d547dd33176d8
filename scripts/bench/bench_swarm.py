"""Swarm transport benchmark: how long until every sampler holds a new policy version, and what it costs the learner.

    .venv/bin/python -m scripts.bench.bench_swarm                      # the figures in docs/BENCHMARKS.md
    .venv/bin/python -m scripts.bench.bench_swarm --ns 6 --repeats 3 --modes swarm
    .venv/bin/python -m scripts.bench.bench_swarm --ns 1,3,6 --modes swarm --repeats 5 --weights smollm2 \
        --publish delta,full --late --skip-p2p                    # full versions vs deltas (docs/BENCHMARKS.md)

Everything runs on this machine, on 127.0.0.1: one learner process and N sampler processes (real
``LearnerSwarm``/``SamplerSwarm`` nodes, each with its own libp2p daemon and DHT), synthetic random "weights".

1. **Distribution** - every node's chunk upload capped by its token bucket (``--limit``, default 20 MB/s);
   ``--size`` (64 MiB) of weights in ``--chunk-size`` (1 MiB) chunks. For N in ``--ns``: the learner publishes
   ``--repeats`` fresh versions; for each, the time from the start of ``publish()`` until the LAST sampler holds the
   verified version, and the bytes the learner uploaded for it. Modes: ``swarm`` (rarest-first between samplers,
   rationed learner) and ``learner-only`` (samplers fetch only from the learner, no rationing). The physical
   floor is ``size / limit`` (the learner must send every byte once).
2. **Point-to-point** (uncapped): one sampler fetching ``--p2p-size`` from the learner through the full swarm path
   (manifest, chunk requests, hashing, preallocated buffer) vs a bare hivemind stream of the same bytes between two
   daemons (one stream, 1 MiB writes, ``readexactly`` into a preallocated buffer). Medians of ``--repeats``.
3. **Full versions vs deltas** (``--weights smollm2 --publish full,delta``): the versions are real SmolLM2-135M
   bf16 policy versions made by scripts/bench/delta_versions.py (``--versions-dir``; consecutive versions differ as
   real RL versions do), each cut to ``--size`` bytes as evenly spread 1 MiB blocks of the whole model (the same
   per-byte change pattern as the whole, at a fraction of the CPU and memory). Every row publishes version 0
   (the keyframe every sampler fetches in full, not counted), then versions 1..``--repeats``: ``full`` with weight
   deltas off at the learner and the samplers (every version fetched in full), ``delta`` with the learner's real
   delta path on (``LearnerSwarm.publish`` encodes the step delta and the cumulative delta from the keyframe,
   node/delta_publish.py) and the samplers' real catch-up path (node/catchup.py: cheapest plan, delta chunks
   swarmed rarest-first, applied, checked against the signed manifest). After each version every sampler's buffer
   is hashed and compared with the learner's (bit-exact). Reported per row: the time until all hold each version,
   the learner's upload per version (x the full size), the plan each sampler took, the step delta's size and the
   floor (bytes the learner must send once / its uplink). ``--late``: one more sampler fetches version 0, is
   stopped, and is restarted on its state after the last version (``--repeats`` versions behind): its fetch time,
   plan and downloaded bytes.

Child processes are started with ``--child ...`` (the same file) and stopped by PID, with their daemons
(:mod:`node.local`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from node.local import JsonProc, stop_all

MiB = 1 << 20
DEFAULT_VERSIONS = "/tmp/deltas-bench/versions"


def version_file_size(folder: str) -> int:
    return os.path.getsize(os.path.join(folder, "v0000.bin"))


def smollm2_version(folder: str, v: int, size: int) -> bytes:
    """Version ``v`` of the real SmolLM2 versions (scripts/bench/delta_versions.py), cut to ``size`` bytes: the
    whole buffer if it is no larger, else ``size // MiB`` 1 MiB blocks evenly spread over it (aligned, so every
    bf16 element stays whole), concatenated in order."""
    import numpy as np

    mm = np.memmap(os.path.join(folder, f"v{v:04d}.bin"), dtype=np.uint8, mode="r")
    if size >= len(mm):
        return bytes(mm)
    if size % MiB:
        raise ValueError(f"--size {size} must be a multiple of 1 MiB to cut the versions in 1 MiB blocks")
    starts = np.linspace(0, len(mm) // MiB - 1, size // MiB).astype(np.int64) * MiB
    return b"".join(bytes(mm[s:s + MiB]) for s in starts)


# ---------------------------------------------------------------------------------------------------------------
# process handling (parent side)


def child(args: List[str], log_path: str) -> JsonProc:
    """A child process (``--child ARGS``) speaking JSON lines: commands on stdin, events on stdout."""
    return JsonProc(["-m", "scripts.bench.bench_swarm", "--child", *args], Path(log_path))


# ---------------------------------------------------------------------------------------------------------------
# children


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _commands():
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


def _swarm_config(a: argparse.Namespace, **kw: Any):
    from node.config import SwarmConfig

    return SwarmConfig(
        run_id="bench", host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False,
        upload_limit=a.limit or None, poll_interval=0.25, state_dir=a.state, **kw,
    ).with_defaults_for_state_dir()


def child_learner(a: argparse.Namespace) -> None:
    import numpy as np

    from node.learner_swarm import LearnerSwarm
    from protocol.manifest import RawTensor, build_manifest, encode_manifest

    swarm = LearnerSwarm(_swarm_config(a, ration=a.ration, weight_deltas=a.deltas),
                         validate=lambda b: b).start(print_join=False)
    _emit(event="ready", maddr=swarm.maddrs[0], key=swarm.public_key_str)
    for cmd in _commands():
        if cmd["cmd"] == "publish":
            v = cmd["v"]
            if a.weights == "smollm2":
                tensor = RawTensor("bfloat16", (a.size // 2,), smollm2_version(a.versions_dir, v, a.size))
            else:
                tensor = RawTensor("uint8", (a.size,), np.random.default_rng(v).bytes(a.size))
            manifest, buf = build_manifest({"w": tensor}, run_id="bench", version=v, chunk_size=a.chunk_size)
            blob = encode_manifest(manifest, swarm.identity)
            sha = hashlib.sha256(buf).hexdigest()
            t0 = time.time()
            swarm.publish(v, blob, buf)  # with deltas on: encodes the deltas into v first (node/delta_publish.py)
            _emit(event="published", v=v, t0=t0, t1=time.time(), sha=sha)
        elif cmd["cmd"] == "stats":
            st, v = swarm.stats(), cmd["v"]
            delta_upload = sum(n for k, n in st["upload_by_delta"].items() if k.endswith(f"-{v}"))
            _emit(event="stats", v=v, upload=st["upload_by_version"].get(v, 0) + delta_upload,
                  delta_upload=delta_upload, deltas={f"{b}-{w}": n for b, w, n in st["deltas"] if w == v},
                  total_upload=st["bytes_uploaded"], stats=_jsonable(st))
        elif cmd["cmd"] == "quit":
            break
    swarm.shutdown()


def child_sampler(a: argparse.Namespace) -> None:
    from node.sampler_swarm import SamplerSwarm

    def on_version(v: int) -> None:
        log = swarm.catchup.log.get(v, {})  # set just before (node/catchup.py; only with deltas on)
        _emit(event="version", v=v, t=time.time(), fetch_s=swarm.version_times.get(v), plan=log.get("plan"),
              fetched=log.get("fetched_bytes"), apply_s=log.get("apply_s"))

    swarm = SamplerSwarm(
        _swarm_config(a, peers=[a.peers], learner_key=a.learner_key, swarming=a.swarming, weight_deltas=a.deltas),
        on_version=on_version,
    )
    swarm.start(wait_for_learner=60)
    _dump_tasks_on_sigusr1(swarm)
    _emit(event="joined")
    for cmd in _commands():
        if cmd["cmd"] == "stats":
            _emit(event="stats", stats=_jsonable(swarm.stats()))
        elif cmd["cmd"] == "sha":  # the held buffer of a version, to compare with the learner's (bit-exact)
            _, buf = swarm.get_weights(cmd["v"])
            _emit(event="sha", v=cmd["v"], sha=hashlib.sha256(buf).hexdigest())
        elif cmd["cmd"] == "quit":
            break
    swarm.shutdown()


def _dump_tasks_on_sigusr1(swarm) -> None:
    """Debugging aid: ``kill -USR1 <pid>`` prints every task of the swarm loop (and the fetcher state) to stderr."""
    import asyncio

    def dump() -> None:
        for t in asyncio.all_tasks(swarm.loop.loop):
            t.print_stack(limit=8, file=sys.stderr)
        f = swarm._fetcher
        if f is not None:
            for src in [f.learner, *f.peers.values()]:
                if src is not None:
                    print("source", src.peer_id, "inflight", src.inflight, "pending", list(src.pending), "unsent",
                          len(src.unsent), "writer", src.writer, "backoff", src.backoff_until - time.monotonic(),
                          file=sys.stderr)
            print("inflight", f._total_inflight, f._inflight.nonzero(), "have", f.vb.n_have, file=sys.stderr)
        sys.stderr.flush()

    signal.signal(signal.SIGUSR1, lambda *_: swarm.loop.call_soon(dump))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def child_bare(a: argparse.Namespace) -> None:
    """Bare hivemind stream: 'server' writes --size bytes on each stream; 'client' reads them."""
    import asyncio

    import numpy as np
    from hivemind.p2p import P2P, PeerID

    async def main() -> None:
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
        if a.role == "bare-server":
            payload = np.random.default_rng(0).bytes(a.size)

            async def handler(info, reader, writer):
                view = memoryview(payload)
                for off in range(0, len(view), MiB):
                    writer.write(view[off:off + MiB])
                    await writer.drain()
                writer.close()

            await p2p.add_binary_stream_handler("bare", handler)
            maddrs = await p2p.get_visible_maddrs()
            _emit(event="ready", maddr=str(maddrs[0]), peer=str(p2p.peer_id))
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        else:
            from hivemind.utils.multiaddr import Multiaddr

            peer = PeerID.from_base58(a.peer)
            await p2p._client.connect(peer, [Multiaddr(a.peers).decapsulate(Multiaddr(f"/p2p/{a.peer}"))])
            buf = bytearray(a.size)
            loop = asyncio.get_running_loop()
            _emit(event="ready")
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line or "quit" in line:
                    break
                t0 = time.perf_counter()
                _, reader, writer = await p2p.call_binary_stream_handler(peer, "bare")
                reader._limit = 1 << 22
                mv = memoryview(buf)
                got = 0
                while got < a.size:
                    part = await reader.readexactly(min(MiB, a.size - got))
                    mv[got:got + len(part)] = part
                    got += len(part)
                writer.close()
                _emit(event="bare", time=time.perf_counter() - t0)
        await p2p.shutdown()

    asyncio.run(main())


def run_child(argv: List[str]) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if os.environ.get("BENCH_DEBUG"):
        logging.getLogger("node").setLevel(logging.DEBUG)
    p = argparse.ArgumentParser()
    p.add_argument("role")
    p.add_argument("--state", default=None)
    p.add_argument("--limit", type=float, default=0)
    p.add_argument("--size", type=int, default=64 * MiB)
    p.add_argument("--chunk-size", type=int, default=MiB)
    p.add_argument("--peers", default=None)
    p.add_argument("--peer", default=None)
    p.add_argument("--learner-key", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ration", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--swarming", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--deltas", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--weights", default="random")
    p.add_argument("--versions-dir", default=DEFAULT_VERSIONS)
    a = p.parse_args(argv)
    {"learner": child_learner, "sampler": child_sampler}.get(a.role, child_bare)(a)


# ---------------------------------------------------------------------------------------------------------------
# parent


def distribution(n: int, mode: str, a: argparse.Namespace, tmp: str, publish: str = "full") -> Dict[str, Any]:
    """One row: N samplers, ``mode`` (swarm / learner-only), versions published as ``publish`` (full / delta)."""
    swarm = mode == "swarm"
    deltas = publish == "delta"
    name = f"{mode}{n}-{publish}"
    common = ["--limit", str(a.limit), "--size", str(a.size), "--chunk-size", str(a.chunk_size), "--weights",
              a.weights, "--versions-dir", a.versions_dir, "--deltas" if deltas else "--no-deltas"]
    sampler_args = common + ["--swarming" if swarm else "--no-swarming"]
    children: List[JsonProc] = []
    try:
        learner = child(["learner", "--state", f"{tmp}/{name}/L", *common, "--ration" if swarm else "--no-ration"],
                        f"{tmp}/{name}-learner.log")
        children.append(learner)
        info = learner.wait_event("ready", 60)
        join = ["--peers", info["maddr"], "--learner-key", info["key"]]
        samplers = []
        for i in range(n):
            s = child(["sampler", "--state", f"{tmp}/{name}/s{i}", *join, *sampler_args], f"{tmp}/{name}-s{i}.log")
            children.append(s)
            samplers.append(s)
        late_args = ["sampler", "--state", f"{tmp}/{name}/late", *join, *sampler_args]
        late = child(late_args, f"{tmp}/{name}-late-1.log") if a.late else None
        if late is not None:
            children.append(late)
        for s in samplers + ([late] if late else []):
            s.wait_event("joined", 120)
        if a.weights != "random":  # version 0: the keyframe every sampler starts from (fetched in full, not counted)
            learner.send(cmd="publish", v=0)
            learner.wait_event("published", 60, v=0)
            for s in samplers + ([late] if late else []):
                s.wait_event("version", a.timeout, v=0)
            time.sleep(0.5)
        if late is not None:  # goes offline holding version 0
            late.send(cmd="quit")
            late.stop(15)
        times, uploads, slowest_fetch, publish_s, delta_sizes, plans, apply_s = [], [], [], [], [], [], []
        for r in range(a.repeats):
            v = r + 1
            learner.send(cmd="publish", v=v)
            pub = learner.wait_event("published", 60, v=v)
            evs = [s.wait_event("version", a.timeout, v=v) for s in samplers]
            times.append(max(e["t"] for e in evs) - pub["t0"])
            slowest_fetch.append(max(e["fetch_s"] or 0 for e in evs))
            publish_s.append(pub["t1"] - pub["t0"])
            plans.append([e["plan"] for e in evs])
            apply_s.append(max(e.get("apply_s") or 0.0 for e in evs))
            st = learner.request("stats", v=v)
            uploads.append(st["upload"])
            delta_sizes.append(st["deltas"].get(f"{v - 1}-{v}"))
            for i, s in enumerate(samplers):  # bit-exact: every sampler's buffer hashes to the learner's
                got = s.request("sha", v=v)["sha"]
                if got != pub["sha"]:
                    raise RuntimeError(f"sampler {i} holds a version {v} that differs from the learner's")
            how = "" if publish == "full" else " by " + describe_plans(plans[-1])
            print(f"  N={n} {mode:12s} {publish:5s} v{v}: all hold it after {times[-1]:.2f} s{how}, learner "
                  f"uploaded {uploads[-1] / a.size:.3f} x size", flush=True)
            time.sleep(0.5)
        row = {"n": n, "mode": mode, "publish": publish, "weights": a.weights, "times": times, "uploads": uploads,
               "fetch": slowest_fetch, "time_median": statistics.median(times),
               "upload_median": statistics.median(uploads), "publish_s": publish_s, "plans": plans,
               "apply_s": apply_s}
        if deltas:
            row["step_delta_sizes"] = delta_sizes
            row["floor_s"] = [d / a.limit if d is not None else a.size / a.limit for d in delta_sizes]
        else:
            row["floor_s"] = [a.size / a.limit] * len(times)
        row["floor_median"] = statistics.median(row["floor_s"])
        if late is not None:
            row["late"] = late_sampler(late_args, learner, a, f"{tmp}/{name}-late-2.log", children)
        return row
    finally:
        stop_all(children, 15)


def late_sampler(args: List[str], learner: JsonProc, a: argparse.Namespace, log: str,
                 children: List[JsonProc]) -> Dict[str, Any]:
    """The sampler stopped holding version 0 comes back on its state ``--repeats`` versions behind: how long its
    fetch of the newest version takes (from the start of the fetch to verified), by which plan, how many bytes."""
    v = a.repeats
    before = learner.request("stats", v=v)["total_upload"]
    t0 = time.time()
    late = child(args, log)
    children.append(late)
    ev = late.wait_event("version", a.timeout, v=v)
    stats = late.request("stats")["stats"]
    after = learner.request("stats", v=v)["total_upload"]
    pub_sha = next(e["sha"] for e in learner.history if e.get("event") == "published" and e["v"] == v)
    if late.request("sha", v=v)["sha"] != pub_sha:
        raise RuntimeError(f"the late sampler holds a version {v} that differs from the learner's")
    out = {"behind": v, "fetch_s": ev["fetch_s"], "since_restart_s": ev["t"] - t0, "plan": ev["plan"],
           "bytes_down": stats["bytes_down"], "learner_upload": after - before}
    print(f"  late sampler, {v} versions behind: fetch {out['fetch_s']:.2f} s ({out['since_restart_s']:.1f} s since "
          f"its restart), {out['bytes_down'] / a.size:.3f} x size downloaded, plan {out['plan']}", flush=True)
    return out


def describe_plans(plans: List[Any]) -> str:
    """'delta 0->1 x6' / 'full x6': how the samplers reached a version (node/catchup.py plans, [base, v, bytes])."""
    from collections import Counter

    def one(plan) -> str:
        if not plan:
            return "full"
        return " + ".join("full" if b is None else f"delta {b}->{w}" for b, w, _ in plan)

    return ", ".join(f"{k} x{c}" for k, c in Counter(one(p) for p in plans).items())


def point_to_point(a: argparse.Namespace, tmp: str) -> Dict[str, Any]:
    """Both pairs run side by side; transfers alternate (bare, swarm, bare, swarm, ...) so that both see the same
    machine load."""
    children: List[JsonProc] = []
    out: Dict[str, Any] = {"bare_times": [], "swarm_fetch_times": [], "swarm_total_times": []}
    try:
        srv = child(["bare-server", "--size", str(a.p2p_size)], f"{tmp}/bare-server.log")
        children.append(srv)
        info = srv.wait_event("ready", 60)
        cli = child(["bare-client", "--size", str(a.p2p_size), "--peers", info["maddr"], "--peer", info["peer"]],
                    f"{tmp}/bare-client.log")
        children.append(cli)
        cli.wait_event("ready", 60)
        common = ["--limit", "0", "--size", str(a.p2p_size), "--chunk-size", str(a.chunk_size)]
        learner = child(["learner", "--state", f"{tmp}/p2p/L", *common], f"{tmp}/p2p-learner.log")
        children.append(learner)
        info = learner.wait_event("ready", 60)
        s = child(["sampler", "--state", f"{tmp}/p2p/s0", "--peers", info["maddr"], "--learner-key", info["key"],
                   *common], f"{tmp}/p2p-s0.log")
        children.append(s)
        s.wait_event("joined", 120)
        for r in range(a.repeats + 1):  # round 0 warms both paths up and is not counted
            cli.send(cmd="go")
            bare = cli.wait_event("bare", 300)["time"]
            time.sleep(0.5)
            learner.send(cmd="publish", v=r + 1)
            pub = learner.wait_event("published", 120, v=r + 1)
            ev = s.wait_event("version", 300, v=r + 1)
            time.sleep(0.5)
            if r:
                out["bare_times"].append(bare)
                out["swarm_fetch_times"].append(ev["fetch_s"])
                out["swarm_total_times"].append(ev["t"] - pub["t0"])
    finally:
        stop_all(children, 15)
    size = a.p2p_size
    out["bare_MBps"] = size / statistics.median(out["bare_times"]) / 1e6
    out["swarm_MBps"] = size / statistics.median(out["swarm_fetch_times"]) / 1e6
    out["ratio"] = out["swarm_MBps"] / out["bare_MBps"]
    return out


def delta_vs_full(rows: List[Dict[str, Any]], size: int) -> List[Dict[str, Any]]:
    """For each (N, mode) measured both ways: delta / full of the median times and uploads, and the floors."""
    out = []
    by_key = {(r["n"], r["mode"], r["publish"]): r for r in rows}
    print("\n| N | mode | full: time (median) | delta: time (median) | delta / full | learner upload full / delta "
          "(x size) | step delta (median) | floor full / delta | delta: publish() / slowest fetch / slowest apply |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (n, mode, publish), d in by_key.items():
        f = by_key.get((n, mode, "full"))
        if publish != "delta" or f is None:
            continue
        sizes = [x for x in d["step_delta_sizes"] if x is not None]
        cmp = {"n": n, "mode": mode, "full_time_median": f["time_median"], "delta_time_median": d["time_median"],
               "time_ratio": d["time_median"] / f["time_median"], "full_upload_median": f["upload_median"] / size,
               "delta_upload_median": d["upload_median"] / size,
               "step_delta_median": statistics.median(sizes) / size if sizes else None,
               "full_floor_s": f["floor_median"], "delta_floor_s": d["floor_median"],
               "delta_publish_s_median": statistics.median(d["publish_s"]),
               "delta_fetch_s_median": statistics.median(d["fetch"]),
               "delta_apply_s_median": statistics.median(d["apply_s"])}
        out.append(cmp)
        step = f"{100 * cmp['step_delta_median']:.2f} %" if sizes else "-"
        print(f"| {n} | {mode} | {cmp['full_time_median']:.2f} s | {cmp['delta_time_median']:.2f} s | "
              f"**{cmp['time_ratio']:.2f}** | {cmp['full_upload_median']:.3f} / {cmp['delta_upload_median']:.4f} | "
              f"{step} | {cmp['full_floor_s']:.2f} s / {cmp['delta_floor_s']:.3f} s | "
              f"{cmp['delta_publish_s_median']:.2f} / {cmp['delta_fetch_s_median']:.2f} / "
              f"{cmp['delta_apply_s_median']:.2f} s |")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2:])
        return
    from node.ratelimit import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", default="1,3,6", help="numbers of samplers")
    p.add_argument("--modes", default="swarm,learner-only")
    p.add_argument("--size", type=parse_size, default=64 * MiB, help="weights per version (default 64MiB)")
    p.add_argument("--chunk-size", type=parse_size, default=MiB)
    p.add_argument("--limit", type=parse_size, default=20_000_000, help="upload cap of every node, bytes/s")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--p2p-size", type=parse_size, default=256 * MiB)
    p.add_argument("--skip-p2p", action="store_true")
    p.add_argument("--skip-distribution", action="store_true")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--weights", choices=["random", "smollm2"], default="random",
                   help="version contents: random bytes (every version new), or the real SmolLM2 versions of "
                        "--versions-dir cut to --size (default: %(default)s)")
    p.add_argument("--versions-dir", default=DEFAULT_VERSIONS,
                   help="folder of scripts/bench/delta_versions.py (default: %(default)s)")
    p.add_argument("--publish", default="full",
                   help="comma list of how versions are published: full (weight deltas off) and/or delta (the "
                        "learner's deltas + the samplers' catch-up; needs --weights smollm2) (default: %(default)s)")
    p.add_argument("--late", action="store_true",
                   help="also a sampler that comes back --repeats versions behind (with --weights smollm2)")
    p.add_argument("--json", default=None, help="write all figures here")
    a = p.parse_args()
    publishes = a.publish.split(",")
    if set(publishes) - {"full", "delta"}:
        p.error(f"--publish: full and/or delta, not {a.publish!r}")
    if a.weights == "smollm2":
        n_versions = sum(1 for f in os.listdir(a.versions_dir) if f.startswith("v") and f.endswith(".bin"))
        if a.repeats >= n_versions:
            p.error(f"--repeats {a.repeats}: {a.versions_dir} holds versions 0..{n_versions - 1}")
        a.size = min(a.size, version_file_size(a.versions_dir))
    elif "delta" in publishes or a.late:
        p.error("--publish delta and --late need --weights smollm2 (random versions share nothing)")
    tmp = tempfile.mkdtemp(prefix="bench-swarm-")
    results: Dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                               "size": a.size, "limit": a.limit, "chunk_size": a.chunk_size, "weights": a.weights,
                               "load_average_start": os.getloadavg()}
    floor = a.size / a.limit
    print(f"# {results['machine']}; {a.weights} weights {a.size / MiB:.0f} MiB in {a.chunk_size / MiB:g} MiB chunks; "
          f"upload cap {a.limit / 1e6:g} MB/s per node; floor {floor:.2f} s; logs in {tmp}", flush=True)
    try:
        if not a.skip_distribution:
            rows = []
            for n in [int(x) for x in a.ns.split(",")]:
                for mode in a.modes.split(","):
                    for publish in publishes:  # full and delta rows side by side: the same machine load
                        rows.append(distribution(n, mode, a, tmp, publish))
            results["distribution"] = rows
            results["load_average_end"] = os.getloadavg()
            print("\n| N | mode | versions as | time until all hold v (median) | x full floor | learner upload "
                  "(median) | runs |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['n']} | {r['mode']} | {r['publish']} | {r['time_median']:.2f} s | "
                      f"{r['time_median'] / floor:.2f} | {r['upload_median'] / a.size:.3f} x size | "
                      + ", ".join(f"{t:.2f}" for t in r["times"]) + " |")
            if len(publishes) > 1:
                results["delta_vs_full"] = delta_vs_full(rows, a.size)
        if not a.skip_p2p:
            pp = point_to_point(a, tmp)
            results["point_to_point"] = pp
            print(f"\npoint-to-point, uncapped, {a.p2p_size / MiB:.0f} MiB: bare hivemind stream "
                  f"{pp['bare_MBps']:.0f} MB/s, swarm fetch {pp['swarm_MBps']:.0f} MB/s "
                  f"({100 * pp['ratio']:.0f}% of bare); publish-to-ready "
                  + ", ".join(f"{t:.2f}" for t in pp["swarm_total_times"]) + " s")
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
        if sys.exc_info()[0] is None and not os.environ.get("BENCH_KEEP_LOGS"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
