"""`dataset_tools.py encode`: converted images -> SD-VAE posterior moments (SPEC section 1, 7).

Formats (`fmt`):
- "per-image" (default, REPA-compatible): `{idx//1000:05d}/img-mean-std-{idx:08d}.npy`, float32
  (8, h, w), where idx is the number in the source image's name (`img{idx:08d}.png`), plus
  dataset.json `{"labels": [[npy relpath, label], ...], "classes": [...]}`.
- "packed": see data/packed.py (shards of `shard_size` items, labels.npy, index.json).

Multi-GPU: under torchrun (WORLD_SIZE > 1) every rank loads the VAE and encodes its share
(per-image: items i with i % world == rank; packed: shards s with s % world == rank); rank 0
writes the index files after a barrier. Backend nccl on GPU, gloo on CPU.
Resuming: outputs are written atomically (per file / per shard) and existing ones are skipped.
`encode_settings.json` records what produced the outputs; a rerun with other settings stops
with an error instead of mixing latents. It is written only once the VAE has loaded, so a run
that fails before (a VAE folder that does not load) leaves nothing that refuses the next one.
A write that fails on --dest (disk full, quota, read-only) stops with one DestinationWriteError
naming the file; the complete files are kept and a rerun resumes.
Precision: "fp32" (default) runs the VAE in float32; "bf16" runs it under bfloat16 autocast
(faster on GPUs, moments differ from fp32 by bf16 rounding); outputs are float32 either way.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import packed as packed_fmt
from .datasets import open_dataset
from .per_image import LATENT_NAME, FileNames
from .storage import atomic_save_npy, atomic_write_json, destination_writes, remove_temp_files
from .vae import SHORT_NAMES, encode_moments, load_vae
from utils.distributed import setup_distributed

FORMATS = ("per-image", "packed")
PRECISIONS = ("fp32", "bf16")
SETTINGS_NAME = "encode_settings.json"
_IMAGE_INDEX = re.compile(r"img(\d+)\.[A-Za-z]+$")


class _ByPosition(Dataset):
    """(position, image): the position names the output of each item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, pos):
        return pos, self.dataset[pos][0]


def latent_names(image_files) -> FileNames:
    """Per-image latent file for each image: same idx as `img{idx}.png`, or the position (when an
    image name has no number or two share one)."""
    numbers = getattr(image_files, "numbers", None)
    if numbers is None or not image_files.prefix.endswith("img") or not image_files.suffix[1:].isalpha():
        numbers = []
        for f in image_files:
            m = _IMAGE_INDEX.search(f)
            numbers.append(int(m.group(1)) if m else -1)
        numbers = np.asarray(numbers, dtype=np.int64)
    if (numbers < 0).any() or np.unique(numbers).size != numbers.size:
        numbers = np.arange(len(image_files))
    return FileNames.numbered(numbers, *LATENT_NAME)


def _check_settings(dest: str, settings: dict) -> None:
    path = os.path.join(dest, SETTINGS_NAME)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != settings:
            raise ValueError(
                f"{dest!r} holds latents encoded with other settings:\n  there: {previous}\n  now:   {settings}\n"
                "Use a new --dest, or delete the old one to start over."
            )


