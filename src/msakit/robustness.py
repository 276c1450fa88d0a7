"""Robustness of trained models to missing and noisy modalities (`msakit robustness`).

A trained checkpoint is evaluated on a split (default: test) under each corruption protocol of
msakit.corruption at each level r (several corruption seeds, averaged), and under the six MMIN
conditions. No retraining: this measures what the trained model does when inputs go missing.

Per protocol with levels, from the curve m(r) of the metric over the levels:
    auc            normalised area under the curve: trapezoid integral of m over the levels divided
                   by the level range (the curve's mean height). For the default metrics
                   (accuracies, F1: fractions) it lies in [0, 1]; for MAE it is in MAE units.
    relative_drop  per level, (clean - m(r)) / |clean| for higher-is-better metrics and
                   (m(r) - clean) / |clean| for lower-is-better ones: > 0 means worse than clean.
Level 0 is the clean score (a level-0 corruption is the identity). Several checkpoints (the
training seeds of a run folder) are averaged: every reported number is the mean over
(checkpoint, corruption seed) evaluations, `std` the population std over them; the JSON also
keeps each checkpoint's clean score, AUC and condition scores (`*per_checkpoint`, in the order
of `checkpoints`).

Entry point: `robustness_report(checkpoints_by_run, ...)` -> dict; it writes robustness.json,
robustness.md and robustness.png into `out_dir`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from msakit.analysis import LOWER_IS_BETTER, score
from msakit.config import ConfigError
from msakit.corruption import CONDITIONS, PROTOCOLS, BatchCorruption, block_length, feature_std
from msakit.data import load_dataset
from msakit.train.checkpoint import CheckpointError, write_json, write_text
from msakit.train.loop import predict, resolve_device

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PROTOCOL_CHOICES = (*PROTOCOLS, "conditions")
DEFAULT_METRICS = {"mosi": "non0_acc2", "sims": "acc2", "iemocap": "mean_f1", "multiclass": "acc"}


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The selected checkpoints (seed_*/best.pt) of a `msakit train` output folder."""
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("seed_*/best.pt"))
    if not found:
        raise CheckpointError(f"{run_dir}: no seed_*/best.pt (not a finished `msakit train` output folder)")
    return found


def normalised_auc(levels: list[float], values: list[float]) -> float:
    """Trapezoid area under values(levels) divided by the level range (levels ascending)."""
    if len(levels) < 2 or levels[-1] <= levels[0]:
        return float(values[0]) if values else math.nan
    area = sum((b - a) * (u + v) / 2
               for a, b, u, v in zip(levels, levels[1:], values, values[1:], strict=False))  # trapezoids
    return area / (levels[-1] - levels[0])


def relative_drop(clean: float, value: float, lower_is_better: bool) -> float:
    if clean == 0:
        return math.nan
    return ((value - clean) if lower_is_better else (clean - value)) / abs(clean)


def _check_levels(levels) -> list[float]:
    levels = sorted({float(r) for r in levels})
    if not levels or not all(0 <= r <= 1 for r in levels):  # NaN fails every comparison
        raise ConfigError(f"--levels must be numbers in [0, 1], got {levels}")
    return levels


def evaluate_model(model, cfg, data, protocols, levels, seeds, metric: str, split: str = "test") -> dict:
    """Raw scores of one model: {"clean": x, protocol: {level: [score per seed]}, "conditions":
    {name: x}}."""
    arrays, info = data.splits[split], data.info
    device = resolve_device(cfg.train.device)
    model = model.to(device)
    std = feature_std(data.splits["train"]) if "noise" in protocols else None

    def run(transform) -> float:
        prediction, _ = predict(model, arrays, info, cfg.data.batch_size, device, transform)
        return score(prediction, arrays, info, metric)

    clean = run(None)
    out: dict = {"clean": clean}
    for protocol in protocols:
        if protocol == "conditions":
            out["conditions"] = {
                name: run(BatchCorruption("conditions", 0.0, 0, condition=name)) for name in CONDITIONS
            }
            continue
        out[protocol] = {
            r: [clean] if r == 0 else [run(BatchCorruption(protocol, r, s, std=std)) for s in seeds]
            for r in levels
        }
    return out


