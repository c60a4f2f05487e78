"""The reference-statistics file written by ``python -m evaluation.ref_stats`` (an ``.npz``).

Keys (every one optional except ``meta_json``; which ones are present says what can be scored):

==================  ===========================  ===============================================
key                 array                        meaning
==================  ===========================  ===============================================
``mu``, ``sigma``   float64 (2048,), (2048,2048)  Inception pool_3 mean / covariance (ADM names)
``mu_s``,           float64 (2023,), (2023,2023)  Inception spatial (mixed_6/conv[..., :7]) stats
``sigma_s``
``mu_dinov2``,      float64 (D,), (D, D)          DINOv2 CLS-token mean / covariance (FDD;
``sigma_dinov2``                                  D = 1024 for ViT-L/14)
``swd_images``      uint8 (M, H, W, 3)            reference images for SWD (a seeded subset)
``meta_json``       0-d str (JSON)                see below
==================  ===========================  ===============================================

``meta_json``::

    {"format": "dfm-reference-statistics", "version": 1, "source": "<dataset path>",
     "num_images": N, "resolution": [H, W],
     "inception": {"file": "weights-inception-2015-12-05-6726825d.pth", "sha256": "...", "bytes": n} | null,
     "dinov2": {"model": "vit_large_patch14_dinov2.lvd142m", "image_size": 224,
                "file": "...", "sha256": "...", "bytes": n} | null,
     "swd": {"num_images": M, "seed": s} | null}

Because the Inception keys carry ADM's names, the file also works wherever an ADM reference
batch's stored statistics are read. :func:`check_compatible` rejects statistics of another
resolution or of other feature-extractor weights (compared by SHA-256).

:func:`load_statistics` trusts nothing in the file: the arrays are read without unpickling (an
object array is refused), ``meta_json`` must be a JSON object with the fields and types above,
every mean/covariance real and finite, and every sigma a covariance matrix (symmetric and positive
semi-definite, within ``evaluation.npz.COVARIANCE_RTOL``); anything else is one line naming the
file and the array or field.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from utils.atomic import atomic_write
from utils.checksum import file_sha256

from .npz import InputError, read_arrays, require_statistics

STATS_FORMAT = "dfm-reference-statistics"
STATS_VERSION = 1
METRICS = ("fid", "sfid", "fdd", "swd")
ARRAY_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "mu_dinov2", "sigma_dinov2", "swd_images")
_NEEDS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s"), "fdd": ("mu_dinov2", "sigma_dinov2"),
          "swd": ("swd_images",)}
_HASHES: Dict[Tuple[str, int, float], str] = {}
_IDENTITY = {"file": str, "sha256": str, "bytes": int}
# the meta_json fields that hold an object (or null), and the types of the object's fields
_META_OBJECTS = {"inception": _IDENTITY, "dinov2": {"model": str, "image_size": int, **_IDENTITY},
                 "swd": {"num_images": int, "seed": int}}
RECREATE = "recreate it with python -m evaluation.ref_stats"


def weights_identity(path: str) -> Dict[str, object]:
    """``{"file", "sha256", "bytes"}`` of a weights file (the hash is cached per path/size/mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return {"file": os.path.basename(path), "sha256": _HASHES[key], "bytes": st.st_size}


@dataclass
class ReferenceStatistics:
    """The arrays of a statistics file (only those present) and its metadata."""

    arrays: Dict[str, np.ndarray]
    meta: Dict[str, object] = field(default_factory=dict)
    path: str = ""

    @property
    def resolution(self) -> Tuple[int, int]:
        return tuple(self.meta["resolution"])  # type: ignore[return-value]

    def available(self) -> Tuple[str, ...]:
        """The metrics this file can score: a subset of ``fid, sfid, fdd, swd``."""
        return tuple(m for m in METRICS if all(k in self.arrays for k in _NEEDS[m]))


def save_statistics(stats: ReferenceStatistics, path: str) -> None:
    """Write ``stats`` as an uncompressed ``.npz`` (``np.load`` reads it) atomically, ``meta_json`` added."""
    unknown = set(stats.arrays) - set(ARRAY_KEYS)
    if unknown:
        raise ValueError(f"unknown statistics keys {sorted(unknown)}; allowed: {list(ARRAY_KEYS)}")
    meta = {"format": STATS_FORMAT, "version": STATS_VERSION, **stats.meta}
    members = {"meta_json": np.array(json.dumps(meta, sort_keys=True)), **stats.arrays}
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(members):
            npy = io.BytesIO()
            np.save(npy, np.asarray(members[key]), allow_pickle=False)
            # A fixed timestamp (np.savez stores the current time) keeps reruns byte-identical.
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), npy.getvalue())


