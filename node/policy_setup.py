"""How the learner builds what it trains: master weights, LoRA adapters, the reference policy, the LR schedule, the
prompt-length limit and the weights it publishes.

    weights       float32 master copy, stepped by the optimizer; forward passes in the compute dtype (--dtype)
                  through autocast (gepo/precision.py). Under DeepSpeed its own fp32 master copy instead.
    LoRA          --lora-r > 0: the base stays frozen (in the compute dtype: it never changes, so nothing is lost),
                  the fp32 adapters train; checkpoints hold the adapters, versions the merged policy.
    reference     --beta > 0: a frozen policy in the compute dtype (--ref-model, or the starting weights --model;
                  with LoRA the base with its adapters switched off), prepared like the policy under accelerate.
    published     the master weights (LoRA: merged) rounded once to --publish-dtype; with --publish-adapter the
                  first version so, later ones as the adapters only (node/adapters.py).

Heavy imports (torch, transformers, peft) happen inside the functions: the flag table loads without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.cli import option

if TYPE_CHECKING:
    import torch

    from gepo.data import PromptSet

log = logging.getLogger(__name__)

SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}  # ours -> transformers'
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PolicyConfig:
    publish_dtype: str = option("auto", "dtype of the weights samplers receive: the fp32 master weights rounded to it "
                                        "(auto: bfloat16 on a GPU, the compute --dtype on CPU)", choices=DTYPE_NAMES)
    ref_model: str | None = option(None, "reference policy for --beta > 0, frozen, in the compute dtype (default: the "
                                         "starting weights --model; with LoRA the base without adapters)")
    lr_scheduler: str = option("constant", "learning-rate schedule over --max-steps after --warmup-steps of linear "
                                           "warm-up (transformers.get_scheduler)", choices=tuple(SCHEDULERS))
    warmup_steps: int = option(0, "steps of linear LR warm-up from 0 (the first step then runs at lr 0, as in "
                                  "transformers' Trainer)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: much less memory for long "
                                                 "completions, ~30% more compute")
    max_prompt_length: int = option(0, "skip prompts longer than this many tokens (chat template included) when the "
                                       "prompt set is loaded, counted as prompts_skipped_too_long (0: no limit; "
                                       "tokenizing the set costs ~1 s per 10k prompts at start-up)")
    lora_r: int = option(0, "LoRA rank (0: off, full fine-tuning); needs the optional extra: pip install -e '.[peft]'")
    lora_alpha: int = option(16, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input")
    lora_target_modules: list[str] = option(default_factory=lambda: ["all-linear"],
                                            help="module names to adapt, e.g. q_proj v_proj (all-linear: every "
                                                 "linear layer but the output head)")
    publish_adapter: bool = option(False, "with --lora-r: publish the first version in full (the base, fetched "
                                          "once) and every later one as its LoRA adapters only, in --publish-dtype "
                                          "(samplers merge them; HF backend only)")

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "max_prompt_length", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and not self.lora_target_modules:
            raise ValueError("--lora-target-modules needs at least one module name")
        if self.publish_adapter and not self.lora_r:
            raise ValueError("--publish-adapter needs --lora-r > 0 (it publishes the LoRA adapters)")

    @property
    def lora(self) -> bool:
        return self.lora_r > 0


# ---------------------------------------------------------------------------------------------------------------
# dtypes


def resolve_publish_dtype(name: str, device: str, compute_dtype: "torch.dtype") -> "torch.dtype":
    from node.model_io import resolve_dtype

    if name == "auto":
        import torch

        return torch.bfloat16 if device.startswith("cuda") else compute_dtype
    return resolve_dtype(name, device)


def accelerate_mixed_precision(dtype_name: str, device: str) -> str | None:
    """The `mixed_precision` to give accelerate for --dtype: None lets an accelerate config decide --dtype auto."""
    import torch

    from node.model_io import resolve_dtype

    if dtype_name == "auto" and "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_dtype(dtype_name, device), "no")


def accelerator_compute_dtype(accelerator: Any) -> "torch.dtype":
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# the policy


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ValueError("--lora-r needs peft: pip install -e '.[peft]' (or pip install peft)") from None
    return peft


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def build_policy(cfg: PolicyConfig, model: str | None, checkpoint: Path | None, device: str,
                 compute_dtype: "torch.dtype") -> tuple[Any, Any]:
    """(policy, tokenizer) to train: fp32 master weights, or a frozen base with fp32 LoRA adapters.

    `checkpoint` (on --resume) supplies the trained weights: the whole model, or the adapters over `model`."""
    import torch

    from gepo.precision import check_master_weights, Precision
    from node.model_io import ModelLoadError, load_policy

    saved = checkpoint / "model" if checkpoint else None
    has_adapters = saved is not None and (saved / "adapter_config.json").is_file()
    if saved is not None and has_adapters != cfg.lora:
        held = "LoRA adapters" if has_adapters else "a full model"
        raise ValueError(f"checkpoint {checkpoint} holds {held}: resume with{'' if has_adapters else 'out'} --lora-r "
                         f"or start a new --run-dir")
    if not cfg.lora:
        policy, tokenizer = load_policy(str(saved) if saved else model, device, torch.float32)
    else:
        peft = _peft()
        base, tokenizer = load_policy(model, device, compute_dtype)  # frozen: its dtype loses no update
        if saved is not None:
            _check_adapter_base(saved, model)
            try:
                with _quiet_peft():
                    policy = peft.PeftModel.from_pretrained(base, str(saved), is_trainable=True)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"cannot load the LoRA adapters in {saved}: {str(exc).splitlines()[0]}") from None
        else:
            target: Any = cfg.lora_target_modules
            target = "all-linear" if target == ["all-linear"] else list(target)
            lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                   target_modules=target, task_type="CAUSAL_LM")
            try:
                with _quiet_peft():
                    policy = peft.get_peft_model(base, lora)  # adapters in float32 (autocast_adapter_dtype)
            except ValueError as exc:
                raise ValueError(f"--lora-target-modules {' '.join(cfg.lora_target_modules)}: "
                                 f"{str(exc).splitlines()[0]}") from None
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        total = sum(p.numel() for p in policy.parameters())
        log.info("LoRA r=%d: %d trainable parameters of %d (%.2f%%)", policy.peft_config["default"].r, trainable,
                 total, 100 * trainable / total)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_master_weights(policy, Precision(compute_dtype))
    return policy, tokenizer


@contextlib.contextmanager
def _quiet_peft() -> Any:
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for a user to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _check_adapter_base(saved: Path, model: str | None) -> None:
    base = json.loads((saved / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base and model and Path(base).name != Path(model).name:
        log.warning("the adapters in %s were trained on %s; loading them over --model %s", saved, base, model)


# ---------------------------------------------------------------------------------------------------------------
# the reference policy


class AdaptersOff:
    """The LoRA policy's frozen base, called like a model: the reference without a second copy of the weights."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def __call__(self, **inputs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy(**inputs)


