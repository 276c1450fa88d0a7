"""`msakit compare`: statistics against scipy on known cases, and the command on tiny runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from test_robustness import SMALL

from msakit.cli import main
from msakit.compare import confidence_interval, paired_bootstrap, paired_t_test, resampled_metric
from msakit.data.base import DatasetInfo

INFO = DatasetInfo("x", "regression", {"text": 1, "audio": 1, "vision": 1}, {"text": 1, "audio": 1, "vision": 1},
                   metric_family="mosi", label_range=(-3.0, 3.0))


def test_paired_t_test_matches_scipy():
    a = np.array([0.81, 0.79, 0.84, 0.80, 0.83])
    b = np.array([0.78, 0.79, 0.80, 0.77, 0.82])
    t, p = paired_t_test(a, b)
    expected = stats.ttest_rel(a, b)
    assert t == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    assert paired_t_test(a, a) == (0.0, 1.0)
    assert np.isnan(paired_t_test([1.0], [2.0])[1])


def test_confidence_interval_matches_scipy():
    x = np.array([0.71, 0.74, 0.69, 0.73])
    low, high = confidence_interval(x)
    expected = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (low, high) == pytest.approx(expected)


def test_resampled_metric_equals_compute_metrics():
    rng = np.random.default_rng(0)
    y = np.round(rng.normal(size=60), 1)
    y[:5] = 0.0
    p = rng.normal(size=60)
    rows = rng.integers(0, 60, size=(3, 60))
    from msakit.metrics import regression_metrics

    for metric in ("mae", "non0_acc2", "has0_acc2", "acc7", "acc5", "corr", "non0_f1"):
        got = resampled_metric(metric, p, y, INFO, rows)
        want = [regression_metrics(p[r], y[r])[metric] for r in rows]
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=metric)


def test_resampled_metric_follows_the_sims_definitions():
    """CH-SIMS metrics clip to [-1, 1] and cut into intervals: the bootstrap once applied MOSI's
    round-and-clip definitions to them (observed difference -0.39 against the table's -0.12)."""
    import dataclasses

    from msakit.metrics import compute_metrics

    sims = dataclasses.replace(INFO, metric_family="sims", label_range=(-1.0, 1.0))
    rng = np.random.default_rng(2)
    y = np.clip(np.round(rng.normal(scale=0.5, size=80), 1), -1, 1)
    p = 1.8 * rng.normal(scale=0.6, size=80)  # many predictions outside [-1, 1]
    rows = rng.integers(0, 80, size=(3, 80))
    for metric in ("mae", "acc2", "acc3", "acc5", "corr", "f1"):
        got = resampled_metric(metric, p, y, sims, rows)
        want = [compute_metrics("sims", p[r], y[r])[metric] for r in rows]
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=metric)


def test_paired_bootstrap_known_cases():
    rng = np.random.default_rng(1)
    y = rng.normal(size=200)
    good = y + 0.1 * rng.normal(size=200)
    bad = y + 1.0 * rng.normal(size=200)
    same = paired_bootstrap([(good, good)], y, "mae", INFO, resamples=500)
    assert same["difference"] == 0 and same["p"] == 1.0
    clear = paired_bootstrap([(good, bad)], y, "mae", INFO, resamples=500)
    assert clear["difference"] < 0 and clear["p"] == pytest.approx(1 / 501)  # never as extreme
    # the resampled differences' interval agrees with scipy's paired percentile bootstrap of the
    # same statistic (mean absolute error difference), up to Monte-Carlo error
    slight = y + 0.9 * rng.normal(size=200)
    ours = paired_bootstrap([(slight, bad)], y, "mae", INFO, resamples=4000)
    ref = stats.bootstrap((np.abs(slight - y), np.abs(bad - y)), lambda u, v, axis=-1: u.mean(axis) - v.mean(axis),
                          paired=True, n_resamples=4000, method="percentile", random_state=0)
    assert ours["ci"] == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high], abs=0.02)
    assert (ours["p"] < 0.05) == (ref.confidence_interval.high < 0 or ref.confidence_interval.low > 0)


def test_compare_command_on_tiny_runs(tmp_path, capsys):
    for name, seeds in (("a", ["1", "2", "3"]), ("b", ["2", "3"])):
        assert main(["train", "--epochs", "2", "--seeds", *seeds, "--out", str(tmp_path / name), *SMALL]) == 0
    assert main(["train", "--epochs", "2", "--seeds", "2", "3", "--out", str(tmp_path / "c"), *SMALL,
                 "train.lr=0.01"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--metric", "mae",
                 "--bootstrap", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    a_values = [json.loads((tmp_path / "a" / f"seed_{s}" / "metrics.json").read_text())["test"]["mae"] for s in (1, 2, 3)]
    assert report["runs"]["a"]["values"] == a_values
    assert report["runs"]["a"]["mean"] == pytest.approx(np.mean(a_values))
    ab = next(p for p in report["pairs"] if (p["a"], p["b"]) == ("a", "b"))
    assert ab["shared_seeds"] == [2, 3]
    assert ab["difference"] == pytest.approx(0.0) and ab["bootstrap"]["p"] == 1.0  # same seeds, same config
    ac = next(p for p in report["pairs"] if (p["a"], p["b"]) == ("a", "c"))
    assert ac["bootstrap"]["seeds"] == 2 and 0 < ac["bootstrap"]["p"] <= 1
    assert "paired t-test p" in printed and "| a | b |" in printed
    assert (out / "curves.png").stat().st_size > 0


def test_compare_says_what_it_cannot_pair(tmp_path, capsys, caplog):
    import logging

    for name, extra in (("a", []), ("b", ["train.lr=0.01"]), ("other", ["data.synthetic.feature_noise=3.0"])):
        assert main(["train", "--epochs", "1", "--seeds", "1", "2", "--out", str(tmp_path / name), *SMALL, *extra]) == 0
    a, b, other = (str(tmp_path / n) for n in ("a", "b", "other"))
    out = ["--out", str(tmp_path / "cmp")]
    capsys.readouterr()
    for argv, message in (([a, a], "a run folder is given twice"), ([a, f"{a}/."], "given twice"),
                          ([a, b, "--bootstrap", "0"], "--bootstrap 0: give at least 1 resample")):
        assert main(["compare", *argv, *out]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["compare", a, b, "--metric", "loss", *out]) == 0  # no bootstrap of the loss
    capsys.readouterr()
    assert main(["compare", a, b, *out]) == 2  # a finished report is not replaced by a rerun
    assert "cmp: already holds compare.json; pass --overwrite" in capsys.readouterr().err
    out.append("--overwrite")
    assert "bootstrap" not in json.loads((tmp_path / "cmp" / "compare.json").read_text())["pairs"][0]
    (tmp_path / "b" / "seed_2" / "predictions_test.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="msakit"):
        assert main(["compare", a, b, other, "--bootstrap", "50", *out]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("trained on different data" in m for m in said)
    assert any(f"seed 2 left out of the bootstrap (missing {b}/seed_2/predictions_test.csv)" in m for m in said)
    pairs = json.loads((tmp_path / "cmp" / "compare.json").read_text())["pairs"]
    assert [p["bootstrap"]["seeds"] for p in pairs] == [1, 2, 1]


def test_compare_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no results.json" in err and len(err.splitlines()) == 1
