"""TRL / open-r1 option names (GRPOConfig, TrainingArguments, open-r1's ScriptArguments and ModelConfig) accepted in
recipes and on the command line, translated to this project's options before parsing.

Only names with the same meaning here are translated; the others either have no effect on the result (logging,
the hub, how checkpoints are kept: accepted with a warning) or would silently change the experiment (several
iterations per batch, learning-rate schedules, ...), which is a usage error that says what to use instead.
README.md ("TRL / open-r1 names") has the table; `TABLE` below is its source.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from node.errors import ConfigError


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _choice(mapping: dict[Any, str]) -> Callable[[Any, str], str]:
    def convert(value: Any, key: str) -> str:
        probe = value if isinstance(value, bool) else str(value).strip().lower()
        if probe in ("true", "false") and not isinstance(value, bool):
            probe = probe == "true"
        if probe not in mapping:
            raise ConfigError(f"{key}: {value!r} has no equivalent here; supported: "
                              f"{', '.join(str(k) for k in mapping)}")
        return mapping[probe]

    return convert


def _only(allowed: Any, why: str) -> Callable[[Any, str], None]:
    def same(value: Any) -> bool:
        if isinstance(allowed, (int, float)):
            try:
                return float(value) == float(allowed)
            except (TypeError, ValueError):
                return False
        return str(value).strip().lower() == str(allowed).lower()

    def check(value: Any, key: str) -> None:
        if not same(value):
            raise ConfigError(f"{key}: {value!r} has no equivalent here ({why}); remove it or set it to {allowed}")

    return check


# TRL / open-r1 name -> (this project's option, conversion or None for the same value, what differs)
TABLE: dict[str, tuple[str | None, Callable[[Any, str], Any] | None, str]] = {
    "num_generations": ("group_size", None, "G, completions per prompt"),
    "learning_rate": ("lr", None, ""),
    "max_completion_length": ("max_new_tokens", None, "also the loss's M (Dr.GRPO, ∆L)"),
    "output_dir": ("run_dir", None, ""),
    "save_steps": ("checkpoint_every", None, ""),
    "eval_steps": ("eval_every", None, "held-out greedy accuracy every N steps"),
    "epsilon": ("epsilon_low", None, "and epsilon_high too unless it is given, as in TRL"),
    "scale_rewards": ("advantage_std", _choice({True: "group", "group": "group", "batch": "batch", False: "none",
                                                "none": "none"}), "true/false or group/batch/none"),
    "optim": ("optimizer", _choice({"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
                                    "sgd": "sgd"}), "adamw_torch -> adamw"),
    "per_device_train_batch_size": ("micro_batch_rows", None,
                                    "completions per forward/backward; with gradient_accumulation_steps and "
                                    "num_generations it also sets --groups-per-step (below)"),
    "gradient_accumulation_steps": (None, None, "sets --groups-per-step = per_device_train_batch_size x "
                                                "gradient_accumulation_steps x processes / num_generations"),
    "model_name_or_path": ("model", None, ""),
    "torch_dtype": ("dtype", None, ""),
    "dtype": ("dtype", None, ""),
    "dataset_name": ("dataset", None, "a hub dataset name or a local file"),
    "dataset_config": ("data_subset", None, ""),
    "dataset_train_split": ("data_split", None, ""),
    "dataset_prompt_column": ("data_question_field", None, ""),
    "vllm_gpu_memory_utilization": ("gpu_memory_utilization", None, "sampler, with --backend vllm"),
    "reward_funcs": (None, None, "accuracy and/or format, with reward_weights: --accuracy-weight, --format-weight"),
    "reward_weights": (None, None, "see reward_funcs"),
    "num_iterations": (None, _only(1, "each batch is trained on once: one optimizer step per step"), "1 only"),
    "importance_sampling_level": (None, _only("token", "use --loss gspo or --loss gepo for sequence- or "
                                                       "group-level weights"), "token only"),
    "lr_scheduler_type": ("lr_scheduler", _choice({"constant": "constant", "constant_with_warmup": "constant",
                                                    "linear": "linear", "cosine": "cosine"}),
                          "constant (with warm-up), linear or cosine"),
    "warmup_ratio": (None, _only(0, "no warm-up"), "0 only"),
    "num_train_epochs": (None, _only(1, "training runs for --max-steps steps"), "use max_steps"),
}
# Same name and meaning here already: beta, epsilon_high, delta, loss_type (grpo, bnpo, dr_grpo, dapo), max_steps,
# seed, temperature, top_p, top_k, weight_decay, max_grad_norm, system_prompt.

# No effect on what is trained here: accepted, with a warning that they are ignored.
IGNORED = {
    "logging_steps": "metrics are written every step",
    "logging_strategy": "metrics are written every step",
    "logging_first_step": "metrics are written every step",
    "log_completions": "",
    "log_level": "use --log-level",
    "save_strategy": "checkpoints follow --checkpoint-every",
    "save_total_limit": "",
    "overwrite_output_dir": "",
    "push_to_hub": "no hub uploads",
    "hub_model_id": "no hub uploads",
    "hub_strategy": "no hub uploads",
    "do_eval": "evaluation follows --eval-every",
    "eval_strategy": "evaluation follows --eval-every",
    "per_device_eval_batch_size": "",
    "bf16": "the model dtype is --dtype (torch_dtype)",
    "use_vllm": "the learner does not sample; samplers choose --backend vllm",
    "vllm_mode": "the learner does not sample",
    "gradient_checkpointing_kwargs": "",
    "attn_implementation": "transformers picks the attention kernel",
    "wandb_entity": "", "wandb_project": "", "run_name": "",
}

TRL_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_generations": 8}


def translate(options: dict[str, Any], where: str, *, known: set[str], given: set[str] = frozenset()
              ) -> dict[str, Any]:
    """`options` (underscore names -> values) with TRL / open-r1 names replaced by this project's; `known` are the
    program's own option names (they are never translated: `dtype`, `beta` mean the same in both); `given` are
    the project's options set elsewhere (on the command line beside these), which TRL-derived values never override."""
    given = set(given) | {k for k in options if k in known}
    out = {k: v for k, v in options.items() if k in known or (k not in TABLE and k not in IGNORED)}
    ignored = sorted(k for k in options if k in IGNORED and k not in known)
    if ignored:
        print(f"warning: {where}: ignoring {', '.join(ignored)} (no effect here: "
              f"{'; '.join(f'{k}: {IGNORED[k]}' for k in ignored if IGNORED[k]) or 'logging/hub option'})",
              file=sys.stderr)
    trl = {k: v for k, v in options.items() if k in TABLE and k not in known}
    for key, value in trl.items():
        target, convert, _ = TABLE[key]
        converted = convert(value, f"{where}: {key}") if convert is not None else value
        if target is None:
            continue
        if target in given:
            raise ConfigError(f"{where}: give {key} (TRL's name) or {target}, not both")
        out[target] = converted
    if "epsilon" in trl and "epsilon_high" not in given:
        out["epsilon_high"] = trl["epsilon"]  # TRL: epsilon_high defaults to epsilon
    if "reward_funcs" in trl or "reward_weights" in trl:
        out.update(_reward_weights(trl.get("reward_funcs", ["accuracy"]), trl.get("reward_weights"), where))
    if {"per_device_train_batch_size", "gradient_accumulation_steps"} & trl.keys() and "groups_per_step" not in given:
        out["groups_per_step"] = _groups_per_step(trl, out, where)
    return out


