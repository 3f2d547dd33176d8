"""The programs users run, end to end on loopback: a learner and samplers as separate processes.

Real hivemind nodes, real signatures, real math-verify, the real tiny policy; nothing mocked.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from node.metrics import read_metrics
from node.local import LOOPBACK, REPO, Proc, join_args
from protocol.identity import Identity, format_public_key

pytestmark = pytest.mark.timeout(600)


def learner_args(run_dir, *extra: str) -> list[str]:
    return ["-m", "node.learner", "--run-dir", str(run_dir), "--run-id", "e2e", "--group-size", "4",
            "--groups-per-step", "2", "--eval-every", "0", "--reward-workers", "1", "--no-tensorboard", "--torch-threads",
            "1", *LOOPBACK, *extra]


def wait_for_steps(metrics_path, n: int, timeout: float, proc: Proc) -> None:
    """Until the learner's metrics file holds `n` training steps (the learner must keep running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics_path.is_file() and sum("loss" in m for m in read_metrics(metrics_path)) >= n:
            return
        assert proc.popen.poll() is None, proc.tail()
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} steps within {timeout}s:\n{proc.tail()}")


def sampler_args(state_dir, join: list[str], *extra: str) -> list[str]:
    return ["-m", "node.sampler", *join, "--state-dir", str(state_dir), "--batch-prompts", "2", "--torch-threads", "1",
            *LOOPBACK, *extra]


@pytest.mark.slow
def test_learner_and_samplers_train_publish_stop_and_resume(tmp_path):
    run_dir = tmp_path / "learner"
    procs: list[Proc] = []
    try:
        learner = Proc(learner_args(run_dir, "--max-steps", "1000", "--max-staleness", "3", "--checkpoint-every",
                                    "100"), tmp_path / "learner1.log")
        procs.append(learner)
        join = join_args(learner)
        port = re.search(r"/tcp/(\d+)/", " ".join(join)).group(1)
        # A sampler pinned to another key must not trust this learner, and says why in one line.
        impostor_key = format_public_key(Identity.generate().public_key)
        wrong = [a if not a.startswith("ed25519:") else impostor_key for a in join]
        out = run_cli(*sampler_args(tmp_path / "s0", wrong, "--wait-learner", "5", "--exit-on-unreachable"),
                      timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--learner-key" in errors[0], out.stderr[-2000:]
        fast = Proc(sampler_args(tmp_path / "s1", join), tmp_path / "s1.log")
        slow = Proc(sampler_args(tmp_path / "s2", join, "--simulate-delay", "fixed", "--delay-lower", "6"),
                    tmp_path / "s2.log")
        procs += [fast, slow]

        # Train >= 20 steps, then stop the learner gracefully (it checkpoints at the step boundary).
        # (read from the metrics file, not the status line: that is printed every 10 s, and 20 steps may take less)
        wait_for_steps(run_dir / "metrics.jsonl", 20, timeout=300, proc=learner)
        assert learner.stop() == 130, learner.tail()
        first = read_metrics(run_dir / "metrics.jsonl")
        steps = [m for m in first if "loss" in m]
        assert len(steps) >= 20
        assert [m["policy_version"] for m in steps] == list(range(1, len(steps) + 1))
        stopped_at = steps[-1]["step"]
        # Samplers picked up new versions as they were published, the delayed one later than the other.
        fast.wait_for(r"version [1-9]\d* ready", timeout=30)
        lags = [int(k) for m in steps for k in m["staleness_hist"]]
        assert max(lags) >= 1
        last = steps[-1]
        assert last["groups_accepted_total"] >= 2 * len(steps)
        stale = last["groups_dropped_stale_total"] + last["rejections"].get("stale", 0)
        assert stale > 0, "the delayed sampler's old rollouts must be dropped or rejected as stale"
        assert set(last["rejections"]) <= {"stale", "future_version", "replay", "prompt_not_assigned"}

        # Resume on the same port and identity: same version numbering, samplers still attached and delivering.
        host = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]
        resumed = Proc(learner_args(run_dir, "--resume", "--max-steps", str(stopped_at + 5), *host),
                       tmp_path / "learner2.log")
        procs.append(resumed)
        resumed.wait_for(rf"resumed from .* at step {stopped_at}, policy version {stopped_at}", timeout=90)
        resumed.wait_for(r"done: step", timeout=240)
        assert resumed.popen.wait(30) == 0
        after = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m][len(steps):]
        assert [m["step"] for m in after] == list(range(stopped_at + 1, stopped_at + 6))
        assert [m["policy_version"] for m in after] == list(range(stopped_at + 1, stopped_at + 6))
        assert after[-1]["groups_accepted_total"] > 0
        for sampler in (fast, slow):
            assert sampler.popen.poll() is None, sampler.tail()
    finally:
        for p in procs:
            p.stop()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "gepo", "delta_l"])
