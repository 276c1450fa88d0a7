"""Fuzz: seeded random mutations of a valid MMSA pickle, MulT pickle, YAML config and checkpoint,
each fed through the CLI in-process. Every run must end with exit status 0 or 2 (an error is one
`msakit: error:` line), never an exception escaping `main`, and must write nothing outside its
`--out` folder (the working directory and the inputs' folder are compared before and after).

Mutations are byte-level (flip, truncate, splice, insert) and structure-level (a random node of
the loaded structure replaced by an edge value: NaN/inf arrays, wrong shapes, object arrays,
huge integers, nested or shared lists, missing keys, other types). Counts per input kind are
printed (`pytest -s`) and kept in `FUZZ_COUNTS` for the report."""

from __future__ import annotations

import copy
import io
import os
import pickle
import random
import signal
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from msakit.cli import main
from msakit.data.mmsa import write_mmsa
from msakit.data.mult import write_mult

SEED = 20260
CASES = {"mmsa": 90, "mult": 60, "yaml": 90, "checkpoint": 60}
MODEL = ["model.text_hidden=4", "model.audio_hidden=2", "model.vision_hidden=2", "model.fusion_hidden=4"]
FUZZ_COUNTS: dict[str, dict[int, int]] = {}

EDGE_VALUES = [
    None, "", "x", -1, 0, 10**400, 2**63, float("nan"), float("-inf"), True, [], {}, [[1, 2], [3]],
    np.array([np.nan, np.inf]), np.zeros((2, 3, 4, 5), dtype=np.float32), np.array(["a", 1], dtype=object),
    np.zeros(3, dtype=np.complex64), np.full((4, 3, 2), -np.inf, dtype=np.float32), b"\xff\xfe",
    np.zeros((0, 3, 4), dtype=np.float32), np.arange(12, dtype=np.int8).reshape(3, 4),
]
YAML_TOKENS = [": ", "[", "]", "{", "}", "- ", "!!python/object/apply:os.system ['touch pwned']", "&a [1]",
               "*a", "\t", "?", "'", '"', "#", "!!binary aGk=", "~", ".nan", "-.inf", "1e400", "0x1F", "<<: *a"]
YAML_NUMBERS = ["0", "-1", "-5", ".nan", ".inf", "9223372036854775808", "99999999999", "1.5", "x", "[1]", "{a: 1}",
                "null", "true", "2.5e-3"]


def _mmsa_tree(rng: np.random.Generator) -> dict:
    splits = {}
    for split, n in (("train", 10), ("valid", 4), ("test", 4)):
        splits[split] = {
            "id": np.array([f"v{i // 2}$_${i % 2}" for i in range(n)], dtype=object),
            "raw_text": np.array([f"words {i}" for i in range(n)], dtype=object),
            "text": rng.normal(size=(n, 3, 4)).astype(np.float32),
            "audio": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "vision": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "regression_labels": rng.uniform(-3, 3, size=n).astype(np.float32),
        }
    return splits


def _mult_tree(rng: np.random.Generator) -> dict:
    splits = {}
    for split, n in (("train", 10), ("valid", 4), ("test", 4)):
        splits[split] = {
            "text": rng.normal(size=(n, 3, 4)).astype(np.float32),
            "audio": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "vision": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "labels": rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32),
            "id": np.array([[f"v{i}".encode(), b"0", b"1"] for i in range(n)]),
        }
    return splits


