"""MMSA feature pickles (thuiar/MMSA `aligned_50.pkl`, `unaligned_50.pkl`; MOSI, MOSEI, CH-SIMS).

File layout: a dict with "train", "valid", "test", each a dict of arrays (N samples):
    id                   [N] str, "video$_$clip"
    raw_text             [N] str (optional here)
    text                 [N, L_t, D_t] float (frozen BERT features, D_t = 768)
    text_bert            [N, 3, L_t] (token ids, attention mask, segment ids; optional here)
    audio                [N, L_a, D_a] float
    vision               [N, L_v, D_v] float
    audio_lengths        [N] int (unaligned files only)
    vision_lengths       [N] int (unaligned files only)
    regression_labels    [N] float in [-3, 3] (CMU) or [-1, 1] (CH-SIMS)
    regression_labels_T/A/V   [N] unimodal labels, CH-SIMS only: marks the file as CH-SIMS
Other keys (annotations, classification_labels of old MMSA files, ...) are ignored.

Lengths (all clipped to [1, L]):
    text: text_bert[:, 1, :].sum() (the attention mask) when present, else inferred from padding;
    audio/vision: the stored *_lengths; without them (aligned files) the text's lengths and
    padding side when the sequence length equals L_t, else inferred from padding.
    Refused (DataError): an array that looks stored [N, D, L] (time last: its zero padding runs
    along the last axis, following its stored lengths or the text's; `padding.check_time_axis`);
    non-finite stored lengths; a text_bert whose mask row is empty for most
    samples (rows in another order); stored lengths (the mask included) that disagree with the
    data's zero padding, too short or too long (`padding._check_stored`).
Padding side: MMSA-FET pads at the end by default and at the start with
`padding_location='start'`; the side is found in the data per modality (`data.padding=auto`,
or forced with start|end; see msakit/data/padding.py) and start-padded sequences are stored with
their real frames first. The side found is one of the run's notes.
Video context: ids "video$_$clip" give each split's `groups` (clips of a video in clip order);
ids without "$_$" give none (a note says so; contextual models refuse such data).

msakit extension (written by `write_mmsa`, ignored by other MMSA readers): an optional top-level
key "msakit" holding a dict with any of
    name          dataset name (default: the file stem, e.g. "aligned_50")
    task          "regression" (default) or "classification"; classification reads the split key
                  "classification_labels" [N] int instead of regression_labels
    num_classes   K for classification (default: largest label + 1)
    class_names   names of the K classes
    notes         list of strings copied into MultimodalData.notes (e.g. the synthetic oracle)
    extraction    how the features were computed from raw media (`msakit extract`); copied into
                  DatasetInfo.extraction so that checkpoints carry it (`msakit predict` reruns it)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msakit.batch import MODALITIES
from msakit.data import register_dataset
from msakit.data.base import (
    SPLITS,
    DataError,
    DatasetInfo,
    MultimodalData,
    SplitArrays,
    group_by_video,
    validate,
)
from msakit.data.padding import Sequences, Units, check_time_axis, normalise_padding, real_frames
from msakit.data.safe_pickle import load_pickle, save_pickle

if TYPE_CHECKING:
    from msakit.config import DataConfig

log = logging.getLogger(__name__)

META_KEY = "msakit"
SIMS_KEYS = ("regression_labels_T", "regression_labels_A", "regression_labels_V")
VIDEO_SEPARATOR = "$_$"

__all__ = [
    "mmsa_video",
    "load_mmsa",
    "read_mmsa",
    "split_to_mmsa",
    "write_mmsa",
]


# ----------------------------------------------------------------------------- helpers


def to_float_array(value: Any, where: str) -> np.ndarray:
    """value as float32 (the same array when it already is one and writeable). Complex values
    (whose imaginary part a cast would drop) and non-numbers raise DataError naming `where`."""
    if np.iscomplexobj(value):
        raise DataError(f"{where}: complex values; expected real numbers")
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{where}: not a numeric array ({str(e).splitlines()[0][:200]})") from None
    if not array.flags.writeable:
        array = array.copy()
    return array


def sequence_features(raw: dict, where: str, n: int, labels_name: str) -> dict[str, np.ndarray]:
    """The text/audio/vision arrays of one split as float32 [N, L, D], checked: three dims, N rows
    (as many as `labels_name` has), at least one frame and one feature. `where` prefixes errors."""
    features: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        name = f"{where}.{m}"
        array = to_float_array(raw[m], name)
        if array.ndim != 3:
            raise DataError(f"{name} has shape {array.shape}, expected [N, L, D] (3 dims)")
        if array.shape[0] != n:
            raise DataError(f"{name} has {array.shape[0]} samples but {labels_name} has {n}")
        if array.shape[1] == 0 or array.shape[2] == 0:
            raise DataError(f"{name} has shape {array.shape}: no frames or no features")
        features[m] = array
    return features


def _strings(value: Any, n: int, where: str) -> list[str]:
    items = list(np.asarray(value, dtype=object).reshape(-1))
    if len(items) != n:
        raise DataError(f"{where} has {len(items)} entries, expected {n}")
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in items]


def _clip_lengths(lengths: np.ndarray, steps: int, where: str) -> np.ndarray:
    if not np.all(np.isfinite(lengths)):
        raise DataError(f"{where}: {int((~np.isfinite(lengths)).sum())} lengths are not finite numbers")
    lengths = np.rint(lengths).astype(np.int64)
    bad = int(((lengths < 1) | (lengths > steps)).sum())
    if bad:
        log.warning("%s: clipped %d lengths into [1, %d]", where, bad, steps)
    return np.clip(lengths, 1, steps)


# ----------------------------------------------------------------------------- reading


def check_meta(meta: Any, path: Path) -> dict:
    """The optional "msakit" metadata block, checked entry by entry (DataError naming it)."""
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise DataError(f"{path}: {META_KEY!r} entry must be a dict")
    where = f"{path}: {META_KEY}"
    if meta.get("task", "regression") not in ("regression", "classification"):
        raise DataError(f"{where}.task must be 'regression' or 'classification'")
    if meta.get("name") is not None and not isinstance(meta["name"], str):
        raise DataError(f"{where}.name must be a string")
    k = meta.get("num_classes")
    if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= 100_000):
        raise DataError(f"{where}.num_classes must be an integer in [1, 100000], got {str(k)[:40]!r}")
    for key in ("class_names", "notes"):
        value = meta.get(key)
        if value is not None and (
            not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)
        ):
            raise DataError(f"{where}.{key} must be a list of strings")
    return meta


@dataclass
class _Split:
    arrays: SplitArrays
    units: Units
    sims: bool


def _read_split(raw: Any, path: Path, split: str, task: str) -> _Split:
    """One split dict -> its arrays (lengths still to be set by `read_mmsa`) and padding units."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: split {split!r} is a {type(raw).__name__}, expected a dict")
    label_key = "classification_labels" if task == "classification" else "regression_labels"
    for key in (*MODALITIES, label_key):
        if key not in raw:
            raise DataError(f"{path}: {split}.{key} is missing")

    where = f"{path}: {split}.{label_key}"
    labels = to_float_array(raw[label_key], where)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where} has shape {labels.shape}, expected [N]")
    n = labels.shape[0]
    if task == "classification":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DataError(f"{where} must hold integer class indices")
        labels = labels.astype(np.int64)

    features = sequence_features(raw, f"{path}: {split}", n, f"{split}.{label_key}")
    stored_lengths = {}  # audio/vision_lengths as stored, [N], before any clipping
    for m, key in (("audio", "audio_lengths"), ("vision", "vision_lengths")):
        if key in raw:
            stored_lengths[m] = to_float_array(raw[key], f"{path}: {split}.{key}").reshape(-1)
            if stored_lengths[m].shape[0] != n:
                raise DataError(f"{path}: {split}.{key} has {stored_lengths[m].shape[0]} entries, expected {n}")
    rows = {m: real_frames(features[m]) for m in stored_lengths}  # [N, L] real frames, read once
    check_time_axis(features, stored_lengths, f"{path}: {split}", rows)

    # padding units: text with the modalities that share its frames (aligned files), the others
    steps_t = features["text"].shape[1]
    followers = [m for m in ("audio", "vision")
                 if f"{m}_lengths" not in raw and features[m].shape[1] == steps_t]
    text_unit = ("text", *followers)
    if "text_bert" in raw:
        bert = np.asarray(raw["text_bert"])
        if bert.ndim != 3 or bert.shape[0] != n or bert.shape[1] != 3 or bert.shape[2] != steps_t:
            raise DataError(
                f"{path}: {split}.text_bert has shape {bert.shape}, expected [{n}, 3, {steps_t}]"
            )
        mask = to_float_array(bert[:, 1, :], f"{path}: {split}.text_bert") > 0
        empty = int((~mask.any(axis=1)).sum())
        if n and empty > n // 2:
            raise DataError(f"{path}: {split}.text_bert: the attention mask (row 1 of [N, 3, L]: token "
                            f"ids, mask, segment ids) is empty for {empty} of {n} samples")
        stored = _clip_lengths(mask.sum(axis=1), steps_t, f"{path}: {split}.text")
        aligned = [features[m] for m in text_unit]
        text = Sequences(aligned, mask, stored, "text_bert's mask (row 1)", real_frames(*aligned))
    else:
        aligned = [features[m] for m in text_unit]
        text = Sequences(aligned, real_frames(*aligned))
    units = {"+".join(text_unit): (text_unit, text)}
    for m in ("audio", "vision"):
        if m in followers:
            continue
        key, stored = f"{m}_lengths", stored_lengths.get(m)
        if stored is not None:
            stored = _clip_lengths(stored, features[m].shape[1], f"{path}: {split}.{m}")
        real = rows[m] if m in rows else real_frames(features[m])
        units[m] = ((m,), Sequences([features[m]], real, stored, key))

    ids = (
        _strings(raw["id"], n, f"{path}: {split}.id")
        if "id" in raw
        else [f"{split}_{i}" for i in range(n)]
    )
    texts = _strings(raw["raw_text"], n, f"{path}: {split}.raw_text") if "raw_text" in raw else None
    arrays = SplitArrays(features=features, lengths={}, labels=labels, ids=ids, texts=texts)
    return _Split(arrays, units, any(key in raw for key in SIMS_KEYS))


