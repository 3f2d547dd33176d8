"""Build and tear down an emulated internet of network namespaces (see the package docstring for the picture).

    with Wan(tmp_dir) as wan:
        wan.add_host("L", up_mbit=50, down_mbit=50, delay_ms=10)              # public: 10.77.0.10
        wan.add_host("s0", up_mbit=5, down_mbit=20, delay_ms=40, nat=True)    # behind its own NAT router
        wan.start()                                                          # delaying relays up
        proc = wan.spawn("L", ["tests.swarm_helpers.node_proc", "learner", ...], log_path)   # a JsonProc
        wan.set_link("s0", up=False)                                         # the home link drops
    # every namespace, veth, qdisc and process is gone, even on failure

Addresses: public host ``i`` (0-based, in the order added) is 10.77.0.<10+i>; a NATed host's router has that
public address and the host itself 10.77.<10+i>.2 behind it (gateway .1). Namespaces are ``<prefix><name>`` and
``<prefix>r<name>`` (router), plus ``<prefix>wan`` for the bridge; the prefix is unique per run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from node.local import JsonProc, Proc, stop_all

from .delay_relay import MARK

RELAY_PORT = 7777
WAN_NET = "10.77.0"


class WanError(RuntimeError):
    """A command that builds the emulated network failed (the message names it and quotes its stderr)."""


def sh(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise WanError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def nft(ns: str, script: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, capture_output=True, text=True,
                       timeout=20)
    if r.returncode != 0:
        raise WanError(f"nft in {ns}: {r.stderr.strip()}")


def tbf(ns: str, dev: str, mbit: float) -> None:
    """Cap ``dev``'s egress at ``mbit`` Mbit/s: a token bucket with a 5 ms (>= 16 KiB) burst and a 50 ms queue."""
    rate = mbit * 1e6 / 8
    burst = max(16 << 10, int(rate * 0.005))
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
       "burst", str(burst), "latency", "50ms")


