"""MulT pickles: IEMOCAP four binary emotion tasks, MOSI regression, shared word-aligned lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msakit.batch import MODALITIES
from msakit.config import DataConfig
from msakit.data import load_dataset, to_loader
from msakit.data.base import DataError
from msakit.data.mult import EMOTIONS, read_mult, write_mult

DIMS = {"text": 300, "audio": 74, "vision": 35}
SIZES = {"train": 10, "valid": 4, "test": 6}
STEPS = 8


def make_split(n: int, rng: np.random.Generator, iemocap: bool) -> tuple[dict, np.ndarray]:
    """Word-aligned MulT split with end padding -> (split dict, true lengths)."""
    lengths = rng.integers(1, STEPS + 1, size=n)
    lengths[0] = STEPS
    split = {}
    for m in MODALITIES:
        x = rng.normal(size=(n, STEPS, DIMS[m])).astype(np.float32)
        x[np.arange(STEPS)[None, :] >= lengths[:, None]] = 0.0
        split[m] = x
    if n > 1:  # last real frame shows only in audio: still a real frame for all three
        lengths[1] = max(int(lengths[1]), 2)
        for m in MODALITIES:
            split[m][1, : lengths[1]] = rng.normal(size=(lengths[1], DIMS[m]))
            split[m][1, lengths[1] - 1] = 0.0
        split["audio"][1, lengths[1] - 1, 5] = 1.0
    if iemocap:
        present = rng.integers(0, 2, size=(n, len(EMOTIONS)))
        split["labels"] = np.eye(2, dtype=np.float32)[present]  # [N, 4, 2] one-hot
    else:
        split["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
    split["id"] = np.array([[f"vid{i}", f"{i}"] for i in range(n)], dtype=object)
    return split, lengths


def make_file(path, iemocap: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    splits, lengths = {}, {}
    for split, n in SIZES.items():
        splits[split], lengths[split] = make_split(n, rng, iemocap)
    write_mult(path, splits)
    return splits, lengths


def test_iemocap_four_binary_tasks(tmp_path):
    path = tmp_path / "iemocap_data.pkl"
    raw, lengths = make_file(path, iemocap=True)
    data = read_mult(path)
    info = data.info
    assert info.name == "iemocap" and info.task == "multi_binary"
    assert info.num_classes == 2 and info.num_tasks == 4 and info.output_dim == 8
    assert info.class_names == ("neutral", "happy", "sad", "angry")
    assert info.metric_family == "iemocap" and info.label_range is None
    assert info.feature_dims == DIMS and info.max_lengths == {m: STEPS for m in MODALITIES}
    for split, n in SIZES.items():
        arrays = data.splits[split]
        assert arrays.labels.shape == (n, 4) and arrays.labels.dtype == np.int64
        np.testing.assert_array_equal(arrays.labels, raw[split]["labels"].argmax(axis=2))
        for m in MODALITIES:
            np.testing.assert_array_equal(arrays.lengths[m], lengths[split])
        assert arrays.ids[0] == "vid0_0"
    batch = next(iter(to_loader(data.splits["train"], info, batch_size=4, shuffle=False)))
    assert batch.labels.shape == (4, 4) and batch.labels.dtype == torch.long


def test_mosi_regression(tmp_path):
    path = tmp_path / "mosi_data.pkl"
    raw, lengths = make_file(path, iemocap=False)
    data = load_dataset(DataConfig(name="mult", data_path=str(path)))
    info = data.info
    assert info.name == "mosi" and info.task == "regression" and info.metric_family == "mosi"
    assert info.label_range == (-3.0, 3.0)
    for split, n in SIZES.items():
        arrays = data.splits[split]
        assert arrays.labels.shape == (n,) and arrays.labels.dtype == np.float32
        np.testing.assert_allclose(arrays.labels, raw[split]["labels"][:, 0, 0])
        for m in MODALITIES:
            np.testing.assert_array_equal(arrays.lengths[m], lengths[split])
            np.testing.assert_array_equal(arrays.features[m], raw[split][m])
    assert data.splits["train"].lengths["text"][1] == lengths["train"][1]  # audio-only last frame


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda r: r["train"].pop("labels"), r"train\.labels is missing"),
        (lambda r: r["valid"].pop("audio"), r"valid\.audio is missing"),
        (
            lambda r: r["test"].__setitem__("labels", np.zeros((6, 3, 2))),
            r"test\.labels has shape \(6, 3, 2\)",
        ),
        (
            lambda r: r["valid"].__setitem__("text", r["valid"]["text"][:2]),
            r"valid\.text has 2 samples but valid\.labels has 4",
        ),
        (
            lambda r: r["train"].__setitem__("audio", r["train"]["audio"][..., 0]),
            r"train\.audio has shape \(10, 8\), expected \[N, L, D\]",
        ),
        (lambda r: r.pop("test"), r"split 'test' is missing"),
    ],
)
def test_bad_files(tmp_path, mutate, pattern):
    path = tmp_path / "mosi_data.pkl"
    raw, _ = make_file(path, iemocap=False)
    mutate(raw)
    write_mult(path, raw)
    with pytest.raises(DataError, match=pattern) as err:
        read_mult(path)
    assert str(path) in str(err.value)


def test_time_last_arrays_are_refused(tmp_path):
    """Word-aligned audio stored [N, 74, L]: its padding follows the text's lengths along the
    last axis."""
    path = tmp_path / "mosi_data.pkl"
    rng = np.random.default_rng(4)
    raw = {split: make_split(40, rng, iemocap=False)[0] for split in SIZES}
    for split in raw.values():
        split["audio"] = np.ascontiguousarray(split["audio"].transpose(0, 2, 1))
    write_mult(path, raw)
    with pytest.raises(DataError, match=r"train: audio has shape \[40, 74, 8\] but looks stored \[N, D, L\]"):
        read_mult(path)
    for split in raw.values():  # all three transposed: no time axis left to compare with
        for m in ("text", "vision"):
            split[m] = np.ascontiguousarray(split[m].transpose(0, 2, 1))
    write_mult(path, raw)
    with pytest.raises(DataError, match=r"train: text has shape \[40, 300, 8\] but looks stored \[N, D, L\].*"
                                        r"follows the last-axis padding of audio"):
        read_mult(path)


def test_mixed_label_kinds_rejected(tmp_path):
    rng = np.random.default_rng(5)
    splits = {s: make_split(n, rng, iemocap=(s != "test"))[0] for s, n in SIZES.items()}
    path = tmp_path / "mixed_data.pkl"
    write_mult(path, splits)
    with pytest.raises(DataError, match="some splits have IEMOCAP"):
        read_mult(path)


def test_missing_data_path():
    with pytest.raises(DataError, match="data.data_path is not set"):
        load_dataset(DataConfig(name="mult"))
