"""SWD: the multi-scale sliced Wasserstein distance of ProGAN (Karras et al. 2018, "Progressive
growing of GANs", section 5 and ``metrics/sliced_wasserstein.py`` of its code), streamed.

``swd(a, b)`` compares two sets of uint8 ``[N, H, W, 3]`` images; it needs no network weights.
:class:`SWDSketch` is the same computation as an accumulator (``evaluation.metric_base``): it reads
an image set batch by batch, in memory that does not grow with the number of images, and its
:class:`SWDSummary` is what a statistics file stores of a reference set.

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
   descriptor sets per direction, averaged over directions and rounds.
5. Reported **x 1e3** per level (ProGAN's ``SWDx1e3_<res>``) and the mean over levels.

**Streaming, and the one approximation.** Step 3 needs the whole set before any descriptor can be
projected, so a set is read twice: pass 1 accumulates each level's per-channel count, mean and
squared deviations (merged exactly across batches and processes, Chan et al.); pass 2 normalises,
projects and adds every projection to a fixed histogram per direction and level. The histogram
has ``SKETCH_BINS = 2048`` bins, uniform in ``asinh(x / 0.25)`` over ``|x| <= 1e4`` (normalised
units; bins of ~0.003 near 0, ~0.6 % of |x| in the tails; a value beyond 1e4 standard deviations
falls into the last bin). W1 is then ``integral |F_a - F_b|`` with both CDFs exact at the bin
edges and linear inside a bin. Against the exact computation (every projection sorted; kept in
``tests/swd_exact.py``) this reads the value a little low, by ~0.1 % of it on sets of similar
images (the part of W1 that comes from sampling noise finer than a bin is lost) and ~0.01 % on
dissimilar sets; ProGAN's own seed-to-seed spread (other patches, other directions) is ~2 %.
Identical sets still give exactly 0. Memory: one 8 MB histogram (int64) per level and set,
whatever the number of images; the images are processed ``2**20`` pixels at a time.

Determinism: given ``seed``, the patch positions of image ``i`` (its position in its set) and the
directions are fixed, each level with its own stream, and image ``i`` of either set uses the same
positions, so ``swd(a, a) == 0`` exactly. Sets of different sizes are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .metric_base import Accumulator, array_batches, stream

PATCH_SIZE = 7
PATCHES_PER_IMAGE = 128
DIRECTIONS = 128
REPEATS = 4
MIN_RESOLUTION = 16
SCALE = 1e3
BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # outer(k, k) = the 5x5 kernel / 256
SKETCH_BINS = 2048
SKETCH_WIDTH = 0.25   # bins are uniform in asinh(x / SKETCH_WIDTH)
SKETCH_RANGE = 1e4    # |x| covered, in standard deviations of the normalised descriptors
PIXELS_PER_CHUNK = 2 ** 20
ROWS_PER_CHUNK = 4096


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


@dataclass(frozen=True)
class SWDSettings:
    """What fixes an SWD value besides the images: the seed and ProGAN's constants, and the sketch."""

    seed: int = 0
    patches_per_image: int = PATCHES_PER_IMAGE
    directions: int = DIRECTIONS
    repeats: int = REPEATS
    min_resolution: int = MIN_RESOLUTION
    bins: int = SKETCH_BINS

    def as_meta(self) -> Dict[str, int]:
        return {"swd_seed": self.seed, "patches_per_image": self.patches_per_image, "directions": self.directions,
                "repeats": self.repeats, "min_resolution": self.min_resolution, "bins": self.bins}


@dataclass
class SWDSummary:
    """A set's histograms ``(levels, repeats * directions, bins)`` int64 of normalised projections
    (level 0 = ``resolutions[0]``, the finest), over ``count`` images."""

    resolutions: Tuple[int, ...]
    histograms: np.ndarray
    count: int


def pyramid_resolutions(height: int, width: int, min_resolution: int = MIN_RESOLUTION) -> List[int]:
    """Smaller image side at each pyramid level, finest first, while it is >= ``min_resolution``."""
    side, out = min(height, width), []
    while side >= min_resolution:
        out.append(side)
        side = (side + 1) // 2
    return out


