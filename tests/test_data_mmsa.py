"""MMSA pickle reader/writer: aligned and unaligned round trips, lengths, CH-SIMS, errors,
sanitising, and batches from `to_loader`."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from msakit.batch import MODALITIES
from msakit.config import DataConfig
from msakit.data import load_dataset, to_loader
from msakit.data.base import DataError, SplitArrays, validate
from msakit.data.mmsa import read_mmsa, write_mmsa
from msakit.data.padding import Sequences, infer_lengths, real_frames
from msakit.data.safe_pickle import load_pickle, save_pickle

DIMS = {"text": 8, "audio": 5, "vision": 6}
SIZES = {"train": 12, "valid": 5, "test": 7}


def make_split(
    n: int, rng: np.random.Generator, steps: dict[str, int], aligned: bool, sims: bool = False
) -> tuple[dict, dict[str, np.ndarray]]:
    """Random MMSA split with end padding -> (split dict, true lengths per modality)."""
    lengths = {m: rng.integers(1, steps[m] + 1, size=n) for m in MODALITIES}
    if aligned:
        lengths["audio"] = lengths["vision"] = lengths["text"]
    split = {
        "id": np.array([f"video{i}$_${i % 3}" for i in range(n)], dtype=object),
        "raw_text": np.array([f"text number {i}" for i in range(n)], dtype=object),
    }
    for m in MODALITIES:
        x = rng.normal(size=(n, steps[m], DIMS[m])).astype(np.float32)
        x[np.arange(steps[m])[None, :] >= lengths[m][:, None]] = 0.0
        split[m] = x
    bert = np.zeros((n, 3, steps["text"]), dtype=np.float32)
    bert[:, 0, :] = rng.integers(100, 200, size=(n, steps["text"]))
    bert[:, 1, :] = np.arange(steps["text"])[None, :] < lengths["text"][:, None]
    split["text_bert"] = bert
    if not aligned:
        split["audio_lengths"] = lengths["audio"]
        split["vision_lengths"] = lengths["vision"].tolist()  # lists occur too
    low, high = (-1, 1) if sims else (-3, 3)
    split["regression_labels"] = rng.uniform(low, high, size=n).astype(np.float32)
    if sims:
        for m in "TAV":
            split[f"regression_labels_{m}"] = rng.uniform(-1, 1, size=n).astype(np.float32)
    split["annotations"] = np.array(["Positive"] * n, dtype=object)
    return split, lengths


def make_file(path, aligned: bool, sims: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    steps = (
        {"text": 10, "audio": 10, "vision": 10}
        if aligned
        else {"text": 9, "audio": 20, "vision": 15}
    )
    splits, lengths = {}, {}
    for split, n in SIZES.items():
        splits[split], lengths[split] = make_split(n, rng, steps, aligned, sims)
    write_mmsa(path, splits)
    return splits, lengths


@pytest.mark.parametrize("aligned", [True, False])
def test_round_trip_with_lengths(tmp_path, aligned):
    name = "aligned_50" if aligned else "unaligned_50"
    path = tmp_path / f"{name}.pkl"
    raw, lengths = make_file(path, aligned)
    data = read_mmsa(path)
    info = data.info
    assert info.name == name and info.task == "regression" and info.metric_family == "mosi"
    assert info.label_range == (-3.0, 3.0)
    assert info.feature_dims == DIMS
    assert info.max_lengths == {m: raw["train"][m].shape[1] for m in MODALITIES}
    assert data.source == str(path)
    for split, n in SIZES.items():
        arrays = data.splits[split]
        assert len(arrays) == n
        for m in MODALITIES:
            assert arrays.features[m].dtype == np.float32
            np.testing.assert_array_equal(arrays.features[m], raw[split][m])
            np.testing.assert_array_equal(arrays.lengths[m], lengths[split][m])
            assert arrays.lengths[m].dtype == np.int64
        np.testing.assert_allclose(arrays.labels, raw[split]["regression_labels"])
        assert arrays.ids == list(raw[split]["id"])
        assert arrays.texts == list(raw[split]["raw_text"])


def test_aligned_without_text_bert_infers_from_padding(tmp_path):
    rng = np.random.default_rng(1)
    steps = {m: 6 for m in MODALITIES}
    splits = {s: make_split(n, rng, steps, aligned=True)[0] for s, n in SIZES.items()}
    train = splits["train"]
    for key in ("text_bert", "id", "raw_text"):
        for split in splits.values():
            del split[key]
    for m in MODALITIES:
        train[m][0] = 0.0  # all padding -> length 1
        train[m][1] = 0.0
        train[m][1, [0, 3]] = 1.0  # a zero frame inside the real part is not padding
    path = tmp_path / "noBert.pkl"
    write_mmsa(path, splits)
    data = read_mmsa(path)
    lengths = data.splits["train"].lengths
    assert lengths["text"][0] == 1 and lengths["text"][1] == 4
    for m in ("audio", "vision"):
        np.testing.assert_array_equal(lengths[m], lengths["text"])
    assert data.splits["train"].ids[:2] == ["train_0", "train_1"]
    assert data.splits["train"].texts is None


def test_lengths_from_padding_helper():
    x = np.zeros((4, 5, 2), dtype=np.float32)
    x[1, 2, 1] = 3.0
    x[2, :, 0] = 1.0
    x[3, 0, 0] = np.nan  # non-finite counts as padding (it is zeroed by sanitising)
    np.testing.assert_array_equal(infer_lengths(Sequences([x], real_frames(x)), "end"), [1, 3, 5, 1])
    np.testing.assert_array_equal(infer_lengths(Sequences([x], real_frames(x)), "start"), [1, 3, 5, 1])
    y = np.zeros_like(x)
    y[0, 4, 1] = 1.0  # several modalities: a frame is real if any is
    np.testing.assert_array_equal(infer_lengths(Sequences([x, y], real_frames(x, y)), "end"), [5, 3, 5, 1])
    np.testing.assert_array_equal(infer_lengths(Sequences([x, y], real_frames(x, y)), "start"), [1, 3, 5, 1])


def test_stored_lengths_clipped(tmp_path, caplog):
    path = tmp_path / "unaligned_50.pkl"
    raw, _ = make_file(path, aligned=False)
    raw["valid"]["audio_lengths"] = np.array([0, 3, 99, 4, 5])
    write_mmsa(path, raw)
    with caplog.at_level(logging.WARNING):
        data = read_mmsa(path, padding="end")  # these lengths contradict the frames: forced
    np.testing.assert_array_equal(data.splits["valid"].lengths["audio"], [1, 3, 20, 4, 5])
    assert any("clipped 2 lengths" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("aligned", [True, False])
def test_time_last_arrays_are_refused(tmp_path, aligned):
    """An array stored [N, D, L] (time last) read as [N, L, D] would make each feature a frame:
    its zero padding runs along the last axis, following its stored lengths (unaligned) or the
    text's (aligned, no lengths)."""
    path = tmp_path / "x.pkl"
    raw, _ = make_file(path, aligned=aligned)
    for split in raw.values():
        split["vision"] = np.ascontiguousarray(split["vision"].transpose(0, 2, 1))
    write_mmsa(path, raw)
    source = "text's lengths" if aligned else r"its stored lengths \(vision_lengths\)"
    with pytest.raises(DataError, match=rf"train: vision has shape \[12, 6, {10 if aligned else 15}\] but looks "
                                        rf"stored \[N, D, L\] \(time last\).* follows {source} in \d+ of \d+"):
        read_mmsa(path)


