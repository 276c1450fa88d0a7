"""TFN: Tensor Fusion Network (Zadeh et al., EMNLP 2017, "Tensor Fusion Network for Multimodal
Sentiment Analysis").

Idea: append a constant 1 to each modality vector and take the three-way outer product, so the
fused tensor holds unimodal, bimodal and trimodal interaction terms; an MLP reads it.

Shapes: text [B, L_t, D_t] -> LSTM (or pooled MLP) -> z_t [B, H_t]; audio/vision -> pooled MLP
-> z_a [B, H_a], z_v [B, H_v]; fusion [B, (H_t+1)(H_a+1)(H_v+1)] -> MLP -> [B, output_dim].

Deviations: length-aware LSTM for text by default (state at the last real word; MMSA's reading at
the last padded step is `text_encoder: lstm_padded`); no BatchNorm in the audio/vision subnets;
the regression output is not squashed by the original's sigmoid*6-3 (labels are already in range
and L1 is robust).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from msakit.batch import Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.models.base import check_choice, task_output
from msakit.modules.dropout import WideDropout
from msakit.modules.encoders import LSTMEncoder, PooledMLPEncoder
from msakit.registry import register_model
from msakit.validated import ModelConfig, bounds


@dataclass
class TFNConfig(ModelConfig):
    text_encoder: str = "lstm"
    """'lstm' (length-aware LSTM: state at the last real word), 'lstm_padded' (MMSA's TextSubNet:
    the LSTM runs on through the zero padding, state at the last padded step) or 'mlp' (masked
    mean + MLP)."""
    text_hidden: int = 32
    """Size of the text vector z_t (MMSA: text_out)."""
    text_lstm_hidden: int = field(default=0, metadata=bounds(0))
    """Hidden size of the text LSTM before its output layer to `text_hidden` (MMSA: hidden_dims[0],
    128 on MOSI); 0 = `text_hidden`."""
    audio_hidden: int = 8
    vision_hidden: int = 8
    fusion_hidden: int = 64
    dropout: float = 0.2
    fusion_dropout: float = 0.3

    def __post_init__(self) -> None:
        check_choice("model.text_encoder", self.text_encoder, ("lstm", "lstm_padded", "mlp"))

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.text_hidden": [16, 32, 64, 128],
            "model.audio_hidden": [4, 8, 16, 32],
            "model.vision_hidden": [4, 8, 16, 32],
            "model.fusion_hidden": [32, 64, 128],
            "model.dropout": {"low": 0.0, "high": 0.5},
            "model.fusion_dropout": {"low": 0.0, "high": 0.5},
        }

    @classmethod
    def tiny(cls) -> TFNConfig:
        return cls(text_hidden=4, audio_hidden=2, vision_hidden=2, fusion_hidden=8)


def append_one(z: torch.Tensor) -> torch.Tensor:
    """[B, H] -> [B, H + 1] with a trailing constant 1."""
    return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=-1)


@register_model("tfn", config=TFNConfig)
class TFN(nn.Module):
    """TFN: three-way outer-product tensor fusion of [z; 1] modality vectors."""

    def __init__(self, cfg: TFNConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        dims = info.feature_dims
        if cfg.text_encoder in ("lstm", "lstm_padded"):
            self.text_encoder = LSTMEncoder(
                dims["text"], cfg.text_lstm_hidden or cfg.text_hidden, cfg.text_hidden, cfg.dropout,
                through_padding=cfg.text_encoder == "lstm_padded",
            )
        else:
            self.text_encoder = PooledMLPEncoder(dims["text"], cfg.text_hidden, cfg.dropout)
        self.audio_encoder = PooledMLPEncoder(dims["audio"], cfg.audio_hidden, cfg.dropout)
        self.vision_encoder = PooledMLPEncoder(dims["vision"], cfg.vision_hidden, cfg.dropout)
        fused = (cfg.text_hidden + 1) * (cfg.audio_hidden + 1) * (cfg.vision_hidden + 1)
        self.head = nn.Sequential(
            WideDropout(cfg.fusion_dropout),  # the fused tensor is ~140k wide on MOSI
            nn.Linear(fused, cfg.fusion_hidden),
            nn.ReLU(),
            nn.Linear(cfg.fusion_hidden, cfg.fusion_hidden),
            nn.ReLU(),
            nn.Linear(cfg.fusion_hidden, info.output_dim),
        )

    def forward(self, batch: Batch) -> ModelOutput:
        z_text = append_one(self.text_encoder(batch.text, batch.text_mask))  # [B, H_t+1]
        z_audio = append_one(self.audio_encoder(batch.audio, batch.audio_mask))  # [B, H_a+1]
        z_vision = append_one(self.vision_encoder(batch.vision, batch.vision_mask))  # [B, H_v+1]
        fused = torch.einsum("bt,ba,bv->btav", z_text, z_audio, z_vision).flatten(1)
        return task_output(self.head(fused), batch, self.info)
