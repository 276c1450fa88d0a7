"""Hostile and broken checkpoints (`msakit eval`, `--resume`, the personality head folder): each
ends as one line naming the file, exit status 2, nothing built or written first."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time

import pytest
import torch

from msakit.cli import main
from msakit.train.checkpoint import CheckpointError, load_checkpoint

SMALL = ["--set", "data.synthetic.train_size=60", "data.synthetic.valid_size=20",
         "data.synthetic.test_size=20", "train.progress=false", "model.text_hidden=8",
         "model.audio_hidden=4", "model.vision_hidden=4", "model.fusion_hidden=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 0
    return out


def _raw(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _rewrite(run, tmp_path, edit, name="best.pt"):
    state = _raw(run / "seed_1" / name)
    edit(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


def _eval_fails(path, capsys, *needles, extra=()):
    capsys.readouterr()
    before = set(os.listdir(path.parent))
    assert main(["eval", "--checkpoint", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"msakit: error: {path}"), err
    for needle in needles:
        assert needle in err, err
    assert set(os.listdir(path.parent)) == before
    return err


def test_tiny_checkpoint_declaring_a_huge_layer_is_refused_before_building(run, tmp_path, capsys):
    def huge(state):
        state["config"]["model"]["text_hidden"] = 10**6
        state["config"]["model"]["fusion_hidden"] = 10**6

    path = _rewrite(run, tmp_path, huge)
    assert path.stat().st_size < 20_000
    started = time.perf_counter()
    _eval_fails(path, capsys, "declares lf_dnn weights of", "MiB but the file holds")
    assert time.perf_counter() - started < 10  # nothing of 4 TB was allocated


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.pop("model"), "entry 'model' is missing"),
        (lambda s: s.update(info="mosi"), "entry 'info' is missing or not a dict"),
        (lambda s: s["info"].update(feature_dims={"text": -3, "audio": 4, "vision": 4}), "dataset info is malformed"),
        (lambda s: s["config"]["train"].update(lr="fast"), "stored config does not build (train.lr: expected a number"),
        (lambda s: s["config"]["model"].update(dropout=7.0), "model.dropout"),
        (lambda s: s["config"]["model"].update(colour="red"), "unknown key 'colour'"),
        (lambda s: s["model"].update(extra=torch.zeros(2)), "unexpected ['extra']"),
        (lambda s: s["model"].pop(next(iter(s["model"]))), "missing ["),
        (lambda s: s["model"].update({k: torch.zeros(3, 3) for k in list(s["model"])[:1]}), "the config needs"),
        (lambda s: s["model"].update({k: v.double() for k, v in s["model"].items()}), "torch.float64"),
        (lambda s: s.update(format=7), "not an msakit checkpoint"),
    ],
)
def test_missing_and_mistyped_entries(run, tmp_path, capsys, edit, needle):
    _eval_fails(_rewrite(run, tmp_path, edit), capsys, needle)


def test_checkpoint_of_another_model(run, tmp_path, capsys):
    def other(state):
        state["config"]["model"] = {"name": "tfn"}  # lf_dnn weights under a tfn config

    _eval_fails(_rewrite(run, tmp_path, other), capsys, "weights do not match the model its config builds")


def test_zero_stride_weight_is_refused(run, tmp_path, capsys):
    def strided(state):
        name, weight = next((k, v) for k, v in state["model"].items() if v.dim() == 2)
        state["model"][name] = torch.zeros(1).expand(*weight.shape)

    _eval_fails(_rewrite(run, tmp_path, strided), capsys, "claims more elements than its stored data")


def test_stored_config_cannot_make_eval_write_a_file(run, tmp_path, capsys):
    """A synthetic config with a data_path that does not exist would generate and WRITE it."""
    target = tmp_path / "elsewhere" / "written.pkl"

    def writer(state):
        state["config"]["data"]["data_path"] = str(target)

    _eval_fails(_rewrite(run, tmp_path, writer), capsys, "which does not exist")
    assert not target.exists() and not target.parent.exists()


def test_unpicklable_checkpoint_is_one_line(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": Evil()}, path)
    err = _eval_fails(path, capsys, "not a readable msakit checkpoint (the weights-only reader refused it: "
                      "Trying to load unsupported GLOBAL posix.system whose module posix is blocked)")
    assert not (tmp_path / "pwned").exists()
    assert "weights_only" not in err  # not torch's advice to load it unsafely


NOT_ZIP = "(not a complete zip archive, the format torch.save writes; msakit reads no other)"


def test_files_torch_load_would_read_otherwise_are_refused_before_it(run, tmp_path, capsys):
    """torch.load also reads its legacy formats (allocating each storage's declared size before
    reading its bytes) and inflates deflated zip entries: both are refused before torch.load."""
    import tarfile
    import zipfile

    tar = tmp_path / "legacy_tar.pt"
    with tarfile.open(tar, "w") as archive:
        archive.add(run / "config.yaml", arcname="config.yaml")
    legacy = tmp_path / "legacy.pt"
    torch.save({"format": 1, "w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "seed_1" / "best.pt").read_bytes()[:200])
    for path in (tar, legacy, truncated):
        assert _eval_fails(path, capsys).endswith(f"{path}: not a readable msakit checkpoint {NOT_ZIP}")
    bomb = tmp_path / "bomb.pt"  # a real checkpoint plus a deflated 20 MB entry of zeros
    with zipfile.ZipFile(run / "seed_1" / "best.pt") as source, zipfile.ZipFile(bomb, "w") as out:
        for entry in source.infolist():
            out.writestr(entry, source.read(entry))
        out.writestr("best/data/zeros", bytes(20 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    assert _eval_fails(bomb, capsys).endswith(
        f"{bomb}: not a readable msakit checkpoint (entry 'best/data/zeros' is compressed, which "
        "torch.save never writes)")
    lying = tmp_path / "lying.pt"  # a stored entry whose directory record claims 4 GB
    raw = bytearray((run / "seed_1" / "best.pt").read_bytes())
    record = raw.index(b"PK\x01\x02")  # the first central-directory record; +24: uncompressed size
    raw[record + 24:record + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    lying.write_bytes(raw)
    _eval_fails(lying, capsys, "entries declare more bytes than the file holds")


@pytest.mark.parametrize("content", [bytes(range(256)) * 20, b"hello world\n", pickle.dumps({"format": 1}, protocol=4)])
def test_a_file_that_is_no_checkpoint_is_one_line_without_warnings(tmp_path, capsys, recwarn, content):
    path = tmp_path / "random.pt"
    path.write_bytes(content)
    err = _eval_fails(path, capsys, f"{path}: not a readable msakit checkpoint {NOT_ZIP}")
    assert "weights_only" not in err
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's, silenced


def test_an_empty_file_is_named(tmp_path, capsys):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    _eval_fails(path, capsys, f"{path}: not a readable msakit checkpoint (the file is empty)")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.pop("optimizers"), "not an msakit checkpoint"),  # becomes a best.pt-like state
        (lambda s: s.update(epoch="3"), "resumable entry 'epoch'"),
        (lambda s: s.update(rng=torch.zeros(3)), "entry 'rng'"),
        (lambda s: s.update(best_value="low"), "'best_value' is not a number"),
        (lambda s: s["optimizers"].update(extra={}), "optimisers ['extra', 'main']"),
        (lambda s: s["optimizers"]["main"].update(param_groups=[]), "optimiser 'main' state does not fit"),
        (lambda s: s["best_state"].popitem(), "best_state: weights do not match"),
    ],
)
def test_resume_from_a_broken_last_checkpoint(run, tmp_path, capsys, edit, needle):
    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    state = _raw(out / "seed_1" / "last.pt")
    edit(state)
    if "optimizers" not in state:
        state["format"] = 0
    torch.save(state, out / "seed_1" / "last.pt")
    capsys.readouterr()
    code = main(["train", "--epochs", "2", "--out", str(out), "--resume", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"msakit: error: {out / 'seed_1' / 'last.pt'}"), err
    assert needle in err[-1]


def test_evaluating_on_other_data_of_the_same_shape_is_said(run, caplog):
    """Other data with the model's dims are allowed (cross-dataset evaluation) but logged:
    numbers on them are not the run's (a relabelled file used to evaluate without a word)."""
    import logging

    from msakit.evaluate import evaluate_checkpoint

    best = run / "seed_1" / "best.pt"
    with caplog.at_level(logging.WARNING, logger="msakit"):
        evaluate_checkpoint(best)
        assert not [r for r in caplog.records if "other data" in r.getMessage()]
        evaluate_checkpoint(best, ["data.synthetic.label_noise=0.9"])
    said = [r.getMessage() for r in caplog.records if "other data" in r.getMessage()]
    assert said == [f"{best}: evaluated on other data than it was trained on (the data's fingerprint: their "
                    "content, or the dataset's name)"]


