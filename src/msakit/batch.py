"""The two objects every model sees: a `Batch` in, a `ModelOutput` out.

Shapes (B batch, L_m sequence length of modality m, D_m feature size):
    text   [B, L_t, D_t]    audio  [B, L_a, D_a]    vision [B, L_v, D_v]
    *_mask [B, L_m] bool, True on real frames, False on padding.
    labels regression [B] float; classification [B] long; multi-binary (IEMOCAP) [B, T] long.
    index  [B] long, the sample's position in its split (models with per-sample memory use it).
    group  [B] long or None: which video of the batch each utterance belongs to, when the loader
           batches whole videos (`to_loader(whole_videos=True)`); utterances of a video are
           contiguous and in temporal order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

MODALITIES: tuple[str, str, str] = ("text", "audio", "vision")


@dataclass
class Batch:
    text: torch.Tensor
    audio: torch.Tensor
    vision: torch.Tensor
    text_mask: torch.Tensor
    audio_mask: torch.Tensor
    vision_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    ids: list[str] = field(default_factory=list)
    group: torch.Tensor | None = None
    texts: list[str] | None = None
    """Raw transcripts, where the dataset has them (models with their own tokenizer read these)."""

    @property
    def size(self) -> int:
        return self.text.shape[0]

    def features(self, modality: str) -> torch.Tensor:
        return getattr(self, modality)

    def mask(self, modality: str) -> torch.Tensor:
        return getattr(self, f"{modality}_mask")

    def lengths(self, modality: str) -> torch.Tensor:
        """[B] long: number of real frames of `modality`."""
        return self.mask(modality).sum(dim=1)

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return Batch(**moved, ids=self.ids, texts=self.texts)


@dataclass
class ModelOutput:
    """What `model(batch)` returns.

    prediction: regression [B]; classification [B, K] logits; multi-binary [B, T, 2] logits.
    losses: named scalar loss terms, already weighted; the trainer sums and logs them.
        Empty when the batch carries no labels the model can use.
    logs: scalars worth watching (gates, weights, phase); logged, never optimised.
    """

    prediction: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)
