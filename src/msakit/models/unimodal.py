"""Unimodal baseline: one modality through an encoder and an MLP head.

The reference every fusion model must beat (text alone is strong on MOSI). Same training and
evaluation as every other model; the other two modalities are ignored.

Shapes: batch.<modality> [B, L, D] -> encoder [B, hidden] -> head [B, output_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.models.base import check_choice, task_output
from msakit.modules.encoders import build_encoder
from msakit.registry import register_model
from msakit.validated import ModelConfig


@dataclass
class UnimodalConfig(ModelConfig):
    modality: str = "text"
    """Which modality to use: text, audio or vision."""
    encoder: str = "mlp"
    """'mlp' (masked mean over time + MLP) or 'lstm' (packed LSTM)."""
    hidden: int = 64
    dropout: float = 0.2

    def __post_init__(self) -> None:
        check_choice("model.modality", self.modality, MODALITIES)
        check_choice("model.encoder", self.encoder, ("mlp", "lstm"))

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {"model.hidden": [32, 64, 128, 256], "model.dropout": {"low": 0.0, "high": 0.5}}

    @classmethod
    def tiny(cls) -> UnimodalConfig:
        return cls(hidden=8)


@register_model("unimodal", config=UnimodalConfig)
class Unimodal(nn.Module):
    """Unimodal baseline: one modality (config `modality`), encoder + MLP head."""

    def __init__(self, cfg: UnimodalConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.encoder = build_encoder(
            cfg.encoder, info.feature_dims[cfg.modality], cfg.hidden, cfg.dropout
        )
        self.head = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, info.output_dim)
        )

    def forward(self, batch: Batch) -> ModelOutput:
        m = self.cfg.modality
        encoded = self.encoder(batch.features(m), batch.mask(m))  # [B, hidden]
        return task_output(self.head(encoded), batch, self.info)
