"""The speed changes keep the numbers: attention equals its plain formula, the wide dropout has
dropout's distribution, data are validated once, AdamW is the fused kernel where it exists."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from msakit.modules.attention import MaskedMultiheadAttention
from msakit.modules.dropout import WideDropout, keep_mask


def _reference_attention(module, query, key_value, key_mask, dropout=lambda w: w):
    """The plain formula: masked softmax weights (all-padding rows weigh 0), then out_proj."""
    q, k, v = (module._heads(p(x)) for p, x in
               ((module.q_proj, query), (module.k_proj, key_value), (module.v_proj, key_value)))
    scores = q @ k.transpose(-2, -1) / math.sqrt(module.head_dim)
    visible = key_mask[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(~visible, -1e30), dim=-1) * visible
    context = (dropout(weights) @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
    return module.out_proj(context)


@pytest.mark.parametrize("training", [False, True])
def test_attention_matches_the_plain_formula_with_padding_and_empty_rows(training):
    torch.manual_seed(0)
    module = MaskedMultiheadAttention(16, 4, dropout=0.3).train(training)
    query, key_value = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    key_mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7]).bool()  # last: no keys
    torch.manual_seed(1)
    ours = module(query, key_value, key_value, key_mask)
    torch.manual_seed(1)
    reference = _reference_attention(module, query, key_value, key_mask,
                                     _rand_dropout(0.3) if training else (lambda w: w))
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.isfinite(ours).all()


def _rand_dropout(p):
    def drop(w):
        keep, scale = keep_mask(w.shape, p)
        return w * keep * scale
    return drop


@pytest.mark.parametrize("p", [0.3, 0.0])
@pytest.mark.parametrize("store_bytes", [0, None])
def test_attention_training_has_the_plain_formulas_gradients_and_stores_what_it_says(
        monkeypatch, p, store_bytes):
    """Training attention (with and without dropout) equals the plain formula in value and
    gradients, whether the softmax weights are kept for backward (small calls) or recomputed
    there (above attention.STORE_WEIGHTS_BYTES: then only a 1-byte mask per weight is stored)."""
    from msakit.modules import attention

    if store_bytes is not None:
        monkeypatch.setattr(attention, "STORE_WEIGHTS_BYTES", store_bytes)
    torch.manual_seed(0)
    module = MaskedMultiheadAttention(16, 4, dropout=p).double()
    query = torch.randn(3, 20, 16, dtype=torch.double, requires_grad=True)
    key_value = torch.randn(3, 30, 16, dtype=torch.double, requires_grad=True)
    key_mask = torch.ones(3, 30, dtype=torch.bool)
    key_mask[1, 10:], key_mask[2] = False, False
    saved = []

    def pack(t):
        saved.append((t.numel(), t.element_size()))
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours = module(query, key_value, key_value, key_mask)
    grads = torch.autograd.grad(ours.square().sum(), [query, key_value, *module.parameters()])
    torch.manual_seed(1)
    reference = _reference_attention(module, query, key_value, key_mask,
                                     _rand_dropout(p) if p else (lambda w: w))
    expected = torch.autograd.grad(reference.square().sum(), [query, key_value, *module.parameters()])
    assert torch.allclose(ours, reference, atol=1e-10)
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-9)
    weights = 3 * 4 * 20 * 30  # [B, H, L_q, L_k]
    big = sorted(size for numel, size in saved if numel == weights)
    if store_bytes == 0:  # recomputed: plain autograd would store 3 float tensors of that size
        assert big == ([1] if p else [])
    else:  # kept: the weights, and with dropout the dropped weights (not the mask)
        assert big == [8, 8]


def test_wide_dropout_keeps_one_minus_p_scaled_and_is_identity_in_eval():
    torch.manual_seed(0)
    layer = WideDropout(0.3)
    x = torch.ones(200, 1000)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert torch.equal(layer.eval()(x), x)


def test_wide_dropout_is_the_keep_mask_draw_bit_for_bit():
    x = torch.randn(4, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = WideDropout(0.3)(x)
    torch.manual_seed(3)
    keep, scale = keep_mask(x.shape, 0.3)
    assert scale == 65536 / (65536 - 19661)  # p rounded to 19661 / 2^16
    expected = x * keep.float() * scale
    assert torch.equal(y, expected)
    y.sum().backward()
    assert torch.equal(x.grad, keep.float() * scale)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_entry_with_probability_one_minus_p_in_every_lane(p):
    # four 16-bit uniforms come from each 64-bit draw: every lane (position mod 4) must be fair,
    # and the odd tail of a shape that is not a multiple of 4 must be covered too
    torch.manual_seed(0)
    keep, scale = keep_mask((100_003,), p)
    assert keep.dtype == torch.bool and keep.shape == (100_003,)
    kept = keep[:100_000].view(-1, 4).float().mean(0)
    assert torch.allclose(kept, torch.full((4,), 1 - p), atol=0.01)
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
    assert keep_mask((5,), p)[0].shape == (5,)
    with pytest.raises(ValueError, match="dropout p"):
        keep_mask((3,), 1.0)
    # p within 2^-17 of 1 rounds to "drop all": one level is always kept, no division by zero
    keep, scale = keep_mask((1000,), 0.999995)
    assert scale == 65536.0 and keep.sum() <= 3


def test_dataset_is_validated_once(monkeypatch):
    from msakit.config import build_config
    from msakit.data import base, load_dataset

    calls = []
    original = base.sanitize_features
    monkeypatch.setattr(base, "sanitize_features", lambda a, w: calls.append(w) or original(a, w))
    cfg = build_config({"data": {"name": "synthetic"}}, ["data.synthetic.train_size=40",
                                                          "data.synthetic.valid_size=20",
                                                          "data.synthetic.test_size=20"])
    load_dataset(cfg.data)
    assert len(calls) == 9  # 3 splits x 3 modalities, once each


def test_adamw_uses_the_fused_kernel_on_cpu():
    from msakit.train.loop import adamw

    optimizer = adamw([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    assert optimizer.defaults["fused"] is True


def test_lstm_last_state_equals_the_packed_lstm_outputs_and_gradients(recurrence):
    from torch.nn.utils.rnn import pack_padded_sequence

    from msakit.modules.encoders import LSTMEncoder, lstm_last_state

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(7, 5, batch_first=True).double()
    x = torch.randn(6, 9, 7, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 7, 2, 8])  # unsorted, one of length 1, none reaching L - 0
    x[1, 1:] = 100.0  # frames past a sequence's end must never be read
    _, (h_n, _) = lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    ours = lstm_last_state(lstm, x, lengths)
    assert torch.allclose(ours, h_n[0], atol=1e-12)
    expected = torch.autograd.grad(h_n[0].square().sum(), list(lstm.parameters()))
    grads = torch.autograd.grad(ours.square().sum(), list(lstm.parameters()))
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-12)
    with pytest.raises(ValueError, match="one-layer, one-direction"):
        lstm_last_state(torch.nn.LSTM(7, 5, batch_first=True, bidirectional=True), x, lengths)
    with pytest.raises(ValueError, match="with biases"):
        lstm_last_state(torch.nn.LSTM(7, 5, batch_first=True, bias=False), x, lengths)
    for bad in ([10, 1, 4, 7, 2, 8], [0, 1, 4, 7, 2, 8]):
        with pytest.raises(ValueError, match=r"lengths must lie in \[1, 9\]"):
            lstm_last_state(lstm, x, torch.tensor(bad))
    # the encoder keeps nn.LSTM's parameters (old checkpoints load) and reads n = mask.sum(1)
    encoder = LSTMEncoder(7, 5, 3, dropout=0.0).double().eval()
    assert set(encoder.state_dict()) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0",
                                         "lstm.bias_hh_l0", "out.weight", "out.bias"}
    mask = torch.arange(9)[None, :] < lengths[:, None]
    _, (h_enc, _) = encoder.lstm(pack_padded_sequence(x, lengths, batch_first=True,
                                                      enforce_sorted=False))
    assert torch.allclose(encoder(x, mask), encoder.out(h_enc[0]), atol=1e-12)
    assert torch.equal(encoder(x, mask.double()), encoder(x, mask))  # a 0/1 float mask reads the same


def test_lstm_encoder_through_padding_is_mmsas_text_subnet(recurrence):
    """text_encoder 'lstm_padded': the state after the LAST PADDED step of an nn.LSTM over the
    sequence with its padding frames zeroed (MMSA's TextSubNet), whatever the padding held."""
    from msakit.modules.encoders import LSTMEncoder, lstm_padded_state

    torch.manual_seed(0)
    encoder = LSTMEncoder(7, 5, 3, dropout=0.0, through_padding=True).double().eval()
    x = torch.randn(4, 9, 7, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 6])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    zeroed = x * mask[..., None]
    x[~mask] = 100.0  # the loader's padding values are never read as such
    _, (h_n, _) = encoder.lstm(zeroed)
    assert torch.allclose(encoder(x, mask), encoder.out(h_n[0]), atol=1e-12)
    # gradients too (the bias sees every padded step), and a mask with a hole reads a zero frame
    holed = mask.clone()
    holed[0, 3] = False
    params = list(encoder.lstm.parameters())
    _, (h_ref, _) = encoder.lstm(x.masked_fill(~holed[..., None], 0.0))
    ours = lstm_padded_state(encoder.lstm, x, holed)
    assert torch.allclose(ours, h_ref[0], atol=1e-12)
    for g, e in zip(torch.autograd.grad(ours.square().sum(), params),
                    torch.autograd.grad(h_ref[0].square().sum(), params), strict=True):
        assert torch.allclose(g, e, atol=1e-12)
    # and it differs from the last-real-word reading for the sequences that are padded
    last_real = LSTMEncoder(7, 5, 3, dropout=0.0).double().eval()
    last_real.load_state_dict(encoder.state_dict())
    gap = (encoder(x, mask) - last_real(x, mask)).abs().sum(-1)
    assert gap[0] < 1e-12 and bool((gap[1:] > 1e-6).all())


