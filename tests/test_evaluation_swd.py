"""evaluation.swd against a slow float64 implementation written with explicit loops.

The slow version shares only the random draws (patch corners, directions) with the module;
pyramid, patch extraction, normalisation, projection and the 1-d distances are recomputed
independently (the unequal-size distance with scipy.stats.wasserstein_distance).
"""
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from evaluation.swd import PATCH_SIZE, patch_positions, pyramid_resolutions, random_directions, swd

KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


def _mirror(i, n):
    """scipy's mode='mirror' index (d c b | a b c d | c b a)."""
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def _conv(img, kernel):
    h, w = img.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(kernel[dy + 2, dx + 2] * img[_mirror(y + dy, h), _mirror(x + dx, w)]
                            for dy in range(-2, 3) for dx in range(-2, 3))
    return out


def _slow_pyramid(image, levels):
    """One (H, W, 3) image -> list of (h, w, 3) float64 levels."""
    out, g = [], image.astype(np.float64)
    for _ in range(levels - 1):
        down = np.stack([_conv(g[..., c], KERNEL)[::2, ::2] for c in range(3)], -1)
        up = np.zeros_like(g)
        up[::2, ::2] = down
        out.append(g - np.stack([_conv(up[..., c], 4 * KERNEL) for c in range(3)], -1))
        g = down
    return out + [g]


def _slow_swd(a, b, seed, patches, directions, repeats, min_resolution):
    res = pyramid_resolutions(a.shape[1], a.shape[2], min_resolution)
    pyr = {name: [_slow_pyramid(im, len(res)) for im in imgs] for name, imgs in (("a", a), ("b", b))}
    count = max(len(a), len(b))
    values = []
    for level in range(len(res)):
        desc = {}
        for name, imgs in (("a", a), ("b", b)):
            rows = []
            for i in range(len(imgs)):
                band = pyr[name][i][level]
                top, left = patch_positions(seed, level, count, band.shape[0], band.shape[1], patches)
                for p in range(patches):
                    rows.append(band[top[i, p]:top[i, p] + PATCH_SIZE, left[i, p]:left[i, p] + PATCH_SIZE].reshape(-1))
            d = np.array(rows)
            for c in range(3):
                col = d[:, c::3]
                d[:, c::3] = (col - col.mean()) / col.std()
            desc[name] = d
        dirs = random_directions(seed, level, desc["a"].shape[1], repeats, directions)
        dists = [wasserstein_distance(desc["a"] @ dirs[r][:, k], desc["b"] @ dirs[r][:, k])
                 for r in range(repeats) for k in range(directions)]
        values.append(1e3 * np.mean(dists))
    return values


def _blobs(n, size, seed, sharp=False):
    """Coloured Gaussian blobs (smooth) or blocky random squares (sharp)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        if sharp:
            img = rng.integers(0, 256, (size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
        else:
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(3, size / 2)]
            g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = 40 + g * rng.uniform(50, 215, 3)
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.uint8)


@pytest.mark.parametrize("nb", [3, 2])
def test_swd_matches_slow_float64_loops(nb):
    a, b = _blobs(3, 16, seed=1), _blobs(nb, 16, seed=2, sharp=True)
    kw = dict(seed=5, patches=6, directions=8, repeats=2, min_resolution=8)
    expected = _slow_swd(a, b, **kw)
    got = swd(a, b, seed=5, patches_per_image=6, directions=8, repeats=2, min_resolution=8, chunk=2)
    assert got.resolutions == (16, 8)
    np.testing.assert_allclose(got.per_level, expected, rtol=2e-4)
    assert got.mean == pytest.approx(np.mean(expected), rel=2e-4)
    assert got.as_dict() == {"swd": got.mean, "swd_16": got.per_level[0], "swd_8": got.per_level[1]}


def test_swd_zero_for_identical_sets_and_ordered_by_difference():
    real = _blobs(48, 32, seed=0)
    assert swd(real, real.copy()).per_level == (0.0, 0.0)
    same_kind = swd(real, _blobs(48, 32, seed=1)).mean
    other_kind = swd(real, _blobs(48, 32, seed=1, sharp=True)).mean
    assert 0 < same_kind < other_kind / 3


def test_swd_deterministic_given_seed_and_chunking():
    a, b = _blobs(10, 32, seed=3), _blobs(7, 32, seed=4)
    first = swd(a, b, seed=11, chunk=3)
    assert first == swd(a, b, seed=11, chunk=64)
    assert first != swd(a, b, seed=12)


def test_pyramid_levels_and_positions_stay_inside():
    assert pyramid_resolutions(32, 32) == [32, 16]
    assert pyramid_resolutions(256, 256) == [256, 128, 64, 32, 16]
    assert pyramid_resolutions(15, 40) == []
    top, left = patch_positions(0, 0, 500, 16, 20)
    assert top.min() == 0 and top.max() == 16 - PATCH_SIZE and left.max() == 20 - PATCH_SIZE
    # The first images' positions do not depend on how many images are drawn.
    np.testing.assert_array_equal(patch_positions(0, 1, 3, 16, 16)[0], patch_positions(0, 1, 9, 16, 16)[0][:3])


def test_swd_rejects_bad_inputs():
    good = _blobs(2, 32, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        swd(good.astype(np.float32), good)
    with pytest.raises(ValueError, match="different sizes"):
        swd(good, _blobs(2, 16, seed=0))
    with pytest.raises(ValueError, match="smaller than min_resolution"):
        swd(good[:, :8, :8], good[:, :8, :8])
