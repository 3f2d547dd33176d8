"""The staleness simulator's machinery (gepo/staleness.py, scripts/staleness_sweep.py).

Checks that lags are realised as configured, that every group is tagged with (and really sampled from) the version
current - lag, that metrics are produced, that a run is deterministic under its seed, and that a small sweep writes
its results, resumes, and reports. Nothing here asserts which loss type learns better.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gepo.staleness import (
    PolicyHistory,
    StalenessConfig,
    draw_lag_schedule,
    lag_histogram,
    realised_lags,
    run_staleness,
)
from gepo.tiny_policy import load_tiny_policy, tiny_policy_path
from gepo.train_step import ScoredGroup, _collate, completion_logits
from gepo.logprobs import token_logprobs

needs_policy = pytest.mark.skipif(
    not (tiny_policy_path() / "config.json").exists(), reason="the shipped tiny policy (gepo/assets/tiny-policy) is missing"
)

# small but real: the shipped tiny policy, a few steps, a small eval set
SMALL = dict(steps=6, groups_per_step=4, group_size=4, eval_every=3, eval_size=40, lr=1e-3)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ lag schedules


def test_fixed_lag_is_exact_and_truncated_only_at_the_start():
    cfg = StalenessConfig(max_lag=5, delay_kind="fixed", steps=20, groups_per_step=3)
    drawn = draw_lag_schedule(cfg)
    assert (drawn == 5).all()
    lags = realised_lags(drawn)
    for t in range(20):
        assert (lags[t] == min(5, t)).all()


def test_one_lag_per_sampler_batch():
    drawn = draw_lag_schedule(StalenessConfig(max_lag=32, steps=50, groups_per_step=7, groups_per_batch=3))
    assert drawn.shape == (50, 7)
    assert (drawn[:, 0] == drawn[:, 2]).all() and (drawn[:, 3] == drawn[:, 5]).all()
    assert not (drawn[:, 0] == drawn[:, 3]).all()
    per_group = draw_lag_schedule(StalenessConfig(max_lag=32, steps=50, groups_per_step=4, groups_per_batch=1))
    assert not (per_group[:, 0] == per_group[:, 1]).all()


def test_fixed_lag_below_the_maximum():
    cfg = StalenessConfig(max_lag=8, delay_kind="fixed", delay_lower=3, steps=10, groups_per_step=2)
    assert (draw_lag_schedule(cfg) == 3).all()


@pytest.mark.parametrize("kind", ["none", "fixed", "lognormal", "weibull"])
def test_zero_max_lag_is_online(kind):
    cfg = StalenessConfig(max_lag=0, delay_kind=kind, steps=30, groups_per_step=4)
    assert (draw_lag_schedule(cfg) == 0).all()


@pytest.mark.parametrize("kind", ["lognormal", "weibull"])
@pytest.mark.parametrize("max_lag", [8, 64])
def test_delay_model_lags_stay_within_the_maximum(kind, max_lag):
    cfg = StalenessConfig(max_lag=max_lag, delay_kind=kind, steps=500, groups_per_step=8)
    drawn = draw_lag_schedule(cfg)
    assert drawn.min() >= 0 and drawn.max() <= max_lag
    assert drawn.max() >= max_lag * 0.75  # the upper part of the window is reached
    assert len(np.unique(drawn)) > 3  # a spread, not a constant


def test_default_lognormal_mean_lag_is_close_to_the_papers():
    # the paper's latency table: avg lag 3.0 / 6.3 / 13.2 / 26.5 for maximum latency 8 / 16 / 32 / 64
    for max_lag, paper in ((8, 3.0), (16, 6.3), (32, 13.2), (64, 26.5)):
        drawn = draw_lag_schedule(StalenessConfig(max_lag=max_lag, steps=2000, groups_per_step=8))
        assert abs(drawn.mean() - paper) < 0.12 * paper + 0.3, (max_lag, drawn.mean(), paper)


def test_lag_schedule_is_a_function_of_the_seed():
    a = draw_lag_schedule(StalenessConfig(max_lag=16, steps=50, seed=1))
    b = draw_lag_schedule(StalenessConfig(max_lag=16, steps=50, seed=1))
    c = draw_lag_schedule(StalenessConfig(max_lag=16, steps=50, seed=2))
    assert (a == b).all() and not (a == c).all()


def test_lag_histogram():
    assert lag_histogram([0, 1, 1, 3], 3) == [1, 2, 0, 1]


# ------------------------------------------------------------------------------------------------ version history


def test_history_keeps_only_the_versions_still_needed():
    model = torch.nn.Linear(2, 2)
    versions = np.array([[0, 0], [1, 0], [1, 0], [1, 2], [4, 2]])  # step t samples these versions
    history = PolicyHistory.from_schedule(versions)
    for v in range(5):  # as the simulator does: drop what no step >= v uses, then record version v
        history.release(v)
        history.record(v, model)
    # 0 was last used at step 2, 1 at step 3, 2 at step 4; 3 is never sampled; 4 only at step 4, from the live model
    assert history.versions == [2]
    assert history.peak == 3
    with pytest.raises(KeyError):
        history.get(0)


def test_history_window_mode():
    model = torch.nn.Linear(2, 2)
    history = PolicyHistory(window=3)
    for v in range(6):
        history.record(v, model)
    assert history.versions == [3, 4, 5]


def test_history_rounds_to_the_published_dtype_and_spills_to_disk(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied, as SmolLM2's embedding and output layer
    versions = np.array([[0], [0], [1]])
    history = PolicyHistory.from_schedule(versions, dtype=torch.bfloat16, spill_dir=tmp_path / "spill")
    history.record(0, model)
    files = list((tmp_path / "spill").iterdir())
    assert len(files) == 1  # on disk, not in memory
    snap = history.get(0)
    assert snap["0.weight"].dtype == torch.bfloat16
    assert torch.equal(snap["0.weight"], model[0].weight.detach().to(torch.bfloat16))
    assert snap["0.weight"].data_ptr() == snap["1.weight"].data_ptr()  # still one tensor
    copy_ = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    copy_.load_state_dict(snap)  # a float32 sampler model loads the rounded version
    assert torch.equal(copy_[0].weight, model[0].weight.detach().to(torch.bfloat16).float())
    history.release(2)  # version 0 is last used at step 1
    assert history.versions == [] and not list((tmp_path / "spill").iterdir())
    history.record(1, model)
    history.close()
    assert not list((tmp_path / "spill").iterdir())


def test_new_fields_keep_earlier_fingerprints():
    """Result files of earlier sweeps are named by fingerprints made before these fields existed."""
    cfg = StalenessConfig(loss_type="gepo", max_lag=64)
    legacy = {k: v for k, v in cfg.to_dict().items()
              if k not in ("phrasing", "system_prompt", "publish_dtype", "compute_dtype", "eval_scoring",
                           "eval_batch_size")}  # fmt: skip
    import hashlib

    assert cfg.fingerprint() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:10]
    assert StalenessConfig(loss_type="gepo", max_lag=64, publish_dtype="bfloat16").fingerprint() != cfg.fingerprint()


def test_config_validation():
    with pytest.raises(ValueError):
        StalenessConfig(loss_type="ppo")
    with pytest.raises(ValueError):
        StalenessConfig(delay_kind="uniform")
    with pytest.raises(ValueError):
        StalenessConfig(max_lag=-1)
    with pytest.raises(ValueError):
        StalenessConfig(loss_overrides={"max_completion_length": 99})
    for bad in ({"publish_dtype": "int8"}, {"eval_scoring": "exact"}, {"phrasing": "poem"}, {"eval_batch_size": -1}):
        with pytest.raises(ValueError):
            StalenessConfig(**bad)
    cfg = StalenessConfig(loss_type="gspo", max_new_tokens=7, temperature=0.7, loss_overrides={"sampler_kl_coef": 0.005})
    loss = cfg.loss_config()
    assert (loss.loss_type, loss.max_completion_length, loss.temperature, loss.sampler_kl_coef) == ("gspo", 7, 0.7, 0.005)
    assert StalenessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------------------------------------ simulated runs


def _recomputed_logprobs(model, group: ScoredGroup, pad_id: int) -> list[list[float]]:
    from gepo.train_step import _Row

    rows = [_Row(group.prompt_ids, c, lp, 0.0, 0) for c, lp in zip(group.completion_ids, group.sampler_logprobs)]
    batch = _collate(rows, pad_id, torch.device("cpu"))
    with torch.no_grad():
        logp = token_logprobs(completion_logits(model, batch), batch["completion_ids"], 1.0)
    return [logp[i, : len(c)].tolist() for i, c in enumerate(group.completion_ids)]


@needs_policy
def test_groups_are_sampled_from_the_version_they_are_tagged_with():
    import copy

    cfg = StalenessConfig(loss_type="grpo", max_lag=3, delay_kind="fixed", **SMALL)
    model, tok = load_tiny_policy()
    probe = copy.deepcopy(model)
    seen: list[tuple[int, list[int]]] = []

    def check(t, groups, history):
        seen.append((t, [g.policy_version for g in groups]))
        for g in groups:
            assert g.policy_version == t - min(3, t)
            probe.load_state_dict(history.get(g.policy_version))
            again = _recomputed_logprobs(probe, g, tok.pad_token_id)
            for a, b in zip(again, g.sampler_logprobs):
                assert np.allclose(a, b, atol=1e-4)
        if t >= 4:  # by now the learner has moved: its own log-probs differ from the sampler's
            current = _recomputed_logprobs(model, groups[0], tok.pad_token_id)
            assert max(abs(x - y) for a, b in zip(current, groups[0].sampler_logprobs) for x, y in zip(a, b)) > 1e-5

    result = run_staleness(cfg, model=model, tokenizer=tok, on_step=check)
    assert [t for t, _ in seen] == list(range(cfg.steps))
    for s in result["steps"]:
        assert s["versions"] == [s["step"] - lag for lag in s["lags"]]
        assert s["staleness_max"] == min(3, s["step"])  # train_step's own view of the tags agrees


@needs_policy
def test_bf16_published_versions_are_what_every_group_is_sampled_from():
    """With publish_dtype bfloat16 every group, lag 0 included, comes from the master weights rounded to bf16 (what a
    sampler receives), while the learner keeps and trains its float32 master."""
    import copy

    cfg = StalenessConfig(loss_type="gepo", max_lag=2, delay_kind="fixed", publish_dtype="bfloat16",
                          eval_scoring="reward", eval_batch_size=16, **SMALL)  # fmt: skip
    model, tok = load_tiny_policy()
    probe = copy.deepcopy(model)
    checked = []

    def check(t, groups, history):
        for g in groups:
            if g.policy_version == t:
                rounded = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
            else:
                rounded = history.get(g.policy_version)
                assert all(v.dtype == torch.bfloat16 for v in rounded.values() if v.is_floating_point())
            probe.load_state_dict(rounded)
            again = _recomputed_logprobs(probe, g, tok.pad_token_id)
            for a, b in zip(again, g.sampler_logprobs):
                assert np.allclose(a, b, atol=1e-4)
            checked.append(g.policy_version == t)

    result = run_staleness(cfg, model=model, tokenizer=tok, on_step=check)
    assert any(checked) and not all(checked)  # both the current version and stale ones were checked
    assert next(model.parameters()).dtype == torch.float32
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in result["evals"])  # judged by the reward's accuracy


def _strip_timing(result: dict) -> dict:
    drop = {"step_time_s", "sample_s", "elapsed_s", "wall_s"}

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(result)


@needs_policy
def test_run_produces_metrics_and_is_deterministic_under_its_seed():
    cfg = StalenessConfig(loss_type="gepo", max_lag=4, **SMALL)
    a = run_staleness(cfg)
    b = run_staleness(cfg)
    assert _strip_timing(a) == _strip_timing(b)
    c = run_staleness(StalenessConfig(loss_type="gepo", max_lag=4, **{**SMALL, "seed": 1}))
    assert _strip_timing(c)["steps"] != _strip_timing(a)["steps"]

    assert len(a["steps"]) == cfg.steps
    assert [e["step"] for e in a["evals"]] == [0, 3, 6]
    for s in a["steps"]:
        for key in ("iw_var", "grad_norm", "reward_mean", "loss", "lags", "versions"):
            assert key in s
        assert max(s["lags"]) <= 4
    summary = a["summary"]
    for key in ("best_accuracy", "last_accuracy", "best_last_gap", "lag_mean", "lag_max", "iw_var_mean",
                "grad_norm_p95", "collapsed", "lag_hist", "drawn_lag_hist"):  # fmt: skip
        assert key in summary
    assert 0 <= summary["last_accuracy"] <= summary["best_accuracy"] <= 1
    assert summary["lag_max"] <= 4 and sum(summary["lag_hist"]) == cfg.steps * cfg.groups_per_step
    assert summary["versions_kept_peak"] <= 4


@needs_policy
def test_online_run_samples_from_the_current_policy():
    cfg = StalenessConfig(loss_type="grpo", max_lag=0, **SMALL)
    result = run_staleness(cfg)
    for s in result["steps"]:
        assert set(s["lags"]) == {0} and set(s["versions"]) == {s["step"]}
        # on-policy: the token weights are 1 up to float noise (the learner recomputes what the sampler computed)
        assert abs(s["iw_mean"] - 1) < 1e-3 and s["iw_var"] < 1e-5
    assert result["summary"]["versions_kept_peak"] == 0  # nothing to keep: every group comes from the live model


# ------------------------------------------------------------------------------------------------ the sweep


@needs_policy
def test_small_sweep_writes_results_resumes_and_reports(tmp_path, capsys):
    from scripts import staleness_sweep

    argv = ["--losses", "grpo", "gepo", "--latencies", "0", "3", "--seeds", "0", "--steps", "4",
            "--groups-per-step", "4", "--group-size", "4", "--eval-every", "2", "--eval-size", "30",
            "--delay-kind", "fixed", "--steps-per-latency", "0", "--jobs", "2", "--threads", "1", "--quiet",
            "--results-dir", str(tmp_path / "results"), "--docs", str(tmp_path / "STALENESS.md"),
            "--plot", str(tmp_path / "staleness.png")]  # fmt: skip
    assert staleness_sweep.main(argv) == 0
    files = sorted((tmp_path / "results").glob("*.json"))
    assert len(files) == 4
    for f in files:
        result = json.loads(f.read_text())
        max_lag = result["config"]["max_lag"]
        for s in result["steps"]:
            assert s["lags"] == [min(max_lag, s["step"])] * 4  # fixed lag, realised exactly
            assert s["versions"] == [s["step"] - lag for lag in s["lags"]]
        assert result["summary"]["lag_max"] == min(max_lag, 3)
    doc = (tmp_path / "STALENESS.md").read_text()
    assert "| GRPO |" in doc and "| GEPO |" in doc and "Realised lags" in doc and "scripts.staleness_sweep" in doc
    assert (tmp_path / "staleness.png").stat().st_size > 10_000
    mtimes = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()

    # resume: nothing left to run, nothing rewritten; hand-written text around the generated block is kept
    (tmp_path / "STALENESS.md").write_text("intro\n" + doc + "\nmy notes\n")
    assert staleness_sweep.main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    doc2 = (tmp_path / "STALENESS.md").read_text()
    assert doc2.startswith("intro\n") and doc2.rstrip().endswith("my notes")


@needs_policy
def test_sweep_produces_its_metrics_for_a_new_objective(tmp_path, capsys):
    # The regression check for the newer objectives' path through the sweep (not which method wins): an M2PO grid
    # whose longer latency runs longer (--steps-per-latency), written into its own section of an existing page.
    from scripts import staleness_sweep

    page = tmp_path / "STALENESS.md"
    page.write_text("# page\n\nhand-written\n")
    argv = ["--grid", "m2po:0,4", "--grid", "cispo:4", "--seeds", "0", "--steps", "3", "--steps-per-latency", "1.5",
            "--groups-per-step", "4", "--group-size", "4", "--eval-every", "3", "--eval-size", "20",
            "--delay-kind", "fixed", "--jobs", "1", "--threads", "1", "--quiet", "--section", "newer",
            "--results-dir", str(tmp_path / "results"), "--docs", str(page),
            "--plot", str(tmp_path / "newer.png")]  # fmt: skip
    assert staleness_sweep.main(argv) == 0
    results = {json.loads(f.read_text())["config"]["loss_type"] + str(json.loads(f.read_text())["config"]["max_lag"]):
               json.loads(f.read_text()) for f in (tmp_path / "results").glob("*.json")}  # fmt: skip
    assert sorted(results) == ["cispo4", "m2po0", "m2po4"]
    assert len(results["m2po0"]["steps"]) == 3 and len(results["m2po4"]["steps"]) == 6  # max(3, 1.5 x 4)
    for name, r in results.items():
        for s in r["steps"]:
            for key in ("loss", "iw_var", "clip_frac_low", "clip_frac_high", "mask_frac", "log_ratio_m2", "grad_norm"):
                assert np.isfinite(s[key]), (name, key)
        summary = r["summary"]
        for key in ("best_accuracy", "last_accuracy", "iw_var_mean", "grad_norm_p95", "clip_frac_mean",
                    "mask_frac_mean", "lag_mean"):  # fmt: skip
            assert np.isfinite(summary[key]), (name, key)
    assert results["m2po4"]["summary"]["lag_max"] == 4 and results["m2po4"]["steps"][-1]["iw_var"] > 0
    doc = page.read_text()
    assert doc.startswith("# page\n\nhand-written\n")
    begin, end = staleness_sweep.section_markers("newer")
    assert begin in doc and end in doc and staleness_sweep.BEGIN not in doc
    block = doc.split(begin, 1)[1]
    assert "| M2PO | 0 |" in block and "| M2PO | 4 |" in block and "| CISPO | 4 |" in block
    assert "| CISPO | · |" in block  # not in the grid at latency 0
    assert "![staleness sweep](newer.png)" in block and (tmp_path / "newer.png").stat().st_size > 10_000
