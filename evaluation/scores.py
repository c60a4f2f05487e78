"""The registered metrics (``METRICS``; the contract is ``evaluation.metric_base.Metric``).

``evaluate --metrics fid,sfid,is,pr,fdd,swd`` and ``eval_metrics: [...]`` name these; a new metric
is one more class here (docs/EXTENDING.md, "A metric"). Definitions and formulas:
``evaluation.metrics`` (ADM's FID/sFID/IS/precision-recall), ``evaluation.fdd``, ``evaluation.swd``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from utils.registry import RegistryError

from .features import check_kinds
from .metric_base import METRICS, Accumulator, Column, FeatureRows, MeanCovariance, Metric
from .metrics import IS_SPLIT_SIZE, PR_NEIGHBOURHOOD, frechet_distance, precision_recall
from .npz import InputError, require_finite, require_statistics
from .swd import SWDSettings, SWDSketch, SWDSummary, pyramid_resolutions, summarize, swd_distance

__all__ = ["METRICS"]


class FrechetMetric(Metric):
    """Fréchet distance of the Gaussians fitted to one feature kind (running float64 sums)."""

    mu_key = sigma_key = ""
    min_images = 2
    min_images_why = "a covariance"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.stores = (cls.mu_key, cls.sigma_key)  # a statistics file holds the Gaussian: mean and covariance

    def __init__(self, method: str = "sqrtm"):
        if method not in ("sqrtm", "eigh"):
            raise InputError(f"metric {self.name}: method {method}: use sqrtm (ADM) or eigh")
        self.method = method

    def accumulator(self, role):
        return MeanCovariance(self.needs[0])

    def describe(self):
        return f"{self.name} ({'scipy sqrtm' if self.method == 'sqrtm' else 'eigh'} of the covariances)"

    def score(self, samples, reference, names=("the samples", "the reference")):
        return {self.columns[0].key: frechet_distance(*samples, *reference, method=self.method, names=names)}

    def file_arrays(self, reference, meta, where):
        require_finite(where, mu=reference[0], sigma=reference[1])
        return {self.mu_key: reference[0], self.sigma_key: reference[1]}, None

    def reference_from_file(self, arrays, meta, where):
        if self.mu_key in arrays:
            return arrays[self.mu_key].astype(np.float64), arrays[self.sigma_key].astype(np.float64)
        return None

    @classmethod
    def check_file(cls, arrays, meta, where):
        mu, sigma = cls.mu_key, cls.sigma_key
        if (mu in arrays) != (sigma in arrays):
            raise InputError(f"{where}: has only one of {mu}/{sigma}")
        if mu in arrays:
            if arrays[mu].ndim != 1 or arrays[sigma].shape != arrays[mu].shape * 2:
                raise InputError(f"{where}: {mu}/{sigma} have shapes "
                                 f"{arrays[mu].shape}/{arrays[sigma].shape}, expected (D,)/(D, D)")
            require_statistics(where, mu, arrays[mu], sigma, arrays[sigma])


@METRICS.register("fid")
class FID(FrechetMetric):
    """FID: Fréchet distance of Inception pool_3 features (ADM's definition)."""

    needs = ("inception_pool",)
    columns = (Column("FID", "fid"),)
    mu_key, sigma_key = "mu", "sigma"


@METRICS.register("sfid")
class SFID(FrechetMetric):
    """sFID: Fréchet distance of Inception mixed_6/conv[..., :7] features (ADM's definition)."""

    needs = ("inception_spatial",)
    columns = (Column("sFID", "sfid"),)
    mu_key, sigma_key = "mu_s", "sigma_s"


class _SplitSums(Accumulator):
    """Per split of ``split_size`` consecutive images: count, sum of ``p log p`` and sum of ``p`` (p = softmax)."""

    def __init__(self, kind: str, split_size: int):
        super().__init__((kind,))
        self.split_size = split_size
        self.splits: Dict[int, list] = {}

    def update(self, features, indices):
        from scipy.special import logsumexp  # scipy when used: training imports this registry

        logits = np.asarray(features[self.kinds[0]], np.float64)
        log_p = logits - logsumexp(logits, axis=1, keepdims=True)
        p = np.exp(log_p)
        neg_entropy = (p * log_p).sum(axis=1)
        for split in np.unique(indices // self.split_size):
            rows = indices // self.split_size == split
            entry = self.splits.setdefault(int(split), [0, 0.0, np.zeros(p.shape[1])])
            entry[0] += int(rows.sum())
            entry[1] += float(neg_entropy[rows].sum())
            entry[2] += p[rows].sum(axis=0)

    def merge(self, other):
        for split, (n, s, marginal) in other.splits.items():
            entry = self.splits.setdefault(split, [0, 0.0, np.zeros(len(marginal))])
            entry[0] += n
            entry[1] += s
            entry[2] += marginal

    def result(self):
        return [self.splits[k] for k in sorted(self.splits)]


@METRICS.register("is")
class InceptionScore(Metric):
    """Inception Score (ADM's definition: splits of 5000 consecutive samples); needs no reference."""

    needs = ("inception_logits",)
    columns = (Column("IS", "inception_score"),)
    higher_is_better = True
    uses_reference = False

    def __init__(self, split_size: int = IS_SPLIT_SIZE):
        if split_size < 1:
            raise InputError(f"metric is: split_size must be >= 1, got {split_size}")
        self.split_size = split_size

    def accumulator(self, role):
        return _SplitSums(self.needs[0], self.split_size)

    def score(self, samples, reference, names=None):
        from scipy.special import xlogy

        # E_x KL(p(y|x) || p(y)) = mean_x sum_y p log p - sum_y p(y) log p(y), split by split
        scores = [np.exp(s / n - xlogy(marginal / n, marginal / n).sum()) for n, s, marginal in samples]
        return {"inception_score": float(np.mean(scores))}


@METRICS.register("pr")
class PrecisionRecall(Metric):
    """Improved precision and recall (k = 3 manifolds of Inception pool_3 features, ADM's definition).

    Keeps every sample's features and those of the first ``num_ref`` reference images (0: all;
    8 KB per image): the k-NN balls need them all, so a statistics file cannot stand in for them."""

    needs = ("inception_pool",)
    columns = (Column("Prec.", "precision"), Column("Rec.", "recall"))
    higher_is_better = True
    min_images = PR_NEIGHBOURHOOD + 1
    min_images_why = f"k = {PR_NEIGHBOURHOOD} nearest neighbours"
    not_storable = "precision/recall need the reference images' features"

    def __init__(self, num_ref: int = 10000):
        if num_ref < 0:
            raise InputError(f"--num-ref-pr must be >= 0 (0 = all reference images), got {num_ref}")
        self.num_ref = num_ref

    def limit(self, role):
        return (self.num_ref or None) if role == "reference" else None

    def accumulator(self, role):
        return FeatureRows(self.needs[0], self.limit(role))

    def describe(self):
        return "pr (k-nearest-neighbour radii)"

    def score(self, samples, reference, names=None):
        precision, recall = precision_recall(reference, samples, device=self.device)
        return {"precision": precision, "recall": recall, "num_ref_pr": len(reference)}


@METRICS.register("fdd")
class FDD(FrechetMetric):
    """FDD: Fréchet distance of DINOv2 CLS-token features (Stein et al. 2023)."""

    needs = ("dinov2",)
    columns = (Column("FDD", "fdd"),)
    mu_key, sigma_key = "mu_dinov2", "sigma_dinov2"


@METRICS.register("swd")
class SWD(Metric):
    """SWD: ProGAN's multi-scale sliced Wasserstein distance x 1e3 (evaluation.swd); needs no network.

    Reads the first ``num_images`` images of each set (the samples; a reference batch, or a statistics
    file's ``swd_images``), streamed in two passes. A statistics file keeps its summary
    (``swd_histograms``, made with this ``seed``) and, in files of ``ref_stats --swd-images``, images."""

    needs = ("images",)
    columns = (Column("SWD×10³", "swd"),)
    stores = ("swd_histograms", "swd_images")
    meta_fields = {"num_images": int, "seed": int}
    meta_optional = {"swd_seed": int, "patches_per_image": int, "directions": int, "repeats": int,
                     "min_resolution": int, "bins": int}

    def __init__(self, seed: int = 0, num_images: int = 10000):
        if num_images < 1:
            raise InputError(f"--swd-num-images must be >= 1, got {num_images}")
        self.settings = SWDSettings(seed=seed)
        self.num_images = num_images

    def limit(self, role):
        return None if role == "statistics" else self.num_images

    def accumulator(self, role, subset: Optional[np.ndarray] = None):
        return SWDSketch(self.settings, self.limit(role), subset)

    def describe(self):
        return "swd (1-d Wasserstein distances of the histograms)"

    def check_resolution(self, resolution, where):
        if not pyramid_resolutions(*resolution, self.settings.min_resolution):
            raise InputError(f"{where}: images of {resolution[0]}x{resolution[1]}; swd needs at least "
                             f"{self.settings.min_resolution} pixels a side (its coarsest pyramid level)")

    def score(self, samples: SWDSummary, reference: SWDSummary, names=None):
        return swd_distance(samples, reference).as_dict()

    @classmethod
    def owns(cls, key):
        return key == "swd" or (key.startswith("swd_") and key[4:].isdigit())

    @classmethod
    def held_by(cls, arrays):
        return "swd_histograms" in arrays or "swd_images" in arrays

    def file_arrays(self, reference: SWDSummary, meta, where):
        return {"swd_histograms": reference.histograms}, {**meta, "num_images": reference.count,
                                                          **self.settings.as_meta()}

    def reference_from_file(self, arrays, meta, where):
        if meta is None:
            return None
        stored = meta.get("swd") or {}
        if "swd_histograms" in arrays:
            made_with = {k: stored.get(k) for k in self.settings.as_meta()}
            if made_with == self.settings.as_meta():
                return SWDSummary(tuple(pyramid_resolutions(*meta["resolution"], self.settings.min_resolution)),
                                  arrays["swd_histograms"], int(stored["num_images"]))
            if "swd_images" not in arrays:
                other = {k: v for k, v in made_with.items() if v != self.settings.as_meta()[k]}
                raise InputError(f"{where} hold SWD's summary made with {other}, not with "
                                 f"{ {k: self.settings.as_meta()[k] for k in other} }; use --swd-seed "
                                 f"{stored.get('swd_seed')}, or recompute them with evaluation.ref_stats --swd-seed "
                                 f"{self.settings.seed}")
        if "swd_images" in arrays:
            return summarize(arrays["swd_images"][:self.num_images], self.settings)
        return None

    @classmethod
    def check_file(cls, arrays, meta, where):
        resolution = tuple(meta["resolution"])
        if "swd_images" in arrays:
            images = arrays["swd_images"]
            if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:3]) != resolution:
                raise InputError(f"{where}: swd_images {images.dtype} {images.shape} do not "
                                 f"match resolution {list(resolution)}")
        if "swd_histograms" in arrays:
            hist, stored = arrays["swd_histograms"], meta.get("swd") or {}
            levels = len(pyramid_resolutions(*resolution, stored.get("min_resolution", 0) or 1))
            expected = (levels, stored.get("repeats", 0) * stored.get("directions", 0), stored.get("bins"))
            if hist.dtype != np.int64 or hist.shape != expected or (hist < 0).any():
                raise InputError(f"{where}: swd_histograms {hist.dtype} {hist.shape} do not match its meta_json "
                                 f"(expected int64 counts >= 0 of shape {expected})")


