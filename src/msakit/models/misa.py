"""MISA: Modality-Invariant and -Specific Representations (Hazarika et al., ACM MM 2020, "MISA:
Modality-Invariant and -Specific Representations for Multimodal Sentiment Analysis"; official
code declare-lab/MISA, MMSA's MISA).

Idea: project each modality's utterance vector u_m into a SHARED subspace (one encoder for all
modalities, pulled together by a CMD similarity loss) and a PRIVATE subspace per modality (kept
orthogonal to the shared one and to the other privates by a soft orthogonality loss); a decoder
must reconstruct u_m from shared + private so neither collapses. A transformer reads the six
vectors and a head predicts.

Shapes (H = `hidden`):
    text [B, L_t, D_t] -> masked mean ('mlp', as MMSA does with BERT states) or two stacked
        packed BiLSTMs ('lstm') -> Linear -> ReLU -> LayerNorm -> u_t [B, H]
    audio/vision [B, L_m, D_m] -> BiLSTM -> LayerNorm -> BiLSTM (packed; final states of both
        layers and directions, [B, 4 h_m]) -> Linear -> ReLU -> LayerNorm -> u_m [B, H]
    shared s_m = sigmoid(Linear_shared(u_m)), private p_m = sigmoid(Linear_m(u_m))   [B, H]
    reconstruction r_m = Linear_m(s_m + p_m)                                         [B, H]
    stack (p_t, p_v, p_a, s_t, s_v, s_a) [B, 6, H] -> 1-layer transformer (2 heads) -> flatten
        [B, 6H] -> Linear(6H, 3H) -> Dropout -> ReLU -> Linear(3H, output_dim)
Losses (named, weighted): "cmd" = sim_weight * mean of CMD(5 moments) over the three pairs of
shared vectors; "diff" = diff_weight * sum of the orthogonality loss over (p_m, s_m) for each m
and over the three pairs of privates; "recon" = recon_weight * mean over m of MSE(r_m, u_m).
A weight of 0 switches its term off (ablation).

Deviations:
- audio/vision LSTMs are packed with their OWN lengths (MMSA packs them with the text lengths,
  wrong on unaligned data).
- the task loss is the shared one (L1 for regression; MMSA's MISA trains with MSE).
- text features are used as given (frozen BERT states in MMSA pickles); MISA fine-tunes BERT.
- no adversarial discriminator (MISA's alternative to CMD, off in its released configs) and no
  shared/private discriminator (built but never put in a loss by the release).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from msakit.batch import Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.losses import cmd, orthogonality_loss
from msakit.models.base import check_choice, task_output
from msakit.modules.pooling import masked_mean
from msakit.registry import register_model
from msakit.validated import ModelConfig, bounds

ORDER = ("text", "vision", "audio")  # MISA's stacking order of the six vectors


@dataclass
class MISAConfig(ModelConfig):
    hidden: int = 128
    """Size H of the utterance, shared and private vectors."""
    text_encoder: str = "mlp"
    """'mlp': masked mean of the text features (MMSA's MISA with BERT states) then the projection;
    'lstm': the same two stacked BiLSTMs as audio/vision (MISA with GloVe)."""
    rnn_hidden: int = field(default=0, metadata=bounds(0))
    """Hidden size of each BiLSTM; 0 = the modality's feature size (as in MISA)."""
    dropout: float = 0.2
    """Dropout in the prediction head."""
    transformer_ff: int = 2048
    """Feed-forward width of the fusion transformer (MISA uses torch's default, 2048)."""
    transformer_heads: int = 2
    transformer_dropout: float = 0.1
    sim_weight: float = 1.0
    """Weight of the CMD similarity loss between shared vectors ("cmd"); 0 = off."""
    diff_weight: float = 0.3
    """Weight of the soft orthogonality loss ("diff"); 0 = off."""
    recon_weight: float = 1.0
    """Weight of the reconstruction loss ("recon"); 0 = off."""
    cmd_moments: int = 5

    def __post_init__(self) -> None:
        check_choice("model.text_encoder", self.text_encoder, ("mlp", "lstm"))
        if self.hidden % self.transformer_heads:
            raise ValueError("model.transformer_heads must divide model.hidden")
        for name in ("sim_weight", "diff_weight", "recon_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0")
        if self.cmd_moments < 1:
            raise ValueError("model.cmd_moments must be >= 1")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.hidden": [64, 128, 256],
            "model.dropout": {"low": 0.0, "high": 0.5},
            "model.sim_weight": {"low": 0.1, "high": 3.0, "log": True},
            "model.diff_weight": {"low": 0.03, "high": 1.0, "log": True},
            "model.recon_weight": {"low": 0.1, "high": 3.0, "log": True},
        }

    @classmethod
    def tiny(cls) -> MISAConfig:
        return cls(hidden=8, rnn_hidden=4, transformer_ff=16)


