"""MIntRec (Zhang et al., ACM MM 2022): multimodal intent recognition, 20 intent classes.

Files, under data_root:
    mintrec/{train,dev,test}.tsv   tab-separated, header `season episode clip text label`;
                                   the official split (dev = our "valid")
    mintrec/video_feats.pkl        OPTIONAL, the release's video features: dict clip id ->
                                   array [T, 256] (the release stores [T, 1, 256]; singleton
                                   axes are squeezed)
    mintrec/audio_feats.pkl        OPTIONAL, the release's audio features: dict clip id ->
                                   array [T, 768] (wav2vec 2.0)
    mintrec/text_feats.pkl         OPTIONAL, [ours] precomputed text features in the same layout
                                   (dict clip id -> [T, D_t]); the release has none (it runs BERT
                                   on the transcripts)
The clip id is `<season>_<episode>_<clip>` (e.g. "S05_E16_329"), as the release keys its pickles.
Pickles are read with the restricted unpickler (`msakit.data.safe_pickle.load_pickle`).

What the loader gives:
- labels [N] int64: the index of the intent in `CLASS_NAMES`, which is the MIntRec release's
  label order (thuiar/MIntRec, `benchmarks['MIntRec']['intent_labels']`), not sorted.
- texts: the raw transcripts (SplitArrays.texts -> Batch.texts).
- text tensor: WITHOUT `text_feats.pkl` it is a dummy zero frame [N, 1, 1] (feature dim 1,
  length 1). It carries no information: models must read `Batch.texts` through a text encoder
  (`msakit.modules.text_encoder`; e.g. model `text_bert`, or `dbr` with a text encoder).
- audio / vision: the release's feature sequences when the pickles are present, truncated to the
  release's maximum lengths (audio 480, video 230 frames) and zero-padded per split; otherwise a
  single zero frame each ([N, 1, 1]): the data is then TEXT-ONLY and `notes` says so. A pickle
  that lacks a clip of the TSVs is an error (DataError naming the pickle and the clip).
- features are used as released (no standardisation), as the MIntRec baselines do.
- metric family "multiclass": accuracy, macro F1/precision/recall, weighted F1; checkpoints are
  selected on dev macro F1.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msakit.batch import MODALITIES
from msakit.data import register_dataset
from msakit.data.base import DataError, DatasetInfo, MultimodalData, SplitArrays, validate
from msakit.data.safe_pickle import load_pickle

if TYPE_CHECKING:
    from msakit.config import DataConfig

log = logging.getLogger(__name__)

NAME = "mintrec"
CLASS_NAMES: tuple[str, ...] = (
    "Complain", "Praise", "Apologise", "Thank", "Criticize",
    "Agree", "Taunt", "Flaunt", "Joke", "Oppose",
    "Comfort", "Care", "Inform", "Advise", "Arrange",
    "Introduce", "Leave", "Prevent", "Greet", "Ask for help",
)
"""The 20 intents in the MIntRec release's order (label index = position)."""
COLUMNS = ("season", "episode", "clip", "text", "label")
SPLIT_FILES = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}
EXPECTED_SIZES = {"train": 1334, "valid": 445, "test": 445}
FEATURE_FILES = {"text": "text_feats.pkl", "audio": "audio_feats.pkl", "vision": "video_feats.pkl"}
RELEASE_DIMS = {"audio": 768, "vision": 256}
MAX_FRAMES = {"text": 0, "audio": 480, "vision": 230}
"""Truncation per modality (the release's max_seq_lengths); 0 = no truncation."""

__all__ = ["CLASS_NAMES", "NAME", "clip_id", "load_mintrec", "read_mintrec", "read_tsv"]


def clip_id(season: str, episode: str, clip: str) -> str:
    """The release's clip key: "S05", "E16", "329" -> "S05_E16_329"."""
    return f"{season}_{episode}_{clip}"


def read_tsv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """One split file -> (clip ids, transcripts, labels [N] int64). DataError names the file
    (and the line) for a missing file, a wrong header, a wrong column count, an empty field or
    an unknown intent."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    index = {name: k for k, name in enumerate(CLASS_NAMES)}
    ids, texts, labels = [], [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable TSV ({e})") from e
    if not rows or tuple(c.strip().lower() for c in rows[0]) != COLUMNS:
        found = rows[0] if rows else "nothing"
        raise DataError(f"{path}: header must be {' '.join(COLUMNS)} (tab-separated), found {found}")
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise DataError(f"{path}: line {line} has {len(row)} columns, expected {len(COLUMNS)}")
        season, episode, clip, text, label = (c.strip() for c in row)
        if not (season and episode and clip):
            raise DataError(f"{path}: line {line}: empty season/episode/clip")
        if label not in index:
            raise DataError(f"{path}: line {line}: unknown intent {label!r} (known: {', '.join(CLASS_NAMES)})")
        ids.append(clip_id(season, episode, clip))
        texts.append(text)
        labels.append(index[label])
    if not ids:
        raise DataError(f"{path}: no rows")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: a clip appears twice")
    return ids, texts, np.asarray(labels, dtype=np.int64)


def _feature_table(path: Path) -> dict:
    table = load_pickle(path)
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected a dict clip id -> array [T, D], got {type(table).__name__}")
    return table


def _as_frames(value, path: Path, key: str) -> np.ndarray:
    """One clip's features -> [T, D] float32 (singleton axes of the release squeezed)."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: clip {key}: not a numeric array ({e})") from e
    if array.ndim > 2:
        keep = [a for a in range(array.ndim - 1) if array.shape[a] != 1]
        array = array.reshape([array.shape[a] for a in keep] + [array.shape[-1]])
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] < 1:
        raise DataError(f"{path}: clip {key}: expected frames [T, D], got shape {np.shape(value)}")
    return array


