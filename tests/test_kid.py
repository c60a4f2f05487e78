"""KID against torch-fidelity's own function on the same features, and through evaluate / ref_stats."""
import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from evaluation import evaluate, features, ref_stats
from evaluation.scores import build_metrics
from evaluation.stats_file import load_statistics

TF_KID = dict(kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
              verbose=False)


def _torch_fidelity(x, y, subsets, size, seed):
    out = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, **TF_KID)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def test_kid_matches_torch_fidelity():
    rng = np.random.default_rng(0)
    x, y = rng.random((300, 64)), rng.random((250, 64)) + 0.1
    kid = build_metrics([{"name": "kid", "subsets": 20, "subset_size": 100, "seed": 3}])[0]
    got = kid.score(x, y)
    assert (got["kid"], got["kid_std"]) == pytest.approx(_torch_fidelity(x, y, 20, 100, 3), rel=1e-9)
    assert got["kid"] > 3 * got["kid_std"] > 0 and got["kid_subset_size"] == 100  # the shift is seen


class Pixels:
    """Stands in for Inception: pool features straight from the pixels (float32, 48-d)."""

    def __init__(self, *args):
        pass

    def __call__(self, images):
        return {"pool": images.reshape(len(images), -1)[:, :48].astype(np.float32) / 255}


def test_kid_through_evaluate_and_a_bounded_statistics_file(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "InceptionFeatureExtractor", Pixels)
    monkeypatch.setattr(features, "resolve_inception_weights", lambda path: __file__)
    rng = np.random.default_rng(1)
    ref, smp = rng.integers(0, 256, (40, 4, 4, 3), np.uint8), rng.integers(20, 256, (30, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "smp.npz", arr_0=smp)
    feats = [Pixels()(a)["pool"].astype(np.float64) for a in (smp, ref)]
    result = evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), metrics="kid", progress=False)
    # the subset size (default 1000) is capped by the smaller set
    assert result["kid_subset_size"] == 30
    assert (result["kid"], result["kid_std"]) == pytest.approx(_torch_fidelity(*feats, 100, 30, 0), rel=1e-6)
    # a statistics file keeps at most max_features reference features, a seeded sample of them
    stats = str(tmp_path / "stats.npz")
    assert ref_stats.main([str(tmp_path / "ref.npz"), "--out", stats, "--metrics", "kid", "--no-progress",
                           "--device", "cpu"]) == 0
    stored = load_statistics(stats)
    np.testing.assert_array_equal(stored.arrays["kid_features"], feats[1].astype(np.float32))
    assert stored.meta["kid"] == {"num_images": 40, "seed": 0}
    against_file = evaluate.evaluate(stats, str(tmp_path / "smp.npz"), metrics="kid", progress=False)
    assert against_file["kid"] == pytest.approx(result["kid"], rel=1e-6)
    bounded = ref_stats.compute_statistics(str(tmp_path / "ref.npz"), metrics=[{"name": "kid", "max_features": 8}],
                                           progress=False)
    kept = bounded.arrays["kid_features"]
    assert kept.shape == (8, 48) and all((row == feats[1].astype(np.float32)).all(1).any() for row in kept)
