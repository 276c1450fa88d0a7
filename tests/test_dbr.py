"""DBR: named loss terms, ablation flags, capped borrowing, branch weights, the ONE shared encoder,
HSIC, logged gates, the text-encoder branch, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from fakes import loss_term_when_optimised_alone, make_data

from msakit.batch import MODALITIES, Batch
from msakit.config import build_config
from msakit.data import to_loader
from msakit.models.dbr import DBR, DBRConfig, balance_kl, rbf_hsic
from msakit.registry import create_model
from msakit.train.experiment import run_experiment

torch.set_num_threads(1)

ALL_TERMS = {"task", "cmd", "diff", "recon", "hsic", "anchor_orth", "unimodal", "leak", "balance"}


def build(task: str = "regression", **changes) -> tuple[DBR, object]:
    data = make_data(task)
    torch.manual_seed(0)
    return create_model("dbr", dataclasses.replace(DBRConfig.tiny(), **changes), data.info), data


def first_batch(data, batch_size=8, split="train") -> Batch:
    return next(iter(to_loader(data.splits[split], data.info, batch_size, shuffle=False)))


@pytest.mark.parametrize("task", ["regression", "classification", "multi_binary"])
def test_every_loss_term_is_named_and_finite(task):
    model, data = build(task)
    model.train()
    out = model(first_batch(data))
    assert set(out.losses) == ALL_TERMS
    for name, value in out.losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    sum(out.losses.values()).backward()


@pytest.mark.parametrize(
    "changes,gone_terms,gone_logs,gone_module",
    [
        ({"use_tsf": False}, {"hsic"}, {"tsf_gate"}, "tsf"),
        ({"use_agpr": False}, {"anchor_orth", "unimodal", "leak"},
         {"beta_text", "beta_audio", "beta_vision"}, "agpr"),
        ({"use_borrowing": False}, set(), {"beta_text", "beta_audio", "beta_vision"}, None),
        ({"use_brf": False}, {"balance"}, {"alpha_shared", "alpha_private"}, "brf"),
        ({"sim_weight": 0.0}, {"cmd"}, set(), None),
        ({"diff_weight": 0.0}, {"diff"}, set(), None),
        ({"recon_weight": 0.0}, {"recon"}, set(), "recon"),
        ({"hsic_weight": 0.0}, {"hsic"}, set(), None),
        ({"balance_weight": 0.0}, {"balance"}, set(), None),
        ({"anchor_weight": 0.0, "unimodal_weight": 0.0, "leak_weight": 0.0},
         {"anchor_orth", "unimodal", "leak"}, set(), None),
    ],
)
def test_each_ablation_flag_removes_its_term_and_branch(changes, gone_terms, gone_logs, gone_module):
    full, data = build()
    model, _ = build(**changes)
    batch = first_batch(data)
    full_out, out = full(batch), model(batch)
    assert set(out.losses) == set(full_out.losses) - gone_terms
    assert gone_terms <= set(full_out.losses)
    assert not gone_logs & set(out.logs) and gone_logs <= set(full_out.logs)
    if gone_module:
        assert getattr(model, gone_module) is None and getattr(full, gone_module) is not None
    if changes == {"use_borrowing": False}:
        assert model.agpr is not None and model.agpr.borrow is None
        assert "anchor_orth" in out.losses
    assert torch.isfinite(out.prediction).all()
    assert sum(p.numel() for p in model.parameters()) <= sum(p.numel() for p in full.parameters())


def test_borrowing_needs_agpr():
    assert DBRConfig(use_agpr=False, use_borrowing=True).use_borrowing is False


CAP = float(torch.tensor(0.3))  # 0.3 in float32 (0.30000001...), the parameters' precision


def set_gate_bias(model: DBR, value: float) -> None:
    with torch.no_grad():
        for gate in model.agpr.borrow_gate.values():
            gate.bias.fill_(value)


def test_beta_never_exceeds_the_cap():
    model, data = build()
    pooled = torch.rand(5, 3, 8)
    torch.testing.assert_close(model.agpr.beta(pooled), torch.full((5, 3), 0.15))  # zero init: cap / 2
    set_gate_bias(model, 1e4)
    beta = model.agpr.beta(pooled)
    assert torch.all(beta <= CAP) and torch.allclose(beta, torch.full((5, 3), 0.3))
    out = model(first_batch(data))
    assert all(out.logs[f"beta_{m}"] <= CAP for m in MODALITIES)
    set_gate_bias(model, -1e4)
    assert torch.all(model.agpr.beta(pooled) >= 0) and model.agpr.beta(pooled).max() < 1e-6
    # training that pushes borrowing up still stays under the cap
    model, data = build()
    optimizer = torch.optim.SGD(model.agpr.borrow_gate.parameters(), lr=100.0)
    for _ in range(5):
        optimizer.zero_grad()
        (-model.agpr.beta(pooled).sum()).backward()
        optimizer.step()
        assert torch.all(model.agpr.beta(pooled) <= CAP)


def test_borrowing_gates_are_learnt_per_modality_in_a_short_real_run(tmp_path):
    """Finding 3 of issue 10: at train.lr under Adam the gates stayed at 0.15 and equal. On the
    planted fake data (label = text + audio factors) the training loss falls with more borrowing,
    and within 2 epochs of the real loop at least one modality's mean beta moves by > 0.05."""
    data = make_data("regression", sizes=(96, 16, 16))
    cfg = build_config(
        {"model": {"name": "dbr", **dataclasses.asdict(DBRConfig.tiny())}},
        ["train.epochs=2", "train.progress=false", "train.seeds=[1]", "train.patience=50",
         "data.batch_size=16", "train.lr=0.003"],
    )
    run_experiment(cfg, tmp_path, data=data)
    last = json.loads((tmp_path / "seed_1" / "log.jsonl").read_text().splitlines()[-1])
    moved = {m: abs(last[f"beta_{m}"] - 0.15) for m in MODALITIES}
    assert max(moved.values()) > 0.05, moved
    state = torch.load(tmp_path / "seed_1" / "best.pt", weights_only=True)["model"]
    weights = torch.stack([state[f"agpr.borrow_gate.{m}.weight"] for m in MODALITIES])  # [3, 1, D]
    assert weights.abs().sum() > 0  # the gates read the tokens (zero at init)
    assert not torch.allclose(weights[0], weights[1]) and not torch.allclose(weights[1], weights[2])


