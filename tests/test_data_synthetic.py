"""Synthetic planted data: determinism, file round trip through read_mmsa, padding and lengths,
and the planted structure (text alone is clearly worse than all three; both worse than oracle)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from msakit.batch import MODALITIES
from msakit.config import DataConfig
from msakit.data import load_dataset, to_loader
from msakit.data.base import DataError
from msakit.data.safe_pickle import save_pickle
from msakit.data.synthetic import (
    SyntheticConfig,
    cache_dir,
    config_hash,
    generate_synthetic,
    synthetic_oracle,
)

SPLITS = ("train", "valid", "test")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSAKIT_CACHE", str(tmp_path / "cache"))


def _pooled(arrays, modalities) -> np.ndarray:
    """[N, sum D_m]: mean over the real frames of each modality (masks respected)."""
    parts = []
    for m in modalities:
        x, lengths = arrays.features[m], arrays.lengths[m]
        mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
        parts.append((x * mask[:, :, None]).sum(axis=1) / lengths[:, None])
    return np.concatenate(parts, axis=1)


def _ridge_mae(data, modalities) -> float:
    train, test = data.splits["train"], data.splits["test"]
    model = Ridge(alpha=10.0).fit(_pooled(train, modalities), train.labels)
    return float(np.mean(np.abs(model.predict(_pooled(test, modalities)) - test.labels)))


def test_same_seed_same_data_different_seed_different():
    cfg = SyntheticConfig(train_size=50, valid_size=20, test_size=30)
    a, b, c = generate_synthetic(cfg, 0), generate_synthetic(cfg, 0), generate_synthetic(cfg, 1)
    for split in SPLITS:
        for key in (
            *MODALITIES,
            "audio_lengths",
            "vision_lengths",
            "text_bert",
            "regression_labels",
        ):
            np.testing.assert_array_equal(a[split][key], b[split][key])
        assert not np.array_equal(a[split]["text"], c[split]["text"])
        assert not np.array_equal(a[split]["regression_labels"], c[split]["regression_labels"])
    assert synthetic_oracle(cfg, 0) == synthetic_oracle(cfg, 0)


def test_default_generation_is_fast():
    start = time.perf_counter()
    generate_synthetic(SyntheticConfig(), 0)
    assert time.perf_counter() - start < 1.0


def test_loader_round_trip_through_mmsa_file(tmp_path):
    cfg = DataConfig(name="synthetic", split_seed=3)
    data = load_dataset(cfg)
    syn = cfg.synthetic
    path = cache_dir() / f"synthetic-{config_hash(syn, 3)}.pkl"
    assert path.is_file() and data.source == str(path)
    raw = generate_synthetic(syn, 3)
    info = data.info
    assert info.name == "synthetic" and info.task == "regression" and info.metric_family == "mosi"
    assert info.feature_dims == {"text": 32, "audio": 16, "vision": 16}
    assert info.max_lengths == {"text": 20, "audio": 40, "vision": 30}
    for split in SPLITS:
        arrays = data.splits[split]
        assert len(arrays) == syn.size(split)
        np.testing.assert_array_equal(arrays.labels, raw[split]["regression_labels"])
        assert arrays.labels.min() >= -3 and arrays.labels.max() <= 3
        for m in MODALITIES:
            np.testing.assert_array_equal(arrays.features[m], raw[split][m])
            x, lengths, steps = arrays.features[m], arrays.lengths[m], syn.length(m)
            assert lengths.min() >= np.ceil(syn.min_length_fraction * steps)
            assert lengths.max() <= steps and len(np.unique(lengths)) > 1
            padding = np.arange(steps)[None, :] >= lengths[:, None]
            assert np.all(x[padding] == 0)  # padding exactly zero
            assert np.all(np.any(x[~padding] != 0, axis=-1))  # real frames are not
        assert arrays.texts is not None and len(set(arrays.ids)) == len(arrays.ids)
    oracle = synthetic_oracle(syn, 3)
    assert any(f"oracle_mae={oracle['oracle_mae']:.4f}" in note for note in data.notes)
    # the cache is reused: a second load does not rewrite the file
    stamp = path.stat().st_mtime_ns
    load_dataset(cfg)
    assert path.stat().st_mtime_ns == stamp


def test_data_depends_on_split_seed_only(tmp_path):
    first = load_dataset(
        DataConfig(name="synthetic", split_seed=0, data_path=str(tmp_path / "a.pkl"))
    )
    again = load_dataset(DataConfig(name="synthetic", split_seed=0))
    other = load_dataset(DataConfig(name="synthetic", split_seed=1))
    np.testing.assert_array_equal(first.splits["train"].labels, again.splits["train"].labels)
    assert not np.array_equal(first.splits["train"].labels, other.splits["train"].labels)


def test_data_path_written_and_foreign_file_never_overwritten(tmp_path):
    path = tmp_path / "mine.pkl"
    small = SyntheticConfig(train_size=30, valid_size=10, test_size=10)
    load_dataset(DataConfig(name="synthetic", data_path=str(path), synthetic=small))
    assert path.is_file()
    bigger = dataclasses.replace(small, train_size=40)  # another config: the file is rewritten
    data = load_dataset(DataConfig(name="synthetic", data_path=str(path), synthetic=bigger))
    assert len(data.splits["train"]) == 40
    foreign = tmp_path / "aligned_50.pkl"
    save_pickle({"train": {}}, foreign)
    with pytest.raises(DataError, match="aligned_50.pkl: exists and is not a msakit synthetic"):
        load_dataset(DataConfig(name="synthetic", data_path=str(foreign)))


def test_planted_structure_text_alone_is_clearly_worse():
    data = load_dataset(DataConfig(name="synthetic"))
    oracle = synthetic_oracle(SyntheticConfig(), 0)
    text_mae = _ridge_mae(data, ("text",))
    all_mae = _ridge_mae(data, MODALITIES)
    assert text_mae - all_mae > 0.05
    assert all_mae > oracle["oracle_mae"]
    assert text_mae > oracle["text_oracle_mae"] > oracle["oracle_mae"]
    assert oracle["oracle_non0_acc2"] > oracle["text_oracle_non0_acc2"]
    assert oracle["oracle_corr"] > oracle["text_oracle_corr"]


def test_classification():
    syn = SyntheticConfig(task="classification", num_classes=3, train_size=600, test_size=300)
    data = load_dataset(DataConfig(name="synthetic", synthetic=syn))
    info = data.info
    assert info.task == "classification" and info.metric_family == "multiclass"
    assert info.num_classes == 3 and info.class_names == ("negative", "neutral", "positive")
    labels = data.splits["train"].labels
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=3), [200, 200, 200])  # quantiles
    oracle = synthetic_oracle(syn, 0)
    assert 0.34 < oracle["text_oracle_acc"] < oracle["oracle_acc"] <= 1.0
    assert 0 < oracle["oracle_macro_f1"] <= 1.0


@pytest.mark.parametrize(
    "change",
    [
        {"train_size": 0},
        {"audio_dim": 5},  # needs 2 * signal_dims
        {"min_length_fraction": 0.0},
        {"task": "ranking"},
        {"num_classes": 1},
    ],
)
def test_config_validation(change):
    with pytest.raises(ValueError):
        SyntheticConfig(**change)


def test_to_loader_masks_match_lengths():
    syn = SyntheticConfig(train_size=40, valid_size=10, test_size=10)
    data = load_dataset(DataConfig(name="synthetic", synthetic=syn))
    arrays = data.splits["train"]
    for batch in to_loader(arrays, data.info, batch_size=8, shuffle=True, seed=0):
        rows = batch.index.numpy()
        for m in MODALITIES:
            lengths = arrays.lengths[m][rows]
            assert batch.mask(m).shape == (len(rows), lengths.max())
            np.testing.assert_array_equal(batch.lengths(m).numpy(), lengths)
            assert bool((batch.features(m)[~batch.mask(m)] == 0).all())
