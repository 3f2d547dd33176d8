"""gepo.reward_funcs: reward plug-ins with TRL's signature, loaded by path or import path, run in bounded worker
processes. A plug-in that raises, hangs, returns the wrong length or kills its process is scored None for that group,
counted and logged in one line, and the next call works. Real worker processes, real math-verify; nothing mocked."""

from __future__ import annotations

import logging
import textwrap
import time

import pytest

from gepo.data import PromptExample, TablePromptSet
from gepo.reward_funcs import (BUILTIN_REWARDS, RewardLoadError, RewardRunner, RewardSpec, accuracy_reward,
                               format_reward, load_reward_function, resolve_reward_specs)
from gepo.rewards import RewardConfig

pytestmark = pytest.mark.timeout(300)

PLUGINS = textwrap.dedent('''
    import os, time

    def brevity(prompts, completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

    def echo_columns(prompts, completions, gold_answer, question, answer, source, completion_ids, **kwargs):
        # every column is one value per completion, as in TRL
        assert len(gold_answer) == len(question) == len(source) == len(completions)
        return [1.0 if (p == q and s == "unit" and a.endswith("#### " + g)) else 0.0
                for p, q, s, a, g in zip(prompts, question, source, answer, gold_answer)]

    def only_even(prompts, completions, **kwargs):
        return [None if i % 2 else 2.0 for i in range(len(completions))]

    def raises(prompts, completions, **kwargs):
        raise RuntimeError("boom")

    def sleeps(prompts, completions, **kwargs):
        time.sleep(120)
        return [0.0] * len(completions)

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def wrong_type(prompts, completions, **kwargs):
        return ["high"] * len(completions)

    def dies(prompts, completions, **kwargs):
        os._exit(3)
''')


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "my_rewards.py"
    path.write_text(PLUGINS)
    return path


def rows(n: int) -> list[PromptExample]:
    """n rows of one GSM8K-style prompt whose gold is 42, with its dataset columns."""
    prompts = TablePromptSet("unit", ["What is 6 * 7?"], ["42"],
                             {"question": ["What is 6 * 7?"], "answer": ["6 * 7 = 42\n#### 42"], "source": ["unit"]})
    return [prompts[0]] * n


def test_spec_parsing_and_the_shorthand_weights():
    assert RewardSpec.parse("pkg.mod:fn=0.5") == RewardSpec("pkg.mod:fn", 0.5)
    assert RewardSpec.parse("rewards/x.py:fn") == RewardSpec("rewards/x.py:fn", 1.0)
    assert RewardSpec.parse("accuracy=2").builtin == "accuracy"
    # no --reward: the two built-ins with --accuracy-weight / --format-weight
    assert resolve_reward_specs([], 1.0, 0.25) == [RewardSpec(BUILTIN_REWARDS["accuracy"], 1.0),
                                                   RewardSpec(BUILTIN_REWARDS["format"], 0.25)]
    # --reward accuracy=W overrides the shorthand; plug-ins follow in order; a recipe may give a mapping
    specs = resolve_reward_specs(["m:f=0.5", "accuracy=3", "gepo.reward_funcs:format_reward=0.1"], 1.0, 0.0)
    assert [(s.name, s.weight) for s in specs] == [("accuracy", 3.0), ("format", 0.1), ("f", 0.5)]
    assert [(s.name, s.weight) for s in resolve_reward_specs({"m:f": 2, "format": 1})] == [
        ("accuracy", 1.0), ("format", 1.0), ("f", 2.0)]
    for bad in ["", "nofunction", "m:f=heavy", "m:1x", "m:f=inf"]:
        with pytest.raises(RewardLoadError):
            resolve_reward_specs([bad])
    with pytest.raises(RewardLoadError, match="twice"):
        resolve_reward_specs(["m:f", "m:f=2"])


def test_builtins_have_trls_signature():
    completions = ["<think>6*7</think><answer>42</answer>", "41", [{"role": "assistant", "content": "42"}]]
    assert accuracy_reward(prompts=["q"] * 3, completions=completions, gold_answer=["42"] * 3) == [1.0, 0.0, 1.0]
    assert format_reward(prompts=["q"] * 3, completions=completions) == [1.0, 0.0, 0.0]


def test_load_by_path_and_by_import_path(plugin_file):
    assert load_reward_function(f"{plugin_file}:brevity")(prompts=["q"], completions=["abc"]) == [0.25]
    assert load_reward_function("gepo.reward_funcs:format_reward") is format_reward
    with pytest.raises(RewardLoadError, match="not found"):
        load_reward_function(f"{plugin_file.parent / 'missing.py'}:f")
    with pytest.raises(RewardLoadError, match="no function 'nope'"):
        load_reward_function(f"{plugin_file}:nope")
    with pytest.raises(RewardLoadError, match="cannot import"):
        load_reward_function("no_such_package_xyz.rewards:f")


