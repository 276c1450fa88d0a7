"""msakit vs thuiar/MMSA, side by side, on one MOSI-sized MMSA pickle.

    python benchmarks/against_mmsa.py [--models tfn lf_dnn lmf mult] [--pairs 3] [--epochs 3]
        [--threads 2] [--out runs/against_mmsa] [--publish]

What it does (every step is in this file; nothing of MMSA is vendored):
1. Installs MMSA from PyPI (`MMSA==2.2.1`) into its own virtual environment
   `OUT/mmsa-venv` (`--system-site-packages`, so it uses the same CPU torch build;
   `pip install --no-deps MMSA==2.2.1 easydict nvidia-ml-py3`: MMSA's other requirements
   are already there, and its `torch>=1.9` requirement would otherwise pull a CUDA build).
2. Writes one MOSI-sized MMSA pickle with a learnable label (1284/229/686 samples; text 768-d
   x 50 steps, audio 5-d x 500, vision 20-d x 375: MMSA's `unaligned_50.pkl` layout, the file
   MMSA trains these four models on; `--aligned` writes 50/50/50 instead).
3. For each model and each of `--pairs` pairs, runs msakit then MMSA (interleaved: ours,
   theirs, ours, theirs, ...), each in a fresh process with the same thread count and epochs.
   MMSA runs through its own pieces: `MMDataLoader`, `AMIO`, `ATIO().getTrain(args).do_train`
   with MMSA's mosi config for the model, after replacing the two CUDA calls it makes
   unconditionally (`torch.cuda.set_device`, `torch.cuda.empty_cache`) by no-ops before import
   (and letting `ReduceLROnPlateau` accept the `verbose` argument its MulT trainer passes, which
   torch 2.13 removed).
   Its train loader is wrapped to time each training pass and to end training after `--epochs`
   passes; the best-on-validation weights it saved are then tested with its own `do_test`.
4. Prints, per model: seconds per training epoch (the training pass only: no loading, no
   validation), data-loading seconds, peak RSS, test MAE and Non0-Acc2 of both, and the per-pair
   ratio msakit/MMSA of the epoch time (min and median).

Results go to `OUT/against_mmsa.{json,md}`; `--publish` copies the report to
`benchmarks/results/against_mmsa.md`.

MISA and Self-MM are not run: MMSA 2.2.1 builds both on `BertTextEncoder`, which calls
`from_pretrained("bert-base-uncased")` (MISA asserts `use_bert`, SELF_MM builds it
unconditionally): a hub download, which this benchmark does not make.

Hyper-parameters: MMSA's `config_regression.json` (mosi) for each model; msakit's config is set to
match (see `MSAKIT_CONFIGS`); the differences that remain are listed in `DIFFERENCES` and in the
report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 1284, "valid": 229, "test": 686}
DIMS = {"text": 768, "audio": 5, "vision": 20}
UNALIGNED = {"text": 50, "audio": 500, "vision": 375}
MMSA_NAMES = {"tfn": "tfn", "lf_dnn": "lf_dnn", "lmf": "lmf", "mult": "mult"}

# msakit settings that match MMSA's config_regression.json, mosi (MMSA key -> ours in comments).
MSAKIT_CONFIGS = {
    # configs/tfn/mosi-mmsa.yaml (MMSA's mosi config: hidden_dims [128, 32, 128], text_out 32,
    # post_fusion_dim 64, dropouts [0.3, 0.3, 0.3, 0.5], batch 32, lr 1e-3, Adam, no decay).
    "tfn": {"config": "configs/tfn/mosi-mmsa.yaml"},
    # hidden_dims [128, 16, 128], text_out 256, post_fusion_dim 128, dropouts 0.2, batch 128,
    # lr 1e-3, weight_decay 0.01.
    "lf_dnn": {
        "model": {"name": "lf_dnn", "text_hidden": 256, "audio_hidden": 16, "vision_hidden": 128,
                  "fusion_hidden": 128, "dropout": 0.2, "fusion_dropout": 0.2},
        "data": {"batch_size": 128},
        "train": {"lr": 1e-3, "weight_decay": 0.01, "grad_clip": 0.0},
    },
    # configs/lmf/mosi-mmsa.yaml (MMSA's mosi config: hidden_dims [128, 16, 128], text_out
    # 128 // 2, rank 3, dropouts 0.3, batch 64, lr 1e-3, factor_lr 1e-3, weight_decay 0.005).
    "lmf": {"config": "configs/lmf/mosi-mmsa.yaml"},
    # configs/mult/mosi-mmsa.yaml (itself MMSA's mosi config).
    "mult": {"config": "configs/mult/mosi-mmsa.yaml"},
}

DIFFERENCES = {
    "tfn": "audio/vision subnets without BatchNorm and with two layers (MMSA: three), averaged over "
           "the real frames (MMSA: over all 50, padding included); MMSA squashes the output with "
           "sigmoid*6-3, msakit does not",
    "lf_dnn": "msakit's LF-DNN text encoder is a masked mean + MLP, MMSA's an LSTM (128) + Linear "
              "(256): the models differ in their text subnet",
    "lmf": "audio/vision subnets as for tfn; msakit trains the fusion weights and bias (MMSA's "
           "optimiser leaves them out, by list position); weight decay decoupled (AdamW; MMSA: "
           "Adam's L2 term)",
    "mult": "the same batch 16 with gradients of 8 batches per step, but MMSA sums them and clips "
            "each batch's running sum by value (0.6), msakit averages them and clips the global "
            "norm (0.6); MMSA drops the epoch's last incomplete window, msakit steps on it; masked "
            "mean pooling and key-padding masks (see the MulT docstring); dropout masks drawn from "
            "16-bit uniforms (msakit, modules/dropout.py) instead of bernoulli (MMSA), from one generator "
            "per batch: msakit runs a window's batches two at once (train.window_threads 2, "
            "each thread with 1 intra-op thread; MMSA one by one with 2)",
}


# ----------------------------------------------------------------------------- data


def write_data(path: Path, aligned: bool, seed: int = 0) -> None:
    """A MOSI-sized MMSA pickle whose label is a noisy linear function of the masked time-means of
    a few feature dims of every modality (learnable by every model here)."""
    import numpy as np

    from msakit.data.base import SplitArrays
    from msakit.data.mmsa import write_mmsa

    rng = np.random.default_rng(seed)
    steps = {m: 50 for m in DIMS} if aligned else UNALIGNED
    weights = {m: rng.normal(size=4) for m in DIMS}
    splits = {}
    for split, n in SIZES.items():
        features, lengths, score = {}, {}, np.zeros(n)
        shared_len = rng.integers(10, steps["text"] + 1, size=n)
        for m in DIMS:
            length = shared_len if aligned else rng.integers(steps[m] // 5, steps[m] + 1, size=n)
            x = rng.normal(size=(n, steps[m], DIMS[m])).astype(np.float32)
            x[np.arange(steps[m])[None, :] >= length[:, None]] = 0.0  # end padding
            mean = x[:, :, :4].sum(1) / length[:, None]
            score += mean @ weights[m] * np.sqrt(length.mean()) / 3
            features[m], lengths[m] = x, length
        labels = np.clip(score + 0.3 * rng.normal(size=n), -3, 3).astype(np.float32)
        ids = [f"v{split}{i // 10}$_${i % 10}" for i in range(n)]
        splits[split] = SplitArrays(features, lengths, labels, ids, texts=[""] * n)
    write_mmsa(path, splits)


# ----------------------------------------------------------------------------- children


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it is not inherited from the
    forking parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_msakit(args: argparse.Namespace) -> dict:
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from msakit.modules import lstm_kernel

    kernel = lstm_kernel.get()  # built before timing (a one-off per machine)
    from msakit.config import build_config
    from msakit.data import load_dataset
    from msakit.train.loop import fit

    spec = MSAKIT_CONFIGS[args.model]
    tree = yaml.safe_load((ROOT / spec["config"]).read_text()) if "config" in spec else dict(spec)
    tree = json.loads(json.dumps(tree))
    tree.setdefault("data", {}).update({"name": "mmsa", "data_path": str(args.data)})
    tree.setdefault("train", {}).update(
        {"epochs": args.epochs, "patience": 10**6, "seeds": [args.seed], "progress": False,
         "device": "cpu"})
    cfg = build_config(tree)
    started = time.perf_counter()
    data = load_dataset(cfg.data)
    load_seconds = time.perf_counter() - started
    result = fit(cfg, data, args.seed, Path(args.workdir) / "msakit_run")
    return {
        "epoch_seconds": [r["train_seconds"] for r in result.history],
        "load_seconds": load_seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "mae": result.test["mae"],
        "non0_acc2": result.test["non0_acc2"],
        "compiled_lstm": kernel is not None,
    }


class _StopTraining(Exception):
    pass


class _TimedLoader:
    """Wraps MMSA's train DataLoader: times each full pass, ends training after `epochs` passes."""

    def __init__(self, loader, epochs: int):
        self.loader, self.epochs, self.seconds = loader, epochs, []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if len(self.seconds) >= self.epochs:
            raise _StopTraining
        started = time.perf_counter()
        yield from self.loader
        self.seconds.append(time.perf_counter() - started)