def summarise(raw: list[dict], protocols, levels, metric: str) -> dict:
    """Average raw scores of several checkpoints into curves, AUCs, relative drops."""
    lower = metric in LOWER_IS_BETTER
    clean = float(np.mean([r["clean"] for r in raw]))
    result: dict = {"clean": clean, "clean_std": float(np.std([r["clean"] for r in raw])),
                    "clean_per_checkpoint": [r["clean"] for r in raw], "protocols": {}}
    for protocol in protocols:
        if protocol == "conditions":
            result["conditions"] = {}
            for name in CONDITIONS:
                values = [r["conditions"][name] for r in raw]
                mean = float(np.mean(values))
                result["conditions"][name] = {
                    "present": list(CONDITIONS[name]), "mean": mean, "std": float(np.std(values)),
                    "relative_drop": relative_drop(clean, mean, lower), "per_checkpoint": values,
                }
            continue
        means = [float(np.mean([v for r in raw for v in r[protocol][level]])) for level in levels]
        stds = [float(np.std([v for r in raw for v in r[protocol][level]])) for level in levels]
        result["protocols"][protocol] = {
            "levels": list(levels), "mean": means, "std": stds,
            "auc": normalised_auc(list(levels), means),
            "relative_drop": [relative_drop(clean, v, lower) for v in means],
            # each checkpoint's own curve (mean over corruption seeds): for paired tests over
            # training seeds (benchmarks/robustness_pairs.py)
            "auc_per_checkpoint": [normalised_auc(list(levels), [float(np.mean(r[protocol][level])) for level in levels])
                                   for r in raw],
        }
    return result


def robustness_report(
    runs: dict[str, list[str | Path]],
    protocols=PROTOCOL_CHOICES,
    levels=DEFAULT_LEVELS,
    seeds=(1, 2, 3),
    metric: str | None = None,
    split: str = "test",
    data_overrides: list[str] = (),
    out_dir: str | Path | None = None,
) -> dict:
    """runs: {label: [checkpoint, ...]} (a run's training seeds). Evaluates every checkpoint under
    every protocol, level and corruption seed; returns {"metric", "split", "seeds", "runs": {label:
    summary}} and, with out_dir, writes robustness.json / .md / .png there."""
    from msakit.evaluate import check_data, load_model_from_checkpoint
    from msakit.train.runfolder import data_fingerprint

    bad = [p for p in protocols if p not in PROTOCOL_CHOICES]
    if bad:
        raise ConfigError(f"--protocol {bad[0]!r}: choose from {', '.join(PROTOCOL_CHOICES)}")
    if not seeds:
        raise ConfigError("--seeds must name at least one corruption seed")
    levels = _check_levels(levels)
    datasets: dict[str, tuple] = {}  # data section -> (data, fingerprint)
    report: dict = {"split": split, "seeds": list(seeds), "levels": levels, "runs": {}}
    said_block: set[tuple[str, str]] = set()  # (dataset, longest sequences) checked for block, once each
    for label, checkpoints in runs.items():
        raw = []
        for checkpoint in checkpoints:
            model, cfg, saved = load_model_from_checkpoint(checkpoint, data_overrides)
            key = repr(cfg.to_dict()["data"])
            if key not in datasets:  # loaded and hashed once for all checkpoints on the same data
                data = load_dataset(cfg.data)
                datasets[key] = (data, data_fingerprint(data))
            data, fingerprint = datasets[key]
            check_data(checkpoint, model, saved, data, fingerprint)
            if split not in data.splits:
                raise ConfigError(f"--split {split!r}: choose from {sorted(data.splits)}")
            if "block" in protocols:
                longest = {m: int(n.max(initial=0)) for m, n in data.splits[split].lengths.items()}
                if (data.info.name, str(longest)) not in said_block:
                    said_block.add((data.info.name, str(longest)))
                    _say_empty_blocks(data.info.name, longest, levels)
            chosen = metric or DEFAULT_METRICS.get(data.info.metric_family, "mae")
            if report.setdefault("metric", chosen) != chosen:
                raise ConfigError(f"{checkpoint}: its default metric {chosen} differs from the other runs' "
                                  f"{report['metric']}; pass --metric")
            raw.append(evaluate_model(model, cfg, data, protocols, levels, seeds, chosen, split))
        summary = summarise(raw, protocols, levels, report["metric"])
        report["runs"][label] = {"model": cfg.model_name, "dataset": data.info.name,
                                 "checkpoints": [str(c) for c in checkpoints], **summary}
    if out_dir is not None:
        out = Path(out_dir)
        write_json(report, out / "robustness.json")
        write_text(format_report(report) + "\n", out / "robustness.md")
        plot_report(report, out / "robustness.png")
    return report


