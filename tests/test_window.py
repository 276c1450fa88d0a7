"""train.window_threads: a gradient-accumulation window's batches run at once (msakit/train/window.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time

import numpy as np
import pytest
import torch
from fakes import DIMS, make_data, run_interrupted
from torch import nn

from msakit.batch import ModelOutput
from msakit.cli import main
from msakit.config import ConfigError, build_config
from msakit.data import to_loader
from msakit.modules import dropout
from msakit.registry import create_model, get_model_entry
from msakit.train import loop
from msakit.train.experiment import run_experiment
from msakit.train.loop import TrainingError, checked_losses
from msakit.train.precision import Precision
from msakit.train.window import ConcurrentWindows, WindowError


def tiny_config(model: str, *sets: str):
    tiny = dataclasses.asdict(get_model_entry(model).config_cls.tiny())
    return build_config({"model": {"name": model, **tiny}}, ["train.progress=false", "data.batch_size=8", *sets])


def mult_and_batches(dropouts: float = 0.3):
    data = make_data()
    cfg = tiny_config("mult", f"model.attn_dropout={dropouts}", f"model.embed_dropout={dropouts}",
                      f"model.output_dropout={dropouts}", f"model.res_dropout={dropouts}")
    torch.manual_seed(0)
    model = create_model("mult", cfg.model, data.info)
    batches = list(to_loader(data.splits["train"], data.info, 8, shuffle=False))[:4]
    return model, batches


def window_gradients(model, batches, threads: int, seed: int = 5) -> list[torch.Tensor]:
    """The summed gradients of one window of all `batches`, run by ConcurrentWindows."""
    windows = ConcurrentWindows(model, threads, Precision("32", torch.device("cpu")).autocast, checked_losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(seed)
    outs = []
    for i, batch in enumerate(batches):
        outs += windows.add(batch, (1, i + 1), (i, len(batches)), {"main": optimizer})
        assert len(outs) == (len(batches) if i + 1 == len(batches) else 0)  # nothing before the last
    windows.close()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_concurrent_window_equals_the_batches_run_one_by_one_with_their_own_generators():
    model, batches = mult_and_batches()
    one, two = window_gradients(model, batches, 1), window_gradients(model, batches, 2)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))  # bit-identical
    # by hand: seeds drawn in batch order, each batch's dropout from its own generator, each loss
    # divided by the window size, gradients summed in batch order
    torch.manual_seed(5)
    seeds = torch.randint(0, 2**62, (len(batches),)).tolist()
    expected = None
    for batch, seed in zip(batches, seeds, strict=True):
        with dropout.batch_generator(torch.Generator().manual_seed(seed)):
            loss = sum(model(batch).losses.values()) / len(batches)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(one, expected, strict=True))
    # the draws really differ per batch: same seed for every batch gives other gradients
    other = [g.clone() for g in one]
    assert any(not torch.equal(a, b) for a, b in zip(window_gradients(model, batches, 2, seed=6), other,
                                                      strict=True))


def test_keep_mask_draws_from_the_block_generator_and_leaves_the_global_one_alone():
    state = torch.get_rng_state()
    with dropout.batch_generator(torch.Generator().manual_seed(3)):
        a, _ = dropout.keep_mask((64, 64), 0.5)
    assert torch.equal(state, torch.get_rng_state())
    with dropout.batch_generator(torch.Generator().manual_seed(3)):
        b, _ = dropout.keep_mask((64, 64), 0.5)
    assert torch.equal(a, b)
    c, _ = dropout.keep_mask((64, 64), 0.5)  # outside a block: the global generator again
    assert not torch.equal(state, torch.get_rng_state()) and not torch.equal(a, c)


class _Declared(nn.Module):
    """Claims concurrent_batches but breaks the contract the way `kind` says."""

    concurrent_batches = True

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(DIMS["text"], 1)
        self.norm = nn.BatchNorm1d(DIMS["text"])
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, batch):
        x = batch.features("text").mean(1)
        if self.kind == "global_dropout":
            x = nn.functional.dropout(x, 0.5, training=True)
        elif self.kind == "buffer":
            x = self.norm(x)
        elif self.kind == "reassigned_buffer":
            self.calls = self.calls + 1
        elif self.kind == "numpy":
            x = x * float(np.random.rand())
        elif self.kind == "random":
            x = x * random.random()
        elif self.kind == "parameter":
            with torch.no_grad():
                self.linear.weight.clamp_(-1.0, 1.0)
        elif self.kind == "bug":
            raise ValueError("a bug in the model")
        loss = self.linear(x).square().mean()
        return ModelOutput(loss.detach(), {"loss": loss})


@pytest.mark.parametrize("kind", ["global_dropout", "buffer", "reassigned_buffer", "numpy", "random",
                                  "parameter"])
def test_a_model_breaking_the_concurrent_contract_is_caught(kind):
    data = make_data(sizes=(16, 4, 4))
    model = _Declared(kind)
    batches = list(to_loader(data.splits["train"], data.info, 8, shuffle=False))
    with pytest.raises(WindowError, match="global random generator or wrote a buffer or parameter"):
        window_gradients(model, batches, 2)
    model.kind = "clean"
    window_gradients(model, batches, 2)  # the same model without the breach passes


def test_a_models_own_error_in_a_worker_reaches_the_caller_as_it_is():
    data = make_data(sizes=(16, 4, 4))
    batches = list(to_loader(data.splits["train"], data.info, 8, shuffle=False))
    with pytest.raises(ValueError, match="a bug in the model") as raised:
        window_gradients(_Declared("bug"), batches, 2)
    assert not isinstance(raised.value, WindowError)  # the loop reports only WindowError in one line


def test_window_threads_is_validated_and_refused_where_it_cannot_run(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.window_threads must be >= 1"):
        build_config({}, ["train.window_threads=0"])
    data = make_data()
    refusals = [
        ("lf_dnn", [], "does not declare concurrent_batches"),
        ("mult", ["train.precision=16"], "precision 16"),
        ("mult", ["train.compile=true"], "train.compile"),
    ]
    for i, (model, sets, message) in enumerate(refusals):
        cfg = tiny_config(model, "train.epochs=1", "train.window_threads=2", "train.grad_accumulation=2", *sets)
        with pytest.raises(TrainingError, match=message):
            run_experiment(cfg, tmp_path / str(i), data=data)
    code = main(["train", "--model", "lf_dnn", "--dataset", "synthetic", "--out", str(tmp_path / "cli"),
                 "--set", "train.epochs=1", "train.window_threads=2", "train.grad_accumulation=2",
                 "train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.window_threads=2" in err[0] and "lf_dnn" in err[0]
    assert "train.window_threads=1 runs the batches one by one" in err[0]  # what to do instead
    cpu = torch.device("cpu")
    mult, lf_dnn = (create_model(name, tiny_config(name).model, data.info) for name in ("mult", "lf_dnn"))
    train = tiny_config("mult", "train.window_threads=2", "train.grad_accumulation=2").train
    assert isinstance(ConcurrentWindows.create(mult, "mult", train, cpu, False, None, None), ConcurrentWindows)
    # where nothing would run at once (GPU, torchrun, no accumulation) the option is ignored, even
    # with a model or options it refuses on CPU: the MulT -mmsa configs run there with fp16/compile
    for sets in ([], ["train.precision=16"], ["train.compile=true"]):
        train = tiny_config("mult", "train.window_threads=2", "train.grad_accumulation=2", *sets).train
        for model, name in ((mult, "mult"), (lf_dnn, "lf_dnn")):
            assert ConcurrentWindows.create(model, name, train, torch.device("meta"), False, None, None) is None
            assert ConcurrentWindows.create(model, name, train, cpu, True, None, None) is None  # torchrun
    train = tiny_config("mult", "train.window_threads=2").train  # grad_accumulation 1: a window is one batch
    assert ConcurrentWindows.create(mult, "mult", train, cpu, False, None, None) is None


def test_training_with_window_threads_is_reproducible_and_steps_once_per_window(tmp_path, monkeypatch):
    data = make_data()
    sets = ("train.epochs=2", "train.grad_accumulation=3", "train.window_threads=2", "train.patience=100")
    steps = {"n": 0}
    real_finish = loop.finish_window

    def counting_finish(*args, **kwargs):
        steps["n"] += 1
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(loop, "finish_window", counting_finish)
    a = run_experiment(tiny_config("mult", *sets), tmp_path / "a", data=data)
    assert steps["n"] == 2 * 2  # 6 batches of 8 a epoch: two windows of 3
    b = run_experiment(tiny_config("mult", *sets), tmp_path / "b", data=data)
    assert a["per_seed"][0]["test"] == b["per_seed"][0]["test"]
    log = [json.loads(line) for line in (tmp_path / "a" / "seed_1" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["train_loss"] > 0 for r in log)  # the windows' losses were logged
    one = run_experiment(tiny_config("mult", *sets[:-2], "train.patience=100"), tmp_path / "c", data=data)
    assert one["per_seed"][0]["test"] != a["per_seed"][0]["test"]  # other dropout draws


class _SharedGradient(nn.Module):
    """Two parameters whose gradients autograd returns as ONE tensor (the sum's backward passes
    its gradient to both inputs)."""

    concurrent_batches = True

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(DIMS["text"])), nn.Parameter(torch.ones(DIMS["text"]))

    def forward(self, batch):
        loss = ((self.a + self.b) * batch.features("text").mean((0, 1))).sum()
        return ModelOutput(loss.detach(), {"loss": loss})


def test_parameters_sharing_one_gradient_tensor_are_summed_as_sequential_accumulation():
    data = make_data(sizes=(24, 4, 4))
    batches = list(to_loader(data.splits["train"], data.info, 8, shuffle=False))
    model = _SharedGradient()
    got = window_gradients(model, batches, 2)
    assert model.a.grad.data_ptr() != model.b.grad.data_ptr()  # each its own buffer
    model.zero_grad(set_to_none=True)
    for batch in batches:
        (model(batch).losses["loss"] / len(batches)).backward()
    assert torch.allclose(got[0], model.a.grad) and torch.allclose(got[1], model.b.grad)


def test_a_window_leaves_the_intra_op_threads_of_threads_started_later_as_they_were():
    # torch.set_num_threads in a worker also sets the count every thread started later begins with
    model, batches = mult_and_batches()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        window_gradients(model, batches[:2], 2)
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert torch.get_num_threads() == 2 and seen == [2]
    finally:
        torch.set_num_threads(before)


class _NanFirst(nn.Module):
    """The first batch's loss is NaN at once; each other batch takes 0.3 s and is recorded."""

    concurrent_batches = True

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(DIMS["text"], 1)
        self.finished: list[int] = []

    def forward(self, batch):
        loss = self.linear(batch.features("text").mean(1)).square().mean()
        first = batch.ids[0] == "v0_0"
        if not first:
            time.sleep(0.3)
            self.finished.append(len(self.finished))
        return ModelOutput(loss.detach(), {"loss": loss * math.nan if first else loss})


