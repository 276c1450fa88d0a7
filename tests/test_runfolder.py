"""The run folder never loses results: a resume continues the run in the folder, refused runs
write nothing, one run per folder at a time, interrupted writes are cleaned, Ctrl-C is resumable,
paths are absolute and files get the user's umask."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fakes import make_data

import msakit.train.loop as loop
from msakit.cli import main
from msakit.config import build_config
from msakit.data.mmsa import write_mmsa
from msakit.train.checkpoint import load_checkpoint, save_checkpoint
from msakit.train.experiment import run_experiment
from msakit.train.runfolder import LOCK_NAME, RunFolderError, data_fingerprint

SMALL = ["--set", "data.synthetic.train_size=60", "data.synthetic.valid_size=20",
         "data.synthetic.test_size=20", "data.batch_size=32", "train.progress=false"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("msakit: error:"), lines
    return lines[-1]


def config(*sets: str):
    return build_config({"model": {"name": "lf_dnn"}}, ["train.progress=false", "data.batch_size=16", *sets])


@pytest.fixture(scope="module")
def two_seed_run(tmp_path_factory):
    """A finished 2-seed, 2-epoch run made through the CLI (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("runs") / "lfdnn"
    assert main(["train", "--seeds", "1", "2", "--epochs", "2", "--out", str(out), *SMALL]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ----------------------------------------------------------------------------- 1: resume


def test_resume_without_flags_continues_the_runs_seeds_and_config(two_seed_run, tmp_path, capsys):
    out = copy_of(two_seed_run, tmp_path)
    before = json.loads((out / "results.json").read_text())
    config_before = (out / "config.yaml").read_text()
    assert main(["train", "--out", str(out), "--resume"]) == 0  # the README's resume command
    after = json.loads((out / "results.json").read_text())
    assert after["seeds"] == [1, 2] and after["test_mean"] == before["test_mean"]
    assert (out / "config.yaml").read_text() == config_before
    assert "seed 2" in capsys.readouterr().out


def test_resume_may_extend_the_epochs(two_seed_run, tmp_path):
    out = copy_of(two_seed_run, tmp_path)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 0
    epochs = [json.loads(x)["epoch"] for x in (out / "seed_1" / "log.jsonl").read_text().splitlines()]
    assert epochs[:2] == [1, 2] and len(epochs) in (2, 3)  # 2 if early stopping had already ended it
    assert json.loads((out / "results.json").read_text())["config"]["train"]["epochs"] == 3


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "1"], "train.seeds is [1, 2] in the run but [1] now"),
    (["--set", "train.lr=0.1"], "train.lr is 0.001 in the run but 0.1 now"),
    (["--model", "tfn"], "model.name is 'lf_dnn' in the run but 'tfn' now"),
    (["--epochs", "1"], "seed 1 already trained 2 epochs but train.epochs is 1"),
])
def test_a_contradicting_flag_is_refused_and_the_folder_untouched(two_seed_run, tmp_path, capsys, flags, message):
    out = copy_of(two_seed_run, tmp_path)
    before = snapshot(out)
    assert main(["train", "--out", str(out), "--resume", *flags]) == 2
    assert message in last_error(capsys)
    assert snapshot(out) == before