def _say_empty_blocks(name: str, longest: dict[str, int], levels: list[float]) -> None:
    """Warn where `block` removes no frame of a modality (`longest`: its longest sequence, in
    frames): sequences of at most 2 frames (block keeps the first and last) at every level, or
    levels where round((n - 2) r) = 0 even for the longest sequence."""
    short = [m for m, n in longest.items() if n <= 2]
    if short:
        log.warning("%s: block removes no %s frame (at most 2 frames, and block keeps the first and "
                    "last)%s", name, "/".join(short),
                    ": its curve is the clean score for models that do not read the transcripts"
                    if len(short) == len(longest) else "")
    for m, n in longest.items():
        empty = [f"{r:g}" for r in levels if r > 0 and n > 2 and block_length(n, r) == 0]
        if empty:
            log.warning("%s: block removes no %s frame at level %s (round((n - 2) r) = 0 frames with at "
                        "most %d frames)", name, m, ", ".join(empty), n)


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def format_report(report: dict) -> str:
    """Markdown: a summary row per run (clean, AUC per protocol, conditions), then the curves."""
    metric, runs = report["metric"], report["runs"]
    first = next(iter(runs.values()))
    protocols = list(first["protocols"])
    conditions = list(first.get("conditions", {}))
    head = ["run", f"clean {metric}", *[f"AUC {p}" for p in protocols], *[f"{{{','.join(c)}}}" for c in conditions]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, run in runs.items():
        cells = [label, f"{_fmt(run['clean'])} ± {_fmt(run['clean_std'])}"]
        cells += [_fmt(run["protocols"][p]["auc"]) for p in protocols]
        cells += [_fmt(run["conditions"][c]["mean"]) for c in conditions]
        lines.append("| " + " | ".join(cells) + " |")
    for p in protocols:
        levels = first["protocols"][p]["levels"]
        lines += ["", f"{metric} under `{p}` by level (relative drop from clean in brackets)", "",
                  "| run | " + " | ".join(f"{r:g}" for r in levels) + " |", "|---|" + "---:|" * len(levels)]
        for label, run in runs.items():
            curve = run["protocols"][p]
            cells = [f"{_fmt(v)} ({100 * d + 0.0:+.1f}%)" for v, d in zip(curve["mean"], curve["relative_drop"], strict=True)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path) -> None:
    """One panel per protocol (a line per run; a single run gets one panel with a line per
    protocol), plus a bar panel of the MMIN conditions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs, metric = report["runs"], report["metric"]
    first = next(iter(runs.values()))
    protocols = list(first["protocols"])
    has_conditions = "conditions" in first
    panels = (1 if len(runs) == 1 else len(protocols)) if protocols else 0
    figure = Figure(figsize=(4.5 * max(1, panels + has_conditions), 3.8))
    FigureCanvasAgg(figure)
    axes = list(np.atleast_1d(figure.subplots(1, max(1, panels + has_conditions))))
    if panels == 1 and len(runs) == 1:
        for p in protocols:
            curve = first["protocols"][p]
            axes[0].errorbar(curve["levels"], curve["mean"], yerr=curve["std"], marker="o", capsize=2,
                             label=f"{p} (AUC {curve['auc']:.3f})")
        axes[0].set_title(next(iter(runs)))
    else:
        for ax, p in zip(axes, protocols, strict=False):
            for label, run in runs.items():
                curve = run["protocols"][p]
                ax.plot(curve["levels"], curve["mean"], marker="o", label=f"{label} ({curve['auc']:.3f})")
            ax.set_title(f"{p}")
    for ax in axes[:panels]:
        ax.set_xlabel("corruption level r")
        ax.set_ylabel(f"{metric} ({report['split']})")
        ax.legend(fontsize=7)
    if has_conditions:
        ax = axes[-1]
        names = list(first["conditions"])
        width = 0.8 / len(runs)
        for k, (label, run) in enumerate(runs.items()):
            xs = np.arange(len(names)) + k * width
            ax.bar(xs, [run["conditions"][c]["mean"] for c in names], width, label=label)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [n.upper() for n in names])
        ax.set_title("MMIN conditions (modalities present)")
        ax.set_ylabel(metric)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
