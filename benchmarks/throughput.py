"""Training throughput of every model, measured so that it is stable on a shared machine.

    python benchmarks/throughput.py --data-root ../shared/data [--configs FILE ...] [--rounds 3]
        [--out runs/throughput] [--publish]

Each config's model is built once, trained for one warm-up epoch, then timed over `--rounds`
further epochs, INTERLEAVED across models (round 1: every model one epoch, round 2: ...), on one
torch thread. The time of an epoch is the process CPU time (user + system) spent in training
steps, which other processes on the machine barely change, unlike wall time (wall time is
reported too). Reported: the median over rounds of samples per CPU-second, its spread, and the
ratio to LF-DNN's. `measure_epoch` is also what `benchmarks/mosi_poria.py` uses.

Results: OUT/throughput.{json,md}; `--publish` copies the table to
benchmarks/results/throughput.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every model's mosi-poria config but PSA-MF's, whose pretrained text transformer makes it another
# class of model (its own benchmark, psa_mf_mosi.py, reports its time)
DEFAULT_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/mosi-poria.yaml")
                         if p.parent.name != "psa_mf")


def measure_epoch(model, optimizers, cfg, data, epoch: int) -> dict[str, float]:
    """One training epoch of `model`; returns samples, CPU seconds and wall seconds spent in the
    training steps (batch collation included, as in training)."""
    from msakit.data import to_loader
    from msakit.train.allocator import keep_freed_memory
    from msakit.train.loop import default_training_step

    keep_freed_memory()  # as fit() does
    model.train()
    loader = to_loader(data.splits["train"], data.info, cfg.data.batch_size, shuffle=True,
                       seed=epoch, whole_videos=getattr(model, "whole_videos", False))
    samples = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in loader:
        if hasattr(model, "training_step"):
            model.training_step(batch, optimizers, cfg.train)
        else:
            default_training_step(model, batch, optimizers, cfg.train, (epoch, 0))
        samples += batch.size
    return {"samples": samples, "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall}


def build(config: str, data_root: str | None):
    import torch

    from msakit.config import build_config, load_yaml
    from msakit.data import load_dataset
    from msakit.registry import create_model
    from msakit.train.loop import build_optimizers

    overrides = [f"data.data_root={data_root}"] if data_root else []
    cfg = build_config(load_yaml(ROOT / config), overrides)
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = create_model(cfg.model_name, cfg.model, data.info)
    return cfg, data, model, build_optimizers(model, cfg)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="runs/throughput")
    parser.add_argument("--publish", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from msakit.modules import lstm_kernel

    lstm_kernel.get()  # the compiled LSTM recurrence built before any timing (once per machine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    built = {}
    for config in args.configs:
        cfg, data, model, optimizers = build(config, args.data_root)
        measure_epoch(model, optimizers, cfg, data, epoch=0)  # warm-up
        built[config] = (cfg, data, model, optimizers)
        print(f"built {config}", flush=True)
    runs: dict[str, list[dict]] = {c: [] for c in built}
    for r in range(args.rounds):
        for config, (cfg, data, model, optimizers) in built.items():
            runs[config].append(measure_epoch(model, optimizers, cfg, data, epoch=r + 1))
        print(f"round {r + 1} done", flush=True)

    rows = []
    for config, epochs in runs.items():
        rates = [e["samples"] / e["cpu_s"] for e in epochs]
        model = built[config][2]
        rows.append({
            "config": config,
            "model": built[config][0].model_name,
            "params": sum(p.numel() for p in model.parameters()),
            "samples_per_cpu_s": statistics.median(rates),
            "spread": (max(rates) - min(rates)) / statistics.median(rates),
            "samples_per_wall_s": statistics.median(e["samples"] / e["wall_s"] for e in epochs),
            "epochs": epochs,
        })
    reference = next((r["samples_per_cpu_s"] for r in rows if r["model"] == "lf_dnn"), None)
    lines = [
        "# Training throughput (1 torch thread, interleaved rounds, median)",
        "",
        f"`python benchmarks/throughput.py --rounds {args.rounds}`: samples per CPU-second of the "
        "training steps (process CPU time, stable under other load), median over rounds; spread = "
        "(max - min) / median; ratio = this model / LF-DNN.",
        "",
        "| config | parameters | samples / CPU-s | spread | ratio to LF-DNN | samples / wall-s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['samples_per_cpu_s'] / reference:.2f}" if reference else "-"
        lines.append(f"| {r['config']} | {r['params']:,} | {r['samples_per_cpu_s']:.0f} | "
                     f"{100 * r['spread']:.0f}% | {ratio} | {r['samples_per_wall_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    (out / "throughput.md").write_text(text)
    print(text)
    if args.publish:
        shutil.copyfile(out / "throughput.md", ROOT / "benchmarks" / "results" / "throughput.md")


if __name__ == "__main__":
    main()
