"""Frozen vision encoders for REPA alignment (SPEC §10): names, weights, preprocessing, features.

``enc_type`` uses REPA's names, ``{family}-{arch}-{size}``, several comma-separated
(``"dinov2-vit-b"``, ``"dinov2-vit-b,dinov2-vit-l"``). Supported: DINOv2 without registers,
through timm:

    dinov2-vit-s  vit_small_patch14_dinov2.lvd142m   z_dim  384
    dinov2-vit-b  vit_base_patch14_dinov2.lvd142m    z_dim  768   (REPA's default)
    dinov2-vit-l  vit_large_patch14_dinov2.lvd142m   z_dim 1024
    dinov2-vit-g  vit_giant_patch14_dinov2.lvd142m   z_dim 1536

REPA has no resolution suffix in ``enc_type``; the image resolution is its own setting.

Weights (``encoder_weights``): empty/None takes ``timm/<model>/model.safetensors`` from the
Hugging Face hub cache (downloaded on first use, as timm ``pretrained=True`` would); otherwise one local source per encoder, comma-separated in
``enc_type`` order. A source is a state-dict file (``.safetensors``, ``.pth``, ``.pt``,
``.bin``) in timm's key names (``timm/<model>`` on the hub) or Meta's (``dinov2_vitb14_pretrain.pth``),
or a folder holding ``model.safetensors`` or ``pytorch_model.bin`` (``hf download timm/<model>
--local-dir DIR``). The weights pass through timm's own checkpoint filter, which converts Meta's
key names and resamples the 37x37 position embedding to the encoder's grid (bicubic, antialiased:
the same call REPA makes on the torch.hub model).

Preprocessing, exactly REPA's ``preprocess_raw_image`` for DINOv2: uint8 (B, 3, R, R) -> / 255 ->
ImageNet mean/std -> ``F.interpolate(x, 224 * R / 256, mode="bicubic")`` (align_corners False, no
antialias). The encoder then sees a grid of R/16 x R/16 patches of 14 px (16x16 = 256 tokens at
256 px, 32x32 = 1024 at 512 px), which equals the token grid of a /2 model on R/8 latents; R must
be a multiple of 16. Features are the final-norm patch tokens (``x_norm_patchtokens``: no CLS),
(B, T, D).

An encoder is frozen (``requires_grad`` False, eval mode), runs under ``no_grad`` and whatever
autocast the caller has entered, and is not an ``nn.Module``: it cannot become a submodule of the
model, so it is never in a checkpoint.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

ENCODERS = {  # enc_type -> (timm model, embedding width)
    "dinov2-vit-s": ("vit_small_patch14_dinov2.lvd142m", 384),
    "dinov2-vit-b": ("vit_base_patch14_dinov2.lvd142m", 768),
    "dinov2-vit-l": ("vit_large_patch14_dinov2.lvd142m", 1024),
    "dinov2-vit-g": ("vit_giant_patch14_dinov2.lvd142m", 1536),
}
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
META_URLS = {  # the torch.hub checkpoints REPA loads
    "dinov2-vit-s": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
    "dinov2-vit-b": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2-vit-l": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    "dinov2-vit-g": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth",
}


def parse_enc_type(enc_type: str) -> List[str]:
    """``"dinov2-vit-b, dinov2-vit-l"`` -> ``["dinov2-vit-b", "dinov2-vit-l"]``; unknown names raise."""
    names = [n.strip() for n in str(enc_type).split(",")] if enc_type is not None else [""]
    bad = [n for n in names if n not in ENCODERS]
    if bad:
        raise ValueError(f"enc_type {enc_type!r}: unknown encoder {bad[0]!r}; allowed: {', '.join(ENCODERS)} "
                         "(several comma-separated, as in REPA)")
    return names


def encoder_dims(enc_type: str) -> List[int]:
    """Embedding width of each encoder: the model's ``z_dims``, known without loading weights."""
    return [ENCODERS[n][1] for n in parse_enc_type(enc_type)]


