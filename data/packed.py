"""Packed latents: a few large memory-mappable arrays instead of one file per image.

    index.json          {"format": "dfm-packed-latents", "version": 1, "num_items": N,
                         "item_shape": [8, h, w], "dtype": "float32", "shard_size": S,
                         "shards": [{"file": "shard-00000.npy", "start": 0, "count": n}, ...],
                         "num_classes": K, "classes": [...], "files": "files.json", ...}
    labels.npy          int64 (N,)
    files.json          ["00000/img00000000.png", ...]: the source image of each item
    shard-XXXXX.npy     float32 (count, 8, h, w), item `start + j` is row j

Shards are ordinary .npy files (np.load(..., mmap_mode="r") reads them without copying).
index.json is written last: a folder without it is an unfinished encode, not a dataset.

Training reads rows with positioned reads (`os.preadv` into the item's buffer) on files advised
POSIX_FADV_RANDOM, not through a memory map: a page fault on a map makes the kernel read ahead
(up to `read_ahead_kb`, 8 MiB on some hosts), so shuffled access on a cold cache read 16x the
bytes it delivered from 320k items (bench/loader_io.py, docs/PERFORMANCE.md), and the mapped
pages stayed in every worker's RSS. A positioned read fetches the pages of the row only.

A missing or truncated shard, one of another shape or dtype than index.json says, a row with
NaN/inf or a label out of range raises CorruptSampleError for the items concerned.
"""

from __future__ import annotations

import bisect
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .per_image import check_latent
from .robust import CorruptSampleError, checked_label

FORMAT_NAME = "dfm-packed-latents"
INDEX_NAME = "index.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, count), ...] covering range(num_items) in shards of `shard_size` items."""
    if shard_size <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    return [(start, min(shard_size, num_items - start)) for start in range(0, num_items, shard_size)]


def is_packed(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_NAME))


class ShardWriter:
    """Fill one shard row by row in a temporary .npy, then publish it atomically with `close()`.

    Rows go in with ordinary file writes, into space reserved when the shard is opened
    (posix_fallocate): a full disk or quota is then an OSError here, at once. (Rows written through
    a memory map of a sparse file are backed only when written; on a full disk the kernel answers
    with SIGBUS, which kills the process without a message.)"""

    def __init__(self, folder: str, shard: int, count: int, item_shape, dtype=np.float32):
        self.path = os.path.join(folder, shard_name(shard))
        self._tmp = os.path.join(folder, f".tmp-{os.getpid()}-{shard_name(shard)}")
        dtype = np.dtype(dtype)
        self._row_bytes = dtype.itemsize * int(np.prod(item_shape))
        self._file = open(self._tmp, "wb")
        try:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                      "shape": (count, *(int(v) for v in item_shape))}
            np.lib.format.write_array_header_1_0(self._file, header)
            self._file.flush()
            self._data_start = self._file.tell()
            size = self._data_start + count * self._row_bytes
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file.fileno(), 0, size)
            else:
                self._file.truncate(size)
        except BaseException:
            self.abort()
            raise
        self._written = np.zeros(count, dtype=bool)
        self._dtype = dtype

    def write(self, rows: np.ndarray, offsets) -> None:
        rows = np.ascontiguousarray(rows, dtype=self._dtype)
        for row, offset in zip(rows, np.asarray(offsets)):
            self._file.seek(self._data_start + int(offset) * self._row_bytes)
            self._file.write(row.tobytes())
            self._written[offset] = True

    def close(self) -> None:
        if not self._written.all():
            raise RuntimeError(f"{self.path}: {int((~self._written).sum())} rows were never written")
        try:
            self._file.close()  # flushes: a late write error surfaces here, before the rename
        except BaseException:
            self.abort()
            raise
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the buffered rows could not be written: the file goes anyway
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def shard_is_complete(folder: str, shard: int, count: int, item_shape=None) -> bool:
    """True when the shard file exists with `count` rows (and `item_shape` items, if given)."""
    path = os.path.join(folder, shard_name(shard))
    if not os.path.isfile(path):
        return False
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return False
    if item_shape is not None:
        return arr.shape == (count, *item_shape)
    return arr.ndim == 4 and arr.shape[0] == count


