"""msakit tune: end to end through the CLI, the test split never read while tuning, resume of an
interrupted study, two workers on one SQLite study, search spaces of every model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import make_data

optuna = pytest.importorskip("optuna")

import msakit.train.loop as loop  # noqa: E402
import msakit.tune as tune_module  # noqa: E402
from msakit.cli import main  # noqa: E402
from msakit.config import build_config, load_yaml  # noqa: E402
from msakit.registry import list_models  # noqa: E402
from msakit.tune import TuneError, default_space, parse_space, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = "train.lr: {low: 1.0e-3, high: 3.0e-2, log: true}\nmodel.dropout: {low: 0.0, high: 0.5}\n"
TINY = ["model.text_hidden=8", "model.audio_hidden=4", "model.vision_hidden=4", "model.fusion_hidden=8",
        "data.batch_size=16"]


def tune_args(out: Path, trials: int, *extra: str) -> list[str]:
    space = out.parent / "space.yaml"
    space.write_text(SPACE)
    return ["tune", "--trials", str(trials), "--out", str(out), "--epochs", "3", "--quiet",
            "--space", str(space), *extra, "--set", *TINY]


def study_trials(out: Path, name: str = "lf_dnn-synthetic") -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").trials


class Poison:
    """A split that fails on any use: proves a code path never reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def test_tune_end_to_end_test_split_only_in_the_final_run(tmp_path, monkeypatch):
    data = make_data()
    monkeypatch.setattr(tune_module, "load_dataset", lambda cfg: data)
    calls: list[str] = []
    real_fit, real_evaluate = loop.fit, loop.evaluate

    def fit(*args, test=True, **kwargs):
        calls.append("final fit" if test else "trial fit")
        return real_fit(*args, test=test, **kwargs)

    def evaluate(model, arrays, *args):
        calls.append("test" if arrays is data.splits["test"] else "other")
        return real_evaluate(model, arrays, *args)

    import msakit.train.experiment as experiment

    monkeypatch.setattr(loop, "fit", fit)
    monkeypatch.setattr(experiment, "fit", fit)  # the final run goes through run_experiment
    monkeypatch.setattr(loop, "evaluate", evaluate)
    out = tmp_path / "tune"
    monkeypatch.chdir(tmp_path)
    assert main(tune_args(out, 3, "--final-seeds", "1", "2", "--data-root", "data/../data")) == 0

    fits = [c for c in calls if c.endswith("fit")]
    assert fits == ["trial fit"] * 3 + ["final fit"] * 2
    first_final = calls.index("final fit")
    assert "test" not in calls[:first_final]  # no test evaluation during the search
    assert calls[first_final:].count("test") == 2  # once per final seed

    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    best = min(trials, key=lambda t: t.value)
    cfg = build_config(load_yaml(out / "best.yaml"))  # runnable config holding the best params
    assert cfg.train.lr == pytest.approx(best.params["train.lr"])
    assert cfg.model.dropout == pytest.approx(best.params["model.dropout"])
    assert cfg.train.seeds == [1, 2] and cfg.model.text_hidden == 8
    assert cfg.data.data_root == str(tmp_path / "data")  # runs from any folder: absolute, normalised
    assert (out / "best.yaml").read_text().startswith("# msakit train --config")
    summary = json.loads((out / "study.json").read_text())
    assert summary["counts"]["COMPLETE"] == 3 and set(summary["importances"]) == set(best.params)
    assert (out / "study.png").stat().st_size > 0 and "best validation mae" in (out / "study.md").read_text()
    results = json.loads((out / "final" / "results.json").read_text())
    assert [r["seed"] for r in results["per_seed"]] == [1, 2]
    # trials keep their logs, not their checkpoints; validation only
    log = (out / "trials" / "trial_0000" / "seed_1" / "log.jsonl").read_text()
    assert "valid_mae" in log and "test" not in log
    assert not list((out / "trials").rglob("*.pt"))


def test_trials_run_without_the_test_split(tmp_path):
    data = make_data()
    data.splits["test"] = Poison()
    result = tune({"model": {"name": "lf_dnn"}}, ["train.progress=false", "train.epochs=2", *TINY],
                  tmp_path, trials=2, space={"train.lr": {"low": 1e-3, "high": 1e-2}}, final=False,
                  data=data)
    assert result["final"] is None and result["best"]["value"] > 0


