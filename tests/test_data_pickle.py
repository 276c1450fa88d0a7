"""Restricted unpickler: numpy arrays and plain containers load; anything else is refused
before it runs; broken files give one-line DataErrors naming the file."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest

from msakit.data.base import DataError
from msakit.data.safe_pickle import load_pickle, loads_pickle, save_pickle


class Custom:
    """A harmless custom class: still refused (only numpy and containers are allowed)."""

    def __init__(self, value: int = 1):
        self.value = value


class TouchFile:
    """Unpickling this runs os.system('touch <path>') under plain pickle.load."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _payload() -> dict:
    return {
        "train": {
            "text": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
            "labels": np.array([0.5, -1.0], dtype=np.float64),
            "id": np.array(["a$_$1", "b$_$2"], dtype=object),
            "raw_text": np.array(["hello", "world"]),
            "lengths": [3, 2],
            "pair": (np.int64(7), np.float32(1.5), np.bool_(True)),
            "noncontiguous": np.zeros((3, 4))[:, ::2],
            "record": np.zeros(2, dtype=[("a", "f4"), ("b", "i8")]),
            "misc": {"set": {1, 2}, "frozen": frozenset({3}), "bytes": b"\x00\xff", "none": None},
            "ordered": OrderedDict(x=1),
            "complex": 1 + 2j,
        }
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_and_containers_load(protocol):
    payload = _payload()
    loaded = loads_pickle(pickle.dumps(payload, protocol=protocol))
    train, expected = loaded["train"], payload["train"]
    for key in ("text", "labels", "raw_text", "noncontiguous", "record"):
        np.testing.assert_array_equal(train[key], expected[key])
        assert train[key].dtype == expected[key].dtype
    assert list(train["id"]) == ["a$_$1", "b$_$2"]
    assert train["pair"] == (7, 1.5, True) and isinstance(train["pair"][0], np.int64)
    assert train["misc"] == expected["misc"]
    assert train["ordered"] == {"x": 1} and train["complex"] == 1 + 2j


def test_save_and_load_file_round_trip(tmp_path):
    path = save_pickle(_payload(), tmp_path / "sub" / "data.pkl")
    assert path == tmp_path / "sub" / "data.pkl"
    loaded = load_pickle(path)
    np.testing.assert_array_equal(loaded["train"]["text"], _payload()["train"]["text"])
    # overwrite in place, no temp files left behind
    save_pickle({"x": 1}, path)
    assert load_pickle(path) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.pkl"]


def test_save_pickle_failure_leaves_nothing(tmp_path):
    path = tmp_path / "bad.pkl"
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_pickle({"f": lambda: 1}, path)
    assert list(tmp_path.iterdir()) == []


def test_refuses_os_system_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": TouchFile(str(marker))}))
    with pytest.raises(DataError) as err:
        load_pickle(path)
    message = str(err.value)
    assert str(path) in message and "refused to unpickle" in message
    assert "system" in message and "only numpy arrays and plain containers" in message
    assert "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_refuses_custom_class(tmp_path, protocol):
    path = tmp_path / "custom.pkl"
    path.write_bytes(pickle.dumps([Custom(3)], protocol=protocol))
    # protocol 0/1 name copy_reg._reconstructor first, later protocols the class itself
    with pytest.raises(DataError, match=r"refused to unpickle (copy_reg\._reconstructor|.*Custom)"):
        load_pickle(path)


@pytest.mark.parametrize(
    "raw",
    [
        b"cbuiltins\neval\n(V__import__('os')\ntR.",  # builtins.eval
        b"c__builtin__\nexec\n(Vx=1\ntR.",  # Python 2 spelling
        b"cnumpy\nload\n(Vx.npy\ntR.",  # numpy, but not an allowed name
        b"ccopyreg\n_reconstructor\n(tR.",
    ],
)
def test_refuses_other_globals(raw):
    with pytest.raises(DataError, match="refused to unpickle"):
        loads_pickle(raw, "crafted.pkl")


def test_codecs_encode_only_latin1():
    ok = b"c_codecs\nencode\n(V\xe9\nVlatin1\ntR."
    assert loads_pickle(ok) == b"\xe9"
    with pytest.raises(DataError, match="rot.pkl: _codecs.encode with codec 'rot13' is not allowed"):
        loads_pickle(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.", "rot.pkl")


def test_truncated_and_garbage_files(tmp_path):
    good = pickle.dumps({"a": np.arange(100.0)}, protocol=4)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle at all")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(DataError) as err:
            load_pickle(path)
        assert str(err.value).startswith(f"{path}: not a readable pickle (")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pkl"
    with pytest.raises(DataError, match="nope.pkl: file not found"):
        load_pickle(path)
    with pytest.raises(DataError, match=f"{tmp_path}: is a folder, expected a pickle file"):
        load_pickle(tmp_path)


def test_a_csv_is_said_to_be_text_not_a_refused_global(tmp_path):
    """An "i" first is protocol 0's INST opcode, so the header line reads as a class's module: the error
    named 'refused to unpickle d,text,label...' as if the file were a hostile pickle."""
    path = tmp_path / "labels.csv"
    path.write_text("id,text,label,mode\n03bSnISJMiM_1,anyhow it was really good,2.4,train\n")
    with pytest.raises(DataError, match=r"labels.csv: not a pickle: it starts as text \(a CSV"):
        load_pickle(path)
    for head in ("video_id,clip_id,text,label\n", '"id","label"\n', "index\ttext\tlabel\n",
                 "\ufeffvideo,label\n", "v,l", "name;label\n"):  # other first letters, a BOM, one line, ;
        path.write_text(head + "a,1,hello,0.5\n")
        with pytest.raises(DataError, match=r"labels.csv: not a pickle: it starts as text \(a CSV"):
            load_pickle(path)
    path.write_bytes(b"cos\nsystem now\n(S'ls'\ntR.")  # hostile, with a space: named, not called text
    with pytest.raises(DataError, match="refused to unpickle os.system now"):
        load_pickle(path)
    protocol0 = pickle.dumps({"x": [1.5, 2.5], "y": "a, b", "z": np.zeros(2)}, protocol=0)
    cuts = (5, len(protocol0) // 2, protocol0.index(b"cnumpy") + 7, len(protocol0) - 2)
    for cut in cuts:  # a damaged pickle is not called text (one cut inside a class name)
        path.write_bytes(protocol0[:cut])
        with pytest.raises(DataError, match=r"labels.csv: (not a readable pickle \(|refused to unpickle)") as err:
            load_pickle(path)
        assert "starts as text" not in str(err.value)


def test_numpy1_module_names_accepted():
    """Files written under numpy 1.x name numpy.core.*; numpy 2 writes numpy._core.*."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = pickle.dumps({"a": array, "s": np.float64(2.5)}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    loaded = loads_pickle(old, "numpy1.pkl")
    np.testing.assert_array_equal(loaded["a"], array)
    assert loaded["s"] == 2.5


# ----------------------------------------------------------------------------- hostile files

_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]


class Reduce:
    """Pickles as `func(*args)` (then BUILD with `state` when given): hand-made hostile files."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _oneline(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("hostile.pkl: ")
    return message


def test_build_on_a_numpy_global_is_refused():
    """A BUILD applied to an allowed numpy callable used to set its attributes (`__defaults__`);
    BUILD is allowed only on an array / dtype the file is rebuilding."""
    before = (_reconstruct.__doc__, np.dtype.__doc__)
    raw = b"cnumpy._core.multiarray\n_reconstruct\n(N}V__defaults__\n(I9\ntstb."
    with pytest.raises(DataError) as err:
        loads_pickle(raw, "hostile.pkl")
    assert "refused to apply a state (BUILD)" in _oneline(err)
    raw = b"cnumpy\ndtype\n(N}V__doc__\nVpwned\nstb."
    with pytest.raises(DataError, match=r"refused to apply a state \(BUILD\)"):
        loads_pickle(raw, "hostile.pkl")
    assert (_reconstruct.__doc__, np.dtype.__doc__) == before


def test_second_build_on_an_array_is_refused():
    array = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), np.dtype("f4"), False, b"\0" * 8))
    raw = pickle.dumps(array, protocol=2)
    assert loads_pickle(raw).shape == (2,)
    # the same array built twice (memo GET then another BUILD)
    raw2 = raw[:-1] + b"(N}V_x\nI1\nstb."
    with pytest.raises(DataError, match="BUILD"):
        loads_pickle(raw2, "hostile.pkl")


