"""Argument checks that run before anything heavy loads: a typo costs a second, not a model load.

Each check raises `node.errors.ConfigError` with one line that names the flag and says what to give instead. They
read only the file system and the strings themselves (no torch, transformers, datasets or hivemind import), so a
program answers a bad path, address, key or recipe in well under the time it takes to import its model stack.
The authoritative parsers still run later (hivemind's multiaddr, transformers' loader); these checks are the
fast, friendly subset.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable

from node.errors import ConfigError

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
JOIN_HINT = "copy the address the learner prints, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."

# multiaddr protocols a gepo-swarm node may be given, by the kind of value that follows them
_ADDRESS = {"ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr"}
_PORT = {"tcp", "udp"}
_PEER = {"p2p", "ipfs"}
_BARE = {"p2p-circuit", "quic", "quic-v1", "ws", "wss", "tls", "noise", "webtransport"}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9-]{1,63})*\.?$")
_B58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]+$")


def parse_device(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (checked against the hardware when the model loads)."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise ValueError(f"expected {DEVICES}")


parse_device.__name__ = "device"  # argparse names the type in "invalid device value: 'x'"


def check_peer_id(text: str) -> None:
    """A libp2p peer id: base58 of a multihash (identity for Ed25519 keys, "12D3KooW...", or sha256, "Qm...")."""
    if not _B58.match(text):
        raise ValueError(f"peer id {text!r} is not base58")
    import base58

    raw = base58.b58decode(text)
    if len(raw) < 3 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2:
        raise ValueError(f"peer id {text!r} is not a multihash")


def check_multiaddr(text: str, flag: str, *, peer: bool = False, explicit_port: bool = False) -> str:
    """`text` as a multiaddr `flag` accepts. peer: must end in /p2p/<peer id> (a bootstrap address);
    explicit_port: tcp/udp port 0 ("any") is not allowed (an announced address)."""
    value = str(text).strip()
    try:
        if not value.startswith("/"):
            raise ValueError("a multiaddr starts with '/', e.g. /ip4/1.2.3.4/tcp/31337")
        parts = value.split("/")[1:]
        peer_id = None
        i = 0
        while i < len(parts):
            proto = parts[i]
            if proto in _BARE:
                i += 1
                continue
            if proto not in _ADDRESS | _PORT | _PEER:
                raise ValueError(f"unknown protocol {proto!r}")
            if i + 1 >= len(parts) or not parts[i + 1]:
                raise ValueError(f"/{proto} needs a value")
            arg = parts[i + 1]
            if proto == "ip4":
                ipaddress.IPv4Address(arg)
            elif proto == "ip6":
                ipaddress.IPv6Address(arg)
            elif proto in _ADDRESS and not _HOSTNAME.match(arg):
                raise ValueError(f"{arg!r} is not a host name")
            elif proto in _PORT:
                if not arg.isdigit() or not 0 <= int(arg) <= 65535:
                    raise ValueError(f"port {arg!r} is not a number in 0..65535")
                if explicit_port and int(arg) == 0:
                    raise ValueError("needs an explicit port (0 means any port, which peers cannot dial)")
            elif proto in _PEER:
                check_peer_id(arg)
                peer_id = arg
            i += 2
        if peer and peer_id is None:
            raise ValueError("it has no /p2p/<peer id> part")
    except ValueError as exc:
        hint = f"; {JOIN_HINT}" if peer else ""
        raise ConfigError(f"{flag} {value!r}: {exc}{hint}") from None
    return value


def check_public_key(text: str, flag: str = "--learner-key") -> str:
    from protocol.errors import ProtocolError
    from protocol.identity import parse_public_key

    try:
        parse_public_key(text)
    except ProtocolError as exc:
        raise ConfigError(f"{flag}: {exc.detail}; give the key the learner "
                          f"prints at start (ed25519: followed by 64 hex digits)") from None
    return text


def check_swarm_args(peers: Iterable[str], host_maddrs: Iterable[str], announce_maddrs: Iterable[str],
                     learner_key: str | None = None, *, need_peers: bool = False) -> None:
    """Every address and key flag of a node, before its libp2p daemon starts."""
    peers = list(peers)
    if need_peers and not peers:
        raise ConfigError(f"--peers is required: the multiaddr of the learner or of any sampler in the swarm; "
                          f"{JOIN_HINT} (the learner also prints the whole command to join)")
    for text in peers:
        check_multiaddr(text, "--peers", peer=True)
    for text in host_maddrs:
        check_multiaddr(text, "--host-maddrs")
    for text in announce_maddrs:
        check_multiaddr(text, "--announce-maddrs", explicit_port=True)
    if learner_key is not None:
        check_public_key(learner_key)


def _looks_like_path(ref: str) -> bool:
    """True when `ref` can only be a local path (not a hub name such as "org/name")."""
    first = ref.split("/", 1)[0]
    return (ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref
            or ("/" in ref and first != ref and Path(first).is_dir()))


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model(ref: str | None, flag: str = "--model") -> None:
    """A model folder must exist and hold a config.json; a hub id must be cached when the hub is off."""
    if ref in (None, "", "tiny"):  # the built-in tiny policy, package data (the wheel check covers it)
        return
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"{flag} {ref}: the folder has no config.json; give a folder written by "
                              f"save_pretrained (e.g. python -m scripts.convert_smollm2 writes one)")
        return
    if _looks_like_path(ref):
        raise ConfigError(f"{flag} {ref}: no such folder; give an existing model folder or a hub id")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            raise ConfigError(f"{flag} {ref}: no such folder, and the hub is off (HF_HUB_OFFLINE) with no cached "
                              f"copy of that hub id; give a local model folder")


def check_dataset(source: str, flag: str = "--dataset") -> None:
    """A prompt file or folder must exist ("synthetic" and hub names are checked when the prompts load)."""
    from gepo.data import is_local_source

    if source == "synthetic" or os.path.exists(os.path.expanduser(source)):
        return
    if is_local_source(source) or _looks_like_path(source):
        raise ConfigError(f"{flag} {source}: no such file or folder; give a .jsonl/.json/.csv/.parquet file, a "
                          f"folder saved with datasets, a hub dataset name, or synthetic")
