"""CMU-MOSEI text only (`mosei-text`, the real transcripts, official split, 22,788 segments):
a head on the frozen MiniLM sentence embeddings (the dataset's default model, `unimodal`) and the
fine-tuned `text_bert`, beside published text-only numbers; and training throughput at scale.

    python benchmarks/mosei_text.py --data-root ../shared/data [--parts head text_bert]
        [--seeds 1 2 3 4 5] [--bert-seeds 1] [--bert-epochs 2] [--runs-dir runs/mosei_text]

Measured: the cold dataset load (22,788 transcripts embedded once by the frozen encoder and cached)
and the warm load (cache read); per run the test metrics of the validation-selected checkpoint,
epochs run, seconds per epoch (training pass + validation pass) and training-set samples per
second of that epoch time. Writes benchmarks/results/mosei_text.json / .md; runs (and the head's
checkpoints, used by the README's `msakit predict` example) stay in --runs-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from results_store import update_json

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["mae", "corr", "acc7", "acc5", "has0_acc2", "has0_f1", "non0_acc2", "non0_f1"]
PARTS = {
    "head": ["model.name=unimodal", "data.name=mosei-text"],
    "text_bert": ["model.name=text_bert", "data.name=mosei-text", "data.text_encoder=none",
                  "model.text_lr=5e-5", "model.max_tokens=64", "train.weight_decay=0.01",
                  "data.batch_size=32", "model.length_chunk=8"],
}


def timed_load(data_root: str, text_encoder: str) -> tuple[object, float]:
    from msakit.config import DataConfig
    from msakit.data import load_dataset

    start = time.perf_counter()
    data = load_dataset(DataConfig(name="mosei-text", data_root=data_root, text_encoder=text_encoder))
    return data, time.perf_counter() - start


def cap_train(data, fraction: float):
    """Keep a random `fraction` of the training split (seed 0; valid and test untouched)."""
    import dataclasses

    train = data.splits["train"]
    keep = int(round(fraction * len(train)))
    rows = np.sort(np.random.default_rng(0).choice(len(train), keep, replace=False))
    data.splits["train"] = train.subset(rows)
    data.info = dataclasses.replace(data.info, train_size=keep)
    data.notes.append(f"training split capped to a random {keep} of {len(train)} rows (seed 0) for CPU time")
    return data


def run_part(part: str, seeds: list[int], epochs: int | None, data, runs_dir: Path) -> dict:
    from msakit.config import build_config
    from msakit.train.experiment import run_experiment

    sets = [*PARTS[part], f"train.seeds=[{', '.join(map(str, seeds))}]", "train.progress=false"]
    if epochs:
        sets.append(f"train.epochs={epochs}")
    cfg = build_config({}, sets)
    out = runs_dir / part
    cpu, wall = time.process_time(), time.perf_counter()
    results = run_experiment(cfg, out, data=data)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    per_seed = []
    for row in results["per_seed"]:
        history = [json.loads(line) for line in (out / f"seed_{row['seed']}" / "log.jsonl").read_text().splitlines()]
        seconds = [h["seconds"] for h in history]
        per_seed.append({"seed": row["seed"], "test": row["test"], "best_epoch": row["best_epoch"],
                         "epochs_run": len(history), "epoch_seconds": seconds,
                         "train_samples_per_s": len(data.splits["train"]) / float(np.mean(seconds))})
    return {"part": part, "model": cfg.model_name, "config": cfg.to_dict(), "seeds": seeds,
            "train_rows": len(data.splits["train"]),
            "max_epochs": cfg.train.epochs, "test_mean": results["test_mean"],
            "test_std": results["test_std"], "per_seed": per_seed, "wall_s": wall, "cpu_s": cpu,
            "notes": results["notes"]}


def fmt(mean: dict, std: dict, key: str) -> str:
    scale = 1 if key in ("mae", "corr") else 100
    digits = 3 if scale == 1 else 1
    return f"{scale * mean[key]:.{digits}f} ± {scale * std[key]:.{digits}f}"


def write_markdown(report: dict, path: Path) -> None:
    meta = report["meta"]
    lines = [
        "# CMU-MOSEI, text only (real transcripts, official split)",
        "",
        "`python benchmarks/mosei_text.py --data-root ../shared/data` "
        f"({meta['machine']}; torch threads {meta['threads']}; the machine was shared with other jobs).",
        "Test metrics of the validation-selected checkpoint, mean ± population std over seeds; "
        "accuracies in %.",
        "",
        "| model | seeds | epochs (max) | " + " | ".join(KEYS) + " |",
        "|---|---:|---:|" + "---:|" * len(KEYS),
    ]
    for run in report["runs"].values():
        label = {"head": "unimodal head on frozen MiniLM-L6 sentence embeddings (default model)",
                 "text_bert": "text_bert: MiniLM-L6 fine-tuned"}[run["part"]]
        if run.get("train_rows", meta["train_rows"]) < meta["train_rows"]:
            label += f" on a random {run['train_rows']:,} of the {meta['train_rows']:,} training rows (capped for CPU time)"
        lines.append(f"| {label} | {len(run['seeds'])} | {run['max_epochs']} | "
                     + " | ".join(fmt(run["test_mean"], run["test_std"], k) for k in KEYS) + " |")
    lines += ["", "## Throughput at scale", "",
              f"- dataset load, cold (22,788 transcripts embedded by the frozen encoder, then cached): "
              f"{meta['load_cold_s']:.1f} s" if meta.get("load_cold_s") is not None else
              "- dataset load, cold: not measured (the cache existed)",
              f"- dataset load, warm (embedding cache read): {meta['load_warm_s']:.1f} s", ""]
    lines += ["| model | seed | best epoch / run | s per epoch (train + valid pass) | train samples / s |",
              "|---|---:|---:|---:|---:|"]
    for run in report["runs"].values():
        for row in run["per_seed"]:
            lines.append(f"| {run['part']} | {row['seed']} | {row['best_epoch']} / {row['epochs_run']} | "
                         f"{np.mean(row['epoch_seconds']):.1f} | {row['train_samples_per_s']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--bert-seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--bert-epochs", type=int, default=2)
    parser.add_argument("--bert-train-fraction", type=float, default=1.0,
                        help="fine-tune on this random fraction of the training split (said in the results)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "mosei_text"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    json_path = Path(args.out) / "mosei_text.json"
    meta = {"threads": args.threads, "train_rows": 16274,  # the official MOSEI training split
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    runs_dir = Path(args.runs_dir)
    if "head" in args.parts:
        from msakit.data.cmu_text import sentence_features  # noqa: F401  (import cost outside the timer)

        data, cold = timed_load(args.data_root, "minilm")
        data, warm = timed_load(args.data_root, "minilm")
        meta.update(load_cold_s=cold if cold > 5 * warm else None, load_warm_s=warm)
        run = run_part("head", args.seeds, None, data, runs_dir)
        report = update_json(json_path, lambda r: {"meta": {**r.get("meta", {}), **meta},
                                                   "runs": {**r.get("runs", {}), "head": run}})
        write_markdown(report, Path(args.out) / "mosei_text.md")
    if "text_bert" in args.parts:
        data, _ = timed_load(args.data_root, "none")
        if args.bert_train_fraction < 1.0:
            data = cap_train(data, args.bert_train_fraction)
        run = run_part("text_bert", args.bert_seeds, args.bert_epochs, data, runs_dir)
        report = update_json(json_path, lambda r: {"meta": {**meta, **r.get("meta", {})},
                                                   "runs": {**r.get("runs", {}), "text_bert": run}})
        write_markdown(report, Path(args.out) / "mosei_text.md")
    print((Path(args.out) / "mosei_text.md").read_text())


if __name__ == "__main__":
    main()
