"""Sample files on disk: atomic PNG writes, PNG checks for resuming, and the ADM .npz archive."""

from __future__ import annotations

import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from utils.atomic import TMP_PREFIX, atomic_write
from utils.regular_files import open_regular


def png_path(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / f"{index:06d}.png"


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """image: (H, W, 3) uint8. Written to a temporary name, then renamed, so a file with the
    final name is always complete (a killed run leaves only `.tmp-*` files, which resume ignores)."""
    with atomic_write(path, "wb") as f:
        # compress_level=1: lossless like any level, several times faster to write than the default.
        Image.fromarray(image, mode="RGB").save(f, format="PNG", compress_level=1)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_complete_png(path: Path, size: int) -> bool:
    """True if `path` is an 8-bit RGB PNG of size x size whose chunks are all intact: the signature,
    IHDR first, at least one IDAT, every chunk's CRC-32 right, IEND last and nothing after it.

    Writes are atomic (temporary name, then rename), so this only has to catch files damaged
    later (truncated, zeroed, overwritten, bit flips): any such change breaks a chunk's CRC or the
    chunk structure. Checking the CRCs reads the file once and costs about 2 % of decoding it
    (docs/PERFORMANCE.md, "Cost as work grows")."""
    limit = 2 * 3 * size * size + (1 << 16)  # far more than any PNG of these pixels; a huge file is not one
    try:  # never through a link, never blocking on a FIFO planted under a sample's name
        with open_regular(path, "rb") as f:
            data = memoryview(f.read(limit + 1))
    except OSError:  # missing, or not a regular file of its own: made again (the write replaces the name)
        return False
    if len(data) > limit:
        return False
    if data[:8] != PNG_SIGNATURE:
        return False
    pos, seen_idat = 8, False
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return False
        if pos == 8:  # IHDR: width, height, bit depth, colour type (2 = RGB), compression, filter, interlace
            if kind != b"IHDR" or length != 13:
                return False
            width, height, depth, colour = struct.unpack_from(">IIBB", data, pos + 8)
            if (width, height, depth, colour) != (size, size, 8, 2):
                return False
        seen_idat |= kind == b"IDAT"
        if kind == b"IEND":
            return seen_idat and end == len(data)
        pos = end
    return False


def missing_pngs(run_dir: Path, indices, size: int, threads: int = 8) -> list[int]:
    """The indices, in order, without a complete `{i:06d}.png` (`is_complete_png`), checked on
    `threads` threads: mostly waiting for the disk (or a network file system), and CRCs of large
    buffers release the GIL, so more threads than cores pay off, as in `write_npz_from_pngs`."""
    indices = list(indices)
    blocks = [indices[k:k + 256] for k in range(0, len(indices), 256)]  # one future per block: memory stays flat
    with ThreadPoolExecutor(threads) as pool:
        found = pool.map(lambda block: [i for i in block if not is_complete_png(png_path(run_dir, i), size)], blocks)
        return [i for part in found for i in part]


def remove_stale_temporaries(run_dir: Path) -> None:
    for tmp in Path(run_dir).glob(f"{TMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)


def npz_is_complete(path: Path, shape: Sequence[int]) -> bool:
    """True if `path` is a readable .npz whose arr_0 is uint8 with exactly `shape`."""
    try:
        with open_regular(path, "rb") as raw, zipfile.ZipFile(raw) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                      else np.lib.format.read_array_header_2_0(f))
            info = zf.getinfo("arr_0.npy")
        got_shape, fortran, dtype = header
        return (tuple(got_shape) == tuple(shape) and not fortran and dtype == np.uint8
                and info.file_size >= int(np.prod(shape)))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def write_npz_from_pngs(npz_path: Path, run_dir: Path, num_samples: int, size: int,
                        labels: np.ndarray | None = None, num_threads: int = 8) -> None:
    """Assemble `{i:06d}.png`, i < num_samples, into an .npz in index order.

    arr_0: uint8 (N, size, size, 3) as the ADM evaluation suite reads it; arr_1 (if labels are
    given): int64 (N,) class labels, as in ADM's labelled reference batches. The archive is
    streamed image by image (memory stays flat at 50K x 512^2) into a temporary file, then
    renamed; it is a plain uncompressed zip that `np.load` reads.
    """
    shape = (num_samples, size, size, 3)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": shape}
    chunk = 256
    with atomic_write(npz_path, "wb") as out, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f, ThreadPoolExecutor(num_threads) as pool:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, num_samples, chunk):
                paths = [png_path(run_dir, i) for i in range(start, min(start + chunk, num_samples))]
                for path, image in zip(paths, pool.map(read_png, paths)):
                    if image.shape != shape[1:]:
                        raise ValueError(f"{path} has shape {image.shape}, expected {shape[1:]}")
                    f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        if labels is not None:
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
