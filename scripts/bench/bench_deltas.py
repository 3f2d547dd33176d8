"""Weight deltas on real SmolLM2-135M versions: size per version, catch-up bytes, encode/apply time, and the
alternatives to XOR + byte planes + zstd.

    flock /tmp/smollm2.lock .venv/bin/python -m scripts.bench.delta_versions --out /tmp/smol-versions --steps 20
    flock /tmp/bench.lock .venv/bin/python -m scripts.bench.bench_deltas --versions /tmp/smol-versions --json out.json

The first command makes the versions (real GEPO learner steps, fp32 master, bf16 published; see its docstring),
the second measures them on one thread:

* ``delta_ratio_*``: compressed bytes of each version's delta from the previous one (protocol.delta, default codec)
  / the full bf16 size.
* ``catchup_ratio_L``: a sampler L versions behind the target: the cheapest of the chain of L deltas and the
  cumulative delta (v-L -> v, one encode_delta) / full size; the chain and cumulative figures are reported too.
* ``encode_s_*`` / ``apply_s_*``: wall time of encode_delta and apply_delta as the nodes call them (the learner
  names the digests it hashed once per version: ``hash_s_median``; the sampler's base is already verified, apply
  checks every chunk and the result's digest), per version and as GB/s; ``publisher_s_median``: all the learner
  does per version (node.delta_publish.DeltaPublisher.encode: one hash, the step delta and the cumulative delta
  from the keyframe); ``overhead_vs_step``: (encode + apply) / the learner's step time (from the versions' run);
  ``publisher_and_apply_vs_step``: (publisher + apply) / step.
* ``alternatives``: on a few versions, ratio and encode throughput of XOR + zlib (the baseline), XOR + zstd at
  several levels, byte planes + zstd, bit-shuffle + zstd and a sparse index+value form.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import zstandard  # noqa: E402

from node.delta_publish import DeltaPublisher  # noqa: E402
from protocol._wire import digest  # noqa: E402
from protocol.delta import DEFAULT_CHUNK_SIZE, apply_delta, encode_delta  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.manifest import RawTensor, build_manifest  # noqa: E402

LAGS = (1, 4, 16, 64)
KEYFRAME_EVERY = 10  # the learner's default --keyframe-every


def load_versions(folder: Path):
    """[(manifest, buffer)] for v0000.bin, v0001.bin, ... (a contiguous prefix) laid out as the learner publishes."""
    index = json.loads((folder / "index.json").read_text())
    out = []
    while (folder / f"v{len(out):04d}.bin").exists():
        raw = (folder / f"v{len(out):04d}.bin").read_bytes()
        tensors, off = {}, 0
        for name, dtype, shape in index:
            n = int(np.prod(shape)) * 2 if dtype in ("bfloat16", "float16") else int(np.prod(shape)) * 4
            tensors[name] = RawTensor(dtype, tuple(shape), raw[off:off + n])
            off += n
        out.append(build_manifest(tensors, run_id="bench", version=len(out), created_at=0.0))
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


# --- alternatives (measurement only: the shipped codec is protocol.delta's) -------------------------------------------
def _xor_u16(a, b) -> np.ndarray:
    return np.bitwise_xor(np.frombuffer(a, np.uint16), np.frombuffer(b, np.uint16))


def alt_zlib(a, b, level=6):
    return len(zlib.compress(_xor_u16(a, b).tobytes(), level))


def alt_xor_zstd(a, b, level):
    return len(zstandard.ZstdCompressor(level=level).compress(_xor_u16(a, b).tobytes()))


def alt_planes_zstd(a, b, level):
    x = _xor_u16(a, b).view(np.uint8).reshape(-1, 2).T.copy()
    c = zstandard.ZstdCompressor(level=level)
    return len(c.compress(x[0].tobytes())) + len(c.compress(x[1].tobytes()))


def alt_bitshuffle_zstd(a, b, level=1):
    """16 bit planes of the XOR (bit k of every element together), as bitshuffle does, then zstd."""
    x = _xor_u16(a, b)
    bits = np.unpackbits(x.view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")  # (n, 16)
    return len(zstandard.ZstdCompressor(level=level).compress(np.packbits(bits.T, axis=1).tobytes()))


def alt_sparse_zstd(a, b, level=1):
    """Changed positions as uint32 gaps + their XOR values (byte planes), each zstd-compressed."""
    x = _xor_u16(a, b)
    idx = np.flatnonzero(x)
    gaps = np.diff(idx, prepend=0).astype(np.uint32)
    vals = x[idx].view(np.uint8).reshape(-1, 2).T.copy()
    c = zstandard.ZstdCompressor(level=level)
    return len(c.compress(gaps.tobytes())) + len(c.compress(vals.tobytes()))


ALTERNATIVES = {
    "xor+zlib-6 (baseline)": lambda a, b: alt_zlib(a, b, 6),
    "xor+zstd-1": lambda a, b: alt_xor_zstd(a, b, 1),
    "xor+zstd-3": lambda a, b: alt_xor_zstd(a, b, 3),
    "xor+zstd-9": lambda a, b: alt_xor_zstd(a, b, 9),
    "xor+planes+zstd-1": lambda a, b: alt_planes_zstd(a, b, 1),
    "xor+planes+zstd-3": lambda a, b: alt_planes_zstd(a, b, 3),
    "xor+planes+zstd-9": lambda a, b: alt_planes_zstd(a, b, 9),
    "xor+bitshuffle+zstd-1": lambda a, b: alt_bitshuffle_zstd(a, b, 1),
    "sparse index+value+zstd-1": lambda a, b: alt_sparse_zstd(a, b, 1),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", default="/tmp/smol-versions",
                   help="folder written by scripts.bench.delta_versions (default: %(default)s)")
    p.add_argument("--alt-versions", type=int, default=3,
                   help="versions the alternatives are measured on (spread over the run) (default: %(default)s)")
    p.add_argument("--alt-sample", type=float, default=1.0,
                   help="fraction of the buffer (evenly spread 1 MiB blocks) the alternatives see (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the results to this JSON file (default: none)")
    args = p.parse_args(argv)
    folder = Path(args.versions)
    versions = load_versions(folder)
    if len(versions) < 2:
        raise SystemExit(f"error: {folder} holds {len(versions)} versions; make them with scripts.bench.delta_versions")
    full = versions[0][0].total_size
    n = len(versions) - 1
    print(f"{n + 1} versions of {full / 1e6:.1f} MB (bf16) from {folder}")

    # As the nodes call them: the learner hashes each version once and names the digests in every delta it encodes
    # (node/delta_publish.py: the step delta and, between keyframes, the cumulative one); a sampler applies with its
    # base already verified (node/catchup.py passes base_digest), so the result's hash is the one full hash left.
    publisher = DeltaPublisher(Identity.generate(), keyframe_every=KEYFRAME_EVERY, chunk_size=DEFAULT_CHUNK_SIZE)
    publisher.commit(*versions[0], True, [])
    sizes, enc_s, app_s, hash_s, pub_s = [], [], [], [], []
    base_digest, _ = timed(lambda: digest(versions[0][1]))
    for v in range(1, n + 1):
        target_digest, th = timed(lambda: digest(versions[v][1]))
        (d, chunks), te = timed(lambda: encode_delta(*versions[v - 1], *versions[v], base_digest=base_digest,
                                                     target_digest=target_digest))
        out, ta = timed(lambda: apply_delta(d, versions[v - 1][1], chunks, base_digest=base_digest))
        assert out == versions[v][1], f"version {v} did not round-trip"
        (keyframe, deltas), tp = timed(lambda: publisher.encode(*versions[v]))
        publisher.commit(*versions[v], keyframe, deltas)
        base_digest = target_digest
        sizes.append(d.compressed_size)
        enc_s.append(te)
        app_s.append(ta)
        hash_s.append(th)
        pub_s.append(tp)
        print(f"v{v - 1}->v{v}: {d.compressed_size / full:.4%}  encode {te:.2f} s  apply {ta:.2f} s  hash {th:.2f} s  "
              f"learner's deltas into v{v} ({len(deltas)}) {tp:.2f} s")

    catchup = {}
    for lag in LAGS:
        if lag > n:
            continue
        chain, cumulative = [], []
        for v in range(lag, n + 1):
            chain.append(sum(sizes[v - lag:v]))
            cumulative.append(sizes[v - 1] if lag == 1 else encode_delta(*versions[v - lag], *versions[v])[0].compressed_size)
        best = [min(c, k, full) for c, k in zip(chain, cumulative)]
        catchup[lag] = {"targets": len(best), "chain_ratio_median": statistics.median(chain) / full,
                        "cumulative_ratio_median": statistics.median(cumulative) / full,
                        "best_ratio_median": statistics.median(best) / full, "best_ratio_max": max(best) / full}
        print(f"{lag:>2} behind ({len(best)} targets): chain {catchup[lag]['chain_ratio_median']:.3%}  "
              f"cumulative {catchup[lag]['cumulative_ratio_median']:.3%}  best {catchup[lag]['best_ratio_median']:.3%}")

    picks = sorted({int(round(x)) for x in np.linspace(1, n, min(args.alt_versions, n))})
    block = 1 << 20
    step = max(1, round(1 / args.alt_sample))
    starts = range(0, full - full % block, block * step)

    def sample(buf) -> bytes:
        return b"".join(bytes(buf[i:i + block]) for i in starts)

    pairs = [(sample(versions[v - 1][1]), sample(versions[v][1])) for v in picks]
    sampled = len(pairs[0][0])
    alternatives = {}
    for name, fn in ALTERNATIVES.items():
        ratios, secs = [], []
        for a, b in pairs:
            size, s = timed(lambda: fn(a, b))
            ratios.append(size / sampled)
            secs.append(s)
        alternatives[name] = {"ratio_median": statistics.median(ratios),
                              "encode_mb_s": sampled / 1e6 / statistics.median(secs)}
        print(f"{name:<28} {alternatives[name]['ratio_median']:.3%}  {alternatives[name]['encode_mb_s']:.0f} MB/s")

    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    step_s = statistics.median(run["step_wall_s"]) if run.get("step_wall_s") else None
    result = {
        "versions": n + 1, "full_bytes": full,
        "delta_ratio_median": statistics.median(sizes) / full, "delta_ratio_max": max(sizes) / full,
        "delta_ratio_first": sizes[0] / full, "delta_ratios": [s / full for s in sizes],
        "catchup": catchup,
        **{f"catchup_ratio_{lag}": c["best_ratio_median"] for lag, c in catchup.items()},
        "encode_s_median": statistics.median(enc_s), "apply_s_median": statistics.median(app_s),
        "encode_gb_s": full / 1e9 / statistics.median(enc_s), "apply_gb_s": full / 1e9 / statistics.median(app_s),
        "hash_s_median": statistics.median(hash_s), "publisher_s_median": statistics.median(pub_s),
        "learner_step_s_median": step_s,
        "overhead_vs_step": None if step_s is None else (statistics.median(enc_s) + statistics.median(app_s)) / step_s,
        "publisher_and_apply_vs_step": None if step_s is None else (
            statistics.median(pub_s) + statistics.median(app_s)) / step_s,
        "alternatives": alternatives, "alternatives_on_versions": picks, "alternatives_sampled_bytes": sampled,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("delta_ratios", "alternatives", "catchup")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
