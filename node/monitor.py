"""`python -m node.monitor --peers <multiaddr>`: a live view of a swarm from nothing but a peers address.

The monitor joins the DHT as a client (it accepts no connections and stores nothing) and reads the signed records
the nodes publish anyway, checked by the same validator (:class:`protocol.records.Ed25519OwnerValidator`):

* the learner's heartbeat (``gepo/<run>/learner``): policy version, step and its counters (accepted, rejected,
  stale, trained tokens, uptime);
* every sampler's status (``gepo/<run>/samplers/<shard>``): the version it samples with, groups sent, accepted,
  rejected, tokens generated, outbox, uptime.

Lag is learner version - sampler version. Rates come from the difference between two successive records of the same
node (their signed times); a node seen once is shown with its average since it started (counter / uptime).

    python -m node.monitor --peers /ip4/1.2.3.4/tcp/31337/p2p/Qm... [--run-id gepo] [--interval 5]
    python -m node.monitor --peers ... --once            # one table, then exit
    python -m node.monitor --peers ... --once --json     # one JSON object (with --count N: JSON lines)
    python -m node.monitor --peers ... --web 127.0.0.1:8080   # also a web page with live charts (node/web)

Exit status (node/errors.py): 0 done, 2 bad arguments (a bad --web address too), 3 no peer reachable or no learner
heartbeat found
(``--once``/``--count``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, TextIO

from node.cli import ArgumentParser, add_dataclass_args, dataclass_from_args, option, parse_with_recipe, program_name
from node.errors import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE

log = logging.getLogger("node.monitor")

EXIT_NO_LEARNER = EXIT_UNREACHABLE  # the swarm answered, but no learner is in it


@dataclass
class MonitorConfig:
    peers: List[str] = option(default_factory=list, metavar="MULTIADDR",
                              help="multiaddr(s) of any swarm node, with /p2p/<peer id> (e.g. the learner's)")
    run_id: str = option("gepo", "the run to watch (the learner's --run-id)")
    learner_key: Optional[str] = option(None, "trust only heartbeats signed by this key (ed25519:HEX); without it "
                                              "the freshest heartbeat is shown", metavar="ed25519:HEX")
    interval: float = option(5.0, "seconds between refreshes")
    window: float = option(60.0, "rates span the records seen in about the last this-many seconds")
    once: bool = option(False, "print one snapshot and exit (same as --count 1)")
    count: int = option(0, "exit after this many snapshots (0: until Ctrl-C)")
    json: bool = option(False, "print snapshots as JSON (one object per line) instead of a table")
    wait: float = option(30.0, "seconds to wait for the learner's heartbeat before the first snapshot")
    host_maddrs: List[str] = option(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], metavar="MULTIADDR",
                                    help="local libp2p listen addresses (the monitor is a client; any port)")
    use_relay: bool = option(True, "reach peers through libp2p relays")
    nat_port_map: bool = option(False, "ask the router for a port mapping (UPnP/NAT-PMP)")
    auto_nat: bool = option(False, "run libp2p AutoNAT")
    startup_timeout: float = option(30.0, "seconds for starting the local libp2p daemon and DHT")
    bootstrap_timeout: float = option(5.0, "seconds for reaching each --peers address")
    dht_timeout: float = option(5.0, "seconds for each DHT read")
    web: Optional[str] = option(None, "also serve a web dashboard (table and live plots) at HOST:PORT, e.g. "
                                      "127.0.0.1:8080 (port 0: any free one); bound only there", metavar="HOST:PORT")
    web_history: int = option(720, "snapshots the dashboard's plots keep (720 at --interval 5: one hour)")
    log_level: str = option("WARNING", "logging level")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program_name("node.monitor", "gepo-monitor"),
        description="Live view of a gepo-swarm run: the learner's version and step rate, each sampler's version, "
                    "lag, throughput and rejects, from the signed DHT records. Needs only --peers.",
    )
    parser.add_argument("--config", default=None, metavar="RECIPE.yaml",
                        help="YAML file of option values (keys are option names); flags given here win (default: none)")
    add_dataclass_args(parser, MonitorConfig, "monitor")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# snapshots (pure functions of the records; tested without a network)


@dataclass
class RateTracker:
    """Per-node rates from successive records: (counter now - counter then) / (record time now - then), "then" being
    the oldest record of that node seen within the last `window` seconds (so a rate spans up to `window` seconds and
    one discrete event, such as a single learner step, does not swing it). A node seen once gets its average since
    it started (counter / up_s)."""

    window: float = 60.0
    history: Dict[str, list] = field(default_factory=dict)  # node key -> [(record time, counters)], oldest first

    def rates(self, key: str, t: float, counters: Dict[str, int], names: tuple) -> tuple[Dict[str, float], str]:
        """Rates per second for `names`, and how they were obtained ("window Ns" or "average")."""
        hist = self.history.setdefault(key, [])
        if not hist or t > hist[-1][0]:
            hist.append((t, dict(counters)))
        while len(hist) > 2 and hist[-1][0] - hist[1][0] >= self.window:
            hist.pop(0)  # the span stays just over `window` seconds
        t0, c0 = hist[0]
        t1, c1 = hist[-1]
        if t1 > t0:
            dt = t1 - t0
            return {n: max(0.0, c1.get(n, 0) - c0.get(n, 0)) / dt for n in names}, f"window {dt:.0f}s"
        up = c1.get("up_s", 0)
        return {n: c1.get(n, 0) / up if up > 0 else 0.0 for n in names}, "average"


def snapshot(run_id: str, heartbeats: Dict[bytes, Any], statuses: Dict[bytes, Any], now: float,
             tracker: RateTracker, pinned: bool = False) -> Dict[str, Any]:
    """One view of the swarm from the records read: {"run_id", "time", "learner", "samplers"}."""
    from protocol.identity import format_public_key

    learner = None
    if heartbeats:
        key, hb = max(heartbeats.items(), key=lambda kv: kv[1].time)
        c = dict(hb.counters)
        rates, how = tracker.rates("learner:" + key.hex(), hb.time, {**c, "version": hb.policy_version},
                                   ("step", "version", "accepted", "tokens"))
        learner = {
            "key": format_public_key(key), "pinned": pinned, "peer_id": hb.peer_id, "version": hb.policy_version,
            "step": c.get("step"), "steps_per_s": rates["step" if "step" in c else "version"],
            "groups_per_s": rates["accepted"], "tokens_per_s": rates["tokens"], "rate": how,
            "accepted": c.get("accepted"), "rejected": c.get("rejected"), "stale": c.get("stale"),
            "duplicate": c.get("duplicate"), "busy": c.get("busy"), "tokens": c.get("tokens"), "up_s": c.get("up_s"),
            "reward_mean": _milli(c, "reward_mean"), "eval_accuracy": _milli(c, "eval_accuracy"),
            "staleness_mean": _milli(c, "staleness_mean"),
            "weights_mb": round(hb.weights_size / 2**20, 1), "age_s": round(max(0.0, now - hb.time), 1),
            "other_heartbeats": len(heartbeats) - 1,
        }
    samplers = []
    for key, st in statuses.items():
        c = dict(st.counters)
        rates, how = tracker.rates("sampler:" + key.hex(), st.time, c, ("submitted", "tokens"))
        samplers.append({
            "key": format_public_key(key), "peer_id": st.peer_id, "version": st.policy_version,
            "lag": None if learner is None else learner["version"] - st.policy_version,
            "groups_per_s": rates["submitted"], "tokens_per_s": rates["tokens"], "rate": how,
            "sent": c.get("submitted", 0), "accepted": c.get("accepted", 0), "rejected": c.get("rejected", 0),
            "outbox": c.get("outbox", 0), "tokens": c.get("tokens"), "down_mb": c.get("down_mb", 0),
            "up_mb": c.get("up_mb", 0), "up_s": c.get("up_s"), "age_s": round(max(0.0, now - st.time), 1),
        })
    samplers.sort(key=lambda s: s["key"])
    return {"run_id": run_id, "time": now, "learner": learner, "samplers": samplers}


def _milli(counters: Dict[str, int], name: str) -> Optional[float]:
    """A fraction the learner sends in thousandths (protocol.records.milli_counters), or None if it sent none."""
    value = counters.get(name + "_milli")
    return None if value is None else value / 1000


def _num(value: Any, fmt: str = "{:d}") -> str:
    return "-" if value is None else fmt.format(value)


def render_table(snap: Dict[str, Any]) -> str:
    """The snapshot as plain text: a learner line and one row per sampler."""
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    lines = [f"gepo-swarm run {snap['run_id']!r} at {stamp}: {len(snap['samplers'])} sampler(s)"]
    ln = snap["learner"]
    if ln is None:
        lines.append("learner  (no heartbeat found: is the run id right and the learner running?)")
    else:
        trust = "" if ln["pinned"] else " (unpinned)"
        lines.append(
            f"learner  {ln['key'][:24]}{trust} peer {ln['peer_id'][-8:]}  version {ln['version']}  "
            f"step {_num(ln['step'])}  {ln['steps_per_s']:.3f} steps/s  {ln['groups_per_s']:.2f} groups/s  "
            f"{ln['tokens_per_s']:.1f} tok/s ({ln['rate']})"
        )
        lines.append(
            f"         accepted {_num(ln['accepted'])}  rejected {_num(ln['rejected'])}  stale {_num(ln['stale'])}  "
            f"duplicate {_num(ln['duplicate'])}  weights {ln['weights_mb']} MB  up {_num(ln['up_s'])}s  "
            f"record {ln['age_s']:.0f}s old"
        )
    if snap["samplers"]:
        header = ("sampler", "peer", "version", "lag", "groups/s", "tok/s", "sent", "accepted", "rejected", "outbox",
                  "down MB", "age")
        rows = [header]
        for s in snap["samplers"]:
            rows.append((s["key"][8:20], s["peer_id"][-8:], str(s["version"]), _num(s["lag"]),
                         f"{s['groups_per_s']:.2f}", f"{s['tokens_per_s']:.1f}", str(s["sent"]), str(s["accepted"]),
                         str(s["rejected"]), str(s["outbox"]), str(s["down_mb"]), f"{s['age_s']:.0f}s"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                                   enumerate(zip(r, widths))))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the swarm side


class Monitor:
    """A client-only DHT node that reads and verifies the run's records."""

    def __init__(self, cfg: MonitorConfig) -> None:
        from node.config import SwarmConfig
        from protocol.identity import parse_public_key
        from protocol.records import Ed25519OwnerValidator

        self.cfg = cfg
        self.learner = parse_public_key(cfg.learner_key) if cfg.learner_key else None
        self.swarm_cfg = SwarmConfig(
            run_id=cfg.run_id, peers=list(cfg.peers), host_maddrs=list(cfg.host_maddrs), client_mode=True,
            use_relay=cfg.use_relay, nat_port_map=cfg.nat_port_map, auto_nat=cfg.auto_nat,
            startup_timeout=cfg.startup_timeout, bootstrap_timeout=cfg.bootstrap_timeout, dht_timeout=cfg.dht_timeout,
        )
        self.node = None
        self._validator = Ed25519OwnerValidator(cfg.run_id, None, learner=self.learner)
        self.tracker = RateTracker(window=cfg.window)

    def start(self) -> "Monitor":
        from node.dht import SwarmNode

        self.node = SwarmNode(self.swarm_cfg, record_validators=[self._validator])
        self.node.start()
        return self

    def read(self) -> tuple[Dict[bytes, Any], Dict[bytes, Any]]:
        """(heartbeats, statuses) as the DHT has them now; each read bounded by --dht-timeout."""
        from node.records import read_heartbeats, read_statuses

        async def both():
            import asyncio

            return await asyncio.gather(read_heartbeats(self.node, self.cfg.run_id, self.learner),
                                        read_statuses(self.node, self.cfg.run_id))

        heartbeats, statuses = self.node.loop.run(both(), 2 * self.cfg.dht_timeout + 5)
        return heartbeats, statuses

    def snapshot(self) -> Dict[str, Any]:
        from hivemind.utils import get_dht_time

        heartbeats, statuses = self.read()
        return snapshot(self.cfg.run_id, heartbeats, statuses, get_dht_time(), self.tracker,
                        pinned=self.learner is not None)

    def close(self) -> None:
        if self.node is not None:
            self.node.shutdown()
            self.node = None


