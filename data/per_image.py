"""Readers for the per-image layout of SPEC section 7 (a folder or a ZIP of the same files).

    dataset.json   {"labels": [[relpath, label], ...], "classes": [...] (optional)}
    images:  {idx//1000:05d}/img{idx:08d}.png             -> uint8 (3, H, W)
    latents: {idx//1000:05d}/img-mean-std-{idx:08d}.npy   -> float32 (8, h, w) = mean || std

Items are the `labels` entries in order; `num_classes` is `len(classes)` when dataset.json
lists them (empty class folders count), else `max(label) + 1`.

A file that is missing, cannot be decoded, has another shape than the dataset's (that of the
first readable item, or the run's configured shape: `expect_item_shape`), non-finite values, or a
label outside `0..num_classes-1` raises CorruptSampleError naming the file (data/robust.py).
A dataset.json that is not what convert / encode write (broken JSON, `labels` not a list of
[path, integer] pairs, `classes` not a list, a path that leaves the dataset: absolute or with
`..`) is one ValueError naming it, before any file is read (`parse_dataset_json`).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .robust import CorruptSampleError, checked_label
from .storage import ZipReader
from .transforms import to_rgb


def latent_relpath(idx: int) -> str:
    return f"{idx // 1000:05d}/img-mean-std-{idx:08d}.npy"


def _leaves(relpath: str) -> bool:
    """True when `relpath` is not a relative path inside the dataset: empty, absolute (POSIX,
    Windows drive or UNC) or with a `..` part."""
    if not relpath.strip() or relpath[0] in "/\\" or relpath[1:2] == ":":
        return True
    return ".." in relpath and ".." in relpath.replace("\\", "/").split("/")


def parse_dataset_json(raw: bytes, where: str) -> tuple[list[str], list[int], list | None]:
    """(files, labels, classes) of a dataset.json's bytes; ValueError naming `where` (the file)
    when it is not what convert / encode write."""
    try:
        meta = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{where} is not valid JSON ({e}); the file is damaged: write the dataset again") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is not None and not isinstance(labels, list):
        raise ValueError(f"{where}: \"labels\" must be a list of [path, label] pairs, got "
                         f"{type(labels).__name__} {json.dumps(labels)[:40]}")
    if not labels:
        raise ValueError(f"{where} lists no labelled files; the dataset is empty")
    files, values = [], []
    for i, entry in enumerate(labels):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"{where}: labels entry {i} must be a [path, label] pair, got {json.dumps(entry)[:60]}")
        path, label = entry
        if type(label) is not int:  # not bool, float or str: labels index the classes
            raise ValueError(f"{where}: labels entry {i} ({path!r}) has label {json.dumps(label)[:40]}, "
                             "not an integer")
        if _leaves(path):
            raise ValueError(f"{where}: labels entry {i} names {path!r}, which leaves the dataset (absolute or "
                             "with '..'); refused, nothing read")
        files.append(path)
        values.append(label)
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{where}: \"classes\" must be a list of class names, got "
                         f"{type(classes).__name__} {json.dumps(classes)[:40]}")
    return files, values, classes


class _PerImageDataset(Dataset):
    kind = ""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._zip = ZipReader(self.path) if os.path.isfile(self.path) else None
        try:
            raw = self._read("dataset.json")
        except (FileNotFoundError, KeyError):
            raise ValueError(
                f"{self.path!r} has no dataset.json; expected the output of `dataset_tools.py convert` "
                "(images) or `dataset_tools.py encode` (latents)"
            ) from None
        self.files, labels, self.classes = parse_dataset_json(raw, repr(os.path.join(self.path, "dataset.json")))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes) if self.classes else int(self.labels.max()) + 1
        self._item_shape = None
        self._shape_source = "that of its first readable item"

    def _read(self, relpath: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(relpath)
        with open(os.path.join(self.path, relpath), "rb") as f:
            return f.read()

    def _decode(self, data: bytes) -> torch.Tensor:
        """The item's tensor; raises ValueError(reason) when the bytes are not a valid item."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.files)

    def sample_path(self, i: int) -> str:
        """Where item `i` lives: `<folder or zip>/<path inside>`."""
        return os.path.join(self.path, self.files[i])

    def load_item(self, i: int):
        """(tensor, label) of item `i` with every check except the shape against the dataset's."""
        try:
            data = self._read(self.files[i])
        except (FileNotFoundError, KeyError):
            raise CorruptSampleError(i, self.sample_path(i), "the file is missing") from None
        except OSError as e:
            raise CorruptSampleError(i, self.sample_path(i), f"cannot read the file: {e}") from None
        try:
            x = self._decode(data)
        except ValueError as e:
            raise CorruptSampleError(i, self.sample_path(i), str(e)) from None
        return x, checked_label(self, i, f"dataset.json lists {self.num_classes} classes")

    def __getitem__(self, i: int):
        x, label = self.load_item(i)
        if tuple(x.shape) != self.item_shape:
            raise CorruptSampleError(i, self.sample_path(i), f"shape {tuple(x.shape)} differs from the dataset's "
                                     f"{self.item_shape} ({self._shape_source})")
        return x, label

    @property
    def item_shape(self) -> tuple[int, int, int]:
        if self._item_shape is None:
            error = None
            for i in range(len(self)):
                try:
                    self._item_shape = tuple(self.load_item(i)[0].shape)
                    break
                except CorruptSampleError as e:
                    error = error or e
                    if i >= 1000:
                        raise ValueError(f"{self.path!r}: the first 1000 items are all unreadable "
                                         f"(first: {error})") from None
            else:
                raise ValueError(f"{self.path!r}: no item is readable (first: {error})")
        return self._item_shape

    def expect_item_shape(self, shape, probes: int = 16) -> tuple:
        """Take `shape` (what the run's config expects) as the dataset's item shape when most of
        `probes` items spread over the dataset have it: an odd first item is then one corrupt
        sample (named by the reader; bad_samples), not the shape of the whole dataset. Returns
        the most common shape among the probed items (`shape` when it was taken)."""
        shape = tuple(shape)
        seen = []
        for i in sorted(set(np.linspace(0, len(self) - 1, min(probes, len(self))).round().astype(int).tolist())):
            try:
                seen.append(tuple(self.load_item(i)[0].shape))
            except CorruptSampleError:
                pass
        if seen and seen.count(shape) * 2 > len(seen):
            self._item_shape, self._shape_source = shape, "the configured resolution, which most items have"
            return shape
        return max(seen, key=seen.count) if seen else self.item_shape

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {len(self)} items, shape {self.item_shape}, "
                f"{self.num_classes} classes)")


class ImageFolderDataset(_PerImageDataset):
    """Converted images; item = (uint8 (3, H, W), label)."""

    kind = "images"

    def _decode(self, data: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as img:
                arr = np.asarray(to_rgb(img))  # decodes everything: a truncated file fails here
        except UnidentifiedImageError:
            raise ValueError("not a decodable image (PIL cannot identify the format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"cannot decode the image ({type(e).__name__}: {e}); truncated or damaged?") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class LatentFolderDataset(_PerImageDataset):
    """Per-image VAE moments; item = (float32 (8, h, w) = mean || std, label)."""

    kind = "latents"

    def _decode(self, data: bytes) -> torch.Tensor:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"not a readable .npy array ({type(e).__name__}: {e}); truncated or damaged?") from None
        return torch.from_numpy(check_latent(arr))


def check_latent(arr: np.ndarray) -> np.ndarray:
    """`arr` as float32 (C, h, w) moments; ValueError(reason) for another dtype, rank or NaN/inf."""
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"latent has dtype {getattr(arr, 'dtype', type(arr).__name__)}, expected float32")
    if arr.ndim != 3:
        raise ValueError(f"latent has shape {arr.shape}, expected (channels, height, width)")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"latent holds {int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf)")
    return arr
