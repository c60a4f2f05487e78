"""Build the small real-image study dataset: class-conditional 32x32 crops of the photographs
bundled in the scikit-image wheel (no download, no network).

    python experiments/study/build_data.py --dest data/study [--train-per-class 1000]
        [--heldout-per-class 250] [--seed 0] [--size 32]

Classes (one per photograph, in this order; ``skimage.data`` function in brackets):
astronaut, coffee, chelsea (cat), rocket, hubble_deep_field, retina, immunohistochemistry,
motorcycle (``stereo_motorcycle()[0]``, the left view).

Each crop: a scale drawn uniformly from ``SCALES`` (fractions of the photograph's shorter
side: 1/8, 1/4, 1/2), a square box of that side at a uniformly drawn position, resized to
``size x size`` with PIL's Lanczos filter. Held-out crops are distinct from every training
crop (no identical box) and are drawn from the same distribution, so they may overlap
training crops in pixels; they are the reference for SWD, not a test of memorisation.

Output (``--dest``):

    train/    dataset.json + 00000/img00000000.png ...  (``dataset_tools.py convert`` format;
              ``train.py data_dir=DEST/train vae=none`` reads it)
    heldout/  the same layout
    crops.json          every crop: split, index, class, photograph, box [top, left, side]
    build_info.json     seed, counts, size, scales, classes, scikit-image / Pillow versions
    heldout_swd.npz     reference statistics for SWD (``evaluation.ref_stats`` format holding
                        ``swd_images`` = every held-out crop; use as ``eval_ref_stats``)

Deterministic: the same seed, sizes, scikit-image and Pillow versions give byte-identical files.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Callable, Dict, List, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.convert import image_relpath  # noqa: E402
from data.storage import atomic_write_bytes, atomic_write_json  # noqa: E402

SCALES = (0.125, 0.25, 0.5)
PNG_COMPRESS_LEVEL = 6


def photographs() -> Dict[str, Callable[[], np.ndarray]]:
    """Class name -> loader of the uint8 (H, W, 3) photograph, in class order."""
    import skimage.data as d

    return {"astronaut": d.astronaut, "coffee": d.coffee, "chelsea": d.chelsea, "rocket": d.rocket,
            "hubble_deep_field": d.hubble_deep_field, "retina": d.retina,
            "immunohistochemistry": d.immunohistochemistry, "motorcycle": lambda: d.stereo_motorcycle()[0]}


def draw_boxes(rng: np.random.Generator, shape: Tuple[int, int], count: int, taken: set) -> List[Tuple[int, int, int]]:
    """``count`` new ``(top, left, side)`` boxes inside ``shape`` not in ``taken`` (which is updated)."""
    h, w = shape
    boxes = []
    while len(boxes) < count:
        side = int(round(SCALES[rng.integers(len(SCALES))] * min(h, w)))
        box = (int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side)
        if box not in taken:
            taken.add(box)
            boxes.append(box)
    return boxes


def crop(photo: np.ndarray, box: Tuple[int, int, int], size: int) -> np.ndarray:
    """uint8 ``(size, size, 3)``: the square ``box`` of ``photo`` resized with Lanczos."""
    top, left, side = box
    return np.asarray(Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.LANCZOS))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def build(dest: str, train_per_class: int = 1000, heldout_per_class: int = 250, seed: int = 0,
          size: int = 32) -> Dict[str, object]:
    """Write the dataset under ``dest`` (see the module doc); returns build_info."""
    if train_per_class < 1 or heldout_per_class < 0 or size < 8:
        raise ValueError(f"need train_per_class >= 1, heldout_per_class >= 0, size >= 8; got "
                         f"{train_per_class}, {heldout_per_class}, {size}")
    import PIL
    import skimage

    classes = photographs()
    splits = {"train": train_per_class, "heldout": heldout_per_class}
    labels: Dict[str, list] = {name: [] for name in splits}
    crops = []
    for label, (name, load) in enumerate(classes.items()):
        photo = load()
        taken: set = set()
        for split_id, (split, count) in enumerate(splits.items()):
            rng = np.random.default_rng([seed, label, split_id])
            for box in draw_boxes(rng, photo.shape[:2], count, taken):
                idx = len(labels[split])
                rel = image_relpath(idx)
                atomic_write_bytes(os.path.join(dest, split, rel), _png(crop(photo, box, size)))
                labels[split].append([rel, label])
                crops.append({"split": split, "index": idx, "label": label, "photograph": name, "box": list(box)})
    for split in splits:
        atomic_write_json(os.path.join(dest, split, "dataset.json"), {"labels": labels[split], "classes": list(classes)})
    atomic_write_json(os.path.join(dest, "crops.json"), crops)
    info = {"seed": seed, "size": size, "scales": list(SCALES), "classes": list(classes),
            "train_per_class": train_per_class, "heldout_per_class": heldout_per_class,
            "scikit_image": skimage.__version__, "pillow": PIL.__version__}
    atomic_write_json(os.path.join(dest, "build_info.json"), info)
    if heldout_per_class:
        write_swd_reference(os.path.join(dest, "heldout"), os.path.join(dest, "heldout_swd.npz"))
    return info


def write_swd_reference(images: str, out: str) -> None:
    """``evaluation.ref_stats`` statistics of ``images`` holding only ``swd_images`` (all of them)."""
    from evaluation.ref_stats import compute_statistics
    from evaluation.stats_file import save_statistics

    stats = compute_statistics(images, inception=False, dinov2=False, swd_images=-1, workers=0, progress=False)
    stats.meta["source"] = os.path.basename(os.path.normpath(images))  # relative: the build stays byte-identical
    save_statistics(stats, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", required=True, help="output folder")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--heldout-per-class", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="crop size in pixels (default 32)")
    args = parser.parse_args(argv)
    try:
        info = build(args.dest, args.train_per_class, args.heldout_per_class, args.seed, args.size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dest}: {len(info['classes'])} classes x ({args.train_per_class} train + "
          f"{args.heldout_per_class} held-out) crops of {args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
