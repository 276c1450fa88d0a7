"""Evidence for `msakit tune`: Optuna searches on mosi-poria VALIDATION, then 5 final seeds.

    python benchmarks/tune_mosi.py --data-root ../shared/data --trials 30 \\
        [--configs configs/lf_dnn/mosi-poria.yaml ...] [--workers 1] [--seeds 1 2 3 4 5]
        [--set train.epochs=10 ...] [--no-final] [--tag NAME] [--note TEXT] [--out DIR] [--publish]

For each config: `--workers` processes of `msakit tune ... --no-final` on one SQLite study, then
`msakit tune ... --final-seeds SEEDS` (the study is finished, so this only writes best.yaml + the
summary and trains the best config with each seed: the only test evaluation). The `shipped` row
is the config's own published 5-seed result (benchmarks/results/mosi_poria.json); with `--set`
(e.g. an epoch cap for the trials, which the final seeds then share) the shipped config is also
trained here with the same overrides and seeds, so the comparison is like for like. Search wall
time = first trial start to last trial end in the study's storage, so a study started by hand
(the same `msakit tune` command) or resumed is timed too (a resume includes the pause).

Studies go to OUT/runs/NAME/ (NAME = model-wWORKERS[TAG]); rerunning with a larger --trials
continues a study from its storage. Writes tune_mosi.json and .md into --out (default
runs/benchmarks/tune_mosi/); --publish writes them into benchmarks/results/ and refuses to
replace an entry by one with fewer trials, final seeds or epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from results_store import PUBLISHED, add_output_args, refuse_weaker, results_dir, update_json

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["mae", "corr", "acc7", "non0_acc2", "non0_f1"]


def epoch_cap(overrides: list[str]) -> int | None:
    caps = [int(s.split("=", 1)[1]) for s in overrides if s.startswith("train.epochs=")]
    return caps[-1] if caps else None


def check_publish(published: dict, name: str, entry: dict) -> None:
    """SystemExit when the published entry `name` has more trials, final seeds or epochs."""
    old = published.get(name)
    if not old:
        return
    where = f"{PUBLISHED.name}/tune_mosi.json entry {name}"
    if entry["trials"] < old["trials"]:
        raise SystemExit(f"--publish refused: {where} is published with {old['trials']} trials; this run "
                         f"has {entry['trials']}. Run without --publish (writes to --out) or with more")
    old_seeds = len(old.get("seeds", [1] * 5)) if "test_mean" in old else 0
    refuse_weaker(where, old_seeds, epoch_cap(old["overrides"]),
                  len(entry["seeds"]) if not entry["no_final"] else 0, epoch_cap(entry["overrides"]))


def search_span(out: Path, study: str) -> float:
    """Seconds from the first trial's start to the last trial's end in the study's storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'study.db'}").trials
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(t.datetime_start for t in trials if t.datetime_start)).total_seconds()


