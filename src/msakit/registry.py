"""Model registry (one place lists the models): `@register_model(name, config=Cfg)` on an
`nn.Module` class whose `__init__(cfg, info)` takes its typed config and the `DatasetInfo`.

Model files are imported in `msakit/models/__init__.py`; importing it fills the registry.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from msakit.suggest import did_you_mean
from msakit.validated import ConfigError

MAX_MODEL_BYTES = 8 * 2**30
"""Largest model (weights and buffers) `create_model` builds."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model_cls: type[nn.Module]
    config_cls: type
    summary: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config: type):
    def decorator(model_cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        doc = (model_cls.__doc__ or "").strip()
        _MODELS[name] = ModelEntry(name, model_cls, config, doc.splitlines()[0] if doc else "")
        return model_cls

    return decorator


def _ensure_loaded() -> None:
    import msakit.models  # noqa: F401  (registration side effect)


def get_model_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}{did_you_mean(name, _MODELS)}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def list_models() -> dict[str, str]:
    """name -> one-line summary."""
    _ensure_loaded()
    return {name: entry.summary for name, entry in sorted(_MODELS.items())}


def create_model(name: str, cfg, info) -> nn.Module:
    """Build model `name` from its config; its declared size is checked first (`check_size`)."""
    entry = get_model_entry(name)
    if not isinstance(cfg, entry.config_cls):
        raise TypeError(f"model {name!r} needs a {entry.config_cls.__name__}, got {type(cfg).__name__}")
    check_size(entry, cfg, info)
    return entry.model_cls(cfg, info)


def check_size(entry: ModelEntry, cfg, info) -> None:
    """Build the model on the meta device (shapes only, no memory; every RNG state restored) and
    raise ConfigError when its weights would exceed MAX_MODEL_BYTES: a config asking for a
    10^6 x 10^6 layer fails here in milliseconds instead of exhausting the machine. A model that
    cannot be built on the meta device is not checked."""
    if torch.empty(0).device.type == "meta":
        return
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        with torch.device("meta"), warnings.catch_warnings():  # a head loaded in __init__ (PSA-MF's
            warnings.filterwarnings("ignore", message=".*meta parameter.*no-op")  # personality): shapes only
            probe = entry.model_cls(cfg, info)
    except (ConfigError, ValueError, TypeError):
        raise
    except Exception as e:  # e.g. an operation without a meta kernel: the real build decides
        if isinstance(e, OverflowError) or "overflow" in str(e).lower():
            raise ConfigError(f"model {entry.name}: its config's sizes overflow ({str(e)[:200]})") from None
        return
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    total = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
    if total > MAX_MODEL_BYTES:
        raise ConfigError(
            f"model {entry.name}: its config declares {total / 2**30:.1f} GiB of weights "
            f"(more than {MAX_MODEL_BYTES / 2**30:.0f} GiB); lower its sizes"
        )
