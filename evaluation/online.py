"""Scoring generated images against a reference-statistics file (training-time evaluation).

The trainer builds one :class:`OnlineEvaluator` at start (every problem: missing or
incompatible statistics, unknown metric, missing weights, is raised there, before training)
and calls it at each evaluation::

    evaluator = OnlineEvaluator(cfg.eval_ref_stats, ["fdd", "swd"], resolution=(32, 32), device=device)
    metrics = evaluator(images_uint8_nhwc)            # one process: {"fdd": ..., "swd": ..., "swd_32": ...}
    # several processes: each scores its share (the images of sample indices `mine`), all take part
    metrics = evaluator.score(my_images, gather=ctx.all_gather_object, indices=mine)

Any registered metric whose reference a statistics file holds (or that needs none, like IS) can
be scored; each streams the images batch by batch through its accumulator, and the processes'
states are merged after every pass (SWD makes two), so what a process keeps does not grow with the
number of images. Nothing here touches the global torch / numpy random streams: the networks are
built under ``torch.random.fork_rng`` and SWD draws from its own seeded generators.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .fdd import DEFAULT_DINOV2_MODEL
from .features import FeatureNetworks, NetworkOptions
from .inception import strict_fp32
from .metric_base import array_batches, needed_kinds, score_all, stream
from .scores import build_metrics
from .npz import InputError
from .stats_file import check_compatible, load_statistics

SAMPLES = "the samples' statistics"


class OnlineEvaluator:
    """``metrics`` (names or ``{name, **params}`` specs) of uint8 ``[N, H, W, 3]`` images against
    ``ref_stats`` (see the module doc).

    ``fid_method="eigh"`` by default (several times faster than ADM's ``sqrtm``, same value
    for PSD covariances). SWD's seed (a parameter of the ``swd`` spec, 0 by default) fixes its
    patches and directions, so successive evaluations of a run are comparable.
    """

    def __init__(self, ref_stats: str, metrics: Sequence, resolution: Tuple[int, int], *,
                 device: str | torch.device = "cpu", inception_weights: Optional[str] = None,
                 dinov2_model: str = DEFAULT_DINOV2_MODEL, dinov2_weights: Optional[str] = None,
                 fid_method: str = "eigh", batch_size: int = 64):
        try:
            self.metrics = build_metrics(list(metrics), {"method": fid_method}, where="eval metrics")
        except ValueError as exc:
            raise InputError(str(exc)) from None
        for m in self.metrics:
            m.check_resolution(tuple(resolution), "the samples")
        self.stats = load_statistics(ref_stats)
        self.networks = FeatureNetworks(needed_kinds(self.metrics),
                                        NetworkOptions(inception_weights, dinov2_model, dinov2_weights), device)
        check_compatible(self.stats, self.metrics, resolution, self.networks.paths.get("inception"), dinov2_model,
                         self.networks.paths.get("dinov2"))
        where = f"reference statistics {ref_stats}"
        self.references = {m.name: m.reference_from_file(self.stats.arrays, self.stats.meta, where)
                           for m in self.metrics if m.uses_reference}
        self.resolution, self.batch_size = tuple(resolution), batch_size
        for m in self.metrics:
            m.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # building networks draws random init weights
            self.networks.build()

    def score(self, images: np.ndarray, gather: Optional[Callable[[object], list]] = None,
              indices: Optional[Sequence[int]] = None) -> Dict[str, float]:
        """The metrics of all processes' images together: ``{"fid", "sfid", "fdd", "swd", "swd_<res>"...}``
        as asked. Every process calls it with its images and their sample ``indices`` (default
        ``0..N-1``); ``gather`` is an all-gather (every process gets every part; None: one process)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (*self.resolution, 3):
            raise ValueError(f"expected uint8 [N, {self.resolution[0]}, {self.resolution[1]}, 3] images, "
                             f"got {images.dtype} {images.shape}")
        accumulators = {m.name: m.accumulator("samples") for m in self.metrics}
        with strict_fp32():
            done = stream(accumulators, array_batches(images, indices, self.batch_size), self.networks, gather=gather)
        samples = {name: acc.result() for name, acc in done.items()}
        return score_all(self.metrics, samples, self.references,
                         names=(SAMPLES, f"reference statistics {self.stats.path}"))

    def __call__(self, images: np.ndarray) -> Dict[str, float]:
        return self.score(images)
