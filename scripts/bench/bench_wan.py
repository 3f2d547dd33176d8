"""The swarm on an emulated internet (scripts/wan_emu): join time, rollout acknowledgement latency, and how long 6
samplers on uneven capped links take to hold a new version, against the physical floor.

    sudo flock /tmp/bench.lock .venv/bin/python -m scripts.bench.bench_wan --json wan.json   # docs/BENCHMARKS.md

Needs root, iproute2, nftables (``make wan-deps``). Every node is a real swarm process
(tests/swarm_helpers/node_proc.py) in its own network namespace; links are tbf caps plus a delaying relay (path
one-way delay = sum of the two hosts' access delays). Hosts:

* ``L`` learner, public, ``--learner-link`` (50 Mbit/s both ways, 10 ms); its ``--upload-limit`` is set to 95 % of
  its uplink, as an operator would;
* ``home`` a sampler behind a home NAT (``--client-mode``), 5 up / 10 down Mbit/s, 40 ms;
* ``base`` a sampler on an uncapped, zero-delay public link: the baseline measured in the same run;
* ``s0``..``s5`` public samplers (serving chunks to each other), ``--links`` (up/down Mbit/s @ ms);
* ``b0``..``b5`` the same-run baseline for the distribution: public samplers, uncapped, no delay.

1. **Join**: time inside ``SamplerSwarm.start`` (daemon, bootstrap dial, DHT, first heartbeat) and from starting
   the sampler process (adds Python/torch/hivemind imports), ``--repeats`` times for ``home`` and ``base``.
2. **Ack latency**: one signed rollout group submitted until the sampler has the learner's ``accepted`` answer
   (5 ms polling), ``--acks`` times each for ``home`` and ``base``.
3. **Distribution**: ``--repeats`` full versions of ``--size`` (16 MiB, 1 MiB chunks) to s0..s5; for each, the
   time from ``publish`` until each sampler holds it verified, and the learner's upload for it. The floor is the
   fluid bound for heterogeneous peer-to-peer distribution: ``max(S/u_L, S/min d_i, N S / (u_L + sum u_i))`` plus
   the slowest path's round trip, with link rates at 95 % (TCP/IP headers) of the tbf rate. The same is measured
   first with b0..b5 (only the learner's link capped): what this machine's CPUs allow, for the simulator's
   calibration (scripts/simulate_swarm.py --calibrate).

Medians are quoted; the machine is shared, so the ratios against ``base`` and against the floor matter more than
absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from node.local import JsonProc, stop_all
from node.ratelimit import parse_size
from scripts.wan_emu.topology import Wan, missing_features

MiB = 1 << 20
GOODPUT = 0.95  # payload share of a tbf-capped link (TCP/IP headers)
DEFAULT_LINKS = "5/10@200,10/20@150,20/50@100,50/100@60,100/100@40,10/50@20"


def parse_links(text: str) -> List[Tuple[float, float, float]]:
    out = []
    for item in text.split(","):
        rates, ms = item.split("@")
        up, down = rates.split("/")
        out.append((float(up), float(down), float(ms)))
    return out


def floor_time(size: int, learner_up: float, learner_ms: float, links: List[Tuple[float, float, float]]) -> float:
    """Fluid lower bound (Mbit/s links, bytes) for every sampler to hold ``size`` bytes, plus the slowest RTT."""
    bps = lambda mbit: mbit * 1e6 / 8 * GOODPUT  # noqa: E731
    n = len(links)
    t = max(size / bps(learner_up), max(size / bps(d) for _, d, _ in links),
            n * size / (bps(learner_up) + sum(bps(u) for u, _, _ in links)))
    return t + 2 * (learner_ms + max(ms for _, _, ms in links)) / 1000


class Bench:
    def __init__(self, a: argparse.Namespace, tmp: Path):
        self.a, self.tmp = a, tmp
        self.wan = Wan(tmp / "net")
        try:
            self._build()
        except BaseException:
            self.wan.close()
            raise

    def _build(self) -> None:
        a, tmp = self.a, self.tmp
        up, down, ms = parse_links(a.learner_link)[0]
        self.learner_link = (up, down, ms)
        self.links = parse_links(a.links)
        self.wan.add_host("L", up_mbit=up, down_mbit=down, delay_ms=ms)
        self.wan.add_host("home", up_mbit=5, down_mbit=10, delay_ms=40, nat=True)
        self.wan.add_host("base")
        for i, (u, d, m) in enumerate(self.links):
            self.wan.add_host(f"s{i}", up_mbit=u, down_mbit=d, delay_ms=m)
        for i in range(len(self.links)):
            self.wan.add_host(f"b{i}")  # the same-run baseline: uncapped, no delay
        self.wan.start()
        self.learner = self.node("L", "learner", ["--port", "4001", "--limit", str(up * 1e6 / 8 * GOODPUT),
                                                  "--rpc-timeout", "15"])
        ready = self.learner.wait_event("ready", 120)
        self.maddr, self.key = ready["maddrs"][0], ready["key"]
        self.count = 0
        self.last_v: Optional[int] = None

    def node(self, host: str, role: str, args: List[str]) -> JsonProc:
        self.count = getattr(self, "count", 0) + 1
        state = self.tmp / f"{host}-{self.count}"
        return self.wan.spawn(host, ["tests.swarm_helpers.node_proc", role, "--state", str(state), "--run-id", "wan",
                                     "--host", self.wan.hosts[host].ip, *args], self.tmp / f"{host}-{self.count}.log")

    def sampler(self, host: str, client: bool = False) -> JsonProc:
        extra = ["--client-mode"] if client else []
        return self.node(host, "sampler", ["--peers", self.maddr, "--learner-key", self.key, "--rpc-timeout", "15",
                                           *extra])

    def join_times(self) -> Dict[str, List[float]]:
        out: Dict[str, List[float]] = {"home": [], "base": [], "home_process": [], "base_process": []}
        for r in range(self.a.repeats):
            for host in ("home", "base"):
                t0 = time.monotonic()
                s = self.sampler(host, client=host == "home")
                ev = s.wait_event("joined", 120)
                out[host].append(ev["start_s"])
                out[host + "_process"].append(time.monotonic() - t0)
                stop_all([s], 15)
                print(f"  join {host} #{r}: {ev['start_s']:.2f} s in SamplerSwarm.start, "
                      f"{out[host + '_process'][-1]:.2f} s from process start", flush=True)
        return out

    def ack_latency(self) -> Dict[str, List[float]]:
        samplers = {"home": self.sampler("home", client=True), "base": self.sampler("base")}
        try:
            for s in samplers.values():
                s.wait_event("joined", 120)
            out: Dict[str, List[float]] = {h: [] for h in samplers}
            for i in range(self.a.acks + 1):  # the first (connection set-up) is not counted
                for host, s in samplers.items():
                    ev = s.request("submit", timeout=90, start=1000 + i, n=1, wait_ack=True)
                    if i:
                        out[host].append(ev["t_ack"] - ev["t0"])
                    time.sleep(0.2)
            return out
        finally:
            stop_all(list(samplers.values()), 15)

    def distribution(self, prefix: str, first_v: int) -> Dict[str, Any]:
        a = self.a
        samplers = [self.sampler(f"{prefix}{i}") for i in range(len(self.links))]
        try:
            for s in samplers:
                s.wait_event("joined", 180)
            if self.last_v is not None:  # they fetch the current version first: not part of the measurement
                for s in samplers:
                    s.wait_event("version", a.timeout, v=self.last_v)
            runs = []
            for r in range(a.repeats):
                v = first_v + r
                self.last_v = v
                pub = self.learner.request("publish", timeout=120, v=v, size=a.size, chunk=a.chunk_size)
                evs = [s.wait_event("version", a.timeout, v=v) for s in samplers]
                assert all(e["sha"] == pub["sha"] for e in evs), "a sampler holds a corrupted version"
                times = [e["t"] - pub["t0"] for e in evs]
                upload = self.learner.request("stats")["stats"]["upload_by_version"].get(str(v), 0)
                from_peers = [e["stats"]["chunks_from_peers"] for e in evs]
                runs.append({"v": v, "times": times, "upload": upload, "chunks_from_peers": from_peers})
                print(f"  {prefix}* v{v}: per sampler " + ", ".join(f"{t:.1f}" for t in times)
                      + f" s; all {max(times):.1f} s; learner uploaded {upload / a.size:.2f} x", flush=True)
                time.sleep(1)
            return {"runs": runs}
        finally:
            stop_all(samplers, 15)

    def close(self) -> None:
        self.wan.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=16 * MiB)
    p.add_argument("--chunk-size", type=parse_size, default=MiB)
    p.add_argument("--learner-link", default="50/50@10", help="UP/DOWN Mbit/s @ access delay ms")
    p.add_argument("--links", default=DEFAULT_LINKS, help="the samplers' links, UP/DOWN@MS, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--acks", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--skip", default="", help="comma-separated: join,ack,distribution")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    def interrupted(signum, frame):
        raise KeyboardInterrupt  # so that `timeout` (SIGTERM) still tears the namespaces down

    signal.signal(signal.SIGTERM, interrupted)
    reason = missing_features()
    if reason:
        sys.exit(f"bench_wan: the emulated WAN is unavailable: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-wan-"))
    print(f"# {os.cpu_count()} cores; logs in {tmp}", flush=True)
    results: Dict[str, Any] = {"size": a.size, "chunk_size": a.chunk_size, "learner_link": a.learner_link,
                               "links": a.links}
    bench = Bench(a, tmp)
    skip = set(a.skip.split(","))
    try:
        if "join" not in skip:
            results["join"] = bench.join_times()
        if "ack" not in skip:
            results["ack"] = bench.ack_latency()
        if "distribution" not in skip:
            results["distribution_base"] = bench.distribution("b", 10)
            results["distribution"] = bench.distribution("s", 20)
    finally:
        bench.close()
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    med = statistics.median
    if "join" in results:
        j = results["join"]
        print(f"\njoin (SamplerSwarm.start until the learner's heartbeat is held): home (NAT, 5/10 Mbit/s, 50 ms "
              f"one-way) {med(j['home']):.2f} s, base {med(j['base']):.2f} s (ratio {med(j['home']) / med(j['base']):.2f});"
              f" from process start {med(j['home_process']):.1f} s / {med(j['base_process']):.1f} s")
    if "ack" in results:
        k = results["ack"]
        print(f"ack latency: home {1000 * med(k['home']):.0f} ms, base {1000 * med(k['base']):.0f} ms")
    if "distribution" in results:
        up, _, ms = bench.learner_link
        floor = floor_time(a.size, up, ms, bench.links)
        runs = results["distribution"]["runs"]
        last = [max(r["times"]) for r in runs]
        print(f"distribution of {a.size / MiB:.0f} MiB to {len(bench.links)} samplers: all hold it after "
              f"{med(last):.1f} s (median; runs " + ", ".join(f"{t:.1f}" for t in last) + f"), floor {floor:.1f} s, "
              f"x floor {med(last) / floor:.2f}; learner upload {med(r['upload'] for r in runs) / a.size:.2f} x size")
        base = [max(r["times"]) for r in results["distribution_base"]["runs"]]
        print(f"baseline (same learner, samplers uncapped, no delay): all hold it after {med(base):.1f} s")
        for i, link in enumerate(bench.links):
            print(f"  s{i} {link[0]:g}/{link[1]:g} Mbit/s @{link[2]:g} ms: "
                  f"{med(r['times'][i] for r in runs):.1f} s")
        results["floor"] = floor
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
