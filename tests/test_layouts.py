"""Well-formed files whose layout differs from msakit's assumptions are read as their authors
meant them (issue 11, "layouts read silently wrong"): the padding side (MulT's start padding,
MMSA-FET's padding_location='start'), MulT's unaligned pickles, video context from the ids,
selection metrics that are never defined, and labels that are wrong but were accepted.
Every file is written by the test itself."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
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


def _edit_mmsa(path, edit):
    raw = {split: dict(v) if isinstance(v, dict) else v for split, v in pickle.loads(path.read_bytes()).items()}
    for split in ("train", "valid", "test"):
        edit(raw[split])
    path.write_bytes(pickle.dumps(raw))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update(audio_lengths=np.maximum(s["audio_lengths"] // 2, 1)),
     r"audio: stored lengths \(audio_lengths\) disagree with the data's zero padding \(end\): \d+ of 24 "
     r"samples have real frames past their stored length"),
    (lambda s: s.update(audio_lengths=np.full_like(s["audio_lengths"], 9)),
     r"audio_lengths\) disagree with the data's zero padding \(end\): 24 of 24 samples end in zero frames "
     r"before their stored length"),
    (lambda s: s.update(audio_lengths=s["audio_lengths"] * 10), "end in zero frames before"),  # clipped to L
    (lambda s: s.update(audio_lengths=np.minimum(s["audio_lengths"] + 1, 9)), "end in zero frames before"),
    (lambda s: s.update(audio_lengths=np.roll(s["audio_lengths"], 1)), "real frames past their stored length"),
    (lambda s: s.__setitem__("text_bert", np.stack([s["text_bert"][:, 0], np.roll(s["text_bert"][:, 1], 1, axis=0),
                                                     s["text_bert"][:, 2]], axis=1)),
     r"text: stored lengths \(text_bert's mask \(row 1\)\) disagree"),
    (lambda s: s.update(vision_lengths=np.where(np.arange(len(s["vision_lengths"])) == 1, np.nan, 3.0)),
     r"train.vision: 1 lengths are not finite numbers"),
    (lambda s: s.update(text_bert=s["text_bert"][:, [1, 0, 2]]),  # rows in another order: empty mask row
     r"train.text_bert: the attention mask \(row 1 of \[N, 3, L\]: token ids, mask, segment ids\) is "
     r"empty for 10 of 10 samples"),
])
def test_stored_lengths_that_disagree_with_the_data_are_errors(tmp_path, edit, message):
    """Stored lengths are trusted only where the data's zero padding agrees: halved lengths kept
    half of every sequence, lengths of L (or in another unit, clipped to L) read the padding as
    frames, and an empty BERT mask made every text one word long, all silently."""
    path = write_mmsa_copy(tmp_path / "lengths.pkl", utterances(), "end", UNALIGNED)
    assert read_mmsa(path).splits["train"].lengths["audio"].tolist() == utterances()["train"]["lengths"].tolist()
    _edit_mmsa(path, edit)
    with pytest.raises(DataError, match=message):
        read_mmsa(path)


@pytest.mark.parametrize("side", ["start", "end"])
def test_full_length_samples_with_zero_frames_at_an_end_are_not_padding(tmp_path, side):
    """Most clips full length, a third of them without a detected face for 3 frames at one end
    (zero vision rows): the stored lengths are right, and the file loads (it was refused)."""
    data, rng = utterances(), np.random.default_rng(5)
    for split in data.values():  # every clip full length (5 frames) but one of 2 per split
        split["lengths"] = np.where(np.arange(len(split["lengths"])) == 1, 2, 5)
        split["frames"] = {m: [rng.normal(size=(k, DIMS[m])).astype(np.float32) + 0.1 for k in split["lengths"]]
                           for m in MODALITIES}
    path = write_mmsa_copy(tmp_path / "faces.pkl", data, "end", SHORT)
    lengths = {}

    def lose_faces(split):
        full = split["vision_lengths"] == 5
        lengths[len(lengths)] = split["vision_lengths"].tolist()
        rows = full & (np.arange(len(full)) % 3 == 0)
        split["vision"][rows, slice(0, 3) if side == "start" else slice(2, 5)] = 0.0
    _edit_mmsa(path, lose_faces)
    read = read_mmsa(path)
    assert [read.splits[s].lengths["vision"].tolist() for s in ("train", "valid", "test")] == list(lengths.values())


def test_forcing_the_padding_side_skips_the_length_check(tmp_path):
    path = write_mmsa_copy(tmp_path / "forced.pkl", utterances(), "end", UNALIGNED)
    _edit_mmsa(path, lambda s: s.update(audio_lengths=np.full_like(s["audio_lengths"], 9)))
    with pytest.raises(DataError, match=r"data.padding=start\|end skips this check"):
        read_mmsa(path)
    assert read_mmsa(path, padding="end").splits["train"].lengths["audio"].tolist() == [9] * 10


def test_stored_lengths_over_padding_that_is_not_zero_are_trusted(tmp_path):
    """Padding of another value (features normalised after padding) shows no zero padding: the
    stored lengths are all there is, and they are used."""
    data = utterances()
    path = write_mmsa_copy(tmp_path / "normalised.pkl", data, "end", UNALIGNED)

    def fill(split):
        for m, key in (("audio", "audio_lengths"), ("vision", "vision_lengths")):
            steps = np.arange(split[m].shape[1])[None, :, None]
            split[m] = np.where(steps < split[key][:, None, None], split[m], np.float32(-0.7))
    _edit_mmsa(path, fill)
    read = read_mmsa(path)
    assert read.splits["test"].lengths["audio"].tolist() == data["test"]["lengths"].tolist()


@pytest.mark.parametrize(("edit", "said"), [
    (lambda s: s.update(regression_labels=np.arange(len(s["regression_labels"])) % 3),
     "regression_labels hold only the whole numbers [0, 1, 2]: class indices?"),
    (lambda s: s.update(regression_labels=s["regression_labels"] / 3),
     "every label lies in [-1, 1] but the file has no regression_labels_T/A/V"),
])
def test_labels_that_look_like_something_else_are_said(tmp_path, caplog, edit, said):
    import logging

    path = write_mmsa_copy(tmp_path / "labels.pkl", utterances(), "end", UNALIGNED)
    with caplog.at_level(logging.WARNING, logger="msakit"):
        assert not any(said in note for note in read_mmsa(path).notes)
        _edit_mmsa(path, edit)
        notes = read_mmsa(path).notes
    assert any(said in note for note in notes) and any(said in r.getMessage() for r in caplog.records)


def test_one_label_for_every_sample_raises_no_doubt(tmp_path, caplog):
    """`msakit extract` without labels writes 0.0 for every clip: not class indices, not CH-SIMS."""
    import logging

    path = write_mmsa_copy(tmp_path / "unlabelled.pkl", utterances(), "end", UNALIGNED)
    _edit_mmsa(path, lambda s: s.update(regression_labels=np.zeros_like(s["regression_labels"])))
    with caplog.at_level(logging.WARNING, logger="msakit"):
        notes = read_mmsa(path).notes
    assert not [n for n in notes if "labels" in n] and not caplog.records


def test_the_same_clip_in_train_and_test_is_said(tmp_path, caplog):
    import logging

    path = write_mmsa_copy(tmp_path / "leak.pkl", utterances(), "end", UNALIGNED)
    raw = pickle.loads(path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="msakit"):
        read_mmsa(path)
        assert not [r for r in caplog.records if "not held out" in r.getMessage()]
        raw["test"] = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in raw["train"].items()}
        path.write_bytes(pickle.dumps(raw))
        read_mmsa(path)
    assert [r for r in caplog.records if "10 clips of the test split are also in the train split, with the "
            "same features" in r.getMessage()]


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


# ----------------------------------------------------------------------------- 4. selection


def write_flat(path, valid_labels=None, mutate=None):
    """A small MMSA file (end-padded, video ids); valid_labels replaces the validation labels,
    mutate(splits) edits the raw split dicts before writing."""
    rng = np.random.default_rng(4)
    splits = {}
    for split, n in SIZES.items():
        record = {m: rng.normal(size=(n, 3, DIMS[m])).astype(np.float32) for m in MODALITIES}
        record["id"] = np.array([f"{split}v{i}$_$0" for i in range(n)], dtype=object)
        record["regression_labels"] = rng.uniform(-3, 3, size=n).astype(np.float32)
        splits[split] = record
    if valid_labels is not None:
        splits["valid"]["regression_labels"] = np.full(SIZES["valid"], valid_labels, np.float32)
    if mutate is not None:
        mutate(splits)
    return write_mmsa(path, splits)


def run_cli(tmp_path, capsys, *extra, path=None, out="run") -> tuple[int, list[str]]:
    path = path or write_flat(tmp_path / "data.pkl")
    code = main(["train", "--dataset", "mmsa", "--data-path", str(path), "--epochs", "2", "--quiet",
                 "--out", str(tmp_path / out), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("metric, labels", [("corr", 1.5), ("non0_acc2", 0.0)])
def test_a_selection_metric_never_defined_is_an_error(tmp_path, capsys, metric, labels):
    """corr with constant validation labels, Non0 with all-zero ones: NaN at every epoch. Before,
    the INITIAL weights were restored and reported as selected on validation."""
    path = write_flat(tmp_path / "data.pkl", valid_labels=labels)
    code, err = run_cli(tmp_path, capsys, "--set", f"train.select_metric={metric}", path=path)
    assert code == 2 and len(err) == 1
    assert f"validation {metric} was undefined (NaN) at every epoch" in err[0]
    assert "train.select_metric" in err[0]
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "seed_1" / "best.pt").exists()
    code, _ = run_cli(tmp_path, capsys, "--set", "train.select_metric=loss", path=path, out="loss")
    assert code == 0  # the same data with a defined metric trains


# ----------------------------------------------------------------------------- 5. wrong labels


def _complex_labels(splits):
    splits["train"]["regression_labels"] = splits["train"]["regression_labels"] + 0.5j


def _repeated_clip(splits):
    splits["test"]["id"][3] = splits["test"]["id"][0]  # same clip, another label


@pytest.mark.parametrize("mutate, message", [
    (_complex_labels, r"data\.pkl: train\.regression_labels: complex values; expected real numbers"),
    (_repeated_clip, r"data\.pkl: test: clip 'testv0\$_\$0' appears twice with "
                     r"different labels"),
])
def test_wrong_mmsa_labels_are_clear_errors(tmp_path, capsys, mutate, message):
    path = write_flat(tmp_path / "data.pkl", mutate=mutate)
    code, err = run_cli(tmp_path, capsys, path=path)
    assert code == 2 and len(err) == 1
    assert re.search(message, err[0]), err[0]


def _iemocap(path, labels_of_train):
    rng = np.random.default_rng(5)
    splits = {}
    for split, n in SIZES.items():
        splits[split] = {m: rng.normal(size=(n, 4, DIMS[m])).astype(np.float32) for m in MODALITIES}
        splits[split]["labels"] = np.eye(2, dtype=np.float32)[rng.integers(0, 2, size=(n, 4))]
    labels_of_train(splits["train"]["labels"])
    return write_mult(path, splits)


@pytest.mark.parametrize("edit, shown", [
    (lambda y: y.__setitem__((2, 1), [np.nan, 1.0]), "sample 2, happy: [nan, 1.0]"),
    (lambda y: y.__setitem__((4, 3), [0.0, 0.0]), "sample 4, angry: [0.0, 0.0]"),
    (lambda y: y.__setitem__((0, 0), [1.0, 1.0]), "sample 0, neutral: [1.0, 1.0]"),
])
def test_iemocap_labels_that_are_not_one_hot_are_errors(tmp_path, edit, shown):
    path = _iemocap(tmp_path / "iemocap_data.pkl", edit)
    with pytest.raises(DataError, match=r"iemocap_data\.pkl: train\.labels: 1 emotion entries are "
                                         r"not one-hot") as err:
        read_mult(path)
    assert shown in str(err.value)


def test_complex_mult_labels_are_an_error(tmp_path):
    data = utterances()
    path = write_mult_copy(tmp_path / "mosi_data.pkl", data, "end", ALIGNED)
    raw = {k: dict(v) for k, v in pickle.loads(path.read_bytes()).items()}
    raw["valid"]["labels"] = raw["valid"]["labels"].astype(np.complex64)
    write_mult(path, raw)
    with pytest.raises(DataError, match=r"mosi_data\.pkl: valid\.labels: complex values"):
        read_mult(path)


def write_poria(root, labels: list[tuple[str, str]]):
    """A tiny mosi-poria folder: 4 training and 2 test videos of 2 clips; label.csv rows
    (clip id, label text) as given."""
    folder = root / "mosi-poria"
    (folder / "audio").mkdir(parents=True)
    (folder / "video").mkdir()
    clips = [f"v{v}_{c}" for v in range(6) for c in (1, 2)]
    (folder / "transcripts.csv").write_text("".join(f"{c},words of {c},0,1\n" for c in clips))
    for split, rows in (("train", range(8)), ("test", range(8, 12))):
        rng = np.random.default_rng(len(rows))
        (folder / f"text_{split}.csv").write_text(
            "".join(f"{r}.0," + ",".join(f"{x:.3f}" for x in rng.normal(size=3)) + "\n" for r in rows))
        for kind in ("audio", "video"):
            (folder / kind / f"{kind}_{split}0.csv").write_text(
                "".join(",".join(f"{x:.3f}" for x in rng.normal(size=3)) + ",1\n" for _ in rows))
    (root / "mosi-labels").mkdir()
    (root / "mosi-labels" / "label.csv").write_text(
        "id,text,label,mode\n" + "".join(f"{c},t,{y},train\n" for c, y in labels))
    return root


@pytest.mark.parametrize("extra, message", [
    ([("v0_1", "2.5")], r"label\.csv: clip v0_1 is listed twice with different labels \(1 and "
                         r"2\.5; second on line 14\)"),
    ([("v0_1", "(1+2j)")], r"label\.csv: line 14 \(clip v0_1\): label '\(1\+2j\)' is not a real "
                           r"number"),
])
def test_wrong_poria_label_files_are_clear_errors(tmp_path, capsys, extra, message):
    from msakit.data.mosi_poria import read_mosi_poria

    good = [(f"v{v}_{c}", "1") for v in range(6) for c in (1, 2)]
    assert len(read_mosi_poria(write_poria(tmp_path / "ok", good)).splits["test"]) == 4
    root = write_poria(tmp_path / "bad", good + extra)
    argv = ["train", "--dataset", "mosi-poria", "--data-root", str(root), "--epochs", "1",
            "--quiet", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_poria_label_ids_with_spaces_match_as_transcript_ids_do(tmp_path):
    """label.csv ids were not stripped (transcript ids were): " v0_1" matched no clip, and the
    clip was dropped as one without a continuous label."""
    from msakit.data.mosi_poria import read_mosi_poria

    spaced = [(f" v{v}_{c}", f"{v / 2:.1f}") for v in range(6) for c in (1, 2)]
    data = read_mosi_poria(write_poria(tmp_path / "spaced", spaced))
    assert len(data.splits["test"]) == 4 and sorted(set(data.splits["test"].labels.tolist())) == [2.0, 2.5]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1", "1"], "train.seeds names seed 1 twice; each seed runs once"),
    (["--seeds", "3", "1", "3", "1"], "train.seeds names seed 1 twice"),
    (["--set", "train.patience=-1"], "train.patience must be >= 1, got -1"),
    (["--set", "train.patience=0"], "train.patience must be >= 1, got 0"),
])
def test_bad_run_settings_are_clear_errors(tmp_path, capsys, argv, message):
    code, err = run_cli(tmp_path, capsys, *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
