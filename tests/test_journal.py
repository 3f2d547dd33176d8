"""The write-ahead journal (node/journal.py) through the learner's durable inbox, and the audit (node/audit.py) on
synthetic journals: lineage across restarts, requeues, drops, compaction, the samplers' answer logs and bad input.

Fast: no model, no network; real signed groups (protocol.rollout) so that the journal's claims are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from node.audit import audit, main as audit_main
from node.inbox import Accepted, DurableInbox
from node.journal import JOURNAL_FILE, AnswerLog, GroupJournal, claims, load_journal
from node.local import REPO
from protocol.identity import Identity
from protocol.rollout import RolloutGroup, decode_group, encode_group

SAMPLER = Identity.from_seed(b"s" * 32)


def signed(seq: int, version: int = 0) -> bytes:
    group = RolloutGroup.from_completions(run_id="journal", seq=seq, policy_version=version, prompt_index=seq,
                                          prompt_ids=[1, 2, 3], completions=[[4, 5], [6]],
                                          logprobs=[[-0.5, -0.25], [-1.0]])
    return encode_group(group, SAMPLER)


def accepted(payload: bytes) -> Accepted:
    return Accepted(decode_group(payload), payload, hashlib.sha256(payload).digest(), "peer", time.time())


class Learner:
    """The trainer side of the learner program, as node/learner.py drives the inbox: take, train a step of
    ``per_step`` groups, checkpoint every ``every`` steps; ``crash()`` forgets everything in memory."""

    def __init__(self, state_dir, resumed_from: int = 0, per_step: int = 2, every: int = 2):
        self.inbox = DurableInbox(str(state_dir), journal=True)
        self.inbox.reload(decode_group, resumed_from=resumed_from)
        self.step, self.per_step, self.every = resumed_from, per_step, every
        self.pending: list[Accepted] = []
        self.trained: list[tuple[int, int]] = []  # (step, seq) of this life

    def run(self, steps: int, stale_below: int = -1) -> None:
        for _ in range(steps):
            while len(self.pending) < self.per_step:
                taken = self.inbox.get(self.per_step - len(self.pending), timeout=0)
                assert taken, "the test fed too few groups"
                for a in taken:
                    if a.item.policy_version < stale_below:
                        self.inbox.dropped(a.seq, "stale")
                    else:
                        self.pending.append(a)
            batch, self.pending = self.pending[: self.per_step], self.pending[self.per_step:]
            self.step += 1
            self.inbox.trained(self.step, {a.seq: None for a in batch})
            self.trained += [(self.step, a.item.seq) for a in batch]
            if self.step % self.every == 0:
                self.inbox.covered(self.step)

    def crash(self) -> None:
        self.inbox.journal._file.close()  # SIGKILL: what was written stays, nothing else happens
        self.inbox._log.close()


def feed(learner: Learner, seqs, version: int = 0) -> None:
    for s in seqs:
        assert learner.inbox.put(accepted(signed(s, version)))


def test_a_crash_after_the_checkpoint_retrains_the_rolled_back_steps_once(tmp_path):
    first = Learner(tmp_path)
    feed(first, range(10))
    first.run(3)  # steps 1, 2 (checkpoint 2), 3: seqs 0-5 trained; 6-9 wait in the queue
    first.crash()  # --resume now loads the checkpoint of step 2: step 3 (seqs 4, 5) is rolled back
    assert sorted(os.listdir(tmp_path / "inbox")) == [f"{i:016d}.grp" for i in range(4, 10)]  # 0-3 covered: gone

    second = Learner(tmp_path, resumed_from=2)
    assert [a.item.seq for a in second.inbox.pending()] == [4, 5, 6, 7, 8, 9]  # requeued in order
    assert second.inbox.seen(hashlib.sha256(signed(4)).digest())  # a resend is still a duplicate
    second.run(2)  # steps 3, 4 (checkpoint 4) of life 2: 4-7
    second.crash()
    third = Learner(tmp_path, resumed_from=4)
    feed(third, [10, 11])
    third.run(2)  # steps 5, 6 (checkpoint 6): 8-11
    third.inbox.close()

    report = audit(str(tmp_path))
    assert report["learner_lives"] == 3 and report["final_step"] == 6
    assert (report["acknowledged"], report["trained"], report["lost"], report["trained_twice"]) == (12, 12, 0, 0)
    assert report["pending"] == 0 and not os.listdir(tmp_path / "inbox")
    assert load_journal(str(tmp_path / JOURNAL_FILE), strict=True).lives == {1: 0, 2: 2, 3: 4}


def test_taken_but_untrained_groups_and_drops_survive_a_clean_stop(tmp_path):
    first = Learner(tmp_path, per_step=3, every=1)
    feed(first, range(4), version=5)
    feed(first, [4], version=0)
    first.run(1, stale_below=1)  # step 1 trains 0-2 (checkpoint 1)
    first.pending += first.inbox.get(10, timeout=0)  # 3 and 4 taken, not trained...
    first.inbox.dropped(first.pending.pop().seq, "stale")  # ... 4 dropped as stale
    first.inbox.close()  # a clean stop: nothing more to write, the bytes of 3 are held
    report = audit(str(tmp_path))
    assert (report["trained"], report["pending"], report["dropped_stale"], report["lost"]) == (3, 1, 1, 0)
    assert report["examples"]["pending"][0]["seq"] == 3 and report["examples"]["dropped_stale"][0]["seq"] == 4

    second = Learner(tmp_path, resumed_from=1, per_step=1)
    assert [a.item.seq for a in second.inbox.pending()] == [3]
    second.run(1)
    second.inbox.close()
    report = audit(str(tmp_path))
    assert (report["trained"], report["pending"], report["dropped_stale"], report["lost"]) == (4, 0, 1, 0)


def test_a_new_life_never_reissues_the_id_of_a_group_whose_file_is_gone(tmp_path):
    """Ids came from the inbox files on disk: when the newest groups had been trained or dropped (no file left), the
    next life gave their ids to new groups, and the audit took the old groups for lost (seen in a short soak)."""
    first = Learner(tmp_path, per_step=2, every=1)
    feed(first, range(2), version=5)
    feed(first, [2, 3], version=0)
    first.run(1, stale_below=1)  # step 1 (checkpoint 1): ids 0, 1 trained ...
    for a in first.inbox.get(10, timeout=0):
        first.inbox.dropped(a.seq, "stale")  # ... ids 2, 3 dropped: nothing of them stays in the inbox
    first.crash()
    second = Learner(tmp_path, resumed_from=1, per_step=2, every=1)
    assert not os.listdir(tmp_path / "inbox")
    feed(second, [4, 5], version=5)
    assert [a.seq for a in second.inbox.pending()] == [4, 5]  # not 0, 1 again
    second.run(1)
    second.inbox.close()
    report = audit(str(tmp_path))
    assert (report["acknowledged"], report["trained"], report["dropped_stale"]) == (6, 4, 2)
    assert (report["lost"], report["trained_twice"]) == (0, 0)


def write_journal(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def acc(i: int, seq: int | None = None) -> dict:
    return {"e": "accepted", "id": i, "sampler": "ab" * 32, "seq": i if seq is None else seq,
            "digest": hashlib.sha256(bytes([i])).hexdigest(), "version": 0}


def test_the_audit_finds_losses_and_double_training_in_the_surviving_lineage(tmp_path, capsys):
    run = tmp_path / "run"
    write_journal(run / "swarm" / JOURNAL_FILE, [
        {"e": "life", "life": 1, "resumed_from": 0}, acc(0), acc(1), acc(2), acc(3),
        {"e": "trained", "life": 1, "step": 1, "ids": [0, 1]},
        {"e": "checkpoint", "life": 1, "step": 1},
        {"e": "trained", "life": 1, "step": 2, "ids": [2]},  # rolled back by life 2 ...
        {"e": "life", "life": 2, "resumed_from": 1},
        {"e": "trained", "life": 2, "step": 2, "ids": [1]},  # 1 trained again in a surviving step: twice
        {"e": "checkpoint", "life": 2, "step": 2},
        # ... and 2 never trained again, its bytes gone: lost; 3 never trained, its bytes gone: lost
        {"e": "rejected", "sampler": "cd" * 32, "seq": 7, "digest": "00" * 32, "version": 0, "reason": "replay"},
        {"e": "duplicate", "sampler": "ab" * 32, "seq": 0, "digest": acc(0)["digest"]},
    ])
    report = audit(str(run))
    assert (report["acknowledged"], report["trained"], report["trained_twice"], report["lost"]) == (4, 2, 1, 2)
    assert report["rejected_by_reason"] == {"replay": 1} and report["duplicates"] == 1
    assert sorted(e["seq"] for e in report["examples"]["lost"]) == [2, 3]
    assert report["examples"]["trained_twice"][0]["surviving"] == [[1, 1], [2, 2]]
    out = tmp_path / "audit.json"
    assert audit_main([str(run), "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    for key in ("sent", "acknowledged", "trained", "lost", "trained_twice", "dropped_stale", "rejected",
                "duplicates", "learner_lives", "examples"):
        assert key in doc, key
    assert "lost 2  trained twice 1  -> PROBLEM" in capsys.readouterr().out


def test_sampler_answers_are_reconciled_with_the_journal(tmp_path):
    run, s = tmp_path / "run", tmp_path / "s"
    lost_payload = signed(9)
    write_journal(run / JOURNAL_FILE, [
        {"e": "life", "life": 1, "resumed_from": 0},
        {**acc(0), "digest": hashlib.sha256(signed(0)).hexdigest()},
        {"e": "trained", "life": 1, "step": 1, "ids": [0]}, {"e": "checkpoint", "life": 1, "step": 1},
    ])
    log = AnswerLog(str(s), SAMPLER.public_key)
    log.record("accepted", signed(0))
    log.record("duplicate", signed(0))
    log.record("rejected", signed(1), "stale")
    log.close()
    (s / "outbox").mkdir()
    (s / "outbox" / f"{0:016d}.grp").write_bytes(signed(2))  # sent, not answered yet
    report = audit(str(run), [str(s)])
    assert report["ok"] and report["sent"] == 3 and report["samplers"][str(s)]["outbox"] == 1
    assert report["samplers"][str(s)]["sampler"] == SAMPLER.public_key.hex()

    log = AnswerLog(str(s), SAMPLER.public_key)  # an ack the learner has no record of is a loss
    log.record("accepted", lost_payload)
    log.close()
    report = audit(str(run), [str(s)])
    assert report["lost"] == 1 and report["examples"]["unknown_to_learner"][0]["seq"] == 9


def test_compaction_bounds_the_journal_and_keeps_the_totals(tmp_path):
    inbox = DurableInbox(str(tmp_path), journal=True)
    inbox.journal.max_bytes = 4000
    inbox.reload(decode_group, resumed_from=0)
    step = 0
    for s in range(0, 200, 2):
        feed_one = [accepted(signed(s)), accepted(signed(s + 1))]
        for a in feed_one:
            assert inbox.put(a)
        taken = inbox.get(2, timeout=0)
        step += 1
        inbox.trained(step, {taken[0].seq: None, taken[1].seq: "implausible_logprobs" if s % 20 == 0 else None})
        if step % 5 == 0:
            inbox.covered(step)
        inbox.answered("rejected", b"junk", hashlib.sha256(b"junk").digest(), "malformed")
    assert inbox.journal.compactions >= 3
    assert os.path.getsize(tmp_path / JOURNAL_FILE) < 2 * 4000
    inbox.close()
    report = audit(str(tmp_path))
    assert report["folded_by_compaction"] > 0 and report["lost"] == 0 and report["trained_twice"] == 0
    assert report["acknowledged"] == 200 and report["dropped"] == {"implausible_logprobs": 10}
    assert report["trained"] == 190 and report["rejected"] == 100 and report["rejected_by_reason"] == {"malformed": 100}


def test_a_torn_last_line_is_cut_and_a_malformed_one_is_a_one_line_error(tmp_path):
    j = GroupJournal(str(tmp_path))
    j.begin_life(0, [])
    j.accepted(0, decode_group(signed(0)), hashlib.sha256(signed(0)).digest(), 0.0)
    j.close()
    with open(tmp_path / JOURNAL_FILE, "a") as f:
        f.write('{"e": "trained", "li')  # a kill in the middle of a write
    assert audit(str(tmp_path))["pending"] == 0  # the torn line is ignored (no inbox file here: lost)
    again = GroupJournal(str(tmp_path))  # the learner cuts it before appending
    assert again.life == 2 and (tmp_path / JOURNAL_FILE).read_text().endswith("}\n")
    again.close()

    with open(tmp_path / JOURNAL_FILE, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"e": "checkpoint", "life": 1, "step": 0}) + "\n")
    out = subprocess.run([sys.executable, "-m", "node.audit", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: ") and ":3: malformed record" in out.stderr
    assert audit_main([str(tmp_path / "missing")]) == 2
    assert audit_main([str(tmp_path), str(tmp_path / "no-sampler")]) == 2


def test_claims_are_read_without_verifying(tmp_path):
    assert claims(signed(7, version=3)) == {"sampler": SAMPLER.public_key.hex(), "seq": 7, "version": 3}
    assert claims(b"junk") == {"sampler": None, "seq": None, "version": None}


def test_without_the_journal_the_inbox_behaves_as_before(tmp_path):
    inbox = DurableInbox(str(tmp_path))
    assert inbox.put(accepted(signed(0)))
    inbox.get(1, timeout=0)
    inbox.trained(1, {0: None})  # no-ops
    inbox.covered(1)
    assert not os.listdir(tmp_path / "inbox") and not (tmp_path / JOURNAL_FILE).exists()
    inbox.close()
