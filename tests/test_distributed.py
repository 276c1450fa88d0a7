"""DDP through torchrun: shards, gradient equivalence with one process, the CLI under torchrun
with two gloo processes (metrics, rank-0 writes, exactly-once evaluation, resume), refusals."""

from __future__ import annotations

import atexit
import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from fakes import make_data
from tqdm.auto import tqdm

from msakit.config import build_config
from msakit.data import to_loader
from msakit.registry import create_model, get_model_entry
from msakit.train import distributed
from msakit.train.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
SETS = ["model.text_hidden=8", "model.audio_hidden=4", "model.vision_hidden=4", "model.fusion_hidden=8",
        "model.dropout=0", "model.fusion_dropout=0", "data.batch_size=16", "data.synthetic.train_size=64",
        "data.synthetic.valid_size=30", "data.synthetic.test_size=37", "train.num_threads=1",
        "train.patience=100"]


def test_the_epoch_order_is_one_per_seed_whatever_iterates_it():
    """The loop iterates the loader through a progress bar, which makes a DataLoader iterator of
    its own; with DataLoader's own shuffling each iterator advanced the seeded generator, so the
    loop saw another order than the multi-process path, which builds its batches directly. The
    order is pinned to the one every earlier one-process run trained on, and the global random
    stream (dropout) is left untouched."""
    data = make_data()
    loader = to_loader(data.splits["train"], data.info, 8, True, 7)
    state = torch.get_rng_state()
    through_bar = [b.index.tolist() for b in tqdm(loader, disable=True)]
    assert [b.index.tolist() for b in loader] == through_bar
    assert through_bar[0] == [19, 21, 45, 17, 8, 5, 16, 9]
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("whole_videos", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_shards_split_each_one_process_batch_exactly(world, whole_videos):
    arrays, info = make_data(sizes=(50, 16, 16)).splits["train"], make_data().info
    for shuffle in (True, False):
        one = [b.index.tolist() for b in to_loader(arrays, info, 8, shuffle, 3, whole_videos)]
        shards = [[b.index.tolist() for b in to_loader(arrays, info, 8, shuffle, 3, whole_videos,
                                                        shard=(r, world))] for r in range(world)]
        if shuffle:  # training: every process takes every step
            assert len({len(s) for s in shards}) == 1
        glued = [sum((s[i] for s in shards if i < len(s)), []) for i in range(max(map(len, shards)))]
        kept = [b for b in one if not (shuffle and not whole_videos and len(b) < world)]
        assert glued == kept  # each one-process batch, in order, cut into contiguous shards
    evaluated = sorted(i for r in range(world) for b in to_loader(arrays, info, 8, False, shard=(r, world))
                       for i in b.index.tolist())
    assert evaluated == list(range(50))  # evaluation: every sample exactly once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from msakit.train.loop import build_optimizers, default_training_step

    data = make_data(sizes=(64, 16, 16))
    cfg = build_config({"model": {"name": "lf_dnn"}}, SETS[:7])
    ctx, device = distributed.setup(torch.device("cpu"))
    batch = next(iter(to_loader(data.splits["train"], data.info, 16, True, 5, shard=ctx.shard)))
    torch.manual_seed(0)
    model = create_model("lf_dnn", cfg.model, data.info)
    default_training_step(model, batch, build_optimizers(model, cfg), cfg.train, (1, 1),
                          forward=distributed.wrap(model, device))
    if rank == 0:
        torch.save({k: p.grad for k, p in model.named_parameters()}, out)
    # setup() leaves the group at exit: a gloo process exiting inside it may abort (SIGABRT)
    atexit._run_exitfuncs()
    assert not torch.distributed.is_initialized()


def test_two_gloo_processes_average_to_the_one_process_gradient(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_one_step, args=(_free_port(), str(out)), nprocs=2)
    from msakit.train.loop import build_optimizers, default_training_step

    data = make_data(sizes=(64, 16, 16))
    cfg = build_config({"model": {"name": "lf_dnn"}}, SETS[:7])
    batch = next(iter(to_loader(data.splits["train"], data.info, 16, True, 5)))
    torch.manual_seed(0)
    model = create_model("lf_dnn", cfg.model, data.info)
    default_training_step(model, batch, build_optimizers(model, cfg), cfg.train, (1, 1))
    ddp = torch.load(out)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_torchrun_two_gloo_processes_match_one_process_and_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MSAKIT_CACHE": str(tmp_path / "cache")}

    def torchrun(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "msakit", "train", "--out", str(tmp_path / "ddp"), *args, "--set", *SETS],
            env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    torchrun("--epochs", "2", "--quiet")
    done = torchrun("--epochs", "3", "--resume")  # continues from rank 0's last.pt
    assert done.stdout.count("lf_dnn on synthetic (test split") == 1  # one table: rank 0's
    assert done.stderr.count("INFO msakit: model lf_dnn on synthetic") == 1  # one log: rank 0's
    one = run_experiment(build_config({}, [*SETS, "train.epochs=3", "train.progress=false"]), tmp_path / "one")
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    # the same global batches in the same order (a progress bar's extra DataLoader iterator once
    # shifted the one-process order: 1.336 vs 1.350 valid MAE after one epoch): equal up to the
    # float summation order of the gradient all-reduce
    for key in ("mae", "corr"):
        assert ddp["test_mean"][key] == pytest.approx(one["test_mean"][key], abs=1e-5)
    logs = [[json.loads(x) for x in (tmp_path / d / "seed_1" / "log.jsonl").read_text().splitlines()]
            for d in ("ddp", "one")]
    assert [r["epoch"] for r in logs[0]] == [1, 2, 3]
    for key in ("valid_mae", "train_loss"):  # train_loss: both processes' shards, not rank 0's
        np.testing.assert_allclose([r[key] for r in logs[0]], [r[key] for r in logs[1]], atol=1e-5)
    rows = [list(csv.DictReader((tmp_path / d / "seed_1" / "predictions_test.csv").open())) for d in ("ddp", "one")]
    assert [r["id"] for r in rows[0]] == [r["id"] for r in rows[1]]  # 37 rows, each once, in order
    assert len(rows[0]) == 37
    assert not list((tmp_path / "ddp").glob("**/*.tmp"))


@pytest.mark.parametrize("model", ["mmcl", "pase", "self_mm"])
def test_models_that_cannot_be_replicated_refuse_with_the_reason(model):
    data = make_data()
    net = create_model(model, dataclasses.replace(get_model_entry(model).config_cls.tiny()), data.info)
    with pytest.raises(ValueError, match=f"model '{model}' cannot train with torchrun/DDP: "):
        distributed.check_supported(net, model)
    distributed.check_supported(create_model("lf_dnn", get_model_entry("lf_dnn").config_cls.tiny(),
                                              data.info), "lf_dnn")
