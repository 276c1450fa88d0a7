"""Typed config: strict YAML, overrides, and every shipped config builds its model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fakes import DIMS, make_info

from msakit.config import ConfigError, build_config, load_yaml
from msakit.models.lf_dnn import LFDNNConfig
from msakit.registry import create_model

# MulT-format IEMOCAP pickles are word-aligned: every modality has the same length.
ALIGNED_IEMOCAP = dataclasses.replace(make_info("multi_binary"), max_lengths=dict.fromkeys(DIMS, 8))
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_defaults_are_the_default_model_on_synthetic():
    cfg = build_config()
    assert cfg.model_name == "lf_dnn" and isinstance(cfg.model, LFDNNConfig)
    assert cfg.data.name == "synthetic" and cfg.train.seeds == [1]


def test_overrides_are_typed_and_nested():
    cfg = build_config({}, ["model.text_hidden=16", "train.lr=3e-4", "train.seeds=[1, 2]",
                            "data.synthetic.train_size=50", "train.progress=false"])
    assert cfg.model.text_hidden == 16 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.seeds == [1, 2] and cfg.data.synthetic.train_size == 50
    assert cfg.train.progress is False


@pytest.mark.parametrize(
    "tree,sets,message",
    [
        ({"model": {"name": "lf_dnn", "hiden": 3}}, [], "model: unknown key 'hiden'"),
        ({"trian": {}}, [], "unknown section 'trian'"),
        ({}, ["train.epochs=ten"], "train.epochs: expected an integer"),
        ({}, ["data.synthetic.noise=1"], "data.synthetic: unknown key 'noise'"),
        ({}, ["model.name=nope"], "unknown model 'nope'"),
        ({}, ["train.epochs=0"], "train.epochs must be >= 1"),
        ({}, ["train.lr"], "must look like key.path=value"),
        ({"model": {"name": "unimodal", "modality": "smell"}}, [], "model.modality must be one of"),
    ],
)
def test_bad_config_names_the_key(tree, sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(tree, sets)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(bad)


def test_data_root_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("MSAKIT_DATA", "/some/where")
    assert build_config().data.data_root == "/some/where"
    assert build_config({}, ["data.data_root=/else"]).data.data_root == "/else"


def test_to_dict_round_trips():
    cfg = build_config({}, ["model.fusion_hidden=12", "train.seeds=[3]"])
    assert build_config(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_loads_and_builds_its_model(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# msakit train --config "), "first line must be the command"
    cfg = build_config(load_yaml(path))
    info = {"mintrec": make_info("classification"), "mult": ALIGNED_IEMOCAP}.get(
        cfg.data.name, make_info("regression"))
    create_model(cfg.model_name, cfg.model, info)
