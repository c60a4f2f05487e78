"""Two views of each training item for REPA: the clean image (for the frozen encoder) and its
VAE latent (for the flow loss). Item i = (uint8 (3, H, W), float32 (8, H/8, W/8) = mean || std, label).

Layouts (`open_paired`):
- REPA's `data_dir`: a folder holding `images/` (or `images.zip`) from `dataset_tools.py convert`
  and `vae-sd/` from `encode` (per-image or packed);
- any latents dataset (`data_dir`: per-image folder/ZIP or packed folder) with the images given
  separately (`images_dir`: a folder or ZIP from `convert`).

Item i pairs entry i of the images' dataset.json with entry i of the latents (dataset.json
order, or the packed index order, which is the images' order at encode time). `PairedDataset`
checks at open that the two agree: same count, same labels, and where the latents record their
sources, the same files (per-image: `img-mean-std-{idx}.npy` for `img{idx}.png`, as `encode`
names them; packed: `files.json`). A mismatch is one ValueError naming both paths and the
first differing index. Images are decoded in `__getitem__` (in the DataLoader workers); ZIP
handles and memory maps are opened lazily per process, so the dataset pickles cheaply.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from .datasets import SUBFOLDERS, open_dataset
from .encode import latent_names
from .packed import PackedLatentDataset
from .per_image import FileNames, ImageFolderDataset

VAE_FACTOR = 8  # SD-VAE: an H x W image has an H/8 x W/8 latent


def _names(names) -> FileNames:
    """`names` as FileNames with Windows separators written as '/' (a numbered FileNames has none)."""
    names = names if isinstance(names, FileNames) else FileNames(names)
    return names if names.numbers is not None else FileNames([str(n).replace("\\", "/") for n in names])


def _source_names(images: ImageFolderDataset, latents) -> Optional[tuple[FileNames, FileNames, str]]:
    """(expected latent-side names, recorded latent-side names, what they are), or None if unrecorded."""
    if isinstance(latents, PackedLatentDataset):
        files_name = latents.index.get("files")
        path = os.path.join(latents.path, files_name) if files_name else None
        if path is None or not os.path.isfile(path):
            return None
        with open(path) as f:
            recorded = _names(json.load(f))
        return _names(images.files), recorded, "source image (files.json)"
    if hasattr(latents, "files"):
        return latent_names(images.files), _names(latents.files), "latent file name"
    return None


class PairedDataset(Dataset):
    """Images and latents of the same items. ``ds[i] -> (uint8 (3, H, W), float32 (8, h, w), label)``.

    ``item_shape`` is the latent shape (the model's input), ``image_shape`` the image shape;
    ``resolution`` (optional) is the image side the run expects.
    """

    kind = "paired"

    def __init__(self, images: ImageFolderDataset, latents, resolution: Optional[int] = None):
        if getattr(images, "kind", None) != "images":
            raise ValueError(f"{getattr(images, 'path', images)!r} does not hold images")
        if getattr(latents, "kind", None) != "latents":
            raise ValueError(f"{getattr(latents, 'path', latents)!r} does not hold latents")
        self.images, self.latents = images, latents
        self._check_alignment()
        if resolution is not None:  # an odd first item is one bad sample, not the dataset's shape
            for dataset, shape in ((images, (3, resolution, resolution)),
                                   (latents, (8, resolution // VAE_FACTOR, resolution // VAE_FACTOR))):
                if hasattr(dataset, "expect_item_shape"):
                    dataset.expect_item_shape(shape)
        self.image_shape = tuple(images.item_shape)
        self.item_shape = tuple(latents.item_shape)
        self._check_shapes(resolution)
        self.labels = latents.labels
        self.num_classes = latents.num_classes
        self.classes = latents.classes

    def _where(self) -> str:
        return f"images {self.images.path!r} and latents {self.latents.path!r}"

    def _check_alignment(self) -> None:
        n_img, n_lat = len(self.images), len(self.latents)
        if n_img != n_lat:
            raise ValueError(f"{self._where()} do not match: {n_img} images, {n_lat} latents (the first "
                             f"unmatched index is {min(n_img, n_lat)}); encode the same images dataset again")
        lab_img, lab_lat = np.asarray(self.images.labels), np.asarray(self.latents.labels)
        diff = np.flatnonzero(lab_img != lab_lat)
        if diff.size:
            i = int(diff[0])
            raise ValueError(f"{self._where()} do not match: labels differ at index {i} (image "
                             f"{self.images.files[i]!r}: {lab_img[i]}, latent: {lab_lat[i]}; {diff.size} items "
                             "differ); encode the same images dataset again")
        names = _source_names(self.images, self.latents)
        if names is not None:
            expected, recorded, what = names
            i = expected.first_difference(recorded)
            if i is not None:
                raise ValueError(f"{self._where()} do not match: index {i} is image {self.images.files[i]!r}, "
                                 f"whose {what} would be {expected[i]!r}, but the latents have {recorded[i]!r}; "
                                 "encode the same images dataset again")

    def _check_shapes(self, resolution: Optional[int]) -> None:
        c, h, w = self.image_shape
        if resolution is not None and (h, w) != (resolution, resolution):
            raise ValueError(f"images {self.images.path!r} are {w}x{h}, but the run expects "
                             f"{resolution}x{resolution} (resolution); convert them at --resolution "
                             f"{resolution}x{resolution} or set resolution={h}")
        lh, lw = self.item_shape[-2:]
        if (lh * VAE_FACTOR, lw * VAE_FACTOR) != (h, w):
            raise ValueError(f"{self._where()} do not match: latents {self.item_shape} come from "
                             f"{lw * VAE_FACTOR}x{lh * VAE_FACTOR} images, the images are {w}x{h}")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        image, _ = self.images[i]
        if tuple(image.shape) != self.image_shape:
            raise ValueError(f"image {self.images.files[i]!r} in {self.images.path!r} is {tuple(image.shape)}, "
                             f"the dataset's images are {self.image_shape}")
        moments, label = self.latents[i]
        return image, moments, label

    def __repr__(self) -> str:
        return (f"PairedDataset({len(self)} items: images {self.image_shape} from {self.images.path!r}, "
                f"latents {self.item_shape} from {self.latents.path!r})")


def _images_beside(data_dir: str) -> Optional[str]:
    if os.path.isdir(data_dir):
        for sub in SUBFOLDERS["images"]:
            if os.path.exists(os.path.join(data_dir, sub)):
                return os.path.join(data_dir, sub)
    return None


def open_paired(data_dir, images_dir=None, resolution: Optional[int] = None) -> PairedDataset:
    """Open images + latents for REPA.

    ``data_dir``: REPA's parent folder (``images/`` + ``vae-sd/``) or any latents dataset;
    ``images_dir``: the images (folder or ZIP from ``convert``) when they are not beside the
    latents in ``data_dir``. ``resolution``: the image side the run expects (checked).
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    latents = open_dataset(data_dir, kind="latents")
    if images_dir is None:
        images_dir = _images_beside(data_dir)
        if images_dir is None:
            raise ValueError(f"REPA needs the clean images beside the latents, but {data_dir!r} holds no "
                             f"{' or '.join(SUBFOLDERS['images'])}; set images_dir to the output of "
                             "`dataset_tools.py convert` that was encoded into these latents")
    images = open_dataset(os.path.expanduser(os.fspath(images_dir)), kind="images")
    return PairedDataset(images, latents, resolution=resolution)
