"""Policies in and out of the swarm: loading a model, and turning it into (and back from) a weight manifest.

A published version carries everything a sampler needs, so it never touches a model hub: the tensors, the model's
config and tokenizer files, and `run.json` (the learner's sampling parameters, group size and prompt set).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from node.errors import ModelLoadError  # defined without torch, for the programs' main()
from protocol.manifest import WeightManifest, file_bytes, torch_state_dict

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# What save_pretrained writes for a model and its tokenizer, minus the weights themselves.
_MODEL_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return name


def load_policy(model: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder or a hub id; None or "tiny" is the built-in tiny policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gepo.tiny_policy import tiny_policy_path

    ref = str(tiny_policy_path()) if model in (None, "", "tiny") else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
        policy = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    except (OSError, ValueError) as exc:
        where = "folder" if Path(ref).exists() else "hub id (offline or unknown?)"
        raise ModelLoadError(f"cannot load model {ref!r} as a {where}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return policy.to(device), tokenizer


def policy_files(model: Any, tokenizer: Any) -> dict[str, bytes]:
    """The config and tokenizer files of a model, as save_pretrained writes them (no weights)."""
    with tempfile.TemporaryDirectory(prefix="gepo-policy-files-") as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {
            p.name: p.read_bytes()
            for p in sorted(Path(tmp).iterdir())
            if p.is_file() and p.name.endswith(_MODEL_FILE_SUFFIXES)
        }


def policy_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None,
                   state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict (or `state`) with tied tensors listed once (the receiver re-ties them), floating-point tensors
    rounded to `dtype` when given."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in (model.state_dict() if state is None else state).items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        tensor = tensor.detach()
        out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def run_file(info: Mapping[str, Any]) -> dict[str, bytes]:
    return {RUN_FILE: json.dumps(info, sort_keys=True).encode()}


def read_run_file(manifest: WeightManifest, buffer: Any) -> dict[str, Any]:
    try:
        return json.loads(file_bytes(manifest, buffer, RUN_FILE))
    except KeyError:
        raise ModelLoadError(f"version {manifest.version} carries no {RUN_FILE}: not published by a gepo learner")


def model_from_manifest(manifest: WeightManifest, buffer: Any, cache_dir: str | Path, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Build (model, tokenizer) from a verified version: files into `cache_dir`, then the weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        if entry.name != RUN_FILE:
            (folder / entry.name).write_bytes(file_bytes(manifest, buffer, entry.name))
    # The first load goes through from_pretrained, which knows how to tie weights and set up buffers that
    # are not in the state dict (rotary frequencies, ...); later versions are copied in with load_weights().
    save_file(torch_state_dict(manifest, buffer, copy=True), str(folder / "model.safetensors"), metadata={"format": "pt"})
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"version {manifest.version} does not load as a model: {exc}") from None
    finally:
        (folder / "model.safetensors").unlink(missing_ok=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def load_weights(model: torch.nn.Module, manifest: WeightManifest, buffer: Any) -> None:
    """Copy a version's tensors into `model` (same architecture); only tied duplicates may be absent."""
    load_state(model, torch_state_dict(manifest, buffer, copy=True), manifest.version)


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], version: int) -> None:
    """Copy a version's state dict into `model` (cast to its dtype); only tied duplicates may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelLoadError(f"version {version} has tensors the model lacks: {unexpected[:5]}")
    if missing:
        # Tied duplicates (lm_head.weight of a tied model) are absent by design: policy_tensors lists them once.
        primary = {name for name, _ in model.named_parameters(remove_duplicate=True)}
        primary |= {name for name, _ in model.named_buffers(remove_duplicate=True)}
        really_missing = [m for m in missing if m in primary]
        if really_missing:
            raise ModelLoadError(f"version {version} lacks tensors: {really_missing[:5]}")
