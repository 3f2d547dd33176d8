"""Attacking peers for the fairness benchmark and tests: real hivemind nodes that try to starve an honest sampler.

    python -m scripts.bench.attackers slowloris --peers MADDR [--streams 80] [--every 4]
    python -m scripts.bench.attackers thief     --peers MADDR [--poll 0.05] [--streams 8]
    python -m scripts.bench.attackers sybil     --peers MADDR [--keys 20000] [--streams 8] [--groups synthetic|model]

slowloris  holds as many rollout streams open as it can, each sending a tiny junk push (4 bytes) every ``--every``
           seconds and reopening ``--reopen`` s after the learner closes or refuses it.
thief      polls the learner's heartbeat every ``--poll`` s and, for each new version, asks the learner itself for
           every chunk (plain requests, several streams, busy/rationed answers retried at once); serves nothing.
sybil      ``--keys`` fresh Ed25519 keys push validly signed groups as fast as the learner answers, over
           ``--streams`` streams, ignoring ``busy``. ``--groups synthetic``: the tiny groups of
           tests/swarm_helpers/node_proc (a learner without prompt checks); ``--groups model``: joins like a sampler,
           downloads the first policy version, generates real completions with it for every prompt once, and signs
           them under each key with the prompt the learner assigns to (key, seq) - as valid as an honest group,
           claiming the learner's current version.

Every attacker is a separate process with its own libp2p peer id (loopback only). It prints JSON lines: ``ready``
once attacking, ``stats`` on every ``stats`` command on stdin and at exit (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections import Counter
from typing import Any, Callable, List, Optional

logger = logging.getLogger("attackers")


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def swarm_config(a: argparse.Namespace, **extra: Any):
    from node.config import SwarmConfig

    return SwarmConfig(run_id=a.run_id, peers=list(a.peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False,
                       auto_nat=False, use_relay=False, client_mode=True, rpc_timeout=5.0, **extra)


async def freshest_learner(node, run_id: str):
    from node.records import read_heartbeats

    records = await read_heartbeats(node, run_id)
    return max(records.values(), key=lambda r: r.time) if records else None


async def wait_learner(node, run_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = await freshest_learner(node, run_id)
        if rec is not None:
            from hivemind.p2p import PeerID

            peer = PeerID.from_base58(rec.peer_id)
            await node.connect(peer, rec.multiaddrs)
            return rec, peer
        await asyncio.sleep(0.5)
    raise TimeoutError("no learner heartbeat")


async def _close(writer) -> None:
    from node.wire import close_writer

    await close_writer(writer)


# ---------------------------------------------------------------------------------------------------------- attacks
async def slowloris(p2p, peer, run_id: str, streams: int, every: float, counters: Counter,
                    lifetimes: List[float], reopen: float = 1.0) -> None:
    """Hold ``streams`` rollout streams to ``peer`` open with a junk push every ``every`` s, each reopened
    ``reopen`` s after it was closed or refused (runs until cancelled)."""
    from node.wire import WireError, encode_frame, open_stream, proto_name, recv_frame

    proto = proto_name(run_id, "rollouts")

    async def hold() -> None:
        while True:
            try:
                reader, writer = await open_stream(p2p, peer, proto, timeout=5.0)
            except WireError:
                counters["open_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            opened, frames = time.monotonic(), 0
            try:
                while True:
                    writer.write(encode_frame({"op": "push"}, b"junk"))
                    await asyncio.wait_for(writer.drain(), 5.0)
                    answer, _ = await recv_frame(reader, timeout=10.0, max_payload=0)
                    if frames == 0 and answer.get("status") == "busy":
                        counters["refused"] += 1
                        break
                    frames += 1
                    counters["junk_frames"] += 1
                    await asyncio.sleep(every)
            except (WireError, ConnectionError, asyncio.TimeoutError, RuntimeError):
                pass
            finally:
                await _close(writer)
            if frames:
                counters["closed_by_learner"] += 1
                lifetimes.append(time.monotonic() - opened)
                del lifetimes[:-1000]
            await asyncio.sleep(reopen)

    await asyncio.gather(*(hold() for _ in range(streams)))


async def steal(p2p, peer, run_id: str, version: int, digest: Optional[bytes], streams: int, give_up: float,
                counters: Counter) -> None:
    """Ask ``peer`` itself for every chunk of ``version`` (plain requests over ``streams`` streams, refusals retried
    at once for ``give_up`` s)."""
    from node.wire import WireError, encode_frame, open_stream, proto_name, recv_frame
    from protocol.manifest import decode_manifest

    proto = proto_name(run_id, "weights")
    reader, writer = await open_stream(p2p, peer, proto, timeout=5.0)
    try:
        writer.write(encode_frame({"op": "manifest", "v": version}))
        header, payload = await recv_frame(reader, timeout=10.0, max_payload=64 << 20)
    finally:
        await _close(writer)
    if header.get("ok") is not True:
        return
    manifest = decode_manifest(payload)
    todo = list(range(manifest.n_chunks))
    t0 = time.monotonic()

    async def worker() -> None:
        while todo and time.monotonic() - t0 < give_up:
            try:
                reader, writer = await open_stream(p2p, peer, proto, timeout=5.0)
            except WireError:
                await asyncio.sleep(0.05)
                continue
            try:
                while todo:
                    index = todo.pop(0)
                    writer.write(encode_frame({"op": "chunk", "v": version, "d": digest, "i": index}))
                    answer, data = await recv_frame(reader, timeout=10.0, max_payload=manifest.chunk_size)
                    counters["requests"] += 1
                    if answer.get("ok") is True:
                        counters["chunks_stolen"] += 1
                        counters["bytes_stolen"] += len(data)
                    else:
                        counters[f"answer_{str(answer.get('err'))[:16]}"] += 1
                        if answer.get("err") == "unknown_version":  # the learner pruned it: on to the next
                            todo.clear()
                        elif time.monotonic() - t0 < give_up:
                            todo.append(index)  # again at once: no politeness
                        if answer.get("err") == "busy":
                            break
            except (WireError, ConnectionError, asyncio.TimeoutError, RuntimeError):
                pass
            finally:
                await _close(writer)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(worker() for _ in range(streams)))
    counters["versions"] += 1


async def thief(node, a, counters: Counter) -> None:
    """Steal every new version the learner's heartbeat announces, polling it every ``a.poll`` s."""
    _, peer = await wait_learner(node, a.run_id)
    done_versions = set()
    while True:
        rec = await freshest_learner(node, a.run_id)
        if rec is not None and rec.manifest_size > 0 and rec.policy_version not in done_versions:
            done_versions.add(rec.policy_version)
            try:
                await steal(node.p2p, peer, a.run_id, rec.policy_version, rec.manifest_digest, a.streams, a.give_up,
                            counters)
            except Exception as e:  # noqa: BLE001 - an attacker keeps going
                counters["steal_errors"] += 1
                logger.info("steal v%d: %r", rec.policy_version, e)
        await asyncio.sleep(a.poll)


