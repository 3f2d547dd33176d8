"""A learner or sampler node for the swarm tests, driven by JSON lines on stdin, reporting JSON lines on stdout.

    python -m tests.swarm_helpers.node_proc learner --state DIR [--port P] [--limit BYTES_PER_S] ...
    python -m tests.swarm_helpers.node_proc sampler --state DIR --peers MADDR ... [--learner-key K] [--evil]

Weights are synthetic: version v is ``numpy.random.default_rng(v).bytes(size)`` as one uint8 tensor. Rollout groups
are tiny but real (signed :class:`protocol.rollout.RolloutGroup`), validated by the real
:class:`protocol.validate.RolloutValidator` on the learner.

Commands: ``publish {v, size, chunk}`` (learner), ``submit {start, n, bad, wait_ack}`` (sampler), ``stats``.
Events: ``ready`` (learner) / ``joined`` (sampler) at start (with ``--keep-trying``, ``waiting`` before it), ``publish``,
``rollout`` (each group the learner's trainer side takes), ``version`` (each version a sampler holds, with the SHA-256
of its bytes), ``submit``, ``stats``. The learner's ``stats`` event comes after the ``rollout`` events of every group taken so far, so a
``stats`` answer with an empty inbox means every accepted group has been reported. SIGTERM shuts the node down
gracefully.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

_emit_lock = threading.Lock()


def emit(**event: Any) -> None:
    line = json.dumps(event, default=str)
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def synthetic_weights(version: int, size: int) -> bytes:
    import numpy as np

    return np.random.default_rng(version).bytes(size)


def evolving_weights(version: int, size: int, step: float = 0.01, hot: float = 0.02) -> bytes:
    """Version ``version`` of a slowly changing bf16 buffer, as consecutive RL versions are (few elements change,
    mostly the same ones): version 1 is random; each later version adds 1 to the bits of ``step`` x n elements drawn
    from a fixed ``hot`` x n subset. Deterministic: the tests compute the same bytes."""
    import numpy as np

    n = size // 2
    x = np.random.default_rng(0).integers(0, 1 << 16, n, dtype=np.uint16)
    hot_idx = np.random.default_rng(1).choice(n, max(1, int(n * hot)), replace=False)
    for w in range(2, version + 1):
        idx = np.random.default_rng(w).choice(hot_idx, min(len(hot_idx), max(1, int(n * step))), replace=False)
        x[idx] += np.uint16(1)
    return x.tobytes()


def overrides(pairs) -> dict:
    """``--set name=value`` pairs as SwarmConfig fields, each value converted to its field's default's type."""
    from node.config import SwarmConfig

    d = SwarmConfig()
    out = {}
    for pair in pairs or []:
        name, value = pair.split("=", 1)
        out[name] = type(getattr(d, name))(value)
    return out


def make_config(a: argparse.Namespace, **extra: Any):
    from node.config import SwarmConfig

    extra = {**overrides(a.set), **extra}
    return SwarmConfig(
        run_id=a.run_id,
        peers=list(a.peers or []),
        host_maddrs=[f"/ip4/{a.host}/tcp/{a.port}"],
        nat_port_map=False,
        auto_nat=False,
        use_relay=False,
        state_dir=a.state,
        upload_limit=a.limit or None,
        poll_interval=a.poll,
        heartbeat_ttl=a.heartbeat_ttl,
        retry_min=0.2,
        retry_max=2.0,
        rpc_timeout=a.rpc_timeout,
        stall_timeout=a.rpc_timeout,
        ration=not a.no_ration,
        ration_interval=a.ration_interval,
        swarming=not a.no_swarming,
        learner_key=a.learner_key,
        **extra,
    ).with_defaults_for_state_dir()


class Shutdown(Exception):
    """Raised in the main thread by SIGTERM."""


def _on_sigterm(signum, frame) -> None:
    raise Shutdown


def commands():
    """The commands on stdin, until it closes (SIGTERM raises :class:`Shutdown` wherever the main thread is)."""
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


def run_learner(a: argparse.Namespace) -> None:
    from node.learner_swarm import LearnerSwarm
    from protocol.manifest import RawTensor
    from protocol.rollout import decode_group
    from protocol.validate import RolloutValidator, ValidatorConfig

    holder: dict = {}
    validator = RolloutValidator(
        ValidatorConfig(run_id=a.run_id, vocab_size=1000),
        current_version=lambda: holder["swarm"].version or 0,
    )
    swarm = LearnerSwarm(make_config(a), validate=validator.validate, decode=decode_group)
    holder["swarm"] = swarm
    swarm.start(print_join=True)
    emit(event="ready", maddrs=swarm.maddrs, key=swarm.public_key_str, peer_id=swarm.peer_id,
         join=swarm.join_command())

    stop = threading.Event()
    taking = threading.Lock()  # held while groups are taken and reported: a stats answer never splits that

    def consume() -> None:
        while not stop.is_set():
            with taking:
                for acc in swarm.get_rollouts(max_items=1 if a.take_rate else 64, timeout=0.2):
                    g = acc.item
                    emit(event="rollout", sampler=g.sampler.hex(), seq=g.seq, sender=acc.sender,
                         received_at=acc.received_at, t=time.time())
            if a.take_rate:  # a trainer slower than its samplers: the inbox fills and its shares matter
                time.sleep(1.0 / a.take_rate)

    threading.Thread(target=consume, daemon=True).start()
    try:
        for cmd in commands():
            c = cmd["cmd"]
            if c == "publish":
                v, size = cmd["v"], cmd["size"]
                evolve = cmd.get("evolve")  # {step, hot}: versions that differ in few elements (weight deltas)
                data = synthetic_weights(v, size) if evolve is None else evolving_weights(v, size, **evolve)
                tensor = RawTensor("uint8", (size,), data) if evolve is None else RawTensor("bfloat16", (size // 2,), data)
                t0 = time.time()
                swarm.publish_state(v, {"w": tensor}, chunk_size=cmd.get("chunk", 1 << 20))
                emit(event="publish", v=v, sha=hashlib.sha256(data).hexdigest(), t0=t0)
            elif c == "stats":
                with taking:
                    emit(event="stats", stats=swarm.stats())
    except Shutdown:
        pass
    finally:
        stop.set()
        swarm.shutdown()


def run_sampler(a: argparse.Namespace) -> None:
    from node.sampler_swarm import SamplerSwarm
    from protocol.rollout import RolloutGroup, encode_group

    swarm = SamplerSwarm(make_config(a, client_mode=a.client_mode), keep_trying=a.keep_trying)
    if a.evil or a.evil_deltas:
        def tamper(key, index: int, data) -> bytes:
            if a.evil_deltas and not isinstance(key, tuple):  # a full version: served honestly
                return data
            out = bytearray(data)
            out[len(out) // 2] ^= 0xFF
            return bytes(out)

        swarm.chunk_server.tamper = tamper
    t_start = time.monotonic()
    if a.keep_trying:  # started even while every bootstrap peer is down; waits for the learner without a deadline
        swarm.start()
        emit(event="waiting", peer_id=swarm.peer_id)
        while swarm.learner is None:
            time.sleep(0.05)
    swarm.start(wait_for_learner=120)
    emit(event="joined", start_s=time.monotonic() - t_start, learner_key=swarm.learner_key, peer_id=swarm.peer_id, key=swarm.public_key_str,
         maddrs=swarm.maddrs, version=swarm.latest_version())

    def report_versions() -> None:
        while True:
            v = swarm.ready.get()
            try:
                manifest, buf = swarm.get_weights(v)
                sha = hashlib.sha256(buf).hexdigest()
                del buf
            except KeyError:
                continue
            emit(event="version", v=v, sha=sha, t=time.time(), stats=swarm.stats())

    threading.Thread(target=report_versions, daemon=True).start()
    try:
        for cmd in commands():
            c = cmd["cmd"]
            if c == "submit":
                seqs = list(range(cmd["start"], cmd["start"] + cmd["n"]))
                acked_before = swarm.stats().get("accepted", 0)
                t0 = time.time()
                for seq in seqs:
                    g = RolloutGroup.from_completions(
                        run_id=a.run_id, seq=seq, policy_version=cmd.get("version", 0), prompt_index=seq % 100,
                        prompt_ids=[1, 2, 3], completions=[[4, 5], [6, 7, 8]],
                        logprobs=[[-0.1, -0.2], [-0.3, -0.1, -0.2]],
                    )
                    data = bytearray(encode_group(g, swarm.identity))
                    if cmd.get("bad"):
                        data[60] ^= 0xFF  # inside the signature
                    swarm.submit(bytes(data), timeout=10)
                t_ack = None
                if cmd.get("wait_ack"):  # for bench_wan: when the learner's answers are back (5 ms resolution)
                    deadline = time.monotonic() + 60
                    while swarm.stats().get("accepted", 0) < acked_before + len(seqs) and time.monotonic() < deadline:
                        time.sleep(0.005)
                    t_ack = time.time()
                emit(event="submit", seqs=seqs, t0=t0, t_ack=t_ack)
            elif c == "stats":
                emit(event="stats", stats=swarm.stats())
    except Shutdown:
        pass
    finally:
        swarm.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["learner", "sampler"])
    p.add_argument("--state", required=True)
    p.add_argument("--run-id", default="swarm-test")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--peers", nargs="*", default=[])
    p.add_argument("--learner-key", default=None)
    p.add_argument("--limit", type=float, default=0)
    p.add_argument("--poll", type=float, default=0.25)
    p.add_argument("--heartbeat-ttl", type=float, default=6.0)
    p.add_argument("--rpc-timeout", type=float, default=5.0)
    p.add_argument("--ration-interval", type=float, default=None)
    p.add_argument("--no-ration", action="store_true")
    p.add_argument("--no-swarming", action="store_true")
    p.add_argument("--client-mode", action="store_true")
    p.add_argument("--evil", action="store_true", help="serve corrupted chunks")
    p.add_argument("--evil-deltas", action="store_true", help="serve corrupted delta chunks (full versions honestly)")
    p.add_argument("--keep-trying", action="store_true", help="start and wait even if the learner is down")
    p.add_argument("--take-rate", type=float, default=0.0, help="learner: groups/s the trainer side takes (0: all)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="NAME=VALUE",
                   help="other SwarmConfig fields (repeatable)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_sigterm)
    (run_learner if a.role == "learner" else run_sampler)(a)


if __name__ == "__main__":
    main()
