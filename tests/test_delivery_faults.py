"""Acknowledged means kept: the real learner and sampler programs (tiny policy, 127.0.0.1), the learner stopped at
each failure point of a group's way (node/fault_points.py), and after each life the audit (node/audit.py) finds
nothing lost and nothing trained twice in the surviving lineage of checkpoints.

One learner lifecycle serves every point (a checkpoint every 2 steps; every restart uses --resume, so each life
starts again from the checkpoint of step 2 and must retrain what the previous life trained after it):

    life 1  SIGKILL between train and checkpoint (step 3 trained and journaled, no checkpoint of it), while intake
            goes on: groups accepted but not taken wait in the inbox
    life 2  SIGKILL between take and train (step 3's batch, requeued from life 1, taken)
    life 3  SIGKILL inside publish (the version of the first step trained is visible, not recorded as published)
    life 4  a clean stop (SIGTERM) with a taken batch: it checkpoints and exits 130, the batch stays held
    life 5  trains every held group once, then a clean stop; the final audit also reads the sampler's answer log

The sampler stays up through all of it (it waits for the learner and resends what was not answered). Every
process is stopped by its PID in ``finally``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hivemind.p2p import P2P, PeerID

from node.audit import audit
from node.fault_points import ENV
from node.journal import JOURNAL_FILE, load_journal
from node.local import LOOPBACK, REPO, Proc, stop_all
from protocol.identity import Identity
from tests.swarm_helpers.procs import free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUN = "faults"


def learner_cmd(run_dir, port: int) -> list[str]:
    # --trusted-after 1: the one sampler may fill the inbox while the trainer is paused (a fresh key may not)
    return ["-m", "node.learner", "--run-dir", str(run_dir), "--run-id", RUN, "--resume", "--group-size", "4",
            "--groups-per-step", "2", "--max-buffered-steps", "4", "--checkpoint-every", "2", "--max-steps", "1000",
            "--max-staleness", "64", "--trusted-after", "1", "--eval-every", "0", "--reward-workers", "1", "--no-tensorboard",
            "--torch-threads", "1", *LOOPBACK, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]


def env_with(pause: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    return {**env, ENV: pause} if pause else env


def records(run_dir) -> list[dict]:
    with open(run_dir / "swarm" / JOURNAL_FILE) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def accepted_in_life(run_dir, life: int) -> int:
    n, current = 0, 0
    for rec in records(run_dir):
        if rec["e"] == "life":
            current = rec["life"]
        elif rec["e"] == "accepted" and current == life:
            n += 1
    return n


def fates(run_dir) -> dict[str, set[int]]:
    """Group ids by fate (trained, pending, lost, ...) as the audit sees them now."""
    st = load_journal(str(run_dir / "swarm" / JOURNAL_FILE), strict=True)
    held = {int(n[:-4]) for n in os.listdir(run_dir / "swarm" / "inbox") if n.endswith(".grp")}
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    cut = st.final_cut(json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())["step"])
    out: dict[str, set[int]] = {}
    for i, g in st.groups.items():
        out.setdefault(st.outcome(g, cut, held=i in held), set()).add(i)
    return out


def check(run_dir, *sampler_dirs, **expect) -> dict:
    report = audit(str(run_dir), [str(d) for d in sampler_dirs])
    assert report["lost"] == 0 and report["trained_twice"] == 0, json.dumps(report, indent=1)
    for key, value in expect.items():
        assert report[key] == value, (key, json.dumps(report, indent=1))
    return report


def version_marker(run_dir) -> int:
    return max(int((run_dir / name).read_text()) for name in ("publishing_version", "published_version")
               if (run_dir / name).exists())


def test_no_acknowledged_group_is_lost_or_trained_twice_at_any_failure_point(tmp_path):
    port = free_port()
    run_dir, sdir = tmp_path / "learner", tmp_path / "sampler"
    procs: list[Proc] = []
    t_start = time.monotonic()

    def life(n: int, pause: str | None) -> Proc:
        proc = Proc(learner_cmd(run_dir, port), tmp_path / f"learner-{n}.log", env=env_with(pause))
        procs.append(proc)
        return proc

    try:
        # The learner's identities exist before its first start, so the sampler's join arguments never change.
        (run_dir / "swarm").mkdir(parents=True)
        P2P.generate_identity(str(run_dir / "swarm" / "p2p_identity.key"))
        peer_id = PeerID.from_identity((run_dir / "swarm" / "p2p_identity.key").read_bytes()).to_base58()
        key = Identity.load_or_create(str(run_dir / "swarm" / "ed25519.key")).public_key_str
        sampler = Proc(["-m", "node.sampler", "--run-id", RUN, "--peers", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}",
                        "--learner-key", key, "--state-dir", str(sdir), "--batch-prompts", "2", "--max-pending", "4",
                        "--torch-threads", "1", *LOOPBACK], tmp_path / "sampler.log", env=env_with(None))
        procs.append(sampler)

        # life 1: killed between train and checkpoint (step 3 is journaled as trained; the checkpoint is step 2)
        first = life(1, "learner:after_train@3")
        first.wait_for(r"paused at learner:after_train \(version 3\)", 300)
        # at most 7 groups were taken (6 trained, 1 waiting for step 4): the rest were accepted and never taken
        wait_until(lambda: accepted_in_life(run_dir, 1) >= 9, 60, "intake to go on while the trainer is paused")
        first.kill()
        r = check(run_dir, final_step=2, learner_lives=1)
        rolled_back = fates(run_dir)["pending"]
        assert r["trained"] == 4 and len(rolled_back) >= 4, r  # step 3's two groups and some never taken

        # life 2: killed between take and train (the requeued groups fill its inbox)
        second = life(2, "learner:before_train@3")
        second.wait_for(r"paused at learner:before_train \(version 3\)", 120)
        second.kill()
        check(run_dir, final_step=2, learner_lives=2, trained=4)
        assert rolled_back <= fates(run_dir)["pending"]

        # life 3: killed inside publish, after the first step it trained became visible
        ckpt_version = json.loads((run_dir / "checkpoints" / "step-000002" / "state.json").read_text())
        highest = version_marker(run_dir)
        v0 = highest + 1 if highest > ckpt_version["policy_version"] else ckpt_version["policy_version"]
        third = life(3, f"publish:after_visible@{v0 + 1}")
        third.wait_for(rf"paused at publish:after_visible \(version {v0 + 1}\)", 120)
        third.kill()
        check(run_dir, final_step=2, learner_lives=3, trained=4)

        # life 4: a clean stop while a taken batch waits to be trained: checkpoint, exit 130, the batch is held
        fourth = life(4, "learner:before_train@3")
        fourth.wait_for(r"paused at learner:before_train \(version 3\)", 120)
        fourth.terminate()
        assert fourth.popen.wait(120) == 130, fourth.tail()
        check(run_dir, final_step=2, learner_lives=4, trained=4)
        held = fates(run_dir)["pending"]
        assert rolled_back <= held

        # life 5: every held group is trained once (or dropped as stale, counted), then a clean stop
        fifth = life(5, None)
        wait_until(lambda: held <= fates(run_dir).get("trained", set()) | _dropped(run_dir), 240,
                   "the last life to train every group held")
        fifth.terminate()
        assert fifth.popen.wait(120) == 130, fifth.tail()
        sampler.terminate()
        sampler.popen.wait(60)
        report = check(run_dir, sdir, learner_lives=5)
        assert report["unknown_to_learner"] == 0 and report["acknowledged"] >= 12, report
        assert report["sent"] >= report["acknowledged"] and report["trained"] > 4, report
        out = subprocess.run([sys.executable, "-m", "node.audit", str(run_dir), str(sdir), "--json",
                              str(tmp_path / "audit.json")], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        print(out.stdout)
        print(f"five learner lives in {time.monotonic() - t_start:.0f} s")
    finally:
        stop_all(procs)


def _dropped(run_dir) -> set[int]:
    return {i for fate, ids in fates(run_dir).items() if fate.startswith("dropped:") for i in ids}
