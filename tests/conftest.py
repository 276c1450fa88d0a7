"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Path to the real data folder `../shared/data` (relative to the repository root); skips
    the test when the folder is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip("../shared/data not found: real-data tests need the shared data folder")
    return SHARED_DATA_DIR


@pytest.fixture(autouse=True, scope="session")
def _single_thread_and_private_cache(tmp_path_factory):
    """Tests run on one torch thread (2-core CI) and never write into the user's cache."""
    import os

    import torch

    torch.set_num_threads(1)
    previous = os.environ.get("MSAKIT_CACHE")
    os.environ["MSAKIT_CACHE"] = str(tmp_path_factory.mktemp("msakit-cache"))
    yield
    if previous is None:
        os.environ.pop("MSAKIT_CACHE", None)
    else:
        os.environ["MSAKIT_CACHE"] = previous
