"""Self-MM: self-supervised multi-task learning (Yu et al., AAAI 2021, "Learning Modality-Specific
Representations with Self-Supervised Multi-Task Learning for Multimodal Sentiment Analysis";
official code thuiar/Self-MM, MMSA's SELF_MM).

Idea: besides the multimodal head, one head per modality is trained on a unimodal label that the
Unimodal Label Generation Module (ULGM) derives from the multimodal label, without any
unimodal annotation. For each sample and modality s, with class centres of the stored head
features (positive / negative samples of that modality's current labels):
    alpha_s = (||F_s - C_s^neg|| - ||F_s - C_s^pos||) / (||F_s - C_s^pos|| + eps)   (same for m = fusion)
    y_s = 0.5 * y_m * alpha_s / alpha_m + 0.5 * (y_m + alpha_s - alpha_m), clamped to [-H, H]
and the stored label moves with the paper's momentum rule, at epoch n >= 2:
    y_s <- (n - 1) / (n + 1) * y_s + 2 / (n + 1) * y_s(new).
The unimodal losses are weighted per sample by tanh(|y_s - y_m|) (so they are exactly 0 while
y_s = y_m, i.e. during the first epoch), the multimodal one is plain L1.

Shapes: text [B, L_t, D_t] -> masked mean + MLP ('mlp') or length-aware LSTM -> [B, text_out];
audio/vision [B, L_m, D_m] -> length-aware LSTM -> dropout -> Linear -> [B, audio_out / vision_out];
fusion head on the concatenation, one head per modality:
    dropout -> Linear -> ReLU = the head's feature F [B, post_dim] -> Linear -> ReLU -> Linear.
Memory (registered buffers, so checkpoints and resumes carry it; sized by info.train_size):
    label_memory [4, N] (fusion = true label, text, audio, vision), seen [N],
    feature_<name> [N, post_dim], centers_<name> [2, post_dim] (positive, negative), epochs_done.
It is only written in training mode, at rows `batch.index` (the trainer's train split).
Order per training step, as in the release: loss with the stored labels -> new labels from this
step's features and the current centres (epoch >= 2) -> store features -> recompute centres.

The centres: the paper and release recompute them every step as the mean of the stored features
of the samples whose current label is > 0 (positive; >= 0 when exclude_zero is false) or < 0.
`center_momentum` > 0 instead moves them as an EMA towards that mean [ours, off by default].

Classification / multi-binary tasks: the label generation is defined for regression only; there
the three unimodal heads are trained on the TRUE labels with the task loss (weight 1) and no
memory is kept [ours].

Deviations:
- text features are used as given (frozen BERT states in MMSA pickles, pooled); Self-MM
  fine-tunes BERT and uses its [CLS] vector (768-d).
- labels are initialised lazily: a sample's four labels are set to its true label the first
  time it is seen in training (the release initialises all of them before epoch 1; the same,
  since label updates start at epoch 2).
- MMSA accumulates gradients over `update_epochs` mini-batches; the trainer here steps every
  batch (use a larger data.batch_size for the same effective batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.losses import shape_prediction, task_loss
from msakit.models.base import check_choice, task_output
from msakit.modules.encoders import LSTMEncoder, build_encoder
from msakit.registry import register_model
from msakit.validated import ModelConfig

HEADS = ("fusion", "text", "audio", "vision")  # rows of label_memory
EPS = 1e-8


@dataclass
class SelfMMConfig(ModelConfig):
    text_encoder: str = "mlp"
    """'mlp' (masked mean + MLP) or 'lstm' (length-aware LSTM) over the text features."""
    text_out: int = 128
    """Size of the text vector (Self-MM: BERT's 768-d [CLS])."""
    text_dropout: float = 0.1
    audio_lstm_hidden: int = 16
    audio_out: int = 16
    audio_dropout: float = 0.0
    """Dropout after the audio LSTM (MMSA: a_lstm_dropout)."""
    vision_lstm_hidden: int = 32
    vision_out: int = 32
    vision_dropout: float = 0.0
    post_fusion_dim: int = 128
    post_text_dim: int = 32
    post_audio_dim: int = 16
    post_vision_dim: int = 32
    post_fusion_dropout: float = 0.0
    post_text_dropout: float = 0.1
    post_audio_dropout: float = 0.1
    post_vision_dropout: float = 0.0
    label_bound: float = 3.0
    """H: generated labels are clamped to [-H, H] (MOSI/MOSEI 3, SIMS 1)."""
    exclude_zero: bool = True
    """Positive centre from labels > 0 (True, MMSA) or >= 0."""
    center_momentum: float = 0.0
    """0 = centres are the mean of the stored features (paper); m > 0: EMA with momentum m [ours]."""
    audio_lr: float = 0.0
    """Learning rate of the audio encoder; 0 = train.lr (MMSA: learning_rate_audio)."""
    vision_lr: float = 0.0
    """Learning rate of the vision encoder; 0 = train.lr (MMSA: learning_rate_video)."""

    def __post_init__(self) -> None:
        check_choice("model.text_encoder", self.text_encoder, ("mlp", "lstm"))
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError("model.center_momentum must be in [0, 1)")
        if self.label_bound <= 0:
            raise ValueError("model.label_bound must be > 0")
        if self.audio_lr < 0 or self.vision_lr < 0:
            raise ValueError("model.audio_lr / model.vision_lr must be >= 0 (0 = train.lr)")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.text_out": [64, 128, 256],
            "model.post_fusion_dim": [64, 128, 256],
            "model.text_dropout": {"low": 0.0, "high": 0.5},
            "model.post_fusion_dropout": {"low": 0.0, "high": 0.5},
            "model.post_text_dropout": {"low": 0.0, "high": 0.5},
        }

    @classmethod
    def tiny(cls) -> SelfMMConfig:
        return cls(text_out=8, audio_lstm_hidden=4, audio_out=4, vision_lstm_hidden=4, vision_out=4,
                   post_fusion_dim=8, post_text_dim=4, post_audio_dim=4, post_vision_dim=4)


