"""The training loop: one function, read top to bottom; it knows no model by name.

A model returns `ModelOutput(prediction, losses)`; the loop sums the named loss terms, logs each,
selects the checkpoint on the VALIDATION split and evaluates the test split once, for that
checkpoint. Optional model hooks (all generic, none model-specific):
    model.parameter_groups(train_cfg) -> list of optimiser param-group dicts (own learning rates)
    model.on_epoch_end(epoch, valid_metrics) -> dict of scalars to log (phase switches, gates...)
    model.configure_optimizers(train_cfg) -> dict name -> optimiser (models with several)
    model.update_scales() -> {param-group name: factor}: the lr of those groups is multiplied by
                                     the factor for the next optimiser step only (the update is
                                     damped; schedulers and checkpoints keep the unscaled lr)
    model.training_step(batch, optimizers, train_cfg) -> ModelOutput
                                     a model with its own update rule (e.g. actor-critic) does its
                                     own backward/steps here; losses come back detached for logging
All optimisers' states (and a plateau scheduler's, `train.scheduler=plateau`) are checkpointed.
Batch transforms: `train.corruption` (msakit.corruption) corrupts each training batch, keyed by
(seed, epoch, step) so a resumed run sees the same corruptions; validation stays clean unless
`train.corruption.validate`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from msakit.batch import Batch, ModelOutput
from msakit.config import ExperimentConfig
from msakit.corruption import BatchCorruption
from msakit.data import MultimodalData, to_loader
from msakit.data.base import DatasetInfo, SplitArrays
from msakit.metrics import SELECTION_DEFAULTS, compute_metrics, is_better
from msakit.registry import create_model
from msakit.train import distributed, tracking
from msakit.train.allocator import keep_freed_memory
from msakit.train.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    save_checkpoint,
    write_json,
    write_text,
)
from msakit.train.precision import Precision
from msakit.train.runfolder import check_checkpoint, data_fingerprint
from msakit.train.window import ConcurrentWindows, WindowError

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where."""


