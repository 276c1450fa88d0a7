"""MMCL: Multi-Modality Collaborative Learning with feature decoupling for sentiment analysis
(arXiv 2501.12424; official code smwanghhh/MMCL, `network.py` and `train.py`).

WITHDRAWN PAPER. The authors withdrew the arXiv paper; its comment says the decoupling ignores the
modalities' distribution differences (cosine similarities between frames of different modalities
are compared as if the three feature distributions were alike). This file implements the method
faithfully from the official code, as the project's seed asks. `normalize_modalities` [ours, off
by default] is our fix for the stated flaw: each modality is standardised over its own real frames
before the similarity is taken.

Idea: split every modality into a part it shares with the other two ("common") and a part of its
own ("specific") with a parameter-free attention built from cross-modal frame similarities; refine
the common parts with self-attention; let a policy (actor) gate the specific parts frame by frame,
trained with DDPG against a critic whose reward is how well the gated features predict the label.

Shapes (B batch, L common length, D = `hidden` (128), M = 3 modalities stacked in the order
text, audio, vision; T = `replay_steps`):
    x_m = Linear(D_m -> D)(X_m)                                         [B, L, D] each -> [B, 3, L, D]
    decoupling (parameter-free), for m with the other two modalities n, k:
        x^ = L2-normalised over features; S_mn = x^_m x^_n^T            [B, L, L]
        A_m = softmax_row(min(S_mn, S_mk))         (masked: real key frames only)
        common_m = A_m x_m;  specific_m = softmax_row(1 - A_m) x_m     [B, L, D]
    intra-modal attention on common_m (4 heads, no out-projection): ctx = MHA(common_m);
        common_m <- LayerNorm(ctx + Linear(ctx))                       [B, L, D]
    actor:
        policy  a_m = sigmoid(Linear(D -> 1)(state_m)) per frame      [B, 3, L]
        gated_m = specific_m * a_m
        e_m = [masked mean_t common_m ; masked mean_t TransformerLayer(gated_m)]   [B, 2D]
        w_m = sigmoid(Linear(2D -> D) -> Linear(D -> 1))(e_m)                      [B, 1]
        logits = Head(mean_m w_m e_m), Head = Linear(2D -> D) -> Dropout(0.5) -> ReLU
                 -> BatchNorm -> Linear(D -> out)                                  [B, out]
    critic: per modality a TransformerLayer over [state_m ; a_m tiled to `heads` channels]
        [N, T, D + heads] -> mean over T -> concat [N, 3(D + heads)] -> Linear(-> 2D)
        -> Linear(-> D) -> Dropout -> ReLU -> BatchNorm -> Linear(-> 1) = Q(s, a)  [N]
    The TransformerLayers are torch's post-norm encoder layers (ReLU, feed-forward `ff_dim`
    2048 and dropout `attn_dropout` 0, as the release's nn.TransformerEncoderLayer defaults).

Training (`training_step`, DDPG across consecutive mini-batches, as train.py):
    state s_k = this batch's specific features gated by the PREVIOUS step's action (the ungated
    specific features at the first step), detached; action a_k = policy(s_k); task loss
    7 * CE over the (sample, emotion) pairs of IEMOCAP's four binary tasks (CE for
    classification; L1 for regression [ours]; weight `task_weight`) trains the decoupling
    ("model" optimiser) and the actor ("actor" optimiser). Reward r_k = sum over tasks of the
    predicted probability of the true class (regression [ours]: exp(-|y_hat - y|)).
    The next batch's state s_{k+1} (its specific features gated by a_k) completes the
    transition (s_k, a_k, r_k, s_{k+1}), which goes into a replay buffer of 1000 transitions
    (the oldest half dropped when full). When the buffer holds more than a batch, a batch is
    sampled: critic loss 13 * L1(Q(s, a), r + 0.5 Q'(s', pi'(s'))) ("critic" optimiser), actor
    loss -13 * mean Q(s, pi(s)) (actor optimiser), then soft target updates with tau 0.01. In
    each step this DDPG update comes BEFORE the task step (the release: after; see below).
    Three Adam optimisers (lr = train.lr; the configs set the release's 3e-4).
    Evaluation: the state is the ungated specific features.

Replay buffer (`ReplayBuffer`, all tensors are BUFFERS, so checkpoints hold it and resume is
exact): transitions are stored with a FIXED shape: the state and next state are the gated
specific features resampled to T = `replay_steps` (20, IEMOCAP's length) steps per modality by
length-aware area averaging over the real frames (`resample`, as adaptive average pooling; a
shorter sequence is stretched by repeating frames) [N, 3, T, D], the action likewise [N, 3, T],
the reward [N]. The critic and the policy's DDPG update work on these T-step tensors; the live
policy acts on every real frame. The transition still waiting for its next state (the last
step's s, a, r) is held in the buffer too (`pending_*`, sized by the last batch), and so is the
previous action that gates the next batch. Pairing across batches is by row: row i of one batch
with row i of the next (as the release; the rows of the two batches are different samples).

Deviations and choices of ours:
    - padding masks everywhere [ours]: masked softmax over real frames in the decoupling and the
      attention layers, masked means; the release uses fixed-length unmasked tensors. A
      transition's next state uses the previous action resampled to the new row's real length.
    - unequal lengths (`length_rule`) [ours]: the decoupling compares frame t of one modality
      with frame t of the others, so it needs equal lengths (word-aligned data). "resample":
      every sample's modalities are area-resampled to a common length, the longest of its three
      real lengths capped at `common_length` (0 = the shortest of the dataset's max lengths),
      with a mask; aligned samples are left untouched. "refuse": such data is an error.
    - utterance-level data (`over_utterances`) [ours]: with one frame per sample (mosi-poria)
      every similarity matrix is 1x1 and the decoupling is degenerate (common = specific = x).
      The sequence is then the utterances of a video: the trainer batches whole videos
      (`whole_videos`, `Batch.group`), each utterance is its masked mean over its frames, the
      model runs on [num_videos, U, D], and instead of pooling over time each utterance keeps
      its own position's [common; Transformer(gated specific)] vector, so that predictions stay
      per utterance (scattered back to the batch rows). The decoupling's rows mix the video's
      utterances, so `utterance_residual` (on by default) adds each utterance's own x_u to its
      common and specific parts; without it an utterance's features are lost in the mixture.
      Transitions are per video; a video's reward is the mean of its utterances' rewards.
      "auto" turns this on for data whose max lengths are all 1; "off" refuses such data with a
      message.
    - target networks are independently initialised (as the release, which builds fresh
      networks rather than copies) and only their parameters are soft-updated; the target
      actor is the policy alone (the only part pi'(s') uses).
    - order of the updates within a step [ours]: the DDPG update (critic, then actor, then the
      soft target updates) runs BEFORE this batch's task step, and this batch's action is taken
      by the policy after that update; the release runs the task step first and the DDPG update
      after it (its action comes from the policy before the update). The transitions, targets
      and losses are the same; what differs is which policy weights act on the batch and
      whether the task step's Adam move of the actor comes before or after the actor's RL move.
    - `zero_grad(set_to_none=True)`: the release's torch 1.8 zeroed gradients, so its actor
      optimiser also moved the predictor with stale Adam momentum during the actor update.
    - forward() in training mode (not used by `training_step`) returns single-batch versions of
      the RL terms, so that every trainable parameter is reachable from forward(): "critic"
      = 13 * L1(Q(s, a), r) (a one-step target: there is no next batch) and "actor" =
      -13 * mean Q(s, pi(s)) with the critic's parameters frozen (the gradient reaches the policy
      only).
    - the trainer's plateau scheduler (`train.scheduler=plateau`) steps all three optimisers on
      the validation selection metric; the release steps them on the validation loss (model:
      patience 30, actor/critic: 5, factor 0.95).
    - training batches with fewer than 2 rows are skipped (BatchNorm needs 2; the release drops
      the last incomplete batch).
    - selection on VALIDATION; the release reports the best test value of each metric
      separately (each from a different epoch).

Ablations: `use_policy` (no gates: a = 1, no critic, plain task training), `use_intra_attention`
(common parts without the self-attention), `use_decoupling` (common = specific = x_m).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from msakit.batch import MODALITIES, Batch, ModelOutput
from msakit.data.base import DatasetInfo
from msakit.losses import shape_prediction, task_loss
from msakit.models.base import check_choice
from msakit.modules.context import scatter_videos
from msakit.modules.pooling import masked_mean
from msakit.registry import register_model
from msakit.validated import ModelConfig, bounds

log = logging.getLogger(__name__)

NUM_MODALITIES = len(MODALITIES)


@dataclass
class MMCLConfig(ModelConfig):
    hidden: int = 128
    """D: width of the modality projections, decoupled features, actor and critic (release: 128)."""
    heads: int = 4
    """Attention heads of every attention layer, and the channels the critic tiles each action
    to (release: 4); must divide `hidden`."""
    ff_dim: int = 2048
    """Feed-forward width of the actor's and critic's transformer layers (torch default, as the release)."""
    dropout: float = 0.5
    """Dropout in the prediction head and the critic (release: 0.5)."""
    attn_dropout: float = 0.0
    """Dropout inside the attention / transformer layers (release: 0)."""
    task_weight: float = 7.0
    """Weight of the task loss (release w1 = 7 on IEMOCAP's CE; also applied to L1 / CE here)."""
    rl_weight: float = 13.0
    """Weight of the critic and actor losses (release w2 = 13)."""
    discount: float = 0.5
    """gamma of the critic's target r + gamma * Q'(s', pi'(s')) (release: 0.5)."""
    tau: float = 0.01
    """Soft target update rate (release: 0.01)."""
    buffer_size: int = 1000
    """Replay buffer capacity in transitions; the oldest half is dropped when full (release: 1000)."""
    replay_steps: int = 20
    """T: steps each stored state / action is resampled to, so transitions have a fixed shape
    (release: the fixed sequence length 20 of its IEMOCAP data)."""
    use_policy: bool = True
    """Gate the specific features with the actor's per-frame actions, trained by DDPG. Off:
    a = 1 and only the task loss trains (ablation)."""
    use_intra_attention: bool = True
    """Self-attention (+ residual Linear, LayerNorm) over each modality's common part (ablation switch)."""
    use_decoupling: bool = True
    """Split each modality into common / specific parts. Off: both are the projected features (ablation)."""
    normalize_modalities: bool = False
    """[ours] Standardise each modality over its real frames (per sample and feature) before the
    cross-modal similarity: our fix for the flaw the withdrawal names. Off = the release."""
    length_rule: str = "resample"
    """Unequal modality lengths: "resample" (area-resample each sample to a common length, with
    a mask) or "refuse" (an error: use word-aligned data)."""
    common_length: int = field(default=0, metadata=bounds(0))
    """Cap of the common length when resampling; 0 = the shortest of the dataset's max lengths."""
    over_utterances: str = "auto"
    """"on": the sequence is the utterances of a video (whole-video batches, per-utterance
    outputs); "off": the frames of each sample (length-1 data is refused); "auto": "on" exactly
    when the dataset's max lengths are all 1 (utterance-level features such as mosi-poria)."""
    utterance_residual: bool = True
    """[ours] Over utterances only: add each utterance's own projected features x_u to its common
    and specific parts. The decoupling's rows mix the video's utterances (A x, softmax(1 - A) x),
    which erases what tells one utterance from another; per-utterance labels then cannot be
    recovered (MOSI valid MAE ~1.15, near predicting the mean). Off = the pure mixing."""

    def __post_init__(self) -> None:
        check_choice("model.length_rule", self.length_rule, ("resample", "refuse"))
        check_choice("model.over_utterances", self.over_utterances, ("auto", "on", "off"))
        for name in ("hidden", "heads", "ff_dim", "replay_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(
                f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1)")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError("model.tau must be in (0, 1]")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError("model.discount must be in [0, 1]")
        if self.buffer_size < 2:
            raise ValueError("model.buffer_size must be >= 2")
        if self.common_length < 0:
            raise ValueError("model.common_length must be >= 0 (0 = automatic)")
        for name in ("task_weight", "rl_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0")

    @staticmethod
    def search_space() -> dict:
        """Ranges `msakit tune` searches (msakit/tune.py format; train.* keys override its defaults)."""
        return {
            "model.hidden": [64, 128, 256],
            "model.dropout": {"low": 0.1, "high": 0.6},
            "model.task_weight": {"low": 1.0, "high": 20.0, "log": True},
            "model.rl_weight": {"low": 1.0, "high": 30.0, "log": True},
            "model.tau": {"low": 1e-3, "high": 1e-1, "log": True},
        }

    @classmethod
    def tiny(cls) -> MMCLConfig:
        return cls(hidden=8, heads=2, ff_dim=16, buffer_size=64, replay_steps=4)


# ----------------------------------------------------------------------------- helpers


def resample(
    x: torch.Tensor, lengths_in: torch.Tensor, lengths_out: torch.Tensor, steps_out: int
) -> torch.Tensor:
    """Length-aware area resampling along dim 1 (adaptive average pooling per row).

    x [N, L_in, *] whose first lengths_in[i] frames are real; -> [N, steps_out, *] whose first
    lengths_out[i] frames are the resampled sequence and the rest zeros. Output frame j of row i
    averages input frames [floor(j n / m), ceil((j + 1) n / m)) with n = lengths_in[i],
    m = lengths_out[i] (torch's adaptive pooling windows), so a longer sequence is averaged and a
    shorter one stretched by repetition. Padding frames never enter; n == m is the identity.
    """
    n = lengths_in.to(torch.long).clamp_min(1)[:, None, None]  # [N, 1, 1]
    m = lengths_out.to(torch.long).clamp_min(1)[:, None, None]
    j = torch.arange(steps_out, device=x.device)[None, :, None]  # [1, S, 1]
    t = torch.arange(x.shape[1], device=x.device)[None, None, :]  # [1, 1, L_in]
    start = (j * n) // m
    end = torch.maximum(((j + 1) * n + m - 1) // m, start + 1)
    weights = ((t >= start) & (t < end) & (j < m)).to(x.dtype)  # [N, S, L_in]
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.einsum("nsl,nl...->ns...", weights, x)


def masked_softmax(
    scores: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor
) -> torch.Tensor:
    """Row softmax of scores [B, ..., L, L] over the real keys; rows of padded queries are 0.
    key_mask / query_mask [B, L] bool."""
    shape = (scores.shape[0],) + (1,) * (scores.dim() - 3)
    keys = key_mask.view(*shape, 1, -1)
    queries = query_mask.view(*shape, -1, 1)
    weights = torch.softmax(scores.masked_fill(~keys, torch.finfo(scores.dtype).min), dim=-1)
    return weights * keys.to(scores.dtype) * queries.to(scores.dtype)


def standardize_over_time(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x [B, M, L, D], mask [B, L] -> each (sample, modality, feature) standardised over real frames."""
    w = mask[:, None, :, None].to(x.dtype)  # [B, 1, L, 1]
    count = w.sum(dim=2, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(dim=2, keepdim=True) / count
    var = ((x - mean).pow(2) * w).sum(dim=2, keepdim=True) / count
    return (x - mean) / (var + eps).sqrt() * w


def decouple(
    x: torch.Tensor, mask: torch.Tensor, normalize_modalities: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MMCL's parameter-free decoupling.

    x [B, M=3, L, D] (the projected modalities, frame t of each modality aligned), mask [B, L].
    -> common [B, 3, L, D], specific [B, 3, L, D], and the two attention maps A (common) and
    A' = softmax_row(1 - A) (specific) [B, 3, L, L], whose rows sum to 1 over the real frames
    (0 at padded query rows). A_m = softmax_row(min over the two other modalities n of
    x^_m x^_n^T), x^ = L2-normalised features (after `standardize_over_time` when
    normalize_modalities [ours])."""
    source = standardize_over_time(x, mask) if normalize_modalities else x
    unit = F.normalize(source, p=2, dim=-1)
    sim = torch.einsum("bmid,bnjd->bmnij", unit, unit)  # [B, 3, 3, L, L]
    others = [[n for n in range(NUM_MODALITIES) if n != m] for m in range(NUM_MODALITIES)]
    closest = torch.stack(
        [torch.minimum(sim[:, m, a], sim[:, m, b]) for m, (a, b) in enumerate(others)], dim=1
    )
    common_attention = masked_softmax(closest, mask, mask)  # [B, 3, L, L]
    specific_attention = masked_softmax(1.0 - common_attention, mask, mask)
    return common_attention @ x, specific_attention @ x, common_attention, specific_attention


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source, parameters only (as the release)."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(1.0 - tau).add_(s, alpha=tau)


@contextmanager
def frozen(module: nn.Module):
    """Build graphs through `module` without gradients reaching its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _encoder_layer(dim: int, heads: int, ff_dim: int, dropout: float) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=True
    )


# ----------------------------------------------------------------------------- blocks


class IntraAttention(nn.Module):
    """The release's Self_Attention: multi-head attention without an output projection,
    out = LayerNorm(ctx + Linear(ctx)). x [B, L, D], mask [B, L] -> [B, L, D] (0 at padding)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, d_h]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # [B, H, L, L]
        context = self.dropout(masked_softmax(scores, mask, mask)) @ v
        context = context.transpose(1, 2).reshape(x.shape)  # [B, L, D]
        return self.norm(context + self.dense(context)) * mask[..., None].to(x.dtype)


class Policy(nn.Module):
    """The actor's policy: a_m = sigmoid(Linear(D -> 1)) per frame of each modality's state.
    state [N, 3, L, D] (+ mask [N, L]) -> action [N, 3, L] (0 at padded frames)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in MODALITIES)

    def forward(self, state: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        action = torch.stack(
            [torch.sigmoid(h(state[:, m])).squeeze(-1) for m, h in enumerate(self.heads)], 1
        )
        return action if mask is None else action * mask[:, None, :].to(action.dtype)


class Actor(nn.Module):
    """Policy + predictor (the release's Actor): gates, temporal transformers over the gated
    specific parts, modality weights and the prediction head."""

    def __init__(self, cfg: MMCLConfig, out_dim: int):
        super().__init__()
        d = cfg.hidden
        self.policy = Policy(d)
        self.temporal = nn.ModuleList(
            _encoder_layer(d, cfg.heads, cfg.ff_dim, cfg.attn_dropout) for _ in MODALITIES
        )
        self.weight = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * d, d), nn.Linear(d, 1), nn.Sigmoid()) for _ in MODALITIES
        )
        self.head = nn.Sequential(
            nn.Linear(2 * d, d),
            nn.Dropout(cfg.dropout),
            nn.ReLU(),
            nn.BatchNorm1d(d),
            nn.Linear(d, out_dim),
        )

    def fuse(
        self, common: torch.Tensor, gated: torch.Tensor, mask: torch.Tensor, per_position: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """common, gated [N, 3, L, D], mask [N, L] -> (fused, weights): fused = mean_m w_m e_m,
        [N, 2D] (masked means over time) or [N, L, 2D] with per_position; weights [N(, L), 3]."""
        padding = ~mask
        embeddings, weights = [], []
        for m in range(NUM_MODALITIES):
            temporal = self.temporal[m](gated[:, m], src_key_padding_mask=padding)  # [N, L, D]
            if per_position:
                e = torch.cat([common[:, m], temporal], dim=-1)  # [N, L, 2D]
            else:
                e = torch.cat(
                    [masked_mean(common[:, m], mask), masked_mean(temporal, mask)], dim=-1
                )
            w = self.weight[m](e)  # [N(, L), 1]
            embeddings.append(w * e)
            weights.append(w)
        return torch.stack(embeddings).mean(dim=0), torch.cat(weights, dim=-1)


class Critic(nn.Module):
    """Q(s, a): per modality a transformer layer over [state_m; action_m tiled to `heads`
    channels], mean over time, concat -> MLP. state [N, 3, T, D], action [N, 3, T] -> [N]."""

    def __init__(self, cfg: MMCLConfig):
        super().__init__()
        d, self.tile = cfg.hidden, cfg.heads
        width = d + cfg.heads
        self.layers = nn.ModuleList(
            _encoder_layer(width, cfg.heads, cfg.ff_dim, cfg.attn_dropout) for _ in MODALITIES
        )
        self.proj = nn.Sequential(
            nn.Linear(NUM_MODALITIES * width, 2 * d),
            nn.Linear(2 * d, d),
            nn.Dropout(cfg.dropout),
            nn.ReLU(),
            nn.BatchNorm1d(d),
            nn.Linear(d, 1),
        )

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        tiled = action[..., None].expand(*action.shape, self.tile)  # [N, 3, T, heads]
        inputs = torch.cat([state, tiled], dim=-1)  # [N, 3, T, D + heads]
        pooled = [
            layer(inputs[:, m]).mean(dim=1) for m, layer in enumerate(self.layers)
        ]  # [N, D + heads]
        return self.proj(torch.cat(pooled, dim=-1)).squeeze(-1)


class ReplayBuffer(nn.Module):
    """Fixed-capacity replay memory held in buffers (saved with the model's state_dict).

    Transitions: state / next_state [C, 3, T, D], action [C, 3, T], reward [C]; `count` rows
    are filled, oldest first. `push` drops the oldest half when the new rows would fill the
    buffer (as the release's add_batch) and, if they still do not fit, as many more of the
    oldest as needed. `sample` draws rows without replacement from torch's global generator
    (which the trainer checkpoints).

    Also held: the last step's transition still waiting for its next state (`pending_state`,
    `pending_action`, `pending_reward`, sized by that batch; empty when none), whose action
    gates the next batch's state."""

    def __init__(self, capacity: int, modalities: int, steps: int, dim: int):
        super().__init__()
        self.capacity = capacity
        self.register_buffer("state", torch.zeros(capacity, modalities, steps, dim))
        self.register_buffer("action", torch.zeros(capacity, modalities, steps))
        self.register_buffer("reward", torch.zeros(capacity))
        self.register_buffer("next_state", torch.zeros(capacity, modalities, steps, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending_state", torch.zeros(0, modalities, steps, dim))
        self.register_buffer("pending_action", torch.zeros(0, modalities, steps))
        self.register_buffer("pending_reward", torch.zeros(0))

    _PENDING = ("pending_state", "pending_action", "pending_reward")
    _FIELDS = ("state", "action", "reward", "next_state")

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def push(
        self,
        state: torch.Tensor,
        action: torch.Tensor,
        reward: torch.Tensor,
        next_state: torch.Tensor,
    ) -> None:
        new = (state, action, reward, next_state)
        n = min(state.shape[0], self.capacity)
        count = len(self)
        if count + n >= self.capacity:  # drop the oldest half (release), more if still too full
            keep = min(count - count // 2, self.capacity - n)
            for name in self._FIELDS:
                buf = getattr(self, name)
                buf[:keep] = buf[count - keep : count].clone()
            count = keep
        for name, value in zip(self._FIELDS, new, strict=True):
            getattr(self, name)[count : count + n] = value[-n:].to(getattr(self, name))
        self.count.fill_(count + n)

    def sample(self, n: int) -> tuple[torch.Tensor, ...]:
        """n rows without replacement (all rows, shuffled, if fewer): (state, action, reward, next_state)."""
        rows = torch.randperm(len(self))[:n].to(self.count.device)
        return tuple(getattr(self, name)[rows] for name in self._FIELDS)

    @torch.no_grad()
    def hold(self, state: torch.Tensor, action: torch.Tensor, reward: torch.Tensor) -> None:
        """Keep (s, a, r) until the next batch provides s'."""
        self.pending_state = state.detach().clone()
        self.pending_action = action.detach().clone()
        self.pending_reward = reward.detach().clone()

    def release(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pending (s, a, r) (possibly empty), and forget them."""
        held = (self.pending_state, self.pending_action, self.pending_reward)
        self.pending_state, self.pending_action, self.pending_reward = (t[:0] for t in held)
        return held

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The pending transition is sized by the batch it came from: take the saved size, and
        the layout `MMCL.fixed` gives it ([P, T, 3, ...] in memory, seen as [P, 3, T, ...]): read
        back contiguous, the einsum that resamples it rounded differently and a resumed run
        drifted from an uninterrupted one by ~1e-7 from its first step."""
        for name in self._PENDING:
            saved = state_dict.get(prefix + name)
            own = getattr(self, name)
            if saved is not None and saved.shape[1:] == own.shape[1:]:  # else torch names the mismatch
                if saved.dim() >= 3:
                    swapped = (saved.shape[0], saved.shape[2], saved.shape[1], *saved.shape[3:])
                    setattr(self, name, own.new_empty(swapped).transpose(1, 2))
                else:
                    setattr(self, name, own.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------- model


@dataclass
class Sequences:
    """The model's view of a batch: x [N, 3, L, D] projected, mask [N, L]; in utterance mode
    N = videos and (video, position) [B] map batch rows to their utterance."""

    x: torch.Tensor
    mask: torch.Tensor
    video: torch.Tensor | None = None
    position: torch.Tensor | None = None

    @property
    def per_utterance(self) -> bool:
        return self.video is not None


@register_model("mmcl", config=MMCLConfig)
class MMCL(nn.Module):
    """MMCL: parameter-free common/specific decoupling, DDPG-gated specific parts (withdrawn paper)."""

    def __init__(self, cfg: MMCLConfig, info: DatasetInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        utterance_data = all(length == 1 for length in info.max_lengths.values())
        if cfg.over_utterances == "off" and utterance_data:
            raise ValueError(
                f"MMCL on {info.name!r}: every sample has a single frame per modality (utterance-level "
                "features), so each cross-modal similarity matrix is 1x1 and the decoupling is "
                "degenerate (common = specific = the features). Set model.over_utterances=auto (or on) "
                "to decouple over the utterances of each video instead."
            )
        self.whole_videos = cfg.over_utterances == "on" or (
            cfg.over_utterances == "auto" and utterance_data
        )
        lengths = set(info.max_lengths.values())
        if cfg.length_rule == "refuse" and len(lengths) > 1 and not self.whole_videos:
            raise ValueError(
                f"MMCL on {info.name!r}: the modalities have different lengths {dict(info.max_lengths)}; "
                "the decoupling compares frame t of each modality with frame t of the others and needs "
                "word-aligned data. Use aligned features or set model.length_rule=resample."
            )
        self.common_length = cfg.common_length or min(info.max_lengths.values())
        d = cfg.hidden
        self.projections = nn.ModuleList(nn.Linear(info.feature_dims[m], d) for m in MODALITIES)
        self.intra_attention = nn.ModuleList(
            IntraAttention(d, cfg.heads, cfg.attn_dropout) for _ in MODALITIES
        )
        self.actor = Actor(cfg, info.output_dim)
        self.critic = Critic(cfg)
        self.actor_target = Policy(d)  # independent initialisation, as the release
        self.critic_target = Critic(cfg)
        for target in (self.actor_target, self.critic_target):
            target.requires_grad_(False)
        self.replay = ReplayBuffer(cfg.buffer_size, NUM_MODALITIES, cfg.replay_steps, d)

    # ------------------------------------------------------------------ building blocks

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of the three optimisers: the decoupling ("model"), actor, critic."""
        model = [*self.projections.parameters(), *self.intra_attention.parameters()]
        return {
            "model": model,
            "actor": list(self.actor.parameters()),
            "critic": list(self.critic.parameters()),
        }

    def sequences(self, batch: Batch) -> Sequences:
        """Project each modality and bring the three to one length (see the module docstring)."""
        if self.whole_videos:
            rows, video, position = [], None, None
            for m, projection in zip(MODALITIES, self.projections, strict=True):
                utterances = projection(masked_mean(batch.features(m), batch.mask(m)))  # [B, D]
                padded, mask, video, position = scatter_videos(utterances, batch.group)  # [V, U, D]
                rows.append(padded)
            return Sequences(torch.stack(rows, dim=1), mask, video, position)
        projected = [
            p(batch.features(m)) for m, p in zip(MODALITIES, self.projections, strict=True)
        ]
        masks = [batch.mask(m) for m in MODALITIES]
        aligned = all(mk.shape == masks[0].shape and torch.equal(mk, masks[0]) for mk in masks[1:])
        if aligned and masks[0].shape[1] <= self.common_length:
            return Sequences(torch.stack(projected, dim=1), masks[0])
        if self.cfg.length_rule == "refuse":
            raise ValueError(
                "MMCL: this batch's modalities have different real lengths; the decoupling needs "
                "word-aligned data (or model.length_rule=resample)"
            )
        lengths = torch.stack([mk.sum(dim=1) for mk in masks], dim=1)  # [B, 3]
        # >= 1 step: a sample whose three modalities are all removed reads one zero frame
        target = lengths.amax(dim=1).clamp(1, self.common_length)  # [B]
        steps = int(target.max())
        x = torch.stack(
            [resample(p, lengths[:, m], target, steps) for m, p in enumerate(projected)], dim=1
        )  # [B, 3, L, D]
        mask = torch.arange(steps, device=x.device)[None, :] < target[:, None]
        return Sequences(x, mask)

    def decoupled(self, seq: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """-> common (after the intra-modal attention), specific, both [N, 3, L, D]."""
        if self.cfg.use_decoupling:
            common, specific, _, _ = decouple(seq.x, seq.mask, self.cfg.normalize_modalities)
            if seq.per_utterance and self.cfg.utterance_residual:  # [ours], see the config field
                common, specific = common + seq.x, specific + seq.x
        else:
            common, specific = seq.x, seq.x
        if self.cfg.use_intra_attention:
            common = torch.stack(
                [att(common[:, m], seq.mask) for m, att in enumerate(self.intra_attention)], 1
            )
        return common, specific

    def predict(
        self, common: torch.Tensor, gated: torch.Tensor, seq: Sequences
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (raw [B, output_dim] per batch row, modality weights)."""
        fused, weights = self.actor.fuse(common, gated, seq.mask, seq.per_utterance)
        if seq.per_utterance:
            fused = fused[seq.video, seq.position]  # [B, 2D]: back to the batch's utterances
        return self.actor.head(fused), weights

    def fixed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, 3, L, ...] over the real frames of mask [N, L] -> [N, 3, T, ...] (replay shape)."""
        n, m, length = x.shape[:3]
        rows = x.transpose(1, 2).reshape(n, length, m, -1)  # [N, L, 3, F]
        steps = self.cfg.replay_steps
        out = resample(rows, mask.sum(dim=1), torch.full((n,), steps, device=x.device), steps)
        return out.reshape(n, steps, m, *x.shape[3:]).transpose(1, 2)

    def reward(
        self, prediction: torch.Tensor, labels: torch.Tensor, seq: Sequences
    ) -> torch.Tensor:
        """[N] per sequence row: sum over tasks of p(true class); regression [ours] exp(-|y_hat - y|);
        a video's reward is its utterances' mean."""
        with torch.no_grad():
            if self.info.task == "regression":
                r = torch.exp(-(prediction - labels).abs())
            elif self.info.task == "classification":
                r = prediction.softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
            else:
                r = prediction.softmax(-1).gather(-1, labels[..., None]).squeeze(-1).sum(-1)  # [B]
            if not seq.per_utterance:
                return r
            videos = seq.x.shape[0]
            total = r.new_zeros(videos).index_add_(0, seq.video, r)
            return total / r.new_zeros(videos).index_add_(0, seq.video, torch.ones_like(r))

    def _task(self, raw: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = shape_prediction(raw, self.info)
        return prediction, self.cfg.task_weight * task_loss(prediction, batch.labels, self.info)

    # ------------------------------------------------------------------ forward (evaluation)

    def forward(self, batch: Batch) -> ModelOutput:
        seq = self.sequences(batch)
        common, specific = self.decoupled(seq)
        state = specific.detach()  # evaluation state: the ungated specific features
        if self.cfg.use_policy:
            action = self.actor.policy(state, seq.mask)  # [N, 3, L]
        else:  # ablation: every gate open
            action = seq.mask[:, None, :].expand(-1, NUM_MODALITIES, -1).to(state.dtype)
        raw, weights = self.predict(common, specific * action[..., None], seq)
        prediction, task = self._task(raw, batch)
        losses = {"task": task}
        if (
            self.training and self.cfg.use_policy
        ):  # single-batch RL terms (see the module docstring)
            s, a = self.fixed(state, seq.mask), self.fixed(action.detach(), seq.mask)
            r = self.reward(prediction.detach(), batch.labels, seq)
            losses["critic"] = self.cfg.rl_weight * F.l1_loss(self.critic(s, a), r)
            with frozen(self.critic):
                losses["actor"] = -self.cfg.rl_weight * self.critic(s, self.actor.policy(s)).mean()
        logs = {
            f"weight_{m}": float(weights[..., i].detach().mean()) for i, m in enumerate(MODALITIES)
        }
        logs["gate"] = float(action.detach().sum() / (seq.mask.sum() * NUM_MODALITIES))
        return ModelOutput(prediction=prediction, losses=losses, logs=logs)

    # ------------------------------------------------------------------ training (trainer hooks)

    def modality_encoders(self) -> dict[str, nn.Module]:
        """The per-modality part (msakit.probes): each modality's input projection; everything
        after it (decoupling, attention, fusion) mixes modalities."""
        return dict(zip(MODALITIES, self.projections, strict=True))

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        """Three Adam optimisers (release: lr 3e-4 each) over `optimizer_groups`."""
        return {
            name: torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
            for name, params in self.optimizer_groups().items()
        }

    @staticmethod
    def _step(loss: torch.Tensor, optimizers: list[torch.optim.Optimizer], train_cfg) -> None:
        """zero_grad -> backward -> clip each optimiser's parameters (train.grad_clip) -> step."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            if train_cfg.grad_clip > 0:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
            optimizer.step()

    def _update_critic_and_actor(
        self, rows: int, optimizers: dict, train_cfg
    ) -> dict[str, torch.Tensor]:
        """One DDPG update from `rows` replayed transitions, then the soft target updates."""
        s, a, r, s_next = self.replay.sample(rows)
        with torch.no_grad():
            target = r + self.cfg.discount * self.critic_target(s_next, self.actor_target(s_next))
        critic_loss = self.cfg.rl_weight * F.l1_loss(self.critic(s, a), target)
        self._step(critic_loss, [optimizers["critic"]], train_cfg)
        actor_loss = -self.cfg.rl_weight * self.critic(s, self.actor.policy(s)).mean()
        self._step(actor_loss, [optimizers["actor"]], train_cfg)
        optimizers["critic"].zero_grad(set_to_none=True)  # the actor loss reached the critic too
        soft_update(self.critic_target, self.critic, self.cfg.tau)
        soft_update(self.actor_target, self.actor.policy, self.cfg.tau)
        return {"critic": critic_loss.detach(), "actor": actor_loss.detach()}

    def _previous_gate(
        self, rows: int, lengths: torch.Tensor, steps: int
    ) -> tuple[torch.Tensor, int]:
        """The held action resampled onto this batch's rows ([N, 3, L]; 1 where no row is
        paired) and the number of paired rows (row i of the last batch with row i of this one)."""
        held = self.replay.pending_action  # [P, 3, T]
        paired = min(held.shape[0], rows)
        gate = torch.ones(rows, NUM_MODALITIES, steps, device=lengths.device)
        if paired:
            previous = held[:paired].transpose(1, 2)  # [n, T, 3]
            source = torch.full_like(lengths[:paired], self.cfg.replay_steps)
            gate[:paired] = resample(previous, source, lengths[:paired], steps).transpose(1, 2)
        return gate, paired

    def training_step(self, batch: Batch, optimizers: dict, train_cfg) -> ModelOutput:
        """One DDPG step on this batch (see the module docstring); returns detached losses."""
        seq = self.sequences(batch)
        rows, lengths = seq.x.shape[0], seq.mask.sum(dim=1)
        if rows < 2:  # BatchNorm cannot train on one row; the release drops such a batch
            log.debug("MMCL: skipped a training batch with %d row(s)", rows)
            return ModelOutput(prediction=torch.zeros(0), losses={})
        common, specific = self.decoupled(seq)
        losses: dict[str, torch.Tensor] = {}
        if self.cfg.use_policy:
            # state: this batch's specific features gated by the previous step's action; it is
            # also the next state of the transition the previous step left pending
            gate, paired = self._previous_gate(rows, lengths, seq.mask.shape[1])
            state = specific.detach() * gate[..., None]  # [N, 3, L, D]
            state_fixed = self.fixed(state, seq.mask)  # [N, 3, T, D]
            held_state, held_action, held_reward = self.replay.release()
            if paired:
                self.replay.push(
                    held_state[:paired],
                    held_action[:paired],
                    held_reward[:paired],
                    state_fixed[:paired],
                )
            if len(self.replay) > rows:
                losses.update(self._update_critic_and_actor(rows, optimizers, train_cfg))
            action = self.actor.policy(state, seq.mask)  # [N, 3, L]
        else:  # ablation: every gate open, task loss only
            action = seq.mask[:, None, :].expand(-1, NUM_MODALITIES, -1).to(specific.dtype)
        raw, _ = self.predict(common, specific * action[..., None], seq)
        prediction, task = self._task(raw, batch)
        self._step(task, [optimizers["model"], optimizers["actor"]], train_cfg)
        logs = {"gate": float(action.detach().sum() / (lengths.sum() * NUM_MODALITIES))}
        if self.cfg.use_policy:
            reward = self.reward(prediction.detach(), batch.labels, seq)
            self.replay.hold(state_fixed, self.fixed(action.detach(), seq.mask), reward)
            logs["reward"] = float(reward.mean())
        return ModelOutput(prediction.detach(), {"task": task.detach(), **losses}, logs)

    def on_epoch_end(self, epoch: int, valid_metrics: dict) -> dict[str, float]:
        return {"replay_size": float(len(self.replay))} if self.cfg.use_policy else {}