def test_an_error_in_a_window_leaves_no_batch_running_behind_it():
    data = make_data(sizes=(32, 4, 4))
    model = _NanFirst()
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 1"):
        window_gradients(model, list(to_loader(data.splits["train"], data.info, 4, shuffle=False)), 2)
    finished = len(model.finished)
    time.sleep(1.0)
    assert len(model.finished) == finished < 7  # the queued batches were dropped, none ran on


def test_parameters_frozen_or_unfrozen_between_windows_are_followed():
    data = make_data(sizes=(16, 4, 4))
    batches = list(to_loader(data.splits["train"], data.info, 8, shuffle=False))
    model = _SharedGradient()
    model.b.requires_grad_(False)
    windows = ConcurrentWindows(model, 2, Precision("32", torch.device("cpu")).autocast, checked_losses)
    optimizers = {"main": torch.optim.SGD(model.parameters(), lr=0.0)}
    for epoch in (1, 2):
        for i, batch in enumerate(batches):
            windows.add(batch, (epoch, i + 1), (i, len(batches)), optimizers)
        assert (model.a.grad is not None, model.b.grad is not None) == ((True, False) if epoch == 1 else (False, True))
        model.a.requires_grad_(False)  # as a model's on_epoch_end might, e.g. to unfreeze an encoder
        model.b.requires_grad_(True)
    windows.close()


