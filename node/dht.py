"""Joining the swarm: one libp2p daemon + one hivemind DHT per process, bootstrap peers checked one by one.

Start-up order (:meth:`SwarmNode.start`):

1. every ``--peers`` multiaddr is parsed up front; a malformed one is a one-line :class:`ConfigError`;
2. the libp2p daemon is started from *this* process's swarm event loop (``P2P.create``), with the identity file
   (stable peer id), host/announce multiaddrs, client mode, relay and NAT options;
3. each bootstrap peer is dialled on its own with a timeout; an unreachable one is skipped with a warning; if peers
   were given and none answers, :class:`BootstrapError` says so (listing why each failed);
4. the hivemind DHT is forked (:class:`SwarmDHT`) on top of the same daemon, bootstrapped from the live peers only.

The forked DHT process runs a plain asyncio loop instead of uvloop (so a large value can never wedge its pipe) and
a watchdog: if the parent process dies (even by SIGKILL), it terminates the libp2p daemon and exits, so a crashed
node leaves no orphan holding its peer id.

All DHT access from the swarm goes through :meth:`SwarmNode.dht_get` / :meth:`SwarmNode.dht_store` in the loop
thread, each bounded by ``dht_timeout``. Functions passed to ``DHT.run_coroutine`` are module-level here (they are
pickled into the DHT process).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from hivemind.dht import DHT
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from .config import SwarmConfig
from .errors import BootstrapError, ConfigError  # defined where no hivemind import is needed
from .loop import LoopThread

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# multiaddrs


def parse_peer_maddr(text: str) -> Tuple[Multiaddr, PeerID]:
    """``/ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...`` -> (full multiaddr, peer id). Raises a one-line ConfigError."""
    text = str(text).strip()
    try:
        maddr = Multiaddr(text)
    except Exception as e:
        raise ConfigError(f"malformed multiaddr {text!r}: {e}") from None
    try:
        peer_b58 = maddr["p2p"]
    except Exception:
        raise ConfigError(
            f"multiaddr {text!r} has no /p2p/<peer id> part; copy the full address printed by the learner"
        ) from None
    try:
        peer_id = PeerID.from_base58(peer_b58)
    except Exception:
        raise ConfigError(f"multiaddr {text!r} has an invalid peer id {peer_b58!r}") from None
    return maddr, peer_id


def _transport_part(maddr: Multiaddr, peer_id: PeerID) -> Multiaddr:
    return maddr.decapsulate(Multiaddr(f"/p2p/{peer_id.to_base58()}"))


def check_listen_maddrs(maddrs: Iterable[str], what: str, explicit_port: bool = False) -> List[str]:
    out = []
    for text in maddrs:
        try:
            m = Multiaddr(str(text))
        except Exception as e:
            raise ConfigError(f"malformed {what} multiaddr {text!r}: {e}") from None
        if explicit_port:
            for proto in ("tcp", "udp"):
                try:
                    if m[proto] == "0":
                        raise ConfigError(f"{what} multiaddr {text!r} needs an explicit port (0 is not allowed)")
                except KeyError:
                    pass
        out.append(str(m))
    return out


def join_command(
    maddrs: Sequence[Any],
    learner_key: Optional[str],
    run_id: str,
    program: str = "python -m node.sampler",
) -> str:
    """The exact command a sampler runs to join: bootstrap multiaddrs, learner key and run id."""
    parts = [program, "--run-id", shlex.quote(run_id), "--peers", *[shlex.quote(str(m)) for m in maddrs]]
    if learner_key:
        parts += ["--learner-key", learner_key]
    return " ".join(parts)


def prefer_public(maddrs: Sequence[Any]) -> List[str]:
    """Sort multiaddrs so non-loopback ones come first (those are the useful ones to print)."""
    def loopback(m: str) -> bool:
        return "/ip4/127." in m or "/ip6/::1/" in m

    items = [str(m) for m in maddrs]
    return sorted(items, key=loopback)


async def tcp_port_open(maddrs: Iterable[str], timeout: float = 2.0) -> Optional[bool]:
    """Whether any ``/ip4|ip6/<host>/tcp/<port>`` address among ``maddrs`` accepts a plain TCP connection (None: no
    such address). Used to probe a peer that is down before dialling it through libp2p: every failed libp2p dial
    lengthens the daemon's per-peer dial backoff (5 s + 1 s x failures², up to 5 min), which would keep a restarted
    learner unreachable long after it is back; a refused plain connection costs nothing."""
    targets = []
    for text in maddrs:
        try:
            m = Multiaddr(str(text))
            host = m["ip4"] if "/ip4/" in str(m) else m["ip6"]
            targets.append((host, int(m["tcp"])))
        except Exception:
            continue
    if not targets:
        return None

    async def probe(host: str, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    return any(await asyncio.gather(*(probe(h, p) for h, p in targets)))


# ---------------------------------------------------------------------------------------------------------------
# the forked DHT process


def _kill_quietly(pid: Optional[int]) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def _parent_watchdog(parent_pid: int, daemon_pid: Optional[int], period: float = 0.5) -> None:
    while True:
        time.sleep(period)
        if os.getppid() != parent_pid:
            _kill_quietly(daemon_pid)
            os._exit(0)


def _validate_dictionary_per_subkey(protocol, key_bytes: bytes, dictionary) -> bool:
    """hivemind's ``DHTProtocol._validate_dictionary``, but an invalid entry is dropped instead of the whole value.

    hivemind rejects a dictionary value (a peer's answer to a find, or a whole-dictionary store) if any one subkey
    fails validation. Under the learner's heartbeat key that let one entry a pinned sampler cannot accept - another
    key's heartbeat, which nodes without --learner-key store, or a malformed entry from a lying peer - hide the
    learner's own, valid heartbeat in every copy that held both. Each entry is signed on its own, so each is judged
    on its own; the value is refused only if no entry is left."""
    validator = protocol.record_validator
    if validator is None:
        return True
    with dictionary.freeze():
        invalid = [subkey for subkey, (value_bytes, expiration_time) in dictionary.items()
                   if not validator.validate(DHTRecord(key_bytes, protocol.serializer.dumps(subkey), value_bytes,
                                                       expiration_time))]
    for subkey in invalid:
        del dictionary[subkey]
    return not invalid or len(dictionary) > 0


def _judge_dictionary_entries_one_by_one() -> None:
    """Install _validate_dictionary_per_subkey (in the DHT process), if this hivemind has the method it replaces."""
    from hivemind.dht.protocol import DHTProtocol

    if not callable(getattr(DHTProtocol, "_validate_dictionary", None)):
        logger.warning("this hivemind has no DHTProtocol._validate_dictionary: one invalid DHT entry may hide the "
                       "valid ones stored with it under the same key")
        return
    DHTProtocol._validate_dictionary = _validate_dictionary_per_subkey


class SwarmDHT(DHT):
    """hivemind DHT whose forked process (a) uses a plain asyncio loop, (b) dies with its parent, (c) judges the
    entries of a dictionary value one by one (:func:`_validate_dictionary_per_subkey`)."""

    p2pd_pid: Optional[int] = None

    def run(self) -> None:  # executes in the forked DHT process
        import hivemind.dht.dht as dht_module

        def _plain_loop() -> asyncio.AbstractEventLoop:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            return loop

        dht_module.switch_to_uvloop = _plain_loop
        _judge_dictionary_entries_one_by_one()
        threading.Thread(
            target=_parent_watchdog, args=(self._parent_pid, self.p2pd_pid), name="parent-watchdog", daemon=True
        ).start()
        super().run()


async def _ping_peers(dht: DHT, node, peer_ids: List[PeerID]) -> int:
    """Runs inside the DHT process: ping peers (adds them to the routing table); returns how many answered."""
    results = await asyncio.gather(*(node.protocol.call_ping(p) for p in peer_ids), return_exceptions=True)
    return sum(1 for r in results if r is not None and not isinstance(r, BaseException))


async def _routing_table_size(dht: DHT, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


# ---------------------------------------------------------------------------------------------------------------


class SwarmNode:
    """This process's presence in the swarm: loop thread + libp2p daemon + DHT. Thread-safe start/shutdown."""

    def __init__(
        self,
        config: SwarmConfig,
        record_validators: Sequence[Any] = (),
        loop: Optional[LoopThread] = None,
        dht_kwargs: Optional[Dict[str, Any]] = None,
        require_bootstrap: bool = True,
    ):
        self.config = config
        # False: if no bootstrap peer answers, start alone (warning) and let the caller retry with reach()/rejoin()
        self.require_bootstrap = require_bootstrap
        self.record_validators = list(record_validators)
        self.loop = loop or LoopThread()
        self.p2p: Optional[P2P] = None
        self.dht: Optional[SwarmDHT] = None
        self.peer_id: Optional[PeerID] = None
        self.bootstrap_peers: List[Tuple[Multiaddr, PeerID]] = []
        self.live_bootstrap: List[Tuple[Multiaddr, PeerID]] = []
        self._dht_kwargs = dict(dht_kwargs or {})
        self._started = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------------------
    def start(self) -> "SwarmNode":
        with self._lock:
            if self._started:
                return self
            cfg = self.config
            self.bootstrap_peers = [parse_peer_maddr(p) for p in cfg.peers]
            host = check_listen_maddrs(cfg.host_maddrs, "--host-maddrs")
            announce = check_listen_maddrs(cfg.announce_maddrs, "--announce-maddrs", explicit_port=True)
            if cfg.identity_path:
                d = os.path.dirname(os.path.abspath(cfg.identity_path))
                os.makedirs(d, exist_ok=True)
            self.loop.start()
            try:
                self.p2p = self.loop.run(self._create_p2p(host, announce), cfg.startup_timeout + 5)
                self.peer_id = self.p2p.peer_id
                self.live_bootstrap = self.loop.run(
                    self._check_bootstrap(), cfg.bootstrap_timeout * max(1, len(self.bootstrap_peers)) + 5
                )
                self._start_dht()
            except BaseException:
                self._teardown()
                raise
            self._started = True
            return self

    async def _create_p2p(self, host: List[str], announce: List[str]) -> P2P:
        cfg = self.config
        if cfg.identity_path and os.path.isfile(cfg.identity_path) and self.bootstrap_peers:
            # Two live peers sharing one identity confuse libp2p; refuse early with a clear message.
            try:
                taken = await asyncio.wait_for(
                    P2P.is_identity_taken(
                        cfg.identity_path,
                        initial_peers=[str(m) for m, _ in self.bootstrap_peers],
                        tls=True,
                        use_auto_relay=cfg.use_auto_relay,
                        use_ipfs=False,
                        use_relay=cfg.use_relay,
                    ),
                    cfg.startup_timeout,
                )
            except Exception as e:
                logger.warning("could not check whether identity %s is in use elsewhere: %s", cfg.identity_path, e)
                taken = False
            if taken:
                raise ConfigError(
                    f"identity {cfg.identity_path} is used by another live peer; stop it or pick another --identity"
                )
        kwargs: Dict[str, Any] = dict(
            host_maddrs=host,
            identity_path=cfg.identity_path,
            dht_mode="client" if cfg.client_mode else "server",
            use_relay=cfg.use_relay,
            use_auto_relay=cfg.use_auto_relay,
            nat_port_map=cfg.nat_port_map,
            auto_nat=cfg.auto_nat,
            startup_timeout=cfg.startup_timeout,
            check_if_identity_free=False,
        )
        if announce:
            kwargs["announce_maddrs"] = announce
        try:
            return await P2P.create(**kwargs)
        except Exception as e:
            raise RuntimeError(f"could not start the libp2p daemon: {e}") from e

    async def _check_bootstrap(self) -> List[Tuple[Multiaddr, PeerID]]:
        cfg = self.config
        if not self.bootstrap_peers:
            return []

        async def dial(maddr: Multiaddr, peer_id: PeerID) -> Optional[str]:
            if peer_id == self.p2p.peer_id:
                return "that is this node itself"
            try:
                await asyncio.wait_for(
                    self.p2p._client.connect(peer_id, [_transport_part(maddr, peer_id)]),  # noqa: SLF001
                    cfg.bootstrap_timeout,
                )
                return None
            except asyncio.TimeoutError:
                return f"no answer within {cfg.bootstrap_timeout:.0f} s"
            except Exception as e:
                return str(e).splitlines()[0][:200]

        errors = await asyncio.gather(*(dial(m, p) for m, p in self.bootstrap_peers))
        live = []
        for (maddr, peer_id), err in zip(self.bootstrap_peers, errors):
            if err is None:
                live.append((maddr, peer_id))
            else:
                logger.warning("bootstrap peer %s is unreachable (%s); skipping it", maddr, err)
        if not live:
            why = "none of the bootstrap peers could be reached: " + "; ".join(
                f"{m} ({e})" for (m, _), e in zip(self.bootstrap_peers, errors))
            if self.require_bootstrap:
                raise BootstrapError(why)
            logger.warning("%s; starting alone and retrying", why)
        return live

    def _start_dht(self) -> None:
        cfg = self.config
        kwargs = dict(
            client_mode=cfg.client_mode,
            wait_timeout=min(cfg.rpc_timeout, 5.0),
            bootstrap_timeout=cfg.bootstrap_timeout,
            # a bootstrap peer that answered our dial may die before hivemind's own ping (a learner killed in that
            # second: the soak saw a sampler exit 3). Unless told to require it, start alone and retry, as when the
            # dial itself failed.
            ensure_bootstrap_success=self.require_bootstrap,
        )
        kwargs.update(self._dht_kwargs)
        dht = SwarmDHT(
            initial_peers=[str(m) for m, _ in self.live_bootstrap] or None,
            p2p=self.p2p,
            start=False,
            record_validators=self.record_validators,
            shutdown_timeout=3,
            **kwargs,
        )
        dht.p2pd_pid = self.p2p._child.pid if self.p2p._child is not None else None  # noqa: SLF001
        self.dht = dht
        try:
            dht.run_in_background(await_ready=True, timeout=cfg.startup_timeout)
        except Exception as e:
            raise BootstrapError(f"the DHT did not start: {e!r}") from e

    # ------------------------------------------------------------------------------------------------------------
    # async helpers (call from the loop thread)

    async def visible_maddrs(self) -> List[str]:
        maddrs = await asyncio.wait_for(self.p2p.get_visible_maddrs(latest=True), self.config.rpc_timeout)
        return prefer_public(maddrs)

    async def dht_get(self, key: str, latest: bool = True) -> Any:
        """The DHT value under ``key`` (a dict ``subkey -> ValueWithExpiration`` for dictionary records), or None."""
        fut = self.dht.get(key, latest=latest, return_future=True)
        try:
            result = await asyncio.wait_for(_await_mp(fut), self.config.dht_timeout)
        except asyncio.TimeoutError:
            fut.cancel()
            logger.debug("DHT get %s timed out", key)
            return None
        return None if result is None else result.value

    async def dht_store(self, key: str, subkey: Any, value: Any, expiration_time: float) -> bool:
        fut = self.dht.store(key, value, expiration_time, subkey=subkey, return_future=True)
        try:
            return bool(await asyncio.wait_for(_await_mp(fut), self.config.dht_timeout))
        except asyncio.TimeoutError:
            fut.cancel()
            logger.debug("DHT store %s timed out", key)
            return False

    async def rejoin(self) -> int:
        """Ping the bootstrap peers again (after a network hiccup, a start while they were all down, or when the
        learner restarted); returns how many answered."""
        return await self.reach([(peer_id, [str(maddr)]) for maddr, peer_id in self.bootstrap_peers])

    async def reach(self, peers: Sequence[Tuple[PeerID, Sequence[str]]]) -> int:
        """Dial each peer (bounded) and ping the ones that answered into the DHT routing table, so that DHT reads
        reach them again; returns how many answered the ping. Never raises."""
        dialled = await asyncio.gather(*(self.connect(p, m) for p, m in peers))
        live = [p for (p, _), ok in zip(peers, dialled) if ok]
        if not live or self.dht is None:
            return 0
        fut = self.dht.run_coroutine(_PingPeers(live), return_future=True)
        try:
            return int(await asyncio.wait_for(_await_mp(fut), self.config.dht_timeout))
        except Exception:
            return 0

    async def connect(self, peer_id: PeerID, maddrs: Iterable[str]) -> bool:
        """Dial ``peer_id`` at the given multiaddrs (bounded). Returns False on failure; never raises."""
        addrs = []
        for m in maddrs:
            try:
                ma = Multiaddr(str(m))
                try:
                    ma = _transport_part(ma, peer_id)
                except Exception:
                    pass
                addrs.append(ma)
            except Exception:
                continue
        try:
            await asyncio.wait_for(self.p2p._client.connect(peer_id, addrs), self.config.connect_timeout)  # noqa
            return True
        except Exception as e:
            logger.debug("dialing %s failed: %s", peer_id, e)
            return False

    # ------------------------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        with self._lock:
            self._teardown()
            self._started = False

    def _teardown(self) -> None:
        if self.dht is not None:
            try:
                self.dht.shutdown()
            except Exception:  # pragma: no cover
                logger.debug("DHT shutdown failed", exc_info=True)
            self.dht = None
        if self.p2p is not None and self.loop.is_running:
            try:
                self.loop.run(self.p2p.shutdown(), 10)
            except Exception:  # pragma: no cover
                logger.debug("p2p shutdown failed", exc_info=True)
            self.p2p = None
        self.loop.stop()


class _PingPeers:
    """Picklable callable for ``DHT.run_coroutine`` (a module-level class, importable in the DHT process)."""

    def __init__(self, peer_ids: List[PeerID]):
        self.peer_ids = list(peer_ids)

    async def __call__(self, dht: DHT, node) -> int:
        return await _ping_peers(dht, node, self.peer_ids)


async def _await_mp(fut):
    return await fut