def read_mmsa(
    path: str | os.PathLike, name: str | None = None, padding: str = "auto"
) -> MultimodalData:
    """Read an MMSA pickle into validated `MultimodalData` (see the module docstring).

    name: dataset name; default the "msakit" metadata's name, else the file stem.
    padding: "auto" (find the padding side in the data), "start" or "end" (see
    `msakit.data.padding`); start-padded sequences are stored with their real frames first and
    the side found is one of the notes.
    CH-SIMS files (with regression_labels_T/A/V) get metric_family "sims" and label_range
    (-1, 1); others "mosi" and (-3, 3). Raises DataError naming file, split and key.
    """
    path = Path(path)
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected a dict of splits")
    meta = check_meta(data.get(META_KEY), path)
    task = meta.get("task", "regression")

    parts: dict[str, _Split] = {}
    for split in SPLITS:
        if split not in data:
            raise DataError(f"{path}: split {split!r} is missing (found: {sorted(map(str, data))})")
        parts[split] = _read_split(data[split], path, split, task)
    splits = {split: part.arrays for split, part in parts.items()}
    units = {split: part.units for split, part in parts.items()}
    notes = [normalise_padding(splits, units, padding, str(path))]
    clips = {split: [mmsa_video(i) for i in arrays.ids] for split, arrays in splits.items()}
    notes.append(group_by_video(splits, clips, "MMSA ids 'video$_$clip'"))
    sims = any(part.sims for part in parts.values())

    train = splits["train"]
    feature_dims = {m: int(train.features[m].shape[2]) for m in MODALITIES}
    max_lengths = {m: max(int(s.features[m].shape[1]) for s in splits.values()) for m in MODALITIES}
    name = name or str(meta.get("name") or path.stem)
    if task == "classification":
        top = max((int(s.labels.max()) for s in splits.values() if len(s)), default=0)
        num_classes = int(meta.get("num_classes") or top + 1)
        class_names = tuple(meta.get("class_names") or (f"class_{k}" for k in range(num_classes)))
        info = DatasetInfo(
            name=name,
            task="classification",
            feature_dims=feature_dims,
            max_lengths=max_lengths,
            metric_family="multiclass",
            num_classes=num_classes,
            class_names=class_names,
        )
    else:
        info = DatasetInfo(
            name=name,
            task="regression",
            feature_dims=feature_dims,
            max_lengths=max_lengths,
            metric_family="sims" if sims else "mosi",
            label_range=(-1.0, 1.0) if sims else (-3.0, 3.0),
        )
    if task == "regression":
        notes += _label_doubts(np.concatenate([s.labels for s in splits.values()]), sims, path)
    if isinstance(meta.get("extraction"), dict):
        info = dataclasses.replace(info, extraction=meta["extraction"])
    notes += [str(note) for note in meta.get("notes", [])]
    return validate(MultimodalData(info=info, splits=splits, source=str(path), notes=notes))


