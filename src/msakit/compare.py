"""Side-by-side comparison of finished runs with significance tests (`msakit compare`).

Reads what every `msakit train` output folder holds: results.json (per-seed test metrics),
seed_<s>/predictions_test.csv and seed_<s>/log.jsonl. For one metric (default non0_acc2 for
MOSI-type data, acc2 SIMS, mean_f1 IEMOCAP, acc multi-class):

- per run: mean ± population std over seeds (as every msakit table) and a 95% confidence
  interval of the mean, mean ± t_{0.975, n-1} * s / sqrt(n) with s the sample std (ddof 1);
- per pair of runs:
    paired t-test over the seeds both runs share (two-sided, `paired_t_test`; needs >= 2 shared
    seeds), on the per-seed test metrics;
    paired bootstrap over test samples (`paired_bootstrap`): the same resampled test indices are
    applied to both runs' per-seed predictions, the metric difference is averaged over the shared
    seeds, and the two-sided p-value is the share of resampled differences at least as far from
    the observed one as the observed one is from 0 (the bootstrap distribution shifted to the
    null), (1 + count) / (B + 1). Both runs must have predicted the same test ids with the same
    labels (checked).
- a plot of the training curves from log.jsonl: the validation metric and every training loss
  term per epoch, mean over seeds, one line per run.

Entry point: `compare_runs(run_dirs, metric, ...)` -> dict; writes compare.json, compare.md,
curves.png into `out_dir`.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from msakit.analysis import LOWER_IS_BETTER
from msakit.config import ConfigError
from msakit.data.base import DatasetInfo
from msakit.metrics import compute_metrics
from msakit.robustness import DEFAULT_METRICS
from msakit.train.checkpoint import CheckpointError, write_json, write_text

log = logging.getLogger(__name__)

BOOTSTRAP_SKIPS = ("loss",)
"""Test metrics without a bootstrap: the loss is not a function of the predictions alone."""


def confidence_interval(values, level: float = 0.95) -> tuple[float, float]:
    """t interval of the mean of `values` (sample std, ddof 1); (nan, nan) for fewer than 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def paired_t_test(a, b) -> tuple[float, float]:
    """Two-sided paired t-test of a[i] - b[i]: -> (t, p). Equal pairs everywhere: (0, 1)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return (0.0, 1.0) if d.mean() == 0 else (math.copysign(math.inf, d.mean()), 0.0)
    t = d.mean() / (sd / math.sqrt(n))
    return float(t), float(2 * stats.t.sf(abs(t), n - 1))


def per_sample_terms(metric: str, prediction: np.ndarray, label: np.ndarray, info: DatasetInfo):
    """(score [N], weight [N]) with metric = sum(score) / sum(weight) over any sample multiset,
    for the decomposable metrics of classification and of the MOSI family (whose definitions
    these are); None for others (F1, Corr, every CH-SIMS metric: computed per resample)."""
    if info.task == "classification":
        return ((prediction == label).astype(float), np.ones(len(label))) if metric in ("acc",) else None
    if info.task != "regression" or info.metric_family != "mosi":
        return None
    p, y = prediction, label
    ones = np.ones(len(y))
    if metric == "mae":
        return np.abs(p - y), ones
    if metric in ("acc7", "acc5"):
        bound = 3.0 if metric == "acc7" else 2.0
        return (np.round(np.clip(p, -bound, bound)) == np.round(np.clip(y, -bound, bound))).astype(float), ones
    if metric == "has0_acc2":
        return ((p >= 0) == (y >= 0)).astype(float), ones
    if metric == "non0_acc2":
        nonzero = (y != 0).astype(float)
        return ((p > 0) == (y > 0)) * nonzero, nonzero
    return None


def resampled_metric(metric: str, prediction: np.ndarray, label: np.ndarray, info: DatasetInfo,
                     indices: np.ndarray) -> np.ndarray:
    """The metric on each resample: indices [B, N] -> [B]."""
    terms = per_sample_terms(metric, prediction, label, info)
    if terms is not None:
        score, weight = terms
        with np.errstate(invalid="ignore", divide="ignore"):
            return score[indices].sum(axis=1) / weight[indices].sum(axis=1)
    out = np.empty(len(indices))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, rows in enumerate(indices):
            out[b] = compute_metrics(info.metric_family, prediction[rows], label[rows],
                                     num_classes=info.num_classes, class_names=info.class_names)[metric]
    return out


def paired_bootstrap(pairs: list[tuple[np.ndarray, np.ndarray]], label: np.ndarray, metric: str,
                     info: DatasetInfo, resamples: int = 2000, seed: int = 0) -> dict:
    """pairs: per shared seed (prediction of run A, of run B) on the same test samples.
    -> {"difference": observed mean over seeds of metric(A) - metric(B), "p": two-sided p,
        "ci": 95% percentile interval of the resampled difference}."""
    n = len(label)
    everything = np.arange(n)[None, :]
    observed = float(np.mean([resampled_metric(metric, a, label, info, everything)[0]
                              - resampled_metric(metric, b, label, info, everything)[0] for a, b in pairs]))
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diffs = np.mean([resampled_metric(metric, a, label, info, indices)
                     - resampled_metric(metric, b, label, info, indices) for a, b in pairs], axis=0)
    diffs = diffs[np.isfinite(diffs)]
    extreme = int(np.sum(np.abs(diffs - observed) >= abs(observed) - 1e-12))
    return {"difference": observed, "p": (1 + extreme) / (1 + len(diffs)),
            "ci": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}


def read_predictions(path: Path, task: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """predictions_test.csv -> (ids, labels [N], predictions [N]) for regression / classification."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    if not rows or not {"id", "label", "prediction"} <= set(rows[0]):
        raise CheckpointError(f"{path}: expected the columns id, label, prediction")
    cast = float if task == "regression" else int
    try:
        labels = np.array([cast(r["label"]) for r in rows])
        predictions = np.array([cast(r["prediction"]) for r in rows])
    except ValueError as e:
        raise CheckpointError(f"{path}: bad number ({e})") from e
    return [r["id"] for r in rows], labels, predictions


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no results.json (not a finished `msakit train` output folder)")
    try:
        results = json.loads(path.read_text())
        info = DatasetInfo.from_dict(results["info"])
        per_seed = {int(r["seed"]): r["test"] for r in results["per_seed"]}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a msakit results file ({e})") from e
    return {"dir": run_dir, "model": results.get("model", "?"), "info": info, "test": per_seed,
            "fingerprint": results.get("data_fingerprint")}


