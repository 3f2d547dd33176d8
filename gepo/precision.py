"""Mixed precision that keeps small updates: fp32 master weights, low-precision compute through autocast.

At lr 1e-6 almost every AdamW update is below bf16's rounding step (|w| / 256): stepping an optimizer on bf16
weights silently drops it. So the weights the optimizer steps (and its state) stay float32, the *master* copy, and
only the computation runs in the compute dtype: `torch.autocast` casts each matmul's inputs on the fly (weights
included), norms and softmaxes stay float32. There is no second copy of the weights: the fp32 model is the master.

    precision = Precision.for_device("cuda", torch.bfloat16)
    with precision.autocast():
        logits = model(...)              # bf16 matmuls, fp32 parameters
    precision.backward(loss)             # loss scaling for fp16 (bf16 has fp32's range and needs none)
    precision.unscale_(optimizer)        # true gradients before clipping
    precision.step(optimizer)            # fp16: skipped by the scaler when a gradient overflowed

float16 has too little range for gradients, hence `torch.amp.GradScaler`; bfloat16 and float32 need no scaling.
Under accelerate/DeepSpeed the accelerator does all of this itself (its `mixed_precision`, DeepSpeed's own fp32
master copy); the learner then passes no `Precision` to `train_step`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class Precision:
    """How forward passes are computed (`compute_dtype`) for float32 master weights on `device_type`."""

    compute_dtype: torch.dtype = torch.float32
    device_type: str = "cpu"
    scaler: Any = field(default=None, repr=False)
    """A `torch.amp.GradScaler` for float16 compute; None otherwise."""

    @classmethod
    def for_device(cls, device: str | torch.device, compute_dtype: torch.dtype) -> "Precision":
        device_type = torch.device(device).type
        if compute_dtype not in (torch.float32, *LOW_PRECISION):
            raise ValueError(f"compute dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        scaler = torch.amp.GradScaler(device_type) if compute_dtype == torch.float16 else None
        return cls(compute_dtype, device_type, scaler)

    @property
    def mixed(self) -> bool:
        return self.compute_dtype in LOW_PRECISION

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward passes inside run in the compute dtype (a no-op for float32)."""
        if not self.mixed:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.compute_dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale, so that clipping and the reported norm see true gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def skip(self) -> None:
        """The step is skipped (non-finite gradients): an fp16 scaler still lowers its scale for the next one."""
        if self.scaler is not None:
            self.scaler.update()


def check_master_weights(model: torch.nn.Module, precision: Precision | None) -> None:
    """Refuse to train low-precision weights outside an accelerator: their small updates would be lost."""
    if precision is None:
        return
    low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION})
    if low:
        raise ValueError(f"trainable parameters are {', '.join(low)}: keep float32 master weights and compute in "
                         f"{precision.compute_dtype} through Precision.autocast(), or small updates are rounded away")