def test_every_command_that_evaluates_a_checkpoint_says_other_data(run, caplog):
    """robustness, analyze and probes share eval's check (`check_data`)."""
    import dataclasses
    import logging

    from msakit.analysis import analyze_checkpoint
    from msakit.data import load_dataset
    from msakit.evaluate import check_data, load_model_from_checkpoint
    from msakit.probes import probe_report
    from msakit.robustness import robustness_report

    best = run / "seed_1" / "best.pt"
    other = ["data.synthetic.label_noise=0.9"]
    calls = {"robustness": lambda: robustness_report({"r": [best]}, ["drop"], [0, 1], [1], data_overrides=other),
             "analyze": lambda: analyze_checkpoint(best, other),
             "probes": lambda: probe_report(best, metrics=["mae"], data_overrides=other)}
    for name, call in calls.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="msakit"):
            call()
        assert [r for r in caplog.records if "evaluated on other data" in r.getMessage()], name
    model, cfg, saved = load_model_from_checkpoint(best)
    data = load_dataset(cfg.data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msakit"):
        check_data(best, model, dataclasses.replace(saved, label_range=(-1.0, 1.0), metric_family="sims"), data)
    assert [r.getMessage() for r in caplog.records] == [
        f"{best}: evaluated on other data than it was trained on (label_range (-1.0, 1.0) -> (-3.0, 3.0); "
        "metric_family sims -> mosi)"]
    with pytest.raises(CheckpointError, match="outputs"):
        check_data(best, model, dataclasses.replace(saved, feature_dims={**saved.feature_dims, "audio": 3}), data)


def test_valid_checkpoints_still_load(run):
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / "seed_1" / name)
        assert state["config"]["model"]["name"] == "lf_dnn"
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(run / "nope.pt")


