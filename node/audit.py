"""`python -m node.audit RUN_DIR [SAMPLER_STATE_DIR ...] [--json PATH]`: what happened to every rollout group.

Reads the learner's write-ahead journal (node/journal.py, in RUN_DIR/swarm/journal/ or RUN_DIR/journal/) and each
sampler's answer log (SAMPLER_STATE_DIR/answers.jsonl) and reconciles them. The delivery guarantee it checks
(docs/SWARM.md): every group the learner acknowledges is trained exactly once in the surviving lineage of
checkpoints, or counted as dropped (stale, or by a check), or still held durably for the next life.

Surviving lineage: the learner's lives are numbered 1, 2, ...; life L resumed from checkpoint step r_L (0: fresh
weights). Step k trained in life L survives iff k <= r_L' for every later life L' and, for the final life, k <= the
newest checkpoint on disk (its last periodic checkpoint or its clean-stop checkpoint).

Contract of the ``--json`` output (the soak script depends on these top-level keys; more may be added):

    sent            int  groups the samplers sent (every distinct digest answered, plus those still in outboxes);
                         without sampler dirs: the learner's accepted + rejected + duplicate answers
    acknowledged    int  groups the learner acknowledged (accepted; a resend answered "duplicate" is the same group)
    trained         int  acknowledged groups trained in the surviving lineage (each counted once)
    lost            int  acknowledged, never trained in the surviving lineage, not dropped, no longer held
    trained_twice   int  acknowledged groups trained in two or more surviving steps
    dropped_stale   int  acknowledged groups dropped by the staleness rule
    dropped         dict other drops by reason (banned, scoring_failed, implausible_logprobs, ...) -> int
    pending         int  acknowledged groups still held in the learner's inbox (trained by the next --resume)
    rejected        int  groups the learner rejected (rejected_by_reason: reason -> int)
    duplicates      int  "duplicate" answers (resends of acknowledged groups)
    learner_lives   int  learner lives in the journal; lives: [{life, resumed_from, last_checkpoint}]
    final_step      int  the newest checkpoint's step (the end of the surviving lineage)
    samplers        dict sampler state dir -> {sent, accepted, duplicate, rejected, outbox, unknown_to_learner}
    examples        dict of lists: for each non-zero problem class (lost, trained_twice, dropped_stale, rejected,
                         unknown_to_learner) up to 5 groups {sampler, seq, digest, version, ...}
    ok              bool lost == 0 and trained_twice == 0

Exit status: 0 when lost == 0 and trained_twice == 0; 1 otherwise; 2 on bad input (a missing directory, a
malformed journal or answer log: one line ``error: ...`` on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from node.journal import ANSWERS_FILE, JOURNAL_FILE, STALE, JournalError, load_journal, read_records

EXAMPLES = 5
PROBLEMS = ("lost", "trained_twice", "unknown_to_learner")


class AuditError(ValueError):
    """Bad input: a missing directory or file, a malformed record (exit status 2)."""


def find_journal(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        raise AuditError(f"{run_dir}: no such directory (give the learner's --run-dir)")
    for path in (os.path.join(run_dir, "swarm", JOURNAL_FILE), os.path.join(run_dir, JOURNAL_FILE)):
        if os.path.isfile(path):
            return path
    raise AuditError(f"{run_dir}: no {JOURNAL_FILE} in it or in its swarm/ folder (is it a learner's --run-dir?)")


def checkpoint_on_disk(run_dir: str) -> Optional[int]:
    """The step of the newest complete checkpoint (what a --resume would load), read without torch."""
    root = os.path.join(run_dir, "checkpoints")
    try:
        with open(os.path.join(root, "LATEST")) as f:
            name = f.read().strip()
        with open(os.path.join(root, name, "state.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def held_ids(journal_path: str) -> set[int]:
    inbox = os.path.join(os.path.dirname(journal_path), "inbox")
    out = set()
    if os.path.isdir(inbox):
        for name in os.listdir(inbox):
            if name.endswith(".grp"):
                try:
                    out.add(int(name[:-4]))
                except ValueError:
                    pass  # not an inbox item (a stray file): nothing held
    return out


@dataclass
class SamplerSide:
    directory: str
    sampler: Optional[str] = None
    answers: Counter = field(default_factory=Counter)
    rejected_by_reason: Counter = field(default_factory=Counter)
    acked: dict[str, dict] = field(default_factory=dict)  # digest -> record (accepted or duplicate)
    answered: set[str] = field(default_factory=set)
    outbox: set[str] = field(default_factory=set)  # digests still waiting for an answer
    folded: int = 0  # answers compaction folded into counts


def read_sampler(directory: str) -> SamplerSide:
    if not os.path.isdir(directory):
        raise AuditError(f"{directory}: no such directory (give a sampler's --state-dir)")
    path = os.path.join(directory, ANSWERS_FILE)
    if not os.path.isfile(path):
        raise AuditError(f"{directory}: no {ANSWERS_FILE} (is it a sampler's --state-dir?)")
    side = SamplerSide(directory)
    for n, rec in enumerate(read_records(path, strict=True), 1):
        a = rec.get("a")
        if a == "start":
            side.sampler = rec.get("sampler") or side.sampler
        elif a == "summary":
            totals = rec.get("totals")
            if not isinstance(totals, dict):
                raise AuditError(f"{path}:{n}: malformed summary record")
            for k in ("accepted", "duplicate", "rejected"):
                side.answers[k] += int(totals.get(k, 0))
                side.folded += int(totals.get(k, 0))
            side.rejected_by_reason.update(totals.get("rejected_by_reason", {}))
        elif a in ("accepted", "duplicate", "rejected"):
            digest = rec.get("digest")
            if not isinstance(digest, str) or len(digest) != 64:
                raise AuditError(f"{path}:{n}: record without a valid digest")
            side.answers[a] += 1
            side.answered.add(digest)
            if a == "rejected":
                side.rejected_by_reason[str(rec.get("reason"))] += 1
            else:
                side.acked.setdefault(digest, rec)
        else:
            raise AuditError(f"{path}:{n}: unknown record kind {a!r}")
    outbox = os.path.join(directory, "outbox")
    if os.path.isdir(outbox):
        for name in sorted(os.listdir(outbox)):
            if name.endswith(".grp"):
                with open(os.path.join(outbox, name), "rb") as f:
                    side.outbox.add(hashlib.sha256(f.read()).hexdigest())
    return side


def audit(run_dir: str, sampler_dirs: list[str] = ()) -> dict[str, Any]:
    """Reconcile the learner's journal (and the samplers' answer logs); the --json document (see the docstring)."""
    path = find_journal(run_dir)
    try:
        st = load_journal(path, strict=True)
    except JournalError as exc:
        raise AuditError(str(exc)) from None
    samplers = [read_sampler(d) for d in sampler_dirs]
    cut = st.final_cut(checkpoint_on_disk(run_dir))
    held = held_ids(path)
    fates: Counter = Counter()
    dropped: Counter = Counter(st.summary_dropped)
    examples: dict[str, list] = {}
    by_digest = {}

    def example(kind: str, rec: dict) -> None:
        examples.setdefault(kind, [])
        if len(examples[kind]) < EXAMPLES:
            examples[kind].append(rec)

    for g in st.groups.values():
        by_digest[g.digest] = g
        fate = st.outcome(g, cut, held=g.id in held)
        if fate.startswith("dropped:"):
            dropped[fate[8:]] += 1
            if fate == f"dropped:{STALE}":
                example("dropped_stale", g.example())
            continue
        fates[fate] += 1
        if fate in ("lost", "trained_twice", "pending"):
            example(fate, g.example(surviving=[list(t) for t in st.surviving(g, cut)]))
    rejected_by_reason = Counter(st.summary_rejected)
    for rec in st.rejected:
        rejected_by_reason[str(rec.get("reason"))] += 1
        example("rejected", {k: rec.get(k) for k in ("sampler", "seq", "digest", "version", "reason")})
    folded = st.summary.get("acknowledged", 0)

    per_sampler: dict[str, dict] = {}
    sent: set[str] = set()
    unknown = 0
    for side in samplers:
        missing = [d for d in side.acked if d not in by_digest]
        for d in missing:
            rec = side.acked[d]
            example("unknown_to_learner", {"sampler": side.sampler, "seq": rec.get("seq"), "digest": d,
                                           "version": rec.get("version"), "answer": rec.get("a"),
                                           "state_dir": side.directory})
        unknown += len(missing)
        sent |= side.answered | side.outbox
        per_sampler[side.directory] = {"sampler": side.sampler, "sent": len(side.answered | side.outbox) + side.folded,
                                       **{k: side.answers[k] for k in ("accepted", "duplicate", "rejected")},
                                       "outbox": len(side.outbox), "unknown_to_learner": len(missing)}
    acknowledged = len(st.groups) + folded
    trained = fates["trained"] + fates["trained_twice"] + st.summary.get("trained", 0)
    trained_twice = fates["trained_twice"] + st.summary.get("trained_twice", 0)
    # An acknowledgement the learner has no record of is a loss, unless compaction folded that record away.
    lost = fates["lost"] + st.summary.get("lost", 0) + (unknown if not folded else 0)
    rejected = sum(rejected_by_reason.values())
    duplicates = len(st.duplicates) + st.summary.get("duplicates", 0)
    if samplers:
        n_sent = len(sent) + sum(s.folded for s in samplers)
    else:
        n_sent = acknowledged + rejected
    lives = [{"life": life, "resumed_from": r, "last_checkpoint": st.checkpoints.get(life)}
             for life, r in sorted(st.lives.items())]
    return {
        "sent": n_sent, "acknowledged": acknowledged, "trained": trained, "lost": lost,
        "trained_twice": trained_twice, "dropped_stale": dropped.pop(STALE, 0), "dropped": dict(dropped),
        "pending": fates["pending"], "rejected": rejected, "rejected_by_reason": dict(rejected_by_reason),
        "duplicates": duplicates, "learner_lives": len(st.lives), "lives": lives, "final_step": cut,
        "folded_by_compaction": folded, "unknown_to_learner": unknown, "samplers": per_sampler,
        "examples": examples, "journal": path, "ok": lost == 0 and trained_twice == 0,
    }


def render(report: dict[str, Any]) -> str:
    lives = ", ".join(f"{x['life']}<-{x['resumed_from']}" for x in report["lives"])
    lines = [
        f"journal {report['journal']}: {report['learner_lives']} learner lives (life<-resumed from step: {lives}); "
        f"the surviving lineage ends at step {report['final_step']}",
        f"sent {report['sent']}  acknowledged {report['acknowledged']}  trained {report['trained']}  "
        f"pending {report['pending']}  dropped_stale {report['dropped_stale']}  "
        f"dropped {sum(report['dropped'].values())} {report['dropped'] or ''}".rstrip(),
        f"rejected {report['rejected']} {report['rejected_by_reason'] or ''}".rstrip()
        + f"  duplicates {report['duplicates']}",
    ]
    for d, s in report["samplers"].items():
        lines.append(f"  sampler {str(s['sampler'])[:16]} ({d}): sent {s['sent']} accepted {s['accepted']} "
                     f"duplicate {s['duplicate']} rejected {s['rejected']} in outbox {s['outbox']}"
                     + (f" UNKNOWN TO THE LEARNER {s['unknown_to_learner']}" if s["unknown_to_learner"] else ""))
    if report["folded_by_compaction"]:
        lines.append(f"  ({report['folded_by_compaction']} groups folded by compaction: counted, not itemised)")
    lines.append(f"lost {report['lost']}  trained twice {report['trained_twice']}  -> "
                 + ("OK" if report["ok"] else "PROBLEM"))
    for kind in PROBLEMS:
        for ex in report["examples"].get(kind, []):
            lines.append(f"  {kind}: {json.dumps(ex)}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m node.audit",
        description="Reconcile the learner's journal with the samplers' answer logs: sent, acknowledged, trained "
                    "in the surviving lineage, lost, trained twice. Exit 0 when nothing was lost or trained twice, "
                    "1 otherwise, 2 on bad input.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the learner's --run-dir")
    parser.add_argument("sampler_dirs", metavar="SAMPLER_STATE_DIR", nargs="*", help="samplers' --state-dir")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH "
                                                                     "('-': stdout only, as JSON)")
    args = parser.parse_args(argv)
    try:
        report = audit(args.run_dir, args.sampler_dirs)
    except (AuditError, JournalError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(render(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
