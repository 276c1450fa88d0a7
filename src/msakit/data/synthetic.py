"""Synthetic MSA data with planted multimodal structure (the embedded default dataset).

Generative model, per sample (all factors independent standard normals):
    s          shared sentiment, shown by every modality: strongly by text (text_strength),
               weakly by audio / vision (audio_strength / vision_strength)
    p_audio    private factor that only audio shows (private_strength); it moves the label
    p_vision   private factor that only vision shows (private_strength); it moves the label
    style      [style_dims] speaker style, a constant offset in every frame of every modality
               through fixed random projections (style_strength); the label ignores it
    eps        label noise
    y = clip(shared_weight*s + audio_private_weight*p_audio + vision_private_weight*p_vision
             + label_noise*eps, -3, 3)
The weights set the label scale directly (no rescaling; with the defaults std(y) ~ 1.8 before
clipping, ~9% of labels sit at +-3). Classification thresholds y at the train split's
k/num_classes quantiles into num_classes ordered classes.

Rendering a modality m (max length L_m, feature size D_m) for one sample:
    real length n ~ uniform integers in [ceil(min_length_fraction * L_m), L_m]; frames >= n are
    padding and exactly zero;
    every real frame: feature_noise * N(0, I) + style @ W_m;
    each factor f it shows gets its own `signal_dims` feature dimensions (fixed per data set)
    and its own random time window of round(window_fraction * n) frames inside the real part;
    inside the window those dimensions get += strength * f * sign pattern (fixed +-1 per dim).
So time pooling must respect the masks, and a sequence model can localise the windows.

Oracle (the best achievable error, from the latents): given a set of known factors,
y_raw | known ~ N(mu, sigma^2) with mu the weighted known factors and sigma^2 the squared weights
of the unknown ones plus label_noise^2. For regression the MAE-optimal prediction is the
conditional median clip(mu, -3, 3); for classes the most probable class. `synthetic_oracle`
reports test MAE / Corr / Non0-Acc2 (regression) or Acc / macro-F1 (classification) of these
predictions for all factors (`oracle_*`) and for s alone (`text_oracle_*`, the best a model
that only recovers the shared factor can do).

Randomness comes from independent streams of SeedSequence(seed): latents per split, the layout
(dims, sign patterns, style projections), and rendering per split; the seed is data.split_seed,
so every training seed sees the same data.

The registered loader writes an MMSA pickle (data.data_path, else a cache file) and reads it
back through `mmsa.read_mmsa`. Classification files carry "classification_labels" [N] int per
split (plus the continuous y as regression_labels) and msakit metadata task="classification";
see msakit/data/mmsa.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msakit.data import register_dataset
from msakit.data.base import DataError, MultimodalData
from msakit.data.mmsa import read_mmsa, write_mmsa
from msakit.data.safe_pickle import load_pickle
from msakit.validated import Validated

if TYPE_CHECKING:
    from msakit.config import DataConfig

log = logging.getLogger(__name__)

GENERATOR = "msakit.synthetic"
GENERATOR_VERSION = 2
"""Bump when the generator's output changes for a fixed config, so cached files are rebuilt."""
_SPLITS = ("train", "valid", "test")
_MODALITIES = ("text", "audio", "vision")


