"""The compiled LSTM recurrence (`lstm_kernel.cpp`): built on first use, None where it cannot be.

`get()` returns the extension module (functions `forward(acts, w_hh)` and `backward(grad_hidden,
acts, cells, tanh_cells, w_hh)`, layout in the .cpp file; `row_ranges(B)` and `parallel`, see
Threads below) or None, in which case
`encoders._Recurrence` runs its Python loop (same arithmetic). It is built once per machine
with `torch.utils.cpp_extension.load` (g++ and ninja; about a minute on 2 cores, logged) into
`<$MSAKIT_KERNEL_DIR or ~/.cache/msakit/kernels>/<torch version>-<CPU capability>-<hash>`
(`build_directory`), one process at a time (an flock); later processes load the built file
(under a second); a build that no longer loads is rebuilt once. `MSAKIT_LSTM_KERNEL=0` turns it off.
Any failure to build or load (no compiler, read-only cache, a BLAS symbol missing from an
unusual torch build) is logged once and the Python loop is used.

Why compiled code: the recurrence is T dependent steps, each one small matrix product and a
dozen elementwise kernels; at the sizes of MSA models (B = 32-64, H = 32-128) those kernels
cost their Python and dispatch overhead, not their arithmetic. No library runs a packed LSTM's
training step fused on CPU (nn.LSTM's oneDNN path runs over the padding and computes the
gradient of the input, which is data here). Measured at commit time, before the row split below
(forward + backward of the recurrence, 2 threads, 7 alternating rounds): B = 64, T = 50, H = 128
(LMF) 21.6 vs 32.7 ms; B = 32, T = 50, H = 32 (TFN) 2.6 vs 8.0 ms (remeasured at 05a4e99: 2.5
vs 9.0 and 22.4 vs 34.4).

Threads: the B sequences are independent, so with n torch threads the batch is split into
min(n, B // 8) row ranges (`row_ranges(B)`), each running all T steps with sequential products on
its own OpenMP thread: no synchronisation between steps. Measured when added (same benchmark,
alternating rounds, medians, split vs one range vs Python): LMF 19.1 vs 22.5 vs 35.9 ms; TFN 1.5
vs 1.7 vs 7.0 ms; TFN at B = 128 5.6 vs 7.7 vs 18.8 ms; a reviewer's two reruns (9 rounds): LMF
17.8-19.4 vs 19.9-22.7 vs 30.9-34.7, TFN 1.9-2.4 vs 2.1-2.7 vs 8.1-9.7, B = 128 4.9-6.1 vs
6.6-7.9 vs 15.5-17.8. Inside training 2-10% of an epoch (TFN at batch 32: within this machine's
noise). With more torch threads than cores (4 on 2) TFN's sizes ran 0.83-0.90x as fast as with
one range. The results equal one range's (tested to 1e-12 in float64; bitwise in float32 at every
size timed). The split needs the extension built with -fopenmp and linked against the OpenMP
runtime libtorch_cpu itself uses (`_openmp`); elsewhere the batch is one range and MKL splits
each product.
Per-step products below 2^20 multiply-adds (TFN's, not LMF's) run on the calling thread where
torch's BLAS is MKL (its thread-local count, put back after): MKL splits them over 2 threads, and
how much that synchronisation costs depends on the machine's state. Inside TFN's training, 2
threads: in one state the kernel's forward took 1.09 ms with 2 threads against 0.63 ms with 1;
paired against the previous kernel in other states, forward 0.64 vs 0.73 and 0.61-0.65 vs
0.63-0.73 ms, backward 0.42-0.47 vs 0.44-0.50 ms a batch (small, never slower).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lstm_kernel.cpp")
#: torch's CPU library: its BLAS (MKL's service functions) and its OpenMP runtime
TORCH_CPU_LIBRARY = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def get() -> ModuleType | None:
    """The compiled recurrence, built on the first call of the process; None when
    `MSAKIT_LSTM_KERNEL=0` or when it cannot be built or loaded (logged once)."""
    if os.environ.get("MSAKIT_LSTM_KERNEL", "1") == "0":
        return None
    if "module" in _state:  # every LSTM forward asks: no lock once decided
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def build_directory() -> Path:
    """Where the extension is built: <$MSAKIT_KERNEL_DIR, else ~/.cache/msakit/kernels>/<torch
    version>-<CPU capability>-<hash of the source and flags>: one build per torch version,
    instruction set and kernel version (checkouts with another lstm_kernel.cpp never share one)."""
    root = os.environ.get("MSAKIT_KERNEL_DIR") or Path.home() / ".cache" / "msakit" / "kernels"
    # and of what else build.ninja names (torch's and Python's headers): a directory whose
    # build.ninja changed would be rebuilt, silently, by the next process that uses it
    context = [*_flags(), *_openmp()[1], str(Path(torch.__file__).parent), sysconfig.get_paths()["include"],
               sys.version]
    digest = hashlib.sha256(SOURCE.read_bytes() + "\n".join(context).encode()).hexdigest()[:12]
    tag = f"{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-{digest}".replace("+", "_")
    return Path(root) / tag


def _flags() -> list[str]:
    """-ffast-math makes GCC call glibc's vector exp/tanh; on x86 it also turns divisions into
    reciprocal estimates (rcpps + a Newton step: 1 / (1 + inf) gave NaN, so sigmoid(x < -88) was
    NaN in float32), which -mno-recip turns off."""
    flags = ["-O3", "-ffast-math"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mno-recip")
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma"]
    return flags + list(_openmp()[0])


@functools.cache
def _openmp() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile flags, link flags) that let the kernel's at::parallel_for run on torch's own
    OpenMP threads: `openmp_flags` for the runtime libtorch_cpu itself uses (`torch_openmp_runtime`);
    ((), ()) where torch has no OpenMP or that runtime cannot be found."""
    if not torch.backends.openmp.is_available():
        return (), ()
    return openmp_flags(torch_openmp_runtime(), _is_clang)


