"""mosi-poria on the real shared data: counts, video-disjoint splits, standardisation, and a
ridge-regression sanity check against the numbers in ../shared/data/README.md."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from msakit.batch import MODALITIES
from msakit.config import DataConfig
from msakit.data import load_dataset, to_loader
from msakit.data.base import DataError
from msakit.data.mosi_poria import read_mosi_poria, video_id


def _features(arrays) -> np.ndarray:
    """[N, 273]: text, audio and vision features side by side (sequences of length 1)."""
    return np.concatenate([arrays.features[m][:, 0, :] for m in MODALITIES], axis=1)


def _non0_acc2(pred: np.ndarray, y: np.ndarray) -> float:
    nonzero = y != 0
    return float(np.mean((pred[nonzero] > 0) == (y[nonzero] > 0)))


@pytest.fixture(scope="module")
def poria(shared_data_dir):
    return load_dataset(DataConfig(name="mosi-poria", data_root=str(shared_data_dir)))


def test_counts_and_video_disjoint_splits(poria):
    sizes = {split: len(a) for split, a in poria.splits.items()}
    assert sizes == {"train": 1200, "valid": 244, "test": 751}  # split_seed 0, fraction 0.15
    assert sum(sizes.values()) == 2199 - 4  # 4 clips have no continuous label
    videos = {split: {video_id(c) for c in a.ids} for split, a in poria.splits.items()}
    assert {split: len(v) for split, v in videos.items()} == {"train": 53, "valid": 9, "test": 31}
    assert len(videos["train"] | videos["valid"] | videos["test"]) == 93
    assert not (videos["train"] & videos["valid"] or videos["train"] & videos["test"])
    assert not videos["valid"] & videos["test"]
    all_ids = [c for a in poria.splits.values() for c in a.ids]
    assert len(set(all_ids)) == len(all_ids)


def test_arrays_and_info(poria):
    info = poria.info
    assert info.name == "mosi-poria" and info.task == "regression"
    assert info.metric_family == "mosi" and info.label_range == (-3.0, 3.0)
    assert info.feature_dims == {"text": 100, "audio": 73, "vision": 100}
    assert info.max_lengths == {"text": 1, "audio": 1, "vision": 1}
    for arrays in poria.splits.values():
        n = len(arrays)
        assert arrays.labels.dtype == np.float32
        assert arrays.labels.min() >= -3 and arrays.labels.max() <= 3
        for m in MODALITIES:
            assert arrays.features[m].shape == (n, 1, info.feature_dims[m])
            assert arrays.features[m].dtype == np.float32
            np.testing.assert_array_equal(arrays.lengths[m], np.ones(n))
        assert len(arrays.texts) == n and all(isinstance(t, str) for t in arrays.texts)
    test = poria.splits["test"]  # video 03bSnISJMiM is one of Poria's test videos
    first = test.ids.index("03bSnISJMiM_1")
    assert test.texts[first] == "ANYHOW IT WAS REALLY GOOD"
    assert test.labels[first] == pytest.approx(2.4)


def test_standardised_with_train_statistics(poria):
    for m in MODALITIES:
        x = poria.splits["train"].features[m][:, 0, :].astype(np.float64)
        std = x.std(axis=0)
        varying = std > 1e-3
        np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(std[varying], 1, atol=1e-3)
        np.testing.assert_array_equal(x[:, ~varying], 0)  # constant in train: centred only
    # raw openSMILE audio reaches ~10^3; after standardising the test split is O(1) on average
    test_audio = poria.splits["test"].features["audio"][:, 0, :]
    assert abs(float(test_audio.mean())) < 0.2 and float(test_audio.std()) < 2


def test_video_carve_deterministic_and_seeded(shared_data_dir):
    again = read_mosi_poria(shared_data_dir, valid_fraction=0.15, split_seed=0)
    other = read_mosi_poria(shared_data_dir, valid_fraction=0.15, split_seed=1)
    bigger = read_mosi_poria(shared_data_dir, valid_fraction=0.3, split_seed=0)
    base = load_dataset(DataConfig(name="mosi-poria", data_root=str(shared_data_dir)))
    assert again.splits["valid"].ids == base.splits["valid"].ids
    assert other.splits["valid"].ids != base.splits["valid"].ids
    assert other.splits["test"].ids == base.splits["test"].ids  # Poria's test split is fixed
    assert len({video_id(c) for c in bigger.splits["valid"].ids}) == 19  # round(0.3 * 62)


def test_ridge_sanity_check(poria):
    """README: ridge (alpha=100) on all three standardised modalities, trained on Poria's training
    videos, reaches Non0-Acc2 78.1%, MAE 0.950 on the test videos."""
    train, valid, test = (poria.splits[s] for s in ("train", "valid", "test"))
    # on our (post-carve) train split: within a few points of 78%
    pred = Ridge(alpha=100).fit(_features(train), train.labels).predict(_features(test))
    assert abs(_non0_acc2(pred, test.labels) - 0.78) < 0.06
    assert np.mean(np.abs(pred - test.labels)) < 1.05
    # on all of Poria's training videos (train + valid): the README's numbers
    x = np.concatenate([_features(train), _features(valid)])
    y = np.concatenate([train.labels, valid.labels])
    pred = Ridge(alpha=100).fit(x, y).predict(_features(test))
    assert _non0_acc2(pred, test.labels) == pytest.approx(0.781, abs=0.01)
    assert np.mean(np.abs(pred - test.labels)) == pytest.approx(0.950, abs=0.01)


def test_loader_batches(poria):
    batch = next(iter(to_loader(poria.splits["test"], poria.info, batch_size=16, shuffle=False)))
    for m in MODALITIES:
        assert batch.features(m).shape[:2] == (16, 1) and bool(batch.mask(m).all())


def test_video_id():
    assert video_id("03bSnISJMiM_10") == "03bSnISJMiM"
    assert video_id("5W7Z1C_fDaE_24") == "5W7Z1C_fDaE"


def test_no_data_root(monkeypatch):
    monkeypatch.delenv("MSAKIT_DATA", raising=False)
    with pytest.raises(DataError, match="pass --data-root or set MSAKIT_DATA"):
        load_dataset(DataConfig(name="mosi-poria"))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"mosi-poria: folder not found"):
        read_mosi_poria(tmp_path)


def test_misaligned_rows_detected(shared_data_dir, tmp_path):
    shutil.copytree(shared_data_dir / "mosi-poria", tmp_path / "mosi-poria")
    shutil.copytree(shared_data_dir / "mosi-labels", tmp_path / "mosi-labels")
    audio = tmp_path / "mosi-poria" / "audio" / "audio_test0.csv"
    lines = audio.read_text().splitlines(keepends=True)
    audio.write_text("".join(reversed(lines)))
    with pytest.raises(DataError, match=r"audio_test0\.csv: binary label disagrees"):
        read_mosi_poria(tmp_path)


def test_videos_are_contiguous_groups_in_clip_order(poria):
    for split, arrays in poria.splits.items():
        groups = arrays.groups
        assert groups is not None and len(groups) == len(arrays)
        assert np.all(np.diff(groups) >= 0), f"{split}: a video's utterances are not contiguous"
        for g in np.unique(groups)[:10]:
            clips = [int(arrays.ids[i].rsplit("_", 1)[1]) for i in np.flatnonzero(groups == g)]
            assert clips == sorted(clips) and len({video_id(arrays.ids[i]) for i in np.flatnonzero(groups == g)}) == 1
