"""The run folder (`msakit train --out DIR`): what a run may write there, and when.

Rules, in the order `run_experiment` applies them:
- one run per folder at a time: an exclusive lock (`DIR/.msakit.lock`, naming the process) is
  taken first; a second run into the same folder is refused with the folder and the other pid;
- nothing is written before every check passed; a folder created for a run that then failed its
  checks (bad data, refused resume) is removed again;
- a new run refuses a folder that already holds a run (`config.yaml`, `results.json` or
  `seed_<s>/`) unless `overwrite`, which removes that run's files first;
- a resume continues THE run in the folder: its `config.yaml` is the run's config; any other
  value (seeds included) is an error naming the key and both values, except the keys of
  `RESUME_MAY_CHANGE` (more epochs, another device or thread count, the data's location: the data
  itself is checked by its fingerprint); each seed's `last.pt` must be of that seed, of the same
  data (fingerprint) and not past `train.epochs`;
- temporary files of interrupted atomic writes (`.NAME.XXXX.tmp`) beside the run's files and in
  its seed folders are removed at the next start.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from msakit.data.base import SPLITS, MultimodalData
from msakit.train.checkpoint import file_mode, load_checkpoint

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no folder lock)
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".msakit.lock"
RESUME_MAY_CHANGE = frozenset({
    "train.epochs", "train.progress", "train.device", "train.num_threads", "train.tensorboard",
    "train.mlflow",
    "data.data_root", "data.data_path",
})
"""Config keys a resume may change (`train.epochs` only upwards: checked against last.pt)."""
_SEED_DIR = re.compile(r"seed_-?\d+")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and the problem."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the folder stays resumable. `str()` is the one line to print."""

    def __init__(self, out_dir: Path, seed: int, epochs_done: int):
        super().__init__(
            f"interrupted after epoch {epochs_done} (seed {seed}); "
            f"continue with: msakit train --out {out_dir} --resume"
        )


# ----------------------------------------------------------------------------- fingerprint


def data_fingerprint(data: MultimodalData) -> dict:
    """{"samples": {split: N}, "blake2b": hex} over everything a model sees of each split:
    features, lengths, labels, ids, groups and texts (dtype and shape included). Stored in every
    checkpoint; a resume on data with another fingerprint is refused."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(data.info.name.encode())
    samples = {}
    for split in sorted(data.splits, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)):
        arrays = data.splits[split]
        samples[split] = len(arrays)
        parts = [(f"features.{m}", a) for m, a in sorted(arrays.features.items())]
        parts += [(f"lengths.{m}", a) for m, a in sorted(arrays.lengths.items())]
        parts += [("labels", arrays.labels), ("groups", arrays.groups)]
        for name, array in parts:
            if array is None:
                continue
            array = np.ascontiguousarray(array)
            digest.update(f"{split}.{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
        for name, strings in (("ids", arrays.ids), ("texts", arrays.texts)):
            if strings is not None:
                digest.update(f"{split}.{name}:".encode() + "\x1f".join(map(str, strings)).encode())
    return {"samples": samples, "blake2b": digest.hexdigest()}


def _describe(fingerprint: dict | None) -> str:
    if not fingerprint:
        return "none recorded"
    sizes = ", ".join(f"{k} {v}" for k, v in fingerprint["samples"].items())
    return f"{sizes}; blake2b {fingerprint['blake2b'][:12]}"


# ----------------------------------------------------------------------------- config comparison


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _normalised(config: dict) -> dict[str, Any]:
    """As it reads back from config.yaml (tuples become lists)."""
    return flatten(yaml.safe_load(yaml.safe_dump(config, sort_keys=False)))


def config_differences(saved: dict, current: dict, ignore=RESUME_MAY_CHANGE) -> list[tuple[str, Any, Any]]:
    """[(key, saved value, current value)] for every key whose values differ."""
    a, b = _normalised(saved), _normalised(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def _contradiction(where: Path, differences: list[tuple[str, Any, Any]]) -> RunFolderError:
    key, saved, current = differences[0]
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    return RunFolderError(
        f"{where}: {key} is {saved!r} in the run but {current!r} now{more}; a resume continues the "
        "run in the folder: drop the flag, or start a new run with another --out"
    )


def check_checkpoint(state: dict, path: Path, cfg, seed: int, fingerprint: dict) -> None:
    """Refuse to resume from `path` unless it is this seed's state, on the same data, with the
    same config (bar RESUME_MAY_CHANGE) and not past `train.epochs`."""
    if state.get("seed") != seed:
        raise RunFolderError(f"{path}: holds seed {state.get('seed')!r}, not seed {seed} "
                             "(copied from another seed's folder?)")
    if state.get("data_fingerprint") != fingerprint:
        raise RunFolderError(
            f"{path}: trained on other data ({_describe(state.get('data_fingerprint'))}) than the "
            f"data loaded now ({_describe(fingerprint)}); resume needs the run's own data"
        )
    differences = config_differences(state["config"], cfg.to_dict(), RESUME_MAY_CHANGE | {"train.seeds"})
    if differences:
        raise _contradiction(path, differences)
    done = int(state.get("epoch", 0))
    if done > cfg.train.epochs:
        raise RunFolderError(f"{path}: seed {seed} already trained {done} epochs but train.epochs is "
                             f"{cfg.train.epochs}; a resume cannot undo epochs (--epochs >= {done})")


# ----------------------------------------------------------------------------- the folder


def _seed_dirs(path: Path) -> list[Path]:
    """The run's seed folders (seed_N) in `path`."""
    return [p for p in path.iterdir() if p.is_dir() and _SEED_DIR.fullmatch(p.name)]


