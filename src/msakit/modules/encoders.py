"""Per-modality encoders that turn a padded sequence into one vector, ignoring padding."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msakit.modules import lstm_kernel
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
    states = _lstm_states(lstm, x, real)
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
    return _lstm_states(lstm, x, real)[-1]


def _check_simple(lstm: nn.LSTM, caller: str = "lstm_last_state") -> None:
    simple = lstm.num_layers == 1 and lstm.batch_first and lstm.bias
    if not simple or lstm.bidirectional or lstm.proj_size:
        raise ValueError(f"{caller} needs a one-layer, one-direction, batch_first LSTM with biases")


def _lstm_states(lstm: nn.LSTM, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """x [B, L, D_in], real [T, B] bool (T <= L) -> hidden states [T, B, hidden] of the recurrence
    whose input gates are W_ih x + b at the real frames and b at the others (a zero frame)."""
    steps, batch = real.shape
    t, b = real.nonzero(as_tuple=True)  # the real frames, time-major
    frames = x.reshape(batch * x.shape[1], x.shape[-1])  # not -1: a batch of 0 has no size to infer
    projected = F.linear(frames.index_select(0, b * x.shape[1] + t), lstm.weight_ih_l0)  # [N, 4H]
    return _recurrence(lstm, projected, t * batch + b, steps, batch)


def _recurrence(lstm: nn.LSTM, projected: torch.Tensor, index: torch.Tensor, steps: int, batch: int
                ) -> torch.Tensor:
    """projected [N, 4H] (W_ih x of the real frames), index [N] (their rows t * B + b) ->
    hidden states [T, B, H] (gate order i, f, g, o), c_0 = h_0 = 0."""
    if steps == 0:
        return projected.new_zeros(0, batch, lstm.hidden_size)
    # in the parameters' dtype: under CUDA autocast the product comes back in half precision;
    # _Recurrence's out= products are not autocast
    return _Recurrence.apply(projected.to(lstm.weight_hh_l0.dtype), index, lstm.bias_ih_l0 + lstm.bias_hh_l0,
                             lstm.weight_hh_l0, steps, batch)


class _Recurrence(torch.autograd.Function):
    """The LSTM recurrence with a hand-written backward: projected [N, 4H] (W_ih x of the real
    frames), index [N] (their rows t * B + b), bias [4H] (b_ih + b_hh), w_hh [4H, H], T, B ->
    h [T, B, H], c_0 = h_0 = 0; the input gates are bias + projected at the real frames and the
    bias alone at the others (a zero frame).

    On CPU in float32/float64 both loops run compiled (`lstm_kernel`: per step one BLAS product
    and one fused elementwise pass, the batch's rows split over the threads; recurrence
    forward + backward, 2 threads, at LMF's sizes 19.1 vs 35.9 ms, at TFN's 1.5 vs 7.0 ms,
    measured when the split was added); elsewhere, or where it cannot be built, the Python loops
    below (same formulas; float32 results agree to rounding, float64 to ~1e-12).
    Python forward: the gate buffer is filled once (bias, then the real frames added), then per step
    one in-place addmm and eight elementwise kernels writing into preallocated buffers (tanh of
    g on a contiguous copy: over the strided gate slice it ran ~3x slower). Backward: per step
    five kernels (gate gradients from coefficients computed for all steps at once, then
    dh_{t-1} = dgates_t @ W_hh); the gradient of W_hh is ONE product over all steps, that of the
    bias one sum, that of `projected` the gate gradients of the real frames. The coefficients
    take 8 elementwise passes written into one buffer (16 and a concatenation before: the
    recurrence's forward + backward at LMF's sizes, B = 64, T = 50, H = 128, 2 threads, 8
    alternating rounds: 27.9 vs 31.9 ms median; a whole LMF epoch 1.28 vs 1.32 s, within the
    noise of 6 rounds; TFN no measurable change). Autograd over the same loop recorded ~30
    nodes a step, and building the gates under autograd (bias expanded, index_copy) cost two
    more full-size copies forward and backward (21 LMF training steps at MMSA's mosi settings,
    in-process, 6 alternating rounds: 1.17 vs 1.22 s). MMSA's LMF text LSTM
    (B = 64, L = 50, 768 -> 128), forward + backward, 2 threads, same process, 6 alternating
    rounds, two runs: 53-66 and 54-72 ms against 60-77 and 69-85 ms with autograd (nn.LSTM over
    the zero-padded input: 63-78 ms). Same arithmetic as nn.LSTM (outputs and gradients equal
    to 1e-12 in float64; summation order differs, so float32 results agree to rounding).
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, projected, index, bias, w_hh, steps: int, batch: int) -> torch.Tensor:
        four_h = bias.shape[0]
        h = four_h // 4
        # sigmoid of i, f, o; the g slot keeps its pre-activation
        # repeat, not expand().contiguous(): with T * B <= 1 the latter is a view of `bias`, and
        # the in-place writes below would modify the input
        acts = bias.repeat(steps * batch, 1).index_add_(0, index, projected)
        acts = acts.view(steps, batch, four_h)
        kernel = _kernel_for(acts, w_hh)
        ctx.kernel = kernel
        if kernel is not None:  # acts become the activations (tanh of g included)
            w_hh = w_hh.contiguous()
            cells, tanh_cells, hidden = kernel.forward(acts, w_hh)
            ctx.save_for_backward(index, acts, None, cells, tanh_cells, hidden, w_hh)
            return hidden[1:]
        g_act = acts.new_empty(steps, batch, h)  # tanh of g, contiguous
        cells = acts.new_zeros(steps + 1, batch, h)  # cells[t + 1] = c_t
        tanh_cells = acts.new_empty(steps, batch, h)
        hidden = acts.new_zeros(steps + 1, batch, h)  # hidden[t + 1] = h_t
        w_t = w_hh.t()
        # every per-step view made once (one unbind each): slicing inside the loop cost as much
        # as the arithmetic at TFN's sizes (B = 32, H = 32)
        act, g_out = acts.unbind(0), g_act.unbind(0)
        i, f, g_pre, o = (acts[..., k * h : (k + 1) * h].unbind(0) for k in range(4))
        i_f = acts[..., : 2 * h].unbind(0)
        c, tanh_c, h_out = cells.unbind(0), tanh_cells.unbind(0), hidden.unbind(0)
        for t in range(steps):
            if t:  # h_0 = 0
                act[t].addmm_(h_out[t], w_t)
            g_out[t].copy_(g_pre[t]).tanh_()
            i_f[t].sigmoid_()
            o[t].sigmoid_()
            torch.mul(f[t], c[t], out=c[t + 1])
            c[t + 1].addcmul_(i[t], g_out[t])
            torch.tanh(c[t + 1], out=tanh_c[t])
            torch.mul(o[t], tanh_c[t], out=h_out[t + 1])
        ctx.save_for_backward(index, acts, g_act, cells, tanh_cells, hidden, w_hh)
        return hidden[1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hidden: torch.Tensor):
        index, acts, g, cells, tanh_cells, hidden, w_hh = ctx.saved_tensors
        steps, batch, four_h = acts.shape
        h = four_h // 4
        if ctx.kernel is not None:
            dgates = ctx.kernel.backward(grad_hidden.contiguous(), acts, cells, tanh_cells, w_hh)
            return _weight_gradients(dgates, index, hidden)
        i, f, _, o = acts.split(h, dim=2)
        # d(pre-activation) = coef * dc for i, f, g and coef * dh for o; dc_t += dh_t * o (1 - tanh^2).
        # Each slot written in place, x (1 - x) as x - x * x in one addcmul, products shared:
        # 8 passes over [T, B, H] instead of 16 and a concatenation
        coef = torch.empty_like(acts)
        coef_i, coef_f, coef_g, coef_o = coef.split(h, dim=2)
        ig, to = i * g, tanh_cells * o
        torch.addcmul(ig, ig, i, value=-1.0, out=coef_i)  # g i (1 - i)
        torch.addcmul(i, ig, g, value=-1.0, out=coef_g)  # i (1 - g^2)
        torch.addcmul(f, f, f, value=-1.0, out=coef_f).mul_(cells[:-1])  # c_{t-1} f (1 - f)
        torch.addcmul(to, to, o, value=-1.0, out=coef_o)  # tanh(c) o (1 - o)
        through_tanh = torch.addcmul(o, to, tanh_cells, value=-1.0)  # o (1 - tanh(c)^2)
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
        return _weight_gradients(dgates, index, hidden)


