"""Swarm transport benchmark: how long until every sampler holds a new policy version, and what it costs the learner.

    .venv/bin/python -m scripts.bench.bench_swarm                      # the figures in docs/BENCHMARKS.md
    .venv/bin/python -m scripts.bench.bench_swarm --ns 6 --repeats 3 --modes swarm

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

Child processes are started with ``--child ...`` (the same file) and stopped by PID, with their daemons
(:mod:`node.local`).
"""

from __future__ import annotations

import argparse
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

    swarm = LearnerSwarm(_swarm_config(a, ration=a.ration), validate=lambda b: b).start(print_join=False)
    _emit(event="ready", maddr=swarm.maddrs[0], key=swarm.public_key_str)
    for cmd in _commands():
        if cmd["cmd"] == "publish":
            v = cmd["v"]
            data = np.random.default_rng(v).bytes(a.size)
            manifest, buf = build_manifest({"w": RawTensor("uint8", (a.size,), data)}, run_id="bench", version=v,
                                           chunk_size=a.chunk_size)
            blob = encode_manifest(manifest, swarm.identity)
            t0 = time.time()
            swarm.publish(v, blob, buf)
            _emit(event="published", v=v, t0=t0, t1=time.time())
        elif cmd["cmd"] == "stats":
            st = swarm.stats()
            _emit(event="stats", v=cmd["v"], upload=st["upload_by_version"].get(cmd["v"], 0), stats=_jsonable(st))
        elif cmd["cmd"] == "quit":
            break
    swarm.shutdown()


def child_sampler(a: argparse.Namespace) -> None:
    from node.sampler_swarm import SamplerSwarm

    def on_version(v: int) -> None:
        _emit(event="version", v=v, t=time.time(), fetch_s=swarm.version_times.get(v))

    swarm = SamplerSwarm(
        _swarm_config(a, peers=[a.peers], learner_key=a.learner_key, swarming=a.swarming), on_version=on_version
    )
    swarm.start(wait_for_learner=60)
    _dump_tasks_on_sigusr1(swarm)
    _emit(event="joined")
    for cmd in _commands():
        if cmd["cmd"] == "stats":
            _emit(event="stats", stats=_jsonable(swarm.stats()))
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
    a = p.parse_args(argv)
    {"learner": child_learner, "sampler": child_sampler}.get(a.role, child_bare)(a)


# ---------------------------------------------------------------------------------------------------------------
# parent


def distribution(n: int, mode: str, a: argparse.Namespace, tmp: str) -> Dict[str, Any]:
    swarm = mode == "swarm"
    common = ["--limit", str(a.limit), "--size", str(a.size), "--chunk-size", str(a.chunk_size)]
    children: List[JsonProc] = []
    try:
        learner = child(["learner", "--state", f"{tmp}/{mode}{n}/L", *common,
                         "--ration" if swarm else "--no-ration"], f"{tmp}/{mode}{n}-learner.log")
        children.append(learner)
        info = learner.wait_event("ready", 60)
        samplers = []
        for i in range(n):
            s = child(["sampler", "--state", f"{tmp}/{mode}{n}/s{i}", "--peers", info["maddr"], "--learner-key",
                       info["key"], *common, "--swarming" if swarm else "--no-swarming"],
                      f"{tmp}/{mode}{n}-s{i}.log")
            children.append(s)
            samplers.append(s)
        for s in samplers:
            s.wait_event("joined", 120)
        times, uploads, slowest_fetch = [], [], []
        for r in range(a.repeats):
            v = r + 1
            learner.send(cmd="publish", v=v)
            pub = learner.wait_event("published", 60, v=v)
            evs = [s.wait_event("version", a.timeout, v=v) for s in samplers]
            times.append(max(e["t"] for e in evs) - pub["t0"])
            slowest_fetch.append(max(e["fetch_s"] or 0 for e in evs))
            learner.send(cmd="stats", v=v)
            uploads.append(learner.wait_event("stats", 30, v=v)["upload"])
            print(f"  N={n} {mode:12s} v{v}: all hold it after {times[-1]:.2f} s, learner uploaded "
                  f"{uploads[-1] / a.size:.2f} x size", flush=True)
            time.sleep(0.5)
        return {"n": n, "mode": mode, "times": times, "uploads": uploads, "fetch": slowest_fetch,
                "time_median": statistics.median(times), "upload_median": statistics.median(uploads)}
    finally:
        stop_all(children, 15)


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
    p.add_argument("--json", default=None, help="write all figures here")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-swarm-")
    results: Dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                               "size": a.size, "limit": a.limit, "chunk_size": a.chunk_size}
    floor = a.size / a.limit
    print(f"# {results['machine']}; weights {a.size / MiB:.0f} MiB in {a.chunk_size / MiB:g} MiB chunks; "
          f"upload cap {a.limit / 1e6:g} MB/s per node; floor {floor:.2f} s; logs in {tmp}", flush=True)
    try:
        if not a.skip_distribution:
            rows = []
            for n in [int(x) for x in a.ns.split(",")]:
                for mode in a.modes.split(","):
                    rows.append(distribution(n, mode, a, tmp))
            results["distribution"] = rows
            print("\n| N | mode | time until all hold v (median) | x floor | learner upload (median) | runs |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['n']} | {r['mode']} | {r['time_median']:.2f} s | {r['time_median'] / floor:.2f} | "
                      f"{r['upload_median'] / a.size:.2f} x size | "
                      + ", ".join(f"{t:.2f}" for t in r["times"]) + " |")
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
