"""The exact SWD (every projection kept and sorted), as evaluation.swd computed it before it streamed.

The independent reference of the streamed computation: it shares the random draws (pyramid,
patch corners, directions) with ``evaluation.swd`` and keeps every descriptor of both sets in
memory (``N * 128 * 147 * 4`` bytes per set and level), so use it on small sets only.
"""
import numpy as np

from evaluation.swd import (DIRECTIONS, MIN_RESOLUTION, PATCHES_PER_IMAGE, REPEATS, SCALE, SWDResult,
                            extract_patches, laplacian_pyramid, patch_positions, pyramid_resolutions,
                            random_directions)


def normalize_descriptors(desc: np.ndarray, channels: int = 3) -> np.ndarray:
    """Per-channel standardisation of ``(M, 7 * 7 * C)`` descriptors over the whole set."""
    view = desc.reshape(len(desc), -1, channels)
    mean = view.mean(axis=(0, 1), dtype=np.float64)
    std = view.std(axis=(0, 1), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    return ((view - mean) / std).astype(np.float32).reshape(desc.shape)


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W1 between the empirical distributions of each column: ``(n, K)``, ``(m, K)`` -> ``(K,)`` float64."""
    a, b = np.sort(a, axis=0), np.sort(b, axis=0)
    n, m = len(a), len(b)
    if n == m:
        return np.abs(a.astype(np.float64) - b).mean(axis=0)
    breaks = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid, width = (breaks[:-1] + breaks[1:]) / 2, np.diff(breaks)
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return (width[:, None] * np.abs(a[ia].astype(np.float64) - b[ib])).sum(axis=0)


def exact_swd(a, b, *, seed=0, patches_per_image=PATCHES_PER_IMAGE, directions=DIRECTIONS, repeats=REPEATS,
              min_resolution=MIN_RESOLUTION, chunk=256) -> SWDResult:
    resolutions = pyramid_resolutions(a.shape[1], a.shape[2], min_resolution)
    count = max(len(a), len(b))
    descriptors = [[] for _ in resolutions]
    for images in (a, b):
        parts = [[] for _ in resolutions]
        for start in range(0, len(images), chunk):
            pyramid = laplacian_pyramid(images[start:start + chunk], len(resolutions))
            for level, band in enumerate(pyramid):
                top, left = patch_positions(seed, level, count, band.shape[1], band.shape[2], patches_per_image)
                stop = start + len(band)
                parts[level].append(extract_patches(band, top[start:stop], left[start:stop]))
        for level in range(len(resolutions)):
            descriptors[level].append(normalize_descriptors(np.concatenate(parts[level])))
    per_level = []
    for level, (da, db) in enumerate(descriptors):
        dirs = random_directions(seed, level, da.shape[1], repeats, directions).astype(np.float32)
        per_level.append(float(np.mean([wasserstein_1d(da @ d, db @ d).mean() for d in dirs])) * SCALE)
    return SWDResult(tuple(resolutions), tuple(per_level), float(np.mean(per_level)))
