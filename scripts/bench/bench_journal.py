"""What the write-ahead journal (node/journal.py) costs the learner: per accepted group, per trained step, per
checkpoint, and whether a checkpoint's journal work grows with the history.

    .venv/bin/python -m scripts.bench.bench_journal [--groups 4000] [--repeats 5] [--json out.json]

The same stream of real signed groups (8 completions x 64 tokens) goes through the learner's DurableInbox with and
without the journal: put (accept), get (take), trained (one record per step of 8 groups) and covered (a checkpoint
every 50 steps). Reported: medians over ``--repeats`` runs of the time per group and the ratio journal/no journal
(measured in the same run: the machine is shared, ratios matter more than absolutes), the checkpoint record's cost
early and late in the run (flat: it never rewrites history), and the journal's bytes per group.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time

from node.inbox import Accepted, DurableInbox
from node.journal import JOURNAL_FILE
from protocol.identity import Identity
from protocol.rollout import RolloutGroup, decode_group, encode_group

PER_STEP, EVERY = 8, 50


def groups(n: int) -> list[bytes]:
    ident = Identity.from_seed(b"b" * 32)
    out = []
    for s in range(n):
        comps = [[(s + i + t) % 1000 for t in range(64)] for i in range(8)]
        g = RolloutGroup.from_completions(run_id="bench", seq=s, policy_version=0, prompt_index=s,
                                          prompt_ids=list(range(32)), completions=comps,
                                          logprobs=[[-0.5] * 64 for _ in range(8)])
        out.append(encode_group(g, ident))
    return out


def run(payloads: list[bytes], items: list, journal: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        inbox = DurableInbox(d, maxsize=1 << 20, journal=journal)
        inbox.reload(decode_group, resumed_from=0)
        t_put = t_take = 0.0
        ckpt = []
        step = 0
        for start in range(0, len(payloads), PER_STEP):
            t0 = time.perf_counter()
            for p, item in zip(payloads[start:start + PER_STEP], items[start:start + PER_STEP]):
                inbox.put(Accepted(item, p, hashlib.sha256(p).digest(), "peer", time.time()))
            t1 = time.perf_counter()
            taken = inbox.get(PER_STEP, timeout=0)
            step += 1
            inbox.trained(step, {a.seq: None for a in taken})
            t2 = time.perf_counter()
            if step % EVERY == 0:
                inbox.covered(step)
                ckpt.append(time.perf_counter() - t2)
            t_put += t1 - t0
            t_take += t2 - t1
        size = os.path.getsize(os.path.join(d, JOURNAL_FILE)) if journal else 0
        inbox.close()
    n = len(payloads)
    return {"put_us": 1e6 * t_put / n, "take_train_us": 1e6 * t_take / n,
            "checkpoint_first_ms": 1e3 * statistics.median(ckpt[:3]), "checkpoint_last_ms": 1e3 * statistics.median(ckpt[-3:]),
            "journal_bytes_per_group": size / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    payloads = groups(a.groups)
    items = [decode_group(p) for p in payloads]
    rows: dict[str, list[dict]] = {"plain": [], "journal": []}
    for _ in range(a.repeats):  # interleaved, so that load changes hit both alike
        rows["plain"].append(run(payloads, items, journal=False))
        rows["journal"].append(run(payloads, items, journal=True))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    ratio = {m: med["journal"][m] / med["plain"][m] for m in ("put_us", "take_train_us") if med["plain"][m]}
    out = {"groups": a.groups, "group_bytes": len(payloads[0]), "repeats": a.repeats, "median": med,
           "ratio_journal_over_plain": ratio}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
