"""Config values validated where they are declared: the `Validated` base of every config dataclass.

Each numeric field of a config dataclass gets a range, checked by the `__post_init__` every
subclass inherits (before the subclass's own `__post_init__`, which keeps the checks that tie
fields together, e.g. "heads must divide hidden"). A range comes from the field's declaration:

    rate: float = field(default=0.5, metadata=bounds(above=0, below=1))   # explicit: (0, 1)

or, without metadata, from its type and name, so a new option is checked without any code:
    float          finite and >= 0; a name containing "dropout": [0, 1)
    int            in [1, 2^31 - 1] (sizes, counts, epochs); bool is not an int here; no int
                   field, whatever its bounds, may exceed 2^63 - 1
    list of these  each element by the same rule
Every float must be finite. str / bool fields are left to the class (choices via `check_choice`).
Errors are `ConfigError("<section>.<field> must be ..., got <value>")`, one line.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from typing import Any

__all__ = ["ConfigError", "ModelConfig", "Validated", "bounds", "short_repr"]

MAX_SIZE = 2**31 - 1
"""Default upper bound of int fields (sizes, counts); explicit bounds may differ."""
MAX_INT = 2**63 - 1
"""No int field may exceed this (what torch and numpy can hold)."""

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 3


def short_repr(value: Any) -> str:
    """repr() cut to a few dozen characters and three levels (huge or deeply nested values)."""
    try:
        return _REPR.repr(value)
    except Exception:  # a value whose repr fails
        return f"<{type(value).__name__}>"


class ConfigError(ValueError):
    """A bad configuration value or key; the message names it."""


def bounds(
    low: float | None = None,
    high: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
) -> dict:
    """Field metadata: low <= value <= high, above < value < below (any may be omitted)."""
    return {"bounds": (low, high, above, below)}


def _default_bounds(name: str, kind: type) -> tuple:
    if kind is float:
        return (0.0, None, None, 1.0) if "dropout" in name else (0.0, None, None, None)
    return (1, None, None, None)


def _describe(low, high, above, below) -> str:
    start = f"[{low}" if low is not None else f"({above}" if above is not None else ""
    end = f"{high}]" if high is not None else f"{below})" if below is not None else ""
    if start and end:
        return f"in {start}, {end}"
    if start:
        return f">= {low}" if low is not None else f"> {above}"
    return (f"<= {high}" if high is not None else f"< {below}") if end else "finite"


def _check_number(where: str, value: Any, kind: type, rule: tuple, cap: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # a wrong type is the YAML builder's error (it names the expected type)
    low, high, above, below = rule
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    ok = (
        (low is None or value >= low)
        and (high is None or value <= high)
        and (above is None or value > above)
        and (below is None or value < below)
    )
    if not ok:
        raise ConfigError(f"{where} must be {_describe(low, high, above, below)}, got {short_repr(value)}")
    if kind is int and abs(value) > cap:
        raise ConfigError(f"{where} must be at most {cap}, got {short_repr(value)}")


def check_fields(obj: Any, section: str) -> None:
    """Check every int / float (or list of them) field of dataclass `obj` against its range."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        kind, value = hints.get(f.name), getattr(obj, f.name)
        element = kind
        if typing.get_origin(kind) in (list, tuple):
            element = (typing.get_args(kind) or (None,))[0]
        if element not in (int, float):
            continue
        rule = f.metadata.get("bounds") or _default_bounds(f.name, element)
        cap = MAX_INT if "bounds" in f.metadata else MAX_SIZE
        where = f"{section}.{f.name}" if section else f.name
        if element is not kind:
            for i, item in enumerate(value if isinstance(value, (list, tuple)) else ()):
                _check_number(f"{where}[{i}]", item, element, rule, cap)
        else:
            _check_number(where, value, element, rule, cap)


class Validated:
    """Base of config dataclasses: field ranges checked on construction (module docstring).

    `class FooConfig(Validated, section="model")`; subclasses inherit the section. A subclass's
    own `__post_init__` runs after the range checks."""

    _section: typing.ClassVar[str] = ""

    def __init_subclass__(cls, section: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if section is not None:
            cls._section = section
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_validated", False):
            return

        def __post_init__(self) -> None:
            check_fields(self, type(self)._section)
            own(self)

        __post_init__._validated = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        check_fields(self, type(self)._section)


class ModelConfig(Validated, section="model"):
    """Base of every model's Config dataclass (errors name `model.<field>`)."""
