"""Throughput of `dataset_tools.py convert`, `encode` and the REPA loader on synthetic data (numbers: docs/DATA.md).

    python -m data.benchmark convert --images 400             # ~500x375 JPEGs -> 256x256 PNGs
    python -m data.benchmark encode --images 16 --batch-size 8 # SD-VAE architecture, random weights
    python -m data.benchmark paired-loader --images 1024 --workers 1 2  # images + latents, per worker

Nothing is downloaded: the JPEGs are synthetic (smooth colour fields, edges and noise, so
they compress and decode like photos), and the VAE has the sd-vae-ft-mse architecture with
random weights (same cost per image as the real one).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np

SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, sample_size=256, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 with low-frequency colour, a few hard edges and sensor-like noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.5, 4, 2) * 2 * np.pi / max(width, height)
        img[..., c] = 128 + 90 * np.sin(fx * xx + rng.uniform(0, 2 * np.pi)) * np.cos(fy * yy)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = rng.integers(20, 120)
        mask = (xx - x0) ** 2 + (yy - y0) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_jpeg_tree(root: str, num_images: int, classes: int = 10, seed: int = 0) -> int:
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(num_images):
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        w, h = (500, 375) if i % 3 else (375, 500)
        path = os.path.join(folder, f"img_{i:06d}.JPEG")
        Image.fromarray(synthetic_photo(rng, w, h)).save(path, quality=90)
        total += os.path.getsize(path)
    return total


def bench_convert(args) -> None:
    from data.convert import convert_dataset

    work = tempfile.mkdtemp(prefix="bench-convert-")
    try:
        src = os.path.join(work, "train")
        nbytes = make_jpeg_tree(src, args.images)
        print(f"source: {args.images} synthetic JPEGs, mean {nbytes / args.images / 1024:.0f} KiB")
        for level in args.png_compression:
            dest = os.path.join(work, f"out{level}")
            t, cpu = time.time(), _cpu_seconds()
            s = convert_dataset(src, dest, resolution=(256, 256), transform="center-crop-dhariwal",
                                workers=args.workers, compress_level=level, progress=False)
            wall, cpu = time.time() - t, _cpu_seconds() - cpu
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
            print(f"convert 256x256 center-crop-dhariwal, png level {level}: {s['num_images'] / wall:.1f} images/s "
                  f"({s['workers']} workers, {wall:.1f} s wall), {s['num_images'] / cpu:.1f} images per CPU-second, "
                  f"{size / s['num_images'] / 1024:.0f} KiB per PNG")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_encode(args) -> None:
    import json

    import torch
    from diffusers.models import AutoencoderKL
    from PIL import Image

    from data.encode import encode_dataset

    work = tempfile.mkdtemp(prefix="bench-encode-")
    try:
        images = os.path.join(work, "images")
        rng = np.random.default_rng(0)
        labels = []
        for i in range(args.images):
            rel = f"00000/img{i:08d}.png"
            os.makedirs(os.path.join(images, "00000"), exist_ok=True)
            Image.fromarray(synthetic_photo(rng, 256, 256)).save(os.path.join(images, rel))
            labels.append([rel, 0])
        with open(os.path.join(images, "dataset.json"), "w") as f:
            json.dump({"labels": labels}, f)
        torch.manual_seed(0)
        vae_dir = os.path.join(work, "sd-vae-random")
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(vae_dir)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        for precision in args.precision:
            dest = os.path.join(work, f"latents-{precision}")
            cpu = _cpu_seconds()
            s = encode_dataset(images, dest, vae=vae_dir, batch_size=args.batch_size, precision=precision,
                               device=device, progress=False)
            cpu = _cpu_seconds() - cpu
            print(f"encode 256x256 -> (8, 32, 32), {precision}, batch {args.batch_size}, {device} "
                  f"({torch.get_num_threads()} threads): {s['images_per_s']:.2f} images/s "
                  f"({s['encoded']} images in {s['encode_seconds']:.1f} s; first batch included), "
                  f"{cpu / s['encoded']:.1f} CPU-seconds per image (VAE loading included)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_random_latents(images_dir: str, dest: str, fmt: str, seed: int = 0) -> None:
    """Latents in encode's layout (per-image or packed) for the images at `images_dir`, with random values:
    reading them costs what reading real ones costs."""
    from data import encode as encode_mod
    from data import packed as packed_fmt
    from data.datasets import open_dataset
    from data.storage import atomic_save_npy

    images = open_dataset(images_dir, kind="images")
    _, h, w = images.item_shape
    shape = (8, h // 8, w // 8)
    rng = np.random.default_rng(seed)
    os.makedirs(dest, exist_ok=True)
    if fmt == "per-image":
        for name in encode_mod.latent_names(images.files):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            atomic_save_npy(os.path.join(dest, name), rng.standard_normal(shape).astype(np.float32))
        encode_mod._write_per_image_index(images, dest)
    else:
        shard_size = 10000
        for s, (_start, count) in enumerate(packed_fmt.shard_ranges(len(images), shard_size)):
            writer = packed_fmt.ShardWriter(dest, s, count, shape)
            writer.write(rng.standard_normal((count, *shape)).astype(np.float32), np.arange(count))
            writer.close()
        encode_mod._write_packed_index(images, dest, shard_size, {"format": "packed", "vae": "random"})


def _item_costs(dataset, target: float) -> None:
    """CPU time of one item in this process, on one torch thread (what a DataLoader worker runs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run with one thread
    try:
        order = np.random.default_rng(0).permutation(len(dataset))
        costs = {}
        for what, read in (("image decode", lambda i: dataset.images[i]),
                           ("latent read", lambda i: dataset.latents[i]), ("item", lambda i: dataset[i])):
            t = time.process_time()
            for i in order:
                read(int(i))
            costs[what] = (time.process_time() - t) / len(order)
    finally:
        torch.set_num_threads(before)
    print(", ".join(f"{k} {v * 1e3:.2f} ms CPU" for k, v in costs.items())
          + f" per item in one process: {1 / costs['item']:.0f} images/s per fully used core, "
          f"{target * costs['item']:.1f} cores (workers) for {target:.0f} images/s")


def bench_paired_loader(args) -> None:
    """Images/s of a shuffled DataLoader over `open_paired` (PNG decode + latent read + collate)."""
    import torch
    from torch.utils.data import DataLoader

    from data.convert import convert_dataset
    from data.paired import open_paired

    work = tempfile.mkdtemp(prefix="bench-paired-")
    try:
        src = os.path.join(work, "train")
        make_jpeg_tree(src, args.images)
        root = os.path.join(work, "data")
        convert_dataset(src, os.path.join(root, "images"), resolution=(256, 256), workers=args.convert_workers,
                        progress=False)
        _write_random_latents(os.path.join(root, "images"), os.path.join(root, "vae-sd"), args.format)
        dataset = open_paired(root, resolution=256)
        png_kib = np.mean([os.path.getsize(os.path.join(root, "images", f)) for f in dataset.images.files]) / 1024
        print(f"{len(dataset)} images 256x256 (PNG level 1 from convert, mean {png_kib:.0f} KiB) + {args.format} "
              f"latents {dataset.item_shape}, batch {args.batch_size}, shuffled")
        _item_costs(dataset, args.target)
        for workers in args.workers:
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                drop_last=True, generator=torch.Generator().manual_seed(0))
            cpu = _cpu_seconds()
            batches = iter(loader)
            next(batches)  # worker start-up and the first batch are not counted
            t, count = time.time(), 0
            for images, moments, labels in batches:
                count += len(images)
            wall = time.time() - t
            del batches  # joins the workers, so that their CPU time is counted
            cpu = _cpu_seconds() - cpu
            per_worker = count / wall / max(workers, 1)
            print(f"paired loader, {workers} worker(s): {count / wall:.1f} images/s ({per_worker:.1f} per worker; "
                  f"{count} images in {wall:.1f} s), {(count + args.batch_size) / cpu:.1f} images per CPU-second "
                  f"(all processes); {args.target / per_worker:.1f} workers for {args.target:.0f} images/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--images", type=int, default=400)
    c.add_argument("--workers", type=int, default=None)
    c.add_argument("--png-compression", type=int, nargs="+", default=[1])
    e = sub.add_parser("encode")
    e.add_argument("--images", type=int, default=16)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--precision", nargs="+", default=["fp32"])
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p = sub.add_parser("paired-loader")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--format", choices=["per-image", "packed"], default="per-image")
    p.add_argument("--convert-workers", type=int, default=None)
    p.add_argument("--target", type=float, default=600.0, help="images/s one GPU consumes (SiT-XL/2: ~600)")
    args = parser.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    {"convert": bench_convert, "encode": bench_encode, "paired-loader": bench_paired_loader}[args.what](args)


if __name__ == "__main__":
    main()