@dataclass
class SeedResult:
    seed: int
    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """train.device -> a torch.device this machine has ('auto': the first GPU, else the CPU).
    Raises TrainingError for a CUDA device or index, or MPS, that is not available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name!r} but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TrainingError(f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA "
                            "device(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"train.device={name!r} but no MPS device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def selection_rule(cfg: ExperimentConfig, info: DatasetInfo) -> tuple[str, str]:
    """(metric, mode) that selects the checkpoint on the validation split."""
    default_metric, default_mode = SELECTION_DEFAULTS[info.metric_family]
    metric = cfg.train.select_metric or default_metric
    if cfg.train.select_mode:
        return metric, cfg.train.select_mode
    if metric == default_metric:
        return metric, default_mode
    return metric, "min" if metric in ("mae", "loss") else "max"


@torch.no_grad()
def predict(
    model: nn.Module, arrays: SplitArrays, info: DatasetInfo, batch_size: int, device: torch.device,
    transform: Callable[[Batch, int], Batch] | None = None,
) -> tuple[np.ndarray, float]:
    """Predictions for a whole split, in order, and the mean total loss. `transform(batch, i)`
    (e.g. a `BatchCorruption`) is applied to the i-th batch first."""
    model.eval()
    outputs, rows, total, count = [], [], 0.0, 0
    whole_videos = getattr(model, "whole_videos", False)
    shard = distributed.current().shard  # under DDP: this process's shards, gathered below
    loader = to_loader(arrays, info, batch_size, shuffle=False, whole_videos=whole_videos, shard=shard)
    prediction = None

    def place(values: np.ndarray, index: np.ndarray) -> None:  # back to the split's row order
        nonlocal prediction
        if prediction is None:
            prediction = np.empty((len(arrays), *values.shape[1:]), values.dtype)
        prediction[index] = values

    for i, batch in enumerate(loader):
        batch = batch.to(device)
        if transform is not None:
            batch = transform(batch, i)
        out = model(batch)
        values, index = out.prediction.float().cpu().numpy(), batch.index.cpu().numpy()
        if shard is not None:  # gathered below
            outputs.append(values)
            rows.append(index)
        else:
            # placed as the batches come: a list of per-batch arrays kept small objects alive
            # between the batches' large tensors, and with `keep_freed_memory` the heap then grew
            # ~10-17 MB a batch (TFN on MOSI's test split: up to +170 MiB of peak RSS)
            place(values, index)
        if out.losses:
            total += float(sum(out.losses.values())) * batch.size
            count += batch.size
    if shard is not None:
        parts = distributed.gather((outputs, rows, total, count))
        for part in parts:
            for values, index in zip(part[0], part[1], strict=True):
                place(values, index)
        total, count = sum(p[2] for p in parts), sum(p[3] for p in parts)
    if prediction is None:
        raise TrainingError("no sample to predict")  # an empty split: nothing to evaluate
    return prediction, total / max(count, 1)


def evaluate(
    model: nn.Module, arrays: SplitArrays, info: DatasetInfo, batch_size: int, device: torch.device,
    transform: Callable[[Batch, int], Batch] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    prediction, loss = predict(model, arrays, info, batch_size, device, transform)
    if not np.all(np.isfinite(prediction)):
        raise TrainingError(f"the model predicted NaN/inf on {int((~np.isfinite(prediction)).sum())} values")
    metrics = compute_metrics(
        info.metric_family,
        prediction,
        arrays.labels,
        num_classes=info.num_classes,
        class_names=info.class_names,
    )
    metrics["loss"] = loss
    return metrics, prediction


def predictions_csv(arrays: SplitArrays, prediction: np.ndarray, info: DatasetInfo) -> str:
    """Per-sample predictions: id, label, prediction (classes: predicted index and scores)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if info.task == "regression":
        writer.writerow(["id", "label", "prediction"])
        for i, sample_id in enumerate(arrays.ids):
            writer.writerow([sample_id, f"{arrays.labels[i]:.6g}", f"{prediction[i]:.6g}"])
    elif info.task == "classification":
        writer.writerow(["id", "label", "prediction", *[f"score_{k}" for k in range(info.num_classes)]])
        for i, sample_id in enumerate(arrays.ids):
            scores = [f"{s:.6g}" for s in prediction[i]]
            writer.writerow([sample_id, int(arrays.labels[i]), int(prediction[i].argmax()), *scores])
    else:
        names = info.class_names or tuple(f"task{t}" for t in range(info.num_tasks))
        writer.writerow(["id", *[f"{n}_label" for n in names], *[f"{n}_prediction" for n in names]])
        for i, sample_id in enumerate(arrays.ids):
            writer.writerow(
                [sample_id, *arrays.labels[i].tolist(), *prediction[i].argmax(-1).tolist()]
            )
    return buffer.getvalue()


def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups(cfg.train)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return adamw(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where the parameters' device supports it (one kernel for
    all tensors: 5 ms instead of 38 ms a step for TFN's 9.1M parameters on CPU), else the
    multi-tensor one. Same update rule either way (equal up to float rounding)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(params, **kwargs)


def build_optimizers(model: nn.Module, cfg: ExperimentConfig) -> dict[str, torch.optim.Optimizer]:
    if hasattr(model, "configure_optimizers"):
        return model.configure_optimizers(cfg.train)
    return {"main": build_optimizer(model, cfg)}


def build_schedulers(optimizers: dict, cfg: ExperimentConfig, mode: str) -> dict:
    if cfg.train.scheduler == "none":
        return {}
    return {
        name: torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.train.plateau_factor, patience=cfg.train.plateau_patience
        )
        for name, optimizer in optimizers.items()
    }


