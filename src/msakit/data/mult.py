"""MulT feature pickles (yaohungt/Multimodal-Transformer: `mosi_data.pkl`, `iemocap_data.pkl`,
and the unaligned `*_data_noalign.pkl`).

File layout: a dict with "train", "valid", "test", each a dict of arrays (N samples):
    text    [N, L_t, 300] float (GloVe)
    audio   [N, L_a, 74]  float (COVAREP; -inf occurs and is zeroed with a logged count)
    vision  [N, L_v, 35]  float (Facet)
    labels  [N, 1, 1] float sentiment in [-3, 3] (also accepted: [N] or [N, 1]),
            or IEMOCAP [N, 4, 2]: one-hot per emotion ([1, 0] absent, [0, 1] present), emotions
            in the order of EMOTIONS; NaN or any other row is an error
    id      [N] or [N, k], str or bytes (optional; k columns are joined with "_"); with k >= 2 the
            first column is the video and the second the clip (start time or number)
Word-aligned files (`*_data.pkl`) have one length L for the three modalities; unaligned ones
(`*_data_noalign.pkl`) one per modality (MulT's own pickles: text 50, audio 375/500,
vision 500), told apart by the shapes (an unaligned file whose three lengths are equal is read
as word-aligned: a face or voice missing at the first words of word-aligned data looks the same
as sequences of different lengths, so the data cannot tell them apart).

IEMOCAP files become task "multi_binary" (labels [N, 4] int, 1 = the emotion is present),
num_classes 2, num_tasks 4, metric_family "iemocap". Regression files become "mosi" with
label_range (-3, 3).
Lengths: MulT stores none and its released pickles pad at the START. The side is found in the
data (`data.padding=auto`, see msakit/data/padding.py; word-aligned modalities together, a frame
is real if any modality's frame is not all-zero), start padding is moved to the end, and the
length is counted from the first real frame to the end (start) or from the start to the last
real frame (end), so zero frames inside the real part stay real. The side found is a run note.
An array that looks stored [N, D, L] (time last: its zero padding runs along the last axis,
following another modality's lengths) is refused (`padding.check_time_axis`).
Video context: [N, k >= 2] ids give each split's `groups` (a video's clips in clip order).
"""

from __future__ import annotations

import logging
import os
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
from msakit.data.mmsa import mmsa_video, sequence_features, to_float_array
from msakit.data.padding import Sequences, Units, check_time_axis, normalise_padding, real_frames
from msakit.data.safe_pickle import load_pickle, save_pickle

if TYPE_CHECKING:
    from msakit.config import DataConfig

log = logging.getLogger(__name__)

EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")

__all__ = ["EMOTIONS", "load_mult", "read_mult", "write_mult"]


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _ids(raw: dict, n: int, path: Path, split: str) -> tuple[list[str], list[tuple[str, str] | None]]:
    """-> (ids, (video, clip) per row or None): [N, k >= 2] ids name video and clip, [N] ids
    "video$_$clip" too; others no video."""
    if "id" not in raw:
        return [f"{split}_{i}" for i in range(n)], [None] * n
    ids = np.asarray(raw["id"], dtype=object)
    if ids.shape[:1] != (n,):
        raise DataError(f"{path}: {split}.id has shape {ids.shape}, expected [{n}, ...]")
    rows = [[_text(v) for v in np.ravel(row)] for row in ids]
    names = ["_".join(row) for row in rows]
    if ids.ndim == 2 and ids.shape[1] >= 2:
        return names, [(row[0], row[1]) for row in rows]
    return names, [mmsa_video(name) for name in names]


def _labels(raw: dict, path: Path, split: str) -> tuple[np.ndarray, bool]:
    """-> (labels, is_iemocap): [N] float32, or [N, 4] int64 for IEMOCAP."""
    where = f"{path}: {split}.labels"
    labels = to_float_array(raw["labels"], where)
    if labels.ndim == 3 and labels.shape[1:] == (len(EMOTIONS), 2):
        one_hot = ((labels == 0) | (labels == 1)).all(axis=2) & (labels.sum(axis=2) == 1)
        if not one_hot.all():
            i, e = np.argwhere(~one_hot)[0]
            raise DataError(
                f"{where}: {int((~one_hot).sum())} emotion entries are not one-hot (first: sample "
                f"{i}, {EMOTIONS[e]}: {labels[i, e].tolist()}); expected [1, 0] (absent) or [0, 1] "
                "(present)"
            )
        return labels.argmax(axis=2).astype(np.int64), True
    if labels.ndim >= 1 and labels.size == labels.shape[0]:
        return labels.reshape(-1), False
    raise DataError(
        f"{where} has shape {labels.shape}, expected [N, 1, 1] (regression) "
        f"or [N, {len(EMOTIONS)}, 2] (IEMOCAP one-hot)"
    )


