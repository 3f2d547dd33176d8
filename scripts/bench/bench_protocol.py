"""Protocol micro-benchmarks on ONE core: rollout encode+sign, verify+decode, full validation, wire overhead,
chunk verification and DHT record validation.

    .venv/bin/python -m scripts.bench.bench_protocol [--runs 7] [--n 3000] [--json out.json]

Each figure is the median over ``--runs`` runs of ``--n`` operations. The process is pinned to one CPU
(``sched_setaffinity``) and BLAS/OpenMP pools to one thread.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from protocol.identity import Identity  # noqa: E402
from protocol.manifest import build_manifest, verify_chunk  # noqa: E402
from protocol.rollout import RolloutGroup, SamplingParams, decode_group, encode_group, raw_tensor_bytes  # noqa: E402
from protocol.validate import RolloutValidator, ValidatorConfig  # noqa: E402

G, L, P = 8, 512, 128
VOCAB = 151_936


def pin_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to cpu {cpu}"
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return "not pinned"


def make_group(seq: int, rng: np.random.Generator) -> RolloutGroup:
    return RolloutGroup.from_completions(
        run_id="bench-run",
        seq=seq,
        policy_version=10,
        prompt_index=seq % 1000,
        prompt_ids=rng.integers(0, VOCAB, P),
        completions=[rng.integers(0, VOCAB, L) for _ in range(G)],
        logprobs=[-rng.exponential(1.0, L).astype(np.float32) for _ in range(G)],
        sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=L),
        started_at=time.time(),
        finished_at=time.time(),
        reward=[1.0, 0.0] * (G // 2),
    )


def rate(fn, n: int, runs: int) -> float:
    """Median ops/s of ``fn(i)`` for i in range(n), over ``runs`` runs (after one warm-up run)."""
    fn(0)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        out.append(n / (time.perf_counter() - t0))
    return statistics.median(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    pinned = pin_one_core()
    rng = np.random.default_rng(0)
    me = Identity.from_seed(b"\x01" * 32)
    group = make_group(0, rng)
    msg = encode_group(group, me)
    raw = raw_tensor_bytes(group)

    res = {}
    res["encode_sign_groups_per_s"] = rate(lambda i: encode_group(group, me), args.n, args.runs)
    res["verify_decode_groups_per_s"] = rate(lambda i: decode_group(msg), args.n, args.runs)

    # full learner-side validation: distinct sequence numbers so the replay window accepts each one
    msgs = [encode_group(make_group(s, rng), me) for s in range(args.n)]
    validators = []

    def validate(i):
        if i == 0:
            validators.append(RolloutValidator(
                ValidatorConfig(run_id="bench-run", vocab_size=VOCAB, max_completion_tokens=L, group_size=G),
                current_version=lambda: 10,
            ))
        validators[-1].validate(msgs[i])

    res["validate_groups_per_s"] = rate(validate, args.n, args.runs)
    res["message_bytes"] = len(msg)
    res["raw_tensor_bytes"] = raw
    res["wire_overhead_bytes"] = len(msg) - raw
    res["wire_overhead_pct"] = 100.0 * (len(msg) - raw) / raw

    # weight chunks: sha256 check of 4 MiB chunks
    chunk = 4 << 20
    w = {"w": np.frombuffer(rng.bytes(16 * chunk), dtype=np.uint8)}
    m, buf = build_manifest(w, run_id="bench-run", version=1, chunk_size=chunk)
    mv = memoryview(buf)
    n_chunks = m.n_chunks

    def check_chunk(i):
        s, e = m.chunk_range(i % n_chunks)
        verify_chunk(m, i % n_chunks, mv[s:e])

    res["verify_chunk_MB_per_s"] = rate(check_chunk, 64, args.runs) * chunk / 1e6

    try:  # DHT record validation (imports hivemind)
        import dataclasses

        import msgpack
        from hivemind.dht.validation import DHTRecord

        from protocol.records import Ed25519OwnerValidator, SamplerStatus, dht_key_id, encode_record, owner_subkey

        rec = SamplerStatus(run_id="bench-run", peer_id="Qm" + "x" * 44, policy_version=10,
                            counters={"sent": 1, "accepted": 1}, time=time.time())
        v = Ed25519OwnerValidator("bench-run", me)
        r = DHTRecord(dht_key_id(rec.dht_key), owner_subkey(me.public_key),
                      msgpack.packb(encode_record(rec), use_bin_type=True), time.time() + 60)
        signed = dataclasses.replace(r, value=v.sign_value(r))
        res["dht_record_validate_per_s"] = rate(lambda i: v.validate(signed), args.n, args.runs)
        res["dht_record_value_bytes"] = len(signed.value)
    except ImportError:  # pragma: no cover
        pass

    res["config"] = {
        "group": f"{G} completions x {L} tokens, {P}-token prompt",
        "runs": args.runs,
        "n": args.n,
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pinning": pinned,
    }
    print(f"# protocol bench ({res['config']['group']}; median of {args.runs} x {args.n}; {pinned})")
    print(f"encode+sign        {res['encode_sign_groups_per_s']:10.0f} groups/s")
    print(f"verify+decode      {res['verify_decode_groups_per_s']:10.0f} groups/s   (target >= 5000)")
    print(f"full validate      {res['validate_groups_per_s']:10.0f} groups/s   (decode + vocab/logprob/replay checks)")
    print(f"wire size          {res['message_bytes']} B for {raw} B of raw tensors: "
          f"+{res['wire_overhead_bytes']} B = {res['wire_overhead_pct']:.2f}% overhead")
    print(f"chunk verify       {res['verify_chunk_MB_per_s']:10.0f} MB/s (sha256, 4 MiB chunks)")
    if "dht_record_validate_per_s" in res:
        print(f"DHT record check   {res['dht_record_validate_per_s']:10.0f} records/s "
              f"({res['dht_record_value_bytes']} B signed value)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
