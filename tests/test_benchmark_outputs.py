"""Benchmarks never edit tracked files unless asked: they write to --out; only --publish writes
benchmarks/results/ and the README, and it refuses to replace a row by a weaker one."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import mosi_poria  # noqa: E402
import results_store  # noqa: E402


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("old,new,refused", [
    ((5, None), (1, 2), True),      # the case: 5 seeds, full epochs -> 1 seed, 2 epochs
    ((5, None), (5, 40), True),     # a cap is fewer epochs than the configs' own
    ((5, 10), (4, 10), True),
    ((5, 10), (5, 9), True),
    ((5, 10), (5, 10), False),
    ((5, 10), (5, None), False),
    ((3, 2), (5, 2), False),
])
def test_refuse_weaker(old, new, refused):
    if refused:
        with pytest.raises(SystemExit, match="--publish refused: row x is published with"):
            results_store.refuse_weaker("row x", *old, *new)
    else:
        results_store.refuse_weaker("row x", *old, *new)


def fake_worker_result(config: str, seeds: list[int]) -> dict:
    metrics = dict.fromkeys(mosi_poria.KEYS, 0.5)
    return {"model": "lf_dnn", "config": config, "test_mean": metrics, "test_std": dict.fromkeys(metrics, 0.0),
            "per_seed": [], "samples_per_cpu_s": 1.0, "peak_rss_mb": 1.0, "wall_s": 1.0, "params": 1,
            "epochs_cap": 2, "seeds": seeds}


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """mosi_poria.main without training: the worker subprocess and the ridge rows are faked."""
    (tmp_path / "data" / "mosi-poria").mkdir(parents=True)
    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        config = str(Path(argv[argv.index("--worker") + 1]).relative_to(ROOT))
        seeds = [int(s) for s in argv[argv.index("--seeds") + 1:] if s.isdigit()][:1]
        return SimpleNamespace(returncode=0, stdout=json.dumps(fake_worker_result(config, seeds)), stderr="")

    monkeypatch.setattr(mosi_poria.subprocess, "run", run)
    monkeypatch.setattr(mosi_poria, "ridge_references", lambda data_root: [])
    return tmp_path, calls


def test_a_run_without_publish_writes_only_to_out(fake_runs, capsys):
    tmp_path, calls = fake_runs
    tracked = [ROOT / "README.md", *sorted((ROOT / "benchmarks" / "results").glob("mosi_poria.*"))]
    before = {p: digest(p) for p in tracked}
    out = tmp_path / "out"
    mosi_poria.main(["--data-root", str(tmp_path / "data"), "--configs", "configs/lf_dnn/mosi-poria.yaml",
                     "--seeds", "1", "--epochs", "2", "--out", str(out)])
    assert {p: digest(p) for p in tracked} == before
    report = (out / "mosi_poria.md").read_text()
    assert "| lf_dnn [1 seeds, ≤2 epochs] | 0.500 |" in report and "± 0.000" not in report.split("\n| lf_dnn")[1]
    assert json.loads((out / "mosi_poria.json").read_text())["configs/lf_dnn/mosi-poria.yaml"]["seeds"] == [1]
    assert len(calls) == 1 and "README.md and benchmarks/results/ untouched" in capsys.readouterr().out


def test_publish_refuses_to_replace_a_5_seed_row_before_running(fake_runs):
    tmp_path, calls = fake_runs
    before = digest(ROOT / "benchmarks" / "results" / "mosi_poria.json")
    with pytest.raises(SystemExit, match="is published with 5 seeds, the configs' own epochs; this run has 1 seeds"):
        mosi_poria.main(["--data-root", str(tmp_path / "data"), "--configs", "configs/lf_dnn/mosi-poria.yaml",
                         "--seeds", "1", "--epochs", "2", "--publish"])
    assert calls == [] and digest(ROOT / "benchmarks" / "results" / "mosi_poria.json") == before


def test_robustness_pairs_pairs_by_training_seed():
    """The mechanism comparison pairs checkpoints by their seed_<s> folder (not by list order)
    and tests the per-seed differences (scipy's paired t-test)."""
    import robustness_pairs
    from scipy import stats

    def run(seeds, clean, auc):
        return {"checkpoints": [f"r/seed_{s}/best.pt" for s in seeds], "clean_per_checkpoint": clean,
                "protocols": {"missing": {"auc_per_checkpoint": auc}},
                "conditions": {"a": {"per_checkpoint": clean}}}

    report = {"runs": {"A": run([1, 2, 3], [0.8, 0.7, 0.9], [0.6, 0.5, 0.7]),
                       "B": run([3, 1, 2, 4], [0.85, 0.7, 0.6, 0.1], [0.5, 0.55, 0.52, 0.0])}}
    pairs, table = robustness_pairs.pair_table(report)
    (pair,) = pairs
    assert pair["shared_seeds"] == [1, 2, 3]
    a, b = [0.6, 0.5, 0.7], [0.55, 0.52, 0.5]  # B's seed order 3, 1, 2, 4 re-paired
    missing = pair["columns"]["AUC missing"]
    assert missing["difference"] == pytest.approx((sum(a) - sum(b)) / 3)
    assert missing["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert "| B | 4 |" in table and "| A | B | 3 |" in table


@pytest.mark.parametrize("args,message", [
    (["--trials", "10"], "published with 30 trials; this run has 10"),
    (["--trials", "30", "--seeds", "1", "2"], "published with 5 seeds, the configs' own epochs; this run has 2 seeds"),
    (["--trials", "40", "--set", "train.epochs=10"], "this run has 5 seeds, ≤10 epochs"),
    (["--trials", "40", "--no-final"], "this run has 0 seeds"),
])
def test_tune_publish_refuses_a_weaker_study_before_running(monkeypatch, args, message):
    import tune_mosi

    published = json.loads((ROOT / "benchmarks" / "results" / "tune_mosi.json").read_text())
    assert published["lf_dnn-w1"]["trials"] == 30 and len(published["lf_dnn-w1"]["seeds"]) == 5
    started = []
    monkeypatch.setattr(tune_mosi.subprocess, "Popen", lambda *a, **k: started.append(a))
    with pytest.raises(SystemExit, match=message):
        tune_mosi.main([*args, "--publish"])
    assert started == []


def test_robustness_zoo_says_when_its_training_seconds_are_a_resumed_calls_only(monkeypatch, tmp_path):
    """An interrupted run resumes; the seconds recorded are then that call's only (the published
    PSA-MF mosi-poria row shows 30 s for 5 epochs of ~65 s), so benchmark.json says `resumed`."""
    import robustness_zoo

    calls = []
    monkeypatch.setattr(robustness_zoo, "run_experiment", lambda cfg, out, resume: calls.append(resume))
    args = SimpleNamespace(dataset="synthetic", seeds=[1], data_root=None, epochs=1, runs_dir=str(tmp_path))
    out, reused = robustness_zoo.train("tfn", "tfn/{d}", [], args)
    assert not reused and calls == [False]
    assert json.loads((out / "benchmark.json").read_text())["resumed"] is False
    (out / "config.yaml").write_text("{}\n")  # what an interrupted run leaves
    robustness_zoo.train("tfn", "tfn/{d}", [], args)
    assert calls == [False, True]
    assert json.loads((out / "benchmark.json").read_text())["resumed"] is True
    published = json.loads((ROOT / "benchmarks/results/robustness_mosi-poria.json").read_text())
    assert published["runs"]["psa_mf"]["training"]["resumed"] is True


@pytest.mark.parametrize("cap", [None, 3])
def test_a_row_records_its_epoch_cap_not_the_timed_epochs(tmp_path, monkeypatch, cap):
    """run_one's throughput epochs once overwrote the cap it records (every uncapped row was shown
    as capped at a list of timings)."""
    import throughput

    import msakit.train.experiment as experiment

    results = {"test_mean": {"mae": 0.9}, "test_std": {"mae": 0.01}, "per_seed": []}
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: results)
    timing = {"samples": 100, "cpu_s": 0.5, "wall_s": 0.5}
    monkeypatch.setattr(throughput, "measure_epoch", lambda *a: dict(timing))
    row = mosi_poria.run_one(ROOT / "configs" / "lf_dnn" / "synthetic.yaml", str(tmp_path), [1], tmp_path / "run",
                             cap)
    assert row["epochs_cap"] == cap and row["seeds"] == [1]
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)? \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)", row["measured_at"])
    assert row["throughput_epochs"] == [timing] * mosi_poria.THROUGHPUT_EPOCHS and row["samples_per_cpu_s"] == 200


