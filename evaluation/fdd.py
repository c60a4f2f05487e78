"""FDD: Fréchet distance in DINOv2 feature space (Stein et al. 2023, "Exposing flaws of
generative model evaluation metrics"; reported by the DFM and ELIT papers).

Features follow that paper's reference code (dgm-eval): DINOv2 ViT-L/14 from
``torch.hub('facebookresearch/dinov2', 'dinov2_vitl14')``, each image resized to 224x224
with PIL bicubic, scaled to [0, 1], normalised with the ImageNet mean/std, and the
feature is the final-norm CLS token (``x_norm_clstoken``, 1024-d). Here the network is
timm's ``vit_large_patch14_dinov2.lvd142m`` (the same weights), with its 37x37 position
embedding interpolated to 16x16 the way the torch.hub model does it at run time
(bicubic, ``scale_factor = (16 + 0.1) / 37``, no antialias), so the two produce the same
features up to float32 rounding.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.hub import HubUnavailable, hub_file

from .inception import WeightsError, first_line, strict_fp32

DEFAULT_DINOV2_MODEL = "vit_large_patch14_dinov2.lvd142m"
DINOV2_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1


def resolve_dinov2_weights(model_name: str = DEFAULT_DINOV2_MODEL, weights_path: Optional[str] = None) -> str:
    """A local weights file: ``weights_path``, the Hugging Face cache, or a download.

    Fails fast (no retry loop) when the file is not cached and the Hub is unreachable.
    """
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise WeightsError(f"--dinov2-weights {weights_path}: no such file")
        return weights_path
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        raise WeightsError(f"--dinov2-model {model_name}: timm knows no pretrained weights for it; pass --dinov2-weights")
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    try:
        return hub_file(repo_id, filename)
    except HubUnavailable as exc:
        raise WeightsError(f"the DINOv2 weights: {exc}; download https://huggingface.co/{repo_id}/resolve/main/"
                           f"{filename} (timm format) or Meta's dinov2_vitl14_pretrain.pth and pass "
                           "--dinov2-weights PATH") from None


def interpolate_pos_embed_like_hub(pos_embed: torch.Tensor, grid: int,
                                   offset: float = HUB_INTERPOLATE_OFFSET) -> torch.Tensor:
    """Resize a ViT position embedding ``(1, P + M*M, D)`` to ``(1, P + grid*grid, D)``.

    ``P`` (0 or 1) prefix entries are kept. Same arithmetic as DINOv2's
    ``interpolate_pos_encoding``: bicubic, ``scale_factor = (grid + offset) / M``, which
    places the source samples slightly differently from ``size=grid``.
    """
    tokens = pos_embed.shape[1]
    side = math.isqrt(tokens)
    prefix = 0 if side * side == tokens else 1
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        raise ValueError(f"position embedding with {tokens} tokens is not a square grid")
    if side == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, prefix:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (grid + offset) / side
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolated grid {tuple(patch.shape[-2:])} != ({grid}, {grid})")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :prefix], patch], dim=1)


def load_dinov2(model_name: str = DEFAULT_DINOV2_MODEL, weights_path: Optional[str] = None,
                device: str | torch.device = "cpu", image_size: int = DINOV2_IMAGE_SIZE) -> torch.nn.Module:
    """timm DINOv2 ViT built for ``image_size`` inputs with pretrained weights, in eval mode.

    ``weights_path`` may be timm's ``model.safetensors`` or Meta's ``dinov2_vit*14_pretrain.pth``
    (converted by timm's checkpoint filter). Without it, the Hugging Face cache or Hub is used.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from models.checkpoints import read_weights
    from models.weights_io import UntrustedCheckpointError

    path = resolve_dinov2_weights(model_name, weights_path)
    try:
        state = read_weights(path, "the DINOv2 weights")  # never timm's loader: no code from the file runs
    except UntrustedCheckpointError as exc:
        raise WeightsError(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise WeightsError(f"{path}: not loadable as {model_name} weights ({first_line(exc)})") from None
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size)
    except Exception as exc:
        raise WeightsError(f"--dinov2-model {model_name}: cannot build it with timm ({exc})") from None
    try:
        if "pos_embed" in state:
            grid = image_size // model.patch_embed.patch_size[0]
            state["pos_embed"] = interpolate_pos_embed_like_hub(state["pos_embed"], grid)
        model.load_state_dict(checkpoint_filter_fn(state, model))
    except Exception as exc:
        raise WeightsError(f"{path}: not loadable as {model_name} weights ({first_line(exc)})") from None
    return model.to(device).eval().requires_grad_(False)


def _resize_one(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def preprocess_for_dinov2(images: np.ndarray, size: int = DINOV2_IMAGE_SIZE, workers: int = 4) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, size, size)``: PIL bicubic, /255, ImageNet mean/std."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while resizing
        resized = np.stack(list(pool.map(lambda im: _resize_one(im, size), images)))
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV2FeatureExtractor:
    """``extractor(images)`` -> final-norm CLS token ``(B, D)`` float32 of uint8 NHWC images."""

    def __init__(self, model: torch.nn.Module, image_size: int = DINOV2_IMAGE_SIZE):
        self.model = model
        self.image_size = image_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = preprocess_for_dinov2(images, self.image_size).to(self.device)
        with strict_fp32():
            tokens = self.model.forward_features(x)
        return tokens[:, 0].float().cpu().numpy()
