"""LF-DNN: late-fusion deep network (the MMSA baseline of that name).

Each modality is pooled over its real frames and encoded by its own MLP; the three vectors are
concatenated and an MLP head predicts.

Shapes: text/audio/vision [B, L_m, D_m] -> per-modality [B, H_m] -> concat [B, H_t+H_a+H_v]
-> head [B, fusion_hidden] -> [B, output_dim].

Deviations from MMSA's LF_DNN: no BatchNorm on the pooled inputs (features are standardised by
the loader; BatchNorm breaks single-sample training batches); masked mean pooling over time.

Option `context` [ours, after bc-LSTM]: a bidirectional LSTM over the utterances of each video
(`ContextLSTM`, [B, H_t+H_a+H_v] -> same size) before the head; the trainer then batches whole
videos. Meant for utterance-level data (mosi-poria). Off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.models.base import task_output
from msakit.modules.context import ContextLSTM
from msakit.modules.encoders import PooledMLPEncoder
from msakit.registry import register_model
from msakit.validated import ModelConfig


@dataclass
class LFDNNConfig(ModelConfig):
    text_hidden: int = 64
    audio_hidden: int = 32
    vision_hidden: int = 32
    fusion_hidden: int = 64
    dropout: float = 0.3
    """Dropout on the pooled inputs of each modality encoder."""
    fusion_dropout: float = 0.3
    """Dropout on the concatenated modality vectors."""
    context: bool = False
    """Put a bidirectional LSTM over each video's utterances (ContextLSTM) before the head; the
    model then trains on whole videos (needs data whose loader knows the videos: mosi-poria, MMSA
    ids "video$_$clip", MulT ids [video, clip, ...]; other data are refused)."""
    context_hidden: int = 64
    """Hidden size of the context BiLSTM (used only with `context`)."""

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.text_hidden": [32, 64, 128, 256],
            "model.audio_hidden": [8, 16, 32, 64],
            "model.vision_hidden": [8, 16, 32, 64],
            "model.fusion_hidden": [32, 64, 128, 256],
            "model.dropout": {"low": 0.0, "high": 0.5},
            "model.fusion_dropout": {"low": 0.0, "high": 0.5},
        }

    @classmethod
    def tiny(cls) -> LFDNNConfig:
        return cls(text_hidden=8, audio_hidden=4, vision_hidden=4, fusion_hidden=8)


@register_model("lf_dnn", config=LFDNNConfig)
class LFDNN(nn.Module):
    """LF-DNN: per-modality MLP encoders, concatenation, MLP head."""

    def __init__(self, cfg: LFDNNConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        hidden = {"text": cfg.text_hidden, "audio": cfg.audio_hidden, "vision": cfg.vision_hidden}
        self.encoders = nn.ModuleDict(
            {m: PooledMLPEncoder(info.feature_dims[m], hidden[m], cfg.dropout) for m in MODALITIES}
        )
        fused = sum(hidden.values())
        self.context = None
        if cfg.context:
            self.context = ContextLSTM(fused, cfg.context_hidden, fused, dropout=cfg.fusion_dropout)
            self.whole_videos = True  # the trainer batches whole videos (Batch.group)
        self.head = nn.Sequential(
            nn.Dropout(cfg.fusion_dropout),
            nn.Linear(fused, cfg.fusion_hidden),
            nn.ReLU(),
            nn.Linear(cfg.fusion_hidden, info.output_dim),
        )

    def forward(self, batch: Batch) -> ModelOutput:
        encoded = [self.encoders[m](batch.features(m), batch.mask(m)) for m in MODALITIES]
        h = torch.cat(encoded, dim=-1)  # [B, H_t+H_a+H_v]
        if self.context is not None:
            h = self.context(h, batch.group)
        return task_output(self.head(h), batch, self.info)
