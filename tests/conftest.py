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
    # the compiled LSTM recurrence: built once beside pytest's temporary folders (kept across
    # sessions; ~1 minute the first time), now rather than inside some test's time limit
    kernels = os.environ.get("MSAKIT_KERNEL_DIR")
    os.environ.setdefault("MSAKIT_KERNEL_DIR", str(tmp_path_factory.getbasetemp().parent / "msakit-kernels"))
    from msakit.modules import lstm_kernel

    lstm_kernel.get()
    yield
    for name, value in (("MSAKIT_CACHE", previous), ("MSAKIT_KERNEL_DIR", kernels)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(params=["python", "compiled"])
def recurrence(request, monkeypatch):
    """Runs a test once with the LSTM recurrence's Python loop and once with the compiled one
    (`msakit.modules.lstm_kernel`); the compiled run fails where g++ exists but it did not build."""
    import os

    from msakit.modules import lstm_kernel

    if request.param == "python":
        monkeypatch.setattr(lstm_kernel, "get", lambda: None)
    elif lstm_kernel.get() is None:
        if os.environ.get("MSAKIT_LSTM_KERNEL") == "0":
            pytest.skip("MSAKIT_LSTM_KERNEL=0 turns the compiled LSTM recurrence off")
        if lstm_kernel.has_compiler():
            pytest.fail("a C++ compiler is here but the compiled LSTM recurrence did not build (see the log)")
        pytest.skip("no C++ compiler: the compiled LSTM recurrence cannot be built")
    return request.param
