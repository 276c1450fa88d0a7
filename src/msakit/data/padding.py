"""Which side of each sequence the padding is on, found from the data, and conversion to msakit's
one convention: real frames first, padding at the end (`mask[t] = t < length`).

Released files differ: MulT's pickles pad at the START (zeros first, real frames last) and store
no lengths; MMSA-FET pads at the end by default but at the start with
`padding_location='start'`, storing the true lengths either way. Reading a start-padded file as
end-padded either counts leading zeros as real frames or, with stored lengths, masks out every
real frame. So the side is looked up in the data, per modality (or per group of word-aligned
modalities that share one length), over all splits together:

    with stored lengths l (or a mask)  a sample with l < L is evidence for "start" when its first
        L - l frames are all padding and some later frame is real, for "end" when its frames
        from l on are all padding and some earlier frame is real;
    without lengths                     evidence for "start" when the sample has leading padding
        frames and its last frame is real, for "end" when its first frame is real and it has
        trailing padding frames (zeros on both sides or none at all tell nothing).
A padding frame is one whose values are all zero or non-finite (or 0 in a BERT mask).

Stored lengths are checked against the data (`_check_stored`: lengths that disagree with the
zero padding are an error in `auto` mode).
`data.padding=auto` (default) takes the only side seen; BOTH sides seen is an error that asks for
`data.padding=start|end`; no evidence at all (nothing padded, or padded frames that are not
zero) keeps end (msakit's and MMSA's default) and says so. `start` / `end` force the side. Lengths
without stored ones: start = L - first real frame, end = last real frame + 1 (so zero frames
INSIDE the real part stay real); 1 for an all-padding sample. Start-padded samples are then
rotated in place, block by block, so their real frames come first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from msakit.data.base import DataError, SplitArrays

log = logging.getLogger(__name__)

SIDES = ("auto", "start", "end")
_CHUNK = 1024  # samples per block (bounds the temporary memory on MOSEI-sized arrays)

__all__ = ["SIDES", "Sequences", "Units", "infer_lengths", "normalise_padding", "real_frames"]


def real_frames(*features: np.ndarray) -> np.ndarray:
    """One or more [N, L, D_k] (same N and L; several = word-aligned modalities) -> [N, L] bool:
    True where a frame has a finite non-zero value in any of them."""
    n, steps = features[0].shape[:2]
    real = np.zeros((n, steps), dtype=bool)
    for array in features:
        for start in range(0, n, _CHUNK):
            block = array[start : start + _CHUNK]
            real[start : start + _CHUNK] |= np.any(np.isfinite(block) & (block != 0), axis=2)
    return real


@dataclass
class Sequences:
    """One split's view of one padding unit: the feature arrays [N, L, D_k] that share the unit's
    lengths (one modality, or several word-aligned ones), which frames are real [N, L] bool, and
    the stored lengths [N] int64 in [1, L] (None = infer them from `real`)."""

    features: list[np.ndarray]
    real: np.ndarray
    stored: np.ndarray | None = None
    stored_key: str = "the stored lengths"
    """Where `stored` came from, for error messages (e.g. "audio_lengths")."""
    lengths: np.ndarray = field(init=False)


def _first_last(real: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (any real frame [N] bool, first real index [N], last real index [N])."""
    steps = real.shape[1]
    return real.any(axis=1), real.argmax(axis=1), steps - 1 - real[:, ::-1].argmax(axis=1)


