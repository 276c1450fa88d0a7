"""Metric conventions, checked against values computed by hand (see specs/metrics-and-data.md)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from msakit.metrics import (
    SELECTION_DEFAULTS,
    MetricWarning,
    aggregate_seeds,
    compute_metrics,
    confusion,
    format_table,
    iemocap_metrics,
    is_better,
    multiclass_metrics,
    regression_metrics,
    sims_metrics,
)

approx = pytest.approx

REGRESSION_KEYS = ["mae", "corr", "acc7", "acc5", "has0_acc2", "has0_f1", "non0_acc2", "non0_f1"]


# ---------------------------------------------------------------------------- MOSI / MOSEI


def test_regression_keys_and_full_precision():
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert list(m) == REGRESSION_KEYS
    assert all(isinstance(v, float) for v in m.values())
    # mae = (0 + 1 + 1) / 3 kept at full precision (no rounding inside)
    assert m["mae"] == approx(2 / 3, abs=1e-15)
    # deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / sqrt(2 * 2) = 0.5
    assert m["corr"] == approx(0.5)


def test_acc7_acc5_round_half_to_even():
    # np.round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0 (== 0); half-away-from-zero gives 0.25
    m = regression_metrics([0.5, 1.5, 2.5, -0.5], [0.0, 2.0, 2.0, 0.0])
    assert m["acc7"] == 1.0
    assert m["acc5"] == 1.0
    # the label side is rounded the same way: 2.5 -> 2, 1.5 -> 2 (half-away-from-zero: 0/2)
    m = regression_metrics([2.0, 3.0], [2.5, 1.5])
    assert m["acc7"] == 0.5


def test_acc7_acc5_clipping_and_unclipped_mae():
    # acc7: clip(p) = (3, -3, 2.6) -> (3, -3, 3) vs (3, -3, 2): 2/3
    # acc5: clip(p) = (2, -2, 2) vs clip(y) = (2, -2, 2): 1
    m = regression_metrics([3.4, -5.0, 2.6], [3.0, -3.0, 2.0])
    assert m["acc7"] == approx(2 / 3)
    assert m["acc5"] == 1.0
    # MAE on unclipped values: (0.4 + 2.0 + 0.6) / 3 = 1.0 (clipped would be 0.2)
    assert m["mae"] == approx(1.0)


def test_has0_uses_ge_and_non0_drops_zero_labels():
    # has0 (>= 0): p -> (F, T, T), y -> (T, T, F): 1/3 correct
    # non0: the label-0 sample is dropped; p > 0 -> (T, F) (0.0 is negative), y > 0 -> (T, F)
    m = regression_metrics([-0.5, 1.0, 0.0], [0.0, 1.0, -1.0])
    assert m["has0_acc2"] == approx(1 / 3)
    assert m["non0_acc2"] == 1.0
    assert m["non0_f1"] == 1.0


def test_weighted_f1_by_hand():
    # has0: p >= 0 -> (T, F, T, F), y >= 0 -> (T, T, T, F)
    # class T (support 3): P = 2/2, R = 2/3, F1 = 0.8
    # class F (support 1): P = 1/2, R = 1/1, F1 = 2/3
    # weighted = (3 * 0.8 + 1 * 2/3) / 4 = 23/30 (macro would be 11/15)
    m = regression_metrics([0.0, -0.2, 1.0, -1.0], [0.0, 0.5, 2.0, -1.5])
    assert m["has0_acc2"] == 0.75
    assert m["has0_f1"] == approx(23 / 30)
    # non0 drops sample 0: p > 0 -> (F, T, F), y > 0 -> (T, T, F); both classes have F1 2/3
    assert m["non0_acc2"] == approx(2 / 3)
    assert m["non0_f1"] == approx(2 / 3)


def test_constant_prediction_corr_nan_with_warning():
    with pytest.warns(MetricWarning, match="constant"):
        m = regression_metrics([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])
    assert math.isnan(m["corr"])
    assert m["mae"] == approx(2 / 3)  # the rest is still computed
    assert m["acc7"] == approx(1 / 3)


def test_all_zero_labels_non0_nan():
    with pytest.warns(MetricWarning) as record:
        m = regression_metrics([0.1, -0.2, 0.3], [0.0, 0.0, 0.0])
    messages = " ".join(str(w.message) for w in record)
    assert "non-zero" in messages and "constant" in messages
    assert math.isnan(m["non0_acc2"]) and math.isnan(m["non0_f1"])
    assert math.isnan(m["corr"])
    assert m["has0_acc2"] == approx(2 / 3)  # label 0 is non-negative


def test_regression_input_handling():
    col = np.array([[0.5], [-1.0], [2.0]])
    assert regression_metrics(col, col.ravel().tolist())["mae"] == 0.0
    with pytest.raises(ValueError, match="lengths differ"):
        regression_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        regression_metrics([], [])
    with pytest.raises(ValueError, match="NaN"):
        regression_metrics([np.nan, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        regression_metrics(np.zeros((3, 2)), np.zeros(3))


# ---------------------------------------------------------------------------- CH-SIMS


def test_sims_bin_boundaries_go_to_lower_bin():
    p = [-0.1, 0.1, 0.7, 0.0, -0.7]
    y = [-0.2, 0.05, 0.5, -0.5, -0.9]
    m = sims_metrics(p, y)
    assert list(m) == ["mae", "corr", "acc2", "acc3", "acc5", "f1"]
    # acc2, (-inf, 0], (0, inf): p -> (0, 1, 1, 0, 0) = y -> (0, 1, 1, 0, 0)
    assert m["acc2"] == 1.0
    assert m["f1"] == 1.0
    # acc3, cuts -0.1, 0.1: p -> (0, 1, 2, 1, 0), y -> (0, 1, 2, 0, 0)
    assert m["acc3"] == approx(4 / 5)
    # acc5, cuts -0.7, -0.1, 0.1, 0.7: p -> (1, 2, 3, 2, 0), y -> (1, 2, 3, 1, 0)
    # ([a, b) intervals would give p -> (2, 3, 4, 2, 1): 0/5)
    assert m["acc5"] == approx(4 / 5)


def test_sims_clips_before_mae_and_corr():
    m = sims_metrics([1.5, -2.0, 0.0], [1.0, -1.0, 0.0])
    assert m["mae"] == 0.0  # unclipped MAE would be 0.5
    assert m["corr"] == approx(1.0)
    assert m["acc5"] == 1.0


def test_sims_weighted_f1():
    # acc2 classes: p -> (0, 1, 0, 1), y -> (1, 1, 0, 0); each class F1 = 1/2
    m = sims_metrics([0.0, 0.5, -0.5, 0.2], [0.3, 0.4, -0.1, -0.2])
    assert m["acc2"] == 0.5
    assert m["f1"] == approx(0.5)


# ---------------------------------------------------------------------------- IEMOCAP

IEMO_LABELS = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
IEMO_PREDS = np.array([[1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def test_iemocap_per_emotion_and_mean():
    m = iemocap_metrics(IEMO_PREDS, IEMO_LABELS)
    # neutral: perfect
    assert m["neutral_acc"] == 1.0 and m["neutral_f1"] == 1.0
    # happy: y (1, 1, 0, 0), p (1, 0, 0, 0); class 1 F1 = 2/3, class 0 F1 = 0.8 -> 11/15
    assert m["happy_acc"] == 0.75
    assert m["happy_f1"] == approx(11 / 15)
    # sad: y all 0, p all 1 -> 0, and F1 0
    assert m["sad_acc"] == 0.0 and m["sad_f1"] == 0.0
    assert m["angry_acc"] == 1.0 and m["angry_f1"] == 1.0
    assert m["mean_acc"] == approx(2.75 / 4)
    assert m["mean_f1"] == approx((1 + 11 / 15 + 0 + 1) / 4)


def test_iemocap_logits_through_dispatcher():
    logits = np.stack([1.0 - IEMO_PREDS, IEMO_PREDS.astype(float)], axis=-1)  # [N, T, 2]
    one_hot = np.eye(2)[IEMO_LABELS]  # MulT ships labels as [N, T, 2]
    m = compute_metrics("iemocap", logits, one_hot)
    assert m == approx(iemocap_metrics(IEMO_PREDS, IEMO_LABELS))
    named = compute_metrics(
        "iemocap", IEMO_PREDS[:, :2], IEMO_LABELS[:, :2], class_names=("a", "b")
    )
    assert named["b_acc"] == 0.75 and named["mean_acc"] == approx(0.875)
    with pytest.raises(ValueError, match="names"):
        iemocap_metrics(IEMO_PREDS[:, :2], IEMO_LABELS[:, :2])


# ---------------------------------------------------------------------------- multi-class

MC_LABELS = [0, 0, 0, 0, 1, 2]
MC_PREDS = [0, 0, 0, 1, 1, 0]


def test_multiclass_macro_vs_weighted():
    # class 0 (support 4): P 3/4, R 3/4, F1 3/4; class 1 (support 1): P 1/2, R 1, F1 2/3;
    # class 2 (support 1): never predicted -> P 0 (zero_division), R 0, F1 0
    m = multiclass_metrics(MC_PREDS, MC_LABELS, 3)
    assert list(m) == ["acc", "f1_macro", "precision_macro", "recall_macro", "f1_weighted"]
    assert m["acc"] == approx(4 / 6)
    assert m["f1_macro"] == approx((3 / 4 + 2 / 3) / 3)  # 17/36
    assert m["precision_macro"] == approx((3 / 4 + 1 / 2) / 3)  # 5/12
    assert m["recall_macro"] == approx((3 / 4 + 1) / 3)  # 7/12
    assert m["f1_weighted"] == approx((4 * 3 / 4 + 2 / 3) / 6)  # 11/18


def test_multiclass_absent_class_counts_in_macro():
    # labels=range(4): class 3 appears nowhere and contributes F1 0 to the macro mean
    m = multiclass_metrics(MC_PREDS, MC_LABELS, 4)
    assert m["f1_macro"] == approx((3 / 4 + 2 / 3) / 4)
    assert m["f1_weighted"] == approx(11 / 18)


def test_confusion_rows_are_true_class():
    cm = confusion(MC_PREDS, MC_LABELS, 3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [0, 1, 0], [1, 0, 0]])


def test_multiclass_dispatcher_scores_and_ints():
    scores = np.eye(3)[MC_PREDS] * 2.0 - 1.0  # [N, K]; argmax = MC_PREDS
    from_scores = compute_metrics("multiclass", scores, MC_LABELS)  # K inferred
    assert from_scores == approx(multiclass_metrics(MC_PREDS, MC_LABELS, 3))
    assert compute_metrics("multiclass", MC_PREDS, MC_LABELS, num_classes=3) == from_scores
    with pytest.raises(ValueError, match="num_classes"):
        compute_metrics("multiclass", MC_PREDS, MC_LABELS)
    with pytest.raises(ValueError, match="outside"):
        multiclass_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="integer"):
        multiclass_metrics([0.5, 1.0], [0, 1], 3)
    with pytest.raises(ValueError, match="unknown metric family"):
        compute_metrics("mosei2", np.zeros(2), np.zeros(2))


# ---------------------------------------------------------------------------- selection


@pytest.mark.parametrize("family", sorted(SELECTION_DEFAULTS))
def test_selection_metric_is_produced(family):
    pred = {
        "mosi": (np.array([0.3, -1.2, 2.0]), np.array([0.5, -1.0, 1.0])),
        "sims": (np.array([0.3, -0.8, 0.6]), np.array([0.2, -0.6, 0.4])),
        "iemocap": (IEMO_PREDS, IEMO_LABELS),
        "multiclass": (np.array(MC_PREDS), np.array(MC_LABELS)),
    }[family]
    key, mode = SELECTION_DEFAULTS[family]
    m = compute_metrics(family, *pred, num_classes=3)
    assert math.isfinite(m[key]) and mode in ("min", "max")


def test_is_better():
    assert is_better(0.5, 0.6, "min") and not is_better(0.7, 0.6, "min")
    assert is_better(0.7, 0.6, "max") and not is_better(0.5, 0.6, "max")
    assert not is_better(0.6, 0.6, "max")  # ties keep the earlier checkpoint
    assert is_better(0.1, None, "max") and is_better(0.1, float("nan"), "min")
    assert not is_better(float("nan"), 0.6, "min") and not is_better(float("nan"), None, "max")
    with pytest.raises(ValueError):
        is_better(1.0, 0.0, "up")


# ---------------------------------------------------------------------------- seeds and table


def test_aggregate_seeds_population_std_and_nan():
    mean, std = aggregate_seeds([{"mae": 1.0, "acc7": 0.5}, {"mae": 3.0, "acc7": 0.7}])
    assert mean == approx({"mae": 2.0, "acc7": 0.6})
    assert std["mae"] == approx(1.0)  # ddof=0; the sample std would be sqrt(2)
    assert std["acc7"] == approx(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN propagates without numpy warnings
        mean, _ = aggregate_seeds([{"corr": float("nan")}, {"corr": 0.5}])
    assert math.isnan(mean["corr"])
    with pytest.raises(ValueError):
        aggregate_seeds([])
    with pytest.raises(ValueError, match="keys"):
        aggregate_seeds([{"mae": 1.0}, {"acc7": 0.5}])


def test_format_table():
    mean = {"mae": 0.8712, "corr": 0.6981, "acc7": 0.38123, "has0_f1": 0.80449}
    std = {"mae": 0.0104, "corr": 0.0049, "acc7": 0.0061, "has0_f1": 0.00412}
    table = format_table(
        [("MulT", mean, std), ("single", {"mae": 0.9}, {})], ["mae", "corr", "acc7", "has0_f1"]
    )
    assert table == (
        "| model | mae | corr | acc7 | has0_f1 |\n"
        "|---|---:|---:|---:|---:|\n"
        "| MulT | 0.871 ± 0.010 | 0.698 ± 0.005 | 38.1 ± 0.6 | 80.4 ± 0.4 |\n"
        "| single | 0.900 | - | - | - |"
    )
    assert mean["acc7"] == 0.38123  # inputs are not modified
