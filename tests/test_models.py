"""The contract every registered model passes (parametrised over the registry, tiny presets)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fakes import make_data

from msakit.batch import MODALITIES, Batch
from msakit.data import to_loader
from msakit.registry import create_model, get_model_entry, list_models

TASKS = ("regression", "classification", "multi_binary")
MODELS = sorted(list_models())


def tiny_model(name: str, task: str):
    data = make_data(task)
    entry = get_model_entry(name)
    torch.manual_seed(0)
    model = create_model(name, entry.config_cls.tiny(), data.info)
    return model, data


def first_batch(data, split="train", batch_size=8) -> Batch:
    return next(iter(to_loader(data.splits[split], data.info, batch_size, shuffle=False)))


def expected_shape(info, batch_size):
    if info.task == "regression":
        return (batch_size,)
    if info.task == "classification":
        return (batch_size, info.num_classes)
    return (batch_size, info.num_tasks, 2)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_finite_losses(name, task):
    model, data = tiny_model(name, task)
    batch = first_batch(data)
    out = model(batch)
    assert out.prediction.shape == expected_shape(data.info, batch.size)
    assert out.losses and "task" in out.losses
    for term, value in out.losses.items():
        assert value.ndim == 0 and torch.isfinite(value), term


def as_trained(model, batch: Batch, data, split="train") -> Batch:
    """The batch as the trainer would give it to `model`: models with `whole_videos` see which
    video each utterance belongs to (Batch.group, from the split's groups)."""
    if getattr(model, "whole_videos", False):
        batch.group = torch.as_tensor(data.splits[split].groups[batch.index.numpy()])
    return batch


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name):
    model, data = tiny_model(name, "regression")
    model.train()
    # odd batch: an L1 loss's bias gradient (mean of signs) cannot cancel to exactly zero
    out = model(as_trained(model, first_batch(data, batch_size=15), data))
    sum(out.losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    # a model may name parameters whose gradient is legitimately all-zero on its very first step
    # (e.g. Self-MM's unimodal heads, weighted by tanh(|y_s - y_m|) = 0 until labels are generated);
    # they must still be connected (checked above) and get their own test elsewhere
    exempt = tuple(getattr(model, "zero_grad_at_start", ()))
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(exempt) and not p.grad.abs().sum() > 0]
    assert not dead, f"all-zero gradient for {dead}"


def pad_with_garbage(batch: Batch, extra: int) -> Batch:
    """Append `extra` padding frames full of large random values to every modality."""
    fields = {}
    for m in MODALITIES:
        x, mask = batch.features(m), batch.mask(m)
        garbage = torch.randn(x.shape[0], extra, x.shape[2]) * 100
        fields[m] = torch.cat([x, garbage], dim=1)
        fields[f"{m}_mask"] = torch.cat([mask, torch.zeros(x.shape[0], extra, dtype=torch.bool)], dim=1)
    return Batch(**fields, labels=batch.labels, index=batch.index, ids=batch.ids, group=batch.group)


@pytest.mark.parametrize("name", MODELS)
def test_padding_does_not_change_predictions(name):
    model, data = tiny_model(name, "regression")
    model.eval()
    batch = as_trained(model, first_batch(data), data)
    with torch.no_grad():
        plain = model(batch).prediction
        padded = model(pad_with_garbage(batch, extra=5)).prediction
    torch.testing.assert_close(plain, padded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_batch_of_one_and_deterministic_eval(name):
    model, data = tiny_model(name, "classification")
    model.eval()
    batch = first_batch(data, batch_size=4)
    with torch.no_grad():
        full = model(batch).prediction
        single = model(first_batch(data, batch_size=1)).prediction
        again = model(batch).prediction
    assert single.shape[0] == 1
    torch.testing.assert_close(single[0], full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, again, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    model, data = tiny_model(name, "regression")
    twin, _ = tiny_model(name, "regression")
    for p in twin.parameters():  # make sure the twin starts different
        torch.nn.init.normal_(p)
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    batch = first_batch(data)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).prediction, twin(batch).prediction)


@pytest.mark.parametrize("name", MODELS)
def test_config_is_a_typed_dataclass_with_tiny_preset(name):
    entry = get_model_entry(name)
    assert dataclasses.is_dataclass(entry.config_cls)
    assert isinstance(entry.config_cls.tiny(), entry.config_cls)
    assert entry.summary, f"{name} needs a docstring"


def test_unimodal_reads_only_its_modality():
    data = make_data("regression")
    model = create_model("unimodal", get_model_entry("unimodal").config_cls(modality="audio", hidden=8), data.info)
    model.eval()
    batch = first_batch(data)
    changed = Batch(**{**{f: getattr(batch, f) for f in ("audio", "audio_mask", "labels", "index")},
                       "text": torch.randn_like(batch.text), "vision": torch.randn_like(batch.vision),
                       "text_mask": batch.text_mask, "vision_mask": batch.vision_mask})
    with torch.no_grad():
        torch.testing.assert_close(model(batch).prediction, model(changed).prediction)
