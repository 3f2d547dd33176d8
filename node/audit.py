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
