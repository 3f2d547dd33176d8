"""The swarm transport's building blocks, one process, no network (except the bootstrap checks, on loopback)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

import numpy as np
import pytest

from node.chunk_server import ChunkRationer
from node.config import SwarmConfig
from node.inbox import Accepted, DurableInbox
from node.outbox import Outbox, OutboxFull
from node.ratelimit import TokenBucket, parse_size
from node.weights_store import WeightStore, pack_bits, unpack_bits
from node.wire import WireError, encode_frame, recv_frame, recv_header, recv_payload_into, send_frame
from protocol.identity import Identity
from protocol.manifest import RawTensor, build_manifest, decode_manifest, encode_manifest

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------------------------
# config


def test_config_flags_round_trip_and_help():
    p = argparse.ArgumentParser()
    SwarmConfig.add_argparse_args(p)
    help_text = p.format_help()
    for flag in ("--peers", "--host-maddrs", "--announce-maddrs", "--identity", "--key", "--client-mode",
                 "--use-relay", "--use-auto-relay", "--learner-key", "--upload-limit", "--state-dir", "--run-id"):
        assert flag in help_text
    a = p.parse_args(["--peers", "/ip4/1.2.3.4/tcp/5/p2p/QmX", "/ip4/1.2.3.5/tcp/6/p2p/QmY", "--client-mode",
                      "--no-use-relay", "--upload-limit", "20MB", "--state-dir", "/tmp/x", "--no-swarming"])
    cfg = SwarmConfig.from_args(a)
    assert cfg.peers == ["/ip4/1.2.3.4/tcp/5/p2p/QmX", "/ip4/1.2.3.5/tcp/6/p2p/QmY"]
    assert cfg.client_mode and not cfg.use_relay and not cfg.swarming
    assert cfg.upload_limit == 20_000_000
    assert cfg.identity_path == "/tmp/x/p2p_identity.key" and cfg.key_path == "/tmp/x/ed25519.key"
    assert cfg.outbox_dir == "/tmp/x/outbox"


def test_parse_size():
    assert parse_size("20MB") == 20_000_000
    assert parse_size("20 MB/s") == 20_000_000
    assert parse_size("1MiB") == 1 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("fast")


def test_malformed_multiaddr_is_a_one_line_error():
    from node.dht import ConfigError, SwarmNode

    for bad, needle in [("not-a-multiaddr", "malformed multiaddr"), ("/ip4/127.0.0.1/tcp/5", "no /p2p/"),
                        ("/ip4/127.0.0.1/tcp/5/p2p/notbase58!", "")]:
        node = SwarmNode(SwarmConfig(peers=[bad]))
        with pytest.raises(ConfigError) as e:
            node.start()  # fails before starting anything
        assert "\n" not in str(e.value) and needle in str(e.value)
    with pytest.raises(ConfigError, match="explicit port"):
        SwarmNode(SwarmConfig(announce_maddrs=["/ip4/1.2.3.4/tcp/0"])).start()


def test_all_bootstrap_peers_dead_is_a_clear_error():
    from node.dht import BootstrapError, SwarmNode

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/QmcNGxaJZJ3ndfMN1GFXrBTSw5ELixtjFzS1BgsaN5yu4y"
    node = SwarmNode(SwarmConfig(peers=[dead], host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False,
                                 auto_nat=False, bootstrap_timeout=3))
    t0 = time.monotonic()
    with pytest.raises(BootstrapError, match="none of the bootstrap peers"):
        node.start()
    assert time.monotonic() - t0 < 30
    assert node.p2p is None and node.dht is None  # torn down


# ---------------------------------------------------------------------------------------------------------------
# rate limiting


def test_token_bucket_caps_rate():
    bucket = TokenBucket(4_000_000, burst=256 * 1024)

    async def send(total):
        t0 = time.monotonic()
        for _ in range(total // (256 * 1024)):
            await bucket.acquire(256 * 1024)
        return time.monotonic() - t0

    elapsed = asyncio.run(send(2 << 20))
    # 2 MiB at 4 MB/s with a 256 KiB burst: >= (2 MiB - 256 KiB) / 4 MB/s = 0.46 s
    assert 0.40 <= elapsed <= 1.5
    assert bucket.total_bytes == 2 << 20
    unlimited = TokenBucket(None)
    t0 = time.monotonic()
    asyncio.run(unlimited.acquire(1 << 30))
    assert unlimited.total_bytes == 1 << 30 and time.monotonic() - t0 < 0.5


# ---------------------------------------------------------------------------------------------------------------
# outbox / inbox


def test_outbox_persists_bounds_and_forgets_acknowledged(tmp_path):
    box = Outbox(str(tmp_path / "o"), max_items=3, max_bytes=1000)
    seqs = [box.put(b"a" * 10), box.put(b"b" * 10), box.put(b"c" * 10)]
    with pytest.raises(OutboxFull):
        box.put(b"d", timeout=0.1)
    assert [p for _, p in box.peek(10)] == [b"a" * 10, b"b" * 10, b"c" * 10]
    box.remove(seqs[0])
    (tmp_path / "o" / "junk.tmp").write_bytes(b"half-written")  # a crash during a put
    again = Outbox(str(tmp_path / "o"), max_items=3, max_bytes=1000)  # a restart
    assert [p for _, p in again.peek(10)] == [b"b" * 10, b"c" * 10]
    assert again.put(b"e") > seqs[-1]  # sequence numbers keep growing
    assert not (tmp_path / "o" / "junk.tmp").exists()
    with pytest.raises(OutboxFull):
        Outbox(None, max_items=10, max_bytes=5).put(b"123456")


def test_inbox_ledger_dedupes_across_restarts_and_reloads_untaken(tmp_path):
    import hashlib

    def acc(payload):
        return Accepted(payload.decode(), payload, hashlib.sha256(payload).digest(), "peer", time.time())

    inbox = DurableInbox(str(tmp_path), maxsize=2)
    assert inbox.put(acc(b"one")) and inbox.put(acc(b"two"))
    assert inbox.full()
    assert not inbox.put(acc(b"one"))  # already accepted
    taken = inbox.get(1, timeout=0)
    assert [a.item for a in taken] == ["one"]
    inbox.close()

    again = DurableInbox(str(tmp_path), maxsize=2)  # learner restart
    assert again.seen(hashlib.sha256(b"one").digest()) and again.seen(hashlib.sha256(b"two").digest())
    assert again.reload(lambda b: b.decode()) == 1  # "two" was accepted but never taken by the trainer
    assert [a.item for a in again.get(10, timeout=0)] == ["two"]
    assert again.get(10, timeout=0.05) == []
    again.close()


# ---------------------------------------------------------------------------------------------------------------
# weights


def _version(identity, v, size=100_000, chunk=16384):
    data = np.random.default_rng(v).bytes(size)
    manifest, buf = build_manifest({"w": RawTensor("uint8", (size,), data)}, run_id="r", version=v,
                                   chunk_size=chunk)
    blob = encode_manifest(manifest, identity)
    return decode_manifest(blob, learner=identity.public_key), blob, bytes(buf)


def test_store_preallocates_verifies_resumes_and_keeps_two(tmp_path):
    me = Identity.generate()
    store = WeightStore(str(tmp_path), keep=2)
    m1, blob1, data1 = _version(me, 1)
    vb = store.open_download(m1, blob1)
    assert os.path.getsize(vb.path) == m1.total_size  # preallocated
    for i in range(0, m1.n_chunks, 2):  # half the chunks arrive
        s, e = m1.chunk_range(i)
        vb.chunk_writer(i)(0, memoryview(data1[s:e]))
        vb.verify_and_mark(i)
    s, e = m1.chunk_range(1)
    vb.chunk_writer(1)(0, memoryview(bytes(e - s)))  # a half-written/garbage chunk, never verified
    store.close()

    again = WeightStore(str(tmp_path), keep=2)  # restart: resume from disk
    found = again.load(lambda b: decode_manifest(b, learner=me.public_key))
    assert [f.version for f in found] == [1]
    vb = again.get(1)
    assert vb.have.tolist() == [i % 2 == 0 for i in range(m1.n_chunks)]
    for i in range(1, m1.n_chunks, 2):
        s, e = m1.chunk_range(i)
        vb.chunk_writer(i)(0, memoryview(data1[s:e]))
        vb.verify_and_mark(i)
    again.finalize(1)
    assert bytes(again.get(1).readonly_view()) == data1
    for v in (2, 3):
        m, blob, data = _version(me, v)
        vb = again.open_download(m, blob)
        for i in range(m.n_chunks):
            s, e = m.chunk_range(i)
            vb.chunk_writer(i)(0, memoryview(data[s:e]))
            vb.verify_and_mark(i)
        again.finalize(v)
    assert [vb.version for vb in again.versions()] == [2, 3]
    deadline = time.monotonic() + 5
    while (tmp_path / "v000000000001.bin").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # deleted in the background
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["v000000000002.bin", "v000000000003.bin"]
    # a manifest signed by someone else is discarded on load
    other = WeightStore(str(tmp_path), keep=2)
    assert other.load(lambda b: decode_manifest(b, learner=Identity.generate().public_key)) == []


def test_bad_chunk_is_never_marked(tmp_path):
    from protocol.errors import ProtocolError

    me = Identity.generate()
    m, blob, data = _version(me, 1)
    vb = WeightStore(None).open_download(m, blob)
    s, e = m.chunk_range(0)
    bad = bytearray(data[s:e])
    bad[5] ^= 1
    vb.chunk_writer(0)(0, memoryview(bad))
    with pytest.raises(ProtocolError):
        vb.verify_and_mark(0)
    assert not vb.have[0]


def test_bitmaps_are_lsb_first_like_chunkhave():
    from protocol.records import ChunkHave

    have = np.zeros(13, dtype=bool)
    have[[0, 3, 12]] = True
    rec = ChunkHave.from_indices(run_id="r", peer_id="p", version=1, n_chunks=13, have=[0, 3, 12])
    assert pack_bits(have) == rec.bitmap
    assert unpack_bits(rec.bitmap, 13).tolist() == have.tolist()
    assert unpack_bits(b"\x00", 13) is None


# ---------------------------------------------------------------------------------------------------------------
# rationing


def test_rationer_serves_each_chunk_once_per_interval_and_spreads_them():
    r = ChunkRationer(interval=10.0, upload_limit=None)
    r.register(1, n_chunks=4, total_size=4096)
    lack = np.ones(4, dtype=bool)
    got = [r.choose(1, lack, requested=0, now=0.0, requester=f"p{i}")[0] for i in range(4)]
    assert sorted(got) == [0, 1, 2, 3]  # four requesters, four different chunks
    idx, retry = r.choose(1, lack, requested=0, now=1.0, requester="p9")
    assert idx is None and 8.0 <= retry <= 9.5  # everything served recently: ask the other peers
    idx, _ = r.choose(1, lack, requested=2, now=10.5, requester="p9")
    assert idx == 2  # after the interval a chunk can be served again


def test_rationer_resends_a_chunk_its_requester_lost():
    r = ChunkRationer(interval=100.0, upload_limit=None)
    r.register(1, n_chunks=16, total_size=16 * 4096)
    lack = np.ones(16, dtype=bool)
    first, _ = r.choose(1, lack, requested=None, now=0.0, requester="a")
    for i in range(15):
        r.choose(1, lack, requested=None, now=0.0, requester="b")
    only = np.zeros(16, dtype=bool)
    only[first] = True
    assert r.choose(1, only, requested=first, now=1.0, requester="b")[0] is None  # never sent to b
    assert r.choose(1, only, requested=first, now=1.0, requester="a")[0] == first  # a's transfer broke
    for _ in range(5):
        r.choose(1, only, requested=first, now=1.0, requester="a")
    assert r.choose(1, only, requested=first, now=1.0, requester="a")[0] is None  # bounded budget


def test_rationer_interval_follows_upload_limit():
    assert ChunkRationer(None, 20e6).interval_for(64 << 20) == pytest.approx(2 * (64 << 20) / 20e6)
    assert ChunkRationer(None, 20e6).interval_for(1 << 20) == 5.0
    assert ChunkRationer(3.0, 20e6).interval_for(64 << 20) == 3.0


# ---------------------------------------------------------------------------------------------------------------
# framing


def test_frames_round_trip_limits_and_timeouts():
    async def main():
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        payload = os.urandom(700_000)
        sending = asyncio.create_task(send_frame(wa, {"op": "x", "n": 1}, payload, timeout=5,
                                                 limiter=TokenBucket(50e6)))
        header, data = await recv_frame(rb, timeout=5, max_payload=1 << 20)
        await sending
        assert header == {"op": "x", "n": 1} and data == payload
        # payload straight into a preallocated buffer
        sending = asyncio.create_task(send_frame(wa, {}, payload, timeout=5))
        h, n = await recv_header(rb, timeout=5, max_payload=1 << 20)
        dst = bytearray(n)
        await recv_payload_into(rb, memoryview(dst), timeout=5)
        await sending
        assert bytes(dst) == payload
        # an oversized payload is refused before it is read
        wa.write(encode_frame({"big": True}, b"x" * 100))
        with pytest.raises(WireError, match="exceeds"):
            await recv_header(rb, timeout=5, max_payload=10)
        # a silent peer costs one timeout
        t0 = time.monotonic()
        with pytest.raises(WireError, match="sent nothing"):
            await recv_header(ra, timeout=0.3, max_payload=10)
        assert time.monotonic() - t0 < 2
        # a peer that stops mid-payload
        wb.write(encode_frame({}, b"y" * 100)[:-40])
        h, n = await recv_header(ra, timeout=5, max_payload=1000)
        with pytest.raises(WireError, match="sent nothing"):
            await recv_payload_into(ra, memoryview(bytearray(n)), timeout=0.3)
        wa.close()
        wb.close()

    asyncio.run(main())