def _read_split(
    raw: Any, path: Path, split: str
) -> tuple[SplitArrays, Units, list[tuple[str, str] | None], bool]:
    """One split -> (arrays without lengths, padding units, (video, clip) per row, is IEMOCAP)."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: split {split!r} is a {type(raw).__name__}, expected a dict")
    for key in (*MODALITIES, "labels"):
        if key not in raw:
            raise DataError(f"{path}: {split}.{key} is missing")
    labels, iemocap = _labels(raw, path, split)
    n = labels.shape[0]
    features = sequence_features(raw, f"{path}: {split}", n, f"{split}.labels")
    check_time_axis(features, {}, f"{path}: {split}")
    if len({features[m].shape[1] for m in MODALITIES}) == 1:  # word-aligned: one shared length
        aligned = [features[m] for m in MODALITIES]
        units = {"+".join(MODALITIES): (MODALITIES, Sequences(aligned, real_frames(*aligned)))}
    else:
        units = {m: ((m,), Sequences([features[m]], real_frames(features[m]))) for m in MODALITIES}
    ids, clips = _ids(raw, n, path, split)
    arrays = SplitArrays(features=features, lengths={}, labels=labels, ids=ids)
    return arrays, units, clips, iemocap


def read_mult(
    path: str | os.PathLike, name: str | None = None, padding: str = "auto"
) -> MultimodalData:
    """Read a MulT pickle (aligned or unaligned) into validated `MultimodalData` (see the module
    docstring).

    name: dataset name; default the file stem without "_data" ("iemocap_data.pkl" -> "iemocap",
    "mosi_data_noalign.pkl" -> "mosi_noalign").
    padding: "auto", "start" or "end" (msakit/data/padding.py). Raises DataError naming the file.
    """
    path = Path(path)
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected a dict of splits")
    splits: dict[str, SplitArrays] = {}
    units: dict[str, Units] = {}
    clips: dict[str, list] = {}
    kinds = set()
    for split in SPLITS:
        if split not in data:
            raise DataError(f"{path}: split {split!r} is missing (found: {sorted(map(str, data))})")
        splits[split], units[split], clips[split], iemocap = _read_split(data[split], path, split)
        kinds.add(iemocap)
    if len(kinds) != 1:
        raise DataError(f"{path}: some splits have IEMOCAP [N, 4, 2] labels and some do not")
    notes = [normalise_padding(splits, units, padding, str(path))]
    notes.append(group_by_video(splits, clips, "MulT ids [video, clip, ...]"))
    iemocap = kinds.pop()
    train = splits["train"]
    common = {
        "name": name or path.stem.replace("_data", ""),
        "feature_dims": {m: int(train.features[m].shape[2]) for m in MODALITIES},
        "max_lengths": {
            m: max(int(s.features[m].shape[1]) for s in splits.values()) for m in MODALITIES
        },
    }
    if iemocap:
        info = DatasetInfo(
            **common,
            task="multi_binary",
            metric_family="iemocap",
            num_classes=2,
            num_tasks=len(EMOTIONS),
            class_names=EMOTIONS,
        )
    else:
        info = DatasetInfo(
            **common, task="regression", metric_family="mosi", label_range=(-3.0, 3.0)
        )
    return validate(MultimodalData(info=info, splits=splits, source=str(path), notes=notes))


def write_mult(path: str | os.PathLike, splits: dict[str, dict[str, Any]]) -> Path:
    """Write a MulT-layout pickle atomically. splits: split name -> dict with text, audio,
    vision [N, L, D], labels ([N, 1, 1] or [N, 4, 2]) and optionally id. Returns the path."""
    return save_pickle({split: dict(value) for split, value in splits.items()}, path)


@register_dataset("mult")
def load_mult(cfg: DataConfig) -> MultimodalData:
    """MulT feature pickle (mosi_data.pkl, iemocap_data.pkl, *_data_noalign.pkl) at data.data_path."""
    if not cfg.data_path:
        raise DataError(
            "mult: data.data_path is not set; point it at a MulT pickle "
            "(--data-path /data/iemocap_data.pkl, or data.data_path in a config)"
        )
    return read_mult(cfg.data_path, padding=cfg.padding)
