"""TRL / open-r1 names in recipes and on the command line (node/trl_names.py), parsed by the real learner and
sampler parsers, in-process (no model loads)."""

from __future__ import annotations

import dataclasses

import pytest

from gepo.config import LossConfig
from gepo.data import DataConfig
from node.cli import dataclass_from_args, parse_with_recipe
from node.errors import ConfigError
from node.trl_names import translate
from tests.paths import REPO_ROOT


def learner_args(*argv: str):
    from node.learner import build_parser

    return parse_with_recipe(build_parser(), list(argv))


def configs(args) -> dict:
    from node.learner import LearnerConfig

    return {cls.__name__: dataclasses.asdict(dataclass_from_args(cls, args, prefix=prefix))
            for cls, prefix in ((LearnerConfig, ""), (LossConfig, ""), (DataConfig, "data_"))}


def test_open_r1_recipe_is_the_papers_setup(monkeypatch, capsys):
    """The open-r1-style recipe and the project's own recipe of the same run give the same configuration."""
    monkeypatch.setenv("WORLD_SIZE", "4")  # as under `accelerate launch` on 4 GPUs
    trl = configs(learner_args("--config", str(REPO_ROOT / "recipes/open-r1-gepo-qwen3-1.7b.yaml")))
    warning = capsys.readouterr().err
    ours = configs(learner_args("--config", str(REPO_ROOT / "recipes/qwen3-1.7b-4gpu.yaml")))
    assert trl["LearnerConfig"].pop("run_dir") == "runs/qwen3-1.7b-gepo"
    ours["LearnerConfig"].pop("run_dir")
    # scale_rewards: false says "none" outright; the project recipe's "auto" is "none" for gepo
    assert trl["LossConfig"].pop("advantage_std") == "none"
    assert LossConfig(**ours["LossConfig"]).resolved_advantage_std() == "none"
    ours["LossConfig"].pop("advantage_std")
    assert trl == ours
    assert trl["LearnerConfig"]["groups_per_step"] == 32 and trl["LearnerConfig"]["lr"] == 1e-6
    assert "ignoring" in warning and "use_vllm" in warning 


def test_trl_names_on_the_command_line():
    args = learner_args("--learning_rate", "3e-5", "--num-generations", "4", "--epsilon=0.28", "--scale_rewards",
                        "false", "--report_to", "none", "--max_completion_length", "32", "--output_dir", "runs/x",
                        "--save_steps", "7", "--per_device_train_batch_size", "16", "--reward_funcs", "accuracy",
                        "format", "--reward_weights", "1.0", "0.25")
    c = configs(args)
    learner, loss = c["LearnerConfig"], c["LossConfig"]
    assert learner["lr"] == 3e-5 and learner["group_size"] == 4 and learner["max_new_tokens"] == 32
    assert learner["run_dir"] == "runs/x" and learner["checkpoint_every"] == 7
    assert learner["report_to"] == ["none"]  # our own option, in TRL's spelling
    assert learner["micro_batch_rows"] == 16 and learner["groups_per_step"] == 16 // 4  # TRL: 16 rows, G = 4
    assert learner["accuracy_weight"] == 1.0 and learner["format_weight"] == 0.25
    assert loss["epsilon_low"] == 0.28 and loss["epsilon_high"] == 0.28  # TRL: epsilon_high defaults to epsilon
    assert loss["advantage_std"] == "none"


def test_project_names_win_and_same_names_pass_through():
    args = learner_args("--epsilon", "0.2", "--epsilon-high", "0.28", "--beta", "0.01", "--groups-per-step", "3",
                        "--per_device_train_batch_size", "8")
    loss = configs(args)["LossConfig"]
    assert loss["epsilon_low"] == 0.2 and loss["epsilon_high"] == 0.28 and loss["beta"] == 0.01
    assert configs(args)["LearnerConfig"]["groups_per_step"] == 3  # given explicitly: not derived


@pytest.mark.parametrize("options,expect", [
    ({"lr": 1e-4, "learning_rate": 1e-5}, "not both"),
    ({"num_iterations": 2}, "num_iterations"),
    ({"lr_scheduler_type": "cosine_with_restarts"}, "lr_scheduler_type"),
    ({"importance_sampling_level": "sequence"}, "--loss gspo"),
    ({"scale_rewards": "mean"}, "scale_rewards"),
    ({"reward_funcs": ["accuracy", "code"]}, "code"),
    ({"per_device_train_batch_size": 6, "num_generations": 4}, "not a multiple of num_generations"),
])
def test_what_does_not_translate_is_a_usage_error(options, expect):
    from node.learner import build_parser
    from node.cli import _option_names

    known = set(_option_names(build_parser()))
    with pytest.raises(ConfigError, match=expect):
        out = translate(options, "recipe", known=known)
        if "group_size" in out:  # a real parse rejects the derived group count too
            raise AssertionError(out)


def test_trl_name_on_the_command_line_exits_2_when_it_cannot_translate(capsys):
    with pytest.raises(SystemExit) as info:
        learner_args("--num_iterations", "4")
    assert info.value.code == 2
    assert "num_iterations" in capsys.readouterr().err


def test_sampler_takes_trl_vllm_memory_name():
    from node.sampler import SamplerConfig, build_parser

    args = parse_with_recipe(build_parser(), ["--peers", "/ip4/1.2.3.4/tcp/1/p2p/QmX",
                                              "--vllm_gpu_memory_utilization", "0.3"])
    assert dataclass_from_args(SamplerConfig, args).gpu_memory_utilization == 0.3


def test_recipe_string_for_a_list_option_is_one_item(tmp_path):
    from node.config import SwarmConfig
    from node.sampler import build_parser

    recipe = tmp_path / "r.yaml"
    recipe.write_text("peers: /ip4/1.2.3.4/tcp/1/p2p/QmX\nmax_outbox_bytes: 1GB\n")
    cfg = SwarmConfig.from_args(parse_with_recipe(build_parser(), ["--config", str(recipe)]))
    assert cfg.peers == ["/ip4/1.2.3.4/tcp/1/p2p/QmX"] and cfg.max_outbox_bytes == 10**9


def test_trl_reward_funcs_become_plugins():
    """TRL's reward_funcs may name our built-ins or module:function plug-ins; each plug-in keeps its weight."""
    args = learner_args("--reward_funcs", "accuracy", "rewards/brevity.py:brevity", "--reward_weights", "1.0", "0.5")
    learner = configs(args)["LearnerConfig"]
    assert learner["accuracy_weight"] == 1.0 and learner["format_weight"] == 0.0
    assert learner["reward"] == ["rewards/brevity.py:brevity=0.5"]
