"""Reading and validating ADM-style ``.npz`` image batches (SPEC §7).

A batch holds ``arr_0``: uint8 ``(N, H, W, 3)`` (NHWC, values 0..255). ADM reference batches
(``VIRTUAL_imagenet256_labeled.npz``) also hold precomputed Inception statistics: ``mu``,
``sigma`` (pool_3, 2048-d) and ``mu_s``, ``sigma_s`` (spatial, 2023-d).

``arr_0`` is read in batches straight from the zip member, so a 50k x 256 x 256 x 3 batch
(9.8 GB) never has to sit in memory at once. Every problem a user can cause ends in one
:class:`InputError` (a ``ValueError``) that names the file and says what to change.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * 7
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# A stored covariance may be asymmetric, or have negative eigenvalues, by this much relative to
# its largest entry / its trace (float rounding); anything beyond is not a covariance.
COVARIANCE_RTOL = 1e-6


class EvaluationError(Exception):
    """Base class of the errors the CLI reports as one line, without a traceback."""


class InputError(EvaluationError, ValueError):
    """A problem with a user-provided input file or option."""


class NonFiniteStatistics(InputError):
    """A mean or covariance holding NaN or inf: no Fréchet distance of it exists."""


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` of an exception from a library."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@dataclass(frozen=True)
class ImageBatchInfo:
    """What the header of ``arr_0`` says, checked."""

    path: str
    shape: Tuple[int, int, int, int]  # (N, H, W, 3)

    @property
    def num_images(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> Tuple[int, int]:
        return self.shape[1], self.shape[2]


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path, "r")
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(
            f"{path}: not a readable .npz archive ({exc}); save the images with "
            f"np.savez(path, arr_0=images)") from None


def _read_header(fp, path: str, key: str):
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:  # 2.0 and 3.0 share the 4-byte header length
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    except ValueError as exc:
        raise InputError(f"{path}: '{key}' is not a valid .npy array ({exc})") from None
    return tuple(int(s) for s in shape), bool(fortran), dtype


def validate_image_shape(shape: Tuple[int, ...], dtype: np.dtype, path: str) -> None:
    """Raise an :class:`InputError` unless ``arr_0`` is uint8 ``(N, H, W, 3)``."""
    expected = "expected arr_0 as uint8 [N, H, W, 3] (NHWC, values 0..255)"
    if len(shape) != 4:
        raise InputError(f"{path}: arr_0 has shape {tuple(shape)} (rank {len(shape)}); {expected}")
    n, h, w, c = shape
    if c != 3:
        if shape[1] == 3:
            hint = "it looks channel-first (NCHW); transpose with images.transpose(0, 2, 3, 1)"
        elif c in (1, 4):
            hint = "grayscale/RGBA images must be converted to RGB"
        else:
            hint = "the last axis must hold the 3 RGB channels"
        raise InputError(f"{path}: arr_0 has shape {tuple(shape)} with {c} channels; {expected}; {hint}")
    if dtype != np.uint8:
        raise InputError(
            f"{path}: arr_0 has dtype {dtype}; {expected}; convert floats in [-1, 1] with "
            f"np.clip(np.round(127.5 * x + 127.5), 0, 255).astype(np.uint8)")
    if n < 1 or h < 1 or w < 1:
        raise InputError(f"{path}: arr_0 has shape {tuple(shape)} and holds no image; {expected}")


class NpzImageBatch:
    """Streaming reader of ``arr_0`` in an ADM ``.npz`` file.

    ``NpzImageBatch(path)`` checks the file and the header of ``arr_0`` at once (no pixel is
    read); :meth:`iter_batches` then yields uint8 ``(B, H, W, 3)`` arrays in file order.
    """

    def __init__(self, path: str):
        self.path = str(path)
        with _open_zip(self.path) as zf:
            names = zf.namelist()
            if "arr_0.npy" not in names:
                keys = sorted(n[:-4] for n in names if n.endswith(".npy"))
                raise InputError(
                    f"{self.path}: no 'arr_0' array (found {keys or 'no arrays'}); expected an ADM "
                    f"batch written with np.savez(path, arr_0=images) where images is uint8 [N, H, W, 3]")
            with zf.open("arr_0.npy") as fp:
                shape, self._fortran, dtype = _read_header(fp, self.path, "arr_0")
        validate_image_shape(shape, dtype, self.path)
        self.info = ImageBatchInfo(self.path, shape)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.info.num_images

    def iter_batches(self, batch_size: int, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """Yield uint8 ``(B, H, W, 3)`` batches of the first ``limit`` images (all if None)."""
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        total = len(self) if limit is None else min(int(limit), len(self))
        _, h, w, c = self.info.shape
        image_bytes = h * w * c
        with zipfile.ZipFile(self.path, "r") as zf:
            if self._fortran:  # rare; column-major data cannot be streamed row by row
                with zf.open("arr_0.npy") as fp:
                    arr = np.lib.format.read_array(fp)
                for start in range(0, total, batch_size):
                    yield np.ascontiguousarray(arr[start:min(start + batch_size, total)])
                return
            with zf.open("arr_0.npy") as fp:
                _read_header(fp, self.path, "arr_0")
                for start in range(0, total, batch_size):
                    count = min(batch_size, total - start)
                    data = _read_exactly(fp, count * image_bytes, self.path)
                    yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, h, w, c)


def _read_exactly(fp, size: int, path: str) -> bytes:
    chunks, remaining = [], size
    while remaining > 0:
        chunk = fp.read(remaining)
        if not chunk:
            raise InputError(f"{path}: arr_0 is truncated (the file ended early); regenerate it")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def require_finite(where: str, **arrays) -> None:
    """One :class:`InputError` naming ``where`` when a mean or covariance holds NaN or inf.

    Checked wherever statistics are read or compared: scipy's ``sqrtm`` never returns on a
    matrix with a NaN (and ignores Ctrl-C), and no distance of such statistics means anything.
    """
    bad = []
    for name, array in arrays.items():
        finite = np.isfinite(np.asarray(array, dtype=np.float64))
        if not finite.all():
            bad.append(f"{name} ({finite.size - int(finite.sum())} of {finite.size} values)")
    if bad:
        raise NonFiniteStatistics(f"{where}: non-finite values (NaN or inf) in {', '.join(bad)}; a Fréchet distance "
                                  "of them is undefined (recompute the statistics, or check the feature weights)")


def read_arrays(path: str, keys: Iterable[str], where: str) -> Dict[str, np.ndarray]:
    """The arrays ``keys`` (those present) of the ``.npz`` ``path``, read with ``allow_pickle=False``.

    An object array (loading it would unpickle, i.e. run, whatever the file holds) or a member
    that cannot be read is one :class:`InputError` naming ``where`` and the array.
    """
    arrays: Dict[str, np.ndarray] = {}
    key = None
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in keys:
                if key in data.files:
                    arrays[key] = np.asarray(data[key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        what = f"the array {key}" if key else "the file"
        if "allow_pickle" in str(exc):
            raise InputError(f"{where}: {key} is an object array (pickled Python objects), which is never "
                             "loaded: statistics files hold plain arrays only") from None
        raise InputError(f"{where}: cannot read {what} ({first_line(exc)}); the file is damaged") from None
    return arrays


def require_statistics(where: str, mu_name: str, mu: np.ndarray, sigma_name: str, sigma: np.ndarray) -> None:
    """One :class:`InputError` naming ``where`` and the array unless ``mu`` and ``sigma`` hold real,
    finite numbers and ``sigma`` is a covariance matrix: symmetric and positive semi-definite, both
    within :data:`COVARIANCE_RTOL` (of its largest entry, of its trace). Shapes are the caller's."""
    for name, array in ((mu_name, mu), (sigma_name, sigma)):
        if np.asarray(array).dtype.kind not in "iuf":
            raise InputError(f"{where}: {name} has dtype {np.asarray(array).dtype}, expected real numbers (float64)")
    require_finite(where, **{mu_name: mu, sigma_name: sigma})
    sigma = np.asarray(sigma, dtype=np.float64)
    asymmetry = float(np.abs(sigma - sigma.T).max(initial=0.0))
    if asymmetry > COVARIANCE_RTOL * float(np.abs(sigma).max(initial=0.0)):
        problem = f"it is not symmetric (|{sigma_name} - {sigma_name}^T| up to {asymmetry:.4g})"
    else:
        tolerance = COVARIANCE_RTOL * abs(float(np.trace(sigma))) + np.finfo(np.float64).tiny
        try:  # succeeds iff every eigenvalue is above -tolerance (and cheaper than eigvalsh)
            np.linalg.cholesky(sigma + tolerance * np.eye(len(sigma)))
            return
        except np.linalg.LinAlgError:
            problem = (f"it has a negative eigenvalue ({float(np.linalg.eigvalsh(sigma)[0]):.4g}; a covariance has "
                       f"none below -{COVARIANCE_RTOL:g} x its trace)")
    raise InputError(f"{where}: {sigma_name} is not a covariance matrix: {problem}; recompute the statistics")


