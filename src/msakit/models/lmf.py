"""LMF: Low-rank Multimodal Fusion (Liu et al., ACL 2018, "Efficient Low-rank Multimodal Fusion
with Modality-Specific Factors"; official code Justin1904/Low-rank-Multimodal-Fusion, MMSA's LMF).

Idea: TFN's weight tensor W over the outer product of [z_t; 1] x [z_a; 1] x [z_v; 1] is
factorised into `rank` modality-specific factors, so the fused output is computed without ever
building the outer product:
    y = sum_r w_r * prod_m ([z_m; 1] @ F_m^(r)) + b,
with F_m^(r) [H_m + 1, output_dim]. The fusion layer IS the output layer (no MLP after it).
Parameters grow linearly in the rank: rank * (sum_m (H_m + 1) * output_dim + 1) + output_dim.

Shapes: text [B, L_t, D_t] -> length-aware LSTM (or pooled MLP) -> z_t [B, text_out];
audio/vision [B, L_m, D_m] -> masked mean + MLP -> z_a [B, H_a], z_v [B, H_v];
[z_m; 1] @ F_m: [rank, B, output_dim] per modality -> product over modalities -> weighted
sum over rank -> [B, output_dim].

Deviations:
- audio/vision are averaged over their REAL frames (MMSA averages over all frames, padding
  zeros included); no BatchNorm in the audio/vision subnets (as LF-DNN/TFN here).
- MMSA's optimiser omits fusion_weights and fusion_bias (parameters picked by list position), so
  they never train there; here they are trained, in the factor group (`factor_lr`).
- the text LSTM is read at the last real word by default (MMSA's TextSubNet runs on through the
  padding: `text_encoder: lstm_padded`).
- the text subnet's output size is a config field (`text_out`; MMSA hard-codes text_hidden // 2).
- the regression output is not squashed (as TFN here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.batch import Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.models.base import check_choice, task_output
from msakit.models.tfn import append_one
from msakit.modules.encoders import LSTMEncoder, PooledMLPEncoder
from msakit.registry import register_model
from msakit.validated import ModelConfig


@dataclass
class LMFConfig(ModelConfig):
    rank: int = 4
    """Number of low-rank factors (paper: 4 works across datasets)."""
    text_encoder: str = "lstm"
    """'lstm' (length-aware LSTM: state at the last real word), 'lstm_padded' (MMSA's TextSubNet:
    the LSTM runs on through the zero padding, state at the last padded step) or 'mlp' (masked
    mean + MLP)."""
    text_hidden: int = 128
    """LSTM hidden size (or MLP width) of the text subnet."""
    text_out: int = 64
    """Size of the text vector z_t (MMSA: text_hidden // 2)."""
    audio_hidden: int = 16
    vision_hidden: int = 128
    dropout: float = 0.3
    """Dropout inside each modality subnet (MMSA's per-modality `dropouts`, equal on MOSI/MOSEI)."""
    factor_lr: float = 0.0
    """Learning rate of the factors, fusion weights and bias; 0 = train.lr (MMSA: factor_lr)."""

    def __post_init__(self) -> None:
        check_choice("model.text_encoder", self.text_encoder, ("lstm", "lstm_padded", "mlp"))
        if self.rank < 1:
            raise ValueError("model.rank must be >= 1")
        if self.factor_lr < 0:
            raise ValueError("model.factor_lr must be >= 0 (0 = train.lr)")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.rank": [2, 4, 8, 16],
            "model.text_hidden": [32, 64, 128],
            "model.text_out": [32, 64, 128],
            "model.audio_hidden": [8, 16, 32],
            "model.vision_hidden": [16, 32, 64, 128],
            "model.dropout": {"low": 0.0, "high": 0.5},
        }

    @classmethod
    def tiny(cls) -> LMFConfig:
        return cls(rank=2, text_hidden=8, text_out=4, audio_hidden=4, vision_hidden=4)


@register_model("lmf", config=LMFConfig)
class LMF(nn.Module):
    """LMF: low-rank multimodal fusion with modality-specific factors on [z; 1] vectors."""

    def __init__(self, cfg: LMFConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        dims, out = info.feature_dims, info.output_dim
        if cfg.text_encoder in ("lstm", "lstm_padded"):
            self.text_encoder = LSTMEncoder(dims["text"], cfg.text_hidden, cfg.text_out, cfg.dropout,
                                            through_padding=cfg.text_encoder == "lstm_padded")
        else:
            self.text_encoder = _PooledText(dims["text"], cfg.text_hidden, cfg.text_out, cfg.dropout)
        self.audio_encoder = PooledMLPEncoder(dims["audio"], cfg.audio_hidden, cfg.dropout)
        self.vision_encoder = PooledMLPEncoder(dims["vision"], cfg.vision_hidden, cfg.dropout)
        self.text_factor = nn.Parameter(torch.empty(cfg.rank, cfg.text_out + 1, out))
        self.audio_factor = nn.Parameter(torch.empty(cfg.rank, cfg.audio_hidden + 1, out))
        self.vision_factor = nn.Parameter(torch.empty(cfg.rank, cfg.vision_hidden + 1, out))
        self.fusion_weights = nn.Parameter(torch.empty(1, cfg.rank))
        self.fusion_bias = nn.Parameter(torch.zeros(1, out))
        for p in (self.text_factor, self.audio_factor, self.vision_factor, self.fusion_weights):
            nn.init.xavier_normal_(p)

    def fusion_parameters(self) -> list[nn.Parameter]:
        return [self.text_factor, self.audio_factor, self.vision_factor,
                self.fusion_weights, self.fusion_bias]

    def parameter_groups(self, train_cfg) -> list[dict]:
        """Factors (+ fusion weights/bias) at `factor_lr`, everything else at train.lr."""
        fusion = {id(p) for p in self.fusion_parameters()}
        factor_group = {"params": self.fusion_parameters()}
        if self.cfg.factor_lr > 0:
            factor_group["lr"] = self.cfg.factor_lr
        rest = [p for p in self.parameters() if id(p) not in fusion and p.requires_grad]
        return [factor_group, {"params": rest}]

    def forward(self, batch: Batch) -> ModelOutput:
        z_text = append_one(self.text_encoder(batch.text, batch.text_mask))  # [B, text_out+1]
        z_audio = append_one(self.audio_encoder(batch.audio, batch.audio_mask))  # [B, H_a+1]
        z_vision = append_one(self.vision_encoder(batch.vision, batch.vision_mask))  # [B, H_v+1]
        fused = (
            torch.matmul(z_text, self.text_factor)  # [rank, B, out]
            * torch.matmul(z_audio, self.audio_factor)
            * torch.matmul(z_vision, self.vision_factor)
        )
        raw = torch.einsum("r,rbo->bo", self.fusion_weights[0], fused) + self.fusion_bias
        return task_output(raw, batch, self.info)


class _PooledText(nn.Module):
    """Masked mean + MLP (hidden) + Linear to text_out: the 'mlp' text subnet."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.encoder = PooledMLPEncoder(in_dim, hidden, dropout)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(x, mask))
