"""Restricted pickle loading: numpy arrays and plain containers only, nothing executed.

The field ships features as pickles; `pickle.load` on an untrusted file can run arbitrary code
(any importable callable can be named by a GLOBAL opcode and called by REDUCE), and even the
few numpy callables an array needs can be misused. `load_pickle` therefore runs its own
unpickler (the pure-Python opcode machine of the standard library, with these opcodes replaced):

- GLOBAL resolves only the names below; REDUCE / NEWOBJ / INST / OBJ call only the checked
  stand-ins listed with them (never `numpy.ndarray` itself: a direct call can build a zero-stride
  view that later expands a tiny file to gigabytes);
- BUILD (state applied to an object) only on an array or dtype that the file itself just
  created through `_reconstruct` / `dtype`, once: the array reconstruction path. A BUILD on any
  other object (e.g. a numpy function, whose `__defaults__` it could rewrite) is refused;
- dtypes with object fields inside a structured or sub-array dtype are refused (raw bytes would
  become object pointers: a segfault); plain object arrays (ids, transcripts) are allowed, their
  elements come from the same restricted machine and must match the array's size;
- APPEND(S) / SETITEM(S) / ADDITEMS only on a list / dict / set;
- reads never ask for more bytes than the file has left, and every allocation the file asks
  for (array shapes, bytearray sizes) counts against a memory budget;
- after loading, the object graph is walked without recursion: its size counted as a reader
  would expand it (a list shared a thousand times counts a thousand times), its depth and
  reference cycles bounded.

The budget is `max_bytes` when given, else max(`MIN_BUDGET_BYTES`, `BUDGET_RATIO` x the file
size). Every refusal, a memory or recursion failure, and every malformed file end as one
`DataError` line that names the file.

Admitted globals (both the numpy 1.x `numpy.core` and numpy 2.x `numpy._core` spellings):
    numpy.core.multiarray._reconstruct   ndarray rebuilding (protocols 2-4, object arrays)
    numpy.core.multiarray.scalar         numpy scalars (np.float32(1.0), ...)
    numpy.core.numeric._frombuffer       contiguous ndarrays pickled with protocol 5
    numpy.ndarray, numpy.dtype           the array type (only as an argument) and dtypes
    _codecs.encode                       only with the latin-1 codec: how protocol 2 stores bytes
    builtins set/frozenset/bytearray/complex and collections.OrderedDict: inert containers/values

Array payloads of 1 MiB or more are read into a bytearray and the array is a view of it (no
second copy; writeable, so readers can clean it in place). A bytes value of that size that is not
array data therefore loads as a bytearray.
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickle
import tempfile
from pathlib import Path
from struct import unpack
from typing import Any

import numpy as np

from msakit.data.base import DataError

__all__ = ["BUDGET_RATIO", "MIN_BUDGET_BYTES", "MAX_DEPTH", "load_pickle", "loads_pickle", "save_pickle"]

MIN_BUDGET_BYTES = 256 * 2**20
"""Smallest memory budget of a file (bytes), whatever its size."""
BUDGET_RATIO = 4
"""A file may expand to this many times its own size."""
MAX_DEPTH = 100
"""Deepest container nesting accepted (MMSA / MulT files nest 3-4 deep)."""
_BIG = 2**20  # payloads of this size are read into a bytearray (zero-copy array data)
_OBJECT_FLAGS = 0x01 | 0x04  # NPY_ITEM_REFCOUNT | NPY_ITEM_IS_POINTER


_TEXT_SEPARATORS = ",;\t"  # in a CSV / TSV header, never in a pickle's opcode line or class name


class _Refused(Exception):
    """Raised inside the unpickler; becomes a DataError naming the file."""


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
    if not isinstance(encoding, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused(f"_codecs.encode with codec {encoding!r} is not allowed")
    if not isinstance(text, str) or errors != "strict":
        raise _Refused("_codecs.encode of a non-string is not allowed")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()`: how Python 3 pickles b"" under protocols 0-2 (an empty array's data, say);
    with arguments it is refused (non-empty bytes come as `_codecs.encode`)."""
    if args:
        raise _Refused("bytes(...) with arguments is not allowed while unpickling")
    return b""


def _has_object(dtype: np.dtype) -> bool:
    """Whether `dtype` holds Python objects anywhere (own kind, fields, sub-array base)."""
    if dtype.kind == "O" or dtype.hasobject:
        return True
    if dtype.subdtype is not None and _has_object(dtype.subdtype[0]):
        return True
    return any(_has_object(spec[0]) for spec in (dtype.fields or {}).values())


