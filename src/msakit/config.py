"""Typed experiment configuration, strict YAML loading and `a.b=value` overrides.

An experiment is `ExperimentConfig(model=<the model's own Config dataclass>, data=DataConfig,
train=TrainConfig)`. In YAML the model section names the model:

    model: {name: lf_dnn, hidden: 64}
    data: {name: mosi-poria}
    train: {epochs: 40}

Unknown keys anywhere are errors that name the key. Each model's defaults live in its own
`Config` dataclass beside the model (msakit/models/<model>.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msakit.corruption import CorruptionConfig
from msakit.data.synthetic import SyntheticConfig
from msakit.registry import get_model_entry
from msakit.suggest import did_you_mean
from msakit.validated import ConfigError, Validated, bounds, short_repr

__all__ = ["ConfigError", "DataConfig", "ExperimentConfig", "TrainConfig", "build_config", "load_yaml"]

DEFAULT_MODEL = "lf_dnn"
MAX_SEED = 2**63 - 1
DEVICE_PATTERN = re.compile(r"cpu|auto|mps|cuda(:\d+)?")


@dataclass
class DataConfig(Validated, section="data"):
    name: str = "synthetic"
    """Registered dataset name (`msakit list-datasets`)."""
    data_path: str | None = None
    """A single data file (MMSA / MulT pickles)."""
    data_root: str | None = None
    """Folder holding dataset folders (mosi-poria/, mosi-labels/, ...). Default: $MSAKIT_DATA."""
    batch_size: int = 32
    valid_fraction: float = field(default=0.15, metadata=bounds(above=0, below=1))
    """mosi-poria: share of Poria's training VIDEOS held out as the validation split."""
    text_encoder: str = "minilm"
    """mosi-text / mosei-text: encoder of the frozen sentence-embedding text features ("minilm",
    "tiny", a local model folder, or "none" for no text features)."""
    split_seed: int = field(default=0, metadata=bounds(0, MAX_SEED))
    """Seed of data-side randomness (validation carve-out, synthetic data); fixed across training seeds."""
    padding: str = "auto"
    """MMSA / MulT pickles: which side sequences are padded on: "auto" (found in the data; both
    sides seen is an error), "start" (MulT's releases, MMSA-FET padding_location='start') or "end"."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.padding not in ("auto", "start", "end"):
            raise ConfigError(f"data.padding must be auto, start or end, got {short_repr(self.padding)}")
        if not self.text_encoder.strip():
            raise ConfigError("data.text_encoder: give 'minilm', 'tiny', 'none' or a local model folder")
        if self.data_root is None:
            self.data_root = os.environ.get("MSAKIT_DATA") or None


@dataclass
class TrainConfig(Validated, section="train"):
    epochs: int = 30
    lr: float = field(default=1e-3, metadata=bounds(above=0))
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    scheduler: str = "none"
    """"none" or "plateau" (ReduceLROnPlateau on the validation selection metric)."""
    plateau_patience: int = field(default=10, metadata=bounds(0))
    plateau_factor: float = field(default=0.5, metadata=bounds(above=0, below=1))
    patience: int = 8
    """Early stopping: stop after this many epochs without a validation improvement."""
    select_metric: str = ""
    """Validation metric that selects the checkpoint; "" = the dataset family's default (MAE for regression)."""
    select_mode: str = ""
    """"min" or "max"; "" = the default that goes with select_metric."""
    seeds: list[int] = field(default_factory=lambda: [1], metadata=bounds(0, MAX_SEED))
    device: str = "cpu"
    """"cpu", "cuda", "cuda:N" or "auto"."""
    num_threads: int = field(default=0, metadata=bounds(0))
    """torch CPU threads; 0 keeps torch's default."""
    progress: bool = True
    """Show progress bars."""
    tensorboard: bool = False
    """Also write the per-epoch log as TensorBoard scalars to OUT/seed_<s>/tensorboard
    (needs `pip install tensorboard`)."""
    mlflow: str = ""
    """MLflow tracking URI to also log params and per-epoch metrics to, e.g. `sqlite:///runs/mlflow.db`
    or `http://host:5000`; "" = off (needs `pip install mlflow-skinny`; msakit/train/tracking.py)."""
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    """Robust training: corrupt the training batches (msakit.corruption; e.g.
    `train.corruption.protocol=missing train.corruption.mode=random train.corruption.rate=1`)."""
    precision: str | int = "32"
    """"32", "bf16" or "16": autocast dtype of the forward pass (losses and metrics stay float32;
    "16" adds a gradient scaler). bf16 also runs on CPU; see msakit/train/precision.py."""
    grad_accumulation: int = 1
    """Step the optimiser once per this many batches, on the MEAN of their gradients (each
    batch's loss is divided by the window size), so K batches of b/K step as one batch of b when
    they are equal in size. thuiar/MMSA's update_epochs sums them instead: under Adam the two
    differ only where gradient clipping fires (and through Adam's eps)."""
    window_threads: int = 1
    """CPU: run this many batches of a gradient-accumulation window at once, each in its own
    thread (models declaring `concurrent_batches`, e.g. MulT; msakit/train/window.py). Dropout
    masks come from per-batch generators then: reproducible, but not a 1-thread run's numbers.
    Ignored (log line) on a GPU, under torchrun and with grad_accumulation 1."""
    compile: bool = False
    """Run the training forward through torch.compile (a C++ compiler on CPU; GPUs benefit most)."""

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"train.device must be cpu, cuda, cuda:N, mps or auto, got {short_repr(self.device)}")
        if self.scheduler not in ("none", "plateau"):
            raise ConfigError("train.scheduler must be 'none' or 'plateau'")
        if self.select_mode not in ("", "min", "max"):
            raise ConfigError("train.select_mode must be 'min' or 'max'")
        if not self.seeds:
            raise ConfigError("train.seeds must name at least one seed")
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise ConfigError(f"train.seeds names seed {repeated[0]} twice; each seed runs once")
        if self.patience < 1:
            raise ConfigError(f"train.patience must be >= 1, got {self.patience}")
        self.precision = str(self.precision)  # `train.precision=32` arrives as an integer
        if self.precision not in ("32", "bf16", "16"):
            raise ConfigError(f"train.precision must be 32, bf16 or 16, got {self.precision!r}")
        if self.grad_accumulation < 1:
            raise ConfigError("train.grad_accumulation must be >= 1")
        if self.window_threads < 1:
            raise ConfigError(f"train.window_threads must be >= 1, got {self.window_threads}")
        if self.mlflow and "://" not in self.mlflow:
            raise ConfigError(f"train.mlflow must be an MLflow tracking URI such as sqlite:///runs/mlflow.db "
                              f"or http://host:5000, got {short_repr(self.mlflow)}")


