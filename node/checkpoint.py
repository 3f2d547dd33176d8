"""Learner checkpoints that `--resume` continues from with the same version numbering.

    run_dir/checkpoints/step-000020/
        model/            save_pretrained(): config, weights (LoRA: the adapters only), tokenizer files
        optimizer.pt      optimizer state (under DeepSpeed: accelerate/, every rank's shard); with --dtype float16
                          also the GradScaler's (loss scale, growth tracker), so --resume keeps the scale it found
        scheduler.pt      learning-rate scheduler state
        state.json        step, policy version, counters, RNG seeds: the run state
    run_dir/checkpoints/LATEST   name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, and LATEST is replaced atomically, so a crash
mid-write leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class RunState:
    step: int = 0
    policy_version: int = 0
    counters: dict[str, Any] = field(default_factory=dict)


def _checkpoints(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _is_deepspeed(accelerator: Any) -> bool:
    return accelerator is not None and str(accelerator.distributed_type).endswith("DEEPSPEED")


def _barrier(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def save_checkpoint(run_dir: str | Path, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
                    state: RunState, *, keep: int = 2, scheduler: Any | None = None,
                    accelerator: Any | None = None, scaler: Any | None = None) -> Path:
    """Called on every rank under accelerate: the main rank writes the files; under DeepSpeed every rank also
    writes its optimizer shard (accelerator.save_state), because no rank holds the whole optimizer state."""
    is_main = accelerator is None or accelerator.is_main_process
    root = _checkpoints(run_dir)
    name = f"step-{state.step:06d}"
    tmp = root / f".{name}.tmp"
    final = root / name
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
    _barrier(accelerator)
    if _is_deepspeed(accelerator):
        accelerator.save_state(str(tmp / "accelerate"))
    elif is_main:
        saved = {"optimizer": optimizer.state_dict()}
        if scaler is not None:  # fp16's torch.amp.GradScaler (gepo.precision); accelerate keeps its own
            saved["grad_scaler"] = scaler.state_dict()
        torch.save(saved, tmp / "optimizer.pt")
    if is_main and scheduler is not None:  # the same on every rank, and not part of accelerate's state
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _barrier(accelerator)
    if not is_main:
        _barrier(accelerator)
        return final
    (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=2, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = root / ".LATEST.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "LATEST")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s (policy version %d)", final, state.policy_version)
    _barrier(accelerator)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = _checkpoints(run_dir) / "LATEST"
    if not pointer.is_file():
        return None
    path = _checkpoints(run_dir) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_run_state(checkpoint: Path) -> RunState:
    data = json.loads((checkpoint / "state.json").read_text())
    return RunState(step=int(data["step"]), policy_version=int(data["policy_version"]),
                    counters=dict(data.get("counters", {})))


def load_optimizer(checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any | None = None, *,
                   accelerator: Any | None = None, after_prepare: bool = False, scaler: Any | None = None) -> None:
    """Plain and DDP optimizers are restored before accelerator.prepare(); DeepSpeed's sharded state after it.
    The scheduler (which wraps the unprepared optimizer) and an fp16 GradScaler are restored with the first call."""
    if scheduler is not None and not after_prepare:
        load_scheduler(checkpoint, scheduler)
    if _is_deepspeed(accelerator):
        if after_prepare:
            accelerator.load_state(str(checkpoint / "accelerate"))
        return
    if after_prepare:
        return
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None:
        if "grad_scaler" in saved:
            scaler.load_state_dict(saved["grad_scaler"])
        else:  # a float32/bfloat16 checkpoint, or one written before the scale was saved
            log.warning("%s has no loss-scaler state; the fp16 loss scale starts from %g", checkpoint,
                        scaler.get_scale())


def load_scheduler(checkpoint: Path, scheduler: Any) -> None:
    path = checkpoint / "scheduler.pt"
    if not path.is_file():  # written before schedules existed: the schedule starts over, and says so
        log.warning("%s has no scheduler state; the learning-rate schedule starts from its first step", checkpoint)
        return
    scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
