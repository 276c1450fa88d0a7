"""PSA-MF: Personality-Sentiment Aligned Multi-Level Fusion (Xie et al., AAAI 2026,
arXiv 2512.01442; official code HensonXie/PSA-MF).

Idea: the same words carry different sentiment for different personalities. A frozen personality
encoder gives a personality embedding pe; the text encoder's sentiment representation is aligned
with it (L_ccl, L_ps); audio and visual evidence is pre-fused inside the text encoder (two extra
tokens before its last layer, aligned with the text by L_clm) and fused again at several levels
(attention, serial and parallel fusion) before the head.

Shapes (B batch, L_m frames of modality m, T text tokens <= max_text_length, N encoder layers,
Dt text hidden size, Dp personality size, H = `hidden` (64), K = info.output_dim):
    audio/vision [B, L_m, D_m] -> packed LSTM -> H_m [B, L_m, H] (kept, with key-padding masks)
                                              -> e_m = Linear(H->H)(dropout(h_last)) [B, H]
    raw texts -> tokens [B, T] -> embeddings + layers 1..N-1 (text only) -> s_cls [B, Dt]
    pe [B, Dp] (frozen, no gradient)
    a_tok = ReLU(Linear(H->Dt)(e_a) + P(pe)), v_tok likewise                    [B, Dt] each
    last layer on [text tokens; v_tok; a_tok] with the mask extended by two     [B, T+2, Dt]
    L_clm = CLIP(s_cls, a_tok) + CLIP(s_cls, v_tok)         (128-d projections, temperature 0.07)
    alignment at hidden state `align_layer` (10 of 13 for BERT-base: default -3, counted from the
    end of the N+1 hidden states): c [B, Dt]; p1, p2 = Linear(Dt->64)(c); pp = Linear(Dp->64)(pe);
    d = (1 - mean cos(p1, pp)) / 2; L_ccl = CLIP(p1, pp) * d; L_ps = L1(Linear(64->1)(p2), y) * (1 - d)
    q = Linear(Dt->H)(final [CLS]); t_v = MHA(q, H_v, H_v); t_a = MHA(q, H_a, H_a)  [B, H] each
    serial  T = Linear(2S+H -> F)(LayerNorm([Linear(H->S)(t_v); Linear(H->S)(t_a); q]))  [B, F]
    parallel C = Conv1d(3->1, kernel 3)(stack[t_v, t_a, q])                             [B, H-2]
    head: dropout -> Linear(F+H-2 -> G) + tanh -> Linear(G->G) + tanh -> Linear(G->K)
    Paper sizes: H 64, S 2048, F 128 (4160 -> 128), G 128, so the head reads 190 values.
Objective: task + ccl_weight L_ccl + ps_weight L_ps + clm_weight L_clm, as named loss terms
"task", "ccl", "ps", "clm" (paper: L1 + L_ccl + 0.1 L_ps + 0.09 L_clm).

Follows the spec / official code: LSTM encoders and utterance vectors, the layer split with two
injected tokens, CLIP losses with projections to 128 and temperature 0.07 (symmetric CE), the
alignment terms and their cosine weighting d (not detached, as in the release), the multi-level
fusion and head, two optimiser groups (text encoder / rest).

Deviations and our choices:
- [ours] Key-padding masks in the two attentions (the release attends over padded LSTM outputs).
- [ours] CLIP: both sides are projected to 128 and then L2-normalised, as the spec says (the
  release normalises one side before and the other after its projection).
- [ours] The text encoder is the packaged all-MiniLM-L6-v2 (6 layers, Dt 384) by default, not
  BERT-base (no download possible here); any local BERT-style folder can be given
  (`model.text_encoder=PATH`), "tiny" builds a 2-layer random BERT (tests). The alignment index
  is counted from the end so that "10 of 13" maps to 4 of 7 for MiniLM.
- [ours] The personality encoder is pluggable (msakit.personality): "minilm" (default; frozen
  all-MiniLM-L6-v2, mean pooled as that model is meant to be used), "tiny", a local transformer
  folder ([CLS]), or a Big-Five head fitted by `msakit personality fit` (pe = 5 trait scores).
  Which one a run used is logged when the model is built and written into every epoch's log
  line (`personality_encoder`). It is kept out of the module tree: frozen, never in the optimiser
  nor in checkpoints (the config's source rebuilds it), and its outputs are cached per text.
- [ours] The last (multimodal) text layer, which runs on [text tokens; v_tok; a_tok], starts
  from the text encoder's pretrained weights of its last layer (it is that layer, run on the
  extended sequence); the release builds this layer separately and initialises it randomly.
  With "tiny" every layer is random anyway.
- [ours] P (Linear Dp->Dt) is always applied to pe (also when Dp == Dt), so the personality
  term in the tokens is learnt; the spec requires it only when sizes differ.
- [ours] The release's second, unused BERT is not built; the release's per-layer loop computes
  L_ccl/L_ps for every layer but uses only index 10: we compute that one alone.
- [ours] Texts: from `Batch.texts`. Without transcripts (`missing_text`): "error" (default)
  stops with a message; "empty" feeds empty strings ([CLS] [SEP]), so the text branch carries no
  information (test fakes, feature-only data); the tiny preset uses "empty".
- [ours] Classification tasks: the task term is cross-entropy (msakit.losses.task_loss) and the
  L_ps head predicts the task's output (K logits) with that same loss, weighted by (1 - d).
- Ablations (each removes its term / branch): use_personality=false drops pe everywhere (no P in
  the tokens, no L_ccl, no L_ps: both are defined through pe, and the personality encoder is not
  loaded); use_prefusion=false runs the last layer on the text alone (no tokens, hence no L_clm;
  with the enhanced fusion on, nothing then reads e_a/e_v and their Linear is not built);
  use_enhanced_fusion=false replaces the multi-level fusion by a plain head on [q; e_a; e_v];
  use_ps_loss=false drops L_ps; use_clm_loss=false drops L_clm (tokens still injected).
- Optimiser: the project's loop uses AdamW (decoupled weight decay) where the release uses Adam
  with L2; ReduceLROnPlateau is `train.scheduler=plateau`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from msakit.batch import Batch, ModelOutput
from msakit.config import ConfigError
from msakit.data.base import DatasetInfo
from msakit.losses import clip_loss, shape_prediction, task_loss
from msakit.models.base import check_choice, task_output
from msakit.modules.attention import MaskedMultiheadAttention
from msakit.registry import register_model
from msakit.validated import ModelConfig, bounds

log = logging.getLogger(__name__)

TEXT_ENCODER_PREFIX = "text_encoder."


@dataclass
class PSAMFConfig(ModelConfig):
    text_encoder: str = "minilm"
    """Sentiment text encoder (trained): "minilm" (packaged all-MiniLM-L6-v2), "tiny" (random
    2-layer BERT) or a local BERT-style model folder."""
    personality_encoder: str = "minilm"
    """Frozen personality encoder: "minilm", "tiny", a local transformer folder, or a head folder
    written by `msakit personality fit`."""
    personality_pooling: str = "auto"
    """Sentence pooling of a transformer personality encoder: "cls", "mean", or "auto" (the
    model's own: mean for all-MiniLM-L6-v2, else [CLS]). A fitted head uses its own."""
    max_text_length: int = 50
    """Tokens per transcript ([CLS]/[SEP] included), for both encoders."""
    missing_text: str = "error"
    """Batches without transcripts: "error", or "empty" (empty strings; no text information)."""
    text_lr: float = 5e-5
    """Learning rate of the text encoder's parameter group (paper: 5e-5 MOSI, 1e-5 MOSEI); the
    rest uses train.lr (paper: 5e-4 MOSI, 1e-4 MOSEI)."""
    hidden: int = 64
    """LSTM hidden size of audio/vision = utterance vector size = query size of the fusion."""
    encoder_dropout: float = 0.0
    """Dropout on the LSTMs' last hidden state before Linear(H->H) (the release's 1-layer LSTM
    uses 0)."""
    attention_heads: int = 2
    align_layer: int = field(default=-3, metadata=bounds())
    """Hidden state (0 = embeddings, N = final) whose [CLS] is aligned with the personality;
    negative counts from the end (-3 = index 10 of 13 for BERT-base, 4 of 7 for MiniLM)."""
    align_dim: int = 64
    """Size of p1, p2 and pp."""
    clip_dim: int = 128
    """Projection size inside each CLIP loss."""
    temperature: float = 0.07
    serial_dim: int = 2048
    """S: width of the serial fusion's per-modality expansions."""
    fusion_dim: int = 128
    """F: output of the serial fusion."""
    head_hidden: int = 128
    head_dropout: float = 0.1
    ccl_weight: float = 1.0
    ps_weight: float = 0.1
    clm_weight: float = 0.09
    use_personality: bool = True
    use_prefusion: bool = True
    use_enhanced_fusion: bool = True
    use_ps_loss: bool = True
    use_clm_loss: bool = True

    def __post_init__(self) -> None:
        for name in ("text_encoder", "personality_encoder"):
            if not getattr(self, name).strip():
                raise ConfigError(f"model.{name}: give 'minilm', 'tiny' or a local folder")
        check_choice("model.personality_pooling", self.personality_pooling, ("auto", "cls", "mean"))
        check_choice("model.missing_text", self.missing_text, ("error", "empty"))
        if self.max_text_length < 3:
            raise ConfigError("model.max_text_length must be >= 3")
        if self.text_lr <= 0:
            raise ConfigError("model.text_lr must be > 0")
        if self.hidden < 3 or self.hidden % self.attention_heads:
            raise ConfigError("model.hidden must be >= 3 and divisible by model.attention_heads")
        for name in ("align_dim", "clip_dim", "serial_dim", "fusion_dim", "head_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("model.temperature must be > 0")
        for name in ("encoder_dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1)")
        for name in ("ccl_weight", "ps_weight", "clm_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.hidden": [32, 64, 128],
            "model.head_dropout": {"low": 0.0, "high": 0.3},
            "model.text_lr": {"low": 1e-5, "high": 1e-4, "log": True},
            "model.ccl_weight": {"low": 0.1, "high": 3.0, "log": True},
            "model.ps_weight": {"low": 0.01, "high": 1.0, "log": True},
            "model.clm_weight": {"low": 0.01, "high": 1.0, "log": True},
        }

    @classmethod
    def tiny(cls) -> PSAMFConfig:
        """Random tiny encoders (no download, no packaged weights), small fusion."""
        return cls(text_encoder="tiny", personality_encoder="tiny", missing_text="empty",
                   hidden=8, align_dim=8, clip_dim=8, serial_dim=16, fusion_dim=8, head_hidden=8)


class ClipAlignment(nn.Module):
    """CLIP loss with a learnt projection of each side to `dim` (the release's `Clip`)."""

    def __init__(self, x_dim: int, y_dim: int, dim: int, temperature: float):
        super().__init__()
        self.x_proj, self.y_proj = nn.Linear(x_dim, dim), nn.Linear(y_dim, dim)
        self.temperature = temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return clip_loss(self.x_proj(x), self.y_proj(y), self.temperature)


class SequenceLSTM(nn.Module):
    """Packed 1-layer LSTM that keeps its output sequence.

    x [B, L, D], mask [B, L] -> (H [B, L, hidden], zero at padding; e [B, hidden] =
    Linear(dropout(h_last)), or None when built with utterance=False (nothing reads it))."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, utterance: bool = True):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, hidden) if utterance else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        lengths = mask.sum(dim=1).clamp_min(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        outputs, (h_n, _) = self.lstm(packed)
        sequence, _ = pad_packed_sequence(outputs, batch_first=True, total_length=x.shape[1])
        return sequence, None if self.out is None else self.out(self.dropout(h_n[-1]))


class SubNet(nn.Module):
    """dropout -> Linear(in->G) + tanh -> Linear(G->G) + tanh -> Linear(G->out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("psa_mf", config=PSAMFConfig)
class PSAMF(nn.Module):
    """PSA-MF: personality-aligned text encoder with audio/vision pre-fusion and multi-level fusion."""

    def __init__(self, cfg: PSAMFConfig, info: DatasetInfo):
        super().__init__()
        from msakit.modules.text_encoder import TextEncoder
        from msakit.personality import PersonalityEncoder

        self.cfg, self.info = cfg, info
        h = cfg.hidden
        # the utterance vectors e_a, e_v feed the injected tokens and the plain head only
        utterance = cfg.use_prefusion or not cfg.use_enhanced_fusion
        self.audio_encoder = SequenceLSTM(info.feature_dims["audio"], h, cfg.encoder_dropout, utterance)
        self.vision_encoder = SequenceLSTM(info.feature_dims["vision"], h, cfg.encoder_dropout, utterance)
        self.text_encoder = TextEncoder(cfg.text_encoder, max_length=cfg.max_text_length)
        dt, n = self.text_encoder.hidden_size, self.text_encoder.num_layers
        self.align_index = cfg.align_layer + n + 1 if cfg.align_layer < 0 else cfg.align_layer
        if not 0 <= self.align_index <= n:
            raise ConfigError(
                f"model.align_layer {cfg.align_layer} is outside the {n + 1} hidden states of "
                f"the text encoder {cfg.text_encoder!r}"
            )

        # frozen personality encoder, kept out of the module tree (see the module docstring)
        self.personality = None
        if cfg.use_personality:
            self.personality = PersonalityEncoder(
                cfg.personality_encoder, cfg.max_text_length, cfg.personality_pooling
            )
            dp = self.personality.dim
            log.info("PSA-MF personality encoder: %s", self.personality.description)
        self.personality_used = self.personality.description if self.personality else "none (use_personality=false)"

        if cfg.use_prefusion:
            self.audio_token = nn.Linear(h, dt)
            self.vision_token = nn.Linear(h, dt)
            self.personality_to_text = nn.Linear(dp, dt) if cfg.use_personality else None
            if cfg.use_clm_loss:
                self.clip_text_audio = ClipAlignment(dt, dt, cfg.clip_dim, cfg.temperature)
                self.clip_text_vision = ClipAlignment(dt, dt, cfg.clip_dim, cfg.temperature)
        if cfg.use_personality:
            self.sentiment_proj = nn.Linear(dt, cfg.align_dim)  # p1
            self.personality_proj = nn.Linear(dp, cfg.align_dim)  # pp
            self.clip_personality = ClipAlignment(cfg.align_dim, cfg.align_dim, cfg.clip_dim, cfg.temperature)
            if cfg.use_ps_loss:
                self.sentiment_proj2 = nn.Linear(dt, cfg.align_dim)  # p2
                self.ps_head = nn.Linear(cfg.align_dim, info.output_dim)

        self.query = nn.Linear(dt, h)
        if cfg.use_enhanced_fusion:
            self.attention_vision = MaskedMultiheadAttention(h, cfg.attention_heads)
            self.attention_audio = MaskedMultiheadAttention(h, cfg.attention_heads)
            self.serial_vision = nn.Linear(h, cfg.serial_dim)
            self.serial_audio = nn.Linear(h, cfg.serial_dim)
            self.serial_norm = nn.LayerNorm(2 * cfg.serial_dim + h)
            self.serial_out = nn.Linear(2 * cfg.serial_dim + h, cfg.fusion_dim)
            self.parallel = nn.Conv1d(3, 1, kernel_size=3)
            head_in = cfg.fusion_dim + h - 2
        else:
            head_in = 3 * h  # [q; e_a; e_v]
        self.head = SubNet(head_in, cfg.head_hidden, info.output_dim, cfg.head_dropout)

    # ------------------------------------------------------------------------- hooks

    def parameter_groups(self, train_cfg) -> list[dict]:
        """Two groups: the text encoder at cfg.text_lr, everything else at train_cfg.lr."""
        text, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (text if name.startswith(TEXT_ENCODER_PREFIX) else rest).append(p)
        return [{"params": text, "lr": self.cfg.text_lr, "name": "text_encoder"},
                {"params": rest, "lr": train_cfg.lr, "name": "rest"}]

    def on_epoch_end(self, epoch: int, valid_metrics: dict) -> dict:
        return {"personality_encoder": self.personality_used}

    # ------------------------------------------------------------------------- forward

    def _texts(self, batch: Batch) -> list[str]:
        if batch.texts is not None:
            return list(batch.texts)
        if self.cfg.missing_text == "empty":
            return [""] * batch.size
        raise ConfigError(
            f"psa_mf reads raw transcripts, but dataset {self.info.name!r} gives none (Batch.texts "
            "is None); use data with transcripts or set model.missing_text=empty (no text information)"
        )

    def forward(self, batch: Batch) -> ModelOutput:
        cfg, device = self.cfg, batch.audio.device
        texts = self._texts(batch)
        seq_audio, e_audio = self.audio_encoder(batch.audio, batch.audio_mask)  # [B, L_a, H], [B, H]
        seq_vision, e_vision = self.vision_encoder(batch.vision, batch.vision_mask)  # [B, L_v, H], [B, H]
        pe = self.personality(texts, device) if self.personality is not None else None  # [B, Dp]

        ids, mask = self.text_encoder.tokenize(texts, device)  # [B, T]
        last = self.text_encoder.num_layers - 1
        states = self.text_encoder.run(ids, mask, stop=last)  # N x [B, T, Dt], text only
        losses: dict[str, torch.Tensor] = {}
        if cfg.use_prefusion:
            s_cls = states[-1][:, 0]  # [B, Dt]
            bias = self.personality_to_text(pe) if pe is not None else 0.0
            audio_tok = torch.relu(self.audio_token(e_audio) + bias)  # [B, Dt]
            vision_tok = torch.relu(self.vision_token(e_vision) + bias)  # [B, Dt]
            if cfg.use_clm_loss:
                clm = self.clip_text_audio(s_cls, audio_tok) + self.clip_text_vision(s_cls, vision_tok)
                losses["clm"] = cfg.clm_weight * clm
            extended = torch.cat([states[-1], vision_tok[:, None], audio_tok[:, None]], dim=1)  # [B, T+2, Dt]
            extended_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 2)], dim=1)  # [B, T+2]
            states.append(self.text_encoder.layer(last, extended, extended_mask))
        else:
            states.append(self.text_encoder.layer(last, states[-1], mask))

        logs = {}
        if pe is not None:
            c = states[self.align_index][:, 0]  # [B, Dt]
            p1, pp = self.sentiment_proj(c), self.personality_proj(pe)  # [B, A] each
            d = (1 - F.cosine_similarity(p1, pp, dim=-1).mean()) / 2
            losses["ccl"] = cfg.ccl_weight * self.clip_personality(p1, pp) * d
            if cfg.use_ps_loss:
                ps_pred = shape_prediction(self.ps_head(self.sentiment_proj2(c)), self.info)
                losses["ps"] = cfg.ps_weight * task_loss(ps_pred, batch.labels, self.info) * (1 - d)
            logs["align_distance"] = float(d.detach())

        q = self.query(states[-1][:, 0])  # [B, H]
        if cfg.use_enhanced_fusion:
            t_v = self.attention_vision(q[:, None], seq_vision, seq_vision, batch.vision_mask)[:, 0]  # [B, H]
            t_a = self.attention_audio(q[:, None], seq_audio, seq_audio, batch.audio_mask)[:, 0]  # [B, H]
            serial = torch.cat([self.serial_vision(t_v), self.serial_audio(t_a), q], dim=-1)  # [B, 2S+H]
            serial = self.serial_out(self.serial_norm(serial))  # [B, F]
            parallel = self.parallel(torch.stack([t_v, t_a, q], dim=1))[:, 0]  # [B, H-2]
            fused = torch.cat([parallel, serial], dim=-1)  # [B, F+H-2]
        else:
            fused = torch.cat([q, e_audio, e_vision], dim=-1)  # [B, 3H]
        return task_output(self.head(fused), batch, self.info, extra_losses=losses, logs=logs)