@dataclass
class SyntheticConfig(Validated, section="data.synthetic"):
    """Sizes, dims, lengths, noise and modality strengths of the planted data."""

    train_size: int = 1200
    valid_size: int = 300
    test_size: int = 600
    text_dim: int = 32
    audio_dim: int = 16
    vision_dim: int = 16
    text_length: int = 20
    audio_length: int = 40
    vision_length: int = 30
    min_length_fraction: float = 0.5
    """Each sample's real length is uniform in [fraction * max, max]; the rest is padding."""
    shared_weight: float = 1.5
    """Weight of the shared sentiment factor s in the label."""
    audio_private_weight: float = 0.8
    """Weight of the audio-only factor in the label."""
    vision_private_weight: float = 0.8
    """Weight of the vision-only factor in the label."""
    text_strength: float = 1.0
    """How clearly text shows s (signal amplitude against unit noise)."""
    audio_strength: float = 0.35
    """How clearly audio shows s."""
    vision_strength: float = 0.35
    """How clearly vision shows s."""
    private_strength: float = 1.0
    """How clearly audio/vision show their private factors."""
    feature_noise: float = 1.0
    label_noise: float = 0.2
    task: str = "regression"
    """"regression" (labels in [-3, 3]) or "classification" (labels thresholded into num_classes)."""
    num_classes: int = 3
    signal_dims: int = 3
    """Feature dimensions that carry each factor (text: 1 factor, audio/vision: 2 factors each)."""
    window_fraction: float = 0.3
    """Length of the time window that carries a factor, as a fraction of the real length."""
    style_dims: int = 4
    """Size of the speaker-style nuisance vector (the label ignores it)."""
    style_strength: float = 0.5
    """Amplitude of the style offset added to every real frame of every modality."""

    def __post_init__(self) -> None:
        for name in (
            "train_size",
            "valid_size",
            "test_size",
            "text_length",
            "audio_length",
            "vision_length",
            "signal_dims",
            "style_dims",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic.{name} must be >= 1")
        if self.text_dim < self.signal_dims:
            raise ValueError("synthetic.text_dim must be >= signal_dims")
        for name in ("audio_dim", "vision_dim"):
            if getattr(self, name) < 2 * self.signal_dims:
                raise ValueError(f"synthetic.{name} must be >= 2 * signal_dims")
        for name in ("min_length_fraction", "window_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic.{name} must be in (0, 1]")
        for name in ("feature_noise", "label_noise", "style_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthetic.{name} must be >= 0")
        if self.task not in ("regression", "classification"):
            raise ValueError("synthetic.task must be 'regression' or 'classification'")
        if self.num_classes < 2:
            raise ValueError("synthetic.num_classes must be >= 2")

    def size(self, split: str) -> int:
        return getattr(self, f"{split}_size")

    def dim(self, modality: str) -> int:
        return getattr(self, f"{modality}_dim")

    def length(self, modality: str) -> int:
        return getattr(self, f"{modality}_length")


# ----------------------------------------------------------------------------- latents


def _streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators: latents/render per split, and the layout."""
    names = [f"latents_{s}" for s in _SPLITS] + [f"render_{s}" for s in _SPLITS] + ["layout"]
    children = np.random.SeedSequence([int(seed), 0x5E17]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children, strict=True)}


def _weights(cfg: SyntheticConfig) -> dict[str, float]:
    return {
        "s": cfg.shared_weight,
        "p_audio": cfg.audio_private_weight,
        "p_vision": cfg.vision_private_weight,
    }


def _draw_latents(cfg: SyntheticConfig, streams: dict[str, np.random.Generator]) -> dict:
    """split -> {s, p_audio, p_vision [N], style [N, style_dims], eps [N], y [N] (clipped)}."""
    latents = {}
    for split in _SPLITS:
        rng, n = streams[f"latents_{split}"], cfg.size(split)
        z = {name: rng.standard_normal(n) for name in ("s", "p_audio", "p_vision")}
        z["style"] = rng.standard_normal((n, cfg.style_dims))
        z["eps"] = rng.standard_normal(n)
        y_raw = sum(w * z[name] for name, w in _weights(cfg).items()) + cfg.label_noise * z["eps"]
        z["y"] = np.clip(y_raw, -3.0, 3.0)
        latents[split] = z
    return latents


def _thresholds(cfg: SyntheticConfig, latents: dict) -> np.ndarray:
    """[num_classes - 1] class boundaries: the train split's k/K quantiles of y."""
    quantiles = np.arange(1, cfg.num_classes) / cfg.num_classes
    return np.quantile(latents["train"]["y"], quantiles)


def _classes(y: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.searchsorted(thresholds, y, side="right").astype(np.int64)


def class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == 2:
        return ("negative", "positive")
    if num_classes == 3:
        return ("negative", "neutral", "positive")
    return tuple(f"class_{k}" for k in range(num_classes))


# ----------------------------------------------------------------------------- oracle


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _oracle_metrics(cfg: SyntheticConfig, latents: dict) -> dict[str, float]:
    test = latents["test"]
    y = test["y"]
    weights = _weights(cfg)
    out: dict[str, float] = {}
    for prefix, known in (("oracle", ("s", "p_audio", "p_vision")), ("text_oracle", ("s",))):
        mu = sum(weights[name] * test[name] for name in known)
        sigma = math.sqrt(
            sum(w**2 for name, w in weights.items() if name not in known) + cfg.label_noise**2
        )
        if cfg.task == "regression":
            pred = np.clip(mu, -3.0, 3.0)
            nonzero = y != 0
            out[f"{prefix}_mae"] = float(np.mean(np.abs(pred - y)))
            out[f"{prefix}_corr"] = float(np.corrcoef(pred, y)[0, 1])
            out[f"{prefix}_non0_acc2"] = float(np.mean((pred[nonzero] > 0) == (y[nonzero] > 0)))
        else:
            cuts = np.concatenate([[-np.inf], _thresholds(cfg, latents), [np.inf]])
            cdf = _normal_cdf((cuts[None, :] - mu[:, None]) / max(sigma, 1e-12))
            pred = np.argmax(np.diff(cdf, axis=1), axis=1)
            truth = _classes(y, cuts[1:-1])
            f1 = []
            for k in range(cfg.num_classes):
                tp = np.sum((pred == k) & (truth == k))
                denom = np.sum(pred == k) + np.sum(truth == k)
                f1.append(2 * tp / denom if denom else 0.0)
            out[f"{prefix}_acc"] = float(np.mean(pred == truth))
            out[f"{prefix}_macro_f1"] = float(np.mean(f1))
    return out


def synthetic_oracle(cfg: SyntheticConfig, seed: int) -> dict[str, float]:
    """Best achievable test scores of the data `generate_synthetic(cfg, seed)` makes, from its
    latents (see the module docstring): oracle_* uses s, p_audio, p_vision; text_oracle_* only s.
    Regression keys: *_mae, *_corr, *_non0_acc2; classification: *_acc, *_macro_f1."""
    return _oracle_metrics(cfg, _draw_latents(cfg, _streams(seed)))


def _oracle_notes(oracle: dict[str, float]) -> list[str]:
    return [
        f"synthetic oracle (test, from latents): {name}={value:.4f}"
        for name, value in oracle.items()
    ]


# ----------------------------------------------------------------------------- rendering


def _layout(cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    """Per modality: {factor: (dims [signal_dims], signs [signal_dims], strength)} and the style
    projection [style_dims, D_m]."""
    shown = {
        "text": (("s", cfg.text_strength),),
        "audio": (("s", cfg.audio_strength), ("p_audio", cfg.private_strength)),
        "vision": (("s", cfg.vision_strength), ("p_vision", cfg.private_strength)),
    }
    layout = {}
    for m in _MODALITIES:
        dims = rng.permutation(cfg.dim(m))
        factors = {}
        for k, (name, strength) in enumerate(shown[m]):
            own = np.sort(dims[k * cfg.signal_dims : (k + 1) * cfg.signal_dims])
            signs = rng.choice(np.array([-1.0, 1.0]), size=cfg.signal_dims)
            factors[name] = (own, signs, strength)
        projection = rng.standard_normal((cfg.style_dims, cfg.dim(m))) / math.sqrt(cfg.style_dims)
        layout[m] = {"factors": factors, "style": cfg.style_strength * projection}
    return layout


def _render(
    cfg: SyntheticConfig, m: str, z: dict, layout: dict, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One modality of one split -> (features [N, L, D] float32, lengths [N] int64)."""
    n, steps, dim = len(z["s"]), cfg.length(m), cfg.dim(m)
    shortest = max(1, math.ceil(cfg.min_length_fraction * steps))
    lengths = rng.integers(shortest, steps + 1, size=n)
    time = np.arange(steps)[None, :]
    x = cfg.feature_noise * rng.standard_normal((n, steps, dim))
    x += (z["style"] @ layout[m]["style"])[:, None, :]
    for name, (dims, signs, strength) in layout[m]["factors"].items():
        width = np.maximum(1, np.rint(cfg.window_fraction * lengths)).astype(np.int64)
        start = rng.integers(0, lengths - width + 1)
        window = (time >= start[:, None]) & (time < (start + width)[:, None])
        x[:, :, dims] += strength * z[name][:, None, None] * window[:, :, None] * signs
    x[time >= lengths[:, None]] = 0.0  # padding is exactly zero
    return x.astype(np.float32), lengths.astype(np.int64)


def generate_synthetic(cfg: SyntheticConfig, seed: int) -> dict[str, Any]:
    """Draw the planted data set. Returns an MMSA-format dict:
        "train"/"valid"/"test": {id, raw_text, text [N, L_t, D_t], text_bert [N, 3, L_t] (mask
            row = real text frames), audio [N, L_a, D_a], vision [N, L_v, D_v], audio_lengths,
            vision_lengths [N], regression_labels [N] (y), and for classification
            classification_labels [N] int},
        "msakit": metadata for read_mmsa (name, task, num_classes, class_names, notes with the
            oracle scores, generator, version, config_hash),
        "latents": split -> {s, p_audio, p_vision, eps [N], style [N, style_dims], y [N]}.
    Same (cfg, seed) -> identical arrays."""
    streams = _streams(seed)
    latents = _draw_latents(cfg, streams)
    layout = _layout(cfg, streams["layout"])
    thresholds = _thresholds(cfg, latents) if cfg.task == "classification" else None
    out: dict[str, Any] = {}
    for split in _SPLITS:
        z, rng = latents[split], streams[f"render_{split}"]
        n = cfg.size(split)
        record: dict[str, Any] = {
            # MMSA ids "video$_$clip": the samples are independent, each its own one-clip video
            "id": np.array([f"synthetic_{split}_{i:05d}$_$0" for i in range(n)], dtype=object),
            "raw_text": np.array([f"synthetic {split} sample {i}" for i in range(n)], dtype=object),
        }
        for m in _MODALITIES:
            features, lengths = _render(cfg, m, z, layout, rng)
            record[m] = features
            if m == "text":
                bert = np.zeros((n, 3, cfg.text_length), dtype=np.float32)
                bert[:, 1, :] = np.arange(cfg.text_length)[None, :] < lengths[:, None]
                record["text_bert"] = bert
            else:
                record[f"{m}_lengths"] = lengths
        record["regression_labels"] = z["y"].astype(np.float32)
        if thresholds is not None:
            record["classification_labels"] = _classes(z["y"], thresholds)
        out[split] = record
    oracle = _oracle_metrics(cfg, latents)
    out["msakit"] = {
        "name": "synthetic",
        "task": cfg.task,
        "num_classes": cfg.num_classes if cfg.task == "classification" else 1,
        "class_names": list(class_names(cfg.num_classes)) if cfg.task == "classification" else [],
        "notes": _oracle_notes(oracle),
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "config_hash": config_hash(cfg, seed),
        "seed": int(seed),
        "config": dataclasses.asdict(cfg),
    }
    out["latents"] = latents
    return out


# ----------------------------------------------------------------------------- files and loader


def config_hash(cfg: SyntheticConfig, seed: int) -> str:
    """16 hex digits identifying (config, seed, generator version)."""
    text = json.dumps(
        {"config": dataclasses.asdict(cfg), "seed": int(seed), "version": GENERATOR_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """$MSAKIT_CACHE, else ~/.cache/msakit."""
    return Path(os.environ.get("MSAKIT_CACHE") or Path.home() / ".cache" / "msakit")


def write_synthetic(path: str | os.PathLike, cfg: SyntheticConfig, seed: int) -> Path:
    """Generate and write the MMSA pickle (without the latents) atomically; returns the path."""
    data = generate_synthetic(cfg, seed)
    return write_mmsa(path, {split: data[split] for split in _SPLITS}, meta=data["msakit"])


def _stored_hash(path: Path) -> str | None:
    """config_hash of an existing msakit synthetic pickle; None if it is not one (or unreadable)."""
    try:
        data = load_pickle(path)
    except DataError:
        return None
    meta = data.get("msakit") if isinstance(data, dict) else None
    if isinstance(meta, dict) and meta.get("generator") == GENERATOR:
        return str(meta.get("config_hash"))
    return None


def synthetic_file(cfg: SyntheticConfig, seed: int, data_path: str | None = None) -> Path:
    """Path of an up-to-date synthetic pickle for (cfg, seed), (re)writing it when needed.

    data_path given: that file; rewritten when it is a msakit synthetic pickle of another
    config; a file that is not one is never overwritten (DataError). Otherwise a cache file
    <cache_dir()>/synthetic-<config_hash>.pkl, rewritten when unreadable or stale."""
    key = config_hash(cfg, seed)
    if data_path:
        path = Path(data_path)
        if path.exists():
            stored = _stored_hash(path)
            if stored == key:
                return path
            if stored is None:
                raise DataError(
                    f"{path}: exists and is not a msakit synthetic pickle; refusing to overwrite "
                    "it (remove it or choose another data.data_path)"
                )
    else:
        path = cache_dir() / f"synthetic-{key}.pkl"
        if path.exists() and _stored_hash(path) == key:
            return path
    write_synthetic(path, cfg, seed)
    log.info("synthetic: wrote %s", path)
    return path


@register_dataset("synthetic")
def load_synthetic(cfg: DataConfig) -> MultimodalData:
    """Planted synthetic data: generated, written as an MMSA pickle, read back by read_mmsa."""
    path = synthetic_file(cfg.synthetic, cfg.split_seed, cfg.data_path)
    return read_mmsa(path, name="synthetic")