def test_plugins_score_with_nansum_aggregation(plugin_file):
    specs = resolve_reward_specs([f"{plugin_file}:brevity=0.5", f"{plugin_file}:echo_columns",
                                  f"{plugin_file}:only_even=0.25"], accuracy_weight=1.0, format_weight=0.0)
    with RewardRunner(specs, RewardConfig(num_workers=1), timeout_s=30) as runner:
        runner.warm_up()
        completions = ["42", "7", "The answer is 42", "x"]
        scored = runner.score(rows(4), completions, completion_ids=[[1], [2], [3], [4]])
        assert scored.failures == {}
        assert scored.accuracy == [1.0, 0.0, 1.0, 0.0]
        assert scored.per_function["echo_columns"] == [1.0] * 4  # every dataset column reached the plug-in
        assert scored.per_function["only_even"] == [2.0, None, 2.0, None]
        for i, c in enumerate(completions):  # TRL: weighted sum over the values that are not None
            expected = scored.accuracy[i] + 0.5 / (1 + len(c)) + 1.0 + (0.25 * 2.0 if i % 2 == 0 else 0.0)
            assert scored.totals[i] == pytest.approx(expected)
        metrics = runner.step_metrics()
        assert metrics["rewards"]["only_even"] == 2.0 and metrics["rewards"]["accuracy"] == 0.5
        assert metrics["reward_errors_total"] == 0
        assert runner.step_metrics()["rewards"]["brevity"] is None  # reset after each step


def test_failing_plugins_are_contained_counted_and_the_next_call_works(plugin_file, caplog):
    bad = ["raises", "sleeps", "wrong_length", "wrong_type", "dies"]
    specs = resolve_reward_specs([f"{plugin_file}:brevity"] + [f"{plugin_file}:{name}" for name in bad])
    timeout_s = 2.0
    with RewardRunner(specs, RewardConfig(num_workers=1), timeout_s=timeout_s, plugin_workers=2) as runner:
        runner.warm_up()
        for attempt in range(2):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="gepo.reward_funcs"):
                t0 = time.monotonic()
                scored = runner.score(rows(3), ["42", "1", "42"])
                elapsed = time.monotonic() - t0
            # the hanging plug-in was cut off at its deadline, not waited for (120 s); generous for a busy machine
            assert elapsed < 60, elapsed
            assert scored.accuracy == [1.0, 0.0, 1.0]
            assert scored.per_function["brevity"] == pytest.approx([1 / 3, 1 / 2, 1 / 3])  # the healthy one scores
            assert scored.totals == pytest.approx([4 / 3, 1 / 2, 4 / 3])  # failed ones count as None (0 in the sum)
            for name in bad:
                assert scored.per_function[name] == [None] * 3
            assert "boom" in scored.failures["raises"]
            assert "ran past 2 s" in scored.failures["sleeps"]
            assert "returned 1 values for 3 completions" in scored.failures["wrong_length"]
            assert "value 0 is str" in scored.failures["wrong_type"]
            assert "worker died (exit code 3)" in scored.failures["dies"]
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == len(bad) and all("\n" not in line for line in lines)
        failures = runner.step_metrics()["reward_failures"]
        assert failures["raises"]["error"] == 2 and failures["sleeps"]["timeout"] == 2
        assert failures["wrong_length"]["bad_output"] == 2 and failures["wrong_type"]["bad_output"] == 2
        assert failures["dies"]["crash"] == 2 and sum(failures["brevity"].values()) == 0


def test_a_module_that_cannot_be_imported_fails_at_start_up(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\n")
    with RewardRunner(resolve_reward_specs([f"{broken}:f"]), RewardConfig(num_workers=1)) as runner:
        with pytest.raises(RewardLoadError, match="cannot import reward module .*no_such_module_xyz"):
            runner.warm_up()
    assert issubclass(RewardLoadError, ValueError)  # the learner's main turns it into "error: ..." and exit code 2


def test_reward_flag_is_repeatable_and_a_recipe_key(tmp_path):
    from node.cli import dataclass_from_args, parse_with_recipe
    from node.learner import LearnerConfig, build_parser

    def parse(*argv):
        return dataclass_from_args(LearnerConfig, parse_with_recipe(build_parser(), list(argv)))

    assert parse().reward == []
    assert parse("--reward", "a.py:f=0.5", "--reward", "accuracy=2").reward == ["a.py:f=0.5", "accuracy=2"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward:\n  - rewards/brevity.py:brevity=0.5\n  - format=0.2\nreward_timeout: 3\n")
    cfg = parse("--config", str(recipe))
    assert cfg.reward == ["rewards/brevity.py:brevity=0.5", "format=0.2"] and cfg.reward_timeout == 3
    assert [s.weight for s in resolve_reward_specs(cfg.reward, 1.0, 0.0)] == [1.0, 0.2, 0.5]
    assert parse("--config", str(recipe), "--reward", "x:y").reward == ["x:y"]  # the command line wins
    assert parse("--report-to", "wandb", "tensorboard").report_to == ["wandb", "tensorboard"]
