"""Model-specific behaviour of the baseline zoo (issue 3): LMF, MulT, MISA, Self-MM, bc-LSTM and
the ContextLSTM block. The generic contract (shapes, gradients, padding, round trip) lives in
test_models.py and covers these models too."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import make_data, run_interrupted

from msakit.batch import MODALITIES, Batch
from msakit.config import build_config, load_yaml
from msakit.data import to_loader
from msakit.data.base import DatasetInfo
from msakit.losses import cmd, orthogonality_loss
from msakit.modules.context import ContextLSTM, scatter_videos
from msakit.registry import create_model, get_model_entry
from msakit.train.checkpoint import load_checkpoint
from msakit.train.experiment import run_experiment

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("unimodal", "lf_dnn", "tfn", "lmf", "mult", "misa", "self_mm", "bc_lstm")
NEW_MODELS = ("lmf", "mult", "misa", "self_mm", "bc_lstm")


def tiny(name: str, info: DatasetInfo, **changes):
    entry = get_model_entry(name)
    torch.manual_seed(0)
    return create_model(name, dataclasses.replace(entry.config_cls.tiny(), **changes), info)


def batches(data, split="train", batch_size=8, whole_videos=False):
    return list(to_loader(data.splits[split], data.info, batch_size, shuffle=False,
                          whole_videos=whole_videos))


# ----------------------------------------------------------------------------- LMF


def test_lmf_parameter_count_grows_linearly_with_rank():
    info = make_data().info
    cfg = get_model_entry("lmf").config_cls.tiny()
    counts = {r: sum(p.numel() for p in tiny("lmf", info, rank=r).parameters()) for r in (1, 2, 5)}
    per_rank = (cfg.text_out + 1 + cfg.audio_hidden + 1 + cfg.vision_hidden + 1) * info.output_dim + 1
    assert counts[2] - counts[1] == per_rank
    assert counts[5] - counts[1] == 4 * per_rank


def test_lmf_factor_learning_rate_group():
    info = make_data().info
    model = tiny("lmf", info, factor_lr=0.05)
    groups = model.parameter_groups(None)
    assert groups[0]["lr"] == 0.05 and len(groups[0]["params"]) == 5
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- MISA and its losses


def test_misa_returns_its_named_loss_terms_and_weights_switch_them_off():
    data = make_data()
    batch = batches(data)[0]
    out = tiny("misa", data.info)(batch)
    assert set(out.losses) == {"task", "cmd", "diff", "recon"}
    assert all(torch.isfinite(v) and v >= 0 for v in out.losses.values())
    off = tiny("misa", data.info, sim_weight=0.0, diff_weight=0.0, recon_weight=0.0)(batch)
    assert set(off.losses) == {"task"}


def test_misa_default_weights_match_the_spec():
    cfg = get_model_entry("misa").config_cls()
    assert (cfg.hidden, cfg.sim_weight, cfg.diff_weight, cfg.recon_weight) == (128, 1.0, 0.3, 1.0)


def test_cmd_is_zero_for_identical_distributions_and_positive_for_shifted_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 8, generator=g)
    assert cmd(x, x) < 1e-4
    assert cmd(x, x[torch.randperm(256, generator=g)]) < 1e-4  # same sample, other order
    assert cmd(x, x + 0.5) > 0.5
    assert cmd(x, x * 2.0) > 0.1  # same mean direction, different spread
    y = x.clone().requires_grad_(True)
    cmd(y, x).backward()  # finite gradient where both sides are equal
    assert torch.isfinite(y.grad).all()


def test_orthogonality_loss_is_zero_for_orthogonal_inputs():
    u = torch.tensor([1.0, -1.0, 0.0, 0.0])  # two zero-mean, orthogonal batch directions
    w = torch.tensor([0.0, 0.0, 1.0, -1.0])
    a = u[:, None] * torch.tensor([[1.0, 2.0, -3.0]])  # [4, 3], columns along u
    b = w[:, None] * torch.tensor([[0.5, -1.0]])  # [4, 2], columns along w
    assert orthogonality_loss(a, b) == pytest.approx(0.0, abs=1e-12)
    assert orthogonality_loss(a, a) > 0.1


# ----------------------------------------------------------------------------- Self-MM


def train_steps(model, data, epochs: int, first_epoch: int = 1, batch_size: int = 8):
    optimizer = torch.optim.AdamW(model.parameter_groups(None), lr=1e-2)
    model.train()
    for epoch in range(first_epoch - 1, first_epoch - 1 + epochs):
        for batch in batches(data, batch_size=batch_size):
            loss = sum(model(batch).losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.on_epoch_end(epoch + 1, {})


def test_self_mm_label_memory_is_buffer_state_updated_only_in_training():
    data = make_data()
    model = tiny("self_mm", data.info)
    buffers = dict(model.named_buffers())
    assert buffers["label_memory"].shape == (4, data.info.train_size)
    assert "label_memory" in model.state_dict() and "feature_text" in model.state_dict()
    assert not any(n.startswith("label_memory") for n, _ in model.named_parameters())

    model.eval()
    with torch.no_grad():
        out = model(batches(data)[0])
    assert set(out.losses) == {"task"}
    assert not model.seen.any() and (model.label_memory == 0).all()  # eval never writes

    train_steps(model, data, epochs=1)  # epoch 1: labels initialised to the true label
    labels = torch.as_tensor(data.splits["train"].labels)
    assert model.seen.all()
    torch.testing.assert_close(model.label_memory, labels.expand(4, -1))
    assert int(model.epochs_done) == 1
    before = model.label_memory.clone()
    train_steps(model, data, epochs=1, first_epoch=2)  # epoch 2: unimodal labels are generated
    assert int(model.epochs_done) == 2
    torch.testing.assert_close(model.label_memory[0], labels)  # fusion row = true labels
    assert not torch.allclose(model.label_memory[1:], before[1:])
    assert model.label_memory[1:].abs().max() <= model.cfg.label_bound + 1e-6
    assert torch.isfinite(model.label_memory).all() and torch.isfinite(model.centers_text).all()


def test_self_mm_memory_survives_state_dict_round_trip_and_trains_unimodal_heads():
    data = make_data()
    model = tiny("self_mm", data.info)
    train_steps(model, data, epochs=2)
    twin = tiny("self_mm", data.info)
    twin.load_state_dict(model.state_dict())
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(dict(twin.named_buffers())[name], buffer, rtol=0, atol=0)
    # once the unimodal labels differ from the multimodal one, the unimodal heads learn
    twin.train()
    out = twin(batches(data)[0])
    assert out.losses["text_aux"] > 0
    sum(out.losses.values()).backward()
    for prefix in twin.zero_grad_at_start:
        grads = [p.grad.abs().sum() for n, p in twin.named_parameters() if n.startswith(prefix)]
        assert grads and all(g > 0 for g in grads), prefix


def test_self_mm_resume_restores_label_memory(tmp_path, monkeypatch):

    data = make_data()
    fields = dataclasses.asdict(get_model_entry("self_mm").config_cls.tiny())
    cfg = build_config({"model": {"name": "self_mm", **fields}},
                       ["train.progress=false", "data.batch_size=16", "train.epochs=3",
                        "train.patience=100"])
    whole = run_experiment(cfg, tmp_path / "whole", data=data)
    run_interrupted(cfg, tmp_path / "cut", data, monkeypatch, saves=2)
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, data=data)
    assert resumed["per_seed"][0]["test"] == whole["per_seed"][0]["test"]
    a = load_checkpoint(tmp_path / "whole" / "seed_1" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "seed_1" / "last.pt")["model"]
    torch.testing.assert_close(a["label_memory"], b["label_memory"], rtol=0, atol=0)


@pytest.mark.parametrize("task", ["classification", "multi_binary"])
def test_self_mm_classification_trains_unimodal_heads_on_true_labels(task):
    data = make_data(task)
    model = tiny("self_mm", data.info)
    out = model(batches(data)[0])
    assert set(out.losses) == {"task", "text_aux", "audio_aux", "vision_aux"}
    assert all(v > 0 for v in out.losses.values())
    assert "label_memory" not in model.state_dict()


# ----------------------------------------------------------------------------- context (bc-LSTM)


def test_scatter_videos_layout():
    x = torch.arange(7.0)[:, None]
    padded, mask, video, position = scatter_videos(x, torch.tensor([0, 0, 0, 1, 2, 2, 2]))
    assert padded.shape == (3, 3, 1) and mask.sum(dim=1).tolist() == [3, 1, 3]
    assert position.tolist() == [0, 1, 2, 0, 0, 1, 2]
    torch.testing.assert_close(padded[video, position], x)


def test_context_lstm_sees_its_own_video_only():
    torch.manual_seed(0)
    context = ContextLSTM(5, 6, 4).eval()
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    x = torch.randn(9, 5)
    with torch.no_grad():
        base = context(x, group)
        other = x.clone()
        other[4:6] = torch.randn(2, 5) * 10  # another video changes
        torch.testing.assert_close(context(other, group)[[0, 1, 2, 3, 6, 7, 8]],
                                   base[[0, 1, 2, 3, 6, 7, 8]])
        neighbour = x.clone()
        neighbour[1] = torch.randn(5) * 10  # a neighbour in the SAME video changes
        changed = context(neighbour, group)
        assert not torch.allclose(changed[0], base[0]) and not torch.allclose(changed[3], base[3])
        alone = context(x[:4], group[:4])  # the video alone gives the same outputs
        torch.testing.assert_close(alone, base[:4])
        # without groups every utterance is a video of its own
        torch.testing.assert_close(context(x, None), context(x, torch.arange(9)))


def test_bc_lstm_prediction_of_a_video_does_not_depend_on_other_videos():
    data = make_data()
    model = tiny("bc_lstm", data.info).eval()
    assert model.whole_videos
    full = batches(data, batch_size=3, whole_videos=True)[0]  # 3 videos, 12 utterances
    one = batches(data, batch_size=1, whole_videos=True)[0]  # the first video alone
    assert full.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with torch.no_grad():
        torch.testing.assert_close(model(one).prediction, model(full).prediction[:4])
        text = full.text.clone()
        text[1] = torch.randn_like(full.text[1]) * 5  # a neighbour in video 0
        prediction = model(dataclasses.replace(full, text=text)).prediction
    assert not torch.allclose(prediction[0], model(full).prediction[0])
    torch.testing.assert_close(prediction[4:], model(full).prediction[4:])


def test_lf_dnn_context_option_batches_whole_videos():
    data = make_data()
    plain = tiny("lf_dnn", data.info)
    assert not getattr(plain, "whole_videos", False) and plain.context is None
    contextual = tiny("lf_dnn", data.info, context=True, context_hidden=4)
    assert contextual.whole_videos
    out = contextual(batches(data, batch_size=2, whole_videos=True)[0])
    assert out.prediction.shape == (8,)


def test_bc_lstm_end_to_end_predictions_per_utterance(tmp_path):
    data = make_data()
    fields = dataclasses.asdict(get_model_entry("bc_lstm").config_cls.tiny())
    cfg = build_config({"model": {"name": "bc_lstm", **fields}},
                       ["train.progress=false", "data.batch_size=2", "train.epochs=2"])
    results = run_experiment(cfg, tmp_path, data=data)
    assert np.isfinite(results["test_mean"]["mae"])
    rows = list(csv.DictReader((tmp_path / "seed_1" / "predictions_test.csv").open()))
    assert len(rows) == len(data.splits["test"])
    assert [r["id"] for r in rows] == data.splits["test"].ids


# ----------------------------------------------------------------------------- MulT


def test_mult_runs_on_unaligned_lengths():
    data = make_data()
    batch = batches(data)[0]
    steps = {m: batch.features(m).shape[1] for m in MODALITIES}
    assert len(set(steps.values())) > 1, steps  # text 7, audio 9, vision 8 in the fakes
    model = tiny("mult", data.info)
    out = model(batch)
    sum(out.losses.values()).backward()
    assert out.prediction.shape == (8,) and torch.isfinite(out.prediction).all()


def length_one_batch(info: DatasetInfo, size: int = 3) -> Batch:
    g = torch.Generator().manual_seed(1)
    parts = {}
    for m in MODALITIES:
        parts[m] = torch.randn(size, 1, info.feature_dims[m], generator=g)
        parts[f"{m}_mask"] = torch.ones(size, 1, dtype=torch.bool)
    return Batch(**parts, labels=torch.zeros(size), index=torch.arange(size))


@pytest.mark.parametrize("name", NEW_MODELS)
def test_runs_on_length_one_utterance_data(name):
    info = make_data().info
    model = tiny(name, info, **({"text_kernel": 3, "audio_kernel": 5} if name == "mult" else {}))
    out = model(length_one_batch(info))
    sum(out.losses.values()).backward()
    assert out.prediction.shape == (3,) and torch.isfinite(out.prediction).all()


def test_fully_masked_attention_rows_are_finite():
    from msakit.modules.attention import CrossModalTransformer

    block = CrossModalTransformer(8, 2, 1)
    x, source = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    x_mask = torch.ones(2, 3, dtype=torch.bool)
    source_mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = block(x, x_mask, source, source_mask)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- MOSI-sized inputs


MOSI_DIMS = {"text": 768, "audio": 5, "vision": 20}
MOSI_LENGTHS = {"text": 50, "audio": 500, "vision": 375}  # MMSA unaligned_50.pkl


@pytest.mark.parametrize("name", BASELINES)
def test_forward_backward_on_mosi_mmsa_shapes(name):
    info = DatasetInfo("mosi-shaped", "regression", feature_dims=MOSI_DIMS, max_lengths=MOSI_LENGTHS,
                       metric_family="mosi", label_range=(-3.0, 3.0), train_size=2)
    real = {"text": [50, 23], "audio": [500, 131], "vision": [375, 98]}
    g = torch.Generator().manual_seed(0)
    parts = {}
    for m in MODALITIES:
        parts[m] = torch.randn(2, MOSI_LENGTHS[m], MOSI_DIMS[m], generator=g)
        parts[f"{m}_mask"] = torch.arange(MOSI_LENGTHS[m])[None, :] < torch.tensor(real[m])[:, None]
    batch = Batch(**parts, labels=torch.tensor([1.4, -0.6]), index=torch.arange(2))
    model = tiny(name, info)
    model.train()
    out = model(batch)
    sum(out.losses.values()).backward()
    assert out.prediction.shape == (2,) and torch.isfinite(out.prediction).all()


@pytest.fixture(scope="module")
def mosi_shaped_unaligned_pickle(tmp_path_factory):
    """A synthetic MMSA `unaligned_50.pkl` with MOSI's real dims and lengths (768x50 text,
    5x500 audio, 20x375 vision), written by the generator and read by the real MMSA loader."""
    from msakit.data.synthetic import SyntheticConfig, write_synthetic

    cfg = SyntheticConfig(train_size=8, valid_size=4, test_size=4, text_dim=768, audio_dim=5,
                          vision_dim=20, text_length=50, audio_length=500, vision_length=375,
                          signal_dims=2, style_dims=2)
    return write_synthetic(tmp_path_factory.mktemp("mmsa") / "unaligned_50.pkl", cfg, seed=0)


@pytest.mark.parametrize(
    "name",  # MulT's full config attends over 500 audio frames: ~1 min on one core, so `-m slow`
    [pytest.param(n, marks=pytest.mark.slow) if n == "mult" else n for n in (*NEW_MODELS, "tfn")],
)
def test_shipped_mmsa_config_runs_end_to_end_on_a_mosi_shaped_pickle(name, mosi_shaped_unaligned_pickle,
                                                                     tmp_path):
    """The shipped configs/<model>/mosi-mmsa.yaml, unchanged but for one epoch, trains and
    evaluates through the CLI on a file of the real MOSI layout, as a user's real file would."""
    import json

    from msakit.cli import main

    config = ROOT / "configs" / name / "mosi-mmsa.yaml"
    argv = ["train", "--config", str(config), "--data-path", str(mosi_shaped_unaligned_pickle),
            "--epochs", "1", "--out", str(tmp_path), "--quiet", "--set", "data.batch_size=4",
            "train.progress=false"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["data"]["name"] == "mmsa" and np.isfinite(results["test_mean"]["mae"])


# ----------------------------------------------------------------------------- configs


CONFIGS = sorted(p for m in NEW_MODELS for p in (ROOT / "configs" / m).glob("*.yaml"))


def test_every_baseline_ships_its_configs():
    names = {(p.parent.name, p.stem) for p in CONFIGS}
    for model in NEW_MODELS:
        for dataset in ("synthetic", "mosi-poria", "mosi-mmsa", "mosei-mmsa"):
            assert (model, dataset) in names, f"configs/{model}/{dataset}.yaml is missing"


@pytest.mark.parametrize("path", CONFIGS + sorted((ROOT / "configs" / "tfn").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# msakit train --config ") and str(path.relative_to(ROOT)) in first
    cfg = build_config(load_yaml(path))
    assert cfg.model_name == path.parent.name
    if path.stem.endswith("-mmsa"):
        assert cfg.data.name == "mmsa"
