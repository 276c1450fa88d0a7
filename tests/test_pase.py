"""PaSE: prototypes, phase switch, batched subset evaluation, SGM, ablation flags, analyze command."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import make_data, run_interrupted

from msakit.analysis import mask_modalities, modality_contributions, subset_predictions
from msakit.batch import MODALITIES, Batch
from msakit.cli import main
from msakit.config import build_config
from msakit.data import to_loader
from msakit.models.pase import MaskedSelfAttention, PaSE, PaSEConfig, alignment_loss, info_nce
from msakit.modules.pooling import masked_mean
from msakit.modules.shapley import shapley_values, subset_masks
from msakit.modules.sinkhorn import sinkhorn
from msakit.registry import create_model
from msakit.train.experiment import run_experiment
from msakit.train.loop import build_optimizer, default_training_step

torch.set_num_threads(1)


def build(task: str = "regression", **changes) -> tuple[PaSE, object]:
    data = make_data(task)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PaSEConfig.tiny(), **changes)
    return create_model("pase", cfg, data.info), data


def batches(data, batch_size=8, split="train") -> list[Batch]:
    return list(to_loader(data.splits[split], data.info, batch_size, shuffle=False))


def pooled(model: PaSE, batch: Batch) -> dict[str, torch.Tensor]:
    """h^m as the model computes it (dropout must be 0 for this to be deterministic)."""
    masks = {m: batch.mask(m) for m in MODALITIES}
    with torch.no_grad():
        return model.unimodal({m: model.encode(batch.features(m), m) for m in MODALITIES}, masks)


# ----------------------------------------------------------------------------- classes and prototypes


def test_prototype_classes_per_task():
    model, _ = build("regression")
    y = torch.tensor([-3.0, -2.6, -0.4, 0.5, 0.51, 2.4, 3.0])
    assert model.num_prototypes == 7
    assert model.prototype_classes(y).tolist() == [0, 0, 3, 3, 4, 5, 6]  # round half to even
    model, _ = build("classification")
    assert model.num_prototypes == 3
    assert model.prototype_classes(torch.tensor([2, 0, 1])).tolist() == [2, 0, 1]
    model, _ = build("multi_binary")
    assert model.num_prototypes == 5  # 4 emotions + "none positive"
    labels = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert model.prototype_classes(labels).tolist() == [1, 3, 4, 0]


def test_prototype_banks_initialise_then_follow_the_ema():
    model, data = build("classification", dropout=0.0)
    model.train()
    first, second = batches(data)[:2]
    assert not model.prototype_ready.any()
    model(first)
    h1, y1 = pooled(model, first), model.prototype_classes(first.labels)
    for k in range(3):
        present = bool((y1 == k).any())
        assert bool(model.prototype_ready[k]) == present
        for i, m in enumerate(MODALITIES):
            expected = h1[m][y1 == k].mean(0) if present else torch.zeros(model.cfg.hidden)
            torch.testing.assert_close(model.prototypes[i, k], expected)
    before = model.prototypes.clone()
    ready_before = model.prototype_ready.clone()
    model(second)
    h2, y2 = pooled(model, second), model.prototype_classes(second.labels)
    for k in range(3):
        for i, m in enumerate(MODALITIES):
            if not bool((y2 == k).any()):
                expected = before[i, k]
            elif bool(ready_before[k]):
                expected = 0.98 * before[i, k] + 0.02 * h2[m][y2 == k].mean(0)
            else:
                expected = h2[m][y2 == k].mean(0)
            torch.testing.assert_close(model.prototypes[i, k], expected)
    model.eval()  # evaluation never moves the banks
    after = model.prototypes.clone()
    model(first)
    torch.testing.assert_close(model.prototypes, after)
    assert "prototypes" in model.state_dict() and "prototype_ready" in model.state_dict()


def test_batch_prototypes_carry_gradient_into_the_encoder():
    model, data = build("regression", dropout=0.0, use_cal=False, use_unimodal_heads=False)
    model.train()
    out = model(batches(data, 15)[0])
    out.losses["pcl"].backward()
    assert model.projections["audio"].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- phase switch


def test_phase_switch_fires_after_plateau_and_minimum_epochs():
    model, _ = build("regression", min_phase1_epochs=3, switch_patience=2)
    maes = [1.0, 0.9, 0.8995, 0.8999]  # epochs 3 and 4 improve by < 1e-3
    phases = [model.on_epoch_end(e + 1, {"mae": v})["phase"] for e, v in enumerate(maes)]
    assert phases == [1.0, 1.0, 1.0, 2.0]
    assert int(model.switch_epoch) == 4 and float(model.switch_best) == pytest.approx(0.9)
    state = model.state_dict()
    assert int(state["phase"]) == 2 and int(state["switch_epoch"]) == 4
    twin, _ = build("regression")
    twin.load_state_dict(state)
    assert int(twin.phase) == 2 and twin.sgm_active() and not twin.unimodal_active()


def test_phase_switch_waits_for_the_minimum_epoch_and_uses_the_family_metric():
    model, _ = build("regression", min_phase1_epochs=6, switch_patience=2)
    phases = [model.on_epoch_end(e, {"mae": 1.0})["phase"] for e in range(1, 7)]
    assert phases == [1.0] * 5 + [2.0]  # stale since epoch 3, but not before epoch 6
    model, _ = build("classification", min_phase1_epochs=1, switch_patience=2)
    for e, f1 in enumerate([0.2, 0.3, 0.4, 0.5, 0.6], start=1):  # steadily better: stays in phase 1
        assert model.on_epoch_end(e, {"f1_macro": f1, "acc": 0.0})["phase"] == 1.0
    model.on_epoch_end(6, {"f1_macro": 0.6005, "acc": 0.0})
    assert model.on_epoch_end(7, {"f1_macro": 0.5, "acc": 0.0})["phase"] == 2.0


def test_single_phase_never_switches_and_has_everything_on():
    model, _ = build("regression", dual_phase=False, min_phase1_epochs=0, switch_patience=1)
    for e in range(1, 5):
        model.on_epoch_end(e, {"mae": 1.0})
    assert int(model.phase) == 1 and model.sgm_active() and model.unimodal_active()


# ----------------------------------------------------------------------------- subsets and Shapley


@pytest.mark.parametrize("task", ["regression", "classification", "multi_binary"])
def test_batched_subsets_equal_running_each_mask_separately(task):
    model, data = build(task)
    model.train()
    model(batches(data, 16)[0])  # initialise prototypes so the gate is live
    model.eval()
    batch = batches(data, 8, "valid")[0]
    with torch.no_grad():
        together = model.modality_subset_predictions(batch)
        assert together.shape[:2] == (8, batch.size)
        for s, keep in enumerate(subset_masks(3).tolist()):
            alone = model(mask_modalities(batch, keep)).prediction
            torch.testing.assert_close(together[s], alone, rtol=1e-5, atol=1e-6)


def test_utilities_and_shapley_on_a_batch():
    model, data = build("regression")
    model.train()
    model(batches(data, 16)[0])
    batch = batches(data, 16)[1]
    model.eval()
    utilities = model.subset_utilities(batch)
    with torch.no_grad():
        full = model(batch).losses["task"]
        empty = model(mask_modalities(batch, [False] * 3)).losses["task"]
    assert float(utilities[7]) == pytest.approx(-float(full), rel=1e-5)
    assert float(utilities[0]) == pytest.approx(-float(empty), rel=1e-5)
    psi = model.update_shapley(batch)
    assert float(psi.sum()) == pytest.approx(float(utilities[7] - utilities[0]), abs=1e-5)
    torch.testing.assert_close(model.phi, torch.ones(3))  # phase 1: no modulation yet
    model.phase.fill_(2)
    model.update_shapley(batch)
    assert float(model.phi.max()) == 1.0 and float(model.phi.min()) >= math.exp(-1) - 1e-6


def test_prototype_utility_is_the_release_formula():
    model, data = build("classification", utility="prototype")
    model.train()
    for batch in batches(data, 16):
        model(batch)
    u = model.subset_utilities(batches(data, 16)[0])
    assert float(u[0]) == 0.0 and bool(torch.isfinite(u).all())
    ready = model.prototype_ready
    var_text = float(model.prototypes[0, ready].var())
    assert float(u[1]) == pytest.approx(0.6 + 0.4 / (1 + var_text), rel=1e-5)  # {text}: no pairs
    assert shapley_values(u).shape == (3,)


# ----------------------------------------------------------------------------- SGM


def gradients(model: PaSE, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    sum(model(batch).losses.values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_mode_scales_only_each_modalitys_own_gradients():
    model, data = build("regression", dropout=0.0, sgm_scale="gradient")
    model.train()
    batch = batches(data, 15)[0]
    model(batch)  # initialise the banks (so the next two passes see the same state)
    model.phase.fill_(2)
    phi = torch.tensor([0.5, 1.0, 0.7])
    model.phi.copy_(phi)
    plain = gradients(model, batch)
    gradients(model, batch)  # the same gradients again (the banks already hold this batch's means)
    model.on_after_backward(batch)
    scaled = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    own = {m: {id(p) for p in ps} for m, ps in model.own_parameters().items()}
    params = dict(model.named_parameters())
    seen = set()
    for name, grad in scaled.items():
        factor = 1.0
        for i, m in enumerate(MODALITIES):
            if id(params[name]) in own[m]:
                factor = float(phi[i])
                seen.add(m)
        torch.testing.assert_close(grad, factor * plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert seen == set(MODALITIES)
    torch.testing.assert_close(scaled["projections.text.weight"], 0.5 * plain["projections.text.weight"])
    torch.testing.assert_close(scaled["head.weight"], plain["head.weight"])


@pytest.mark.parametrize("changes", [dict(), dict(use_sgm=False)])
def test_no_modulation_in_phase_one_or_without_sgm(changes):
    model, data = build("regression", dropout=0.0, sgm_scale="gradient", **changes)
    model.train()
    batch = batches(data, 15)[0]
    model(batch)
    if changes:
        model.phase.fill_(2)
    model.phi.copy_(torch.tensor([0.5, 0.6, 0.7]))
    plain = gradients(model, batch)
    model.on_after_backward(batch)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, plain[name])
    assert model.update_scales() == {}


@pytest.mark.parametrize("samples", [0, 4])
def test_per_step_shapley_recomputes_phi(samples):
    model, data = build("regression", sgm_update="step", dual_phase=False, shapley_samples=samples)
    model.train()
    batch = batches(data, 15)[0]
    gradients(model, batch)
    model.on_after_backward(batch)
    assert bool(model.shapley.abs().sum() > 0) and float(model.phi.max()) == 1.0
    assert model.training  # restored after the evaluation-mode utility pass


# ----------------------------------------------------------------------------- ablation flags


@pytest.mark.parametrize(
    "flag,term",
    [("use_pcl", "pcl"), ("use_cal", "cal"), ("use_unimodal_heads", "unimodal")],
)
def test_each_flag_turns_its_loss_term_off(flag, term):
    model, data = build("regression")
    batch = batches(data)[0]
    assert term in model(batch).losses
    model, data = build("regression", **{flag: False})
    assert term not in model(batch).losses


def test_gate_flag_and_phase_two_drop_their_parts():
    model, data = build("regression", use_prototype_gate=False, use_unimodal_heads=False)
    assert model.gate is None and model.unimodal_heads is None
    assert not any(n.startswith(("gate.", "unimodal_heads.")) for n, _ in model.named_parameters())
    model, data = build("regression")
    model.phase.fill_(2)
    assert set(model(batches(data)[0]).losses) == {"task", "pcl", "cal"}


def test_flags_are_settable_from_the_command_line_syntax():
    cfg = build_config({"model": {"name": "pase"}}, ["model.use_sgm=false", "model.utility=prototype",
                                                     "model.dual_phase=false"])
    assert cfg.model.use_sgm is False and cfg.model.utility == "prototype"
    assert cfg.model.dual_phase is False
    with pytest.raises(ValueError, match="model.utility"):
        PaSEConfig(utility="banana")


# ----------------------------------------------------------------------------- training and analysis


def test_training_logs_shapley_and_reaches_phase_two(tmp_path):
    cfg = build_config(
        {"model": {"name": "pase", **dataclasses.asdict(PaSEConfig.tiny())}},
        ["train.progress=false", "data.batch_size=16", "train.epochs=4", "train.patience=100",
         "model.switch_delta=10.0"],  # nothing counts as an improvement: switch at the end of epoch 2
    )
    run_experiment(cfg, tmp_path, data=make_data())
    history = [json.loads(x) for x in (tmp_path / "seed_1" / "log.jsonl").read_text().splitlines()]
    for record in history:
        for m in MODALITIES:
            assert math.isfinite(record[f"shapley_{m}"]) and 0 < record[f"phi_{m}"] <= 1
    phases = [r["phase"] for r in history]
    assert phases == [1.0, 2.0, 2.0, 2.0]
    after = [r for r in history if r["phase"] == 2.0]
    assert max(r[f"phi_{m}"] for r in after for m in MODALITIES) == 1.0
    assert all("train_unimodal" not in r for r in history[phases.index(2.0) + 1:])


def test_resume_across_the_phase_switch_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from msakit.train.checkpoint import load_checkpoint

    def cfg():
        return build_config(
            {"model": {"name": "pase", **dataclasses.asdict(PaSEConfig.tiny())}},
            ["train.progress=false", "data.batch_size=16", "train.epochs=4", "train.patience=100",
             "model.switch_delta=10.0"],
        )

    data = make_data()
    whole = run_experiment(cfg(), tmp_path / "whole", data=data)
    run_interrupted(cfg(), tmp_path / "cut", data, monkeypatch, saves=2)
    assert int(load_checkpoint(tmp_path / "cut" / "seed_1" / "last.pt")["model"]["phase"]) == 2
    resumed = run_experiment(cfg(), tmp_path / "cut", resume=True, data=data)
    assert resumed["per_seed"][0]["test"] == whole["per_seed"][0]["test"]


def test_analysis_batched_and_generic_paths_agree():
    model, data = build("regression")
    model.train()
    model(batches(data, 16)[0])
    model.eval()

    class Plain(torch.nn.Module):  # the same model without the batched subset method
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batch):
            return self.inner(batch)

    arrays, info = data.splits["test"], data.info
    batched, used = subset_predictions(model, arrays, info, 8, torch.device("cpu"))
    generic, used_generic = subset_predictions(Plain(model), arrays, info, 8, torch.device("cpu"))
    assert used and not used_generic
    np.testing.assert_allclose(batched, generic, rtol=1e-5, atol=1e-6)
    result = modality_contributions(model, arrays, info, batch_size=8)
    assert result["metric"] == "mae" and result["utility"] == "-mae" and len(result["subsets"]) == 8
    assert sum(result["shapley"].values()) == pytest.approx(result["u_all_minus_u_empty"])


def test_analyze_command_end_to_end(tmp_path, capsys):
    small = ["data.synthetic.train_size=48", "data.synthetic.valid_size=16", "data.synthetic.test_size=16",
             "data.synthetic.text_length=6", "data.synthetic.audio_length=8", "data.synthetic.vision_length=7",
             "data.batch_size=16", "model.hidden=8", "model.depth=1", "model.sinkhorn_iters=20"]
    run = tmp_path / "run"
    assert main(["train", "--model", "pase", "--epochs", "1", "--quiet", "--out", str(run),
                 "--set", *small]) == 0
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(run / "seed_1" / "best.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "text+audio+vision" in printed and "Shapley" in printed
    result = json.loads((out / "shapley.json").read_text())
    assert result["model"] == "pase" and result["split"] == "test" and result["batched_subsets"]
    assert [row["bitmask"] for row in result["subsets"]] == list(range(8))
    assert sum(result["shapley"].values()) == pytest.approx(result["u_all_minus_u_empty"])
    full = json.loads((run / "seed_1" / "metrics.json").read_text())["test"]["mae"]
    assert result["subsets"][7]["metric"] == pytest.approx(full, rel=1e-5)
    assert (out / "shapley.png").read_bytes()[:4] == b"\x89PNG"
    # a model without the batched method, another metric
    assert main(["train", "--model", "lf_dnn", "--epochs", "1", "--quiet", "--out", str(tmp_path / "lf"),
                 "--set", *small[:7]]) == 0
    assert main(["analyze", "--checkpoint", str(tmp_path / "lf" / "seed_1" / "best.pt"),
                 "--metric", "corr", "--out", str(tmp_path / "lf_an")]) == 0
    result = json.loads((tmp_path / "lf_an" / "shapley.json").read_text())
    assert result["utility"] == "corr" and not result["batched_subsets"]
    assert main(["analyze", "--checkpoint", str(tmp_path / "lf" / "seed_1" / "best.pt"),
                 "--metric", "nope"]) == 2


# ----------------------------------------------------------------------------- no label leak, SGM on updates


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_training_prediction_does_not_depend_on_the_labels(task):
    """Finding 1 of issue 10: in training mode (dropout off) a sample's prediction must not move
    when only its label changes (the gate once read the true class's prototype)."""
    model, data = build(task, dropout=0.0)
    model.train()
    for batch in batches(data, 16):  # every class's prototype is initialised: the gate is live
        model(batch)
    assert bool(model.prototype_ready.sum() >= 2)
    batch = batches(data, 16)[0]
    other = (-batch.labels if task == "regression" else (batch.labels + 1) % 3)
    predictions = []
    for labels in (batch.labels, other):
        twin = copy.deepcopy(model)  # each pass starts from the same banks
        predictions.append(twin(dataclasses.replace(batch, labels=labels)).prediction)
    assert not torch.equal(batch.labels, other)
    torch.testing.assert_close(predictions[0], predictions[1], rtol=0, atol=0)


def sgm_run(model: PaSE, optimizer, loader_batches, train_cfg, steps: int) -> list[float]:
    """`steps` real training steps (the loop's own step); text's own update norm per step."""
    text = model.own_parameters()["text"]
    norms = []
    for i in range(steps):
        before = [p.detach().clone() for p in text]
        default_training_step(model, loader_batches[i % len(loader_batches)], {"main": optimizer},
                              train_cfg, (1, i + 1))
        norms.append(float(torch.sqrt(sum((p.detach() - b).pow(2).sum() for p, b in zip(text, before, strict=True)))))
    return norms


def test_sgm_damps_the_update_by_phi_for_hundreds_of_adamw_steps():
    """Finding 2 of issue 10: with phi_text = 0.4 after a phase 1 under AdamW (the loop's optimiser
    and step), text's parameter update stays at 0.4 (+-10%) of the unmodulated run's on the same
    batches in every 100-step window of 300 steps (sgm_scale="update"); the release's gradient
    scaling fades as Adam's second moment adapts. lr 1e-4 keeps the twins' paths close."""
    cfg = build_config({"model": {"name": "pase"}}, ["train.lr=0.0001"])
    model, data = build("regression", dropout=0.0, use_pcl=False, use_cal=False, use_prototype_gate=False)
    loader_batches = batches(data, 16)
    optimizer = build_optimizer(model, cfg)
    sgm_run(model, optimizer, loader_batches, cfg.train, 40)  # phase 1: Adam's moments fill up
    model.phase.fill_(2)
    runs = {}
    for name, use_sgm, scale in (("off", False, "update"), ("update", True, "update"),
                                 ("gradient", True, "gradient")):
        twin = copy.deepcopy(model)
        twin_optimizer = build_optimizer(twin, cfg)
        twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load shares tensors
        twin.cfg = dataclasses.replace(twin.cfg, use_sgm=use_sgm, sgm_scale=scale)
        twin.phi.copy_(torch.tensor([0.4, 1.0, 1.0]))
        runs[name] = np.array(sgm_run(twin, twin_optimizer, loader_batches, cfg.train, 300))
    ratio = {name: [runs[name][w:w + 100].sum() / runs["off"][w:w + 100].sum() for w in (0, 100, 200)]
             for name in ("update", "gradient")}
    assert all(0.36 <= r <= 0.44 for r in ratio["update"]), ratio
    assert ratio["gradient"][-1] > 0.5, ratio  # the release's rule: Adam normalises the damping away


def test_update_scales_damp_exactly_the_own_groups_for_one_step():
    cfg = build_config({"model": {"name": "pase"}}, ["train.lr=0.01"])
    model, data = build("regression", dropout=0.0)
    batch = batches(data, 16)[0]
    model.train()
    model(batch)  # banks initialised: both twins then see the same state
    groups = model.parameter_groups(cfg.train)
    assert [g["name"] for g in groups] == [*MODALITIES, "shared"]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    model.phase.fill_(2)
    model.phi.copy_(torch.tensor([0.5, 1.0, 0.25]))
    assert model.update_scales() == {"text": 0.5, "audio": 1.0, "vision": 0.25}
    deltas = {}
    for use_sgm in (True, False):
        twin = copy.deepcopy(model)
        twin.cfg = dataclasses.replace(twin.cfg, use_sgm=use_sgm)
        start = {n: p.detach().clone() for n, p in twin.named_parameters()}
        optimizer = build_optimizer(twin, cfg)
        default_training_step(twin, batch, {"main": optimizer}, cfg.train, (1, 1))
        assert [g["lr"] for g in optimizer.param_groups] == [0.01] * 4  # restored after the step
        deltas[use_sgm] = {n: p.detach() - start[n] for n, p in twin.named_parameters()}
    own = {id(p): m for m, ps in model.own_parameters().items() for p in ps}
    factors = {"text": 0.5, "audio": 1.0, "vision": 0.25}
    for name, p in model.named_parameters():
        factor = factors.get(own.get(id(p)), 1.0)
        torch.testing.assert_close(deltas[True][name], factor * deltas[False][name],
                                   rtol=1e-4, atol=1e-7, msg=name)  # float rounding of p + delta
    # SGM's set for a modality: its projection, its expert in every layer, its unimodal head; nothing else
    names = {id(p): n for n, p in model.named_parameters()}
    for m, params in model.own_parameters().items():
        expected = {n for n, _ in model.named_parameters()
                    if n.startswith((f"projections.{m}.", f"unimodal_heads.{m}."))
                    or (n.startswith("experts.") and n.split(".")[2] == m)}
        assert {names[id(p)] for p in params} == expected, m


def test_gate_reads_the_banks_and_trains_once_they_exist():
    model, data = build("regression", dropout=0.0)
    model.train()
    first, second = batches(data, 15)[:2]
    model(first)  # the banks now hold prototypes
    model.zero_grad(set_to_none=True)
    sum(model(second).losses.values()).backward()
    assert float(model.gate[0].weight.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- mechanisms, pinned


def test_info_nce_is_the_hand_computed_prototype_cross_entropy():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    target = torch.tensor([0, 1, 2])
    valid = torch.tensor([True, True, False])  # class 2 unseen: out of the softmax and the mean
    cos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # samples 0 and 1 against classes 0, 1
    expected = -torch.log_softmax(cos / 0.5, dim=-1)[[0, 1], [0, 1]].mean()
    torch.testing.assert_close(info_nce(h, protos, target, valid, tau=0.5), expected)


def test_alignment_loss_is_match_plus_weighted_reg_and_omega():
    torch.manual_seed(0)
    p, q = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    loss = alignment_loss(p, q, epsilon=0.1, iters=200, reg_weight=0.3, omega_weight=0.7)
    for i in range(2):
        cost = torch.cdist(F.normalize(p[i], dim=-1), F.normalize(q[i], dim=-1)).pow(2)
        plan_pq, plan_qp = sinkhorn(cost, 0.1, max_iter=200), sinkhorn(cost.T, 0.1, max_iter=200)
        match = 0.5 * ((plan_pq * cost).sum() + (plan_qp * cost.T).sum())
        reg = (plan_pq - plan_qp.T).pow(2).sum()
        eye = torch.eye(4) / 4
        omega = 0.5 * ((plan_pq - eye).pow(2).sum() + (plan_qp - eye).pow(2).sum())
        torch.testing.assert_close(loss[i], match + 0.3 * reg + 0.7 * omega, rtol=1e-4, atol=1e-6)
        # the spec's L_reg is Sinkhorn's stopping error: Q_nm of C^T is Q_mn^T (docstring)
        assert float(reg) < 1e-6 < float(match)
    same = alignment_loss(p, p.clone(), epsilon=0.01, iters=500, reg_weight=0.1, omega_weight=0.05)
    assert float(same.max()) < 0.02  # matched classes: the plan is ~I/K, no cost, Omega ~0


def test_batch_prototypes_mix_the_detached_bank_with_the_batch_mean():
    model, _ = build("classification", dropout=0.0)
    model.prototypes.normal_()
    model.prototype_ready.copy_(torch.tensor([True, False, True]))
    pooled = {m: torch.randn(4, model.cfg.hidden, requires_grad=True) for m in MODALITIES}
    classes = torch.tensor([0, 0, 1, 1])  # class 0 ready, class 1 new, class 2 absent
    out = model.batch_prototypes(pooled, classes)
    for i, m in enumerate(MODALITIES):
        torch.testing.assert_close(out[i, 0], 0.98 * model.prototypes[i, 0] + 0.02 * pooled[m][:2].mean(0))
        torch.testing.assert_close(out[i, 1], pooled[m][2:].mean(0))
        torch.testing.assert_close(out[i, 2], model.prototypes[i, 2])
    out[0, 0].sum().backward()  # the gradient flows into the batch mean only
    torch.testing.assert_close(pooled["text"].grad[:2], torch.full((2, model.cfg.hidden), 0.01))
    assert float(pooled["text"].grad[2:].abs().sum()) == 0.0
    assert not model.prototypes.requires_grad
    torch.testing.assert_close(model.batch_prototypes(pooled, None), model.prototypes)  # evaluation


def test_gate_similarity_is_each_experts_best_cosine_to_its_own_modalitys_ready_prototypes():
    bank = torch.zeros(3, 3, 2)
    bank[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    bank[1] = torch.tensor([[0.0, -1.0], [0.0, 1.0], [1.0, 0.0]])
    bank[2] = torch.tensor([[1.0, 1.0], [5.0, 0.0], [-1.0, -1.0]])
    ready = torch.tensor([True, False, True])
    out = torch.tensor([[[0.0, 3.0]]])  # one token [1, 1, 2], the same output for each expert
    cos = PaSE.gate_similarity([out, out, out], bank, ready)
    # expert 0: modality 0's ready prototypes (1,0), (-1,0): best 0; expert 1: (0,-1), (1,0): 0;
    # expert 2: (1,1), (-1,-1): 1/sqrt 2 (the unready (5,0) would give 0)
    torch.testing.assert_close(cos, torch.tensor([[[0.0, 0.0, 2 ** -0.5]]]))
    cos = PaSE.gate_similarity([out, -out, out], bank, torch.tensor([True, True, True]))
    torch.testing.assert_close(cos, torch.tensor([[[1.0, 1.0, 2 ** -0.5]]]))
    assert PaSE.gate_similarity([out] * 3, bank, torch.zeros(3, dtype=torch.bool)).abs().sum() == 0


def test_mix_is_the_router_and_gate_weighted_sum_of_the_experts():
    for gate in (False, True):
        model, data = build("regression", dropout=0.0, use_prototype_gate=gate)
        model.train()
        model(batches(data, 16)[0])  # banks ready
        model.eval()
        torch.manual_seed(1)
        z, mask = torch.randn(4, 5, model.cfg.hidden), torch.ones(4, 5, dtype=torch.bool)
        mask[0, 3:] = False
        layer, router = model.experts[0], model.routers[0]
        with torch.no_grad():
            outs = [layer[j](z, mask) for j in MODALITIES]
            weights = torch.softmax(router(z), dim=-1)
            if gate:
                cos = model.gate_similarity(outs, model.prototypes, model.prototype_ready)
                weights = weights * torch.sigmoid(model.gate(cos.unsqueeze(-1))).squeeze(-1)
                weights = weights / weights.sum(-1, keepdim=True)
            expected = z + sum(weights[..., j, None] * outs[j] for j in range(3))
            torch.testing.assert_close(model.mix(layer, router, z, mask), expected)
            # the router reads z: other inputs, other weights
            assert not torch.allclose(torch.softmax(router(z), -1), torch.softmax(router(2 * z), -1))


def test_fusion_equals_running_each_stream_alone():
    """Streams of one length share expert calls; the result must equal per-stream mixing."""
    model, data = build("regression", dropout=0.0)
    model.train()
    model(batches(data, 16)[0])
    model.eval()
    batch = batches(data, 16, "valid")[0]
    masks = {m: batch.mask(m) for m in MODALITIES}
    with torch.no_grad():
        streams = {m: model.encode(batch.features(m), m) for m in MODALITIES}
        pooled = []
        for m in MODALITIES:
            z = streams[m]
            for layer, router in zip(model.experts, model.routers, strict=True):
                z = model.mix(layer, router, z, masks[m])
            pooled.append(masked_mean(z, masks[m]))
        fused = torch.cat(pooled, -1)
        expected = model.head(fused + F.relu(model.fusion_proj(fused)))
        torch.testing.assert_close(model.fuse(streams, masks), expected, rtol=1e-5, atol=1e-6)
        same = {m: streams["text"] for m in MODALITIES}  # equal lengths: one stacked call
        text_mask = {m: masks["text"] for m in MODALITIES}
        together = model.fuse(same, text_mask)
        pooled = []
        for _ in MODALITIES:
            z = streams["text"]
            for layer, router in zip(model.experts, model.routers, strict=True):
                z = model.mix(layer, router, z, masks["text"])
            pooled.append(masked_mean(z, masks["text"]))
        fused = torch.cat(pooled, -1)
        torch.testing.assert_close(together, model.head(fused + F.relu(model.fusion_proj(fused))),
                                   rtol=1e-5, atol=1e-6)


def test_single_frame_attention_is_the_value_projection():
    attention = MaskedSelfAttention(8, 2)
    x = torch.randn(3, 1, 8)
    with torch.no_grad():
        qkv = attention.qkv(x).reshape(3, 1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        full = F.scaled_dot_product_attention(*qkv, attn_mask=torch.ones(3, 1, 1, 1, dtype=torch.bool))
        expected = attention.out(full.transpose(1, 2).reshape(3, 1, 8))
        torch.testing.assert_close(attention(x, torch.ones(3, 1, dtype=torch.bool)), expected)


@pytest.mark.parametrize("term", ["task", "pcl", "cal", "unimodal"])
def test_each_loss_term_decreases_when_optimised_alone(term):
    model, data = build("classification", dropout=0.0)
    model.train()
    batch = batches(data, 24)[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    values = []
    for _ in range(15):
        loss = model(batch).losses[term]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(float(loss.detach()))
    assert min(values) > 0, values  # every term is a positive loss (a flipped sign is not)
    assert values[-1] < 0.8 * values[1], values  # from the 2nd pass: banks initialised in the 1st


def test_phase_two_drops_the_unimodal_term_and_starts_sgm_only_then():
    model, data = build("regression")
    batch = batches(data)[0]
    assert "unimodal" in model(batch).losses and not model.sgm_active() and model.update_scales() == {}
    model.phi.copy_(torch.tensor([0.5, 1.0, 1.0]))
    model.phase.fill_(2)
    assert "unimodal" not in model(batch).losses and model.sgm_active()
    assert model.update_scales()["text"] == 0.5


@pytest.mark.parametrize("flag", ["use_pcl", "use_cal", "use_prototype_gate", "use_unimodal_heads", "use_sgm"])
def test_each_ablation_switch_removes_its_component(flag):
    """From the same weights and batch, one loop step with the switch off: its loss term /
    parameters are gone and the resulting model predicts differently."""
    cfg = build_config({"model": {"name": "pase"}}, ["train.lr=0.01"])
    full, data = build("regression", dropout=0.0)
    batch = batches(data, 16)[0]
    full.train()
    full(batch)  # banks ready, so the gate is live
    if flag == "use_sgm":
        full.phase.fill_(2)
        full.phi.copy_(torch.tensor([0.3, 1.0, 1.0]))
    ablated = create_model("pase", dataclasses.replace(full.cfg, **{flag: False}), data.info)
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    prefix = {"use_prototype_gate": "gate.", "use_unimodal_heads": "unimodal_heads."}.get(flag)
    if prefix:
        assert unexpected and all(k.startswith(prefix) for k in unexpected)
        assert not any(n.startswith(prefix) for n, _ in ablated.named_parameters())
    else:
        assert not unexpected
    term = {"use_pcl": "pcl", "use_cal": "cal", "use_unimodal_heads": "unimodal"}.get(flag)
    eval_batch = batches(data, 16, "valid")[0]
    predictions = []
    for model in (full, ablated):
        model.train()
        if term:
            assert (term in model(batch).losses) == (model is full)
        default_training_step(model, batch, {"main": build_optimizer(model, cfg)}, cfg.train, (1, 1))
        model.eval()
        with torch.no_grad():
            predictions.append(model(eval_batch).prediction)
    assert not torch.allclose(predictions[0], predictions[1], atol=1e-5)


def test_unimodal_term_is_the_sum_of_each_heads_loss_on_its_own_modality():
    model, data = build("regression", dropout=0.0)
    batch = batches(data, 16)[0]
    h = pooled(model, batch)
    expected = sum(float(torch.nn.functional.l1_loss(model.unimodal_heads[m](h[m]).squeeze(-1), batch.labels))
                   for m in MODALITIES)
    model.eval()
    with torch.no_grad():
        assert float(model(batch).losses["unimodal"]) == pytest.approx(expected, rel=1e-5)
