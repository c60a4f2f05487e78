"""evaluation.swd (streamed, histograms) against the exact computation, and the exact one against a
slow float64 implementation written with explicit loops.

``tests/swd_exact.py`` keeps every projection and sorts them (the module before it streamed). The
slow version shares only the random draws (patch corners, directions) with the module; pyramid,
patch extraction, normalisation, projection and the 1-d distances are recomputed independently
(the unequal-size distance with scipy.stats.wasserstein_distance).
"""
import pickle

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from evaluation.metric_base import array_batches, stream
from evaluation.swd import (PATCH_SIZE, SWDSettings, SWDSketch, patch_positions, patch_positions_at,
                            pyramid_resolutions, random_directions, sketch_edges, summarize, swd, swd_distance,
                            wasserstein_from_histograms)
from swd_exact import exact_swd

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
def test_exact_reference_matches_slow_float64_loops(nb):
    a, b = _blobs(3, 16, seed=1), _blobs(nb, 16, seed=2, sharp=True)
    kw = dict(seed=5, patches=6, directions=8, repeats=2, min_resolution=8)
    expected = _slow_swd(a, b, **kw)
    got = exact_swd(a, b, seed=5, patches_per_image=6, directions=8, repeats=2, min_resolution=8, chunk=2)
    assert got.resolutions == (16, 8)
    np.testing.assert_allclose(got.per_level, expected, rtol=2e-4)


@pytest.mark.parametrize("kind", ["similar", "different", "unequal sizes"])
def test_streamed_swd_agrees_with_the_exact_one(kind):
    """The histograms lose only the part of W1 finer than a bin (module doc: ~0.1 % of the value)."""
    a = _blobs(60, 32, seed=0)
    b = {"similar": _blobs(60, 32, seed=1), "different": _blobs(60, 32, seed=1, sharp=True),
         "unequal sizes": _blobs(37, 32, seed=2)}[kind]
    exact, streamed = exact_swd(a, b, seed=3), swd(a, b, seed=3)
    assert streamed.resolutions == exact.resolutions == (32, 16)
    np.testing.assert_allclose(streamed.per_level, exact.per_level, rtol=5e-3)
    assert streamed.as_dict() == {"swd": streamed.mean, "swd_32": streamed.per_level[0],
                                  "swd_16": streamed.per_level[1]}


def test_histogram_distance_matches_closed_forms():
    edges = sketch_edges(64)
    assert edges[0] == pytest.approx(-1e4) and edges[-1] == pytest.approx(1e4) and np.all(np.diff(edges) > 0)
    # all mass uniform in bin i against all mass uniform in bin j > i: F_a >= F_b everywhere, so
    # W1 = mean_b - mean_a = the difference of the bin centres
    a, b = np.zeros((1, 64), np.int64), np.zeros((1, 64), np.int64)
    a[0, 30], b[0, 35] = 7, 3
    centres = (edges[1:] + edges[:-1]) / 2
    assert wasserstein_from_histograms(a, b, edges)[0] == pytest.approx(centres[35] - centres[30], rel=1e-12)
    # the same bin twice: uniform on [e0, e1] vs uniform on [e0, e1]: 0; and a half/half split of one bin
    # against the whole bin: the CDFs are the same straight line
    assert wasserstein_from_histograms(a, a * 5, edges)[0] == 0.0
    # many samples: the histogram distance approaches scipy's W1 of the samples themselves
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(200_000), 0.3 + 1.2 * rng.standard_normal(150_000)
    fine = sketch_edges()
    hx = np.histogram(x, fine)[0][None].astype(np.int64)
    hy = np.histogram(y, fine)[0][None].astype(np.int64)
    assert wasserstein_from_histograms(hx, hy, fine)[0] == pytest.approx(wasserstein_distance(x, y), rel=1e-3)


def test_swd_zero_for_identical_sets_and_ordered_by_difference():
    real = _blobs(48, 32, seed=0)
    assert swd(real, real.copy()).per_level == (0.0, 0.0)
    same_kind = swd(real, _blobs(48, 32, seed=1)).mean
    other_kind = swd(real, _blobs(48, 32, seed=1, sharp=True)).mean
    assert 0 < same_kind < other_kind / 3


def test_swd_deterministic_given_seed_and_chunking():
    a, b = _blobs(10, 32, seed=3), _blobs(7, 32, seed=4)
    first = swd(a, b, seed=11, chunk=3)
    np.testing.assert_allclose(first.per_level, swd(a, b, seed=11, chunk=64).per_level, rtol=1e-9)
    assert first != swd(a, b, seed=12)


def test_processes_merged_pass_by_pass_give_the_whole_set_summary():
    """Three 'processes' holding images rank::3 (as training evaluates), merged after each pass as
    metric_base.stream does with an all-gather, give the single-process histograms exactly."""
    images = _blobs(14, 32, seed=5)
    whole = summarize(images)
    sketches = [SWDSketch(SWDSettings()) for _ in range(3)]
    for k in range(2):
        for rank, sketch in enumerate(sketches):
            mine = np.arange(rank, len(images), 3)
            for start in range(0, len(mine), 2):
                sketch.feed({"images": images[mine[start:start + 2]]}, mine[start:start + 2])
        parts = [pickle.loads(pickle.dumps(s)) for s in sketches]  # what an all-gather hands every process
        merged = parts[0]
        for part in parts[1:]:
            merged.merge(part)
        if k == 0:
            merged.next_pass()
            sketches = [pickle.loads(pickle.dumps(merged)) for _ in range(3)]
            for s in sketches:
                s.histograms[:] = 0
    assert merged.result().count == 14
    np.testing.assert_array_equal(merged.result().histograms, whole.histograms)
    assert swd_distance(merged.result(), whole).mean == 0.0


