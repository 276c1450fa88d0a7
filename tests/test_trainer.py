"""Trainer: selection on validation, resume == uninterrupted, determinism, loud NaN, outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from fakes import make_data, run_interrupted

import msakit.train.loop as loop
from msakit.config import build_config
from msakit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from msakit.train.experiment import run_experiment
from msakit.train.loop import TrainingError
from msakit.train.runfolder import RunFolderError


def config(*sets: str, model: str = "lf_dnn"):
    return build_config({"model": {"name": model}}, ["train.progress=false", "data.batch_size=16", *sets])


def test_results_json_layout_and_files(tmp_path):
    results = run_experiment(config("train.epochs=3", "train.seeds=[1, 2]"), tmp_path, data=make_data())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "lf_dnn" and saved["dataset"] == "fake-regression"
    assert saved["seeds"] == [1, 2] and [r["seed"] for r in saved["per_seed"]] == [1, 2]
    keys = {"mae", "corr", "acc7", "acc5", "has0_acc2", "has0_f1", "non0_acc2", "non0_f1"}
    assert keys <= set(saved["test_mean"]) and keys <= set(saved["test_std"])
    maes = [r["test"]["mae"] for r in results["per_seed"]]
    assert saved["test_mean"]["mae"] == pytest.approx(np.mean(maes))
    assert saved["test_std"]["mae"] == pytest.approx(np.std(maes))  # population std
    assert saved["selection"] == {"split": "valid", "metric": "mae", "mode": "min"}
    rows = list(csv.DictReader((tmp_path / "seed_1" / "predictions_test.csv").open()))
    assert len(rows) == 16 and set(rows[0]) == {"id", "label", "prediction"}
    epochs = (tmp_path / "seed_1" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in epochs] == [1, 2, 3]


def test_selects_the_best_validation_epoch_and_evaluates_that_model(tmp_path):
    results = run_experiment(config("train.epochs=6", "train.patience=100"), tmp_path, data=make_data())
    history = [json.loads(x) for x in (tmp_path / "seed_1" / "log.jsonl").read_text().splitlines()]
    best = min(history, key=lambda r: r["valid_mae"])
    assert results["per_seed"][0]["best_epoch"] == best["epoch"]
    assert results["per_seed"][0]["valid"]["mae"] == pytest.approx(best["valid_mae"], abs=1e-6)


def test_early_stopping(tmp_path):
    run_experiment(config("train.epochs=50", "train.patience=2", "train.lr=0.5"), tmp_path, data=make_data())
    history = [json.loads(x) for x in (tmp_path / "seed_1" / "log.jsonl").read_text().splitlines()]
    assert len(history) < 50 and history[-1]["stopped"]


def test_same_seed_same_result_different_seed_different(tmp_path):
    data = make_data()
    a = run_experiment(config("train.epochs=3"), tmp_path / "a", data=data)
    b = run_experiment(config("train.epochs=3"), tmp_path / "b", data=data)
    c = run_experiment(config("train.epochs=3", "train.seeds=[7]"), tmp_path / "c", data=data)
    assert a["test_mean"] == b["test_mean"]
    assert a["test_mean"]["mae"] != c["test_mean"]["mae"]


@pytest.mark.parametrize("model", ["lf_dnn", "tfn"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, model):
    data = make_data()
    whole = run_experiment(config("train.epochs=4", "train.patience=100", model=model), tmp_path / "whole", data=data)

    cut = config("train.epochs=4", "train.patience=100", model=model)
    run_interrupted(cut, tmp_path / "cut", data, monkeypatch, saves=2)
    assert load_checkpoint(tmp_path / "cut" / "seed_1" / "last.pt")["epoch"] == 2
    resumed = run_experiment(
        config("train.epochs=4", "train.patience=100", model=model), tmp_path / "cut", resume=True, data=data
    )
    assert resumed["per_seed"][0]["test"] == whole["per_seed"][0]["test"]
    a = load_checkpoint(tmp_path / "whole" / "seed_1" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "seed_1" / "best.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_refuses_a_different_config(tmp_path):
    data = make_data()
    run_experiment(config("train.epochs=1"), tmp_path, data=data)
    with pytest.raises(RunFolderError, match="train.lr is 0.001 in the run but 0.1 now"):
        run_experiment(config("train.epochs=2", "train.lr=0.1"), tmp_path, resume=True, data=data)


def test_nan_loss_is_a_loud_error(tmp_path):
    data = make_data()
    data.splits["train"].features["text"][:] = np.nan  # bypasses the loader's sanitising on purpose
    with pytest.raises(TrainingError, match="loss became nan"):
        run_experiment(config("train.epochs=2"), tmp_path, data=data)


@pytest.mark.parametrize("task,key", [("classification", "f1_macro"), ("multi_binary", "mean_f1")])
def test_classification_tasks_select_on_their_metric(tmp_path, task, key):
    results = run_experiment(config("train.epochs=2"), tmp_path, data=make_data(task))
    assert results["selection"]["metric"] == key and results["selection"]["mode"] == "max"
    assert key in results["test_mean"]


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": 1, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    save_checkpoint({"format": 1, "x": torch.ones(2)}, tmp_path / "ok.pt")
    assert not list(tmp_path.glob(".ok.pt.*.tmp"))  # atomic write leaves no temp file


def test_plateau_scheduler_state_survives_resume(tmp_path):
    data = make_data()
    sets = ("train.scheduler=plateau", "train.plateau_patience=0", "train.patience=100")
    whole = run_experiment(config("train.epochs=4", *sets), tmp_path / "whole", data=data)
    run_experiment(config("train.epochs=2", *sets), tmp_path / "cut", data=data)
    resumed = run_experiment(config("train.epochs=4", *sets), tmp_path / "cut", resume=True, data=data)
    assert resumed["per_seed"][0]["test"] == whole["per_seed"][0]["test"]
    history = [json.loads(x) for x in (tmp_path / "whole" / "seed_1" / "log.jsonl").read_text().splitlines()]
    assert history[-1]["lr"] < history[0]["lr"] or all(r["selected"] for r in history)


def test_the_logged_lr_is_the_rate_the_epoch_trained_at(tmp_path):
    """The plateau cut after epoch e applies from epoch e + 1; it was logged on epoch e."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    used = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    try:
        run_experiment(config("train.epochs=7", "train.scheduler=plateau", "train.plateau_patience=0", "train.lr=0.05",
                              "train.patience=100", "data.batch_size=16"), tmp_path / "r", data=make_data())
    finally:
        handle.remove()
    history = [json.loads(x) for x in (tmp_path / "r" / "seed_1" / "log.jsonl").read_text().splitlines()]
    assert len(used) == 21 and len(set(used)) > 1  # 3 steps an epoch; the rate was cut (after epoch 6)
    assert [r["lr"] for r in history] == used[::3]