def test_measured_at_stamps_the_imported_checkout_and_what_a_run_depends_on(tmp_path, monkeypatch):
    import subprocess

    import msakit

    repo = tmp_path / "repo"
    (repo / "src" / "msakit").mkdir(parents=True)
    (repo / "src" / "msakit" / "__init__.py").write_text("")
    (repo / "README.md").write_text("table\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    commit = git("rev-parse", "--short", "HEAD")
    monkeypatch.setattr(msakit, "__file__", str(repo / "src" / "msakit" / "__init__.py"))
    assert re.fullmatch(rf"{commit} \(.+ UTC\)", results_store.measured_at())
    (repo / "README.md").write_text("a published table\n")  # what --publish rewrites: still clean
    assert "+dirty" not in results_store.measured_at()
    (repo / "configs").mkdir()
    (repo / "configs" / "new.yaml").write_text("model: {}\n")  # untracked, yet a run may read it
    assert results_store.measured_at().startswith(f"{commit}+dirty (")
    inner = repo / "vendor" / "src" / "msakit"  # a copy inside another project's repository
    inner.mkdir(parents=True)
    for where in (inner, tmp_path / "no_repo" / "src" / "msakit"):
        monkeypatch.setattr(msakit, "__file__", str(where / "__init__.py"))
        assert results_store.measured_at().startswith("unknown commit (")


def test_report_only_without_results_says_so(tmp_path):
    (tmp_path / "data" / "mosi-poria").mkdir(parents=True)
    with pytest.raises(SystemExit, match="mosi_poria.json: no results to report"):
        mosi_poria.main(["--data-root", str(tmp_path / "data"), "--report-only", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "mosi_poria.md").exists()
