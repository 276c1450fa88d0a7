"""Length-masked pooling over time: padding frames never change the result."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], mask [B, L] bool (True = real frame) -> [B, D] mean over real frames."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], mask [B, L] bool -> [B, D] max over real frames."""
    return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(dim=1)