def child_mmsa(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.cuda.set_device = lambda *a, **k: None  # the two CUDA calls MMSA makes unconditionally
    torch.cuda.empty_cache = lambda: None
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau

    class ReduceLROnPlateau(plateau):  # MMSA's MulT trainer passes `verbose`, gone from torch 2.13
        def __init__(self, *a, verbose=None, **k):
            super().__init__(*a, **k)

    torch.optim.lr_scheduler.ReduceLROnPlateau = ReduceLROnPlateau
    from MMSA.config import get_config_regression
    from MMSA.data_loader import MMDataLoader
    from MMSA.models import AMIO
    from MMSA.trains import ATIO
    from MMSA.utils import setup_seed

    config = get_config_regression(MMSA_NAMES[args.model], "mosi")
    work = Path(args.workdir)
    config.update({
        "featurePath": str(args.data), "custom_feature": str(args.data), "feature_T": "",
        "feature_A": "", "feature_V": "", "device": torch.device("cpu"), "train_mode": "regression",
        "cur_seed": args.seed, "model_save_path": str(work / "mmsa_model.pth"),
    })
    if args.aligned:
        config["need_data_aligned"] = True
    setup_seed(args.seed)
    started = time.perf_counter()
    loaders = MMDataLoader(config, num_workers=0)
    load_seconds = time.perf_counter() - started
    model = AMIO(config).to(config["device"])
    trainer = ATIO().getTrain(config)
    timed = _TimedLoader(loaders["train"], args.epochs)
    loaders["train"] = timed
    try:
        trainer.do_train(model, loaders)
    except _StopTraining:
        pass
    model.load_state_dict(torch.load(config["model_save_path"]))
    test = trainer.do_test(model, loaders["test"], mode="TEST")
    return {
        "epoch_seconds": timed.seconds,
        "load_seconds": load_seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "mae": float(test["MAE"]),
        "non0_acc2": float(test["Non0_acc_2"]),
    }


# ----------------------------------------------------------------------------- driver


def ensure_venv(out: Path) -> Path:
    venv = out / "mmsa-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "MMSA==2.2.1",
                        "easydict", "nvidia-ml-py3"], check=True)
    return python