def is_statistics_file(path: str) -> bool:
    """Whether ``path`` is an ``.npz`` holding ``meta_json`` (a file from ``evaluation.ref_stats``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "meta_json.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load_statistics(path: str) -> ReferenceStatistics:
    """Read a statistics file; one :class:`InputError` naming the file for anything malformed."""
    if not os.path.isfile(path):
        raise InputError(f"reference statistics {path}: no such file; create it with "
                         f"python -m evaluation.ref_stats IMAGES_DIR --out {path}")
    if not is_statistics_file(path):
        raise InputError(f"reference statistics {path}: not a file written by evaluation.ref_stats (no meta_json)")
    where = f"reference statistics {path}"
    meta = _read_meta(read_arrays(path, ("meta_json",), where)["meta_json"], where)
    arrays = read_arrays(path, ARRAY_KEYS, where)
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s"), ("mu_dinov2", "sigma_dinov2")):
        if (mu in arrays) != (sigma in arrays):
            raise InputError(f"{where}: has only one of {mu}/{sigma}")
        if mu in arrays and (arrays[mu].ndim != 1 or arrays[sigma].shape != arrays[mu].shape * 2):
            raise InputError(f"{where}: {mu}/{sigma} have shapes "
                             f"{arrays[mu].shape}/{arrays[sigma].shape}, expected (D,)/(D, D)")
        if mu in arrays:
            require_statistics(where, mu, arrays[mu], sigma, arrays[sigma])
    if "swd_images" in arrays:
        images = arrays["swd_images"]
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:3]) != tuple(meta["resolution"]):
            raise InputError(f"{where}: swd_images {images.dtype} {images.shape} do not "
                             f"match resolution {meta['resolution']}")
    return ReferenceStatistics(arrays, meta, path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_meta(raw: np.ndarray, where: str) -> Dict[str, object]:
    """The checked ``meta_json`` of a statistics file: a JSON object of the format, version and
    field types :func:`save_statistics` writes; anything else is one :class:`InputError`."""
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise InputError(f"{where}: meta_json is a {raw.dtype} array of shape {raw.shape}, expected a string "
                         f"holding a JSON object; {RECREATE}")
    try:
        meta = json.loads(raw.item())
    except ValueError as exc:
        raise InputError(f"{where}: meta_json is not JSON ({exc}); {RECREATE}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{where}: meta_json holds a JSON {type(meta).__name__}, expected an object; {RECREATE}")
    if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
        raise InputError(f"{where}: format {meta.get('format')} v{meta.get('version')}, "
                         f"expected {STATS_FORMAT} v{STATS_VERSION}; {RECREATE}")

    def wrong(key: str, expected: str) -> InputError:
        return InputError(f"{where}: meta_json field {key} is {json.dumps(meta.get(key))}, expected {expected}; "
                          f"{RECREATE}")

    resolution = meta.get("resolution")
    if not (isinstance(resolution, list) and len(resolution) == 2 and all(_is_int(v) and v > 0 for v in resolution)):
        raise wrong("resolution", "[height, width] (positive integers)")
    if not (_is_int(meta.get("num_images")) and meta["num_images"] >= 0):
        raise wrong("num_images", "an integer >= 0")
    if not isinstance(meta.get("source", ""), str):
        raise wrong("source", "a string")
    for key, fields in _META_OBJECTS.items():
        value = meta.get(key)
        if value is not None and not (isinstance(value, dict) and all(
                _is_int(value.get(f)) if t is int else isinstance(value.get(f), t) for f, t in fields.items())):
            raise wrong(key, "null or {" + ", ".join(f'"{f}": {t.__name__}' for f, t in fields.items()) + "}")
    return meta


def check_compatible(stats: ReferenceStatistics, metrics: Iterable[str], resolution: Tuple[int, int],
                     inception_weights: Optional[str] = None, dinov2_model: Optional[str] = None,
                     dinov2_weights: Optional[str] = None) -> None:
    """Raise one :class:`InputError` unless ``stats`` can score ``metrics`` on images of ``resolution``.

    ``inception_weights`` / ``dinov2_weights`` are the local weights files that will compute
    the sample features (needed for fid/sfid and fdd respectively); they must be the files
    the statistics were computed with (same SHA-256), and for fdd the same timm model name.
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; allowed: {list(METRICS)}")
    where = f"reference statistics {stats.path}"
    if tuple(resolution) != stats.resolution:
        raise InputError(f"{where} are of {stats.resolution[0]}x{stats.resolution[1]} images, but the samples are "
                         f"{resolution[0]}x{resolution[1]}; compute statistics of a dataset at the samples' resolution")
    missing = [m for m in metrics if m not in stats.available()]
    if missing:
        raise InputError(f"{where} cannot score {missing} (it holds {list(stats.available()) or 'nothing'}); "
                         f"recompute it with evaluation.ref_stats (--swd-images for swd)")
    checks = []
    if {"fid", "sfid"} & set(metrics):
        checks.append(("inception", inception_weights, None))
    if "fdd" in metrics:
        checks.append(("dinov2", dinov2_weights, dinov2_model))
    for name, weights, model in checks:
        stored = stats.meta.get(name) or {}
        if weights is None:
            raise InputError(f"{where}: the {name} weights file is needed to compare against these statistics")
        if model is not None and stored.get("model") != model:
            raise InputError(f"{where} were computed with {name} model {stored.get('model')}, not {model}")
        ident = weights_identity(weights)
        if stored.get("sha256") != ident["sha256"]:
            raise InputError(f"{where} were computed with {name} weights {stored.get('file')} "
                             f"(sha256 {str(stored.get('sha256'))[:12]}...), but {weights} has sha256 "
                             f"{ident['sha256'][:12]}...; use the same weights file")