def _blur(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Separable 5x5 binomial blur of ``(N, H, W, C)`` over H and W, mirror boundaries."""
    from scipy import ndimage  # scipy when used: training imports the metric registry

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


def patch_positions_at(seed: int, level: int, indices: Sequence[int], height: int, width: int,
                       patches: int = PATCHES_PER_IMAGE) -> Tuple[np.ndarray, np.ndarray]:
    """Top-left corners ``(len(indices), patches)`` of the 7x7 patches of images ``indices`` at ``level``.

    Image ``i``'s corners are uniform floats number ``2 * patches * i ...`` of the level's stream, so
    they depend on ``i`` only (the stream is jumped to them, not drawn up to them).
    """
    indices = np.asarray(indices, np.int64)
    u = np.empty((len(indices), patches, 2))
    if len(indices):
        lo, hi = int(indices.min()), int(indices.max()) + 1
        spans = [(lo, hi, slice(None))] if hi - lo <= 8 * len(indices) + 64 else \
            [(int(i), int(i) + 1, slice(j, j + 1)) for j, i in enumerate(indices)]
        for start, stop, rows in spans:
            bits = np.random.PCG64(np.random.SeedSequence([seed, level, 0]))
            bits.advance(start * patches * 2)  # one 64-bit draw per float
            block = np.random.Generator(bits).random((stop - start, patches, 2))
            u[rows] = block[indices[rows] - start] if rows == slice(None) else block
    top = np.floor(u[..., 0] * (height - PATCH_SIZE + 1)).astype(np.int64)
    left = np.floor(u[..., 1] * (width - PATCH_SIZE + 1)).astype(np.int64)
    return top, left


def patch_positions(seed: int, level: int, count: int, height: int, width: int,
                    patches: int = PATCHES_PER_IMAGE) -> Tuple[np.ndarray, np.ndarray]:
    """Corners ``(count, patches)`` of images ``0..count-1`` (:func:`patch_positions_at`)."""
    return patch_positions_at(seed, level, np.arange(count), height, width, patches)


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


def sketch_edges(bins: int = SKETCH_BINS) -> np.ndarray:
    """The ``bins + 1`` histogram edges (float64, symmetric about 0; see the module doc)."""
    z = np.arcsinh(SKETCH_RANGE / SKETCH_WIDTH)
    return SKETCH_WIDTH * np.sinh(np.linspace(-z, z, bins + 1))


def _bin_of(x: np.ndarray, bins: int) -> np.ndarray:
    z = np.arcsinh(SKETCH_RANGE / SKETCH_WIDTH)
    pos = (np.arcsinh(x.astype(np.float64) / SKETCH_WIDTH) + z) * (bins / (2 * z))
    return np.clip(np.floor(pos), 0, bins - 1).astype(np.int64)


class SWDSketch(Accumulator):
    """SWD's accumulator (two passes; see the module doc). ``subset``: sorted indices of the images of
    the set to use (image ``subset[j]`` then counts as image ``j``); ``limit``: only images ``< limit``."""

    passes = 2

    def __init__(self, settings: SWDSettings = SWDSettings(), limit: Optional[int] = None,
                 subset: Optional[np.ndarray] = None):
        super().__init__(("images",), limit)
        if settings.min_resolution < PATCH_SIZE:
            raise ValueError(f"swd: min_resolution must be >= {PATCH_SIZE} (the patch size), got "
                             f"{settings.min_resolution}")
        self.settings = settings
        self.subset = None if subset is None else np.asarray(subset, np.int64)
        self.pass_index = 0
        self.shape: Optional[Tuple[int, int]] = None
        self.resolutions: Tuple[int, ...] = ()
        self.count = 0
        # pass 1: per level, (count, mean (3,), squared deviations (3,)) of the descriptor values per channel
        self.moments: List[Tuple[int, np.ndarray, np.ndarray]] = []
        self.norm: List[Tuple[np.ndarray, np.ndarray]] = []
        self.histograms: Optional[np.ndarray] = None
        self._directions: Optional[List[np.ndarray]] = None

    def _start(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"swd: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        h, w = images.shape[1:3]
        if self.shape is None:
            resolutions = pyramid_resolutions(h, w, self.settings.min_resolution)
            if not resolutions:
                raise ValueError(f"swd: images of {h}x{w} are smaller than min_resolution={self.settings.min_resolution}")
            self.shape, self.resolutions = (h, w), tuple(resolutions)
            self.moments = [(0, np.zeros(3), np.zeros(3)) for _ in resolutions]
        elif (h, w) != self.shape:
            raise ValueError(f"swd: images of different sizes in one set: {self.shape} and {(h, w)}")

    def update(self, features, indices):
        images = features["images"]
        self._start(images)
        if self.subset is not None:
            pos = np.searchsorted(self.subset, indices)
            keep = (pos < len(self.subset)) & (self.subset[np.minimum(pos, len(self.subset) - 1)] == indices)
            images, indices = images[keep], pos[keep]
        chunk = max(1, PIXELS_PER_CHUNK // (self.shape[0] * self.shape[1]))
        for start in range(0, len(indices), chunk):
            self._levels(images[start:start + chunk], indices[start:start + chunk])
        if self.pass_index == 0:
            self.count += len(indices)

    def _levels(self, images: np.ndarray, indices: np.ndarray) -> None:
        s = self.settings
        for level, band in enumerate(laplacian_pyramid(images, len(self.resolutions))):
            top, left = patch_positions_at(s.seed, level, indices, band.shape[1], band.shape[2], s.patches_per_image)
            desc = extract_patches(band, top, left)
            if self.pass_index == 0:
                self._add_moments(level, desc)
            else:
                self._add_projections(level, desc)

    def _add_moments(self, level: int, desc: np.ndarray) -> None:
        view = desc.reshape(-1, 3)
        n_b, mean_b = len(view), view.mean(axis=0, dtype=np.float64)
        m2_b = ((view - mean_b) ** 2).sum(axis=0)
        self.moments[level] = _merge_moments(self.moments[level], (n_b, mean_b, m2_b))

    def _add_projections(self, level: int, desc: np.ndarray) -> None:
        mean, std = self.norm[level]
        directions, bins = self._directions[level], self.settings.bins
        offsets = np.arange(directions.shape[1]) * bins
        for start in range(0, len(desc), ROWS_PER_CHUNK):
            part = desc[start:start + ROWS_PER_CHUNK]
            normed = ((part.reshape(len(part), -1, 3) - mean) / std).astype(np.float32).reshape(part.shape)
            flat = (_bin_of(normed @ directions, bins) + offsets).ravel()
            self.histograms[level] += np.bincount(flat, minlength=self.histograms[level].size).reshape(
                self.histograms[level].shape)

    def merge(self, other: "SWDSketch") -> None:
        if other.shape is None:
            return
        if self.shape is None:
            self.shape, self.resolutions = other.shape, other.resolutions
            self.moments = [(0, np.zeros(3), np.zeros(3)) for _ in other.resolutions]
        if other.shape != self.shape:
            raise ValueError(f"swd: images of different sizes in one set: {self.shape} and {other.shape}")
        if self.pass_index == 0:
            self.count += other.count
            self.moments = [_merge_moments(a, b) for a, b in zip(self.moments, other.moments)]
        else:
            self.histograms += other.histograms

    def next_pass(self) -> None:
        s = self.settings
        self.pass_index = 1
        if self.shape is None:
            return
        self.norm = []
        for n, mean, m2 in self.moments:
            std = np.sqrt(m2 / max(n, 1))
            self.norm.append((mean, np.where(std > 0, std, 1.0)))
        dim = PATCH_SIZE * PATCH_SIZE * 3
        self._directions = [np.concatenate(list(random_directions(s.seed, level, dim, s.repeats, s.directions)),
                                           axis=1).astype(np.float32) for level in range(len(self.resolutions))]
        self.histograms = np.zeros((len(self.resolutions), s.repeats * s.directions, s.bins), np.int64)

    def result(self) -> SWDSummary:
        if self.shape is None or self.count == 0:
            raise ValueError("swd: an image set needs at least one image")
        return SWDSummary(self.resolutions, self.histograms, self.count)

    def __getstate__(self):  # the directions are rebuilt from the seed, not shipped between processes
        return {**self.__dict__, "_directions": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.pass_index == 1 and self.shape is not None:
            s = self.settings
            self._directions = [np.concatenate(list(random_directions(s.seed, level, PATCH_SIZE ** 2 * 3, s.repeats,
                                                                      s.directions)), axis=1).astype(np.float32)
                                for level in range(len(self.resolutions))]


def _merge_moments(a, b):
    """Chan et al.'s exact merge of (count, mean, squared deviations) of two parts."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    if n_b == 0:
        return a
    if n_a == 0:
        return b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta ** 2 * (n_a * n_b / n)


def wasserstein_from_histograms(a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """W1 per row of two histograms ``(K, bins)`` on ``edges (bins + 1,)``: ``integral |F_a - F_b|``
    with each CDF exact at the edges and linear inside a bin; ``(K,)`` float64."""
    def cdf(h):
        c = np.cumsum(h, axis=1, dtype=np.float64)
        return np.concatenate([np.zeros((len(h), 1)), c / c[:, -1:]], axis=1)

    d = cdf(a) - cdf(b)
    d0, d1 = d[:, :-1], d[:, 1:]
    total = np.abs(d0) + np.abs(d1)
    # a linear difference that changes sign inside the bin: two triangles
    crossing = (d0 ** 2 + d1 ** 2) / (2 * np.where(total > 0, total, 1.0))
    per_bin = np.where(d0 * d1 >= 0, total / 2, crossing)
    return per_bin @ np.diff(edges)


def swd_distance(a: SWDSummary, b: SWDSummary) -> SWDResult:
    """SWD (x 1e3) of two summaries made with the same :class:`SWDSettings`."""
    if a.resolutions != b.resolutions or a.histograms.shape != b.histograms.shape:
        raise ValueError(f"swd: the two sets were summarised differently (levels {a.resolutions} vs "
                         f"{b.resolutions}, histograms {a.histograms.shape} vs {b.histograms.shape})")
    edges = sketch_edges(a.histograms.shape[-1])
    per_level = tuple(float(wasserstein_from_histograms(ha, hb, edges).mean()) * SCALE
                      for ha, hb in zip(a.histograms, b.histograms))
    return SWDResult(a.resolutions, per_level, float(np.mean(per_level)))


def summarize(images: np.ndarray, settings: SWDSettings = SWDSettings(), batch_size: int = 256) -> SWDSummary:
    """The :class:`SWDSummary` of uint8 ``(N, H, W, 3)`` images held in memory (image i = row i)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"swd: images must be uint8 [N, H, W, 3] with N >= 1, got {images.dtype} {images.shape}")
    sketch = stream({"swd": SWDSketch(settings)}, array_batches(images, batch_size=batch_size),
                    lambda batch, kinds: {"images": batch})["swd"]
    return sketch.result()


def swd(a: np.ndarray, b: np.ndarray, *, seed: int = 0, patches_per_image: int = PATCHES_PER_IMAGE,
        directions: int = DIRECTIONS, repeats: int = REPEATS, min_resolution: int = MIN_RESOLUTION,
        chunk: int = 256) -> SWDResult:
    """Multi-scale sliced Wasserstein distance (x 1e3) between uint8 image sets ``a``, ``b``.

    ``a (Na, H, W, 3)`` and ``b (Nb, H, W, 3)`` must have the same image size (``min(H, W)``
    >= ``min_resolution``); ``Na != Nb`` is allowed. ``chunk`` images are read at a time (memory
    only; the result does not depend on it beyond float rounding of the normalisation).
    """
    settings = SWDSettings(seed, patches_per_image, directions, repeats, min_resolution)
    for x, name in ((a, "a"), (b, "b")):
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or len(x) == 0:
            raise ValueError(f"swd: {name} must be uint8 [N, H, W, 3] with N >= 1, got {x.dtype} {x.shape}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"swd: the two sets hold images of different sizes {a.shape[1:3]} vs {b.shape[1:3]}")
    return swd_distance(summarize(a, settings, chunk), summarize(b, settings, chunk))
