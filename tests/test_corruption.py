"""Corruptions on hand-checkable batches, and every registered model on removed modalities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import make_data
from test_models import MODELS, as_trained, first_batch, tiny_model

from msakit.batch import MODALITIES, Batch
from msakit.config import build_config
from msakit.corruption import (
    CONDITIONS,
    UNK_TOKEN,
    BatchCorruption,
    CorruptionConfig,
    add_noise,
    block_length,
    corrupt,
    drop_block,
    drop_frames,
    drop_modalities,
    feature_std,
    keep_condition,
    remove_modalities,
)
from msakit.train.loop import fit


def make_batch(size=4, steps=10, lengths=None, dim=3, texts=None) -> Batch:
    """Features = 1 + position on real frames (so a zeroed frame is visible), 0 on padding."""
    lengths = torch.as_tensor(lengths if lengths is not None else [steps] * size)
    mask = torch.arange(steps)[None, :] < lengths[:, None]  # [B, L]
    x = (1.0 + torch.arange(steps, dtype=torch.float32))[None, :, None].expand(size, steps, dim) * mask[..., None]
    parts = {}
    for m in MODALITIES:
        parts[m], parts[f"{m}_mask"] = x.clone(), mask.clone()
    return Batch(**parts, labels=torch.zeros(size), index=torch.arange(size), texts=texts)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_removed_consistently(before: Batch, after: Batch):
    """Removed positions are zero and masked; kept ones unchanged; no position is added."""
    for m in MODALITIES:
        gone = before.mask(m) & ~after.mask(m)
        assert not (after.mask(m) & ~before.mask(m)).any()
        assert (after.features(m)[gone] == 0).all()
        kept = after.mask(m)
        assert after.features(m)[kept].equal(before.features(m)[kept])
        assert (after.features(m)[~before.mask(m)] == 0).all()  # padding stays zero


@pytest.mark.parametrize("protocol", ["drop", "block", "missing", "noise"])
def test_level_zero_is_the_identity(protocol):
    batch = make_batch()
    std = {m: torch.ones(3) for m in MODALITIES}
    assert corrupt(batch, protocol, 0.0, gen(), std) is batch


def test_random_drop_hits_the_rate_and_updates_masks():
    batch = make_batch(size=100, steps=50, lengths=torch.randint(1, 51, (100,), generator=gen(1)))
    out = drop_frames(batch, 0.3, gen())
    assert_removed_consistently(batch, out)
    for m in MODALITIES:
        real = batch.mask(m).sum().item()
        share = (batch.mask(m) & ~out.mask(m)).sum().item() / real
        assert abs(share - 0.3) < 0.03, (m, share)  # ~2500 positions: 3 sigma ~ 0.028
    assert not out.mask("text").equal(out.mask("audio"))  # independent per modality


def test_random_drop_is_seeded():
    batch = make_batch(size=20)
    a, b = drop_frames(batch, 0.5, gen(3)), drop_frames(batch, 0.5, gen(3))
    c = drop_frames(batch, 0.5, gen(4))
    assert a.text_mask.equal(b.text_mask) and a.vision.equal(b.vision)
    assert not a.text_mask.equal(c.text_mask)


def test_drop_with_per_sample_rates():
    batch = make_batch(size=3, steps=40)
    rates = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = drop_frames(batch, rates, gen())
    assert out.mask("text")[0].all() and out.mask("audio")[0].all() and out.mask("vision")[0].all()
    assert not out.mask("text")[1].any() and out.mask("audio")[1].all() and not out.mask("vision")[1].any()
    assert out.mask("text")[2].all() and not out.mask("audio")[2].any()


def test_block_drop_removes_one_inner_run_of_the_right_length():
    batch = make_batch(size=5, steps=12, lengths=[12, 10, 7, 2, 1])
    out = drop_block(batch, 0.5, gen())
    assert_removed_consistently(batch, out)
    for i, n in enumerate([12, 10, 7, 2, 1]):
        for m in MODALITIES:
            gone = (batch.mask(m)[i] & ~out.mask(m)[i]).nonzero().squeeze(-1).tolist()
            assert len(gone) == block_length(n, 0.5) == max(0, round((n - 2) * 0.5 + 1e-9))
            if gone:
                assert gone == list(range(gone[0], gone[0] + len(gone)))  # contiguous
                assert gone[0] >= 1 and gone[-1] <= n - 2  # first and last kept


def test_block_at_full_rate_keeps_only_first_and_last():
    out = drop_block(make_batch(size=2, steps=6), 1.0, gen())
    assert out.text_mask.tolist() == [[True, False, False, False, False, True]] * 2
    assert block_length(7, 0.25) == 1 and block_length(8, 0.25) == 2  # 1.25 -> 1, 1.5 -> 2 (half up)


def test_block_placement_is_uniform_over_the_interior():
    batch = make_batch(size=400, steps=6)
    out = drop_block(batch, 0.25, gen())  # one position out of 1..4
    starts = (~out.text_mask).float().argmax(dim=1)
    counts = torch.bincount(starts, minlength=6)
    assert counts[0] == 0 and counts[5] == 0
    assert (counts[1:5] > 60).all()  # each of 4 places ~100 times


def test_missing_removes_the_exact_share_and_keeps_one_modality():
    batch = make_batch(size=10, steps=4, lengths=[4, 3, 2, 1, 4, 3, 2, 1, 4, 4])
    out = drop_modalities(batch, 0.5, gen())
    assert_removed_consistently(batch, out)
    present = torch.stack([out.mask(m).any(dim=1) for m in MODALITIES], dim=1)  # [B, 3]
    assert (~present).sum() == 15  # round(0.5 * 10 * 3)
    assert present.any(dim=1).all()
    for m in MODALITIES:  # a modality is removed whole or not at all
        rows = ~out.mask(m).any(dim=1)
        assert (out.features(m)[rows] == 0).all()
        assert out.features(m)[~rows].equal(batch.features(m)[~rows])
    full = drop_modalities(batch, 1.0, gen())
    kept = torch.stack([full.mask(m).any(dim=1) for m in MODALITIES], dim=1)
    assert kept.sum(dim=1).tolist() == [1] * 10  # saturates: every sample keeps exactly one


def test_missing_is_seeded_and_spreads_over_modalities():
    batch = make_batch(size=300, steps=2)
    a, b = drop_modalities(batch, 0.3, gen(7)), drop_modalities(batch, 0.3, gen(7))
    assert all(a.mask(m).equal(b.mask(m)) for m in MODALITIES)
    lost = torch.stack([~a.mask(m).any(dim=1) for m in MODALITIES], dim=1).float().mean(dim=0)
    assert ((lost - 0.3).abs() < 0.08).all(), lost


def test_missing_with_per_sample_rates_never_removes_everything():
    batch = make_batch(size=50, steps=3)
    out = drop_modalities(batch, torch.ones(50, 3), gen())
    kept = torch.stack([out.mask(m).any(dim=1) for m in MODALITIES], dim=1)
    assert kept.sum(dim=1).tolist() == [1] * 50


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_mmin_conditions(condition):
    batch = make_batch(size=3)
    out = keep_condition(batch, condition)
    for m in MODALITIES:
        if m in CONDITIONS[condition]:
            assert out.mask(m).equal(batch.mask(m)) and out.features(m).equal(batch.features(m))
        else:
            assert not out.mask(m).any() and (out.features(m) == 0).all()


def test_noise_scales_with_the_training_std_and_spares_padding():
    batch = make_batch(size=64, steps=30, lengths=torch.randint(1, 31, (64,), generator=gen(2)), dim=2)
    std = {m: torch.tensor([0.5, 2.0]) for m in MODALITIES}
    out = add_noise(batch, 0.4, gen(), std)
    for m in MODALITIES:
        assert out.mask(m).equal(batch.mask(m))
        delta = (out.features(m) - batch.features(m))[batch.mask(m)]  # [N_real, 2]
        assert torch.allclose(delta.std(dim=0), 0.4 * std[m], rtol=0.08)
        assert (out.features(m)[~batch.mask(m)] == 0).all()


def test_feature_std_uses_real_frames_only():
    from fakes import make_data

    arrays = make_data().splits["train"]
    std = feature_std(arrays)
    x, n = arrays.features["audio"], arrays.lengths["audio"]
    real = np.concatenate([x[i, : n[i]] for i in range(len(n))])
    np.testing.assert_allclose(std["audio"].numpy(), real.std(axis=0), rtol=1e-5)


def test_transcript_words_become_unk():
    texts = ["a b c d e f", "one two"]
    batch = make_batch(size=2, texts=texts)
    assert drop_frames(batch, 1.0, gen()).texts == [" ".join([UNK_TOKEN] * 6), f"{UNK_TOKEN} {UNK_TOKEN}"]
    block = drop_block(batch, 1.0, gen()).texts
    assert block == [f"a {' '.join([UNK_TOKEN] * 4)} f", "one two"]
    gone = remove_modalities(batch, torch.tensor([[True, False, False], [False, True, True]]))
    assert gone.texts == [" ".join([UNK_TOKEN] * 6), "one two"]
    half = drop_frames(make_batch(size=1, texts=[" ".join(["w"] * 2000)]), 0.5, gen()).texts[0].split()
    assert abs(half.count(UNK_TOKEN) / 2000 - 0.5) < 0.05


def test_shapley_subsets_without_text_hide_the_transcripts_too():
    """A model reading Batch.texts (text_bert, PSA-MF) kept the whole text in every subset, so
    `msakit analyze` gave text a Shapley value of 0 on a text-only model."""
    from msakit.analysis import mask_modalities

    batch = make_batch(size=2, texts=["a b c", "one two"])
    without_text = mask_modalities(batch, [False, True, True])
    assert without_text.texts == [" ".join([UNK_TOKEN] * 3), f"{UNK_TOKEN} {UNK_TOKEN}"]
    assert not without_text.text.any() and torch.equal(without_text.audio, batch.audio)
    assert mask_modalities(batch, [True, False, False]).texts == ["a b c", "one two"]
    assert mask_modalities(make_batch(size=1), [False, True, True]).texts is None


def test_batch_corruption_is_keyed_and_random_mode_keeps_half_complete():
    batch = make_batch(size=400, steps=20)
    transform = BatchCorruption("drop", 1.0, seed=5, mode="random")
    a, b, c = transform(batch, 3), transform(batch, 3), transform(batch, 4)
    assert a.text_mask.equal(b.text_mask) and not a.text_mask.equal(c.text_mask)
    untouched = torch.stack([a.mask(m).all(dim=1) for m in MODALITIES], dim=1).all(dim=1)
    assert abs(untouched.float().mean().item() - 0.5) < 0.08
    # corrupted samples draw their own rate per modality, uniform in [0, 1]: mean removed share 1/2
    share = torch.stack([(~a.mask(m)).float().mean(dim=1) for m in MODALITIES], dim=1)[~untouched]
    assert abs(share.mean().item() - 0.5) < 0.05 and share.std() > 0.2


def test_each_training_seed_epoch_and_step_draws_its_own_corruption():
    """The stream seed once was the training seed, so seed 2's epoch 1 replayed seed 1's epoch 2
    (and seed 0's epoch e, robustness seed e); validation's streams are apart from every training
    batch's."""
    batch, cfg = make_batch(size=64, steps=20), CorruptionConfig(protocol="drop", rate=0.5, mode="random")
    masks = {}
    for seed in (1, 2, 3):
        transform = BatchCorruption.from_config(cfg, None, seed)
        for epoch in (0, 1, 2):
            for step in (0, 1):
                key = BatchCorruption.training_key(epoch, step)
                masks[seed, epoch, step] = transform(batch, key).audio_mask
        masks[seed, "valid"] = transform.for_validation()(batch, 0).audio_mask
    for seed in (0, 1, 2):  # evaluation's streams (msakit robustness), batch 0
        masks["robustness", seed] = BatchCorruption("drop", 0.5, seed, mode="random")(batch, 0).audio_mask
    masks[0, 0, 0] = BatchCorruption.from_config(cfg, None, 0)(batch, 0).audio_mask  # training seed 0
    drawn = [m.flatten().tolist() for m in masks.values()]
    assert len({tuple(m) for m in drawn}) == len(drawn)
    again = BatchCorruption.from_config(cfg, None, 2)(batch, BatchCorruption.training_key(1, 1))
    assert again.audio_mask.equal(masks[2, 1, 1])  # resume-safe: a key is its own stream


def test_the_training_loop_keys_each_batch_by_epoch_and_step(monkeypatch, tmp_path):
    seen = []
    original = BatchCorruption.__call__
    monkeypatch.setattr(BatchCorruption, "__call__", lambda self, b, key: seen.append((self.seed, key)) or original(self, b, key))
    cfg = build_config({}, ["train.epochs=2", "data.batch_size=32", "train.num_threads=1", "train.progress=false",
                            "train.corruption.protocol=drop", "train.corruption.rate=0.5", "train.corruption.validate=true"])
    fit(cfg, make_data(sizes=(64, 16, 16)), 3, tmp_path / "seed_3")
    assert [k for s, k in seen if s == 4 * 1_000_003] == [0, 1, 1_000_003, 1_000_004]
    assert {s for s, _ in seen} == {4 * 1_000_003, 4 * 1_000_003 + 1_000_002}  # the other: validation


def test_corruption_config_is_validated():
    with pytest.raises(ValueError, match="protocol"):
        CorruptionConfig(protocol="blur")
    with pytest.raises(ValueError, match="rate"):
        CorruptionConfig(protocol="drop", rate=1.5)
    with pytest.raises(ValueError, match="condition"):
        CorruptionConfig(protocol="conditions")
    transform = BatchCorruption.from_config(CorruptionConfig(protocol="conditions", condition="av"), None, 0)
    assert not transform(make_batch(), 0).text_mask.any()


@pytest.mark.parametrize(("settings", "message"), [
    ({"protocol": "drop"}, "protocol drop at rate 0 corrupts nothing"),
    ({"protocol": "noise", "mode": "random"}, "protocol noise at rate 0"),
    ({"rate": 0.5}, "rate has no effect with protocol none"),
    ({"protocol": "conditions", "condition": "a", "rate": 0.5}, "rate has no effect with protocol conditions"),
    ({"protocol": "drop", "rate": 0.3, "condition": "a"}, "condition has no effect with protocol drop"),
    ({"protocol": "conditions", "mode": "random", "condition": "a"}, "condition has no effect with protocol "
                                                                      "conditions, mode random"),
    ({"mode": "random"}, "mode has no effect with protocol none"),
    ({"protocol": "drop", "rate": 0.3, "complete_fraction": 0.2}, "complete_fraction has no effect"),
    ({"validate": True}, "validate has no effect with protocol none"),
])
def test_settings_that_would_do_nothing_are_refused(settings, message):
    """Accepted before, and the run trained clean (or otherwise than its config said). Refused for
    new runs only: a config an older version stored (in a checkpoint) still builds."""
    with pytest.raises(ValueError, match=message):
        CorruptionConfig(**settings).check_effective()


def test_a_new_run_is_refused_but_an_old_checkpoint_still_evaluates(tmp_path, capsys):
    import torch

    from msakit.cli import main
    from msakit.evaluate import evaluate_checkpoint

    small = ["--epochs", "1", "--quiet", "--set", "data.synthetic.train_size=40", "data.synthetic.valid_size=20",
             "data.synthetic.test_size=20", "train.num_threads=1"]
    assert main(["train", "--out", str(tmp_path / "new"), *small, "train.corruption.protocol=drop"]) == 2
    assert "train.corruption: protocol drop at rate 0 corrupts nothing" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # tune checks no base: its search sets what the base leaves at its default (a rate of 0 is a
    # clean run, which a search may choose), and its final run must train what it chose
    (tmp_path / "space.yaml").write_text("train.corruption.rate: [0.0, 0.0]\n")
    assert main(["tune", "--trials", "1", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "study"),
                 *small, "train.corruption.protocol=drop"]) == 0
    assert main(["train", "--out", str(tmp_path / "old"), *small]) == 0
    best = tmp_path / "old" / "seed_1" / "best.pt"
    state = torch.load(best, weights_only=True)  # as an older version stored an ignored setting
    state["config"]["train"]["corruption"]["complete_fraction"] = 0.3
    torch.save(state, best)
    assert evaluate_checkpoint(best).metrics["mae"] > 0


CASES = [*CONDITIONS, "none"]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_handles_removed_modalities(name):
    """Each MMIN condition and all three modalities removed: finite predictions and losses in
    eval mode; in train mode also finite gradients (all removed, and only text kept)."""
    model, data = tiny_model(name, "regression")
    for mode, cases in (("eval", CASES), ("train", ["none", "t"])):
        getattr(model, mode)()
        batch = as_trained(model, first_batch(data, batch_size=4), data)
        for case in cases:
            corrupted = (keep_condition(batch, case) if case != "none"
                         else remove_modalities(batch, torch.ones(batch.size, 3, dtype=torch.bool)))
            with torch.set_grad_enabled(mode == "train"):
                out = model(corrupted)
            assert torch.isfinite(out.prediction).all(), (mode, case)
            assert all(torch.isfinite(v) for v in out.losses.values()), (mode, case)
            if mode == "train":
                model.zero_grad()
                sum(out.losses.values()).backward()
                bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
                assert not bad, (case, bad)