def synthetic_groups(run_id: str) -> Callable[[Any, int, int], bytes]:
    """Groups like tests/swarm_helpers/node_proc's sampler makes (accepted by its learner: no prompt checks)."""
    from protocol.rollout import RolloutGroup, encode_group

    def make(identity, seq: int, version: int) -> bytes:
        g = RolloutGroup.from_completions(
            run_id=run_id, seq=seq, policy_version=version, prompt_index=seq % 100, prompt_ids=[1, 2, 3],
            completions=[[4, 5], [6, 7, 8]], logprobs=[[-0.1, -0.2], [-0.3, -0.1, -0.2]],
        )
        return encode_group(g, identity)

    return make


def model_groups(a) -> Callable[[Any, int, int], bytes]:
    """Real completions of the learner's first published policy for every prompt, re-signed under each key."""
    import tempfile
    from pathlib import Path

    import torch

    from gepo.data import assign_prompt_index, format_prompt
    from node.model_io import model_from_manifest, read_run_file
    from node.run_info import RunInfo
    from node.sampler import HFBackend
    from node.sampler_swarm import SamplerSwarm
    from protocol import rollout as wire

    torch.set_num_threads(1)
    state = Path(tempfile.mkdtemp(prefix="sybil-"))
    swarm = SamplerSwarm(swarm_config(a, state_dir=str(state), swarming=False).with_defaults_for_state_dir())
    swarm.start(wait_for_learner=120)
    version = swarm.wait_for_version(timeout=300)
    manifest, buffer = swarm.get_weights(version)
    info = RunInfo.from_json(read_run_file(manifest, buffer))
    model, tokenizer = model_from_manifest(manifest, buffer, state / "model", "cpu", torch.float32)
    swarm.shutdown()
    n = len(info.prompts)
    if n > a.max_prompts:
        raise SystemExit(f"the learner has {n} prompts; --groups model needs <= --max-prompts {a.max_prompts}")
    backend = HFBackend(model, tokenizer)
    params = info.sampling_params(seed=1)
    pool = []
    for start in range(0, n, 16):
        prompts = [format_prompt(tokenizer, info.prompts[i], info.system_prompt) for i in range(start, min(n, start + 16))]
        pool.extend(backend.generate(prompts, params))
    sampling = wire.SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens)

    def make(identity, seq: int, version_now: int) -> bytes:
        index = assign_prompt_index(identity.public_key, seq, n)
        gen = pool[index]
        g = wire.RolloutGroup.from_completions(
            run_id=info.run_id, seq=seq, policy_version=version_now, prompt_index=index, prompt_ids=gen.prompt_ids,
            completions=gen.completion_ids, logprobs=gen.logprobs, sampling=sampling, started_at=time.time(),
            finished_at=time.time(),
        )
        return wire.encode_group(g, identity)

    return make