def build_reference(cfg: PolicyConfig, policy: Any, model: str | None, device: str, compute_dtype: "torch.dtype",
                    accelerator: Any = None) -> Any:
    """The frozen reference policy of the KL term, for --beta > 0.

    `model` is the starting point (--model), not a resumed checkpoint: the KL stays anchored to where training began.
    """
    from node.model_io import load_policy

    if cfg.ref_model is None and is_lora(policy):
        return AdaptersOff(policy)
    if accelerator is not None and _zero_stage(accelerator) == 3:
        raise ValueError("--beta > 0 under DeepSpeed ZeRO-3 is not supported (the reference would need its own "
                         "sharded engine); use ZeRO-2 or --beta 0")
    ref, _ = load_policy(cfg.ref_model or model, device, compute_dtype)
    ref.requires_grad_(False)
    ref.eval()
    ref.config.use_cache = False
    policy_vocab = policy.get_output_embeddings().weight.shape[0]
    if ref.get_output_embeddings().weight.shape[0] != policy_vocab:
        raise ValueError(f"--ref-model {cfg.ref_model}: its vocabulary differs from the policy's ({policy_vocab})")
    if accelerator is not None:
        ref = accelerator.prepare_model(ref, evaluation_mode=True)  # device and autocast like the policy, no DDP
    log.info("reference policy for the KL term: %s in %s", cfg.ref_model or model or "the tiny policy", compute_dtype)
    return ref