# ----------------------------------------------------------------------------- personality head


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    from msakit.personality import fit_personality_head

    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("head")
    csv = folder / "traits.csv"
    rows = ["text,o,c,e,a,n"] + [f"text number {i},0.{i},0.5,0.5,0.5,0.5" for i in range(1, 9)]
    csv.write_text("\n".join(rows) + "\n")
    fit_personality_head(csv, "text", ["o", "c", "e", "a", "n"], "tiny", folder / "head", epochs=1, hidden=4)
    return folder / "head"


def _personality_fails(folder, *needles):
    from msakit.config import ConfigError
    from msakit.personality import PersonalityEncoder

    with pytest.raises((ConfigError, CheckpointError)) as err:
        PersonalityEncoder(str(folder))
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    for needle in needles:
        assert needle in message, message


def test_refused_personality_head_is_one_line(head, tmp_path):
    folder = tmp_path / "head"
    shutil.copytree(head, folder)
    (folder / "head.pt").write_bytes(pickle.dumps(os.system))
    _personality_fails(folder, "cannot load the personality head")


def test_personality_head_declaring_huge_dims_is_refused(head, tmp_path):
    folder = tmp_path / "head"
    shutil.copytree(head, folder)
    meta = json.loads((folder / "personality.json").read_text())
    meta["hidden"] = 10**6
    (folder / "personality.json").write_text(json.dumps(meta))
    _personality_fails(folder, "the config needs")
    meta["hidden"] = "many"
    (folder / "personality.json").write_text(json.dumps(meta))
    _personality_fails(folder, "hidden")


def test_personality_head_with_foreign_weights(head, tmp_path):
    folder = tmp_path / "head"
    shutil.copytree(head, folder)
    torch.save({"weight": torch.zeros(3)}, folder / "head.pt")
    _personality_fails(folder, "weights do not match")
