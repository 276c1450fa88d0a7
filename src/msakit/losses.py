"""Reusable loss functions. The task loss is shared by every model so that all of them optimise
the same objective for a given dataset unless a method's spec says otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msakit.data.base import DatasetInfo

REGRESSION_LOSSES = ("l1", "mse", "smooth_l1")


def task_loss(
    prediction: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, regression: str = "l1"
) -> torch.Tensor:
    """Loss of `prediction` against `labels` for the dataset's task.

    regression: prediction [B], labels [B] float; `regression` picks L1 (MMSA default), MSE or smooth L1.
    classification: prediction [B, K] logits, labels [B] long -> cross-entropy.
    multi_binary: prediction [B, T, 2] logits, labels [B, T] long -> mean cross-entropy over tasks.
    """
    if info.task == "regression":
        if regression == "l1":
            return F.l1_loss(prediction, labels)
        if regression == "mse":
            return F.mse_loss(prediction, labels)
        if regression == "smooth_l1":
            return F.smooth_l1_loss(prediction, labels)
        raise ValueError(f"unknown regression loss {regression!r}; use one of {REGRESSION_LOSSES}")
    if info.task == "classification":
        return F.cross_entropy(prediction, labels)
    return F.cross_entropy(prediction.reshape(-1, 2), labels.reshape(-1))


def shape_prediction(raw: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Final layer output [B, output_dim] -> the task's prediction shape (see ModelOutput)."""
    if info.task == "regression":
        return raw.squeeze(-1)
    if info.task == "multi_binary":
        return raw.reshape(raw.shape[0], info.num_tasks, 2)
    return raw
