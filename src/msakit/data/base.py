"""Dataset description and in-memory split storage shared by every loader.

A loader returns `MultimodalData`: a `DatasetInfo` plus three `SplitArrays` (train/valid/test)
of padded numpy arrays. `to_loader` turns a split into a torch DataLoader of `Batch`es.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from msakit.batch import MODALITIES, Batch

log = logging.getLogger(__name__)

TASKS = ("regression", "classification", "multi_binary")
METRIC_FAMILIES = ("mosi", "sims", "iemocap", "multiclass")
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Bad input data. The message names the file/field and the problem."""


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data.

    task: "regression" (labels [N] float), "classification" (labels [N] int in [0, num_classes)),
        or "multi_binary" (labels [N, T] int in {0, 1}; T binary tasks such as IEMOCAP's 4 emotions).
    num_classes: 1 for regression; K for classification; 2 for multi_binary.
    num_tasks: T for multi_binary, else 1.
    feature_dims / max_lengths: per modality, keys "text", "audio", "vision".
    label_range: (low, high) for regression labels, None for classes.
    metric_family: which metric set applies: "mosi", "sims", "iemocap", "multiclass".
    class_names: names of the classes (or of the T tasks for multi_binary).
    """

    name: str
    task: str
    feature_dims: dict[str, int]
    max_lengths: dict[str, int]
    metric_family: str
    num_classes: int = 1
    num_tasks: int = 1
    label_range: tuple[float, float] | None = None
    class_names: tuple[str, ...] = ()
    train_size: int = 0
    """Number of training samples (models with per-sample memory, e.g. Self-MM, size buffers by it)."""
    extraction: dict | None = None
    """How the features were computed from raw media (`msakit extract` settings, or the text
    recipe of mosi-text / mosei-text), JSON-ready; None when they cannot be reproduced from raw
    media (e.g. mosi-poria). `msakit predict` reruns it; it travels in every checkpoint."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DatasetInfo.task must be one of {TASKS}, got {self.task!r}")
        if self.metric_family not in METRIC_FAMILIES:
            raise ValueError(f"DatasetInfo.metric_family must be one of {METRIC_FAMILIES}")
        for key in ("feature_dims", "max_lengths"):
            if not isinstance(getattr(self, key), dict) or set(getattr(self, key)) != set(MODALITIES):
                raise ValueError(f"DatasetInfo.{key} needs exactly the keys {MODALITIES}")
            if not all(_is_int(v, 1) for v in getattr(self, key).values()):
                raise ValueError(f"DatasetInfo.{key} values must be integers >= 1")
        if not (_is_int(self.num_classes, 1) and _is_int(self.num_tasks, 1) and _is_int(self.train_size, 0)):
            raise ValueError("DatasetInfo.num_classes / num_tasks must be integers >= 1, train_size >= 0")

    @property
    def output_dim(self) -> int:
        """Width of a model's final layer: 1, K, or 2*T."""
        if self.task == "regression":
            return 1
        if self.task == "classification":
            return self.num_classes
        return 2 * self.num_tasks

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "feature_dims": dict(self.feature_dims),
            "max_lengths": dict(self.max_lengths),
            "metric_family": self.metric_family,
            "num_classes": self.num_classes,
            "num_tasks": self.num_tasks,
            "label_range": list(self.label_range) if self.label_range else None,
            "class_names": list(self.class_names),
            "train_size": self.train_size,
            "extraction": self.extraction,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        d = dict(d)
        if d.get("label_range") is not None:
            d["label_range"] = tuple(d["label_range"])
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)