def _pad(sequences: list[np.ndarray], max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """List of [T_i, D] -> ([N, L, D] zero-padded, lengths [N]); truncated to max_frames if > 0."""
    if max_frames:
        sequences = [s[:max_frames] for s in sequences]
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    out = np.zeros((len(sequences), int(lengths.max()), sequences[0].shape[1]), dtype=np.float32)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out, lengths


def _split_features(table: dict, path: Path, ids: list[str], modality: str) -> tuple[np.ndarray, np.ndarray]:
    frames = []
    for key in ids:
        if key not in table:
            raise DataError(f"{path}: no features for clip {key} (keys look like {next(iter(table), None)!r})")
        frames.append(_as_frames(table[key], path, key))
    dims = {f.shape[1] for f in frames}
    if len(dims) != 1:
        raise DataError(f"{path}: clips have different feature sizes {sorted(dims)}")
    return _pad(frames, MAX_FRAMES[modality])


def read_mintrec(data_root: str | Path) -> MultimodalData:
    """Load MIntRec from `data_root`/mintrec (see the module docstring); returns validated data."""
    folder = Path(data_root) / NAME
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (data_root {data_root} has no {NAME}/)")
    parts = {split: read_tsv(folder / name) for split, name in SPLIT_FILES.items()}
    seen: dict[str, str] = {}
    for split, (ids, _, _) in parts.items():
        for key in ids:
            if key in seen:
                raise DataError(f"{folder}: clip {key} is in both {seen[key]} and {split}")
            seen[key] = split
    sizes = {split: len(p[0]) for split, p in parts.items()}
    if sizes != EXPECTED_SIZES:
        log.warning("%s: split sizes %s differ from the release's %s", folder, sizes, EXPECTED_SIZES)

    features = {split: {} for split in parts}
    lengths = {split: {} for split in parts}
    present = []
    for m in MODALITIES:
        path = folder / FEATURE_FILES[m]
        if path.is_file():
            table = _feature_table(path)
            for split, (ids, _, _) in parts.items():
                features[split][m], lengths[split][m] = _split_features(table, path, ids, m)
            present.append(m)
            dims = {features[s][m].shape[2] for s in parts}
            if len(dims) != 1:
                raise DataError(f"{path}: feature sizes differ between splits {sorted(dims)}")
            if m in RELEASE_DIMS and dims != {RELEASE_DIMS[m]}:
                log.warning("%s: feature size %s, the release's is %d", path, dims, RELEASE_DIMS[m])
        else:  # a single zero frame: no information, keeps every model's shapes valid
            for split, (ids, _, _) in parts.items():
                features[split][m] = np.zeros((len(ids), 1, 1), dtype=np.float32)
                lengths[split][m] = np.ones(len(ids), dtype=np.int64)

    splits = {
        split: SplitArrays(
            features=features[split], lengths=lengths[split], labels=labels, ids=ids, texts=texts
        )
        for split, (ids, texts, labels) in parts.items()
    }
    info = DatasetInfo(
        name=NAME,
        task="classification",
        feature_dims={m: int(splits["train"].features[m].shape[2]) for m in MODALITIES},
        max_lengths={m: max(int(a.features[m].shape[1]) for a in splits.values()) for m in MODALITIES},
        metric_family="multiclass",
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
    )
    notes = [f"MIntRec official split (dev = valid); sizes {sizes}; labels in the release's order"]
    if "text" not in present:
        notes.append(
            "text: no text_feats.pkl, the text tensor is a dummy zero frame [N, 1, 1]; "
            "models must read the raw transcripts (Batch.texts) through a text encoder"
        )
    absent = [m for m in ("audio", "vision") if m not in present]
    if absent:
        notes.append(
            f"{' and '.join(absent)}: no {' / '.join(FEATURE_FILES[m] for m in absent)} in {folder}; "
            "a single zero frame each ("
            + ("TEXT-ONLY data" if len(absent) == 2 else "that modality carries no information")
            + ")"
        )
    present_av = [m for m in ("audio", "vision") if m in present]
    if present_av:
        notes.append(
            "features from the release pickles: "
            + ", ".join(f"{m} {FEATURE_FILES[m]} (truncated to {MAX_FRAMES[m]} frames)" for m in present_av)
        )
    return validate(MultimodalData(info=info, splits=splits, source=str(folder), notes=notes))


@register_dataset(NAME)
def load_mintrec(cfg: DataConfig) -> MultimodalData:
    """MIntRec intent recognition (20 classes, official split); text + optional release features."""
    if not cfg.data_root:
        raise DataError(
            f"{NAME}: no data folder given: pass --data-root or set MSAKIT_DATA to the folder "
            "holding mintrec/"
        )
    return read_mintrec(cfg.data_root)
