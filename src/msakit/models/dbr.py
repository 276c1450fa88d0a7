"""DBR: Dual-Branch Rebalancing Framework (arXiv 2604.25179, 2026).

ONLY THE ABSTRACT OF THE PAPER IS PUBLIC: no code, no equations, no hyper-parameters. Everything
in this file is OUR design [ours], written to do what the abstract describes (decouple each
modality into shared and private parts; model the shared part along time and across modalities
(TSF); route the private part through learned anchors with a capped amount of cross-modal
borrowing (AGPR); rebalance the two branches in a bidirectional fusion (BRF)). Nothing here is
known to match the authors' implementation, and its numbers are not the paper's.

Idea. A dominant modality and a dominant branch starve the rest. DBR keeps a shared branch
(what all modalities agree on) and a private branch (what only one modality carries) apart, gives
each its own inductive bias, and lets a learned, regularised weighting decide how much of each
branch reaches the head.

Shapes (B batch, L_m length of modality m, D = `hidden`, K = `num_anchors`, G = `channel_groups`):
  input encoders, one per modality:
    audio/vision (and text features): Conv1d(d_m -> D, k=1) -> 1 masked transformer layer
    text with a text encoder (`text_encoder` set): token states [B, T, H_enc] of
        `msakit.modules.text_encoder` on Batch.texts -> Linear(H_enc -> D)
                                                                X_m [B, L_m, D], u_m = mean_t X_m
  decoupling (MISA-style, on every frame):
    shared   S_m = sigmoid(Linear_shared(X_m))   ONE module for all three modalities  [B, L_m, D]
    private  P_m = sigmoid(Linear_m(X_m))        one module per modality              [B, L_m, D]
    s_m, p_m = masked means over time                                                 [B, D]
    losses "cmd"   = sim_weight * mean over pairs of CMD(s_a, s_b) (5 moments)
           "diff"  = diff_weight * (sum_m orth(p_m, s_m) + sum over pairs orth(p_a, p_b))
           "recon" = recon_weight * mean_m MSE(Linear^rec_m(s_m + p_m), u_m)
    (CMD and the soft orthogonality are MISA's functions, `msakit.losses.cmd` / `orthogonality_loss`)
  shared branch, TSF (Temporal-Structural Factorisation):
    temporal   z^tmp_m = mean_t Transformer_tmp(S_m)   one masked layer over time    [B, D]
    structural each s_m is cut into G channel groups [B, G, D/G], embedded to D (shared Linear +
               a learned group embedding), the 3G tokens of the three modalities attend to each
               other (1 layer, no positional/modality encoding: order-free), then
               z^str_m = mean over modality m's G tokens                             [B, D]
    gate       g_m = sigmoid(W_g [z^tmp_m; z^str_m]);  h^s_m = g_m z^tmp_m + (1 - g_m) z^str_m
    loss "hsic" = hsic_weight * mean_m HSIC_RBF(z^tmp_m, z^str_m)   (redundancy between paths)
    off (use_tsf=false): h^s_m = s_m
  private branch, AGPR (Anchor-Guided Private Routing):
    anchors A_m [K, D] per modality; r = softmax(cos(P_m, A_m) / tau) [B, L_m, K]
    own_m = r A_m + P_m                      (anchor mixture plus residual)
    borrow_m = attention(query P_m, keys/values = anchors of the OTHER two modalities [2K, D])
    beta_m = borrow_cap * sigmoid(w_m . p_m + b_m)  per sample, from the modality's OWN pooled
             private vector p_m (borrow_cap 0.3: at most 30% borrowed; w_m = b_m = 0 at init,
             so beta_m starts at 0.15)                                                 [B]
    R_m = (1 - beta_m) own_m + beta_m borrow_m;  h^p_m = mean_t R_m                    [B, D]
    The gate [ours, issue 10] was a scalar b_m per modality trained at train.lr: under Adam it
    moves ~lr per step and beta_m = 0.3 sigmoid(b_m) has slope 0.075, so beta could change by
    ~0.004 in a 10-epoch run and the three gates stayed equal (0.15). Now the gate is computed
    from the tokens (a gradient step moves the logit by ~D x lr) and (w_m, b_m) learn at
    borrow_lr_scale x train.lr (default 10) through their own optimiser group.
    losses "anchor_orth" = anchor_weight * mean_m ||Â_m Â_m^T - I||_F^2 / K^2  (Â: unit rows)
           "unimodal"    = unimodal_weight * mean_m task loss of Linear_m(h^p_m)  (aux heads)
           "leak"        = leak_weight * sum_m orth(h^p_m, h^s_m)    (no shared info in private)
    off (use_agpr=false): h^p_m = p_m, none of the three terms; use_borrowing=false: R_m = own_m
  fusion, BRF (Bidirectional Rebalancing Fusion):
    H_s = [h^s_t, h^s_a, h^s_v], H_p = [h^p_t, h^p_a, h^p_v]                          [B, 3, D]
    H_s' = layer(H_s attends to H_p), H_p' = layer(H_p attends to H_s)  (shared<->private)
    h_s, h_p = means over the three tokens; c = (h_s + h_p) / 2                         [B, D]
    alpha = softmax(MLP([h_s; h_p; c])) [B, 2];  f = alpha_s h_s + alpha_p h_p
    head MLP(D -> D -> output_dim)
    loss "balance" = balance_weight * KL(mean_batch alpha || uniform)
    off (use_brf=false): f = [mean H_s; mean H_p] (concatenation), head MLP(2D -> D -> out)

Loss weights: sim 1.0, diff 0.3, recon 1.0 (MISA's; MIntRec: 0.7 / 0.7 / 0.6 via the config),
hsic 0.1, balance 0.1 from the spec; anchor 0.1, unimodal 0.3, leak 0.3 and tau 0.1 are [ours].
A weight of 0 drops its term; use_tsf / use_agpr / use_borrowing / use_brf switch whole parts off.

Logged (inspect the rebalancing in log.jsonl): alpha_shared, alpha_private, beta_text/audio/vision
and tsf_gate (mean g), each the mean over the epoch's training batches (gathered in forward as a
diagnostic only). ModelOutput.logs carries the same values per batch (batch means).

Padding: every attention has a key mask and every pooling a length mask; padded frames never
change a prediction. A sequence has at least one real frame (the loaders guarantee it).
Deviations: there is no paper to deviate from; see [ours] above. Text encoder fine-tuning uses
its own learning rate (`text_lr`, 2e-5 per the spec) and the borrowing gates theirs
(`borrow_lr_scale` x train.lr) through `parameter_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.losses import cmd, orthogonality_loss, shape_prediction, task_loss
from msakit.models.base import task_output
from msakit.modules.attention import CrossModalLayer, MaskedMultiheadAttention
from msakit.modules.pooling import masked_mean
from msakit.modules.text_encoder import TextEncoder
from msakit.registry import register_model
from msakit.validated import ModelConfig

PAIRS = (("text", "audio"), ("text", "vision"), ("audio", "vision"))


@dataclass
class DBRConfig(ModelConfig):
    hidden: int = 128
    """Width D of every branch (the spec: 128; 256 for MIntRec)."""
    heads: int = 4
    """Attention heads of every transformer layer (must divide `hidden`)."""
    dropout: float = 0.1
    """Dropout inside the transformer layers and before the head."""
    text_encoder: str = ""
    """"" = read the text FEATURES (Batch.text) like audio/vision; otherwise the source of a
    BERT-style encoder run on the raw transcripts (Batch.texts), passed to
    `msakit.modules.text_encoder` (a local directory, the packaged all-MiniLM-L6-v2, or "tiny")."""
    text_max_tokens: int = 50
    """Token limit of the text encoder ([CLS]/[SEP] included)."""
    text_lr: float = 2e-5
    """Learning rate of the text encoder's own parameters (the rest uses train.lr)."""
    freeze_text_encoder: bool = False
    """Keep the text encoder's weights fixed."""
    use_tsf: bool = True
    """Temporal-Structural Factorisation in the shared branch (else the pooled shared vectors)."""
    use_agpr: bool = True
    """Anchor-Guided Private Routing in the private branch (else the pooled private vectors)."""
    use_borrowing: bool = True
    """Cross-modal borrowing inside AGPR (part of AGPR: set to false when use_agpr is false)."""
    use_brf: bool = True
    """Bidirectional Rebalancing Fusion (else the two branch vectors are concatenated)."""
    sim_weight: float = 1.0
    """CMD similarity between the modalities' pooled shared vectors ("cmd")."""
    diff_weight: float = 0.3
    """Soft orthogonality shared-vs-private and between privates ("diff")."""
    recon_weight: float = 1.0
    """Reconstruction of each modality's pooled input vector from shared + private ("recon")."""
    cmd_moments: int = 5
    hsic_weight: float = 0.1
    """HSIC redundancy penalty between TSF's temporal and structural paths ("hsic")."""
    balance_weight: float = 0.1
    """KL(mean alpha || uniform) of BRF's branch weights ("balance")."""
    anchor_weight: float = 0.1
    """[ours] Orthogonality of each modality's anchors ("anchor_orth")."""
    unimodal_weight: float = 0.3
    """[ours] Task loss of the unimodal auxiliary heads on the private vectors ("unimodal")."""
    leak_weight: float = 0.3
    """[ours] Orthogonality of routed private vs shared-branch vectors ("leak")."""
    num_anchors: int = 8
    """K anchors per modality."""
    route_tau: float = 0.1
    """[ours] Temperature of the anchor routing softmax(cos / tau)."""
    borrow_cap: float = 0.3
    """beta_m = borrow_cap * sigmoid(w_m . p_m + b_m): the largest share a modality may borrow."""
    borrow_lr_scale: float = 10.0
    """[ours] The borrowing gates (w_m, b_m) learn at borrow_lr_scale * train.lr (1 = like the
    rest): at train.lr under Adam a gate moves too little in a short run to be learnt."""
    channel_groups: int = 4
    """G: channel groups per modality in TSF's structural path (must divide `hidden`)."""

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.heads < 1 or self.hidden % self.heads:
            raise ValueError("model.heads must divide model.hidden")
        if self.channel_groups < 1 or self.hidden % self.channel_groups:
            raise ValueError("model.channel_groups must divide model.hidden")
        for name in ("sim_weight", "diff_weight", "recon_weight", "hsic_weight", "balance_weight",
                     "anchor_weight", "unimodal_weight", "leak_weight", "text_lr", "borrow_lr_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0")
        if self.num_anchors < 1:
            raise ValueError("model.num_anchors must be >= 1")
        if self.route_tau <= 0:
            raise ValueError("model.route_tau must be > 0")
        if not 0.0 <= self.borrow_cap <= 1.0:
            raise ValueError("model.borrow_cap must be in [0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must be in [0, 1)")
        if self.cmd_moments < 1:
            raise ValueError("model.cmd_moments must be >= 1")
        if self.text_max_tokens < 3:
            raise ValueError("model.text_max_tokens must be >= 3")
        if self.use_borrowing and not self.use_agpr:
            self.use_borrowing = False  # borrowing is part of AGPR

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.hidden": [64, 128, 256],
            "model.dropout": {"low": 0.0, "high": 0.3},
            "model.sim_weight": {"low": 0.1, "high": 3.0, "log": True},
            "model.diff_weight": {"low": 0.03, "high": 1.0, "log": True},
            "model.recon_weight": {"low": 0.1, "high": 3.0, "log": True},
            "model.hsic_weight": {"low": 0.01, "high": 1.0, "log": True},
            "model.unimodal_weight": {"low": 0.03, "high": 1.0, "log": True},
            "model.leak_weight": {"low": 0.03, "high": 1.0, "log": True},
        }

    @classmethod
    def tiny(cls) -> DBRConfig:
        return cls(hidden=8, heads=2, num_anchors=3, channel_groups=2, dropout=0.0)


