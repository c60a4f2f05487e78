"""The CPU demo's dataset: coloured shapes, generated deterministically (no download).

Class `k` is one shape in one colour (red disc, green square, blue triangle, ...) on a dark
background, with random position, size, colour shade and background tint, so the classes
are visibly distinct but every image differs. `write_demo_dataset` writes a normal image
dataset in the SPEC §7 layout (`{idx//1000:05d}/img{idx:08d}.png` + `dataset.json` with
`labels` and `classes`), so the trainer reads it through `data.open_dataset` like any other.
The output depends only on (resolution, num_classes, images_per_class, seed).

The writer holds an exclusive lock (flock) on the folder that holds `path` while it writes. A
temporary folder `.tmp-<hex>-<name>` of this dataset found beside it while holding that lock was
left by a writer that died (kill -9 runs no cleanup): a live one would hold the lock. Those are
removed; anything else there is left alone. A second writer of the same dataset waits for the
first and then finds the dataset complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import numpy as np
from PIL import Image, ImageDraw

from utils.atomic import TMP_PREFIX, temporary_folder

# (name, RGB) per class; the shape is drawn by `_draw_shape`.
CLASSES = [
    ("red disc", (230, 40, 40)),
    ("green square", (40, 200, 60)),
    ("blue triangle", (50, 90, 240)),
    ("yellow cross", (240, 220, 40)),
    ("magenta ring", (220, 50, 220)),
    ("cyan bars", (40, 220, 230)),
    ("orange diamond", (250, 140, 20)),
    ("white x", (240, 240, 240)),
    ("purple half-disc", (140, 60, 200)),
    ("lime frame", (160, 240, 60)),
]
MAX_CLASSES = len(CLASSES)
SUPERSAMPLE = 4


def _draw_shape(draw: ImageDraw.ImageDraw, k: int, cx: float, cy: float, r: float, color) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(1, round(r * 0.35))
    if k == 0:
        draw.ellipse(box, fill=color)
    elif k == 1:
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
    elif k == 2:
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=color)
    elif k == 3:
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=color)
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=color)
    elif k == 4:
        draw.ellipse(box, outline=color, width=w)
    elif k == 5:
        gap = r * 0.7
        for dy in (-gap, 0.0, gap):
            draw.rectangle((cx - r, cy + dy - w / 3, cx + r, cy + dy + w / 3), fill=color)
    elif k == 6:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif k == 7:
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=color, width=w)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=color, width=w)
    elif k == 8:
        draw.pieslice(box, 180, 360, fill=color)
    elif k == 9:
        draw.rectangle(box, outline=color, width=w)
    else:
        raise ValueError(f"demo class {k} does not exist (at most {MAX_CLASSES})")


def render_demo_image(k: int, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `k` at `resolution` x `resolution`."""
    big = resolution * SUPERSAMPLE
    bg = tuple(int(v) for v in rng.integers(0, 50, size=3))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    r = big * rng.uniform(0.26, 0.36)
    margin = r * 1.05
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    shade = rng.uniform(0.8, 1.0)
    color = tuple(int(np.clip(c * shade + rng.integers(-15, 16), 0, 255)) for c in CLASSES[k][1])
    _draw_shape(draw, k, cx, cy, r, color)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def demo_dataset_is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset.json"))


@contextlib.contextmanager
def _writer_lock(folder: str):
    """Exclusive flock on `folder` for the time of the block; yields False (no lock, so no
    cleanup) where flock is unavailable (Windows, a file system without locks)."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _remove_stale_temporaries(parent: str, name: str) -> None:
    """Remove `parent/.tmp-<hex>-<name>` folders (utils.atomic's names for this dataset); called
    with the writer lock held, so their writer is dead."""
    pattern = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]+-" + re.escape(name) + r"\Z")
    for entry in os.scandir(parent):
        if pattern.match(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def write_demo_dataset(path: str, resolution: int = 32, num_classes: int = 8,
                       images_per_class: int = 200, seed: int = 0) -> str:
    """Write the demo dataset to `path` (atomically: a temporary folder, then rename).

    Does nothing if `path` already holds a dataset.json. Returns `path`.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the demo dataset has at most {MAX_CLASSES} classes, got num_classes={num_classes}")
    if demo_dataset_is_complete(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with _writer_lock(parent) as locked:
        if demo_dataset_is_complete(path):  # written by another writer while this one waited
            return path
        if os.path.exists(path) and os.listdir(path):
            raise ValueError(f"{path!r} exists, is not empty and holds no dataset.json; refusing to write "
                             "the demo dataset there (choose another data_dir or remove the folder)")
        if locked:
            _remove_stale_temporaries(parent, name)
        _write_into_place(path, parent, name, resolution, num_classes, images_per_class, seed)
    return path


def _write_into_place(path: str, parent: str, base: str, resolution: int, num_classes: int,
                      images_per_class: int, seed: int) -> None:
    tmp = temporary_folder(parent, base)  # 0777 less the umask, like mkdir
    try:
        labels = []
        n = num_classes * images_per_class
        for idx in range(n):
            k = idx % num_classes  # interleaved, so any prefix is class-balanced
            rng = np.random.default_rng([seed, idx])
            relpath = f"{idx // 1000:05d}/img{idx:08d}.png"
            os.makedirs(os.path.join(tmp, os.path.dirname(relpath)), exist_ok=True)
            render_demo_image(k, resolution, rng).save(os.path.join(tmp, relpath), compress_level=1)
            labels.append([relpath, k])
        meta = {"labels": labels, "classes": [name for name, _ in CLASSES[:num_classes]]}
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(meta, f)
        if os.path.exists(path):
            os.rmdir(path)  # empty (checked above)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def demo_grid(resolution: int = 32, num_classes: int = 8, per_class: int = 8, seed: int = 0) -> Image.Image:
    """A grid of real demo images (one class per row), for comparing with the samples."""
    tile = resolution + 2
    grid = Image.new("RGB", (per_class * tile, num_classes * tile))
    for k in range(num_classes):
        for j in range(per_class):
            img = render_demo_image(k, resolution, np.random.default_rng([seed, j * num_classes + k]))
            grid.paste(img, (j * tile + 1, k * tile + 1))
    return grid


if __name__ == "__main__":  # python -m training.demo_data out.png : look at the classes
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "demo_classes.png"
    demo_grid().resize((8 * 34 * 4, 8 * 34 * 4), Image.Resampling.NEAREST).save(out)
    print(out)
