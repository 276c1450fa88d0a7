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

__all__ = ["SIDES", "Sequences", "Units", "check_time_axis", "infer_lengths", "normalise_padding", "real_frames"]


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
    stored_key: str = "stored"
    """Where `stored` came from, for error messages (e.g. "audio_lengths")."""
    frames: np.ndarray | None = None
    """[N, L] bool real frames of the features where `real` is something else (text_bert's mask),
    for checking `stored` against the data."""
    lengths: np.ndarray = field(init=False)


def _first_last(real: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (any real frame [N] bool, first real index [N], last real index [N])."""
    steps = real.shape[1]
    return real.any(axis=1), real.argmax(axis=1), steps - 1 - real[:, ::-1].argmax(axis=1)


def _sides(has: np.ndarray, first: np.ndarray, last: np.ndarray, steps: int,
           stored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([N] bool: looks start-padded, [N] bool: looks end-padded) from `_first_last`'s (has,
    first, last) of [N, `steps`] real frames and the stored lengths when there are any; see the
    module docstring."""
    if stored is None:
        return has & (first > 0) & (last == steps - 1), has & (first == 0) & (last < steps - 1)
    pad = steps - stored
    lead_free, trail_free = first >= pad, last < stored  # no real frame in that region
    return has & (pad > 0) & lead_free & ~trail_free, has & (pad > 0) & trail_free & ~lead_free


def count_sides(seq: Sequences) -> tuple[int, int]:
    """(samples that look start-padded, samples that look end-padded) of `seq`."""
    start, end = _sides(*_first_last(seq.real), seq.real.shape[1], seq.stored)
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


def _extents(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From real frames [N, L]: ([N] bool: padded at one end, [N] int: frames up to the padding)."""
    has, first, last = _first_last(real)
    start, end = _sides(has, first, last, real.shape[1])
    return start | end, np.where(start, real.shape[1] - first, last + 1)


def check_time_axis(features: dict[str, np.ndarray], stored: dict[str, np.ndarray], where: str,
                    rows: dict[str, np.ndarray] | None = None) -> None:
    """Raise DataError when a modality's [N, A, B] array looks stored [N, D, L] (time last)
    instead of [N, L, D]: its zero padding runs along the LAST axis, following lengths it should
    follow along the time axis. The lengths tried:
    - its own stored lengths (`stored[m]`, [N], before any clipping), unless the time axis's
      zero padding already follows them;
    - the lengths of another modality whose time axis has B frames (word-aligned data);
    - the last-axis padding of another modality that also has B on its last axis (every
      modality of a word-aligned file transposed).
    At least max(10, N / 10) samples must be padded along the last axis, and 3 in 4 of them
    match, with 3 or more different lengths among them: a feature that is zero over a whole clip
    does not follow the clip lengths, so files laid out right are not refused. Not detected: a
    modality transposed alone with no lengths to compare (unaligned, no stored lengths).
    rows: [N, A] real frames of a modality where the caller has them (saves a pass)."""
    rows = rows or {}
    scanned: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def extents(k: str, axis: int) -> tuple[np.ndarray, np.ndarray]:  # padded [N], extent [N]; once each
        if (k, axis) not in scanned:
            frames = (rows[k] if k in rows else real_frames(features[k])) if axis == 1 else \
                real_frames(np.swapaxes(features[k], 1, 2))
            scanned[k, axis] = _extents(frames)
        return scanned[k, axis]

    for m, x in features.items():
        n, steps, width = x.shape
        everyone = np.ones(n, dtype=bool)
        candidates = []
        if m in stored:
            lengths = np.rint(stored[m])
            padded, extent = extents(m, 1)
            if int((padded & (extent == lengths)).sum()) < max(10, 0.75 * padded.sum()):
                candidates.append((lengths, everyone, f"its stored lengths ({m}_lengths)"))
        for k, y in features.items():
            if k != m and y.shape[1] == width:
                candidates.append((extents(k, 1)[1], everyone, f"{k}'s lengths"))
            if k != m and y.shape[2] == width:
                other_padded, other_extent = extents(k, 2)
                candidates.append((other_extent, other_padded, f"the last-axis padding of {k}"))
        if not candidates:
            continue
        padded, extent = extents(m, 2)
        if padded.sum() < max(10, n / 10):
            continue
        for lengths, valid, source in candidates:
            hit = padded & valid & (extent == lengths)
            if hit.sum() >= 0.75 * padded.sum() and len(np.unique(extent[hit])) >= 3:
                raise DataError(
                    f"{where}: {m} has shape [{n}, {steps}, {width}] but looks stored [N, D, L] (time last): "
                    f"its zero padding runs along the last axis and follows {source} in {int(hit.sum())} "
                    f"of {int(padded.sum())} samples padded there; store it [N, L, D] (np.transpose(x, (0, 2, 1)))")


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


def _check_stored(name: str, parts: list[Sequences], side: str, where: str) -> None:
    """Raise DataError when a unit's stored lengths disagree with the zero padding of its data
    (`data.padding=auto` only: forcing a side skips this), read on padding `side`:
    - too short: at least 1 in 20 samples has a real frame past its stored length (halved, shuffled
      or another modality's lengths);
    - too long: at least 3 in 4 samples (and 5) end in zero frames before their stored length
      (every length L, lengths one too long, in another unit and clipped to L).
    Only data that are zero-padded are compared (at least 1 in 10 samples looks zero-padded from
    its frames alone): with padding of another value every frame is real. A few samples ending in
    zero frames are real frames without data (a face not detected), not padding. The frames read
    are `Sequences.frames` where `real` is a mask (text_bert's)."""
    if any(seq.stored is None for seq in parts):
        return
    samples = padded = too_short = too_long = 0
    for seq in parts:
        real = seq.frames if seq.frames is not None else seq.real
        steps = real.shape[1]
        has, first, last = _first_last(real)
        if side == "end":
            short, long = last >= seq.stored, last < seq.stored - 1
        else:
            short, long = first < steps - seq.stored, first > steps - seq.stored
        looks_padded = np.logical_or(*_sides(has, first, last, steps))
        samples, padded = samples + int(has.sum()), padded + int(looks_padded.sum())
        too_short, too_long = too_short + int((has & short).sum()), too_long + int((has & long).sum())
    if not samples or padded < max(1, samples / 10):
        return
    if too_short >= max(1, samples / 20):
        problem = f"{too_short} of {samples} samples have real frames past their stored length"
    elif too_long >= max(5, 0.75 * samples):
        problem = f"{too_long} of {samples} samples end in zero frames before their stored length"
    else:
        return
    raise DataError(f"{where}: {name}: stored lengths ({parts[0].stored_key}) disagree with the data's zero padding ({side}): "
                    f"{problem} (lengths in another unit, or of other sequences? data.padding=start|end "
                    "skips this check)")


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
        side, phrase = _choose(name, tuple(map(sum, zip(*counts, strict=True))), requested, where)
        if requested == "auto":
            _check_stored(name, parts, side, where)
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
