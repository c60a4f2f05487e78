"""Metrics as an extension point: the ``METRICS`` registry, the :class:`Metric` contract, the
accumulators that stream image sets batch by batch, and :func:`stream`, which drives them.

A metric is one class registered by name (the registered metrics live in ``evaluation.scores``).
Its constructor's keyword arguments are its parameters (``{name: kid, subsets: 50}``). It declares

- ``needs``: the feature kinds it reads (``evaluation.features.FEATURES``); the networks to load
  follow from them (``images`` alone loads none and needs no weights file);
- :meth:`Metric.accumulator`: the streaming state it keeps of one image set (running sums, raw
  rows, a bounded sample, a sketch...), merged across processes, over one or more passes;
- ``stores`` and :meth:`Metric.file_arrays` / :meth:`Metric.reference_from_file`: what a
  statistics file (``evaluation.ref_stats``) keeps of a reference set for it;
- :meth:`Metric.score`: its values from the samples' and the reference's accumulated data;
- ``columns``: the table titles, scales and digits of ``evaluation.report``, and whether higher
  is better (``evaluation.compare``).

``evaluation.evaluate``, ``evaluation.ref_stats``, ``evaluation.online`` (training-time
evaluation), ``evaluation.report``, ``evaluation.compare`` and ``evaluation.stats_file`` loop over
the registry; none lists metric names.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from utils.progress import progress_bar
from utils.registry import Registry

from .features import networks_of
from .npz import InputError

METRICS = Registry("metric")


@dataclass(frozen=True)
class Column:
    """One column of ``evaluation.report``: ``title``, the result key shown, ``scale`` applied for display,
    ``digits`` after the point, and the key of a ``± spread`` shown beside it (same scale)."""

    title: str
    key: str
    scale: float = 1.0
    digits: int = 2
    spread: Optional[str] = None

    def cell(self, result: Dict[str, object]) -> str:
        value = result.get(self.key)
        if value is None:
            return ""
        text = f"{value * self.scale:.{self.digits}f}"
        spread = result.get(self.spread) if self.spread else None
        return text if spread is None else f"{text} ± {spread * self.scale:.{self.digits}f}"


# --------------------------------------------------------------------------- accumulators
class Accumulator:
    """The streaming state of one metric on one image set; it pickles (processes exchange it).

    :func:`stream` calls, for each pass ``k < passes``: :meth:`feed` on every batch (the rows of
    images ``< limit``), then, with several processes, :meth:`merge` of every process's state into
    one (each process then holds the same merged state), then :meth:`next_pass` if another pass
    follows. :meth:`result` is the accumulated data :meth:`Metric.score` reads.
    """

    passes = 1

    def __init__(self, kinds: Sequence[str], limit: Optional[int] = None):
        self.kinds = tuple(kinds)
        self.limit = limit

    def kinds_at(self, k: int) -> Tuple[str, ...]:
        """The feature kinds pass ``k`` reads."""
        return self.kinds

    def feed(self, features: Dict[str, np.ndarray], indices: np.ndarray) -> None:
        """``features`` of images ``indices`` (their 0-based positions in the set, shape (B,))."""
        if self.limit is not None:
            keep = indices < self.limit
            if not keep.all():
                features = {k: v[keep] for k, v in features.items()}
                indices = indices[keep]
        if len(indices):
            self.update(features, indices)

    def update(self, features: Dict[str, np.ndarray], indices: np.ndarray) -> None:
        raise NotImplementedError

    def merge(self, other: "Accumulator") -> None:
        raise NotImplementedError

    def next_pass(self) -> None:
        """Called on the merged state between passes (multi-pass accumulators)."""

    def result(self):
        raise NotImplementedError


class MeanCovariance(Accumulator):
    """Running float64 sums of one feature kind; :meth:`result` = (mean (D,), covariance (D, D), ddof 1)."""

    def __init__(self, kind: str, limit: Optional[int] = None):
        super().__init__((kind,), limit)
        self.stats = None

    def update(self, features, indices):
        from .metrics import RunningStatistics

        x = features[self.kinds[0]]
        if self.stats is None:
            self.stats = RunningStatistics(x.shape[1])
        self.stats.update(x)

    def merge(self, other):
        if other.stats is not None:
            if self.stats is None:
                self.stats = type(other.stats)(len(other.stats.sum))
            self.stats.merge(other.stats)

    @property
    def count(self) -> int:
        return 0 if self.stats is None else self.stats.count

    def result(self):
        if self.stats is None:
            raise ValueError("need at least 2 feature vectors for a covariance, got 0")
        return self.stats.finalize()


def sample_priority(seed: int, indices: np.ndarray) -> np.ndarray:
    """A pseudo-random uint64 per image index (splitmix64 of seed and index): keeping the smallest
    ``K`` gives a uniform sample of size ``K`` that depends on neither batch order nor process count."""
    with np.errstate(over="ignore"):
        x = np.asarray(indices, np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class FeatureRows(Accumulator):
    """Raw rows of one feature kind: all of them, or (``max_rows``) a seeded uniform sample of at most
    ``max_rows`` (the images of smallest :func:`sample_priority`; memory ``max_rows x D``, whatever the
    set size). :meth:`result`: the kept rows ``(n, D)`` in image order."""

    def __init__(self, kind: str, limit: Optional[int] = None, max_rows: Optional[int] = None, seed: int = 0):
        super().__init__((kind,), limit)
        self.max_rows, self.seed = max_rows, seed
        self.indices: List[np.ndarray] = []
        self.rows: List[np.ndarray] = []

    def update(self, features, indices):
        self.indices.append(np.asarray(indices, np.int64))
        self.rows.append(np.asarray(features[self.kinds[0]]))
        if self.max_rows is not None and sum(len(i) for i in self.indices) > 2 * self.max_rows:
            self._shrink()

    def _shrink(self) -> None:
        indices, rows = np.concatenate(self.indices), np.concatenate(self.rows)
        if self.max_rows is not None and len(indices) > self.max_rows:
            keep = np.argsort(sample_priority(self.seed, indices), kind="stable")[:self.max_rows]
            indices, rows = indices[keep], rows[keep]
        order = np.argsort(indices, kind="stable")
        self.indices, self.rows = [indices[order]], [rows[order]]

    def merge(self, other):
        self.indices += other.indices
        self.rows += other.rows
        self._shrink()

    def result(self) -> np.ndarray:
        if not self.rows:
            return np.zeros((0, 0), np.float32)
        self._shrink()
        return self.rows[0]


# --------------------------------------------------------------------------- metrics
class Metric:
    """One metric (see the module doc). Subclasses set the class attributes and implement
    :meth:`accumulator` and :meth:`score`; a metric with a statistics-file form also sets
    ``stores`` and implements :meth:`file_arrays`, :meth:`reference_from_file`, :meth:`check_file`."""

    needs: Tuple[str, ...] = ()
    columns: Tuple[Column, ...] = ()
    higher_is_better = False
    # whether the metric compares with a reference set at all (IS does not)
    uses_reference = True
    # statistics-file arrays that hold its reference (empty: a statistics file cannot)
    stores: Tuple[str, ...] = ()
    # fields of its object in a statistics file's meta_json (under its name): required, and optional ones
    meta_fields: Dict[str, type] = {}
    meta_optional: Dict[str, type] = {}
    # the fewest images of a set it can score, and why
    min_images = 1
    min_images_why = ""
    # why a statistics file cannot hold its reference (when ``stores`` is empty)
    not_storable = "a statistics file holds no reference data for it"
    # where metrics that compute on a device do so (consumers set it)
    device = "cpu"

    @property
    def name(self) -> str:
        return type(self).registered_name

    @property
    def networks(self) -> List[str]:
        return networks_of(self.needs)

    def accumulator(self, role: str) -> Accumulator:
        """A fresh accumulator for the ``"samples"``, the ``"reference"`` (of ``evaluate``) or the set a
        statistics file describes (``"statistics"``: every image, no limit)."""
        raise NotImplementedError

    def limit(self, role: str) -> Optional[int]:
        """The first N images of the set it reads (None: all)."""
        return None

    def score(self, samples, reference, names: Tuple[str, str] = ("the samples", "the reference")) -> Dict[str, float]:
        """Its values (result keys -> numbers) from ``accumulator(...).result()`` of both sets
        (``reference`` may come from :meth:`reference_from_file`; None when ``uses_reference`` is false).
        ``names``: how messages call the two sets."""
        raise NotImplementedError

    def describe(self) -> str:
        """What :meth:`score` runs, for the progress line of long scores."""
        return self.name

    def check_resolution(self, resolution: Tuple[int, int], where: str) -> None:
        """InputError (one line naming ``where``) for images of a size it cannot score."""

    # ---- statistics files
    @classmethod
    def held_by(cls, arrays: Dict[str, np.ndarray]) -> bool:
        """Whether a statistics file with ``arrays`` holds this metric's reference data."""
        return bool(cls.stores) and all(k in arrays for k in cls.stores)

    def file_arrays(self, reference, meta: Dict[str, object], where: str) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
        """What a statistics file stores of a reference set (``accumulator("statistics").result()``):
        ``(arrays, its meta_json object or None)``; ``meta`` holds ``num_images`` and ``seed`` of the set
        it describes; ``where`` names it in errors."""
        raise NotImplementedError(f"metric {self.name}: {self.not_storable}")

    def reference_from_file(self, arrays: Dict[str, np.ndarray], meta: Optional[Dict[str, object]], where: str):
        """The reference data of a statistics file (``meta`` None: an ADM batch's stored statistics);
        None when the file does not hold it. InputError (one line, naming ``where``) when it holds it
        in a form these parameters cannot use."""
        return None

    @classmethod
    def check_file(cls, arrays: Dict[str, np.ndarray], meta: Dict[str, object], where: str) -> None:
        """Check the shapes and values of its arrays in a statistics file (InputError naming ``where``)."""

    # ---- result keys
    @classmethod
    def result_keys(cls) -> Tuple[str, ...]:
        keys = [c.key for c in cls.columns] + [c.spread for c in cls.columns if c.spread]
        return tuple(dict.fromkeys(keys))

    @classmethod
    def owns(cls, key: str) -> bool:
        """Whether a result / metrics.jsonl key is one of its values."""
        return key in cls.result_keys()


