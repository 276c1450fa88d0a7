"""Hyper-parameter search on the VALIDATION split with Optuna: `msakit tune`.

    msakit tune --config configs/lf_dnn/mosi-poria.yaml --data-root ../shared/data --trials 30 \\
        [--storage URL] [--study NAME] [--timeout S] [--space FILE] [--final-seeds 1 2 3 4 5]

- Search space: each model's `Config.search_space()` (beside the model, in its file) on top of
  `TRAIN_SPACE` (learning rate, weight decay); `--space FILE` replaces both. Format (YAML or the
  dict those functions return), one entry per config key:
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float range (log scale optional)
      model.layers: {low: 1, high: 4}                     # int range (both ends integers)
      model.hidden: [64, 128, 256]                        # categorical
  Keys are `model.*`, `train.*` or `data.batch_size` (other data keys would change the data).
- Objective: the validation selection metric (`train.select_metric`, default MAE) of the
  selected checkpoint of ONE training seed (`--tune-seed`, default the config's first seed). The
  trials train on a copy of the data WITHOUT the test split and call `fit(test=False)`, so the test
  split cannot be read while tuning.
- Pruning: each epoch's validation value goes to Optuna's pruner (median by default); sampler TPE
  by default (`constant_liar`, so parallel workers spread out).
- Storage: `sqlite:///OUT/study.db` by default; any URL Optuna accepts (PostgreSQL, MySQL) for
  workers on several machines. Every worker runs the same command; `--trials N` is the study's
  total of finished (complete or pruned) trials, shared by all workers, so rerunning an
  interrupted command resumes it (a killed worker's running trial is failed by the storage
  heartbeat after `GRACE_S` and retried once).
- At the end: the best parameters as a runnable config (OUT/best.yaml), the study summary
  (OUT/study.md, study.json, study.png: trials, best value, parameter importances by fANOVA), then
  the multi-seed run of the best config (OUT/final/, `--final-seeds`, default the config's seeds),
  the only place the test split is evaluated. `--no-final` skips it (extra workers).
- Each trial writes OUT/trials/trial_NNNN/seed_S/ (log.jsonl, metrics.json; checkpoints are
  removed after the trial) and, with `train.tensorboard=true`, TensorBoard scalars and the trial's
  hyper-parameters there (`tensorboard --logdir OUT/trials`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from msakit.config import ConfigError, ExperimentConfig, build_config, load_yaml, read_yaml
from msakit.data import MultimodalData, load_dataset
from msakit.registry import get_model_entry
from msakit.train import loop as train_loop
from msakit.train.checkpoint import write_json, write_text
from msakit.train.experiment import absolute_data_paths

log = logging.getLogger(__name__)

TRAIN_SPACE: dict[str, Any] = {
    "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "train.weight_decay": [0.0, 1e-4, 1e-3, 1e-2],
}
"""Searched for every model unless its `search_space()` or `--space` says otherwise."""
HEARTBEAT_S, GRACE_S = 30, 120
"""A worker's running trial sends a heartbeat every HEARTBEAT_S; one silent for GRACE_S is failed."""
FINISHED = ("COMPLETE", "PRUNED")


class TuneError(ValueError):
    """Bad tuning input (search space, study, storage); the message names it."""