def test_a_subset_and_a_limit_read_the_images_they_name():
    images = _blobs(12, 16, seed=6)
    subset = np.array([1, 4, 5, 9])
    by_subset = stream({"s": SWDSketch(SWDSettings(min_resolution=8), subset=subset)}, array_batches(images, batch_size=5),
                       lambda batch, kinds: {"images": batch})["s"].result()
    direct = summarize(images[subset], SWDSettings(min_resolution=8))
    np.testing.assert_array_equal(by_subset.histograms, direct.histograms)
    limited = stream({"s": SWDSketch(SWDSettings(min_resolution=8), limit=7)}, array_batches(images, batch_size=5),
                     lambda batch, kinds: {"images": batch})["s"].result()
    np.testing.assert_array_equal(limited.histograms, summarize(images[:7], SWDSettings(min_resolution=8)).histograms)


def test_pyramid_levels_and_positions_stay_inside():
    assert pyramid_resolutions(32, 32) == [32, 16]
    assert pyramid_resolutions(256, 256) == [256, 128, 64, 32, 16]
    assert pyramid_resolutions(15, 40) == []
    top, left = patch_positions(0, 0, 500, 16, 20)
    assert top.min() == 0 and top.max() == 16 - PATCH_SIZE and left.max() == 20 - PATCH_SIZE
    # The first images' positions do not depend on how many images are drawn, and image i's are
    # the i-th rows of the level's stream whichever images are asked for together.
    np.testing.assert_array_equal(patch_positions(0, 1, 3, 16, 16)[0], patch_positions(0, 1, 9, 16, 16)[0][:3])
    u = np.random.default_rng([0, 1, 0]).random((5000, 128, 2))
    expected = np.floor(u[..., 0] * (16 - PATCH_SIZE + 1)).astype(np.int64)
    for indices in ([4, 2, 0], [4999], [3, 4000, 17]):
        np.testing.assert_array_equal(patch_positions_at(0, 1, indices, 16, 16)[0], expected[indices])


def test_swd_rejects_bad_inputs():
    good = _blobs(2, 32, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        swd(good.astype(np.float32), good)
    with pytest.raises(ValueError, match="different sizes"):
        swd(good, _blobs(2, 16, seed=0))
    with pytest.raises(ValueError, match="smaller than min_resolution"):
        swd(good[:, :8, :8], good[:, :8, :8])


def test_statistics_files_old_and_new_score_alike(tmp_path, monkeypatch, capsys):
    """ref_stats stores SWD's summary (and, with --swd-images, the images, with a warning when they are
    large); a file of before the summary existed (swd_images only) scores the same."""
    from evaluation import evaluate, ref_stats
    from evaluation.stats_file import ReferenceStatistics, load_statistics, save_statistics

    ref, smp = _blobs(20, 16, seed=7), _blobs(15, 16, seed=8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "smp.npz", arr_0=smp)
    monkeypatch.setattr(ref_stats, "LARGE_IMAGES_BYTES", 1000)
    new = str(tmp_path / "new.npz")
    assert ref_stats.main([str(tmp_path / "ref.npz"), "--out", new, "--no-inception", "--no-dinov2", "--swd-images",
                           "all", "--no-progress", "--device", "cpu"]) == 0
    assert "warning: --swd-images stores 20 images (0.0 GiB)" in capsys.readouterr().err
    stats = load_statistics(new)
    np.testing.assert_array_equal(stats.arrays["swd_images"], ref)
    old = str(tmp_path / "old.npz")
    save_statistics(ReferenceStatistics({"swd_images": ref}, {"num_images": 20, "resolution": [16, 16],
                                                              "inception": None, "dinov2": None,
                                                              "swd": {"num_images": 20, "seed": 0}}), old)
    values = [evaluate.evaluate(path, str(tmp_path / "smp.npz"), metrics="swd", progress=False)["swd"]
              for path in (str(tmp_path / "ref.npz"), new, old)]
    assert values[0] == values[1] == values[2] == swd(smp, ref).mean
    # a summary made with another seed: the images it also holds are used; without them, one line
    assert evaluate.evaluate(new, str(tmp_path / "smp.npz"), metrics="swd", swd_seed=4,
                             progress=False)["swd"] == swd(smp, ref, seed=4).mean
    summary_only = str(tmp_path / "summary.npz")
    assert ref_stats.main([str(tmp_path / "ref.npz"), "--out", summary_only, "--metrics", "swd", "--no-progress",
                           "--device", "cpu"]) == 0
    with pytest.raises(ValueError, match="summary made with {'swd_seed': 0}, not with {'swd_seed': 4}; use "
                                         "--swd-seed 0, or recompute"):
        evaluate.evaluate(summary_only, str(tmp_path / "smp.npz"), metrics="swd", swd_seed=4, progress=False)