class StackedBiLSTM(nn.Module):
    """MISA's sequence encoder: BiLSTM -> LayerNorm -> BiLSTM, both packed by length.

    x [B, L, D_in], mask [B, L] -> [B, 4 * hidden]: the final hidden states of both layers and
    both directions.
    """

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.rnn1 = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.rnn2 = nn.LSTM(2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 4 * hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1).clamp_min(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out1, (h1, _) = self.rnn1(packed)  # h1 [2, B, hidden]
        out1, _ = pad_packed_sequence(out1, batch_first=True)
        packed = pack_padded_sequence(self.norm(out1), lengths, batch_first=True, enforce_sorted=False)
        _, (h2, _) = self.rnn2(packed)
        return torch.cat([h1[0], h1[1], h2[0], h2[1]], dim=-1)  # [B, 4 * hidden]


def _project(in_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.LayerNorm(hidden))


@register_model("misa", config=MISAConfig)
class MISA(nn.Module):
    """MISA: shared/private subspaces with CMD, orthogonality and reconstruction losses."""

    def __init__(self, cfg: MISAConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        dims, h = info.feature_dims, cfg.hidden
        self.sequence_encoders = nn.ModuleDict()
        projected_in = {}
        for m in ORDER:
            if m == "text" and cfg.text_encoder == "mlp":
                projected_in[m] = dims[m]
                continue
            encoder = StackedBiLSTM(dims[m], cfg.rnn_hidden or dims[m])
            self.sequence_encoders[m] = encoder
            projected_in[m] = encoder.out_dim
        self.project = nn.ModuleDict({m: _project(projected_in[m], h) for m in ORDER})
        self.private = nn.ModuleDict({m: nn.Sequential(nn.Linear(h, h), nn.Sigmoid()) for m in ORDER})
        self.shared = nn.Sequential(nn.Linear(h, h), nn.Sigmoid())
        self.recon = nn.ModuleDict({m: nn.Linear(h, h) for m in ORDER})
        self.fusion_transformer = nn.TransformerEncoderLayer(
            d_model=h, nhead=cfg.transformer_heads, dim_feedforward=cfg.transformer_ff,
            dropout=cfg.transformer_dropout, batch_first=True,
        )
        self.head = nn.Sequential(
            nn.Linear(6 * h, 3 * h), nn.Dropout(cfg.dropout), nn.ReLU(), nn.Linear(3 * h, info.output_dim)
        )

    def utterance(self, m: str, batch: Batch) -> torch.Tensor:
        """u_m [B, H]: the modality's projected utterance vector."""
        x, mask = batch.features(m), batch.mask(m)
        if m in self.sequence_encoders:
            pooled = self.sequence_encoders[m](x, mask)
        else:
            pooled = masked_mean(x, mask)
        return self.project[m](pooled)

    def forward(self, batch: Batch) -> ModelOutput:
        cfg = self.cfg
        u = {m: self.utterance(m, batch) for m in ORDER}
        private = {m: self.private[m](u[m]) for m in ORDER}
        shared = {m: self.shared(u[m]) for m in ORDER}
        tokens = torch.stack([private[m] for m in ORDER] + [shared[m] for m in ORDER], dim=1)
        fused = self.fusion_transformer(tokens).flatten(1)  # [B, 6, H] -> [B, 6H]

        losses = {}
        if cfg.sim_weight > 0:
            pairs = (("text", "vision"), ("text", "audio"), ("audio", "vision"))
            sim = sum(cmd(shared[a], shared[b], cfg.cmd_moments) for a, b in pairs) / 3.0
            losses["cmd"] = cfg.sim_weight * sim
        if cfg.diff_weight > 0:
            diff = sum(orthogonality_loss(private[m], shared[m]) for m in ORDER)
            diff = diff + orthogonality_loss(private["audio"], private["text"])
            diff = diff + orthogonality_loss(private["audio"], private["vision"])
            diff = diff + orthogonality_loss(private["text"], private["vision"])
            losses["diff"] = cfg.diff_weight * diff
        if cfg.recon_weight > 0:
            recon = sum(
                (self.recon[m](shared[m] + private[m]) - u[m]).pow(2).mean() for m in ORDER
            ) / 3.0
            losses["recon"] = cfg.recon_weight * recon
        return task_output(self.head(fused), batch, self.info, extra_losses=losses)