def test_borrowing_gates_have_their_own_learning_rate():
    model, _ = build(borrow_lr_scale=7.0)
    train_cfg = build_config(overrides=["train.lr=0.002"]).train
    groups = model.parameter_groups(train_cfg)
    gate_ids = {id(p) for p in model.agpr.borrow_gate.parameters()}
    gate_group = [g for g in groups if {id(p) for p in g["params"]} == gate_ids]
    assert len(gate_group) == 1 and gate_group[0]["lr"] == pytest.approx(0.014)
    assert "lr" not in groups[0] and not gate_ids & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def test_branch_weights_sum_to_one_and_balance_is_kl_to_uniform():
    model, data = build()
    torch.manual_seed(1)
    h_s, h_p = torch.randn(5, 3, 8), torch.randn(5, 3, 8)
    fused, alpha = model.brf(h_s, h_p)
    assert fused.shape == (5, 8) and alpha.shape == (5, 2)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(5))
    assert torch.all(alpha > 0)
    out = model(first_batch(data))
    assert out.logs["alpha_shared"] + out.logs["alpha_private"] == pytest.approx(1.0, abs=1e-6)
    assert float(balance_kl(torch.full((4, 2), 0.5))) == pytest.approx(0.0, abs=1e-7)
    assert float(balance_kl(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))) > 0.3


def test_shared_encoder_is_one_module_used_for_every_modality():
    model, data = build()
    batch = first_batch(data)
    shared_modules = [name for name, _ in model.named_children() if name == "shared"]
    assert shared_modules == ["shared"]
    assert isinstance(model.shared, torch.nn.Sequential)  # not a per-modality ModuleDict
    assert set(model.private) == set(MODALITIES)
    seen = []
    handle = model.shared.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    model(batch)
    handle.remove()
    assert seen == [batch.features(m).shape[1] for m in MODALITIES]  # one call per modality
    # and the private encoders are distinct modules with distinct weights
    weights = [model.private[m][0].weight for m in MODALITIES]
    assert len({id(w) for w in weights}) == 3


