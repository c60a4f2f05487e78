"""A loader batch -> the objective's inputs: data in the model's input space, labels, extras."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ModelInputs:
    """One micro-batch as the objective takes it: x (B, C, H, W) scaled latents or pixels in
    [-1, 1], y (B,) labels; `encoder_features` (REPA: one (B, T, D) tensor per encoder) and
    `model_kwargs` (extra forward arguments, e.g. ELIT's `inference_budget`) where used."""
    x: torch.Tensor
    y: torch.Tensor
    encoder_features: Optional[list] = None
    model_kwargs: dict = field(default_factory=dict)


def model_space(x: torch.Tensor, pixel_space: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Stored items (B, ...) -> the model's input space: uint8 pixels -> [-1, 1]; latent moments
    (B, 8, h, w) -> posterior samples `(mean + std * eps) * 0.18215` drawn from `generator`."""
    if pixel_space:
        return x.float() / 127.5 - 1.0
    import data.vae as dvae

    return dvae.sample_latents(x, generator=generator)


class BatchPreparer:
    """A loader batch's columns `[items, labels]` -> ModelInputs on the device (`model_space`,
    with the micro-batch's generator). REPA batches `(images uint8, moments, labels)` also get
    the frozen encoders' features of the images (`features`: a `training.repa.RepaFeatures`)."""

    def __init__(self, pixel_space: bool, device, features=None):
        self.pixel_space = pixel_space
        self.device = device
        self.features = features

    def __call__(self, items, generator: torch.Generator) -> ModelInputs:
        encoder_features = None
        if len(items) == 3:  # REPA: the clean image is the encoder's view
            images, x, y = items
            encoder_features = self.features(images.to(self.device, non_blocking=True))
        else:
            x, y = items
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return ModelInputs(model_space(x, self.pixel_space, generator), y, encoder_features=encoder_features)