def _reward_weights(funcs: Any, weights: Any, where: str) -> dict[str, Any]:
    funcs = [funcs] if isinstance(funcs, str) else list(funcs)
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(funcs):
        raise ConfigError(f"{where}: reward_weights has {len(weights)} values for {len(funcs)} reward_funcs")
    plugins = [f"{f}={w}" for f, w in zip(funcs, weights) if f not in ("accuracy", "format")]
    unknown = [p.rpartition("=")[0] for p in plugins if ":" not in p]
    if unknown:
        raise ConfigError(f"{where}: reward_funcs {', '.join(unknown)} are not available; give accuracy "
                          f"(math-verify), format (<think>/<answer> tags) or a plug-in as module:function")
    got = dict(zip(funcs, weights))
    out: dict[str, Any] = {"accuracy_weight": got.get("accuracy", 0.0), "format_weight": got.get("format", 0.0)}
    if plugins:
        out["reward"] = plugins  # --reward module:function=weight, one per plug-in
    return out


def _groups_per_step(trl: dict[str, Any], out: dict[str, Any], where: str) -> int:
    """TRL trains on per_device x accumulation x processes completions per optimizer step, in groups of G."""
    per_device = int(trl.get("per_device_train_batch_size", TRL_DEFAULTS["per_device_train_batch_size"]))
    accumulation = int(trl.get("gradient_accumulation_steps", TRL_DEFAULTS["gradient_accumulation_steps"]))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    group = int(out.get("group_size", TRL_DEFAULTS["num_generations"]))
    rows = per_device * accumulation * processes
    if rows % group:
        raise ConfigError(f"{where}: per_device_train_batch_size x gradient_accumulation_steps x processes = "
                          f"{per_device} x {accumulation} x {processes} = {rows} completions per step is not a "
                          f"multiple of num_generations = {group} (TRL requires it too)")
    return rows // group


def translate_argv(argv: list[str], *, known: set[str]) -> list[str]:
    """The command line with `--trl_name value` (or `--trl-name=value`) pairs rewritten as this project's flags."""
    options: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, _, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        key = name.replace("-", "_")
        if key in known and "_" in name:  # TRL's spelling of one of our own flags: --report_to -> --report-to
            token = "--" + name.replace("_", "-") + (f"={inline}" if inline else "")
        if not key or key in known or (key not in TABLE and key not in IGNORED):
            rest.append(token)
            i += 1
            continue
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        options[key] = True if not values else values[0] if len(values) == 1 else values
    if not options:
        return argv
    names = {t[2:].partition("=")[0].replace("-", "_") for t in rest if t.startswith("--")}
    given = {n[3:] if n.startswith("no_") else n for n in names}
    translated = translate(options, "command line", known=known, given=given)
    flags: list[str] = []
    for key, value in translated.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):  # a repeatable flag (--reward)
            for item in value:
                flags += [flag, str(item)]
        else:
            flags += [flag, str(value)]
    return rest + flags