def torch_openmp_runtime() -> str | None:
    """Path of the OpenMP library whose `omp_get_max_threads` libtorch_cpu resolves (looked up
    in libtorch_cpu's own dependency scope, then `dladdr`), or None (no libtorch_cpu.so, a libc
    without dladdr, symbol absent). Not a scan of the mapped libraries: other packages bring their
    own runtimes (scikit-learn's libgomp-*.so), and which of them comes first depends on import
    order."""
    import ctypes
    import ctypes.util

    class _DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    try:
        symbol = ctypes.cast(ctypes.CDLL(str(TORCH_CPU_LIBRARY)).omp_get_max_threads, ctypes.c_void_p)
        libc = ctypes.CDLL(None)
        dladdr = libc.dladdr if hasattr(libc, "dladdr") else ctypes.CDLL(ctypes.util.find_library("dl")).dladdr
    except (OSError, AttributeError, TypeError):
        return None
    info = _DlInfo()
    if not dladdr(symbol, ctypes.byref(info)) or not info.fname:
        return None
    return os.fsdecode(info.fname)


def openmp_flags(runtime: str | None, is_clang: Callable[[], bool]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-fopenmp and `runtime` linked by its path, so that the loader reuses that library (same
    soname) instead of starting a second runtime with its own threads. ((), ()) without a
    runtime, for one that is not GNU's (libgomp*), LLVM's (libomp*) or Intel's (libiomp5*; both
    also export GNU's GOMP_* entry points), and for GNU's when `is_clang()` (clang's -fopenmp
    calls __kmpc_*, which libgomp lacks)."""
    name = Path(runtime).name if runtime else ""
    if not name.startswith(("libgomp", "libomp", "libiomp5")) or (name.startswith("libgomp") and is_clang()):
        return (), ()
    return ("-fopenmp",), (runtime,)


def _is_clang() -> bool:
    """Whether the build's compiler is clang (its version banner says so)."""
    try:
        banner = subprocess.run([*_compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in banner.lower()


@contextlib.contextmanager
def _exclusive(path: Path):
    """One process at a time in the build directory: an flock, which the OS releases when its
    holder dies (torch's own `lock` file stays behind after a killed build, and torch then
    waits for it forever). No-op where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compiler() -> list[str]:
    return (os.environ.get("CXX") or "c++").split()  # CXX may be "ccache g++"


def has_compiler() -> bool:
    """Whether the C++ compiler the build uses ($CXX's first word, else c++) is on PATH."""
    compiler = _compiler()
    return bool(compiler) and shutil.which(compiler[0]) is not None


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    path = os.environ.get("PATH")
    try:
        if not has_compiler():
            raise RuntimeError(f"no C++ compiler: {' '.join(_compiler())!r} is not on PATH")
        flags, directory = _flags(), build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        if shutil.which("ninja") is None:
            import ninja  # the PyPI wheel; its binary is not always on PATH (pyenv shims)

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + (path or "")  # for the build only
        with _exclusive(directory / "msakit.lock"):
            # under the flock nobody else builds here: a torch `lock` is a killed build's
            (directory / "lock").unlink(missing_ok=True)
            for attempt in (1, 2):
                built = any(directory.glob("*.so"))
                if not built:
                    log.info("building the compiled LSTM recurrence (once per machine, about a "
                             "minute) in %s", directory)
                start = time.perf_counter()
                # compiled from a copy in the (hash-named) directory, not from this checkout's
                # path: another checkout or environment with the same kernel reuses the build
                source = directory / SOURCE.name
                if not source.exists():
                    shutil.copyfile(SOURCE, source.with_suffix(".tmp"))
                    os.replace(source.with_suffix(".tmp"), source)
                try:
                    module = cpp_extension.load("msakit_lstm", [str(source)], extra_cflags=flags,
                                                extra_ldflags=list(_openmp()[1]), build_directory=str(directory),
                                                verbose=False)
                except ImportError as error:
                    if attempt == 2:
                        raise
                    # a damaged .so that ninja takes for up to date: rebuild from nothing
                    log.warning("compiled LSTM recurrence in %s did not load (%s); rebuilding it",
                                directory, _first_line(error))
                    for entry in directory.iterdir():
                        if entry.is_dir():
                            shutil.rmtree(entry)
                        elif entry.name != "msakit.lock":
                            entry.unlink()
                    # torch builds a name only once per process; forget it so that it builds again
                    cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop("msakit_lstm", None)
                    continue
                if not built:
                    log.info("compiled LSTM recurrence built in %.0f s", time.perf_counter() - start)
                return module
    except Exception as error:  # any failure means: run the Python loop
        log.warning("compiled LSTM recurrence unavailable (%s: %s); using the Python loop "
                    "(same results, slower on CPU)", type(error).__name__, _first_line(error))
        return None
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
