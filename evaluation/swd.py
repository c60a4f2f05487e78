"""SWD: the multi-scale sliced Wasserstein distance of ProGAN (Karras et al. 2018, "Progressive
growing of GANs", section 5 and ``metrics/sliced_wasserstein.py`` of its code), in numpy.

``swd(a, b)`` compares two sets of uint8 ``[N, H, W, 3]`` images; it needs no network weights.

Recipe (ProGAN's semantics; constants are ProGAN's defaults):

1. **Laplacian pyramid** of each image in float32 (values 0..255), with the 5x5 binomial
   kernel ``[1, 4, 6, 4, 1]^T [1, 4, 6, 4, 1] / 256`` and mirror boundaries (scipy's
   ``mode="mirror"``: ``d c b | a b c d | c b a``): ``G_{l+1} = blur(G_l)[::2, ::2]``,
   ``L_l = G_l - blur4(upsample0(G_{l+1}))`` (zeros inserted, kernel x 4), and the last level
   is the low-pass ``G_last``. Levels go down to ``min_resolution = 16`` px (the smaller image
   side): 32x32 images give 2 levels (32 Laplacian, 16 low-pass), 64 -> 3, 256 -> 5.
2. **Descriptors**: ``patches_per_image = 128`` random 7x7 patches per image and level, fully
   inside the level (centres uniform in ``[3, size - 4]``), each flattened as
   ``(row, column, channel)`` = 147 numbers.
3. **Normalisation**: per colour channel, the mean and (population) std over all descriptors
   of that set and level (each set with its own statistics, as ProGAN does; a global colour
   shift of a whole set is therefore not measured).
4. **Sliced Wasserstein**: ``repeats = 4`` rounds of ``directions = 128`` random unit
   directions in the 147-d space; the 1-d Wasserstein-1 distance between the two projected
   descriptor sets per direction (sorted projections: mean absolute difference), averaged
   over directions and rounds.
5. Reported **x 1e3** per level (ProGAN's ``SWDx1e3_<res>``) and the mean over levels.

Determinism: given ``seed``, the patch positions (shared by both sets: image ``i`` of ``a``
and image ``i`` of ``b`` use the same positions, so ``swd(a, a) == 0`` exactly) and the
directions are fixed; each level draws from its own stream. Sets of different sizes are
allowed: the 1-d distance is then the exact integral between the two empirical quantile
functions (equal sizes reduce to ProGAN's sorted difference).

Cost: descriptors are held in memory, ``N * 128 * 147 * 4`` bytes per set and level (about
75 KB per image: 750 MB for 10k images); time is dominated by sorting ``N * 128`` projections
for each of the 512 directions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage

PATCH_SIZE = 7
PATCHES_PER_IMAGE = 128
DIRECTIONS = 128
REPEATS = 4
MIN_RESOLUTION = 16
SCALE = 1e3
BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # outer(k, k) = the 5x5 kernel / 256


@dataclass(frozen=True)
class SWDResult:
    """``per_level[i]`` (x 1e3) belongs to ``resolutions[i]`` (finest first); ``mean`` averages them."""

    resolutions: Tuple[int, ...]
    per_level: Tuple[float, ...]
    mean: float

    def as_dict(self, prefix: str = "swd") -> Dict[str, float]:
        """Flat metrics: ``{"swd": mean, "swd_32": ..., "swd_16": ...}``."""
        out = {prefix: self.mean}
        out.update({f"{prefix}_{res}": value for res, value in zip(self.resolutions, self.per_level)})
        return out


def pyramid_resolutions(height: int, width: int, min_resolution: int = MIN_RESOLUTION) -> List[int]:
    """Smaller image side at each pyramid level, finest first, while it is >= ``min_resolution``."""
    side, out = min(height, width), []
    while side >= min_resolution:
        out.append(side)
        side = (side + 1) // 2
    return out


def _blur(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Separable 5x5 binomial blur of ``(N, H, W, C)`` over H and W, mirror boundaries."""
    k = (BINOMIAL_5 * gain).astype(x.dtype)
    return ndimage.convolve1d(ndimage.convolve1d(x, k, axis=1, mode="mirror"), k, axis=2, mode="mirror")


