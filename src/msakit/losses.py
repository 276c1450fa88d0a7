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


# ----------------------------------------------------------------------------- representation losses
# Used by MISA (Hazarika et al. 2020) and reused by DBR's decoupling stage.


def _match_norm(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """||a - b||_2 with a finite gradient at a == b (sqrt of sum + eps)."""
    return ((a - b).pow(2).sum() + eps).sqrt()


def cmd(x1: torch.Tensor, x2: torch.Tensor, moments: int = 5) -> torch.Tensor:
    """Central Moment Discrepancy (Zellinger et al. 2017), as MISA uses it.

    x1 [N1, D], x2 [N2, D] (samples of two distributions; N1 may differ from N2) -> scalar
    ||E x1 - E x2|| + sum_{k=2..moments} ||E (x1 - E x1)^k - E (x2 - E x2)^k||.
    MISA's version drops the original's 1/|b - a|^k range scaling (its inputs are sigmoid outputs,
    range 1). ~0 for samples of the same distribution; the sqrt carries a 1e-12 epsilon so the
    gradient stays finite when both sides are equal.
    """
    if moments < 1:
        raise ValueError("cmd: moments must be >= 1")
    mean1, mean2 = x1.mean(dim=0), x2.mean(dim=0)
    centred1, centred2 = x1 - mean1, x2 - mean2
    total = _match_norm(mean1, mean2)
    for k in range(2, moments + 1):
        total = total + _match_norm(centred1.pow(k).mean(dim=0), centred2.pow(k).mean(dim=0))
    return total


def orthogonality_loss(x1: torch.Tensor, x2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft orthogonality ("difference loss", MISA / Domain Separation Networks).

    x1 [B, D1], x2 [B, D2] -> scalar mean((X1^T X2)^2), where each input is centred over the
    batch and each row divided by its (detached) L2 norm, so the loss is the mean squared
    correlation between the feature columns of the two representations. 0 when the centred
    column spaces are orthogonal.
    """
    x1 = x1.reshape(x1.shape[0], -1)
    x2 = x2.reshape(x2.shape[0], -1)
    x1 = x1 - x1.mean(dim=0, keepdim=True)
    x2 = x2 - x2.mean(dim=0, keepdim=True)
    x1 = x1 / (x1.norm(dim=1, keepdim=True).detach() + eps)
    x2 = x2 / (x2.norm(dim=1, keepdim=True).detach() + eps)
    return (x1.t() @ x2).pow(2).mean()


def clip_loss(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) between matched rows: x, y [B, D], L2-normalised here -> scalar.
    0 for B = 1."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = x @ y.t() / temperature  # [B, B]
    targets = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
