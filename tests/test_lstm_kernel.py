"""The compiled LSTM recurrence (`msakit.modules.lstm_kernel`): the same numbers as the Python
loop, used by default on CPU, and a clean fallback wherever it cannot be built."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from msakit.modules import encoders, lstm_kernel


def _inputs(batch, steps, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    real = torch.arange(steps)[:, None] < lengths[None, :]
    t, b = real.nonzero(as_tuple=True)
    projected = torch.randn(len(t), 4 * hidden, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(4 * hidden, generator=g, dtype=dtype).requires_grad_()
    w_hh = (torch.randn(4 * hidden, hidden, generator=g, dtype=dtype) * 0.3).requires_grad_()
    grad = torch.randn(steps, batch, hidden, generator=g, dtype=dtype)
    return (projected, t * batch + b, bias, w_hh, steps, batch), grad


def _run(args, grad):
    out = encoders._Recurrence.apply(*args)
    return out, torch.autograd.grad(out, (args[0], args[2], args[3]), grad)


def _compiled():
    module = lstm_kernel.get()
    if module is None:
        pytest.skip("the compiled LSTM recurrence is not available here")
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "steps", "hidden"), [(16, 12, 32), (3, 7, 5), (1, 1, 8)])
def test_compiled_recurrence_equals_the_python_loop(monkeypatch, dtype, batch, steps, hidden):
    """Outputs and the gradients of projected, bias and W_hh equal the Python loop's (float64 to
    1e-10, float32 to rounding), at sizes whose H is and is not a multiple of the vector width."""
    _compiled()
    args, grad = _inputs(batch, steps, hidden, dtype)
    out, grads = _run(args, grad)
    monkeypatch.setattr(lstm_kernel, "get", lambda: None)
    ref_out, ref_grads = _run(args, grad)
    tol = {"atol": 1e-10, "rtol": 0} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("batch", [32, 33, 64, 24, 17, 16, 15])
def test_rows_split_over_threads_give_the_one_thread_numbers(batch):
    """With 2 torch threads a batch of >= 16 sequences is split into 2 row ranges (>= 8 rows
    each), run on 2 different threads, each range all T steps; outputs and gradients equal those
    of 1 thread (one range) to 1e-12 in float64, also with uneven ranges (B = 17, 33) and B = 15
    (not split)."""
    module = _compiled()
    if lstm_kernel._openmp()[0]:  # built with torch's OpenMP runtime: the split must be on
        assert module.parallel
    args, grad = _inputs(batch, 9, 8, torch.float64, seed=batch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ranges, ran_on = module.row_ranges(batch), module.range_threads(batch)
        out, grads = _run(args, grad)
        torch.set_num_threads(1)
        assert module.row_ranges(batch) == 1 and module.range_threads(batch) == [0]
        ref_out, ref_grads = _run(args, grad)
    finally:
        torch.set_num_threads(threads)
    if module.parallel:
        assert ranges == min(2, batch // 8) and sorted(ran_on) == list(range(ranges))
    for got, want in zip((out, *grads), (ref_out, *ref_grads), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_the_kernel_is_built_with_torchs_own_openmp_runtime(monkeypatch):
    """-fopenmp and the runtime libtorch_cpu itself uses, linked by its path (the loader then
    reuses it: one set of OpenMP threads), even when another package's runtime (scikit-learn's)
    was mapped first; nothing for clang with GNU's runtime or for an unknown runtime; the build
    directory changes with the flags."""
    import sklearn.metrics  # noqa: F401  (maps scikit-learn's own libgomp-*.so)

    gomp, iomp = "/site/torch/lib/libgomp-a34b3233.so.1", "/opt/intel/lib/libiomp5.so"
    assert lstm_kernel.openmp_flags(gomp, lambda: False) == (("-fopenmp",), (gomp,))
    assert lstm_kernel.openmp_flags(gomp, lambda: True) == ((), ())
    assert lstm_kernel.openmp_flags(iomp, lambda: True) == (("-fopenmp",), (iomp,))
    assert lstm_kernel.openmp_flags("/usr/lib/libc.so.6", lambda: False) == ((), ())
    assert lstm_kernel.openmp_flags(None, lambda: False) == ((), ())
    runtime = lstm_kernel.torch_openmp_runtime()
    if platform.system() == "Linux" and torch.backends.openmp.is_available() and shutil.which("ldd"):
        listing = subprocess.run(["ldd", str(lstm_kernel.TORCH_CPU_LIBRARY)], capture_output=True,
                                 text=True).stdout
        linked = {line.split("=>")[-1].split("(")[0].strip() for line in listing.splitlines()
                  if "omp" in line.split("=>")[0]}
        assert runtime is not None and Path(runtime).resolve() in {Path(p).resolve() for p in linked}
    directory = lstm_kernel.build_directory()
    monkeypatch.setattr(lstm_kernel, "_openmp", lambda: ((), ()))
    assert lstm_kernel.build_directory() != directory


def test_the_encoder_runs_the_compiled_loops_forward_and_backward(monkeypatch):
    """On CPU in float32 both directions go through the kernel (a refactor that dropped it would
    pass every equality test); half precision and B = 0 take the Python loop."""
    module = _compiled()
    calls = []

    class Spy:
        def forward(self, *a):
            calls.append("forward")
            return module.forward(*a)

        def backward(self, *a):
            calls.append("backward")
            return module.backward(*a)

    monkeypatch.setattr(lstm_kernel, "get", lambda: Spy())
    torch.manual_seed(0)
    encoder = encoders.LSTMEncoder(6, 4, 3, dropout=0.0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    encoder(torch.randn(2, 4, 6), mask).sum().backward()
    assert calls == ["forward", "backward"]
    calls.clear()
    encoder(torch.randn(0, 4, 6), mask[:0]).sum()
    encoder.to(torch.bfloat16)(torch.randn(2, 4, 6, dtype=torch.bfloat16), mask).sum().backward()
    assert calls == []


def _mkl():
    """libtorch_cpu's MKL service functions (thread-local count), or None where torch's BLAS is
    not MKL."""
    import ctypes

    library = ctypes.CDLL(str(lstm_kernel.TORCH_CPU_LIBRARY))
    return library if hasattr(library, "MKL_Set_Num_Threads_Local") else None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("batch", "hidden"), [(32, 32), (64, 128)])
def test_small_products_leave_mkls_thread_count_as_it_was(batch, hidden, threads):
    """The kernel runs small per-step products on the calling thread (MKL's thread-local count set
    to 1) and puts back the count the thread had, with 1 torch thread and with 2 (the batch split
    into row ranges): a leak would make every later product of the training step
    single-threaded. The count set before the call (2) is the one found after."""
    module = _compiled()
    mkl = _mkl()
    if mkl is None:
        pytest.skip("torch's BLAS here is not MKL")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    # tensors first: torch's first operation on a thread resets that thread's MKL count
    acts = torch.randn(5, batch, 4 * hidden)
    w_hh = torch.randn(4 * hidden, hidden) * 0.1
    previous = mkl.MKL_Set_Num_Threads_Local(2)
    try:
        cells, tanh_cells, _ = module.forward(acts, w_hh)
        assert mkl.MKL_Get_Max_Threads() == 2
        module.backward(torch.randn(5, batch, hidden), acts, cells, tanh_cells, w_hh)
        assert mkl.MKL_Set_Num_Threads_Local(2) == 2  # returns the thread's count before the call
        with pytest.raises(RuntimeError, match="must be"):  # refused before the count is touched
            module.backward(torch.randn(5, batch, hidden), acts, cells[:1], tanh_cells, w_hh)
        assert mkl.MKL_Set_Num_Threads_Local(2) == 2
    finally:
        mkl.MKL_Set_Num_Threads_Local(previous)
        torch.set_num_threads(saved_threads)


def test_backward_refuses_states_of_the_wrong_shape_or_dtype():
    """Direct calls with mismatched saved states get a RuntimeError, not an out-of-bounds read."""
    module = _compiled()
    acts = torch.randn(4, 3, 8)
    w_hh = torch.randn(8, 2)
    cells, tanh_cells, _ = module.forward(acts, w_hh)
    grad = torch.randn(4, 3, 2)
    module.backward(grad, acts, cells, tanh_cells, w_hh)  # the right ones pass
    for bad in ((grad[:1], acts, cells, tanh_cells), (grad, acts, cells[:1], tanh_cells),
                (grad, acts, cells, tanh_cells.double()), (grad, acts, cells.double(), tanh_cells),
                (grad, acts, cells.transpose(1, 2).contiguous().transpose(1, 2), tanh_cells),
                (grad[:0], acts[:0], cells[:1], tanh_cells[:0])):
        with pytest.raises(RuntimeError, match="lstm_kernel"):
            module.backward(*bad, w_hh)


def test_nan_and_inf_propagate_and_the_process_keeps_subnormal_numbers():
    """-ffast-math is a compile flag only: a NaN input gives NaN states (not a silently finite
    number), saturated gates give exact limits, and loading the kernel did not switch the
    process to flush-to-zero."""
    _compiled()
    args, grad = _inputs(2, 3, 8, torch.float32)
    projected = args[0].detach().clone()
    projected[0, 0] = float("nan")
    out = encoders._Recurrence.apply(projected, *args[1:])
    assert torch.isnan(out[:, 0]).any() and torch.isfinite(out[:, 1]).all()
    projected = torch.full_like(projected, 1e4)  # every gate saturated: i = f = o = 1, g = 1
    out = encoders._Recurrence.apply(projected, *args[1:])
    assert torch.isfinite(out).all()
    tiny = np.float32(1e-39)
    assert tiny * np.float32(1.0) != 0 and float(torch.tensor([1e-39]) * 1.0) != 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_and_infinite_gates_give_the_python_loops_numbers(monkeypatch, dtype):
    """Gate pre-activations far beyond exp's range (+-89, +-1000, +-inf in float32; +-710 and
    +-1e4 in float64), as unstandardised features give: the compiled sigmoid and tanh saturate
    like torch's (GCC's reciprocal estimate once turned sigmoid(-89) into NaN in float32)."""
    _compiled()
    values = [-float("inf"), -1e4, -1000.0, -710.0, -100.0, -89.0, -88.0, -20.0, 0.0, 20.0, 88.0,
              89.0, 100.0, 710.0, 1000.0, 1e4, float("inf")]
    hidden, steps = len(values), 3
    projected = torch.tensor(values, dtype=dtype).repeat(4 * steps, 1).t().reshape(hidden, 4, steps)
    projected = projected.permute(2, 1, 0).reshape(steps, 4 * hidden)  # every gate sees every value
    args = (projected.requires_grad_(), torch.arange(steps), torch.zeros(4 * hidden, dtype=dtype,
            requires_grad=True), torch.zeros(4 * hidden, hidden, dtype=dtype, requires_grad=True),
            steps, 1)
    grad = torch.ones(steps, 1, hidden, dtype=dtype)
    out, grads = _run(args, grad)
    monkeypatch.setattr(lstm_kernel, "get", lambda: None)
    ref_out, ref_grads = _run(args, grad)
    assert torch.isfinite(ref_out).all()
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, equal_nan=True)


def _fresh_build(monkeypatch, tmp_path, load):
    from torch.utils import cpp_extension

    monkeypatch.setattr(lstm_kernel, "_state", {})
    monkeypatch.setenv("MSAKIT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", load)


def test_a_failed_build_logs_once_and_the_python_loop_trains(monkeypatch, tmp_path, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'msakit_lstm'\nc++: not found")

    _fresh_build(monkeypatch, tmp_path, no_compiler)
    with caplog.at_level(logging.WARNING, logger=lstm_kernel.__name__):
        assert lstm_kernel.get() is None and lstm_kernel.get() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "(RuntimeError: Error building extension 'msakit_lstm'); using the Python loop" in warnings[0]
    encoder = encoders.LSTMEncoder(3, 2, 1, dropout=0.0)
    encoder(torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.bool)).sum().backward()
    assert encoder.lstm.weight_hh_l0.grad.abs().sum() > 0


def test_the_switch_turns_it_off_without_building(monkeypatch, tmp_path):
    def must_not_build(*args, **kwargs):
        raise AssertionError("built although MSAKIT_LSTM_KERNEL=0")

    _fresh_build(monkeypatch, tmp_path, must_not_build)
    monkeypatch.setenv("MSAKIT_LSTM_KERNEL", "0")
    assert lstm_kernel.get() is None


def test_a_killed_builds_lock_is_cleared_and_builds_take_turns(monkeypatch, tmp_path):
    """torch waits forever on the `lock` a killed build left: under msakit's flock (released by
    the OS when its holder dies) nobody else is building, so that file goes; while another
    process holds the flock, get() waits. The build goes to <dir>/<torch>-<CPU>-<hash>."""
    import fcntl
    import threading

    seen = {}

    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        seen.update(name=name, directory=build_directory, flags=extra_cflags, lock=(
            Path(build_directory) / "lock").exists())
        return "module"

    _fresh_build(monkeypatch, tmp_path, load)
    directory = lstm_kernel.build_directory()
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    holder = open(directory / "msakit.lock", "a")  # released below
    fcntl.flock(holder, fcntl.LOCK_EX)
    result = []
    worker = threading.Thread(target=lambda: result.append(lstm_kernel.get()))
    worker.start()
    time.sleep(0.5)
    assert seen == {} and worker.is_alive()  # waiting for the holder
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    worker.join(10)
    assert result == ["module"] and seen["lock"] is False
    assert seen["directory"] == str(directory) and seen["name"] == "msakit_lstm"
    assert directory.parent == tmp_path
    assert directory.name.startswith(torch.__version__.replace("+", "_"))
    assert "-ffast-math" in seen["flags"] and "-O3" in seen["flags"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "-mno-recip" in seen["flags"]


def test_the_build_directory_changes_with_the_source(monkeypatch, tmp_path):
    """Two checkouts with different kernels never load each other's build."""
    monkeypatch.setenv("MSAKIT_KERNEL_DIR", str(tmp_path))
    first = lstm_kernel.build_directory()
    other = tmp_path / "other.cpp"
    other.write_text(lstm_kernel.SOURCE.read_text() + "// changed\n")
    monkeypatch.setattr(lstm_kernel, "SOURCE", other)
    assert lstm_kernel.build_directory() != first


