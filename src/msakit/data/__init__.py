"""Dataset registry: `@register_dataset(name)` on a loader `fn(cfg: DataConfig) -> MultimodalData`.

Loaders are imported at the bottom so that registering is a side effect of importing this package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from msakit.data.base import (
    DataError,
    DatasetInfo,
    MultimodalData,
    SplitArrays,
    to_loader,
    validate,
)
from msakit.suggest import did_you_mean
from msakit.validated import ConfigError

if TYPE_CHECKING:
    from msakit.config import DataConfig

_LOADERS: dict[str, Callable[[DataConfig], MultimodalData]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_DEFAULT_MODELS: dict[str, str] = {}


def register_dataset(name: str, default_model: str | None = None):
    """Register a loader; `default_model` is the model `msakit train --dataset NAME` trains when
    no model is named."""

    def decorator(fn: Callable[[DataConfig], MultimodalData]):
        if name in _LOADERS:
            raise ValueError(f"dataset {name!r} registered twice")
        _LOADERS[name] = fn
        if default_model:
            _DEFAULT_MODELS[name] = default_model
        _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return fn

    return decorator


def list_datasets() -> dict[str, str]:
    """name -> one-line description."""
    return dict(sorted(_DESCRIPTIONS.items()))


def default_model(dataset: str) -> str | None:
    """The model a dataset names as its default, or None."""
    return _DEFAULT_MODELS.get(dataset)


def load_dataset(cfg: DataConfig) -> MultimodalData:
    """Run the registered loader of `cfg.name` and `validate` its data. Loaders raise DataError
    for what they check; any other failure on a file's content (a ragged list numpy cannot
    stack, a value of an unexpected type, ...) also becomes one DataError line naming the source."""
    if cfg.name not in _LOADERS:
        raise DataError(f"unknown dataset {cfg.name!r}{did_you_mean(cfg.name, _LOADERS)}; "
                        f"known: {', '.join(sorted(_LOADERS))}")
    try:
        data = _LOADERS[cfg.name](cfg)
        return data if data.validated else validate(data)
    except DataError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError, KeyError, AttributeError, RecursionError) as e:
        if isinstance(e, ConfigError):
            raise
        source = cfg.data_path or cfg.data_root or cfg.name
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"{source}: unexpected content ({type(e).__name__}: {detail})") from None


from msakit.data import cmu_text, mintrec, mmsa, mosi_poria, mult, synthetic  # noqa: E402, F401  (registration)

__all__ = [
    "DataError",
    "DatasetInfo",
    "MultimodalData",
    "SplitArrays",
    "default_model",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "to_loader",
]
