"""Masked multi-head attention and MulT's cross-modal transformer (Tsai et al., ACL 2019).

Shapes: query sequence x [B, L_q, D] with x_mask [B, L_q]; optional source sequence
context [B, L_k, D] with context_mask [B, L_k] (bool, True = real frame). Without a context the
block is an ordinary (masked) self-attention transformer.

Padding never leaks: padded keys get attention weight exactly 0, rows whose keys are ALL padding
get all-zero weights (never NaN), and the outputs at padded query positions are set to 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msakit.modules.dropout import WideDropout, keep_mask


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[length, dim] sinusoidal position embeddings of positions 1..length.

    The tensor2tensor/fairseq variant that MulT uses: first half sines, second half cosines,
    frequencies 10000^(-i / (dim/2 - 1)); positions start at 1 (fairseq reserves 0 for padding);
    an odd `dim` gets a trailing zero column.
    """
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -scale)
    positions = torch.arange(1, length + 1, device=device, dtype=torch.float32)
    angles = positions[:, None] * freqs[None, :]  # [L, half]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(length, 1)], dim=1)
    return emb.to(dtype)


def _narrow_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for b [.., K, N] with a narrow N (a head's d_h), computed as (b^T a^T)^T: CPU batched
    GEMMs with N = 5 ran ~2.8x slower than the transposed product with N = L (701 vs 254 us for
    MulT's [160, 50, 50] @ [160, 50, 5]). Same value up to summation order; the result is a
    transposed view."""
    return (b.transpose(-2, -1) @ a.transpose(-2, -1)).transpose(-2, -1)


#: Softmax weights of one attention call up to this size are kept for backward with the dropped
#: weights (plain autograd keeps the float mask too); larger ones (long unaligned sequences, large
#: batches) are recomputed there and the mask is kept as bytes.
STORE_WEIGHTS_BYTES = 4 * 2**20
#: Without dropout on CPU, calls with fewer score entries per head (L_q * L_k) than this go to
#: PyTorch's fused kernel: faster there (B 32, 8 heads, d_h 5, forward + backward, 2 threads,
#: fused vs `_Attention`: L = 8 1.9 vs 2.9 ms, L = 16 2.9 vs 3.3 ms; L = 32 7.8 vs 5.6 ms,
#: L = 50 13.4 vs 8.5 ms).
OWN_KERNEL_MIN_SCORES = 400


class _Attention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d_h) + bias) -> inverted dropout (p > 0) -> @ v, with a hand-written
    backward.

    q [N, L_q, d_h], k/v [N, L_k, d_h] (N = B * H), bias [N, 1, L_k] (0, or the dtype's min for a
    padded key), p in [0, 1) -> [N, L_q, d_h] (a transposed view).
    Small weights (at most `STORE_WEIGHTS_BYTES`; MulT on aligned MOSI: 1.6 MB a layer) are kept
    for backward with the dropped weights: backward then skips the score product and softmax it
    would redo, allocates nothing of their size but the gradient, and forms the score gradient
    as dP * (P * M) - delta * P in two passes.
    Larger ones keep only the inputs, the output and a 1-byte mask, and are recomputed in backward
    as flash attention does: plain autograd keeps three float tensors of [N, L_q, L_k] per
    attention, and MulT at batch 128 on MOSI's unaligned lengths (audio 500, vision 375) needed
    more than 20 GB for them. The mask is `dropout.keep_mask`'s (`nn.Dropout` draws with
    `bernoulli_`, ~7x dearer). Not twice differentiable.
    """

    @staticmethod
    def _weights(q_scaled, k, bias):
        # in q's dtype: CUDA autocast runs softmax in float32, and the kept weights meet gradients
        # in q's dtype in backward's products (the dropped weights are cast for the product anyway)
        weights = torch.softmax(torch.baddbmm(bias, q_scaled, k.transpose(1, 2)), dim=-1)
        return weights.to(q_scaled.dtype)

    @staticmethod
    def forward(ctx, q, k, v, bias, p):
        q_scaled = q * q.shape[-1] ** -0.5
        weights = _Attention._weights(q_scaled, k, bias)  # [N, L_q, L_k]
        store = weights.numel() * weights.element_size() <= STORE_WEIGHTS_BYTES
        keep, scale, dropped = None, 1.0, weights
        if p > 0:
            keep, scale = keep_mask(weights.shape, p, weights.device)
            # bytes converted before the multiply: an in-place multiply by a byte tensor cast it
            # element by element (~1 ms vs 0.1 ms on [160, 50, 50])
            keep = keep.view(torch.uint8)
            if store:  # backward reads the dropped weights, not the mask
                dropped, keep = weights * keep.to(weights.dtype), None
            else:
                dropped = weights.mul_(keep.to(weights.dtype))
        # the 1 / (1 - p) scale goes on the [.., d_h] side of the product, d_h << L_k
        out = _narrow_matmul(dropped, v)
        if p > 0:
            out = out.mul_(scale)
        stored = (weights, dropped) if store else (None, None)
        ctx.save_for_backward(q_scaled, k, v, bias, keep, out, *stored)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q_scaled, k, v, bias, keep, out, weights, dropped = ctx.saved_tensors
        if weights is None:  # recompute P (and P * mask in place: P itself is needed first)
            weights = _Attention._weights(q_scaled, k, bias)
        grad_out_scaled = grad_out * ctx.scale if ctx.scale != 1.0 else grad_out
        grad_weights = torch.bmm(grad_out_scaled, v.transpose(1, 2))  # dP (of the dropped weights)
        # softmax backward: dS = P * (dP * M - sum_j dP_j M_j P_j), and that sum is dO . O per row
        delta = (grad_out * out).sum(-1, keepdim=True)  # [N, L_q, 1]
        if dropped is not None:  # stored: dS = dP * (P * M) - delta * P, two passes
            grad_scores = grad_weights.mul_(dropped).addcmul_(weights, delta, value=-1.0)
        else:
            if keep is not None:
                keep = keep.to(weights.dtype)  # converted once, for both products
                grad_weights.mul_(keep)
            grad_scores = grad_weights.sub_(delta).mul_(weights)
            dropped = weights if keep is None else weights.mul_(keep)
        grad_v = _narrow_matmul(dropped.transpose(1, 2), grad_out_scaled)
        alpha = q_scaled.shape[-1] ** -0.5
        grad_q = _narrow_matmul(grad_scores, k).mul_(alpha)
        return grad_q, _narrow_matmul(grad_scores.transpose(1, 2), q_scaled), grad_v, None, None


class KeyPadding:
    """A key-padding mask prepared once for every attention over the same keys (the layers of a
    transformer). key_mask [B, L_k] bool (True = real key).

    visible [B, L_k]: the keys each query may read (a row without any real key reads all of
    them, so nothing is NaN, and its context is zeroed: `empty_rows`, None when every row has
    a key; checked on CPU only, where it costs no device sync). `bias(heads, dtype)`: the
    additive score bias [B * heads, 1, L_k] (0, or dtype's min for a hidden key), built once
    per (heads, dtype).
    Made per call before: with the backward's two-pass score gradient, 16 MulT training steps
    took 6.47 vs 7.04 s (in-process, alternating).
    """

    def __init__(self, key_mask: torch.Tensor):
        has_keys = key_mask.any(dim=-1)  # [B]
        self.visible = key_mask | ~has_keys[:, None]
        every_row = key_mask.device.type == "cpu" and bool(has_keys.all())
        self.empty_rows = None if every_row else ~has_keys
        self._bias: dict = {}

    def bias(self, heads: int, dtype: torch.dtype) -> torch.Tensor:
        if (heads, dtype) not in self._bias:
            b, length = self.visible.shape
            bias = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
            bias = bias.masked_fill_(~self.visible, torch.finfo(dtype).min)[:, None, :]
            self._bias[heads, dtype] = bias.expand(b, heads, length).reshape(b * heads, 1, length)
        return self._bias[heads, dtype]


class RealRows:
    """The real frames of a padded batch as rows: mask [B, L] bool (True = real frame).

    `pack` x [B, L, D] -> [N, D] (the N real frames, batch-major); `unpack` [N, D] -> [B, L, D]
    with zeros at the padding. A transformer whose keys hide the padding computes its
    position-wise parts (LayerNorms, projections, feed-forward) on the packed rows only: the real
    frames' outputs are the same, and the work on padding frames is skipped (47% of a batch's
    frames on benchmarks/against_mmsa.py's MOSI-sized pickle). One MulT cross-modal transformer
    (d 50, 10 heads, 4 layers, batch 16 x 49 frames, 66% real), forward + backward, 2 threads,
    12 alternating rounds: 38.4 vs 40.7 ms median; 16 MulT training steps 6.21 vs 6.58 s. The
    attention itself still runs over the padded [B, L_q, L_k] scores; grouping samples by length
    into separately padded calls (40% fewer score entries at these sizes) was measured slower
    (37.7 vs 36.8 ms): the per-call cost outweighed it. Residual and ReLU dropout masks are drawn
    over the packed rows (same distribution; a seeded run draws other numbers than before
    4191e0d, when they were drawn over [B, L, D]); embedding and attention dropout are unchanged.
    """

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        self.index = mask.reshape(-1).nonzero().squeeze(1)  # [N]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        b, length = self.shape
        out = rows.new_zeros(b * length, rows.shape[-1]).index_copy_(0, self.index, rows)
        return out.view(b, length, rows.shape[-1])


class MaskedMultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention with a key-padding mask.

    query [B, L_q, D], key/value [B, L_k, D], key_mask [B, L_k] bool -> [B, L_q, D].
    A query whose keys are all padding attends to nothing: its context is 0 (then out_proj's bias),
    where torch's MultiheadAttention would return NaN.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, d_h]

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
        padding: KeyPadding | None = None, query_rows: RealRows | None = None,
        key_rows: RealRows | None = None,
    ) -> torch.Tensor:
        """`padding`: `KeyPadding(key_mask)` made once for several calls over the same keys.
        With `query_rows` the query is packed ([N_q, D], its real frames) and so is the output;
        with `key_rows` key and value are packed ([N_k, D])."""
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query_rows is not None:
            q = query_rows.unpack(q)
        if key_rows is not None:
            k, v = key_rows.unpack(k), key_rows.unpack(v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        padding = padding if padding is not None else KeyPadding(key_mask)
        visible = padding.visible  # [B, L_k]
        p = self.dropout.p if self.training else 0.0
        b, heads, length_q, head_dim = q.shape
        scores = length_q * k.shape[2]
        small = b * heads * scores * q.element_size() <= STORE_WEIGHTS_BYTES
        if p > 0 or (q.device.type == "cpu" and small and scores >= OWN_KERNEL_MIN_SCORES):
            # PyTorch's fused attention has no CPU kernel with dropout (its fallback materialises
            # far more); without dropout its CPU kernel is slower for mid-sized calls (one MulT
            # layer, 10 heads over [16, 50, 50], forward + backward with the projections: 7.1-9.7
            # ms against 4.3-4.8 ms here), faster for tiny ones and leaner for large ones (it
            # never holds the weights)
            context = _Attention.apply(*(t.reshape(b * heads, t.shape[2], head_dim) for t in (q, k, v)),
                                       padding.bias(heads, q.dtype), p).view(b, heads, length_q, head_dim)
        else:
            # fused attention: the [B, H, L_q, L_k] weights are never stored
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])
        if padding.empty_rows is not None:  # rows without a real key: context 0
            context = context.masked_fill(padding.empty_rows[:, None, None, None], 0.0)
        # sizes spelled out: an empty batch or query sequence has no -1 to infer
        context = context.transpose(1, 2).reshape(b, length_q, heads * head_dim)
        return self.out_proj(context if query_rows is None else query_rows.pack(context))


class CrossModalLayer(nn.Module):
    """One pre-LayerNorm transformer layer whose attention reads a source sequence.

    As in MulT's TransformerEncoderLayer: LN -> attention (query = target, key/value = source,
    both normalised by the SAME LayerNorm) -> dropout -> residual; LN -> Linear(D, 4D) -> ReLU
    -> dropout -> Linear(4D, D) -> dropout -> residual.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_dropout: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
    ):
        super().__init__()
        self.attention = MaskedMultiheadAttention(dim, num_heads, attn_dropout)
        self.norm_attention = nn.LayerNorm(dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.relu_dropout = WideDropout(relu_dropout)
        self.res_dropout = WideDropout(res_dropout)
        for layer in (self.fc1, self.fc2):  # MulT's Linear(): xavier weights, zero bias
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor,
        padding: KeyPadding | None = None,
        rows: RealRows | None = None,
        context_rows: RealRows | None = None,
    ) -> torch.Tensor:
        """x [B, L_q, D] (or its real frames [N_q, D] with `rows`), context [B, L_k, D] (or
        [N_k, D] with `context_rows`; None: attend to x) -> x's shape."""
        q = self.norm_attention(x)
        kv = q if context is None else self.norm_attention(context)
        key_rows = rows if context is None else context_rows
        x = x + self.res_dropout(self.attention(q, kv, kv, context_mask, padding, rows, key_rows))
        h = self.relu_dropout(F.relu(self.fc1(self.norm_ff(x))))
        return x + self.res_dropout(self.fc2(h))


class CrossModalTransformer(nn.Module):
    """MulT's (cross-modal) transformer: a stack of `CrossModalLayer`s with scaled embeddings,
    sinusoidal positions and a final LayerNorm.

    x [B, L_q, D] (target), x_mask [B, L_q]; context [B, L_k, D] (source), context_mask [B, L_k]
    -> [B, L_q, D]. `context=None` makes it a self-attention transformer over x (MulT's
    "memory" transformers). Inputs are scaled by sqrt(D) and get positions 1..L added; embedding
    dropout follows. The layers run on the real frames only (`RealRows`: padded keys are hidden,
    so padding frames never reach a real frame's output); padded positions of the output are 0.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        layers: int,
        attn_dropout: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
        embed_dropout: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(
            CrossModalLayer(dim, num_heads, attn_dropout, relu_dropout, res_dropout)
            for _ in range(layers)
        )
        self.embed_dropout = WideDropout(embed_dropout)
        self.norm = nn.LayerNorm(dim)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = sinusoidal_positions(x.shape[1], self.dim, x.device, x.dtype)  # [L, D]
        x = math.sqrt(self.dim) * x + positions[None]
        return self.embed_dropout(x.masked_fill(~mask[..., None], 0.0))

    def forward(
        self,
        x: torch.Tensor,
        x_mask: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (context is None) != (context_mask is None):
            raise ValueError("CrossModalTransformer: pass context and context_mask together")
        # the layers run on the real frames only (RealRows); embedding dropout is drawn over
        # the padded tensors
        rows = RealRows(x_mask)
        h = rows.pack(self._embed(x, x_mask))
        if context is None:
            source, source_mask, source_rows = None, x_mask, rows
        else:
            source_rows = RealRows(context_mask)
            source, source_mask = source_rows.pack(self._embed(context, context_mask)), context_mask
        padding = KeyPadding(source_mask)  # once for all layers
        for layer in self.layers:
            h = layer(h, source, source_mask, padding, rows, source_rows)
        return rows.unpack(self.norm(h))
