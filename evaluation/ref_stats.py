"""``python -m evaluation.ref_stats IMAGES --out stats.npz [--metrics fid,sfid,fdd,...]``: reference
statistics of a dataset, for ``evaluation.evaluate`` and training-time evaluation.

``IMAGES`` is anything ``dataset_tools.py convert`` writes (a PNG folder or ZIP with
dataset.json; read with :func:`data.open_dataset`) or an ADM-style ``.npz`` (``arr_0`` uint8
``[N, H, W, 3]``; statistics are computed from its images, never copied from stored keys).
The file holds, for each chosen metric, what the metric stores of a reference set
(``Metric.stores``; default FID, sFID and FDD: Inception pool and spatial mean/covariance with
ADM's names ``mu, sigma, mu_s, sigma_s``, DINOv2 mean/covariance), and metadata naming the
resolution, image count and weights (SHA-256); format in :mod:`evaluation.stats_file`.

Every metric streams the images through its accumulator (``evaluation.metric_base``), so memory
does not grow with the dataset: sums for the Fréchet distances, SWD's histograms, a bounded sample
for per-image features. The one exception is ``--swd-images N|all``, kept from before SWD had a
summary: it also stores those images (a warning says how large they are).

Multi-GPU: ``torchrun --nproc_per_node=G -m evaluation.ref_stats ...``: rank ``r`` reads the
images ``i`` with ``i % G == r`` (an ``.npz``: the batches), and the ranks' accumulators are
merged after every pass (nccl on GPUs, gloo on CPU); rank 0 writes the file.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader, Subset

from data.datasets import open_dataset
from data.robust import CorruptSampleError, ReplaceBadSamples
from utils.atomic import reported_write_errors
from utils.distributed import DistContext, setup_distributed
from utils.threads import CPU_THREADS_HELP, cpu_threads_arg, using_cpu_threads

from .fdd import DEFAULT_DINOV2_MODEL
from .features import NETWORKS, FeatureNetworks, NetworkOptions, network_meta
from .inception import strict_fp32
from .metric_base import Metric, needed_kinds, check_inputs, stream
from .scores import build_metrics
from .npz import EvaluationError, InputError, NpzImageBatch
from .scores import METRICS
from .stats_file import ReferenceStatistics, save_statistics, weights_identity

DEFAULT_METRICS = ("fid", "sfid", "fdd")
# stored images beyond this size get a warning line (--swd-images)
LARGE_IMAGES_BYTES = 2 ** 30


# What opening a dataset raises for a path that is no dataset, or a damaged one (a ZIP cut short:
# data/storage.py makes it a ValueError; zipfile's own error and I/O errors are caught as well).
READ_ERRORS = (ValueError, OSError, zipfile.BadZipFile)


def _naming(path: str, error: BaseException) -> str:
    """The first line of ``error``'s message, prefixed with ``path`` unless it already names it."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if path in text else f"{path}: {text}"