@pytest.mark.parametrize("vision_steps", [4, 6])
def test_time_last_arrays_with_fewer_or_as_many_frames_as_features_are_refused(tmp_path, vision_steps):
    """L < D (CH-SIMS vision: 55 frames of 709 features) or L == D, with stored lengths: none of
    them exceeds the first axis, and the stored lengths would be applied to the features."""
    rng = np.random.default_rng(1)
    steps = {"text": 9, "audio": 20, "vision": vision_steps}
    raw = {split: make_split(40, rng, steps, aligned=False)[0] for split in SIZES}
    for split in raw.values():
        split["vision"] = np.ascontiguousarray(split["vision"].transpose(0, 2, 1))
    path = tmp_path / "unaligned.pkl"
    write_mmsa(path, raw)
    with pytest.raises(DataError, match=rf"vision has shape \[40, 6, {vision_steps}\] but looks stored \[N, D, L\]"):
        read_mmsa(path)


def test_features_zero_over_whole_clips_are_not_taken_for_time_last(tmp_path):
    """Trailing feature dimensions that are zero over a whole clip (a face never seen by some
    detector outputs), with stored lengths past L (clipped): laid out right, so read."""
    path = tmp_path / "unaligned_50.pkl"
    raw, truth = make_file(path, aligned=False)
    for split in raw.values():
        for i in range(len(split["vision"])):
            split["vision"][i, :, 6 - 1 - i % 5:] = 0.0
        split["vision_lengths"] = np.asarray(split["vision_lengths"])
        split["vision_lengths"][:2] = 16  # past L = 15: clipped
    write_mmsa(path, raw)
    data = read_mmsa(path)
    assert data.splits["train"].features["vision"].shape == (12, 15, 6)
    np.testing.assert_array_equal(data.splits["train"].lengths["audio"], truth["train"]["audio"])


