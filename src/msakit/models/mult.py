"""MulT: Multimodal Transformer (Tsai et al., ACL 2019, "Multimodal Transformer for Unaligned
Multimodal Language Sequences"; official code yaohungt/Multimodal-Transformer, MMSA's MULT).

Idea: no alignment between modalities is needed. Each target modality is repeatedly attended
to the two other (source) modalities by directional cross-modal transformers (six of them:
text<-audio, text<-vision, audio<-text, audio<-vision, vision<-text, vision<-audio); the two
streams of each target are concatenated and refined by a self-attention transformer, and the
three target summaries feed a residual MLP head.

Shapes (d = `dim`):
    x_m [B, L_m, D_m] -> Conv1d(D_m -> d, kernel k_m) -> [B, L_m, d]      (L_m may differ)
    target t, source s: CrossModalTransformer(x_t, x_s) -> [B, L_t, d]
    [t<-s1 ; t<-s2] [B, L_t, 2d] -> self-attention transformer -> masked mean -> [B, 2d]
    concat over targets [B, 6d] -> h + Linear(ReLU(Linear(h))) -> Linear -> [B, output_dim]
Works on word-aligned data, unaligned data (a different length per modality) and utterance
data (length 1).

Deviations:
- masked MEAN pooling over the target's real frames instead of the last time step: with padded
  batches the release's last step is a padding frame for every shorter sequence.
- key-padding masks in every attention (padding frames are invisible, predictions do not depend
  on padding); no future ("causal") mask, which the release applies by default and which, with
  masked pooling over all frames, has no purpose.
- the Conv1d projection uses 'same' padding (odd kernel, padding frames zeroed first) instead of
  the release's unpadded convolution, which shortens each sequence by k - 1 and fails on
  sequences shorter than the kernel (length-1 utterance data).
- modalities whose feature size already equals d are still projected (the release skips the
  convolution then).
- sinusoidal positions count 1..L for every frame (the release's fairseq code treats frames whose
  first feature is exactly 0 as padding and gives them no position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.models.base import task_output
from msakit.modules.attention import CrossModalTransformer
from msakit.modules.dropout import WideDropout
from msakit.modules.pooling import masked_mean
from msakit.registry import register_model
from msakit.validated import ModelConfig


@dataclass
class MulTConfig(ModelConfig):
    dim: int = 40
    """Hidden size d of every cross-modal transformer (paper: 40)."""
    num_heads: int = 10
    """Attention heads; must divide `dim` (paper: 10 on MOSI, 8 on MOSEI)."""
    layers: int = 4
    """Cross-modal blocks per directional transformer (paper: D = 4)."""
    self_layers: int = 4
    """Layers of each target's self-attention transformer (release: max(layers, 3))."""
    text_kernel: int = 1
    """Conv1d kernel of the text projection (odd; paper MOSI: 1 or 3)."""
    audio_kernel: int = 3
    vision_kernel: int = 3
    text_dropout: float = 0.2
    """Dropout on the text input features (paper: textual embedding dropout)."""
    attn_dropout: float = 0.2
    """Attention dropout when text is the source, and in the self-attention transformers."""
    attn_dropout_audio: float = 0.0
    """Attention dropout when audio is the source."""
    attn_dropout_vision: float = 0.0
    """Attention dropout when vision is the source."""
    relu_dropout: float = 0.1
    res_dropout: float = 0.1
    embed_dropout: float = 0.25
    """Dropout after adding positions to the scaled inputs of every transformer."""
    output_dropout: float = 0.1
    """Dropout inside the residual head."""

    def __post_init__(self) -> None:
        for name in ("text_kernel", "audio_kernel", "vision_kernel"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"model.{name} must be an odd positive integer, got {k}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must divide model.dim ({self.dim})")
        if self.layers < 1 or self.self_layers < 1:
            raise ValueError("model.layers and model.self_layers must be >= 1")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.dim": [30, 40, 50],  # divisible by num_heads=10
            "model.layers": {"low": 2, "high": 5},
            "model.attn_dropout": {"low": 0.0, "high": 0.3},
            "model.relu_dropout": {"low": 0.0, "high": 0.3},
            "model.res_dropout": {"low": 0.0, "high": 0.3},
            "model.embed_dropout": {"low": 0.0, "high": 0.4},
            "model.output_dropout": {"low": 0.0, "high": 0.3},
        }

    @classmethod
    def tiny(cls) -> MulTConfig:
        return cls(dim=8, num_heads=2, layers=1, self_layers=1, audio_kernel=3, vision_kernel=1)


@register_model("mult", config=MulTConfig)
class MulT(nn.Module):
    """MulT: six directional cross-modal transformers, self-attention per target, residual head."""

    #: forward writes no module state and draws only through dropout.keep_mask (WideDropout and
    #: the attention's mask): a window's batches may run at once (train.window_threads)
    concurrent_batches = True

    def __init__(self, cfg: MulTConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.dim
        kernels = {"text": cfg.text_kernel, "audio": cfg.audio_kernel, "vision": cfg.vision_kernel}
        self.projections = nn.ModuleDict({
            m: nn.Conv1d(info.feature_dims[m], d, kernels[m], padding=kernels[m] // 2, bias=False)
            for m in MODALITIES
        })
        source_dropout = {
            "text": cfg.attn_dropout, "audio": cfg.attn_dropout_audio, "vision": cfg.attn_dropout_vision
        }
        common = dict(relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout,
                      embed_dropout=cfg.embed_dropout)
        # key "<target>_<source>": the target attends to the source
        self.cross = nn.ModuleDict({
            f"{t}_{s}": CrossModalTransformer(d, cfg.num_heads, cfg.layers,
                                              attn_dropout=source_dropout[s], **common)
            for t in MODALITIES for s in MODALITIES if s != t
        })
        self.memory = nn.ModuleDict({
            t: CrossModalTransformer(2 * d, cfg.num_heads, cfg.self_layers,
                                     attn_dropout=cfg.attn_dropout, **common)
            for t in MODALITIES
        })
        combined = 6 * d
        self.proj1 = nn.Linear(combined, combined)
        self.proj2 = nn.Linear(combined, combined)
        self.output_dropout = WideDropout(cfg.output_dropout)
        self.text_dropout = WideDropout(cfg.text_dropout)
        self.out_layer = nn.Linear(combined, info.output_dim)

    def project(self, m: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, D_m] -> [B, L, d]; padding frames are zeroed first so they cannot reach the
        real frames through the convolution's receptive field."""
        x = x.masked_fill(~mask[..., None], 0.0)
        if m == "text":
            x = self.text_dropout(x)
        return self.projections[m](x.transpose(1, 2)).transpose(1, 2)

    def forward(self, batch: Batch) -> ModelOutput:
        masks = {m: batch.mask(m) for m in MODALITIES}
        x = {m: self.project(m, batch.features(m), masks[m]) for m in MODALITIES}  # [B, L_m, d]
        summaries = []
        for t in MODALITIES:
            streams = [self.cross[f"{t}_{s}"](x[t], masks[t], x[s], masks[s])
                       for s in MODALITIES if s != t]
            h = self.memory[t](torch.cat(streams, dim=-1), masks[t])  # [B, L_t, 2d]
            summaries.append(masked_mean(h, masks[t]))  # [B, 2d]
        h = torch.cat(summaries, dim=-1)  # [B, 6d]
        h = h + self.proj2(self.output_dropout(F.relu(self.proj1(h))))
        return task_output(self.out_layer(h), batch, self.info)
