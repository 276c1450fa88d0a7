"""Evaluation metrics, following the field's conventions exactly (see specs/metrics-and-data.md).

All functions are pure: they take full-precision predictions (numpy arrays or lists) and return
full-precision Python floats. Nothing is rounded except in `format_table`, for display.
Accuracies and F1 scores are fractions in [0, 1], not percentages.

Regression, CMU-MOSI / CMU-MOSEI (`regression_metrics`), as in MMSA:
    mae        mean |p - y| on UNCLIPPED values
    corr       Pearson r; NaN (with a `MetricWarning`) when p or y is constant
    acc7       round(clip(p, -3, 3)) == round(clip(y, -3, 3)), numpy half-to-even rounding
               (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0); acc5 the same with clip to [-2, 2]
    has0_*     all samples, class = value >= 0 ("negative vs non-negative")
    non0_*     only samples with y != 0, class = value > 0 ("negative vs positive");
               NaN (with a warning) when every label is 0. Papers' "Acc-2 a/b" = has0/non0.
    *_f1       sklearn's weighted F1.
Regression, CH-SIMS (`sims_metrics`): p and y are clipped to [-1, 1] first; mae/corr use the clipped
values. Classes use (a, b] intervals, as MMSA's SIMS code: a value equal to a cut goes to the LOWER
bin. acc2: (-inf, 0], (0, inf); acc3 cuts -0.1, 0.1; acc5 cuts -0.7, -0.1, 0.1, 0.7; f1 = weighted
F1 on the two acc2 classes.
IEMOCAP, MulT protocol (`iemocap_metrics`): one binary task per emotion; per-emotion accuracy and
weighted F1, and their unweighted means over emotions.
Multi-class (`multiclass_metrics`): accuracy, macro F1/precision/recall and weighted F1 over
`labels=range(num_classes)` with zero_division=0, so a class absent from both labels and
predictions counts as 0 in the macro averages.

Inputs must be finite: NaN/inf raise ValueError (a diverged model must not be scored silently).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

__all__ = [
    "IEMOCAP_EMOTIONS",
    "SELECTION_DEFAULTS",
    "MetricWarning",
    "aggregate_seeds",
    "compute_metrics",
    "confusion",
    "format_table",
    "iemocap_metrics",
    "is_better",
    "multiclass_metrics",
    "regression_metrics",
    "sims_metrics",
]

IEMOCAP_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")

# family -> (validation metric to select on, direction)
SELECTION_DEFAULTS: dict[str, tuple[str, str]] = {
    "mosi": ("mae", "min"),
    "sims": ("mae", "min"),
    "iemocap": ("mean_f1", "max"),
    "multiclass": ("f1_macro", "max"),
}

SIMS_CUTS: dict[str, tuple[float, ...]] = {
    "acc2": (0.0,),
    "acc3": (-0.1, 0.1),
    "acc5": (-0.7, -0.1, 0.1, 0.7),
}


class MetricWarning(RuntimeWarning):
    """A metric is undefined for this input (reported as NaN)."""


# ---------------------------------------------------------------------------- input checks


def _as_1d(x: object, name: str, classes: bool = False) -> np.ndarray:
    """[N], [N, 1] or [N, 1, 1] -> [N] floats (or int64 class indices); else an error."""
    a = _as_classes(x, name) if classes else np.asarray(x, dtype=float)
    if a.ndim > 1 and all(s == 1 for s in a.shape[1:]):
        a = a.reshape(a.shape[0])
    if a.ndim != 1:
        raise ValueError(f"{name} must have shape [N] (or [N, 1]), got {a.shape}")
    return a


def _check_pair(pred: np.ndarray, label: np.ndarray) -> None:
    if pred.shape[0] != label.shape[0]:
        raise ValueError(
            f"prediction and label lengths differ: {pred.shape[0]} vs {label.shape[0]}"
        )
    if pred.shape[0] == 0:
        raise ValueError("cannot compute metrics on empty input")
    for name, a in (("prediction", pred), ("label", label)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf ({int(np.sum(~np.isfinite(a)))} values)")


def _as_classes(x: object, name: str) -> np.ndarray:
    """Integer class array; float input is accepted only when every value is integral."""
    a = np.asarray(x)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold integer class indices")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    return a.astype(np.int64)


def _pearson(p: np.ndarray, y: np.ndarray) -> float:
    if np.all(p == p[0]) or np.all(y == y[0]):
        warnings.warn(
            "Pearson correlation is undefined for a constant prediction or label; corr = NaN",
            MetricWarning,
            stacklevel=3,
        )
        return math.nan
    return float(np.corrcoef(p, y)[0, 1])


def _f1w(y: np.ndarray, p: np.ndarray) -> float:
    return float(f1_score(y, p, average="weighted", zero_division=0))


# ---------------------------------------------------------------------------- regression


def regression_metrics(pred: object, label: object) -> dict[str, float]:
    """CMU-MOSI / CMU-MOSEI metrics. pred, label: [N] floats (labels in [-3, 3])."""
    p, y = _as_1d(pred, "prediction"), _as_1d(label, "label")
    _check_pair(p, y)
    out: dict[str, float] = {
        "mae": float(np.mean(np.abs(p - y))),
        "corr": _pearson(p, y),
    }
    for key, bound in (("acc7", 3.0), ("acc5", 2.0)):
        rp = np.round(np.clip(p, -bound, bound))  # numpy rounds half to even
        ry = np.round(np.clip(y, -bound, bound))
        out[key] = float(np.mean(rp == ry))
    yc, pc = y >= 0, p >= 0
    out["has0_acc2"] = float(np.mean(yc == pc))
    out["has0_f1"] = _f1w(yc, pc)
    nz = y != 0
    if nz.any():
        yc, pc = y[nz] > 0, p[nz] > 0
        out["non0_acc2"] = float(np.mean(yc == pc))
        out["non0_f1"] = _f1w(yc, pc)
    else:
        warnings.warn("no non-zero label: non0_acc2 / non0_f1 = NaN", MetricWarning, stacklevel=2)
        out["non0_acc2"] = out["non0_f1"] = math.nan
    return out


def _bin(x: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    # right=True: bin i is (cuts[i-1], cuts[i]], so a value equal to a cut goes to the lower bin.
    return np.digitize(x, np.asarray(cuts, dtype=float), right=True)


def sims_metrics(pred: object, label: object) -> dict[str, float]:
    """CH-SIMS metrics. pred, label: [N] floats; both clipped to [-1, 1] before anything else."""
    p, y = _as_1d(pred, "prediction"), _as_1d(label, "label")
    _check_pair(p, y)
    p, y = np.clip(p, -1.0, 1.0), np.clip(y, -1.0, 1.0)
    out: dict[str, float] = {
        "mae": float(np.mean(np.abs(p - y))),
        "corr": _pearson(p, y),
    }
    for key, cuts in SIMS_CUTS.items():
        out[key] = float(np.mean(_bin(p, cuts) == _bin(y, cuts)))
    out["f1"] = _f1w(_bin(y, SIMS_CUTS["acc2"]), _bin(p, SIMS_CUTS["acc2"]))
    return out


# ---------------------------------------------------------------------------- classification


def iemocap_metrics(
    pred_class: object, labels: object, names: Sequence[str] = IEMOCAP_EMOTIONS
) -> dict[str, float]:
    """IEMOCAP, MulT protocol. pred_class, labels: [N, T] ints in {0, 1}, one column per emotion.

    Returns `{name}_acc`, `{name}_f1` (weighted F1) per emotion and `mean_acc`, `mean_f1`.
    """
    p, y = _as_classes(pred_class, "pred_class"), _as_classes(labels, "labels")
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"pred_class and labels must both be [N, T]; got {p.shape}, {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("cannot compute metrics on empty input")
    if len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} emotion names for {p.shape[1]} columns")
    if not (np.isin(p, (0, 1)).all() and np.isin(y, (0, 1)).all()):
        raise ValueError("IEMOCAP predictions and labels must be 0/1")
    out: dict[str, float] = {}
    for t, name in enumerate(names):
        out[f"{name}_acc"] = float(accuracy_score(y[:, t], p[:, t]))
        out[f"{name}_f1"] = _f1w(y[:, t], p[:, t])
    out["mean_acc"] = float(np.mean([out[f"{n}_acc"] for n in names]))
    out["mean_f1"] = float(np.mean([out[f"{n}_f1"] for n in names]))
    return out


def _check_classes(p: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    _check_pair(p, y)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, a in (("pred_class", p), ("labels", y)):
        if a.min() < 0 or a.max() >= num_classes:
            raise ValueError(f"{name} has values outside [0, {num_classes})")


def multiclass_metrics(pred_class: object, labels: object, num_classes: int) -> dict[str, float]:
    """Single-label classification. pred_class, labels: [N] ints in [0, num_classes)."""
    p, y = _as_1d(pred_class, "pred_class", True), _as_1d(labels, "labels", True)
    _check_classes(p, y, num_classes)
    kw = {"labels": list(range(num_classes)), "zero_division": 0}
    return {
        "acc": float(accuracy_score(y, p)),
        "f1_macro": float(f1_score(y, p, average="macro", **kw)),
        "precision_macro": float(precision_score(y, p, average="macro", **kw)),
        "recall_macro": float(recall_score(y, p, average="macro", **kw)),
        "f1_weighted": float(f1_score(y, p, average="weighted", **kw)),
    }


def confusion(pred_class: object, labels: object, num_classes: int) -> np.ndarray:
    """[K, K] int counts; row = true class, column = predicted class."""
    p, y = _as_1d(pred_class, "pred_class", True), _as_1d(labels, "labels", True)
    _check_classes(p, y, num_classes)
    return confusion_matrix(y, p, labels=list(range(num_classes)))


# ---------------------------------------------------------------------------- dispatch


def compute_metrics(
    family: str,
    prediction: np.ndarray,
    labels: np.ndarray,
    num_classes: int = 0,
    class_names: Sequence[str] = (),
) -> dict[str, float]:
    """Metrics for one task family: "mosi", "sims", "iemocap" or "multiclass".

    prediction: mosi/sims [N] floats; multiclass [N, K] scores (argmax taken) or [N] ints
    (num_classes inferred from K when 0); iemocap [N, T, 2] logits (argmax over the last axis)
    or [N, T] ints, labels [N, T] ints (or [N, T, 2] one-hot), class_names the T emotion names.
    """
    pred = np.asarray(prediction)
    if family == "mosi":
        return regression_metrics(pred, labels)
    if family == "sims":
        return sims_metrics(pred, labels)
    if family == "iemocap":
        lab = np.asarray(labels)
        if pred.ndim == 3:
            pred = pred.argmax(axis=-1)
        if lab.ndim == 3:
            lab = lab.argmax(axis=-1)
        return iemocap_metrics(pred, lab, tuple(class_names) or IEMOCAP_EMOTIONS)
    if family == "multiclass":
        if pred.ndim == 2 and pred.shape[1] > 1:
            if num_classes == 0:
                num_classes = pred.shape[1]
            elif num_classes != pred.shape[1]:
                raise ValueError(f"num_classes={num_classes} but scores have {pred.shape[1]}")
            pred = pred.argmax(axis=1)
        if num_classes == 0:
            raise ValueError("num_classes is required when predictions are class indices")
        return multiclass_metrics(pred, labels, num_classes)
    raise ValueError(
        f"unknown metric family {family!r}; expected one of {list(SELECTION_DEFAULTS)}"
    )


def is_better(new: float, best: float | None, mode: str) -> bool:
    """Strict improvement of `new` over `best` ("min" or "max").

    NaN `new` is never better; `best` None (or NaN) is beaten by any non-NaN `new`.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if new is None or math.isnan(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new < best if mode == "min" else new > best


# ---------------------------------------------------------------------------- seeds and display


def aggregate_seeds(
    per_seed: Sequence[dict[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    """(mean, std) per key over seeds; std is the POPULATION std (ddof=0), as MMSA.

    A NaN in any seed gives NaN for that key (never silently dropped). All seeds must share keys.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds needs at least one seed")
    keys = list(per_seed[0])
    for i, d in enumerate(per_seed):
        if set(d) != set(keys):
            raise ValueError(f"seed {i} has keys {sorted(d)}, expected {sorted(keys)}")
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for k in keys:
        v = np.array([d[k] for d in per_seed], dtype=float)
        mean[k], std[k] = float(np.mean(v)), float(np.std(v))
    return mean, std


def _is_fraction(key: str) -> bool:
    return any(t in key for t in ("acc", "f1", "precision", "recall"))


def _cell(key: str, mean: dict[str, float], std: dict[str, float]) -> str:
    if key not in mean:
        return "-"
    scale, fmt = (100.0, ".1f") if _is_fraction(key) else (1.0, ".3f")
    text = format(mean[key] * scale, fmt)
    if key in std:
        text += " ± " + format(std[key] * scale, fmt)
    return text


def format_table(
    rows: Sequence[tuple[str, dict[str, float], dict[str, float]]],
    keys: Sequence[str],
    name_header: str = "model",
) -> str:
    """Markdown table, one row per (name, mean, std).

    Accuracy/F1/precision/recall keys are shown as percent with 1 decimal ("78.1 ± 0.4"); other
    keys (mae, corr) with 3 decimals. A key missing from a row's mean shows "-"; a key missing
    from its std shows the mean alone (e.g. a single seed).
    """
    lines = [
        "| " + " | ".join([name_header, *keys]) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, mean, std in rows:
        lines.append("| " + " | ".join([name, *(_cell(k, mean, std) for k in keys)]) + " |")
    return "\n".join(lines)
