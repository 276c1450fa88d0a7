"""Robustness of the model zoo to missing and noisy modalities, and the methods' ablation runs.

    python benchmarks/robustness_zoo.py --dataset mosi-poria --data-root ../shared/data \
        [--seeds 1 2] [--epochs 10] [--group zoo|ablations] [--only NAME ...] [--runs-dir runs/robustness]
        [--levels 0 0.1 ... 0.9] [--protocols drop block missing noise conditions] [--corruption-seeds 1 2 3]
        [--out DIR | --publish]

Trains every entry of the group (its shipped config, the given seeds, at most --epochs epochs:
reduced CPU runs, said in the report) into RUNS_DIR/<dataset>/<name> (an entry already finished
there with the same config is reused; an interrupted one resumes), then

- group zoo: `msakit.robustness` on the test split of every entry, protocols drop, block, missing,
  noise and the six MMIN conditions, levels 0..0.9, corruption seeds 1 2 3, averaged over the
  training seeds -> robustness_<dataset>.{md,json,png} in --out (default runs/benchmarks/
  robustness_zoo/), or in benchmarks/results/ with --publish (a run's row is replaced, the
  others kept);
- group ablations: the runs for `msakit compare` (a method and its switched-off variants, same
  seeds); the README's ablation tables are `msakit compare` over these folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from results_store import add_output_args, refuse_weaker, results_dir, update_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from msakit.config import build_config, load_yaml  # noqa: E402
from msakit.robustness import format_report, plot_report, robustness_report, run_checkpoints  # noqa: E402
from msakit.train.checkpoint import write_text  # noqa: E402
from msakit.train.experiment import run_experiment  # noqa: E402

ZOO = {  # name -> (config stem under configs/<model>/, extra overrides)
    "unimodal_text": ("unimodal/{d}-text", []),
    "lf_dnn": ("lf_dnn/{d}", []),
    "tfn": ("tfn/{d}", []),
    "lmf": ("lmf/{d}", []),
    "mult": ("mult/{d}", []),
    "misa": ("misa/{d}", []),
    "self_mm": ("self_mm/{d}", []),
    "bc_lstm": ("bc_lstm/{d}", []),
    "mmcl": ("mmcl/{d}", []),
    "lf_dnn_lnln_missing": ("lf_dnn/{d}", ["train.corruption.protocol=missing", "train.corruption.mode=random",
                                           "train.corruption.rate=1.0"]),
    "pase": ("pase/{d}", []),
    "psa_mf": ("psa_mf/{d}", []),
    "dbr": ("dbr/{d}", []),
}
ABLATIONS = {
    "pase": ("pase/{d}", []),
    "pase_no_sgm": ("pase/{d}", ["model.use_sgm=false"]),
    "pase_no_cal": ("pase/{d}", ["model.use_cal=false"]),
    "pase_no_pcl": ("pase/{d}", ["model.use_pcl=false"]),
    "mmcl": ("mmcl/{d}", []),
    "mmcl_no_policy": ("mmcl/{d}", ["model.use_policy=false"]),
    "mmcl_no_intra": ("mmcl/{d}", ["model.use_intra_attention=false"]),
    "mmcl_no_decoupling": ("mmcl/{d}", ["model.use_decoupling=false"]),
    "dbr": ("dbr/{d}", []),
    "dbr_no_tsf": ("dbr/{d}", ["model.use_tsf=false"]),
    "dbr_no_agpr": ("dbr/{d}", ["model.use_agpr=false"]),
    "dbr_no_brf": ("dbr/{d}", ["model.use_brf=false"]),
    "dbr_no_borrowing": ("dbr/{d}", ["model.use_borrowing=false"]),
    "psa_mf": ("psa_mf/{d}", []),
    "psa_mf_no_personality": ("psa_mf/{d}", ["model.use_personality=false"]),
    "psa_mf_no_prefusion": ("psa_mf/{d}", ["model.use_prefusion=false"]),
    "psa_mf_no_enhanced_fusion": ("psa_mf/{d}", ["model.use_enhanced_fusion=false"]),
    "lf_dnn": ZOO["lf_dnn"],  # robust training: LF-DNN trained clean and LNLN-style
    "lf_dnn_lnln_missing": ZOO["lf_dnn_lnln_missing"],
}


def train(name: str, stem: str, sets: list[str], args) -> tuple[Path, bool]:
    """-> (the run folder, whether it was already trained with this config and reused)."""
    path = ROOT / "configs" / f"{stem.format(d=args.dataset)}.yaml"
    tree = load_yaml(path)
    overrides = [f"data.name={args.dataset}", f"train.seeds=[{', '.join(map(str, args.seeds))}]",
                 "train.progress=false", "train.num_threads=1", *sets]
    if args.data_root:
        overrides.append(f"data.data_root={args.data_root}")
    cfg = build_config(tree, overrides)
    cfg.train.epochs = min(cfg.train.epochs, args.epochs)
    out = Path(args.runs_dir) / args.dataset / name
    done = out / "results.json"
    # same resolved config (keys added to the config since are filled with their defaults); a
    # folder trained before a model fix has the same config: delete it to retrain
    if done.is_file() and build_config(json.loads(done.read_text())["config"]).to_dict() == cfg.to_dict():
        logging.info("%s: reusing %s", name, out)
        return out, True
    started, cpu = time.perf_counter(), time.process_time()
    resumed = (out / "config.yaml").is_file()  # an interrupted run resumes
    run_experiment(cfg, out, resume=resumed)
    # resumed: the seconds are this call's only (the epochs before the interruption are not in them)
    write_text(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                           "resumed": resumed, "config": str(path), "sets": sets}) + "\n", out / "benchmark.json")
    return out, False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--group", choices=["zoo", "ablations"], default="zoo")
    parser.add_argument("--only", nargs="+", help="entries to run (default: all of the group)")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "robustness"))
    parser.add_argument("--corruption-seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--protocols", nargs="+", default=["drop", "block", "missing", "noise", "conditions"])
    add_output_args(parser, "robustness_zoo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    entries = ZOO if args.group == "zoo" else ABLATIONS
    names = args.only or list(entries)
    protocols = [p for p in args.protocols if not (p == "block" and args.dataset == "mosi-poria")]  # length 1
    results = results_dir(args)  # --out, or benchmarks/results with --publish
    published = results / f"robustness_{args.dataset}.json"
    for name in names:
        stem, sets = entries[name]
        if not (ROOT / "configs" / f"{stem.format(d=args.dataset)}.yaml").is_file():
            logging.info("%s: no config for %s, skipped", name, args.dataset)
            continue
        old = json.loads(published.read_text()).get("runs", {}).get(name) if published.is_file() else None
        if args.publish and old and args.group == "zoo":
            refuse_weaker(f"{name} ({published.name})", len(old["training"]["seeds"]), old["training"]["max_epochs"],
                          len(args.seeds), args.epochs)
        folder, reused = train(name, stem, sets, args)
        if args.group != "zoo":
            continue
        checkpoints = run_checkpoints(folder)
        # a reused run whose row was evaluated at these levels and corruption seeds keeps its
        # protocols (evaluation is deterministic); only the protocols it lacks are evaluated
        keep = reused and old and old["checkpoints"] == [str(c) for c in checkpoints] and \
            json.loads(published.read_text())["levels"] == args.levels and \
            json.loads(published.read_text())["seeds"] == args.corruption_seeds
        kept = {*old["protocols"], *(["conditions"] if "conditions" in old else [])} if keep else set()
        todo = [p for p in protocols if p not in kept]
        cpu = time.process_time()
        report = robustness_report({name: checkpoints}, protocols=todo, levels=args.levels, seeds=args.corruption_seeds)
        run = report["runs"][name]
        if keep:
            logging.info("%s: kept %s from the published row, evaluated %s", name, sorted(kept), todo)
            run = {**old, **run, "protocols": {p: (run["protocols"].get(p) or old["protocols"][p])
                                               for p in protocols if p != "conditions"},
                   "conditions": run.get("conditions") or old["conditions"]}
            report["runs"][name] = run
        run["training"] = {"seeds": args.seeds, "max_epochs": args.epochs,
                           **json.loads((folder / "benchmark.json").read_text())}
        run["evaluation_cpu_seconds"] = time.process_time() - cpu
        logging.info("%s: evaluated in %.0f CPU-s", name, run["evaluation_cpu_seconds"])
        update_json(published,
                    lambda current, name=name, report=report: {
                        **current, "metric": report["metric"], "levels": report["levels"],
                        "seeds": report["seeds"], "split": report["split"],
                        "runs": {**current.get("runs", {}), name: report["runs"][name]}})
    if args.group != "zoo":
        return
    combined = json.loads(published.read_text())
    write_text(format_report(combined) + "\n", results / f"robustness_{args.dataset}.md")
    plot_report(combined, results / f"robustness_{args.dataset}.png")
    print(format_report(combined))


if __name__ == "__main__":
    main()