def test_lstm_padded_state_edge_cases_and_shape_errors(recurrence):
    """An empty batch gives [0, hidden] (both readings), all-padding rows and 0/1 float masks read
    as nn.LSTM over zeros, the gradient of x is nn.LSTM's; a mask that is not [B, L], L = 0 and
    lengths that are not [B] are one-line ValueErrors (a shorter mask ran fewer steps silently)."""
    from msakit.modules.encoders import LSTMEncoder, lstm_last_state, lstm_padded_state

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    ours = lstm_padded_state(lstm, x, mask.double())
    _, (h_ref, _) = lstm(x * mask[..., None])
    assert torch.allclose(ours, h_ref[0], atol=1e-12)
    grad, = torch.autograd.grad(ours.square().sum(), x)
    expected, = torch.autograd.grad(h_ref[0].square().sum(), x)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert lstm_padded_state(lstm, x[:0], mask[:0]).shape == (0, 4)
    assert lstm_last_state(lstm, x[:0], torch.ones(0, dtype=torch.long)).shape == (0, 4)
    for through in (False, True):
        encoder = LSTMEncoder(3, 4, 2, dropout=0.0, through_padding=through)
        assert encoder(torch.randn(0, 5, 3), torch.ones(0, 5, dtype=torch.bool)).shape == (0, 2)
    for bad in (mask[:, :3], torch.ones(3, 7, dtype=torch.bool), mask[:2], mask[0]):
        with pytest.raises(ValueError, match=r"lstm_padded_state: .*mask \[B, L\]"):
            lstm_padded_state(lstm, x, bad)
    with pytest.raises(ValueError, match="L >= 1"):
        lstm_padded_state(lstm, x[:, :0], mask[:, :0])
    with pytest.raises(ValueError, match=r"needs lengths \[3\]"):
        lstm_last_state(lstm, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="^lstm_padded_state needs a one-layer"):
        lstm_padded_state(torch.nn.LSTM(3, 4, batch_first=True, bidirectional=True).double(), x, mask)