def test_hsic_is_zero_for_independent_and_positive_for_dependent_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    independent = float(rbf_hsic(x, torch.randn(300, 4, generator=g)))
    dependent = float(rbf_hsic(x, x + 0.3 * torch.randn(300, 4, generator=g)))
    nonlinear = float(rbf_hsic(x, x**2))  # uncorrelated with x, still dependent
    same = float(rbf_hsic(x, x))
    assert abs(independent) < 2e-3
    assert dependent > 20 * abs(independent) and nonlinear > 5 * abs(independent)
    assert same > dependent
    one = rbf_hsic(x[:1], x[:1])
    assert float(one) == 0.0 and torch.isfinite(one)


def test_logs_and_epoch_end_report_alpha_and_beta():
    model, data = build("classification")
    model.train()
    for batch in to_loader(data.splits["train"], data.info, 16, shuffle=False):
        out = model(batch)
    assert {"alpha_shared", "alpha_private", "beta_text", "beta_audio", "beta_vision", "tsf_gate"} <= set(out.logs)
    logs = model.on_epoch_end(1, {})
    assert {"alpha_shared", "alpha_private", "beta_text", "beta_audio", "beta_vision"} <= set(logs)
    assert logs["alpha_shared"] + logs["alpha_private"] == pytest.approx(1.0, abs=1e-6)
    assert "alpha_shared" not in model.on_epoch_end(2, {})  # reset: no training batch since


@pytest.mark.parametrize(
    "changes", [{}, {"use_tsf": False}, {"use_agpr": False}, {"use_brf": False}, {"use_borrowing": False}]
)
def test_padding_never_changes_a_prediction(changes):
    model, data = build(**changes)
    model.eval()
    batch = first_batch(data)
    fields = {}
    for m in MODALITIES:
        x, mask = batch.features(m), batch.mask(m)
        fields[m] = torch.cat([x, torch.randn(x.shape[0], 6, x.shape[2]) * 100], dim=1)
        fields[f"{m}_mask"] = torch.cat([mask, torch.zeros(x.shape[0], 6, dtype=torch.bool)], dim=1)
    padded = Batch(**fields, labels=batch.labels, index=batch.index)
    with torch.no_grad():
        plain, longer = model(batch), model(padded)
    torch.testing.assert_close(plain.prediction, longer.prediction, rtol=1e-4, atol=1e-5)
    for name in plain.losses:
        assert torch.isfinite(longer.losses[name]), name


def test_text_encoder_branch_reads_raw_texts_and_has_its_own_lr():
    data = make_data("classification")
    for split, arrays in data.splits.items():
        arrays.texts = [f"{split} utterance number {i} says hello" for i in range(len(arrays))]
    torch.manual_seed(0)
    cfg = dataclasses.replace(DBRConfig.tiny(), text_encoder="tiny", text_lr=3e-5)
    model = create_model("dbr", cfg, data.info)
    assert "text" not in model.encoders
    batch = first_batch(data)
    out = model(batch)
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for p in model.text_encoder.parameters() if p.requires_grad)
    # the transcripts drive the text branch: other texts, other prediction
    model.eval()
    with torch.no_grad():
        a = model(batch).prediction
        batch.texts = ["something else entirely"] * batch.size
        b = model(batch).prediction
    assert not torch.allclose(a, b)
    groups = model.parameter_groups(build_config().train)
    encoder_ids = {id(p) for p in model.text_encoder.parameters()}
    assert groups[1]["lr"] == 3e-5 and {id(p) for p in groups[1]["params"]} == encoder_ids
    assert not encoder_ids & {id(p) for p in groups[0]["params"]}
    batch.texts = None
    with pytest.raises(ValueError, match="no raw transcripts"):
        model(batch)


