"""Dropout for very wide activations (TFN's fused tensor: [B, 140k] on MOSI).

`nn.Dropout` draws its mask with `bernoulli_`, one generator call and a float per entry: on CPU
about 7x the cost of `keep_mask`, which takes four 16-bit uniforms from each 64-bit draw and
compares them to an integer threshold. For TFN's fused tensor the draw was a quarter of the
training step. The distribution is nn.Dropout's (each entry kept independently with probability
1 - p and scaled by 1 / (1 - p)) with p rounded to a multiple of 2^-16 (at most 7.6e-6 away;
the scale uses the rounded p, so the layer stays unbiased); the random stream is another.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
from torch import nn

_LEVELS = 1 << 16
#: the generator `keep_mask` draws from on this thread (None: the global one)
_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "generator", default=None)


@contextlib.contextmanager
def batch_generator(generator: torch.Generator):
    """`keep_mask` draws from `generator` inside this block, on this thread only (threads of
    `train.window_threads` each run a batch with its own generator; msakit/train/window.py)."""
    token = _GENERATOR.set(generator)
    try:
        yield generator
    finally:
        _GENERATOR.reset(token)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, float]:
    """A dropout keep mask: (bool tensor of `shape`, each entry True with probability 1 - p', and
    the scale 1 / (1 - p')), p' = min(round(p * 2^16), 2^16 - 1) / 2^16. p in [0, 1); raises
    ValueError outside.

    Drawn from the default generator (seeded by `torch.manual_seed`), or from the one a
    `batch_generator` block set on this thread; one int64 per four entries.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    # entries whose 16-bit value is below the threshold are dropped; at least one level is kept
    dropped = min(round(p * _LEVELS), _LEVELS - 1)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=_GENERATOR.get())
    uniform16 = words.view(torch.int16)[:numel].view(shape)  # uniform on [-2^15, 2^15)
    # compared into bytes and viewed as bool: a bool-typed comparison ran ~3.5x slower on CPU
    keep = torch.empty(shape, dtype=torch.uint8, device=device)
    torch.ge(uniform16, dropped - _LEVELS // 2, out=keep)
    return keep.view(torch.bool), _LEVELS / (_LEVELS - dropped)


class WideDropout(nn.Dropout):
    """x [*] -> [*]: inverted dropout with `keep_mask`; identity in eval mode or at p = 0.
    Drop-in for `nn.Dropout` (same state dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        # one scaled float mask, built without autograd: one wide multiply forward and backward
        keep, scale = keep_mask(x.shape, self.p, x.device)
        # bool -> float conversion was ~7x slower than uint8 -> float on CPU
        return x * keep.view(torch.uint8).to(x.dtype).mul_(scale)