def missing_features() -> Optional[str]:
    """None if this machine can run the emulator, else one line saying what is missing (and what was tried)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc, nftables)"
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: apt-get install {pkg}"
    ns = f"gwchk{uuid.uuid4().hex[:6]}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        try:
            tbf(ns, "a0", 10)
        except WanError as e:
            return f"tc tbf does not work here: {e}"
        try:
            nft(ns, "table ip t { chain p { type nat hook postrouting priority 100; oifname \"a0\" masquerade; }\n"
                    f"chain o {{ type nat hook output priority -100; meta mark != {MARK} ip daddr 10.77.0.0/16 "
                    f"tcp dport != 1 redirect to :{RELAY_PORT}\n}}\n}}")
        except WanError as e:
            return f"nftables NAT (masquerade/redirect) does not work here: {e}"
        return None
    except WanError as e:
        return f"network namespaces/veth do not work here: {e}"
    finally:
        sh("ip", "netns", "del", ns, check=False)


@dataclass
class Host:
    name: str
    index: int
    ns: str
    ip: str                     # the address the host itself has
    public_ip: str              # where the rest of the internet sees it (its NAT router's, if any)
    up_mbit: Optional[float]
    down_mbit: Optional[float]
    delay_ms: float
    router_ns: Optional[str] = None

    @property
    def nat(self) -> bool:
        return self.router_ns is not None


class Wan:
    def __init__(self, work_dir: Path, prefix: Optional[str] = None):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix or f"gw{uuid.uuid4().hex[:6]}"
        self.wan_ns = f"{self.prefix}wan"
        self.hosts: Dict[str, Host] = {}
        self.namespaces: List[str] = []
        self.procs: List[Proc] = []
        self.relays: Dict[str, Proc] = {}
        self._make_ns(self.wan_ns)
        sh("ip", "-n", self.wan_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.wan_ns, "link", "set", "br0", "up")

    # --- building -------------------------------------------------------------------------------------------------
    def _make_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _plug_into_wan(self, ns: str, index: int, ip: str, dev: str) -> str:
        """A veth from ``ns`` (named ``dev``) to the bridge; returns the bridge-side name (egress = towards ns)."""
        port = f"p{index}"
        sh("ip", "-n", self.wan_ns, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
        sh("ip", "-n", self.wan_ns, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        return port

    def add_host(self, name: str, up_mbit: Optional[float] = None, down_mbit: Optional[float] = None,
                 delay_ms: float = 0.0, nat: bool = False) -> Host:
        index = len(self.hosts)
        public_ip = f"{WAN_NET}.{10 + index}"
        ns = f"{self.prefix}{name}"
        self._make_ns(ns)
        if not nat:
            port = self._plug_into_wan(ns, index, public_ip, "eth0")
            host = Host(name, index, ns, public_ip, public_ip, up_mbit, down_mbit, delay_ms)
            if up_mbit:
                tbf(ns, "eth0", up_mbit)
            if down_mbit:
                tbf(self.wan_ns, port, down_mbit)
        else:
            router = f"{self.prefix}r{name}"
            self._make_ns(router)
            self._plug_into_wan(router, index, public_ip, "wan0")
            lan = f"10.77.{10 + index}"
            sh("ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan0")
            sh("ip", "-n", router, "link", "set", "lan0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{lan}.2/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"{lan}.1")
            sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # A home router: masquerade out, nothing in unless it answers a connection from inside.
            nft(router, "table ip home {\n"
                        " chain post {\n  type nat hook postrouting priority 100;\n  oifname \"wan0\" counter masquerade\n }\n"
                        " chain forward_filter {\n  type filter hook forward priority 0; policy drop;\n"
                        "  ct state established,related accept\n  iifname \"lan0\" oifname \"wan0\" accept\n }\n"
                        "}")
            host = Host(name, index, ns, f"{lan}.2", public_ip, up_mbit, down_mbit, delay_ms, router_ns=router)
            if up_mbit:
                tbf(ns, "eth0", up_mbit)
            if down_mbit:
                tbf(router, "lan0", down_mbit)
        # Every TCP connection this host opens into the emulated internet goes through its delaying relay.
        nft(ns, "table ip delay {\n"
                " chain out { type nat hook output priority -100;\n"
                f"   meta mark != {MARK} ip daddr 10.77.0.0/16 ip daddr != {host.ip} tcp dport != {RELAY_PORT} "
                f"counter redirect to :{RELAY_PORT}\n }}\n"
                "}")
        self.hosts[name] = host
        return host

    def _write_delays(self) -> None:
        for h in self.hosts.values():
            table = {"self": h.delay_ms}
            for o in self.hosts.values():
                if o is not h:
                    table[o.public_ip] = o.delay_ms
                    table[o.ip] = o.delay_ms
            (self.work_dir / f"delays-{h.name}.json").write_text(json.dumps(table))

    def start(self, timeout: float = 30) -> "Wan":
        """Start (or refresh the delay tables of) the delaying relay in every host added so far."""
        self._write_delays()
        for name, h in self.hosts.items():
            if name in self.relays:
                continue
            relay = JsonProc(["-m", "scripts.wan_emu.netns_exec", h.ns, "scripts.wan_emu.delay_relay",
                              "--port", str(RELAY_PORT), "--delays", str(self.work_dir / f"delays-{name}.json")],
                             self.work_dir / f"relay-{name}.log")
            self.relays[name] = relay
            self.procs.append(relay)
        for relay in self.relays.values():
            if not any(e.get("event") == "relay_ready" for e in relay.history):
                relay.wait_event("relay_ready", timeout)
        return self

    # --- using ----------------------------------------------------------------------------------------------------
    def spawn(self, host: str, module_args: List[str], log_path: Path, cls=JsonProc) -> JsonProc:
        """``python -m MODULE ARGS`` inside ``host``'s namespace, stopped with the emulator (or earlier by PID)."""
        proc = cls(["-m", "scripts.wan_emu.netns_exec", self.hosts[host].ns, *module_args], log_path)
        self.procs.append(proc)
        return proc

    def run_in(self, host: str, *cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.hosts[host].ns, *cmd, check=check, timeout=timeout)

    def set_link(self, host: str, up: bool) -> None:
        """Take a host's access link down (cable pulled, Wi-Fi gone) or bring it back. For a NATed host the router's
        LAN side goes down (the host keeps its address and routes); for a public one the bridge port does."""
        h = self.hosts[host]
        if h.nat:
            sh("ip", "-n", h.router_ns, "link", "set", "lan0", "up" if up else "down")
        else:
            sh("ip", "-n", self.wan_ns, "link", "set", f"p{h.index}", "up" if up else "down")

    def nat_packets(self, host: str) -> int:
        """Packets the host's router has masqueraded so far."""
        out = sh("ip", "netns", "exec", self.hosts[host].router_ns, "nft", "list", "chain", "ip", "home", "post").stdout
        for line in out.splitlines():
            if "masquerade" in line and "packets" in line:
                return int(line.split("packets")[1].split()[0])
        return 0

    def peers_seen_by(self, host: str) -> List[str]:
        """Remote IPs of the host's established TCP connections (``ss``)."""
        out = self.run_in(host, "ss", "-tnH", "state", "established").stdout
        ips = []
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 4:
                ips.append(cols[3].rsplit(":", 1)[0])
        return ips

    # --- teardown -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            stop_all(self.procs, 15)
        finally:
            for ns in reversed(self.namespaces):
                sh("ip", "netns", "del", ns, check=False)
            self.namespaces.clear()

    def __enter__(self) -> "Wan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
