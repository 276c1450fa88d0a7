"""bc-LSTM: contextual utterance-level sentiment (Poria et al., ACL 2017, "Context-Dependent
Sentiment Analysis in User-Generated Videos"; official code declare-lab/multimodal-deep-learning
bc-LSTM/lstm.py, also soujanyaporia/multimodal-sentiment-analysis).

Idea: the utterances of one video are not independent; a bidirectional LSTM over the sequence of
a video's utterance vectors lets each prediction see its neighbours. Strongest known family on
utterance-level features (mosi-poria).

Shapes (U_v utterances of video v; the batch holds whole videos, `Batch.group` says which):
    each modality [B, L_m, D_m] -> masked mean over its own frames -> [B, D_m]
    'hierarchical' (the paper's): per modality ContextLSTM (BiLSTM(unimodal_hidden) over the
        video -> Linear -> tanh) -> [B, unimodal_out] each -> concat [B, 3 * unimodal_out]
    'concat': concatenate the pooled features [B, D_t + D_a + D_v]
    -> ContextLSTM (BiLSTM(hidden) over the video -> Linear -> ReLU) [B, fusion_out]
    -> dropout -> Linear -> [B, output_dim]: one prediction per utterance.
Each video is packed separately: a video's predictions never depend on the other videos in the
batch nor on padding. Without `Batch.group` every utterance is a video of its own (the trainer's
`to_loader` refuses data that do not say which clips form a video).

Deviations:
- trained end to end in one stage: the release first trains each unimodal bc-LSTM with its own
  softmax head, freezes its 100-d activations, then trains the multimodal bc-LSTM on them.
- the shared task loss (L1 for continuous sentiment) replaces the release's 2-class softmax;
  Adam-family optimiser (the trainer's AdamW) instead of Adadelta.
- dropout 0.5 by default after each BiLSTM and dense layer; the release's Keras Dropout(0.9)
  drops 90% of the units, too strong for joint training (set `dropout: 0.9` to reproduce it).
- sequence-level inputs (MMSA/MulT pickles) are first averaged over their real frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.models.base import check_choice, task_output
from msakit.modules.context import ContextLSTM
from msakit.modules.pooling import masked_mean
from msakit.registry import register_model
from msakit.validated import ModelConfig


@dataclass
class BCLSTMConfig(ModelConfig):
    fusion: str = "hierarchical"
    """'hierarchical': a contextual BiLSTM per modality, then one over their concatenation (paper);
    'concat': one contextual BiLSTM over the concatenated utterance features."""
    unimodal_hidden: int = 300
    """BiLSTM hidden size of each unimodal context stage (release: 300)."""
    unimodal_out: int = 100
    """Dense (tanh) size after each unimodal BiLSTM (release: 100)."""
    unimodal_input_dropout: float = 0.6
    """Dropout on the inputs of the unimodal BiLSTMs (release: LSTM dropout=0.6)."""
    hidden: int = 300
    """BiLSTM hidden size of the multimodal context stage (release: 300)."""
    fusion_out: int = 500
    """Dense (ReLU) size after the multimodal BiLSTM (release: 500)."""
    input_dropout: float = 0.4
    """Dropout on the inputs of the multimodal BiLSTM (release: LSTM dropout=0.4)."""
    dropout: float = 0.5
    """Dropout after each BiLSTM and before the output layer (release: Keras Dropout(0.9))."""

    def __post_init__(self) -> None:
        check_choice("model.fusion", self.fusion, ("hierarchical", "concat"))
        for name in ("unimodal_input_dropout", "input_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1)")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.hidden": [100, 200, 300],
            "model.dropout": {"low": 0.2, "high": 0.6},
            "model.input_dropout": {"low": 0.1, "high": 0.6},
            "model.unimodal_input_dropout": {"low": 0.2, "high": 0.7},
        }

    @classmethod
    def tiny(cls) -> BCLSTMConfig:
        return cls(unimodal_hidden=4, unimodal_out=4, hidden=6, fusion_out=8)


@register_model("bc_lstm", config=BCLSTMConfig)
class BCLSTM(nn.Module):
    """bc-LSTM: bidirectional LSTM over the utterances of each video (contextual, per utterance)."""

    whole_videos = True
    """The trainer batches whole videos (`Batch.group`), predictions stay per utterance."""

    def __init__(self, cfg: BCLSTMConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        dims = info.feature_dims
        if cfg.fusion == "hierarchical":
            self.unimodal = nn.ModuleDict({
                m: ContextLSTM(dims[m], cfg.unimodal_hidden, cfg.unimodal_out,
                               input_dropout=cfg.unimodal_input_dropout, dropout=cfg.dropout,
                               activation="tanh")
                for m in MODALITIES
            })
            fused_in = 3 * cfg.unimodal_out
        else:
            self.unimodal = None
            fused_in = sum(dims[m] for m in MODALITIES)
        self.context = ContextLSTM(fused_in, cfg.hidden, cfg.fusion_out,
                                   input_dropout=cfg.input_dropout, dropout=cfg.dropout,
                                   activation="relu")
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.fusion_out, info.output_dim))

    def forward(self, batch: Batch) -> ModelOutput:
        pooled = {m: masked_mean(batch.features(m), batch.mask(m)) for m in MODALITIES}  # [B, D_m]
        if self.unimodal is not None:
            parts = [self.unimodal[m](pooled[m], batch.group) for m in MODALITIES]
        else:
            parts = [pooled[m] for m in MODALITIES]
        h = self.context(torch.cat(parts, dim=-1), batch.group)  # [B, fusion_out]
        return task_output(self.head(h), batch, self.info)