def encoder_input_size(resolution: int) -> int:
    """Side of the encoder's input for images of ``resolution`` px: 224 * resolution / 256."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution {resolution!r}: REPA's encoders need a positive multiple of 16 "
                         "(the encoder runs at 224 * resolution / 256, a whole number of 14 px patches)")
    return resolution * 224 // 256


def encoder_num_tokens(resolution: int) -> int:
    """Patch tokens per image of ``resolution`` px: (resolution / 16)^2."""
    return (encoder_input_size(resolution) // PATCH_SIZE) ** 2


def parse_encoder_weights(encoder_weights, count: int) -> List[Optional[str]]:
    """The weight file of each encoder (None = the hub), checked before anything is built.

    ``encoder_weights``: None / "" (all from the hub), a comma-separated string or a list of
    files or folders (a folder stands for the ``model.safetensors`` or ``pytorch_model.bin`` in it).
    """
    if encoder_weights is None or (isinstance(encoder_weights, str) and not encoder_weights.strip()):
        return [None] * count
    items = encoder_weights.split(",") if isinstance(encoder_weights, str) else list(encoder_weights)
    paths = [os.path.expanduser(str(p).strip()) for p in items]
    if len(paths) != count:
        raise ValueError(f"encoder_weights lists {len(paths)} source(s) for {count} encoder(s) in enc_type; "
                         "give one file or folder per encoder, comma-separated in enc_type order "
                         "(or leave encoder_weights empty to download from the hub)")
    for path in paths:
        if not path:
            raise ValueError(f"encoder_weights {encoder_weights!r} has an empty entry; give one file or folder "
                             "per encoder")
        if not os.path.exists(path):
            raise FileNotFoundError(f"encoder_weights: {path!r} does not exist; expected a state-dict file "
                                    f"({', '.join(WEIGHT_FILE_SUFFIXES)}) or a folder holding "
                                    f"{' or '.join(FOLDER_WEIGHT_FILES)}")
    return [_weight_file(p) for p in paths]


def _weight_file(path: str) -> str:
    if os.path.isdir(path):
        for name in FOLDER_WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"encoder_weights: folder {path!r} holds neither {' nor '.join(FOLDER_WEIGHT_FILES)}")
    if not path.lower().endswith(WEIGHT_FILE_SUFFIXES):
        raise ValueError(f"encoder_weights: {path!r} is not a state-dict file; expected one ending in "
                         f"{', '.join(WEIGHT_FILE_SUFFIXES)}, or a folder")
    return path


def _download_hint(names: Sequence[str]) -> str:
    timm_names = [ENCODERS[n][0] for n in names]
    commands = "; ".join(f"`hf download timm/{t} model.safetensors --local-dir {n}`" for n, t in zip(names, timm_names))
    setting = ",".join(f"{n}/model.safetensors" for n in names)
    meta = ", ".join(META_URLS[n] for n in names)
    return (f"run {commands} and set encoder_weights={setting} (one entry per enc_type encoder, in order); "
            f"Meta's checkpoints ({meta}) work as well")


def preprocess_images(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """REPA's DINOv2 input: uint8 (B, 3, H, W) -> float32 (B, 3, input_size, input_size).

    ``x / 255``, ``(x - mean) / std`` with ImageNet's mean/std, then bicubic ``F.interpolate``
    (align_corners False, no antialias), in this order as in REPA's ``preprocess_raw_image``.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, input_size, mode="bicubic")


class FrozenEncoder:
    """One frozen vision encoder. ``encoder(images_uint8)`` -> patch features (B, T, D).

    Attributes: ``name`` (enc_type entry), ``resolution`` (px of the images it accepts),
    ``input_size`` (px it runs at), ``grid`` (patches per side), ``num_tokens`` (T = grid^2),
    ``z_dim`` (D), ``model`` (the timm ViT; kept out of any nn.Module on purpose).
    """

    def __init__(self, name: str, model: torch.nn.Module, resolution: int):
        self.name = name
        self.resolution = resolution
        self.input_size = encoder_input_size(resolution)
        self.grid = self.input_size // PATCH_SIZE
        self.num_tokens = self.grid ** 2
        self.z_dim = int(model.embed_dim)
        model.eval()
        model.requires_grad_(False)
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "FrozenEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, resolution, resolution) -> final-norm patch tokens (B, num_tokens, z_dim)."""
        if tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"{self.name} was loaded for {self.resolution}x{self.resolution} images, got "
                             f"{tuple(images.shape)}")
        tokens = self.model.forward_features(preprocess_images(images, self.input_size))
        return tokens[:, self.model.num_prefix_tokens:]

    def __repr__(self) -> str:
        return (f"FrozenEncoder({self.name!r}, {self.resolution}px -> {self.input_size}px, "
                f"{self.num_tokens} tokens x {self.z_dim})")


