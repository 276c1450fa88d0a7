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
    with pytest.raises(DataError, match="not a readable pickle"):
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


def test_numpy1_module_names_accepted():
    """Files written under numpy 1.x name numpy.core.*; numpy 2 writes numpy._core.*."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = pickle.dumps({"a": array, "s": np.float64(2.5)}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    loaded = loads_pickle(old, "numpy1.pkl")
    np.testing.assert_array_equal(loaded["a"], array)
    assert loaded["s"] == 2.5
