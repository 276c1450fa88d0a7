"""PaSE: Prototype-aligned Calibration and Shapley-based Equilibrium (AAAI 2026, arXiv 2511.17585).

Idea: modalities compete, and a dominant one (text) starves the others. PaSE (a) calibrates each
modality's representation around class prototypes (PCL) and aligns the prototype sets of
different modalities with entropic optimal transport (CAL), and (b) trains in two phases: a
prototype-gated mixture-of-experts fusion with unimodal heads first, then Shapley-based gradient
modulation (SGM), which damps the updates of the modalities that contribute most.

Architecture (official code, built on MoMKE), M = 3 modalities, D = `hidden`:
    projection_m: Linear(D_m -> D) + dropout                      x_m [B, L_m, D]
    layer l = 1..depth holds one expert per modality, E^l_j(z) = h + MLP(LN(h)),
        h = masked MHA(LN(z)) (2 heads, with an output projection Linear(D -> D)),
        MLP = Linear-GELU-Linear (hidden D)                                  [B, L, D]
    unimodal path: u_m <- u_m + E^l_m(u_m) (own experts only); h^m = masked mean [B, D];
        unimodal head Linear(D -> out) per modality (phase 1 loss); h^m feeds PCL and CAL.
    fusion path: every stream z_m runs through all three experts of the layer
        -> [B, L_m, 3, D]; mixing weights w = softmax(router(z_m)) [B, L_m, 3] (router
        MLP D->D->3 per layer) times the prototype gate g_j = sigmoid(MLP 1->16->1 of
        cos(E^l_j(z_m)_t, c^j)) [B, L_m, 3], renormalised over experts; z_m <- z_m + sum_j w_j E^l_j.
        c^j is modality j's most similar initialised prototype (highest cosine), in training
        AND evaluation, read from the banks before this batch updates them: the prediction
        never depends on the batch's labels (see the deviations).
    head: f = [pool(z_t); pool(z_a); pool(z_v)] [B, 3D]; f <- f + dropout(ReLU(Linear(f)));
        Linear(3D -> out). Pooling is a length-masked mean, so padding never changes a prediction.

Losses (names as in ModelOutput.losses; each already weighted):
    task        L1 (regression) / cross-entropy, as every msakit model
    pcl         lambda * sum_m InfoNCE(h^m, prototypes c~^m), tau = 0.1             (use_pcl)
    cal         mu * sum_pairs (L_match + alpha L_reg + beta Omega), log-domain OT    (use_cal)
    unimodal    unimodal_weight * SUM over m of the task loss of unimodal head m, phase 1 only
                (use_unimodal_heads; the release averages the three)

Prototypes: banks C^m [K, D] are BUFFERS (prototypes [M, K, D], prototype_ready [K]):
initialised from the first training batch that contains the class, then EMA
c_k <- gamma c_k + (1 - gamma) mean_k (gamma 0.98), updated in training forward passes only.
Classes: classification uses its labels; regression K = 7 bins round(clip(y, -3, 3)) (labels are
first rescaled so that max |label_range| maps to 3, a no-op on MOSI/MOSEI) [ours];
multi_binary (IEMOCAP, T binary emotion tasks) [ours]: class = index of the FIRST positive task,
and class T for "no emotion positive", so K = T + 1 (the 2^T label patterns would be too many and
mostly empty; in IEMOCAP's 4-emotion subset an utterance normally has one positive emotion, so
this is its emotion label).

Dual-phase optimisation (state in buffers: phase, switch_best, switch_bad_epochs, switch_epoch,
shapley, phi; they survive checkpoint/resume):
    phase 1: task + pcl + cal + unimodal; psi is computed and logged every epoch, phi = 1.
    switch in `on_epoch_end`: epoch >= min_phase1_epochs and the validation metric (MAE for
        regression, else the family's default, msakit.metrics.SELECTION_DEFAULTS) has not
        improved by more than switch_delta = 1e-3 for switch_patience = 5 epochs [ours].
    phase 2: task + pcl + cal; SGM damps each modality's own parameters (its projection, its
        expert in every layer, its unimodal head; `own_parameters`) by phi_m at EVERY step:
        sgm_scale="update" (default) [ours]: each modality's parameters form their own optimiser
            group (`parameter_groups`), and `update_scales` tells the training loop to multiply
            that group's lr by phi_m for the step, so the parameter UPDATE is phi_m times the
            unmodulated one for the whole of phase 2, whatever the optimiser (its update is
            proportional to lr: Adam, AdamW, SGD; decoupled weight decay is damped too);
        sgm_scale="gradient" (the release's rule): the gradients are multiplied by phi_m in
            `on_after_backward` (before clipping and the step). Under Adam(W) the second-moment
            normalisation undoes a constant factor: measured on a toy problem, phi = 0.4 gave an
            update ratio of 0.51 over steps 100-200, 0.86 by ~1000 and 0.99 by 4000.
        psi is recomputed at every epoch end on a held training batch (the last full-size batch of
        the epoch), or every step on the current batch with sgm_update="step" (optionally on its
        first `shapley_samples`).
    Shapley values are exact over the 2^3 = 8 subsets [ours; the release samples 200
    permutations]. The projections are computed once; the 8 masked variants (an absent
    modality's input features are zeros, its mask unchanged) are stacked along the batch
    dimension and the fusion runs in ONE forward pass (`modality_subset_predictions`).
    Utility `loss` [ours, default]: u(S) = -task loss with the modalities outside S masked
    (u(empty) = all masked). Utility `prototype` (the release): u(S) = 0.6 / (1 + sum of
    L_inter over pairs in S) + 0.4 / (1 + sum_{m in S} Var(C^m)), u(empty) = 0, Var over all
    entries of the initialised prototypes.
    phi = exp(psi_min / psi_m - 1) after clamping psi at 1e-9 and normalising it to sum 1.

Deviations from the release and choices of ours:
    - differentiable prototypes [ours]: c~_k = gamma sg(c_k) + (1 - gamma) * batch mean of class k
      (with gradient; the batch mean alone for a class first seen in this batch), so PCL and CAL
      train the encoders (the release detaches everything). At evaluation c~ = the bank.
    - PCL is InfoNCE against the prototypes (spec) with tau = 0.1 [ours: tau]; the release uses
      MSE to the prototype. Classes never seen yet are left out of the softmax.
    - CAL: cost = squared distance of L2-normalised prototypes over the classes initialised so
      far; log-domain Sinkhorn, eps 0.05, <= 200 iterations, early stop at marginal error
      1e-6 [ours]; Omega's target is I/K (reachable by a plan with marginals 1/K) [ours].
      L_reg = ||Q_mn - Q_nm^T||^2 is kept as the spec writes it, but it carries no signal: with
      the same uniform marginals and C_nm = C_mn^T, the entropic plan Q_nm is exactly Q_mn^T (it
      is unique), so L_reg is Sinkhorn's stopping error (measured ~1e-6 against L_match ~4).
    - the prototype gate is PER EXPERT [ours]: g_j compares expert j's output with modality j's
      prototype. The release repeats one gate over the three experts, which the renormalisation
      over experts cancels exactly (its gate has no effect).
    - the gate's prototype [ours]: the release reads the TRUE class's prototype in training (and
      the most similar one at evaluation); harmless there since its gate is a no-op, but with a
      real per-expert gate it conditions training predictions on the label (measured: phase 2
      looked good in training and collapsed at evaluation). Here the gate uses the evaluation
      rule (highest cosine) in both modes and the banks before this batch's EMA update, so a
      label can never reach the fused prediction.
    - SGM's parameter set and schedule: ours damps each modality's projection, its expert in every
      layer and its unimodal head, at every phase-2 step (psi every epoch); the release scales only
      the input projections' gradients, every 5th epoch. Ours damps the update, not the gradient
      (sgm_scale; the release's rule stays available as sgm_scale="gradient").
    - each expert's attention has an output projection Linear(D -> D) (standard MHA) that the
      release's expert attention does not have.
    - the unimodal losses are summed over the three heads (the release averages them; with
      unimodal_weight 1/3 ours equals the release's).
    - phase 1 already runs the gated fusion (its head is trained with the task loss) next to the
      unimodal path; the release's first stage feeds the head with the unimodal streams only.
    - h^m (the representation PCL calibrates, CAL aligns and the banks hold) is the pooled output
      of the unimodal path [ours]; the release uses the fused per-frame features. One bank per
      modality serves the gates of every layer [ours].
    - masking a modality (Shapley utilities, analysis) zeroes its input features, so its stream
      becomes the projection bias; masks are unchanged [ours].
    - pre-LayerNorm inside each expert and a separate router per layer [ours; MoMKE-style].
    - text: the text features (msakit has no BERT encoder); the SGM text group would include
      a text encoder if one were added.
    - dual_phase=false [ours]: a single phase from the first epoch in which the unimodal losses
      (if enabled) and SGM (if enabled) are both active.

Paper hyper-parameters: Adam lr 1e-4 on features (1e-5 with BERT), batch 64, up to 200 epochs,
gamma 0.98, lambda 0.01, mu 0.1, alpha 0.1, beta 0.05, D 256, depth 4, dropout 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.losses import shape_prediction, task_loss
from msakit.metrics import SELECTION_DEFAULTS
from msakit.models.base import check_choice, task_output
from msakit.modules.pooling import masked_mean
from msakit.modules.shapley import modulation_coefficients, shapley_values, subset_masks
from msakit.modules.sinkhorn import sinkhorn
from msakit.registry import register_model
from msakit.validated import ModelConfig, bounds

REGRESSION_BINS = 7
GATE_HIDDEN = 16


@dataclass
class PaSEConfig(ModelConfig):
    hidden: int = 256
    """D: width of the projections, experts and prototypes."""
    depth: int = 4
    """Number of expert layers (one expert per modality in each)."""
    heads: int = 2
    """Attention heads of each expert; must divide `hidden`."""
    dropout: float = 0.5
    """Dropout after each input projection and in the fusion head's residual MLP."""
    prototype_momentum: float = 0.98
    """gamma: EMA momentum of the prototype banks (and weight of the detached bank in c~)."""
    pcl_temperature: float = 0.1
    """tau of the prototype InfoNCE [ours]."""
    pcl_weight: float = 0.01
    """lambda: weight of sum_m L_intra^m."""
    cal_weight: float = 0.1
    """mu: weight of sum over modality pairs of L_inter."""
    cal_reg_weight: float = 0.1
    """alpha: weight of L_reg inside L_inter."""
    cal_omega_weight: float = 0.05
    """beta: weight of Omega inside L_inter."""
    sinkhorn_epsilon: float = 0.05
    """Entropic regularisation of the OT between prototype sets."""
    sinkhorn_iters: int = 200
    """Most Sinkhorn iterations (log domain; early stop at marginal error 1e-6)."""
    unimodal_weight: float = 1.0
    """Weight of each unimodal head's task loss (phase 1)."""
    use_pcl: bool = True
    """Prototype calibration loss (InfoNCE against the prototypes)."""
    use_cal: bool = True
    """Cross-modal prototype alignment by entropic OT."""
    use_sgm: bool = True
    """Shapley-based gradient modulation in phase 2."""
    use_prototype_gate: bool = True
    """Multiply the router weights by the prototype gate (else the router alone mixes experts)."""
    use_unimodal_heads: bool = True
    """Unimodal heads and their losses in phase 1."""
    dual_phase: bool = True
    """Two phases (switch on validation plateau); false = one phase with everything on [ours]."""
    utility: str = "loss"
    """Shapley utility: "loss" (-task loss with modalities masked) or "prototype" (the release)."""
    sgm_scale: str = "update"
    """How SGM damps a modality: "update" multiplies the learning rate of its parameter group by
    phi_m for each optimiser step, so its UPDATE is phi_m times what it would be under any
    optimiser whose step is proportional to lr (Adam, AdamW, SGD) [ours]; "gradient" multiplies
    its gradients by phi_m before clipping and the step (the release; Adam's normalisation largely
    undoes a constant factor within ~1000 steps)."""
    sgm_update: str = "epoch"
    """Recompute the Shapley values at every epoch end ("epoch") or every training step ("step")."""
    shapley_samples: int = field(default=0, metadata=bounds(0))
    """Samples of the held (or current) batch that the subset utilities use; 0 = the whole batch.
    A small number makes sgm_update="step" cheap."""
    min_phase1_epochs: int = field(default=20, metadata=bounds(0))
    """Earliest epoch at whose end phase 2 may begin."""
    switch_patience: int = 5
    """Epochs without a validation improvement (> switch_delta) before switching to phase 2."""
    switch_delta: float = 1e-3
    """Smallest change of the validation metric that counts as an improvement."""
    switch_metric: str = ""
    """Validation metric of the phase switch; "" = the family default (MAE for regression)."""
    switch_mode: str = ""
    """"min" or "max"; "" = the default that goes with switch_metric."""

    def __post_init__(self) -> None:
        check_choice("model.utility", self.utility, ("loss", "prototype"))
        check_choice("model.sgm_scale", self.sgm_scale, ("update", "gradient"))
        check_choice("model.sgm_update", self.sgm_update, ("epoch", "step"))
        check_choice("model.switch_mode", self.switch_mode, ("", "min", "max"))
        if self.hidden < 1 or self.depth < 1 or self.heads < 1:
            raise ValueError("model.hidden, model.depth and model.heads must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"model.heads ({self.heads}) must divide model.hidden ({self.hidden})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must be in [0, 1)")
        if not 0.0 <= self.prototype_momentum < 1.0:
            raise ValueError("model.prototype_momentum must be in [0, 1)")
        if self.pcl_temperature <= 0 or self.sinkhorn_epsilon <= 0:
            raise ValueError("model.pcl_temperature and model.sinkhorn_epsilon must be > 0")
        if self.shapley_samples < 0:
            raise ValueError("model.shapley_samples must be >= 0 (0 = the whole batch)")
        if self.sinkhorn_iters < 1 or self.min_phase1_epochs < 0 or self.switch_patience < 1:
            raise ValueError("model.sinkhorn_iters, model.switch_patience must be >= 1, "
                             "model.min_phase1_epochs >= 0")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.hidden": [128, 256],
            "model.depth": {"low": 2, "high": 4},
            "model.dropout": {"low": 0.1, "high": 0.6},
            "model.pcl_weight": {"low": 1e-3, "high": 1e-1, "log": True},
            "model.cal_weight": {"low": 1e-2, "high": 1.0, "log": True},
            "model.unimodal_weight": {"low": 0.1, "high": 2.0, "log": True},
        }

    @classmethod
    def tiny(cls) -> PaSEConfig:
        return cls(hidden=8, depth=1, heads=2, dropout=0.1, sinkhorn_iters=50,
                   min_phase1_epochs=1, switch_patience=1)


