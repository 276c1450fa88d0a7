"""The batches of one gradient-accumulation window run at once, in threads (`train.window_threads`).

With `train.grad_accumulation = K` the K batches of a window are independent until the optimiser
step: each one's gradient depends only on the parameters, which do not change inside the window.
On a CPU of few cores, small models use the intra-op threads poorly (MulT with MMSA's mosi
config, batch 16, 16 training batches in-process: 1 intra-op thread 8.0 s, 2 threads 6.1 s, 2
batches at once with 1 thread each 4.6-5.2 s). `ConcurrentWindows` runs a window's batches in
`window_threads` worker threads (at most get_num_threads()), each with get_num_threads() //
workers intra-op threads (autograd runs a CPU graph's backward on the thread that asks for it),
and sums the gradients into `.grad` in batch order afterwards, as sequential accumulation would:
the arithmetic of that sum is the same, whatever order the threads finish in.

Randomness: threads drawing from the one global generator would race for it. Each batch gets its
own generator, seeded from the global generator in batch order before the threads start, and
`msakit.modules.dropout.keep_mask` draws from it (`dropout.batch_generator`). A run is therefore
reproducible from its seed for any number of threads (with one intra-op thread per worker the
gradients are bit-identical for 1 and 2 workers; tests/test_window.py), but its dropout masks
are other numbers than a `window_threads = 1` run's.

Only models that declare `concurrent_batches = True` run this way: their forward changes no module
state and draws randomness only through `dropout.keep_mask`. That is checked after every window:
a changed state of a global generator (torch, numpy, random) or a written or reassigned buffer
or parameter raises. CPU only (GPU kernels are not limited by per-kernel costs on two cores:
elsewhere, and under torchrun, the batches run one by one), the default training step, precision
32 or bf16 (no gradient scaler), no `train.compile`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch
from torch import nn

from msakit.batch import Batch, ModelOutput
from msakit.modules import dropout

log = logging.getLogger(__name__)


class WindowError(ValueError):
    """The run or the model cannot use `train.window_threads` (the loop reports it in one line;
    anything else a batch raises reaches the caller as it is)."""


class ConcurrentWindows:
    """Collects a window's batches and runs them at once when the last one arrives.

    `check(out, (epoch, step))` returns a batch's output with float32 loss terms, or raises
    (the loop's `checked_losses`; what it raises reaches the caller). Make with `create`;
    `close()` stops the threads.
    """

    def __init__(self, model: nn.Module, threads: int, autocast: Callable, check: Callable):
        self.model, self.threads, self.autocast, self.check = model, threads, autocast, check
        # never more busy threads than torch may use (train.num_threads, OMP_NUM_THREADS): fewer
        # workers change no number, the batches' generators and the order of the sum stay
        budget = torch.get_num_threads()
        workers = min(threads, budget)
        self.intra_threads = max(1, budget // workers)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="msakit-window")
        self.pending: list[tuple[Batch, tuple[int, int]]] = []

    @classmethod
    def create(cls, model: nn.Module, model_name: str, train_cfg, device: torch.device,
               distributed: bool, autocast: Callable, check: Callable) -> ConcurrentWindows | None:
        """None for `train.window_threads = 1` and, with a log line, where nothing would run at
        once: on a GPU, under torchrun, with `train.grad_accumulation = 1` (a config made for CPU
        runs elsewhere, or with other options that do not need it, unchanged); raises WindowError
        naming the reason when the model or the training options cannot run this way."""
        if train_cfg.window_threads == 1:
            return None
        if device.type != "cpu" or distributed or train_cfg.grad_accumulation == 1:
            where = ("with train.grad_accumulation=1" if train_cfg.grad_accumulation == 1
                     else f"on {device.type}{' under torchrun' if distributed else ''}")
            log.info("train.window_threads is for one CPU process with train.grad_accumulation > 1; "
                     "the batches run one by one %s", where)
            return None
        reason = None
        if not getattr(model, "concurrent_batches", False):
            reason = (f"model {model_name!r} does not declare concurrent_batches (its forward may "
                      "change module state or draw from the global random generator)")
        elif hasattr(model, "training_step") or hasattr(model, "on_after_backward"):
            reason = f"model {model_name!r} has its own training step or gradient hook"
        elif train_cfg.precision == "16":
            reason = "precision 16 needs a gradient scaler; use 32 or bf16"
        elif train_cfg.compile:
            reason = "it does not run a compiled forward (train.compile)"
        if reason:
            raise WindowError(f"train.window_threads={train_cfg.window_threads}: {reason} "
                             "(train.window_threads=1 runs the batches one by one)")
        return cls(model, train_cfg.window_threads, autocast, check)

    def add(self, batch: Batch, where: tuple[int, int], window: tuple[int, int],
            optimizers: dict[str, torch.optim.Optimizer]) -> list[ModelOutput]:
        """Keep `batch` (`where` = (epoch, step), `window` = (position, size) as in the loop);
        on the window's last batch run all of them and leave the window's summed gradients
        (each batch's loss divided by the window size) in `.grad`. Returns the window's outputs
        in batch order then, [] before."""
        self.pending.append((batch, where))
        position, size = window
        if position + 1 < size:
            return []
        batches, self.pending = self.pending, []
        # drawn in batch order on this thread: the same seeds whatever the threads do later
        seeds = torch.randint(0, 2**62, (len(batches),)).tolist()
        tensors, before = _shared_state(self.model)  # tensors: held until the comparison
        # a worker's set_num_threads also sets the count that threads started later begin with
        threads = torch.get_num_threads()
        params = [p for p in self.model.parameters() if p.requires_grad]  # now: a model may (un)freeze
        futures = [self.pool.submit(self._gradients, batch, where, size, seed, params)
                   for (batch, where), seed in zip(batches, seeds, strict=True)]
        try:
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            outputs = []
            for future in futures:  # in batch order, each as soon as it and those before are done
                out, grads = future.result()
                for p, g in zip(params, grads, strict=True):
                    if g is None:
                        continue
                    if p.grad is None:  # a copy: autograd may return one tensor for several parameters
                        p.grad = g.clone(memory_format=torch.contiguous_format)
                    else:
                        p.grad.add_(g)
                outputs.append(out)
        except BaseException:  # a batch's error (NaN loss, Ctrl-C): the queued batches are dropped
            for future in futures:  # and the running ones finished before it goes on
                future.cancel()
            wait(futures)
            raise
        finally:
            torch.set_num_threads(threads)
        if _shared_state(self.model)[1] != before:
            raise WindowError(f"train.window_threads={self.threads}: the model's forward drew from a "
                             "global random generator or wrote a buffer or parameter, so its batches "
                             "cannot run at once; train it with train.window_threads=1")
        return outputs

    def _gradients(self, batch: Batch, where: tuple[int, int], size: int, seed: int,
                   params: list[nn.Parameter]):
        torch.set_num_threads(self.intra_threads)  # this worker thread's intra-op threads
        with dropout.batch_generator(torch.Generator().manual_seed(seed)):
            with self.autocast():
                out = self.model(batch)
            out = self.check(out, where)
            loss = sum(out.losses.values()) / size
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return out, grads

    def close(self) -> None:
        self.pool.shutdown()


def _shared_state(model: nn.Module) -> tuple[list[torch.Tensor], tuple]:
    """(the model's buffers and parameters, what a concurrent forward must leave as it is: the
    states of the global generators of torch, numpy and random, and each of those tensors'
    identity and version counter, which an in-place write or a reassignment changes). Keep the
    tensors while comparing: a new tensor cannot take the id of one still held."""
    _, keys, position, gauss, cached = np.random.get_state()
    tensors = [*model.buffers(), *model.parameters()]
    return tensors, (torch.get_rng_state().numpy().tobytes(), random.getstate(),
                     (keys.tobytes(), position, gauss, cached), [(id(t), t._version) for t in tensors])