def test_structured_dtype_with_object_fields_is_refused():
    """Overlapping object and integer fields made numpy read raw bytes as object pointers (a
    segfault). The file must not get that far, whichever way it spells the dtype."""
    overlapping = Reduce(
        np.dtype, ("V8", False, True),
        (3, "|", None, ("a", "b"), {"a": (np.dtype("O"), 0), "b": (np.dtype("i8"), 0)}, 8, 1, 0),
    )
    array = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), overlapping, False, b"\x41" * 8))
    with pytest.raises(DataError) as err:
        loads_pickle(pickle.dumps(array, protocol=2), "hostile.pkl")
    assert "object fields" in _oneline(err)
    # object fields spelled in the dtype string, or a flags word claiming objects
    with pytest.raises(DataError, match="object fields"):
        loads_pickle(pickle.dumps(Reduce(np.dtype, ("O,i8", False, True)), protocol=2), "hostile.pkl")
    claims = Reduce(np.dtype, ("V8", False, True),
                    (3, "|", None, ("b",), {"b": (np.dtype("i8"), 0)}, 8, 1, 1))
    with pytest.raises(DataError, match="object fields"):
        loads_pickle(pickle.dumps(claims, protocol=2), "hostile.pkl")


def test_object_array_must_hold_as_many_elements_as_its_shape():
    """numpy segfaults on an object array whose list is shorter than its shape."""
    short = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10,), np.dtype("O"), False, [1, 2]))
    with pytest.raises(DataError) as err:
        loads_pickle(pickle.dumps(short, protocol=2), "hostile.pkl")
    assert "must hold a list of 10" in _oneline(err)
    ids = loads_pickle(pickle.dumps(np.array(["a", "b"], dtype=object), protocol=4))
    assert ids.tolist() == ["a", "b"]