def test_mismatched_steps_without_lengths_are_inferred(tmp_path):
    rng = np.random.default_rng(2)
    steps = {"text": 6, "audio": 9, "vision": 6}
    splits = {}
    truth = {}
    for split, n in SIZES.items():
        splits[split], truth[split] = make_split(n, rng, steps, aligned=False)
        del splits[split]["audio_lengths"], splits[split]["vision_lengths"]
        vision = splits[split]["vision"]  # of the text's length L_t: word-aligned, its frames the text's
        vision[np.arange(6)[None, :] >= truth[split]["text"][:, None]] = 0.0
        vision[np.arange(6)[None, :] < truth[split]["text"][:, None]] += 0.1
    path = tmp_path / "mixed.pkl"
    write_mmsa(path, splits)
    data = read_mmsa(path)
    train = data.splits["train"]
    np.testing.assert_array_equal(train.lengths["audio"], truth["train"]["audio"])  # inferred
    np.testing.assert_array_equal(train.lengths["vision"], train.lengths["text"])  # same L_t
    for split in SIZES:  # a vision frame past the text's mask: not word-aligned after all
        rows = np.flatnonzero(truth[split]["text"] < 6)
        splits[split]["vision"][rows, truth[split]["text"][rows]] = 1.0
    write_mmsa(path, splits)
    with pytest.raises(DataError, match=r"text\+vision: stored lengths \(text_bert's mask \(row 1\)\) disagree"):
        read_mmsa(path)


def test_sims_metric_family(tmp_path):
    path = tmp_path / "sims_unaligned_39.pkl"
    make_file(path, aligned=False, sims=True)
    data = read_mmsa(path)
    assert data.info.metric_family == "sims" and data.info.label_range == (-1.0, 1.0)
    raw = load_pickle(path)
    raw["test"]["regression_labels"][0] = 2.0  # out of CH-SIMS range
    save_pickle(raw, path)
    with pytest.raises(DataError, match=r"sims_unaligned_39\.pkl: test labels out of range"):
        read_mmsa(path)


def test_non_finite_features_sanitised_and_logged_once(tmp_path, caplog):
    path = tmp_path / "covarep.pkl"
    raw, _ = make_file(path, aligned=False)
    raw["train"]["audio"][0, 0, :3] = [np.nan, -np.inf, np.inf]
    raw["train"]["audio"][2, 1, 0] = -np.inf
    write_mmsa(path, raw)
    with caplog.at_level(logging.WARNING):
        data = load_dataset(DataConfig(name="mmsa", data_path=str(path)))
    audio = data.splits["train"].features["audio"]
    assert np.all(np.isfinite(audio)) and audio[0, 0, 0] == 0 and audio[2, 1, 0] == 0
    messages = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "train.audio" in messages[0] and "replaced 4 non-finite" in messages[0]
    assert str(path) in messages[0]