@dataclass
class ExperimentConfig:
    model: Any
    """The model's own Config dataclass instance; its class is tied to `model_name`."""
    model_name: str = DEFAULT_MODEL
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {
            "model": {"name": self.model_name, **dataclasses.asdict(self.model)},
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }


# ----------------------------------------------------------------------------- building


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Coerce/validate a YAML value against a field annotation (simple types only)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {short_repr(value)}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {short_repr(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where)
    return value


def build_dataclass(cls: type, values: dict | Any, where: str):
    """Build `cls` from a dict strictly: unknown keys and wrongly typed values raise ConfigError."""
    if dataclasses.is_dataclass(values) and isinstance(values, cls):
        return values
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {short_repr(values)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((k for k in values if k not in known), key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {short_repr(unknown[0])}{did_you_mean(str(unknown[0]), known)} "
            f"(known: {', '.join(sorted(known))})"
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.hidden=64' -> (['model', 'hidden'], 64); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    if not raw.strip():
        return path, ""
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"override {short_repr(text)}: not a valid YAML value ({problem})") from None
    except RecursionError:
        raise ConfigError(f"override {short_repr(text)}: nested too deeply") from None


def _apply(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping with model/data/train sections")
    return tree


def read_yaml(path: Path):
    """The YAML document in the file `path` (None when empty); ConfigError (one line, naming the
    file) when it is not UTF-8, cannot be read, is not valid YAML or is nested too deeply."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"{path}: not valid YAML ({detail})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None


def _dataset_default_model(tree: dict) -> str | None:
    from msakit.data import default_model

    data = tree.get("data")
    return default_model(str(data.get("name"))) if isinstance(data, dict) and data.get("name") else None


def check_new_run(cfg: ExperimentConfig) -> None:
    """Checks for a config a user gives `msakit train` for a new run, not for one read back from
    a run folder or checkpoint (an older version accepted these settings) nor for tune's trials
    (a search may set a rate of 0, a clean run): settings that would do nothing. Raises
    ConfigError naming the key."""
    try:
        cfg.train.corruption.check_effective()
    except ValueError as e:
        raise ConfigError(f"train.corruption: {e}") from None


def build_config(tree: dict | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Build an ExperimentConfig from a (YAML) tree and `a.b=value` overrides, strictly."""
    tree = dict(tree or {})
    for text in overrides:
        _apply(tree, *parse_override(text))
    unknown = sorted((k for k in tree if k not in ("model", "data", "train")), key=str)
    if unknown:
        raise ConfigError(f"config: unknown section {short_repr(unknown[0])}"
                          f"{did_you_mean(str(unknown[0]), ('data', 'model', 'train'))} (known: data, model, train)")
    if not isinstance(tree.get("model") or {}, dict):
        raise ConfigError(f"model: expected a mapping, got {short_repr(tree['model'])}")
    model_tree = dict(tree.get("model") or {})
    name = model_tree.pop("name", None) or _dataset_default_model(tree) or DEFAULT_MODEL
    if not isinstance(name, str):
        raise ConfigError(f"model.name: expected a string, got {short_repr(name)}")
    try:
        entry = get_model_entry(name)
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from e
    return ExperimentConfig(
        model=build_dataclass(entry.config_cls, model_tree, "model"),
        model_name=name,
        data=build_dataclass(DataConfig, tree.get("data"), "data"),
        train=build_dataclass(TrainConfig, tree.get("train"), "train"),
    )