def test_a_build_that_does_not_load_is_rebuilt_once(monkeypatch, tmp_path, caplog):
    """A damaged .so that ninja takes for up to date: the directory is emptied and built again;
    a second failure falls back to the Python loop."""
    from torch.utils import cpp_extension

    calls = []
    versions = cpp_extension.JIT_EXTENSION_VERSIONER.entries

    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        # torch builds a name once per process: a kept entry would only re-import the junk
        assert len(calls) == 0 or name not in versions
        versions[name] = "built in this process"
        calls.append(sorted(p.name for p in Path(build_directory).iterdir()))
        if len(calls) == 1 or fail_again:
            raise ImportError("msakit_lstm.so: invalid ELF header")
        return "module"

    monkeypatch.setattr(cpp_extension.JIT_EXTENSION_VERSIONER, "entries", dict(versions))
    versions = cpp_extension.JIT_EXTENSION_VERSIONER.entries
    for fail_again, expected in ((False, "module"), (True, None)):
        calls.clear()
        _fresh_build(monkeypatch, tmp_path / str(fail_again), load)
        directory = lstm_kernel.build_directory()
        directory.mkdir(parents=True)
        (directory / "msakit_lstm.so").write_bytes(b"junk")
        with caplog.at_level(logging.WARNING, logger=lstm_kernel.__name__):
            assert lstm_kernel.get() == expected
        # each build from the source's copy in the directory, the second from a fresh copy
        assert calls == [["lstm_kernel.cpp", "msakit.lock", "msakit_lstm.so"], ["lstm_kernel.cpp", "msakit.lock"]]
        assert "did not load (msakit_lstm.so: invalid ELF header); rebuilding it" in caplog.text