@pytest.mark.parametrize("name", ["tfn", "lmf"])
def test_text_encoder_lstm_padded_is_wired(name):
    import dataclasses

    from fakes import make_data

    from msakit.registry import create_model, get_model_entry

    info = make_data().info
    for kind, through in (("lstm", False), ("lstm_padded", True)):
        cfg = dataclasses.replace(get_model_entry(name).config_cls.tiny(), text_encoder=kind)
        assert create_model(name, cfg, info).text_encoder.through_padding is through


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
@pytest.mark.parametrize("tuning", ["1", "0"])
def test_keep_freed_memory_keeps_a_freed_64_mb_block_in_the_process(tuning):
    """With the thresholds raised a freed 64 MB tensor stays resident (its pages are reused by
    the next one); glibc's defaults (MSAKIT_MALLOC_TUNING=0) hand it back at once."""
    import os
    import subprocess
    import sys

    probe = (
        "import torch\n"
        "from msakit.train.allocator import keep_freed_memory\n"
        "raised = keep_freed_memory()\n"
        "rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
        "x = torch.ones(16 * 2**20); before = rss(); del x\n"
        "print(raised, before - rss())\n"
    )
    env = {**os.environ, "MSAKIT_MALLOC_TUNING": tuning}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    raised, released_kb = done.stdout.split()
    if tuning == "1" and raised != "True":
        pytest.skip("not glibc: mallopt unavailable")
    assert raised == ("True" if tuning == "1" else "False")
    if tuning == "1":
        assert int(released_kb) < 8 * 1024  # kept
    else:
        assert int(released_kb) > 56 * 1024  # returned to the OS