def _corrupt(path, mutate):
    raw = load_pickle(path)
    mutate(raw)
    save_pickle(raw, path)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda r: r["valid"].pop("vision"), r"valid\.vision is missing"),
        (lambda r: r["test"].pop("regression_labels"), r"test\.regression_labels is missing"),
        (lambda r: r.pop("valid"), r"split 'valid' is missing"),
        (
            lambda r: r["train"].__setitem__("audio", r["train"]["audio"][:, :, 0]),
            r"train\.audio has shape \(12, 20\), expected \[N, L, D\]",
        ),
        (
            lambda r: r["train"].__setitem__("text", r["train"]["text"][:-1]),
            r"train\.text has 11 samples but train\.regression_labels has 12",
        ),
        (
            lambda r: r["test"].__setitem__("text_bert", r["test"]["text_bert"][:, :2]),
            r"test\.text_bert has shape",
        ),
        (
            lambda r: r["valid"].__setitem__("audio_lengths", np.ones(3)),
            r"valid\.audio_lengths has 3 entries, expected 5",
        ),
        (
            lambda r: r["train"].__setitem__("id", r["train"]["id"][:4]),
            r"train\.id has 4 entries, expected 12",
        ),
        (
            lambda r: r["valid"]["regression_labels"].__setitem__(1, 3.5),
            r"valid labels out of range \[-3\.0, 3\.0\]",
        ),
        (
            lambda r: r["test"]["regression_labels"].__setitem__(0, np.nan),
            r"test labels contain NaN",
        ),
        (
            lambda r: r["valid"].__setitem__("vision", r["valid"]["vision"][:, :, :4]),
            r"valid\.vision has feature dim 4, expected 6",
        ),
        (lambda r: r.__setitem__("train", [1, 2]), r"split 'train' is a list, expected a dict"),
    ],
)
def test_bad_files_raise_data_error_naming_file(tmp_path, mutate, pattern):
    path = tmp_path / "unaligned_50.pkl"
    make_file(path, aligned=False)
    _corrupt(path, mutate)
    with pytest.raises(DataError, match=pattern) as err:
        read_mmsa(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_empty_split(tmp_path):
    path = tmp_path / "aligned_50.pkl"
    make_file(path, aligned=True)

    def empty_test(raw):
        for key, value in raw["test"].items():
            raw["test"][key] = value[:0]

    _corrupt(path, empty_test)
    with pytest.raises(DataError, match=r"aligned_50\.pkl: split 'test' is empty"):
        read_mmsa(path)


def test_not_a_dict_and_missing_file(tmp_path):
    path = tmp_path / "list.pkl"
    save_pickle([1, 2, 3], path)
    with pytest.raises(DataError, match=r"list\.pkl: top level is a list"):
        read_mmsa(path)
    with pytest.raises(DataError, match=r"absent\.pkl: file not found"):
        read_mmsa(tmp_path / "absent.pkl")


def test_registry_loader(tmp_path):
    path = tmp_path / "aligned_50.pkl"
    make_file(path, aligned=True)
    data = load_dataset(DataConfig(name="mmsa", data_path=str(path)))
    assert data.info.name == "aligned_50" and len(data.splits["train"]) == SIZES["train"]
    with pytest.raises(DataError, match="data.data_path is not set"):
        load_dataset(DataConfig(name="mmsa"))


def test_classification_split_arrays_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    splits = {}
    for split, n in SIZES.items():
        lengths = {m: rng.integers(1, 5, size=n) for m in MODALITIES}
        features = {}
        for m in MODALITIES:
            x = rng.normal(size=(n, 4, DIMS[m])).astype(np.float32)
            x[np.arange(4)[None, :] >= lengths[m][:, None]] = 0
            features[m] = x
        labels = np.arange(n, dtype=np.int64) % 3
        ids = [f"{split}{i}" for i in range(n)]
        splits[split] = SplitArrays(features, lengths, labels, ids)
    path = tmp_path / "classes.pkl"
    write_mmsa(
        path,
        splits,
        meta={"task": "classification", "num_classes": 4, "name": "four", "notes": ["hi"]},
    )
    data = read_mmsa(path)
    assert data.info.task == "classification" and data.info.num_classes == 4
    assert data.info.metric_family == "multiclass" and data.info.name == "four"
    assert data.notes[-1] == "hi" and data.notes[0].startswith("padding: text end")
    for split in SIZES:
        np.testing.assert_array_equal(data.splits[split].labels, splits[split].labels)
        assert data.splits[split].labels.dtype == np.int64
        for m in MODALITIES:
            np.testing.assert_array_equal(data.splits[split].lengths[m], splits[split].lengths[m])


def test_to_loader_masks_match_lengths_and_padding_trimmed(tmp_path):
    path = tmp_path / "unaligned_50.pkl"
    make_file(path, aligned=False)
    data = read_mmsa(path)
    arrays = data.splits["train"]
    seen = []
    for batch in to_loader(arrays, data.info, batch_size=5, shuffle=True, seed=3):
        rows = batch.index.numpy()
        seen.extend(rows.tolist())
        assert batch.labels.dtype == torch.float32 and batch.labels.shape == (len(rows),)
        for m in MODALITIES:
            lengths = arrays.lengths[m][rows]
            mask = batch.mask(m)
            assert mask.shape == (len(rows), lengths.max())  # trimmed to the longest in the batch
            np.testing.assert_array_equal(batch.lengths(m).numpy(), lengths)
            np.testing.assert_array_equal(
                batch.features(m).numpy(), arrays.features[m][rows, : lengths.max()]
            )
            assert torch.all(batch.features(m)[~mask] == 0)
        assert batch.ids == [arrays.ids[i] for i in rows]
    assert sorted(seen) == list(range(len(arrays)))


def test_validate_without_source_names_the_dataset(tmp_path):
    """base.validate used to read `info` before assigning it when `source` was empty."""
    path = tmp_path / "aligned_50.pkl"
    make_file(path, aligned=True)
    data = read_mmsa(path)
    data.source = ""
    data.splits["test"].labels[0] = 9.0
    with pytest.raises(DataError, match=r"^aligned_50: test labels out of range"):
        validate(data)