def test_pruning_stops_bad_trials_from_the_per_epoch_validation_value(tmp_path, monkeypatch):
    pruned_after: list[int] = []

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            pruned_after.append(max(trial.intermediate_values))
            return True

    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kw: AlwaysPrune())
    with pytest.raises(TuneError, match="no trial completed"):
        tune({"model": {"name": "lf_dnn"}}, ["train.progress=false", "train.epochs=4", *TINY], tmp_path,
             trials=2, space={"train.lr": {"low": 1e-3, "high": 1e-2}}, final=False, data=make_data())
    assert pruned_after == [1, 1]  # each trial stopped after its first reported epoch
    assert [t.state.name for t in study_trials(tmp_path)] == ["PRUNED", "PRUNED"]


def test_an_interrupted_tune_resumes_from_its_storage(tmp_path, monkeypatch):
    data = make_data()
    monkeypatch.setattr(tune_module, "load_dataset", lambda cfg: data)
    out = tmp_path / "tune"
    real_fit = loop.fit
    calls = {"n": 0}

    def interrupted_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second trial
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(loop, "fit", interrupted_fit)
    assert main(tune_args(out, 3, "--no-final")) == 130  # Ctrl-C: one line, status 130
    first = study_trials(out)
    assert [t.state.name for t in first] == ["COMPLETE", "FAIL"]

    counted = {"n": 0}

    def counting_fit(*args, **kwargs):
        counted["n"] += 1
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(loop, "fit", counting_fit)
    assert main(tune_args(out, 3, "--no-final")) == 0  # the same command again
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert counted["n"] == 2  # only the missing trials ran
    assert trials[0].value == first[0].value and trials[0].params == first[0].params
    assert (out / "best.yaml").is_file()


def test_two_workers_share_one_sqlite_study(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    args = tune_args(out, 6, "--no-final", "--model", "lf_dnn", "--study", "shared") + [
        "data.synthetic.train_size=96", "data.synthetic.valid_size=32", "data.synthetic.test_size=32",
        "train.num_threads=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MSAKIT_CACHE": str(tmp_path / "cache")}
    workers = [subprocess.Popen([sys.executable, "-m", "msakit", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = study_trials(out, "shared")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    # the total is the study's, not each worker's (a worker may start one trial while the other
    # finishes the last, so one over is possible)
    assert 6 <= len(finished) <= 7
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert len({t.number for t in trials}) == len(trials)


def test_bad_space_and_a_study_with_another_config_are_clear_errors(tmp_path, capsys, monkeypatch):
    space = tmp_path / "bad.yaml"
    space.write_text("model.no_such_key: [1, 2]\n")
    assert main(["tune", "--trials", "1", "--out", str(tmp_path / "a"), "--space", str(space)]) == 2
    assert "model: unknown key 'no_such_key'" in capsys.readouterr().err
    space.write_text("train.lr: {low: 0.1, high: 0.01}\n")
    assert main(["tune", "--trials", "1", "--out", str(tmp_path / "a"), "--space", str(space)]) == 2
    assert "--space: train.lr: need low < high" in capsys.readouterr().err
    space.write_text("model.dropout: [0.1, 0.2\n")  # malformed YAML: one line, not a traceback
    assert main(["tune", "--trials", "1", "--out", str(tmp_path / "a"), "--space", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"msakit: error: {space}: not valid YAML (") and "\n" not in err
    for trials in ("0", "-1"):  # refused before the study folder exists
        assert main(["tune", "--trials", trials, "--out", str(tmp_path / "z")]) == 2
        assert capsys.readouterr().err.strip() == f"msakit: error: --trials must be >= 1, got {trials}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "z").exists()

    data = make_data()
    monkeypatch.setattr(tune_module, "load_dataset", lambda cfg: data)
    out = tmp_path / "b"
    assert main(tune_args(out, 1, "--no-final")) == 0
    capsys.readouterr()
    assert main(tune_args(out, 2, "--no-final", "--tune-seed", "9")) == 2
    assert "was created with another config" in capsys.readouterr().err


@pytest.mark.parametrize("model", sorted(list_models()))
def test_every_model_declares_a_valid_search_space(model):
    params = parse_space(default_space(model), model)
    assert any(p.name.startswith("model.") for p in params)
    for p in params:
        for value in (p.choices if p.kind == "categorical" else (p.low, p.high)):
            build_config({"model": {"name": model}}, [f"{p.name}={json.dumps(value)}"])
