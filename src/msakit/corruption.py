"""Corruptions of a `Batch` (missing and noisy modalities), seeded, each with a level r in [0, 1].

Applied to a Batch between the loader and the model, never inside a model, so every registered
model is evaluated (`msakit robustness`) and trained (`train.corruption`) under the same protocols.

Protocols (rates are per (sample, modality): a float, or a tensor [B, 3] in (text, audio, vision)
order, which is how training draws a rate per sample):
    drop     random frame/token drop: every real position of every modality is removed with
             probability r, independently (Zhao et al.-style random drop, TFR-Net's "random" drop).
    block    contiguous block drop: per sample and modality, one run of round((n - 2) * r) real
             positions (n = number of real positions; rounding half up) removed, placed uniformly
             inside positions 1 .. n-2, so the first and last positions are kept (TFR-Net's
             "structural temporal" drop, where they are the [CLS]/[SEP] tokens). n <= 2: no-op.
    missing  whole-modality missing per sample. A float r removes exactly round(r * B * 3)
             (sample, modality) slots of the batch, chosen uniformly among the slots that keep at
             least one modality per sample (so levels above 2/3 saturate: every sample keeps one);
             a tensor of rates removes each slot with its own probability, then gives one random
             removed modality back to a sample that lost all three.
    noise    Gaussian feature noise: x + r * std * N(0, 1) on real frames, std the feature's
             standard deviation over the TRAINING split's real frames (`feature_std`); padding
             stays exactly zero. Raw transcripts are not changed by noise.
    conditions  (not a level) the six fixed conditions of the MMIN protocol (Zhao et al., ACL
             2021): only {t}, {a}, {v}, {t,a}, {t,v} or {a,v} present (`CONDITIONS`).

How a removal looks to a model: the position's features are ZEROED and its mask set to False
(a removed modality is an all-False mask row with zero features). Where the batch carries raw
transcripts (`Batch.texts`, read by models with their own tokenizer) the removed text positions
are WORDS (whitespace-split) replaced by `UNK_TOKEN` ("[UNK]", which BERT-style WordPiece
tokenizers such as the bundled MiniLM map to their unknown-token id); a removed text modality
becomes all-[UNK] words. Token ids never exist in a Batch, so this is the closest equivalent.
Deviation: masks may get holes (drop, block); models that read a mask as a length (packed LSTMs)
then see the first `mask.sum()` frames, which include zeroed ones.

Level 0 returns the batch unchanged (the same object). Randomness comes only from the
`torch.Generator` passed in (CPU), so a seed fixes the corruption; `BatchCorruption` seeds one
generator per (seed, key) so that a training epoch or an evaluation pass is reproducible and a
resumed run sees the same corruptions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from msakit.batch import MODALITIES, Batch

PROTOCOLS = ("drop", "block", "missing", "noise")
"""Protocols with a level r in [0, 1]."""
CONDITIONS: dict[str, tuple[str, ...]] = {
    "t": ("text",),
    "a": ("audio",),
    "v": ("vision",),
    "ta": ("text", "audio"),
    "tv": ("text", "vision"),
    "av": ("audio", "vision"),
}
"""The six MMIN test conditions: name -> modalities PRESENT."""
UNK_TOKEN = "[UNK]"

Rates = float | torch.Tensor


def _rates(rates: Rates, batch: Batch) -> torch.Tensor:
    """-> [B, 3] float (CPU) in [0, 1]."""
    table = torch.as_tensor(rates, dtype=torch.float32).cpu()
    table = table.expand(batch.size, len(MODALITIES)) if table.ndim == 0 else table
    if table.shape != (batch.size, len(MODALITIES)):
        raise ValueError(f"rates must be a float or [B, 3] = [{batch.size}, 3], got {tuple(table.shape)}")
    if (table < 0).any() or (table > 1).any():
        raise ValueError("corruption rates must lie in [0, 1]")
    return table


def _is_zero(rates: Rates) -> bool:
    return not bool(torch.as_tensor(rates).abs().sum() > 0)


def _words_removed(text: str, remove: np.ndarray) -> str:
    words = text.split()
    return " ".join(UNK_TOKEN if r else w for w, r in zip(words, remove, strict=True))


def remove_positions(batch: Batch, removed: dict[str, torch.Tensor],
                     removed_words: list[np.ndarray] | None = None) -> Batch:
    """The batch with positions `removed[m]` [B, L_m] bool zeroed and masked out; `removed_words`
    (one bool array per sample, one entry per whitespace word) turns those words into [UNK]."""
    changes = {}
    for m, gone in removed.items():
        gone = gone.to(batch.mask(m).device)
        changes[m] = batch.features(m).masked_fill(gone.unsqueeze(-1), 0.0)
        changes[f"{m}_mask"] = batch.mask(m) & ~gone
    if removed_words is not None and batch.texts is not None:
        changes["texts"] = [_words_removed(t, r) for t, r in zip(batch.texts, removed_words, strict=True)]
    return dataclasses.replace(batch, **changes)


def _word_counts(batch: Batch) -> list[int]:
    return [len(t.split()) for t in batch.texts] if batch.texts is not None else []


def drop_frames(batch: Batch, rates: Rates, generator: torch.Generator) -> Batch:
    """Random drop: each real position (and each transcript word) removed with probability r."""
    if _is_zero(rates):
        return batch
    table = _rates(batch=batch, rates=rates)
    removed = {}
    for j, m in enumerate(MODALITIES):
        mask = batch.mask(m).cpu()
        removed[m] = (torch.rand(mask.shape, generator=generator) < table[:, j:j + 1]) & mask
    words = [(torch.rand(n, generator=generator) < table[i, 0]).numpy()
             for i, n in enumerate(_word_counts(batch))]
    return remove_positions(batch, removed, words or None)


def block_length(n: int, rate: float) -> int:
    """Length of the contiguous block for n real positions at rate r: round((n - 2) * r), >= 0."""
    return max(0, math.floor((n - 2) * rate + 0.5))


def _block(n: int, rate: float, generator: torch.Generator) -> np.ndarray:
    """[n] bool: one run of block_length(n, rate) inside positions 1 .. n-2."""
    k = block_length(n, rate)
    out = np.zeros(n, dtype=bool)
    if k > 0:
        start = 1 + int(torch.randint(0, n - 1 - k, (1,), generator=generator))
        out[start:start + k] = True
    return out


def drop_block(batch: Batch, rates: Rates, generator: torch.Generator) -> Batch:
    """Contiguous block drop (see the module docstring) on every modality and transcript."""
    if _is_zero(rates):
        return batch
    table = _rates(batch=batch, rates=rates)
    removed = {}
    for j, m in enumerate(MODALITIES):
        mask = batch.mask(m).cpu()
        gone = torch.zeros_like(mask)
        for i in range(batch.size):
            real = mask[i].nonzero().squeeze(-1)  # positions of the real frames, in order
            block = torch.from_numpy(_block(len(real), float(table[i, j]), generator))
            gone[i, real[block]] = True
        removed[m] = gone
    words = [_block(n, float(table[i, 0]), generator) for i, n in enumerate(_word_counts(batch))]
    return remove_positions(batch, removed, words or None)


def remove_modalities(batch: Batch, absent: torch.Tensor) -> Batch:
    """absent [B, 3] bool (text, audio, vision): those modalities of those samples removed
    (features zeroed, mask all False; transcripts all [UNK])."""
    absent = absent.cpu().bool()
    removed = {m: absent[:, j:j + 1].expand_as(batch.mask(m).cpu()) & batch.mask(m).cpu()
               for j, m in enumerate(MODALITIES)}
    words = [np.full(n, bool(absent[i, 0])) for i, n in enumerate(_word_counts(batch))]
    return remove_positions(batch, removed, words or None)


def drop_modalities(batch: Batch, rates: Rates, generator: torch.Generator) -> Batch:
    """Whole-modality missing (see the module docstring); every sample keeps >= 1 modality."""
    if _is_zero(rates):
        return batch
    size, count = batch.size, len(MODALITIES)
    keeper = torch.randint(0, count, (size,), generator=generator)  # a modality each sample keeps
    if isinstance(rates, torch.Tensor) and rates.ndim > 0:
        absent = torch.rand(size, count, generator=generator) < _rates(rates, batch)
        lost_all = absent.all(dim=1)
        absent[lost_all, keeper[lost_all]] = False
        return remove_modalities(batch, absent)
    rate = float(_rates(rates, batch)[0, 0]) if size else 0.0
    eligible = torch.ones(size, count, dtype=torch.bool)
    eligible[torch.arange(size), keeper] = False
    k = min(math.floor(rate * size * count + 0.5), int(eligible.sum()))
    scores = torch.rand(size, count, generator=generator).masked_fill(~eligible, 2.0)
    absent = torch.zeros(size * count, dtype=torch.bool)
    absent[scores.flatten().argsort()[:k]] = True
    return remove_modalities(batch, absent.view(size, count))


def keep_condition(batch: Batch, condition: str) -> Batch:
    """One MMIN condition ("t", "a", "v", "ta", "tv", "av"): every sample keeps only those."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")
    absent = torch.tensor([m not in CONDITIONS[condition] for m in MODALITIES])
    return remove_modalities(batch, absent.expand(batch.size, -1))


