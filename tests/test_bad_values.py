"""Every bad value is a clear error: exit status 2 and one line naming the key, flag or file.

Config values are checked where they are declared (`msakit.validated`): the tests below go
through the CLI for the listed cases and over the model registry for the generic rules, so a new
option of any model is covered without a new test."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import typing
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from msakit.cli import main
from msakit.config import ConfigError, build_config
from msakit.data.mmsa import write_mmsa
from msakit.registry import get_model_entry, list_models
from msakit.train.checkpoint import load_checkpoint
from msakit.validated import ModelConfig, bounds

SMALL = ["data.synthetic.train_size=40", "data.synthetic.valid_size=20", "data.synthetic.test_size=20",
         "train.progress=false", "model.text_hidden=8", "model.audio_hidden=4", "model.vision_hidden=4",
         "model.fusion_hidden=8"]


def _fails(capsys, argv, *needles) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("msakit: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lr=.nan", "train.lr must be a finite number"),
        ("train.lr=-0.1", "train.lr must be > 0"),
        ("train.lr=.inf", "train.lr must be a finite number"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
        ("train.weight_decay=.nan", "train.weight_decay must be a finite number"),
        ("model.dropout=1.5", "model.dropout must be in [0.0, 1.0)"),
        ("model.fusion_dropout=-0.1", "model.fusion_dropout must be in [0.0, 1.0)"),
        ("model.fusion_hidden=0", "model.fusion_hidden must be >= 1"),
        ("model.text_hidden=-5", "model.text_hidden must be >= 1"),
        ("train.num_threads=-1", "train.num_threads must be >= 0"),
        ("train.plateau_factor=1", "train.plateau_factor must be in (0, 1)"),
        ("train.plateau_factor=2.5", "train.plateau_factor must be in (0, 1)"),
        ("data.split_seed=-1", "data.split_seed must be in [0, 9223372036854775807]"),
        ("train.seeds=[1, 9223372036854775808]", "train.seeds[1] must be in [0, 9223372036854775807]"),
        ("train.epochs=[1", "override 'train.epochs=[1': not a valid YAML value"),
        ("train.epochs=!!python/object/apply:os.system [touch x]", "could not determine a constructor"),
        ("train.epochs=!!binary aGk=", "train.epochs: expected an integer, got b'hi'"),
        ("model=[1, 2]", "model: expected a mapping"),
        ("model.name=[1]", "model.name: expected a string"),
        ("model.hidden_sizes={a: 1}", "unknown key 'hidden_sizes'"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("model.fusion_hidden=99999999999", "model.fusion_hidden must be at most 2147483647"),
    ],
)
def test_bad_config_values_through_the_cli(tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--out", str(out), "--epochs", "1", "--set", *SMALL, override], needle)
    assert not out.exists() and not (tmp_path / "x").exists()  # refused before anything ran


def test_bad_flags(tmp_path, capsys):
    _fails(capsys, ["train", "--device", "foo", "--out", str(tmp_path / "r")], "train.device must be cpu, cuda")
    _fails(capsys, ["train", "--seeds", "-3", "--out", str(tmp_path / "r")], "train.seeds[0] must be in [0,")
    capsys.readouterr()


def test_choice_hints_read_quoted_and_bare_choice_lists(capsys):
    from msakit.cli import build_parser

    evaluate = build_parser().innermost(["eval"])
    for choices in ("'train', 'valid', 'test'", "train, valid, test"):  # Python < 3.12.8 / >= 3.12.8
        with pytest.raises(SystemExit):
            evaluate.error(f"argument --split: invalid choice: 'tset' (choose from {choices})")
        assert "(did you mean 'test'?)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, line", [
    (["train", "--epochs", "many"], "msakit train: error: argument --epochs: invalid int value: 'many' "
                                    "(see msakit train --help)"),
    (["train", "--epcohs", "3"], "msakit train: error: unrecognized arguments: --epcohs 3 (did you mean "
                                 "'--epochs'?) (see msakit train --help)"),
    (["eval", "--split", "tset"], "msakit eval: error: argument --split: invalid choice: 'tset' (choose from "
                                  "'train', 'valid', 'test') (did you mean 'test'?) (see msakit eval --help)"),
    (["personality", "fit", "--csv", "x", "--out", "y", "--trait-column", "a", "b", "c", "d", "e", "--seeed", "1"],
     "msakit personality fit: error: unrecognized arguments: --seeed 1 (did you mean '--seed'?) "
     "(see msakit personality fit --help)"),
    (["trian"], "did you mean 'train'?) (see msakit --help)"),
    (["train", "--lr", "0.1"], "msakit train: error: unrecognized arguments: --lr 0.1 (see msakit train --help)"),
    (["--bogus", "train"], "msakit: error: unrecognized arguments: --bogus (see msakit --help)"),
    (["train", "--model", "eval", "--epcohs", "1"], "msakit train: error: unrecognized arguments: --epcohs 1 "
                                                    "(did you mean '--epochs'?) (see msakit train --help)"),
])
def test_argument_errors_are_one_line_from_the_command_they_reach(capsys, argv, line):
    assert main(argv) == 2  # argparse's SystemExit turned into the status, no raise
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(line), err


def test_huge_model_is_refused_before_it_is_built(tmp_path, capsys):
    _fails(capsys, ["train", "--out", str(tmp_path / "r"), "--set", *SMALL, "model.text_hidden=2000000000",
                    "model.fusion_hidden=2000000000"], "model lf_dnn: its config")
    _fails(capsys, ["train", "--out", str(tmp_path / "r2"), "--set", *SMALL, "model.fusion_hidden=200000000"],
           "GiB of weights")


# ----------------------------------------------------------------------------- declared rules


def _numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] in (int, float):
            yield f, hints[f.name]


@pytest.mark.parametrize("name", list_models())
def test_every_model_config_checks_its_numbers(name):
    """Over the registry: every float refuses NaN/inf; every dropout refuses 1.5; every int field
    without explicit bounds refuses 0 and -1 (sizes, counts). Errors name model.<field>."""
    cls = get_model_entry(name).config_cls
    checked = 0
    for f, kind in _numeric_fields(cls):
        bad = [float("nan"), float("inf")] if kind is float else []
        if "dropout" in f.name:
            bad.append(1.5)
        if kind is int and "bounds" not in f.metadata:
            bad += [0, -1]
        for value in bad:
            with pytest.raises(ConfigError, match=rf"model\.{f.name} must be"):
                build_config({"model": {"name": name, f.name: value}})
            checked += 1
    assert checked >= 3


def test_a_new_option_is_checked_without_code():
    """A Config dataclass inherits the checks: no __post_init__ of its own is needed."""

    @dataclass
    class FutureConfig(ModelConfig):
        width: int = 8
        attn_dropout: float = 0.1
        temperature: float = field(default=1.0, metadata=bounds(above=0, high=10))

        def __post_init__(self) -> None:  # its own cross-field check still runs, after
            if self.width == 7:
                raise ConfigError("model.width must not be 7")

    FutureConfig()
    for kwargs, message in (({"width": 0}, "model.width must be >= 1"),
                            ({"attn_dropout": 2.0}, r"model.attn_dropout must be in \[0.0, 1.0\)"),
                            ({"temperature": 0.0}, r"model.temperature must be in \(0, 10\]"),
                            ({"temperature": float("nan")}, "model.temperature must be a finite"),
                            ({"width": 7}, "must not be 7")):
        with pytest.raises(ConfigError, match=message):
            FutureConfig(**kwargs)


# ----------------------------------------------------------------------------- files and paths


def test_config_file_not_utf8_or_nested_too_deep(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  name: lf_dnn # caf\xe9\n".encode("latin-1"))
    _fails(capsys, ["train", "--config", str(latin)], f"{latin}: not UTF-8 text")
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 20_000 + "]" * 20_000 + "\n")
    _fails(capsys, ["train", "--config", str(deep)], f"{deep}: ")
    deep_map = tmp_path / "deep_map.yaml"
    deep_map.write_text("model: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n")
    _fails(capsys, ["train", "--config", str(deep_map)], f"{deep_map}: ")


def test_out_paths_of_the_wrong_kind(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    _fails(capsys, ["train", "--out", str(existing), "--set", *SMALL], f"--out {existing}: exists and is not a folder")
    assert existing.read_text() == "keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    _fails(capsys, ["eval", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(folder)],
           f"--out {folder}: is a folder")


def test_read_only_output_is_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    from msakit.data import load_dataset

    load_dataset(build_config({}, SMALL).data)  # the synthetic data's cache written first (run alone, it
    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # was the cache folder that failed, not the run's)
    err = _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--set", *SMALL],
                 "cannot write (Permission denied)")
    assert str(tmp_path / "run") in err


def test_full_disk_keeps_the_previous_checkpoint_resumable(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--set", *SMALL]) == 0
    last = out / "seed_1" / "last.pt"
    before = last.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # half the bytes went out, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    _fails(capsys, ["train", "--out", str(out), "--epochs", "3", "--resume", "--set", *SMALL],
           f"{last}: cannot write (No space left on device)")
    assert last.read_bytes() == before and load_checkpoint(last)["epoch"] == 1
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--out", str(out), "--epochs", "3", "--resume", "--set", *SMALL]) == 0
    assert load_checkpoint(last)["epoch"] == 3


def test_torch_serialisation_failure_is_one_line(tmp_path, capsys, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 320 vs 0\nmore")

    monkeypatch.setattr(torch, "save", broken)
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--set", *SMALL],
           "last.pt: cannot write ([enforce fail")


# ----------------------------------------------------------------------------- data files


def _mmsa_file(path, meta=None, labels=None):
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        splits[split] = {
            "id": np.array([f"v{i}$_$0" for i in range(n)], dtype=object),
            "text": rng.normal(size=(n, 3, 4)).astype(np.float32),
            "audio": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "vision": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "regression_labels": rng.uniform(-3, 3, size=n).astype(np.float32),
        }
    if labels is not None:
        splits["train"]["regression_labels"] = labels
    write_mmsa(path, splits, meta=meta)
    return path


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ({"task": "classification", "num_classes": "three"}, "msakit.num_classes must be an integer"),
        ({"notes": 5}, "msakit.notes must be a list of strings"),
        ({"notes": [1, 2]}, "msakit.notes must be a list of strings"),
        ({"class_names": "abc"}, "msakit.class_names must be a list of strings"),
        ({"name": ["x"]}, "msakit.name must be a string"),
        ({"task": "ranking"}, "msakit.task must be"),
    ],
)
def test_malformed_metadata_block(tmp_path, capsys, meta, needle):
    path = _mmsa_file(tmp_path / "data.pkl", meta=meta)
    _fails(capsys, ["train", "--dataset", "mmsa", "--data-path", str(path), "--out", str(tmp_path / "r")],
           f"{path}: ", needle)


def test_object_labels_holding_a_huge_integer(tmp_path, capsys):
    labels = np.array([10**400] + [0.5] * 7, dtype=object)
    path = _mmsa_file(tmp_path / "data.pkl", labels=labels)
    _fails(capsys, ["train", "--dataset", "mmsa", "--data-path", str(path), "--out", str(tmp_path / "r")],
           f"{path}: train.regression_labels: not a numeric array")


def test_personality_csv_and_flags(tmp_path, capsys):
    csv = tmp_path / "traits.csv"
    csv.write_text("text,o,c,e,a\nhello,0.1,0.2,0.3,0.4\nworld,0.1,0.2,0.3,0.4\n")
    base = ["personality", "fit", "--csv", str(csv), "--out", str(tmp_path / "head"), "--encoder", "tiny",
            "--trait-columns", "o", "c", "e", "a"]
    _fails(capsys, [*base, "n"], f"{csv}: column 'n' not found")
    csv.write_text("text,o,c,e,a,n\nhello,0.1,0.2,0.3,0.4,high\nworld,0.1,0.2,0.3,0.4,0.5\n")
    _fails(capsys, [*base, "n"], f"{csv}: column 'n' has a non-numeric value 'high'")
    for flag, value, needle in (("--batch-size", "0", "--batch-size must be >= 1"),
                                ("--batch-size", "-1", "--batch-size must be >= 1"),
                                ("--hidden", "-5", "--hidden must be >= 0"),
                                ("--lr", "nan", "--lr must be a finite number > 0"),
                                ("--lr", "inf", "--lr must be a finite number > 0")):
        _fails(capsys, [*base, "n", flag, value], needle)
    assert not (tmp_path / "head").exists()


def test_mosi_labels_csv_with_a_non_numeric_label(shared_data_dir, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "mosi-labels").mkdir(parents=True)
    os.symlink(shared_data_dir / "mosi-poria", root / "mosi-poria")
    lines = (shared_data_dir / "mosi-labels" / "label.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 2)[0] + ",very positive,train"
    (root / "mosi-labels" / "label.csv").write_text("\n".join(lines) + "\n")
    _fails(capsys, ["train", "--dataset", "mosi-poria", "--data-root", str(root), "--out", str(tmp_path / "r")],
           "label.csv: line 4 (clip ", "label 'very positive' is not a real number (1 such rows)")
    lines[3] = lines[3].rsplit(",", 2)[0] + ",,train"  # a row cut short: no label at all
    (root / "mosi-labels" / "label.csv").write_text("\n".join(lines) + "\n")
    _fails(capsys, ["train", "--dataset", "mosi-poria", "--data-root", str(root), "--out", str(tmp_path / "r")],
           "label.csv: line 4 (clip ", "): has no label (1 such rows)")
    shutil.rmtree(root)