def run_child(python: str, framework: str, model: str, args: argparse.Namespace, data: Path,
              workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    command = [python, str(Path(__file__).resolve()), "--child", framework, "--models", model,
               "--data", str(data), "--workdir", str(workdir), "--epochs", str(args.epochs),
               "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.aligned:
        command.append("--aligned")
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workdir)
    if done.returncode != 0:
        raise SystemExit(f"{framework} {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(model: str, pairs: list[dict]) -> dict:
    def med(framework, key):
        return statistics.median(p[framework][key] for p in pairs)

    epoch = {fw: [statistics.median(p[fw]["epoch_seconds"]) for p in pairs] for fw in ("msakit", "mmsa")}
    ratios = [ours / theirs for ours, theirs in zip(epoch["msakit"], epoch["mmsa"], strict=True)]
    return {
        "model": model,
        "epoch_seconds": {fw: statistics.median(v) for fw, v in epoch.items()},
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "load_seconds": {fw: med(fw, "load_seconds") for fw in ("msakit", "mmsa")},
        "peak_rss_mib": {fw: med(fw, "peak_rss_mib") for fw in ("msakit", "mmsa")},
        "mae": {fw: med(fw, "mae") for fw in ("msakit", "mmsa")},
        "non0_acc2": {fw: med(fw, "non0_acc2") for fw in ("msakit", "mmsa")},
        "difference": DIFFERENCES[model],
    }


def report(rows: list[dict], args: argparse.Namespace, loads: list[float]) -> str:
    layout = "aligned 50/50/50" if args.aligned else "unaligned 50/500/375"
    lines = [
        "# msakit vs thuiar/MMSA 2.2.1, side by side",
        "",
        f"`python benchmarks/against_mmsa.py --models {' '.join(args.models)} --pairs {args.pairs} "
        f"--epochs {args.epochs} --threads {args.threads}{' --aligned' if args.aligned else ''}`: MOSI-sized MMSA pickle ({layout}; 1284/229/686 samples), "
        f"{args.threads} torch threads, {args.epochs} epochs per run, {args.pairs} interleaved pairs "
        "(msakit, MMSA, msakit, MMSA, ...), each run a fresh process. Epoch = the training pass only "
        "(median over a run's epochs, then over pairs). ratio = msakit / MMSA epoch time per pair. "
        "Test metrics: the best-on-validation checkpoint of a short run (a sanity check of equal "
        "accuracy, not a result).",
        "",
        f"Machine: {os.cpu_count()} cores, shared; 1-minute load average {min(loads):.1f}-"
        f"{max(loads):.1f} over the runs (sampled before each run).",
        "",
        "| model | epoch s (msakit) | epoch s (MMSA) | ratio min | ratio median | load s (msakit / MMSA) "
        "| peak RSS MiB (msakit / MMSA) | test MAE (msakit / MMSA) | Non0-Acc2 % (msakit / MMSA) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, ld, rss, mae, acc = r["epoch_seconds"], r["load_seconds"], r["peak_rss_mib"], r["mae"], r["non0_acc2"]
        lines.append(
            f"| {r['model']} | {e['msakit']:.2f} | {e['mmsa']:.2f} | {r['ratio_min']:.2f} | "
            f"{r['ratio_median']:.2f} | {ld['msakit']:.2f} / {ld['mmsa']:.2f} | "
            f"{rss['msakit']:.0f} / {rss['mmsa']:.0f} | {mae['msakit']:.3f} / {mae['mmsa']:.3f} | "
            f"{100 * acc['msakit']:.1f} / {100 * acc['mmsa']:.1f} |"
        )
    lines += ["", "Differences that remain between the two configurations:", ""]
    lines += [f"- {r['model']}: {r['difference']}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tfn", "lf_dnn", "lmf", "mult"],
                        choices=sorted(MSAKIT_CONFIGS))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--aligned", action="store_true")
    parser.add_argument("--out", default="runs/against_mmsa")
    parser.add_argument("--publish", action="store_true",
                        help="copy the report to benchmarks/results/against_mmsa.md")
    parser.add_argument("--child", choices=["msakit", "mmsa"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.model = args.models[0]
        result = child_msakit(args) if args.child == "msakit" else child_mmsa(args)
        print(json.dumps(result))
        return

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mmsa_python = ensure_venv(out)
    data = out / ("aligned_50.pkl" if args.aligned else "unaligned_50.pkl")
    if not data.exists():
        write_data(data, args.aligned)
    rows, loads = [], []
    for model in args.models:
        pairs = []
        for k in range(args.pairs):
            loads.append(os.getloadavg()[0])
            ours = run_child(sys.executable, "msakit", model, args, data, out / "work" / model / f"ours{k}")
            loads.append(os.getloadavg()[0])
            theirs = run_child(str(mmsa_python), "mmsa", model, args, data, out / "work" / model / f"theirs{k}")
            pairs.append({"msakit": ours, "mmsa": theirs})
            print(f"{model} pair {k + 1}: msakit {statistics.median(ours['epoch_seconds']):.2f} s/epoch, "
                  f"MMSA {statistics.median(theirs['epoch_seconds']):.2f} s/epoch", flush=True)
        rows.append({**summarise(model, pairs), "pairs": pairs})
    text = report(rows, args, loads)
    (out / "against_mmsa.json").write_text(json.dumps({"rows": rows, "loads": loads}, indent=1))
    (out / "against_mmsa.md").write_text(text)
    print(text)
    if args.publish:
        shutil.copyfile(out / "against_mmsa.md", ROOT / "benchmarks" / "results" / "against_mmsa.md")


if __name__ == "__main__":
    main()