def random_conditions(batch: Batch, complete: torch.Tensor, generator: torch.Generator) -> Batch:
    """Each sample not marked `complete` [B] bool gets one of the six conditions uniformly."""
    names = list(CONDITIONS)
    pick = torch.randint(0, len(names), (batch.size,), generator=generator)
    absent = torch.tensor([[m not in CONDITIONS[names[p]] for m in MODALITIES] for p in pick.tolist()],
                          dtype=torch.bool).view(batch.size, len(MODALITIES))
    absent[complete.cpu()] = False
    return remove_modalities(batch, absent)


def add_noise(batch: Batch, rates: Rates, generator: torch.Generator,
              std: dict[str, torch.Tensor]) -> Batch:
    """x + r * std[m] * N(0, 1) on real frames; std[m] [D_m] from `feature_std`."""
    if _is_zero(rates):
        return batch
    table = _rates(batch=batch, rates=rates)
    changes = {}
    for j, m in enumerate(MODALITIES):
        x, mask = batch.features(m), batch.mask(m)
        noise = torch.randn(x.shape, generator=generator) * std[m].cpu().float()  # [B, L, D]
        noise = noise * table[:, j].view(-1, 1, 1) * mask.cpu().unsqueeze(-1)
        changes[m] = x + noise.to(x.device, x.dtype)
    return dataclasses.replace(batch, **changes)


