"""Well-formed files whose layout differs from msakit's assumptions are read as their authors
meant them (issue 11, "layouts read silently wrong"): the padding side (MulT's start padding,
MMSA-FET's padding_location='start'), MulT's unaligned pickles, video context from the ids,
selection metrics that are never defined, and labels that are wrong but were accepted.
Every file is written by the test itself."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from msakit.batch import MODALITIES
from msakit.cli import main
from msakit.data.base import DataError
from msakit.data.mmsa import read_mmsa, write_mmsa
from msakit.data.mult import read_mult, write_mult
from msakit.registry import create_model, get_model_entry
from msakit.train.loop import predict

DIMS = {"text": 6, "audio": 4, "vision": 5}
SIZES = {"train": 10, "valid": 6, "test": 8}


def utterances(seed: int = 0) -> dict[str, dict]:
    """The same utterances for every layout: per split, real frames [N, l_i, D_m] of one shared
    length l_i in [1, 5] (no all-zero frame inside), labels and video/clip ids."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SIZES.items():
        lengths = rng.integers(1, 6, size=n)
        lengths[:2] = (5, 2)  # one full-length (for L = 5) and one short sample in every split
        out[split] = {
            "lengths": lengths,
            "frames": {m: [rng.normal(size=(k, DIMS[m])).astype(np.float32) + 0.1 for k in lengths]
                       for m in MODALITIES},
            "labels": rng.uniform(-3, 3, size=n).astype(np.float32),
            "videos": [(f"vid{split}{i // 3}", str(i % 3)) for i in range(n)],
        }
    return out


def padded(frames: list[np.ndarray], steps: int, side: str) -> np.ndarray:
    """[N, steps, D] with each sample's frames at the start ("end" padding) or end ("start")."""
    out = np.zeros((len(frames), steps, frames[0].shape[1]), dtype=np.float32)
    for i, x in enumerate(frames):
        if side == "end":
            out[i, : len(x)] = x
        else:
            out[i, steps - len(x):] = x
    return out


def write_mult_copy(path, data, side: str, steps: dict[str, int]):
    """MulT layout: no lengths; ids [N, 3] bytes (video, clip, end); labels [N, 1, 1]."""
    splits = {}
    for split, u in data.items():
        splits[split] = {m: padded(u["frames"][m], steps[m], side) for m in MODALITIES}
        splits[split]["labels"] = u["labels"][:, None, None]
        splits[split]["id"] = np.array([[v.encode(), c.encode(), b"0"] for v, c in u["videos"]],
                                       dtype=object)
    return write_mult(path, splits)


def write_mmsa_copy(path, data, side: str, steps: dict[str, int]):
    """MMSA layout with the true lengths stored (text_bert mask, audio/vision_lengths), the
    frames padded on `side` (MMSA-FET padding_location)."""
    splits = {}
    for split, u in data.items():
        n, lengths = len(u["labels"]), u["lengths"]
        record = {m: padded(u["frames"][m], steps[m], side) for m in MODALITIES}
        bert = np.zeros((n, 3, steps["text"]), dtype=np.float32)
        bert[:, 1] = padded([np.ones((k, 1)) for k in lengths], steps["text"], side)[:, :, 0]
        record.update(
            id=np.array([f"{v}$_${c}" for v, c in u["videos"]], dtype=object),
            text_bert=bert, audio_lengths=lengths, vision_lengths=lengths,
            regression_labels=u["labels"],
        )
        splits[split] = record
    return write_mmsa(path, splits)


def tiny_model(name: str, info):
    torch.manual_seed(0)
    return create_model(name, get_model_entry(name).config_cls.tiny(), info).eval()


def clip(sample_id: str) -> str:
    """One spelling for an utterance across layouts: MMSA "v$_$c" and MulT "v_c_0" -> "v_c"."""
    return sample_id.replace("$_$", "_") if "$_$" in sample_id else sample_id.removesuffix("_0")


def predictions(model, data, split="test") -> dict[str, float]:
    arrays = data.splits[split]
    prediction, _ = predict(model, arrays, data.info, 4, torch.device("cpu"))
    return dict(zip(map(clip, arrays.ids), prediction.tolist(), strict=True))


