"""The newcomer's path: --version, examples in each --help that run as shown, "did you mean",
-v/--quiet after the subcommand, eval of any split with per-sample predictions, the personality
head's mean baseline, and no "± 0.000" for a single seed."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import pytest

import msakit
from msakit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic.train_size=60", "data.synthetic.valid_size=20", "data.synthetic.test_size=20",
        "train.progress=false"]


def help_examples() -> list[tuple[str, list[str]]]:
    """(subcommand, argv) for every `msakit ...` line in the subcommands' --help epilogs."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    found = []
    parsers = dict(commands)
    parsers["personality fit"] = commands["personality"]._subparsers._group_actions[0].choices["fit"]
    for name, sub in parsers.items():
        for line in (sub.epilog or "").splitlines():
            if line.strip().startswith("msakit "):
                found.append((name, shlex.split(line.strip())[1:]))
    return found


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"msakit {msakit.__version__}"


def test_every_subcommand_that_takes_arguments_shows_examples():
    names = {name for name, _ in help_examples()}
    assert {"train", "eval", "analyze", "robustness", "compare", "extract", "predict", "personality fit"} <= names


def test_help_examples_parse_and_the_synthetic_ones_run(tmp_path, monkeypatch, capsys):
    """Each example parses; those on the embedded data run as shown (plus tiny sizes) in order,
    from a folder that has the repository's configs/ and examples/."""
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    for _, argv in help_examples():
        parser.parse_args(argv)  # SystemExit (status 2) on a flag that does not exist
    for name, argv in help_examples():
        if "--data-root" in argv or name in ("extract", "predict"):
            continue  # real data (run by the README test when it is there) or raw media: parsed above only
        if name == "personality fit":
            pytest.importorskip("transformers")
        extra = (["--set", *TINY] if name == "train" and "--resume" not in argv else [])
        assert main([*argv, *extra]) == 0, argv
    out = capsys.readouterr().out
    assert "tfn (runs/tfn/seed_1/best.pt) on synthetic, valid split" in out
    rows = list(csv.DictReader(open("runs/tfn/valid.csv")))
    assert len(rows) == 20 and set(rows[0]) == {"id", "label", "prediction"}
    assert "| tfn | " in out and "AUC noise" in out  # robustness --checkpoint: a row for the run
    assert "| quick | " in out and Path("runs/robust-overlay/robustness.png").is_file()
    assert "| tfn | quick | " in out and Path("runs/compare/compare.json").is_file()


def test_the_set_help_example_builds_on_the_default_model():
    from msakit.config import build_config

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    (action,) = [a for a in train._actions if a.dest == "set"]
    example = action.help.split("e.g. ", 1)[1].split()
    cfg = build_config(None, example)
    assert cfg.model_name == "lf_dnn" and cfg.train.lr == 0.0005 and cfg.data.batch_size == 64


@pytest.mark.parametrize("argv,suggestion", [
    (["train", "--model", "lf_dmn"], "did you mean 'lf_dnn'?"),
    (["train", "--dataset", "mosi_poria"], "did you mean 'mosi-poria'?"),
    (["train", "--set", "model.fusion_hiden=8"], "did you mean 'fusion_hidden'?"),
    (["train", "--set", "trian.epochs=2"], "did you mean 'train'?"),
])
def test_did_you_mean(argv, suggestion, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert suggestion in capsys.readouterr().err.strip().splitlines()[-1]


def test_verbose_and_quiet_are_accepted_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["train", "-v"]).verbose
    assert parser.parse_args(["-v", "train"]).verbose
    assert parser.parse_args(["train", "--quiet"]).quiet and parser.parse_args(["--quiet", "eval",
                                                                               "--checkpoint", "x"]).quiet
    assert not parser.parse_args(["list-models"]).verbose
    assert parser.parse_args(["list-models", "--quiet"]).quiet


def test_single_seed_prints_no_spread_and_eval_writes_any_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "unimodal", "--epochs", "1", "--out", str(out), "--set", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "± 0.000" not in printed and "mean ± std" not in printed and "| seed 1 |" in printed
    for split, size in (("train", 60), ("valid", 20), ("test", 20)):
        target = tmp_path / f"{split}.csv"
        assert main(["eval", "--checkpoint", str(out / "seed_1" / "best.pt"), "--split", split,
                     "--predictions", str(target)]) == 0
        assert len(list(csv.DictReader(target.open()))) == size
        assert f"unimodal ({out / 'seed_1' / 'best.pt'}) on synthetic, {split} split" in capsys.readouterr().out
    test_rows = list(csv.DictReader((out / "seed_1" / "predictions_test.csv").open()))
    assert test_rows == list(csv.DictReader((tmp_path / "test.csv").open()))  # same as the run's own


@pytest.mark.parametrize("head,warned", [(0.054, True), (0.020, False)])
def test_personality_fit_reports_the_mean_baseline_and_warns(monkeypatch, capsys, caplog, head, warned):
    import msakit.personality

    meta = {"rows": 40, "encoder_description": "tiny", "pooling": "mean", "train_mse": 0.01,
            "valid_mse": head, "valid_mse_of_train_mean": 0.031}
    monkeypatch.setattr(msakit.personality, "fit_personality_head", lambda *a, **k: meta)
    assert main(["personality", "fit", "--csv", "x.csv", "--out", "o", "--trait-columns", *"OCEAN"]) == 0
    assert "predicting the training rows' mean traits gives valid_mse 0.0310" in capsys.readouterr().out
    assert ("does not beat predicting the mean" in caplog.text) == warned
