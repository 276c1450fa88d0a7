"""train.precision (bf16 autocast on CPU, fp16 + grad scaler), train.grad_accumulation, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fakes import make_data

import msakit.train.loop as loop
from msakit.cli import main
from msakit.config import ConfigError, build_config
from msakit.registry import create_model, get_model_entry
from msakit.train.checkpoint import load_checkpoint
from msakit.train.experiment import run_experiment
from msakit.train.loop import TrainingError, build_optimizers, default_training_step
from msakit.train.precision import Precision


def tiny_config(model: str, *sets: str):
    tiny = dataclasses.asdict(get_model_entry(model).config_cls.tiny())
    return build_config({"model": {"name": model, **tiny}},
                        ["train.progress=false", "data.batch_size=16", *sets])


def test_precision_values_and_the_integer_spelling():
    assert build_config({}, ["train.precision=32"]).train.precision == "32"
    assert build_config({}, ["train.precision=16"]).train.precision == "16"
    assert build_config({}, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision must be 32, bf16 or 16"):
        build_config({}, ["train.precision=8"])
    with pytest.raises(ConfigError, match="train.grad_accumulation"):
        build_config({}, ["train.grad_accumulation=0"])


@pytest.mark.parametrize("model", ["lf_dnn", "mult"])
def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16_and_keeps_losses_float32(model, tmp_path, monkeypatch):
    data = make_data()
    seen: set[torch.dtype] = set()
    real_step = default_training_step

    def spy(model_, batch, optimizers, train_cfg, where, amp=None, window=(0, 1), forward=None):
        linear = next(m for m in model_.modules() if isinstance(m, torch.nn.Linear))
        handle = linear.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        try:
            out = real_step(model_, batch, optimizers, train_cfg, where, amp, window, forward)
        finally:
            handle.remove()
        assert all(v.dtype == torch.float32 for v in out.losses.values())
        return out

    monkeypatch.setattr(loop, "default_training_step", spy)
    bf16 = run_experiment(tiny_config(model, "train.epochs=2", "train.precision=bf16"),
                          tmp_path / "bf16", data=data)
    monkeypatch.undo()
    assert seen == {torch.bfloat16}  # the model's layers really ran in bf16
    fp32 = run_experiment(tiny_config(model, "train.epochs=2"), tmp_path / "fp32", data=data)
    # same recipe, different arithmetic: close but not bit-identical
    assert bf16["test_mean"]["mae"] == pytest.approx(fp32["test_mean"]["mae"], abs=0.25)
    assert bf16["test_mean"]["mae"] != fp32["test_mean"]["mae"]


def test_fp16_uses_a_grad_scaler_whose_state_is_checkpointed(tmp_path):
    run_experiment(tiny_config("lf_dnn", "train.epochs=2", "train.precision=16"), tmp_path, data=make_data())
    scaler = load_checkpoint(tmp_path / "seed_1" / "last.pt")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    amp = Precision("16", torch.device("cpu"))
    amp.load_state_dict(scaler)
    assert amp.scaler.get_scale() == scaler["scale"]


def test_two_accumulated_half_batches_equal_one_whole_batch():
    """Mean-reduced loss: grads of two halves, each divided by the window size 2, sum to the grad
    of the whole batch, so the parameters after one step are the same."""
    data = make_data()
    cfg = tiny_config("lf_dnn", "model.dropout=0.0", "model.fusion_dropout=0.0", "train.grad_clip=0")
    from msakit.data import to_loader

    whole = next(iter(to_loader(data.splits["train"], data.info, 16, shuffle=False)))
    halves = list(to_loader(data.splits["train"], data.info, 8, shuffle=False))[:2]
    torch.manual_seed(0)
    a = create_model("lf_dnn", cfg.model, data.info)
    b = create_model("lf_dnn", cfg.model, data.info)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = build_optimizers(a, cfg), build_optimizers(b, cfg)
    default_training_step(a, whole, opt_a, cfg.train, (1, 1))
    for position, half in enumerate(halves):
        default_training_step(b, half, opt_b, cfg.train, (1, position + 1), window=(position, 2))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    # and the step only happened at the window's end
    c = create_model("lf_dnn", cfg.model, data.info)
    c.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in c.state_dict().items()}
    default_training_step(c, halves[0], build_optimizers(c, cfg), cfg.train, (1, 1), window=(0, 2))
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())


def test_grad_accumulation_runs_through_the_loop_and_changes_the_trajectory(tmp_path):
    data = make_data()
    one = run_experiment(tiny_config("lf_dnn", "train.epochs=2"), tmp_path / "a", data=data)
    two = run_experiment(tiny_config("lf_dnn", "train.epochs=2", "train.grad_accumulation=2"),
                         tmp_path / "b", data=data)
    assert one["test_mean"]["mae"] != two["test_mean"]["mae"]


def test_a_custom_training_step_refuses_options_it_cannot_honour(tmp_path, capsys):
    cfg = tiny_config("mmcl", "train.epochs=1", "train.grad_accumulation=2")
    with pytest.raises(TrainingError, match="own training step.*train.grad_accumulation"):
        run_experiment(cfg, tmp_path, data=make_data())
    code = main(["train", "--model", "mmcl", "--out", str(tmp_path / "cli"), "--epochs", "1", "--quiet",
                 "--set", "train.precision=16", "data.synthetic.train_size=32",
                 "data.synthetic.valid_size=16", "data.synthetic.test_size=16"])
    assert code == 2
    assert "does not support train.precision=16" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    data = make_data()
    eager = run_experiment(tiny_config("lf_dnn", "train.epochs=2"), tmp_path / "a", data=data)
    compiled = run_experiment(tiny_config("lf_dnn", "train.epochs=2", "train.compile=true"),
                              tmp_path / "b", data=data)
    assert compiled["test_mean"]["mae"] == pytest.approx(eager["test_mean"]["mae"], abs=1e-4)