def test_zero_stride_view_is_refused():
    """numpy.ndarray called directly builds a 10^9-element view of 8 bytes (strides 0)."""
    view = Reduce(np.ndarray, ((10**9,), np.dtype("f8"), b"\0" * 8, 0, (0,)))
    with pytest.raises(DataError) as err:
        loads_pickle(pickle.dumps(view, protocol=2), "hostile.pkl")
    assert "refused to call numpy.ndarray" in _oneline(err)


def test_tiny_file_declaring_gigabytes_is_refused():
    big = Reduce(_reconstruct, (np.ndarray, (10**12,), b"b"))
    raw = pickle.dumps(big, protocol=2)
    with pytest.raises(DataError) as err:
        loads_pickle(raw, "hostile.pkl")
    assert "beyond this file's memory budget" in _oneline(err)
    with pytest.raises(DataError, match="bytearray of a int is not allowed"):
        loads_pickle(pickle.dumps(Reduce(bytearray, (10**12,)), protocol=2), "hostile.pkl")
    # a length field asking for a terabyte: refused before any allocation
    with pytest.raises(DataError, match="truncated"):
        loads_pickle(b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"abc", "hostile.pkl")


@pytest.mark.parametrize("dtype", ["S0", "U0", "V0"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_zero_size_items_cannot_declare_a_count(dtype, protocol):
    """An array of zero-byte items declares any number of elements in a few bytes of file; the
    first conversion (float labels, id strings) would allocate them."""
    array = _reconstruct(np.ndarray, (0,), np.dtype(dtype))
    array.__setstate__((1, (10**8,), np.dtype(dtype), False, b""))
    raw = pickle.dumps({"train": {"id": array}}, protocol=protocol)
    assert len(raw) < 1000
    with pytest.raises(DataError, match=r"hostile.pkl: an array of shape \(100000000,\) with zero-size items"):
        loads_pickle(raw, "hostile.pkl")
    empty = np.zeros((0, 3), dtype=dtype)  # no elements: nothing declared, still loads
    assert loads_pickle(pickle.dumps(empty, protocol=protocol), "ok.pkl").shape == (0, 3)


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_old_protocols_empty_and_long_arrays_load(protocol):
    """Protocols 0-2 write b"" as bytes() (an empty array's data) and protocol 0 writes an
    array's bytes as one escaped text line (here ~1.6 MB)."""
    data = {"a": np.zeros((0, 3), dtype=np.float32), "b": np.arange(400_000, dtype=np.float32)}
    back = loads_pickle(pickle.dumps(data, protocol=protocol), "old.pkl")
    assert back["a"].shape == (0, 3) and np.array_equal(back["b"], data["b"])
    with pytest.raises(DataError, match="bytes\\(...\\) with arguments is not allowed"):
        loads_pickle(pickle.dumps(Reduce(bytes, (10**9,)), protocol=protocol), "hostile.pkl")


def test_nested_shared_lists_are_refused_by_their_expanded_size():
    """A 10 KB file of lists shared by reference expands to 10^9 floats when a reader converts
    it to an array; the expanded size counts each reference."""
    inner = [0.5] * 1000
    middle = [inner] * 1000
    raw = pickle.dumps({"train": {"text": [middle] * 1000}}, protocol=4)
    assert len(raw) < 20_000
    with pytest.raises(DataError) as err:
        loads_pickle(raw, "hostile.pkl")
    assert "expand to more than 256.0 MiB" in _oneline(err)
    # an explicit limit applies the same rule to smaller structures
    assert loads_pickle(pickle.dumps([inner] * 10), "ok.pkl", max_bytes=10**6)
    with pytest.raises(DataError, match="expand to more than"):
        loads_pickle(pickle.dumps([inner] * 1000), "hostile.pkl", max_bytes=10**6)


def test_deep_nesting_and_cycles_are_one_line_errors():
    n = 30_000  # far beyond Python's recursion limit
    deep = b"\x80\x02}X\x05\x00\x00\x00train" + b"(" * n + b"N" + b"l" * n + b"s."
    with pytest.raises(DataError) as err:
        loads_pickle(deep, "hostile.pkl")
    assert "nested deeper than 100 levels" in _oneline(err)
    key = b"\x80\x02}" + b"(" * n + b"N" + b"t" * n + b"K\x01s."  # a tuple key n deep
    with pytest.raises(DataError, match="nested deeper"):
        loads_pickle(key, "hostile.pkl")
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(DataError, match="reference cycle"):
        loads_pickle(pickle.dumps({"train": cycle}), "hostile.pkl")


@pytest.mark.parametrize("failure", [MemoryError, RecursionError])
def test_memory_and_recursion_failures_are_one_line(monkeypatch, failure):
    from msakit.data import safe_pickle

    def fail(self):
        raise failure()

    monkeypatch.setattr(safe_pickle._RestrictedUnpickler, "load", fail)
    with pytest.raises(DataError) as err:
        loads_pickle(pickle.dumps([1]), "hostile.pkl")
    assert "not a readable pickle (" in _oneline(err)


@pytest.mark.parametrize("protocol", [4, 5])
def test_large_arrays_load_without_a_second_copy(protocol):
    """Array payloads of >= 1 MiB become writeable views of the bytes read from the file
    (no bytes object copied into the array), also when the same array is referenced twice."""
    array = np.arange(2**19, dtype=np.float32).reshape(512, 1024)  # 2 MiB
    loaded = loads_pickle(pickle.dumps({"a": array, "b": array, "f": array.T}, protocol=protocol))
    np.testing.assert_array_equal(loaded["a"], array)
    np.testing.assert_array_equal(loaded["f"], array.T)
    assert loaded["a"] is loaded["b"]
    owner = loaded["a"]
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    assert loaded["a"].flags.writeable and isinstance(owner, bytearray)