def test_keep_freed_memory_passes_mallopt_values_that_fit_a_c_int(monkeypatch):
    """mallopt(int, int): the thresholds must fit a C int (2^31 wrapped to -2^31 silently); no
    mallopt (not glibc) and MSAKIT_MALLOC_TUNING=0 give False without raising."""
    import ctypes

    from msakit.train import allocator

    calls = []

    class FakeMallopt:
        argtypes = restype = None

        def __call__(self, param, value):
            assert self.argtypes == (ctypes.c_int, ctypes.c_int)
            calls.append((param, ctypes.c_int(value).value, value))
            return 1

    class FakeLibc:
        def __init__(self, _name):
            self.mallopt = FakeMallopt()

    monkeypatch.setattr(allocator.ctypes, "CDLL", FakeLibc)
    monkeypatch.delenv("MSAKIT_MALLOC_TUNING", raising=False)
    monkeypatch.setattr(allocator, "_done", None)
    assert allocator.keep_freed_memory() is True
    assert calls == [(-3, 1 << 30, 1 << 30), (-1, (1 << 31) - 1, (1 << 31) - 1)]
    assert allocator.keep_freed_memory() is True and len(calls) == 2  # once per process

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _name: object())  # a libc without mallopt
    monkeypatch.setattr(allocator, "_done", None)
    assert allocator.keep_freed_memory() is False
    monkeypatch.setenv("MSAKIT_MALLOC_TUNING", "0")
    monkeypatch.setattr(allocator.ctypes, "CDLL", FakeLibc)
    monkeypatch.setattr(allocator, "_done", None)
    assert allocator.keep_freed_memory() is False and len(calls) == 2