def _hub_weights(names: Sequence[str]) -> List[str]:
    """Paths of the cached (downloaded if needed) timm/<model> weights; fails before any model is built."""
    from utils.hub import HubUnavailable, hub_file

    files, missing, reasons = [], [], []
    for name in names:
        try:
            files.append(hub_file(f"timm/{ENCODERS[name][0]}", "model.safetensors"))
        except HubUnavailable as err:  # offline, no network, no cache: one message that says what to do
            missing.append(name)
            reasons.append(str(err))
    if missing:
        raise FileNotFoundError(f"enc_type {','.join(names)} without encoder_weights: the weights of "
                                f"{', '.join(missing)} are not available "
                                f"({'; '.join(reasons)}); {_download_hint(names)}")
    return files


def _create(name: str, input_size: int, weights: str, arch_overrides: dict) -> torch.nn.Module:
    """The timm ViT of ``name`` at ``input_size`` px with the weights of the file ``weights``.

    The file is read here without running code from it (:func:`models.checkpoints.read_weights`)
    and timm gets the tensors (``pretrained_cfg_overlay=dict(state_dict=...)``), so its checkpoint
    filter (Meta's key names, the position-embedding resampling) runs as for a file it read.
    """
    import timm

    from models.checkpoints import read_weights
    from models.weights_io import UntrustedCheckpointError

    timm_name = ENCODERS[name][0]
    try:
        state = read_weights(weights, f"the encoder_weights of {name}")
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state),
                                 img_size=input_size, **arch_overrides)
    except UntrustedCheckpointError:
        raise  # its message says it all
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[:3]
        raise ValueError(f"encoder_weights: {weights!r} does not load into {name} ({timm_name}): "
                         f"{' '.join(first)[:400]}; expected the weights of {timm_name}: {_download_hint([name])}") from None


def load_encoders(enc_type: str, encoder_weights=None, resolution: int = 256, device="cpu",
                  arch_overrides: Optional[dict] = None) -> List[FrozenEncoder]:
    """Build, load and freeze the encoders of ``enc_type`` for images of ``resolution`` px.

    Names, resolution and weight paths are checked before anything is built or read.
    ``arch_overrides`` (e.g. ``dict(depth=2, embed_dim=48, num_heads=2)``) shrinks the timm
    architecture, for tests and small experiments only.
    """
    names = parse_enc_type(enc_type)
    input_size = encoder_input_size(resolution)
    files = parse_encoder_weights(encoder_weights, len(names))
    if files[0] is None:
        files = _hub_weights(names)
    encoders = []
    for name, weights in zip(names, files):
        model = _create(name, input_size, weights, dict(arch_overrides or {}))
        encoders.append(FrozenEncoder(name, model, resolution).to(device))
    return encoders


def encoder_features(encoders: Sequence[FrozenEncoder], images: torch.Tensor) -> List[torch.Tensor]:
    """Features of each encoder for uint8 images (B, 3, R, R): a list of (B, T, D_i), ``no_grad``.

    Runs under the caller's autocast (enter it around this call, as REPA does). ``images`` are
    moved to each encoder's device.
    """
    return [enc(images.to(enc.device, non_blocking=True)) for enc in encoders]


def check_token_count(encoders: Sequence[FrozenEncoder], num_tokens: int, model_name: str = "the model") -> None:
    """REPA aligns token t of the model with patch t of each encoder: the counts must be equal.

    Raise a ValueError naming both counts (a /2 model has (R/16)^2 tokens at R px, as the encoders).
    """
    for enc in encoders:
        if enc.num_tokens != num_tokens:
            raise ValueError(
                f"{model_name} has {num_tokens} tokens per image but {enc.name} gives {enc.num_tokens} "
                f"({enc.grid}x{enc.grid} patches at {enc.input_size} px for {enc.resolution} px images); "
                "REPA aligns them one to one, which needs a patch-2 model (e.g. SiT-XL/2) on resolution/8 latents")

