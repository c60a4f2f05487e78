"""``python -m evaluation.ref_stats IMAGES --out stats.npz``: reference statistics of a dataset.

``IMAGES`` is anything ``dataset_tools.py convert`` writes (a PNG folder or ZIP with
dataset.json; read with :func:`data.open_dataset`) or an ADM-style ``.npz`` (``arr_0`` uint8
``[N, H, W, 3]``; statistics are computed from its images, never copied from stored keys).
The output format is described in :mod:`evaluation.stats_file`: Inception pool and spatial
mean/covariance (``mu, sigma, mu_s, sigma_s``, ADM's names), DINOv2 mean/covariance
(``mu_dinov2, sigma_dinov2``), optionally a seeded subset of the images for SWD
(``swd_images``), and metadata naming the resolution, image count and weights (SHA-256).

Multi-GPU: ``torchrun --nproc_per_node=G -m evaluation.ref_stats ...``: rank ``r`` reads the
images ``i`` with ``i % G == r`` (an ``.npz``: the batches), accumulates float64 sums of its
features, and rank 0 adds the ranks' sums and writes the file (nccl on GPUs, gloo on CPU).
Sums instead of features: a 1.28M-image training set never has its features in one place.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from data.datasets import open_dataset
from data.robust import CorruptSampleError, ReplaceBadSamples
from utils.atomic import reported_write_errors
from utils.distributed import DistContext, setup_distributed
from utils.threads import CPU_THREADS_HELP, cpu_threads_arg, using_cpu_threads

from .fdd import DEFAULT_DINOV2_MODEL, DINOV2_IMAGE_SIZE, DinoV2FeatureExtractor, load_dinov2, resolve_dinov2_weights
from .inception import InceptionFeatureExtractor, resolve_inception_weights, strict_fp32
from .metrics import RunningStatistics
from .npz import POOL_DIM, SPATIAL_DIM, EvaluationError, InputError, NpzImageBatch, require_finite
from .stats_file import ReferenceStatistics, save_statistics, weights_identity


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

    def shard(self, rank: int, world: int, batch_size: int, workers: int = 4) -> Iterator[np.ndarray]:
        """This rank's images: items ``rank::world`` (dataset) or batches ``rank::world`` (.npz)."""
        if self.npz is not None:
            for b, batch in enumerate(self.npz.iter_batches(batch_size)):
                if b % world == rank:
                    yield batch
            return
        # A corrupt image comes back flagged (ReplaceBadSamples), not as a worker's traceback.
        loader = DataLoader(Subset(ReplaceBadSamples(self.dataset), range(rank, self.count, world)),
                            batch_size=batch_size, num_workers=workers, collate_fn=_stack_flagged)
        for images, bad in loader:
            if bad:
                self._item(bad[0])  # raises the one-line error naming the file
                raise InputError(f"{self.dataset.sample_path(bad[0])}: a DataLoader worker could not read it, "
                                 "although it reads here; check the storage and rerun")
            yield images

    def _item(self, index: int):
        """Image ``index`` of the dataset; a corrupt one ends in an InputError naming its file."""
        try:
            return self.dataset[index]
        except CorruptSampleError as error:
            raise InputError(f"{error}; reference statistics need every image: fix or remove it "
                             f"(`python dataset_tools.py verify {self.path}` lists all corrupt files)") from None

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 ``(len(indices), H, W, 3)`` of the images at sorted ``indices``."""
        if self.npz is None:
            return _stack_images([self._item(int(i)) for i in indices])
        wanted, parts, start = np.asarray(indices), [], 0
        for batch in self.npz.iter_batches(256, limit=int(wanted.max()) + 1 if len(wanted) else 0):
            sel = wanted[(wanted >= start) & (wanted < start + len(batch))] - start
            parts.append(batch[sel])
            start += len(batch)
        return np.concatenate(parts) if parts else np.zeros((0, *self.resolution, 3), np.uint8)


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


def compute_statistics(path: str, *, inception: bool = True, dinov2: bool = True, swd_images: int = 0,
                       seed: int = 0, inception_weights: Optional[str] = None,
                       dinov2_model: str = DEFAULT_DINOV2_MODEL, dinov2_weights: Optional[str] = None,
                       batch_size: int = 64, workers: int = 4, ctx: Optional[DistContext] = None,
                       progress: bool = True) -> Optional[ReferenceStatistics]:
    """Statistics of every image under ``path``; returns them on rank 0 (None on other ranks).

    ``swd_images``: 0 stores none, ``-1`` all, ``M`` a seeded subset of ``M`` images.
    """
    ctx = ctx or setup_distributed()
    source = ImageSource(path)
    if len(source) < 2 and (inception or dinov2):
        raise InputError(f"{path}: {len(source)} image(s); a covariance needs at least 2")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    meta: Dict[str, object] = {"source": path, "num_images": len(source), "resolution": list(source.resolution),
                               "inception": None, "dinov2": None, "swd": None}
    extractors, running = {}, {}
    if inception:
        weights = resolve_inception_weights(inception_weights)
        meta["inception"] = weights_identity(weights)
        extractors["inception"] = InceptionFeatureExtractor(weights, ctx.device)
        running.update(pool=RunningStatistics(POOL_DIM), spatial=RunningStatistics(SPATIAL_DIM))
    if dinov2:
        weights = resolve_dinov2_weights(dinov2_model, dinov2_weights)
        meta["dinov2"] = {"model": dinov2_model, "image_size": DINOV2_IMAGE_SIZE, **weights_identity(weights)}
        model = load_dinov2(dinov2_model, weights, ctx.device)
        extractors["dinov2"] = DinoV2FeatureExtractor(model)
        running["dinov2"] = RunningStatistics(model.num_features)
    if extractors:
        mine = len(range(ctx.rank, len(source), ctx.world_size)) if source.npz is None else None
        with strict_fp32(), tqdm(total=mine, unit="img", desc=f"features (rank {ctx.rank})", file=sys.stderr,
                                 disable=not progress or not ctx.is_main) as bar:
            for batch in source.shard(ctx.rank, ctx.world_size, batch_size, workers):
                if "inception" in extractors:
                    feats = extractors["inception"](batch)
                    running["pool"].update(feats["pool"])
                    running["spatial"].update(feats["spatial"])
                if "dinov2" in extractors:
                    running["dinov2"].update(extractors["dinov2"](batch))
                bar.update(len(batch))
    gathered = ctx.all_gather_object(running)
    if not ctx.is_main:
        return None
    total = {name: RunningStatistics(len(stats.sum)) for name, stats in running.items()}
    for part in gathered:
        for name, stats in part.items():
            total[name].merge(stats)
    arrays: Dict[str, np.ndarray] = {}
    for name, (mu_key, sigma_key) in (("pool", ("mu", "sigma")), ("spatial", ("mu_s", "sigma_s")),
                                      ("dinov2", ("mu_dinov2", "sigma_dinov2"))):
        if name in total:
            if total[name].count != len(source):
                raise EvaluationError(f"ranks saw {total[name].count} images, expected {len(source)}")
            arrays[mu_key], arrays[sigma_key] = total[name].finalize()
            require_finite(f"the {name} statistics computed from {path}", mu=arrays[mu_key], sigma=arrays[sigma_key])
    if swd_images:
        indices = swd_subset(len(source), swd_images, seed)
        arrays["swd_images"] = source.take(indices)
        meta["swd"] = {"num_images": len(indices), "seed": seed}
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
        description="Reference statistics (Inception pool/spatial and DINOv2 mean/covariance, optional SWD "
                    "images) of a converted dataset or an ADM .npz, for evaluation.evaluate and training-time "
                    "evaluation. Multi-GPU under torchrun.")
    parser.add_argument("images", help="dataset folder/ZIP from `dataset_tools.py convert`, or an .npz with arr_0")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--inception", action=argparse.BooleanOptionalAction, default=True,
                        help="Inception statistics for FID/sFID (default on)")
    parser.add_argument("--dinov2", action=argparse.BooleanOptionalAction, default=True,
                        help="DINOv2 statistics for FDD (default on)")
    parser.add_argument("--swd-images", type=_swd_count, default=0, metavar="N|all",
                        help="store N images (a seeded subset) or all of them for SWD (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SWD subset (default 0)")
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
        if not (args.inception or args.dinov2 or args.swd_images):
            raise InputError("nothing to compute: --no-inception, --no-dinov2 and --swd-images 0")
        with using_cpu_threads(args.cpu_threads):
            stats = compute_statistics(
                args.images, inception=args.inception, dinov2=args.dinov2, swd_images=args.swd_images,
                seed=args.seed, inception_weights=args.inception_weights, dinov2_model=args.dinov2_model,
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
