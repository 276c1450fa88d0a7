"""MulT feature pickles (yaohungt/Multimodal-Transformer: `mosi_data.pkl`, `iemocap_data.pkl`, ...).

File layout: a dict with "train", "valid", "test", each a dict of arrays (N samples, word-aligned
so all three modalities share the length L):
    text    [N, L, 300] float (GloVe)
    audio   [N, L, 74]  float (COVAREP)
    vision  [N, L, 35]  float (Facet)
    labels  [N, 1, 1] float sentiment in [-3, 3] (also accepted: [N] or [N, 1]),
            or IEMOCAP [N, 4, 2]: one-hot per emotion, emotions in the order of EMOTIONS
    id      [N] or [N, k] (optional; k columns are joined with "_")

IEMOCAP files become task "multi_binary" (labels [N, 4] int = argmax over the one-hot axis,
1 = the emotion is present), num_classes 2, num_tasks 4, metric_family "iemocap". Regression
files become "mosi" with label_range (-3, 3).
Lengths: index of the last frame that is not all-zero in ANY of the three modalities, plus one
(min 1), shared by the three modalities (`mmsa.lengths_from_padding`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msakit.batch import MODALITIES
from msakit.data import register_dataset
from msakit.data.base import SPLITS, DataError, DatasetInfo, MultimodalData, SplitArrays, validate
from msakit.data.mmsa import lengths_from_padding, sequence_features, to_float_array
from msakit.data.safe_pickle import load_pickle, save_pickle

if TYPE_CHECKING:
    from msakit.config import DataConfig

log = logging.getLogger(__name__)

EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")

__all__ = ["EMOTIONS", "load_mult", "read_mult", "write_mult"]


def _ids(raw: dict, n: int, path: Path, split: str) -> list[str]:
    if "id" not in raw:
        return [f"{split}_{i}" for i in range(n)]
    ids = np.asarray(raw["id"], dtype=object)
    if ids.shape[:1] != (n,):
        raise DataError(f"{path}: {split}.id has shape {ids.shape}, expected [{n}, ...]")

    def text(x: Any) -> str:
        return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)

    return ["_".join(text(v) for v in np.ravel(row)) for row in ids]


def _labels(raw: dict, path: Path, split: str) -> tuple[np.ndarray, bool]:
    """-> (labels, is_iemocap): [N] float32, or [N, 4] int64 for IEMOCAP."""
    where = f"{path}: {split}.labels"
    labels = to_float_array(raw["labels"], where)
    if labels.ndim == 3 and labels.shape[1:] == (len(EMOTIONS), 2):
        not_one_hot = int((~np.isclose(labels.sum(axis=2), 1.0)).sum())
        if not_one_hot or np.any((labels != 0) & (labels != 1)):
            log.warning(
                "%s: %d emotion entries are not one-hot; using the argmax", where, not_one_hot
            )
        return labels.argmax(axis=2).astype(np.int64), True
    if labels.ndim >= 1 and labels.size == labels.shape[0]:
        return labels.reshape(-1), False
    raise DataError(
        f"{where} has shape {labels.shape}, expected [N, 1, 1] (regression) "
        f"or [N, {len(EMOTIONS)}, 2] (IEMOCAP one-hot)"
    )


def _read_split(raw: Any, path: Path, split: str) -> tuple[SplitArrays, bool]:
    if not isinstance(raw, dict):
        raise DataError(f"{path}: split {split!r} is a {type(raw).__name__}, expected a dict")
    for key in (*MODALITIES, "labels"):
        if key not in raw:
            raise DataError(f"{path}: {split}.{key} is missing")
    labels, iemocap = _labels(raw, path, split)
    n = labels.shape[0]
    features = sequence_features(raw, f"{path}: {split}", n, f"{split}.labels")
    steps = {features[m].shape[1] for m in MODALITIES}
    if len(steps) != 1:
        raise DataError(
            f"{path}: {split}: MulT data is word-aligned but the sequence lengths differ "
            f"(text/audio/vision: {[features[m].shape[1] for m in MODALITIES]})"
        )
    shared = lengths_from_padding(*(features[m] for m in MODALITIES))
    lengths = {m: shared.copy() for m in MODALITIES}
    arrays = SplitArrays(
        features=features, lengths=lengths, labels=labels, ids=_ids(raw, n, path, split)
    )
    return arrays, iemocap


def read_mult(path: str | os.PathLike, name: str | None = None) -> MultimodalData:
    """Read a MulT pickle into validated `MultimodalData` (see the module docstring).

    name: dataset name; default the file stem without "_data" ("iemocap_data.pkl" -> "iemocap").
    """
    path = Path(path)
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected a dict of splits")
    splits: dict[str, SplitArrays] = {}
    kinds = set()
    for split in SPLITS:
        if split not in data:
            raise DataError(f"{path}: split {split!r} is missing (found: {sorted(map(str, data))})")
        splits[split], iemocap = _read_split(data[split], path, split)
        kinds.add(iemocap)
    if len(kinds) != 1:
        raise DataError(f"{path}: some splits have IEMOCAP [N, 4, 2] labels and some do not")
    iemocap = kinds.pop()
    train = splits["train"]
    common = {
        "name": name or path.stem.removesuffix("_data"),
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
    return validate(MultimodalData(info=info, splits=splits, source=str(path)))


def write_mult(path: str | os.PathLike, splits: dict[str, dict[str, Any]]) -> Path:
    """Write a MulT-layout pickle atomically. splits: split name -> dict with text, audio,
    vision [N, L, D], labels ([N, 1, 1] or [N, 4, 2]) and optionally id. Returns the path."""
    return save_pickle({split: dict(value) for split, value in splits.items()}, path)


@register_dataset("mult")
def load_mult(cfg: DataConfig) -> MultimodalData:
    """MulT feature pickle (mosi_data.pkl, iemocap_data.pkl; word-aligned) at data.data_path."""
    if not cfg.data_path:
        raise DataError(
            "mult: data.data_path is not set; point it at a MulT pickle "
            "(e.g. data.data_path=/data/iemocap_data.pkl)"
        )
    return read_mult(cfg.data_path)
