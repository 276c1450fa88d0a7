"""The command line, called in-process: the contract later work relies on."""

from __future__ import annotations

import json

import pytest

from msakit.cli import main

SMALL = ["--set", "data.synthetic.train_size=120", "data.synthetic.valid_size=40",
         "data.synthetic.test_size=40", "train.progress=false"]


def test_train_defaults_to_lf_dnn_on_synthetic(tmp_path, capsys):
    assert main(["train", "--epochs", "2", "--out", str(tmp_path), *SMALL]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "lf_dnn" and results["dataset"] == "synthetic"
    assert set(results) >= {"model", "dataset", "seeds", "per_seed", "test_mean", "test_std"}
    assert "| seed 1 |" in capsys.readouterr().out  # one seed: no "mean ± std" row
    assert (tmp_path / "seed_1" / "predictions_test.csv").is_file()
    assert (tmp_path / "seed_1" / "log.jsonl").is_file()


def test_train_with_flags_seeds_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "tfn", "--dataset", "synthetic", "--seeds", "3", "4",
                 "--epochs", "1", "--out", str(out), *SMALL, "model.fusion_hidden=8"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3, 4] and results["config"]["model"]["fusion_hidden"] == 8
    capsys.readouterr()
    metrics_file = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "seed_3" / "best.pt"), "--out", str(metrics_file)]) == 0
    evaluated = json.loads(metrics_file.read_text())
    assert evaluated["mae"] == pytest.approx(results["per_seed"][0]["test"]["mae"], abs=1e-6)
    assert "mae" in capsys.readouterr().out

    # existing output files are refused before any work, never clobbered; --overwrite replaces
    checkpoint = out / "seed_3" / "best.pt"
    before = {p: p.read_bytes() for p in (checkpoint, metrics_file)}
    for flag, target in (("--predictions", checkpoint), ("--out", metrics_file)):
        assert main(["eval", "--checkpoint", str(checkpoint), "--split", "valid", flag, str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [f"msakit: error: {flag} {target}: exists; pass --overwrite to replace it, "
                                    "or give another file"]
    assert {p: p.read_bytes() for p in before} == before
    assert main(["eval", "--checkpoint", str(checkpoint), "--split", "valid", "--out", str(metrics_file),
                 "--overwrite"]) == 0
    assert json.loads(metrics_file.read_text()) != evaluated  # the valid split's metrics now
    same = tmp_path / "same.out"
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(same), "--predictions", str(same)]) == 2
    assert capsys.readouterr().err.strip() == f"msakit: error: --out and --predictions both name {same}; give two files"
    assert not same.exists()


def test_config_file_and_resume(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("model:\n  name: unimodal\n  modality: audio\ntrain:\n  epochs: 1\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), *SMALL]) == 0
    assert main(["train", "--config", str(config), "--out", str(out), "--epochs", "2", "--resume", *SMALL]) == 0
    log_lines = (out / "seed_1" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log_lines] == [1, 2]


def test_list_commands(capsys):
    assert main(["list-models"]) == 0
    models = capsys.readouterr().out
    assert "lf_dnn" in models and "tfn" in models and "unimodal" in models
    assert main(["list-datasets"]) == 0
    datasets = capsys.readouterr().out
    for name in ("mmsa", "mult", "mosi-poria", "synthetic"):
        assert name in datasets


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["train", "--set", "model.hiden=3"], "unknown key 'hiden'"),
        (["train", "--dataset", "mmsa", "--data-path", "/no/such/file.pkl"], "/no/such/file.pkl"),
        (["train", "--config", "/no/such.yaml"], "/no/such.yaml: config file not found"),
        (["eval", "--checkpoint", "/no/such.pt"], "/no/such.pt: checkpoint not found"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--out", str(tmp_path)] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("msakit: error:") and message in err[-1]