async def sybil(p2p, peer, run_id: str, n_keys: int, streams: int, pace: float, counters: Counter, make,
                version: Callable[[], int] = lambda: 0) -> None:
    """Push groups ``make(identity, seq, version())`` of ``n_keys`` fresh keys (round robin) to ``peer`` over
    ``streams`` streams, as fast as it answers, ignoring ``busy`` (runs until cancelled)."""
    from protocol.identity import Identity
    from node.wire import WireError, encode_frame, open_stream, proto_name, recv_frame

    proto = proto_name(run_id, "rollouts")
    keys = await asyncio.get_running_loop().run_in_executor(None, lambda: [Identity.generate() for _ in range(n_keys)])
    state = {"next": 0}

    def next_group() -> bytes:
        i = state["next"]
        state["next"] += 1
        return make(keys[i % len(keys)], i // len(keys), version())

    async def push() -> None:
        while True:
            try:
                reader, writer = await open_stream(p2p, peer, proto, timeout=5.0)
            except WireError:
                await asyncio.sleep(0.2)
                continue
            counters["streams"] += 1
            try:
                while True:
                    writer.write(encode_frame({"op": "push"}, next_group()))
                    await asyncio.wait_for(writer.drain(), 5.0)
                    answer, _ = await recv_frame(reader, timeout=10.0, max_payload=0)
                    counters[str(answer.get("status"))[:16]] += 1
                    if pace:
                        await asyncio.sleep(pace)
            except (WireError, ConnectionError, asyncio.TimeoutError, RuntimeError):
                pass
            finally:
                await _close(writer)

    await asyncio.gather(*(push() for _ in range(streams)))


async def sybil_at_learner(node, a, counters: Counter, make) -> None:
    rec, peer = await wait_learner(node, a.run_id)
    state = {"version": rec.policy_version}

    async def follow_version() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                r = await freshest_learner(node, a.run_id)
                if r is not None:
                    state["version"] = r.policy_version
            except Exception:  # noqa: BLE001
                pass

    await asyncio.gather(follow_version(), sybil(node.p2p, peer, a.run_id, a.keys, a.streams, a.pace, counters,
                                                 make, lambda: state["version"]))


async def _at_learner(node, a, attack) -> None:
    _, peer = await wait_learner(node, a.run_id)
    await attack(node.p2p, peer)


# ---------------------------------------------------------------------------------------------------------- main
class Shutdown(Exception):
    pass


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("attack", choices=["slowloris", "thief", "sybil"])
    p.add_argument("--peers", nargs="+", required=True, help="bootstrap multiaddrs (the learner's)")
    p.add_argument("--run-id", default="gepo")
    p.add_argument("--streams", type=int, default=None,
                   help="concurrent streams (default: slowloris 80, thief 8, sybil 8)")
    p.add_argument("--every", type=float, default=4.0, help="slowloris: seconds between junk frames")
    p.add_argument("--reopen", type=float, default=1.0,
                   help="slowloris: seconds before a closed or refused stream is opened again")
    p.add_argument("--poll", type=float, default=0.05, help="thief: seconds between heartbeat reads")
    p.add_argument("--give-up", type=float, default=30.0, help="thief: seconds a version's chunks are retried")
    p.add_argument("--keys", type=int, default=20_000, help="sybil: fresh keys")
    p.add_argument("--groups", choices=["synthetic", "model"], default="synthetic", help="sybil: group contents")
    p.add_argument("--max-prompts", type=int, default=4096, help="sybil --groups model: prompts to pre-generate")
    p.add_argument("--pace", type=float, default=0.0, help="sybil: seconds between pushes on a stream")
    a = p.parse_args(argv)
    a.streams = a.streams or {"slowloris": 80, "thief": 8, "sybil": 8}[a.attack]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def on_sigterm(signum, frame):
        raise Shutdown

    signal.signal(signal.SIGTERM, on_sigterm)
    from node.dht import SwarmNode

    counters: Counter = Counter()
    lifetimes: List[float] = []
    make = (model_groups(a) if a.groups == "model" else synthetic_groups(a.run_id)) if a.attack == "sybil" else None
    from protocol.records import Ed25519OwnerValidator

    node = SwarmNode(swarm_config(a), record_validators=[Ed25519OwnerValidator(a.run_id)]).start()
    coro = {
            "slowloris": lambda: _at_learner(node, a, lambda p2p, peer: slowloris(
                p2p, peer, a.run_id, a.streams, a.every, counters, lifetimes, a.reopen)),
            "thief": lambda: thief(node, a, counters),
            "sybil": lambda: sybil_at_learner(node, a, counters, make)}[a.attack]
    fut = node.loop.submit(coro())

    def report() -> dict:
        lt = sorted(lifetimes)
        return {"counters": dict(counters), "stream_lifetime_median_s": lt[len(lt) // 2] if lt else None}

    emit(event="ready", attack=a.attack, peer_id=str(node.peer_id))
    try:
        for line in sys.stdin:
            cmd = json.loads(line) if line.strip() else {}
            if cmd.get("cmd") == "stats":
                emit(event="stats", **report())
            if fut.done():
                break
    except Shutdown:
        pass
    finally:
        if fut.done() and fut.exception() is not None:
            emit(event="error", error=repr(fut.exception()))
        emit(event="stats", **report())
        fut.cancel()
        node.shutdown()


if __name__ == "__main__":
    main()