ALIGNED = {m: 8 for m in MODALITIES}
SHORT = {m: 5 for m in MODALITIES}
UNALIGNED = {"text": 6, "audio": 9, "vision": 7}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same utterances in six layouts, each read back by its real loader."""
    folder, data = tmp_path_factory.mktemp("layouts"), utterances()
    return {
        "mult right L8": read_mult(write_mult_copy(folder / "r8_data.pkl", data, "end", ALIGNED)),
        "mult left L8": read_mult(write_mult_copy(folder / "l8_data.pkl", data, "start", ALIGNED)),
        "mult left L5": read_mult(write_mult_copy(folder / "l5_data.pkl", data, "start", SHORT)),
        "mult noalign left": read_mult(
            write_mult_copy(folder / "mosi_data_noalign.pkl", data, "start", UNALIGNED)),
        "mmsa end": read_mmsa(write_mmsa_copy(folder / "end.pkl", data, "end", UNALIGNED)),
        "mmsa start": read_mmsa(write_mmsa_copy(folder / "start.pkl", data, "start", UNALIGNED)),
    }


# ----------------------------------------------------------------------------- 1. padding side


@pytest.mark.parametrize("name", ["mult", "lf_dnn"])
def test_every_padding_layout_gives_the_same_predictions(layouts, name):
    """MulT attends over positions (a leading zero frame counted as real, or a real frame masked
    out, moves its output); LF-DNN pools over the mask."""
    model = tiny_model(name, layouts["mult right L8"].info)
    reference = predictions(model, layouts["mult right L8"])
    for layout, data in layouts.items():
        got = predictions(model, data)
        assert got.keys() == reference.keys()
        np.testing.assert_allclose([got[k] for k in reference], list(reference.values()),
                                   rtol=1e-5, atol=1e-5, err_msg=layout)


def test_the_side_is_found_and_said_in_the_notes(layouts):
    assert layouts["mult left L8"].notes[0].startswith("padding: text+audio+vision start (")
    assert layouts["mult right L8"].notes[0].startswith("padding: text+audio+vision end (")
    assert "text start (" in layouts["mmsa start"].notes[0]
    assert "audio start (" in layouts["mmsa start"].notes[0]
    assert "vision end (" in layouts["mmsa end"].notes[0]
    start, end = layouts["mmsa start"].splits["train"], layouts["mmsa end"].splits["train"]
    for m in MODALITIES:  # converted to one convention: identical arrays and lengths
        np.testing.assert_array_equal(start.features[m], end.features[m])
        np.testing.assert_array_equal(start.lengths[m], end.lengths[m])


def test_reading_the_wrong_side_moves_predictions(tmp_path, layouts):
    """The check above has teeth: forcing the wrong side changes what the model sees."""
    data = utterances()
    model = tiny_model("mult", layouts["mult right L8"].info)
    reference = predictions(model, layouts["mult right L8"])
    wrong = {
        "mult": read_mult(write_mult_copy(tmp_path / "l_data.pkl", data, "start", ALIGNED),
                          padding="end"),
        "mmsa": read_mmsa(write_mmsa_copy(tmp_path / "s.pkl", data, "start", UNALIGNED),
                          padding="end"),
    }
    for layout, read in wrong.items():
        got = predictions(model, read)
        assert max(abs(got[k] - reference[k]) for k in reference) > 1e-3, layout
    assert "(data.padding;" in wrong["mult"].notes[0]


def test_both_sides_in_one_file_is_an_error_that_names_it(tmp_path, capsys):
    data = utterances()
    path = write_mult_copy(tmp_path / "mixed_data.pkl", data, "start", ALIGNED)
    raw = {split: dict(v) for split, v in pickle.loads(path.read_bytes()).items()}
    for m in MODALITIES:  # the valid split is end-padded
        raw["valid"][m] = padded(data["valid"]["frames"][m], ALIGNED[m], "end")
    write_mult(path, raw)
    with pytest.raises(DataError, match=r"mixed_data\.pkl: text\+audio\+vision: the padding side is "
                                         r"ambiguous \(\d+ samples look start-padded, \d+ end-padded\)"):
        read_mult(path)
    argv = ["train", "--dataset", "mult", "--data-path", str(path), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.padding=start or data.padding=end" in err[0]
    assert read_mult(path, padding="start").notes[0].startswith("padding: text+audio+vision start")


def test_padding_option_is_validated():
    from msakit.config import ConfigError, build_config

    assert build_config({"data": {"padding": "start"}}).data.padding == "start"
    with pytest.raises(ConfigError, match="data.padding must be auto, start or end"):
        build_config({}, ["data.padding=left"])


# ----------------------------------------------------------------------------- 2. MulT unaligned


def test_mult_unaligned_pickle_is_read(layouts):
    data = layouts["mult noalign left"]
    assert data.info.name == "mosi_noalign" and data.info.task == "regression"
    assert data.info.max_lengths == UNALIGNED
    raw = utterances()
    for split, u in raw.items():
        arrays = data.splits[split]
        order = [arrays.ids.index(f"{v}_{c}_0") for v, c in u["videos"]]
        np.testing.assert_allclose(arrays.labels[order], u["labels"])
        for m in MODALITIES:
            np.testing.assert_array_equal(arrays.lengths[m][order], u["lengths"])
            for row, frames in zip(order, u["frames"][m], strict=True):
                np.testing.assert_array_equal(arrays.features[m][row, : len(frames)], frames)
                assert not arrays.features[m][row, len(frames):].any()
    assert all(f"{m} start (" in data.notes[0] for m in MODALITIES)


def test_mult_unaligned_pickle_trains_through_the_cli(tmp_path):
    path = write_mult_copy(tmp_path / "mosi_data_noalign.pkl", utterances(), "start", UNALIGNED)
    out = tmp_path / "run"
    argv = ["train", "--model", "mult", "--dataset", "mult", "--data-path", str(path), "--out",
            str(out), "--epochs", "1", "--quiet", "--set", "model.dim=8", "model.num_heads=2",
            "model.layers=1", "model.self_layers=1"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["notes"][0].startswith("padding: text start (")
    assert np.isfinite(results["test_mean"]["mae"])


# ----------------------------------------------------------------------------- 3. video context

ROOT = Path(__file__).resolve().parents[1]


def write_videos(path, ids_for=None, change=None):
    """An MMSA file of videos with 3-4 clips each (clip "10" stored before "9": numeric order
    must be restored). change: (split, row) whose features are replaced."""
    rng = np.random.default_rng(3)
    splits = {}
    for split, n_videos in (("train", 4), ("valid", 2), ("test", 3)):
        clips = [(f"{split}video{v}", c) for v in range(n_videos) for c in ("0", "1", "10", "9")]
        n = len(clips)
        record = {m: rng.normal(size=(n, 3, DIMS[m])).astype(np.float32) for m in MODALITIES}
        if change is not None and change[0] == split:
            for m in MODALITIES:
                record[m][change[1]] = rng.normal(size=(3, DIMS[m])) * 3
        ids = ids_for(clips) if ids_for else [f"{v}$_${c}" for v, c in clips]
        record.update(id=np.array(ids, dtype=object),
                      regression_labels=rng.uniform(-3, 3, size=n).astype(np.float32))
        splits[split] = record
    return write_mmsa(path, splits)


def test_mmsa_ids_group_clips_by_video_in_clip_order(tmp_path):
    data = read_mmsa(write_videos(tmp_path / "videos.pkl"))
    test = data.splits["test"]
    assert test.ids[:4] == [f"testvideo0$_${c}" for c in ("0", "1", "9", "10")]
    np.testing.assert_array_equal(test.groups, np.repeat(np.arange(3), 4))
    assert "video context: 9 videos from the MMSA ids" in " ".join(data.notes)


@pytest.mark.parametrize("name, changes", [("bc_lstm", {}), ("lf_dnn", {"context": True})])
def test_changing_one_clip_moves_its_neighbours_prediction(tmp_path, name, changes):
    before = read_mmsa(write_videos(tmp_path / "a.pkl"))
    after = read_mmsa(write_videos(tmp_path / "b.pkl", change=("test", 2)))  # video 0, clip "10"
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_entry(name).config_cls.tiny(), **changes)
    model = create_model(name, cfg, before.info).eval()
    old, new = predictions(model, before), predictions(model, after)
    moved = {k: abs(new[k] - old[k]) for k in old}
    assert moved["testvideo0_9"] > 1e-5 and moved["testvideo0_0"] > 1e-5  # same video
    assert max(v for k, v in moved.items() if not k.startswith("testvideo0_")) < 1e-7


@pytest.mark.parametrize("model", [["--model", "bc_lstm"], ["--set", "model.context=true"]])
def test_contextual_models_refuse_data_without_video_groups(tmp_path, capsys, model):
    path = write_videos(tmp_path / "flat.pkl", ids_for=lambda clips: [f"{v}_{c}" for v, c in clips])
    data = read_mmsa(path)
    assert all(s.groups is None for s in data.splits.values())
    assert "video context: none (36 of 36 ids name no video" in " ".join(data.notes)
    argv = ["train", "--dataset", "mmsa", "--data-path", str(path), "--epochs", "1", "--quiet",
            "--out", str(tmp_path / "run"), *model]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not say which clips form a video" in err[0]
    plain = ["train", "--dataset", "mmsa", "--data-path", str(path), "--epochs", "1", "--quiet",
             "--out", str(tmp_path / "plain")]
    assert main(plain) == 0  # a model without context is fine on the same data


def test_shipped_bc_lstm_mmsa_config_runs_with_video_context(tmp_path):
    path = write_videos(tmp_path / "aligned_50.pkl")
    out = tmp_path / "run"
    argv = ["train", "--config", str(ROOT / "configs" / "bc_lstm" / "mosi-mmsa.yaml"), "--data-path",
            str(path), "--epochs", "1", "--seeds", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert any(note.startswith("video context: 9 videos") for note in results["notes"])