def holds_run(path: Path) -> bool:
    return path.is_dir() and (
        (path / "config.yaml").exists() or (path / "results.json").exists()
        or bool(_seed_dirs(path))
    )


def resume_tree(out_dir: str | Path) -> dict:
    """The config tree of the run in `out_dir` (its config.yaml), for `--resume`."""
    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"{out_dir}: no run to resume here (no config.yaml); start it without --resume")
    try:
        tree = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: not a readable run config ({type(e).__name__})") from e
    if not isinstance(tree, dict):
        raise RunFolderError(f"{path}: not a run config (expected model/data/train sections)")
    return tree


_EPOCH_FILES = ("last.pt", "best.pt", "log.jsonl", "metrics.json")  # a seed that trained an epoch


class RunFolder:
    """`with RunFolder(out) as folder:` creates and locks `out`; on leaving, unlocks, and removes
    the folder again if this run created it and wrote nothing into it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._created = False
        self._lock: int | None = None

    def __enter__(self) -> RunFolder:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path}: exists and is not a folder; --out needs a folder")
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"{self.path}: cannot create the run folder ({e.strerror})") from e
        try:
            self._acquire()
        except BaseException:
            self._remove_if_unused()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()
        self._remove_if_unused()

    def _acquire(self) -> None:
        if fcntl is None:
            return
        lock_path = self.path / LOCK_NAME
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunFolderError(f"{self.path}: cannot lock the run folder ({e.strerror})") from e
                raise RunFolderError(
                    f"{self.path}: another msakit run (pid {holder}) is writing into this folder; "
                    "wait for it to finish or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else its holder removed it between our open and lock: take the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def _release(self) -> None:
        if self._lock is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)  # while still held: see _acquire
            os.close(self._lock)
            self._lock = None

    def _remove_if_unused(self) -> None:
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    # -- checks (read only) --

    def check(self, cfg, resume: bool, overwrite: bool) -> None:
        """Refuse a new run into a folder holding a run (unless overwrite), and a resume whose
        config contradicts the folder's config.yaml."""
        if resume:
            saved = resume_tree(self.path)
            differences = config_differences(saved, cfg.to_dict())
            if differences:
                raise _contradiction(self.path / "config.yaml", differences)
        elif holds_run(self.path) and not overwrite:
            try:
                tree = resume_tree(self.path)
                what = f" ({tree['model']['name']} on {tree['data']['name']})"
            except (RunFolderError, KeyError, TypeError):
                what = ""
            raise RunFolderError(f"{self.path}: already holds a run{what}; continue it with --resume, "
                                 "replace it with --overwrite, or choose another --out")

    def check_resume(self, cfg, fingerprint: dict) -> None:
        """Every seed's last.pt must match (see check_checkpoint) before anything is written."""
        for seed in cfg.train.seeds:
            last = self.path / f"seed_{seed}" / "last.pt"
            if last.is_file():
                check_checkpoint(load_checkpoint(last), last, cfg, seed, fingerprint)

    def _untrained(self) -> bool:
        """No seed folder holds a checkpoint, log or metrics, and there is no results.json."""
        return not (self.path / "results.json").exists() and not any(
            (p / name).exists() for p in _seed_dirs(self.path) for name in _EPOCH_FILES)

    def abandon(self) -> None:
        """A new run that failed before any epoch was saved (a setting found wrong only once the
        data and model exist): remove what it wrote, its seed folders and config.yaml, so the
        corrected command can use the folder. Only called after `check` found no run there (or
        `start` removed it with overwrite), so everything removed is this run's; a folder with a
        trained seed is left as it is."""
        if not self._untrained():
            return
        for path in _seed_dirs(self.path):
            shutil.rmtree(path)
        (self.path / "config.yaml").unlink(missing_ok=True)
        log.info("%s: removed the config.yaml and seed folders of this run, which saved no epoch", self.path)

    # -- writing starts here --

    def start(self, overwrite: bool) -> None:
        """Remove stale temp files of interrupted writes, the run's own only: beside its files
        and in its seed folders, not in other folders under it (a tune study's live trials); and,
        with overwrite, the old run."""
        places = [self.path.glob(".*.tmp"), *(seed.rglob(".*.tmp") for seed in _seed_dirs(self.path))]
        stale = [p for found in places for p in found if p.is_file()]
        for path in stale:
            path.unlink()
        if stale:
            log.info("%s: removed %d temporary files of interrupted writes", self.path, len(stale))
        if overwrite:
            for name in ("config.yaml", "results.json"):
                (self.path / name).unlink(missing_ok=True)
            for child in _seed_dirs(self.path):
                shutil.rmtree(child)
