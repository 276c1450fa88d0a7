"""Linear probes of a trained model's per-modality encoders (`msakit analyze --probes`).

The measure of modality under-optimisation that PaSE and DBR claim to reduce
(../shared/specs/evidence.md): freeze a trained model, take each modality's encoder output on
every sample, fit a linear probe per modality on the TRAINING split (ridge regression for
regression labels, logistic regression for classes; its strength chosen on the VALIDATION split
from a fixed grid), and report the probe's test score. Compared with the same probe on the same
encoder trained on that modality ALONE (a checkpoint of the same model trained with only that
modality present, e.g. `--set train.corruption.protocol=conditions train.corruption.condition=a
train.corruption.validate=true`), a large gap for audio/vision means the fusion model left that
modality's encoder under-trained.

Which representation is "the encoder of modality m" (first match wins):
    0. the optional model method `modality_features(batch) -> {modality: [B, H]}`, for a model
       whose per-modality path is not one module (PaSE: its projection then its own experts,
       pooled); called in eval mode on the clean batch, its outputs used as they are;
    1. the optional model method `modality_encoders() -> {modality: nn.Module}` (a model that
       wants to name its encoders declares it; documented here as the uniform hook);
    2. a ModuleDict attribute keyed by modality names: `encoders`, `unimodal`, `sequence_encoders`,
       `projections` (in that order);
    3. attributes `text_encoder`, `audio_encoder`, `vision_encoder`; `encoder` of a model with a
       `modality` (unimodal). `text_bert` (text only, no fusion) has none: probes do not apply.
The module's output during the model's own (eval-mode, clean) forward pass is captured with a
forward hook, first call per forward: a tensor [B, H] is used as is; [B, L, H] is mean-pooled
over the modality's real frames (over all L when L is not the batch's length, e.g. tokenised
transcripts); of a tuple output the first tensor is used. The report names the module probed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msakit.analysis import score
from msakit.batch import MODALITIES
from msakit.config import ConfigError
from msakit.data import load_dataset, to_loader
from msakit.modules.pooling import masked_mean
from msakit.train.checkpoint import CheckpointError, write_json
from msakit.train.loop import resolve_device

ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
"""Ridge strengths (logistic: C = 1 / alpha) tried on the validation split."""
DICT_ATTRIBUTES = ("encoders", "unimodal", "sequence_encoders", "projections")


def encoder_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module | None]]:
    """{modality: (attribute path, module)} of the model's per-modality encoders (see above);
    module None for a model with `modality_features` (nothing to hook)."""
    if hasattr(model, "modality_features"):
        return {m: (f"modality_features()[{m!r}]", None) for m in MODALITIES}
    if hasattr(model, "modality_encoders"):
        return {m: (f"modality_encoders()[{m!r}]", module) for m, module in model.modality_encoders().items()}
    for name in DICT_ATTRIBUTES:
        table = getattr(model, name, None)
        if isinstance(table, nn.ModuleDict) and set(table) & set(MODALITIES):
            return {m: (f"{name}[{m!r}]", table[m]) for m in MODALITIES if m in table}
    found = {m: (f"{m}_encoder", getattr(model, f"{m}_encoder")) for m in MODALITIES
             if isinstance(getattr(model, f"{m}_encoder", None), nn.Module)}
    modality = getattr(model, "modality", getattr(getattr(model, "cfg", None), "modality", None))
    if not found and isinstance(getattr(model, "encoder", None), nn.Module) and modality in MODALITIES:
        found = {modality: ("encoder", model.encoder)}
    if not found:
        raise CheckpointError(f"{type(model).__name__} exposes no per-modality encoders; add a "
                              "`modality_encoders()` method (msakit.probes)")
    return found


def _pooled(output, mask: torch.Tensor) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = next(o for o in output if isinstance(o, torch.Tensor))
    if output.ndim == 2:
        return output
    if output.ndim == 3:
        if output.shape[1] == mask.shape[1]:
            return masked_mean(output, mask)
        return output.mean(dim=1)
    raise ValueError(f"encoder output of shape {tuple(output.shape)}: expected [B, H] or [B, L, H]")


@torch.no_grad()
def encoder_features(model: nn.Module, arrays, info, batch_size: int, device) -> dict[str, np.ndarray]:
    """{modality: [N, H]} encoder outputs on a split, in the split's row order. A modality whose
    module the model never calls as a whole (e.g. PSA-MF runs its text encoder layer by layer)
    is left out."""
    modules = encoder_modules(model)
    direct = hasattr(model, "modality_features")
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    handles = [] if direct else [module.register_forward_hook(
        lambda _mod, _inp, out, m=m: captured.setdefault(m, out)) for m, (_, module) in modules.items()]
    chunks: dict[str, list] = {m: [] for m in modules}
    rows = []
    try:
        for batch in to_loader(arrays, info, batch_size, shuffle=False, whole_videos=getattr(model, "whole_videos", False)):
            batch = batch.to(device)
            captured.clear()
            if direct:
                captured.update(model.modality_features(batch))
            else:
                model(batch)
            for m in [m for m in chunks if m not in captured]:  # run piecewise, not via forward
                del chunks[m]
            for m in chunks:
                chunks[m].append(_pooled(captured[m], batch.mask(m)).float().cpu().numpy())
            rows.append(batch.index.cpu().numpy())
    finally:
        for handle in handles:
            handle.remove()
    order = np.concatenate(rows)
    out = {}
    for m, parts in chunks.items():
        stacked = np.concatenate(parts)
        out[m] = np.empty_like(stacked)
        out[m][order] = stacked
    return out


def fit_probe(features: dict[str, np.ndarray], data, metric: str) -> dict:
    """Probe on train features, strength chosen on valid by `metric`, scored once on test.
    features: {split: [N, H]} -> {"alpha", "valid", "test"}."""
    from sklearn.linear_model import LogisticRegression, Ridge

    info = data.info
    mean, std = features["train"].mean(axis=0), features["train"].std(axis=0) + 1e-8
    x = {s: (f - mean) / std for s, f in features.items()}
    lower = metric in ("mae", "loss")
    best = None
    for alpha in ALPHAS:
        if info.task == "regression":
            probe = Ridge(alpha=alpha).fit(x["train"], data.splits["train"].labels)
            predict = probe.predict
        elif info.task == "classification":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe = LogisticRegression(C=1.0 / alpha, max_iter=500).fit(x["train"], data.splits["train"].labels)
            predict = probe.decision_function if info.num_classes > 2 else probe.predict_proba
        else:
            raise ConfigError(f"probes support regression and classification, not {info.task}")
        valid = score(np.asarray(predict(x["valid"]), dtype=np.float32), data.splits["valid"], info, metric)
        if best is None or (valid < best[1] if lower else valid > best[1]):
            best = (alpha, valid, predict)
    alpha, valid, predict = best
    test = score(np.asarray(predict(x["test"]), dtype=np.float32), data.splits["test"], info, metric)
    return {"alpha": alpha, "valid": valid, "test": test}


def probe_checkpoint(checkpoint, data, metrics: list[str], data_overrides=(), only: str | None = None,
                     fingerprint: dict | None = None) -> dict:
    """{modality: {"module", metric: {"alpha", "valid", "test"}}} for one checkpoint. only: probe
    that modality alone, of a checkpoint trained on it alone (checked: `_check_alone`).
    fingerprint: `data`'s, when already computed (`evaluate.check_data`)."""
    from msakit.evaluate import check_data, load_model_from_checkpoint

    model, cfg, saved = load_model_from_checkpoint(checkpoint, data_overrides)
    if only is not None:
        _check_alone(only, checkpoint, cfg)
    check_data(checkpoint, model, saved, data, fingerprint)
    device = resolve_device(cfg.train.device)
    model = model.to(device)
    names = {m: path for m, (path, _) in encoder_modules(model).items()}
    feats = {s: encoder_features(model, data.splits[s], data.info, cfg.data.batch_size, device)
             for s in ("train", "valid", "test")}
    out = {}
    for m in feats["train"]:
        if only is not None and m != only:
            continue
        per_split = {s: feats[s][m] for s in feats}
        out[m] = {"module": names[m], "dim": int(per_split["train"].shape[1]),
                  **{metric: fit_probe(per_split, data, metric) for metric in metrics}}
    skipped = [f"{m}: {names[m]} is not called as a whole in forward; not probed" for m in names
               if m not in feats["train"]]
    return {"model": cfg.model_name, "checkpoint": str(checkpoint), "probes": out, "notes": skipped}