def _kernel_for(acts: torch.Tensor, w_hh: torch.Tensor):
    """The compiled recurrence (`lstm_kernel.get()`) for float32/float64 CPU tensors with at least
    one sample, else None (the Python loop: CUDA, half precision, B = 0)."""
    if acts.device.type != "cpu" or acts.dtype not in (torch.float32, torch.float64) or not acts.shape[1]:
        return None
    if w_hh.dtype != acts.dtype or w_hh.device.type != "cpu":
        return None
    return lstm_kernel.get()


def _weight_gradients(dgates: torch.Tensor, index: torch.Tensor, hidden: torch.Tensor):
    """_Recurrence.backward's return from the gate gradients dgates [T, B, 4H] and the states
    hidden [T + 1, B, H]: d projected (rows `index`), None, d bias, d W_hh, None, None."""
    steps, batch, four_h = dgates.shape
    rows = dgates.view(steps * batch, four_h)
    # dW_hh = sum_t dgates_t^T h_{t-1}; h_{-1} = 0
    grad_w = rows[batch:].t() @ hidden[1:steps].reshape(-1, four_h // 4)
    return rows.index_select(0, index), None, rows.sum(0), grad_w, None, None


def build_encoder(kind: str, in_dim: int, hidden: int, dropout: float) -> nn.Module:
    """'mlp' (masked mean + MLP) or 'lstm' (LSTM read at the last real step); both map [B, L, in_dim] -> [B, hidden]."""
    if kind == "mlp":
        return PooledMLPEncoder(in_dim, hidden, dropout)
    if kind == "lstm":
        return LSTMEncoder(in_dim, hidden, hidden, dropout)
    raise ValueError(f"unknown encoder {kind!r}: use 'mlp' or 'lstm'")
