"""Speed options on CPU: train.precision (32 / bf16 / 16), train.grad_accumulation, train.compile.

For each model (its synthetic config, the embedded planted data) and each setting: one warm-up
epoch of training steps (compilation happens there), then one timed epoch; reports training
samples per CPU-second of this process on one thread (process time, not wall time: the machine is
shared, and CPU time is what the setting costs), the timed epoch's mean training loss (float32 in every setting) and
the validation MAE after the two epochs (float32 evaluation), so a setting that is fast but
breaks training shows.

    python benchmarks/precision.py [--models lf_dnn mult misa] [--threads 1] [--settings ...]

Writes benchmarks/results/precision.json and precision.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from results_store import update_json

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "fp16 + scaler": ["train.precision=16"],
    "fp32, grad_accumulation=4": ["train.grad_accumulation=4"],
    "fp32, compile": ["train.compile=true"],
}


def measure(model_name: str, sets: list[str]) -> dict:
    import torch

    from msakit.config import build_config, load_yaml
    from msakit.data import load_dataset, to_loader
    from msakit.registry import create_model
    from msakit.train.loop import (
        _accumulation_windows,
        build_optimizers,
        default_training_step,
        evaluate,
    )
    from msakit.train.precision import Precision

    cfg = build_config(load_yaml(ROOT / "configs" / model_name / "synthetic.yaml"), sets)
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = create_model(cfg.model_name, cfg.model, data.info)
    optimizers = build_optimizers(model, cfg)
    amp = Precision(cfg.train.precision, torch.device("cpu"))
    forward = torch.compile(model) if cfg.train.compile else model
    seconds, samples, losses = {}, 0, []
    for epoch in range(2):
        model.train()
        loader = to_loader(data.splits["train"], data.info, cfg.data.batch_size, True, epoch)
        tick = time.process_time()
        windows = _accumulation_windows(len(loader), cfg.train.grad_accumulation)
        for batch, window in zip(loader, windows, strict=True):
            out = default_training_step(model, batch, optimizers, cfg.train, (epoch, 0), amp,
                                        window, forward)
            if epoch == 1:
                samples += batch.size
                losses.append(sum(float(v.detach()) for v in out.losses.values()))
        seconds[epoch] = time.process_time() - tick
    valid, _ = evaluate(model, data.splits["valid"], data.info, 256, torch.device("cpu"))
    return {
        "samples_per_s": samples / seconds[1],
        "first_epoch_s": seconds[0],
        "train_loss": sum(losses) / len(losses),
        "valid_mae": valid["mae"],
    }


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Speed options on CPU",
        "",
        "Produced by `python benchmarks/precision.py`. Synthetic planted data, each model's",
        "`configs/<model>/synthetic.yaml`; one warm-up epoch then one timed epoch of training steps;",
        f"one CPU thread ({results.get('machine', '?')}); throughput in samples per CPU-second of the",
        "process (the machine is shared with other jobs, so wall time is not used). Validation MAE",
        "after the two epochs, evaluated in float32.",
        "",
        "| model | setting | train samples / CPU-s | vs fp32 | first epoch (CPU-s, incl. compile) | train loss | valid MAE |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, rows in results["models"].items():
        base = rows.get("fp32", {}).get("samples_per_s")
        for setting, r in rows.items():
            if "error" in r:
                lines.append(f"| {model} | {setting} | failed: {r['error']} | | | | |")
                continue
            ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {model} | {setting} | {r['samples_per_s']:.0f} | {ratio} | "
                         f"{r['first_epoch_s']:.1f} | {r['train_loss']:.4f} | {r['valid_mae']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lf_dnn", "mult", "misa"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    store = ROOT / "benchmarks" / "results" / "precision.json"
    for model in args.models:
        for setting in args.settings:
            sets = SETTINGS[setting]
            try:
                result = measure(model, ["train.progress=false", *sets])
            except Exception as e:  # a setting that cannot run here is reported, not fatal
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            print(model, setting, result, flush=True)

            def add(current, model=model, setting=setting, result=result):
                current.setdefault("models", {}).setdefault(model, {})[setting] = result
                current["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
                return current

            results = update_json(store, add)
    write_markdown(results, store.with_suffix(".md"))


if __name__ == "__main__":
    main()