def require_images(where: str, count: int, metrics: Iterable[Metric]) -> None:
    """One InputError naming ``where`` when ``count`` images are too few for any of ``metrics``."""
    short: Dict[Tuple[int, str], List[str]] = {}
    for m in metrics:
        if count < m.min_images:
            short.setdefault((m.min_images, m.min_images_why), []).append(m.name)
    if short:
        raise InputError(f"{where}: {count} image(s); " + "; ".join(
            f"{', '.join(names)} need{'s' if len(names) == 1 else ''} at least {least}" + (f" ({why})" if why else "")
            for (least, why), names in short.items()))


def check_inputs(where: str, count: int, resolution: Tuple[int, int], metrics: Iterable[Metric]) -> None:
    """:func:`require_images` and every metric's :meth:`Metric.check_resolution`, before any work."""
    metrics = list(metrics)
    require_images(where, count, metrics)
    for m in metrics:
        m.check_resolution(tuple(resolution), where)


def needed_kinds(metrics: Iterable[Metric]) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(k for m in metrics for k in m.needs))


# --------------------------------------------------------------------------- the driver
Batches = Callable[[Optional[int]], Iterable[Tuple[np.ndarray, np.ndarray]]]


def stream(accumulators: Dict[str, Accumulator], batches: Batches,
           features: Callable[[np.ndarray, Iterable[str]], Dict[str, np.ndarray]], *,
           gather: Optional[Callable[[object], list]] = None, progress: bool = False, desc: str = "",
           total: Optional[int] = None) -> Dict[str, Accumulator]:
    """Run every accumulator over an image set, pass by pass; returns them (merged over processes).

    ``batches(limit)`` yields ``(indices (B,) int64, uint8 images (B, H, W, 3))`` of a fresh pass over
    this process's share of the first ``limit`` images (None: all); ``features(images, kinds)``
    computes the kinds the active accumulators read (``evaluation.features.FeatureNetworks``).
    ``gather`` (an all-gather: every process gets every part) merges the processes' states after
    each pass; without it the states are this process's alone. ``total``: images per pass, for the bar.
    """
    accs = dict(accumulators)
    passes = max((a.passes for a in accs.values()), default=0)
    for k in range(passes):
        active = {name: a for name, a in accs.items() if a.passes > k}
        kinds = tuple(dict.fromkeys(kind for a in active.values() for kind in a.kinds_at(k)))
        limits = [a.limit for a in active.values()]
        limit = None if None in limits else max(limits)
        count = total if limit is None or total is None else min(total, limit)
        label = desc + (f" (pass {k + 1} of {passes}: {', '.join(active)})" if passes > 1 else "")
        with progress_bar(total=count, desc=label, unit="img", disable=not progress, file=sys.stderr) as bar:
            for indices, images in batches(limit):
                indices = np.asarray(indices, np.int64)
                feats = features(images, kinds)
                for a in active.values():
                    a.feed(feats, indices)
                bar.update(len(indices))
        if gather is not None:
            parts = gather(active)
            for name in active:
                merged = parts[0][name]
                for part in parts[1:]:
                    merged.merge(part[name])
                accs[name] = merged
        for a in accs.values():
            if a.passes > k + 1:
                a.next_pass()
    return accs


def array_batches(images: np.ndarray, indices: Optional[np.ndarray] = None, batch_size: int = 64) -> Batches:
    """:func:`stream`'s ``batches`` over images held in memory (``indices``: their positions in the whole
    set, default ``0..N-1``)."""
    idx = np.arange(len(images)) if indices is None else np.asarray(indices, np.int64)

    def batches(limit: Optional[int]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(images), batch_size):
            yield idx[start:start + batch_size], images[start:start + batch_size]
    return batches


def score_all(metrics: Sequence[Metric], samples: Dict[str, object], references: Dict[str, object], *,
              names: Tuple[str, str] = ("the samples", "the reference"), progress: bool = False) -> Dict[str, float]:
    """Every metric's values (in ``metrics`` order), with a progress line naming the one running."""
    out: Dict[str, float] = {}
    with progress_bar(total=len(metrics), desc="scores", unit="metric", disable=not progress,
                      file=sys.stderr) as bar:
        for m in metrics:
            bar.set_postfix_str(m.describe())
            out.update(m.score(samples[m.name], references.get(m.name), names))
            bar.update(1)
    return out
