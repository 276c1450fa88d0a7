"""Per-epoch experiment tracking beside the run folder's own files: TensorBoard and MLflow.

`open_trackers(cfg, run_dir)` is the one entry point: it returns a `Trackers` that the training
loop feeds each epoch's record (`log.jsonl`'s row: train/valid metrics, loss terms, seconds, lr)
and closes at the end. Both are optional and off by default; `results.json`, `metrics.json` and
`log.jsonl` in the run folder stay the source of truth, and a tracker only mirrors them.

- `train.tensorboard=true`: scalars to RUN/seed_<s>/tensorboard (`pip install tensorboard`).
- `train.mlflow=URI`: one MLflow run per seed in the experiment "<model>-<dataset>" of the
  tracking store URI (e.g. `sqlite:///runs/mlflow.db`, or a server `http://host:5000`): the
  flattened config as params, each epoch's numbers as metrics at step = epoch, the run folder as
  the tag `msakit.run_dir` (a resumed seed continues in a new MLflow run). `pip install
  mlflow-skinny` (or mlflow) is enough; a local SQLite store needs sqlalchemy + alembic, which
  `msakit[tune]` (Optuna) already brings. MLflow 3's plain folder store (`./mlruns`) is refused by
  MLflow itself unless MLFLOW_ALLOW_FILE_STORE=true.
A missing package is a TrainingError naming the option and the package (the CLI exits 2).
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import Any

MLFLOW_PARAM_CHARS = 6000
"""MLflow's limit on a parameter value's length."""


class Trackers:
    """The trackers a run's config asked for; `log` and `close` do nothing when it asked for none."""

    def __init__(self, board: Any = None, mlflow: tuple[Any, str] | None = None) -> None:
        self.board, self.mlflow = board, mlflow
        # a run left by an exception (a pruned tune trial, Ctrl-C, a NaN loss) is marked KILLED
        # when the Trackers is dropped, so no MLflow run stays RUNNING for ever
        self._unfinished = weakref.finalize(self, mlflow[0].set_terminated, mlflow[1], "KILLED") if mlflow else None

    def log(self, record: dict, epoch: int) -> None:
        """Mirror one epoch's record: every number (booleans as 0/1) except `epoch` itself."""
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.board is not None:
            for key, value in numbers.items():
                self.board.add_scalar(key.replace("_", "/", 1), value, epoch)
            self.board.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in numbers.items()])

    def close(self) -> None:
        """End of training: flush TensorBoard, mark the MLflow run FINISHED."""
        if self.board is not None:
            self.board.close()
        if self.mlflow is not None:
            self._unfinished.detach()
            client, run_id = self.mlflow
            client.set_terminated(run_id, "FINISHED")
        self.board = self.mlflow = None


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:MLFLOW_PARAM_CHARS]
    return flat


def _mlflow_run(cfg, run_dir: Path) -> tuple[Any, str]:
    from msakit.train.loop import TrainingError

    try:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise TrainingError("train.mlflow needs the mlflow package: pip install mlflow-skinny") from e
    try:
        client = MlflowClient(tracking_uri=cfg.train.mlflow)
        name = f"{cfg.model_name}-{cfg.data.name}"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=f"{run_dir.parent.name}/{run_dir.name}",
                                tags={"msakit.run_dir": str(Path(run_dir).resolve())})
        params = [Param(k, v) for k, v in _flatten(cfg.to_dict()).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.info.run_id, params=params[start:start + 100])
    except Exception as e:  # MlflowException, sqlalchemy, connection errors: one line, exit 2
        raise TrainingError(f"train.mlflow={cfg.train.mlflow}: {str(e).splitlines()[0]}") from e
    return client, run.info.run_id


def open_trackers(cfg, run_dir: Path) -> Trackers:
    """The trackers `cfg.train` asks for, opened for the seed folder `run_dir`; raises TrainingError
    when a tracker's package is missing or its store cannot be opened."""
    board = None
    if cfg.train.tensorboard:
        from msakit.train.loop import TrainingError

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrainingError("train.tensorboard=true needs the tensorboard package: "
                                "pip install tensorboard") from e
        board = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    return Trackers(board, _mlflow_run(cfg, run_dir) if cfg.train.mlflow else None)
