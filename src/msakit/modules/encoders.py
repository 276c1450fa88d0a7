"""Per-modality encoders that turn a padded sequence into one vector, ignoring padding."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from msakit.modules.pooling import masked_mean


class PooledMLPEncoder(nn.Module):
    """Masked mean over time, then dropout -> Linear -> ReLU -> Linear -> ReLU.

    x [B, L, D_in], mask [B, L] -> [B, hidden]. MMSA's LF-DNN/TFN "SubNet" uses BatchNorm first;
    we leave it out so that batches of one sample train too (inputs are standardised upstream).
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(masked_mean(x, mask))


class LSTMEncoder(nn.Module):
    """Packed (length-aware) LSTM; the final hidden state of the last layer (both directions
    concatenated when bidirectional), then dropout -> Linear.

    x [B, L, D_in], mask [B, L] -> [B, out_dim]. Padding frames are never read.
    """

    def __init__(
        self, in_dim: int, hidden: int, out_dim: int, dropout: float, bidirectional: bool = False
    ):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1).clamp_min(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n [num_directions, B, hidden]
        last = torch.cat(list(h_n), dim=-1)  # [B, hidden * num_directions]
        return self.out(self.dropout(last))


def build_encoder(kind: str, in_dim: int, hidden: int, dropout: float) -> nn.Module:
    """'mlp' (masked mean + MLP) or 'lstm' (packed LSTM); both map [B, L, in_dim] -> [B, hidden]."""
    if kind == "mlp":
        return PooledMLPEncoder(in_dim, hidden, dropout)
    if kind == "lstm":
        return LSTMEncoder(in_dim, hidden, hidden, dropout)
    raise ValueError(f"unknown encoder {kind!r}: use 'mlp' or 'lstm'")
