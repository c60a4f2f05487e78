"""`open_dataset(path)`: one entry point for every on-disk format the trainer reads.

Detection, in order:
1. a folder with `index.json`                  -> PackedLatentDataset
2. a folder or `.zip` with `dataset.json`      -> per-image latents (`.npy` files) or images
3. a parent folder holding `vae-sd/` and/or `images/` (REPA's data_dir): latents preferred
"""

from __future__ import annotations

import os

from .packed import PackedLatentDataset, is_packed
from .per_image import ImageFolderDataset, LatentFolderDataset, parse_dataset_json
from .storage import ZipReader

SUBFOLDERS = {"latents": ("vae-sd",), "images": ("images", "images.zip")}
EXPECTED = (
    "expected the output of `dataset_tools.py convert` (images: dataset.json + PNGs, folder or .zip), "
    "of `dataset_tools.py encode` (latents: dataset.json + .npy files, or packed: index.json + shards), "
    "or a folder holding vae-sd/ or images/"
)


def _open_per_image(path: str, is_zip: bool):
    """The per-image dataset at `path`, its dataset.json parsed once: latents if its files are .npy."""
    if is_zip:
        zf = ZipReader(path)
        try:
            raw = zf.read("dataset.json")
        finally:
            zf.close()
    else:
        with open(os.path.join(path, "dataset.json"), "rb") as f:
            raw = f.read()
    parsed = parse_dataset_json(raw, repr(os.path.join(path, "dataset.json")))
    cls = LatentFolderDataset if parsed[0][0].lower().endswith(".npy") else ImageFolderDataset
    return cls(path, parsed)


def _has_dataset_json(path: str, is_zip: bool) -> bool:
    if is_zip:
        zf = ZipReader(path)
        try:
            return zf.exists("dataset.json")
        finally:
            zf.close()
    return os.path.isfile(os.path.join(path, "dataset.json"))


def open_dataset(path, kind: str | None = None):
    """Open a dataset folder/ZIP. `kind` ("latents" or "images") picks one kind from a parent
    folder and rejects a dataset of the other kind; None accepts either (latents preferred)."""
    if kind not in (None, "latents", "images"):
        raise ValueError(f"kind must be 'latents', 'images' or None, got {kind!r}")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist; {EXPECTED}")
    is_zip = os.path.isfile(path)
    if is_zip and not path.lower().endswith(".zip"):
        raise ValueError(f"dataset path {path!r} is a file but not a .zip; {EXPECTED}")

    dataset = None
    if not is_zip and is_packed(path):
        dataset = PackedLatentDataset(path)
    elif _has_dataset_json(path, is_zip):
        dataset = _open_per_image(path, is_zip)
    elif not is_zip:
        for wanted in ("latents", "images") if kind is None else (kind,):
            for sub in SUBFOLDERS[wanted]:
                candidate = os.path.join(path, sub)
                if os.path.exists(candidate):
                    return open_dataset(candidate, kind=wanted)
    if dataset is None:
        raise ValueError(f"{path!r} is not a dataset (no dataset.json or index.json); {EXPECTED}")
    if kind is not None and dataset.kind != kind:
        raise ValueError(f"{path!r} holds {dataset.kind}, but {kind} were expected")
    return dataset
