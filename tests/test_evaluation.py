"""Held-out evaluation on any dataset, reward plug-ins and trackers, through the programs users run.

The GSM8K data is read from <repo>/../shared/data (beside the project, as in CI). Real learner and sampler processes,
the real tiny policy, real math-verify and real worker processes for the plug-ins; wandb in offline mode (no network).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gepo.data import DataConfig, DataError, load_prompts
from gepo.evaluation import held_out_split
from node.local import LOOPBACK, REPO, Proc, join_args
from node.metrics import read_metrics
from node.run_info import QuestionSet

pytestmark = pytest.mark.timeout(600)

GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def gsm8k_slice(tmp_path_factory) -> Path:
    """The first 40 GSM8K training problems as a JSONL file."""
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"GSM8K data not found at {GSM8K_TRAIN} (see ../shared/data/README.md)")
    path = tmp_path_factory.mktemp("gsm8k") / "gsm8k_40.jsonl"
    with GSM8K_TRAIN.open() as f:
        path.write_text("".join(next(f) for _ in range(40)))
    return path


def learner(run_dir: Path, *extra: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "node.learner", "--online", "--run-dir", str(run_dir), "--group-size", "4",
            "--groups-per-step", "2", "--reward-workers", "1", "--no-tensorboard", "--torch-threads", "1", *extra]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def test_eval_fraction_is_a_deterministic_tail_excluded_from_training(gsm8k_slice):
    data = DataConfig(source=str(gsm8k_slice))
    train_cfg, train, held = held_out_split(data, load_prompts(data), eval_fraction=0.25, eval_size=200)
    assert (len(train), len(held)) == (30, 10)
    all_questions = [ex.question for ex in load_prompts(data)]
    assert [ex.question for ex in train] == all_questions[:30]
    assert [ex.question for ex in held] == all_questions[30:]
    assert held[0].answer == load_prompts(data)[30].answer and held[0].index == 0
    # samplers are told exactly the training prompts (run.json)
    told = QuestionSet.of(train_cfg, train)
    assert len(told) == 30 and [told[i] for i in range(30)] == all_questions[:30]
    # the same for the synthetic task, which travels as parameters rather than questions
    synthetic = DataConfig(size=1000)
    train_cfg, train, held = held_out_split(synthetic, load_prompts(synthetic), eval_fraction=0.1, eval_size=50)
    told = QuestionSet.from_json(QuestionSet.of(train_cfg, train).to_json())
    assert len(told) == len(train) == 900 and told.synthetic is not None
    assert told[899] == train[899].question and len(held) == 50 and held[0].question == load_prompts(synthetic)[900].question
    with pytest.raises(DataError, match="not both"):
        held_out_split(data, load_prompts(data), eval_dataset=str(gsm8k_slice), eval_fraction=0.1)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        held_out_split(data, load_prompts(data), eval_fraction=1.0)


PLUGINS = '''
import os, time

def brevity(prompts, completions, **kwargs):
    return [1.0 / (1 + len(c)) for c in completions]

def raises(prompts, completions, **kwargs):
    raise ValueError("this reward is broken")

def wrong_length(prompts, completions, **kwargs):
    return [0.0] * (len(completions) + 1)

def sleeps_once(prompts, completions, **kwargs):
    marker = os.path.join(os.path.dirname(__file__), "slept")
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(120)
    return [0.5] * len(completions)
'''


@pytest.mark.slow
def test_online_learner_with_plugins_and_eval_fraction_on_gsm8k(tmp_path, gsm8k_slice):
    plugins = tmp_path / "my_rewards.py"
    plugins.write_text(PLUGINS)
    run_dir = tmp_path / "run"
    out = learner(run_dir, "--dataset", str(gsm8k_slice), "--eval-fraction", "0.25", "--eval-every", "2",
                  "--eval-k", "2", "--max-steps", "2", "--max-new-tokens", "8", "--reward-timeout", "3",
                  "--log-completions-every", "1",
                  *[a for name in ("brevity=0.5", "raises", "wrong_length", "sleeps_once")
                    for a in ("--reward", f"{plugins}:{name}")])
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in (metrics[0], metrics[-1]):  # before training and at --eval-every
        assert m["eval_size"] == 10  # the held-out quarter of 40
        assert 0.0 <= m["eval_accuracy"] == m["eval_pass@1"] <= 1.0 and 0.0 <= m["eval_mean@2"] <= 1.0
        assert m["eval_rewards"]["brevity"] > 0 and m["eval_rewards"]["raises"] is None
    last = metrics[-1]
    failures = last["reward_failures"]
    # every scored batch (3 evaluations x 2 greedy/sampled passes, 2 steps x 2 groups) failed for the broken ones
    assert failures["raises"]["error"] >= 4 and failures["wrong_length"]["bad_output"] >= 4
    assert failures["sleeps_once"]["timeout"] == 1 and sum(failures["brevity"].values()) == 0
    assert last["rewards"]["sleeps_once"] == 0.5 and last["rewards"]["brevity"] > 0  # recovered after the timeout
    assert "this reward is broken" in out.stderr and "returned 5 values for 4 completions" in out.stderr
    table = read_metrics(run_dir / "completions.jsonl")
    assert {r["step"] for r in table} == {1, 2}
    assert {"prompt", "completion", "reward", "accuracy", "brevity", "raises"} <= set(table[0])
    questions = {ex.question for ex in load_prompts(DataConfig(source=str(gsm8k_slice)))}
    assert all(r["prompt"] in questions for r in table)


@pytest.mark.slow
def test_eval_dataset_gives_eval_metrics_for_a_synthetic_run(tmp_path, gsm8k_slice):
    run_dir = tmp_path / "run"
    learner(run_dir, "--eval-dataset", str(gsm8k_slice), "--eval-size", "12", "--eval-every", "1", "--max-steps",
            "1", "--max-new-tokens", "8")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["eval_size"] == 12 and "eval_accuracy" in m and "eval_reward" in m for m in metrics)
    assert "eval_mean@" not in " ".join(metrics[0])  # --eval-k 0: greedy only


def test_eval_checkpoint_reproduces_the_learners_own_evaluation(tmp_path):
    """scripts/eval_checkpoint.py: a run stopped between evaluations can be evaluated afterwards, and on a checkpoint
    where the learner evaluated itself it gives the same figures (greedy decoding, same prompts, same scorer)."""
    import json

    run_dir = tmp_path / "run"
    flags = ["--eval-size", "40", "--eval-every", "3", "--max-new-tokens", "8", "--checkpoint-every", "3"]
    learner(run_dir, "--max-steps", "3", *flags)
    own = [m for m in read_metrics(run_dir / "metrics.jsonl") if "eval_accuracy" in m][-1]
    assert own["step"] == 3
    out = subprocess.run([sys.executable, "-m", "scripts.eval_checkpoint", "--run-dir", str(run_dir), "--group-size",
                          "4", "--groups-per-step", "2", "--reward-workers", "1", "--torch-threads", "1", *flags,
                          "--out", str(tmp_path / "eval.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["step"] == 3 and got["checkpoint"].endswith("step-000003")
    assert (got["eval_accuracy"], got["eval_size"]) == (own["eval_accuracy"], own["eval_size"])
    nothing = subprocess.run([sys.executable, "-m", "scripts.eval_checkpoint", "--run-dir", str(tmp_path / "none")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "no checkpoint to evaluate" in nothing.stderr


@pytest.mark.slow
def test_report_to_wandb_offline_writes_a_run(tmp_path):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install -e '.[wandb]'")
    import os

    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
           "WANDB_CACHE_DIR": str(tmp_path / "cache")}
    learner(run_dir, "--report-to", "wandb", "--max-steps", "2", "--eval-every", "2", "--eval-size", "10",
            "--log-completions-every", "1", env=env)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb")), list(runs[0].iterdir())
    tables = list(runs[0].glob("files/media/table/completions_*.table.json"))
    assert len(tables) == 2  # the completions table at steps 1 and 2
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 3  # JSONL stays


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path):
    try:
        import mlflow  # noqa: F401
        pytest.skip("mlflow is installed here")
    except ImportError:
        pass
    out = subprocess.run([sys.executable, "-m", "node.learner", "--online", "--run-dir", str(tmp_path), "--report-to",
                          "mlflow", "--max-steps", "1", "--reward-workers", "1", "--no-tensorboard"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: --report-to mlflow: not installed" in out.stderr


@pytest.mark.slow
def test_swarm_run_with_eval_fraction_keeps_samplers_on_the_training_set(tmp_path):
    """Samplers learn the (shrunken) training set from run.json: no group is rejected as not assigned."""
    run_dir = tmp_path / "learner"
    procs = []
    try:
        lrn = Proc(["-m", "node.learner", "--run-dir", str(run_dir), "--run-id", "evalfrac",
                    "--group-size", "4", "--groups-per-step", "2", "--reward-workers", "1", "--no-tensorboard",
                    "--torch-threads", "1", "--data-size", "500", "--eval-fraction", "0.2", "--eval-size", "20",
                    "--eval-every", "3", "--max-steps", "3", *LOOPBACK], tmp_path / "learner.log")
        procs.append(lrn)
        sampler = Proc(["-m", "node.sampler", *join_args(lrn, timeout=300), "--state-dir", str(tmp_path / "s"),
                        "--batch-prompts", "2", "--torch-threads", "1", *LOOPBACK], tmp_path / "sampler.log")
        procs.append(sampler)
        lrn.wait_for(r"done: step 3", timeout=400)
        assert lrn.popen.wait(30) == 0, lrn.tail()
    finally:
        for p in procs:
            p.stop()
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 3 and steps[-1]["eval_size"] == 20 and "eval_accuracy" in metrics[0]
    assert steps[-1]["rejections"].get("prompt_not_assigned", 0) == 0
    assert steps[-1]["groups_accepted_total"] >= 6
