"""Experiment trackers mirror the run folder's log: MLflow (optional) gets the config as params and
every epoch's numbers; a missing package or a bad URI is one error line, exit status 2."""

from __future__ import annotations

import gc
import json
import sys

import pytest
from fakes import make_data

from msakit.cli import main
from msakit.config import ConfigError, build_config
from msakit.train.experiment import run_experiment
from msakit.train.loop import fit

SMALL = ["data.synthetic.train_size=60", "data.synthetic.valid_size=20", "data.synthetic.test_size=20",
         "train.progress=false"]


def config(*sets: str):
    return build_config({"model": {"name": "lf_dnn"}}, ["train.progress=false", "data.batch_size=16", *sets])


def test_mlflow_run_has_the_config_and_every_epoch_of_log_jsonl(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow not installed")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = make_data()
    run_experiment(config("train.epochs=3", "model.dropout=0.25", f"train.mlflow={uri}"), tmp_path / "run",
                   data=data)

    def stop(epoch, value):  # a tune trial pruned after its first epoch
        raise KeyboardInterrupt("pruned")

    with pytest.raises(KeyboardInterrupt):
        fit(config("train.epochs=3", f"train.mlflow={uri}"), data, 2, tmp_path / "pruned" / "seed_2",
            on_epoch=stop)
    gc.collect()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lf_dnn-synthetic")  # <model>-<data.name> of the config
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"run/seed_1", "pruned/seed_2"}
    finished, pruned = runs["run/seed_1"], runs["pruned/seed_2"]
    assert (finished.info.status, pruned.info.status) == ("FINISHED", "KILLED")
    assert finished.data.params["model.dropout"] == "0.25" and finished.data.params["train.epochs"] == "3"
    assert finished.data.tags["msakit.run_dir"] == str((tmp_path / "run" / "seed_1").resolve())
    log = [json.loads(line) for line in (tmp_path / "run" / "seed_1" / "log.jsonl").read_text().splitlines()]
    for key in ("valid_mae", "train_loss", "lr"):
        history = sorted(client.get_metric_history(finished.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r[key])) for r in log]
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "valid_mae")] == [1]


def test_mlflow_missing_is_one_error_line_exit_2(tmp_path, monkeypatch, capsys):
    for name in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    code = main(["train", "--epochs", "1", "--out", str(tmp_path), "--set", *SMALL,
                 f"train.mlflow=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err
    assert code == 2 and "train.mlflow needs the mlflow package: pip install mlflow-skinny" in err
    assert "Traceback" not in err


def test_mlflow_value_must_be_a_tracking_uri():
    with pytest.raises(ConfigError, match="train.mlflow must be an MLflow tracking URI"):
        config("train.mlflow=runs/mlflow.db")