def run(config: str, args: argparse.Namespace) -> Iterator[tuple[str, dict]]:
    """Search, final seeds, then (with --set) the shipped config: yields the entry after each."""
    name = f"{Path(config).parent.name}-w{args.workers}{args.tag}"
    out = Path(args.out).resolve() / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    common = ["-m", "msakit", "tune", "--config", config, "--data-root", args.data_root, "--trials",
              str(args.trials), "--out", str(out), "--study", name, "--quiet",
              "--set", "train.num_threads=1", *args.set]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    workers = [subprocess.Popen([sys.executable, *common, "--no-final"], env=env, cwd=ROOT,
                                stdout=(out / f"worker{i}.log").open("a"), stderr=subprocess.STDOUT)
               for i in range(args.workers)]
    if any([w.wait() for w in workers]):
        raise SystemExit(f"{name}: a worker failed; see {out}/worker*.log")
    entry = {"config": config, "workers": args.workers, "trials": args.trials, "overrides": args.set,
             "seeds": args.seeds, "no_final": args.no_final, "search_wall_s": search_span(out, name),
             "note": args.note}
    if not args.no_final:
        with (out / "final.log").open("a") as log:
            subprocess.run([sys.executable, *common, "--final-seeds", *map(str, args.seeds)], env=env,
                           cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        final = json.loads((out / "final" / "results.json").read_text())
        entry.update(test_mean=final["test_mean"], test_std=final["test_std"])
    study = json.loads((out / "study.json").read_text())
    best = min((t for t in study["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    entry.update(counts=study["counts"], best_valid=best["value"], best_params=best["params"],
                 importances=study["importances"],
                 trial_seconds=sum(t["seconds"] or 0 for t in study["trials"]))
    yield name, entry  # saved before the shipped run below, which may be stopped
    if args.set and not args.no_final:  # the overrides (an epoch cap) apply to the shipped config too
        shipped = out / "shipped"
        with (out / "shipped.log").open("a") as log:
            subprocess.run([sys.executable, "-m", "msakit", "train", "--config", config, "--data-root",
                            args.data_root, "--out", str(shipped), "--quiet", "--seeds", *map(str, args.seeds),
                            "--set", "train.num_threads=1", *args.set,
                            *(["--resume"] if (shipped / "config.yaml").is_file() else [])],
                           env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        final = json.loads((shipped / "results.json").read_text())
        yield name, {**entry, "shipped_test_mean": final["test_mean"], "shipped_test_std": final["test_std"]}


def cell(mean: dict, std: dict, key: str) -> str:
    scale, digits = (1, 3) if key in ("mae", "corr") else (100, 1)
    return f"{mean[key] * scale:.{digits}f} ± {std[key] * scale:.{digits}f}"


def write_markdown(results: dict, path: Path) -> None:
    shipped = json.loads((PUBLISHED / "mosi_poria.json").read_text())
    lines = ["# msakit tune on mosi-poria (validation), then 5 final seeds", "",
             "Produced by `python benchmarks/tune_mosi.py`. Each study: TPE + median pruning, the",
             "objective is the validation MAE of seed 1 (the test split is not read); the best",
             "config is then trained with seeds 1-5 and evaluated once on test. `shipped` is the",
             "config file as shipped (benchmarks/results/mosi_poria.json, same seeds). Test metrics,",
             "mean ± population std over the seeds; accuracies in %. Wall times on a 2-core machine",
             "shared with other developers' jobs (noisy).", "",
             "| model | run | best valid MAE | " + " | ".join(KEYS) + " |",
             "|---|---|---:|" + "---:|" * len(KEYS)]
    for name, r in results.items():
        if "test_mean" not in r:
            continue
        model, cap = Path(r["config"]).parent.name, epoch_cap(r["overrides"])
        if r["config"] in shipped:
            base = shipped[r["config"]]
            lines.append(f"| {model} | shipped ({r['config']}) | - | "
                         + " | ".join(cell(base["test_mean"], base["test_std"], k) for k in KEYS) + " |")
        if "shipped_test_mean" in r:
            lines.append(f"| {model} | shipped, {' '.join(r['overrides'])} | - | " + " | ".join(
                cell(r["shipped_test_mean"], r["shipped_test_std"], k) for k in KEYS) + " |")
        label = f"tuned ({name}, {r['trials']} trials" + (f", ≤{cap} epochs" if cap else "") + ")"
        lines.append(f"| {model} | {label} | {r['best_valid']:.4f} | "
                     + " | ".join(cell(r["test_mean"], r["test_std"], k) for k in KEYS) + " |")
    lines += ["", "| study | workers | overrides | trials (complete / pruned / failed) | search wall (s) | "
              "sum of trial times (s) | best valid MAE |", "|---|---:|---|---|---:|---:|---:|"]
    for name, r in results.items():
        c = r["counts"]
        lines.append(f"| {name} | {r['workers']} | {' '.join(r['overrides']) or '-'} | {c['COMPLETE']} / "
                     f"{c['PRUNED']} / {c['FAIL']} | {r['search_wall_s']:.0f} | {r['trial_seconds']:.0f} | "
                     f"{r['best_valid']:.4f} |")
    lines += ["", "Best parameters and importances (fANOVA):", ""]
    for name, r in results.items():
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r["best_params"].items())
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["importances"].items())[:3])
        lines.append(f"- {name}: {params}; most important: {top}")
    notes = [f"- {name}: {r['note']}" for name, r in results.items() if r.get("note")]
    lines += ["", "Notes on what was run:", "", *notes] if notes else []
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--configs", nargs="+", default=["configs/lf_dnn/mosi-poria.yaml"])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="final seeds")
    parser.add_argument("--no-final", action="store_true", help="search only (e.g. to time workers)")
    parser.add_argument("--tag", default="", help="suffix of the study name")
    parser.add_argument("--set", nargs="+", default=[], help="extra overrides (e.g. train.epochs=10)")
    parser.add_argument("--note", default="", help="how it was run (machine load, resumes), for the report")
    add_output_args(parser, "tune_mosi")
    args = parser.parse_args(argv)
    args.data_root = str(Path(args.data_root).resolve())
    store = results_dir(args) / "tune_mosi.json"
    planned = {f"{Path(c).parent.name}-w{args.workers}{args.tag}": {
        "trials": args.trials, "seeds": args.seeds, "no_final": args.no_final, "overrides": args.set}
        for c in args.configs}
    if args.publish and store.is_file():  # before any compute is spent
        published = json.loads(store.read_text())
        for name, entry in planned.items():
            check_publish(published, name, entry)
    for config in args.configs:
        for name, entry in run(config, args):
            print(name, json.dumps(entry)[:400], flush=True)

            def add(current: dict, name=name, entry=entry) -> dict:
                if args.publish:  # again at write time: another process may have published meanwhile
                    check_publish(current, name, entry)
                return {**current, name: entry}

            write_markdown(update_json(store, add), store.with_suffix(".md"))
    print(f"wrote {store} and {store.with_suffix('.md').name}" + ("" if args.publish else
          "; benchmarks/results/ untouched (--publish writes it)"))


if __name__ == "__main__":
    main()