@dataclass(frozen=True)
class Param:
    """One searched config key: a float/int range (optionally log-scaled) or a list of choices."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def parse_space(tree: Any, where: str) -> list[Param]:
    """Search-space mapping -> Params; raises TuneError naming `where` and the key."""
    if not isinstance(tree, dict) or not tree:
        raise TuneError(f"{where}: a search space is a non-empty mapping of config keys to ranges")
    params = []
    for name, spec in tree.items():
        at = f"{where}: {name}"
        if not isinstance(name, str) or not (
            name.startswith(("model.", "train.")) or name == "data.batch_size"
        ):
            raise TuneError(f"{at}: keys must be model.*, train.* or data.batch_size")
        if name in ("model.name", "train.seeds", "train.epochs", "train.device"):
            raise TuneError(f"{at}: this key is not a hyper-parameter to search")
        if isinstance(spec, list):
            if not spec or not all(isinstance(v, (bool, int, float, str)) for v in spec):
                raise TuneError(f"{at}: choices must be a non-empty list of numbers/strings/booleans")
            params.append(Param(name, "categorical", choices=tuple(spec)))
            continue
        if not isinstance(spec, dict) or set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise TuneError(f"{at}: expected a list of choices or {{low, high[, log]}}, got {spec!r}")
        low, high, use_log = spec["low"], spec["high"], spec.get("log", False)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise TuneError(f"{at}: low and high must be numbers")
        if not isinstance(use_log, bool):
            raise TuneError(f"{at}: log must be true or false")
        if not low < high or (use_log and low <= 0):
            raise TuneError(f"{at}: need low < high (and low > 0 with log), got {low}, {high}")
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        params.append(Param(name, kind, low, high, use_log))
    return params


def default_space(model_name: str) -> dict[str, Any]:
    """TRAIN_SPACE updated with the model's own `Config.search_space()` (if it declares one)."""
    config_cls = get_model_entry(model_name).config_cls
    declared = config_cls.search_space() if hasattr(config_cls, "search_space") else {}
    return {**TRAIN_SPACE, **declared}


def load_space(path: str | Path) -> dict[str, Any]:
    """The --space YAML file; TuneError when missing or empty, ConfigError when not valid YAML
    (`config.read_yaml`; each one line)."""
    tree = read_yaml(Path(path)) if Path(path).is_file() else None
    if tree is None:
        raise TuneError(f"{path}: search-space file not found or empty")
    return tree


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]  # JSON is YAML: types survive


def _storage(url: str):
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(5):  # workers started together race to create the tables: retry
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except Exception as e:  # sqlalchemy/driver errors: bad URL, server down, missing driver
            racing = any(t in str(e) for t in ("already exists", "UNIQUE constraint", "locked"))
            if attempt == 4 or not racing:
                raise TuneError(f"--storage {url}: cannot open ({str(e).splitlines()[0]})") from e
            time.sleep(1.0 + attempt)


def _identity(cfg: ExperimentConfig, space: dict, tune_seed: int) -> dict:
    """What must match for a worker to join (or resume) a study: the config minus paths and
    run-time options, the search space and the tuning seed."""
    tree = cfg.to_dict()
    tree["data"] = {k: v for k, v in tree["data"].items() if k not in ("data_root", "data_path")}
    skip = ("device", "progress", "num_threads", "tensorboard", "mlflow", "seeds")
    tree["train"] = {k: v for k, v in tree["train"].items() if k not in skip}
    return json.loads(json.dumps({"config": tree, "space": space, "tune_seed": tune_seed}))


def _without_test(data: MultimodalData) -> MultimodalData:
    splits = {k: v for k, v in data.splits.items() if k != "test"}
    return dataclasses.replace(data, splits=splits)


def _remove_checkpoints(run_dir: Path) -> None:
    for path in run_dir.glob("seed_*/*.pt"):
        path.unlink(missing_ok=True)


def _log_hparams(run_dir: Path, params: dict, metric: str, value: float) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as board:
        board.add_hparams({k: v for k, v in params.items()}, {f"hparam/valid_{metric}": value},
                          run_name=".")


