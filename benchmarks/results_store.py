"""The benchmarks' results files (JSON under benchmarks/results/)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


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
