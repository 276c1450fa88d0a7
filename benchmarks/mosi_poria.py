"""Real benchmark: every model with a `configs/<model>/mosi-poria*.yaml` on the real CMU-MOSI
utterance features of Poria et al. (Poria's split; validation carved out of the training videos),
5 seeds each, selected on validation, test reported once per seed.

    python benchmarks/mosi_poria.py --data-root ../shared/data [--models lf_dnn tfn] [--seeds 1 2 3 4 5]
        [--configs configs/pase/mosi-poria.yaml ...] [--epochs N]

`--epochs N` caps every run at N epochs (a reduced CPU run); the cap is recorded with the row and
shown in the table.

Writes mosi_poria.md (mean ± population std over seeds) and .json into `--out` (default
runs/benchmarks/mosi_poria/), including a ridge-regression reference computed here on the same
split, training throughput (samples/s) and the peak resident memory of each model's run (each model
runs in its own process so peaks are its own). Only `--publish` writes benchmarks/results/ and the
README's table, and it refuses to replace a row by one with fewer seeds or epochs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_store import (
    PUBLISHED,
    add_output_args,
    measured_at,
    refuse_weaker,
    results_dir,
    update_json,
)

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT_EPOCHS = 3
KEYS = ["mae", "corr", "acc7", "acc5", "has0_acc2", "has0_f1", "non0_acc2", "non0_f1"]


def ridge_references(data_root: str) -> list[tuple[str, dict[str, float], dict]]:
    """Ridge regression on the loader's standardised features, two ways:
    - the data README's reference: alpha=100, fitted on ALL of Poria's training videos (train +
      our validation videos), so it sees ~20% more training utterances (1,444 vs 1,200) than the models below;
    - the same protocol as the models: fitted on our train split, alpha chosen on validation."""
    from sklearn.linear_model import Ridge

    from msakit.config import DataConfig
    from msakit.data import load_dataset
    from msakit.metrics import regression_metrics

    data = load_dataset(DataConfig(name="mosi-poria", data_root=data_root))
    splits = data.splits

    def design(split: str, modalities: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([splits[split].features[m][:, 0] for m in modalities], axis=1)

    rows = []
    for label, modalities in (("text", ("text",)), ("all three", ("text", "audio", "vision"))):
        x_all = np.concatenate([design("train", modalities), design("valid", modalities)])
        y_all = np.concatenate([splits["train"].labels, splits["valid"].labels])
        readme = Ridge(alpha=100.0).fit(x_all, y_all)
        rows.append((f"ridge {label}, all training videos, alpha 100 (README reference)",
                     regression_metrics(readme.predict(design("test", modalities)), splits["test"].labels), {}))
        fits = {a: Ridge(alpha=a).fit(design("train", modalities), splits["train"].labels)
                for a in (1.0, 10.0, 100.0, 1000.0, 3000.0)}
        valid_mae = {a: regression_metrics(f.predict(design("valid", modalities)), splits["valid"].labels)["mae"]
                     for a, f in fits.items()}
        best = min(valid_mae, key=valid_mae.get)
        rows.append((f"ridge {label}, our train split, alpha {best:g} (chosen on valid)",
                     regression_metrics(fits[best].predict(design("test", modalities)), splits["test"].labels), {}))
    return rows


def run_one(config: Path, data_root: str, seeds: list[int], out: Path, epochs: int | None) -> dict:
    """Worker: train one config over the seeds; then measure throughput on fresh weights: samples
    per CPU-second of the training steps (`throughput.measure_epoch`, 1 torch thread), median of
    `THROUGHPUT_EPOCHS` epochs after a warm-up epoch (process CPU time barely moves with other
    load on the machine, wall time does)."""
    import torch
    from throughput import measure_epoch

    from msakit.config import build_config, load_yaml
    from msakit.data import load_dataset
    from msakit.registry import create_model
    from msakit.train.experiment import run_experiment
    from msakit.train.loop import build_optimizers

    torch.set_num_threads(1)
    overrides = [f"data.data_root={data_root}", "train.progress=false", f"train.seeds={seeds}"]
    cfg = build_config(load_yaml(config), overrides + ([f"train.epochs={epochs}"] if epochs else []))
    data = load_dataset(cfg.data)
    started = time.perf_counter()
    results = run_experiment(cfg, out, data=data, overwrite=True)
    wall = time.perf_counter() - started

    torch.manual_seed(0)  # throughput: a warm-up epoch, then the median of 3 timed epochs
    model = create_model(cfg.model_name, cfg.model, data.info)
    optimizers = build_optimizers(model, cfg)
    timed = [measure_epoch(model, optimizers, cfg, data, epoch) for epoch in range(1 + THROUGHPUT_EPOCHS)][1:]
    return {
        "model": cfg.model_name,
        "config": str(config.relative_to(ROOT)),
        "test_mean": results["test_mean"],
        "test_std": results["test_std"],
        "per_seed": results["per_seed"],
        "samples_per_cpu_s": statistics.median(e["samples"] / e["cpu_s"] for e in timed),
        "throughput_epochs": timed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": wall,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs_cap": epochs,
        "seeds": seeds,
        "measured_at": measured_at(),
    }


def check_publish(rows: dict, key: str, seeds: list[int], epochs: int | None) -> None:
    """Refuse (SystemExit) to replace the published row of `key` by a weaker one."""
    if key in rows:
        old = rows[key]
        refuse_weaker(f"{PUBLISHED.name}/mosi_poria.json row {key}", len(old.get("seeds") or [1] * 5),
                      old.get("epochs_cap"), len(seeds), epochs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--models", nargs="*", help="only these models (default: all with a config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--configs", nargs="*", help="only these config files")
    parser.add_argument("--epochs", type=int, help="cap every run at this many epochs (reduced run)")
    add_output_args(parser, "mosi_poria")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md (and with --publish the README table) from the .json in --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if not (Path(args.data_root) / "mosi-poria").is_dir():
        sys.exit(f"{args.data_root}/mosi-poria not found: pass --data-root to the shared data folder")
    if args.worker:
        worker = Path(args.worker)
        result = run_one(worker, args.data_root, args.seeds,
                         Path(args.out) / "runs" / worker.parent.name / worker.stem, args.epochs)
        print(json.dumps(result))
        return

    configs = sorted(ROOT.glob("configs/*/mosi-poria*.yaml"))
    if args.models:
        configs = [c for c in configs if c.parent.name in args.models]
    if args.configs:
        configs = [Path(c).resolve() for c in args.configs]
    out = results_dir(args)
    previous = out / "mosi_poria.json"
    if args.publish and previous.is_file() and not args.report_only:  # before any compute is spent
        published = json.loads(previous.read_text())
        for config in configs:
            check_publish(published, str(config.relative_to(ROOT)), args.seeds, args.epochs)
    for config in [] if args.report_only else configs:
        print(f"== {config.relative_to(ROOT)}", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(config), "--data-root", args.data_root,
             "--out", args.out, "--seeds", *map(str, args.seeds),
             *(["--epochs", str(args.epochs)] if args.epochs else [])],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            sys.exit(f"{config}: benchmark run failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        key = str(config.relative_to(ROOT))
        def add(rows: dict, key=key, result=result) -> dict:
            if args.publish:  # again at write time: another process may have published meanwhile
                check_publish(rows, key, args.seeds, args.epochs)
            return {**rows, key: result}

        update_json(previous, add)
        print(f"   MAE {result['test_mean']['mae']:.3f}  Non0-Acc2 {100 * result['test_mean']['non0_acc2']:.1f}"
              f"  ({result['samples_per_cpu_s']:.0f} samples/CPU-s, {result['wall_s']:.0f} s)", flush=True)
    if args.report_only and not previous.is_file():
        sys.exit(f"{previous}: no results to report (run the benchmark with this --out first, or add "
                 "--publish to rewrite the published report)")
    rows = json.loads(previous.read_text()) if previous.is_file() else {}
    table = write_markdown(rows, args.data_root, out / "mosi_poria.md")
    if args.publish:
        update_readme(table)
    print((out / "mosi_poria.md").read_text())
    print(f"wrote {out / 'mosi_poria.md'} and .json" + ("" if args.publish else
          "; README.md and benchmarks/results/ untouched (--publish writes them)"))


def row_label(config: str, row: dict) -> str:
    """`model (config variant)`, plus the seeds count and the epoch cap of a reduced run."""
    path = Path(config)
    label = path.parent.name + ("" if path.stem == "mosi-poria" else f" ({path.stem})")
    notes = [f"{len(row['seeds'])} seeds"] if len(row.get("seeds", [])) not in (0, 5) else []
    if row.get("epochs_cap"):
        notes.append(f"≤{row['epochs_cap']} epochs")
    return label + (f" [{', '.join(notes)}]" if notes else "")


def update_readme(table: str) -> None:
    """Put the metrics table between the README's `<!-- mosi-poria-table -->` markers."""
    readme = ROOT / "README.md"
    start, end = "<!-- mosi-poria-table -->", "<!-- /mosi-poria-table -->"
    text = readme.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")