def encode_dataset(
    source: str,
    dest: str,
    vae: str = "stabilityai/sd-vae-ft-mse",
    fmt: str = "per-image",
    batch_size: int = 64,
    precision: str = "fp32",
    shard_size: int = 10000,
    workers: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Encode the images dataset at `source` into latents at `dest` (a folder).

    Returns a summary dict: `encoded` (by all ranks in this run), `already_done`, `num_items`,
    `seconds`, `images_per_s`, `world_size`, `dest`, `format`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    dest = os.fspath(dest)
    if dest.lower().endswith(".zip"):
        raise ValueError("--dest for encode must be a folder (latents are read memory-mapped or per file)")
    if os.path.abspath(dest) == os.path.abspath(os.fspath(source)):
        raise ValueError("--dest must differ from --source (encode writes its own dataset.json)")
    start = time.time()
    dataset = open_dataset(source, kind="images")
    ctx = setup_distributed(device)
    rank, world = ctx.rank, ctx.world_size
    try:
        device = ctx.device if device is None else torch.device(device)
        if workers is None:
            workers = min(8, max(1, (os.cpu_count() or 1) // world)) if device.type == "cuda" else 0
        item_shape_in = dataset.item_shape
        settings = {
            "format": fmt,
            "vae": SHORT_NAMES.get(os.fspath(vae), os.fspath(vae)),
            "precision": precision,
            "source_items": len(dataset),
            "image_shape": list(item_shape_in),
            **({"shard_size": shard_size} if fmt == "packed" else {}),
        }
        _check_settings(dest, settings)  # on every rank, so that all of them stop together
        ctx.barrier()
        if precision == "bf16" and device.type == "cpu":
            warnings.warn("--precision bf16 on a CPU is usually much slower than fp32 (autocast without native "
                          "bf16 kernels); it is meant for GPUs", stacklevel=2)
        model = load_vae(vae, device=device)  # before anything is written (see the module docstring)
        if rank == 0:
            with destination_writes(dest):
                os.makedirs(dest, exist_ok=True)
                remove_temp_files(dest)
            _write(atomic_write_json, os.path.join(dest, SETTINGS_NAME), settings)
        ctx.barrier()

        runner = _Runner(model, dataset, device, batch_size, precision, workers, rank == 0 and progress)
        encode_start = time.time()
        if fmt == "per-image":
            encoded, already = _encode_per_image(runner, dataset, dest, rank, world)
        else:
            encoded, already = _encode_packed(runner, dataset, dest, rank, world, shard_size, settings)
        encode_seconds = time.time() - encode_start
        encoded, already = ctx.sum_int(encoded), ctx.sum_int(already)
        ctx.barrier()
        if rank == 0:
            if fmt == "per-image":
                _write_per_image_index(dataset, dest)
            else:
                _write_packed_index(dataset, dest, shard_size, settings)
        ctx.barrier()
    finally:
        ctx.close()
    seconds = time.time() - start
    return {
        "encoded": encoded,
        "already_done": already,
        "num_items": len(dataset),
        "seconds": seconds,
        "encode_seconds": encode_seconds,
        "images_per_s": encoded / max(encode_seconds, 1e-9),
        "world_size": world,
        "rank": rank,
        "dest": dest,
        "format": fmt,
        "device": str(device),
    }


class _Runner:
    """Batches images through the VAE; yields (positions, float32 moments as numpy)."""

    def __init__(self, vae, dataset, device, batch_size, precision, workers, show_progress):
        self.vae, self.dataset, self.device = vae, dataset, device
        self.batch_size, self.precision, self.workers = batch_size, precision, workers
        self.show_progress = show_progress
        self.bar = None

    def open_bar(self, total: int, initial: int) -> None:
        from utils.progress import progress_bar

        self.bar = progress_bar(total=total, initial=initial, unit="img", desc="encode", disable=not self.show_progress,
                        dynamic_ncols=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def grid(self, positions) -> list[list[int]]:
        """Fixed batches over `positions`; only the last one can be short."""
        positions = list(positions)
        return [positions[k:k + self.batch_size] for k in range(0, len(positions), self.batch_size)]

    def batches(self, batches: list[list[int]]):
        """Encode the given batches of dataset positions, in order."""
        if not batches:
            return
        loader = DataLoader(_ByPosition(self.dataset), batch_sampler=batches, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        for pos, images in loader:
            with autocast:
                moments = encode_moments(self.vae, images.to(self.device, non_blocking=True))
            moments = moments.cpu().numpy()
            yield pos.numpy(), moments

    def advance(self, count: int, world: int) -> None:
        """Progress of rank 0, scaled by the world size as an estimate of the whole run."""
        if self.bar is not None:
            self.bar.update(count * world)


def _write(writer, path: str, *args, **kwargs) -> None:
    """`writer(path, ...)`, with a failed write as one DestinationWriteError naming `path`."""
    with destination_writes(path):
        writer(path, *args, **kwargs)


def _encode_per_image(runner: _Runner, dataset, dest: str, rank: int, world: int) -> tuple[int, int]:
    names = latent_names(dataset.files)
    mine = list(range(rank, len(dataset), world))
    missing = {i for i in mine if not os.path.exists(os.path.join(dest, names[i]))}
    # Batches sit on a fixed grid over this rank's share, and a resume re-encodes every batch
    # that lacks a file: each item then meets the same batch-mates as in an uninterrupted run,
    # so on deterministic kernels the resumed output is bit-identical.
    todo = [batch for batch in runner.grid(mine) if missing.intersection(batch)]
    already = len(mine) - len(missing)
    runner.open_bar(len(dataset), already * world)
    # Writes overlap the next batch on the accelerator; at most two batches are in flight.
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = []
        try:
            for positions, moments in runner.batches(todo):
                pending.append([pool.submit(_write, atomic_save_npy, os.path.join(dest, names[p]), m)
                                for p, m in zip(positions, moments) if p in missing])
                runner.advance(len(pending[-1]), world)
                if len(pending) > 2:
                    for fut in pending.pop(0):
                        fut.result()
        finally:
            for batch in pending:
                for fut in batch:
                    fut.result()
            runner.close_bar()
    return len(missing), already


def _encode_packed(runner: _Runner, dataset, dest: str, rank: int, world: int, shard_size: int,
                   settings) -> tuple[int, int]:
    ranges = packed_fmt.shard_ranges(len(dataset), shard_size)
    mine = [s for s in range(len(ranges)) if s % world == rank]
    todo = [s for s in mine if not packed_fmt.shard_is_complete(dest, s, ranges[s][1])]
    already = sum(ranges[s][1] for s in mine if s not in todo)
    # Batches never straddle shards, so a shard's content does not depend on which shards
    # a resumed run still has to do.
    batches = [b for s in todo for b in runner.grid(range(ranges[s][0], sum(ranges[s])))]
    runner.open_bar(len(dataset), already * world)
    writers: dict[int, packed_fmt.ShardWriter] = {}
    rows_left = {s: ranges[s][1] for s in todo}
    try:
        for positions, moments in runner.batches(batches):
            s = int(positions[0]) // shard_size
            with destination_writes(os.path.join(dest, packed_fmt.shard_name(s))):
                if s not in writers:
                    writers[s] = packed_fmt.ShardWriter(dest, s, ranges[s][1], moments.shape[1:])
                writers[s].write(moments, positions - ranges[s][0])
                rows_left[s] -= len(positions)
                if rows_left[s] == 0:
                    writers.pop(s).close()
            runner.advance(len(positions), world)
    finally:
        for writer in writers.values():
            writer.abort()
        runner.close_bar()
    return sum(ranges[s][1] for s in todo), already


def _write_per_image_index(dataset, dest: str) -> None:
    names = latent_names(dataset.files)
    missing = [n for n in names if not os.path.exists(os.path.join(dest, n))]
    if missing:
        raise RuntimeError(f"{len(missing)} latent files are missing in {dest!r} (first: {missing[0]}); rerun encode")
    labels = [[n, int(lab)] for n, lab in zip(names, dataset.labels)]
    meta = {"labels": labels}
    if dataset.classes:
        meta["classes"] = list(dataset.classes)
    _write(atomic_write_json, os.path.join(dest, "dataset.json"), meta, indent=None)


def _write_packed_index(dataset, dest: str, shard_size: int, settings) -> None:
    ranges = packed_fmt.shard_ranges(len(dataset), shard_size)
    first = os.path.join(dest, packed_fmt.shard_name(0))
    latent_shape = np.load(first, mmap_mode="r", allow_pickle=False).shape[1:] if os.path.isfile(first) else None
    for s, (_start, count) in enumerate(ranges):
        if not packed_fmt.shard_is_complete(dest, s, count, latent_shape):
            raise RuntimeError(f"shard {packed_fmt.shard_name(s)} in {dest!r} is missing or incomplete; rerun encode")
    _write(atomic_save_npy, os.path.join(dest, "labels.npy"), np.asarray(dataset.labels, dtype=np.int64))
    _write(atomic_write_json, os.path.join(dest, "files.json"), list(dataset.files), indent=None)
    index = {
        "format": packed_fmt.FORMAT_NAME,
        "version": 1,
        "num_items": len(dataset),
        "item_shape": [int(v) for v in latent_shape],
        "dtype": "float32",
        "shard_size": shard_size,
        "shards": [{"file": packed_fmt.shard_name(s), "start": st, "count": c} for s, (st, c) in enumerate(ranges)],
        "num_classes": int(dataset.num_classes),
        "classes": list(dataset.classes) if dataset.classes else None,
        "files": "files.json",
        "encode_settings": settings,
    }
    _write(atomic_write_json, os.path.join(dest, packed_fmt.INDEX_NAME), index)


def format_summary(summary: dict) -> str:
    return (
        f"encode: {summary['encoded']} images encoded, {summary['already_done']} already present, "
        f"{summary['num_items']} in the dataset ({summary['format']}) -> {summary['dest']}\n"
        f"  {summary['images_per_s']:.2f} images/s on {summary['world_size']} process(es), device "
        f"{summary['device']} ({summary['encode_seconds']:.1f} s encoding, {summary['seconds']:.1f} s in all)"
    )
