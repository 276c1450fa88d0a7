"""Real CMU-MOSI utterance features of Poria et al. (ACL 2017) with continuous labels.

Files (see ../shared/data/README.md), under data_root:
    mosi-poria/transcripts.csv             no header: clip_id, transcript, <number>, binary label
    mosi-poria/text_{train,test}.csv       no header: row index into transcripts.csv (float
                                           string), then 100 text-CNN features
    mosi-poria/audio/audio_{train,test}0.csv   no header: 73 openSMILE features, binary label
    mosi-poria/video/video_{train,test}0.csv   no header: 100 3D-CNN features, binary label
    mosi-labels/label.csv                  header id,text,label,mode: continuous label in [-3, 3]
Row k of the text, audio and video files of one split is the same utterance.

What the loader does:
- Poria's own train/test split (62/31 videos). NOT the CMU SDK split: the features were learned
  with supervision on Poria's training videos, which include most SDK test videos (leak).
- The validation split is carved out of Poria's TRAINING videos, by video: round(valid_fraction
  * 62) videos drawn with split_seed from the sorted video ids, so a video's clips never straddle
  two splits and the carve is the same for every training seed.
- The continuous label is joined by clip id; clips without one (4 in the shared copy) are dropped
  with a logged count. A label that is not a real number, or a clip listed twice with different
  labels, is a DataError naming the line. The binary label of the audio and video files must equal (label >= 0)
  for every kept clip (this checks the row alignment), else DataError.
- All three modalities are standardised with the mean/std of the (post-carve) train split only;
  features constant in that split (std < 1e-6) are only centred, never divided by a tiny std.
  Audio needs it (raw openSMILE values reach ~10^3); text and video are already roughly centred
  and standardising them too is harmless and keeps every feature on one scale.
- Each utterance is a sequence of length 1: features [N, 1, D], lengths 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from msakit.batch import MODALITIES
from msakit.data import register_dataset
from msakit.data.base import (
    DataError,
    DatasetInfo,
    MultimodalData,
    SplitArrays,
    clip_key,
    validate,
)

if TYPE_CHECKING:
    from msakit.config import DataConfig

log = logging.getLogger(__name__)

NAME = "mosi-poria"
EXPECTED_CLIPS = 2199
EXPECTED_VIDEOS = 93
EXPECTED_SPLIT_VIDEOS = {"train": 62, "test": 31}
STD_FLOOR = 1e-6

__all__ = ["NAME", "load_mosi_poria", "read_mosi_poria", "video_id"]


def video_id(clip_id: str) -> str:
    """Video of a clip id: the part before the last underscore ("abc_10" -> "abc")."""
    return clip_id.rsplit("_", 1)[0]


def _clip_order(clip_id: str) -> tuple:
    """Sort key: video, then clip number ("abc_10" after "abc_9")."""
    video, _, clip = clip_id.rpartition("_")
    return (video, *clip_key(clip))


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e


def _numeric(frame: pd.DataFrame, path: Path) -> np.ndarray:
    try:
        values = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: non-numeric values ({e})") from e
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: contains NaN/inf or empty cells")
    return values


def _continuous_labels(table: pd.DataFrame, path: Path) -> dict[str, float]:
    """clip id -> label from label.csv. A label that is not a real number (complex, text, empty)
    or a clip listed twice with different labels raises DataError naming the file, row and clip."""
    ids = table["id"].astype(str).str.strip().tolist()  # as the transcripts' ids
    values = pd.to_numeric(table["label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        k, raw = bad[0], table["label"].iloc[bad[0]]
        problem = "has no label" if pd.isna(raw) else f"label {str(raw)!r} is not a real number"
        raise DataError(f"{path}: line {k + 2} (clip {ids[k]}): {problem} ({len(bad)} such rows)")
    labels: dict[str, float] = {}
    for row, (clip, value) in enumerate(zip(ids, values, strict=True)):
        if labels.setdefault(clip, value) != value:
            raise DataError(f"{path}: clip {clip} is listed twice with different labels "
                            f"({labels[clip]:g} and {value:g}; second on line {row + 2})")
    return labels


def _read_poria_split(folder: Path, split: str, clip_ids: np.ndarray) -> dict:
    """One Poria file triple -> ids, text/audio/video features and the binary labels."""
    text_path = folder / f"text_{split}.csv"
    audio_path = folder / "audio" / f"audio_{split}0.csv"
    video_path = folder / "video" / f"video_{split}0.csv"
    text = _numeric(_read_csv(text_path, header=None), text_path)
    audio = _numeric(_read_csv(audio_path, header=None), audio_path)
    video = _numeric(_read_csv(video_path, header=None), video_path)
    counts = {
        p.name: len(a) for p, a in ((text_path, text), (audio_path, audio), (video_path, video))
    }
    if len(set(counts.values())) != 1:
        raise DataError(f"{folder}: {split} files have different row counts {counts}")
    rows = text[:, 0]
    if np.any(rows != np.round(rows)) or rows.min() < 0 or rows.max() >= len(clip_ids):
        raise DataError(
            f"{text_path}: column 0 must be row indices into transcripts.csv "
            f"(0..{len(clip_ids) - 1})"
        )
    rows = rows.astype(np.int64)
    binary = {}
    for path, array in ((audio_path, audio), (video_path, video)):
        labels = array[:, -1]
        if not np.all(np.isin(labels, (0, 1))):
            raise DataError(f"{path}: last column must be the binary label 0/1")
        binary[path] = labels.astype(np.int64)
    return {
        "rows": rows,
        "ids": clip_ids[rows],
        "text": text[:, 1:],
        "audio": audio[:, :-1],
        "vision": video[:, :-1],
        "binary": binary,
    }


def _standardise(splits: dict[str, SplitArrays]) -> None:
    """In place: (x - mean) / std with train-split statistics, every modality. A feature whose
    train std is below STD_FLOOR (constant in train) is only centred (divided by 1, sklearn
    StandardScaler's rule): dividing by the floor itself would blow a value that varies only
    outside train up to ~1e6 (one video feature is non-zero in a single training clip, which
    the validation carve can move out of train)."""
    for m in MODALITIES:
        train = splits["train"].features[m]
        mean = train.mean(axis=(0, 1), dtype=np.float64)
        std = train.std(axis=(0, 1), dtype=np.float64)
        std = np.where(std < STD_FLOOR, 1.0, std)
        for arrays in splits.values():
            arrays.features[m] = ((arrays.features[m] - mean) / std).astype(np.float32)


def read_mosi_poria(
    data_root: str | Path, valid_fraction: float = 0.15, split_seed: int = 0
) -> MultimodalData:
    """Load mosi-poria from `data_root` (holding mosi-poria/ and mosi-labels/).

    Returns validated MultimodalData: features [N, 1, D] (D: text 100, audio 73, vision 100),
    lengths all 1, labels [N] float32 in [-3, 3], ids "<video>_<clip>", texts the transcripts.
    """
    root = Path(data_root)
    folder = root / NAME
    labels_path = root / "mosi-labels" / "label.csv"
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (data_root {root} has no {NAME}/)")
    transcripts_path = folder / "transcripts.csv"
    transcripts = _read_csv(transcripts_path, header=None, dtype=str, keep_default_na=False)
    if transcripts.shape[1] < 2:
        raise DataError(f"{transcripts_path}: expected columns clip_id, transcript, ...")
    clip_ids = transcripts[0].str.strip().to_numpy(dtype=object)
    transcript_of = dict(zip(clip_ids, transcripts[1].to_numpy(dtype=object), strict=True))

    table = _read_csv(labels_path)
    if not {"id", "label"} <= set(table.columns):
        raise DataError(f"{labels_path}: needs columns id and label (found {list(table.columns)})")
    continuous = _continuous_labels(table, labels_path)

    parts = {split: _read_poria_split(folder, split, clip_ids) for split in ("train", "test")}

    # counts against the README (warn only: the checks below catch misaligned files)
    all_ids = np.concatenate([p["ids"] for p in parts.values()])
    videos = {split: {video_id(c) for c in p["ids"]} for split, p in parts.items()}
    if len(set(all_ids)) != len(all_ids):
        raise DataError(f"{folder}: a clip appears twice in the train/test files")
    if videos["train"] & videos["test"]:
        raise DataError(
            f"{folder}: videos in both train and test: "
            f"{sorted(videos['train'] & videos['test'])[:3]}"
        )
    found = (
        len(all_ids),
        len(videos["train"] | videos["test"]),
        len(videos["train"]),
        len(videos["test"]),
    )
    expected = (
        EXPECTED_CLIPS,
        EXPECTED_VIDEOS,
        EXPECTED_SPLIT_VIDEOS["train"],
        EXPECTED_SPLIT_VIDEOS["test"],
    )
    if found != expected:
        log.warning(
            "%s: found %d clips / %d videos (%d train, %d test), expected %d / %d (%d, %d)",
            folder,
            *found,
            *expected,
        )

    # join the continuous labels, drop clips without one, check the row alignment
    dropped = 0
    for p in parts.values():
        keep = np.array([c in continuous for c in p["ids"]], dtype=bool)
        dropped += int((~keep).sum())
        for key in ("rows", "ids", "text", "audio", "vision"):
            p[key] = p[key][keep]
        p["binary"] = {path: labels[keep] for path, labels in p["binary"].items()}
        p["labels"] = np.array([continuous[c] for c in p["ids"]], dtype=np.float32)
        for path, binary in p["binary"].items():
            wrong = np.flatnonzero(binary != (p["labels"] >= 0))
            if len(wrong):
                k = wrong[0]
                raise DataError(
                    f"{path}: binary label disagrees with label >= 0 of {labels_path.name} for "
                    f"{len(wrong)} clips (first: row {k}, clip {p['ids'][k]}): rows misaligned"
                )
    if dropped:
        log.warning(
            "%s: dropped %d clips without a continuous label in %s", folder, dropped, labels_path
        )

    # carve the validation split out of the training videos, by video
    train_videos = sorted(videos["train"])
    n_valid = min(max(1, round(valid_fraction * len(train_videos))), len(train_videos) - 1)
    rng = np.random.default_rng(split_seed)
    valid_videos = set(rng.choice(np.array(train_videos, dtype=object), n_valid, replace=False))
    in_valid = np.array([video_id(c) in valid_videos for c in parts["train"]["ids"]], dtype=bool)
    chosen = {"train": (parts["train"], ~in_valid), "valid": (parts["train"], in_valid)}
    chosen["test"] = (parts["test"], np.ones(len(parts["test"]["ids"]), dtype=bool))

    splits = {}
    for split, (p, mask) in chosen.items():
        # utterances of a video contiguous and in temporal order (clip number), for context models
        rows = sorted(np.flatnonzero(mask), key=lambda r: _clip_order(str(p["ids"][r])))
        ids = [str(c) for c in p["ids"][rows]]
        video_index = {v: g for g, v in enumerate(dict.fromkeys(video_id(c) for c in ids))}
        splits[split] = SplitArrays(
            features={m: p[m][rows][:, None, :].astype(np.float32) for m in MODALITIES},
            lengths={m: np.ones(len(ids), dtype=np.int64) for m in MODALITIES},
            labels=p["labels"][rows],
            ids=ids,
            texts=[str(transcript_of[c]) for c in ids],
            groups=np.array([video_index[video_id(c)] for c in ids], dtype=np.int64),
        )
    _standardise(splits)

    info = DatasetInfo(
        name=NAME,
        task="regression",
        feature_dims={m: int(splits["train"].features[m].shape[2]) for m in MODALITIES},
        max_lengths={m: 1 for m in MODALITIES},
        metric_family="mosi",
        label_range=(-3.0, 3.0),
    )
    sizes = {split: len(a) for split, a in splits.items()}
    notes = [
        f"Poria split; validation = {n_valid} of {len(train_videos)} training videos "
        f"(split_seed {split_seed}); sizes {sizes}; "
        f"{dropped} clips without a continuous label dropped",
        "features standardised with train-split mean/std (features constant in train only centred)",
    ]
    return validate(MultimodalData(info=info, splits=splits, source=str(folder), notes=notes))


@register_dataset(NAME)
def load_mosi_poria(cfg: DataConfig) -> MultimodalData:
    """Real CMU-MOSI utterance features (Poria et al. 2017), continuous labels, Poria's split."""
    if not cfg.data_root:
        raise DataError(
            f"{NAME}: no data folder given: pass --data-root or set MSAKIT_DATA to the folder "
            "holding mosi-poria/ and mosi-labels/"
        )
    return read_mosi_poria(cfg.data_root, cfg.valid_fraction, cfg.split_seed)
