"""REPA in the trainer (SPEC §10): config checks, the frozen encoders of a run, their features.

`check_repa_config` runs inside `resolve_config`, before any data, encoder or model is
touched: it reads no file except the `encoder_weights` the config names. `load_run_encoders`
builds the encoders once per process (every rank) in `training.loop`; `RepaFeatures` turns the
clean uint8 images of a batch into the features the objective aligns with.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from training.errors import ConfigError
from utils.config import literal

# Architecture keys of the timm ViT that `encoder_overrides` may shrink (tests, small experiments).
ENCODER_OVERRIDE_KEYS = ("depth", "embed_dim", "num_heads", "mlp_ratio")
ENC_TYPE_NONE = ("none", "", "null")


def repa_enabled(cfg) -> bool:
    """True when the run trains with the REPA alignment loss (proj_coeff > 0; enc_type then set)."""
    return float(cfg.proj_coeff) > 0


def default_encoder_depth(model_name: str) -> int:
    """The registry's default `encoder_depth` of `model_name` (REPA: 8 for L/XL, 4 for S/B; ELIT: 8 head blocks)."""
    from models.registry import ELIT_ENCODER_DEPTH, SIZES, is_elit, parse_name

    _, size, _ = parse_name(model_name)
    return ELIT_ENCODER_DEPTH if is_elit(model_name) else SIZES[size]["encoder_depth"]


def check_repa_config(cfg, *, pixel: bool, size: int, patch: int) -> None:
    """Validate the REPA keys of a resolved config (edits `cfg.enc_type` to `none` when unset).

    `size`: the model's input side (latents: resolution / 8; pixels: resolution); `patch`: its
    patch size. Raises ConfigError naming the key or file.
    """
    from models import encoders as menc
    from models.registry import SIZES, parse_name

    enc_type = "none" if cfg.enc_type is None else str(cfg.enc_type).strip()
    cfg.enc_type = "none" if enc_type.lower() in ENC_TYPE_NONE else literal(enc_type)  # text stays text
    coeff = float(cfg.proj_coeff)
    if coeff < 0 or coeff != coeff:
        raise ConfigError(f"proj_coeff must be >= 0, got {cfg.proj_coeff}")
    for key in cfg.encoder_overrides:
        if key not in ENCODER_OVERRIDE_KEYS:
            raise ConfigError(f"encoder_overrides.{key} is not allowed; allowed: {list(ENCODER_OVERRIDE_KEYS)}")
    if cfg.enc_type == "none":
        if coeff > 0:
            raise ConfigError(f"proj_coeff={coeff} needs a frozen DINOv2 encoder: set enc_type (REPA: dinov2-vit-b), "
                              "or proj_coeff=0 to train without REPA")
        if cfg.images_dir not in (None, ""):
            raise ConfigError("images_dir is only read by REPA runs (proj_coeff > 0); remove it or set "
                              "proj_coeff and enc_type")
        return
    if coeff == 0:
        raise ConfigError(f"enc_type={cfg.enc_type!r} but proj_coeff=0: the encoder would run for nothing; set "
                          "proj_coeff (REPA: 0.5) or enc_type=none")
    try:
        names = menc.parse_enc_type(cfg.enc_type)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if pixel:
        raise ConfigError(
            f"proj_coeff={coeff} with vae=none: REPA aligns latent models; a pixel-space model with patch "
            f"{patch} has (resolution/{patch})^2 tokens, the encoder (resolution/16)^2; train on VAE latents "
            "(set vae and data_dir to latents) or set proj_coeff=0, enc_type=none")
    try:
        enc_tokens = menc.encoder_num_tokens(int(cfg.resolution))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tokens = (size // patch) ** 2
    if tokens != enc_tokens:
        raise ConfigError(
            f"model {cfg.model} has {tokens} tokens per image at resolution {cfg.resolution}, but {names[0]} "
            f"gives {enc_tokens} ((resolution/16)^2); REPA aligns them one to one, which needs a patch-2 "
            "model (e.g. SiT-XL/2) on resolution/8 latents")
    _, model_size, _ = parse_name(cfg.model)
    depth = int(cfg.model_overrides.get("depth", SIZES[model_size]["depth"]))
    encoder_depth = default_encoder_depth(cfg.model) if cfg.encoder_depth is None else int(cfg.encoder_depth)
    if not 1 <= encoder_depth <= depth:
        raise ConfigError(
            f"encoder_depth={encoder_depth}{' (the default)' if cfg.encoder_depth is None else ''}: the REPA "
            f"projector reads the tokens after block encoder_depth, which must be in [1, {depth}] for "
            f"{cfg.model} with depth {depth}; the model would have no projector input")
    try:
        menc.parse_encoder_weights(cfg.encoder_weights, len(names))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def load_run_encoders(cfg, device) -> List["menc.FrozenEncoder"]:  # noqa: F821
    """The run's frozen encoders on `device` ([] without REPA); ConfigError naming enc_type /
    encoder_weights when the weights are missing or do not fit."""
    if not repa_enabled(cfg):
        return []
    from models.encoders import load_encoders

    try:
        return load_encoders(cfg.enc_type, cfg.encoder_weights, int(cfg.resolution), device=device,
                             arch_overrides=dict(cfg.encoder_overrides) or None)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(str(e)) from None


class RepaFeatures:
    """uint8 images (B, 3, R, R) -> one (B, T, D_i) feature tensor per encoder, under `no_grad`
    and the run's autocast (`autocast`: a context-manager factory, e.g. `accelerator.autocast`)."""

    def __init__(self, encoders, autocast=None):
        self.encoders = list(encoders)
        self.autocast = autocast

    def __call__(self, images: torch.Tensor) -> Optional[list]:
        from contextlib import nullcontext

        from models.encoders import encoder_features

        if not self.encoders:
            return None
        with torch.no_grad(), (self.autocast() if self.autocast is not None else nullcontext()):
            return encoder_features(self.encoders, images)

    def z_dims(self) -> List[int]:
        return [enc.z_dim for enc in self.encoders]
