"""Scale: a MOSEI-sized aligned MMSA pickle, loaded and trained on.

    nice -n 10 python benchmarks/mosei_scale.py [--threads 2] [--epochs 2] [--dir /tmp]
        [--scale 1.0] [--out DIR | --publish]

1. Writes a file with CMU-MOSEI's shape in thuiar/MMSA's `aligned_50.pkl` (16,326 / 1,871 /
   4,659 samples, 50 steps, text 768-d, audio 74-d, vision 35-d float32: 4.01 GB of features;
   `load_memory.write_file`, streamed, clean variant).
2. Loads it in a fresh child process (`load_memory.measure`): peak RSS minus the RSS after the
   imports, over the feature size (target <= 1.3).
3. In another child process with `--threads` torch threads: loads it and trains LF-DNN and TFN
   with their shipped default configs (`configs/<model>/synthetic.yaml`: model and train
   sections; the data section points at the file), and TFN with its text LSTM replaced by the
   masked-mean MLP encoder (`model.text_encoder=mlp`), TFN as shipped at MMSA's MOSEI batch size
   (`data.batch_size=128`: thuiar/MMSA's config_regression.json trains TFN on MOSEI in batches of
   128), and TFN with MMSA's MOSEI settings (`configs/tfn/mosei-mmsa.yaml`: batch 128, MMSA's
   layer sizes, text LSTM through the padding), `--epochs`
   training passes each (`throughput.measure_epoch`: the training steps and their batch
   collation; no validation).
   Reported per epoch: wall seconds and process CPU seconds (CPU / threads: an upper estimate of
   the wall time on that many otherwise idle cores). Target: an epoch under 5 s on 2 cores.

Writes mosei_scale.{json,md} into --out (default runs/benchmarks/mosei_scale/); --publish writes
them into benchmarks/results/ (refused unless --scale 1). Needs ~4 GB of disk in --dir and ~5 GB
of free memory; writing the file dominates (16 minutes on a heavily loaded 2-core machine in
load_memory.py; much less idle). --scale 0.01 is a one-minute check of the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from load_memory import DIMS, SIZES, STEPS, measure, write_file
from results_store import add_output_args, results_dir

ROOT = Path(__file__).resolve().parents[1]
# label -> (config, overrides)
MODELS = {"lf_dnn": ("configs/lf_dnn/synthetic.yaml", []), "tfn": ("configs/tfn/synthetic.yaml", []),
          "tfn (model.text_encoder=mlp)": ("configs/tfn/synthetic.yaml", ["model.text_encoder=mlp"]),
          "tfn (data.batch_size=128)": ("configs/tfn/synthetic.yaml", ["data.batch_size=128"]),
          "tfn (configs/tfn/mosei-mmsa.yaml)": ("configs/tfn/mosei-mmsa.yaml", [])}


def train_epochs(path: str, threads: int, epochs: int) -> dict:
    """Child: load the file, train each model `epochs` passes; per-epoch seconds."""
    import torch
    import yaml

    torch.set_num_threads(threads)
    from msakit.modules import lstm_kernel

    lstm_kernel.get()  # the compiled LSTM recurrence built before any timing (once per machine)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import measure_epoch

    from msakit.config import build_config
    from msakit.data import load_dataset
    from msakit.registry import create_model
    from msakit.train.loop import build_optimizers

    results, data = {}, None
    for label, (config, overrides) in MODELS.items():
        tree = yaml.safe_load((ROOT / config).read_text())
        tree["data"] = {**tree.get("data", {}), "name": "mmsa", "data_path": path}
        cfg = build_config(tree, overrides)
        data = data or load_dataset(cfg.data)
        torch.manual_seed(0)
        model = create_model(cfg.model_name, cfg.model, data.info)
        optimizers = build_optimizers(model, cfg)
        runs = [measure_epoch(model, optimizers, cfg, data, epoch) for epoch in range(epochs)]
        results[label] = {"batch_size": cfg.data.batch_size,
                               "params": sum(p.numel() for p in model.parameters()), "epochs": runs}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the sample counts (a check)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_output_args(parser, "mosei_scale")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_epochs(args.child, args.threads, args.epochs)))
        return
    if args.publish and args.scale != 1.0:
        raise SystemExit("--publish refused: only the full-size run (--scale 1) is published")

    path = Path(args.dir) / "msakit-mosei-scale.pkl"
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    feature_bytes = write_file(path, args.scale, with_inf=False)
    written = time.perf_counter() - started
    try:
        loads.append(os.getloadavg()[0])
        loading = measure(path)
        loads.append(os.getloadavg()[0])
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run([sys.executable, __file__, "--child", str(path), "--threads",
                               str(args.threads), "--epochs", str(args.epochs)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"training child failed:\n{done.stderr[-3000:]}")
        training = json.loads(done.stdout.strip().splitlines()[-1])
        loads.append(os.getloadavg()[0])
    finally:
        path.unlink(missing_ok=True)

    ratio = (loading["peak_rss"] - loading["baseline_rss"]) / feature_bytes
    lines = [
        "# MOSEI-sized aligned MMSA pickle: loading and an epoch of LF-DNN and TFN",
        "",
        f"`python benchmarks/mosei_scale.py --threads {args.threads} --epochs {args.epochs} "
        f"--scale {args.scale:g}`: {SIZES['train']:,} / {SIZES['valid']:,} / {SIZES['test']:,} "
        f"samples x {args.scale:g}, {STEPS} steps, dims "
        f"{DIMS['text']}/{DIMS['audio']}/{DIMS['vision']} float32 ({feature_bytes / 1e9:.2f} GB of "
        f"features). Written in {written:.0f} s. Machine: {os.cpu_count()} cores, shared, 1-minute "
        f"load average {min(loads):.1f}-{max(loads):.1f} during the run.",
        "",
        f"Loading (`load_dataset`, fresh process): {loading['seconds']:.1f} s, peak RSS - baseline = "
        f"{(loading['peak_rss'] - loading['baseline_rss']) / 2**30:.2f} GiB = **{ratio:.3f}x** the "
        "feature size (target <= 1.3x).",
        "",
        f"Training pass ({args.threads} torch threads; shipped default config of each model; "
        "CPU s / threads: the wall time if every thread were busy the whole pass on otherwise idle cores; threads that spin-wait under load inflate CPU s, so it is an upper estimate; target < 5 s on 2 cores):",
        "",
        "| model | parameters | batch | epoch | wall s | CPU s | CPU s / threads | samples / wall-s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name, r in training.items():
        for k, e in enumerate(r["epochs"], 1):
            lines.append(f"| {model_name} | {r['params']:,} | {r['batch_size']} | {k} | {e['wall_s']:.2f} | "
                         f"{e['cpu_s']:.2f} | {e['cpu_s'] / args.threads:.2f} | "
                         f"{e['samples'] / e['wall_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    out = results_dir(args)
    (out / "mosei_scale.json").write_text(json.dumps(
        {"threads": args.threads, "feature_bytes": feature_bytes, "write_seconds": written,
         "loading": {**loading, "peak_over_features": ratio}, "training": training, "loads": loads},
        indent=1) + "\n")
    (out / "mosei_scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