def _plain_attention_forward(self, query, key, value, key_mask, padding=None, query_rows=None,
                             key_rows=None):
    """MaskedMultiheadAttention as `_reference_attention` over the padded sequences, drawing the
    same dropout mask (MulT passes one tensor as key and value)."""
    assert key is value
    p = self.dropout.p if self.training else 0.0
    query = query if query_rows is None else query_rows.unpack(query)
    key = key if key_rows is None else key_rows.unpack(key)
    out = _reference_attention(self, query, key, key_mask, _rand_dropout(p) if p else (lambda w: w))
    return out if query_rows is None else query_rows.pack(out)


def _plain_recurrence(lstm, projected, index, steps, batch):
    """The LSTM recurrence step by step under autograd (what `_Recurrence` replaced): input gates
    = biases everywhere plus W_ih x at the real frames' rows."""
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    gates_in = bias.expand(steps * batch, bias.shape[0]).index_add(0, index, projected)
    h = c = projected.new_zeros(batch, lstm.hidden_size)
    states = []
    for gate_in in gates_in.view(steps, batch, -1).unbind(0):
        i, f, g, o = torch.addmm(gate_in, h, lstm.weight_hh_l0.t()).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        states.append(h)
    return torch.stack(states)


def _train_steps(name, model_overrides, steps=6):
    import dataclasses

    from fakes import make_data

    from msakit.config import build_config
    from msakit.data import to_loader
    from msakit.registry import create_model, get_model_entry
    from msakit.train.loop import build_optimizers, default_training_step

    data = make_data(sizes=(40, 8, 8))
    tiny = dataclasses.asdict(get_model_entry(name).config_cls.tiny())
    cfg = build_config({"model": {"name": name, **tiny, **model_overrides},
                        "train": {"lr": 0.01, "grad_clip": 1.0}})
    torch.manual_seed(0)
    model = create_model(name, cfg.model, data.info).train()
    optimizers = build_optimizers(model, cfg)
    batches = list(to_loader(data.splits["train"], data.info, 8, shuffle=False))
    losses = []
    for step in range(steps):
        out = default_training_step(model, batches[step % len(batches)], optimizers, cfg.train, (0, step))
        losses.append(float(sum(out.losses.values()).detach()))
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(("name", "overrides", "patch"), [
    ("mult", {"attn_dropout": 0.3, "attn_dropout_audio": 0.2, "embed_dropout": 0.2}, "attention"),
    ("lmf", {"text_encoder": "lstm_padded"}, "recurrence"),
    ("tfn", {"text_encoder": "lstm"}, "recurrence"),
])
def test_fixed_seed_training_steps_equal_the_plain_autograd_formulas(monkeypatch, name, overrides, patch):
    """Six fixed-seed training steps with the hand-written attention / LSTM backward give the
    losses and parameters of the same steps through plain autograd formulas (float32 rounding)."""
    from msakit.modules import attention, encoders

    fast_losses, fast_params = _train_steps(name, overrides)
    if patch == "attention":
        monkeypatch.setattr(attention.MaskedMultiheadAttention, "forward", _plain_attention_forward)
    else:
        monkeypatch.setattr(encoders, "_recurrence", _plain_recurrence)
    plain_losses, plain_params = _train_steps(name, overrides)
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    # AdamW moves a parameter whose gradient is ~0 by up to lr on rounding noise: compare the bulk
    close = (fast_params - plain_params).abs() <= 1e-5
    assert close.float().mean() > 0.99
    assert (fast_params - _train_steps(name, overrides, steps=5)[1]).abs().gt(1e-5).float().mean() > 0.5


