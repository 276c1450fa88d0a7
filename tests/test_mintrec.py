"""MIntRec loader: the real TSVs of ../shared/data (sizes, classes, texts), the release's optional
feature pickles (written here in the release layout), bad files, and a tiny text-only run."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from msakit.config import DataConfig, build_config
from msakit.data import load_dataset, to_loader
from msakit.data.base import DataError
from msakit.data.mintrec import CLASS_NAMES, read_mintrec
from msakit.train.experiment import run_experiment

torch.set_num_threads(1)

HEADER = "season\tepisode\tclip\ttext\tlabel\n"
SIZES = {"train.tsv": 8, "dev.tsv": 4, "test.tsv": 4}


@pytest.fixture(scope="module")
def mintrec(shared_data_dir):
    return load_dataset(DataConfig(name="mintrec", data_root=str(shared_data_dir)))


def test_real_split_sizes_classes_and_labels(mintrec):
    assert {s: len(a) for s, a in mintrec.splits.items()} == {"train": 1334, "valid": 445, "test": 445}
    info = mintrec.info
    assert info.task == "classification" and info.metric_family == "multiclass"
    assert info.num_classes == 20 and info.class_names == CLASS_NAMES and len(set(CLASS_NAMES)) == 20
    assert CLASS_NAMES[:3] == ("Complain", "Praise", "Apologise")  # the release's order, not sorted
    assert info.train_size == 1334
    seen = set()
    for arrays in mintrec.splits.values():
        assert arrays.labels.dtype == np.int64
        assert arrays.labels.min() >= 0 and arrays.labels.max() < 20
        seen |= set(arrays.labels.tolist())
        assert len(arrays.texts) == len(arrays) and all(isinstance(t, str) and t for t in arrays.texts)
        assert all(i.count("_") == 2 and i.startswith("S") for i in arrays.ids)
    assert seen == set(range(20))
    ids = [i for a in mintrec.splits.values() for i in a.ids]
    assert len(ids) == len(set(ids)) == 2224
    train = mintrec.splits["train"]
    # first data row of train.tsv: S05 E16 329 ... Inform
    assert train.ids[0] == "S05_E16_329" and CLASS_NAMES[train.labels[0]] == "Inform"
    assert train.texts[0].startswith("apparently, teens")


def test_real_data_without_features_is_text_only(mintrec):
    assert mintrec.info.feature_dims == {"text": 1, "audio": 1, "vision": 1}
    for arrays in mintrec.splits.values():
        for m in ("text", "audio", "vision"):
            assert arrays.features[m].shape == (len(arrays), 1, 1)
            assert not arrays.features[m].any()
    notes = " ".join(mintrec.notes)
    assert "TEXT-ONLY" in notes and "Batch.texts" in notes
    batch = next(iter(to_loader(mintrec.splits["valid"], mintrec.info, 4, shuffle=False)))
    assert batch.texts == mintrec.splits["valid"].texts[:4]


# ----------------------------------------------------------------------------- small files


def write_tsvs(folder, rows_per_file=SIZES, labels=CLASS_NAMES):
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    ids = {}
    for name, n in rows_per_file.items():
        lines = [HEADER]
        ids[name] = []
        for _ in range(n):
            lines.append(f"S01\tE0{k % 3}\t{k}\tutterance {k}, with a comma.\t{labels[k % len(labels)]}\n")
            ids[name].append(f"S01_E0{k % 3}_{k}")
            k += 1
        (folder / name).write_text("".join(lines))
    return ids


def test_feature_pickles_in_the_release_layout(tmp_path):
    folder = tmp_path / "mintrec"
    ids = write_tsvs(folder)
    rng = np.random.default_rng(0)
    all_ids = [i for group in ids.values() for i in group]
    lengths = {i: int(rng.integers(1, 6)) for i in all_ids}
    lengths[all_ids[0]] = 240  # longer than the release's 230 video frames: truncated
    video = {i: rng.normal(size=(lengths[i], 1, 256)).astype(np.float32) for i in all_ids}
    audio = {i: rng.normal(size=(lengths[i] + 2, 768)).astype(np.float32) for i in all_ids}
    for name, table in (("video_feats.pkl", video), ("audio_feats.pkl", audio)):
        with (folder / name).open("wb") as f:
            pickle.dump(table, f)
    data = load_dataset(DataConfig(name="mintrec", data_root=str(tmp_path)))
    info = data.info
    assert info.feature_dims == {"text": 1, "audio": 768, "vision": 256}
    assert info.max_lengths["vision"] == 230 and info.max_lengths["audio"] == 242
    train = data.splits["train"]
    assert train.ids == ids["train.tsv"]
    assert train.lengths["vision"][0] == 230
    for row, clip in enumerate(train.ids):
        n = min(lengths[clip], 230)
        assert train.lengths["vision"][row] == n
        np.testing.assert_array_equal(train.features["vision"][row, :n], video[clip][:n, 0])
        assert not train.features["vision"][row, n:].any()
        np.testing.assert_array_equal(train.features["audio"][row, : lengths[clip] + 2], audio[clip])
    valid = data.splits["valid"]
    assert valid.ids == ids["dev.tsv"] and [CLASS_NAMES[k] for k in valid.labels] == list(CLASS_NAMES[8:12])
    notes = " ".join(data.notes)
    assert "TEXT-ONLY" not in notes and "video_feats.pkl" in notes and "Batch.texts" in notes


def test_a_pickle_missing_a_clip_or_holding_code_is_refused(tmp_path):
    folder = tmp_path / "mintrec"
    ids = write_tsvs(folder)
    partial = {i: np.zeros((2, 768), np.float32) for i in ids["train.tsv"]}  # no dev/test clips
    with (folder / "audio_feats.pkl").open("wb") as f:
        pickle.dump(partial, f)
    with pytest.raises(DataError, match=r"audio_feats\.pkl: no features for clip S01_E"):
        read_mintrec(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with (folder / "audio_feats.pkl").open("wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(DataError, match=r"audio_feats\.pkl: refused to unpickle builtins\.print"):
        read_mintrec(tmp_path)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("train.tsv", "season,episode,clip,text,label\nS01,E01,1,hi,Greet\n", "header must be"),
        ("dev.tsv", HEADER + "S01\tE01\t1\thi\n", "line 2 has 4 columns"),
        ("test.tsv", HEADER + "S01\tE01\t1\thi\tShout\n", "line 2: unknown intent 'Shout'"),
        ("train.tsv", HEADER, "no rows"),
        ("dev.tsv", HEADER + "S01\tE01\t1\thi\tGreet\nS01\tE01\t1\tho\tGreet\n", "a clip appears twice"),
    ],
)
def test_bad_tsv_names_the_file(tmp_path, name, content, message):
    folder = tmp_path / "mintrec"
    write_tsvs(folder)
    (folder / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name}: .*{message}"):
        read_mintrec(tmp_path)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(DataError, match="mintrec: folder not found"):
        read_mintrec(tmp_path)
    write_tsvs(tmp_path / "mintrec")
    (tmp_path / "mintrec" / "test.tsv").unlink()
    with pytest.raises(DataError, match=r"test\.tsv: file not found"):
        read_mintrec(tmp_path)
    with pytest.raises(DataError, match="no data folder given"):
        load_dataset(DataConfig(name="mintrec", data_root=None))


def test_text_baseline_trains_on_the_transcripts(tmp_path):
    write_tsvs(tmp_path / "mintrec", {"train.tsv": 24, "dev.tsv": 8, "test.tsv": 8})
    cfg = build_config(
        {"model": {"name": "text_bert", "encoder": "tiny", "max_tokens": 24},
         "data": {"name": "mintrec", "data_root": str(tmp_path), "batch_size": 8}},
        ["train.epochs=1", "train.progress=false"],
    )
    results = run_experiment(cfg, tmp_path / "run")
    assert results["dataset"] == "mintrec" and results["selection"]["metric"] == "f1_macro"
    assert {"acc", "f1_macro", "precision_macro", "recall_macro", "f1_weighted"} <= set(results["test_mean"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert any("TEXT-ONLY" in n for n in saved["notes"])


def test_text_bert_length_chunks_change_only_the_padding(tmp_path):
    """length_chunk runs the encoder on length-sorted chunks: same outputs and gradients, batch order kept."""
    from msakit.models.text_baseline import TextBertConfig
    from msakit.registry import create_model

    write_tsvs(tmp_path / "mintrec", {"train.tsv": 6, "dev.tsv": 2, "test.tsv": 2})
    data = load_dataset(DataConfig(name="mintrec", data_root=str(tmp_path)))
    batch = next(iter(to_loader(data.splits["train"], data.info, batch_size=6, shuffle=False)))
    batch.texts = ["a much longer utterance than all the others here", "hi", "short one", "ok then",
                   "a medium sized utterance", "yes"]
    outputs, grads = [], []
    for chunk in (0, 2):
        torch.manual_seed(0)
        model = create_model("text_bert", TextBertConfig.tiny(), data.info)
        model.cfg.length_chunk = chunk
        model.eval()
        out = model(batch).prediction
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(model.encoder.model.embeddings.word_embeddings.weight.grad.clone())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