def _read_at(file, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from byte `offset` of `file` (no shared file position: safe across fork);
    returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(buffer):
        if hasattr(os, "preadv"):
            n = os.preadv(file.fileno(), [buffer[done:]], offset + done)
        else:  # no positioned reads (Windows): each process opens its own files, see PackedLatentDataset._file
            file.seek(offset + done)
            n = file.readinto(buffer[done:])
        if not n:
            break
        done += n
    return done


class PackedLatentDataset(Dataset):
    """Packed moments; item = (float32 (8, h, w) = mean || std, label). Shards are opened lazily in
    each process (DataLoader workers included) and read row by row with positioned reads; open
    files are never pickled or shared with a forked child."""

    kind = "latents"

    def __init__(self, path: str):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, INDEX_NAME)
        try:
            with open(index_path) as f:
                index = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{self.path!r} has no {INDEX_NAME}: not a packed latent dataset "
                             "(or its encode did not finish)") from None
        if index.get("format") != FORMAT_NAME:
            raise ValueError(f"{index_path!r} is not a {FORMAT_NAME} index")
        self.index = index
        self.labels = np.load(os.path.join(self.path, "labels.npy"), allow_pickle=False)
        self.classes = index.get("classes")
        self.num_classes = int(index["num_classes"])
        self.item_shape = tuple(index["item_shape"])
        self._shards = index["shards"]
        self._starts = [s["start"] for s in self._shards]
        self._row_bytes = 4 * int(np.prod(self.item_shape))
        self._files: dict[int, tuple] = {}  # shard -> (open file, byte offset of row 0)
        self._pid = os.getpid()
        if len(self.labels) != index["num_items"] or index["num_items"] == 0:
            raise ValueError(f"{self.path!r}: labels.npy has {len(self.labels)} entries, "
                             f"index.json says {index['num_items']}")

    def _file(self, shard: int) -> tuple:
        """(open shard file, offset of its first row); ValueError(reason) when the file is missing or
        does not match index.json. Opened once per process: a forked worker opens its own."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        entry = self._files.get(shard)
        if entry is None:
            info = self._shards[shard]
            try:
                f = open(os.path.join(self.path, info["file"]), "rb", buffering=0)
            except FileNotFoundError:
                raise ValueError("the shard file is missing") from None
            try:
                entry = (f, self._check_header(f, info["count"]))
            except BaseException:
                f.close()
                raise
            if hasattr(os, "posix_fadvise"):  # no readahead: rows are read in random order
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            self._files[shard] = entry
        return entry

    def _check_header(self, f, count: int) -> int:
        """Offset of row 0 after checking the .npy header and the file size against index.json."""
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"the shard is not a readable .npy array ({type(e).__name__}: {e}); "
                             "truncated or damaged?") from None
        expected = (count, *self.item_shape)
        if tuple(shape) != expected or dtype != np.float32 or fortran:
            order = ", Fortran order" if fortran else ""
            raise ValueError(f"the shard holds {dtype} {tuple(shape)}{order}, index.json says float32 {expected}")
        start = f.tell()
        size = os.fstat(f.fileno()).st_size
        if size < start + count * self._row_bytes:
            raise ValueError(f"the shard is not a readable .npy array (it holds {size} bytes, its header needs "
                             f"{start + count * self._row_bytes}); truncated or damaged?")
        return start

    def __len__(self) -> int:
        return len(self.labels)

    def _locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def sample_path(self, i: int) -> str:
        """`<folder>/shard-XXXXX.npy[row j]` for item `i`."""
        shard, row = self._locate(i)
        return f"{os.path.join(self.path, self._shards[shard]['file'])}[row {row}]"

    def __getitem__(self, i: int):
        shard, row = self._locate(i)
        try:
            f, start = self._file(shard)
            x = np.empty(self.item_shape, dtype=np.float32)
            if _read_at(f, memoryview(x).cast("B"), start + row * self._row_bytes) < self._row_bytes:
                raise ValueError("the shard ended before this row (truncated since it was opened?)")
            x = check_latent(x)
        except ValueError as e:
            raise CorruptSampleError(i, self.sample_path(i), str(e)) from None
        except OSError as e:
            raise CorruptSampleError(i, self.sample_path(i), f"cannot read the shard: {e}") from None
        return torch.from_numpy(x), checked_label(self, i, f"labels.npy; index.json says {self.num_classes} classes")

    load_item = __getitem__  # the shape is checked per shard

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __repr__(self) -> str:
        return (f"PackedLatentDataset({self.path!r}, {len(self)} items, shape {self.item_shape}, "
                f"{self.num_classes} classes)")