def test_online_mode_runs_every_loss_type(tmp_path, loss):
    run_dir = tmp_path / loss
    out = subprocess.run(
        [sys.executable, "-m", "node.learner", "--online", "--loss", loss, "--run-dir", str(run_dir), "--max-steps",
         "3", "--group-size", "4", "--groups-per-step", "2", "--eval-every", "3", "--eval-size", "20",
         "--reward-workers", "1", "--no-tensorboard", "--torch-threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["staleness_max"] == 0 for m in metrics[1:])
    assert "eval_accuracy" in metrics[0] and "eval_accuracy" in metrics[-1]
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["policy_version"] == 3


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_flag():
    for module in ("node.learner", "node.sampler"):
        out = run_cli("-m", module, "--help")
        assert out.returncode == 0
        flags = re.findall(r"^\s+(--[a-z0-9-]+)(.*)$", out.stdout, re.MULTILINE)
        assert len(flags) > 20
        undocumented = [f for f, rest in flags if not rest.strip() and f != "--help"]
        # a flag whose help starts on the next line is documented there
        lines = out.stdout.splitlines()
        undocumented = [f for f in undocumented
                        if not any(l.strip().startswith(f) and i + 1 < len(lines) and lines[i + 1].startswith(" " * 10)
                                   for i, l in enumerate(lines))]
        assert not undocumented, f"{module}: flags without help: {undocumented}"


@pytest.mark.parametrize("args, message", [
    (["-m", "node.learner", "--model", "/nonexistent/model", "--online"], "--model /nonexistent/model: no such folder"),
    (["-m", "node.learner", "--dataset", "/nonexistent/data.jsonl", "--online"], "no such file"),
    (["-m", "node.sampler", "--peers", "not-a-multiaddr"], "multiaddr"),
])
def test_bad_input_gives_a_one_line_error(tmp_path, args, message):
    out = run_cli(*args, "--run-dir" if "node.learner" in args else "--state-dir", str(tmp_path / "x"), *LOOPBACK)
    assert out.returncode != 0
    assert message in out.stderr.lower(), out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def test_sampler_reports_an_unreachable_swarm(tmp_path):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmePnUA6qkWQqWEVyLoAETKNBXxdwQ7Ej1d5RErd1RVYFr"
    out = run_cli("-m", "node.sampler", "--peers", dead, "--state-dir", str(tmp_path / "s"), "--wait-learner", "3",
                  "--exit-on-unreachable", *LOOPBACK)
    assert out.returncode != 0
    assert "error:" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_learner_trains_from_the_swarm(tmp_path):
    """`torchrun --nproc_per_node 2 -m node.learner`: only rank 0 joins the swarm; both ranks train (gloo on CPU)."""
    run_dir = tmp_path / "ddp"
    procs: list[Proc] = []
    try:
        learner = Proc(["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "node.learner",
                        *learner_args(run_dir, "--max-steps", "3", "--checkpoint-every", "3")[2:]],
                       tmp_path / "ddp.log")
        procs.append(learner)
        join = join_args(learner)
        procs.append(Proc(sampler_args(tmp_path / "s", join), tmp_path / "s.log"))
        learner.wait_for(r"done: step 3", timeout=300)
        assert learner.popen.wait(60) == 0, learner.tail()
        assert learner.output.count("samplers join with") == 1  # one rank on the swarm
        steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
        assert [m["policy_version"] for m in steps] == [1, 2, 3]
        assert all(m["num_groups"] == 1 for m in steps)  # each rank trained on its half of the 2 groups
        assert (run_dir / "checkpoints" / "step-000003" / "model" / "model.safetensors").is_file()
    finally:
        for p in procs:
            p.stop()