def test_the_selected_weights_are_those_validated_before_the_epoch_end_hook(tmp_path):
    """PaSE switches to phase 2 in on_epoch_end, which drops its unimodal loss terms: the weights
    selected at that epoch are the phase-1 ones validated, so the run's validation loss is the
    one logged and selected on (it was phase 2's: 2.39 against 6.83 logged)."""
    sets = ["model.hidden=8", "model.depth=1", "model.min_phase1_epochs=1", "model.switch_patience=1",
            "model.switch_delta=10", "train.select_metric=loss", "train.lr=0.003", "train.epochs=2",
            "data.synthetic.train_size=96", "data.synthetic.valid_size=32", "data.synthetic.test_size=16"]
    run_experiment(config(*sets, model="pase"), tmp_path / "r")
    history = [json.loads(x) for x in (tmp_path / "r" / "seed_1" / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / "r" / "seed_1" / "metrics.json").read_text())
    assert [r["phase"] for r in history] == [1, 2] and metrics["best_epoch"] == 2  # switched after epoch 2
    assert metrics["valid"]["loss"] == pytest.approx(history[1]["valid_loss"], rel=1e-6)
    assert int(load_checkpoint(tmp_path / "r" / "seed_1" / "best.pt")["model"]["phase"]) == 1


class TwoOptimizerModel(torch.nn.Module):
    """A model with its own update rule: the generic training_step hook, two optimisers."""

    def __init__(self, info):
        super().__init__()
        self.info = info
        self.first = torch.nn.Linear(info.feature_dims["text"], 1)
        self.second = torch.nn.Linear(info.feature_dims["audio"], 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        from msakit.models.base import task_output
        from msakit.modules import masked_mean

        raw = self.first(masked_mean(batch.text, batch.text_mask)) + self.second(
            masked_mean(batch.audio, batch.audio_mask))
        return task_output(raw, batch, self.info)

    def configure_optimizers(self, train_cfg):
        return {"first": torch.optim.SGD(self.first.parameters(), lr=0.1),
                "second": torch.optim.Adam(self.second.parameters(), lr=0.01)}

    def training_step(self, batch, optimizers, train_cfg):
        out = self(batch)
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        sum(out.losses.values()).backward()
        optimizers["second" if int(self.steps) % 2 else "first"].step()  # alternate updates
        self.steps += 1
        return type(out)(out.prediction.detach(), {k: v.detach() for k, v in out.losses.items()})


def test_custom_training_step_hook_and_its_resume(tmp_path, monkeypatch):
    from msakit.registry import create_model as real_create

    data = make_data()

    def create(name, cfg, info):
        return TwoOptimizerModel(info) if name == "unimodal" else real_create(name, cfg, info)

    monkeypatch.setattr(loop, "create_model", create)
    sets = ("train.patience=100",)
    whole = run_experiment(config("train.epochs=3", *sets, model="unimodal"), tmp_path / "whole", data=data)
    run_experiment(config("train.epochs=1", *sets, model="unimodal"), tmp_path / "cut", data=data)
    resumed = run_experiment(config("train.epochs=3", *sets, model="unimodal"), tmp_path / "cut",
                             resume=True, data=data)
    assert resumed["per_seed"][0]["test"] == whole["per_seed"][0]["test"]
    state = load_checkpoint(tmp_path / "whole" / "seed_1" / "last.pt")
    assert set(state["optimizers"]) == {"first", "second"}
    assert int(state["model"]["steps"]) == 3 * 3  # 48 samples / batch 16 = 3 steps per epoch


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    run_experiment(config("train.epochs=2", "train.tensorboard=true"), tmp_path, data=make_data())
    assert list((tmp_path / "seed_1" / "tensorboard").glob("events.out.tfevents.*"))
