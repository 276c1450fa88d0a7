"""mosi-text / mosei-text: the real transcripts' label files, the official split, the cached frozen
embeddings, the recorded text recipe and the datasets' default model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from msakit.config import ConfigError, DataConfig, build_config
from msakit.data import DataError, default_model, load_dataset
from msakit.media import MediaConfig

MOSI = "id,text,label,mode\n" + "\n".join(
    f"v{i}_{i},clip number {i} is {'good' if i % 2 else 'bad'},{(-1) ** i * 0.5 * (i % 7) / 2:.2f},"
    f"{['train', 'train', 'dev', 'test'][i % 4]}" for i in range(24)) + "\n"


def write_root(tmp_path, text: str = MOSI, folder: str = "mosi-labels"):
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / folder / "label.csv").write_text(text)
    return tmp_path


def test_mosi_text_split_features_cache_and_recipe(tmp_path, monkeypatch):
    root = write_root(tmp_path)
    data = load_dataset(DataConfig(name="mosi-text", data_root=str(root), text_encoder="tiny"))
    assert {s: len(a) for s, a in data.splits.items()} == {"train": 12, "valid": 6, "test": 6}
    train = data.splits["train"]
    assert train.features["text"].shape == (12, 1, 32) and train.features["audio"].shape == (12, 1, 1)
    assert train.ids[0] == "v0_0" and train.texts[1] == "clip number 1 is good"
    assert np.abs(train.features["audio"]).sum() == 0 and np.abs(train.features["text"]).sum() > 0
    assert data.splits["valid"].ids[0] == "v2_2"  # "dev" is the validation split
    recipe = MediaConfig.from_dict(data.info.extraction)
    assert (recipe.text_features, recipe.text_encoder, recipe.audio, recipe.vision) == ("sentence", "tiny", "none", "none")
    # the second load reads the embedding cache: embedding again would fail here
    import msakit.personality

    monkeypatch.setattr(msakit.personality, "embed_texts", lambda *a, **k: pytest.fail("not cached"))
    again = load_dataset(DataConfig(name="mosi-text", data_root=str(root), text_encoder="tiny"))
    np.testing.assert_array_equal(again.splits["test"].features["text"], data.splits["test"].features["text"])


def test_embeddings_do_not_depend_on_batching_order(tmp_path):
    from msakit.data.cmu_text import sentence_features
    from msakit.modules.text_encoder import TextEncoder
    from msakit.personality import embed_texts

    texts = ["a", "a much longer sentence than the first one", "mid length text"]
    embedded, _ = sentence_features(texts, "tiny", batch_size=2)
    encoder = TextEncoder("tiny", max_length=128, seed=0).freeze()
    one_by_one = np.concatenate([embed_texts(encoder, [t], encoder.pooling).numpy() for t in texts])
    np.testing.assert_allclose(embedded, one_by_one, atol=1e-5)


@pytest.mark.parametrize("text, message", [
    ("video_id,clip_id,text,label,mode\na,1,hi,0.5,train\n", "header is"),
    ("id,text,label,mode\na_1,hi,0.5,holdout\n", "mode 'holdout'"),
    ("id,text,label,mode\na_1,hi,4.5,train\n", "outside [-3, 3]"),
    ("id,text,label,mode\na_1,hi,high,train\n", "line 2: label 'high' is not a number"),
    ('id,text,label,mode\na_1,"hello\nworld",1.0,train\nb_1,hi,7,train\n', "line 4: label '7' is outside"),
    ("id,text,label,mode\na_1,,0.5,train\n", "empty text"),
])
def test_bad_label_files_are_named(tmp_path, text, message):
    root = write_root(tmp_path, text)
    with pytest.raises(DataError, match="label.csv") as error:
        load_dataset(DataConfig(name="mosi-text", data_root=str(root), text_encoder="none"))
    assert message in str(error.value)


@pytest.mark.parametrize("layout", ["{v},{c},{t},{y},Neutral,{m}", "{v},{c},{t},{y},0.2,-0.4,1.0,Neutral,{m}",
                                    "{v},{c},{t},{y},Neutral,{m},0.2,-0.4,1.0"])
def test_mmsa_release_layouts_are_read(tmp_path, layout):
    """MMSA's own label.csv layouts (annotation; label_T/A/V after the label or at the end)."""
    from msakit.data.cmu_text import MMSA_HEADERS

    header = next(h for h in MMSA_HEADERS if len(h) == layout.count(",") + 1 and
                  (h[4] == "label_T") == ("0.2,-0.4" in layout.split("{y},")[1][:8]))
    rows = [line.split(",") for line in MOSI.splitlines()[1:]]
    mmsa = ",".join(header) + "\n" + "".join(layout.format(v=sid.split("_")[0], c=sid.split("_")[1], t=text, y=label,
                                                           m=mode) + "\n" for sid, text, label, mode in rows)
    for name, folder in (("mosi-text", "mosi-labels"), ("mosei-text", "mosei-labels")):
        root = write_root(tmp_path / name, mmsa, folder)
        data = load_dataset(DataConfig(name=name, data_root=str(root), text_encoder="none"))
        plain = load_dataset(DataConfig(name="mosi-text", data_root=str(write_root(tmp_path / "plain")),
                                        text_encoder="none"))
        for split in ("train", "valid", "test"):
            assert data.splits[split].ids == plain.splits[split].ids
            assert data.splits[split].texts == plain.splits[split].texts
            np.testing.assert_array_equal(data.splits[split].labels, plain.splits[split].labels)