def laplacian_pyramid(images: np.ndarray, levels: int) -> List[np.ndarray]:
    """float32 pyramid of uint8 ``(N, H, W, C)`` images: ``levels - 1`` band-pass levels, then the low-pass."""
    current = images.astype(np.float32)
    out = []
    for _ in range(levels - 1):
        down = _blur(current)[:, ::2, ::2]
        up = np.zeros_like(current)
        up[:, ::2, ::2] = down
        out.append(current - _blur(up, gain=2.0))  # 2 x 2 = ProGAN's kernel x 4
        current = down
    out.append(current)
    return out


def patch_positions(seed: int, level: int, count: int, height: int, width: int,
                    patches: int = PATCHES_PER_IMAGE) -> Tuple[np.ndarray, np.ndarray]:
    """Top-left corners ``(count, patches)`` of the 7x7 patches of images ``0..count-1`` at ``level``.

    Drawn as uniform floats, so the first ``n`` images get the same positions whatever ``count`` is.
    """
    u = np.random.default_rng([seed, level, 0]).random((count, patches, 2))
    top = np.floor(u[..., 0] * (height - PATCH_SIZE + 1)).astype(np.int64)
    left = np.floor(u[..., 1] * (width - PATCH_SIZE + 1)).astype(np.int64)
    return top, left


def random_directions(seed: int, level: int, dim: int, repeats: int = REPEATS,
                      directions: int = DIRECTIONS) -> np.ndarray:
    """Unit columns ``(repeats, dim, directions)`` float64, fixed by ``seed`` and ``level``."""
    d = np.random.default_rng([seed, level, 1]).standard_normal((repeats, dim, directions))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def extract_patches(level: np.ndarray, top: np.ndarray, left: np.ndarray) -> np.ndarray:
    """``(N * P, 7 * 7 * C)`` descriptors of ``level (N, h, w, C)`` at corners ``(N, P)``."""
    n, p = top.shape
    off = np.arange(PATCH_SIZE)
    rows = (top.reshape(-1)[:, None] + off)[:, :, None]
    cols = (left.reshape(-1)[:, None] + off)[:, None, :]
    img = np.repeat(np.arange(n), p)[:, None, None]
    return level[img, rows, cols].reshape(n * p, -1)


def normalize_descriptors(desc: np.ndarray, channels: int = 3) -> np.ndarray:
    """Per-channel standardisation of ``(M, 7 * 7 * C)`` descriptors (channel = last index)."""
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
    # Quantile functions are step functions with breaks at i/n and j/m; integrate piecewise.
    breaks = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid, width = (breaks[:-1] + breaks[1:]) / 2, np.diff(breaks)
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return (width[:, None] * np.abs(a[ia].astype(np.float64) - b[ib])).sum(axis=0)


def _check_images(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or len(x) == 0:
        raise ValueError(f"swd: {name} must be uint8 [N, H, W, 3] with N >= 1, got {x.dtype} {x.shape}")
    return x


def swd(a: np.ndarray, b: np.ndarray, *, seed: int = 0, patches_per_image: int = PATCHES_PER_IMAGE,
        directions: int = DIRECTIONS, repeats: int = REPEATS, min_resolution: int = MIN_RESOLUTION,
        chunk: int = 256) -> SWDResult:
    """Multi-scale sliced Wasserstein distance (x 1e3) between uint8 image sets ``a``, ``b``.

    ``a (Na, H, W, 3)`` and ``b (Nb, H, W, 3)`` must have the same image size (``min(H, W)``
    >= ``min_resolution``); ``Na != Nb`` is allowed. ``chunk`` images are turned into
    pyramids at a time (memory only; the result does not depend on it).
    """
    a, b = _check_images(a, "a"), _check_images(b, "b")
    if min_resolution < PATCH_SIZE:
        raise ValueError(f"swd: min_resolution must be >= {PATCH_SIZE} (the patch size), got {min_resolution}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"swd: the two sets hold images of different sizes {a.shape[1:3]} vs {b.shape[1:3]}")
    resolutions = pyramid_resolutions(a.shape[1], a.shape[2], min_resolution)
    if not resolutions:
        raise ValueError(f"swd: images of {a.shape[1]}x{a.shape[2]} are smaller than min_resolution={min_resolution}")
    count = max(len(a), len(b))
    descriptors: List[List[np.ndarray]] = [[] for _ in resolutions]
    for images in (a, b):
        parts: List[List[np.ndarray]] = [[] for _ in resolutions]
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