def _zero_stage(accelerator: Any) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) if plugin is not None else None


# ---------------------------------------------------------------------------------------------------------------
# the schedule


def build_scheduler(cfg: PolicyConfig, optimizer: Any, max_steps: int) -> Any:
    """LR schedule stepped once per optimizer step: warm-up, then constant / linear / cosine decay to --max-steps."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULERS[cfg.lr_scheduler], optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max(max_steps, 1))


# ---------------------------------------------------------------------------------------------------------------
# what samplers receive


def published_tensors(policy: Any, dtype: "torch.dtype") -> dict[str, "torch.Tensor"]:
    """The weights of a version: the master weights (LoRA: base + adapters, merged in fp32) rounded to `dtype`,
    under the plain model's tensor names, so samplers load them exactly as any full model."""
    from node.model_io import policy_tensors

    state = merged_state_dict(policy) if is_lora(policy) else None
    return policy_tensors(policy, dtype=dtype, state=state)


def merged_state_dict(policy: Any) -> dict[str, "torch.Tensor"]:
    """base + scaling * B @ A for every adapted layer, in float32, without touching the policy (merging in place
    would round the base); tied tensors stay shared, so they are listed once."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    state = {name.replace(".base_layer.", "."): t for name, t in base.state_dict().items() if "lora_" not in name}
    adapter = policy.active_adapter
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                weight = module.get_base_layer().weight
                state[f"{name}.weight"] = weight.float() + module.get_delta_weight(adapter).float()
    return state


# ---------------------------------------------------------------------------------------------------------------
# prompt length


def drop_long_prompts(prompts: "PromptSet", tokenizer: Any, system_prompt: str | None,
                      max_length: int) -> tuple["PromptSet", int]:
    """The prompt set without prompts longer than `max_length` tokens, and how many were dropped.

    Skipped rather than truncated: cutting a math problem removes its end, usually the question itself, and its
    reward would grade an answer to a question that was never asked. The kept set is re-indexed (samplers receive
    its questions), so nothing downstream sees a gap."""
    from gepo.data import DataError, TablePromptSet, format_prompts

    if max_length <= 0:
        return prompts, 0
    examples = list(prompts)
    kept = []
    for start in range(0, len(examples), 4096):  # batched: a whole data set is tokenized once, at start-up
        batch = examples[start : start + 4096]
        ids = format_prompts(tokenizer, [ex.question for ex in batch], system_prompt)
        kept += [ex for ex, prompt in zip(batch, ids) if len(prompt) <= max_length]
    skipped = len(prompts) - len(kept)
    if not kept:
        raise DataError(f"--max-prompt-length {max_length}: every prompt of {prompts.name} is longer")
    if skipped == 0:
        return prompts, 0
    log.info("--max-prompt-length %d: skipped %d of %d prompts", max_length, skipped, len(prompts))
    name = f"{prompts.name}, prompts <= {max_length} tokens"
    names = {k for ex in kept for k in ex.columns}  # the rows' dataset columns still reach reward plug-ins
    columns = {k: [ex.columns.get(k) for ex in kept] for k in names} or None
    return TablePromptSet(name, [ex.question for ex in kept], [ex.answer for ex in kept], columns), skipped
