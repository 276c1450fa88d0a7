"""Evaluate a saved checkpoint on a split, rebuilding model and data from what it recorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from msakit.config import ConfigError, build_config
from msakit.data import DataError, DatasetInfo, load_dataset
from msakit.registry import create_model
from msakit.train.checkpoint import CheckpointError, load_checkpoint, write_text
from msakit.train.loop import evaluate, predictions_csv, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    model: str
    dataset: str
    split: str
    metrics: dict[str, float]


def load_model_from_checkpoint(path: str | Path, data_overrides: list[str] = ()):
    """-> (model in eval mode, ExperimentConfig, saved DatasetInfo). The checkpoint is checked
    first (`load_checkpoint`); a data file its config names must exist (nothing is written)."""
    state = load_checkpoint(path)
    try:
        cfg = build_config(state["config"], list(data_overrides))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config no longer builds ({e})") from e
    if cfg.data.data_path and not Path(cfg.data.data_path).exists():
        raise CheckpointError(  # a loader may write a missing data file (synthetic): never here
            f"{path}: its config names data file {cfg.data.data_path}, which does not exist "
            "(evaluation only reads data; pass --data-root DIR or --data-path FILE to evaluate on data "
            "that has moved)"
        )
    info = DatasetInfo.from_dict(state["info"])
    model = create_model(cfg.model_name, cfg.model, info)
    model.load_state_dict(state["model"])
    model.trained_on = state.get("data_fingerprint")  # read by `check_data`
    return model.eval(), cfg, info


def check_data(path: str | Path, model, saved_info: DatasetInfo, data, fingerprint: dict | None = None) -> None:
    """Whether `data` can be read by the model of checkpoint `path` (loaded by
    `load_model_from_checkpoint`, trained on `saved_info`): other feature dims or outputs raise
    CheckpointError; other data of the same shape (another fingerprint, label range or metric
    family) are allowed, since evaluating on other data is legitimate, but logged as a warning:
    numbers on it are not the run's. fingerprint: `data`'s when the caller already has it (a
    caller evaluating several checkpoints on one dataset hashes it once)."""
    from msakit.train.runfolder import data_fingerprint

    if data.info.feature_dims != saved_info.feature_dims or data.info.output_dim != saved_info.output_dim:
        raise CheckpointError(
            f"{path}: trained on {saved_info.name} (dims {saved_info.feature_dims}, "
            f"{saved_info.output_dim} outputs); {data.info.name} has dims {data.info.feature_dims}, "
            f"{data.info.output_dim} outputs"
        )
    differs = [f"{key} {getattr(saved_info, key)} -> {getattr(data.info, key)}"
               for key in ("label_range", "metric_family") if getattr(saved_info, key) != getattr(data.info, key)]
    trained_on = getattr(model, "trained_on", None)
    if trained_on and (fingerprint or data_fingerprint(data))["blake2b"] != trained_on.get("blake2b"):
        differs.append("the data's fingerprint: their content, or the dataset's name")
    if differs:
        log.warning("%s: evaluated on other data than it was trained on (%s)", path, "; ".join(differs))


def evaluate_checkpoint(
    path: str | Path, data_overrides: list[str] = (), split: str = "test", predictions: str | Path | None = None
) -> Evaluation:
    """Metrics of the checkpoint at `path` on `split` ("train", "valid" or "test"); with
    `predictions`, also write that split's per-sample predictions there (CSV: id, label,
    prediction; the columns of `predictions_test.csv`). Raises CheckpointError / DataError (the
    data error suggests `--data-root` when the run's data moved)."""
    model, cfg, saved_info = load_model_from_checkpoint(path, data_overrides)
    try:
        data = load_dataset(cfg.data)
    except (DataError, FileNotFoundError) as e:
        where = cfg.data.data_path or cfg.data.data_root
        raise DataError(f"{e} (the run read its data from {where}; pass --data-root DIR or --data-path FILE "
                        "to evaluate on data that has moved)") from e
    check_data(path, model, saved_info, data)
    device = resolve_device(cfg.train.device)
    metrics, prediction = evaluate(model.to(device), data.splits[split], data.info, cfg.data.batch_size, device)
    if predictions is not None:
        write_text(predictions_csv(data.splits[split], prediction, data.info), Path(predictions))
    return Evaluation(cfg.model_name, data.info.name, split, metrics)
