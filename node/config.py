"""Every knob of the swarm transport, with one argparse flag per field (``--help`` documents them all).

    parser = argparse.ArgumentParser()
    SwarmConfig.add_argparse_args(parser)
    cfg = SwarmConfig.from_args(parser.parse_args())

Defaults suit a volunteer on the internet; tests and benchmarks override host/NAT options to stay on loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .ratelimit import parse_size


@dataclass
class SwarmConfig:
    # --- joining ---------------------------------------------------------------------------------------------
    run_id: str = "gepo"
    peers: List[str] = field(default_factory=list)
    host_maddrs: List[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: List[str] = field(default_factory=list)
    identity_path: Optional[str] = None
    key_path: Optional[str] = None
    client_mode: bool = False
    use_relay: bool = True
    use_auto_relay: bool = False
    nat_port_map: bool = True
    auto_nat: bool = True
    learner_key: Optional[str] = None
    state_dir: Optional[str] = None
    # --- bounds and timeouts (seconds) -----------------------------------------------------------------------
    startup_timeout: float = 30.0
    bootstrap_timeout: float = 5.0
    dht_timeout: float = 10.0
    connect_timeout: float = 5.0
    rpc_timeout: float = 10.0
    stall_timeout: float = 15.0
    call_timeout: float = 30.0
    # --- learner record --------------------------------------------------------------------------------------
    heartbeat_ttl: float = 30.0
    poll_interval: float = 1.0
    # --- rollouts --------------------------------------------------------------------------------------------
    max_outbox_items: int = 10_000
    max_outbox_bytes: int = 2 * 1024**3
    max_group_bytes: int = 8 * 1024**2
    inbox_size: int = 4096
    max_push_streams: int = 64
    max_push_streams_per_peer: int = 4
    push_idle_timeout: float = 15.0
    fresh_key_share: float = 0.0625
    trusted_after: int = 8
    max_tracked_keys: int = 100_000
    sampler_stats_top: int = 32
    retry_min: float = 0.5
    retry_max: float = 30.0
    # --- weights ---------------------------------------------------------------------------------------------
    upload_limit: Optional[int] = None
    max_uploads: int = 4
    max_inflight: int = 8
    max_inflight_per_peer: int = 2
    max_peers: int = 8
    have_poll: float = 0.3
    peer_record_ttl: float = 60.0
    keep_versions: int = 2
    swarming: bool = True
    ration: bool = True
    ration_interval: Optional[float] = None
    max_chunk_bytes: int = 64 * 1024**2
    chunk_requests_per_peer: float = 200.0
    max_chunk_streams_per_peer: int = 8
    max_manifest_bytes: int = 16 * 1024**2

    # ------------------------------------------------------------------------------------------------------------
    @property
    def outbox_dir(self) -> Optional[str]:
        return os.path.join(self.state_dir, "outbox") if self.state_dir else None

    @property
    def inbox_dir(self) -> Optional[str]:
        return os.path.join(self.state_dir, "inbox") if self.state_dir else None

    @property
    def weights_dir(self) -> Optional[str]:
        return os.path.join(self.state_dir, "weights") if self.state_dir else None

    def with_defaults_for_state_dir(self) -> "SwarmConfig":
        """Fill ``identity_path``/``key_path`` inside ``state_dir`` when they were not given."""
        if self.state_dir:
            if self.identity_path is None:
                self.identity_path = os.path.join(self.state_dir, "p2p_identity.key")
            if self.key_path is None:
                self.key_path = os.path.join(self.state_dir, "ed25519.key")
        return self

    def replace(self, **changes: Any) -> "SwarmConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def add_argparse_args(parser: argparse.ArgumentParser) -> None:
        d = SwarmConfig()
        g = parser.add_argument_group("swarm: joining")
        g.add_argument("--run-id", default=d.run_id, help="swarm name; peers of other runs are ignored")
        g.add_argument(
            "--peers", nargs="*", default=[], metavar="MADDR",
            help="bootstrap multiaddrs, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo... (several allowed; "
                 "unreachable ones are skipped with a warning)",
        )
        g.add_argument(
            "--host-maddrs", nargs="+", default=d.host_maddrs, metavar="MADDR",
            help="multiaddrs to listen on (default: all interfaces, a random TCP port; "
                 "a learner should use a fixed port, e.g. /ip4/0.0.0.0/tcp/31337)",
        )
        g.add_argument(
            "--announce-maddrs", nargs="*", default=[], metavar="MADDR",
            help="public multiaddrs to announce (behind port forwarding); explicit ports only",
        )
        g.add_argument(
            "--identity", dest="identity_path", default=None, metavar="PATH",
            help="libp2p key file: keeps this node's peer id across restarts (created if missing)",
        )
        g.add_argument(
            "--key", dest="key_path", default=None, metavar="PATH",
            help="Ed25519 key file that signs rollouts/records/manifests (created if missing)",
        )
        g.add_argument(
            "--client-mode", action="store_true",
            help="for peers that cannot accept incoming connections: use the DHT as a client only, "
                 "do not serve weight chunks to others",
        )
        g.add_argument("--use-relay", action=argparse.BooleanOptionalAction, default=d.use_relay,
                       help="allow reaching peers behind NATs through libp2p circuit relays")
        g.add_argument("--use-auto-relay", action=argparse.BooleanOptionalAction, default=d.use_auto_relay,
                       help="look for relays to become reachable yourself when behind a NAT")
        g.add_argument("--nat-port-map", action=argparse.BooleanOptionalAction, default=d.nat_port_map,
                       help="try UPnP/NAT-PMP port mapping on the router")
        g.add_argument("--auto-nat", action=argparse.BooleanOptionalAction, default=d.auto_nat,
                       help="run libp2p AutoNAT to detect reachability")
        g.add_argument(
            "--learner-key", default=None, metavar="ed25519:HEX",
            help="public key of the learner to trust; without it the first learner found is trusted "
                 "(trust on first use, with a loud warning)",
        )
        g.add_argument(
            "--state-dir", default=None, metavar="DIR",
            help="directory for the outbox, downloaded weights, inbox and (by default) key files",
        )
        g = parser.add_argument_group("swarm: bounds and timeouts (seconds)")
        for name, help_ in [
            ("startup_timeout", "starting the local libp2p daemon and DHT"),
            ("bootstrap_timeout", "reaching each bootstrap peer"),
            ("dht_timeout", "each DHT get/store"),
            ("connect_timeout", "dialing a peer / opening a stream"),
            ("rpc_timeout", "a request's answer"),
            ("stall_timeout", "no bytes moving on a transfer"),
            ("call_timeout", "any blocking call from the program into the swarm"),
            ("heartbeat_ttl", "lifetime of the learner's signed heartbeat record (refreshed at 1/3 of it)"),
            ("poll_interval", "how often samplers re-read the learner record"),
            ("retry_min", "first back-off after a failed delivery"),
            ("retry_max", "longest back-off between delivery attempts"),
            ("have_poll", "how often a downloading peer asks its neighbours what they hold"),
            ("peer_record_ttl", "lifetime of a peer's signed 'what I hold' DHT record"),
        ]:
            g.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name), help=help_)
        g.add_argument("--max-outbox-items", type=int, default=d.max_outbox_items,
                       help="rollout groups kept on disk while the learner is unreachable")
        g.add_argument("--max-outbox-bytes", type=parse_size, default=d.max_outbox_bytes,
                       help="bytes kept in the outbox (e.g. 2GB)")
        g.add_argument("--max-group-bytes", type=parse_size, default=d.max_group_bytes,
                       help="largest signed rollout group accepted/sent")
        g.add_argument("--inbox-size", type=int, default=d.inbox_size,
                       help="learner: accepted groups waiting for the trainer before senders are told 'busy'")
        g.add_argument("--max-push-streams", type=int, default=d.max_push_streams,
                       help="learner: concurrent rollout streams (when all are taken, a newcomer evicts the one that "
                            "has gone longest without an accepted group, if that is over 2 s) (default: %(default)s)")
        g = parser.add_argument_group("swarm: fair limits (learner)")
        g.add_argument("--max-push-streams-per-peer", type=int, default=d.max_push_streams_per_peer,
                       help="concurrent rollout streams from one peer (default: %(default)s)")
        g.add_argument("--push-idle-timeout", type=float, default=d.push_idle_timeout,
                       help="seconds a rollout stream may go without delivering an accepted group before it is "
                            "closed (rejected, refused or junk frames do not keep it open) (default: %(default)s)")
        g.add_argument("--fresh-key-share", type=float, default=d.fresh_key_share,
                       help="fraction of the inbox (at least one slot) shared by sampler keys with fewer than "
                            "--trusted-after accepted groups, one waiting group per key; the rest is split between "
                            "established keys by their accepted history (default: %(default)s)")
        g.add_argument("--trusted-after", type=int, default=d.trusted_after,
                       help="accepted groups after which a sampler key leaves the fresh-key pool (default: %(default)s)")
        g.add_argument("--max-tracked-keys", type=int, default=d.max_tracked_keys,
                       help="sampler keys whose accepted history is remembered (least recently accepted forgotten) (default: %(default)s)")
        g.add_argument("--sampler-stats-top", type=int, default=d.sampler_stats_top,
                       help="per-sampler statistics kept for the N busiest keys, the others merged into one bucket (default: %(default)s)")
        g.add_argument("--chunk-requests-per-peer", type=float, default=d.chunk_requests_per_peer,
                       help="weight requests (chunk/have/manifest) per second one peer may make to this node "
                            "(bursts of twice that); beyond it the answer is busy (default: %(default)s)")
        g.add_argument("--max-chunk-streams-per-peer", type=int, default=d.max_chunk_streams_per_peer,
                       help="concurrent weight streams from one peer (default: %(default)s)")
        g = parser.add_argument_group("swarm: weights")
        g.add_argument("--upload-limit", type=parse_size, default=None, metavar="BYTES_PER_S",
                       help="cap on this node's chunk upload, e.g. 20MB (per second); default unlimited")
        g.add_argument("--max-uploads", type=int, default=d.max_uploads, help="concurrent chunk uploads served")
        g.add_argument("--max-inflight", type=int, default=d.max_inflight, help="concurrent chunk downloads")
        g.add_argument("--max-inflight-per-peer", type=int, default=d.max_inflight_per_peer,
                       help="concurrent chunk downloads from one source")
        g.add_argument("--max-peers", type=int, default=d.max_peers, help="neighbours asked for chunks")
        g.add_argument("--keep-versions", type=int, default=d.keep_versions, help="policy versions kept on disk")
        g.add_argument("--swarming", action=argparse.BooleanOptionalAction, default=d.swarming,
                       help="fetch chunks from other samplers and serve ours (off: learner only)")
        g.add_argument("--ration", action=argparse.BooleanOptionalAction, default=d.ration,
                       help="learner: serve each chunk about once per ration interval and let samplers "
                            "spread it (off: serve every request)")
        g.add_argument("--ration-interval", type=float, default=None,
                       help="learner: seconds before a chunk is served again (default: 2 x size / upload limit, "
                            "at least 5 s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "SwarmConfig":
        values = {}
        for f in dataclasses.fields(cls):
            if hasattr(args, f.name):
                values[f.name] = getattr(args, f.name)
        values.update(overrides)
        for key in ("peers", "host_maddrs", "announce_maddrs"):
            if values.get(key) is None:
                values[key] = [] if key != "host_maddrs" else list(cls().host_maddrs)
            else:
                values[key] = list(values[key])
        return cls(**values).with_defaults_for_state_dir()
