"""Evidence for `msakit tune`: Optuna searches on mosi-poria VALIDATION, then 5 final seeds.

For each config: `--workers` processes of `msakit tune ... --no-final` on one SQLite study (wall
time of the search measured around them), then `msakit tune ... --final-seeds 1 2 3 4 5` (the
study is finished, so this only writes best.yaml + summary and runs the final seeds: the only
test evaluation). The default row is the config's own 5-seed result from
benchmarks/results/mosi_poria.json (same seeds, same protocol).

    python benchmarks/tune_mosi.py --data-root ../shared/data --trials 30 \\
        [--configs configs/lf_dnn/mosi-poria.yaml ...] [--workers 1] [--no-final] [--tag NAME]
        [--set train.epochs=10 ...]

Rerunning with a larger --trials continues a study from its storage.

Writes benchmarks/results/tune_mosi.json and tune_mosi.md; study outputs under runs/tune_mosi/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results_store import update_json

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["mae", "corr", "acc7", "non0_acc2", "non0_f1"]


def msakit(*args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with log.open("a") as handle:
        subprocess.run([sys.executable, "-m", "msakit", *args], env=env, stdout=handle,
                       stderr=subprocess.STDOUT, check=True)


def run(config: str, args: argparse.Namespace) -> dict:
    name = f"{Path(config).parent.name}-w{args.workers}{args.tag}"
    out = ROOT / "runs" / "tune_mosi" / name
    out.mkdir(parents=True, exist_ok=True)
    common = ["tune", "--config", config, "--data-root", args.data_root, "--trials", str(args.trials),
              "--out", str(out), "--study", name, "--quiet", "--set", "train.num_threads=1", *args.set]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-m", "msakit", *common, "--no-final"], env=env,
                                stdout=(out / f"worker{i}.log").open("a"), stderr=subprocess.STDOUT)
               for i in range(args.workers)]
    codes = [w.wait() for w in workers]
    search_s = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"{name}: a worker failed ({codes}); see {out}/worker*.log")
    entry = {"config": config, "workers": args.workers, "trials": args.trials, "search_wall_s": search_s,
             "overrides": args.set}
    if not args.no_final:
        started = time.perf_counter()
        msakit(*common, "--final-seeds", "1", "2", "3", "4", "5", log=out / "final.log")
        entry["final_wall_s"] = time.perf_counter() - started
        final = json.loads((out / "final" / "results.json").read_text())
        entry.update(test_mean=final["test_mean"], test_std=final["test_std"])
    study = json.loads((out / "study.json").read_text())
    best = min((t for t in study["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    entry.update(counts=study["counts"], best_valid=best["value"], best_params=best["params"],
                 importances=study["importances"], trial_seconds=sum(t["seconds"] or 0 for t in study["trials"]))
    return name, entry


def cell(mean: dict, std: dict, key: str) -> str:
    scale = 1 if key in ("mae", "corr") else 100
    digits = 3 if scale == 1 else 1
    return f"{mean[key] * scale:.{digits}f} ± {std[key] * scale:.{digits}f}"


def write_markdown(results: dict, path: Path) -> None:
    defaults = json.loads((ROOT / "benchmarks/results/mosi_poria.json").read_text())
    lines = ["# msakit tune on mosi-poria (validation), then 5 final seeds", "",
             "Produced by `python benchmarks/tune_mosi.py`. Each study: TPE + median pruning, the",
             "objective is the validation MAE of seed 1 (the test split is not read); the best",
             "config is then trained with seeds 1-5 and evaluated once on test. `default` is the",
             "config file as shipped (benchmarks/results/mosi_poria.json). Test metrics, mean ±",
             "population std over the 5 seeds; accuracies in %. Wall times on a 2-core machine shared",
             "with other developers' jobs (noisy).", "",
             "| model | run | best valid MAE | " + " | ".join(KEYS) + " |",
             "|---|---|---:|" + "---:|" * len(KEYS)]
    for name, r in results.items():
        default = defaults.get(r["config"])
        if default and "test_mean" in r:
            lines.append(f"| {default['model']} | default ({r['config']}) | - | "
                         + " | ".join(cell(default["test_mean"], default["test_std"], k) for k in KEYS) + " |")
        if "test_mean" in r:
            lines.append(f"| {Path(r['config']).parent.name} | tuned ({name}) | {r['best_valid']:.4f} | "
                         + " | ".join(cell(r["test_mean"], r["test_std"], k) for k in KEYS) + " |")
    lines += ["", "| study | workers | trials (complete / pruned / failed) | search wall (s) | "
              "sum of trial times (s) | best valid MAE |", "|---|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        c = r["counts"]
        lines.append(f"| {name} | {r['workers']} | {c['COMPLETE']} / {c['PRUNED']} / {c['FAIL']} | "
                     f"{r['search_wall_s']:.0f} | {r['trial_seconds']:.0f} | {r['best_valid']:.4f} |")
    lines += ["", "Best parameters and importances (fANOVA):", ""]
    for name, r in results.items():
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r["best_params"].items())
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["importances"].items())[:3])
        lines.append(f"- {name}: {params}; most important: {top}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--configs", nargs="+", default=["configs/lf_dnn/mosi-poria.yaml"])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-final", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--set", nargs="+", default=[], help="extra overrides (e.g. train.epochs=10)")
    args = parser.parse_args()
    store = ROOT / "benchmarks" / "results" / "tune_mosi.json"
    for config in args.configs:
        name, entry = run(config, args)
        print(name, json.dumps(entry)[:400], flush=True)
        results = update_json(store, lambda current, name=name, entry=entry: {**current, name: entry})
        write_markdown(results, store.with_suffix(".md"))


if __name__ == "__main__":
    main()
