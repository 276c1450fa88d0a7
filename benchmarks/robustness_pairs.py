"""Does a method's mechanism buy robustness? Runs trained on the same seeds, compared per seed.

    python benchmarks/robustness_pairs.py --name NAME --runs LABEL=RUN_DIR LABEL=RUN_DIR ... \
        [--protocols drop missing noise conditions] [--levels 0 0.3 0.6 0.9] [--corruption-seeds 1 2] \
        [--out DIR | --publish]

e.g. `--name pase_sgm --runs pase=runs/pase pase_no_sgm=runs/pase_no_sgm`: a method and the same
method with one mechanism switched off, trained on the same seeds and data (`msakit train` output
folders). Every seed_<s>/best.pt is evaluated with `msakit.robustness` (test split; each protocol
at each level, the corruption seeds averaged; the six MMIN conditions). Reported per run: clean
score, AUC per protocol and the score under each condition, mean ± population std over the training
seeds; per pair (the FIRST run against each of the others): the mean difference over the seeds both
share and its two-sided paired t-test p over those seeds (`msakit.compare.paired_t_test`; a
difference is the first run minus the other). Writes robustness_<NAME>.{json,md,png} to --out
(default runs/benchmarks/robustness_pairs/) or, with --publish, to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from results_store import add_output_args, results_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from msakit.compare import paired_t_test  # noqa: E402
from msakit.robustness import format_report, plot_report, robustness_report, run_checkpoints  # noqa: E402
from msakit.train.checkpoint import write_json, write_text  # noqa: E402


def per_seed(run: dict) -> dict[str, dict[int, float]]:
    """{column: {training seed: value}} of one run of a robustness report."""
    seeds = [int(re.fullmatch(r"seed_(\d+)", Path(c).parent.name).group(1)) for c in run["checkpoints"]]
    columns = {"clean": run["clean_per_checkpoint"]}
    columns |= {f"AUC {p}": curve["auc_per_checkpoint"] for p, curve in run["protocols"].items()}
    columns |= {f"{{{','.join(c)}}}": cond["per_checkpoint"] for c, cond in run.get("conditions", {}).items()}
    return {column: dict(zip(seeds, values, strict=True)) for column, values in columns.items()}


def pair_table(report: dict) -> tuple[list[dict], str]:
    labels = list(report["runs"])
    values = {label: per_seed(report["runs"][label]) for label in labels}
    columns = list(values[labels[0]])
    head = "| run | seeds | " + " | ".join(columns) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(columns)]
    for label in labels:
        cells = []
        for column in columns:
            xs = list(values[label][column].values())
            mean = sum(xs) / len(xs)
            std = (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5
            cells.append(f"{mean:.4f} ± {std:.4f}")
        lines.append(f"| {label} | {len(values[label]['clean'])} | " + " | ".join(cells) + " |")
    pairs = []
    lines += ["", "difference first run minus the other, mean over shared seeds (paired t-test p)", "",
              "| A | B | shared seeds | " + " | ".join(columns) + " |", "|---|---|---:|" + "---:|" * len(columns)]
    first = labels[0]
    for other in labels[1:]:
        shared = sorted(set(values[first]["clean"]) & set(values[other]["clean"]))
        entry = {"a": first, "b": other, "shared_seeds": shared, "columns": {}}
        cells = []
        for column in columns:
            a = [values[first][column][s] for s in shared]
            b = [values[other][column][s] for s in shared]
            diff = sum(x - y for x, y in zip(a, b, strict=True)) / len(shared) if shared else float("nan")
            _, p = paired_t_test(a, b)
            entry["columns"][column] = {"difference": diff, "p": p}
            cells.append(f"{diff:+.4f} ({p:.3f})" if p == p else f"{diff:+.4f} (n/a)")
        pairs.append(entry)
        lines.append(f"| {first} | {other} | {len(shared)} | " + " | ".join(cells) + " |")
    return pairs, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True, help="report name: robustness_<NAME>.*")
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=RUN_DIR")
    parser.add_argument("--protocols", nargs="+", default=["drop", "missing", "noise", "conditions"])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.3, 0.6, 0.9])
    parser.add_argument("--corruption-seeds", type=int, nargs="+", default=[1, 2])
    add_output_args(parser, "robustness_pairs")
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep or not label:
            parser.error(f"--runs {item!r}: expected LABEL=RUN_DIR")
        runs[label] = run_checkpoints(folder)
    started = time.process_time()
    report = robustness_report(runs, protocols=args.protocols, levels=args.levels, seeds=args.corruption_seeds)
    report["pairs"], table = pair_table(report)
    report["cpu_seconds"] = time.process_time() - started
    text = (f"Robustness of runs trained on the same seeds (test split; {report['metric']}; corruption seeds "
            f"{args.corruption_seeds}; {report['cpu_seconds']:.0f} CPU-s). Runs: "
            + ", ".join(f"{label} = {Path(c[0]).parent.parent}" for label, c in runs.items())
            + "\n\nPer training seed, mean ± population std over seeds:\n\n" + table
            + "\n\nMean over seeds and corruption seeds, with the curves:\n\n" + format_report(report) + "\n")
    out = results_dir(args)
    write_json(report, out / f"robustness_{args.name}.json")
    write_text(text, out / f"robustness_{args.name}.md")
    plot_report(report, out / f"robustness_{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
