"""Scoring generated images against a reference-statistics file (training-time evaluation).

The trainer builds one :class:`OnlineEvaluator` at start (every problem: missing or
incompatible statistics, unknown metric, missing weights, is raised there, before training)
and calls it at each evaluation::

    evaluator = OnlineEvaluator(cfg.eval_ref_stats, ["fdd", "swd"], resolution=(32, 32), device=device)
    metrics = evaluator(images_uint8_nhwc)            # one process: {"fdd": ..., "swd": ..., "swd_32": ...}
    # several ranks: each scores its share, rank 0 combines
    parts = ctx.all_gather_object(evaluator.partial(my_images))
    if ctx.is_main: metrics = evaluator.finish(parts)

Nothing here touches the global torch / numpy random streams: the networks are built under
``torch.random.fork_rng`` and SWD draws from its own seeded generators.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .fdd import DEFAULT_DINOV2_MODEL, DinoV2FeatureExtractor, load_dinov2, resolve_dinov2_weights
from .inception import InceptionFeatureExtractor, resolve_inception_weights, strict_fp32
from .metrics import RunningStatistics, frechet_distance
from .npz import InputError
from .stats_file import METRICS, ReferenceStatistics, check_compatible, load_statistics
from .swd import swd

SAMPLES = "the samples' statistics"
# metric -> (feature name, stored mean key, stored covariance key)
FRECHET = {"fid": ("pool", "mu", "sigma"), "sfid": ("spatial", "mu_s", "sigma_s"),
           "fdd": ("dinov2", "mu_dinov2", "sigma_dinov2")}


def frechet_scores(stats: ReferenceStatistics, samples: Dict[str, Tuple[np.ndarray, np.ndarray]],
                   metrics: Iterable[str], method: str = "eigh") -> Dict[str, float]:
    """Fréchet metrics (of ``fid, sfid, fdd`` in ``metrics``) of sample ``(mu, sigma)`` per feature name."""
    out = {}
    for metric in metrics:
        if metric in FRECHET:
            feature, mu_key, sigma_key = FRECHET[metric]
            out[metric] = frechet_distance(*samples[feature], stats.arrays[mu_key], stats.arrays[sigma_key],
                                           method=method, names=(SAMPLES, f"reference statistics {stats.path}"))
    return out


class OnlineEvaluator:
    """``fid, sfid, fdd, swd`` of uint8 ``[N, H, W, 3]`` images against ``ref_stats`` (see module doc).

    ``fid_method="eigh"`` by default (several times faster than ADM's ``sqrtm``, same value
    for PSD covariances). ``swd_seed`` fixes SWD's patches and directions, so successive
    evaluations of a run are comparable.
    """

    def __init__(self, ref_stats: str, metrics: Sequence[str], resolution: Tuple[int, int], *,
                 device: str | torch.device = "cpu", inception_weights: Optional[str] = None,
                 dinov2_model: str = DEFAULT_DINOV2_MODEL, dinov2_weights: Optional[str] = None,
                 swd_seed: int = 0, fid_method: str = "eigh", batch_size: int = 64):
        self.metrics = list(metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise InputError(f"eval metrics {self.metrics}: use a non-empty subset of {list(METRICS)}")
        self.stats = load_statistics(ref_stats)
        need_inception = bool({"fid", "sfid"} & set(self.metrics))
        inception_path = resolve_inception_weights(inception_weights) if need_inception else None
        dinov2_path = resolve_dinov2_weights(dinov2_model, dinov2_weights) if "fdd" in self.metrics else None
        check_compatible(self.stats, self.metrics, resolution, inception_path, dinov2_model, dinov2_path)
        self.resolution, self.swd_seed, self.fid_method, self.batch_size = tuple(resolution), swd_seed, fid_method, batch_size
        self.inception = self.dinov2 = None
        with torch.random.fork_rng(devices=[]):  # building networks draws random init weights
            if inception_path is not None:
                self.inception = InceptionFeatureExtractor(inception_path, device)
            if dinov2_path is not None:
                self.dinov2 = DinoV2FeatureExtractor(load_dinov2(dinov2_model, dinov2_path, device))

    def partial(self, images: np.ndarray) -> Dict[str, object]:
        """This process's share: float64 feature sums (picklable) and, for swd, the images."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (*self.resolution, 3):
            raise ValueError(f"expected uint8 [N, {self.resolution[0]}, {self.resolution[1]}, 3] images, "
                             f"got {images.dtype} {images.shape}")
        part: Dict[str, object] = {}
        with strict_fp32():
            for start in range(0, len(images), self.batch_size):
                batch = images[start:start + self.batch_size]
                if self.inception is not None:
                    feats = self.inception(batch)
                    for name in ("pool", "spatial"):
                        part.setdefault(name, RunningStatistics(feats[name].shape[1])).update(feats[name])
                if self.dinov2 is not None:
                    feats = self.dinov2(batch)
                    part.setdefault("dinov2", RunningStatistics(feats.shape[1])).update(feats)
        if "swd" in self.metrics:
            part["swd_images"] = images
        return part

    def finish(self, parts: List[Dict[str, object]]) -> Dict[str, float]:
        """The metrics of all parts together: ``{"fid", "sfid", "fdd", "swd", "swd_<res>"...}`` as asked."""
        samples = {}
        for name in ("pool", "spatial", "dinov2"):
            stats = [p[name] for p in parts if name in p]
            if stats:
                total = RunningStatistics(len(stats[0].sum))
                for s in stats:
                    total.merge(s)
                samples[name] = total.finalize()
        out = frechet_scores(self.stats, samples, self.metrics, self.fid_method)
        if "swd" in self.metrics:
            generated = np.concatenate([p["swd_images"] for p in parts if len(p["swd_images"])])
            out.update(swd(generated, self.stats.arrays["swd_images"], seed=self.swd_seed).as_dict())
        return out

    def __call__(self, images: np.ndarray) -> Dict[str, float]:
        return self.finish([self.partial(images)])