class _Head(nn.Module):
    """dropout -> Linear -> ReLU (the feature F) -> Linear -> ReLU -> Linear(out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.feature = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.feature(x)
        return feature, self.out(feature)


@register_model("self_mm", config=SelfMMConfig)
class SelfMM(nn.Module):
    """Self-MM: multimodal head + three unimodal heads on self-generated unimodal labels."""

    ddp_unsupported = "its label memory is updated in the forward pass, per process"

    zero_grad_at_start = ("text_head.", "audio_head.", "vision_head.")
    """Parameter prefixes whose gradient is legitimately all-zero on a fresh model's first step
    (regression): the unimodal loss weights tanh(|y_s - y_m|) are 0 until labels are generated."""

    def __init__(self, cfg: SelfMMConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        dims, out = info.feature_dims, info.output_dim
        self.text_encoder = build_encoder(cfg.text_encoder, dims["text"], cfg.text_out, cfg.text_dropout)
        self.audio_encoder = LSTMEncoder(dims["audio"], cfg.audio_lstm_hidden, cfg.audio_out,
                                         cfg.audio_dropout)
        self.vision_encoder = LSTMEncoder(dims["vision"], cfg.vision_lstm_hidden, cfg.vision_out,
                                          cfg.vision_dropout)
        self.fusion_head = _Head(cfg.text_out + cfg.audio_out + cfg.vision_out, cfg.post_fusion_dim,
                                 out, cfg.post_fusion_dropout)
        self.text_head = _Head(cfg.text_out, cfg.post_text_dim, out, cfg.post_text_dropout)
        self.audio_head = _Head(cfg.audio_out, cfg.post_audio_dim, out, cfg.post_audio_dropout)
        self.vision_head = _Head(cfg.vision_out, cfg.post_vision_dim, out, cfg.post_vision_dropout)
        self.generates_labels = info.task == "regression"
        if self.generates_labels:
            n = info.train_size
            self.post_dims = {"fusion": cfg.post_fusion_dim, "text": cfg.post_text_dim,
                              "audio": cfg.post_audio_dim, "vision": cfg.post_vision_dim}
            self.register_buffer("label_memory", torch.zeros(len(HEADS), n))
            self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))
            self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
            for name, dim in self.post_dims.items():
                self.register_buffer(f"feature_{name}", torch.zeros(n, dim))
                self.register_buffer(f"centers_{name}", torch.zeros(2, dim))
                self.register_buffer(f"centers_set_{name}", torch.zeros(2, dtype=torch.bool))

    # ------------------------------------------------------------------ optimiser / trainer hooks

    def parameter_groups(self, train_cfg) -> list[dict]:
        """Audio and vision encoders at their own learning rates (when set), the rest at train.lr."""
        groups, taken = [], set()
        for encoder, lr in ((self.audio_encoder, self.cfg.audio_lr), (self.vision_encoder, self.cfg.vision_lr)):
            if lr > 0:
                params = list(encoder.parameters())
                groups.append({"params": params, "lr": lr})
                taken.update(id(p) for p in params)
        groups.append({"params": [p for p in self.parameters() if id(p) not in taken]})
        return groups

    def on_epoch_end(self, epoch: int, valid_metrics: dict) -> dict[str, float]:
        """Advance the epoch counter of the momentum rule; log how far the unimodal labels moved."""
        if not self.generates_labels:
            return {}
        self.epochs_done.fill_(epoch)
        seen = self.seen
        if not seen.any():
            return {}
        fusion = self.label_memory[0, seen]
        return {f"selfmm_label_gap_{m}": float((self.label_memory[i, seen] - fusion).abs().mean())
                for i, m in enumerate(HEADS) if i > 0}

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Batch) -> ModelOutput:
        z = {
            "text": self.text_encoder(batch.text, batch.text_mask),
            "audio": self.audio_encoder(batch.audio, batch.audio_mask),
            "vision": self.vision_encoder(batch.vision, batch.vision_mask),
        }
        features, raw = {}, {}
        features["fusion"], raw["fusion"] = self.fusion_head(torch.cat([z[m] for m in MODALITIES], -1))
        for m in MODALITIES:
            features[m], raw[m] = getattr(self, f"{m}_head")(z[m])

        if not self.generates_labels:
            extra = {f"{m}_aux": task_loss(shape_prediction(raw[m], self.info), batch.labels, self.info)
                     for m in MODALITIES}
            return task_output(raw["fusion"], batch, self.info, extra_losses=extra)

        if not self.training:  # evaluation: the multimodal loss only (as the release), no memory
            return task_output(raw["fusion"], batch, self.info)
        labels = self._prepare_labels(batch)  # [4, B], stored labels before this step's update
        extra = {}
        for i, m in enumerate(HEADS[1:], start=1):
            weight = torch.tanh((labels[i] - labels[0]).abs())  # 0 while y_s == y_m
            prediction = raw[m].squeeze(-1)
            extra[f"{m}_aux"] = (weight * (prediction - labels[i]).abs()).mean()
        self._update_memory(batch.index, {k: v.detach() for k, v in features.items()})
        return task_output(raw["fusion"], batch, self.info, extra_losses=extra)

    # ------------------------------------------------------------------ ULGM (label memory)

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        n = self.label_memory.shape[1]
        if n == 0 or int(index.max()) >= n:
            raise RuntimeError(
                f"self_mm: training sample index {int(index.max())} is outside the label memory "
                f"(info.train_size = {n}); train only on the split the model was built for"
            )
        return index.to(self.label_memory.device)

    @torch.no_grad()
    def _prepare_labels(self, batch: Batch) -> torch.Tensor:
        """Initialise the labels of first-seen samples to the true label; return [4, B] labels."""
        rows = self._rows(batch.index)
        y = batch.labels.to(self.label_memory)
        new = ~self.seen[rows]
        if new.any():
            self.label_memory[:, rows[new]] = y[new].expand(len(HEADS), -1)
            self.seen[rows[new]] = True
        self.label_memory[0, rows] = y  # the fusion label is always the true label
        return self.label_memory[:, rows].clone()

    @torch.no_grad()
    def _update_memory(self, index: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        rows = self._rows(index)
        epoch = int(self.epochs_done) + 1  # the epoch being trained, 1-based
        if epoch > 1:
            self._update_labels(rows, features, epoch)
        for name in HEADS:
            getattr(self, f"feature_{name}")[rows] = features[name].to(self.label_memory)
        self._update_centers()

    def _relative_distance(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        centers = getattr(self, f"centers_{name}")
        d_pos = (feature - centers[0]).norm(dim=-1)
        d_neg = (feature - centers[1]).norm(dim=-1)
        return (d_neg - d_pos) / (d_pos + EPS)

    def _update_labels(self, rows: torch.Tensor, features: dict[str, torch.Tensor], epoch: int) -> None:
        y_m = self.label_memory[0, rows]
        delta_f = self._relative_distance("fusion", features["fusion"].to(y_m))
        bound = self.cfg.label_bound
        for i, name in enumerate(HEADS[1:], start=1):
            delta_s = self._relative_distance(name, features[name].to(y_m))
            alpha = delta_s / (delta_f + EPS)
            new = 0.5 * alpha * y_m + 0.5 * (y_m + delta_s - delta_f)
            new = new.clamp(-bound, bound)
            old = self.label_memory[i, rows]
            self.label_memory[i, rows] = (epoch - 1) / (epoch + 1) * old + 2 / (epoch + 1) * new

    def _update_centers(self) -> None:
        momentum = self.cfg.center_momentum
        for i, name in enumerate(HEADS):
            labels, stored = self.label_memory[i], getattr(self, f"feature_{name}")
            centers, is_set = getattr(self, f"centers_{name}"), getattr(self, f"centers_set_{name}")
            positive = labels > 0 if self.cfg.exclude_zero else labels >= 0
            for k, members in enumerate((self.seen & positive, self.seen & (labels < 0))):
                if not members.any():
                    continue  # keep the previous centre (the release would produce NaN)
                mean = stored[members].mean(dim=0)
                if momentum > 0 and is_set[k]:
                    centers[k] = momentum * centers[k] + (1 - momentum) * mean
                else:
                    centers[k] = mean
                is_set[k] = True
