"""Mixed precision for the training loop: `train.precision = 32 | bf16 | 16`.

    32    plain float32 (default)
    bf16  forward under `torch.autocast(dtype=torch.bfloat16)`; no gradient scaler (bf16 has
          float32's exponent range). Runs on CPU and on GPUs with bf16 support.
    16    forward under `torch.autocast(dtype=torch.float16)` and a `torch.amp.GradScaler`
          (float16 gradients underflow without one). Meant for GPUs; it also runs on CPU.

Only the forward pass is autocast; the loop casts every loss term and every prediction to
float32 before summing, logging or computing metrics, and the parameters, gradients and optimiser
states stay float32 (autocast's usual contract). Measured on CPU in benchmarks/precision.py.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Precision:
    """Autocast context, backward and optimiser step for one precision setting.

    `backward(loss)` scales the loss under "16"; `unscale(optimizers)` must run before anything
    reads the gradients (clipping, model hooks); `step_optimizer(o)` for each optimiser, then
    `update()` once."""

    def __init__(self, precision: str, device: torch.device):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.name = precision
        self.dtype = PRECISIONS[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if self.scaler is not None:
            for optimizer in optimizers.values():
                self.scaler.unscale_(optimizer)

    def step_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimiser's step (skipped by the scaler when its gradients hold inf/NaN)."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)

    def update(self) -> None:
        """After every optimiser stepped: adapt the loss scale (fp16 only)."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
