"""The reference-statistics file written by ``python -m evaluation.ref_stats`` (an ``.npz``).

Keys (every one optional except ``meta_json``; which ones are present says what can be scored):
``meta_json``, and the arrays each registered metric stores of a reference set (its ``stores``,
``evaluation.scores``; the table is in docs/EVALUATION.md), for example ``mu``/``sigma`` (Inception
pool_3 mean and covariance, ADM's names), ``mu_s``/``sigma_s`` (spatial), ``mu_dinov2``/``sigma_dinov2``
(FDD), ``swd_histograms`` (SWD's summary) and ``swd_images`` (reference images SWD can use instead).

``meta_json``::

    {"format": "dfm-reference-statistics", "version": 1, "source": "<dataset path>",
     "num_images": N, "resolution": [H, W],
     "inception": {"file": "weights-inception-2015-12-05-6726825d.pth", "sha256": "...", "bytes": n} | null,
     "dinov2": {"model": "vit_large_patch14_dinov2.lvd142m", "image_size": 224,
                "file": "...", "sha256": "...", "bytes": n} | null,
     "<metric>": {...} | null}

one object per network the stored metrics used (the weights file's identity), and one per metric
that declares ``meta_fields`` (SWD: ``{"num_images": M, "seed": s, "swd_seed": ..., "bins": ...}``).
Files written before metrics were a registry (only Inception, DINOv2 and ``swd_images``) are the
same format, version 1, and keep working.

Because the Inception keys carry ADM's names, the file also works wherever an ADM reference
batch's stored statistics are read. :func:`check_compatible` rejects statistics of another
resolution or of other feature-extractor weights (compared by SHA-256).

:func:`load_statistics` trusts nothing in the file: the arrays are read without unpickling (an
object array is refused), ``meta_json`` must be a JSON object with the fields and types above,
and each metric checks its arrays (``Metric.check_file``: every mean/covariance real and finite,
every sigma a covariance matrix, symmetric and positive semi-definite within
``evaluation.npz.COVARIANCE_RTOL``; images and histograms of the right shape); anything else is one
line naming the file and the array or field.
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

from .features import networks_of
from .scores import metric_classes
from .npz import InputError, read_arrays

STATS_FORMAT = "dfm-reference-statistics"
STATS_VERSION = 1
_HASHES: Dict[Tuple[str, int, float], str] = {}
_IDENTITY = {"file": str, "sha256": str, "bytes": int}
# the meta_json fields of each network that holds an object (or null), and the types of the object's fields
_NETWORK_META = {"inception": _IDENTITY, "dinov2": {"model": str, "image_size": int, **_IDENTITY}}
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
        """The metrics whose reference data this file holds, in registry order."""
        return tuple(cls.registered_name for cls in metric_classes() if cls.held_by(self.arrays))


def array_keys() -> Tuple[str, ...]:
    """Every array a statistics file may hold besides ``meta_json``: what the registered metrics store."""
    return tuple(dict.fromkeys(k for cls in metric_classes() for k in cls.stores))


def _meta_objects() -> Dict[str, Tuple[Dict[str, type], Dict[str, type]]]:
    """meta_json key -> (required fields, optional fields) of the object it holds (or null)."""
    out = {name: (fields, {}) for name, fields in _NETWORK_META.items()}
    out.update({cls.registered_name: (cls.meta_fields, cls.meta_optional) for cls in metric_classes()
                if cls.meta_fields or cls.meta_optional})
    return out


def save_statistics(stats: ReferenceStatistics, path: str) -> None:
    """Write ``stats`` as an ``.npz`` (``np.load`` reads it) atomically, ``meta_json`` added."""
    unknown = set(stats.arrays) - set(array_keys())
    if unknown:
        raise ValueError(f"unknown statistics keys {sorted(unknown)}; allowed: {list(array_keys())}")
    meta = {"format": STATS_FORMAT, "version": STATS_VERSION, **stats.meta}
    members = {"meta_json": np.array(json.dumps(meta, sort_keys=True)), **stats.arrays}
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(members):
            npy = io.BytesIO()
            np.save(npy, np.asarray(members[key]), allow_pickle=False)
            # A fixed timestamp (np.savez stores the current time) keeps reruns byte-identical. Counts
            # (int64: SWD's histograms, mostly empty tail bins) are deflated, ~13x smaller; the rest is stored.
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            counts = np.asarray(members[key]).dtype == np.int64
            info.compress_type = zipfile.ZIP_DEFLATED if counts else zipfile.ZIP_STORED
            zf.writestr(info, npy.getvalue())


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
    arrays = read_arrays(path, array_keys(), where)
    for cls in metric_classes():
        cls.check_file(arrays, meta, where)
    return ReferenceStatistics(arrays, meta, path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_meta(raw: np.ndarray, where: str) -> Dict[str, object]:
    """The checked ``meta_json`` of a statistics file: a JSON object of the format, version and
    field types :func:`save_statistics` writes; anything else is one :class:`InputError`."""
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise InputError(f"{where}: meta_json is a {raw.dtype} array of shape {raw.shape}, expected a string "
                         f"holding a JSON object; {RECREATE}")
    from utils.records import RecordError, parse_json

    try:
        meta = parse_json(raw.item(), f"{where}: meta_json")
    except RecordError as exc:
        raise InputError(f"{exc}; {RECREATE}") from None
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
    def typed(value, t) -> bool:
        return _is_int(value) if t is int else isinstance(value, t)

    for key, (fields, optional) in _meta_objects().items():
        value = meta.get(key)
        if value is not None and not (isinstance(value, dict) and
                                      all(typed(value.get(f), t) for f, t in fields.items())):
            raise wrong(key, "null or {" + ", ".join(f'"{f}": {t.__name__}' for f, t in fields.items()) + "}")
        bad = [f for f, t in optional.items() if value is not None and f in value and not typed(value[f], t)]
        if bad:
            raise wrong(key, "an object whose optional fields are " +
                        ", ".join(f'"{f}": {t.__name__}' for f, t in optional.items()))
    return meta


def check_compatible(stats: ReferenceStatistics, metrics: Iterable, resolution: Tuple[int, int],
                     inception_weights: Optional[str] = None, dinov2_model: Optional[str] = None,
                     dinov2_weights: Optional[str] = None) -> None:
    """Raise one :class:`InputError` unless ``stats`` can score ``metrics`` on images of ``resolution``.

    ``metrics``: names or ``evaluation.metric_base.Metric`` objects. ``inception_weights`` /
    ``dinov2_weights`` are the local weights files that will compute the sample features of the
    networks the metrics need; they must be the files the statistics were computed with (same
    SHA-256), and for DINOv2 the same timm model name. Metrics that need no reference (IS) pass.
    """
    from .metric_base import METRICS

    names = [m if isinstance(m, str) else m.name for m in metrics]
    metric_classes()
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; registered: {METRICS.names()}")
    classes = [METRICS[m] for m in names]
    where = f"reference statistics {stats.path}"
    if tuple(resolution) != stats.resolution:
        raise InputError(f"{where} are of {stats.resolution[0]}x{stats.resolution[1]} images, but the samples are "
                         f"{resolution[0]}x{resolution[1]}; compute statistics of a dataset at the samples' resolution")
    never = [cls for cls in classes if cls.uses_reference and not cls.stores]
    if never:
        raise InputError(f"{where} cannot score {[c.registered_name for c in never]}: "
                         + "; ".join(c.not_storable for c in never) + "; pass a reference batch with arr_0")
    missing = [cls.registered_name for cls in classes if cls.uses_reference and not cls.held_by(stats.arrays)]
    if missing:
        raise InputError(f"{where} cannot score {missing} (it holds {list(stats.available()) or 'nothing'}); "
                         f"recompute it with python -m evaluation.ref_stats --metrics {','.join(missing)}")
    weights = {"inception": (inception_weights, None), "dinov2": (dinov2_weights, dinov2_model)}
    for name in networks_of(k for cls in classes if cls.uses_reference for k in cls.needs):
        path, model = weights[name]
        stored = stats.meta.get(name) or {}
        if path is None:
            raise InputError(f"{where}: the {name} weights file is needed to compare against these statistics")
        if model is not None and stored.get("model") != model:
            raise InputError(f"{where} were computed with {name} model {stored.get('model')}, not {model}")
        ident = weights_identity(path)
        if stored.get("sha256") != ident["sha256"]:
            raise InputError(f"{where} were computed with {name} weights {stored.get('file')} "
                             f"(sha256 {str(stored.get('sha256'))[:12]}...), but {path} has sha256 "
                             f"{ident['sha256'][:12]}...; use the same weights file")