def test_end_to_end_two_epochs_logs_the_rebalancing(tmp_path):
    data = make_data("classification")
    cfg = build_config(
        {"model": {"name": "dbr", **dataclasses.asdict(DBRConfig.tiny())}},
        ["train.epochs=2", "train.progress=false", "train.seeds=[3]", "train.patience=5"],
    )
    results = run_experiment(cfg, tmp_path, data=data)
    assert results["model"] == "dbr" and results["selection"]["metric"] == "f1_macro"
    assert 0.0 <= results["test_mean"]["acc"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "seed_3" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for record in lines:
        for key in ("alpha_shared", "alpha_private", "beta_text", "beta_audio", "beta_vision",
                    "train_cmd", "train_hsic", "train_balance", "train_leak"):
            assert key in record, key
        assert record["beta_text"] <= CAP
        assert record["alpha_shared"] + record["alpha_private"] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- mechanisms (issue 10)


def capture(module, store: dict, key: str):
    return module.register_forward_hook(lambda mod, args, out: store.__setitem__(key, (args, out)))


def test_mech_borrowing_attends_to_the_other_modalities_anchors_only():
    model, data = build()
    seen = {}
    hooks = [capture(model.agpr.borrow[m], seen, m) for m in MODALITIES]
    model(first_batch(data))
    for h in hooks:
        h.remove()
    for m in MODALITIES:
        (query, keys, values, _), _ = seen[m]
        others = torch.cat([model.agpr.anchors[n] for n in MODALITIES if n != m])  # [2K, D]
        torch.testing.assert_close(keys[0], others)
        torch.testing.assert_close(values[0], others)


def test_mech_agpr_mixes_routed_and_borrowed_by_the_gate_read_from_own_private_tokens():
    model, data = build()
    agpr = model.agpr
    torch.manual_seed(3)
    with torch.no_grad():
        for gate in agpr.borrow_gate.values():
            gate.weight.normal_()
            gate.bias.normal_()
    private = {m: torch.rand(4, 5, 8) for m in MODALITIES}
    masks = {m: torch.arange(5)[None] < torch.tensor([[5], [3], [1], [4]]) for m in MODALITIES}
    h_p, beta = agpr(private, masks)
    for i, m in enumerate(MODALITIES):
        p, anchors = private[m], agpr.anchors[m]
        pooled = (p * masks[m][..., None]).sum(1) / masks[m].sum(1, keepdim=True)
        b = 0.3 * torch.sigmoid(agpr.borrow_gate[m](pooled))  # [B, 1], from m's own tokens
        torch.testing.assert_close(beta[:, i : i + 1], b)
        cos = torch.nn.functional.normalize(p, dim=-1) @ torch.nn.functional.normalize(anchors, dim=-1).t()
        own = torch.softmax(cos / 0.1, dim=-1) @ anchors + p
        others = torch.cat([agpr.anchors[n] for n in MODALITIES if n != m]).expand(4, -1, -1)
        borrowed = agpr.borrow[m](p, others, others, torch.ones(4, others.shape[1], dtype=torch.bool))
        mixed = (1 - b[..., None]) * own + b[..., None] * borrowed
        expected = (mixed * masks[m][..., None]).sum(1) / masks[m].sum(1, keepdim=True)
        torch.testing.assert_close(h_p[:, i], expected)
    # another modality's tokens do not move this modality's gate
    changed = dict(private, audio=torch.rand(4, 5, 8))
    _, beta2 = agpr(changed, masks)
    torch.testing.assert_close(beta2[:, [0, 2]], beta[:, [0, 2]])
    assert not torch.allclose(beta2[:, 1], beta[:, 1])


def test_mech_every_loss_reads_the_right_state():
    """Recompute each named term by hand from the captured intermediate states."""
    from msakit.losses import cmd, orthogonality_loss, task_loss

    model, data = build()
    model.eval()
    batch = first_batch(data)
    seen = {}
    hooks = [capture(model.tsf, seen, "tsf"), capture(model.agpr, seen, "agpr"), capture(model.brf, seen, "brf"),
             capture(model.brf.shared_reads_private, seen, "s"), capture(model.brf.private_reads_shared, seen, "p")]
    with torch.no_grad():
        out = model(batch)
        x, masks = model.encode(batch)
    for h in hooks:
        h.remove()
    cfg = model.cfg

    def mean(v, m):
        return (v * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    with torch.no_grad():
        s = {m: mean(model.shared(x[m]), masks[m]) for m in MODALITIES}
        p = {m: mean(model.private[m](x[m]), masks[m]) for m in MODALITIES}
        u = {m: mean(x[m], masks[m]) for m in MODALITIES}
        pairs = [("text", "audio"), ("text", "vision"), ("audio", "vision")]
        expected = {
            "cmd": cfg.sim_weight * sum(cmd(s[a], s[b], cfg.cmd_moments) for a, b in pairs) / 3,
            "diff": cfg.diff_weight * (sum(orthogonality_loss(p[m], s[m]) for m in MODALITIES)
                                       + sum(orthogonality_loss(p[a], p[b]) for a, b in pairs)),
            "recon": cfg.recon_weight * sum(
                torch.nn.functional.mse_loss(model.recon[m](s[m] + p[m]), u[m]) for m in MODALITIES) / 3,
        }
        _, (h_s, z_tmp, z_str, g) = seen["tsf"]
        torch.testing.assert_close(h_s, g * z_tmp + (1 - g) * z_str)
        expected["hsic"] = cfg.hsic_weight * sum(rbf_hsic(z_tmp[:, i], z_str[:, i]) for i in range(3)) / 3
        _, (h_p, _) = seen["agpr"]
        expected["leak"] = cfg.leak_weight * sum(orthogonality_loss(h_p[:, i], h_s[:, i]) for i in range(3))
        expected["unimodal"] = cfg.unimodal_weight * sum(
            task_loss(model.unimodal_heads[m](h_p[:, i]).squeeze(-1), batch.labels, data.info)
            for i, m in enumerate(MODALITIES)) / 3
        (brf_in, (fused, alpha)) = seen["brf"]
        torch.testing.assert_close(brf_in[0], h_s)
        torch.testing.assert_close(brf_in[1], h_p)
        s_vec, p_vec = seen["s"][1].mean(1), seen["p"][1].mean(1)
        torch.testing.assert_close(fused, alpha[:, :1] * s_vec + alpha[:, 1:] * p_vec)
        expected["balance"] = cfg.balance_weight * balance_kl(alpha)
        torch.testing.assert_close(out.prediction, model.head(fused).squeeze(-1))
    for name, value in expected.items():
        torch.testing.assert_close(out.losses[name], value, msg=name)


def test_mech_balance_and_anchor_orthogonality_formulas():
    alpha = torch.tensor([[0.8, 0.2], [0.6, 0.4]])  # mean (0.7, 0.3)
    want = 0.7 * torch.log(torch.tensor(1.4)) + 0.3 * torch.log(torch.tensor(0.6))
    torch.testing.assert_close(balance_kl(alpha), want)
    model, _ = build()
    with torch.no_grad():
        for m in MODALITIES:
            model.agpr.anchors[m].copy_(2.0 * torch.eye(3, 8))  # orthogonal rows, any norm
    assert float(model.agpr.anchor_orthogonality().detach()) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.agpr.anchors["text"].copy_(torch.ones(3, 8))  # all rows equal: off-diagonal 1
    assert float(model.agpr.anchor_orthogonality().detach()) == pytest.approx(6 / 9 / 3, rel=1e-5)


@pytest.mark.parametrize("term", sorted(ALL_TERMS - {"task"}))
def test_mech_each_loss_term_falls_when_optimised_alone(term):
    model, data = build()
    batch = first_batch(data, 16)
    values = loss_term_when_optimised_alone(model, batch, term, steps=15)
    assert values[-1] < values[0], values


@pytest.mark.parametrize("switch,module", [("use_tsf", "tsf"), ("use_agpr", "agpr"), ("use_brf", "brf"),
                                            ("use_borrowing", "borrow")])
def test_mech_each_switch_changes_the_output(switch, module):
    full, data = build()
    model, _ = build(**{switch: False})
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape},
                          strict=False)
    full.eval(), model.eval()
    batch = first_batch(data)
    with torch.no_grad():
        assert not torch.allclose(full(batch).prediction, model(batch).prediction)
    names = {n for n, _ in model.named_parameters()}
    assert not any(f".{module}." in f".{n}" or f".{module}_gate." in f".{n}" for n in names)
