"""An experiment: one config, several seeds, one `results.json`.

OUT/
  results.json                   model, dataset, seeds, per_seed valid/test, test_mean, test_std
  config.yaml                    the resolved config (rerun with `msakit train --config`)
  seed_<s>/last.pt, best.pt, log.jsonl, predictions_test.csv, metrics.json

The folder's rules (lock, refusals, resume checks, nothing written before they pass) are in
`msakit.train.runfolder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import torch
import yaml

from msakit.config import ExperimentConfig
from msakit.data import MultimodalData, load_dataset
from msakit.metrics import aggregate_seeds
from msakit.train import distributed
from msakit.train.checkpoint import CheckpointError, load_checkpoint, write_json, write_text
from msakit.train.loop import SeedResult, fit, resolve_device, selection_rule
from msakit.train.runfolder import Interrupted, RunFolder, data_fingerprint

log = logging.getLogger(__name__)


def absolute_data_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """`data.data_root` / `data.data_path` made absolute and normalised ("a/../b" -> "b", by
    text: symlinks are not resolved, so "link/../b" becomes "b"), so that the run folder's config
    and checkpoints work from any directory."""
    paths = {k: os.path.abspath(os.path.expanduser(v)) for k in ("data_root", "data_path")
             if (v := getattr(cfg.data, k))}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths)) if paths else cfg


def _epochs_done(run_dir: Path) -> int:
    """Epochs saved in the seed's last.pt (what a resume continues from); 0 if none."""
    try:
        return int(load_checkpoint(run_dir / "last.pt")["epoch"])
    except (CheckpointError, KeyError):
        return 0


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    resume: bool = False,
    data: MultimodalData | None = None,
    overwrite: bool = False,
) -> dict:
    """Train and evaluate `cfg` once per seed; return (and write) the results dict.

    Raises RunFolderError (folder locked by another run, holding another run without
    `overwrite`, or a resume that does not match the folder's run) and TrainingError (a
    `train.device` this machine lacks) before writing anything, and
    `Interrupted` (a KeyboardInterrupt) on Ctrl-C, leaving the folder resumable. A new run that
    fails before any epoch is saved leaves no run behind (`RunFolder.abandon`)."""
    out_dir = Path(out_dir)
    cfg = absolute_data_paths(cfg)
    main = distributed.main_process()  # torchrun: rank 0 owns the folder and writes; others train
    resolve_device(cfg.train.device)  # before the folder exists: a missing GPU leaves nothing behind
    with RunFolder(out_dir) if main else contextlib.nullcontext() as folder:
        if main:
            folder.check(cfg, resume, overwrite)
        data = data if data is not None else load_dataset(cfg.data)
        fingerprint = data_fingerprint(data)
        if main:
            if resume:
                folder.check_resume(cfg, fingerprint)
            folder.start(overwrite)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if main:
            write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), out_dir / "config.yaml")
        results: list[SeedResult] = []
        for seed in cfg.train.seeds:
            run_dir = out_dir / f"seed_{seed}"
            try:
                results.append(fit(cfg, data, seed, run_dir, resume=resume, fingerprint=fingerprint))
            except KeyboardInterrupt:
                raise Interrupted(out_dir, seed, _epochs_done(run_dir)) from None
            except Exception:
                if main and not resume:
                    folder.abandon()
                raise
        test_mean, test_std = aggregate_seeds([r.test for r in results])
        metric, mode = selection_rule(cfg, data.info)
        summary = {
            "model": cfg.model_name,
            "dataset": data.info.name,
            "seeds": list(cfg.train.seeds),
            "selection": {"split": "valid", "metric": metric, "mode": mode},
            "per_seed": [
                {"seed": r.seed, "best_epoch": r.best_epoch, "valid": r.valid, "test": r.test}
                for r in results
            ],
            "test_mean": test_mean,
            "test_std": test_std,
            "info": data.info.to_dict(),
            "data_fingerprint": fingerprint,
            "notes": data.notes,
            "config": cfg.to_dict(),
        }
        if main:
            write_json(summary, out_dir / "results.json")
    return summary
