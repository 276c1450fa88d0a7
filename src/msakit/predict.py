"""`msakit predict`: the sentiment of new clips from a trained checkpoint, with each modality's
exact Shapley contribution to that prediction.

The checkpoint's `DatasetInfo.extraction` says how its features were computed from raw media
(`msakit extract` settings, or the mosi-text / mosei-text text recipe); the same extraction
(`msakit.media.Extractor`) runs on each clip. A checkpoint without one (trained on features that
cannot be reproduced from raw media, e.g. mosi-poria, or on synthetic data) is refused with a
CheckpointError naming the dataset.

Per clip: the prediction with every modality present; for regression the raw score (not clipped:
as in predictions_test.csv; `outside_label_range` flags and the text output notes a score beyond
the label range) and its class (sign: positive > 0, negative < 0, neutral = 0, and the 7-class Acc-7 label after
clipping and half-to-even rounding); for classification the class probabilities. Contributions:
the model is run on all 2^3 modality subsets (absent modalities' features zeroed, masks unchanged:
as `msakit analyze`), the utility of a subset is the predicted score (regression) or the
probability of the predicted class (classification), and the exact Shapley values
(msakit.modules.shapley) sum to u(all) - u(none). A modality the clip lacks (no face found, no
audio, ...) is masked as in extraction and reported.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from msakit.analysis import mask_modalities
from msakit.batch import MODALITIES, Batch
from msakit.media import ClipError, Extractor, MediaConfig, MediaError, masked_features
from msakit.modules.shapley import shapley_values, subset_masks
from msakit.train.checkpoint import CheckpointError

SEVEN_CLASSES = ("highly negative", "negative", "weakly negative", "neutral", "weakly positive",
                 "positive", "highly positive")

__all__ = ["load_predictor", "predict_clip"]


def load_predictor(checkpoint: str | Path):
    """-> (model in eval mode, DatasetInfo, MediaConfig, Extractor). CheckpointError when the
    checkpoint records no reproducible extraction."""
    from msakit.config import ConfigError
    from msakit.evaluate import load_model_from_checkpoint

    model, cfg, info = load_model_from_checkpoint(checkpoint)
    if not info.extraction:
        raise CheckpointError(
            f"{checkpoint}: trained on {info.name!r}, whose features cannot be reproduced from raw "
            "media (no extraction recorded); msakit predict needs a model trained on `msakit extract` "
            "output, mosi-text or mosei-text")
    try:
        media_cfg = MediaConfig.from_dict(info.extraction)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{checkpoint}: its extraction settings are unusable ({e})") from e
    extractor = Extractor(media_cfg)
    expected = media_cfg.dims(extractor.text_dim())
    if expected != dict(info.feature_dims):
        raise CheckpointError(f"{checkpoint}: its extraction gives dims {expected} but the model "
                              f"expects {dict(info.feature_dims)}")
    return model, info, media_cfg, extractor


@torch.no_grad()
def predict_clip(model, info, extractor: Extractor, path: str | Path, transcript: str | None = None) -> dict:
    """Extract one clip and predict it; a JSON-ready dict (see the module docstring).
    Raises MediaError naming the file when it cannot be decoded."""
    started = time.perf_counter()
    try:
        result = extractor.extract(path, transcript)
    except ClipError as e:
        raise MediaError(f"{path}: {e}") from e
    extract_s = time.perf_counter() - started
    features = masked_features(result, dict(info.feature_dims))
    parts = {}
    for m in MODALITIES:
        parts[m] = torch.from_numpy(features[m]).float()[None]  # [1, L_m, D_m]
        parts[f"{m}_mask"] = torch.ones(1, features[m].shape[0], dtype=torch.bool)
    label = torch.zeros(1) if info.task == "regression" else torch.zeros(1, dtype=torch.long)
    batch = Batch(**parts, labels=label, index=torch.zeros(1, dtype=torch.long), ids=[Path(path).stem],
                  texts=[result["transcript"]])
    subsets = subset_masks(len(MODALITIES)).tolist()
    outputs = [model(mask_modalities(batch, keep)).prediction[0].float() for keep in subsets]  # 2^M x [...]
    full = outputs[-1]
    out = {"clip": str(path), "transcript": result["transcript"],
           "transcript_source": result["transcript_source"],
           "modalities_masked": {m: r for m, r in result["reasons"].items()},
           "extract_s": extract_s, "extract_cpu_s": result["cpu_s"], "duration_s": result["duration"]}
    if info.task == "regression":
        low, high = info.label_range or (-3.0, 3.0)
        score = float(full)
        utilities = torch.stack([o.reshape(()) for o in outputs])
        seven = int(np.round(np.clip(score, low, high)))
        out.update(score=score, polarity="positive" if score > 0 else "negative" if score < 0 else "neutral",
                   label_range=[low, high], outside_label_range=not low <= score <= high)
        if (low, high) == (-3.0, 3.0):
            out["class7"] = {"value": seven, "name": SEVEN_CLASSES[seven + 3]}
        out["utility"] = "predicted score"
    else:
        probabilities = torch.softmax(full.reshape(-1, full.shape[-1]), dim=-1)
        names = list(info.class_names) or [f"class_{k}" for k in range(full.shape[-1])]
        if info.task == "classification":
            top = int(probabilities[0].argmax())
            out["probabilities"] = {n: float(p) for n, p in zip(names, probabilities[0], strict=True)}
            out["class"] = names[top]
            utilities = torch.stack([torch.softmax(o, dim=-1)[top] for o in outputs])
            out["utility"] = f"probability of {names[top]!r}"
        else:  # multi_binary: P(positive) per task; utility = their mean
            out["probabilities"] = {n: float(p[1]) for n, p in zip(names, probabilities, strict=True)}
            utilities = torch.stack([torch.softmax(o, dim=-1)[:, 1].mean() for o in outputs])
            out["utility"] = "mean positive probability over tasks"
    psi = shapley_values(utilities.double(), len(MODALITIES))
    out["shapley"] = {m: float(v) for m, v in zip(MODALITIES, psi, strict=True)}
    out["u_all_minus_u_none"] = float(utilities[-1] - utilities[0])
    return out


def format_prediction(result: dict) -> str:
    """Human-readable lines for one clip."""
    lines = [f"{result['clip']}"]
    if "score" in result:
        seven = result.get("class7")
        extra = f"; 7-class: {seven['name']} ({seven['value']:+d})" if seven else ""
        lines.append(f"  sentiment {result['score']:+.3f} ({result['polarity']}{extra})")
        if result.get("outside_label_range"):
            low, high = result["label_range"]
            lines.append(f"  note: the score lies outside the label range [{low:g}, {high:g}]; the model "
                         "extrapolates (the 7-class reading is clipped)")
    else:
        lines.append(f"  class {result.get('class', '')}: " + ", ".join(
            f"{n} {p:.3f}" for n, p in result["probabilities"].items()))
    lines.append(f"  transcript ({result['transcript_source']}): {result['transcript'] or '(none)'}")
    for m, reason in result["modalities_masked"].items():
        lines.append(f"  {m} masked: {reason}")
    def signed(value: float) -> str:
        return f"{round(value, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"

    shares = ", ".join(f"{m} {signed(v)}" for m, v in result["shapley"].items())
    lines.append(f"  Shapley contribution to the {result['utility']} (sum {signed(result['u_all_minus_u_none'])} "
                 f"= all modalities - none): {shares}")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in result["extract_cpu_s"].items())
    lines.append(f"  extraction {result['extract_s']:.2f} s for {result['duration_s']:.2f} s of media (CPU s: {stages})")
    return "\n".join(lines)
