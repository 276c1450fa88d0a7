"""Per-modality encoders that turn a padded sequence into one vector, ignoring padding."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msakit.modules.pooling import masked_mean


class PooledMLPEncoder(nn.Module):
    """Masked mean over time, then dropout -> Linear -> ReLU -> Linear -> ReLU.

    x [B, L, D_in], mask [B, L] -> [B, hidden]. MMSA's LF-DNN/TFN "SubNet" uses BatchNorm first;
    we leave it out so that batches of one sample train too (inputs are standardised upstream).
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(masked_mean(x, mask))


class LSTMEncoder(nn.Module):
    """A one-layer LSTM read at each sequence's last real step, then dropout -> Linear.

    x [B, L, D_in], mask [B, L] -> [B, out_dim]. With n = mask.sum(1) (at least 1), the encoder
    returns the hidden state after frame n - 1, the final state of a packed LSTM over the first n
    frames (what it computed before, through `pack_padded_sequence`; frames after n are never
    read). The parameters are those of `self.lstm` (an `nn.LSTM`, so checkpoints are unchanged);
    the forward pass is `lstm_last_state`, which is faster on CPU (see there).

    With `through_padding=True` the LSTM instead runs over all L frames, masked-out frames read as
    zeros, and returns the state after frame L - 1 (`lstm_padded_state`): MMSA's `TextSubNet` (an
    `nn.LSTM` over the zero-padded sequence, used by its TFN and LMF). On the generated data of
    `benchmarks/against_mmsa.py` this reads far better than the last real word: LMF with MMSA's
    mosi settings, 10 epochs, test MAE 0.37-0.39 vs 0.68-0.75 (seeds 1, 2, 1111; the last-word
    reading memorised the training set); see the accuracy section of
    benchmarks/results/against_mmsa.md.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float,
                 through_padding: bool = False):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, out_dim)
        self.through_padding = through_padding

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.through_padding:
            state = lstm_padded_state(self.lstm, x, mask)
        else:
            state = lstm_last_state(self.lstm, x, mask.sum(dim=1).long().clamp_min(1))
        return self.out(self.dropout(state))


def lstm_last_state(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Hidden state of a one-layer, one-direction batch-first `lstm` after frame lengths[b] - 1.

    x [B, L, D_in] float, lengths [B] int in [1, L] -> [B, hidden]. Equal to `h_n` of
    `lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))` (PyTorch's
    gate order i, f, g, o; tested to 1e-12 in float64, outputs and gradients).

    Why not call `lstm` itself: on CPU the packed call's backward zero-fills a full-size gradient
    for every time-step slice (quadratic in the length), and the padded call runs oneDNN over
    the padding and computes the gradient of x, which is data. Here the input projection
    (most of the arithmetic: D_in x 4 * hidden per frame) is one matrix product over the real
    frames only, and only the small recurrent product runs per step (`_Recurrence`, with a
    hand-written backward).
    Raises ValueError for a bidirectional, multi-layer or bias-free LSTM, for lengths outside
    [1, L] and for lengths that are not [B].
    """
    _check_simple(lstm)
    batch, length = x.shape[0], x.shape[1]
    if lengths.shape != (batch,):
        raise ValueError(f"lstm_last_state: x {tuple(x.shape)} needs lengths [{batch}], got {tuple(lengths.shape)}")
    steps = int(lengths.max()) if batch else 0
    if batch and not (int(lengths.min()) >= 1 and steps <= length):
        raise ValueError(f"lstm_last_state: lengths must lie in [1, {length}]")
    real = torch.arange(steps, device=x.device)[:, None] < lengths[None, :]  # [T, B]
    states = _recurrence(lstm, _input_gates(lstm, x, real, padding_bias=False))
    return states[lengths - 1, torch.arange(batch, device=x.device)]


