"""A/B of protocol/delta.py against an older revision of it, in one process, on the same versions (alternating
which goes first): the ratio of their encode and apply times holds on a loaded machine, where absolute times do
not.

    .venv/bin/python -m scripts.bench.bench_delta_ab --versions /tmp/smol-versions --old-rev be41450 --pairs 8

``--versions``: a folder from scripts.bench.delta_versions. Both encoders are called as the learner calls them
(the new one with the digests it hashed once per version; an old one without that argument hashes both buffers
itself); both applies with the base digest given, as node/catchup.py calls it. Checks both round-trip bit-exact.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import protocol.delta as new  # noqa: E402
from node.local import REPO  # noqa: E402
from protocol._wire import digest  # noqa: E402
from scripts.bench.bench_deltas import load_versions, timed  # noqa: E402


def old_module(rev: str):
    """protocol/delta.py as of ``rev``, imported beside the current one (as ``protocol.delta_<rev>``)."""
    source = subprocess.run(["git", "show", f"{rev}:protocol/delta.py"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    path = Path(tempfile.mkdtemp()) / "delta_old.py"
    path.write_text(source)
    name = f"protocol.delta_{rev}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", default="/tmp/smol-versions", help="folder of versions (default: %(default)s)")
    p.add_argument("--old-rev", required=True, help="git revision of the old protocol/delta.py")
    p.add_argument("--pairs", type=int, default=8, help="consecutive version pairs measured (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the results to this JSON file (default: none)")
    args = p.parse_args(argv)
    old = old_module(args.old_rev)
    old_takes_digests = "target_digest" in inspect.signature(old.encode_delta).parameters
    versions = load_versions(Path(args.versions))[:args.pairs + 1]
    if len(versions) < 2:
        raise SystemExit(f"error: {args.versions} holds {len(versions)} versions")
    times = {f"{side} {call}": [] for side in ("old", "new") for call in ("encode", "apply")}
    for r in range(len(versions) - 1):
        (bm, bb), (tm, tb) = versions[r], versions[r + 1]
        base_digest = digest(bb)
        for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
            mod = old if side == "old" else new
            if side == "new" or old_takes_digests:  # the target's one hash per version is counted in the encode
                enc = lambda: mod.encode_delta(bm, bb, tm, tb, base_digest=base_digest, target_digest=digest(tb))  # noqa: E731
            else:
                enc = lambda: mod.encode_delta(bm, bb, tm, tb)  # noqa: E731
            (m, chunks), te = timed(enc)
            out, ta = timed(lambda: mod.apply_delta(m, bb, chunks, base_digest=base_digest))
            assert bytes(out) == bytes(tb), f"{side}: v{r + 1} did not round-trip"
            times[f"{side} encode"].append(te)
            times[f"{side} apply"].append(ta)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"pairs": len(versions) - 1, "old_rev": args.old_rev, **{k.replace(" ", "_") + "_s_median": v
                                                                      for k, v in med.items()},
              "encode_new_over_old": med["new encode"] / med["old encode"],
              "apply_new_over_old": med["new apply"] / med["old apply"],
              "encode_apply_new_over_old": (med["new encode"] + med["new apply"]) / (med["old encode"] + med["old apply"])}
    for k, v in times.items():
        print(f"{k:<12} median {med[k]:.2f} s  {[round(x, 2) for x in v]}")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
