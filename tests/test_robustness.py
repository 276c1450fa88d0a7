"""Training-time corruption (train.corruption) and `msakit robustness` on tiny checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fakes import make_data, run_interrupted

import msakit.train.loop as loop
from msakit.cli import main
from msakit.config import ConfigError, build_config
from msakit.robustness import normalised_auc, relative_drop
from msakit.train.checkpoint import load_checkpoint
from msakit.train.experiment import run_experiment


def config(*sets: str, model: str = "lf_dnn"):
    return build_config({"model": {"name": model}}, ["train.progress=false", "data.batch_size=16", *sets])


def spy_on_batches(monkeypatch) -> list[tuple[bool, bool, int]]:
    """Record (training?, vision present anywhere?, batch size) for every batch a model sees."""
    seen = []
    real = loop.create_model

    def create(*args):
        model = real(*args)
        model.register_forward_pre_hook(
            lambda m, inputs: seen.append((m.training, bool(inputs[0].vision_mask.any()), inputs[0].size)))
        return model

    monkeypatch.setattr(loop, "create_model", create)
    return seen


def test_training_batches_are_corrupted_and_validation_stays_clean(tmp_path, monkeypatch):
    seen = spy_on_batches(monkeypatch)
    sets = ("train.epochs=2", "train.corruption.protocol=conditions", "train.corruption.condition=ta")
    run_experiment(config(*sets), tmp_path / "a", data=make_data())
    training = [v for t, v, _ in seen if t]
    evaluation = [v for t, v, _ in seen if not t]
    assert training and not any(training)  # vision removed from every training batch
    assert evaluation and all(evaluation)  # validation and test clean
    seen.clear()
    run_experiment(config(*sets, "train.corruption.validate=true"), tmp_path / "b", data=make_data())
    evaluation = [v for t, v, _ in seen if not t]
    assert not all(evaluation) and any(evaluation)  # validation corrupted, test still clean


def test_corrupted_training_changes_the_model_and_resumes_exactly(tmp_path, monkeypatch):
    data = make_data()
    sets = ("train.patience=100", "train.corruption.protocol=drop", "train.corruption.mode=random",
            "train.corruption.rate=0.8")
    clean = run_experiment(config("train.epochs=3", "train.patience=100"), tmp_path / "clean", data=data)
    whole = run_experiment(config("train.epochs=3", *sets), tmp_path / "whole", data=data)
    assert whole["per_seed"][0]["test"] != clean["per_seed"][0]["test"]
    run_interrupted(config("train.epochs=3", *sets), tmp_path / "cut", data, monkeypatch, saves=1)
    resumed = run_experiment(config("train.epochs=3", *sets), tmp_path / "cut", resume=True, data=data)
    assert resumed["per_seed"][0]["test"] == whole["per_seed"][0]["test"]
    a = load_checkpoint(tmp_path / "whole" / "seed_1" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "seed_1" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corruption_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.corruption"):
        config("train.corruption.protocol=blur")
    with pytest.raises(ConfigError, match="train.corruption"):
        config("train.corruption.colour=1")


def test_auc_and_relative_drop_by_hand():
    assert normalised_auc([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert normalised_auc([0.0, 0.2, 0.4], [0.8, 0.8, 0.5]) == pytest.approx((0.8 * 0.2 + 0.65 * 0.2) / 0.4)
    assert relative_drop(0.8, 0.6, lower_is_better=False) == pytest.approx(0.25)
    assert relative_drop(0.5, 0.75, lower_is_better=True) == pytest.approx(0.5)


SMALL = ["--set", "data.synthetic.train_size=120", "data.synthetic.valid_size=40",
         "data.synthetic.test_size=40", "train.progress=false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    for name, model in (("lf", "lf_dnn"), ("tfn", "tfn")):
        assert main(["train", "--model", model, "--epochs", "2", "--seeds", "1", "2",
                     "--out", str(root / name), *SMALL]) == 0
    return root


def test_robustness_command_on_a_checkpoint(two_runs, capsys):
    checkpoint = two_runs / "lf" / "seed_1" / "best.pt"
    out = two_runs / "one"
    assert main(["robustness", "--checkpoint", str(checkpoint), "--levels", "0", "0.5", "1",
                 "--seeds", "1", "2", "--out", str(out)]) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert (out / "robustness.png").stat().st_size > 0 and "AUC drop" in (out / "robustness.md").read_text()
    run = report["runs"]["lf"]
    metrics = json.loads((two_runs / "lf" / "seed_1" / "metrics.json").read_text())["test"]
    assert report["metric"] == "non0_acc2"
    assert run["clean"] == pytest.approx(metrics["non0_acc2"])  # clean = the run's own test score
    for protocol in ("drop", "block", "missing", "noise"):
        curve = run["protocols"][protocol]
        assert curve["levels"] == [0.0, 0.5, 1.0] and curve["mean"][0] == run["clean"]
        assert 0.0 <= curve["auc"] <= 1.0 and curve["relative_drop"][0] == 0.0
    assert set(run["conditions"]) == {"t", "a", "v", "ta", "tv", "av"}
    assert "| lf |" in capsys.readouterr().out


def test_robustness_overlays_runs_and_averages_their_seeds(two_runs):
    """--runs: every seed's checkpoint evaluated; removing modalities changes a fusion model's MAE."""
    out = two_runs / "runs"
    assert main(["robustness", "--runs", str(two_runs / "lf"), str(two_runs / "tfn"), "--protocol", "missing",
                 "conditions", "--levels", "0", "1", "--seeds", "3", "--out", str(out),
                 "--metric", "mae"]) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert set(report["runs"]) == {"lf", "tfn"}
    for label, run in report["runs"].items():
        assert len(run["checkpoints"]) == 2
        curve = run["protocols"]["missing"]
        assert math.isfinite(curve["mean"][1]) and curve["mean"][1] != curve["mean"][0]
        assert len({round(c["mean"], 9) for c in run["conditions"].values()}) > 1
        # per-checkpoint values (for paired tests over training seeds), in checkpoint order: each
        # checkpoint's clean score is its seed's own test MAE; the AUC is linear in the curve
        for seed, clean in zip((1, 2), run["clean_per_checkpoint"], strict=True):
            assert clean == pytest.approx(json.loads((two_runs / label / f"seed_{seed}" / "metrics.json")
                                                     .read_text())["test"]["mae"])
        assert sum(curve["auc_per_checkpoint"]) / 2 == pytest.approx(curve["auc"])
        assert len(set(curve["auc_per_checkpoint"])) == 2
        assert run["conditions"]["ta"]["mean"] == pytest.approx(sum(run["conditions"]["ta"]["per_checkpoint"]) / 2)
    assert (out / "robustness.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["robustness"], "either --checkpoint"),
    (["robustness", "--runs", "NOPE"], "no seed_"),
    (["robustness", "--checkpoint", "x.pt", "--runs", "d"], "either --checkpoint"),
])
def test_robustness_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("level", ["1.5", "nan", "-0.1"])
def test_robustness_bad_levels(two_runs, capsys, level):
    assert main(["robustness", "--checkpoint", str(two_runs / "lf" / "seed_1" / "best.pt"),
                 "--levels", level, "--protocol", "drop", "--out", str(two_runs / "bad")]) == 2
    assert "--levels must be numbers in [0, 1]" in capsys.readouterr().err
    assert not (two_runs / "bad").exists()


def test_a_finished_report_is_not_replaced_without_overwrite(two_runs, capsys):
    """A rerun with a typo (--levels nan was accepted) replaced a 4-protocol x 10-level report."""
    checkpoint = str(two_runs / "lf" / "seed_1" / "best.pt")
    out = two_runs / "kept"
    argv = ["robustness", "--checkpoint", checkpoint, "--levels", "0", "1", "--protocol", "drop", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "robustness.json").read_bytes()
    capsys.readouterr()
    assert main([*argv[:-4], "--protocol", "noise", "--out", str(out)]) == 2
    assert "already holds robustness.json; pass --overwrite" in capsys.readouterr().err
    assert (out / "robustness.json").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    for command in (["analyze", "--checkpoint", checkpoint], ["compare", str(two_runs / "lf"), str(two_runs / "tfn")]):
        assert main([*command, "--out", str(out / "x")]) == 0
        capsys.readouterr()
        assert main([*command, "--out", str(out / "x")]) == 2
        assert "already holds" in capsys.readouterr().err


def test_block_that_removes_no_frame_is_said(two_runs, caplog):
    """block keeps each sequence's first and last frame, so on utterance-level data (mosi-poria:
    one frame) its curve is the clean score: said, not just printed; so is a level too low to
    remove a frame of the longest sequence."""
    import logging

    from msakit.robustness import robustness_report

    short = ["data.synthetic.text_length=2", "data.synthetic.audio_length=2", "data.synthetic.vision_length=2",
             "data.synthetic.min_length_fraction=1.0"]
    checkpoints = [two_runs / "lf" / f"seed_{s}" / "best.pt" for s in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="msakit"):
        robustness_report({"lf": checkpoints[:1]}, protocols=["block"], levels=[0, 1], seeds=[1])
        assert not [r for r in caplog.records if "block removes no" in r.getMessage()]
        report = robustness_report({"lf": checkpoints}, protocols=["block"], levels=[0, 1], seeds=[1],
                                   data_overrides=short)
        said = [r.getMessage() for r in caplog.records if "block removes no" in r.getMessage()]
        assert said == ["synthetic: block removes no text/audio/vision frame (at most 2 frames, and block keeps "
                        "the first and last): its curve is the clean score for models that do not read the "
                        "transcripts"]  # once for the two checkpoints
        caplog.clear()
        robustness_report({"lf": checkpoints[:1]}, protocols=["block"], levels=[0, 1], seeds=[1],
                          data_overrides=["data.synthetic.audio_length=2", "data.synthetic.min_length_fraction=1.0"])
        assert [r.getMessage() for r in caplog.records if "block removes no" in r.getMessage()] == [
            "synthetic: block removes no audio frame (at most 2 frames, and block keeps the first and last)"]
        caplog.clear()
        robustness_report({"lf": checkpoints[:1]}, protocols=["block"], levels=[0, 0.1, 0.3], seeds=[1],
                          data_overrides=["data.synthetic.vision_length=5", "data.synthetic.min_length_fraction=1.0"])
        assert [r.getMessage() for r in caplog.records if "block removes no" in r.getMessage()] == [
            "synthetic: block removes no vision frame at level 0.1 (round((n - 2) r) = 0 frames with at most 5 "
            "frames)"]  # round(3 x 0.3) = 1 frame at 0.3
        caplog.clear()  # a run on the same dataset name where block works does not silence the other
        trained_short = two_runs / "short_audio"
        if not trained_short.exists():
            assert main(["train", "--epochs", "1", "--seeds", "1", "--out", str(trained_short), *SMALL,
                         "data.synthetic.audio_length=2", "data.synthetic.min_length_fraction=1.0"]) == 0
        robustness_report({"lf": checkpoints[:1], "short": [trained_short / "seed_1" / "best.pt"]},
                          protocols=["block"], levels=[0, 1], seeds=[1])
        assert [r.getMessage() for r in caplog.records if "block removes no" in r.getMessage()] == [
            "synthetic: block removes no audio frame (at most 2 frames, and block keeps the first and last)"]
    curve = report["runs"]["lf"]["protocols"]["block"]
    assert curve["mean"][1] == curve["mean"][0]