# ----------------------------------------------------------------------------- pieces


def rbf_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased HSIC (Gretton et al. 2005) with RBF kernels, bandwidths by the median heuristic.

    x [N, Dx], y [N, Dy] -> scalar tr(K H L H) / (N - 1)^2, with K_ij = exp(-|x_i - x_j|^2 /
    (2 sigma_x^2)), sigma_x^2 = median of the non-zero squared distances (detached). ~0 when x
    and y are independent, > 0 when they depend on each other. N < 2 -> 0 (connected to the graph).
    """
    n = x.shape[0]
    if n < 2:
        return (x.sum() + y.sum()) * 0.0

    def kernel(z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(n, -1)
        d2 = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)  # [N, N]
        off = d2.detach()[~torch.eye(n, dtype=torch.bool, device=z.device)]
        positive = off[off > 0]
        sigma2 = positive.median() if positive.numel() else off.new_tensor(1.0)
        return torch.exp(-d2 / (2.0 * sigma2.clamp_min(1e-12)))

    k, l_ = kernel(x), kernel(y)
    centre = torch.eye(n, device=x.device, dtype=x.dtype) - 1.0 / n
    return torch.trace(k @ centre @ l_ @ centre) / (n - 1) ** 2


class SequenceEncoder(nn.Module):
    """Conv1d(d_in -> D, kernel 1) then one masked pre-LN transformer layer.
    x [B, L, d_in], mask [B, L] -> [B, L, D]."""

    def __init__(self, in_dim: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, dim, kernel_size=1)
        self.layer = CrossModalLayer(dim, heads, dropout, dropout, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)  # [B, L, D]
        return self.layer(h, None, mask)


class TSF(nn.Module):
    """Temporal-Structural Factorisation of the shared branch (see the module docstring).
    shared {m: [B, L_m, D]}, masks {m: [B, L_m]} -> (h^s [B, 3, D], z_tmp, z_str [B, 3, D], g [B, 3, D])."""

    def __init__(self, dim: int, heads: int, groups: int, dropout: float):
        super().__init__()
        self.groups = groups
        self.temporal = CrossModalLayer(dim, heads, dropout, dropout, dropout)
        self.group_embed = nn.Linear(dim // groups, dim)
        self.group_id = nn.Parameter(torch.randn(groups, dim) * 0.02)
        self.structural = CrossModalLayer(dim, heads, dropout, dropout, dropout)
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, shared: dict, pooled: dict, masks: dict):
        z_tmp = torch.stack(
            [masked_mean(self.temporal(shared[m], None, masks[m]), masks[m]) for m in MODALITIES], dim=1
        )  # [B, 3, D]
        b, d = z_tmp.shape[0], z_tmp.shape[2]
        s = torch.stack([pooled[m] for m in MODALITIES], dim=1)  # [B, 3, D]
        tokens = self.group_embed(s.reshape(b, 3, self.groups, d // self.groups))  # [B, 3, G, D]
        tokens = (tokens + self.group_id).reshape(b, 3 * self.groups, d)  # [B, 3G, D]
        everyone = torch.ones(b, 3 * self.groups, dtype=torch.bool, device=s.device)
        tokens = self.structural(tokens, None, everyone)
        z_str = tokens.reshape(b, 3, self.groups, d).mean(dim=2)  # [B, 3, D]
        g = torch.sigmoid(self.gate(torch.cat([z_tmp, z_str], dim=-1)))  # [B, 3, D]
        return g * z_tmp + (1.0 - g) * z_str, z_tmp, z_str, g


class AGPR(nn.Module):
    """Anchor-Guided Private Routing (see the module docstring).
    private {m: [B, L_m, D]}, masks -> (h^p [B, 3, D], beta [B, 3] or None)."""

    def __init__(self, dim: int, heads: int, anchors: int, tau: float, cap: float, borrowing: bool):
        super().__init__()
        self.tau, self.cap = tau, cap
        self.anchors = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(anchors, dim) / dim**0.5) for m in MODALITIES}
        )
        self.borrow = None
        if borrowing:
            self.borrow = nn.ModuleDict({m: MaskedMultiheadAttention(dim, heads) for m in MODALITIES})
            # [ours] the gate reads the modality's own pooled private tokens; zero init = cap / 2
            self.borrow_gate = nn.ModuleDict({m: nn.Linear(dim, 1) for m in MODALITIES})
            for gate in self.borrow_gate.values():
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)

    def beta(self, pooled: torch.Tensor) -> torch.Tensor:
        """Borrowing gates beta_m = cap * sigmoid(w_m . p_m + b_m): pooled private vectors
        p [B, 3, D] (MODALITIES order) -> [B, 3], each in [0, cap]."""
        logits = [self.borrow_gate[m](pooled[:, i]) for i, m in enumerate(MODALITIES)]  # [B, 1] each
        return self.cap * torch.sigmoid(torch.cat(logits, dim=1))

    def forward(self, private: dict, masks: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        beta = None
        if self.borrow is not None:
            beta = self.beta(torch.stack([masked_mean(private[m], masks[m]) for m in MODALITIES], dim=1))
        out = []
        for i, m in enumerate(MODALITIES):
            p, anchors = private[m], self.anchors[m]  # [B, L, D], [K, D]
            cos = F.normalize(p, dim=-1) @ F.normalize(anchors, dim=-1).t()  # [B, L, K]
            route = torch.softmax(cos / self.tau, dim=-1)
            routed = route @ anchors + p  # [B, L, D]
            if beta is not None:
                others = torch.cat([self.anchors[n] for n in MODALITIES if n != m], dim=0)  # [2K, D]
                others = others.unsqueeze(0).expand(p.shape[0], -1, -1)
                visible = torch.ones(others.shape[:2], dtype=torch.bool, device=p.device)
                borrowed = self.borrow[m](p, others, others, visible)  # [B, L, D]
                b = beta[:, i, None, None]  # [B, 1, 1]
                routed = (1.0 - b) * routed + b * borrowed
            out.append(masked_mean(routed, masks[m]))
        return torch.stack(out, dim=1), beta

    def anchor_orthogonality(self) -> torch.Tensor:
        total = 0.0
        for m in MODALITIES:
            a = F.normalize(self.anchors[m], dim=-1)
            eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
            total = total + (a @ a.t() - eye).pow(2).sum() / a.shape[0] ** 2
        return total / len(MODALITIES)


class BRF(nn.Module):
    """Bidirectional Rebalancing Fusion. h_s, h_p [B, 3, D] -> (fused [B, D], alpha [B, 2])."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.shared_reads_private = CrossModalLayer(dim, heads, dropout, dropout, dropout)
        self.private_reads_shared = CrossModalLayer(dim, heads, dropout, dropout, dropout)
        self.weights = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Linear(dim, 2))

    def forward(self, h_s: torch.Tensor, h_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        everyone = torch.ones(h_s.shape[:2], dtype=torch.bool, device=h_s.device)
        s = self.shared_reads_private(h_s, h_p, everyone).mean(dim=1)  # [B, D]
        p = self.private_reads_shared(h_p, h_s, everyone).mean(dim=1)  # [B, D]
        c = 0.5 * (s + p)
        alpha = torch.softmax(self.weights(torch.cat([s, p, c], dim=-1)), dim=-1)  # [B, 2]
        return alpha[:, :1] * s + alpha[:, 1:] * p, alpha


def balance_kl(alpha: torch.Tensor) -> torch.Tensor:
    """KL(mean over the batch of alpha [B, C] || uniform over C)."""
    mean = alpha.mean(dim=0).clamp_min(1e-12)
    return (mean * (mean * alpha.shape[1]).log()).sum()


# ----------------------------------------------------------------------------- model


@register_model("dbr", config=DBRConfig)
class DBR(nn.Module):
    """DBR [ours, from the abstract only]: shared/private decoupling, TSF + AGPR branches, BRF fusion."""

    def __init__(self, cfg: DBRConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d = cfg.hidden
        self.text_encoder = None
        if cfg.text_encoder:
            self.text_encoder = TextEncoder(cfg.text_encoder, max_length=cfg.text_max_tokens, seed=0)
            if cfg.freeze_text_encoder:
                self.text_encoder.freeze()
            self.text_project = nn.Linear(self.text_encoder.hidden_size, d)
        self.encoders = nn.ModuleDict(
            {
                m: SequenceEncoder(info.feature_dims[m], d, cfg.heads, cfg.dropout)
                for m in MODALITIES
                if not (m == "text" and self.text_encoder is not None)
            }
        )
        self.shared = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())  # ONE encoder, all modalities
        self.private = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.Sigmoid()) for m in MODALITIES})
        self.recon = nn.ModuleDict({m: nn.Linear(d, d) for m in MODALITIES}) if cfg.recon_weight > 0 else None
        self.tsf = TSF(d, cfg.heads, cfg.channel_groups, cfg.dropout) if cfg.use_tsf else None
        self.agpr = None
        if cfg.use_agpr:
            self.agpr = AGPR(d, cfg.heads, cfg.num_anchors, cfg.route_tau, cfg.borrow_cap, cfg.use_borrowing)
            if cfg.unimodal_weight > 0:
                self.unimodal_heads = nn.ModuleDict({m: nn.Linear(d, info.output_dim) for m in MODALITIES})
        self.brf = BRF(d, cfg.heads, cfg.dropout) if cfg.use_brf else None
        fused = d if cfg.use_brf else 2 * d
        self.head = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(fused, d), nn.ReLU(), nn.Linear(d, info.output_dim)
        )
        self._log_sums: dict[str, float] = {}  # diagnostic: training logs summed over the epoch
        self._log_batches = 0

    # -- hooks used by the generic trainer

    def train(self, mode: bool = True) -> DBR:
        super().train(mode)
        if self.text_encoder is not None and self.cfg.freeze_text_encoder:
            self.text_encoder.eval()  # a frozen encoder never runs dropout
        return self

    def parameter_groups(self, train_cfg) -> list[dict]:
        """The text encoder at `text_lr`, the borrowing gates at `borrow_lr_scale * train.lr`,
        everything else at train.lr (first group)."""
        own_lr = {"text_encoder.": self.cfg.text_lr, "agpr.borrow_gate.": self.cfg.borrow_lr_scale * train_cfg.lr}
        groups = {prefix: [] for prefix in ("", *own_lr)}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[next((k for k in own_lr if name.startswith(k)), "")].append(p)
        return [{"params": groups[""]}] + [
            {"params": groups[k], "lr": lr} for k, lr in own_lr.items() if groups[k]
        ]

    def on_epoch_end(self, epoch: int, valid_metrics: dict) -> dict[str, float]:
        """Branch weights, borrowing gates and TSF gate: means over this epoch's training batches
        ({} when no training batch ran since the last call)."""
        logs = {k: v / self._log_batches for k, v in self._log_sums.items()} if self._log_batches else {}
        self._log_sums, self._log_batches = {}, 0
        return logs

    # -- forward

    def encode(self, batch: Batch) -> tuple[dict, dict]:
        """X_m [B, L_m, D] and masks [B, L_m] of the three modalities."""
        feats, masks = {}, {}
        for m in MODALITIES:
            if m == "text" and self.text_encoder is not None:
                if batch.texts is None:
                    raise ValueError(
                        "dbr: model.text_encoder is set but the batch has no raw transcripts "
                        "(Batch.texts); use a dataset with texts or model.text_encoder=''"
                    )
                ids, mask = self.text_encoder.tokenize(batch.texts, self.text_project.weight.device)
                states = self.text_encoder.run(ids, mask)[-1]  # [B, T, H_enc]
                feats[m], masks[m] = self.text_project(states), mask
            else:
                masks[m] = batch.mask(m)
                feats[m] = self.encoders[m](batch.features(m), masks[m])
        return feats, masks

    def forward(self, batch: Batch) -> ModelOutput:
        cfg = self.cfg
        x, masks = self.encode(batch)
        u = {m: masked_mean(x[m], masks[m]) for m in MODALITIES}  # [B, D] input vectors
        shared = {m: self.shared(x[m]) for m in MODALITIES}  # [B, L_m, D]
        private = {m: self.private[m](x[m]) for m in MODALITIES}
        s = {m: masked_mean(shared[m], masks[m]) for m in MODALITIES}  # [B, D]
        p = {m: masked_mean(private[m], masks[m]) for m in MODALITIES}

        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        if cfg.sim_weight > 0:
            sim = sum(cmd(s[a], s[b], cfg.cmd_moments) for a, b in PAIRS) / len(PAIRS)
            losses["cmd"] = cfg.sim_weight * sim
        if cfg.diff_weight > 0:
            diff = sum(orthogonality_loss(p[m], s[m]) for m in MODALITIES)
            diff = diff + sum(orthogonality_loss(p[a], p[b]) for a, b in PAIRS)
            losses["diff"] = cfg.diff_weight * diff
        if self.recon is not None:
            recon = sum(F.mse_loss(self.recon[m](s[m] + p[m]), u[m]) for m in MODALITIES)
            losses["recon"] = cfg.recon_weight * recon / len(MODALITIES)

        # shared branch
        if self.tsf is not None:
            h_s, z_tmp, z_str, g = self.tsf(shared, s, masks)  # [B, 3, D] each
            if cfg.hsic_weight > 0:
                hsic = sum(rbf_hsic(z_tmp[:, i], z_str[:, i]) for i in range(len(MODALITIES)))
                losses["hsic"] = cfg.hsic_weight * hsic / len(MODALITIES)
            logs["tsf_gate"] = float(g.detach().mean())
        else:
            h_s = torch.stack([s[m] for m in MODALITIES], dim=1)

        # private branch
        if self.agpr is not None:
            h_p, beta = self.agpr(private, masks)
            if cfg.anchor_weight > 0:
                losses["anchor_orth"] = cfg.anchor_weight * self.agpr.anchor_orthogonality()
            if cfg.unimodal_weight > 0:
                uni = sum(
                    task_loss(shape_prediction(self.unimodal_heads[m](h_p[:, i]), self.info),
                              batch.labels, self.info)
                    for i, m in enumerate(MODALITIES)
                )
                losses["unimodal"] = cfg.unimodal_weight * uni / len(MODALITIES)
            if cfg.leak_weight > 0:
                leak = sum(orthogonality_loss(h_p[:, i], h_s[:, i]) for i in range(len(MODALITIES)))
                losses["leak"] = cfg.leak_weight * leak
            if beta is not None:
                logs.update({f"beta_{m}": float(beta[:, i].detach().mean()) for i, m in enumerate(MODALITIES)})
        else:
            h_p = torch.stack([p[m] for m in MODALITIES], dim=1)

        # fusion
        if self.brf is not None:
            fused, alpha = self.brf(h_s, h_p)
            if cfg.balance_weight > 0:
                losses["balance"] = cfg.balance_weight * balance_kl(alpha)
            mean_alpha = alpha.detach().mean(dim=0).cpu()
            logs["alpha_shared"], logs["alpha_private"] = float(mean_alpha[0]), float(mean_alpha[1])
        else:
            fused = torch.cat([h_s.mean(dim=1), h_p.mean(dim=1)], dim=-1)
        if self.training:
            for key, value in logs.items():
                self._log_sums[key] = self._log_sums.get(key, 0.0) + value
            self._log_batches += 1
        return task_output(self.head(fused), batch, self.info, extra_losses=losses, logs=logs)
