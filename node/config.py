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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .cli import add_dataclass_args, option
from .ratelimit import parse_size


@dataclass
class SwarmConfig:
    # Each field is a flag (`--run-id`...); `role=` marks the flags only the learner or only a sampler has.
    # --- joining ---------------------------------------------------------------------------------------------
    run_id: str = option("gepo", "swarm name; peers of other runs are ignored")
    peers: List[str] = option(default_factory=list, metavar="MADDR",
                              help="bootstrap multiaddrs, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo... (several allowed; "
                                   "unreachable ones are skipped with a warning)")
    host_maddrs: List[str] = option(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], metavar="MADDR",
                                    help="multiaddrs to listen on (port 0: a random one; a learner should use a fixed "
                                         "port, e.g. /ip4/0.0.0.0/tcp/31337)")
    announce_maddrs: List[str] = option(default_factory=list, metavar="MADDR",
                                        help="public multiaddrs to announce (behind port forwarding); explicit ports")
    identity_path: Optional[str] = option(None, "libp2p key file: keeps this node's peer id across restarts (created "
                                                "if missing; default: in --state-dir)", metavar="PATH")
    key_path: Optional[str] = option(None, "Ed25519 key file that signs rollouts, records and manifests (created if "
                                           "missing; default: in --state-dir)", metavar="PATH")
    client_mode: bool = option(False, "for samplers that cannot accept incoming connections: use the DHT as a client "
                                      "only and serve no weight chunks", role="sampler")
    use_relay: bool = option(True, "allow reaching peers behind NATs through libp2p circuit relays")
    use_auto_relay: bool = option(False, "look for relays to become reachable yourself when behind a NAT")
    nat_port_map: bool = option(True, "try UPnP/NAT-PMP port mapping on the router")
    auto_nat: bool = option(True, "run libp2p AutoNAT to detect reachability")
    learner_key: Optional[str] = option(None, "public key of the learner to trust, as the learner prints it; without "
                                              "it the first learner found is trusted (with a loud warning)",
                                        metavar="ed25519:HEX", role="sampler")
    state_dir: Optional[str] = option(None, "directory for the outbox, downloaded weights, inbox and key files "
                                            "(learner default: RUN_DIR/swarm; sampler default: "
                                            "~/.cache/gepo-swarm/sampler-RUN_ID)", metavar="DIR")
    # --- bounds and timeouts (seconds) -----------------------------------------------------------------------
    startup_timeout: float = option(30.0, "seconds for starting the local libp2p daemon and DHT")
    bootstrap_timeout: float = option(5.0, "seconds for reaching each bootstrap peer")
    dht_timeout: float = option(10.0, "seconds for each DHT get/store")
    connect_timeout: float = option(5.0, "seconds for dialing a peer / opening a stream")
    rpc_timeout: float = option(10.0, "seconds for a request's answer")
    stall_timeout: float = option(15.0, "seconds without bytes moving before a transfer is abandoned")
    call_timeout: float = option(30.0, "seconds for any blocking call from the program into the swarm")
    # --- learner record --------------------------------------------------------------------------------------
    heartbeat_ttl: float = option(30.0, "seconds the learner's signed heartbeat record lives (refreshed at 1/3 of "
                                        "it)", role="learner")
    poll_interval: float = option(1.0, "seconds between reads of the learner's heartbeat", role="sampler")
    # --- rollouts --------------------------------------------------------------------------------------------
    max_outbox_items: int = option(10_000, "rollout groups kept on disk while the learner is unreachable",
                                   role="sampler")
    max_outbox_bytes: int = option(2 * 1024**3, "bytes kept in the outbox (e.g. 2GB)", parse=parse_size,
                                   metavar="BYTES", role="sampler")
    max_group_bytes: int = option(8 * 1024**2, "largest signed rollout group sent (sampler) or accepted (learner)",
                                  parse=parse_size, metavar="BYTES")
    inbox_size: int = option(4096, "accepted groups waiting for the trainer before senders are told 'busy' (at most "
                                   "--max-buffered-steps x --groups-per-step)", role="learner")
    max_push_streams: int = option(64, "concurrent incoming rollout streams", role="learner")
    max_push_streams_per_peer: int = option(4, "concurrent rollout streams from one peer", role="learner")
    push_idle_timeout: float = option(15.0, "seconds a rollout stream may go without delivering an accepted group "
                                            "before it is closed (rejected, refused or junk frames do not keep it "
                                            "open)", role="learner")
    fresh_key_share: float = option(0.0625, "fraction of the inbox (at least one slot) shared by sampler keys with "
                                            "fewer than --trusted-after accepted groups, one waiting group per key; "
                                            "the rest is split between established keys by their accepted history",
                                    role="learner")
    trusted_after: int = option(8, "accepted groups after which a sampler key leaves the fresh-key pool",
                                role="learner")
    max_tracked_keys: int = option(100_000, "sampler keys whose accepted history is remembered (least recently "
                                            "accepted forgotten first)", role="learner")
    sampler_stats_top: int = option(32, "per-sampler statistics kept for the N busiest keys, the others merged "
                                        "into one bucket", role="learner")
    retry_min: float = option(0.5, "seconds of the first back-off after a failed delivery", role="sampler")
    retry_max: float = option(30.0, "longest back-off between delivery attempts, in seconds", role="sampler")
    # --- weights ---------------------------------------------------------------------------------------------
    upload_limit: Optional[int] = option(None, "cap on this node's chunk upload in bytes per second, e.g. 20MB "
                                               "(none: unlimited)", parse=parse_size, metavar="BYTES_PER_S")
    max_uploads: int = option(4, "concurrent chunk uploads served")
    max_inflight: int = option(8, "concurrent chunk downloads", role="sampler")
    max_inflight_per_peer: int = option(2, "concurrent chunk downloads from one source", role="sampler")
    max_peers: int = option(8, "neighbours asked for chunks", role="sampler")
    have_poll: float = option(0.3, "seconds between asking neighbours which chunks they hold", role="sampler")
    peer_record_ttl: float = option(60.0, "seconds a peer's signed 'chunks I hold' record lives", role="sampler")
    keep_versions: int = option(2, "policy versions kept on disk")
    swarming: bool = option(True, "fetch chunks from other samplers and serve ours (off: from the learner only)",
                            role="sampler")
    ration: bool = option(True, "serve each chunk about once per --ration-interval and let the samplers spread it "
                                "(off: serve every request)", role="learner")
    ration_interval: Optional[float] = option(None, "seconds before a chunk is served again (none: 2 x size / "
                                                    "upload limit, at least 5 s)", role="learner")
    hoard_grace: float = option(2.0, "seconds a peer that took most first copies of a version has to pass a chunk "
                                     "on before the learner serves that chunk to others again (at most half the "
                                     "ration interval; longer on slow or loaded peers)", role="learner")
    max_chunk_bytes: int = option(64 * 1024**2, "largest weight chunk accepted", parse=parse_size, metavar="BYTES",
                                  role="sampler")
    chunk_requests_per_peer: float = option(200.0, "weight requests (chunk/have/manifest) per second one peer may "
                                                   "make to this node (bursts of twice that); beyond it the answer "
                                                   "is busy")
    max_chunk_streams_per_peer: int = option(8, "concurrent weight streams from one peer")
    max_manifest_bytes: int = option(16 * 1024**2, "largest weight manifest accepted", parse=parse_size,
                                     metavar="BYTES", role="sampler")
    # --- weight deltas (node/delta_publish.py, node/catchup.py) -----------------------------------------------
    weight_deltas: bool = option(True, "learner: publish each version also as a lossless delta from the previous one "
                                       "and, between keyframes, from the last keyframe; sampler: reach a new version "
                                       "by the cheapest of a chain of deltas, a cumulative delta or the full version "
                                       "(off: full versions only)")
    keyframe_every: int = option(10, "a keyframe (the base of the cumulative deltas) every N published versions; the "
                                     "first version is one", role="learner")
    delta_keep_bytes: int = option(1024**3, "bytes of complete deltas kept for peers that are catching up (those into "
                                            "the newest version are always kept; none into versions 2 x "
                                            "--keyframe-every or more behind the newest)",
                                   parse=parse_size, metavar="BYTES")
    delta_chunk_size: int = option(4 * 1024**2, "bytes of the XOR stream per delta chunk, before compression",
                                   parse=parse_size, metavar="BYTES", role="learner")

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
    def add_argparse_args(parser: argparse.ArgumentParser, role: Optional[str] = None) -> None:
        """One flag per field, in three groups; with `role` ("learner"/"sampler") only that program's flags."""
        for title, names in _FLAG_GROUPS.items():
            add_dataclass_args(parser, SwarmConfig, title, only=names, role=role, skip=_NO_FLAG,
                               rename={"identity_path": "identity", "key_path": "key"})

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


_FIELDS = [f.name for f in dataclasses.fields(SwarmConfig)]
_FLAG_GROUPS = {  # --help's sections, in field order
    "swarm: joining": _FIELDS[: _FIELDS.index("state_dir") + 1],
    "swarm: bounds and timeouts": _FIELDS[_FIELDS.index("startup_timeout"): _FIELDS.index("retry_max") + 1],
    "swarm: weights": _FIELDS[_FIELDS.index("upload_limit"):],
}
_NO_FLAG = ("max_chunk_bytes",)  # not read by any node yet
