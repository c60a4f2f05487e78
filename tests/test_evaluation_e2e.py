"""The whole evaluator (CLI, random Inception and DINOv2 weights, 5 + 5 images) against an
independent walk through the network and independent formulas.

The features the evaluator extracts are recorded on the way; the metrics are recomputed from
them with independent formulas, and the features themselves are checked against a
layer-by-layer walk on one reference and one sample image (Inception costs ~0.4 s per image
on CPU, so the walk does not repeat all ten).
"""
import json
import math

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evaluation import evaluate as evaluate_module
from evaluation import features as features_module
from evaluation.fdd import DinoV2FeatureExtractor, load_dinov2, preprocess_for_dinov2
from evaluation.inception import InceptionFeatureExtractor, save_random_inception_weights
from conftest import SMALL_DINOV2, save_random_dinov2_weights



def _gradient_images(n, seed, size=16):
    """Two-colour linear gradients: varied enough that random-weight features differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(n):
        c0, c1, angle = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / (t.max() - t.min())
        images.append(np.clip(c0 * (1 - t[..., None]) + c1 * t[..., None], 0, 255).astype(np.uint8))
    return np.stack(images)


def _test_batches():
    """Reference: five gradients; samples: three noise images and two checkerboards.

    Chosen (for the seed-0 random weights) so that precision (3/5) and recall (1/5) are
    neither 0 nor 1 nor equal, with every ``d <= radius`` decision at least 3 squared units
    from its boundary, far beyond float16 rounding (~0.03 at these norms).
    """
    ref = _gradient_images(10, seed=1)[[1, 7, 2, 8, 6]]
    noise = np.random.default_rng(5).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:16, 0:16]
    checkers = [((((yy // s) + (xx // s)) % 2)[..., None] * np.array(rgb)).astype(np.uint8)
                for s, rgb in ((1, (255, 255, 255)), (2, (255, 0, 0)))]
    return ref, np.concatenate([noise[[0, 2, 1]], np.stack(checkers)])


def _inception_walk(weights, images):
    """pool_3, mixed_6/conv[..., :7] (NHWC-flattened) and bias-free logits, layer by layer."""
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        h = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"]:
            h = getattr(net, name)(h)
        mixed_6_conv = net.Mixed_6d.branch1x1(h).numpy()  # (B, 192, 17, 17)
        for name in ["Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            h = getattr(net, name)(h)
        pool = h.mean(dim=(2, 3)).double()
        logits = pool @ net.fc.weight.double().T
    spatial = mixed_6_conv.transpose(0, 2, 3, 1)[..., :7].reshape(len(images), 17 * 17 * 7)
    return pool.numpy(), spatial.astype(np.float64), logits.numpy()


def _frechet_low_rank(x, y):
    """Exact FD for N < D: tr sqrt(S_x S_y) = nuclear norm of (Xc Yc^T) / sqrt((n-1)(m-1))."""
    a, b = x - x.mean(0), y - y.mean(0)
    n, m = len(x), len(y)
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
    return np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(a * a) / (n - 1) + np.sum(b * b) / (m - 1) - 2 * tr_sqrt


def _precision_recall_float64(ref, smp, k=3):
    d = lambda u, v: ((u[:, None] - v[None]) ** 2).sum(-1)  # noqa: E731
    r_ref, r_smp = np.sort(d(ref, ref), 1)[:, k], np.sort(d(smp, smp), 1)[:, k]
    d_rs = d(ref, smp)
    return np.mean((d_rs <= r_ref[:, None]).any(0)), np.mean((d_rs <= r_smp[None]).any(1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluation_e2e")
    weights = save_random_inception_weights(str(folder / "inception.pth"), seed=0)
    save_random_dinov2_weights(folder / "dinov2.pth")
    ref, smp = _test_batches()
    np.savez(folder / "ref.npz", arr_0=ref)
    np.savez(folder / "samples.npz", arr_0=smp)

    calls = {"inception": [], "dinov2": []}

    def recording(cls, store):
        def build(*args, **kwargs):
            net = cls(*args, **kwargs)

            def run(images):
                store.append(net(images))
                return store[-1]
            return run
        return build

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features_module, "InceptionFeatureExtractor", recording(InceptionFeatureExtractor, calls["inception"]))
        patch.setattr(features_module, "DinoV2FeatureExtractor", recording(DinoV2FeatureExtractor, calls["dinov2"]))
        code = evaluate_module.main([
            str(folder / "ref.npz"), str(folder / "samples.npz"), "--inception-weights", weights,
            "--device", "cpu", "--batch-size", "3", "--fid-method", "eigh", "--fdd",
            "--dinov2-model", SMALL_DINOV2, "--dinov2-weights", str(folder / "dinov2.pth"),
            "--out", str(folder / "results.json"), "--no-progress"])
    assert code == 0
    with open(folder / "results.json") as f:
        results = json.load(f)
    # the reference is read first, then the samples (5 images each)
    inception = {key: np.concatenate([c[key] for c in calls["inception"]]) for key in ("pool", "spatial", "logits")}
    dino = np.concatenate(calls["dinov2"])
    return dict(results=results, ref=ref, smp=smp, weights=weights, dinov2=str(folder / "dinov2.pth"),
                inception=({k: v[:5] for k, v in inception.items()}, {k: v[5:] for k, v in inception.items()}),
                dino=(dino[:5], dino[5:]))


def test_json_has_every_metric(run):
    results = run["results"]
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "fdd"):
        assert math.isfinite(results[key]), key
    assert (results["num_samples"], results["num_ref"], results["num_ref_pr"]) == (5, 5, 5)
    assert results["reference_statistics"] == "computed"


def test_features_are_pool3_mixed6conv_and_unbiased_logits(run):
    ref_feats, smp_feats = run["inception"]
    assert {k: v.shape for k, v in smp_feats.items()} == {"pool": (5, 2048), "spatial": (5, 2023), "logits": (5, 1008)}
    pool, spatial, logits = _inception_walk(run["weights"], np.stack([run["ref"][0], run["smp"][0]]))
    for key, walked in (("pool", pool), ("spatial", spatial), ("logits", logits)):
        got = np.stack([ref_feats[key][0], smp_feats[key][0]])
        np.testing.assert_allclose(got, walked, rtol=1e-4, atol=1e-5 * np.abs(walked).max(), err_msg=key)
    assert np.abs(smp_feats["pool"] - smp_feats["pool"].mean(0)).max() > 1e-2  # features vary


def test_fid_and_sfid_match_independent_formula(run):
    ref_feats, smp_feats = run["inception"]
    for metric, key in (("fid", "pool"), ("sfid", "spatial")):
        expected = _frechet_low_rank(smp_feats[key].astype(np.float64), ref_feats[key].astype(np.float64))
        assert run["results"][metric] == pytest.approx(expected, rel=1e-4), metric


def test_inception_score_matches_numpy_softmax(run):
    logits = run["inception"][1]["logits"].astype(np.float64)
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
    assert run["results"]["inception_score"] == pytest.approx(math.exp(kl), rel=1e-6)


def test_precision_recall_match_float64_brute_force(run):
    ref_feats, smp_feats = run["inception"]
    precision, recall = _precision_recall_float64(ref_feats["pool"].astype(np.float64),
                                                  smp_feats["pool"].astype(np.float64))
    assert 0 < recall < precision < 1  # a swapped or trivial result would show
    assert (run["results"]["precision"], run["results"]["recall"]) == (precision, recall)


def test_fdd_uses_cls_features(run):
    ref_dino, smp_dino = run["dino"]
    model = load_dinov2(SMALL_DINOV2, run["dinov2"])
    with torch.no_grad():  # timm's own head: global_pool="token" after the final norm
        walked = model(preprocess_for_dinov2(np.stack([run["ref"][0], run["smp"][0]]))).numpy()
    np.testing.assert_allclose(np.stack([ref_dino[0], smp_dino[0]]), walked, rtol=1e-4, atol=1e-5)
    expected = _frechet_low_rank(smp_dino.astype(np.float64), ref_dino.astype(np.float64))
    assert run["results"]["fdd"] == pytest.approx(expected, rel=1e-4)