def _is_plain_object(dtype: np.dtype) -> bool:
    return dtype.kind == "O" and dtype.fields is None and dtype.subdtype is None


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, tuple) or len(value) > 32 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise _Refused(f"{what}: shape {value!r} is not a tuple of non-negative integers")
    return value


class _BoundedReader:
    """A binary stream that refuses to read past its end (a length field cannot make the
    reader allocate more than the file holds)."""

    def __init__(self, stream: io.BufferedIOBase, size: int):
        self.stream, self.left = stream, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise pickle.UnpicklingError(f"pickle data was truncated ({n} bytes asked, {self.left} left)")
        data = self.stream.read(n)
        self.left -= len(data)
        return data

    def readinto(self, buffer) -> int:
        n = len(buffer)
        if n > self.left:
            raise pickle.UnpicklingError(f"pickle data was truncated ({n} bytes asked, {self.left} left)")
        got = self.stream.readinto(buffer)
        self.left -= got
        return got

    def readline(self) -> bytes:
        # protocol 0 (Python 2's default) writes an array's bytes as one escaped line
        line = self.stream.readline(self.left)
        self.left -= len(line)
        return line


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 (the pure-Python machine)
    """Unpickler whose globals, calls and BUILDs are limited as the module docstring says."""

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, file: _BoundedReader, where: str, budget: int):
        # latin1: Python 2 pickles of numpy arrays store raw bytes in py2 str objects.
        super().__init__(file, encoding="latin1")
        self.where, self.budget = where, budget
        self._file = file
        self._fresh: set[int] = set()  # ids of arrays/dtypes created here, not yet BUILT
        self._keep: list[Any] = []  # keeps those objects alive so their ids stay unique
        self._blobs: set[int] = set()  # ids of large payloads read as bytearray
        reconstruct = _numpy_attr("multiarray", "_reconstruct")
        self._np_reconstruct = reconstruct
        self._np_scalar = _numpy_attr("multiarray", "scalar")
        self._np_frombuffer = _numpy_attr("numeric", "_frombuffer")
        self.callables = {
            self._reconstruct, self._scalar, self._frombuffer, self._dtype, _latin1_encode,
            set, frozenset, self._bytearray, complex, collections.OrderedDict, _empty_bytes,
        }
        self.globals: dict[tuple[str, str], Any] = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): _latin1_encode,
            ("builtins", "bytes"): _empty_bytes,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "bytearray"): self._bytearray,
            ("builtins", "complex"): complex,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        for package in ("numpy.core", "numpy._core"):
            self.globals[(f"{package}.multiarray", "_reconstruct")] = self._reconstruct
            self.globals[(f"{package}.multiarray", "scalar")] = self._scalar
            self.globals[(f"{package}.numeric", "_frombuffer")] = self._frombuffer

    # -------------------------------------------------------------- budget and tracking

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.budget:
            raise _Refused(
                f"{what} declares {_fmt_bytes(nbytes)}, beyond this file's memory budget of "
                f"{_fmt_bytes(self.budget)}"
            )
        self.budget -= nbytes

    def charge_array(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Charge an array's bytes; refuse elements of zero bytes (numpy's S0, U0, V0): any count
        of them fits in no memory, and the first conversion (to float, to id strings) would then
        allocate what the shape merely declares."""
        count = math.prod(shape)
        if count and not dtype.itemsize:
            raise _Refused(f"an array of shape {shape} with zero-size items (dtype {dtype.str}) is not data")
        self.charge(count * dtype.itemsize, "an array")

    def _track(self, obj: Any) -> Any:
        self._fresh.add(id(obj))
        self._keep.append(obj)
        return obj

    # -------------------------------------------------------------- checked stand-ins

    def _dtype(self, obj: Any, align: bool = False, copy: bool = False) -> np.dtype:
        if not isinstance(obj, (str, bytes)):
            raise _Refused(f"numpy.dtype of a {type(obj).__name__} is not allowed")
        dtype = np.dtype(obj.decode("latin-1") if isinstance(obj, bytes) else obj, bool(align), True)
        if _has_object(dtype) and not _is_plain_object(dtype):
            raise _Refused(f"dtype {obj!r} has object fields")
        return self._track(dtype)  # copy=True: BUILD can only touch this fresh dtype

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not np.ndarray:
            raise _Refused(f"_reconstruct of {subtype!r} is not allowed (numpy.ndarray only)")
        shape = _shape(shape, "_reconstruct")
        dtype = np.dtype(dtype)
        if _has_object(dtype):
            raise _Refused("_reconstruct with an object dtype is not allowed")
        self.charge_array(shape, dtype)
        return self._track(self._np_reconstruct(np.ndarray, shape, dtype))

    def _scalar(self, dtype: Any, data: Any = None) -> Any:
        if not isinstance(dtype, np.dtype) or _has_object(dtype):
            raise _Refused("numpy scalar: only plain (non-object) dtypes are allowed")
        if not isinstance(data, (bytes, str)):
            raise _Refused("numpy scalar: its data must be bytes")
        return self._np_scalar(dtype, data)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
            raise _Refused(f"_frombuffer of a {type(buf).__name__} is not allowed")
        if not isinstance(dtype, (np.dtype, str)) or _has_object(np.dtype(dtype)):
            raise _Refused("_frombuffer: only plain (non-object) dtypes are allowed")
        if order not in ("C", "F"):
            raise _Refused(f"_frombuffer: order {order!r} is not allowed")
        return self._np_frombuffer(buf, np.dtype(dtype), _shape(shape, "_frombuffer"), order)

    def _bytearray(self, source: Any = b"", *rest: Any) -> bytearray:
        if not isinstance(source, (bytes, str)):
            raise _Refused(f"bytearray of a {type(source).__name__} is not allowed")
        self.charge(len(source), "a bytearray")
        return bytearray(source, *rest) if isinstance(source, str) else bytearray(source)

    # -------------------------------------------------------------- opcodes

    def find_class(self, module: str, name: str) -> Any:
        key = ("builtins" if module == "__builtin__" else module, name)
        if key in self.globals:
            return self.globals[key]
        if any(c in f"{module}{name}" for c in _TEXT_SEPARATORS):  # a CSV row read as a class name
            raise _Refused("not a pickle: it starts as text (a CSV or other text file?)")
        raise _Refused(
            f"refused to unpickle {module}.{name}: only numpy arrays and plain containers are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(
            "refused to unpickle a persistent id: only numpy arrays and plain containers are allowed"
        )

    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if not isinstance(args, tuple) or (kwargs is not None and not isinstance(kwargs, dict)):
            raise _Refused("call arguments must be a tuple")
        try:
            allowed = func in self.callables
        except TypeError:  # unhashable
            allowed = False
        if not allowed:
            raise _Refused(f"refused to call {_name(func)} while unpickling")
        return func(*args, **(kwargs or {}))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj_ex(self) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, kwargs)

    def _instantiate(self, klass: Any, args: list) -> None:
        self.append(self._call(klass, tuple(args)))

    def load_append(self) -> None:
        value = self.stack.pop()
        _expect(self.stack[-1], list, "APPEND").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        _expect(self.stack[-1], list, "APPENDS").extend(items)

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        _expect(self.stack[-1], dict, "SETITEM")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = _expect(self.stack[-1], dict, "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        _expect(self.stack[-1], set, "ADDITEMS").update(items)

    def _read_payload(self, size: int, writeable: bool = False) -> bytes | bytearray:
        frame = self._unframer.current_frame
        if frame is not None:
            position = frame.tell()
            inside = frame.seek(0, io.SEEK_END) > position
            frame.seek(position)
            if inside:  # inside a frame (whose size the file bounds): read it from there
                return bytearray(self.read(size)) if writeable else self.read(size)
            self._unframer.current_frame = None
        if size < _BIG and not writeable:
            return self.read(size)
        if size > self._file.left:
            raise pickle.UnpicklingError(f"pickle data was truncated ({size} bytes declared)")
        blob = bytearray(size)
        if self._file.readinto(blob) != size:  # straight into the bytearray: no bytes copy
            raise pickle.UnpicklingError("pickle data was truncated")
        if not writeable:
            self._blobs.add(id(blob))
            self._keep.append(blob)
        return blob

    def load_binbytes(self) -> None:
        (size,) = unpack("<I", self.read(4))
        self.append(self._read_payload(size))

    def load_binbytes8(self) -> None:
        (size,) = unpack("<Q", self.read(8))
        self.append(self._read_payload(size))

    def load_bytearray8(self) -> None:
        (size,) = unpack("<Q", self.read(8))
        self.append(self._read_payload(size, writeable=True))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if id(inst) not in self._fresh:
            raise _Refused(
                f"refused to apply a state (BUILD) to {_name(inst)}: only to an array or dtype "
                "being rebuilt"
            )
        self._fresh.discard(id(inst))
        if isinstance(inst, np.dtype):
            self._build_dtype(inst, state)
        else:
            self._build_array(inst, state)

    def _build_dtype(self, dtype: np.dtype, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9):
            raise _Refused("a dtype state must be numpy's 8/9-tuple")
        subarray, fields, flags = state[2], state[4], state[-1]
        subs = [] if fields is None else list(fields.values()) if isinstance(fields, dict) else None
        if subs is None or (subarray is not None and not isinstance(subarray, tuple)):
            raise _Refused("a dtype state holds malformed fields")
        parts = [spec[0] if isinstance(spec, tuple) and spec else spec for spec in subs]
        if subarray is not None:
            parts.append(subarray[0] if subarray else None)
        if not all(isinstance(p, np.dtype) for p in parts):
            raise _Refused("a dtype state's fields must be dtypes")
        plain_object = dtype.kind == "O" and not parts
        if any(_has_object(p) for p in parts) or (
            isinstance(flags, int) and flags & _OBJECT_FLAGS and not plain_object
        ):
            raise _Refused("refused a structured / sub-array dtype with object fields")
        dtype.__setstate__(state)
        if _has_object(dtype) and not _is_plain_object(dtype):
            raise _Refused("refused a structured / sub-array dtype with object fields")

    def _build_array(self, array: np.ndarray, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("an array state must be numpy's 4/5-tuple")
        shape, dtype, fortran, raw = state[-4:]
        shape = _shape(shape, "an array")
        if not isinstance(dtype, np.dtype):
            raise _Refused("an array state's dtype must be a dtype")
        count = math.prod(shape)
        if _has_object(dtype):
            if not _is_plain_object(dtype):
                raise _Refused("refused an array whose structured dtype has object fields")
            if not isinstance(raw, list) or len(raw) != count:
                raise _Refused(f"an object array of {count} elements must hold a list of {count}")
            self.charge(8 * count, "an object array")
        else:
            if not isinstance(raw, (bytes, bytearray, str)):
                raise _Refused("an array's data must be bytes")
            if len(raw) != count * dtype.itemsize:
                raise _Refused(
                    f"an array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} "
                    f"bytes of data, the file gives {len(raw)}"
                )
            if id(raw) in self._blobs:  # zero copy: the array becomes a view of the payload
                order = "F" if fortran else "C"
                view = np.frombuffer(raw, dtype=dtype).reshape(shape, order=order)
                self._blobs.discard(id(raw))
                self._replace(array, view)
                return
            self.charge_array(shape, dtype)
        array.__setstate__(state)

    def _replace(self, old: Any, new: Any) -> None:
        """Put `new` where `old` is: on the stack top and in the memo (BINGETs see it)."""
        self.stack[-1] = new
        for key, value in self.memo.items():
            if value is old:
                self.memo[key] = new


for _opcode, _method in {
    pickle.REDUCE: "load_reduce",
    pickle.NEWOBJ: "load_newobj",
    pickle.NEWOBJ_EX: "load_newobj_ex",
    pickle.BUILD: "load_build",
    pickle.APPEND: "load_append",
    pickle.APPENDS: "load_appends",
    pickle.SETITEM: "load_setitem",
    pickle.SETITEMS: "load_setitems",
    pickle.ADDITEMS: "load_additems",
    pickle.BINBYTES: "load_binbytes",
    pickle.BINBYTES8: "load_binbytes8",
    pickle.BYTEARRAY8: "load_bytearray8",
}.items():
    _RestrictedUnpickler.dispatch[_opcode[0]] = getattr(_RestrictedUnpickler, _method)
for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):  # the copyreg extension registry
    _RestrictedUnpickler.dispatch.pop(_opcode[0], None)


def _expect(target: Any, kind: type, opcode: str) -> Any:
    if not isinstance(target, kind):
        raise _Refused(f"{opcode} on a {type(target).__name__} is not allowed")
    return target


def _name(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}"


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _children(obj: Any) -> list | tuple | None:
    if isinstance(obj, (list, tuple)):
        return obj
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "O":
        return obj.ravel().tolist()
    return None


def _own_size(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return 64 + (8 * obj.size if obj.dtype.kind == "O" else obj.nbytes)
    if isinstance(obj, (str, bytes, bytearray)):
        return 48 + len(obj)
    if isinstance(obj, int):
        return 28 + obj.bit_length() // 8
    if isinstance(obj, (dict, set, frozenset)):
        return 64 + 16 * len(obj)
    if isinstance(obj, (list, tuple)):
        return 56 + 8 * len(obj)
    return 32


def check_expansion(root: Any, where: str, budget: int) -> None:
    """Walk `root` without recursion; refuse reference cycles, nesting deeper than MAX_DEPTH and
    an expanded size (shared objects counted once per reference, as a reader converting the
    containers to arrays would) above `budget` bytes."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    todo: list[tuple[Any, int, bool]] = [(root, 0, False)]
    while todo:
        obj, depth, done = todo.pop()
        key = id(obj)
        kids = _children(obj)
        if done:
            on_path.discard(key)
            sizes[key] = _own_size(obj) + sum(sizes[id(kid)] for kid in kids)
        elif key in sizes:
            continue
        elif key in on_path:
            raise DataError(f"{where}: refused: the data contain a reference cycle")
        elif depth > MAX_DEPTH:
            raise DataError(f"{where}: refused: containers nested deeper than {MAX_DEPTH} levels")
        elif not kids:
            sizes[key] = _own_size(obj)
        else:
            on_path.add(key)
            todo.append((obj, depth, True))
            todo.extend((kid, depth + 1, False) for kid in kids)
            continue
        if sizes[key] > budget:
            raise DataError(
                f"{where}: refused: the data expand to more than {_fmt_bytes(budget)} "
                f"(this file's memory budget; shared references count once each)"
            )


