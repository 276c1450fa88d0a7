"""What every model shares: building the `ModelOutput` (prediction shape + task loss)."""

from __future__ import annotations

import torch

from msakit.batch import Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.losses import shape_prediction, task_loss


def check_choice(where: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{where} must be one of {options}, got {value!r}")


def task_output(
    raw: torch.Tensor,
    batch: Batch,
    info: DatasetInfo,
    extra_losses: dict[str, torch.Tensor] | None = None,
    logs: dict[str, float] | None = None,
) -> ModelOutput:
    """raw [B, info.output_dim] -> ModelOutput with the task loss under the name "task"."""
    prediction = shape_prediction(raw, info)
    losses = {"task": task_loss(prediction, batch.labels, info)}
    losses.update(extra_losses or {})
    return ModelOutput(prediction=prediction, losses=losses, logs=logs or {})
