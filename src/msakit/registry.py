"""Model registry (one place lists the models): `@register_model(name, config=Cfg)` on an
`nn.Module` class whose `__init__(cfg, info)` takes its typed config and the `DatasetInfo`.

Model files are imported in `msakit/models/__init__.py`; importing it fills the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from msakit.suggest import did_you_mean


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
    entry = get_model_entry(name)
    if not isinstance(cfg, entry.config_cls):
        raise TypeError(f"model {name!r} needs a {entry.config_cls.__name__}, got {type(cfg).__name__}")
    return entry.model_cls(cfg, info)