def _predictions_path(run: dict, seed: int) -> Path:
    return run["dir"] / f"seed_{seed}" / "predictions_test.csv"


def _predictions(run: dict, seed: int):
    if run["info"].task not in ("regression", "classification"):
        return None
    path = _predictions_path(run, seed)
    return read_predictions(path, run["info"].task) if path.is_file() else None


def compare_runs(runs: dict[str, str | Path], metric: str | None = None, resamples: int = 2000,
                 seed: int = 0, out_dir: str | Path | None = None) -> dict:
    """runs: {label: run folder}. -> {"metric", "runs": {label: stats}, "pairs": [...]}."""
    if resamples < 1:
        raise ConfigError(f"--bootstrap {resamples}: give at least 1 resample")
    loaded = {label: load_run(d) for label, d in runs.items()}
    infos = {(r["info"].name, r["info"].metric_family) for r in loaded.values()}
    if len(infos) > 1:
        raise CheckpointError(f"compare: the runs are on different datasets {sorted(infos)}")
    if len({json.dumps(r["fingerprint"], sort_keys=True) for r in loaded.values()}) > 1:
        log.warning("compare: the runs were trained on different data of %s (their data fingerprints "
                    "differ); the pairs compare models and data together", next(iter(infos))[0])
    family = next(iter(loaded.values()))["info"].metric_family
    metric = metric or DEFAULT_METRICS.get(family, "mae")
    table = {}
    for label, run in loaded.items():
        missing = [s for s, m in run["test"].items() if metric not in m]
        if missing:
            raise CheckpointError(f"{run['dir']}: no test metric {metric!r} (seed {missing[0]}); "
                                  f"choose from {', '.join(sorted(next(iter(run['test'].values()))))}")
        values = [run["test"][s][metric] for s in sorted(run["test"])]
        low, high = confidence_interval(values)
        table[label] = {"dir": str(run["dir"]), "model": run["model"], "seeds": sorted(run["test"]),
                        "values": values, "mean": float(np.mean(values)), "std": float(np.std(values)),
                        "ci95": [low, high]}
    pairs = []
    for (la, a), (lb, b) in itertools.combinations(loaded.items(), 2):
        shared = sorted(set(a["test"]) & set(b["test"]))
        entry: dict = {"a": la, "b": lb, "shared_seeds": shared,
                       "difference": float(np.mean([a["test"][s][metric] - b["test"][s][metric] for s in shared]))
                       if shared else math.nan}
        t, p = paired_t_test([a["test"][s][metric] for s in shared], [b["test"][s][metric] for s in shared])
        entry["t_test"] = {"t": t, "p": p}
        preds = []
        for s in shared:
            pa, pb = _predictions(a, s), _predictions(b, s)
            if pa is None or pb is None:
                missing = [str(_predictions_path(r, s)) for r, x in ((a, pa), (b, pb)) if x is None]
                log.warning("compare %s vs %s: seed %d left out of the bootstrap (missing %s)",
                            la, lb, s, ", ".join(missing))
                continue
            if pa[0] != pb[0] or not np.array_equal(pa[1], pb[1]):
                raise CheckpointError(f"{a['dir']} and {b['dir']}: seed {s} predicted different test "
                                      "samples or labels; the bootstrap needs the same test split")
            preds.append((pa[2], pb[2], pa[1]))
        if preds and metric not in BOOTSTRAP_SKIPS:
            entry["bootstrap"] = {"seeds": len(preds), "resamples": resamples,
                                  **paired_bootstrap([(x, y) for x, y, _ in preds], preds[0][2], metric,
                                                     a["info"], resamples, seed)}
        pairs.append(entry)
    report = {"metric": metric, "lower_is_better": metric in LOWER_IS_BETTER, "runs": table, "pairs": pairs}
    if out_dir is not None:
        out = Path(out_dir)
        write_json(report, out / "compare.json")
        write_text(format_comparison(report) + "\n", out / "compare.md")
        plot_curves(runs, metric, out / "curves.png")
    return report


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def format_comparison(report: dict) -> str:
    metric = report["metric"]
    lines = [f"| run | seeds | {metric} mean ± std | 95% CI |", "|---|---:|---:|---|"]
    for label, row in report["runs"].items():
        ci = "n/a" if math.isnan(row["ci95"][0]) else f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]"
        lines.append(f"| {label} | {len(row['seeds'])} | {row['mean']:.4f} ± {row['std']:.4f} | {ci} |")
    lines += ["", "| A | B | mean A - B | shared seeds | paired t-test p | bootstrap p (test samples) |",
              "|---|---|---:|---:|---:|---:|"]
    for pair in report["pairs"]:
        boot = pair.get("bootstrap")
        lines.append(f"| {pair['a']} | {pair['b']} | {pair['difference']:+.4f} | {len(pair['shared_seeds'])} | "
                     f"{_p(pair['t_test']['p'])} | {_p(boot['p']) if boot else 'n/a'} |")
    return "\n".join(lines)


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(runs: dict[str, str | Path], metric: str, path: str | Path) -> None:
    """Validation metric and each training loss term per epoch (mean over seeds), a line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logs = {label: [_read_log(p) for p in sorted(Path(d).glob("seed_*/log.jsonl"))] for label, d in runs.items()}
    keys = [f"valid_{metric}"]
    for records in logs.values():
        for rec in (r for seed in records for r in seed):
            keys += [k for k in rec if k.startswith("train_") and k not in keys and isinstance(rec[k], (int, float))]
    figure = Figure(figsize=(4 * len(keys), 3.5))
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, len(keys)))
    for ax, key in zip(axes, keys, strict=True):
        for label, seeds in logs.items():
            by_epoch: dict[int, list[float]] = {}
            for seed in seeds:
                for rec in seed:
                    if isinstance(rec.get(key), (int, float)):
                        by_epoch.setdefault(rec["epoch"], []).append(rec[key])
            if by_epoch:
                epochs = sorted(by_epoch)
                ax.plot(epochs, [np.mean(by_epoch[e]) for e in epochs], label=label)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