# ----------------------------------------------------------------------------- blocks


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over real frames only. x [B, L, D], mask [B, L] -> [B, L, D]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        if length == 1:  # one frame: softmax over a single key is 1, attention = out(v)
            v = F.linear(x, self.qkv.weight[2 * dim:], self.qkv.bias[2 * dim:])
            return self.out(v)
        qkv = self.qkv(x).reshape(b, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, D/H]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(ctx.transpose(1, 2).reshape(b, length, dim))


class Expert(nn.Module):
    """h = MHA(LN(z)) (masked, 2 heads); return h + MLP(LN(h)) with MLP = Linear-GELU-Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MaskedSelfAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.norm_attn(z), mask)
        return h + self.mlp(self.norm_mlp(h))


def first_rows(batch: Batch, count: int) -> Batch:
    """The first `count` samples of a batch."""
    return Batch(
        **{f: getattr(batch, f)[:count] for f in (*MODALITIES, *(f"{m}_mask" for m in MODALITIES),
                                                  "labels", "index")},
        ids=batch.ids[:count],
        group=None if batch.group is None else batch.group[:count],
    )


def info_nce(h: torch.Tensor, prototypes: torch.Tensor, target: torch.Tensor,
             valid: torch.Tensor, tau: float) -> torch.Tensor:
    """-log softmax_k(cos(h, c_k) / tau)[y], mean over samples whose class is valid.
    h [B, D], prototypes [K, D], target [B] long, valid [K] bool (classes in the softmax)."""
    logits = (F.normalize(h, dim=-1) @ F.normalize(prototypes, dim=-1).T) / tau  # [B, K]
    logits = logits.masked_fill(~valid, -torch.inf)
    keep = valid[target]
    if not bool(keep.any()):
        return h.sum() * 0.0
    return F.cross_entropy(logits[keep], target[keep])


def alignment_loss(p: torch.Tensor, q: torch.Tensor, epsilon: float, iters: int,
                   reg_weight: float, omega_weight: float) -> torch.Tensor:
    """L_inter of prototype-set pairs (rows matched by class): p, q [P, K, D] -> [P]
    L_match + alpha L_reg + beta Omega, cost = squared distance of L2-normalised prototypes.
    All 2P transport problems (Q_pq from C, Q_qp from C^T) run in one batched Sinkhorn."""
    k = p.shape[-2]
    cost = torch.cdist(F.normalize(p, dim=-1), F.normalize(q, dim=-1)).pow(2)  # [P, K, K]
    cost_t = cost.transpose(-1, -2)
    plans = sinkhorn(torch.cat([cost, cost_t]), epsilon, max_iter=iters)  # [2P, K, K]
    plan_pq, plan_qp = plans.chunk(2)
    match = 0.5 * ((plan_pq * cost).sum((-1, -2)) + (plan_qp * cost_t).sum((-1, -2)))
    reg = (plan_pq - plan_qp.transpose(-1, -2)).pow(2).sum((-1, -2))
    target = torch.eye(k, dtype=cost.dtype, device=cost.device) / k
    omega = 0.5 * ((plan_pq - target).pow(2).sum((-1, -2)) + (plan_qp - target).pow(2).sum((-1, -2)))
    return match + reg_weight * reg + omega_weight * omega


# ----------------------------------------------------------------------------- model


@register_model("pase", config=PaSEConfig)
class PaSE(nn.Module):
    """PaSE: prototype calibration + OT alignment, prototype-gated experts, Shapley gradient modulation."""

    # before any prototype exists the gate reads cos = 0, so its first layer's weight has an
    # all-zero gradient on the very first step (tests/test_pase.py checks it trains afterwards)
    zero_grad_at_start = ("gate.0.weight",)

    def __init__(self, cfg: PaSEConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        d, m_count = cfg.hidden, len(MODALITIES)
        self.projections = nn.ModuleDict(
            {m: nn.Linear(info.feature_dims[m], d) for m in MODALITIES}
        )
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.experts = nn.ModuleList(
            [nn.ModuleDict({m: Expert(d, cfg.heads) for m in MODALITIES}) for _ in range(cfg.depth)]
        )
        self.routers = nn.ModuleList(
            [nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, m_count)) for _ in range(cfg.depth)]
        )
        self.gate = (
            nn.Sequential(nn.Linear(1, GATE_HIDDEN), nn.ReLU(), nn.Linear(GATE_HIDDEN, 1))
            if cfg.use_prototype_gate else None
        )
        self.unimodal_heads = (
            nn.ModuleDict({m: nn.Linear(d, info.output_dim) for m in MODALITIES})
            if cfg.use_unimodal_heads else None
        )
        self.fusion_proj = nn.Linear(m_count * d, m_count * d)
        self.fusion_dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(m_count * d, info.output_dim)

        self.num_prototypes = self.prototype_count(info)
        self.register_buffer("prototypes", torch.zeros(m_count, self.num_prototypes, d))
        self.register_buffer("prototype_ready", torch.zeros(self.num_prototypes, dtype=torch.bool))
        self.register_buffer("phase", torch.tensor(1, dtype=torch.long))
        self.register_buffer("switch_best", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("switch_bad_epochs", torch.tensor(0, dtype=torch.long))
        self.register_buffer("switch_epoch", torch.tensor(0, dtype=torch.long))
        self.register_buffer("shapley", torch.zeros(m_count))
        self.register_buffer("phi", torch.ones(m_count))
        self._held_batch: Batch | None = None  # the last full-size training batch (for psi)

    # ------------------------------------------------------------------ classes and state

    @staticmethod
    def prototype_count(info: DatasetInfo) -> int:
        if info.task == "regression":
            return REGRESSION_BINS
        if info.task == "classification":
            return info.num_classes
        return info.num_tasks + 1

    def prototype_classes(self, labels: torch.Tensor) -> torch.Tensor:
        """labels -> prototype class [B] long (see the module docstring)."""
        task = self.info.task
        if task == "regression":
            half = (REGRESSION_BINS - 1) // 2
            scale = 1.0
            if self.info.label_range is not None:
                scale = half / max(abs(self.info.label_range[0]), abs(self.info.label_range[1]), 1e-9)
            return torch.round((labels.float() * scale).clamp(-half, half)).long() + half
        if task == "classification":
            return labels.long()
        positive = labels.long() > 0  # [B, T]
        first = positive.float().argmax(dim=1)  # first positive task (argmax takes the first max)
        return torch.where(positive.any(dim=1), first, torch.full_like(first, self.info.num_tasks))

    def sgm_active(self) -> bool:
        return self.cfg.use_sgm and (int(self.phase) == 2 or not self.cfg.dual_phase)

    def unimodal_active(self) -> bool:
        return self.unimodal_heads is not None and (int(self.phase) == 1 or not self.cfg.dual_phase)

    def own_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters SGM scales per modality: projection, its expert in every layer, its head."""
        groups = {}
        for m in MODALITIES:
            params = list(self.projections[m].parameters())
            for layer in self.experts:
                params += list(layer[m].parameters())
            if self.unimodal_heads is not None:
                params += list(self.unimodal_heads[m].parameters())
            groups[m] = params
        return groups

    def modality_features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """msakit.probes: each modality's own path, projection then its experts only, pooled:
        h^m [B, D], the representation PCL, CAL, the unimodal heads and SGM act on (the input
        projection alone is linear in the features, so probing it says nothing about training)."""
        masks = {m: batch.mask(m) for m in MODALITIES}
        return self.unimodal({m: self.encode(batch.features(m), m) for m in MODALITIES}, masks)

    # ------------------------------------------------------------------ building blocks

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Input projection + dropout: [B, L, D_m] -> [B, L, D]."""
        return self.input_dropout(self.projections[modality](x))

    def unimodal(self, streams: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict:
        """Each modality through its own experts only -> pooled h^m [B, D]."""
        pooled = {}
        for m in MODALITIES:
            u = streams[m]
            for layer in self.experts:
                u = u + layer[m](u, masks[m])
            pooled[m] = masked_mean(u, masks[m])
        return pooled

    def fuse(self, streams: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prototype-gated expert fusion and the head: streams [B, L_m, D] -> raw [B, output_dim].
        The gate reads the banks as they are (call BEFORE this batch's prototype update), with the
        same rule in training and evaluation: it never sees a label.
        Streams of the same length are stacked along the batch ([n B, L, D]; all three on aligned
        or utterance-level data), so each expert runs once per layer on them; this equals running
        every (stream, expert) pair separately (nothing is padded)."""
        size = next(iter(streams.values())).shape[0]
        groups: dict[int, list[str]] = {}
        for m in MODALITIES:
            groups.setdefault(streams[m].shape[1], []).append(m)
        z = {length: torch.cat([streams[m] for m in ms]) for length, ms in groups.items()}  # [nB, L, D]
        mask = {length: torch.cat([masks[m] for m in ms]) for length, ms in groups.items()}
        for layer, router in zip(self.experts, self.routers, strict=True):
            z = {length: self.mix(layer, router, z[length], mask[length]) for length in groups}
        pooled = {}
        for length, ms in groups.items():
            pooled.update(zip(ms, masked_mean(z[length], mask[length]).split(size), strict=True))
        fused = torch.cat([pooled[m] for m in MODALITIES], dim=-1)  # [B, 3D]
        fused = fused + self.fusion_dropout(F.relu(self.fusion_proj(fused)))
        return self.head(fused)

    def mix(self, layer: nn.ModuleDict, router: nn.Module, z: torch.Tensor, mask: torch.Tensor
            ) -> torch.Tensor:
        """One fusion layer: z + sum_j w_j E_j(z), w = softmax(router(z)) times the prototype gate,
        renormalised over the experts. z [N, L, D], mask [N, L] -> [N, L, D]."""
        outs = [layer[j](z, mask) for j in MODALITIES]  # 3 x [N, L, D]
        weights = torch.softmax(router(z), dim=-1)  # [N, L, 3]
        if self.gate is not None:
            cos = self.gate_similarity(outs, self.prototypes.detach(), self.prototype_ready)  # [N, L, 3]
            weights = weights * torch.sigmoid(self.gate(cos.unsqueeze(-1))).squeeze(-1)
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-8)
        return z + sum(weights[..., j, None] * out for j, out in enumerate(outs))

    @staticmethod
    def gate_similarity(outs: list[torch.Tensor], bank: torch.Tensor, ready: torch.Tensor) -> torch.Tensor:
        """cos(expert j's output, modality j's most similar prototype) per token, the highest
        cosine over the initialised prototypes (0 while none is): outs 3 x [N, L, D], bank
        [3, K, D], ready [K] -> [N, L, 3]."""
        if not bool(ready.any()):
            return outs[0].new_zeros(*outs[0].shape[:-1], len(outs))
        protos = F.normalize(bank[:, ready], dim=-1)  # [3, K_ready, D]
        cos = [(out @ protos[j].T).amax(dim=-1) / out.norm(dim=-1).clamp_min(1e-12)  # [N, L]
               for j, out in enumerate(outs)]
        return torch.stack(cos, dim=-1)

    # ------------------------------------------------------------------ prototypes

    @torch.no_grad()
    def update_prototypes(self, pooled: dict[str, torch.Tensor], classes: torch.Tensor) -> None:
        """EMA update of every bank with the batch means (initialise classes seen the first time)."""
        gamma = self.cfg.prototype_momentum
        present = torch.unique(classes)
        for i, m in enumerate(MODALITIES):
            h = pooled[m].detach()
            for k in present.tolist():
                mean = h[classes == k].mean(dim=0)
                if bool(self.prototype_ready[k]):
                    self.prototypes[i, k].mul_(gamma).add_(mean, alpha=1.0 - gamma)
                else:
                    self.prototypes[i, k].copy_(mean)
        self.prototype_ready[present] = True

    def batch_prototypes(self, pooled: dict[str, torch.Tensor], classes: torch.Tensor | None
                         ) -> torch.Tensor:
        """Differentiable prototypes c~ [M, K, D] (call BEFORE update_prototypes): classes in the
        batch get gamma * sg(c_k) + (1 - gamma) * batch mean (the batch mean alone when new);
        others the detached bank. classes None (evaluation): the bank."""
        bank = self.prototypes.detach()
        if classes is None:
            return bank
        gamma = self.cfg.prototype_momentum
        one_hot = F.one_hot(classes, self.num_prototypes).to(bank.dtype)  # [B, K]
        counts = one_hot.sum(dim=0)  # [K]
        present = counts > 0
        ready = self.prototype_ready.clone()  # the update below changes the buffer in place
        out = []
        for i, m in enumerate(MODALITIES):
            means = (one_hot.T @ pooled[m]) / counts.clamp_min(1.0).unsqueeze(-1)  # [K, D]
            mixed = torch.where(ready.unsqueeze(-1), gamma * bank[i] + (1 - gamma) * means, means)
            out.append(torch.where(present.unsqueeze(-1), mixed, bank[i]))
        return torch.stack(out)

    def prototype_losses(self, pooled: dict[str, torch.Tensor], prototypes: torch.Tensor,
                         valid: torch.Tensor, classes: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg, losses = self.cfg, {}
        if cfg.use_pcl and classes is not None:
            intra = [info_nce(pooled[m], prototypes[i], classes, valid, cfg.pcl_temperature)
                     for i, m in enumerate(MODALITIES)]
            losses["pcl"] = cfg.pcl_weight * torch.stack(intra).sum()
        if cfg.use_cal:
            losses["cal"] = cfg.cal_weight * self.alignment(prototypes, valid)
        return losses

    def alignment(self, prototypes: torch.Tensor, valid: torch.Tensor,
                  modalities: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:
        """Sum of L_inter over the pairs of `modalities` (indices), on the valid classes only."""
        cfg = self.cfg
        if int(valid.sum()) < 2:  # one class: nothing to align
            return 0.0 * prototypes.sum()
        chosen = prototypes[:, valid]  # [M, K', D]
        pairs = list(combinations(modalities, 2))
        first = chosen[[i for i, _ in pairs]]  # [P, K', D]
        second = chosen[[j for _, j in pairs]]
        return alignment_loss(first, second, cfg.sinkhorn_epsilon, cfg.sinkhorn_iters,
                              cfg.cal_reg_weight, cfg.cal_omega_weight).sum()

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Batch) -> ModelOutput:
        cfg = self.cfg
        masks = {m: batch.mask(m) for m in MODALITIES}
        streams = {m: self.encode(batch.features(m), m) for m in MODALITIES}
        classes = self.prototype_classes(batch.labels)
        training = self.training
        extra: dict[str, torch.Tensor] = {}

        raw = self.fuse(streams, masks)  # before the banks move: the gate never sees this batch's labels
        if cfg.use_pcl or cfg.use_cal or cfg.use_prototype_gate or self.unimodal_active():
            pooled = self.unimodal(streams, masks)
            if cfg.use_pcl or cfg.use_cal or cfg.use_prototype_gate:
                prototypes = self.batch_prototypes(pooled, classes if training else None)
                if training:
                    self.update_prototypes(pooled, classes)
                valid = self.prototype_ready.clone()
                extra.update(self.prototype_losses(pooled, prototypes, valid, classes))
            if self.unimodal_active():
                uni = [task_loss(shape_prediction(self.unimodal_heads[m](pooled[m]), self.info),
                                 batch.labels, self.info) for m in MODALITIES]
                extra["unimodal"] = cfg.unimodal_weight * torch.stack(uni).sum()

        logs = {"phase": float(self.phase), **{f"phi_{m}": float(self.phi[i])
                                              for i, m in enumerate(MODALITIES)}}
        return task_output(raw, batch, self.info, extra_losses=extra, logs=logs)

    # ------------------------------------------------------------------ subsets and Shapley

    def modality_subset_predictions(self, batch: Batch) -> torch.Tensor:
        """Predictions with every subset of modalities present: [2^M, B, ...] (bitmask order of
        msakit.modules.shapley: bit 0 text, bit 1 audio, bit 2 vision). An absent modality's input
        features are zeros (masks unchanged), exactly as `model(batch with zeroed features)`.
        Each modality is projected once; the 2^M variants run through the fusion in ONE pass."""
        subsets = subset_masks(len(MODALITIES), device=batch.text.device)  # [S, M]
        count, size = subsets.shape[0], batch.size
        streams, masks = {}, {}
        for i, m in enumerate(MODALITIES):
            x = batch.features(m)
            present = self.encode(x, m)  # [B, L, D]
            absent = self.encode(x.new_zeros(1, 1, x.shape[-1]), m).expand_as(present)
            keep = subsets[:, i].view(count, 1, 1, 1)
            streams[m] = torch.where(keep, present.unsqueeze(0), absent.unsqueeze(0)).flatten(0, 1)
            masks[m] = batch.mask(m).repeat(count, 1)  # [S*B, L]
        raw = self.fuse(streams, masks)  # [S*B, out]
        prediction = shape_prediction(raw, self.info)
        return prediction.reshape(count, size, *prediction.shape[1:])

    @torch.no_grad()
    def subset_utilities(self, batch: Batch) -> torch.Tensor:
        """u(S) for the 2^M subsets (bitmask order) -> [2^M]."""
        if self.cfg.utility == "loss":
            predictions = self.modality_subset_predictions(batch)
            return torch.stack([-task_loss(p, batch.labels, self.info) for p in predictions])
        # "prototype": the release's utility on the banks
        ready = self.prototype_ready
        subsets = subset_masks(len(MODALITIES))
        values = torch.zeros(subsets.shape[0])
        if not bool(ready.any()):
            return values
        bank = self.prototypes
        pair_loss = {}
        for i, j in combinations(range(len(MODALITIES)), 2):
            pair_loss[i, j] = float(self.alignment(bank, ready, (i, j)))
        var = [float(bank[i, ready].var()) if int(ready.sum()) * bank.shape[-1] > 1 else 0.0
               for i in range(len(MODALITIES))]
        for s, members in enumerate(subsets.tolist()):
            chosen = [i for i, on in enumerate(members) if on]
            if not chosen:
                continue
            inter = sum(pair_loss[p] for p in combinations(chosen, 2))
            values[s] = 0.6 / (1.0 + inter) + 0.4 / (1.0 + sum(var[i] for i in chosen))
        return values

    @torch.no_grad()
    def update_shapley(self, batch: Batch) -> torch.Tensor:
        """Recompute psi (evaluation mode) and phi (ones unless SGM is active) -> psi [M]."""
        count = self.cfg.shapley_samples
        if count and batch.size > count:
            batch = first_rows(batch, count)
        was_training = self.training
        self.eval()
        try:
            psi = shapley_values(self.subset_utilities(batch).float(), len(MODALITIES))
        finally:
            self.train(was_training)
        self.shapley.copy_(psi)
        self.phi.copy_(modulation_coefficients(psi) if self.sgm_active() else torch.ones_like(psi))
        return psi

    # ------------------------------------------------------------------ trainer hooks

    def on_after_backward(self, batch: Batch) -> None:
        """Keep a held batch for psi; in SGM phases with sgm_scale="gradient" (the release) scale
        each modality's gradients by phi_m. (sgm_scale="update" acts in `update_scales`.)"""
        if self._held_batch is None or batch.size >= self._held_batch.size:
            self._held_batch = batch
        if not self.sgm_active():
            return
        if self.cfg.sgm_update == "step":
            self.update_shapley(batch)
        if self.cfg.sgm_scale != "gradient":
            return
        for i, params in enumerate(self.own_parameters().values()):
            factor = float(self.phi[i])
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def parameter_groups(self, train_cfg) -> list[dict]:
        """One optimiser group per modality's own parameters (named by the modality) and one for
        the shared rest (router, gate, fusion head), all at train.lr."""
        own = self.own_parameters()
        owned = {id(p) for params in own.values() for p in params}
        shared = [p for p in self.parameters() if id(p) not in owned]
        return [*({"params": params, "name": m} for m, params in own.items()),
                {"params": shared, "name": "shared"}]

    def update_scales(self) -> dict[str, float]:
        """Learning-rate multiplier per parameter-group name for the next optimiser step:
        {modality: phi_m} while SGM is active with sgm_scale="update", else {}."""
        if not self.sgm_active() or self.cfg.sgm_scale != "update":
            return {}
        return {m: float(self.phi[i]) for i, m in enumerate(MODALITIES)}

    def switch_rule(self) -> tuple[str, str]:
        metric, mode = SELECTION_DEFAULTS[self.info.metric_family]
        if self.cfg.switch_metric and self.cfg.switch_metric != metric:
            metric = self.cfg.switch_metric
            mode = "min" if metric in ("mae", "loss") else "max"
        return metric, self.cfg.switch_mode or mode

    def on_epoch_end(self, epoch: int, valid_metrics: dict[str, float]) -> dict[str, float]:
        """Phase switch bookkeeping, then psi/phi on the held batch; returns what to log."""
        cfg = self.cfg
        metric, mode = self.switch_rule()
        if metric not in valid_metrics:
            raise KeyError(f"PaSE phase switch: no validation metric {metric!r} in {sorted(valid_metrics)}")
        if int(self.phase) == 1 and cfg.dual_phase:
            value, best = float(valid_metrics[metric]), float(self.switch_best)
            if math.isnan(value):
                improved = False
            elif math.isnan(best):
                improved = True
            else:
                improved = value < best - cfg.switch_delta if mode == "min" else value > best + cfg.switch_delta
            if improved:
                self.switch_best.fill_(value)
                self.switch_bad_epochs.zero_()
            else:
                self.switch_bad_epochs += 1
            if epoch >= cfg.min_phase1_epochs and int(self.switch_bad_epochs) >= cfg.switch_patience:
                self.phase.fill_(2)
                self.switch_epoch.fill_(epoch)
        if self._held_batch is not None:
            self.update_shapley(self._held_batch)
            self._held_batch = None  # a fresh one each epoch
        logs: dict[str, float] = {
            "phase": float(self.phase),
            "switch_bad_epochs": float(self.switch_bad_epochs),
        }
        for i, m in enumerate(MODALITIES):
            logs[f"shapley_{m}"] = float(self.shapley[i])
            logs[f"phi_{m}"] = float(self.phi[i])
        return logs