@dataclass
class SplitArrays:
    """One split, padded. features[m]: [N, L_m, D_m] float32; lengths[m]: [N] int64 (>= 1);
    labels: [N] float32 / int64, or [N, T] int64; ids: N strings."""

    features: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    labels: np.ndarray
    ids: list[str]
    texts: list[str] | None = None  # raw transcripts where the source has them
    groups: np.ndarray | None = None
    """[N] int: which video each utterance belongs to (utterance-level data); None = each sample
    is its own group. Samples of one group are stored in temporal order."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> SplitArrays:
        return SplitArrays(
            features={m: a[rows] for m, a in self.features.items()},
            lengths={m: a[rows] for m, a in self.lengths.items()},
            labels=self.labels[rows],
            ids=[self.ids[i] for i in rows],
            texts=None if self.texts is None else [self.texts[i] for i in rows],
            groups=None if self.groups is None else self.groups[rows],
        )


@dataclass
class MultimodalData:
    info: DatasetInfo
    splits: dict[str, SplitArrays]
    source: str = ""  # file or folder it came from, for messages and results
    notes: list[str] = field(default_factory=list)
    validated: bool = False
    """Set by `validate`; `load_dataset` does not validate again what its loader validated."""


_SANITIZE_BLOCK = 2**22  # values per block: the temporary mask stays at 4 MB


def sentiment_label(cell: str | None, where: str, error: type[Exception] = DataError) -> float:
    """A CMU-MOSI/MOSEI sentiment label read from a text cell: a finite number in [-3, 3].

    `where` names the file and line for the message; raises `error` (DataError by default) with
    one line naming the value when the cell is not a number or lies outside [-3, 3].
    """
    text = (cell or "").strip()
    try:
        if not text or "_" in text:  # float() accepts "1_0"; a label file should not
            raise ValueError
        value = float(text)
    except ValueError:
        raise error(f"{where}: label {cell!r} is not a number") from None
    if not np.isfinite(value) or abs(value) > 3.0:
        raise error(f"{where}: label {cell!r} is outside [-3, 3]")
    return value


def sanitize_features(array: np.ndarray, where: str) -> np.ndarray:
    """Replace NaN/+-inf by 0 with a logged count (COVAREP features contain -inf).

    In place, block by block (a writeable float32 array is cleaned where it lies: no copy of
    the whole array, only a few-MB mask); a read-only or other-dtype array is converted once."""
    if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")
    flat = array.reshape(-1)  # a view of the contiguous array
    count = 0
    for start in range(0, flat.size, _SANITIZE_BLOCK):
        block = flat[start : start + _SANITIZE_BLOCK]
        bad = ~np.isfinite(block)
        if bad.any():
            count += int(bad.sum())
            block[bad] = 0.0
    if count:
        log.warning("%s: replaced %d non-finite feature values (NaN/inf) with 0", where, count)
    return array


def validate(data: MultimodalData) -> MultimodalData:
    """Check shapes, lengths and labels of every split (and that no clip id comes twice in a
    split with different labels); raise DataError naming what is wrong."""
    info = data.info
    src = data.source or info.name
    for split in SPLITS:
        if split not in data.splits:
            raise DataError(f"{src}: split {split!r} is missing")
        arrays = data.splits[split]
        n = len(arrays)
        if n == 0:
            raise DataError(f"{src}: split {split!r} is empty")
        for m in MODALITIES:
            feats = arrays.features[m]
            where = f"{src}: {split}.{m}"
            if feats.ndim != 3 or feats.shape[0] != n:
                raise DataError(f"{where} has shape {feats.shape}, expected [{n}, L, D]")
            if feats.shape[2] != info.feature_dims[m]:
                raise DataError(
                    f"{where} has feature dim {feats.shape[2]}, expected {info.feature_dims[m]}"
                )
            lengths = arrays.lengths[m]
            if lengths.shape != (n,) or lengths.min() < 1 or lengths.max() > feats.shape[1]:
                raise DataError(f"{where}: lengths must be in [1, {feats.shape[1]}]")
            arrays.features[m] = sanitize_features(feats.astype(np.float32, copy=False), where)
        labels = arrays.labels
        where = f"{src}: {split} labels"
        if info.task == "regression":
            if not np.all(np.isfinite(labels)):
                raise DataError(f"{where} contain NaN/inf")
            low, high = info.label_range or (-np.inf, np.inf)
            if labels.min() < low - 1e-6 or labels.max() > high + 1e-6:
                raise DataError(
                    f"{where} out of range [{low}, {high}]: min {labels.min():.3f}, max {labels.max():.3f}"
                )
        else:
            top = info.num_classes
            if labels.min() < 0 or labels.max() >= top:
                raise DataError(f"{where} must be class indices in [0, {top})")
    _check_repeated_ids(data, src)
    _warn_shared_clips(data, src)
    data.info = dataclasses.replace(info, train_size=len(data.splits["train"]))
    data.validated = True
    return data


def _check_repeated_ids(data: MultimodalData, src: str) -> None:
    """The same clip id twice in one split with different labels is a DataError (ids are only
    compared within a split: some sources number their samples per split)."""
    for split in SPLITS:
        seen: dict[str, object] = {}
        arrays = data.splits[split]
        for sample_id, label in zip(arrays.ids, arrays.labels.tolist(), strict=True):
            first = seen.setdefault(sample_id, label)
            if first != label:
                raise DataError(
                    f"{src}: {split}: clip {sample_id!r} appears twice with different labels "
                    f"({first} and {label})"
                )


def _warn_shared_clips(data: MultimodalData, src: str) -> None:
    """Log a warning when the same clip (same id AND the same features in every modality) is in
    two splits: test or validation samples that were trained on. The same id with other
    features is not warned about (some sources number their samples per split)."""
    for a, b in (("train", "test"), ("train", "valid"), ("valid", "test")):
        first, second = data.splits[a], data.splits[b]
        rows = {sample_id: i for i, sample_id in enumerate(first.ids)}
        same = [sample_id for j, sample_id in enumerate(second.ids) if sample_id in rows and all(
            np.array_equal(first.features[m][rows[sample_id]], second.features[m][j]) for m in MODALITIES)]
        if same:
            log.warning("%s: %d clips of the %s split are also in the %s split, with the same features "
                        "(e.g. %r): %s results on them are not held out", src, len(same), b, a, same[0], b)


def clip_key(clip: str) -> tuple[int, float, str]:
    """Sort key of a clip name inside its video: numbers in numeric order ("10" after "9",
    MulT's start times "3.5"), then other names alphabetically."""
    try:
        return (0, float(clip), "")
    except ValueError:
        return (1, 0.0, clip)


def group_by_video(
    splits: dict[str, SplitArrays], clips: dict[str, list[tuple[str, str] | None]], how: str
) -> str:
    """Set every split's `groups` from (video, clip) per row, in place, and return the run's note.

    clips: split -> one (video, clip) per row, None where the id names no video. Rows of a video
    are put in clip order (`clip_key`), videos stay in order of first appearance; a split whose
    rows are already in that order keeps it. If any id names no video, no split gets groups
    (contextual models then refuse the data, see `to_loader`). how: where the videos come from,
    for the note (e.g. "MMSA ids 'video$_$clip'")."""
    missing = sum(key is None for keys in clips.values() for key in keys)
    if missing:
        total = sum(len(keys) for keys in clips.values())
        return (f"video context: none ({missing} of {total} ids name no video; expected {how}); "
                "contextual models refuse this data")
    videos = 0
    for split, keys in clips.items():
        rank: dict[str, int] = {}
        for video, _ in keys:
            rank.setdefault(video, len(rank))
        rows = sorted(range(len(keys)), key=lambda r: (rank[keys[r][0]], clip_key(keys[r][1]), r))
        arrays = splits[split]
        if rows != list(range(len(keys))):
            arrays = splits[split] = arrays.subset(np.array(rows, dtype=np.int64))
        arrays.groups = np.array([rank[keys[r][0]] for r in rows], dtype=np.int64)
        videos += len(rank)
    return f"video context: {videos} videos from the {how}, clips in clip order within each video"


class _SplitDataset(Dataset):
    def __init__(self, arrays: SplitArrays, task: str):
        self.arrays = arrays
        self.labels = torch.as_tensor(
            arrays.labels, dtype=torch.float32 if task == "regression" else torch.long
        )
        self.features = {m: torch.from_numpy(arrays.features[m]) for m in MODALITIES}
        self.lengths = {m: torch.as_tensor(arrays.lengths[m], dtype=torch.long) for m in MODALITIES}

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> int:
        return i

    def collate_groups(self, groups: list[list[int]]) -> Batch:
        """Whole videos: their utterances in order, and `group` numbering the video in the batch."""
        batch = self.collate([row for rows in groups for row in rows])
        batch.group = torch.cat(
            [torch.full((len(rows),), g, dtype=torch.long) for g, rows in enumerate(groups)]
        )
        return batch

    def collate(self, rows: list[int]) -> Batch:
        idx = torch.as_tensor(rows, dtype=torch.long)
        parts = {}
        for m in MODALITIES:
            lengths = self.lengths[m][idx]
            steps = int(lengths.max())  # trim to the longest real sequence in the batch
            # index_select of the trimmed view: 2.3x faster than features[idx, :steps] (B = 32,
            # 40 of 50 steps x 768, 2 threads: 0.32 vs 0.74 ms), same contiguous copy
            parts[m] = self.features[m][:, :steps].index_select(0, idx)
            parts[f"{m}_mask"] = torch.arange(steps)[None, :] < lengths[:, None]
        return Batch(
            **parts,
            labels=self.labels[idx],
            index=idx,
            ids=[self.arrays.ids[i] for i in rows],
            texts=None if self.arrays.texts is None else [self.arrays.texts[i] for i in rows],
        )


def video_groups(arrays: SplitArrays) -> list[list[int]]:
    """Row indices of each video, in first-appearance order (one row per group without `groups`)."""
    if arrays.groups is None:
        return [[i] for i in range(len(arrays))]
    order: dict[int, list[int]] = {}
    for row, group in enumerate(arrays.groups.tolist()):
        order.setdefault(group, []).append(row)
    return list(order.values())


def to_loader(
    arrays: SplitArrays,
    info: DatasetInfo,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    whole_videos: bool = False,
    shard: tuple[int, int] | None = None,
) -> DataLoader:
    """DataLoader of `Batch`; shuffling is driven by a generator seeded with `seed` only, so a
    resumed run sees the same order as an uninterrupted one.

    whole_videos: each batch holds `batch_size` whole VIDEOS (all their utterances, in order) and
    `Batch.group` [B] says which video of the batch each utterance belongs to. Contextual models
    (bc-LSTM) need this; predictions and metrics stay per utterance. Raises DataError when the
    split has no `groups` (a contextual model must not run without its context).

    shard=(rank, world) (distributed training, msakit/train/distributed.py): the batches of the
    one-process loader above, each cut into `world` contiguous shards, of which this loader yields
    shard `rank`. Without shuffling (evaluation) every sample is in exactly one shard: nothing is
    padded or dropped (empty shards are skipped). With shuffling (training) a last batch with fewer
    samples than processes is dropped, so that every process takes every step."""
    if whole_videos and arrays.groups is None:
        raise DataError(
            f"{info.name}: this model reads the utterances of each video in context, but the "
            "data do not say which clips form a video (no video groups: MMSA ids must be "
            "'video$_$clip', MulT ids [video, clip, ...]); use such data or a model without context"
        )
    dataset = _SplitDataset(arrays, info.task)
    items = video_groups(arrays) if whole_videos else dataset
    collate = dataset.collate_groups if whole_videos else dataset.collate
    sampler = EpochOrder(len(items), seed) if shuffle else SequentialSampler(range(len(items)))
    # a generator of its own for shuffled loaders: each DataLoader iterator draws a base seed
    # from it, which would otherwise come from (and advance) torch's global random stream
    generator = torch.Generator() if shuffle else None
    if shard is not None:  # the one-process loader's batches, each cut into `world` shards
        rank, world = shard
        batches = [b for b in BatchSampler(sampler, batch_size, drop_last=False)
                   if not (shuffle and len(b) < world)]  # see the docstring
        shards = [np.array_split(b, world)[rank].tolist() for b in batches]
        return DataLoader(items, batch_sampler=[s for s in shards if s], collate_fn=collate, num_workers=0,
                          generator=generator)
    return DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=0,
                      generator=generator)


class EpochOrder(Sampler[int]):
    """The shuffled order of range(n) for one epoch, a function of `seed` alone: every iterator
    over it yields the same order, however many iterators were made before (a DataLoader's own
    shuffling advances one generator with each iterator, and a progress bar that makes an
    iterator of its own then changed the order the loop saw, so that a multi-process run, which
    builds its batches without one, trained on other batches than a one-process run).

    The order is `torch.randperm(n)` from a generator seeded with `seed` after two 64-bit draws:
    the draws the one-process loop's two DataLoader iterators took before this sampler existed,
    kept so that every run recorded before it reproduces."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        torch.empty(2, dtype=torch.int64).random_(generator=generator)
        return iter(torch.randperm(self.n, generator=generator).tolist())
