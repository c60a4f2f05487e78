"""Readers for the per-image layout of SPEC section 7 (a folder or a ZIP of the same files).

    dataset.json   {"labels": [[relpath, label], ...], "classes": [...] (optional)}
    images:  {idx//1000:05d}/img{idx:08d}.png             -> uint8 (3, H, W)
    latents: {idx//1000:05d}/img-mean-std-{idx:08d}.npy   -> float32 (8, h, w) = mean || std

Items are the `labels` entries in order; `num_classes` is `len(classes)` when dataset.json
lists them (empty class folders count), else `max(label) + 1`.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .storage import ZipReader
from .transforms import to_rgb


def latent_relpath(idx: int) -> str:
    return f"{idx // 1000:05d}/img-mean-std-{idx:08d}.npy"


class _PerImageDataset(Dataset):
    kind = ""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._zip = ZipReader(self.path) if os.path.isfile(self.path) else None
        try:
            meta = json.loads(self._read("dataset.json"))
        except (FileNotFoundError, KeyError):
            raise ValueError(
                f"{self.path!r} has no dataset.json; expected the output of `dataset_tools.py convert` "
                "(images) or `dataset_tools.py encode` (latents)"
            ) from None
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if not labels:
            raise ValueError(f"{os.path.join(self.path, 'dataset.json')!r} lists no labelled files; "
                             "the dataset is empty")
        self.files = [str(f) for f, _ in labels]
        self.labels = np.asarray([int(lab) for _, lab in labels], dtype=np.int64)
        self.classes = meta.get("classes")
        self.num_classes = len(self.classes) if self.classes else int(self.labels.max()) + 1
        self._item_shape = None

    def _read(self, relpath: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(relpath)
        with open(os.path.join(self.path, relpath), "rb") as f:
            return f.read()

    def _decode(self, data: bytes) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self._decode(self._read(self.files[i])), int(self.labels[i])

    @property
    def item_shape(self) -> tuple[int, int, int]:
        if self._item_shape is None:
            self._item_shape = tuple(self[0][0].shape)
        return self._item_shape

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {len(self)} items, shape {self.item_shape}, "
                f"{self.num_classes} classes)")


class ImageFolderDataset(_PerImageDataset):
    """Converted images; item = (uint8 (3, H, W), label)."""

    kind = "images"

    def _decode(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(to_rgb(img))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class LatentFolderDataset(_PerImageDataset):
    """Per-image VAE moments; item = (float32 (8, h, w) = mean || std, label)."""

    kind = "latents"

    def _decode(self, data: bytes) -> torch.Tensor:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False))