def _check_finite(losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    loss = sum(float(v.detach()) for v in losses.values())
    if not math.isfinite(loss):
        detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        raise TrainingError(
            f"loss became {loss} at epoch {epoch}, step {step} ({detail}); "
            "lower train.lr or check the data"
        )


def scaled_step(optimizer: torch.optim.Optimizer, scales: dict[str, float], step=None) -> None:
    """optimizer.step() (or `step(optimizer)`, e.g. through a grad scaler) with the lr of each
    param group whose "name" is in `scales` multiplied by that factor for this step only."""
    saved = [(group, group["lr"]) for group in optimizer.param_groups if group.get("name") in scales]
    for group, lr in saved:
        group["lr"] = lr * scales[group["name"]]
    try:
        step(optimizer) if step is not None else optimizer.step()
    finally:
        for group, lr in saved:
            group["lr"] = lr


def default_training_step(
    model: nn.Module, batch: Batch, optimizers: dict[str, torch.optim.Optimizer], train_cfg, where,
    amp: Precision | None = None, window: tuple[int, int] = (0, 1), forward: nn.Module | None = None,
) -> ModelOutput:
    """forward (autocast) -> float32 losses, finite check -> backward of loss / window size; on
    the window's last batch: unscale -> hook -> clip -> step. `window` = (position, size) of this
    batch in its gradient-accumulation window; `forward` runs the batch (a compiled or DDP
    wrapper of `model`; default `model`)."""
    amp = amp or Precision("32", batch.labels.device)
    position, size = window
    last = position + 1 == size
    no_sync = getattr(forward, "no_sync", None)  # DDP: all-reduce only on the window's last batch
    with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
        with amp.autocast():
            out = (forward if forward is not None else model)(batch)
        out = checked_losses(out, where)
        if position == 0:
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
        amp.backward(sum(out.losses.values()) / size)
    if last:
        finish_window(model, batch, optimizers, train_cfg, amp)
    return out


def checked_losses(out: ModelOutput, where: tuple[int, int]) -> ModelOutput:
    """`out` with its loss terms as float32; raises TrainingError when there are none or their
    sum is not finite (`where` = (epoch, step) for the message)."""
    if not out.losses:
        raise TrainingError("the model returned no loss terms")
    out.losses = {k: v.float() for k, v in out.losses.items()}
    _check_finite(out.losses, *where)
    return out


def finish_window(model: nn.Module, batch: Batch, optimizers: dict[str, torch.optim.Optimizer],
                  train_cfg, amp: Precision) -> None:
    """After the last backward of an accumulation window (`batch`: its last batch): unscale ->
    the model's gradient hook -> clip -> step every optimiser (with the model's lr scales)."""
    amp.unscale(optimizers)
    if hasattr(model, "on_after_backward"):
        model.on_after_backward(batch)
    if train_cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
    scales = model.update_scales() if hasattr(model, "update_scales") else {}
    for optimizer in optimizers.values():
        scaled_step(optimizer, scales, amp.step_optimizer)
    amp.update()


def _accumulation_windows(batches: int, size: int):
    """(position, window size) of each batch; the epoch's last window may be shorter."""
    for i in range(batches):
        start = i - i % size
        yield i - start, min(size, batches - start)


def checkpoint_state(cfg: ExperimentConfig, info: DatasetInfo, seed: int, **extra) -> dict:
    return {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "info": info.to_dict(), "seed": seed, **extra}


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def fit(
    cfg: ExperimentConfig,
    data: MultimodalData,
    seed: int,
    run_dir: str | Path,
    resume: bool = False,
    fingerprint: dict | None = None,
    test: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> SeedResult:
    """Train one seed; select on validation; evaluate test once. Writes into `run_dir`:
    last.pt (resumable state, every epoch), best.pt (selected model), log.jsonl (per epoch),
    predictions_test.csv, metrics.json. Checkpoints record the seed and the data's `fingerprint`
    (`runfolder.data_fingerprint`); a resume from a last.pt that does not match is refused.

    test=False never reads the test split (hyper-parameter search: `SeedResult.test` is empty);
    on_epoch(epoch, validation selection value) runs after each epoch's checkpoint (a tuner
    reports to its pruner there and may raise to stop the run). The first call in a process
    raises glibc's malloc thresholds (`allocator.keep_freed_memory`: large tensors reuse heap
    memory instead of fresh pages every step)."""
    keep_freed_memory()
    run_dir = Path(run_dir)
    fingerprint = fingerprint or data_fingerprint(data)
    info, train_cfg = data.info, cfg.train
    ctx, device = distributed.setup(resolve_device(train_cfg.device))
    metric, mode = selection_rule(cfg, info)
    seed_everything(seed)
    model = create_model(cfg.model_name, cfg.model, info).to(device)
    if ctx.active:
        try:
            distributed.check_supported(model, cfg.model_name)
        except ValueError as e:
            raise TrainingError(str(e)) from e
    optimizers = build_optimizers(model, cfg)
    schedulers = build_schedulers(optimizers, cfg, mode)
    step = getattr(model, "training_step", None)
    if step is not None:
        _refuse_for_custom_step(cfg)
    amp = Precision(train_cfg.precision, device)
    forward = distributed.wrap(model, device) if ctx.active else model
    forward = torch.compile(forward) if train_cfg.compile else forward
    try:
        concurrent = ConcurrentWindows.create(model, cfg.model_name, train_cfg, device, ctx.active,
                                              amp.autocast, checked_losses)
    except WindowError as e:
        raise TrainingError(str(e)) from e

    start_epoch, best_value, best_epoch, bad_epochs, history = 0, None, -1, 0, []
    best_state = _state_copy(model)
    last_path = run_dir / "last.pt"
    state = None
    if resume:  # rank 0 reads, every process gets it (no shared folder needed)
        state = distributed.broadcast(load_checkpoint(last_path) if ctx.main and last_path.is_file() else None)
    if state is not None:
        check_checkpoint(state, last_path, cfg, seed, fingerprint)
        model.load_state_dict(state["model"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        torch.set_rng_state(state["rng"])
        amp.load_state_dict(state.get("scaler"))
        best_state, best_value = state["best_state"], state["best_value"]
        start_epoch, best_epoch = state["epoch"], state["best_epoch"]
        bad_epochs, history = state["bad_epochs"], state["history"]
        log.info("seed %d: resumed from %s at epoch %d", seed, last_path, start_epoch)
    stopped = bool(history) and history[-1].get("stopped", False)
    trackers = tracking.open_trackers(cfg, run_dir) if ctx.main else tracking.Trackers()
    corruption = BatchCorruption.from_config(train_cfg.corruption, data.splits["train"], seed)
    valid_transform = corruption.for_validation() if corruption and train_cfg.corruption.validate else None

    for epoch in range(start_epoch, train_cfg.epochs):
        if stopped:
            break
        started = time.perf_counter()
        distributed.reseed(seed, epoch)
        model.train()
        terms: dict[str, float] = {}
        steps = 0
        loader = to_loader(
            data.splits["train"], info, cfg.data.batch_size, shuffle=True,
            seed=seed * 100_003 + epoch, whole_videos=getattr(model, "whole_videos", False),
            shard=ctx.shard,
        )
        bar = tqdm(loader, desc=f"seed {seed} epoch {epoch + 1}/{train_cfg.epochs}",
                   leave=False, disable=None if train_cfg.progress else True)  # None: off without a TTY
        windows = _accumulation_windows(len(loader), train_cfg.grad_accumulation)
        for batch, window in zip(bar, windows, strict=True):
            batch: Batch = batch.to(device)
            if corruption is not None:
                batch = corruption(batch, corruption.training_key(epoch, steps))
            where = (epoch + 1, steps + 1)
            if concurrent is not None:  # the window's outputs on its last batch, [] before
                try:
                    outs = concurrent.add(batch, where, window, optimizers)
                except WindowError as e:
                    raise TrainingError(str(e)) from e
                if outs:
                    finish_window(model, batch, optimizers, train_cfg, amp)
            elif step is not None:
                with amp.autocast():
                    out = step(batch, optimizers, train_cfg)
                out.losses = {k: v.float() for k, v in out.losses.items()}
                _check_finite(out.losses, *where)
                outs = [out]
            else:
                outs = [default_training_step(model, batch, optimizers, train_cfg, where, amp,
                                              window, forward)]
            steps += 1
            for out in outs:
                for name, value in out.losses.items():
                    terms[name] = terms.get(name, 0.0) + float(value.detach())
            if outs:
                last_loss = sum(float(v.detach()) for v in outs[-1].losses.values())
                bar.set_postfix(loss=f"{last_loss:.4f}")
        train_seconds = time.perf_counter() - started
        terms = distributed.mean_over_processes(terms)  # under DDP: the whole batches' losses

        valid_metrics, _ = evaluate(model, data.splits["valid"], info, cfg.data.batch_size, device,
                                    valid_transform)
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(terms.values()) / max(steps, 1),
            **{f"train_{k}": v / max(steps, 1) for k, v in terms.items()},
            **{f"valid_{k}": v for k, v in valid_metrics.items()},
            "seconds": time.perf_counter() - started,
            "train_seconds": train_seconds,
        }
        value = valid_metrics.get(metric, math.nan)
        if metric not in valid_metrics:
            raise TrainingError(f"train.select_metric {metric!r} is not a validation metric: {sorted(valid_metrics)}")
        # the weights just validated are kept, before on_epoch_end changes them (PaSE's phase)
        if is_better(value, best_value, mode):
            best_value, best_epoch, bad_epochs = value, epoch + 1, 0
            best_state = None  # freed before the copy: one model's worth less at the peak
            best_state = _state_copy(model)
        else:
            bad_epochs += 1
        if hasattr(model, "on_epoch_end"):
            record.update(model.on_epoch_end(epoch + 1, valid_metrics) or {})
        record["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]  # the rate this epoch trained at
        for scheduler in schedulers.values():
            scheduler.step(value)
        record["selected"] = best_epoch == epoch + 1
        record["stopped"] = bad_epochs >= train_cfg.patience
        history.append(record)
        log.info("seed %d epoch %d: train %.4f valid %s %.4f%s", seed, epoch + 1,
                 record["train_loss"], metric, value, " *" if record["selected"] else "")
        if ctx.main:  # only rank 0 writes
            save_checkpoint(
                checkpoint_state(
                    cfg, info, seed, data_fingerprint=fingerprint,
                    epoch=epoch + 1, model=model.state_dict(),
                    optimizers={k: o.state_dict() for k, o in optimizers.items()},
                    schedulers={k: sc.state_dict() for k, sc in schedulers.items()},
                    rng=torch.get_rng_state(), scaler=amp.state_dict(), best_state=best_state,
                    best_value=best_value,
                    best_epoch=best_epoch, bad_epochs=bad_epochs, history=history,
                ),
                last_path,
            )
            write_text("".join(_json_line(r) for r in history), run_dir / "log.jsonl")
            trackers.log(record, epoch + 1)
        stopped = record["stopped"]
        if on_epoch is not None:
            on_epoch(epoch + 1, value)

    trackers.close()
    if concurrent is not None:
        concurrent.close()
    if best_epoch < 1:  # never defined: best_state would be the INITIAL weights
        raise TrainingError(
            f"seed {seed}: validation {metric} was undefined (NaN) at every epoch, so no checkpoint "
            "can be selected (corr needs non-constant predictions and labels, non0_* a non-zero "
            "label); choose another train.select_metric, e.g. loss or mae, and train again with --overwrite")
    model.load_state_dict(best_state)
    if ctx.main:
        save_checkpoint(checkpoint_state(cfg, info, seed, model=best_state, best_epoch=best_epoch,
                                         data_fingerprint=fingerprint), run_dir / "best.pt")
    valid_metrics, _ = evaluate(model, data.splits["valid"], info, cfg.data.batch_size, device, valid_transform)
    test_metrics: dict[str, float] = {}
    if test:
        test_metrics, test_prediction = evaluate(model, data.splits["test"], info, cfg.data.batch_size, device)
        if ctx.main:
            write_text(predictions_csv(data.splits["test"], test_prediction, info), run_dir / "predictions_test.csv")
    result = SeedResult(seed, valid_metrics, test_metrics, best_epoch, history)
    if ctx.main:
        write_json({"seed": seed, "best_epoch": best_epoch, "valid": valid_metrics, "test": test_metrics},
                   run_dir / "metrics.json")
    return result


def _refuse_for_custom_step(cfg: ExperimentConfig) -> None:
    """A model's own training_step does its own backward and steps: the options that must reach
    inside it are refused rather than silently ignored."""
    train = cfg.train
    for option, unsupported in (("train.precision=16", train.precision == "16"),
                                ("train.grad_accumulation", train.grad_accumulation > 1),
                                ("train.compile", train.compile)):
        if unsupported:
            raise TrainingError(f"model {cfg.model_name!r} has its own training step, which does "
                                f"not support {option}; use the defaults (bf16 works)")


def _json_line(record: dict) -> str:
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in record.items()}) + "\n"