def tune(
    tree: dict,
    overrides: list[str],
    out: str | Path,
    trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    timeout: float | None = None,
    space: dict | None = None,
    final_seeds: list[int] | None = None,
    final: bool = True,
    tune_seed: int | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    data: MultimodalData | None = None,
) -> dict:
    """Run (or join, or resume) a study; write the best config and summary; run the final seeds.

    Returns {"study", "best", "summary", "best_config", "final"} ("final" is the results dict of
    the multi-seed run, None with final=False). Raises TuneError / ConfigError on bad input."""
    import optuna

    if trials < 1:
        raise TuneError(f"--trials must be >= 1, got {trials}")
    out = Path(out)
    base = build_config(tree, overrides)
    train_loop.resolve_device(base.train.device)
    seed = tune_seed if tune_seed is not None else base.train.seeds[0]
    space_tree = space if space is not None else default_space(base.model_name)
    where = "--space" if space is not None else f"{base.model_name} search space"
    params = parse_space(space_tree, where)
    for p in params:  # every key must exist and every end of every range must be a valid config
        for value in (p.choices if p.kind == "categorical" else (p.low, p.high)):
            try:
                build_config(tree, [*overrides, *_overrides({p.name: value})])
            except ConfigError as e:
                raise TuneError(f"{where}: {p.name}={value!r}: {e}") from e
    out.mkdir(parents=True, exist_ok=True)  # after every check: a refused study leaves no folder
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    data = data if data is not None else load_dataset(base.data)
    metric, mode = train_loop.selection_rule(base, data.info)
    trial_data = _without_test(data)  # the trials cannot read the test split

    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = study_name or f"{base.model_name}-{base.data.name}"
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(constant_liar=True),
                "random": optuna.samplers.RandomSampler}
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
               "none": optuna.pruners.NopPruner}
    study = optuna.create_study(
        storage=_storage(url), study_name=name, load_if_exists=True,
        direction="minimize" if mode == "min" else "maximize",
        sampler=samplers[sampler](), pruner=pruners[pruner](),
    )
    identity = _identity(base, space_tree, seed)
    if "msakit" not in study.user_attrs:
        study.set_user_attr("msakit", identity)
    elif study.user_attrs["msakit"] != identity:
        raise TuneError(f"study {name!r} in {url} was created with another config, search space or "
                        "tune seed; pass a new --study name to start a new study")

    def objective(trial) -> float:
        values = {p.name: p.suggest(trial) for p in params}
        cfg = build_config(tree, [*overrides, *_overrides(values), f"train.seeds=[{seed}]"])
        run_dir = out / "trials" / f"trial_{trial.number:04d}"
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

        def report(epoch: int, value: float) -> None:
            if math.isfinite(value):
                trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("epochs", epoch)
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        try:
            result = train_loop.fit(cfg, trial_data, seed, run_dir / f"seed_{seed}", test=False,
                                    on_epoch=report)
        finally:
            _remove_checkpoints(run_dir)
        trial.set_user_attr("epochs", len(result.history))
        trial.set_user_attr("best_epoch", result.best_epoch)
        value = result.valid[metric]
        if cfg.train.tensorboard:
            _log_hparams(run_dir / f"seed_{seed}", values, metric, value)
        return value

    finished = sum(t.state.name in FINISHED for t in study.trials)
    if finished < trials:
        log.info("study %s (%s): %d of %d trials finished; running up to %d more", name, url,
                 finished, trials, trials - finished)
        study.optimize(
            objective, n_trials=trials - finished, timeout=timeout,
            callbacks=[optuna.study.MaxTrialsCallback(
                trials, states=tuple(optuna.trial.TrialState[s] for s in FINISHED))],
            catch=(train_loop.TrainingError,),
        )
    summary = summarize(study, metric, out)
    best = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not best:
        raise TuneError(f"study {name!r}: no trial completed (see {out / 'study.md'})")
    best_trial = study.best_trial
    seeds = final_seeds or base.train.seeds
    best_cfg = absolute_data_paths(build_config(tree, [*overrides, *_overrides(best_trial.params),
                                                       f"train.seeds={json.dumps(list(seeds))}"]))
    best_path = out / "best.yaml"
    header = (f"# msakit train --config {best_path} --out {out / 'final'}\n"
              f"# best of Optuna study {name!r} ({len(summary['trials'])} trials): trial "
              f"{best_trial.number}, validation {metric} {best_trial.value:.6g} (seed {seed}).\n"
              "# Tuned on the validation split only; the test split was not read.\n")
    write_text(header + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False), best_path)
    results = None
    if final:
        from msakit.train.experiment import run_experiment

        final_dir = out / "final"  # an interrupted final run continues
        results = run_experiment(best_cfg, final_dir, resume=(final_dir / "config.yaml").is_file(), data=data)
    return {"study": name, "storage": url, "best": {"number": best_trial.number, "value": best_trial.value,
                                                     "params": best_trial.params},
            "summary": summary, "best_config": str(best_path), "final": results, "metric": metric}