def other_benchmarks(results: Path) -> list[tuple[str, dict, dict]]:
    """mosi-poria rows written by the methods' own benchmarks (psa_mf_mosi.py, dbr.py), so that
    the table shows every model beside the baselines."""
    from msakit.metrics import aggregate_seeds

    rows = []
    psa_mf = results / "psa_mf_mosi.json"
    if psa_mf.is_file():
        saved = json.loads(psa_mf.read_text())
        for variant in dict.fromkeys(r["variant"] for r in saved["runs"]):
            runs = [r for r in saved["runs"] if r["variant"] == variant]
            epochs = max(r["max_epochs"] for r in runs)
            mean, std = aggregate_seeds([r["test"] for r in runs])
            name = "psa_mf" + ("" if variant == "full" else f" ({variant})")
            rows.append((f"{name} [{len(runs)} seeds, ≤{epochs} epochs; psa_mf_mosi.py]", mean, std))
    dbr = results / "dbr.json"
    if dbr.is_file():
        for name, r in json.loads(dbr.read_text())["rows"].get("mosi-poria", {}).items():
            if name.startswith("dbr"):
                cap = f", ≤{r['epochs']} epochs" if r.get("epoch_cap") else ""
                rows.append((f"{name} [{len(r['seeds'])} seeds{cap}; dbr.py]", r["test_mean"], r["test_std"]))
    return rows


