"""Text-only CMU-MOSI / CMU-MOSEI over the real transcripts: datasets `mosi-text` and `mosei-text`.

Files, under data_root (MMSA-style label files, as the MMSA releases ship them):
    mosi-labels/label.csv    header `id,text,label,mode`; 2,195 clips (train 1,281 / dev 229 /
                             test 685); id "<video>_<clip>"; text lower-case
    mosei-labels/label.csv   header `video_id,clip_id,text,label,mode`; 22,788 segments
                             (train 16,274 / valid 1,861 / test 4,653); natural case, CSV-quoted
Both also accept MMSA's own layouts `video_id,clip_id,text,label,annotation,mode` and the same
with `label_T,label_A,label_V` after `label` or at the end (id "<video_id>_<clip_id>"; annotation
and the unimodal labels not read).
`mode` is the official CMU split ("dev" and "valid" both mean our "valid"); `label` is the
continuous sentiment in [-3, 3]. Another header (e.g. the MOSEI file given as mosi-text) is an
error naming the file and the columns found, never a silent misread.

What the loader gives (task regression, metric family "mosi", label range [-3, 3]):
- texts: the transcripts (Batch.texts), for models with their own text encoder (`text_bert`).
- text tensor [N, 1, D]: the FROZEN sentence embedding of each transcript by `data.text_encoder`
  ("minilm" = the packaged all-MiniLM-L6-v2, its own mean pooling, D = 384; "tiny"; a local
  folder), up to `SENTENCE_MAX_TOKENS` tokens. Computed once per (encoder, texts) and cached in
  <cache_dir()>/text-embeddings-<hash>.npy (written atomically), so training seeds and reruns
  only read it. `data.text_encoder=none` skips it: the text tensor is a zero frame [N, 1, 1]
  (models then must read the raw texts).
- audio / vision: a single zero frame [N, 1, 1] each: the data are TEXT-ONLY (notes say so).
- `info.extraction` records the text features' recipe (encoder, pooling, max tokens), so that
  `msakit predict` can compute the same features from a transcript or a speech recognition of a
  new clip.
The default model of both datasets is `unimodal` (modality text, masked mean + MLP): a head on
the frozen embeddings.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msakit.data import register_dataset
from msakit.data.base import (
    DataError,
    DatasetInfo,
    MultimodalData,
    SplitArrays,
    sentiment_label,
    validate,
)
from msakit.data.synthetic import cache_dir

if TYPE_CHECKING:
    from msakit.config import DataConfig

log = logging.getLogger(__name__)

SENTENCE_MAX_TOKENS = 128
"""Tokens per transcript for the frozen sentence embedding ([CLS]/[SEP] included)."""
MODES = {"train": "train", "valid": "valid", "dev": "valid", "test": "test"}
MMSA_HEADERS = (
    ("video_id", "clip_id", "text", "label", "annotation", "mode"),
    ("video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V", "annotation", "mode"),
    ("video_id", "clip_id", "text", "label", "annotation", "mode", "label_T", "label_A", "label_V"),
)
"""The layouts of MMSA's own label.csv releases (annotation and label_T/A/V are not read)."""
LAYOUTS = {
    "mosi-text": ("mosi-labels/label.csv", (("id", "text", "label", "mode"), *MMSA_HEADERS), 2195),
    "mosei-text": ("mosei-labels/label.csv", (("video_id", "clip_id", "text", "label", "mode"), *MMSA_HEADERS), 22788),
}
"""dataset -> (file under data_root, the exact headers accepted, official number of segments; a
file with another number is read with a warning, which is all that tells the two corpora apart
in MMSA's shared layout)."""

__all__ = ["read_label_csv", "sentence_features", "text_extraction"]


def read_label_csv(path: Path, headers: tuple[tuple[str, ...], ...]) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """label.csv with one of `headers` -> {split: (ids, texts, labels [N] float32)}; DataError
    naming the file (and line) for a missing file, another header, an unknown mode, a bad label
    or an empty text."""
    expected = " or ".join(repr(",".join(h)) for h in headers)
    if not path.is_file():
        raise DataError(f"{path}: not found (expected the MMSA label file with header {expected})")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        rows = [(reader.line_num, row) for row in reader]  # the file line each record ends on
    header = tuple(c.strip() for c in rows[0][1]) if rows else ()
    if header not in headers:
        found = ",".join(rows[0][1]) if rows else "(empty file)"
        raise DataError(f"{path}: header is {found!r}, expected {expected}")
    splits: dict[str, tuple[list[str], list[str], list[float]]] = {s: ([], [], []) for s in ("train", "valid", "test")}
    for line, row in rows[1:]:
        if not any(field.strip() for field in row):  # a blank line (a trailing one, say)
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} fields, expected {len(header)}")
        record = dict(zip(header, row, strict=True))
        sid = record["id"].strip() if "id" in record else f"{record['video_id'].strip()}_{record['clip_id'].strip()}"
        mode = record["mode"].strip()
        if mode not in MODES:
            raise DataError(f"{path}: line {line}: mode {mode!r} is not one of {sorted(MODES)}")
        label = sentiment_label(record["label"], f"{path}: line {line}")
        if not record["text"].strip():
            raise DataError(f"{path}: line {line}: empty text")
        ids, texts, labels = splits[MODES[mode]]
        ids.append(sid)
        texts.append(record["text"].strip())
        labels.append(label)
    return {s: (i, t, np.asarray(y, dtype=np.float32)) for s, (i, t, y) in splits.items()}


