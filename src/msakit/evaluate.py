"""Evaluate a saved checkpoint on a split, rebuilding model and data from what it recorded."""

from __future__ import annotations

from pathlib import Path

from msakit.config import ConfigError, build_config
from msakit.data import DatasetInfo, load_dataset
from msakit.registry import create_model
from msakit.train.checkpoint import CheckpointError, load_checkpoint
from msakit.train.loop import evaluate, resolve_device


def load_model_from_checkpoint(path: str | Path, data_overrides: list[str] = ()):
    """-> (model in eval mode, ExperimentConfig, saved DatasetInfo)."""
    state = load_checkpoint(path)
    try:
        cfg = build_config(state["config"], list(data_overrides))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config no longer builds ({e})") from e
    info = DatasetInfo.from_dict(state["info"])
    model = create_model(cfg.model_name, cfg.model, info)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, info


def evaluate_checkpoint(path: str | Path, data_overrides: list[str] = (), split: str = "test") -> dict:
    model, cfg, saved_info = load_model_from_checkpoint(path, data_overrides)
    data = load_dataset(cfg.data)
    if data.info.feature_dims != saved_info.feature_dims or data.info.output_dim != saved_info.output_dim:
        raise CheckpointError(
            f"{path}: trained on {saved_info.name} (dims {saved_info.feature_dims}, "
            f"{saved_info.output_dim} outputs); {data.info.name} has dims {data.info.feature_dims}, "
            f"{data.info.output_dim} outputs"
        )
    device = resolve_device(cfg.train.device)
    metrics, _ = evaluate(model.to(device), data.splits[split], data.info, cfg.data.batch_size, device)
    return metrics
