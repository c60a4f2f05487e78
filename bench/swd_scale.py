"""SWD as the image count grows: the data of the memory table in docs/PERFORMANCE.md ("Cost as work
grows") and the agreement of the streamed SWD with the exact one (``tests/swd_exact.py``).

    python -m bench.swd_scale data --dest /tmp/swd --sizes 250 1000 4000 --resolution 64
    python -m bench.swd_scale agreement --dest /tmp/swd --sizes 250 1000 4000 --out docs/perf/swd-agreement.json

``data`` writes ``ref_N.npz`` and ``smp_N.npz`` (uint8 ``[N, R, R, 3]``): square crops of the
``skimage.data`` photographs resized with Lanczos, the reference from four photographs and the samples
from the same four plus a fifth, so the two sets are alike but not equal (both seeded; the first N
images of a larger set are the N-image set). The memory and time of the commands that read them are
measured from outside, per command (``/usr/bin/time -v`` or any harness that reports peak RSS).
``agreement`` computes SWD both ways on the same images and prints the relative differences.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SAMPLE_PHOTOS = REFERENCE_PHOTOS + ("immunohistochemistry",)


def crops(photos, count: int, size: int, seed: int) -> np.ndarray:
    """uint8 ``(count, size, size, 3)``: image i is a random square crop (20-60 % of the short side) of
    photograph ``i % len(photos)``, resized to ``size``."""
    import skimage.data
    from PIL import Image

    loaded = [getattr(skimage.data, name)()[..., :3] for name in photos]
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        photo = loaded[i % len(loaded)]
        side = int(rng.uniform(0.2, 0.6) * min(photo.shape[:2]))
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        out[i] = np.asarray(Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size),
                                                                                              Image.LANCZOS))
    return out


def write_data(dest: str, sizes, resolution: int) -> None:
    os.makedirs(dest, exist_ok=True)
    largest = max(sizes)
    ref, smp = crops(REFERENCE_PHOTOS, largest, resolution, 0), crops(SAMPLE_PHOTOS, largest, resolution, 1)
    for n in sizes:
        np.savez(os.path.join(dest, f"ref_{n}.npz"), arr_0=ref[:n])
        np.savez(os.path.join(dest, f"smp_{n}.npz"), arr_0=smp[:n])
        print(f"wrote {dest}/ref_{n}.npz and smp_{n}.npz ({n} images of {resolution}x{resolution})")


def agreement(dest: str, sizes) -> list:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from swd_exact import exact_swd

    from evaluation.swd import swd

    rows = []
    for n in sizes:
        with np.load(os.path.join(dest, f"ref_{n}.npz")) as f:
            ref = f["arr_0"]
        with np.load(os.path.join(dest, f"smp_{n}.npz")) as f:
            smp = f["arr_0"]
        t0 = time.perf_counter()
        exact = exact_swd(smp, ref)
        t1 = time.perf_counter()
        streamed = swd(smp, ref)
        t2 = time.perf_counter()
        rel = [s / e - 1 for s, e in zip(streamed.per_level, exact.per_level)]
        rows.append({"images": n, "resolutions": list(exact.resolutions), "exact": list(exact.per_level),
                     "streamed": list(streamed.per_level), "relative_difference": rel,
                     "mean_exact": exact.mean, "mean_streamed": streamed.mean,
                     "mean_relative_difference": streamed.mean / exact.mean - 1,
                     "seconds_exact": t1 - t0, "seconds_streamed": t2 - t1})
        print(f"{n} images: exact {exact.mean:.3f}, streamed {streamed.mean:.3f} "
              f"({rows[-1]['mean_relative_difference']:+.2e}; per level {', '.join(f'{r:+.1e}' for r in rel)})")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("data", "agreement"))
    parser.add_argument("--dest", required=True, help="folder of the .npz files")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", default=None, help="agreement: also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.what == "data":
        write_data(args.dest, args.sizes, args.resolution)
        return 0
    rows = agreement(args.dest, args.sizes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
