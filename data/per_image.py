"""Readers for the per-image layout of SPEC section 7 (a folder or a ZIP of the same files).

    dataset.json   {"labels": [[relpath, label], ...], "classes": [...] (optional)}
    images:  {idx//1000:05d}/img{idx:08d}.png             -> uint8 (3, H, W)
    latents: {idx//1000:05d}/img-mean-std-{idx:08d}.npy   -> float32 (8, h, w) = mean || std

Items are the `labels` entries in order; `num_classes` is `len(classes)` when dataset.json
lists them (empty class folders count), else `max(label) + 1`. No Python object is kept per
item (`FileNames`: numbers when the names follow the layout above, else one fixed-width byte
array; labels in an int64 array): DataLoader workers forked from the process share these
pages instead of copying the ones whose reference counts they touch.

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
import re

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .robust import CorruptSampleError, checked_label
from .storage import ZipReader
from .transforms import to_rgb


LATENT_NAME = ("img-mean-std-", ".npy")  # (prefix, suffix) of encode's per-image files


def _leaves(relpath: str) -> bool:
    """True when `relpath` is not a relative path inside the dataset: empty, absolute (POSIX,
    Windows drive or UNC) or with a `..` part."""
    if not relpath.strip() or relpath[0] in "/\\" or relpath[1:2] == ":":
        return True
    return ".." in relpath and ".." in relpath.replace("\\", "/").split("/")


_CHUNK = 65536  # names converted at a time: the temporary arrays stay small
_NUMBERED = re.compile(r"\d{5}/([^/]*?)\d{8}(\.[A-Za-z0-9]+)")


class FileNames:
    """The relative paths of a dataset's items, `names[i] -> str`, held without a Python object per
    name: `numbers` (int64, one per item) with `prefix` and `suffix` when every name is
    `{n//1000:05d}/{prefix}{n:08d}{suffix}` (convert's and encode's layout, gaps allowed), else
    the UTF-8 names in one fixed-width numpy byte array (`numbers` is None)."""

    def __init__(self, names):
        self.numbers, self.prefix, self.suffix, self._bytes = None, "", "", None
        first = _NUMBERED.fullmatch(names[0]) if len(names) else None
        if first is not None:
            self.numbers = _layout_numbers(names, first.group(1), first.group(2))
            self.prefix, self.suffix = first.group(1), first.group(2)
        if self.numbers is None:
            width = max((len(n.encode("utf-8")) for n in names), default=1)
            self._bytes = np.empty(len(names), dtype=f"S{width}")
            for start in range(0, len(names), _CHUNK):  # the str array of a chunk holds 4 bytes per character
                self._bytes[start:start + _CHUNK] = np.char.encode(np.asarray(names[start:start + _CHUNK], dtype=str),
                                                                   "utf-8")

    @classmethod
    def numbered(cls, numbers, prefix: str, suffix: str) -> "FileNames":
        names = cls([])
        names.numbers, names.prefix, names.suffix = np.asarray(numbers, dtype=np.int64), prefix, suffix
        return names

    def __len__(self) -> int:
        return len(self.numbers) if self.numbers is not None else len(self._bytes)

    def __getitem__(self, i) -> str:
        if self.numbers is None:
            return self._bytes[i].decode("utf-8")
        n = int(self.numbers[i])
        return f"{n // 1000:05d}/{self.prefix}{n:08d}{self.suffix}"

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def first_difference(self, other) -> int | None:
        """The first index where `other` (a FileNames or a sequence of str) names another file, or
        None when all agree over their common length; vectorised when both are numbered alike."""
        if (isinstance(other, FileNames) and self.numbers is not None and other.numbers is not None
                and (self.prefix, self.suffix) == (other.prefix, other.suffix)):
            n = min(len(self), len(other))
            diff = np.flatnonzero(self.numbers[:n] != other.numbers[:n])
            return int(diff[0]) if diff.size else None
        return next((i for i, (a, b) in enumerate(zip(self, other)) if a != b), None)


def _layout_numbers(names, prefix: str, suffix: str):
    """int64 n of each `{n//1000:05d}/{prefix}{n:08d}{suffix}` name, or None if one does not fit;
    checked one byte column at a time over all names (no per-name Python work, little memory)."""
    template = f"00000/{prefix}00000000{suffix}".encode()
    width = len(template)
    digits = set(range(5)) | set(range(6 + len(prefix), 14 + len(prefix)))
    numbers = np.zeros(len(names), np.int64)
    for start in range(0, len(names), _CHUNK):
        try:  # one byte more than the template: a longer name leaves a non-zero byte there
            raw = np.asarray(names[start:start + _CHUNK], dtype=f"S{width + 1}").view(np.uint8).reshape(-1, width + 1)
        except UnicodeEncodeError:
            return None
        folder, part = np.zeros(len(raw), np.int64), numbers[start:start + len(raw)]
        for c in range(width + 1):
            column = raw[:, c]
            if c in digits:
                digit = column - np.uint8(ord("0"))  # wraps around below "0"
                if (digit > 9).any():
                    return None
                acc = folder if c < 5 else part
                acc *= 10
                acc += digit
            elif (column != (template[c] if c < width else 0)).any():
                return None
        if (folder != part // 1000).any():
            return None
    return numbers


def parse_dataset_json(raw: bytes, where: str) -> tuple[FileNames, np.ndarray, list | None]:
    """(files, labels int64, classes) of a dataset.json's bytes; ValueError naming `where` (the
    file) when it is not what convert / encode write."""
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
    return FileNames(files), np.asarray(values, dtype=np.int64), classes


class _PerImageDataset(Dataset):
    kind = ""

    def __init__(self, path: str, parsed: tuple | None = None):
        """`parsed`: `parse_dataset_json` of this dataset's dataset.json, when the caller has it already."""
        self.path = os.fspath(path)
        self._zip = ZipReader(self.path) if os.path.isfile(self.path) else None
        if parsed is None:
            try:
                raw = self._read("dataset.json")
            except (FileNotFoundError, KeyError):
                raise ValueError(
                    f"{self.path!r} has no dataset.json; expected the output of `dataset_tools.py convert` "
                    "(images) or `dataset_tools.py encode` (latents)"
                ) from None
            parsed = parse_dataset_json(raw, repr(os.path.join(self.path, "dataset.json")))
        self.files, self.labels, self.classes = parsed
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