def test_a_window_never_runs_more_threads_than_torch_may_use():
    # train.num_threads=1 (or OMP_NUM_THREADS=1) with a config setting window_threads 2: one worker,
    # and the same gradients as two workers with one thread each
    model, batches = mult_and_batches()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = window_gradients(model, batches, 2)
        torch.set_num_threads(1)
        workers = set()
        hook = model.register_forward_pre_hook(lambda module, args: workers.add(threading.get_ident()))
        one = window_gradients(model, batches, 2)
        hook.remove()
    finally:
        torch.set_num_threads(before)
    assert len(workers) == 1 and all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_resume_with_window_threads_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = make_data()  # 6 batches an epoch: windows of 4 and 2 (the epoch's last one shorter)
    sets = ("train.epochs=3", "train.grad_accumulation=4", "train.window_threads=2", "train.patience=100")
    whole = run_experiment(tiny_config("mult", *sets), tmp_path / "whole", data=data)
    run_interrupted(tiny_config("mult", *sets), tmp_path / "cut", data, monkeypatch, saves=1)
    resumed = run_experiment(tiny_config("mult", *sets), tmp_path / "cut", resume=True, data=data)
    assert resumed["per_seed"][0]["test"] == whole["per_seed"][0]["test"]


def test_fit_reports_window_refusals_in_one_line_but_lets_a_model_bug_through(tmp_path, monkeypatch):
    from msakit.models.mult import MulT

    def broken(self, batch):
        raise ValueError("a bug in the model")

    monkeypatch.setattr(MulT, "forward", broken)
    cfg = tiny_config("mult", "train.epochs=1", "train.grad_accumulation=2", "train.window_threads=2")
    with pytest.raises(ValueError, match="a bug in the model") as raised:
        run_experiment(cfg, tmp_path / "run", data=make_data())
    assert not isinstance(raised.value, TrainingError)