def _label_doubts(labels: np.ndarray, sims: bool, path: Path) -> list[str]:
    """Warnings (logged, and returned as notes) for regression labels that look like something
    else: a few whole numbers >= 0 (class indices), or all inside [-1, 1] in a file without
    CH-SIMS's unimodal labels (CH-SIMS read with MOSI's metrics on [-3, 3])."""
    doubts = []
    values = np.unique(labels)
    if len(values) < 2:  # one value (`msakit extract` without labels writes 0.0): nothing to doubt
        return doubts
    if len(values) <= 10 and values.min() >= 0 and np.all(values == np.round(values)):
        doubts.append(f"{path}: regression_labels hold only the whole numbers {values.astype(int).tolist()}: "
                      "class indices? (a classification file sets msakit.task and classification_labels)")
    if not sims and labels.min() >= -1 and labels.max() <= 1:
        doubts.append(f"{path}: every label lies in [-1, 1] but the file has no regression_labels_T/A/V: "
                      "CH-SIMS data would be read with MOSI's metrics and label range [-3, 3]")
    for doubt in doubts:
        log.warning("%s", doubt)
    return doubts


# ----------------------------------------------------------------------------- writing


def split_to_mmsa(arrays: SplitArrays) -> dict[str, np.ndarray]:
    """SplitArrays -> one MMSA split dict. Text lengths go into text_bert's mask row (token and
    segment ids zero), audio/vision lengths into *_lengths; integer labels are written as
    `classification_labels`, float labels as `regression_labels`."""
    n = len(arrays)
    text = arrays.features["text"]
    mask = np.arange(text.shape[1])[None, :] < arrays.lengths["text"][:, None]
    text_bert = np.zeros((n, 3, text.shape[1]), dtype=np.float32)
    text_bert[:, 1, :] = mask
    out: dict[str, np.ndarray] = {
        "id": np.array(arrays.ids, dtype=object),
        "raw_text": np.array(arrays.texts if arrays.texts is not None else [""] * n, dtype=object),
        "text": text.astype(np.float32),
        "text_bert": text_bert,
        "audio": arrays.features["audio"].astype(np.float32),
        "vision": arrays.features["vision"].astype(np.float32),
        "audio_lengths": arrays.lengths["audio"].astype(np.int64),
        "vision_lengths": arrays.lengths["vision"].astype(np.int64),
    }
    if np.issubdtype(arrays.labels.dtype, np.integer):
        out["classification_labels"] = arrays.labels.astype(np.int64)
    else:
        out["regression_labels"] = arrays.labels.astype(np.float32)
    return out