def feature_std(arrays) -> dict[str, torch.Tensor]:
    """Per-feature std over the real frames of a split (`SplitArrays`): {m: [D_m] float32}."""
    out = {}
    for m in MODALITIES:
        x, lengths = arrays.features[m], arrays.lengths[m]
        real = np.arange(x.shape[1])[None, :] < lengths[:, None]  # [N, L]
        out[m] = torch.as_tensor(x[real].astype(np.float64).std(axis=0), dtype=torch.float32)
    return out


def corrupt(batch: Batch, protocol: str, level: Rates, generator: torch.Generator,
            std: dict[str, torch.Tensor] | None = None) -> Batch:
    """Apply one protocol of `PROTOCOLS` at `level` (float or [B, 3] rates). Noise needs `std`."""
    if protocol == "drop":
        return drop_frames(batch, level, generator)
    if protocol == "block":
        return drop_block(batch, level, generator)
    if protocol == "missing":
        return drop_modalities(batch, level, generator)
    if protocol == "noise":
        if std is None:
            raise ValueError("the noise protocol needs the training split's feature std")
        return add_noise(batch, level, generator, std)
    raise ValueError(f"unknown corruption protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


# ------------------------------------------------------------------ training-time corruption


@dataclass
class CorruptionConfig:
    """`train.corruption`: corrupt training batches (robust training) with one protocol.

    protocol: "none" (default), one of PROTOCOLS, or "conditions".
    mode: "fixed" (TFR-Net style: every sample at `rate`; with "conditions", every sample in
        `condition`) or "random" (LNLN style: each sample draws its own rate per modality,
        uniform in [0, rate], and a share `complete_fraction` of the samples stays complete;
        with "conditions", each corrupted sample gets one of the six conditions at random).
    validate: also corrupt the validation split (fixed corruption seed, the same every epoch);
        by default selection stays on clean validation data.
    """

    protocol: str = "none"
    rate: float = 0.0
    """Fixed rate, or the upper end of the per-sample rates in random mode; in [0, 1]."""
    mode: str = "fixed"
    complete_fraction: float = 0.5
    """random mode: share of each batch's samples left complete (LNLN keeps half)."""
    condition: str = ""
    """protocol "conditions" in fixed mode: the modalities kept, one of t a v ta tv av."""
    validate: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in ("none", *PROTOCOLS, "conditions"):
            raise ValueError(f"protocol must be none, {', '.join(PROTOCOLS)} or conditions, got {self.protocol!r}")
        if self.mode not in ("fixed", "random"):
            raise ValueError(f"mode must be 'fixed' or 'random', got {self.mode!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if not 0.0 <= self.complete_fraction <= 1.0:
            raise ValueError(f"complete_fraction must be in [0, 1], got {self.complete_fraction}")
        if self.protocol == "conditions" and self.mode == "fixed" and self.condition not in CONDITIONS:
            raise ValueError(f"protocol conditions, mode fixed needs condition in {', '.join(CONDITIONS)}")

    def check_effective(self) -> None:
        """Raise ValueError for settings that would be accepted and do nothing (the run would
        train clean, or otherwise than its config says, without a word). Checked for NEW runs
        given to `msakit train` only (`config.check_new_run`): configs stored by older versions,
        which accepted them, still load for evaluation and resume, and tune may search a rate of 0."""
        if self.protocol in PROTOCOLS and self.rate == 0:
            raise ValueError(f"protocol {self.protocol} at rate 0 corrupts nothing; set train.corruption.rate")
        unused = [name for name, used in (
            ("rate", self.protocol in PROTOCOLS or self.rate == 0),
            ("condition", (self.protocol, self.mode) == ("conditions", "fixed") or not self.condition),
            ("mode", self.protocol != "none" or self.mode == "fixed"),
            ("complete_fraction", self.mode == "random" or self.complete_fraction == 0.5),
            ("validate", self.protocol != "none" or not self.validate),
        ) if not used]
        if unused:
            raise ValueError(f"{unused[0]} has no effect with protocol {self.protocol}, mode {self.mode}")

    @property
    def active(self) -> bool:
        return self.protocol != "none"


STREAMS = 1_000_003  # batch numbers and steps are below this; the generator of (seed, key): seed * STREAMS + key


class BatchCorruption:
    """A seeded batch transform: `transform(batch, key) -> Batch`, key an int (the batch's number
    in an evaluation pass, below `STREAMS`, or `training_key(epoch, step)`); each key gets its
    own generator seeded from (seed, key), so the result does not depend on what ran before
    (resume-safe)."""

    def __init__(self, protocol: str, rate: float, seed: int, mode: str = "fixed",
                 std: dict[str, torch.Tensor] | None = None, complete_fraction: float = 0.5,
                 condition: str = ""):
        self.protocol, self.rate, self.seed, self.mode = protocol, rate, seed, mode
        self.std, self.complete_fraction, self.condition = std, complete_fraction, condition

    @classmethod
    def from_config(cls, cfg: CorruptionConfig, train_arrays, seed: int) -> BatchCorruption | None:
        """Training seed `seed`'s corruption of its training batches (None for protocol none),
        called with `training_key(epoch, step)`: every (seed, epoch, step) has a generator of
        its own (seed < 9 million, epoch < STREAMS - 1), none of them one that evaluation
        (`msakit robustness`: seed r < STREAMS, key = batch number) uses. Until 2026-12 the
        stream seed was the training seed itself, so seed s + 1's epoch e used seed s's epoch
        e + 1 stream."""
        if not cfg.active:
            return None
        std = feature_std(train_arrays) if cfg.protocol == "noise" else None
        return cls(cfg.protocol, cfg.rate, (seed + 1) * STREAMS, cfg.mode, std, cfg.complete_fraction,
                   cfg.condition)

    @staticmethod
    def training_key(epoch: int, step: int) -> int:
        """The key of a training batch (epoch and step counted from 0)."""
        return epoch * STREAMS + step

    def for_validation(self) -> BatchCorruption:
        """The same corruption on streams no training batch uses; keys are batch numbers, so
        every epoch sees the same corrupted validation split."""
        return BatchCorruption(self.protocol, self.rate, self.seed + STREAMS - 1, self.mode, self.std,
                               self.complete_fraction, self.condition)

    def __call__(self, batch: Batch, key: int) -> Batch:
        generator = torch.Generator().manual_seed((self.seed * STREAMS + key) % 2**63)
        if self.mode == "random":
            complete = torch.rand(batch.size, generator=generator) < self.complete_fraction
            if self.protocol == "conditions":
                return random_conditions(batch, complete, generator)
            rates = torch.rand(batch.size, len(MODALITIES), generator=generator) * self.rate
            rates[complete] = 0.0
            return corrupt(batch, self.protocol, rates, generator, self.std)
        if self.protocol == "conditions":
            return keep_condition(batch, self.condition)
        return corrupt(batch, self.protocol, self.rate, generator, self.std)