def read_reference_statistics(path: str) -> Optional[Dict[str, np.ndarray]]:
    """The stored ``mu, sigma, mu_s, sigma_s`` of an ADM reference batch, or None.

    ADM uses the stored statistics whenever ``mu`` is present; a file with only some of the
    four keys, or with the wrong dimensions, is an error rather than a silent fallback.
    """
    with _open_zip(str(path)) as zf:
        present = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    if "mu" not in present:
        return None
    missing = [k for k in STAT_KEYS if k not in present]
    if missing:
        raise InputError(f"{path}: has stored 'mu' but lacks {missing}; an ADM reference batch stores "
                         f"all of {list(STAT_KEYS)} (or none, then they are computed from arr_0)")
    stats = read_arrays(str(path), STAT_KEYS, f"{path}: stored statistics")
    for key, dim in (("mu", POOL_DIM), ("mu_s", SPATIAL_DIM)):
        sigma_key = key.replace("mu", "sigma")
        if stats[key].shape != (dim,) or stats[sigma_key].shape != (dim, dim):
            raise InputError(
                f"{path}: stored {key}/{sigma_key} have shapes {stats[key].shape}/{stats[sigma_key].shape}, "
                f"expected ({dim},)/({dim}, {dim}) (Inception pool_3 = 2048, mixed_6/conv[..., :7] = 2023)")
        require_statistics(f"{path}: stored statistics", key, stats[key], sigma_key, stats[sigma_key])
    return {k: v.astype(np.float64) for k, v in stats.items()}


def check_same_resolution(reference: ImageBatchInfo, samples: ImageBatchInfo, allow_mismatch: bool = False) -> None:
    """Raise an :class:`InputError` when the two batches hold images of different sizes.

    Inception resizes everything to 299x299, so a mismatch would silently compare, say,
    512-px samples with a 256-px reference; ``allow_mismatch`` is the explicit opt-in.
    """
    if reference.resolution != samples.resolution and not allow_mismatch:
        (rh, rw), (sh, sw) = reference.resolution, samples.resolution
        raise InputError(
            f"reference batch {reference.path} is {rh}x{rw} but samples {samples.path} are {sh}x{sw}; "
            f"use the reference batch of the samples' resolution (e.g. VIRTUAL_imagenet{sh}_labeled.npz), "
            f"or pass --allow-resolution-mismatch to compare anyway")