def summarize(study, metric: str, out: Path) -> dict:
    """Write OUT/study.json, study.md (table) and study.png (history + importances)."""
    import optuna

    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
         "epochs": t.user_attrs.get("epochs"), "worker": t.user_attrs.get("worker"),
         "seconds": t.duration.total_seconds() if t.duration else None}
        for t in study.trials
    ]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    importances, note = {}, ""
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as e:
        note = f"parameter importances unavailable: {e}"
    summary = {"study": study.study_name, "direction": study.direction.name.lower(),
               "metric": metric, "counts": counts, "trials": trials,
               "importances": importances, "note": note}
    write_json(summary, out / "study.json")
    write_text(format_summary(summary), out / "study.md")
    _plot(summary, out / "study.png")
    return summary


def format_summary(summary: dict) -> str:
    metric, counts = summary["metric"], summary["counts"]
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    reverse = summary["direction"] == "maximize"
    done.sort(key=lambda t: t["value"], reverse=reverse)
    keys = sorted({k for t in summary["trials"] for k in t["params"]})
    lines = [f"study {summary['study']}: {len(summary['trials'])} trials ("
             + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) + ")"]
    if done:
        lines.append(f"best validation {metric}: {done[0]['value']:.4f} (trial {done[0]['number']})")
    lines += ["", f"| trial | valid {metric} | epochs | " + " | ".join(keys) + " |",
              "|---:|---:|---:|" + "---:|" * len(keys)]
    for t in done[:10]:
        cells = [_cell(t["params"].get(k)) for k in keys]
        lines.append(f"| {t['number']} | {t['value']:.4f} | {t['epochs']} | " + " | ".join(cells) + " |")
    if summary["importances"]:
        lines += ["", "| parameter | importance (fANOVA) |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in summary["importances"].items()]
    if summary["note"]:
        lines += ["", summary["note"]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (history, bars) = plt.subplots(1, 2, figsize=(11, 4))
    done = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    pruned = [t for t in summary["trials"] if t["state"] == "PRUNED"]
    history.scatter([t["number"] for t in done], [t["value"] for t in done], s=14, label="complete")
    better = max if summary["direction"] == "maximize" else min
    best, running = [], None
    for t in sorted(done, key=lambda t: t["number"]):
        running = t["value"] if running is None else better(running, t["value"])
        best.append((t["number"], running))
    if best:
        history.step(*zip(*best, strict=True), where="post", color="C3", label="best so far")
    history.set(xlabel="trial", ylabel=f"validation {summary['metric']}",
                title=f"{summary['study']} ({len(pruned)} pruned)")
    history.legend()
    names = list(summary["importances"])[::-1]
    bars.barh(names, [summary["importances"][n] for n in names])
    bars.set(xlabel="importance (fANOVA)", title="parameter importances"
             if names else "importances: too few complete trials")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def tune_from_files(config: str | None, overrides: list[str], space_file: str | None, **kwargs) -> dict:
    """CLI entry: YAML config file + overrides + optional search-space file."""
    tree = load_yaml(config) if config else {}
    space = load_space(space_file) if space_file else None
    return tune(tree, overrides, space=space, **kwargs)