def _emit(snap: Dict[str, Any], as_json: bool, out: TextIO, redraw: bool, footer: str = "") -> None:
    if as_json:
        out.write(json.dumps(snap, sort_keys=True) + "\n")
    else:
        out.write(("\x1b[H\x1b[2J" if redraw else "") + render_table(snap) + "\n" + footer
                  + ("" if redraw else "\n"))
    out.flush()


def run(cfg: MonitorConfig, out: TextIO = sys.stdout) -> int:
    count = 1 if cfg.once else max(0, cfg.count)
    redraw = not cfg.json and count != 1 and out.isatty()
    server, footer = None, ""
    if cfg.web:  # bound before the DHT starts, so a bad address fails at once
        from node.web.dashboard import Dashboard, DashboardServer, parse_address

        server = DashboardServer(parse_address(cfg.web), Dashboard(cfg.web_history, cfg.interval)).start()
        footer = f"dashboard: {server.url}\n"
        print(footer, end="", file=sys.stderr, flush=True)
    try:
        return _watch(cfg, out, count, redraw, server.dashboard if server else None, footer)
    finally:
        if server is not None:
            server.close()


def _watch(cfg: MonitorConfig, out: TextIO, count: int, redraw: bool, dashboard: Any, footer: str) -> int:
    monitor = Monitor(cfg).start()

    def take() -> Dict[str, Any]:
        snap = monitor.snapshot()
        if dashboard is not None:
            dashboard.update(snap)
        return snap

    try:
        deadline = time.monotonic() + cfg.wait
        snap = take()
        while snap["learner"] is None and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            snap = take()
        if snap["learner"] is None and count:
            _emit(snap, cfg.json, out, redraw)
            print(f"error: no learner heartbeat for run {cfg.run_id!r} within {cfg.wait:.0f}s through "
                  f"{' '.join(cfg.peers)} (is --run-id right and the learner running?)", file=sys.stderr)
            return EXIT_NO_LEARNER
        shown = 0
        while True:
            _emit(snap, cfg.json, out, redraw, footer)
            shown += 1
            if count and shown >= count:
                return EXIT_OK
            time.sleep(cfg.interval)
            snap = take()
    finally:
        monitor.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    from node.errors import BootstrapError, ConfigError
    from node.preflight import check_swarm_args
    from protocol.errors import ProtocolError

    args = parse_with_recipe(build_parser(), argv)
    cfg = dataclass_from_args(MonitorConfig, args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.interval <= 0 or cfg.wait < 0 or cfg.window <= 0 or cfg.web_history < 1:
        print("error: --interval and --window must be > 0, --wait >= 0, --web-history >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:  # before the libp2p daemon starts
        check_swarm_args(cfg.peers, cfg.host_maddrs, (), cfg.learner_key, need_peers=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.web:
        from node.web.dashboard import WebAddressError, parse_address

        try:
            parse_address(cfg.web)
        except WebAddressError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: the daemons are shut down on the way out
    try:
        return run(cfg)
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BootstrapError, TimeoutError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ValueError, ProtocolError) as exc:  # e.g. a malformed --learner-key
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
