"""Checkpoints and result files, written atomically (temp file + rename) so that an interrupted
write never leaves a half file behind, and read with `weights_only=True` (no code execution)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def file_mode() -> int:
    """0o666 less the user's umask: the mode any other tool would create a file with."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class OutputError(OSError):
    """A result file could not be written (read-only or full disk, ...); the message names it.
    The file's previous version, if any, is untouched."""


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: a failure (a full disk, a
    read-only folder, an interrupt) leaves the previous file intact and no temp file behind."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, file_mode())  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports write failures as RuntimeError
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OutputError(getattr(e, "errno", None) or errno.EIO, f"{path}: cannot write ({reason})") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


class ArchiveRefused(ValueError):
    """A file `quiet_load` does not hand to torch.load (see `check_archive`)."""


def check_archive(path: str | Path) -> None:
    """Raise ArchiveRefused unless `path` is torch's zip format with stored (uncompressed) entries
    that fit in the file: what torch.save writes. torch.load would otherwise read torch's legacy
    format, which allocates each storage's declared size before reading its bytes (a 100 KB file
    asked for 4 GB), and inflate deflated entries (a 1 MB file unpacked to 1 GB)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise ArchiveRefused("not a complete zip archive, the format torch.save writes; msakit reads "
                             "no other") from None
    size = path.stat().st_size
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ArchiveRefused(f"entry {entry.filename!r} is compressed, which torch.save never writes")
    if sum(entry.file_size for entry in entries) > size:
        raise ArchiveRefused("its entries declare more bytes than the file holds")


def quiet_load(path: str | Path) -> Any:
    """torch.load(path, weights_only=True) onto the CPU after `check_archive`, without torch's
    warnings (a text file read as a pickle warns about its protocol before failing)."""
    check_archive(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure(error: Exception) -> str:
    """Why `torch.load(..., weights_only=True)` failed, in a few words: the weights-only reader's
    own reason ("Unsupported global: GLOBAL print was not an allowed global by default") without
    torch's surrounding advice (which suggests loading with weights_only=False), else the
    exception type and the first sentence of its message."""
    if isinstance(error, ArchiveRefused):
        return str(error)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if text.startswith("Weights only load failed"):
        advice = ("Weights only load failed", "weights_only", "Please file an issue", "Check the documentation")
        kept = []
        for line in text.splitlines():
            line = line.split("WeightsUnpickler error:", 1)[-1].strip()
            if line and not any(marker in line for marker in advice):
                kept.append(line)
        reason = " ".join(kept).split(" Please use", 1)[0].rstrip(".")
        return f"the weights-only reader refused it: {reason[:200] or 'not only tensors and plain data'}"
    # torch's other messages also go on with advice after their first sentence
    first = re.split(r"(?<=[a-z)])\.\s|\n", text.strip(), maxsplit=1)[0].rstrip(".")
    if len(first) > 200:
        first = first[:200].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check an msakit checkpoint (best.pt / last.pt) without building anything real.

    Checked before any model is built: the file reads with `weights_only=True`; it holds the
    keys and types msakit writes; its config builds (every value validated where declared); the
    model it declares, built on the meta device (no memory), has exactly the stored weights'
    names, shapes and dtypes, and declares no more bytes than the file holds (a tiny file cannot
    ask for a 10^6 x 10^6 layer, nor expand a zero-stride tensor); a resumable state's optimiser,
    RNG and bookkeeping entries fit that model. Raises CheckpointError (one line, naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a readable msakit checkpoint (the file is empty)")
    try:
        state = quiet_load(path)
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable msakit checkpoint (out of memory)") from None
    except Exception as e:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"{path}: not a readable msakit checkpoint ({load_failure(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an msakit checkpoint (format {CHECKPOINT_FORMAT})")
    check_checkpoint_state(state, path)
    return state


_RESUME_TYPES = {"epoch": int, "best_epoch": int, "bad_epochs": int, "history": list,
                 "optimizers": dict, "schedulers": dict, "rng": torch.Tensor, "best_state": dict}


def check_checkpoint_state(state: dict[str, Any], path: str | Path) -> None:
    """The checks of `load_checkpoint` on an already read state dict (see there)."""
    from msakit.config import ConfigError, build_config
    from msakit.data.base import DatasetInfo
    from msakit.train import loop  # the loop's model factory (tests substitute it)

    for key, kind in {"config": dict, "info": dict, "model": dict, "seed": int}.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: entry {key!r} is missing or not a {kind.__name__}")
    try:
        cfg = build_config(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config does not build ({e})") from None
    try:
        info = DatasetInfo.from_dict(state["info"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: its stored dataset info is malformed ({e})") from None
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = loop.create_model(cfg.model_name, cfg.model, info)
    except (ConfigError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config does not build a model ({e})") from None
    expected = model.state_dict()
    declared = sum(t.numel() * t.element_size() for t in expected.values())
    size = Path(path).stat().st_size
    if declared > size + 2**20:
        raise CheckpointError(
            f"{path}: its config declares {cfg.model_name} weights of {declared / 2**20:.1f} MiB "
            f"but the file holds {size / 2**20:.1f} MiB"
        )
    check_weights(state["model"], model, f"{path}: model")
    if "optimizers" in state:
        _check_resume_state(state, path, model, cfg, info)


def check_weights(saved: Any, module: torch.nn.Module, where: str) -> None:
    """`saved` must load into `module` (built on the meta device): a name -> tensor dict with
    exactly its names and dtypes, shapes it accepts (its own load hooks may resize buffers),
    each tensor backed by as many bytes as it claims (no zero-stride expansion)."""
    expected = module.state_dict()
    if not isinstance(saved, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in saved.items()
    ):
        raise CheckpointError(f"{where}: weights must map names to tensors")
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model its config builds "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in saved.items():
        _check_backed(tensor, f"{where}: weight {name!r}")
    wrong = [k for k, v in saved.items() if v.dtype != expected[k].dtype]
    if not wrong:
        try:
            with warnings.catch_warnings():  # "copying into a meta parameter is a no-op"
                warnings.simplefilter("ignore")
                module.load_state_dict(saved)  # on meta tensors: shapes checked, nothing copied
            return
        except (RuntimeError, ValueError, TypeError):
            wrong = [k for k, v in saved.items() if v.shape != expected[k].shape] or list(saved)[:1]
    name = wrong[0]
    raise CheckpointError(
        f"{where}: weight {name!r} is {tuple(saved[name].shape)} {saved[name].dtype}; the config "
        f"needs {tuple(expected[name].shape)} {expected[name].dtype}"
    )


def _check_backed(tensor: torch.Tensor, where: str) -> None:
    if tensor.numel() and tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
        raise CheckpointError(f"{where} claims more elements than its stored data (a strided view)")


def _check_resume_state(state: dict, path: Path, model, cfg, info) -> None:
    from msakit.train.loop import build_optimizers, build_schedulers, selection_rule

    for key, kind in _RESUME_TYPES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: resumable entry {key!r} is missing or not a {kind.__name__}")
    value = state.get("best_value")
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise CheckpointError(f"{path}: resumable entry 'best_value' is not a number")
    if min(state["epoch"], state["bad_epochs"]) < 0 or not all(isinstance(r, dict) for r in state["history"]):
        raise CheckpointError(f"{path}: resumable bookkeeping (epoch, bad_epochs, history) is malformed")
    rng = torch.get_rng_state()
    if state["rng"].dtype != rng.dtype or state["rng"].shape != rng.shape:
        raise CheckpointError(f"{path}: entry 'rng' is not a CPU random-generator state")
    _check_backed(state["rng"], f"{path}: entry 'rng'")
    check_weights(state["best_state"], model, f"{path}: best_state")
    optimizers = build_optimizers(model, cfg)
    if set(state["optimizers"]) != set(optimizers):
        raise CheckpointError(
            f"{path}: optimisers {sorted(state['optimizers'])} do not match the model's {sorted(optimizers)}"
        )
    for name, optimizer in optimizers.items():
        saved = state["optimizers"][name]
        slots = saved.get("state") if isinstance(saved, dict) else None
        for tensor in (v for group in (slots or {}).values() if isinstance(group, dict) for v in group.values()):
            if isinstance(tensor, torch.Tensor):
                _check_backed(tensor, f"{path}: optimiser {name!r} state")
        try:
            optimizer.load_state_dict(saved)  # on meta parameters: checks groups, allocates nothing
        except Exception as e:  # torch raises ValueError / KeyError / TypeError on bad states
            raise CheckpointError(f"{path}: optimiser {name!r} state does not fit the model ({e})") from None
        params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        for param, slots in optimizer.state.items():
            for slot, tensor in slots.items():
                if isinstance(tensor, torch.Tensor) and tensor.dim() and (
                    id(param) not in params or tensor.shape != param.shape
                ):
                    raise CheckpointError(f"{path}: optimiser {name!r} slot {slot!r} does not fit its parameter")
    schedulers = build_schedulers(optimizers, cfg, selection_rule(cfg, info)[1])
    if set(state["schedulers"]) != set(schedulers):
        raise CheckpointError(f"{path}: schedulers {sorted(state['schedulers'])} do not match the config's")
    for name, scheduler in schedulers.items():
        fresh, saved = scheduler.state_dict(), state["schedulers"][name]
        if not isinstance(saved, dict) or set(saved) != set(fresh) or any(
            fresh[k] is not None and not isinstance(saved[k], (int, float) if isinstance(fresh[k], (int, float)) else type(fresh[k]))
            for k in fresh
        ):
            raise CheckpointError(f"{path}: scheduler {name!r} state is malformed")


def _json_safe(value: Any) -> Any:
    """NaN/inf become null so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(data: Any, path: str | Path) -> None:
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def write_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))
