"""Modality contribution analysis of any trained model: exact Shapley values over modality subsets.

For each of the 2^M subsets S of (text, audio, vision) the model is evaluated on a split with the
modalities outside S MASKED: their input features are zeros, their padding masks unchanged (the
model is not retrained; this measures what the trained model draws from each modality). A model
with a batched `modality_subset_predictions(batch) -> [2^M, B, ...]` (PaSE) is asked once per
batch; any other model is run once per subset.

Utility of a subset = the chosen metric on the split (default: the dataset family's selection
metric, e.g. MAE for MOSI-type regression), negated for lower-is-better metrics (mae, loss), so
that a modality that helps gets a positive Shapley value. A metric that is undefined for a subset
(e.g. Pearson correlation of a constant prediction) counts as utility 0, with a note.
Shapley values are exact (msakit.modules.shapley); they sum to u(all) - u(empty).

`analyze_checkpoint` writes shapley.json and shapley.png (bar plots) into a folder.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msakit.batch import MODALITIES, Batch
from msakit.config import ConfigError
from msakit.corruption import UNK_TOKEN
from msakit.data import MultimodalData, load_dataset, to_loader
from msakit.data.base import DatasetInfo, SplitArrays
from msakit.losses import task_loss
from msakit.metrics import SELECTION_DEFAULTS, compute_metrics
from msakit.modules.shapley import shapley_values, subset_masks, subset_players
from msakit.train.checkpoint import write_json
from msakit.train.loop import resolve_device

LOWER_IS_BETTER = ("mae", "loss")


def metric_rule(info: DatasetInfo, metric: str | None) -> tuple[str, str]:
    """(metric, "min"/"max"): the family's selection metric by default."""
    default_metric, default_mode = SELECTION_DEFAULTS[info.metric_family]
    if not metric or metric == default_metric:
        return default_metric, default_mode
    return metric, "min" if metric in LOWER_IS_BETTER else "max"


def mask_modalities(batch: Batch, keep: list[bool]) -> Batch:
    """The batch with the features of every modality m where keep[m] is False set to zero, and
    with text absent every transcript word [UNK] (as `corruption.remove_modalities` does), so
    that models reading `Batch.texts` (text_bert, PSA-MF) lose the text too."""
    changes: dict = {m: torch.zeros_like(batch.features(m)) for m, k in zip(MODALITIES, keep, strict=True) if not k}
    if "text" in changes and batch.texts is not None:
        changes["texts"] = [" ".join(UNK_TOKEN for _ in t.split()) for t in batch.texts]
    return dataclasses.replace(batch, **changes)


@torch.no_grad()
def subset_predictions(
    model: nn.Module, arrays: SplitArrays, info: DatasetInfo, batch_size: int, device: torch.device
) -> tuple[np.ndarray, bool]:
    """Predictions of every modality subset on a split, in the split's row order:
    -> ([2^M, N, ...], whether the model's batched subset evaluation was used)."""
    model.eval()
    batched = hasattr(model, "modality_subset_predictions")
    subsets = subset_masks(len(MODALITIES)).tolist()
    outputs, rows = [], []
    loader = to_loader(arrays, info, batch_size, shuffle=False,
                       whole_videos=getattr(model, "whole_videos", False))
    for batch in loader:
        batch = batch.to(device)
        if batched:
            prediction = model.modality_subset_predictions(batch)  # [S, B, ...]
        else:
            prediction = torch.stack([model(mask_modalities(batch, keep)).prediction for keep in subsets])
        outputs.append(prediction.float().cpu().numpy())
        rows.append(batch.index.cpu().numpy())
    stacked = np.concatenate(outputs, axis=1)
    ordered = np.empty_like(stacked)
    ordered[:, np.concatenate(rows)] = stacked  # back to the split's row order
    return ordered, batched


def score(prediction: np.ndarray, arrays: SplitArrays, info: DatasetInfo, metric: str) -> float:
    """One metric of one prediction array; "loss" is the shared task loss."""
    if metric == "loss":
        labels = torch.as_tensor(arrays.labels)
        return float(task_loss(torch.as_tensor(prediction), labels, info))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = compute_metrics(info.metric_family, prediction, arrays.labels,
                                  num_classes=info.num_classes, class_names=info.class_names)
    if metric not in metrics:
        raise ConfigError(f"unknown metric {metric!r} for {info.metric_family}: choose from "
                         f"{', '.join(sorted([*metrics, 'loss']))}")
    return float(metrics[metric])