def sample_sides(real: np.ndarray, stored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([N] bool: looks start-padded, [N] bool: looks end-padded) from the real frames [N, L] and
    the stored lengths when there are any; see the module docstring."""
    steps = real.shape[1]
    has, first, last = _first_last(real)
    if stored is None:
        return has & (first > 0) & (last == steps - 1), has & (first == 0) & (last < steps - 1)
    pad = steps - stored
    lead_free, trail_free = first >= pad, last < stored  # no real frame in that region
    return has & (pad > 0) & lead_free & ~trail_free, has & (pad > 0) & trail_free & ~lead_free


def count_sides(seq: Sequences) -> tuple[int, int]:
    """(samples that look start-padded, samples that look end-padded) of `seq`."""
    start, end = sample_sides(seq.real, seq.stored)
    return int(start.sum()), int(end.sum())


def _choose(name: str, counts: tuple[int, int], requested: str, where: str) -> tuple[str, str]:
    """-> (side, the note's phrase for this unit)."""
    start, end = counts
    seen = f"{start} samples look start-padded, {end} end-padded"
    if requested != "auto":
        return requested, f"{name} {requested} (data.padding; {seen})"
    if start and end:
        raise DataError(
            f"{where}: {name}: the padding side is ambiguous ({seen}); "
            "set data.padding=start or data.padding=end"
        )
    if start:
        return "start", f"{name} start ({start} padded samples seen, none end-padded)"
    if end:
        return "end", f"{name} end ({end} padded samples seen, none start-padded)"
    return "end", f"{name} end (assumed: no zero padding seen in the data)"


def infer_lengths(seq: Sequences, side: str) -> np.ndarray:
    """[N] int64 in [1, L]: the stored lengths, else from the real frames for padding `side`."""
    if seq.stored is not None:
        return seq.stored.astype(np.int64)
    steps = seq.real.shape[1]
    has, first, last = _first_last(seq.real)
    lengths = np.where(has, steps - first if side == "start" else last + 1, 1)
    return lengths.astype(np.int64)


def _move_padding_to_end(features: np.ndarray, lengths: np.ndarray) -> None:
    """In place: rotate row i left by L - lengths[i], so its last lengths[i] frames come first."""
    n, steps = features.shape[:2]
    time = np.arange(steps)[None, :]
    for start in range(0, n, _CHUNK):
        shift = steps - lengths[start : start + _CHUNK, None]
        if not shift.any():
            continue
        index = (time + shift) % steps  # [n_block, L]
        block = features[start : start + _CHUNK]
        block[...] = np.take_along_axis(block, index[:, :, None], axis=1)


Units = dict[str, tuple[tuple[str, ...], Sequences]]
"""One split's padding units: unit name ("text", "audio", "text+audio+vision" for word-aligned
modalities) -> (its modalities, their `Sequences`)."""


def _check_stored(name: str, parts: list[Sequences], stored_seen: int, requested: str, where: str) -> None:
    """Raise DataError when a unit's stored lengths disagree with the zero padding its data show
    (`data.padding=auto` only; forcing a side skips the check):
    - among the samples whose stored length is below L, at least a tenth look zero-padded from
      their frames alone (`count_sides` without lengths) but fewer than half as many are padded
      where their stored lengths say (lengths halved, for other sequences);
    - every stored length is L, yet at least half of the samples look zero-padded (lengths all
      L, or in another unit and clipped to L).
    Samples stored at full length are left out of the first count: zero frames at their ends are
    real frames without data (a face not detected). Data whose padding is not zero pass."""
    if requested != "auto" or any(seq.stored is None for seq in parts):
        return
    steps = parts[0].real.shape[1]
    short = [seq.stored < steps for seq in parts]
    padded = [np.logical_or(*sample_sides(seq.real)) for seq in parts]
    total, shorter = sum(len(seq.real) for seq in parts), sum(int(k.sum()) for k in short)
    data_short = sum(int((p & k).sum()) for p, k in zip(padded, short, strict=True))
    data_all = sum(int(p.sum()) for p in padded)
    if shorter and data_short >= max(1, shorter // 10) and stored_seen < data_short / 2:
        problem = (f"{data_short} of the {shorter} samples stored shorter than {steps} look zero-padded, "
                   f"{stored_seen} where those lengths say")
    elif not shorter and data_all >= max(1, total / 2):
        problem = f"every stored length is {steps}, yet {data_all} of {total} samples look zero-padded"
    else:
        return
    raise DataError(f"{where}: {name}: {parts[0].stored_key} disagree with the data's zero padding: {problem} "
                    "(lengths in another unit, or for other sequences? data.padding=start|end skips this check)")


def normalise_padding(
    splits: dict[str, SplitArrays], units: dict[str, Units], requested: str, where: str
) -> str:
    """Find each unit's padding side (over all splits), move start padding to the end in place
    and set `splits[s].lengths[m]` for every modality of every unit. units: split -> its `Units`.
    requested: "auto", "start" or "end". Returns the note for the run ("padding: text start
    (...); ..."). Raises DataError naming `where` and the unit when auto sees both sides."""
    if requested not in SIDES:
        raise DataError(f"{where}: data.padding must be one of {SIDES}, got {requested!r}")
    by_name: dict[str, list[Sequences]] = {}
    for split_units in units.values():
        for name, (_, seq) in split_units.items():
            by_name.setdefault(name, []).append(seq)
    phrases = []
    for name, parts in by_name.items():
        counts = [count_sides(seq) for seq in parts]
        _check_stored(name, parts, sum(map(sum, counts)), requested, where)
        side, phrase = _choose(name, tuple(map(sum, zip(*counts, strict=True))), requested, where)
        phrases.append(phrase)
        for seq in parts:
            seq.lengths = infer_lengths(seq, side)
            if side == "start":
                for features in seq.features:
                    _move_padding_to_end(features, seq.lengths)
    for split, split_units in units.items():
        for modalities, seq in split_units.values():
            splits[split].lengths.update({m: seq.lengths.copy() for m in modalities})
    note = "padding: " + "; ".join(phrases)
    if any(" start (" in phrase for phrase in phrases):
        note += "; start-padded sequences stored with their real frames first"
    log.info("%s: %s", where, note)
    return note
