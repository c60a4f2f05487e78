"""SD-VAE wrapper (SPEC section 1): loading, posterior moments, latent sampling, decoding.

Latents are stored as the posterior moments `mean || std`, float32 `(8, H/8, W/8)`; training
draws `z = (mean + std * N(0, I)) * LATENT_SCALE`. Pixels enter the VAE in [-1, 1].
diffusers is imported only when a VAE is loaded, so `import data` stays cheap.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

LATENT_SCALE = 0.18215

SHORT_NAMES = {
    "ft-ema": "stabilityai/sd-vae-ft-ema",
    "ft-mse": "stabilityai/sd-vae-ft-mse",
    "ema": "stabilityai/sd-vae-ft-ema",
    "mse": "stabilityai/sd-vae-ft-mse",
}


def _looks_like_path(name: str) -> bool:
    """Hub names are `owner/model`; anything else with a path shape is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def load_vae(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32):
    """Load a diffusers AutoencoderKL in eval mode with gradients off.

    `name_or_path`: a hub name (`stabilityai/sd-vae-ft-mse`), a short name (`ft-ema`, `ft-mse`),
    or a local folder written by `save_pretrained` (a folder with a `vae/` sub-folder, as in a
    full Stable Diffusion snapshot, also works). A missing local folder raises FileNotFoundError;
    a hub model that is neither cached nor downloadable raises RuntimeError. Set
    `HF_HUB_OFFLINE=1` to make that failure immediate instead of retrying the network.

    Weights are read as safetensors whenever the folder (or the hub) has them; a folder with only
    pickled `.bin` weights has each `.bin` read first by `models.checkpoints.read_weights`
    (`weights_only=True`), so one that would run code is refused (RuntimeError) before diffusers
    opens it (diffusers 0.42 also reads `.bin` with `weights_only=True`).
    """
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers' own call
    from diffusers.models import AutoencoderKL

    name = os.fspath(name_or_path)
    name = SHORT_NAMES.get(name, name)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        has_config = os.path.isfile(os.path.join(expanded, "config.json"))
        subfolder = None
        if not has_config and os.path.isfile(os.path.join(expanded, "vae", "config.json")):
            subfolder = "vae"
        elif not has_config:
            raise FileNotFoundError(
                f"VAE folder {expanded!r} has no config.json; expected a folder written by "
                "AutoencoderKL.save_pretrained (config.json + weights)"
            )
        try:
            use_safetensors = _vet_folder_weights(os.path.join(expanded, subfolder or ""))
        except ValueError as exc:  # refused or unreadable .bin: the message names it
            raise RuntimeError(str(exc)) from None
        try:
            vae = AutoencoderKL.from_pretrained(expanded, subfolder=subfolder, torch_dtype=dtype,
                                                use_safetensors=use_safetensors)
        except Exception as exc:
            raise RuntimeError(f"could not load the VAE from folder {expanded!r}: {exc}") from exc
    elif os.path.exists(expanded):
        raise FileNotFoundError(f"--vae {expanded!r} is a file; expected a folder written by save_pretrained")
    elif _looks_like_path(name):
        raise FileNotFoundError(f"VAE folder {expanded!r} does not exist; pass a hub name such as "
                                "stabilityai/sd-vae-ft-mse or a folder written by save_pretrained")
    else:
        try:
            vae = AutoencoderKL.from_pretrained(name, torch_dtype=dtype, use_safetensors=True)
        except Exception as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            raise RuntimeError(
                f"could not load the VAE {name!r}: it is not in the local Hugging Face cache"
                + (" (HF_HUB_OFFLINE is set)" if offline else " and could not be downloaded")
                + ". Download it where there is network access, e.g. `hf download "
                + f"{name} --local-dir sd-vae`, and pass that folder (--vae sd-vae), or copy a "
                + f"Hugging Face cache that holds it. Original error: {type(exc).__name__}: {exc}"
            ) from exc
    vae = vae.to(device=device).eval()
    vae.requires_grad_(False)
    return vae


def _vet_folder_weights(folder: str) -> bool:
    """True when `folder` holds safetensors weights (diffusers then reads only those); otherwise
    every pickled `.bin` in it is read safely first: one ValueError names a file that would run
    code when unpickled (or cannot be read)."""
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") for n in names):
        return True
    from models.checkpoints import read_weights

    for name in sorted(n for n in names if n.endswith(".bin")):
        read_weights(os.path.join(folder, name), "the VAE weights")
    return False


def _vae_device_dtype(vae) -> tuple[torch.device, torch.dtype]:
    param = next(vae.parameters())
    return param.device, param.dtype


def _as_vae_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1], NCHW (or unambiguous NHWC) -> float NCHW in [-1, 1]."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels in dim 1, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    return images


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """Posterior moments of the images. (B, 3, H, W) -> (B, 8, H/8, W/8) float32 = mean || std.

    Runs in the VAE's own dtype (and under any autocast the caller opened); the result is float32.
    """
    device, dtype = _vae_device_dtype(vae)
    x = _as_vae_input(images).to(device=device, dtype=dtype)
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


def sample_latents(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 8, h, w) moments -> (B, 4, h, w) scaled latents `(mean + std * eps) * LATENT_SCALE`."""
    mean, std = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * LATENT_SCALE


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8.

    `127.5 * x + 128` is `127.5 * x + 127.5` plus 0.5, so truncating the clamped, non-negative
    value rounds to nearest (SPEC section 1); plain truncation of `127.5 * x + 127.5` would
    darken every pixel by half a level on average.
    """
    return torch.clamp(127.5 * x.float() + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def decode_to_uint8(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) scaled latents -> (B, 8h, 8w, 3) uint8 images."""
    device, dtype = _vae_device_dtype(vae)
    z = (latents / LATENT_SCALE).to(device=device, dtype=dtype)
    return to_uint8(vae.decode(z).sample)


@torch.no_grad()
def samples_to_uint8(vae, x: torch.Tensor, chunk: int = 16) -> np.ndarray:
    """Sampler output -> (B, H, W, 3) uint8 on the CPU: pixels in [-1, 1] when ``vae`` is None,
    else scaled latents decoded ``chunk`` images at a time (the fp32 decoder needs hundreds of MB
    of activations per 256 px image)."""
    x = x.float()
    if vae is None:
        return to_uint8(x).cpu().numpy()
    return np.concatenate([decode_to_uint8(vae, part).cpu().numpy() for part in x.split(chunk)])