@pytest.mark.parametrize(("training", "p", "store_bytes", "lengths", "fused"), [
    (False, 0.3, None, (20, 30), False),  # mid-sized: msakit's kernel (faster on CPU)
    (False, 0.3, None, (5, 7), True),  # tiny: the fused kernel (faster there)
    (False, 0.3, 0, (20, 30), True),  # large, no dropout: the fused kernel, which never holds the weights
    (True, 0.0, 0, (20, 30), True),
    (True, 0.3, 0, (5, 7), False),  # dropout: always msakit's kernel (weights recomputed in backward)
])
def test_attention_routes_large_dropout_free_calls_to_the_fused_kernel(monkeypatch, training, p,
                                                                       store_bytes, lengths, fused):
    from msakit.modules import attention

    if store_bytes is not None:
        monkeypatch.setattr(attention, "STORE_WEIGHTS_BYTES", store_bytes)
    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    module = MaskedMultiheadAttention(16, 4, dropout=p).train(training)
    length_q, length_k = lengths
    query, key_value = torch.randn(3, length_q, 16), torch.randn(3, length_k, 16)
    key_mask = torch.ones(3, length_k, dtype=torch.bool)
    key_mask[1, 3:], key_mask[2] = False, False
    torch.manual_seed(1)
    ours = module(query, key_value, key_value, key_mask)
    assert bool(calls) is fused
    torch.manual_seed(1)
    reference = _reference_attention(module, query, key_value, key_mask,
                                     _rand_dropout(p) if training and p else (lambda w: w))
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("p", [0.3, 0.0])
def test_attention_backward_runs_when_autocast_gives_float32_softmax_weights(monkeypatch, p):
    """CUDA autocast runs softmax in float32 (CPU autocast keeps bf16; emulated here): the weights
    kept for backward must not meet the bf16 gradients in one product. Gradients as without the
    emulation (the dropped weights were cast to bf16 for the forward product anyway)."""
    softmax = torch.softmax

    def run(float32_softmax):
        if float32_softmax:
            monkeypatch.setattr(torch, "softmax", lambda x, dim: softmax(x.float(), dim))
        torch.manual_seed(0)
        module = MaskedMultiheadAttention(16, 4, dropout=p).train()
        query, key_value = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
        key_mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7]).bool()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(query, key_value, key_value, key_mask)
        monkeypatch.undo()
        return torch.autograd.grad(out.float().square().sum(), list(module.parameters()))

    for g, e in zip(run(True), run(False), strict=True):
        assert torch.allclose(g, e, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("store_bytes", [None, 0])
@pytest.mark.parametrize(("batch", "length_q"), [(0, 5), (3, 0)])
def test_attention_takes_an_empty_batch_or_query_sequence(monkeypatch, store_bytes, batch, length_q):
    from msakit.modules import attention

    if store_bytes is not None:  # 0: the fused kernel in eval
        monkeypatch.setattr(attention, "STORE_WEIGHTS_BYTES", store_bytes)
    for training in (False, True):
        module = MaskedMultiheadAttention(16, 4, dropout=0.3).train(training)
        query = torch.randn(batch, length_q, 16, requires_grad=True)
        key_value = torch.randn(batch, 7, 16)
        out = module(query, key_value, key_value, torch.ones(batch, 7, dtype=torch.bool))
        assert out.shape == (batch, length_q, 16)
        out.sum().backward()
        assert query.grad.shape == query.shape


@pytest.mark.parametrize("through_padding", [False, True])
def test_lstm_encoder_runs_when_the_input_product_comes_back_in_half_precision(monkeypatch, through_padding):
    """CUDA autocast returns F.linear in bf16/fp16 while the biases stay float32 (CPU autocast
    does not, hence the emulation): the input gates are taken to the parameters' dtype, so the
    recurrence runs in float32 and the gradients reach the weights."""
    from msakit.modules import encoders

    linear = encoders.F.linear
    monkeypatch.setattr(encoders.F, "linear", lambda *a, **k: linear(*a, **k).to(torch.bfloat16))
    torch.manual_seed(0)
    encoder = encoders.LSTMEncoder(6, 4, 3, dropout=0.0, through_padding=through_padding)
    x, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    out = encoder(x, mask)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(encoder.lstm.weight_ih_l0.grad).all()
    assert encoder.lstm.weight_hh_l0.grad.abs().sum() > 0


def _every_frame_transformer(transformer, x, x_mask, context, context_mask):
    """CrossModalTransformer computing every frame, padding included (what it did before its
    layers ran on the real frames only)."""
    from msakit.modules.attention import KeyPadding

    h = transformer._embed(x, x_mask)
    source = None if context is None else transformer._embed(context, context_mask)
    source_mask = x_mask if context is None else context_mask
    padding = KeyPadding(source_mask)
    for layer in transformer.layers:
        h = layer(h, source, source_mask, padding)
    return transformer.norm(h).masked_fill(~x_mask[..., None], 0.0)


@pytest.mark.parametrize("cross", [True, False])
def test_transformer_layers_run_on_the_real_frames_only_with_every_frames_numbers(monkeypatch, cross):
    """The layers see packed real frames ([N, D]), and the outputs and gradients equal those of
    the same layers over every frame (padding hidden from the keys), padded outputs 0: a row
    without any real key and a sample without any real query frame included."""
    from msakit.modules.attention import CrossModalLayer, CrossModalTransformer

    torch.manual_seed(0)
    transformer = CrossModalTransformer(8, 2, layers=2).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True) if cross else None
    x_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]).bool()
    context_mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    x_mask_used = x_mask if cross else torch.tensor([[1, 1, 1, 1, 0, 0], [0] * 6, [1, 1, 1, 0, 0, 0]]).bool()
    seen = []
    layer_forward = CrossModalLayer.forward
    monkeypatch.setattr(CrossModalLayer, "forward",
                        lambda self, h, *a: seen.append(tuple(h.shape)) or layer_forward(self, h, *a))
    args = (x, x_mask_used, context, context_mask if cross else None)
    ours = transformer(*args)
    assert seen == [(int(x_mask_used.sum()), 8)] * 2
    reference = _every_frame_transformer(transformer, *args)
    inputs = [x, *([context] if cross else []), *transformer.parameters()]
    assert torch.allclose(ours, reference, atol=1e-12)
    assert (ours[~x_mask_used] == 0).all()
    for g, e in zip(torch.autograd.grad(ours.square().sum(), inputs, allow_unused=True),
                    torch.autograd.grad(reference.square().sum(), inputs, allow_unused=True), strict=True):
        assert (g is None and e is None) or torch.allclose(g, e, atol=1e-10)
    empty = transformer(x[:0], x_mask[:0], None if context is None else context[:0],
                        context_mask[:0] if cross else None)
    assert empty.shape == (0, 6, 8)