def _spread(row: dict) -> dict:
    """A row's std, or none for a single seed (no "± 0.000")."""
    return row["test_std"] if len(row.get("seeds") or [1] * 5) > 1 else {}


def _throughput(row: dict) -> str:
    """samples per CPU-second (median of epochs); rows measured before that kept their
    samples per wall-second of one epoch, marked as such."""
    if "samples_per_cpu_s" in row:
        return f"{row['samples_per_cpu_s']:.0f}"
    return f"({row['samples_per_s']:.0f} per wall-s)"


def write_markdown(rows: dict, data_root: str, path: Path) -> str:
    """Writes the report; returns its metrics table."""
    from msakit.metrics import format_table

    reference = ridge_references(data_root)
    ours = [(row_label(k, r), r["test_mean"], _spread(r)) for k, r in sorted(rows.items())]
    table = format_table(reference + ours + other_benchmarks(PUBLISHED), KEYS)
    cost = "\n".join(
        f"| {row_label(k, r)} | {r['params']:,} | {_throughput(r)} | "
        f"{r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} | {r.get('measured_at', '-')} |"
        for k, r in sorted(rows.items())
    )
    path.write_text(
        "# CMU-MOSI (Poria et al. utterance features), Poria's split\n\n"
        "Test split, mean ± population std over 5 seeds unless the row says otherwise; "
        "checkpoint selected on validation (videos held out of Poria's training videos); rows marked "
        "≤N epochs were capped at N epochs for CPU time (reduced runs). Accuracies and F1 in %. "
        "A row reproduces to the digit with the code of the commit it was measured at (last column "
        "of the second table).\n\n"
        f"{table}\n\n"
        "| model | parameters | train samples / CPU-s (1 thread) | peak RSS (MB) | wall (s, all seeds) | measured at |\n"
        "|---|---:|---:|---:|---:|---|\n"
        f"{cost}\n"
    )
    return table


if __name__ == "__main__":
    main()