def test_resume_refuses_other_data_of_the_same_shape(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mmsa("data.pkl", make_data(seed=0).splits)
    args = ["train", "--dataset", "mmsa", "--data-path", "data.pkl", "--out", "run", "--epochs", "1",
            "--set", "train.progress=false"]
    assert main(args) == 0
    write_mmsa("data.pkl", make_data(seed=1).splits)  # same sizes and shapes, other values
    before = snapshot(tmp_path / "run")
    assert main(["train", "--out", "run", "--resume", "--epochs", "2"]) == 2
    error = last_error(capsys)
    assert "last.pt: trained on other data" in error and "train 48, valid 16, test 16" in error
    assert snapshot(tmp_path / "run") == before


def test_resume_refuses_a_last_pt_of_another_seed(two_seed_run, tmp_path, capsys):
    out = copy_of(two_seed_run, tmp_path)
    shutil.copy(out / "seed_2" / "last.pt", out / "seed_1" / "last.pt")
    before = snapshot(out)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert "seed_1/last.pt: holds seed 2, not seed 1" in last_error(capsys)
    assert snapshot(out) == before


def test_every_checkpoint_records_seed_and_data_fingerprint(two_seed_run):
    results = json.loads((two_seed_run / "results.json").read_text())
    for seed in (1, 2):
        for name in ("last.pt", "best.pt"):
            state = load_checkpoint(two_seed_run / f"seed_{seed}" / name)
            assert state["seed"] == seed and state["data_fingerprint"] == results["data_fingerprint"]


def test_fingerprint_sees_values_ids_and_texts():
    base = data_fingerprint(make_data())
    assert data_fingerprint(make_data()) == base
    changed = make_data()
    changed.splits["test"].features["vision"][3, 0, 1] += 1e-3
    assert data_fingerprint(changed) != base
    renamed = make_data()
    renamed.splits["valid"].ids[0] = "other"
    assert data_fingerprint(renamed) != base


def test_library_resume_names_the_contradicting_key(tmp_path):
    data = make_data()
    run_experiment(config("train.epochs=1"), tmp_path, data=data)
    with pytest.raises(RunFolderError, match=r"train.weight_decay is 0.0 in the run but 0.5 now"):
        run_experiment(config("train.epochs=2", "train.weight_decay=0.5"), tmp_path, resume=True, data=data)


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no run to resume here" in last_error(capsys)
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- 2: refusals write nothing


def test_a_new_run_into_a_folder_holding_a_run_is_refused_unless_overwrite(two_seed_run, tmp_path, capsys):
    out = copy_of(two_seed_run, tmp_path)
    before = snapshot(out)
    assert main(["train", "--model", "tfn", "--epochs", "1", "--out", str(out), *SMALL]) == 2
    assert "already holds a run (lf_dnn on synthetic)" in last_error(capsys)
    assert snapshot(out) == before
    assert main(["train", "--model", "tfn", "--epochs", "1", "--out", str(out), "--overwrite", *SMALL]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tfn" and results["seeds"] == [1]
    assert not (out / "seed_2").exists()  # the replaced run's seeds are gone, not mixed in


@pytest.mark.parametrize("argv", [
    ["--dataset", "synthetc"],
    ["--dataset", "mmsa", "--data-path", "/no/such/file.pkl"],
    ["--set", "model.hiden=3"],
])
def test_a_run_failing_on_its_arguments_leaves_no_folder(tmp_path, capsys, argv):
    out = tmp_path / "new" / "run"
    assert main(["train", "--out", str(out), *argv]) == 2
    last_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(("sets", "message"), [
    (["train.select_metric=acc"], "train.select_metric 'acc' is not a validation metric"),
    (["train.grad_accumulation=2", "train.window_threads=2"], "window_threads"),
])
def test_a_run_failing_once_the_model_exists_leaves_no_run(tmp_path, capsys, sets, message):
    """Settings found wrong only after the data load and model build: the corrected command
    must not meet "already holds a run"."""
    out = tmp_path / "new" / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *SMALL, *sets]) == 2
    assert message in last_error(capsys)
    assert not out.exists()
    assert main(["train", "--out", str(out), "--epochs", "1", *SMALL]) == 0


def test_a_folder_with_a_config_and_seed_folders_not_written_by_this_run_is_never_emptied(tmp_path, capsys):
    """A hand-written config.yaml in --out, notes in a seed folder: refused, nothing removed, even
    when the run would fail before its first epoch (helper-35 saw a takeover delete both)."""
    out = tmp_path / "exp"
    (out / "seed_1").mkdir(parents=True)
    (out / "seed_1" / "notes.txt").write_text("mine")
    (out / "config.yaml").write_text("# my settings\nmodel: {name: lf_dnn}\n")
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(out), "--epochs", "1", *SMALL,
                 "train.select_metric=acc"]) == 2
    assert "already holds a run" in last_error(capsys)
    assert (out / "config.yaml").read_text().startswith("# my settings") and (out / "seed_1" / "notes.txt").exists()


def test_a_failing_second_seed_keeps_the_first_resumable(tmp_path, capsys, monkeypatch):
    import msakit.train.experiment as experiment

    def fit(cfg, data, seed, *args, **kwargs):
        if seed == 2:
            raise loop.TrainingError("seed 2 failed")
        return loop.fit(cfg, data, seed, *args, **kwargs)

    monkeypatch.setattr(experiment, "fit", fit)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--seeds", "1", "2", *SMALL]) == 2
    assert "seed 2 failed" in last_error(capsys)
    assert (out / "config.yaml").is_file() and (out / "seed_1" / "last.pt").is_file()


