"""Command line: `msakit train | eval | analyze | personality fit | list-models | list-datasets`.

Every command is also callable in-process as `main([...])` (tests do so); errors in the user's
input end with a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from msakit.config import ConfigError, build_config, load_yaml
from msakit.data import DataError, list_datasets
from msakit.metrics import format_table
from msakit.registry import list_models
from msakit.train.checkpoint import CheckpointError
from msakit.train.loop import TrainingError

log = logging.getLogger("msakit")

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError)

REGRESSION_KEYS = ["mae", "corr", "acc7", "acc5", "has0_acc2", "has0_f1", "non0_acc2", "non0_f1"]


def _table_keys(metrics: dict) -> list[str]:
    if "mae" in metrics and "acc7" in metrics:
        return REGRESSION_KEYS
    return [k for k in metrics if k != "loss"]


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="registered dataset (msakit list-datasets)")
    parser.add_argument("--data-root", help="folder of dataset folders (default: $MSAKIT_DATA)")
    parser.add_argument("--data-path", help="a data file (MMSA / MulT pickle)")


def _data_overrides(args: argparse.Namespace) -> list[str]:
    sets = []
    if args.dataset:
        sets.append(f"data.name={args.dataset}")
    if args.data_root:
        sets.append(f"data.data_root={args.data_root}")
    if args.data_path:
        sets.append(f"data.data_path={args.data_path}")
    return sets


def cmd_train(args: argparse.Namespace) -> int:
    from msakit.train.experiment import run_experiment

    tree = load_yaml(args.config) if args.config else {}
    sets = _data_overrides(args)
    if args.model:
        sets.append(f"model.name={args.model}")
    if args.seeds:
        sets.append(f"train.seeds=[{', '.join(map(str, args.seeds))}]")
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    if args.device:
        sets.append(f"train.device={args.device}")
    if args.quiet:
        sets.append("train.progress=false")
    cfg = build_config(tree, sets + list(args.set or []))
    out = Path(args.out or f"runs/{cfg.model_name}_{cfg.data.name}_{time.strftime('%Y%m%d-%H%M%S')}")
    log.info("model %s on %s, seeds %s -> %s", cfg.model_name, cfg.data.name, cfg.train.seeds, out)
    results = run_experiment(cfg, out, resume=args.resume)
    keys = _table_keys(results["test_mean"])
    rows = [(f"seed {r['seed']}", r["test"], {}) for r in results["per_seed"]]
    rows.append(("mean ± std", results["test_mean"], results["test_std"]))
    print(f"\n{results['model']} on {results['dataset']} (test split; selected on validation "
          f"{results['selection']['metric']})")
    print(format_table(rows, keys))
    print(f"\nresults: {out / 'results.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from msakit.evaluate import evaluate_checkpoint
    from msakit.train.checkpoint import write_json

    metrics = evaluate_checkpoint(args.checkpoint, _data_overrides(args), split=args.split)
    print(f"\n{args.checkpoint} on the {args.split} split")
    print(format_table([("", metrics, {})], _table_keys(metrics)))
    if args.out:
        write_json(metrics, args.out)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from msakit.analysis import analyze_checkpoint, format_contributions

    out = Path(args.out or Path(args.checkpoint).parent / "analysis")
    result = analyze_checkpoint(args.checkpoint, _data_overrides(args), split=args.split,
                                metric=args.metric, out_dir=out)
    print(f"\n{result['model']} on {result['dataset']} ({args.split} split): modality subsets "
          "(absent modalities' features zeroed) and exact Shapley values")
    print(format_contributions(result))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\nwrote {out / 'shapley.json'} and {out / 'shapley.png'}")
    return 0


def cmd_list_models(args: argparse.Namespace) -> int:
    for name, summary in list_models().items():
        print(f"{name:16s} {summary}")
    return 0


def cmd_list_datasets(args: argparse.Namespace) -> int:
    for name, summary in list_datasets().items():
        print(f"{name:16s} {summary}")
    return 0


def cmd_personality(args: argparse.Namespace) -> int:
    from msakit.personality import fit_personality_head

    meta = fit_personality_head(
        args.csv, args.text_column, args.trait_columns, args.encoder, args.out,
        epochs=args.epochs, lr=args.lr, hidden=args.hidden, batch_size=args.batch_size,
        valid_fraction=args.valid_fraction, seed=args.seed, max_length=args.max_length,
        pooling=args.pooling,
    )
    scores = ", ".join(f"{k} {meta[k]:.4f}" for k in ("train_mse", "valid_mse", "valid_mse_of_train_mean")
                       if k in meta)
    print(f"Big-Five head on {meta['rows']} rows over {meta['encoder_description']} "
          f"({meta['pooling']} pooling): {scores}")
    print(f"wrote {Path(args.out)}; use it with --set model.personality_encoder={args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msakit", description="Multimodal sentiment analysis toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser("train", help="train and evaluate a model (default: lf_dnn on synthetic)")
    train.add_argument("--model", help="registered model (msakit list-models)")
    _add_data_args(train)
    train.add_argument("--seeds", type=int, nargs="+", help="training seeds (one run each)")
    train.add_argument("--epochs", type=int, help="maximum epochs")
    train.add_argument("--out", help="output folder (default runs/<model>_<dataset>_<time>)")
    train.add_argument("--config", help="YAML experiment config")
    train.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override, e.g. model.hidden=64")
    train.add_argument("--resume", action="store_true", help="continue the runs found in --out")
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a saved checkpoint (best.pt)")
    evaluate.add_argument("--checkpoint", required=True)
    _add_data_args(evaluate)
    evaluate.add_argument("--split", default="test", choices=["train", "valid", "test"])
    evaluate.add_argument("--out", help="write the metrics to this JSON file")
    evaluate.set_defaults(handler=cmd_eval)

    analyze = commands.add_parser("analyze", help="modality Shapley contributions of a checkpoint")
    analyze.add_argument("--checkpoint", required=True)
    _add_data_args(analyze)
    analyze.add_argument("--split", default="test", choices=["train", "valid", "test"])
    analyze.add_argument("--metric", help="metric of the utility (default: the selection metric)")
    analyze.add_argument("--out", help="folder for shapley.json/png (default: <checkpoint dir>/analysis)")
    analyze.set_defaults(handler=cmd_analyze)

    personality = commands.add_parser("personality", help="personality encoders for PSA-MF")
    personality_commands = personality.add_subparsers(dest="personality_command", required=True)
    fit = personality_commands.add_parser(
        "fit", help="fit a Big-Five regression head on frozen text embeddings of a CSV")
    fit.add_argument("--csv", required=True, help="CSV with a text column and five trait columns in [0, 1]")
    fit.add_argument("--text-column", default="text")
    fit.add_argument("--trait-columns", nargs=5, required=True, metavar="COL",
                     help="openness, conscientiousness, extraversion, agreeableness, neuroticism")
    fit.add_argument("--encoder", default="minilm", help="minilm, tiny or a local model folder")
    fit.add_argument("--out", required=True, help="folder for head.pt and personality.json")
    fit.add_argument("--epochs", type=int, default=100)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--hidden", type=int, default=64, help="hidden units of the head (0: linear)")
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--valid-fraction", type=float, default=0.2, help="rows held out to report MSE")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--max-length", type=int, default=50, help="tokens per text")
    fit.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"])
    fit.set_defaults(handler=cmd_personality)

    commands.add_parser("list-models", help="registered models").set_defaults(handler=cmd_list_models)
    commands.add_parser("list-datasets", help="registered datasets").set_defaults(
        handler=cmd_list_datasets
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except USER_ERRORS as e:
        print(f"msakit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