def lstm_padded_state(lstm: nn.LSTM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of a one-layer, one-direction batch-first `lstm` after ALL L frames, the
    masked-out frames read as zero vectors: `h_n` of `lstm(x * mask[..., None])` (MMSA's
    TextSubNet over its zero-padded text; tested to 1e-12 in float64).

    x [B, L, D_in] float, mask [B, L] (True = real frame; 0/1 numbers read as bool) -> [B, hidden].
    A zero frame's input projection is the bias alone, so the product with W_ih runs over the real
    frames only (as in `lstm_last_state`); the recurrence runs all L steps. Raises ValueError for
    an LSTM `lstm_last_state` refuses, for L = 0 and for a mask whose shape is not [B, L].
    """
    _check_simple(lstm, "lstm_padded_state")
    if mask.shape != x.shape[:2] or x.shape[1] == 0:
        raise ValueError(f"lstm_padded_state: x {tuple(x.shape)} needs a mask [B, L] with L >= 1, "
                         f"got {tuple(mask.shape)}")
    real = mask.t().bool()  # [L, B], time-major
    return _recurrence(lstm, _input_gates(lstm, x, real, padding_bias=True))[-1]


def _check_simple(lstm: nn.LSTM, caller: str = "lstm_last_state") -> None:
    simple = lstm.num_layers == 1 and lstm.batch_first and lstm.bias
    if not simple or lstm.bidirectional or lstm.proj_size:
        raise ValueError(f"{caller} needs a one-layer, one-direction, batch_first LSTM with biases")


def _input_gates(lstm: nn.LSTM, x: torch.Tensor, real: torch.Tensor, padding_bias: bool) -> torch.Tensor:
    """x [B, L, D_in], real [T, B] bool (T <= L) -> input gate pre-activations [T, B, 4 * hidden],
    W_ih x + b over the real frames; the other frames hold b (padding_bias) or 0 (never read)."""
    steps, batch = real.shape
    length, gates = x.shape[1], 4 * lstm.hidden_size
    t, b = real.nonzero(as_tuple=True)  # the real frames, time-major
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    frames = x.reshape(batch * length, x.shape[-1])  # not -1: a batch of 0 has no size to infer
    projected = F.linear(frames.index_select(0, b * length + t), lstm.weight_ih_l0, bias)
    base = bias.expand(steps * batch, gates).contiguous() if padding_bias else x.new_zeros(steps * batch, gates)
    # in the parameters' dtype: under CUDA autocast the product comes back in half precision and
    # index_copy refuses mixed dtypes; the recurrence then runs in the parameters' dtype
    return base.index_copy(0, t * batch + b, projected.to(base.dtype)).view(steps, batch, gates)


def _recurrence(lstm: nn.LSTM, gates_in: torch.Tensor) -> torch.Tensor:
    """gates_in [T, B, 4 * hidden] -> hidden states [T, B, hidden] (gate order i, f, g, o)."""
    if gates_in.shape[0] == 0:
        return gates_in.new_zeros(0, gates_in.shape[1], lstm.hidden_size)
    return _Recurrence.apply(gates_in, lstm.weight_hh_l0.to(gates_in.dtype))  # its out= products are not autocast


class _Recurrence(torch.autograd.Function):
    """The LSTM recurrence with a hand-written backward: gates_in [T, B, 4H] (W_ih x + biases),
    w_hh [4H, H] -> h [T, B, H], c_0 = h_0 = 0.

    Forward: per step one addmm and eight elementwise kernels writing into preallocated buffers
    (tanh of g on a contiguous copy: over the strided gate slice it ran ~3x slower). Backward: per
    step five kernels (gate gradients from coefficients computed for all steps at once, then
    dh_{t-1} = dgates_t @ W_hh); the gradient of W_hh is ONE product over all steps, that of
    gates_in the gate gradients themselves. Autograd over the same loop recorded ~30 nodes a
    step. MMSA's LMF text LSTM (B = 64, L = 50, 768 -> 128), forward + backward, 2 threads, same
    process, 6 alternating rounds, two runs: 53-66 and 54-72 ms against 60-77 and 69-85 ms with
    autograd (nn.LSTM over the zero-padded input: 63-78 ms). Same arithmetic as nn.LSTM (outputs
    and gradients equal to 1e-12 in float64; summation order differs, so float32 results agree to
    rounding).
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, gates_in: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
        steps, batch, four_h = gates_in.shape
        h = four_h // 4
        acts = torch.empty_like(gates_in)  # sigmoid of i, f, o; the g slot keeps its pre-activation
        g_act = gates_in.new_empty(steps, batch, h)  # tanh of g, contiguous
        cells = gates_in.new_zeros(steps + 1, batch, h)  # cells[t + 1] = c_t
        tanh_cells = gates_in.new_empty(steps, batch, h)
        hidden = gates_in.new_zeros(steps + 1, batch, h)  # hidden[t + 1] = h_t
        w_t = w_hh.t()
        # every per-step view made once (one unbind each): slicing inside the loop cost as much
        # as the arithmetic at TFN's sizes (B = 32, H = 32)
        gate_in, act, g_out = gates_in.unbind(0), acts.unbind(0), g_act.unbind(0)
        i, f, g_pre, o = (acts[..., k * h : (k + 1) * h].unbind(0) for k in range(4))
        i_f = acts[..., : 2 * h].unbind(0)
        c, tanh_c, h_out = cells.unbind(0), tanh_cells.unbind(0), hidden.unbind(0)
        for t in range(steps):
            torch.addmm(gate_in[t], h_out[t], w_t, out=act[t])
            g_out[t].copy_(g_pre[t]).tanh_()
            i_f[t].sigmoid_()
            o[t].sigmoid_()
            torch.mul(f[t], c[t], out=c[t + 1])
            c[t + 1].addcmul_(i[t], g_out[t])
            torch.tanh(c[t + 1], out=tanh_c[t])
            torch.mul(o[t], tanh_c[t], out=h_out[t + 1])
        ctx.save_for_backward(acts, g_act, cells, tanh_cells, hidden, w_hh)
        return hidden[1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hidden: torch.Tensor):
        acts, g, cells, tanh_cells, hidden, w_hh = ctx.saved_tensors
        steps, batch, four_h = acts.shape
        h = four_h // 4
        i, f, _, o = acts.split(h, dim=2)
        # d(pre-activation) = coef * dc for i, f, g and coef * dh for o; dc_t += dh_t * o (1 - tanh^2)
        coef = torch.cat([g * i * (1 - i), cells[:-1] * f * (1 - f), i * (1 - g * g),
                          tanh_cells * o * (1 - o)], dim=2)
        through_tanh = o * (1 - tanh_cells * tanh_cells)
        dgates = torch.empty_like(acts)
        dh = grad_hidden[-1].clone()
        dc = torch.zeros_like(dh)
        dc_3 = dc[:, None, :]  # broadcast over the i, f, g slots; dc changes in place
        coef_ifg = coef[..., : 3 * h].view(steps, batch, 3, h).unbind(0)
        coef_o, tanh_factor, f_t = coef[..., 3 * h :].unbind(0), through_tanh.unbind(0), f.unbind(0)
        d_all = dgates.unbind(0)
        d_ifg = dgates[..., : 3 * h].view(steps, batch, 3, h).unbind(0)
        d_o, grad_h = dgates[..., 3 * h :].unbind(0), grad_hidden.unbind(0)
        for t in reversed(range(steps)):
            dc.addcmul_(dh, tanh_factor[t])
            torch.mul(coef_ifg[t], dc_3, out=d_ifg[t])
            torch.mul(dh, coef_o[t], out=d_o[t])
            dc.mul_(f_t[t])
            if t:
                dh = torch.addmm(grad_h[t - 1], d_all[t], w_hh)
        # dW_hh = sum_t dgates_t^T h_{t-1}; h_{-1} = 0
        grad_w = dgates[1:].reshape(-1, four_h).t() @ hidden[1:steps].reshape(-1, h)
        return dgates, grad_w


def build_encoder(kind: str, in_dim: int, hidden: int, dropout: float) -> nn.Module:
    """'mlp' (masked mean + MLP) or 'lstm' (LSTM read at the last real step); both map [B, L, in_dim] -> [B, hidden]."""
    if kind == "mlp":
        return PooledMLPEncoder(in_dim, hidden, dropout)
    if kind == "lstm":
        return LSTMEncoder(in_dim, hidden, hidden, dropout)
    raise ValueError(f"unknown encoder {kind!r}: use 'mlp' or 'lstm'")