def test_a_run_asking_for_a_missing_gpu_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "new" / "run"
    assert main(["train", "--out", str(out), "--device", "cuda", "--epochs", "1", *SMALL]) == 2
    assert "train.device='cuda' but no CUDA device is available" in last_error(capsys)
    assert not out.exists()
    assert main(["train", "--out", str(out), "--device", "cpu", "--epochs", "1", *SMALL]) == 0


def test_devices_this_machine_lacks_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loop.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(loop.TrainingError, match=r"'cuda:2' but this machine has 2 CUDA device\(s\)"):
        loop.resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(loop.TrainingError, match="train.device='mps' but no MPS device is available"):
        loop.resolve_device("mps")


def test_a_study_asking_for_a_missing_gpu_leaves_no_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("optuna")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "study"
    assert main(["tune", "--out", str(out), "--device", "cuda", "--trials", "1", *SMALL]) == 2
    assert "train.device='cuda' but no CUDA device is available" in last_error(capsys)
    assert not out.exists()


def test_stale_temporary_files_are_removed_at_the_next_start(two_seed_run, tmp_path):
    out = copy_of(two_seed_run, tmp_path)
    stale = [out / "seed_1" / ".last.pt.abc123.tmp", out / ".results.json.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    keep = out / "seed_1" / "notes.tmp"  # not an atomic-write temp name
    keep.write_text("mine")
    other = out / "trials" / "trial_0000" / "seed_1" / ".last.pt.live.tmp"  # another run's, maybe live
    other.parent.mkdir(parents=True)
    other.write_bytes(b"being written")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert not any(p.exists() for p in stale) and keep.exists() and other.exists()


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_NAME, "w") as holder:  # another process holding the folder
        holder.write("4242")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 2
        error = last_error(capsys)
    assert f"{out}: another msakit run (pid 4242) is writing into this folder" in error
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 0  # lock released: runs
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_prints_one_line_and_the_folder_resumes_to_the_same_result(tmp_path, capsys, monkeypatch):
    whole = tmp_path / "whole"
    args = ["--epochs", "3", *SMALL, "train.patience=100"]
    assert main(["train", "--out", str(whole), *args]) == 0
    real_save, calls = loop.save_checkpoint, {"n": 0}

    def interrupt_after_two_saves(state, path):
        real_save(state, path)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", interrupt_after_two_saves)
    cut = tmp_path / "cut"
    capsys.readouterr()
    assert main(["train", "--out", str(cut), *args]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"msakit: interrupted after epoch 2 (seed 1); continue with: msakit train --out {cut} --resume"]
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert main(["train", "--out", str(cut), "--resume"]) == 0
    a = json.loads((whole / "results.json").read_text())["per_seed"]
    b = json.loads((cut / "results.json").read_text())["per_seed"]
    assert a == b


# ----------------------------------------------------------------------------- 4: paths and modes


def test_data_paths_are_absolute_and_eval_suggests_data_root(tmp_path, capsys, monkeypatch):
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    write_mmsa("data.pkl", make_data().splits)
    assert main(["train", "--dataset", "mmsa", "--data-path", "data.pkl", "--out", "run", "--epochs", "1",
                 "--set", "train.progress=false"]) == 0
    saved = json.loads(Path("run/results.json").read_text())["config"]["data"]["data_path"]
    assert saved == str(tmp_path / "project" / "data.pkl")
    checkpoint = str(tmp_path / "project" / "run" / "seed_1" / "best.pt")
    monkeypatch.chdir(tmp_path)  # elsewhere: the stored absolute path still finds the data
    assert main(["eval", "--checkpoint", checkpoint]) == 0
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "project" / "data.pkl", tmp_path / "moved" / "data.pkl")
    assert main(["eval", "--checkpoint", checkpoint]) == 2
    assert "pass --data-root DIR or --data-path FILE" in last_error(capsys)
    assert main(["eval", "--checkpoint", checkpoint, "--data-path", "moved/data.pkl"]) == 0


def test_files_are_written_with_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        run_experiment(config("train.epochs=1"), tmp_path / "run", data=make_data())
        save_checkpoint({"format": 1, "x": torch.ones(1)}, tmp_path / "x.pt")
    finally:
        os.umask(previous)
    for path in [tmp_path / "x.pt", *(p for p in (tmp_path / "run").rglob("*") if p.is_file())]:
        assert path.stat().st_mode & 0o777 == 0o640, path