def probe_report(checkpoint, alone: dict[str, str] | None = None, metrics: list[str] | None = None,
                 data_overrides=(), out_dir=None) -> dict:
    """Probes of `checkpoint` and, for each modality in `alone` ({modality: checkpoint trained on
    that modality alone}), of that checkpoint's encoder for the modality."""
    from msakit.evaluate import load_model_from_checkpoint
    from msakit.train.runfolder import data_fingerprint

    _, cfg, _ = load_model_from_checkpoint(checkpoint, data_overrides)
    data = load_dataset(cfg.data)
    fingerprint = data_fingerprint(data)  # once, for every checkpoint probed on these data
    if metrics is None:
        metrics = ["mae", "non0_acc2"] if data.info.task == "regression" else ["acc"]
    report = {"dataset": data.info.name, "metrics": metrics,
              **probe_checkpoint(checkpoint, data, metrics, data_overrides, fingerprint=fingerprint)}
    report["alone"] = {}
    for m, path in (alone or {}).items():
        if m not in MODALITIES:
            raise ConfigError(f"--alone {m}=...: modality must be one of {', '.join(MODALITIES)}")
        got = probe_checkpoint(path, data, metrics, data_overrides, only=m, fingerprint=fingerprint)["probes"]
        if m not in got:
            raise CheckpointError(f"{path}: exposes no {m} encoder")
        report["alone"][m] = {"checkpoint": str(path), **got[m]}
    if out_dir is not None:
        write_json(report, Path(out_dir) / "probes.json")
    return report


def _check_alone(modality: str, path, cfg) -> None:
    """Raise ConfigError unless checkpoint `path` (config `cfg`) was trained on `modality` alone:
    the condition protocol keeping only it (train.corruption protocol conditions, mode fixed,
    condition t / a / v), or the `unimodal` model of that modality."""
    c = cfg.train.corruption
    if (c.protocol, c.mode, c.condition) == ("conditions", "fixed", modality[0]):
        return
    if cfg.model_name == "unimodal" and getattr(cfg.model, "modality", None) == modality:
        return
    raise ConfigError(f"--alone {modality}={path}: not trained on {modality} alone ({cfg.model_name}, "
                      f"train.corruption protocol {c.protocol}, condition {c.condition or '-'}); train it "
                      f"with train.corruption.protocol=conditions train.corruption.condition={modality[0]}")


def format_probes(report: dict) -> str:
    metrics = report["metrics"]
    head = ["modality", "encoder module"] + [f"probe test {k}" for k in metrics] + \
           [f"alone: probe test {k}" for k in metrics]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (2 * len(metrics))]
    for m, row in report["probes"].items():
        alone = report["alone"].get(m)
        cells = [m, f"`{row['module']}` ({row['dim']}-d)"] + [f"{row[k]['test']:.4f}" for k in metrics]
        cells += [f"{alone[k]['test']:.4f}" if alone else "-" for k in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