def test_blank_lines_and_spaces_around_ids_are_read(tmp_path):
    """A file saved with a trailing blank line (Windows: \\r\\n\\r\\n) and ids with spaces around
    them: the same clips as the clean file."""
    lines = MOSI.splitlines()
    spaced = "\r\n".join([lines[0]] + [" " + line.replace(",", " ,", 1) for line in lines[1:]]) + "\r\n\r\n"
    data = load_dataset(DataConfig(name="mosi-text", data_root=str(write_root(tmp_path / "a", spaced)),
                                   text_encoder="none"))
    plain = load_dataset(DataConfig(name="mosi-text", data_root=str(write_root(tmp_path / "b")), text_encoder="none"))
    assert all(data.splits[s].ids == plain.splits[s].ids for s in ("train", "valid", "test"))


def test_default_model_is_the_frozen_encoder_head():
    assert default_model("mosei-text") == "unimodal" and default_model("synthetic") is None
    assert build_config({"data": {"name": "mosei-text"}}).model_name == "unimodal"
    assert build_config({"data": {"name": "mosei-text"}, "model": {"name": "text_bert"}}).model_name == "text_bert"
    assert build_config({}).model_name == "lf_dnn"
    with pytest.raises(ConfigError, match="text_encoder"):
        DataConfig(text_encoder=" ")


def test_real_label_files_official_splits(shared_data_dir):
    sizes = {}
    for name in ("mosi-text", "mosei-text"):
        data = load_dataset(DataConfig(name=name, data_root=str(shared_data_dir), text_encoder="none"))
        sizes[name] = {s: len(a) for s, a in data.splits.items()}
        labels = np.concatenate([a.labels for a in data.splits.values()])
        assert labels.min() >= -3 and labels.max() <= 3 and len(np.unique(labels)) > 20  # continuous
    assert sizes == {"mosi-text": {"train": 1281, "valid": 229, "test": 685},
                     "mosei-text": {"train": 16274, "valid": 1861, "test": 4653}}


def test_mosei_file_is_not_read_as_mosi(tmp_path, shared_data_dir):
    root = write_root(tmp_path, (shared_data_dir / "mosei-labels" / "label.csv").read_text())
    shutil.copytree(root / "mosi-labels", root / "mosei-labels")
    with pytest.raises(DataError, match="header is"):
        load_dataset(DataConfig(name="mosi-text", data_root=str(root), text_encoder="none"))
    assert len(load_dataset(DataConfig(name="mosei-text", data_root=str(root), text_encoder="none")).splits["test"]) == 4653