def write_mmsa(
    path: str | os.PathLike,
    splits: dict[str, dict[str, Any] | SplitArrays],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write an MMSA pickle atomically. splits: split name -> MMSA split dict (written as is)
    or SplitArrays (converted by `split_to_mmsa`). meta: optional "msakit" metadata (see the
    module docstring). Returns the path."""
    data: dict[str, Any] = {
        split: split_to_mmsa(value) if isinstance(value, SplitArrays) else dict(value)
        for split, value in splits.items()
    }
    if meta:
        data[META_KEY] = dict(meta)
    return save_pickle(data, path)


def mmsa_video(sample_id: str) -> tuple[str, str] | None:
    """(video, clip) of an MMSA id "video$_$clip"; None when the id has no separator."""
    video, sep, clip = sample_id.rpartition(VIDEO_SEPARATOR)
    return (video, clip) if sep and video else None


@register_dataset("mmsa")
def load_mmsa(cfg: DataConfig) -> MultimodalData:
    """MMSA feature pickle (aligned_50.pkl / unaligned_50.pkl; MOSI, MOSEI, CH-SIMS): data_path."""
    if not cfg.data_path:
        raise DataError(
            "mmsa: data.data_path is not set; point it at an MMSA pickle "
            "(--data-path /data/MOSI/aligned_50.pkl, or data.data_path in a config)"
        )
    return read_mmsa(cfg.data_path, padding=cfg.padding)
