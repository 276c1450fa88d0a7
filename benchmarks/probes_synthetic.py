"""Linear probes of per-modality encoders on the planted synthetic data (`msakit analyze --probes`).

    python benchmarks/probes_synthetic.py [--models lf_dnn pase dbr] [--seeds 1] [--epochs 5]
        [--modalities text audio vision] [--runs-dir runs/robustness] [--out DIR | --publish]

The synthetic generator plants a private label factor in audio and in vision, so a good audio
(vision) encoder must carry it: a linear probe on the frozen encoder shows how much it does. For
each model: its shipped synthetic config trained with the given seeds (at most --epochs epochs;
the same folder as benchmarks/robustness_zoo.py's entry, reused when already trained), and the same
config trained with ONE modality present (train.corruption.protocol=conditions, condition t / a /
v, validation on the same condition) into <model>_alone_<t|a|v>. Each run's encoder of a modality
is probed (ridge on the training split, strength chosen on validation, test scored once;
msakit.probes) and the fusion model's probe is set beside the alone model's. Gap = alone minus
fused test MAE: > 0 means the fusion model's encoder carries MORE linear information than the
alone-trained one, < 0 that the fusion model under-trained that modality. Writes
probes_synthetic.{json,md} to --out (default runs/benchmarks/probes_synthetic/) or, with
--publish, to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from results_store import add_output_args, results_dir
from robustness_zoo import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from msakit.probes import probe_report  # noqa: E402
from msakit.train.checkpoint import write_json, write_text  # noqa: E402

ALONE = {"text": "t", "audio": "a", "vision": "v"}


def alone_sets(condition: str) -> list[str]:
    return ["train.corruption.protocol=conditions", f"train.corruption.condition={condition}",
            "train.corruption.validate=true"]


def stat(per_seed: list[dict], side: str, modality: str, metric: str) -> tuple[float, float]:
    """Mean and population std over seeds of a probe's test score; side "probes" (the fusion
    model) or "alone"."""
    xs = [r[side][modality][metric]["test"] for r in per_seed]
    return float(np.mean(xs)), float(np.std(xs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["lf_dnn", "pase", "dbr"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--modalities", nargs="+", default=list(ALONE), choices=list(ALONE),
                        help="modalities with an alone-trained model beside the fused one")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "robustness"))
    add_output_args(parser, "probes_synthetic")
    args = parser.parse_args()
    args.dataset, args.data_root = "synthetic", None  # what robustness_zoo.train reads
    report: dict = {"seeds": args.seeds, "max_epochs": args.epochs, "models": {}}
    lines = ["| model | modality | encoder | probe test MAE: fused | alone | gap (alone - fused) | "
             "probe test Non0-Acc2: fused | alone |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for model in args.models:
        started = time.process_time()
        fused = train(model, f"{model}/{{d}}", [], args)[0]
        alone = {m: train(f"{model}_alone_{c}", f"{model}/{{d}}", alone_sets(c), args)[0] for m, c in ALONE.items()
                 if m in args.modalities}
        per_seed = [probe_report(fused / f"seed_{s}" / "best.pt",
                                 alone={m: str(folder / f"seed_{s}" / "best.pt") for m, folder in alone.items()})
                    for s in args.seeds]
        report["models"][model] = {"per_seed": per_seed, "cpu_seconds": time.process_time() - started}
        for m in [m for m in per_seed[0]["probes"] if m in alone]:
            (fm, fs), (am, as_) = stat(per_seed, "probes", m, "mae"), stat(per_seed, "alone", m, "mae")
            gaps = [r["alone"][m]["mae"]["test"] - r["probes"][m]["mae"]["test"] for r in per_seed]
            (fa, _), (aa, _) = stat(per_seed, "probes", m, "non0_acc2"), stat(per_seed, "alone", m, "non0_acc2")
            spread = len(per_seed) > 1
            lines.append(f"| {model} | {m} | `{per_seed[0]['probes'][m]['module']}` | "
                         + (f"{fm:.3f} ± {fs:.3f} | {am:.3f} ± {as_:.3f}" if spread else f"{fm:.3f} | {am:.3f}")
                         + f" | {np.mean(gaps):+.3f} | {fa:.3f} | {aa:.3f} |")
        text = (f"Linear probes on synthetic (test split; seeds {args.seeds}, at most {args.epochs} epochs; "
                "benchmarks/probes_synthetic.py)\n\n" + "\n".join(lines) + "\n")
        out = results_dir(args)  # written after every model: a stopped run keeps what it finished
        write_json(report, out / "probes_synthetic.json")
        write_text(text, out / "probes_synthetic.md")
        print(text, flush=True)


if __name__ == "__main__":
    main()
