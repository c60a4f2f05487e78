"""Data preparation and loading: raw images -> PNG dataset -> VAE latents -> training items.

- `open_dataset(path)`: every format the trainer reads (data/datasets.py)
- `open_paired(data_dir, images_dir=None, resolution=None)`: images + latents of the same items, for REPA
- `data.vae`: SD-VAE loading, posterior moments, latent sampling, decoding
- `data.convert.convert_dataset`, `data.encode.encode_dataset`: the two dataset_tools steps
"""

from . import vae
from .datasets import open_dataset
from .packed import PackedLatentDataset
from .paired import PairedDataset, open_paired
from .per_image import ImageFolderDataset, LatentFolderDataset
from .vae import LATENT_SCALE, decode_to_uint8, encode_moments, load_vae, sample_latents, to_uint8

__all__ = [
    "open_dataset",
    "open_paired",
    "PairedDataset",
    "vae",
    "ImageFolderDataset",
    "LatentFolderDataset",
    "PackedLatentDataset",
    "LATENT_SCALE",
    "load_vae",
    "encode_moments",
    "sample_latents",
    "decode_to_uint8",
    "to_uint8",
]
