"""The benchmarks' results files and where they go.

A benchmark writes its report (.json / .md) into `--out` (default `runs/benchmarks/<name>/`,
ignored by git). Only `--publish` writes into the committed `benchmarks/results/` (and the README
table where a script has one), and it refuses to replace a row by one with fewer seeds or fewer
epochs (`refuse_weaker`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "benchmarks" / "results"


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / name),
                        help="folder for this run's report and runs (default: %(default)s)")
    parser.add_argument("--publish", action="store_true",
                        help="write the report into benchmarks/results/ (and the README's table, if any); "
                             "refused if a row would be replaced by one with fewer seeds or epochs")


def results_dir(args: argparse.Namespace) -> Path:
    """benchmarks/results with --publish, else --out."""
    path = PUBLISHED if args.publish else Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _epochs(epochs: int | None) -> str:
    return "the configs' own epochs" if epochs is None else f"≤{epochs} epochs"


def refuse_weaker(where: str, old_seeds: int, old_epochs: int | None, new_seeds: int, new_epochs: int | None) -> None:
    """SystemExit when a published row (`old_*`) would be replaced by a weaker one: fewer seeds, or
    fewer epochs (an epoch cap of None = the config's own epochs, more than any cap)."""
    def cap(epochs: int | None) -> float:
        return math.inf if epochs is None else epochs

    if new_seeds < old_seeds or cap(new_epochs) < cap(old_epochs):
        raise SystemExit(
            f"--publish refused: {where} is published with {old_seeds} seeds, {_epochs(old_epochs)}; this "
            f"run has {new_seeds} seeds, {_epochs(new_epochs)}. Run without --publish (writes to --out), "
            "or with at least as many seeds and epochs"
        )


def update_json(path: Path, change: Callable[[dict], dict]) -> dict:
    """Re-read `path` ({} when absent), apply `change`, write the result back atomically and
    return it. Re-reading at every write lets benchmark processes that run side by side each add
    their own entries without losing the others'."""
    current = json.loads(path.read_text()) if path.is_file() else {}
    updated = change(current)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(updated, indent=2) + "\n")
    partial.replace(path)
    return updated


def measured_at() -> str:
    """'<short commit>[+dirty] (<UTC date and time>)' of the msakit checkout that is imported (its
    src/, configs/ and benchmarks/*.py, untracked files included: what a run depends on, not the
    reports --publish rewrites); 'unknown commit' when msakit is not imported from a git checkout's
    src/."""
    import msakit

    root = Path(msakit.__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return f"unknown commit ({stamp})"
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src", "configs", "benchmarks/*.py")
    except (OSError, subprocess.SubprocessError):
        return f"unknown commit ({stamp})"
    return f"{commit}{'+dirty' if dirty else ''} ({stamp})"
