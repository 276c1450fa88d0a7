"""Linear probes of per-modality encoders (msakit analyze --probes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes import make_data
from test_models import MODELS, tiny_model

from msakit.probes import encoder_features, encoder_modules, fit_probe
from msakit.train.checkpoint import CheckpointError


@pytest.mark.parametrize("name", MODELS)
def test_every_model_exposes_its_encoders(name):
    model, data = tiny_model(name, "regression")
    if name == "text_bert":  # text only, no fusion: nothing to probe, said clearly
        with pytest.raises(CheckpointError, match="modality_encoders"):
            encoder_modules(model)
        return
    modules = encoder_modules(model)
    assert modules and set(modules) <= {"text", "audio", "vision"}
    features = encoder_features(model, data.splits["valid"], data.info, 8, "cpu")
    assert features and set(features) <= set(modules)
    for m, x in features.items():
        assert x.shape[0] == len(data.splits["valid"]) and x.ndim == 2 and np.isfinite(x).all(), m


def test_features_are_the_encoder_outputs_in_split_order():
    model, data = tiny_model("lf_dnn", "regression")
    model.eval()
    arrays = data.splits["test"]
    features = encoder_features(model, arrays, data.info, 5, "cpu")
    x = torch.from_numpy(arrays.features["audio"])
    mask = torch.arange(x.shape[1])[None, :] < torch.from_numpy(arrays.lengths["audio"])[:, None]
    with torch.no_grad():
        direct = model.encoders["audio"](x, mask).numpy()
    np.testing.assert_allclose(features["audio"], direct, rtol=1e-5, atol=1e-6)


def test_probe_finds_a_linear_signal_and_not_noise():
    data = make_data("regression", sizes=(200, 60, 60))
    rng = np.random.default_rng(0)

    def feats(signal: bool):
        return {s: np.stack([a.labels if signal else rng.normal(size=len(a)), rng.normal(size=len(a))], axis=1)
                for s, a in data.splits.items()}

    informative, noise = fit_probe(feats(True), data, "mae"), fit_probe(feats(False), data, "mae")
    assert informative["test"] < 0.05 < 0.3 < noise["test"]
    assert informative["alpha"] == 0.01  # least shrinkage wins on validation for an exact signal


def test_probes_command(tmp_path, capsys):
    from test_robustness import SMALL

    from msakit.cli import main

    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), *SMALL]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "seed_1" / "best.pt")
    # a model trained on all three is no "alone" model (it was accepted, and compared with itself)
    assert main(["analyze", "--probes", "--checkpoint", ckpt, "--alone", f"audio={ckpt}",
                 "--out", str(tmp_path / "p")]) == 2
    assert "not trained on audio alone" in capsys.readouterr().err
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "audio"), *SMALL, "train.corruption.protocol=conditions",
                 "train.corruption.condition=a"]) == 0
    capsys.readouterr()
    alone = str(tmp_path / "audio" / "seed_1" / "best.pt")
    assert main(["analyze", "--probes", "--checkpoint", ckpt, "--alone", f"audio={alone}",
                 "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "encoders['audio']" in printed and (tmp_path / "p" / "probes.json").is_file()
    report = json.loads((tmp_path / "p" / "probes.json").read_text())
    assert report["alone"]["audio"]["checkpoint"] == alone and set(report["alone"]) == {"audio"}
    assert main(["analyze", "--probes", "--checkpoint", ckpt, "--alone", "sound=x"]) == 2
    capsys.readouterr()
    assert main(["analyze", "--probes", "--checkpoint", ckpt, "--split", "valid"]) == 2  # was ignored
    assert "--split does not apply to --probes" in capsys.readouterr().err


def test_pase_is_probed_on_its_own_expert_path_not_the_linear_projection():
    """PaSE's per-modality representation is projection + its own experts, pooled (h^m of
    PCL/CAL/SGM); probing the projection alone would be a linear probe of the raw features."""
    from msakit.batch import MODALITIES
    from msakit.data import to_loader
    from msakit.modules.pooling import masked_mean

    model, data = tiny_model("pase", "regression")
    model.eval()
    arrays = data.splits["test"]
    features = encoder_features(model, arrays, data.info, 64, "cpu")
    assert encoder_modules(model)["vision"][0] == "modality_features()['vision']"
    (batch,) = list(to_loader(arrays, data.info, len(arrays), shuffle=False))
    masks = {m: batch.mask(m) for m in MODALITIES}
    with torch.no_grad():
        streams = {m: model.projections[m](batch.features(m)) for m in MODALITIES}
        own = model.unimodal(streams, masks)
        projected = masked_mean(streams["vision"], masks["vision"]).numpy()
    order = batch.index.numpy()
    np.testing.assert_allclose(features["vision"][order], own["vision"].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(features["vision"][order], projected, atol=1e-3)