def text_extraction(encoder_source: str, max_tokens: int) -> dict:
    """The recipe of sentence-embedding text features (`msakit.media.MediaConfig` settings with
    no audio and no vision), as recorded in `DatasetInfo.extraction`; "none" = no text features."""
    from msakit.media import MediaConfig  # lazy: msakit.media imports msakit.config

    none = encoder_source == "none"
    return MediaConfig(audio="none", vision="none", text_features="none" if none else "sentence",
                       text_encoder="minilm" if none else encoder_source,
                       text_max_length=max(max_tokens, 3)).to_dict()


def _atomic_save_npy(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buffer = io.BytesIO()
    np.save(buffer, array)
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def sentence_features(texts: list[str], source: str, max_tokens: int = SENTENCE_MAX_TOKENS,
                      batch_size: int = 64) -> tuple[np.ndarray, dict]:
    """Frozen sentence embeddings [N, D] float32 of `texts` by encoder `source` with its own
    pooling, cached on disk by (source, max_tokens, texts); -> (embeddings, extraction recipe).
    Texts are embedded in order of length (less padding), results returned in input order."""
    from msakit.modules.text_encoder import TextEncoder
    from msakit.personality import embed_texts

    encoder = TextEncoder(source, max_length=max_tokens, seed=0 if source == "tiny" else None).freeze()
    recipe = text_extraction(source, max_tokens)
    digest = hashlib.sha256("\n".join([encoder.description, str(max_tokens), *texts]).encode()).hexdigest()[:16]
    path = cache_dir() / f"text-embeddings-{digest}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(texts), encoder.hidden_size):
                return cached.astype(np.float32), recipe
        except (OSError, ValueError):
            pass
        log.warning("%s: unreadable or stale embedding cache, recomputing", path)
    order = np.argsort([len(t) for t in texts], kind="stable")
    embedded = np.empty((len(texts), encoder.hidden_size), dtype=np.float32)
    log.info("embedding %d texts with %s (cached afterwards in %s)", len(texts), encoder.description, path)
    from tqdm.auto import tqdm

    step = batch_size * 16
    with tqdm(total=len(texts), desc="text embeddings", unit="text", leave=False) as bar:
        for start in range(0, len(texts), step):
            rows = order[start : start + step]
            embedded[rows] = embed_texts(encoder, [texts[i] for i in rows], encoder.pooling, batch_size).numpy()
            bar.update(len(rows))
    _atomic_save_npy(embedded, path)
    return embedded, recipe


def load_cmu_text(cfg: DataConfig, name: str) -> MultimodalData:
    if not cfg.data_root:
        raise DataError(f"{name}: data.data_root is not set (--data-root DIR or $MSAKIT_DATA)")
    relative, headers, official = LAYOUTS[name]
    path = Path(cfg.data_root) / relative
    raw = read_label_csv(path, headers)
    total = sum(len(ids) for ids, _, _ in raw.values())
    notes = [f"text-only: audio and vision are a single zero frame; {total} segments from {path}"]
    if total != official:
        notes.append(f"{path} has {total} segments; the official release has {official}")
        log.warning("%s", notes[-1])
    all_texts = [t for s in ("train", "valid", "test") for t in raw[s][1]]
    source = cfg.text_encoder
    if source == "none":
        embedded, extraction = None, text_extraction("none", SENTENCE_MAX_TOKENS)
        notes.append("data.text_encoder=none: the text tensor is a zero frame; models must read raw texts")
    else:
        embedded, extraction = sentence_features(all_texts, source)
        notes.append(f"text features: frozen {source} sentence embeddings (its own pooling, "
                     f"<= {SENTENCE_MAX_TOKENS} tokens), cached")
    splits, offset = {}, 0
    for split in ("train", "valid", "test"):
        ids, texts, labels = raw[split]
        n = len(ids)
        text = (np.zeros((n, 1, 1), np.float32) if embedded is None
                else embedded[offset : offset + n, None, :])
        offset += n
        zero = np.zeros((n, 1, 1), np.float32)
        ones = np.ones(n, np.int64)
        splits[split] = SplitArrays(
            features={"text": text, "audio": zero, "vision": zero.copy()},
            lengths={"text": ones, "audio": ones.copy(), "vision": ones.copy()},
            labels=labels, ids=ids, texts=texts,
        )
    info = DatasetInfo(
        name=name, task="regression", metric_family="mosi", label_range=(-3.0, 3.0),
        feature_dims={"text": int(splits["train"].features["text"].shape[2]), "audio": 1, "vision": 1},
        max_lengths={"text": 1, "audio": 1, "vision": 1},
        extraction=extraction,
    )
    return validate(MultimodalData(info=info, splits=splits, source=str(path), notes=notes))


@register_dataset("mosi-text", default_model="unimodal")
def load_mosi_text(cfg: DataConfig) -> MultimodalData:
    """CMU-MOSI transcripts, text only (mosi-labels/label.csv; official split, 2,195 clips)."""
    return load_cmu_text(cfg, "mosi-text")


@register_dataset("mosei-text", default_model="unimodal")
def load_mosei_text(cfg: DataConfig) -> MultimodalData:
    """CMU-MOSEI transcripts, text only (mosei-labels/label.csv; official split, 22,788 segments)."""
    return load_cmu_text(cfg, "mosei-text")