def test_another_checkout_with_the_same_kernel_reuses_the_build(monkeypatch, tmp_path):
    """The extension is compiled from a copy of the source inside its (hash-named) directory, so
    build.ninja does not name this checkout (another checkout would rebuild it, ~1 minute)."""
    seen = []

    def load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        seen.append(sources)
        return "module"

    _fresh_build(monkeypatch, tmp_path, load)
    assert lstm_kernel.get() == "module"
    directory = lstm_kernel.build_directory()
    assert seen == [[str(directory / "lstm_kernel.cpp")]]
    assert (directory / "lstm_kernel.cpp").read_bytes() == lstm_kernel.SOURCE.read_bytes()


def test_no_compiler_is_said_in_one_line_and_path_is_left_as_it_was(monkeypatch, tmp_path, caplog):
    def must_not_build(*args, **kwargs):
        raise AssertionError("load called without a compiler")

    _fresh_build(monkeypatch, tmp_path, must_not_build)
    monkeypatch.setenv("CXX", "no-such-compiler-here -O2")
    path = os.environ["PATH"]
    with caplog.at_level(logging.WARNING, logger=lstm_kernel.__name__):
        assert lstm_kernel.get() is None
    assert "(RuntimeError: no C++ compiler: 'no-such-compiler-here -O2' is not on PATH)" in caplog.text
    assert os.environ["PATH"] == path
    # a launcher in front of the compiler is fine
    _fresh_build(monkeypatch, tmp_path, lambda *a, **k: "module")
    monkeypatch.setenv("CXX", "env c++")
    assert lstm_kernel.get() == "module"
