"""Restricted pickle loading: numpy arrays and plain containers only, nothing executed.

The field ships features as pickles; `pickle.load` on an untrusted file can run arbitrary code
(any importable callable can be named by a GLOBAL opcode and called by REDUCE). `load_pickle`
uses an `Unpickler` whose `find_class` hands out only the few callables that rebuild numpy
arrays, dtypes and scalars; everything else (os.system, custom classes, torch tensors, ...)
raises `DataError` before anything is called. Dicts, lists, tuples, str, bytes, numbers,
bools and None are built by the pickle machine itself without `find_class`.

Admitted globals (both the numpy 1.x `numpy.core` and numpy 2.x `numpy._core` spellings):
    numpy.core.multiarray._reconstruct   ndarray rebuilding (protocols 2-4, object arrays)
    numpy.core.multiarray.scalar         numpy scalars (np.float32(1.0), ...)
    numpy.core.numeric._frombuffer       contiguous ndarrays pickled with protocol 5
    numpy.ndarray, numpy.dtype           the array type and dtypes
    _codecs.encode                       only with the latin-1 codec: how protocol 2 stores bytes
    builtins set/frozenset/bytearray/complex and collections.OrderedDict: inert containers/values
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from msakit.data.base import DataError

__all__ = ["load_pickle", "loads_pickle", "save_pickle"]


def _numpy_attr(submodule: str, name: str) -> Any:
    """`numpy._core.<submodule>.<name>` (numpy 2) or `numpy.core.<submodule>.<name>` (numpy 1)."""
    import importlib

    for package in ("numpy._core", "numpy.core"):
        try:
            module = importlib.import_module(f"{package}.{submodule}")
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"numpy has no {submodule}.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for `_codecs.encode` (protocol 2 writes bytes as encode(str, 'latin1'))."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode of a non-string is not allowed")
    return text.encode("latin-1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    scalar = _numpy_attr("multiarray", "scalar")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals listed in the module docstring."""

    def __init__(self, file: io.BufferedIOBase, where: str):
        # latin1: Python 2 pickles of numpy arrays store raw bytes in py2 str objects.
        super().__init__(file, encoding="latin1")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        key = ("builtins" if module == "__builtin__" else module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        raise DataError(
            f"{self.where}: refused to unpickle {module}.{name}: "
            "only numpy arrays and plain containers are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(
            f"{self.where}: refused to unpickle a persistent id: "
            "only numpy arrays and plain containers are allowed"
        )


def _load(stream: io.BufferedIOBase, where: str) -> object:
    try:
        return _RestrictedUnpickler(stream, where).load()
    except DataError:
        raise
    except MemoryError as e:
        raise DataError(f"{where}: not a readable pickle (out of memory: {e})") from e
    except Exception as e:  # EOFError, UnpicklingError, ValueError, TypeError, ... on bad bytes
        raise DataError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e


def load_pickle(path: str | os.PathLike) -> object:
    """Load a pickle of numpy arrays and plain containers (dict/list/tuple/str/numbers).

    Raises DataError naming `path` when the file is missing, unreadable, truncated or not a
    pickle, or when it names any global outside the allow-list (nothing is called then).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            return _load(f, str(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def loads_pickle(data: bytes, where: str = "<bytes>") -> object:
    """`load_pickle` for an in-memory pickle; `where` names it in error messages."""
    return _load(io.BytesIO(data), where)


def save_pickle(obj: object, path: str | os.PathLike, protocol: int = 4) -> Path:
    """Pickle `obj` to `path` atomically: write a temp file in the same folder, then os.replace.

    Readers never see a half-written file; protocol 4 keeps files readable by Python >= 3.4 and
    by `load_pickle`. Parent folders are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a data file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