def test_key_padding_is_made_once_per_transformer_and_skips_the_empty_row_fill_when_none(monkeypatch):
    from msakit.modules import attention

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    padding = attention.KeyPadding(mask)
    assert padding.empty_rows is None and torch.equal(padding.visible, mask)
    bias = padding.bias(2, torch.float32)
    assert bias is padding.bias(2, torch.float32) and bias.shape == (4, 1, 3)
    assert torch.equal(bias[:2, 0], torch.tensor([[0.0, 0.0, torch.finfo(torch.float32).min]] * 2))
    assert (bias[2:] == 0).all()
    double = padding.bias(2, torch.float64)  # one per dtype: the masked value is that dtype's min
    assert double.dtype == torch.float64 and double[0, 0, 2] == torch.finfo(torch.float64).min
    holed = attention.KeyPadding(torch.tensor([[0, 0, 0], [1, 0, 1]]).bool())
    assert torch.equal(holed.empty_rows, torch.tensor([True, False]))
    assert torch.equal(holed.visible, torch.tensor([[1, 1, 1], [1, 0, 1]]).bool())

    made = []

    class Counting(attention.KeyPadding):
        def __init__(self, key_mask):
            made.append(1)
            super().__init__(key_mask)

    monkeypatch.setattr(attention, "KeyPadding", Counting)
    attention.CrossModalTransformer(8, 2, layers=3)(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    assert made == [1]


def _tiny_lf_dnn():
    """A tiny LF-DNN and fake data whose test split (40 samples) makes 5 batches of 8."""
    from fakes import make_data

    from msakit.registry import create_model, get_model_entry

    data = make_data(sizes=(8, 8, 40))
    return create_model("lf_dnn", get_model_entry("lf_dnn").config_cls.tiny(), data.info), data


def test_predict_keeps_no_batch_output_alive_while_the_next_batches_run(monkeypatch):
    """predict() writes each batch's predictions into one array and drops the batch's arrays:
    a list of per-batch arrays kept small objects alive between the large tensors of the next
    batches, and with `keep_freed_memory` the heap grew by about a batch each time (TFN on the
    MOSI-sized test split: up to +170 MiB of peak RSS). Predictions come back in row order."""
    import weakref

    from msakit.train import loop

    arrays = []

    class Tracked(torch.Tensor):  # registers every numpy array made from a prediction
        def numpy(self, *args, **kwargs):
            array = torch.Tensor.numpy(self.as_subclass(torch.Tensor), *args, **kwargs)
            arrays.append(weakref.ref(array))
            return array

    model, data = _tiny_lf_dnn()
    alive_at_forward = []
    forward = type(model).forward

    def spy(self, batch):
        alive_at_forward.append(sum(ref() is not None for ref in arrays[:-1]))
        out = forward(self, batch)
        out.prediction = out.prediction.as_subclass(Tracked)
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    prediction, _ = loop.predict(model, data.splits["test"], data.info, 8, torch.device("cpu"))
    assert len(arrays) == 5 and alive_at_forward == [0] * 5  # only the latest batch's may live
    monkeypatch.setattr(type(model), "forward", forward)
    with torch.no_grad():
        direct = torch.cat([model(b).prediction for b in loop.to_loader(data.splits["test"], data.info, 8,
                                                                          shuffle=False)])
    assert np.allclose(prediction, direct.numpy())


@pytest.mark.parametrize(("batch", "length", "lengths"), [(1, 1, [1]), (1, 5, [1]), (0, 4, [])])
def test_lstm_backward_runs_for_one_or_no_recurrence_cell(batch, length, lengths, recurrence):
    """A single (step, sample) cell, or none: the gate buffer must be a copy of the bias, not a
    view of it (expand().contiguous() returned the bias itself, and the in-place writes then
    broke backward); gradients equal nn.LSTM's."""
    from msakit.modules.encoders import lstm_last_state, lstm_padded_state

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 2, batch_first=True).double()
    x = torch.randn(batch, length, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
    for state, reference in (
        (lambda: lstm_padded_state(lstm, x, mask), lambda: lstm(x * mask[..., None])[1][0][0]),
        (lambda: lstm_last_state(lstm, x, torch.tensor(lengths, dtype=torch.long)),
         lambda: lstm(x[:, :1])[1][0][0] if batch else x.new_zeros(0, 2)),
    ):
        ours, expected = state(), reference()
        assert torch.allclose(ours, expected, atol=1e-12)
        params = [x, *lstm.parameters()]
        got = torch.autograd.grad(ours.square().sum() + 0 * x.sum(), params, allow_unused=True)
        want = torch.autograd.grad(expected.square().sum() + 0 * x.sum(), params, allow_unused=True)
        for g, e in zip(got, want, strict=True):
            assert (g is None and e is None) or torch.allclose(g, e, atol=1e-12)


def test_predict_returns_rows_in_the_splits_order_whatever_the_batch_order(monkeypatch):
    from msakit.train import loop

    model, data = _tiny_lf_dnn()
    in_order, _ = loop.predict(model, data.splits["test"], data.info, 8, torch.device("cpu"))
    to_loader = loop.to_loader
    monkeypatch.setattr(loop, "to_loader", lambda *a, shuffle, **k: to_loader(*a, shuffle=True, seed=3, **k))
    shuffled, _ = loop.predict(model, data.splits["test"], data.info, 8, torch.device("cpu"))
    assert np.allclose(shuffled, in_order)
