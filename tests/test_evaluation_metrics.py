"""The ADM metric formulas against independent float64 / hand-computed values."""
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from evaluation.metrics import (feature_statistics, frechet_distance, inception_score, manifold_radii,
                                pairwise_squared_distances, precision_recall)


def _random_stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
    return x.mean(0), np.cov(x, rowvar=False)


def _fd_scipy(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_float64_scipy_sqrtm(method):
    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng, 400, 48)
    mu2, s2 = _random_stats(rng, 300, 48, shift=0.2)
    expected = _fd_scipy(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1, method=method) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_diagonal_gaussians_is_closed_form(method):
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 5 + 1 + 1 + 6.25
    assert expected == 13.25
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(13.25, rel=1e-12)


def test_frechet_distance_of_low_rank_covariances_matches_nuclear_norm():
    # N < D: tr sqrt(S1 S2) = ||A B^T||_* / sqrt((n1-1)(n2-1)) with A, B the centred features.
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 40)), rng.standard_normal((7, 40)) + 0.5
    a, b = x - x.mean(0), y - y.mean(0)
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt(5 * 6)
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(a * a) / 5 + np.sum(b * b) / 6 - 2 * tr_sqrt
    got = frechet_distance(*feature_statistics(x), *feature_statistics(y), method="eigh")
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_feature_statistics_use_unbiased_covariance():
    x = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]], dtype=np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [3.0, 2.0])
    # deviations (-2, 0), (0, -2), (2, 2); divided by N - 1 = 2
    np.testing.assert_allclose(sigma, [[4.0, 2.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(x[:1])


def test_inception_score_two_soft_predictions():
    # p(y|x) = (0.8, 0.2) and (0.2, 0.8): p(y) = (0.5, 0.5), KL = 0.8 ln 1.6 + 0.2 ln 0.4 for both.
    logits = np.log(np.array([[0.8, 0.2], [0.2, 0.8]]))
    assert inception_score(logits) == pytest.approx(math.exp(0.8 * math.log(1.6) + 0.2 * math.log(0.4)), rel=1e-12)
    assert inception_score(logits + 7.0) == pytest.approx(inception_score(logits), rel=1e-12)  # softmax shift


def test_inception_score_extremes_and_splits():
    assert inception_score(np.zeros((10, 1008))) == pytest.approx(1.0, abs=1e-12)  # uniform p(y|x)
    confident = 60.0 * np.eye(5)  # five distinct confident classes -> IS = 5
    assert inception_score(confident) == pytest.approx(5.0, rel=1e-9)
    # consecutive splits of 5, 5, 2: scores 5 (distinct), 1 (all the same class), 2 (distinct)
    same = np.tile(60.0 * np.eye(5)[:1], (5, 1))
    logits = np.concatenate([confident, same, 60.0 * np.eye(5)[:2]])
    assert inception_score(logits, split_size=5) == pytest.approx((5 + 1 + 2) / 3, rel=1e-9)
    assert inception_score(logits) == pytest.approx(inception_score(logits, split_size=12), rel=1e-12)


# Reference: two unit squares; samples: a square straddling x = 2..3 and the centre of the first one.
REF_2D = [(0, 0), (1, 0), (0, 1), (1, 1), (6, 0), (7, 0), (6, 1), (7, 1)]
SAMPLES_2D = [(0.5, 0.5), (2, 0), (2, 1), (3, 0), (3, 1)]


def test_manifold_radii_hand_computed():
    # Every reference point: neighbours at 1, 1, 2 (squared) -> radius 2.
    np.testing.assert_array_equal(manifold_radii(np.array(REF_2D, np.float32)).numpy(), [2.0] * 8)
    # Samples: (0.5, 0.5) -> 2.5, 2.5, 6.5; square corners -> 1, 1, 2.
    np.testing.assert_array_equal(manifold_radii(np.array(SAMPLES_2D, np.float32)).numpy(),
                                  [6.5, 2.0, 2.0, 2.0, 2.0])


@pytest.mark.parametrize("emulate_fp16", [True, False])
def test_precision_recall_hand_computed(emulate_fp16):
    # precision: (0.5,.5) [0.5 <= 2], (2,0) and (2,1) [1 <= 2] are inside; (3,0), (3,1) [4 > 2] are not -> 3/5.
    # recall: the first square is inside the (0.5,.5) ball (0.5 <= 6.5); the second square is 9 away -> 4/8.
    precision, recall = precision_recall(np.array(REF_2D), np.array(SAMPLES_2D), emulate_fp16=emulate_fp16)
    assert (precision, recall) == (0.6, 0.5)


def test_precision_recall_boundary_is_inclusive():
    ref = np.array([(0, 0), (1, 0), (0, 1), (1, 1)], np.float32)  # radii 2
    on_boundary = np.array([(2, 2), (5, 5), (5, 6), (6, 5), (6, 6)], np.float32)  # (2,2)-(1,1): 1 + 1 = 2
    precision, _ = precision_recall(ref, on_boundary)
    assert precision == 1 / 5


def test_precision_recall_blocks_match_brute_force_float64():
    rng = np.random.default_rng(3)
    ref, smp = rng.standard_normal((23, 5)), rng.standard_normal((31, 5)) + 0.3
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((smp[:, None] - smp[None]) ** 2).sum(-1)
    d_rs = ((ref[:, None] - smp[None]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(d_rr, 1)[:, 3], np.sort(d_ss, 1)[:, 3]
    expected_precision = np.mean((d_rs <= r_ref[:, None]).any(0))
    expected_recall = np.mean((d_rs <= r_smp[None, :]).any(1))
    np.testing.assert_allclose(manifold_radii(smp, batch_size=7, emulate_fp16=False).numpy(), r_smp, rtol=1e-5)
    got = precision_recall(ref, smp, batch_size=7, emulate_fp16=False)
    assert got == (pytest.approx(expected_precision), pytest.approx(expected_recall))
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_pairwise_distances_round_through_float16_like_adm():
    u, v = torch.tensor([[10.3]]), torch.tensor([[10.0]])
    # fp16(10.3) = 10.296875; |u|^2 -> 106.0; u.v = 102.96875 -> 103.0 (tie to even); 106 - 206 + 100 = 0
    assert pairwise_squared_distances(u, v).item() == 0.0
    assert pairwise_squared_distances(u, v, emulate_fp16=False).item() == pytest.approx(0.09, rel=1e-4)
    # |u|^2 = 1001000.25 overflows float16 (max 65504) -> ADM falls back to float32 for the block
    big_u, big_v = torch.tensor([[1000.5]]), torch.tensor([[1000.0]])
    assert pairwise_squared_distances(big_u, big_v).item() == 0.25


def test_precision_recall_needs_k_plus_one_points():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)))


def test_running_statistics_over_batches_and_merged_parts_equal_np_cov():
    from evaluation.metrics import RunningStatistics

    x = np.random.default_rng(3).standard_normal((50, 6)) * [1, 2, 3, 4, 5, 6] + 10
    parts = [RunningStatistics(6).update(x[:7]).update(x[7:20]), RunningStatistics(6).update(x[20:])]
    mu, sigma = parts[0].merge(parts[1]).finalize()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        RunningStatistics(6).update(x[:1]).finalize()