def _nodes(tree, path=()):
    """(path, value) of every dict entry / list item, depth first."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*path, key), value
            yield from _nodes(value, (*path, key))
    elif isinstance(tree, list):  # items only (shared lists inserted below are not entered)
        for i, value in enumerate(tree[:4]):
            yield (*path, i), value


def _mutate_tree(tree, rnd: random.Random):
    tree = copy.deepcopy(tree)
    for _ in range(rnd.randint(1, 3)):
        nodes = list(_nodes(tree))
        if not nodes:
            break
        path, value = rnd.choice(nodes)
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        choice = rnd.random()
        if choice < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif choice < 0.3 and isinstance(value, np.ndarray) and value.size:
            flat = value.astype(np.float64).ravel().copy() if value.dtype.kind in "fiu" else None
            if flat is not None:
                flat[rnd.randrange(flat.size)] = rnd.choice([np.nan, np.inf, -np.inf, 1e30, -7.0])
                parent[path[-1]] = flat.reshape(value.shape).astype(value.dtype)
        elif choice < 0.4:
            shared = [[0.5] * 50] * 50
            parent[path[-1]] = [shared] * rnd.choice([2, 50])
            break  # last: later mutations would walk the shared lists
        else:
            parent[path[-1]] = copy.deepcopy(rnd.choice(EDGE_VALUES))
    return tree


def _mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        kind = rnd.random()
        at = rnd.randrange(max(len(data), 1))
        if kind < 0.4:
            data[at] = rnd.randrange(256)
        elif kind < 0.55:
            del data[at:]
        elif kind < 0.75:
            end = min(len(data), at + rnd.randint(1, 64))
            data[at:at] = data[at:end]
        elif kind < 0.9:
            data[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        else:
            del data[at : at + rnd.randint(1, 32)]
    return bytes(data)


def _mutate_yaml(text: str, rnd: random.Random) -> bytes:
    lines = text.splitlines()
    for _ in range(rnd.randint(1, 3)):
        kind = rnd.random()
        i = rnd.randrange(len(lines)) if lines else 0
        if not lines:
            lines = [rnd.choice(YAML_TOKENS)]
        elif kind < 0.35 and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {rnd.choice(YAML_NUMBERS)}"
        elif kind < 0.55:
            pos = rnd.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + rnd.choice(YAML_TOKENS) + lines[i][pos:]
        elif kind < 0.65:
            del lines[i]
        elif kind < 0.75:
            lines.insert(i, lines[rnd.randrange(len(lines))])
        elif kind < 0.85:
            lines.insert(i, "  " * rnd.randint(0, 3) + "extra_key: 1")
        elif kind < 0.92:
            lines.append("deep: " + "[" * 1100 + "]" * 1100)
        else:
            return ("\n".join(lines)).encode("utf-8") + b"\n\xff\xfe bad bytes\n"
    return ("\n".join(lines) + "\n").encode("utf-8")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _snapshot(*folders: Path, skip: Path) -> dict:
    files = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            if Path(root) == skip or skip in Path(root).parents:
                dirs[:] = []
                continue
            for name in names:
                p = Path(root) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files[str(p)] = (st.st_size, st.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The valid inputs: an MMSA pickle, a MulT pickle, a YAML config and a checkpoint."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    rng = np.random.default_rng(SEED)
    mmsa = write_mmsa(root / "mmsa.pkl", _mmsa_tree(rng))
    mult = write_mult(root / "mult.pkl", _mult_tree(rng))
    config = root / "config.yaml"
    config.write_text(
        "# msakit train --config config.yaml\n"
        "model:\n  name: lf_dnn\n  text_hidden: 4\n  audio_hidden: 2\n  vision_hidden: 2\n  fusion_hidden: 4\n"
        "  dropout: 0.1\n"
        "data:\n  name: synthetic\n  batch_size: 8\n  synthetic:\n    train_size: 24\n    valid_size: 8\n"
        "    test_size: 8\n    text_length: 4\n    audio_length: 4\n    vision_length: 4\n"
        "train:\n  epochs: 1\n  lr: 0.01\n  seeds: [1]\n  progress: false\n  scheduler: plateau\n"
    )
    run = root / "run"
    code = main(["train", "--dataset", "mmsa", "--data-path", str(mmsa), "--epochs", "1", "--out", str(run),
                 "--quiet", "--set", *MODEL])
    assert code == 0
    return {"mmsa": mmsa, "mult": mult, "yaml": config, "checkpoint": run / "seed_1" / "last.pt"}


def _cases(bases: dict, rnd: random.Random):
    trees = {kind: pickle.loads(bases[kind].read_bytes()) for kind in ("mmsa", "mult")}
    state = torch.load(bases["checkpoint"], map_location="cpu", weights_only=True)
    for kind, count in CASES.items():
        for i in range(count):
            structural = i % 2 == 0
            if kind in ("mmsa", "mult"):
                data = (pickle.dumps(_mutate_tree(trees[kind], rnd), protocol=rnd.choice([2, 4, 5]))
                        if structural else _mutate_bytes(bases[kind].read_bytes(), rnd))
            elif kind == "yaml":
                data = _mutate_yaml(bases[kind].read_text(), rnd)
            else:
                if structural:
                    buffer = io.BytesIO()
                    mutated = _mutate_tree({k: v for k, v in state.items() if k != "rng"}, rnd)
                    torch.save({**mutated, "rng": state["rng"]}, buffer)
                    data = buffer.getvalue()
                else:
                    data = _mutate_bytes(bases[kind].read_bytes(), rnd)
            yield kind, i, data


def _argv(kind: str, path: Path, out: Path, bases: dict) -> list[str]:
    if kind == "mmsa":
        return ["train", "--dataset", "mmsa", "--data-path", str(path), "--epochs", "1", "--out", str(out),
                "--quiet", "--set", *MODEL]
    if kind == "mult":
        return ["train", "--dataset", "mult", "--data-path", str(path), "--epochs", "1", "--out", str(out),
                "--quiet", "--set", *MODEL]
    if kind == "yaml":
        return ["train", "--config", str(path), "--epochs", "1", "--out", str(out), "--quiet"]
    return ["eval", "--checkpoint", str(path), "--dataset", "mmsa", "--data-path", str(bases["mmsa"]),
            "--out", str(out / "metrics.json")]


def test_fuzz_cli(bases, tmp_path, monkeypatch, capsys):
    rnd = random.Random(SEED)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a default output folder would land here and be caught
    previous = signal.signal(signal.SIGALRM, _alarm)
    counts = {kind: {0: 0, 2: 0} for kind in CASES}
    failures = []
    try:
        for kind, i, data in _cases(bases, rnd):
            case = tmp_path / f"{kind}-{i}"
            case.mkdir()
            path = case / {"mmsa": "data.pkl", "mult": "data.pkl", "yaml": "config.yaml"}.get(kind, "last.pt")
            path.write_bytes(data)
            out = case / "out"
            monkeypatch.setenv("MSAKIT_CACHE", str(out / "cache"))
            before = _snapshot(work, case, bases["mmsa"].parent, skip=out)
            stdout, stderr = io.StringIO(), io.StringIO()
            signal.alarm(30)
            try:
                with redirect_stdout(stdout), redirect_stderr(stderr):
                    code = main(_argv(kind, path, out, bases))
            except BaseException as e:  # noqa: BLE001 (anything escaping main is the failure)
                code = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                signal.alarm(0)
            after = _snapshot(work, case, bases["mmsa"].parent, skip=out)
            lines = stderr.getvalue().strip().splitlines()
            if code not in (0, 2):
                failures.append((kind, i, code))
            elif code == 2 and not (lines and lines[-1].startswith(("msakit: error:", "msakit "))):
                failures.append((kind, i, f"exit 2 without a one-line error: {lines[-3:]}"))
            elif "Traceback" in stderr.getvalue():
                failures.append((kind, i, "a traceback on stderr"))
            elif after != before:
                changed = sorted(set(after.items()) ^ set(before.items()))
                failures.append((kind, i, f"wrote outside --out: {changed[:3]}"))
            else:
                counts[kind][code] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    FUZZ_COUNTS.update(counts)
    with capsys.disabled():
        print(f"\nfuzz counts (exit 0 / exit 2) per input kind: {counts}", file=sys.stderr)
    assert not failures, failures[:5]
    total = sum(sum(c.values()) for c in counts.values())
    assert total == sum(CASES.values())
    assert all(c[2] > 0 for c in counts.values())  # the mutations do break things
    assert counts["mmsa"][0] + counts["yaml"][0] > 0  # and some stay valid