def _load(stream: io.BufferedIOBase, size: int, where: str, max_bytes: int | None) -> object:
    budget = max_bytes if max_bytes is not None else max(MIN_BUDGET_BYTES, BUDGET_RATIO * size)
    try:
        result = _RestrictedUnpickler(_BoundedReader(stream, size), where, budget).load()
        check_expansion(result, where, budget)
        return result
    except DataError:
        raise
    except _Refused as e:
        raise DataError(f"{where}: {e}") from None
    except MemoryError:
        raise DataError(f"{where}: not a readable pickle (out of memory)") from None
    except RecursionError:
        raise DataError(f"{where}: not a readable pickle (nested too deeply)") from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError, TypeError, ... on bad bytes
        if _starts_as_text(stream):
            raise DataError(f"{where}: not a pickle: it starts as text (a CSV or other text file?)") from None
        detail = str(e).splitlines()[0][:200] if str(e).strip() else ""
        raise DataError(f"{where}: not a readable pickle ({type(e).__name__}: {detail})") from None


def _starts_as_text(stream: io.BufferedIOBase) -> bool:
    """The first line is printable UTF-8 text with a comma, semicolon or tab: a CSV or TSV
    header (a byte-order mark and a character cut at the 512th byte allowed). A protocol-0
    pickle is text too, but its first line is an opcode line without any of them, so a damaged
    one is not called text; `find_class` applies the same separators to a class name."""
    try:
        stream.seek(0)
        head = stream.read(512).decode("utf-8", errors="ignore").removeprefix("\ufeff")
    except (OSError, ValueError):
        return False
    first = head.splitlines()[0] if head.strip() else ""
    return any(c in first for c in _TEXT_SEPARATORS) and all(c.isprintable() or c == "\t" for c in first)


def load_pickle(path: str | os.PathLike, max_bytes: int | None = None) -> object:
    """Load a pickle of numpy arrays and plain containers (dict/list/tuple/str/numbers).

    max_bytes: memory the file may expand to (default: max(MIN_BUDGET_BYTES, BUDGET_RATIO x
    its size)). Raises DataError naming `path` when the file is missing, unreadable, truncated or
    not a pickle, names any global or call outside the allow-list (nothing is called then),
    holds object fields in a structured dtype, exceeds the budget, nests deeper than MAX_DEPTH or
    holds a reference cycle.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a pickle file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            return _load(f, os.fstat(f.fileno()).st_size, str(path), max_bytes)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def loads_pickle(data: bytes, where: str = "<bytes>", max_bytes: int | None = None) -> object:
    """`load_pickle` for an in-memory pickle; `where` names it in error messages."""
    return _load(io.BytesIO(data), len(data), where, max_bytes)


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
