"""Small in-memory datasets for model and trainer tests (no files, no loaders)."""

from __future__ import annotations

import numpy as np

from msakit.batch import MODALITIES
from msakit.data.base import DatasetInfo, MultimodalData, SplitArrays, validate

DIMS = {"text": 6, "audio": 4, "vision": 5}
LENGTHS = {"text": 7, "audio": 9, "vision": 8}


def make_info(task: str = "regression") -> DatasetInfo:
    common = dict(feature_dims=DIMS, max_lengths=LENGTHS)
    if task == "regression":
        return DatasetInfo("fake-regression", "regression", metric_family="mosi",
                           label_range=(-3.0, 3.0), **common)
    if task == "classification":
        return DatasetInfo("fake-classes", "classification", metric_family="multiclass",
                           num_classes=3, class_names=("a", "b", "c"), **common)
    return DatasetInfo("fake-iemocap", "multi_binary", metric_family="iemocap", num_classes=2,
                       num_tasks=4, class_names=("neutral", "happy", "sad", "angry"), **common)


def make_split(info: DatasetInfo, n: int, rng: np.random.Generator) -> SplitArrays:
    features, lengths = {}, {}
    for m in MODALITIES:
        length = rng.integers(1, LENGTHS[m] + 1, size=n)
        x = rng.normal(size=(n, LENGTHS[m], DIMS[m])).astype(np.float32)
        x[np.arange(LENGTHS[m])[None, :] >= length[:, None]] = 0.0
        features[m], lengths[m] = x, length.astype(np.int64)
    signal = features["text"][:, 0, 0] + 0.5 * features["audio"][:, 0, 0]
    if info.task == "regression":
        labels = np.clip(signal, -3, 3).astype(np.float32)
    elif info.task == "classification":
        labels = np.digitize(signal, [-0.5, 0.5]).astype(np.int64)
    else:
        labels = (rng.random((n, 4)) < 0.5).astype(np.int64)
        labels[:, 1] = signal > 0
    return SplitArrays(features, lengths, labels, [f"v{i // 4}_{i % 4}" for i in range(n)])


def make_data(task: str = "regression", sizes=(48, 16, 16), seed: int = 0) -> MultimodalData:
    rng = np.random.default_rng(seed)
    info = make_info(task)
    splits = {s: make_split(info, n, rng) for s, n in zip(("train", "valid", "test"), sizes, strict=True)}
    for arrays in splits.values():  # utterances of four consecutive samples share a video
        arrays.groups = np.arange(len(arrays)) // 4
    return validate(MultimodalData(info, splits, source="fake"))


def run_interrupted(cfg, out, data: MultimodalData, monkeypatch, saves: int) -> None:
    """Run an experiment that dies (KeyboardInterrupt) right after its `saves`-th checkpoint
    write (one per epoch), as a killed process would; the real writer is restored afterwards."""
    import pytest

    import msakit.train.loop as loop
    from msakit.train.experiment import run_experiment

    real_save = loop.save_checkpoint
    calls = {"n": 0}

    def crash_after_the_last_wanted_save(state, path):
        real_save(state, path)
        calls["n"] += 1
        if calls["n"] == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_the_last_wanted_save)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, data=data)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)


def loss_term_when_optimised_alone(model, batch, term: str, steps: int, lr: float = 3e-3) -> list[float]:
    """Values of `model(batch).losses[term]` over `steps` Adam steps on that term alone (the
    mechanism tests' check that a loss term has the sign and target it claims)."""
    import torch

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    values = []
    for _ in range(steps):
        value = model(batch).losses[term]
        values.append(float(value.detach()))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return values