@METRICS.register("kid")
class KID(Metric):
    """KID: the kernel Inception distance (Binkowski et al. 2018) as torch-fidelity computes it.

    The unbiased MMD^2 estimate with the kernel ``k(x, y) = (x.y / d + 1)^3`` on Inception pool_3
    features, over ``subsets`` random subsets of ``subset_size`` from each set (capped by the smaller
    set; drawn as torch-fidelity draws them, ``RandomState(seed)``); the mean and std over subsets. Each
    set keeps a seeded uniform sample of at most ``max_features`` features (80 MB at 10000; all of
    them when the set is smaller), and a statistics file stores the reference's sample."""

    needs = ("inception_pool",)
    columns = (Column("KID×10³", "kid", scale=1e3, spread="kid_std"),)
    stores = ("kid_features",)
    meta_fields = {"num_images": int, "seed": int}
    min_images = 2
    min_images_why = "an unbiased MMD estimate"

    def __init__(self, subsets: int = 100, subset_size: int = 1000, max_features: int = 10000, seed: int = 0):
        if subsets < 1 or subset_size < 2 or max_features < 2:
            raise InputError(f"metric kid: subsets >= 1, subset_size >= 2 and max_features >= 2, got {subsets}, "
                             f"{subset_size}, {max_features}")
        self.subsets, self.subset_size, self.max_features, self.seed = subsets, subset_size, max_features, seed

    def accumulator(self, role):
        return FeatureRows(self.needs[0], max_rows=self.max_features, seed=self.seed)

    def describe(self):
        return f"kid ({self.subsets} subsets of up to {self.subset_size})"

    def score(self, samples, reference, names=None):
        import torch

        x, y = (torch.as_tensor(np.asarray(f, np.float64), device=self.device) for f in (samples, reference))
        m = min(self.subset_size, len(x), len(y))
        rng = np.random.RandomState(self.seed)
        estimates = []
        for _ in range(self.subsets):
            a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
            k_aa, k_bb, k_ab = ((u @ v.T / x.shape[1] + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
            same = (k_aa.sum() - k_aa.trace() + k_bb.sum() - k_bb.trace()) / (m * (m - 1))
            estimates.append(float(same - 2 * k_ab.sum() / m ** 2))
        return {"kid": float(np.mean(estimates)), "kid_std": float(np.std(estimates)), "kid_subset_size": m}

    def file_arrays(self, reference, meta, where):
        return {"kid_features": reference.astype(np.float32)}, {"num_images": meta["num_images"], "seed": self.seed}

    def reference_from_file(self, arrays, meta, where):
        return arrays.get("kid_features") if meta is not None else None

    @classmethod
    def check_file(cls, arrays, meta, where):
        f = arrays.get("kid_features")
        if f is not None and (f.dtype != np.float32 or f.ndim != 2 or len(f) < 2 or not np.isfinite(f).all()):
            raise InputError(f"{where}: kid_features {f.dtype} {f.shape} are not finite float32 features (N >= 2, D)")


# --------------------------------------------------------------------------- the registry, filled
def metric_classes() -> List[type]:
    """The registered metric classes, in registration order (this module registers the codebase's)."""
    return [METRICS[name] for name in METRICS.names()]


def owner_of(key: str) -> Optional[type]:
    """The metric class a result key belongs to (None for a key of no metric, e.g. a loss)."""
    return next((cls for cls in metric_classes() if cls.owns(key)), None)


def lower_is_better(key: str) -> bool:
    owner = owner_of(key)
    return not (owner is not None and owner.higher_is_better)


def build_metrics(specs, shared: Optional[Dict[str, object]] = None, where: str = "--metrics") -> List[Metric]:
    """Metric objects of ``specs``: a comma-separated string or a list of names / ``{name, **params}``.

    ``shared`` options set the parameter of that name on every chosen metric that takes it (e.g.
    ``method`` of the Fréchet distances), unless its spec sets it. ValueError (one line naming
    ``where``) for an unknown name, a bad parameter, a repeated metric or an empty list.
    """
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    specs = list(specs or [])
    if not specs:
        raise ValueError(f"{where}: no metric given; registered: {', '.join(METRICS.names())}")
    out: List[Metric] = []
    for spec in specs:
        try:
            name, params = METRICS.split(spec)
        except RegistryError as exc:
            raise ValueError(f"{where}: {exc}") from None
        allowed = METRICS.params(name)
        params = {**{k: v for k, v in (shared or {}).items() if k in allowed and v is not None}, **params}
        try:
            out.append(METRICS.build({"name": name, **params}))
        except RegistryError as exc:
            raise ValueError(f"{where}: {exc}") from None
    names = [m.name for m in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: {', '.join(repeated)} given more than once")
    for m in out:
        check_kinds(m.needs, f"metric {m.name}")
    return out
