"""Text-only baseline: a fine-tuned BERT-style encoder and a linear head on the raw transcripts.

The MIntRec "text" baseline (Zhang et al., ACM MM 2022: BERT-base fine-tuned on the transcripts,
[CLS] -> linear classifier; published test Acc/F1/P/R 70.88/67.40/68.07/67.44) with any encoder
that `msakit.modules.text_encoder.TextEncoder` can load offline: the packaged all-MiniLM-L6-v2
(`encoder: minilm`, the default), a local BERT folder, or the random "tiny" BERT (tests).

Shapes: Batch.texts (B strings) -> tokens ids/mask [B, T] -> encoder -> states [B, T, H]
-> pooled [B, H] (the source's own pooling: mean for all-MiniLM-L6-v2, [CLS] for BERT; or
`pooling`) -> dropout -> Linear(H, output_dim).

The encoder trains at its own learning rate `text_lr` (`parameter_groups`); the head at train.lr.

Deviations / [ours]:
- the default encoder is all-MiniLM-L6-v2 (6 layers, hidden 384), not BERT-base (12 layers, 768):
  it is the one encoder that can be installed offline here; expect lower scores than BERT-base.
- data without raw transcripts (Batch.texts is None; e.g. feature-only pickles): the encoder
  reads the text FEATURE frames instead, as input embeddings: [CLS] embedding followed by
  Linear(D_t -> H)(frames), masked by the text mask. This keeps the model usable (and testable)
  on every dataset; it is not a MIntRec protocol. Which input a batch used is logged
  ("input_texts" 1/0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from msakit.batch import Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.models.base import check_choice, task_output
from msakit.modules.pooling import masked_mean
from msakit.modules.text_encoder import TextEncoder
from msakit.registry import register_model
from msakit.validated import ModelConfig, bounds


@dataclass
class TextBertConfig(ModelConfig):
    encoder: str = "minilm"
    """"minilm" (packaged all-MiniLM-L6-v2), "tiny" (random tiny BERT) or a local model folder."""
    max_tokens: int = 50
    """Tokens per transcript, [CLS]/[SEP] included."""
    pooling: str = ""
    """"" = the encoder's own sentence pooling; "cls" or "mean"."""
    dropout: float = 0.1
    """Dropout on the pooled vector."""
    text_lr: float = 2e-5
    """Learning rate of the encoder (the head uses train.lr)."""
    freeze: bool = False
    """Keep the encoder fixed (a linear probe on frozen features)."""
    seed: int = field(default=0, metadata=bounds(0, 2**63 - 1))
    """Seed of the random weights of the "tiny" encoder (ignored for loaded weights)."""
    length_chunk: int = field(default=0, metadata=bounds(0))
    """[ours] Run the encoder on the batch's texts sorted by length, this many at a time, each
    chunk padded only to its own longest text (0 = the whole batch at once). Same outputs and
    gradients (up to float rounding), less padding: ~1.6x faster on CPU with 8 on MOSEI."""

    def __post_init__(self) -> None:
        check_choice("model.pooling", self.pooling, ("", "cls", "mean"))
        if self.max_tokens < 3:
            raise ValueError("model.max_tokens must be >= 3")
        if self.text_lr <= 0:
            raise ValueError("model.text_lr must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must be in [0, 1)")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.dropout": {"low": 0.0, "high": 0.3},
            "model.text_lr": {"low": 1e-5, "high": 1e-4, "log": True},
        }

    @classmethod
    def tiny(cls) -> TextBertConfig:
        return cls(encoder="tiny", max_tokens=24, dropout=0.0)


@register_model("text_bert", config=TextBertConfig)
class TextBert(nn.Module):
    """Text-only baseline: fine-tuned offline BERT-style encoder + linear head on raw transcripts."""

    def __init__(self, cfg: TextBertConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.encoder = TextEncoder(cfg.encoder, max_length=cfg.max_tokens, seed=cfg.seed)
        if cfg.freeze:
            self.encoder.freeze()
        hidden = self.encoder.hidden_size
        self.pooling = cfg.pooling or self.encoder.pooling
        # used only when a batch has no transcripts (see the module docstring)
        self.feature_embed = nn.Linear(info.feature_dims["text"], hidden)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(hidden, info.output_dim))

    def train(self, mode: bool = True) -> TextBert:
        super().train(mode)
        if self.cfg.freeze:
            self.encoder.eval()  # a frozen encoder never runs dropout
        return self

    def parameter_groups(self, train_cfg) -> list[dict]:
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        own = {id(p) for p in self.encoder.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        groups = [{"params": rest}]
        if encoder:
            groups.append({"params": encoder, "lr": self.cfg.text_lr})
        return groups

    def states(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output [B, T, H] and its mask [B, T]: from Batch.texts, else the text features."""
        device = self.head[1].weight.device
        if batch.texts is not None:
            ids, mask = self.encoder.tokenize(batch.texts, device)
            chunk = self.cfg.length_chunk
            if not chunk or chunk >= len(ids):
                return self.encoder.run(ids, mask)[-1], mask
            order = mask.sum(1).argsort()
            pieces = []
            for part in order.split(chunk):
                steps = int(mask[part].sum(1).max())
                states = self.encoder.run(ids[part, :steps], mask[part, :steps])[-1]  # [b, steps, H]
                pieces.append(nn.functional.pad(states, (0, 0, 0, ids.shape[1] - steps)))  # zeros where masked
            return torch.cat(pieces)[order.argsort()], mask  # batch order: [B, T, H]
        frames = self.feature_embed(batch.text)  # [B, L_t, H]
        cls_id = torch.full((frames.shape[0], 1), self._cls_id(), dtype=torch.long, device=device)
        cls = self.encoder.model.embeddings.word_embeddings(cls_id)  # [B, 1, H]
        embedded = self.encoder.model.embeddings(inputs_embeds=torch.cat([cls, frames], dim=1))
        mask = torch.cat([torch.ones_like(batch.text_mask[:, :1]), batch.text_mask], dim=1)
        hidden = embedded
        for index in range(self.encoder.num_layers):
            hidden = self.encoder.layer(index, hidden, mask)
        return hidden, mask

    def _cls_id(self) -> int:
        tokenizer = self.encoder.tokenizer
        for name in ("cls_id", "cls_token_id", "bos_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                return int(value)
        return 0

    def forward(self, batch: Batch) -> ModelOutput:
        hidden, mask = self.states(batch)
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, mask)  # [B, H]
        logs = {"input_texts": float(batch.texts is not None)}
        return task_output(self.head(pooled), batch, self.info, logs=logs)