def modality_contributions(
    model: nn.Module,
    arrays: SplitArrays,
    info: DatasetInfo,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    metric: str | None = None,
) -> dict:
    """Subset metrics, utilities and exact Shapley values of a model on one split (a dict, JSON-ready)."""
    device = torch.device(device)
    metric, mode = metric_rule(info, metric)
    predictions, batched = subset_predictions(model, arrays, info, batch_size, device)
    subsets, notes = [], []
    utilities = []
    for s in range(predictions.shape[0]):
        value = score(predictions[s], arrays, info, metric)
        utility = -value if mode == "min" else value
        players = list(subset_players(s, MODALITIES))
        if math.isnan(utility):
            notes.append(f"{metric} is undefined with modalities {players or 'none'}: utility 0")
            utility = 0.0
        utilities.append(utility)
        subsets.append({"bitmask": s, "modalities": players, "metric": value, "utility": utility})
    psi = shapley_values(torch.tensor(utilities, dtype=torch.float64), len(MODALITIES))
    return {
        "metric": metric,
        "mode": mode,
        "utility": f"-{metric}" if mode == "min" else metric,
        "batched_subsets": batched,
        "subsets": subsets,
        "shapley": {m: float(v) for m, v in zip(MODALITIES, psi, strict=True)},
        "u_all_minus_u_empty": utilities[-1] - utilities[0],
        "notes": notes,
    }


def analyze_checkpoint(
    checkpoint: str | Path,
    data_overrides: list[str] = (),
    split: str = "test",
    metric: str | None = None,
    out_dir: str | Path | None = None,
    data: MultimodalData | None = None,
) -> dict:
    """Rebuild a checkpoint's model and data, run `modality_contributions` on `split`, and (with
    out_dir) write shapley.json and shapley.png there. `data` skips loading the data again."""
    from msakit.evaluate import check_data, load_model_from_checkpoint

    model, cfg, saved_info = load_model_from_checkpoint(checkpoint, data_overrides)
    data = data if data is not None else load_dataset(cfg.data)
    check_data(checkpoint, model, saved_info, data)
    if split not in data.splits:
        raise ConfigError(f"unknown split {split!r}; choose from {sorted(data.splits)}")
    device = resolve_device(cfg.train.device)
    result = {
        "checkpoint": str(checkpoint),
        "model": cfg.model_name,
        "dataset": data.info.name,
        "split": split,
        **modality_contributions(model.to(device), data.splits[split], data.info,
                                 cfg.data.batch_size, device, metric),
    }
    if out_dir is not None:
        out = Path(out_dir)
        write_json(result, out / "shapley.json")
        plot_contributions(result, out / "shapley.png")
    return result


def format_contributions(result: dict) -> str:
    """Markdown tables: subset metric/utility, then Shapley value per modality."""
    lines = ["| modalities | " + result["metric"] + " | utility |", "|---|---:|---:|"]
    for row in result["subsets"]:
        name = "+".join(row["modalities"]) or "(none)"
        lines.append(f"| {name} | {row['metric']:.4f} | {row['utility']:.4f} |")
    lines += ["", f"| modality | Shapley ({result['utility']}) |", "|---|---:|"]
    lines += [f"| {m} | {v:.4f} |" for m, v in result["shapley"].items()]
    lines.append(f"| sum = u(all) - u(none) | {result['u_all_minus_u_empty']:.4f} |")
    return "\n".join(lines)


def plot_contributions(result: dict, path: str | Path) -> None:
    """Two bar plots into a PNG: Shapley value per modality; metric of every modality subset."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    names, values = list(result["shapley"]), list(result["shapley"].values())
    left.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868"][: len(names)])
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_title(f"Shapley value (utility {result['utility']})")
    labels = ["+".join(m[0].upper() for m in row["modalities"]) or "none" for row in result["subsets"]]
    right.bar(labels, [row["metric"] for row in result["subsets"]], color="#8172b2")
    right.set_title(f"{result['metric']} on {result.get('split', 'split')} by modality subset")
    right.set_xlabel("modalities present (T text, A audio, V vision)")
    figure.suptitle(f"{result.get('model', 'model')} on {result.get('dataset', '')}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