class ImageSource:
    """uint8 NHWC batches of a converted dataset (folder/ZIP) or an ADM ``.npz``."""

    def __init__(self, path: str):
        self.path = str(path)
        if os.path.isfile(self.path) and self.path.lower().endswith(".npz"):
            self.npz: Optional[NpzImageBatch] = NpzImageBatch(self.path)
            self.dataset = None
            self.resolution = tuple(self.npz.info.resolution)
            self.count = len(self.npz)
        else:
            try:
                self.dataset = open_dataset(self.path, kind="images")
                _, h, w = self.dataset.item_shape  # that of the first readable image
            except READ_ERRORS as exc:  # not a dataset, or a truncated / damaged ZIP
                raise InputError(f"{_naming(self.path, exc)}; or pass an ADM .npz with arr_0") from None
            self.npz = None
            self.count = len(self.dataset)
            self.resolution = (h, w)

    def __len__(self) -> int:
        return self.count

    def shard(self, rank: int, world: int, batch_size: int, workers: int = 4) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """This rank's ``(indices, images)``: items ``rank::world`` (dataset) or batches ``rank::world`` (.npz)."""
        if self.npz is not None:
            for b, batch in enumerate(self.npz.iter_batches(batch_size)):
                if b % world == rank:
                    yield np.arange(b * batch_size, b * batch_size + len(batch)), batch
            return
        mine = np.arange(rank, self.count, world)
        done = 0
        # A corrupt image comes back flagged (ReplaceBadSamples), not as a worker's traceback.
        loader = DataLoader(Subset(ReplaceBadSamples(self.dataset), range(rank, self.count, world)),
                            batch_size=batch_size, num_workers=workers, collate_fn=_stack_flagged)
        for images, bad in loader:
            if bad:
                self._item(bad[0])  # raises the one-line error naming the file
                raise InputError(f"{self.dataset.sample_path(bad[0])}: a DataLoader worker could not read it, "
                                 "although it reads here; check the storage and rerun")
            yield mine[done:done + len(images)], images
            done += len(images)

    def _item(self, index: int):
        """Image ``index`` of the dataset; a corrupt one ends in an InputError naming its file."""
        try:
            return self.dataset[index]
        except CorruptSampleError as error:
            raise InputError(f"{error}; reference statistics need every image: fix or remove it "
                             f"(`python dataset_tools.py verify {self.path}` lists all corrupt files)") from None

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 ``(len(indices), H, W, 3)`` of the images at sorted ``indices`` (filled in place: the
        images are held once)."""
        wanted = np.asarray(indices, np.int64)
        out = np.empty((len(wanted), *self.resolution, 3), np.uint8)
        if self.npz is None:
            for j, i in enumerate(wanted):
                out[j] = self._item(int(i))[0].permute(1, 2, 0).numpy()
            return out
        start = 0
        for batch in self.npz.iter_batches(256, limit=int(wanted.max()) + 1 if len(wanted) else 0):
            rows = np.flatnonzero((wanted >= start) & (wanted < start + len(batch)))
            out[rows] = batch[wanted[rows] - start]
            start += len(batch)
        return out


def _stack_images(items) -> np.ndarray:
    return np.stack([img.permute(1, 2, 0).numpy() for img, _label in items])


def _stack_flagged(items):
    """``(img, label, bad)`` items -> (uint8 NHWC images, indices of the corrupt ones)."""
    return _stack_images([item[:2] for item in items]), [bad for *_, bad in items if bad >= 0]


def swd_subset(count: int, num: int, seed: int) -> np.ndarray:
    """Sorted indices of ``num`` images (all when ``num < 0`` or ``num >= count``), drawn with ``seed``."""
    if num < 0 or num >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=num, replace=False))


def choose_metrics(metrics=None, *, inception: bool = True, dinov2: bool = True, swd: bool = False,
                   swd_seed: int = 0) -> List[Metric]:
    """The metrics whose reference data to store: ``metrics`` (names or specs; default FID, sFID, FDD, less
    those of a network switched off by ``inception`` / ``dinov2``), ``swd`` adds SWD with seed ``swd_seed``."""
    allowed = {"inception": inception, "dinov2": dinov2}
    explicit = metrics is not None
    specs = list(DEFAULT_METRICS if metrics is None else
                 [m.strip() for m in metrics.split(",") if m.strip()] if isinstance(metrics, str) else metrics)
    named = {spec if isinstance(spec, str) else dict(spec).get("name") for spec in specs}
    if swd and "swd" not in named:
        specs.append("swd")
    specs = [{"name": "swd", "seed": swd_seed} if spec == "swd" else spec for spec in specs]
    try:
        chosen = build_metrics(specs)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    off = [m for m in chosen if any(not allowed[n] for n in m.networks)]
    if explicit and off:
        raise InputError(f"--metrics {', '.join(m.name for m in off)} need(s) "
                         f"{', '.join(n for n in NETWORKS if not allowed[n])}, which --no-... switched off")
    chosen = [m for m in chosen if m not in off]
    unstorable = [m for m in chosen if not m.stores]
    if unstorable:
        raise InputError("; ".join(f"--metrics {m.name}: " + (m.not_storable if m.uses_reference else
                                                              "it compares the samples with nothing, so there is "
                                                              "nothing to store") for m in unstorable))
    if not chosen:
        raise InputError("nothing to compute: --no-inception, --no-dinov2 and --swd-images 0")
    return chosen


def compute_statistics(path: str, *, metrics=None, inception: bool = True, dinov2: bool = True, swd_images: int = 0,
                       seed: int = 0, swd_seed: int = 0, inception_weights: Optional[str] = None,
                       dinov2_model: str = DEFAULT_DINOV2_MODEL, dinov2_weights: Optional[str] = None,
                       batch_size: int = 64, workers: int = 4, ctx: Optional[DistContext] = None,
                       progress: bool = True) -> Optional[ReferenceStatistics]:
    """Statistics of every image under ``path`` for ``metrics`` (:func:`choose_metrics`); returns them on
    rank 0 (None on other ranks).

    ``swd_images`` (adds SWD): 0 none, ``-1`` all, ``M`` a subset of ``M`` images drawn with ``seed``;
    SWD's summary then describes that subset, and those images are stored too.
    """
    ctx = ctx or setup_distributed()
    chosen = choose_metrics(metrics, inception=inception, dinov2=dinov2, swd=bool(swd_images), swd_seed=swd_seed)
    source = ImageSource(path)
    check_inputs(path, len(source), source.resolution, chosen)
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    options = NetworkOptions(inception_weights, dinov2_model, dinov2_weights)
    networks = FeatureNetworks(needed_kinds(chosen), options, ctx.device)
    meta: Dict[str, object] = {"source": path, "num_images": len(source), "resolution": list(source.resolution)}
    meta.update({name: None for name in NETWORKS})
    meta.update({m.registered_name: None for m in (METRICS[n] for n in METRICS.names()) if m.meta_fields})
    for name, weights in networks.paths.items():
        meta[name] = network_meta(name, options, weights_identity(weights))
    subset = swd_subset(len(source), swd_images, seed) if swd_images else None
    if subset is not None and ctx.is_main:
        size = len(subset) * source.resolution[0] * source.resolution[1] * 3
        if size > LARGE_IMAGES_BYTES:
            print(f"warning: --swd-images stores {len(subset)} images ({size / 2 ** 30:.1f} GiB) in the statistics "
                  "file and holds them in memory while writing it; SWD needs only its summary, which is stored "
                  "too: leave --swd-images out (--metrics ...,swd) for a small file", file=sys.stderr)
    accumulators = {m.name: (m.accumulator("statistics", subset=subset) if subset is not None and m.name == "swd"
                             else m.accumulator("statistics")) for m in chosen}
    seen = [0]

    def batches(limit):
        for indices, images in source.shard(ctx.rank, ctx.world_size, batch_size, workers):
            seen[0] += len(indices)
            yield indices, images

    mine = len(range(ctx.rank, len(source), ctx.world_size)) if source.npz is None else None
    with strict_fp32():
        networks.build()
        done = stream(accumulators, batches, networks, gather=ctx.all_gather_object,
                      progress=progress and ctx.is_main, desc=f"reference statistics (rank {ctx.rank})", total=mine)
    passes = max(acc.passes for acc in accumulators.values())
    total = ctx.sum_int(seen[0])
    if not ctx.is_main:
        return None
    if total != passes * len(source):
        raise EvaluationError(f"ranks saw {total // passes} images, expected {len(source)}")
    arrays: Dict[str, np.ndarray] = {}
    for m in chosen:
        info = {"num_images": len(source), "seed": seed}
        stored, obj = m.file_arrays(done[m.name].result(), info, f"the {m.name} statistics computed from {path}")
        arrays.update(stored)
        if obj is not None:
            meta[m.name] = obj
    if subset is not None:
        arrays["swd_images"] = source.take(subset)
    return ReferenceStatistics(arrays, meta)


def _swd_count(text: str) -> int:
    if text == "all":
        return -1
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("use a count >= 0 or 'all'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.ref_stats",
        description="Reference statistics of a converted dataset or an ADM .npz for the chosen metrics (default: "
                    "Inception pool/spatial and DINOv2 mean/covariance), for evaluation.evaluate and training-time "
                    "evaluation. Multi-GPU under torchrun.")
    parser.add_argument("images", help="dataset folder/ZIP from `dataset_tools.py convert`, or an .npz with arr_0")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--metrics", default=None, metavar="LIST",
                        help=f"comma-separated metrics whose reference data to store (default "
                             f"{','.join(DEFAULT_METRICS)}); those a statistics file can hold: "
                             f"{','.join(n for n in METRICS.names() if METRICS[n].stores)}")
    parser.add_argument("--inception", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-inception leaves out the metrics that need Inception (FID, sFID)")
    parser.add_argument("--dinov2", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-dinov2 leaves out the metrics that need DINOv2 (FDD)")
    parser.add_argument("--swd-images", type=_swd_count, default=0, metavar="N|all",
                        help="add SWD over a seeded subset of N images (or all), and store those images too "
                             "(default 0: no images; --metrics ...,swd stores SWD's summary of every image)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --swd-images subset (default 0)")
    parser.add_argument("--swd-seed", type=int, default=0,
                        help="SWD's seed of patches and directions (evaluate's --swd-seed; default 0)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH")
    parser.add_argument("--dinov2-weights", default=None, metavar="PATH")
    parser.add_argument("--dinov2-model", default=DEFAULT_DINOV2_MODEL)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="image-decoding processes per rank (default 4)")
    parser.add_argument("--device", default=None, help="cpu forces the CPU (gloo); default: the GPU if any")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cpu-threads", type=cpu_threads_arg, default=None, help=CPU_THREADS_HELP)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_distributed(args.device)
    try:
        with using_cpu_threads(args.cpu_threads):
            stats = compute_statistics(
                args.images, metrics=args.metrics, inception=args.inception, dinov2=args.dinov2,
                swd_images=args.swd_images, seed=args.seed, swd_seed=args.swd_seed,
                inception_weights=args.inception_weights, dinov2_model=args.dinov2_model,
                dinov2_weights=args.dinov2_weights, batch_size=args.batch_size, workers=args.workers, ctx=ctx,
                progress=not args.no_progress)
        if stats is not None:
            with reported_write_errors(args.out, EvaluationError):
                save_statistics(stats, args.out)
            print(f"wrote {args.out}: {stats.meta['num_images']} images at "
                  f"{stats.meta['resolution'][0]}x{stats.meta['resolution'][1]}, keys {sorted(stats.arrays)}")
    except EvaluationError as exc:
        if ctx.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
