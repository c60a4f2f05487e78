"""Throughput of `dataset_tools.py convert` and `encode` on synthetic data (numbers: docs/DATA.md).

    python -m data.benchmark convert --images 400             # ~500x375 JPEGs -> 256x256 PNGs
    python -m data.benchmark encode --images 16 --batch-size 8 # SD-VAE architecture, random weights

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
    args = parser.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    bench_convert(args) if args.what == "convert" else bench_encode(args)


if __name__ == "__main__":
    main()
