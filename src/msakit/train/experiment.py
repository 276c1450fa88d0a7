"""An experiment: one config, several seeds, one `results.json`.

OUT/
  results.json                   model, dataset, seeds, per_seed valid/test, test_mean, test_std
  config.yaml                    the resolved config (rerun with `msakit train --config`)
  seed_<s>/last.pt, best.pt, log.jsonl, predictions_test.csv, metrics.json
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from msakit.config import ExperimentConfig
from msakit.data import MultimodalData, load_dataset
from msakit.metrics import aggregate_seeds
from msakit.train.checkpoint import write_json, write_text
from msakit.train.loop import SeedResult, fit, selection_rule

log = logging.getLogger(__name__)


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    resume: bool = False,
    data: MultimodalData | None = None,
) -> dict:
    """Train and evaluate `cfg` once per seed; return (and write) the results dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = data if data is not None else load_dataset(cfg.data)
    write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), out_dir / "config.yaml")
    results: list[SeedResult] = []
    for seed in cfg.train.seeds:
        results.append(fit(cfg, data, seed, out_dir / f"seed_{seed}", resume=resume))
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
        "notes": data.notes,
        "config": cfg.to_dict(),
    }
    write_json(summary, out_dir / "results.json")
    return summary
